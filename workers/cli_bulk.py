"""``contract-dispatch send-contracts``: many contracts from JSON Lines, through the bulk producer.

Each input line is one send_contract message payload in the wire format (the
object ``contract-dispatch schema`` describes). Lines go to ``send_contracts``
in batches: one transaction for the checks and one broker round trip per batch.
A batch takes the lines already arrived, up to ``--batch-size`` (and waits
``--linger-ms`` after its first line for more), so lines a producer writes to a
pipe one at a time are sent (and answered) as they come. A bad line is refused
on its own; the others still go.

Exit codes: 0 every line accepted, 2 at least one line refused, 3 the broker or
the database became unusable (the lines already reported were handled; the
rest were not sent, and running the same input again is safe: an accepted
contract is answered with its status, never sent twice).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, BinaryIO

from sqlalchemy.exc import OperationalError

from models.errors import InvalidPayload, Rejected, TransientError
from models.messages import SendContract, contract_id_of, parse_message
from workers.cli import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    unavailable_reason,
    whole_number,
)
from workers.cli_progress import Progress
from workers.line_feed import LineFeed

#: Contracts per ``send_contracts`` call: one transaction and one broker round trip each.
DEFAULT_BATCH_SIZE = 500

#: How long a batch waits for more lines after its first, in milliseconds. 0:
#: a batch takes the lines already arrived, so lines written to a pipe one at a
#: time go out as they come, and lines that come faster than batches are sent
#: gather behind the batch in flight into the next one.
DEFAULT_LINGER_MS = 0

#: Longest wait accepted, in milliseconds.
MAX_LINGER_MS = 60_000

#: Largest batch accepted: a transaction holding more locks for longer gains nothing.
MAX_BATCH_SIZE = 5000

#: The longest input line read, in bytes (a send_contract payload at its limits is
#: about a megabyte): a longer one is refused without being held whole.
MAX_LINE_BYTES = 4 * 1024 * 1024

#: The byte order mark some editors and spreadsheet exports put before the first line.
UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Line:
    """One non-blank input line: its number (from 1) and its message or refusal."""

    number: int
    parsed: SendContract | Rejected
    contract_id: str | None


def parse_line(number: int, raw: bytes) -> Line:
    """A JSON line as a parsed send_contract message, or its ``invalid_payload`` refusal."""
    try:
        payload: Any = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        return Line(number, InvalidPayload(f"not UTF-8 (byte {error.start + 1})"), None)
    except json.JSONDecodeError as error:
        refusal = InvalidPayload(f"not JSON: {error.msg} (column {error.colno})")
        return Line(number, refusal, None)
    except RecursionError:
        return Line(number, InvalidPayload("JSON nested too deeply"), None)
    except ValueError:
        # Python reads no integer of over 4,300 digits (sys.get_int_max_str_digits).
        return Line(number, InvalidPayload("JSON with a number too long to read"), None)
    try:
        message = parse_message(SendContract, payload)
    except Rejected as refusal:
        return Line(number, refusal, contract_id_of(payload))
    return Line(number, message, message.contract_id)


def next_parsed(feed: LineFeed, *, timeout: float | None) -> Line | None:
    """The next non-blank line, parsed; None at the end, or when none arrived within ``timeout`` seconds.

    Read as bytes: a line that is not UTF-8 is refused alone instead of
    stopping the whole input. A byte order mark before the first line is
    skipped: it says the file is UTF-8, which is what is read anyway.
    """
    while (read := feed.next_line(timeout=timeout)) is not None:
        number, raw = read
        if raw is None:
            return Line(number, InvalidPayload(f"line longer than {feed.max_line_bytes} bytes"), None)
        if number == 1:
            raw = raw.removeprefix(UTF8_BOM)
        if raw.strip():
            return parse_line(number, raw)
    return None


def batches(feed: LineFeed, size: int, *, linger_ms: int) -> Iterator[list[Line]]:
    """The input's lines in lists of at most ``size``, each out as soon as it is full or has waited enough.

    A batch takes the lines already arrived and waits for more at most
    ``linger_ms`` after its first one: from a file, batches fill at once; from a
    pipe written slowly, each line goes out as it comes (``linger_ms`` later at
    most) instead of waiting for the batch to fill or the input to end. The input
    is never held whole either way.
    """
    while (first := next_parsed(feed, timeout=None)) is not None:
        batch = [first]
        deadline = time.monotonic() + linger_ms / 1000
        while len(batch) < size:
            line = next_parsed(feed, timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                break
            batch.append(line)
        yield batch


@dataclass
class Tally:
    """What has been answered so far, for the progress line and the summary."""

    started: float = field(default_factory=time.monotonic)
    lines: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    last_line: int = 0

    def add(self, number: int, outcome: str) -> None:
        self.lines += 1
        self.last_line = number
        self.outcomes[outcome] += 1

    @property
    def refused(self) -> int:
        return self.outcomes["refused"]

    def describe(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        accepted = ", ".join(
            f"{count} {status}" for status, count in sorted(self.outcomes.items()) if status != "refused"
        )
        return (
            f"{self.lines} contract{'' if self.lines == 1 else 's'}: {accepted or '0 queued'}, "
            f"{self.refused} refused "
            f"({self.lines / elapsed:.0f}/s)"
        )


def _count(batch: list[Line], results: list[Any], tally: Tally) -> None:
    """Count a batch's outcomes: all of them were sent or refused, whether or not answered yet."""
    from contract_dispatch import Receipt

    for line, result in zip(batch, results, strict=True):
        tally.add(line.number, result.status if isinstance(result, Receipt) else "refused")


