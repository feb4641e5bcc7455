"""The pipeline through real worker processes, against a no-op Dramatiq actor on the same servers.

Two workers run one after the other, with the same processes and threads, on
the same Redis server (namespaces of their own):

- the baseline: ``python -m dramatiq`` on no-op actors (``bench.noop_actors``:
  Dramatiq's own Redis broker and default middleware, Dramatiq's defaults);
- the service: ``contract-dispatch worker``, sending through the official
  SendGrid client to the stand-in (``tests.sendgrid_standin``) over HTTP, or
  over HTTPS with ``--https`` (as to SendGrid: a throwaway certificate the
  workers trust beside the system's CA bundle). Plain HTTP is the default so
  that figures stay comparable from run to run; HTTPS adds the TLS work a
  production worker does.

With ``--broker rabbitmq`` both run on Dramatiq's RabbitMQ broker instead, in a
virtual host of the run's own (``BENCH_AMQP_URL``); Redis still coordinates.

Figures, each as a ratio to its baseline:

- throughput, existing accounts: ``send_contract`` for clients who have logged
  in (no access code), from the bulk producer call to the stand-in's 202, against
  the no-op actor's rate;
- throughput, new accounts: the same for new clients (one argon2id hash each),
  against cores / one argon2id hash time;
- provider latency: the stand-in answers after 200 ms; emails per second against
  processes x threads / 0.2 s;
- end-to-end latency at 20 messages per second: p50 and p99 from the producer
  call (``send_contract``) to the stand-in's 202, against the no-op actor's from
  enqueue to the actor running;
- the same latency through the command line: each contract a JSON line written
  to one ``send-contracts --json`` process's stdin, as a producer in another
  language keeps it (line written to 202);
- behind an import: the same latency for contracts sent one at a time while
  an import (``send_contracts``, queue ``contracts-bulk``) is being worked
  through, against the idle figure; and how much of the import was left when
  the last of them was sent (none left: the figure is the idle one);
- memory: peak RSS of each worker process over the whole run.

Rates are steady-state rates: completions between the 10th and the 90th
percentile of the run, so a worker's idle poll interval at the start and the
stragglers at the end do not count; the wall-clock rate (first call to last
completion) is kept beside them. A pipeline run leaves out at least what its
workers can hold at each end (Dramatiq prefetches twice its threads per
process): once the last contracts are taken, the invitations queued behind
them go out faster than the pipeline runs, and in a short run that burst
would fall inside the window (60 new accounts gave 0.82 x hashes, 600 gave 0.57).
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import importlib
import json
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import BENCH_AMQP_URL, DatabaseKind, Workbench, machine, service_on_rabbitmq
from bench.connections import bundle_path, trusted_bundle
from bench.noop import LATENCIES_KEY, QUEUE, noop_message
from bench.processes import CLI, WorkerRun, noop_worker, service_worker
from tests.sendgrid_standin import contract_of
from workers.settings import DEFAULT_WORKER_TIMEOUT_MS

DESCRIPTION = "contracts through real workers to the SendGrid stand-in, against a no-op Dramatiq actor"

#: Worker threads per process (the service's and Dramatiq's default).
DEFAULT_THREADS = 8

#: The stand-in's answer time in the provider latency run, in seconds.
PROVIDER_DELAY_SECONDS = 0.2

#: Messages per second of the end-to-end latency runs.
LATENCY_RATE = 20.0

#: Contracts per bulk producer call (``send_contracts``).
PRODUCER_BATCH = 500

#: Contracts sent before the latency run, so every worker process has connected and cached.
WARM_UP_CONTRACTS = 40

#: No-op latency messages processed before measuring.
WARM_UP_NOOPS = 40

#: Steady state: completions between these fractions of a run count for its rate.
STEADY_FROM, STEADY_TO = 0.1, 0.9

#: Reading a queue's counts from RabbitMQ gives up after this long, in seconds.
AMQP_TIMEOUT_SECONDS = 5.0

#: Messages a Dramatiq worker process prefetches per thread (its default).
DRAMATIQ_PREFETCH_PER_THREAD = 2

#: The figures (default, --quick) of each run's size.
SIZES: dict[str, tuple[int, int]] = {
    "contracts": (1500, 300),
    "new_accounts": (300, 150),
    "provider_emails": (600, 160),
    "latency_seconds": (10, 4),
    "import_contracts": (3000, 1000),
    "import_latency_seconds": (5, 2),
    "noop_messages": (10000, 2000),
}

WORKSPACE = "ws-bench"


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--processes", type=int, default=os.cpu_count() or 1, help="worker processes (default: cores)"
    )
    group.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help=f"threads per process (default {DEFAULT_THREADS})",
    )
    group.add_argument(
        "--worker-timeout-ms",
        type=int,
        default=None,
        help="the service's workers only: WORKER_TIMEOUT_MS, Dramatiq's longest idle poll, in ms "
        f"(default: the service's, {DEFAULT_WORKER_TIMEOUT_MS}); the no-op baseline keeps Dramatiq's "
        "defaults (1000)",
    )
    group.add_argument(
        "--broker",
        choices=["redis", "rabbitmq"],
        default="redis",
        help="redis (default), or rabbitmq: the service (BROKER_URL) and its baseline (the no-op "
        "actor, raw enqueue) on "
        f"Dramatiq's RabbitMQ broker, in a virtual host of their own at {BENCH_AMQP_URL} "
        "(pipeline or producer, run alone; Redis still coordinates)",
    )
    group.add_argument(
        "--https",
        action="store_true",
        help="the stand-in serves HTTPS, as SendGrid does (default: plain HTTP, comparable between runs)",
    )
    for name, (default, quick) in SIZES.items():
        group.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=None,
            help=f"default {default}, {quick} with --quick",
        )


def size(options: argparse.Namespace, name: str) -> int:
    chosen = getattr(options, name, None)
    if chosen is not None:
        return int(chosen)
    default, quick = SIZES[name]
    return quick if getattr(options, "quick", False) else default


# -- measuring -------------------------------------------------------------------------


def steady_rate(started: float, completions: list[float], *, ready: float, trim: int = 0) -> dict[str, float]:
    """Completions per second, steady state and wall clock; times are epoch seconds.

    The steady state counts only completions after ``ready`` (every worker
    process registered): a process that started first may have worked alone.
    It leaves out at least ``trim`` completions at each end.
    """
    done = sorted(completions)
    steady = [at for at in done if at >= ready]
    first = max(int(len(steady) * STEADY_FROM), trim)
    last = min(int(len(steady) * STEADY_TO), len(steady) - trim) - 1
    if last <= first:
        raise SystemExit(
            f"{len(steady)} completions are too few to leave {trim} out at each end: make the run longer"
        )
    window = steady[last] - steady[first]
    return {
        "count": len(done),
        "steady_per_s": (last - first) / window if window > 0 else float("nan"),
        "wall_per_s": len(done) / (done[-1] - started) if done and done[-1] > started else float("nan"),
        "wall_s": done[-1] - started if done else float("nan"),
    }


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p99 and max of latencies in seconds, as milliseconds."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0, "p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    cuts = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else ordered * 99
    return {
        "count": len(ordered),
        "p50_ms": cuts[49] * 1000,
        "p99_ms": cuts[98] * 1000,
        "max_ms": ordered[-1] * 1000,
    }


def wait_for(condition: Callable[[], bool], *, timeout: float, what: str, worker: WorkerRun) -> None:
    """Poll ``condition`` every few milliseconds; stop the run after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}; worker log: {worker.log_path}")
        if worker.process is not None and worker.process.poll() is not None:
            raise SystemExit(f"the {worker.label} worker exited waiting for {what}; log: {worker.log_path}")
        time.sleep(0.005)


