"""The producer: contracts enqueued per second by the Python API, against Dramatiq's raw enqueue.

No worker runs: the messages stay queued. On the same Redis server and in the
same run:

- single: ``contract_dispatch.send_contract`` (the producer's checks, the
  contract reserved in SQL, one enqueue), one call per contract;
- bulk: ``contract_dispatch.send_contracts`` in batches (the checks and
  reservations in one transaction, the messages in one Redis round trip);
- the command line: ``contract-dispatch send-contracts FILE`` on the same number
  of contracts as JSON lines, timed from the command's start to its exit (its
  interpreter start-up and imports included);
- the baseline: Dramatiq's own ``RedisBroker.enqueue`` (default middleware) of a
  message with the same payload, one call per message; and, for the bulk figure's
  sake, the same messages pipelined (``workers.redis_dispatch.enqueue_many``).

It also measures the Redis memory a queued message takes (``INFO memory``
before and after queueing them): the service's ``send_contract`` messages and
the baseline's.

With ``--broker rabbitmq`` (``python -m bench producer --broker rabbitmq``) the
service enqueues on RabbitMQ (``BROKER_URL``, a virtual host of the run's own)
and the baseline is Dramatiq's ``RabbitmqBroker.enqueue`` with publisher
confirmations (the guarantee the service's single enqueue gives); the figure
beside the bulk one is Dramatiq's enqueue without confirmations (fire and
forget: what a batch could cost at best). No memory figure there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from datetime import UTC, datetime
from typing import Any

from bench import DatabaseKind, Workbench, machine, service_on_rabbitmq
from models.messages import SendContract

DESCRIPTION = "messages enqueued per second by the producer API, single and bulk, against raw enqueue"

#: Contracts per ``send_contracts`` call.
BULK_BATCH = 500

#: Calls made and thrown away first: imports, connection pools and statement caches.
WARM_UP = 50

#: Runs of each measurement; the best is kept (the machine is shared: noise only slows).
REPEAT = 3

#: Messages per measurement (default, --quick).
SIZES = {"single": (1000, 200), "bulk": (5000, 1000)}

WORKSPACE = "ws-producer"

#: The service's queues its producer fills: single sends, bulk sends.
SERVICE_QUEUES = (SendContract.queue_name, SendContract.bulk_queue_name)

#: The raw baseline's queue on RabbitMQ (the service's are SERVICE_QUEUES, in the same virtual host).
RAW_AMQP_QUEUE = "raw_contracts"

#: How long one AMQP connection or command of the bench's own may take, in seconds.
AMQP_TIMEOUT_SECONDS = 10.0


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--producer-messages",
        type=int,
        default=None,
        help="single sends per run (default 1000, 200 with --quick)",
    )
    group.add_argument(
        "--producer-bulk-messages",
        type=int,
        default=None,
        help="bulk sends per run (default 5000, 1000 with --quick)",
    )


def _count(options: argparse.Namespace, name: str, option: str) -> int:
    chosen = getattr(options, option, None)
    if chosen is not None:
        return int(chosen)
    default, quick = SIZES[name]
    return quick if getattr(options, "quick", False) else default


def payloads(count: int) -> list[dict[str, Any]]:
    """send_contract payloads for new clients, with fresh ids."""
    from tests.support import contract_payload

    return [contract_payload(workspace_id=WORKSPACE) for _ in range(count)]


def used_memory(redis: Any) -> int:
    return int(redis.info("memory")["used_memory"])


class ProducerRun:
    """The service's producer and Dramatiq's raw enqueue, on Redis or on RabbitMQ (``amqp_url``)."""

    def __init__(self, workbench: Workbench, *, amqp_url: str | None = None) -> None:
        from dramatiq.brokers.rabbitmq import RabbitmqBroker
        from dramatiq.brokers.redis import RedisBroker

        import actors

        self.service_broker = actors.broker
        self.redis = workbench.redis_client()
        self.amqp_url = amqp_url
        self.raw_namespace = f"{workbench.namespace}-raw"
        self.raw: Any
        self.raw_unconfirmed: Any = None
        if amqp_url is None:
            self.raw = RedisBroker(url=workbench.redis_url, namespace=self.raw_namespace)  # type: ignore[no-untyped-call]
        else:
            # The service's queues are in the same virtual host.
            self.raw = RabbitmqBroker(url=amqp_url, confirm_delivery=True)
            self.raw_unconfirmed = RabbitmqBroker(url=amqp_url, confirm_delivery=False)
        self.raw.declare_queue(self.raw_queue)
        self.root = workbench.root

    @property
    def raw_queue(self) -> str:
        return "contracts" if self.amqp_url is None else RAW_AMQP_QUEUE

    def flush(self) -> None:
        self.service_broker.flush_all()
        self.raw.flush_all()

    def memory(self) -> int | None:
        """Redis's used memory, in bytes; None on RabbitMQ (its queues are not in Redis)."""
        return used_memory(self.redis) if self.amqp_url is None else None

    def single(self, count: int) -> tuple[float, int | None]:
        """Seconds for ``count`` send_contract calls, and the Redis bytes their messages took."""
        from contract_dispatch import send_contract

        batch = payloads(count)
        self.flush()
        before = self.memory()
        started = time.perf_counter()
        for payload in batch:
            send_contract(**payload)
        elapsed = time.perf_counter() - started
        self.check_queued("service", count)
        return elapsed, _grown(before, self.memory())

    def bulk(self, count: int) -> float:
        from contract_dispatch import Receipt, send_contracts

        batch = payloads(count)
        self.flush()
        started = time.perf_counter()
        for start in range(0, count, BULK_BATCH):
            results = send_contracts(batch[start : start + BULK_BATCH])
            if not all(isinstance(result, Receipt) for result in results):
                raise SystemExit("the producer refused bench contracts")
        elapsed = time.perf_counter() - started
        self.check_queued("service", count)
        return elapsed

    def cli_bulk(self, count: int) -> float:
        """Seconds ``contract-dispatch send-contracts FILE`` takes for ``count`` contracts."""
        from bench.processes import CLI

        path = self.root / "contracts.jsonl"
        path.write_text(
            "".join(json.dumps(payload, ensure_ascii=False) + "\n" for payload in payloads(count)),
            encoding="utf-8",
        )
        self.flush()
        started = time.perf_counter()
        # The workbench's environment: its Redis, namespace and database.
        done = subprocess.run([CLI, "send-contracts", str(path)], capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"send-contracts exited {done.returncode}: {done.stderr[-2000:]}")
        self.check_queued("service", count)
        return elapsed

    def _raw_messages(self, count: int) -> list[Any]:
        import dramatiq

        from models.messages import parse_message

        return [
            dramatiq.Message(
                queue_name=self.raw_queue,
                actor_name="send_contract",
                args=(parse_message(SendContract, payload).to_payload(),),
                kwargs={},
                options={},
            )
            for payload in payloads(count)
        ]

    def raw_single(self, count: int) -> tuple[float, int | None]:
        """Seconds for ``count`` raw enqueues of the same payload, and the Redis bytes they took."""
        messages = self._raw_messages(count)
        self.flush()
        before = self.memory()
        started = time.perf_counter()
        for message in messages:
            self.raw.enqueue(message)
        elapsed = time.perf_counter() - started
        self.check_queued("raw", count)
        return elapsed, _grown(before, self.memory())

    def raw_pipelined(self, count: int) -> float:
        """Seconds for ``count`` raw messages at the broker's fastest: pipelined on Redis,
        published without confirmations on RabbitMQ."""
        from workers.redis_dispatch import enqueue_many

        messages = self._raw_messages(count)
        self.flush()
        started = time.perf_counter()
        if self.raw_unconfirmed is None:
            for start in range(0, count, BULK_BATCH):
                enqueue_many(self.raw, messages[start : start + BULK_BATCH])
        else:
            for message in messages:
                self.raw_unconfirmed.enqueue(message)
            # Unconfirmed: the publishes may still be on their way; timed until all are queued.
            self._wait_queued(RAW_AMQP_QUEUE, count)
        elapsed = time.perf_counter() - started
        self.check_queued("raw", count)
        return elapsed

    def _wait_queued(self, queue: str, count: int) -> None:
        from workers.ops.rabbitmq_queues import amqp_connection, queue_state

        assert self.amqp_url is not None
        deadline = time.monotonic() + AMQP_TIMEOUT_SECONDS
        with amqp_connection(self.amqp_url, timeout=AMQP_TIMEOUT_SECONDS) as connection:
            while int(queue_state(connection, queue).message_count) < count and time.monotonic() < deadline:
                time.sleep(0.005)

    def check_queued(self, which: str, count: int) -> None:
        """Raise unless ``count`` messages are queued for the service or the raw baseline."""
        # The service's single sends go to "contracts", its bulk ones to "contracts-bulk".
        queues = SERVICE_QUEUES if which == "service" else (self.raw_queue,)
        if self.amqp_url is None:
            namespace = self.service_broker.namespace if which == "service" else self.raw_namespace
            queued = sum(int(self.redis.hlen(f"{namespace}:{queue}.msgs")) for queue in queues)
        else:
            from workers.ops.rabbitmq_queues import amqp_connection, queue_state

            with amqp_connection(self.amqp_url, timeout=AMQP_TIMEOUT_SECONDS) as connection:
                states = [queue_state(connection, queue) for queue in queues]
            queued = sum(int(state.message_count) for state in states if state is not None)
        if queued != count:
            raise SystemExit(f"{count} messages sent but {queued} queued ({which})")

    def close(self) -> None:
        self.flush()
        self.raw.close()
        if self.raw_unconfirmed is not None:
            self.raw_unconfirmed.close()
        self.redis.close()


