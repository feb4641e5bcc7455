"""A local HTTP server standing in for SendGrid's ``POST /v3/mail/send``.

It records every request (headers and JSON body) and answers 202 with an
``X-Message-Id``, unless a test scripted other answers: a status code (with
headers, e.g. a rate-limit reset), or a delay past the client's timeout. A
``chooser`` may decide the answers that nothing scripted (the chaos test draws
them at random), and ``on_answer`` hears about each one once it is written.
Each ``Received`` keeps the answer it got and when, so a test can tell why an
email arrived twice. Binds to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

API_KEY = "SG.test-key-0123456789abcdefghijklmnopqrstuvwxyz"


@dataclass
class Answer:
    """One scripted answer: status, extra headers, and a delay before answering (seconds)."""

    status: int = 202
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    body: bytes = b""
    #: A label for reports ("ok", "slow", "503"...); empty for the default answer.
    kind: str = ""
    #: The error body also quotes the email's text from this marker on, in a ``message``
    #: and a ``help``, as a provider (or a proxy before it) may: temporary password included.
    quoting: str = ""
    #: Whatever the chooser wants kept with the request (e.g. which process sent it).
    note: dict[str, Any] = field(default_factory=dict)


@dataclass
class Incoming:
    """What a ``chooser`` sees of a request before it is answered."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    client_address: tuple[str, int]
    received_at: float

    @property
    def reference(self) -> str | None:
        return _reference(self.body)


@dataclass
class Received:
    """One request as the stand-in saw it."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    status: int
    message_id: str | None
    #: The answer it got (scripted, chosen or the default 202).
    answer: Answer | None = None
    #: The client's (host, port).
    client_address: tuple[str, int] | None = None
    #: When the request arrived and when its answer was decided (after any delay), epoch seconds.
    received_at: float = 0.0
    answered_at: float = 0.0
    #: Whether the client had already hung up when the answer was ready (it timed out or died).
    client_closed: bool = False
    #: The HTTP request this email came in: a request with several personalizations
    #: is kept as one ``Received`` per personalization (one email each), as SendGrid sends them.
    request_id: str = ""

    @property
    def to(self) -> list[str]:
        return [to["email"] for p in self.body.get("personalizations", []) for to in p.get("to", [])]

    @property
    def reference(self) -> str | None:
        return _reference(self.body)

    def content(self, kind: str) -> str:
        for part in self.body.get("content", []):
            if part["type"] == kind:
                return str(part["value"])
        raise KeyError(kind)


class SendGridStandIn:
    """Start with ``start()``; ``requests`` lists what arrived, ``accepted`` the 202s."""

    def __init__(
        self,
        *,
        chooser: Callable[[Incoming], Answer] | None = None,
        on_answer: Callable[[Received], None] | None = None,
        keep_alive: bool = True,
        idle_timeout: float | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``keep_alive=False`` answers in HTTP/1.0 and closes each connection after its answer;
        ``idle_timeout`` closes a kept connection that brought no request for that long, in seconds;
        ``tls`` (a server context with its certificate) serves HTTPS instead of HTTP."""
        self._lock = threading.Lock()
        self._script: deque[Answer] = deque()
        self.requests: list[Received] = []
        self._server: ThreadingHTTPServer | None = None
        self.chooser = chooser
        self.on_answer = on_answer
        self.keep_alive = keep_alive
        self.idle_timeout = idle_timeout
        self.tls = tls
        self._in_flight = 0
        self._connections: set[socket.socket] = set()
        #: Connections clients opened, over the stand-in's life.
        self.connections_opened = 0

    # -- control -------------------------------------------------------------

    def start(self) -> SendGridStandIn:
        standin, keep_alive, idle_timeout = self, self.keep_alive, self.idle_timeout

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive, as SendGrid's API does: a client may send many emails on one connection.
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"
            timeout = idle_timeout

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with standin._lock:
                    standin._connections.add(self.connection)
                    standin.connections_opened += 1

            def do_POST(self) -> None:
                standin._handle(self)

        class Server(ThreadingHTTPServer):
            def shutdown_request(self, request: Any) -> None:
                # Counted as closed once it is: its FIN is on the way to the client.
                super().shutdown_request(request)
                with standin._lock:
                    standin._connections.discard(request)

        self._server = Server(("127.0.0.1", 0), Handler)
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        # Kept-alive connections too: a stopped provider answers nothing.
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"{'https' if self.tls is not None else 'http'}://{host!s}:{port}"

    def script(self, *answers: Answer) -> None:
        """Answer the next requests with these, in order, then 202 again."""
        with self._lock:
            self._script.extend(answers)

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self.requests.clear()

    @property
    def accepted(self) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.status == 202]

    def accepted_for(self, reference_prefix: str) -> list[Received]:
        return [r for r in self.accepted if (r.reference or "").startswith(reference_prefix)]

    @property
    def open_connections(self) -> int:
        """Client connections open now."""
        with self._lock:
            return len(self._connections)

    @property
    def in_flight(self) -> int:
        """Requests received and not answered yet (e.g. slow answers still waiting)."""
        with self._lock:
            return self._in_flight

    # -- serving ------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        received_at = time.time()
        with self._lock:
            self._in_flight += 1
        try:
            self._answer(handler, received_at)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _answer(self, handler: BaseHTTPRequestHandler, received_at: float) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length)
        with self._lock:
            answer = self._script.popleft() if self._script else None
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {"_unparsable": raw.decode("utf-8", "replace")}
        headers = dict(handler.headers.items())
        client_address = (str(handler.client_address[0]), int(handler.client_address[1]))
        if answer is None and self.chooser is not None:
            answer = self.chooser(Incoming(handler.path, headers, body, client_address, received_at))
        if answer is None:
            answer = Answer()
        if handler.path != "/v3/mail/send":
            answer = Answer(status=404, body=b'{"errors":[{"message":"not found"}]}', kind="404")
        elif handler.headers.get("Authorization") != f"Bearer {API_KEY}":
            answer = Answer(status=401, body=b'{"errors":[{"message":"bad key"}]}', kind="401")
        if "_unparsable" in body:
            answer = Answer(status=400, body=b'{"errors":[{"message":"bad json"}]}', kind="400")
        if answer.quoting:
            answer = _quoting(answer, body)
        if answer.delay:
            time.sleep(answer.delay)
        message_id = uuid.uuid4().hex if answer.status == 202 else None
        client_closed = _peer_closed(handler.connection)
        answered_at, request_id = time.time(), uuid.uuid4().hex
        emails = [
            Received(
                path=handler.path,
                headers=headers,
                body=copy,
                status=answer.status,
                message_id=message_id,
                answer=answer,
                client_address=client_address,
                received_at=received_at,
                answered_at=answered_at,
                client_closed=client_closed,
                request_id=request_id,
            )
            for copy in _copies(body)
        ]
        with self._lock:
            self.requests.extend(emails)
        try:
            handler.send_response(answer.status)
            if message_id:
                handler.send_header("X-Message-Id", message_id)
            for name, value in answer.headers.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(answer.body)))
            handler.end_headers()
            handler.wfile.write(answer.body)
            handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (timeout): exactly what a slow answer tests.
            pass
        if self.on_answer is not None:
            for email in emails:
                self.on_answer(email)


