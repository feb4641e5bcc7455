"""Real worker processes for the benchmarks: the service's and the no-op baseline's.

Both run as a process group of their own (a Dramatiq supervisor and its worker
processes) with their output in a log file, and are stopped with SIGTERM (then
SIGKILL if they linger). Each worker process's peak resident memory is read
from ``/proc`` while it runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.noop import AMQP_URL_VARIABLE, NAMESPACE_VARIABLE

#: The repository root: ``python -m dramatiq bench.noop_actors`` imports from there.
REPOSITORY = Path(__file__).resolve().parent.parent

#: The console script installed next to the running interpreter.
CLI = str(Path(sys.executable).with_name("contract-dispatch"))

#: How long worker processes get to start and register with Redis, in seconds.
START_TIMEOUT_SECONDS = 60.0

#: How long a SIGTERMed worker gets to stop before it is killed, in seconds.
STOP_TIMEOUT_SECONDS = 30.0


class WorkerRun:
    """One worker (supervisor and ``processes`` worker processes), started by ``start()``."""

    def __init__(
        self, argv: list[str], env: dict[str, str], *, log_path: Path, processes: int, label: str
    ) -> None:
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.processes = processes
        self.label = label
        self.process: subprocess.Popen[bytes] | None = None
        self.started_ms = 0

    def __enter__(self) -> WorkerRun:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> WorkerRun:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.started_ms = int(time.time() * 1000)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=REPOSITORY,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_registered(self, redis_client: Any, namespace: str) -> None:
        """Wait until every worker process has fetched from Redis once (its heartbeat is there).

        Only heartbeats since this run's start count: an earlier worker's stay
        in the set until maintenance drops them.
        """
        from workers.middleware.maintenance import heartbeats_key

        key = heartbeats_key(namespace)
        self.wait_ready(lambda: redis_client.zcount(key, self.started_ms, "+inf") >= self.processes)

    def wait_ready(self, ready: Callable[[], bool]) -> None:
        """Wait until ``ready()``, failing if the worker exits or takes longer than it may to start."""
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not ready():
            if self.process is None or self.process.poll() is not None:
                raise SystemExit(
                    f"the {self.label} worker exited; see {self.log_path}:\n{self.log()[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise SystemExit(f"the {self.label} worker did not start in time; see {self.log_path}")
            time.sleep(0.05)

    def worker_pids(self) -> list[int]:
        """The worker processes under the supervisor (from /proc)."""
        from tests.processes import child_pids

        return child_pids(self.process.pid) if self.process is not None else []

    def peak_rss_bytes(self) -> dict[int, int]:
        """Each worker process's peak resident set size so far (VmHWM), in bytes."""
        peaks = {}
        for pid in self.worker_pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peaks[pid] = int(line.split()[1]) * 1024
        return peaks

    def cpu_seconds(self) -> float:
        """CPU time (user and system) the worker processes have used so far, in seconds."""
        ticks = 0
        for pid in self.worker_pids():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                # utime and stime: fields 14 and 15 of stat(5), 12 and 13 after the name.
                ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=STOP_TIMEOUT_SECONDS)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def service_worker(env: dict[str, str], *, processes: int, threads: int, log_path: Path) -> WorkerRun:
    """``contract-dispatch worker``: what production runs."""
    argv = [CLI, "worker", "--processes", str(processes), "--threads", str(threads)]
    return WorkerRun(argv, env, log_path=log_path, processes=processes, label="service")


def noop_worker(
    env: dict[str, str],
    *,
    namespace: str,
    processes: int,
    threads: int,
    log_path: Path,
    amqp_url: str | None = None,
) -> WorkerRun:
    """Dramatiq's own CLI on the no-op actors (``bench.noop_actors``), Dramatiq's defaults otherwise.

    With ``amqp_url`` the no-op actors are on Dramatiq's RabbitMQ broker there.
    """
    argv = [
        sys.executable,
        "-m",
        "dramatiq",
        "bench.noop_actors:broker",
        "--processes",
        str(processes),
        "--threads",
        str(threads),
    ]
    environment = {**env, NAMESPACE_VARIABLE: namespace, "PYTHONPATH": str(REPOSITORY)}
    if amqp_url is not None:
        environment[AMQP_URL_VARIABLE] = amqp_url
    return WorkerRun(argv, environment, log_path=log_path, processes=processes, label="no-op")
