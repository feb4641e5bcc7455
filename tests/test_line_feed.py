"""``LineFeed``: an input's lines as they arrive, each waited for no longer than asked."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator

import pytest

from workers.line_feed import READ_SIZE, LineFeed

#: The tests' longest line, in bytes.
LIMIT = 1000


@pytest.fixture
def pipe() -> Iterator[tuple[LineFeed, int]]:
    """A feed on the read end of a pipe, and the write end's descriptor."""
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "rb") as reader:
        try:
            yield LineFeed(reader, max_line_bytes=LIMIT), write_end
        finally:
            with contextlib.suppress(OSError):  # the test closed it
                os.close(write_end)


def test_a_line_written_to_a_pipe_is_read_without_waiting_for_the_next(pipe):
    feed, writer = pipe
    os.write(writer, b'{"a": 1}\n{"b"')
    assert feed.next_line(timeout=5) == (1, b'{"a": 1}\n')
    # Half a line is not a line: it is waited for, as long as asked and no longer.
    assert feed.next_line(timeout=0.05) is None
    assert not feed.ended
    os.write(writer, b": 2}\n")
    assert feed.next_line(timeout=5) == (2, b'{"b": 2}\n')


def test_the_end_of_the_input_ends_the_feed_with_its_last_line_without_newline(pipe):
    feed, writer = pipe
    os.write(writer, b"one\n\ntwo")
    os.close(writer)
    assert [feed.next_line(timeout=5) for _ in range(4)] == [(1, b"one\n"), (2, b"\n"), (3, b"two"), None]
    assert feed.ended


def test_a_file_is_read_in_pieces_and_every_line_is_ready_at_once(tmp_path):
    lines = [f'{{"line": {number}, "pad": "{"x" * 900}"}}\n'.encode() for number in range(1, 301)]
    path = tmp_path / "input.jsonl"
    path.write_bytes(b"".join(lines))
    with path.open("rb") as stream:
        feed = LineFeed(stream, max_line_bytes=LIMIT)
        read = [feed.next_line(timeout=0) for _ in lines]
        assert read == list(enumerate(lines, start=1))
        assert feed.next_line(timeout=0) is None and feed.ended


def test_an_input_without_a_descriptor_is_read_line_by_line():
    feed = LineFeed(io.BytesIO(b"a\nb\n"), max_line_bytes=LIMIT)
    assert [feed.next_line(timeout=0) for _ in range(3)] == [(1, b"a\n"), (2, b"b\n"), None]
    assert feed.ended


def test_a_line_over_the_limit_is_given_as_none_without_being_held(pipe):
    feed, writer = pipe
    # Three reads' worth with no newline: none of it is kept past the limit.
    for _ in range(3):
        os.write(writer, b"x" * (READ_SIZE // 2))
        assert feed.next_line(timeout=0.05) is None
        assert len(feed._partial) == 0
    os.write(writer, b'xx\n{"ok": 1}\n' + b"y" * (LIMIT + 1))
    os.close(writer)
    assert [feed.next_line(timeout=5) for _ in range(4)] == [(1, None), (2, b'{"ok": 1}\n'), (3, None), None]
    # A line of exactly the limit, newline included, is kept.
    exact = LineFeed(io.BytesIO(b"z" * (LIMIT - 1) + b"\n"), max_line_bytes=LIMIT)
    assert exact.next_line(timeout=0) == (1, b"z" * (LIMIT - 1) + b"\n")
