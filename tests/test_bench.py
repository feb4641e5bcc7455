"""``make bench`` itself: stopped midway by SIGTERM, it leaves nothing running or on disk."""

from __future__ import annotations

import contextlib
import os
import re
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
        # Whatever the outcome, nothing of the bench's outlives the test.
        left = running_under(scratch)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    reader.join(timeout=10)
    assert left == []
    assert list(scratch.iterdir()) == [], "".join(output)


def test_a_stop_arriving_in_a_finalizer_is_delivered_again() -> None:
    """Python swallows an exception raised in ``__del__``: a SIGTERM landing there would be lost."""
    from bench.__main__ import _exit_on_sigterm

    seen: list[BaseException | None] = []

    class Finalized:
        def __del__(self) -> None:
            try:
                _exit_on_sigterm(signal.SIGTERM, sys._getframe())
                seen.append(None)
            except BaseException as error:  # what the handler raised is the point
                seen.append(error)

    previous = signal.signal(signal.SIGALRM, lambda signum, frame: None)
    try:
        Finalized()  # finalized at once (no other reference)
        assert seen == [None], "raised inside __del__, where Python would swallow it"
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 0, "the stop was not scheduled again"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    with pytest.raises(SystemExit) as stopped:
        _exit_on_sigterm(signal.SIGALRM, sys._getframe())
    assert stopped.value.code == 128 + signal.SIGTERM


def test_the_report_bench_counts_what_it_wrote_on_both_databases(tmp_path: Path) -> None:
    """Its figures agree with the rows it inserted: a month of a year, streamed in constant memory."""
    databases = "both" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "sqlite"
    command = ["-m", "bench", "report", "--report-contracts", "36500", "--no-save", "--database", databases]
    result = subprocess.run(
        [sys.executable, *command],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = ["sqlite", "postgresql"] if databases == "both" else ["sqlite"]
    for kind in kinds:
        # 100 contracts a day (one every 864 s), March's 31 days; a fifth of them signed a day later.
        assert f"lead-source report on {kind}: 36,500 contracts" in result.stdout, result.stdout
    assert result.stdout.count("summary of a month (3,100 sent, 620 signed)") == len(kinds), result.stdout
    peaks = re.findall(
        r"peak memory +([\d.]+) MiB for ([\d,]+) rows, ([\d.]+) MiB for ([\d,]+)", result.stdout
    )
    assert len(peaks) == len(kinds), result.stdout
    for month_mib, month_rows, quarter_mib, quarter_rows in peaks:
        assert (month_rows, quarter_rows) == ("3,100", "8,900"), result.stdout
        # Held all at once, the quarter's rows would take about three times the month's memory.
        assert float(quarter_mib) <= float(month_mib) + 0.5, result.stdout
