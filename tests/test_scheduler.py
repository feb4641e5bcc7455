"""The scheduler (issue 4, item 1): each job's slot is claimed once, however many schedulers run.

``claim_slot`` is tested against the real Redis with several callers at once; then
two ``contract-dispatch scheduler`` processes run side by side with a sweep every
1.2 s on a Redis namespace of their own (no worker consumes it), so every message
they enqueue stays there to be counted, next to the slot keys they claimed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import redis
from dramatiq.brokers.redis import RedisBroker

from tests.processes import CLI, wait_for_exit
from tests.support import unique, wait_until
from workers.scheduler import PeriodicJob, claim_slot

#: A sweep every 0.02 minutes.
SWEEP_MINUTES = "0.02"
SWEEP_INTERVAL_SECONDS = 1.2

#: Sweep slots to watch before stopping the schedulers.
SLOTS_TO_WATCH = 5


def caller(url: str, namespace: str) -> RedisBroker:
    """A broker with a Redis connection pool of its own, as in another scheduler process."""
    return RedisBroker(url=url, namespace=namespace, middleware=[])


def schedule_keys(client: redis.Redis, namespace: str, job: str) -> set[bytes]:
    return set(client.scan_iter(match=f"{namespace}:__schedule__:{job}:*", count=1000))


def slot_of(key: bytes) -> int:
    return int(key.rsplit(b":", 1)[1])


def test_one_caller_enqueues_each_job_per_slot(redis_server):
    namespace = unique("slots")
    client = redis_server.client()
    job = PeriodicJob(unique("job"), "sweep_reminders", 60, {})
    other = PeriodicJob(unique("job"), "broker_maintenance", 60, {})
    callers = [caller(redis_server.url, namespace) for _ in range(8)]
    try:
        start = 1_000_000 * 60.0 + 5
        # One after another in the same slot: the first wins.
        assert [claim_slot(c, job, now=start + i) for i, c in enumerate(callers)] == [True] + [False] * 7
        # Another job has slots of its own.
        assert claim_slot(callers[0], other, now=start)

        # All at once, in the next slot: exactly one wins.
        barrier = threading.Barrier(len(callers))
        results: list[bool] = []
        lock = threading.Lock()

        def race(broker: RedisBroker) -> None:
            barrier.wait()
            won = claim_slot(broker, job, now=start + 60)
            with lock:
                results.append(won)

        threads = [threading.Thread(target=race, args=(c,)) for c in callers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
        assert sorted(results) == [False] * 7 + [True]

        # The last instant of a slot and the first of the next are two slots.
        boundary = 1_000_005 * 60.0
        assert claim_slot(callers[1], job, now=boundary - 0.001)
        assert claim_slot(callers[2], job, now=boundary)
        assert not claim_slot(callers[3], job, now=boundary + 59.9)

        # The claim expires on its own, after two intervals.
        key = f"{namespace}:__schedule__:{job.name}:{int(start // 60)}"
        assert 0 < client.pttl(key) <= 120_000
    finally:
        for broker in callers:
            broker.close()
        keys = list(client.scan_iter(match=f"{namespace}:*"))
        if keys:
            client.delete(*keys)


@pytest.fixture
def scheduler_namespace(redis_server):
    namespace = unique("sched")
    yield namespace
    client = redis_server.client()
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
    if keys:
        client.delete(*keys)


def start_scheduler(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [CLI, "scheduler"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def test_two_schedulers_enqueue_each_slot_once_and_stop_on_sigterm(
    redis_server, test_environment, scheduler_namespace, tmp_path
):
    namespace = scheduler_namespace
    client = redis_server.client()
    env = {
        **os.environ,
        **test_environment,
        "REDIS_NAMESPACE": namespace,
        "REMINDER_SWEEP_MINUTES": SWEEP_MINUTES,
        # Schedulers never touch the database; this one is theirs anyway.
        "DATABASE_URL": f"sqlite:///{tmp_path / 'scheduler.db'}",
    }
    logs = [tmp_path / "scheduler-1.log", tmp_path / "scheduler-2.log"]
    # The second at LOG_LEVEL=DEBUG: its lines are verbose, the first's at INFO.
    schedulers = [start_scheduler(env, logs[0]), start_scheduler({**env, "LOG_LEVEL": "DEBUG"}, logs[1])]
    sweep_slots: set[int] = set()
    try:

        def watch() -> bool:
            # A slot's key lives two intervals: polling often sees every one.
            sweep_slots.update(slot_of(k) for k in schedule_keys(client, namespace, "reminder-sweep"))
            assert all(s.poll() is None for s in schedulers), [log.read_text() for log in logs]
            return len(sweep_slots) >= SLOTS_TO_WATCH

        wait_until(watch, timeout=60, what=f"{SLOTS_TO_WATCH} sweep slots claimed")
        for log in logs:

            def started(log: Path = log) -> bool:
                return "Scheduler started" in log.read_text()

            wait_until(started, what=f"{log.name} to start")
        stopped_at = time.monotonic()
        for scheduler in schedulers:
            # Twice, as a platform that signals the whole process group may: one stop.
            os.killpg(scheduler.pid, signal.SIGTERM)
            os.killpg(scheduler.pid, signal.SIGTERM)
        codes = [wait_for_exit(s, timeout=15) for s in schedulers]
        stop_seconds = time.monotonic() - stopped_at
        sweep_slots.update(slot_of(k) for k in schedule_keys(client, namespace, "reminder-sweep"))
    finally:
        for scheduler in schedulers:
            if scheduler.poll() is None:
                os.killpg(scheduler.pid, signal.SIGKILL)
                scheduler.wait()
    output = [log.read_text() for log in logs]
    assert codes == [0, 0], output
    assert stop_seconds < 15
    assert all("Stopping the scheduler" in text for text in output), output
    assert not any("Exception ignored" in text or "Traceback" in text for text in output), output
    assert " DEBUG " not in output[0] and " DEBUG " in output[1], output

    messages = [json.loads(raw) for raw in client.hvals(f"{namespace}:maintenance.msgs")]
    enqueued = Counter(message["actor_name"] for message in messages)
    # One sweep per slot claimed, and one claimed slot per interval: not one per scheduler.
    assert enqueued["sweep_reminders"] == len(sweep_slots), (enqueued, sorted(sweep_slots))
    assert max(sweep_slots) - min(sweep_slots) + 1 >= len(sweep_slots)
    assert all(
        message["args"] == [{"version": 1}] or message["actor_name"] != "sweep_reminders"
        for message in messages
    )
    for job, actor in (
        ("broker-maintenance", "broker_maintenance"),
        ("access-code-expiry", "expire_access_codes"),
    ):
        slots = schedule_keys(client, namespace, job)
        assert len(slots) >= 1
        assert enqueued[actor] == len(slots), (job, enqueued)
    assert set(enqueued) == {"sweep_reminders", "broker_maintenance", "expire_access_codes"}


def test_a_stop_signal_repeated_until_the_scheduler_is_gone_still_ends_it_with_0(
    redis_server, test_environment, scheduler_namespace, tmp_path
):
    """A duplicate that lands once the scheduler has stopped, while Python exits, used to
    find the default action back in place (Python restores it at exit) and kill it: -15."""
    env = {
        **os.environ,
        **test_environment,
        "REDIS_NAMESPACE": scheduler_namespace,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'scheduler.db'}",
    }
    log = tmp_path / "scheduler.log"
    scheduler = start_scheduler(env, log)
    try:
        wait_until(lambda: "Scheduler started" in log.read_text(), what="the scheduler to start")
        deadline = time.monotonic() + 15
        while scheduler.poll() is None and time.monotonic() < deadline:
            # As a supervisor that repeats its stop request until the process is gone.
            os.kill(scheduler.pid, signal.SIGTERM)
            time.sleep(0.0005)
        code = wait_for_exit(scheduler, timeout=5)
    finally:
        if scheduler.poll() is None:
            scheduler.kill()
            scheduler.wait()
    assert code == 0, log.read_text()
    assert log.read_text().count("Stopping the scheduler") == 1
