"""HTTP keep-alive for the ``urllib`` opener the official SendGrid client sends through.

urllib opens a new connection for every request and asks the server to close
it (``Connection: close``): before every email, a TCP handshake and, with TLS,
a TLS handshake, each a round trip to the provider, and the handshake's CPU.
These handlers keep one connection per host open between the requests of one
opener, as HTTP/1.1 allows; an opener belongs to one thread
(``sendgrid_backend.reuse_openers``), so a connection is never shared.

A kept connection is used again only when that is safe: the previous response
was read to its end, and the socket has nothing to read (a server that closed
an idle connection has sent its FIN, which reads as readable). Otherwise it is
closed and a new one opened before anything is sent. A request that fails
(including one sent at the very moment the server closed an idle connection)
is reported as urllib reports it and its connection dropped; nothing is sent
again here, so keep-alive never sends an email twice: the caller's retry does.
"""

from __future__ import annotations

import functools
import http.client
import select
import socket
import ssl
import threading
import urllib.request
from typing import Any
from urllib.error import URLError


def _has_input(sock: socket.socket | None) -> bool:
    """Whether an idle socket can be read: end of stream, or bytes nobody asked for."""
    if sock is None:
        return False
    try:
        # poll, not select: no limit on the descriptor's number.
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


class _KeepAlive(urllib.request.AbstractHTTPHandler):
    """urllib's ``do_open`` with one kept connection per (connection class, host)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The connection kept for each (class, host), with the last response read from it.
        self._kept: dict[tuple[type, str], tuple[http.client.HTTPConnection, http.client.HTTPResponse]] = {}

    def _reusable(self, key: tuple[type, str]) -> http.client.HTTPConnection | None:
        kept = self._kept.pop(key, None)
        if kept is None:
            return None
        connection, response = kept
        if not response.isclosed() or _has_input(connection.sock):
            # Unread bytes of the last answer, or a server that closed: start afresh.
            connection.close()
            return None
        return connection

    def do_open(self, http_class: Any, req: urllib.request.Request, **http_conn_args: Any) -> Any:
        if getattr(req, "_tunnel_host", None):
            # HTTPS through a proxy's tunnel: urllib's own way, one connection per request.
            return super().do_open(http_class, req, **http_conn_args)
        host = req.host
        if not host:
            raise URLError("no host given")
        key = (http_class, host)
        connection = self._reusable(key)
        if connection is None:
            connection = http_class(host, timeout=req.timeout, **http_conn_args)
            connection.set_debuglevel(self._debuglevel)  # type: ignore[attr-defined]
        elif isinstance(req.timeout, int | float) or req.timeout is None:
            # Not when the caller gave none (urllib's sentinel): the connection keeps its own.
            connection.timeout = req.timeout
            if connection.sock is not None:
                connection.sock.settimeout(req.timeout)
        headers = dict(req.unredirected_hdrs)
        headers.update({name: value for name, value in req.headers.items() if name not in headers})
        headers = {name.title(): value for name, value in headers.items()}
        try:
            try:
                connection.request(
                    req.get_method(),
                    req.selector,
                    req.data,
                    headers,
                    encode_chunked=req.has_header("Transfer-encoding"),
                )
            except OSError as err:
                raise URLError(err) from None
            response = connection.getresponse()
        except BaseException:
            connection.close()
            raise
        # http.client closes the connection itself after an answer that ends it
        # ("Connection: close", HTTP/1.0); the next request then opens a new one.
        self._kept[key] = (connection, response)
        response.url = req.get_full_url()
        # As urllib's own handler does: its callers expect the reason in .msg.
        response.msg = response.reason
        return response


class KeepAliveHTTPHandler(_KeepAlive, urllib.request.HTTPHandler):
    """``http://`` with a kept connection per host."""


class KeepAliveHTTPSHandler(_KeepAlive, urllib.request.HTTPSHandler):
    """``https://`` with a kept connection per host (TLS settings as urllib's)."""


#: Guards the making of the process's TLS context (see ``tls_context``).
_TLS_LOCK = threading.Lock()


@functools.cache
def _made_tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def tls_context() -> ssl.SSLContext:
    """The process's one client TLS context, verifying as urllib's default does.

    urllib makes a new one for every connection, loading the whole CA bundle each
    time: most of the 21 ms of CPU an email cost over HTTPS (``make bench``,
    ``connections``). A context is safe to share between threads; the lock makes
    sure threads starting together do not each load the bundle.
    """
    with _TLS_LOCK:
        return _made_tls_context()


def forget_tls_context() -> None:
    """Make the next connection load the CA bundle again (after ``SSL_CERT_FILE`` changed)."""
    with _TLS_LOCK:
        _made_tls_context.cache_clear()


def keep_alive_opener() -> urllib.request.OpenerDirector:
    """urllib's default opener, with the keep-alive handlers in place of its HTTP(S) ones."""
    return urllib.request.build_opener(KeepAliveHTTPHandler(), KeepAliveHTTPSHandler(context=tls_context()))
