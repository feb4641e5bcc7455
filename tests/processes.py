"""Real processes and network faults for the recovery and chaos tests.

``WorkerProcess`` runs ``contract-dispatch worker`` in its own process group, so
one call can SIGKILL the supervisor and its worker processes together (a crashed
host) or SIGTERM them (a deploy). ``TcpProxy`` stands between the service and a
server (PostgreSQL, Redis) and can cut every connection and refuse new ones for
a while: an outage without touching a server other tests share.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests import command_server
from tests.support import free_port, wait_until

#: The console script installed next to the interpreter running the tests.
CLI = str(Path(sys.executable).with_name("contract-dispatch"))

#: One command never takes this long; a hung command fails the test instead of the run.
COMMAND_TIMEOUT_SECONDS = 60


#: Set (to anything) to run every command of ``run_cli`` by exec'ing the console
#: script, as a user does, instead of forking it from the command server.
EXEC_CLI_VARIABLE = "TEST_EXEC_CLI"

#: Forks this test process's short commands from one process that imported the libraries once.
COMMANDS = command_server.CommandServer()


def run_cli(
    env: Mapping[str, str], *args: str, stdin: str = "", timeout: float = COMMAND_TIMEOUT_SECONDS
) -> subprocess.CompletedProcess[str]:
    """``contract-dispatch ARGS`` with ``env``, ``stdin`` as its input; never raises on the exit code.

    A process of its own, forked from the command server (``tests.command_server``);
    with TEST_EXEC_CLI set, or where there can be no such server, the console script itself.
    """
    if os.environ.get(EXEC_CLI_VARIABLE) or not command_server.AVAILABLE:
        return exec_cli(env, *args, stdin=stdin, timeout=timeout)
    return COMMANDS.run(CLI, args, env=env, stdin=stdin, timeout=timeout)


def exec_cli(
    env: Mapping[str, str], *args: str, stdin: str = "", timeout: float = COMMAND_TIMEOUT_SECONDS
) -> subprocess.CompletedProcess[str]:
    """``run_cli`` through the console script itself, in a new interpreter."""
    return subprocess.run(
        [CLI, *args], env=dict(env), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )


def describe(result: subprocess.CompletedProcess[str]) -> str:
    """A finished command's exit code and output, for an assertion's message."""
    return f"exit {result.returncode}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"


class WorkerProcess:
    """``contract-dispatch worker`` as a process group, with its output in a log file."""

    def __init__(self, env: dict[str, str], *, log_path: Path, processes: int = 1, threads: int = 4) -> None:
        self.env = env
        self.log_path = log_path
        self.processes = processes
        self.threads = threads
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [CLI, "worker", "--processes", str(self.processes), "--threads", str(self.threads)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def children(self) -> list[int]:
        """The worker processes under the supervisor (from /proc)."""
        return child_pids(self.pid)

    def kill(self) -> None:
        """SIGKILL the whole group: nothing gets to clean up."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self, *, timeout: float = 60.0) -> int:
        """SIGTERM (a graceful stop); returns the exit code."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is ``parent`` (from /proc), in pid order."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.append(int(entry.name))
    return sorted(found)


def run_send_contracts(
    env: Mapping[str, str], payloads: Sequence[Mapping[str, Any]]
) -> subprocess.CompletedProcess[str]:
    """``contract-dispatch send-contracts --json`` in ``env``, the payloads on stdin as JSON lines."""
    return run_cli(
        env, "send-contracts", "--json", stdin="".join(json.dumps(payload) + "\n" for payload in payloads)
    )


def assert_said_the_batch_may_be_queued(
    result: subprocess.CompletedProcess[str], payloads: Sequence[Mapping[str, Any]]
) -> None:
    """``run_send_contracts`` whose broker took the batch and never answered: it says the
    batch may be queued (not that nothing was sent) and keeps the contracts reserved, so
    that a worker processes them as accepted if the batch was queued."""
    from contract_dispatch import contract_status

    assert result.returncode == 3, result.stderr
    assert "the batch may have been queued" in result.stderr
    assert f"lines 1 to {len(payloads)} may have been queued, those after them were not sent" in result.stderr
    assert "nothing was sent" not in result.stderr and "Traceback" not in result.stderr
    for payload in payloads:
        report = contract_status(str(payload["contract_id"]))
        assert report is not None and report.status == "queued"


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to a target; ``cut()`` and ``restore()`` make an outage."""

    def __init__(
        self, target_host: str, target_port: int, *, cut_after: Callable[[bytes], bool] | None = None
    ) -> None:
        """``cut_after``: given each chunk the client sends, True cuts the proxy once it is forwarded
        (the server gets the chunk, the client never hears its answer)."""
        self.target = (target_host, target_port)
        self.cut_after = cut_after
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._connections: list[socket.socket] = []
        self._stopped = threading.Event()

    def start(self) -> TcpProxy:
        self._listen()
        return self

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:
                    # cut() ran while this connection was being set up: it must not survive the cut.
                    client.close()
                    upstream.close()
                    return
                self._connections += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        sockets = [a, b]
        try:
            while True:
                readable, _, _ = select.select(sockets, [], [], 1.0)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (b if sock is a else a).sendall(data)
                    if sock is a and self.cut_after is not None and self.cut_after(data):
                        self.cut()
                        return
        except (OSError, ValueError):
            # ValueError: cut() closed a socket while select() was about to use it.
            return
        finally:
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def cut(self) -> None:
        """Close every connection and refuse new ones (connection refused)."""
        with self._lock:
            if self._listener is not None:
                # shutdown() wakes the thread blocked in accept(); close() alone
                # would leave it accepting one more connection after the cut.
                with contextlib.suppress(OSError):
                    self._listener.shutdown(socket.SHUT_RDWR)
                self._listener.close()
                self._listener = None
            for sock in self._connections:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._connections.clear()

    def restore(self) -> None:
        """Accept connections again."""
        with self._lock:
            if self._listener is None:
                self._listen()

    def stop(self) -> None:
        self.cut()


def wait_for_exit(process: subprocess.Popen[bytes], *, timeout: float) -> int:
    """The exit code, or an assertion error after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    wait_until(lambda: process.poll() is not None, timeout=max(deadline - time.monotonic(), 0.1), what="exit")
    code = process.poll()
    assert code is not None
    return code