def _report(args: argparse.Namespace, line: Line, result: Any, progress: Progress) -> None:
    from contract_dispatch import Receipt

    if isinstance(result, Receipt):
        answer: dict[str, Any] = {"line": line.number, **result.model_dump()}
    else:
        answer = {"line": line.number, "contract_id": line.contract_id, "error": result.as_dict()}
        progress.write(f"line {line.number}: {line.contract_id or '-'}: {result.code}: {result.message}")
    if args.json:
        sys.stdout.write(json.dumps(answer, ensure_ascii=False) + "\n")


@contextmanager
def ctrl_c_after_the_batch() -> Iterator[list[int]]:
    """A first Ctrl-C inside this block is held until the block ends (the list says so).

    A batch is checked, reserved and enqueued as a whole: stopped midway, its
    contracts would stay reserved as queued with no message, holding their
    addresses until the same input is sent again. It ends within the broker's and
    the database's timeouts; a second Ctrl-C stops at once.
    """
    interrupted: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        interrupted.append(signum)
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)

    try:
        previous = signal.signal(signal.SIGINT, hold)
    except ValueError:
        # Not the main thread (the command called in-process): nothing to hold.
        yield interrupted
        return
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


def cmd_send_contracts(args: argparse.Namespace) -> int:
    from contract_dispatch import submit_send_contracts

    try:
        stream: BinaryIO = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
    except OSError as error:
        sys.stderr.write(f"cannot read {args.file}: {error.strerror}\n")
        return EXIT_REFUSED
    tally = Tally()
    progress = Progress(sys.stderr)
    sent_through = 0
    in_flight: list[Line] = []
    try:
        feed = LineFeed(stream, max_line_bytes=MAX_LINE_BYTES)
        for batch in batches(feed, args.batch_size, linger_ms=args.linger_ms):
            in_flight = batch
            try:
                with ctrl_c_after_the_batch() as interrupted:
                    results = submit_send_contracts([line.parsed for line in batch])
            except (TransientError, OperationalError) as error:
                progress.finish()
                unsent = (
                    f"lines {batch[0].number} to {batch[-1].number} may have been queued, those after "
                    "them were not sent"
                    if getattr(error, "maybe_sent", False)
                    else f"line {batch[0].number} and those after it were not sent"
                )
                sys.stderr.write(
                    f"unavailable: {unavailable_reason(error)}\n"
                    f"{tally.describe()} before it; {unsent} (sending the same input again is safe)\n"
                )
                return EXIT_UNAVAILABLE
            # Counted before answering: if the reader goes away midway, the summary
            # still says what was sent.
            sent_through = batch[-1].number
            in_flight = []
            _count(batch, results, tally)
            for line, result in zip(batch, results, strict=True):
                _report(args, line, result, progress)
            sys.stdout.flush()
            progress.update(tally.describe())
            if interrupted:
                raise KeyboardInterrupt
    except BrokenPipeError:
        # The reader of the answers went away (``| head``): stop reading the input.
        # Python would report the pipe again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        progress.finish()
        sys.stderr.write(
            f"stdout was closed: lines up to {sent_through} were answered (sent or refused), "
            f"those after it were not read ({tally.describe()}; sending the same input again is safe)\n"
        )
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        progress.finish()
        # A batch is in flight only after a second Ctrl-C: the first waits for its answer.
        unanswered = (
            f"lines {in_flight[0].number} to {in_flight[-1].number} may have been queued, those after "
            "them were not read"
            if in_flight
            else "those after it were not read"
        )
        sys.stderr.write(
            f"interrupted: lines up to {sent_through} were answered (sent or refused), {unanswered} "
            f"({tally.describe()}; sending the same input again is safe)\n"
        )
        return EXIT_INTERRUPTED
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    progress.finish()
    sys.stderr.write(f"{tally.describe()}\n")
    return EXIT_REFUSED if tally.refused else EXIT_OK


def add_commands(commands: Any) -> None:
    """Register ``send-contracts``."""
    bulk = commands.add_parser(
        "send-contracts",
        help="check and enqueue many contracts: one send_contract payload per JSON line",
    )
    bulk.add_argument(
        "file",
        nargs="?",
        default="-",
        metavar="FILE",
        help="JSON Lines file, one send_contract payload per line (default: stdin)",
    )
    bulk.add_argument(
        "--batch-size",
        type=whole_number(high=MAX_BATCH_SIZE),
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"contracts per transaction and broker round trip (default {DEFAULT_BATCH_SIZE})",
    )
    bulk.add_argument(
        "--linger-ms",
        type=whole_number(low=0, high=MAX_LINGER_MS),
        default=DEFAULT_LINGER_MS,
        metavar="MS",
        help="how long a batch waits for more lines after its first, in milliseconds "
        f"(default {DEFAULT_LINGER_MS}: it takes the lines already arrived)",
    )
    bulk.add_argument(
        "--json", action="store_true", help="one JSON object per input line on stdout, in input order"
    )
    bulk.set_defaults(handler=cmd_send_contracts)
