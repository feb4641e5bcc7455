"""``contract-dispatch status --html FILE`` in a real headless Chromium (issue 5, item 5).

A live system (a worker process that sends contracts, fails one email with a
400 and dead-letters a poisoned message, while it records its history) is
rendered to a page; Chromium opens the page from disk with every network
feature off, takes a screenshot and dumps the DOM it rendered. The DOM must hold
every figure ``status --json`` gives and both charts with their lines; the
screenshot must have the window's size and show the page (its colours, the
charts' line colours among them), not a blank or an error page.

Without Chromium (``/usr/bin/chromium``, Debian's package) the test skips,
except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterator
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.status_system import QUEUES, System, open_system, settle, text
from tests.support import RedisServer
from workers.ops.chart import ALARM, PALETTE

#: The browser window, in CSS pixels (the screenshot's size).
WIDTH, HEIGHT = 1280, 1600

#: Screenshot rows whose colours are counted (the header, the cards and both charts).
ROWS_CHECKED = 720

#: Chromium's flags: headless, and nothing that reaches the network on its own.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    f"--window-size={WIDTH},{HEIGHT}",
)

#: Contracts the system sends (all delivered) besides the one whose email fails.
DELIVERED = 6


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI is set but chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed")
    return found


@pytest.fixture(scope="module")
def system(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, test_environment: dict[str, str]
) -> Iterator[System]:
    directory = tmp_path_factory.mktemp("status-page")
    url = f"sqlite:///{directory / 'page.db'}"
    with open_system(test_environment, directory, redis_server.url, url) as running:
        running.start_workers("worker")
        sends = [running.send(f"page-{n}") for n in range(DELIVERED)]
        failing = running.send("page-failing")
        running.provider.failing.add(running.contracts["page-failing"])
        running.produce(*sends, failing)
        running.enqueue_raw("emails", "{poisoned")

        def delivered() -> bool:
            statuses = [d.status for n in range(DELIVERED) for d in running.deliveries(f"page-{n}")]
            failed = [d.status for d in running.deliveries("page-failing")]
            dead = running.queue_figures()["emails"]["dead"]
            return statuses == ["sent"] * DELIVERED and failed == ["failed"] and dead == 2

        settle(delivered, running, "the emails")

        # The history: several depth samples and the minute's counts, in Redis.
        def recorded() -> bool:
            depth = int(running.client.zcard(f"{running.namespace}:__stats__:depth"))
            counted = {"contracts": 0, "emails": 0}
            for key in running.client.scan_iter(match=f"{running.namespace}:__stats__:processed:*"):
                for name, count in running.client.hgetall(key).items():
                    queue = text(name).split(":")[0]
                    if queue in counted:
                        counted[queue] += int(count)
            # Each send_contract (which sends its invitation) and the deliver_email that
            # files the refused invitation's dead letter; the poisoned message is never processed.
            return depth >= 5 and counted == {"contracts": DELIVERED + 1, "emails": 1}

        settle(recorded, running, "the history")
        yield running


class Figures(HTMLParser):
    """The text of every element carrying ``data-figure``, and the SVG polylines by chart."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: dict[str, str] = {}
        self.polylines: dict[str, list[str]] = {}
        self._open: list[tuple[str, str | None]] = []
        self._chart: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "svg":
            self._chart = attributes.get("id")
        if tag == "polyline" and self._chart is not None:
            self.polylines.setdefault(self._chart, []).append(attributes.get("points") or "")
        if tag in ("polyline", "line", "circle", "rect", "path"):
            return  # void in the dump
        self._open.append((tag, attributes.get("data-figure")))
        if attributes.get("data-figure"):
            self.figures[str(attributes["data-figure"])] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._chart = None
        while self._open:
            opened, _ = self._open.pop()
            if opened == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, figure in self._open:
            if figure:
                self.figures[figure] += data


