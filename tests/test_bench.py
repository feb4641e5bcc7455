"""``make bench`` itself: stopped midway by SIGTERM, it leaves nothing running or on disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.support import wait_until

ROOT = Path(__file__).resolve().parent.parent


def running_under(directory: Path) -> list[int]:
    """Processes whose working directory is in ``directory`` (Redis runs in its ``--dir``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if cwd.startswith(str(directory)):
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_a_bench_stopped_by_sigterm_cleans_up(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench", "producer", "--quick", "--no-save", "--database", "sqlite"],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(scratch)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout or []), daemon=True)
    reader.start()
    try:
        # Its Redis server and temporary directory exist from this line on.
        started = lambda: any("producer on sqlite" in line for line in output)  # noqa: E731
        wait_until(started, timeout=120, what="the bench")
        assert running_under(scratch), "the bench's Redis server was not found"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM, "".join(output)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(timeout=10)
    assert list(scratch.iterdir()) == [], "".join(output)
    assert running_under(scratch) == []