def paced(count: int, rate: float) -> Iterator[int]:
    """``range(count)``, each step released at its slot of a ``rate`` per second schedule."""
    started = time.monotonic()
    for index in range(count):
        pause = started + index / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        yield index


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def cpu_ticks() -> tuple[int, int]:
    """The machine's busy and total CPU time so far (from /proc/stat), in clock ticks."""
    with open("/proc/stat") as stat:
        values = [int(value) for value in stat.readline().split()[1:]]
    idle = values[3] + values[4]  # idle and iowait
    return sum(values) - idle, sum(values)


def busy_fraction(before: tuple[int, int], after: tuple[int, int]) -> float:
    """How busy every core of the machine was between two ``cpu_ticks()``, 0 to 1."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total else float("nan")


# -- the baseline ----------------------------------------------------------------------


class NoopQueue:
    """The baseline's queue as the benchmark process sees it: on Redis, or on RabbitMQ (``amqp_url``)."""

    def __init__(self, workbench: Workbench, namespace: str, *, amqp_url: str | None) -> None:
        from dramatiq.brokers.rabbitmq import RabbitmqBroker
        from dramatiq.brokers.redis import RedisBroker

        from workers.ops.rabbitmq_queues import amqp_connection

        self.namespace = namespace
        self.redis = workbench.redis_client()
        self.broker: Any = (
            RedisBroker(url=workbench.redis_url, namespace=namespace)  # type: ignore[no-untyped-call]
            if amqp_url is None
            else RabbitmqBroker(url=amqp_url)
        )
        self.broker.declare_queue(QUEUE)
        self._closing = contextlib.ExitStack()
        # One connection for the run's polls (every few ms while draining): a new one
        # per poll would load the cores the baseline is measured on.
        self._amqp = (
            self._closing.enter_context(amqp_connection(amqp_url, timeout=AMQP_TIMEOUT_SECONDS))
            if amqp_url is not None
            else None
        )

    def enqueue_all(self, messages: list[Any]) -> None:
        from workers.redis_dispatch import enqueue_many

        enqueue_many(self.broker, messages)

    def left(self) -> int:
        """Messages not processed yet (on RabbitMQ: not fetched yet, so up to the prefetch fewer)."""
        if self._amqp is None:
            return int(self.redis.hlen(f"{self.namespace}:{QUEUE}.msgs"))
        return int(self._state().message_count)

    def wait_consuming(self, worker: WorkerRun) -> None:
        """Wait until every worker process consumes: its heartbeat in Redis, or its RabbitMQ consumer."""
        if self._amqp is None:
            worker.wait_registered(self.redis, self.namespace)
        else:
            worker.wait_ready(lambda: int(self._state().consumer_count) >= worker.processes)

    def _state(self) -> Any:
        from workers.ops.rabbitmq_queues import queue_state

        assert self._amqp is not None
        return queue_state(self._amqp, QUEUE)

    def close(self) -> None:
        self._closing.close()
        self.redis.close()
        self.broker.close()