def png_pixels(path: Path, rows: int) -> tuple[int, int, set[bytes]]:
    """Width, height and the distinct colours of the first ``rows`` rows of an 8-bit RGB(A) PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, chunks, header = 8, [], b""
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks.append(body)
        position += 12 + length
    width, height, depth, colour_type = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and colour_type in (2, 6), (depth, colour_type)
    pixel = 3 if colour_type == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * pixel
    previous = bytearray(stride)
    colours: set[bytes] = set()
    for row in range(min(rows, height)):
        start = row * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - pixel] if i >= pixel else 0
            up = previous[i]
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                corner = previous[i - pixel] if i >= pixel else 0
                estimate = left + up - corner
                pa, pb, pc = abs(estimate - left), abs(estimate - up), abs(estimate - corner)
                predictor = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + predictor) & 0xFF
        colours.update(bytes(line[i : i + 3]) for i in range(0, stride, pixel))
        previous = line
    return width, height, colours


def colour(hex_code: str) -> bytes:
    return bytes.fromhex(hex_code.lstrip("#"))


def test_page_in_headless_chromium(system: System, tmp_path: Path) -> None:
    browser = chromium()
    page = tmp_path / "status.html"
    result = system.cli("status", "--html", str(page))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(page.resolve())
    html = page.read_text(encoding="utf-8")

    # Self-contained: nothing to fetch (the only URL is the SVG namespace, never fetched).
    assert "default-src 'none'" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html, re.IGNORECASE)
    assert set(re.findall(r"https?://[^\s\"'<>)]+", html)) <= {"http://www.w3.org/2000/svg"}

    # The same figures as --json: the page embeds the snapshot it was drawn from.
    embedded = re.search(r'<script type="application/json" id="snapshot-data">(.*?)</script>', html, re.S)
    assert embedded is not None
    data = json.loads(embedded.group(1))
    database = system.database_figures(datetime.fromisoformat(data["taken_at"]))
    assert data["contracts"] == database["contracts"] == {"sent": DELIVERED + 1}
    assert data["emails"] == database["emails"]
    raw = system.queue_figures()
    for queue in data["queues"]:
        assert {k: queue[k] for k in ("ready", "delayed", "in_flight", "dead")} == {
            k: raw[queue["name"]][k] for k in ("ready", "delayed", "in_flight", "dead")
        }

    profile = tmp_path / "profile"
    screenshot = tmp_path / "status.png"
    common = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = subprocess.run(
        [*common, f"--screenshot={screenshot}", page.as_uri()], capture_output=True, text=True, timeout=60
    )
    assert shot.returncode == 0, shot.stderr[-2000:]

    # The DOM Chromium rendered holds every figure, as --json gives it.
    parsed = Figures()
    parsed.feed(dom.stdout)
    figures = {key: value.strip() for key, value in parsed.figures.items()}
    for queue in data["queues"]:
        for key in ("ready", "delayed", "in_flight", "dead"):
            assert figures[f"queues.{queue['name']}.{key}"] == str(queue[key])
    assert [q["name"] for q in data["queues"]] == list(QUEUES)
    assert figures["queues.emails.dead"] == "2"
    assert figures["live_workers"] == str(data["live_workers"]) == "1"
    for worker in data["workers"]:
        assert figures[f"workers.{worker['worker_id']}.state"] == "alive"
        assert figures[f"workers.{worker['worker_id']}.pid"] == str(worker["pid"])
    for window, kinds in data["emails"].items():
        for kind, counts in kinds.items():
            for outcome, count in counts.items():
                assert figures[f"emails.{window}.{kind}.{outcome}"] == str(count)
    assert figures["emails.last_hour.invitation.sent"] == str(DELIVERED)
    assert figures["emails.last_hour.invitation.failed"] == "1"
    for status, count in data["contracts"].items():
        assert figures[f"contracts.{status}"] == str(count)
    for actor, count in data["dead_letters"].items():
        assert figures[f"dead_letters.{actor}"] == str(count)
    assert data["dead_letters"] == {"deliver_email": 1, "(malformed)": 1}

    # Both charts, each with a line drawn through several points.
    for chart in ("chart-depth", "chart-throughput"):
        lines = parsed.polylines.get(chart, [])
        assert any(len(points.split()) >= 2 for points in lines), (chart, lines)

    # The screenshot: the window's size, and the page's colours, the lines' among them.
    width, height, colours = png_pixels(screenshot, ROWS_CHECKED)
    assert (width, height) == (WIDTH, HEIGHT)
    assert len(colours) >= 16, f"{len(colours)} colours: a blank page?"
    assert colour(PALETTE[1]) in colours, "the emails line is not drawn"
    assert colour(ALARM) in colours or colour("#b3261e") in colours, "no failure is shown in red"
