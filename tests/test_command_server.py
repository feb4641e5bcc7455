"""The tests' command server answers as the console script does (``tests.command_server``).

Most of the suite's commands are forked from that server rather than exec'd, so
what the suite says of the CLI holds only if a forked command is the same command:
same exit code and output, its own environment, arguments and input, and a
process that a timeout ends.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.command_server import AVAILABLE, ENVIRONMENT_AT_IMPORT, PRELOADED_MODULES
from tests.processes import CLI, COMMAND_TIMEOUT_SECONDS, COMMANDS, child_pids, exec_cli
from tests.support import wait_until

# Elsewhere than on Linux every command execs the console script (tests.processes.run_cli).
pytestmark = pytest.mark.skipif(not AVAILABLE, reason="no command server on this system")

#: How long a command is given before the timeout test gives up on it, in seconds.
SHORT_TIMEOUT_SECONDS = 2.0


def _fork(env: dict[str, str], args: list[str], stdin: str) -> subprocess.CompletedProcess[str]:
    return COMMANDS.run(CLI, args, env=env, stdin=stdin, timeout=COMMAND_TIMEOUT_SECONDS)


@pytest.fixture
def env(test_environment: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The session's environment on a database path that does not exist."""
    return {**os.environ, **test_environment, "DATABASE_URL": f"sqlite:///{tmp_path / 'none.db'}"}


@pytest.mark.parametrize(
    ("args", "stdin", "changes"),
    [
        (["--help"], "", {}),
        (["send-contract"], "", {}),  # a usage error: argparse exits 2
        (["contract-status", "c-unknown", "--json"], "", {}),  # no database: exit 3
        (["contract-status", "c-unknown"], "", {"SECRET_KEY": ""}),  # a configuration error
        (["send-contracts", "--json"], "{not json\n\n", {}),  # input read from stdin
        (["dead-letters", "list", "--json"], "", {"LOG_FORMAT": "json"}),
    ],
    ids=["help", "usage-error", "no-database", "configuration-error", "stdin", "dead-letters"],
)
def test_a_forked_command_answers_as_the_console_script(
    env: dict[str, str], args: list[str], stdin: str, changes: dict[str, str]
) -> None:
    command_env = {**env, **changes}
    executed = exec_cli(command_env, *args, stdin=stdin)
    forked = _fork(command_env, args, stdin)
    assert executed.stdout or executed.stderr
    assert (forked.returncode, forked.stdout, _without_rate(forked.stderr)) == (
        executed.returncode,
        executed.stdout,
        _without_rate(executed.stderr),
    )


def _without_rate(stderr: str) -> str:
    """A summary line's rate (``(76/s)``) differs from run to run."""
    return re.sub(r"\(\d+/s\)", "(N/s)", stderr)


def test_each_command_runs_in_its_own_environment(env: dict[str, str], tmp_path: Path) -> None:
    # The server was started with the session's DATABASE_URL: each
    # command sees only what it is given, and nothing a command read stays for the next.
    answers = []
    for name in ("first.db", "second.db"):
        result = _fork(
            {**env, "DATABASE_URL": f"sqlite:///{tmp_path / name}"}, ["contract-status", "c-1"], ""
        )
        assert result.returncode == 3, result
        answers.append(result.stderr)
    assert "first.db" in answers[0] and "second.db" not in answers[0], answers
    assert "second.db" in answers[1] and "first.db" not in answers[1], answers
    # Without DATABASE_URL (which the server has), the database under DATA_DIR.
    data_dir = tmp_path / "data"
    without_url = {key: value for key, value in env.items() if key != "DATABASE_URL"}
    result = _fork({**without_url, "DATA_DIR": str(data_dir)}, ["contract-status", "c-1"], "")
    assert result.returncode == 3 and str(data_dir / "contract-dispatch.db") in result.stderr, result


def test_a_command_past_its_timeout_is_killed(env: dict[str, str]) -> None:
    # `status --watch` refreshes until Ctrl-C: only the timeout ends it.
    watch = ["status", "--watch", "1", "--json"]
    with pytest.raises(subprocess.TimeoutExpired) as stopped:
        COMMANDS.run(CLI, watch, env=env, stdin="", timeout=SHORT_TIMEOUT_SECONDS)
    # What it printed until then comes with the timeout: a frame per refresh.
    assert stopped.value.output.startswith(b"{"), stopped.value.output
    wait_until(lambda: not child_pids(COMMANDS.server_pid), timeout=10, what="the command to be gone")


def test_the_server_preloads_no_module_that_reads_the_environment_at_import() -> None:
    # Such a module would give every command the server's environment (the broker
    # that `actors` builds from REDIS_URL, prometheus_client's multiprocess directory).
    script = (
        "import importlib, json, sys\n"
        f"for name in {list(PRELOADED_MODULES)!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    loaded = json.loads(
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    )
    assert "workers.cli" in loaded and "sqlalchemy" in loaded
    assert not [name for name in loaded if name.split(".")[0] in ENVIRONMENT_AT_IMPORT]