def run_noop(workbench: Workbench, options: argparse.Namespace) -> dict[str, Any]:
    """The no-op actor's throughput and latency on Dramatiq's own broker, on the same servers."""
    namespace = f"{workbench.namespace}-noop"
    amqp_url = os.environ.get("BROKER_URL") if options.broker == "rabbitmq" else None
    queue = NoopQueue(workbench, namespace, amqp_url=amqp_url)
    broker, redis = queue.broker, queue.redis
    latencies_key = f"{namespace}:{LATENCIES_KEY}"
    count = size(options, "noop_messages")
    worker = noop_worker(
        dict(os.environ),
        namespace=namespace,
        processes=options.processes,
        threads=options.threads,
        log_path=workbench.root / "noop-worker.log",
        amqp_url=amqp_url,
    )

    def drain(total: int, what: str, samples: list[tuple[float, int]] | None = None) -> None:
        def drained() -> bool:
            left = queue.left()
            if samples is not None:
                samples.append((time.time(), total - left))
            return left == 0

        wait_for(drained, timeout=60 + total / 50, what=what, worker=worker)

    # Queued first, then the worker starts: the same order as the service's runs.
    queue.enqueue_all([noop_message("noop") for _ in range(count)])
    print(f"    no-op: {count} messages ...", flush=True)
    load_before = load_average()
    samples: list[tuple[float, int]] = []
    started = time.time()
    with worker:
        queue.wait_consuming(worker)
        ready = time.time()
        cpu_before, machine_before = worker.cpu_seconds(), cpu_ticks()
        drain(count, "the no-op messages", samples)
        cpu_s, machine_busy = worker.cpu_seconds() - cpu_before, busy_fraction(machine_before, cpu_ticks())
        # Completion times from the drain samples: when each count was first reached.
        completions: list[float] = []
        for at, processed in samples:
            completions.extend([at] * (processed - len(completions)))
        throughput = {
            **steady_rate(started, completions, ready=ready),
            "worker_cpu_ms_per_message": cpu_s / count * 1000,
            "machine_cpu_busy": machine_busy,
            "load_average": [load_before, load_average()],
        }

        seconds = size(options, "latency_seconds")
        sends = int(seconds * LATENCY_RATE)
        print(f"    no-op: latency at {LATENCY_RATE:.0f}/s for {seconds} s ...", flush=True)
        for _ in range(WARM_UP_NOOPS):
            broker.enqueue(noop_message("noop_timed", time.time()))
        wait_for(
            lambda: int(redis.llen(latencies_key)) >= WARM_UP_NOOPS,
            timeout=30,
            what="the no-op latency warm-up",
            worker=worker,
        )
        redis.delete(latencies_key)
        for _ in paced(sends, LATENCY_RATE):
            broker.enqueue(noop_message("noop_timed", time.time()))
        wait_for(
            lambda: int(redis.llen(latencies_key)) >= sends, timeout=30, what="no-op latencies", worker=worker
        )
        latency = percentiles([float(value) for value in redis.lrange(latencies_key, 0, -1)])
        peaks = worker.peak_rss_bytes()
    queue.close()
    return {"throughput": throughput, "latency": latency, "peak_rss_bytes": peaks}