def contract_of(reference: str | None) -> str:
    """The contract id in an email's reference (``kind:contract_id:recipient:step``); "" for none."""
    return (reference or "::").split(":")[1]


def _reference(body: dict[str, Any]) -> str | None:
    """The email's reference: its custom argument, or its (first) personalization's."""
    personalizations = body.get("personalizations") or [{}]
    merged = {**(body.get("custom_args") or {}), **(personalizations[0].get("custom_args") or {})}
    reference = merged.get("reference")
    return str(reference) if reference is not None else None


def _copies(body: dict[str, Any]) -> list[dict[str, Any]]:
    """One body per personalization, its substitutions applied: the emails SendGrid would send."""
    personalizations = body.get("personalizations")
    if not isinstance(personalizations, list) or not personalizations:
        return [body]
    if len(personalizations) == 1 and not personalizations[0].get("substitutions"):
        return [body]
    copies = []
    for personalization in personalizations:
        substitutions = personalization.get("substitutions") or {}

        def substitute(value: str, substitutions: dict[str, str] = substitutions) -> str:
            for placeholder, replacement in substitutions.items():
                value = value.replace(placeholder, replacement)
            return value

        copy = {**body, "personalizations": [personalization]}
        if "subject" in copy:
            copy["subject"] = substitute(str(copy["subject"]))
        copy["content"] = [
            {**part, "value": substitute(str(part["value"]))} for part in body.get("content", [])
        ]
        copies.append(copy)
    return copies


def _peer_closed(connection: socket.socket) -> bool:
    """Whether the client closed its end (nothing more to read, and end of stream)."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _quoting(answer: Answer, body: dict[str, Any]) -> Answer:
    """``answer`` with one more error quoting the email in ``body``, from ``answer.quoting`` on."""
    text = " ".join(
        str(part.get("value", "")) for part in body.get("content", []) if part.get("type") == "text/plain"
    )
    text = text[max(text.find(answer.quoting), 0) :]
    errors = json.loads(answer.body or b"{}").get("errors", [])
    errors.append({"message": f"content refused: {text}", "field": "content", "help": text})
    return Answer(
        status=answer.status,
        headers=answer.headers,
        delay=answer.delay,
        body=json.dumps({"errors": errors}).encode(),
        kind=answer.kind,
    )
