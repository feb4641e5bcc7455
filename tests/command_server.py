"""Short ``contract-dispatch`` commands for the tests, each in a process forked from
one that has already imported the libraries.

A start of the console script is 0.55-0.7 s of CPU here, most of it importing
SQLAlchemy, pydantic, redis and the service's models, and the suite runs about
520 commands. The server imports those once, then forks a child per command: a
process of its own, with the command's environment, arguments, working directory,
stdin and stdout/stderr files, which ends with the exit code the console script
would give. The server never runs a command itself, so nothing one command does
reaches the next.

It preloads only modules that read no environment when imported: not ``actors``
(which builds its broker from REDIS_URL) nor ``prometheus_client`` (which reads
PROMETHEUS_MULTIPROC_DIR); a test of its own checks that. Commands a test signals,
streams or runs with bytes arguments, and a few others, still exec the console
script (``tests.processes.CLI``), so the script itself stays under test.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import locale
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

#: Whether this system has what the server needs (Linux: process descriptors, packet sockets).
AVAILABLE = hasattr(os, "pidfd_open") and hasattr(socket, "SOCK_SEQPACKET")

#: Imported by the server before its first fork (what every command would import).
PRELOADED_MODULES = (
    "workers.cli",
    "workers.database",
    "workers.broker_errors",
    "sqlalchemy.dialects.sqlite",
    "sqlalchemy.dialects.postgresql.psycopg",
    "psycopg",
    "sqlmodel",
    "pydantic_settings",
    "email_validator",
    "redis",
    "dramatiq",
    "dramatiq.brokers.redis",
    "dramatiq.brokers.rabbitmq",
    "pika",
    "argon2",
)

#: Modules that read the environment when imported: never preloaded.
ENVIRONMENT_AT_IMPORT = ("actors", "prometheus_client")

#: How long the server may take to end once told to, in seconds.
STOP_TIMEOUT_SECONDS = 5

#: The socket's name in the server's directory, and how many connections may wait on it.
SOCKET_NAME = "commands.sock"
LISTEN_BACKLOG = 16

#: The largest request (arguments and environment, as JSON), and the largest answer
#: (the child's pid, then its exit status), in bytes.
MAX_REQUEST_BYTES = 1 << 20
MAX_ANSWER_BYTES = 256


def _serve(listener: socket.socket) -> None:
    """Fork a child per request, and answer each with its exit status, until stdin closes."""
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    # The test process holds the other end of stdin: when it ends, however it ends, so does the server.
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ)
    children: dict[int, tuple[socket.socket, int]] = {}  # pidfd -> (connection, pid)
    while True:
        for key, _ in selector.select():
            if key.fd == sys.stdin.fileno():
                if not os.read(key.fd, 4096):
                    return
            elif key.fileobj is listener:
                connection, _address = listener.accept()
                message, fds, _flags, _ = socket.recv_fds(connection, MAX_REQUEST_BYTES, 3)
                if not message:
                    connection.close()
                    continue
                request = json.loads(message)
                pid = os.fork()
                if pid == 0:
                    try:
                        # The child keeps none of the server's descriptors but its request's.
                        selector.close()
                        listener.close()
                        for open_connection, _pid in children.values():
                            open_connection.close()
                        for pidfd in children:
                            os.close(pidfd)
                        connection.close()
                    finally:
                        _run_command(request, fds)
                for fd in fds:
                    os.close(fd)
                connection.send(json.dumps({"pid": pid}).encode())
                pidfd = os.pidfd_open(pid)
                children[pidfd] = (connection, pid)
                selector.register(pidfd, selectors.EVENT_READ)
            else:
                pidfd = key.fd
                selector.unregister(pidfd)
                connection, pid = children.pop(pidfd)
                os.close(pidfd)
                _, status = os.waitpid(pid, 0)
                with contextlib.suppress(OSError):
                    connection.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode())
                connection.close()


def _run_command(request: dict[str, Any], fds: list[int]) -> NoReturn:
    """In the forked child: become the command, run it as the console script does, exit.

    Never returns, whatever fails: the child must not go back to the server's loop.
    """
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [request["argv0"], *request["args"]]
        from workers.cli import main

        code = main()
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:
            sys.stderr.write(f"{exit_.code}\n")
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        # What an interpreter does at exit (logging's shutdown is one of these), then
        # the buffered output, as a real process would write it.
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def main() -> None:
    """``python -m tests.command_server DIRECTORY``: preload, then serve until stdin closes.

    The socket is ``DIRECTORY/commands.sock``; the server removes both when it ends.
    """
    import importlib

    for name in PRELOADED_MODULES:
        importlib.import_module(name)
    # A module that read the environment at import would give every command the server's.
    read_at_import = sorted(name for name in sys.modules if name.split(".")[0] in ENVIRONMENT_AT_IMPORT)
    if read_at_import:
        raise SystemExit(f"preloaded modules that read the environment when imported: {read_at_import}")
    directory = Path(sys.argv[1])
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
            listener.bind(str(directory / SOCKET_NAME))
            listener.listen(LISTEN_BACKLOG)
            sys.stdout.write("ready\n")
            sys.stdout.flush()
            _serve(listener)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class CommandServer:
    """The server process of one test process, started on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._directory: str | None = None

    @property
    def server_pid(self) -> int:
        """The server's process id (started if it was not)."""
        return self._started()[1]

    def _started(self) -> tuple[str, int]:
        """The socket's path and the server's pid, starting the server if it is not running."""
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._start()
            assert self._process is not None and self._directory is not None
            return os.path.join(self._directory, SOCKET_NAME), self._process.pid

    def _start(self) -> None:
        self._stop()
        self._directory = tempfile.mkdtemp(prefix="contract-dispatch-commands-")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.command_server", self._directory],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=str(Path(__file__).resolve().parent.parent),
        )
        assert self._process.stdout is not None
        if self._process.stdout.readline() != b"ready\n":
            raise RuntimeError(f"the command server did not start (exit {self._process.wait()})")

    def stop(self) -> None:
        """End the server (commands still running go on to their end)."""
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        if self._process is not None:
            assert self._process.stdin is not None
            self._process.stdin.close()  # the server's signal to end
            try:
                self._process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)  # if the server could not
            self._directory = None

    def run(
        self,
        argv0: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str],
        stdin: str,
        timeout: float,
    ) -> subprocess.CompletedProcess[str]:
        """Run one command to its end, as ``subprocess.run(..., capture_output=True, text=True)``."""
        with (
            tempfile.TemporaryFile() as input_file,
            tempfile.TemporaryFile() as output_file,
            tempfile.TemporaryFile() as error_file,
            socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as connection,
        ):
            input_file.write(stdin.encode(locale.getpreferredencoding(False)))
            input_file.seek(0)
            connection.connect(self._started()[0])
            request = {"argv0": argv0, "args": list(args), "env": dict(env), "cwd": os.getcwd()}
            socket.send_fds(
                connection,
                [json.dumps(request).encode()],
                [input_file.fileno(), output_file.fileno(), error_file.fileno()],
            )
            connection.settimeout(timeout)
            pid = json.loads(connection.recv(MAX_ANSWER_BYTES))["pid"]
            try:
                answer = connection.recv(MAX_ANSWER_BYTES)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                # What it wrote until then, as subprocess.run gives it.
                output_file.seek(0)
                error_file.seek(0)
                raise subprocess.TimeoutExpired(
                    [argv0, *args], timeout, output=output_file.read(), stderr=error_file.read()
                ) from None
            returncode = json.loads(answer)["returncode"]
            output_file.seek(0)
            error_file.seek(0)
            return subprocess.CompletedProcess(
                [argv0, *args], returncode, _as_text(output_file.read()), _as_text(error_file.read())
            )


def _as_text(data: bytes) -> str:
    """What ``subprocess.run(..., text=True)`` makes of output: the locale's encoding, universal newlines."""
    return data.decode(locale.getpreferredencoding(False)).replace("\r\n", "\n").replace("\r", "\n")


if __name__ == "__main__":
    main()