# -- the service -----------------------------------------------------------------------


class Contracts:
    """Payloads of send_contract for existing accounts (logged in) and new ones."""

    def _next(self) -> dict[str, Any]:
        from tests.support import contract_payload

        return contract_payload(workspace_id=WORKSPACE)

    def new_accounts(self, count: int) -> list[dict[str, Any]]:
        return [self._next() for _ in range(count)]

    def existing_accounts(self, count: int) -> list[dict[str, Any]]:
        """Payloads whose clients have an account bound to the company and have logged in."""
        from models.account import Account
        from models.binding import normalize_company_name, normalize_email
        from models.types import utc_now
        from workers.database import session_scope

        payloads = [self._next() for _ in range(count)]
        now = utc_now()
        with session_scope() as session:
            session.add_all(
                Account(
                    email=normalize_email(payload["email"]),
                    company_name=normalize_company_name(payload["company_name"]),
                    first_login_at=now,
                )
                for payload in payloads
            )
        return payloads


@contextmanager
def standin_server(*, trust: Path | None = None) -> Iterator[Any]:
    """The stand-in, over HTTPS with ``trust`` (a directory for its certificate), else plain HTTP."""
    from tests.sendgrid_standin import SendGridStandIn
    from tests.tls import self_signed, server_context

    # SendGrid accepts many connections at once; the stand-in's HTTP server
    # would queue only 5 unaccepted ones (socketserver's default backlog), and a
    # burst of worker threads beyond that waits for SYN retries (a second or more).
    http.server.ThreadingHTTPServer.request_queue_size = 128
    tls = None
    if trust is not None:
        certificate, key = self_signed(trust)
        tls = server_context(certificate, key)
        # The workers' SSL_CERT_FILE (see worker_environment).
        trusted_bundle(trust, certificate)
    standin = SendGridStandIn(tls=tls).start()
    try:
        yield standin
    finally:
        standin.stop()


def worker_environment(standin: Any, *, trust: Path | None = None) -> dict[str, str]:
    """The service workers' environment; with ``trust``, they trust its stand-in certificate."""
    from tests.sendgrid_standin import API_KEY

    trusted = {"SSL_CERT_FILE": str(bundle_path(trust))} if trust is not None else {}
    return {
        **os.environ,
        **trusted,
        "EMAIL_BACKEND": "sendgrid",
        "SENDGRID_API_KEY": API_KEY,
        "SENDGRID_API_HOST": standin.url,
        "SENDGRID_TIMEOUT": "10",
        "MAIL_FROM": "contracts@example.com",
        "APP_BASE_URL": "https://app.example.com",
        # No Prometheus endpoint: port 9191 may be another worker's on this machine.
        "METRICS_PORT": "0",
    }


def argon2id_hash_seconds(repeat: int = 7) -> tuple[float, str]:
    """The CPU time of one argon2id hash with the service's parameters (median), and the parameters.

    CPU time, not wall time: on a machine shared with other work a hash waits
    for a core too, and the baseline is what the cores could do, not what they did.
    The hash runs in the calling thread (one lane), so its thread's CPU time is its cost.
    """
    from models.access_codes import argon2id_hasher, derive_code
    from workers.settings import get_settings

    parameters = get_settings().hash_parameters()
    hasher = argon2id_hasher(parameters)
    times = []
    for attempt in range(repeat):
        started = time.thread_time()
        hasher.hash(derive_code(b"bench", f"nonce-{attempt}"))
        times.append(time.thread_time() - started)
    described = f"{parameters.memory_kib} KiB, t={parameters.time_cost}, p={parameters.parallelism}"
    return statistics.median(times), described


