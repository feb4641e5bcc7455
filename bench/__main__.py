"""``python -m bench [NAME ...] [options]``: run benchmarks, print a summary, save the figures.

With no name every benchmark in ``bench.BENCHMARKS`` runs. ``--help`` lists each
benchmark's own options.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import time
from types import FrameType, ModuleType

from bench import BENCHMARKS, RESULTS_PATH, DatabaseKind, Workbench, postgres_reachable, save_results


def load(name: str) -> ModuleType:
    return importlib.import_module(BENCHMARKS[name])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run the benchmarks (all of them without a name), print a summary and save "
        f"the figures to {RESULTS_PATH.name}.",
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"one of {', '.join(BENCHMARKS)} (default: all)"
    )
    parser.add_argument(
        "--database",
        choices=["auto", "sqlite", "postgresql", "both"],
        default="auto",
        help="auto: PostgreSQL (own schema in the test database) when reachable, else SQLite",
    )
    parser.add_argument("--no-save", action="store_true", help=f"do not update {RESULTS_PATH.name}")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory and schemas")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller runs, for a fast check (pipeline and producer; the sweep has its own sizes)",
    )
    for name in BENCHMARKS:
        module = load(name)
        module.add_arguments(parser.add_argument_group(f"{name}: {module.DESCRIPTION}"))
    options = parser.parse_args(argv)
    unknown = [name for name in options.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    options.names = list(dict.fromkeys(options.names)) or list(BENCHMARKS)
    if options.broker != "redis" and options.names not in (["pipeline"], ["producer"]):
        # The process's producer broker is built once, from BROKER_URL: one benchmark
        # per run on RabbitMQ (the sweep and connections have no broker figure).
        parser.error(
            "--broker rabbitmq runs one benchmark, pipeline or producer: "
            "python -m bench pipeline --broker rabbitmq"
        )
    return options


def database_kinds(choice: str) -> tuple[list[DatabaseKind], str | None]:
    """The databases to run on, and a note when PostgreSQL was wanted but is not there."""
    if choice == "sqlite":
        return ["sqlite"], None
    problem = postgres_reachable()
    if choice == "auto":
        return (
            (["sqlite"], f"PostgreSQL unreachable ({problem}); SQLite used")
            if problem
            else (
                ["postgresql"],
                None,
            )
        )
    if problem:
        raise SystemExit(f"PostgreSQL is unusable: {problem}")
    return (["postgresql"] if choice == "postgresql" else ["sqlite", "postgresql"]), None


#: A stop that arrived while a finalizer ran is delivered again after this long, in seconds.
STOP_RETRY_SECONDS = 0.05


def _in_finalizer(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Unwind as Ctrl-C does, so the workers, the servers, the schemas and the
    temporary directory are cleaned up on the way out (a CI timeout sends SIGTERM)."""
    if _in_finalizer(frame):
        # Python swallows an exception raised in a __del__ (it prints "Exception
        # ignored"): the stop would be lost. SIGALRM brings it back in a moment.
        signal.setitimer(signal.ITIMER_REAL, STOP_RETRY_SECONDS)
        return
    raise SystemExit(128 + signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    signal.signal(signal.SIGALRM, _exit_on_sigterm)
    options = parse_args(argv)
    kinds, note = database_kinds(options.database)
    if note:
        print(note)
    summaries: list[str] = []
    started = time.monotonic()
    with Workbench(keep=options.keep) as workbench:
        for name in options.names:
            module = load(name)
            figures = module.run(workbench, options, kinds)
            if not options.no_save:
                save_results(name, figures)
            summaries.extend(module.summary(figures))
    print()
    print("\n".join(summaries))
    saved = "" if options.no_save else f"; figures saved to {RESULTS_PATH}"
    print(f"\n{len(options.names)} benchmark(s) in {time.monotonic() - started:.0f} s{saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