def _grown(before: int | None, after: int | None) -> int | None:
    return None if before is None or after is None else after - before


def run_on(
    workbench: Workbench, kind: DatabaseKind, options: argparse.Namespace, *, amqp_url: str | None = None
) -> dict[str, Any]:
    from contract_dispatch import set_workspace

    singles = _count(options, "single", "producer_messages")
    bulks = _count(options, "bulk", "producer_bulk_messages")
    print(f"  producer on {kind}: {singles} single, {bulks} bulk, best of {REPEAT} ...", flush=True)
    with workbench.database(kind, "producer"):
        set_workspace(WORKSPACE, ["rg-1"])
        run = ProducerRun(workbench, amqp_url=amqp_url)
        try:
            run.single(WARM_UP)
            run.bulk(WARM_UP)
            run.raw_single(WARM_UP)
            load_before = round(os.getloadavg()[0], 2)
            times: dict[str, list[float]] = {
                "single": [],
                "bulk": [],
                "cli_bulk": [],
                "raw": [],
                "raw_pipelined": [],
            }
            memory: dict[str, list[int]] = {"service": [], "raw": []}
            # Interleaved: a burst of other work on the machine slows every kind alike.
            for _ in range(REPEAT):
                elapsed, grown = run.single(singles)
                times["single"].append(elapsed)
                if grown is not None:
                    memory["service"].append(grown)
                elapsed, grown = run.raw_single(singles)
                times["raw"].append(elapsed)
                if grown is not None:
                    memory["raw"].append(grown)
                times["bulk"].append(run.bulk(bulks))
                times["cli_bulk"].append(run.cli_bulk(bulks))
                times["raw_pipelined"].append(run.raw_pipelined(bulks))
            load_after = round(os.getloadavg()[0], 2)
        finally:
            run.close()
    rates = {
        "single_per_s": singles / min(times["single"]),
        "raw_per_s": singles / min(times["raw"]),
        "bulk_per_s": bulks / min(times["bulk"]),
        "cli_bulk_per_s": bulks / min(times["cli_bulk"]),
        "raw_pipelined_per_s": bulks / min(times["raw_pipelined"]),
    }
    return {
        "database": kind,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "single_messages": singles,
        "bulk_messages": bulks,
        "bulk_batch": BULK_BATCH,
        "runs_s": times,
        **rates,
        "ratios": {
            "single_vs_raw": rates["single_per_s"] / rates["raw_per_s"],
            "bulk_vs_raw": rates["bulk_per_s"] / rates["raw_per_s"],
            "cli_bulk_vs_raw": rates["cli_bulk_per_s"] / rates["raw_per_s"],
            "bulk_vs_raw_pipelined": rates["bulk_per_s"] / rates["raw_pipelined_per_s"],
        },
        "broker": "redis" if amqp_url is None else "rabbitmq",
        "redis_bytes_per_message": None
        if not memory["service"]
        else {
            "send_contract": min(memory["service"]) / singles,
            "raw_same_payload": min(memory["raw"]) / singles,
        },
        "load_average": [load_before, load_after],
    }