@contextmanager
def _send_contracts_process(log_path: Path) -> Iterator[Callable[[dict[str, Any]], None]]:
    """``contract-dispatch send-contracts --json`` reading its stdin: a function that writes one
    payload there as a JSON line. Its stderr (progress, refusals, summary) goes to
    ``log_path``; closed on the way out, and it must have accepted every line."""
    with log_path.open("w") as log:
        process = subprocess.Popen(
            # Answers as a producer reading them would get them, not read here (the
            # stand-in's 202 is what is timed): a pipe nobody reads would fill.
            [CLI, "send-contracts", "--json"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
            env=dict(os.environ),
        )
        stdin = process.stdin
        assert stdin is not None

        def write_line(payload: dict[str, Any]) -> None:
            stdin.write(json.dumps(payload) + "\n")
            stdin.flush()

        try:
            yield write_line
        finally:
            stdin.close()
            try:
                code = process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise SystemExit(f"send-contracts did not end with its input; see {log_path}") from None
    if code != 0:
        raise SystemExit(f"send-contracts exited {code}: {log_path.read_text()[-2000:]}")


def _send_contract(payload: dict[str, Any]) -> None:
    """The Python producer's ``send_contract``."""
    from contract_dispatch import send_contract

    send_contract(**payload)


class ServiceRun:
    """The service's workers, the stand-in and the producer, for one database.

    Each throughput run queues its contracts first (``send_contracts``), then
    starts a worker of its own: the producer's CPU time does not compete with the
    workers' (the producer has its own benchmark), and each run's peak memory is
    its own. The steady-state window leaves the worker's start-up out.
    """

    def __init__(
        self, workbench: Workbench, standin: Any, options: argparse.Namespace, *, trust: Path | None
    ) -> None:
        self.workbench = workbench
        self.standin = standin
        self.options = options
        self.contracts = Contracts()
        self.runs = 0
        #: Where the HTTPS stand-in's certificate and the workers' CA bundle are (None: HTTP).
        self.trust = trust

    @contextmanager
    def worker(self) -> Iterator[WorkerRun]:
        """A fresh ``contract-dispatch worker``, once its processes have registered."""
        self.runs += 1
        worker = service_worker(
            worker_environment(self.standin, trust=self.trust),
            processes=self.options.processes,
            threads=self.options.threads,
            log_path=self.workbench.root / f"service-worker-{self.runs}.log",
        )
        if self.options.worker_timeout_ms is not None:
            # The service's setting: `contract-dispatch worker` passes it on to Dramatiq.
            worker.env["WORKER_TIMEOUT_MS"] = str(self.options.worker_timeout_ms)
        with worker:
            redis = self.workbench.redis_client()
            worker.wait_registered(redis, self.workbench.namespace)
            redis.close()
            yield worker

    def produce(self, payloads: list[dict[str, Any]]) -> float:
        """Queue the contracts through the bulk producer API; seconds it took."""
        from contract_dispatch import Receipt, send_contracts

        started = time.perf_counter()
        for start in range(0, len(payloads), PRODUCER_BATCH):
            results = send_contracts(payloads[start : start + PRODUCER_BATCH])
            refused = [result for result in results if not isinstance(result, Receipt)]
            if refused:
                raise SystemExit(f"the producer refused bench contracts: {refused[0]!r}")
        return time.perf_counter() - started

    def deliver(self, payloads: list[dict[str, Any]], what: str) -> dict[str, Any]:
        """Queue the contracts, start a worker, wait for each invitation's 202; the rates."""
        self.standin.reset()
        expected = {payload["contract_id"] for payload in payloads}
        produce_s = self.produce(payloads)
        load_before = load_average()
        started = time.time()
        with self.worker() as worker:
            ready = time.time()
            cpu_before, machine_before = worker.cpu_seconds(), cpu_ticks()
            wait_for(
                lambda: len(self.standin.accepted) >= len(payloads),
                timeout=60 + len(payloads) / 5,
                what=what,
                worker=worker,
            )
            cpu_s, machine_busy = (
                worker.cpu_seconds() - cpu_before,
                busy_fraction(machine_before, cpu_ticks()),
            )
            peaks = worker.peak_rss_bytes()
        accepted = self.standin.accepted
        delivered = {contract_of(received.reference) for received in accepted}
        if delivered != expected or len(accepted) != len(payloads):
            raise SystemExit(
                f"{what}: {len(accepted)} emails for {len(delivered & expected)} of the contracts"
            )
        return {
            **steady_rate(
                started,
                [received.answered_at for received in accepted],
                ready=ready,
                trim=self.options.processes * self.options.threads * DRAMATIQ_PREFETCH_PER_THREAD,
            ),
            "produce_s": produce_s,
            "worker_start_s": ready - started,
            # From registration on: start-up (imports) is not a contract's cost.
            "worker_cpu_ms_per_contract": cpu_s / len(payloads) * 1000,
            # Workers, PostgreSQL, Redis, the stand-in and everything else on the machine.
            "machine_cpu_busy": machine_busy,
            "peak_rss_bytes": peaks,
            "load_average": [load_before, load_average()],
        }

    def latency(self, seconds: int) -> dict[str, Any]:
        """send_contract at LATENCY_RATE per second; producer call to 202, per contract."""
        with self.worker() as worker:
            return self._idle_latency(worker, seconds, _send_contract, "the latency run")

    def latency_through_cli(self, seconds: int) -> dict[str, Any]:
        """The latency run through one ``send-contracts --json`` process, as a producer in another
        language would keep it: a JSON line per contract on its stdin, LATENCY_RATE per
        second; line written to 202, per contract."""
        with (
            self.worker() as worker,
            _send_contracts_process(self.workbench.root / "send-contracts.log") as write_line,
        ):
            return self._idle_latency(worker, seconds, write_line, "the pipe latency run")

    def _idle_latency(
        self, worker: WorkerRun, seconds: int, send: Callable[[dict[str, Any]], None], what: str
    ) -> dict[str, Any]:
        """``send`` at LATENCY_RATE per second to the idle ``worker``; send to 202, per contract."""
        payloads = self.contracts.existing_accounts(int(seconds * LATENCY_RATE))
        # A few contracts first: each process's first message opens its connections
        # (and a command's first line waits for it to start).
        self.standin.reset()
        for payload in self.contracts.existing_accounts(WARM_UP_CONTRACTS):
            send(payload)
        wait_for(
            lambda: len(self.standin.accepted) >= WARM_UP_CONTRACTS,
            timeout=60,
            what=f"{what}'s warm-up",
            worker=worker,
        )
        self.standin.reset()
        called = self._paced_sends(payloads, send)
        wait_for(
            lambda: len(self.standin.accepted) >= len(payloads),
            timeout=60,
            what=f"{what}'s emails",
            worker=worker,
        )
        return self._latencies(called)

    def behind_import(self, count: int, seconds: int) -> dict[str, Any]:
        """send_contract at LATENCY_RATE per second while an import of ``count`` contracts,
        queued first, is worked through (from its WARM_UP_CONTRACTS-th email on);
        producer call to 202, per contract sent alone."""
        self.standin.reset()
        imported = self.contracts.existing_accounts(count)
        alone = self.contracts.existing_accounts(int(seconds * LATENCY_RATE))
        self.produce(imported)
        with self.worker() as worker:
            # Once the import flows: each worker process has connected and cached, as
            # before the idle latency run.
            wait_for(
                lambda: len(self.standin.accepted) >= WARM_UP_CONTRACTS,
                timeout=60,
                what="the import's first emails",
                worker=worker,
            )
            called = self._paced_sends(alone, _send_contract)
            import_sent = sum(
                1 for received in self.standin.accepted if contract_of(received.reference) not in called
            )
            wait_for(
                lambda: len(self.standin.accepted) >= count + len(alone),
                timeout=60 + count / 5,
                what="the import's and the single contracts' emails",
                worker=worker,
            )
        return {
            **self._latencies(called),
            "import_contracts": count,
            "import_left_after_last_send": count - import_sent,
        }

    def _paced_sends(
        self, payloads: list[dict[str, Any]], send: Callable[[dict[str, Any]], None]
    ) -> dict[str, float]:
        """``send`` of each payload, LATENCY_RATE per second; each call's time by contract id."""
        called: dict[str, float] = {}
        for index in paced(len(payloads), LATENCY_RATE):
            payload = payloads[index]
            called[payload["contract_id"]] = time.time()
            send(payload)
        return called

    def _latencies(self, called: dict[str, float]) -> dict[str, float]:
        """Percentiles from each call in ``called`` to its invitation's 202 at the stand-in."""
        return percentiles(
            [
                received.answered_at - called[contract_id]
                for received in self.standin.accepted
                if (contract_id := contract_of(received.reference)) in called
            ]
        )

    def provider(self, count: int) -> dict[str, Any]:
        """Emails per second while every provider call takes PROVIDER_DELAY_SECONDS."""
        from tests.sendgrid_standin import Answer

        payloads = self.contracts.existing_accounts(count)
        self.standin.chooser = lambda incoming: Answer(delay=PROVIDER_DELAY_SECONDS, kind="slow")
        in_flight: list[int] = []
        sampling = True

        def sample() -> None:
            while sampling:
                in_flight.append(self.standin.in_flight)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            figures = self.deliver(payloads, "the slow provider's emails")
        finally:
            sampling = False
            sampler.join()
            self.standin.chooser = None
        busy = [value for value in in_flight if value > 0]
        figures["provider_calls_in_flight"] = {
            "mean": statistics.fmean(busy) if busy else 0.0,
            "max": max(in_flight, default=0),
            "worker_threads": self.options.processes * self.options.threads,
        }
        return figures


def run_service(workbench: Workbench, options: argparse.Namespace) -> dict[str, Any]:
    from contract_dispatch import set_workspace

    set_workspace(WORKSPACE, ["rg-1"])
    hash_s, hash_parameters = argon2id_hash_seconds()
    figures: dict[str, Any] = {}
    trust = workbench.root if options.https else None
    with standin_server(trust=trust) as standin:
        run = ServiceRun(workbench, standin, options, trust=trust)

        count = size(options, "contracts")
        print(f"    service: {count} contracts, existing accounts ...", flush=True)
        figures["existing_accounts"] = run.deliver(
            run.contracts.existing_accounts(count), "the existing accounts' invitations"
        )

        count = size(options, "new_accounts")
        print(f"    service: {count} contracts, new accounts ...", flush=True)
        delivered = run.deliver(run.contracts.new_accounts(count), "the new accounts' invitations")
        # Measured again once the workers are gone: a hash that other work on the
        # machine slowed down would raise the ceiling's cost and flatter the ratio.
        measured = [hash_s, argon2id_hash_seconds()[0]]
        figures["new_accounts"] = {
            **delivered,
            "argon2id_hash_s": min(measured),
            "argon2id_hash_s_measured": measured,
            "argon2id": hash_parameters,
        }

        count = size(options, "provider_emails")
        print(f"    service: {count} emails, provider answering in 200 ms ...", flush=True)
        figures["provider_latency"] = run.provider(count)

        seconds = size(options, "latency_seconds")
        print(f"    service: latency at {LATENCY_RATE:.0f}/s for {seconds} s ...", flush=True)
        figures["latency"] = run.latency(seconds)

        print(
            f"    service: latency at {LATENCY_RATE:.0f}/s for {seconds} s through send-contracts ...",
            flush=True,
        )
        figures["latency_through_cli"] = run.latency_through_cli(seconds)

        count, seconds = size(options, "import_contracts"), size(options, "import_latency_seconds")
        print(
            f"    service: latency at {LATENCY_RATE:.0f}/s for {seconds} s behind an import of {count} ...",
            flush=True,
        )
        figures["latency_behind_import"] = run.behind_import(count, seconds)
    return figures


# -- the benchmark ---------------------------------------------------------------------


def run_on(workbench: Workbench, kind: DatabaseKind, options: argparse.Namespace) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    print(f"  pipeline on {kind}: {options.processes} processes x {options.threads} threads", flush=True)
    with workbench.database(kind, "pipeline"):
        noop = run_noop(workbench, options)
        service = run_service(workbench, options)
    noop_rate = noop["throughput"]["steady_per_s"]
    new = service["new_accounts"]
    hash_ceiling = cores / new["argon2id_hash_s"]
    provider_ceiling = options.processes * options.threads / PROVIDER_DELAY_SECONDS
    return {
        "database": kind,
        "processes": options.processes,
        "threads": options.threads,
        "broker": options.broker,
        "provider_scheme": "https" if options.https else "http",
        "service_worker_timeout_ms": options.worker_timeout_ms,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "noop": noop,
        "service": service,
        "ratios": {
            "existing_accounts_vs_noop": service["existing_accounts"]["steady_per_s"] / noop_rate,
            "new_accounts_vs_argon2id": new["steady_per_s"] / hash_ceiling,
            "provider_latency_vs_threads": service["provider_latency"]["steady_per_s"] / provider_ceiling,
            "latency_p99_vs_noop": service["latency"]["p99_ms"] / noop["latency"]["p99_ms"],
        },
        "baselines": {
            "noop_per_s": noop_rate,
            "argon2id_ceiling_per_s": hash_ceiling,
            "provider_ceiling_per_s": provider_ceiling,
        },
    }


def run(workbench: Workbench, options: argparse.Namespace, kinds: list[DatabaseKind]) -> dict[str, Any]:
    """Each database's figures, keyed ``postgresql`` (on Redis) or ``postgresql on rabbitmq``."""
    if options.broker == "redis":
        # Sets up the service's broker (the producer's) from the workbench's settings.
        importlib.import_module("actors")
        return {kind: run_on(workbench, kind, options) for kind in kinds}
    with service_on_rabbitmq():
        return {f"{kind} on rabbitmq": run_on(workbench, kind, options) for kind in kinds}


# -- the summary -----------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "ok  " if ok else "MISS"


def _mb(value: float) -> str:
    return f"{value / 1e6:.0f} MB"


def summary(figures: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for kind, result in figures.items():
        noop, service, ratios, baselines = (
            result["noop"],
            result["service"],
            result["ratios"],
            result["baselines"],
        )
        existing, new, provider = (
            service["existing_accounts"],
            service["new_accounts"],
            service["provider_latency"],
        )
        latency, noop_latency = service["latency"], noop["latency"]
        # Each argon2id hash holds ARGON2_MEMORY_KIB while it runs: concurrent hashes,
        # one per busy thread, set the new accounts' peak.
        existing_peak = max(service["existing_accounts"]["peak_rss_bytes"].values(), default=0)
        new_peak = max(service["new_accounts"]["peak_rss_bytes"].values(), default=0)
        service_peak = max(existing_peak, new_peak)
        lines.append(
            f"pipeline on {kind}: {result['processes']} processes x {result['threads']} threads"
            f", provider over {result.get('provider_scheme', 'http').upper()}"
            + (
                f", service worker timeout {result['service_worker_timeout_ms']} ms"
                if result.get("service_worker_timeout_ms") is not None
                else ""
            )
            + ", "
            f"load average {existing['load_average'][0]}-{existing['load_average'][1]} (ratio, goal, raw)"
        )
        ratio = ratios["existing_accounts_vs_noop"]
        lines.append(
            f"  {_verdict(ratio >= 0.35)} existing accounts   {ratio:5.2f} x no-op   (goal >= 0.35): "
            f"{existing['steady_per_s']:.0f}/s vs no-op {baselines['noop_per_s']:.0f}/s "
            f"({existing['count']} contracts, {existing['wall_s']:.1f} s wall)"
        )
        lines.append(
            f"       worker CPU per contract {existing['worker_cpu_ms_per_contract']:.1f} ms "
            f"(no-op {noop['throughput']['worker_cpu_ms_per_message']:.2f} ms per message); "
            f"{result['machine']['cpus']} cores / that = "
            f"{result['machine']['cpus'] * 1000 / existing['worker_cpu_ms_per_contract']:.0f}/s at best; "
            f"machine CPU {existing['machine_cpu_busy']:.0%} busy (no-op run "
            f"{noop['throughput']['machine_cpu_busy']:.0%})"
        )
        ratio = ratios["new_accounts_vs_argon2id"]
        lines.append(
            f"  {_verdict(ratio >= 0.8)} new accounts        {ratio:5.2f} x hashes  (goal >= 0.8):  "
            f"{new['steady_per_s']:.0f}/s vs {baselines['argon2id_ceiling_per_s']:.0f}/s "
            f"= {result['machine']['cpus']} cores / {new['argon2id_hash_s'] * 1000:.1f} ms argon2id CPU "
            f"({new['count']} contracts)"
        )
        measured = new.get("argon2id_hash_s_measured")
        if measured:
            before, after = measured
            lines.append(
                f"       argon2id CPU per hash, the lower of: {before * 1000:.1f} ms before, "
                f"{after * 1000:.1f} ms after the run (median of 7 each)"
            )
        ratio = ratios["provider_latency_vs_threads"]
        calls = provider["provider_calls_in_flight"]
        lines.append(
            f"  {_verdict(ratio >= 0.8)} provider at 200 ms  {ratio:5.2f} x threads (goal >= 0.8):  "
            f"{provider['steady_per_s']:.0f} emails/s vs {baselines['provider_ceiling_per_s']:.0f}/s; "
            f"calls in flight {calls['mean']:.1f} mean, {calls['max']} max "
            f"of {result['processes'] * result['threads']} threads"
        )
        lines.append(
            f"  {_verdict(latency['p99_ms'] <= 100)} latency at 20/s    p99 {latency['p99_ms']:.0f} ms "
            f"(goal <= 100 ms), p50 {latency['p50_ms']:.0f} ms; no-op p99 {noop_latency['p99_ms']:.0f} ms, "
            f"p50 {noop_latency['p50_ms']:.0f} ms ({ratios['latency_p99_vs_noop']:.2f} x no-op p99)"
        )
        piped = service.get("latency_through_cli")
        if piped is not None:
            lines.append(
                f"       through send-contracts  p99 {piped['p99_ms']:.0f} ms, p50 {piped['p50_ms']:.0f} ms: "
                "a JSON line per contract on one command's stdin"
            )
        behind = service["latency_behind_import"]
        lines.append(
            f"       behind an import  p99 {behind['p99_ms']:.0f} ms, p50 {behind['p50_ms']:.0f} ms: sent "
            f"alone while {behind['import_contracts']} imported contracts went out "
            f"({behind['import_left_after_last_send']} still queued after the last one"
            + (
                ": the import ended too soon, make it larger)"
                if not behind["import_left_after_last_send"]
                else ")"
            )
        )
        lines.append(
            f"  {_verdict(service_peak < 150e6)} memory              peak RSS per worker process "
            f"{_mb(service_peak)} (goal < 150 MB): existing accounts {_mb(existing_peak)}, new accounts "
            f"{_mb(new_peak)}; no-op worker {_mb(max(noop['peak_rss_bytes'].values(), default=0))}"
        )
    return lines
