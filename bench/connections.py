"""Provider connections: emails sent through the official SendGrid client, kept connection or not.

One thread sends emails one after another through ``SendGridBackend`` (the
official ``sendgrid`` client) to the stand-in, over HTTP and over HTTPS (a
throwaway certificate, trusted beside the system's CA bundle as production
trusts SendGrid's). The same run measures:

- the service: each thread keeps its connection alive between emails
  (``workers.email.keep_alive``);
- the baseline: the official client as shipped, which opens a connection for
  every request and has it closed after the answer (over HTTPS, a new TLS
  context, the CA bundle loaded, and a handshake, per email).

Figures: emails per second and the sending thread's own CPU per email (the
stand-in runs in the same process, on threads of its own). On loopback the
round trips cost next to nothing; to SendGrid a new connection adds the TCP and
TLS handshakes, two round trips of the network before each email's own.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from bench import DatabaseKind, Workbench, machine

DESCRIPTION = "emails through the official SendGrid client, kept connection against one per email"

#: Emails per measured run (one thread), and with --quick.
SENDS = 500
QUICK_SENDS = 100

#: Emails sent before measuring (the client built, the connection opened).
WARM_UP = 20

#: Where Debian and its derivatives keep the system's CA bundle.
SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--connection-sends",
        type=int,
        default=None,
        help=f"emails per run (default {SENDS}, {QUICK_SENDS} with --quick)",
    )


def bundle_path(root: Path) -> Path:
    """Where ``trusted_bundle`` writes the bundle under ``root``."""
    return root / "ca-bundle.pem"


def trusted_bundle(root: Path, certificate: Path) -> Path:
    """The system's CA bundle with ``certificate`` added: a client loads all of it for each new
    TLS context, as it does in production to trust SendGrid."""
    bundle = bundle_path(root)
    system = SYSTEM_CA_BUNDLE.read_bytes() if SYSTEM_CA_BUNDLE.is_file() else b""
    bundle.write_bytes(system + b"\n" + certificate.read_bytes())
    return bundle


def _email() -> Any:
    from workers.email.message import OutgoingEmail

    return OutgoingEmail(
        to_email="client@example.com",
        to_name="Client",
        from_email="contracts@example.com",
        from_name="Contract Dispatch",
        subject="Contrat à signer",
        text="Bonjour",
        html="<p>Bonjour</p>",
        reference=f"bench-{uuid.uuid4().hex}",
        kind="invitation",
    )


def measure(url: str, sends: int, *, keep_alive: bool) -> dict[str, float]:
    """``sends`` emails from a new thread (its own client and opener), after a warm-up."""
    import python_http_client.client

    from tests.sendgrid_standin import API_KEY
    from workers.email.sendgrid_backend import SendGridBackend

    backend = SendGridBackend(api_key=API_KEY, host=url, timeout=10.0)
    wrapped = python_http_client.client.urllib
    figures: dict[str, float] = {}

    def send_all() -> None:
        for _ in range(WARM_UP):
            backend.send(_email())
        cpu, wall = time.thread_time(), time.perf_counter()
        for _ in range(sends):
            backend.send(_email())
        figures["cpu_ms_per_email"] = (time.thread_time() - cpu) * 1000 / sends
        figures["per_s"] = sends / (time.perf_counter() - wall)

    if not keep_alive:
        # The library as shipped: it builds its own opener, and so its own connection, per request.
        python_http_client.client.urllib = urllib.request
    try:
        thread = threading.Thread(target=send_all, name="bench-sender")
        thread.start()
        thread.join()
    finally:
        python_http_client.client.urllib = wrapped
    if "per_s" not in figures:
        raise RuntimeError("the sending thread failed; see its traceback above")
    return figures


def run(workbench: Workbench, options: argparse.Namespace, kinds: list[DatabaseKind]) -> dict[str, Any]:
    from tests.sendgrid_standin import SendGridStandIn
    from tests.tls import self_signed, server_context
    from workers.email.keep_alive import forget_tls_context

    sends = options.connection_sends or (QUICK_SENDS if options.quick else SENDS)
    cert, key = self_signed(workbench.root)
    bundle = trusted_bundle(workbench.root, cert)
    server_tls = server_context(cert, key)
    # The service's context is made once per process: made again here, it trusts the bundle.
    forget_tls_context()
    previous = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = str(bundle)
    results: dict[str, Any] = {"sends": sends, "machine": machine(), "load_average": list(os.getloadavg())}
    try:
        for scheme, tls in (("https", server_tls), ("http", None)):
            print(f"    connections: {sends} emails over {scheme} ...", flush=True)
            standin = SendGridStandIn(tls=tls).start()
            try:
                opened = standin.connections_opened
                kept = measure(standin.url, sends, keep_alive=True)
                kept["connections"] = standin.connections_opened - opened
                opened = standin.connections_opened
                shipped = measure(standin.url, sends, keep_alive=False)
                shipped["connections"] = standin.connections_opened - opened
            finally:
                standin.stop()
            results[scheme] = {
                "kept": kept,
                "per_request": shipped,
                "ratio": kept["per_s"] / shipped["per_s"],
                "cpu_ratio": kept["cpu_ms_per_email"] / shipped["cpu_ms_per_email"],
            }
    finally:
        if previous is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = previous
        forget_tls_context()
    return results


def summary(figures: dict[str, Any]) -> list[str]:
    lines = [
        f"connections: one thread, {figures['sends']} emails per run through the official SendGrid "
        f"client to the stand-in, load average {figures['load_average'][0]:.2f} (ratio, raw)"
    ]
    for scheme in ("https", "http"):
        result = figures[scheme]
        kept, shipped = result["kept"], result["per_request"]
        lines.append(
            f"  {scheme:<5} kept connection {result['ratio']:5.2f} x the client as shipped: "
            f"{kept['per_s']:.0f} vs {shipped['per_s']:.0f} emails/s; sender CPU "
            f"{kept['cpu_ms_per_email']:.2f} vs {shipped['cpu_ms_per_email']:.2f} ms per email; "
            f"{kept['connections']:.0f} vs {shipped['connections']:.0f} connections"
        )
    return lines