def run(workbench: Workbench, options: argparse.Namespace, kinds: list[DatabaseKind]) -> dict[str, Any]:
    """Each database's figures, keyed ``postgresql`` (on Redis) or ``postgresql on rabbitmq``."""
    if getattr(options, "broker", "redis") == "redis":
        return {kind: run_on(workbench, kind, options) for kind in kinds}
    with service_on_rabbitmq() as amqp_url:
        return {f"{kind} on rabbitmq": run_on(workbench, kind, options, amqp_url=amqp_url) for kind in kinds}


def summary(figures: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for kind, result in figures.items():
        ratios, memory = result["ratios"], result["redis_bytes_per_message"]
        on_rabbitmq = result.get("broker") == "rabbitmq"
        fastest = "raw unconfirmed publish" if on_rabbitmq else "raw pipelined"
        lines.append(
            f"producer on {kind}: best of {REPEAT}, load average {result['load_average'][0]} "
            "(ratio, goal, raw)"
        )
        for label, key, ratio in (
            ("send_contract", "single_per_s", ratios["single_vs_raw"]),
            ("send_contracts", "bulk_per_s", ratios["bulk_vs_raw"]),
        ):
            verdict = "ok  " if ratio >= 0.5 else "MISS"
            lines.append(
                f"  {verdict} {label:<19}{ratio:5.2f} x raw     (goal >= 0.5):  {result[key]:.0f}/s vs raw "
                f"broker.enqueue {result['raw_per_s']:.0f}/s"
                + (
                    f" ({fastest} {result['raw_pipelined_per_s']:.0f}/s: "
                    f"{ratios['bulk_vs_raw_pipelined']:.2f} x)"
                    if key == "bulk_per_s"
                    else ""
                )
            )
        if "cli_bulk_vs_raw" in ratios:
            # Informational: the same goal, for producers that are scripts rather than Python.
            lines.append(
                f"       send-contracts CLI {ratios['cli_bulk_vs_raw']:.2f} x raw: "
                f"{result['cli_bulk_per_s']:.0f}/s for {result['bulk_messages']} contracts in one "
                "command (its start-up included)"
            )
        if memory is not None:
            lines.append(
                f"       Redis per queued message {memory['send_contract']:.0f} bytes (send_contract), "
                f"raw Dramatiq message with the same payload {memory['raw_same_payload']:.0f} bytes"
            )
    return lines
