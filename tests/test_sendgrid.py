"""The SendGrid backend: request bodies against the official spec, headers, error
mapping, timeouts, and the secrets it must never show."""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from sqlmodel import select

from contract_dispatch import notify_signatories, send_contract
from models.account import Account
from models.delivery import EmailDelivery
from models.errors import ProviderRateLimited, ProviderRejected, ProviderUnavailable
from models.types import utc_now
from tests.sendgrid_standin import API_KEY, Answer, Received
from tests.support import all_emails_sent, contract_payload, free_port, wait_for_contract, wait_until
from workers.database import session_scope
from workers.email.message import OutgoingEmail
from workers.email.sendgrid_backend import SendGridBackend
from workers.logs import SENDGRID_HTTP_LOGGER
from workers.settings import get_settings

SPEC_PATH = Path(__file__).parent / "data" / "tsg_mail_v3.json"
SPEC_URI = "urn:sendgrid:tsg_mail_v3"
POST_MAIL_SEND = "/components/requestBodies/PostMailSend/content/application~1json/schema"


# -- the spec ------------------------------------------------------------------


def _load_spec() -> dict[str, Any]:
    spec: dict[str, Any] = json.loads(SPEC_PATH.read_text())
    return spec


def _validator_for(spec: dict[str, Any]) -> Draft202012Validator:
    """Validates against PostMailSend, resolving ``#/components/...`` inside the whole spec."""
    registry: Registry = Registry().with_resource(
        SPEC_URI, Resource.from_contents(spec, default_specification=DRAFT202012)
    )
    return Draft202012Validator(
        {"$ref": f"{SPEC_URI}#{POST_MAIL_SEND}"},
        registry=registry,
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )


@functools.cache
def mail_send_validator() -> Draft202012Validator:
    spec = _load_spec()
    schema = spec["components"]["requestBodies"]["PostMailSend"]["content"]["application/json"]["schema"]
    # The published spec types custom_args as a string; the API takes an object of strings.
    assert schema["properties"]["custom_args"]["type"] == "string"
    schema["properties"]["custom_args"] = {"type": "object", "additionalProperties": {"type": "string"}}
    return _validator_for(spec)


def assert_valid_body(body: dict[str, Any]) -> None:
    errors = sorted(mail_send_validator().iter_errors(body), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def _sample_body() -> dict[str, Any]:
    return {
        "from": {"email": "contracts@example.com", "name": "Contract Dispatch"},
        "subject": "Contrat à signer",
        "personalizations": [{"to": [{"email": "client@example.com", "name": "Client"}]}],
        "content": [
            {"type": "text/plain", "value": "Bonjour"},
            {"type": "text/html", "value": "<p>Bonjour</p>"},
        ],
        "categories": ["invitation"],
        "custom_args": {"reference": "invitation:c-1:client@example.com:0"},
    }


def test_validator_accepts_a_good_body_and_rejects_bad_ones():
    validator = mail_send_validator()
    assert validator.is_valid(_sample_body())

    no_sender = _sample_body()
    del no_sender["from"]
    no_recipient = _sample_body()
    no_recipient["personalizations"] = [{"to": [{"name": "Client"}]}]
    not_an_address = _sample_body()
    not_an_address["personalizations"][0]["to"][0]["email"] = "not an address"
    content_as_text = _sample_body()
    content_as_text["content"] = "Bonjour"
    numeric_custom_arg = _sample_body()
    numeric_custom_arg["custom_args"] = {"reference": 42}
    for bad in (no_sender, no_recipient, not_an_address, content_as_text, numeric_custom_arg):
        assert not validator.is_valid(bad), bad
    # The $refs into components really resolve (MailFrom's email is required).
    assert not validator.is_valid({**_sample_body(), "from": {"name": "No address"}})


def test_unpatched_spec_would_refuse_custom_args_as_an_object():
    """The patch is needed, and applied to the one field only."""
    assert not _validator_for(_load_spec()).is_valid(_sample_body())


# -- bodies of a whole flow ------------------------------------------------------


def _mark_logged_in(email_address: str) -> None:
    with session_scope() as session:
        account = session.exec(select(Account).where(Account.email == email_address)).one()
        account.first_login_at = utc_now()
        session.add(account)


def _keys_of(contract_id: str) -> dict[str, str]:
    """Recipient -> idempotency key of each delivery of a contract."""
    with session_scope() as session:
        rows = session.exec(select(EmailDelivery).where(EmailDelivery.contract_id == contract_id)).all()
        return {f"{row.kind}:{row.recipient}": row.idempotency_key for row in rows}


def test_every_body_sent_validates_against_the_sendgrid_spec(worker, standin):
    tricky_name = 'Dupont, "Jean" <boss@evil.example>'
    french = contract_payload(
        signatories=[
            {"email": f"boss-{uuid.uuid4().hex[:6]}@example.com", "name": tricky_name},
            {"email": f"boss-{uuid.uuid4().hex[:6]}@example.com"},
        ]
    )
    english = contract_payload(locale="en", company_name="Acme & Co <Ltd>")
    for payload in (french, english):
        send_contract(**payload)
    for payload in (french, english):
        wait_for_contract(payload["contract_id"], all_emails_sent(1), what="the invitation")

    # The French client logs in; their next invitation carries no codes.
    _mark_logged_in(french["email"])
    again = contract_payload(email=french["email"], company_name=french["company_name"], locale="en")
    send_contract(**again)
    wait_for_contract(again["contract_id"], all_emails_sent(1), what="the invitation without codes")

    for payload in (french, english):
        notify_signatories(
            contract_id=payload["contract_id"],
            legal_name=payload["company_name"],
            accepted_sections=["conditions", "tarifs"],
            signer_name="Jean Dupont",
            registration_number="RCS Paris B 123 456 789",
        )
    wait_for_contract(french["contract_id"], lambda r: r.status == "signed" and all_emails_sent(3)(r))
    wait_for_contract(english["contract_id"], lambda r: r.status == "signed" and all_emails_sent(2)(r))

    ours = [
        r
        for payload in (french, english, again)
        for r in standin.accepted
        if f":{payload['contract_id']}:" in (r.reference or "")
    ]
    assert len(ours) == 6
    kinds = sorted(r.reference.split(":")[0] for r in ours if r.reference)
    assert kinds == ["invitation"] * 3 + ["signed_notification"] * 3
    with_codes = [r for r in ours if "Temporary password" in r.content("text/plain")]
    with_codes += [r for r in ours if "Mot de passe temporaire" in r.content("text/plain")]
    assert len(with_codes) == 2, "one French and one English invitation carry codes"
    for received in standin.requests:
        assert_valid_body(received.body)

    # Addresses and display names travel as separate fields, never as "Name <addr>".
    from_field = {"email": "contracts@example.com", "name": "Contract Dispatch"}
    for received in ours:
        assert received.body["from"] == from_field
        assert received.headers["Authorization"] == f"Bearer {API_KEY}"
        (personalization,) = received.body["personalizations"]
        (to,) = personalization["to"]
        assert set(to) <= {"email", "name"}
        assert "<" not in to["email"] and " " not in to["email"]
    tricky = _only(ours, f"signed_notification:{french['contract_id']}:{french['signatories'][0]['email']}")
    assert tricky.body["personalizations"][0]["to"] == [
        {"email": french["signatories"][0]["email"], "name": tricky_name}
    ]
    unnamed = _only(ours, f"signed_notification:{french['contract_id']}:{french['signatories'][1]['email']}")
    assert unnamed.body["personalizations"][0]["to"] == [{"email": french["signatories"][1]["email"]}]
    invitation = _only(ours, f"invitation:{english['contract_id']}:")
    assert invitation.body["personalizations"][0]["to"] == [{"email": english["email"]}]

    # custom_args.reference is the delivery's idempotency key.
    for payload in (french, english, again):
        keys = _keys_of(payload["contract_id"])
        sent = {r.reference for r in ours if f":{payload['contract_id']}:" in (r.reference or "")}
        assert sent == set(keys.values())
    assert _keys_of(english["contract_id"])[f"invitation:{english['email']}"] == (
        f"invitation:{english['contract_id']}:{english['email']}:0"
    )


def _only(received: list[Received], reference_prefix: str) -> Received:
    matches = [r for r in received if (r.reference or "").startswith(reference_prefix)]
    assert len(matches) == 1, f"{len(matches)} requests for {reference_prefix}"
    return matches[0]


# -- the backend, unit level ----------------------------------------------------


def _email(**overrides: Any) -> OutgoingEmail:
    fields: dict[str, Any] = {
        "to_email": "client@example.com",
        "to_name": "Client",
        "from_email": "contracts@example.com",
        "from_name": "Contract Dispatch",
        "subject": "Contrat à signer",
        "text": "Bonjour",
        "html": "<p>Bonjour</p>",
        "reference": f"invitation:c-{uuid.uuid4().hex[:8]}:client@example.com:0",
        "kind": "invitation",
    }
    fields.update(overrides)
    return OutgoingEmail(**fields)


def _backend(host: str, timeout: float = 2.0) -> SendGridBackend:
    return SendGridBackend(api_key=API_KEY, host=host, timeout=timeout)


def test_a_send_returns_the_provider_message_id(standin):
    email = _email()
    message_id = _backend(standin.url).send(email)
    # By reference: a worker of an earlier test may still be finishing a send of its own.
    (received,) = [r for r in standin.requests if r.reference == email.reference]
    assert message_id == received.message_id
    assert received.path == "/v3/mail/send"
    assert received.headers["Authorization"] == f"Bearer {API_KEY}"
    assert received.reference == email.reference
    assert_valid_body(received.body)


@pytest.mark.parametrize("status", [400, 401, 403, 413])
def test_client_errors_are_permanent(standin, status):
    standin.script(Answer(status=status, body=b'{"errors":[{"message":"no"}]}'))
    with pytest.raises(ProviderRejected) as error:
        _backend(standin.url).send(_email())
    assert str(status) in str(error.value)
    assert API_KEY not in str(error.value)


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors_are_transient(standin, status):
    standin.script(Answer(status=status, body=b'{"errors":[{"message":"later"}]}'))
    with pytest.raises(ProviderUnavailable) as error:
        _backend(standin.url).send(_email())
    assert str(status) in str(error.value)


def test_rate_limit_waits_until_the_reset(standin):
    before = time.time()
    reset = int(before) + 30
    standin.script(Answer(status=429, headers={"X-RateLimit-Reset": str(reset)}))
    with pytest.raises(ProviderRateLimited) as error:
        _backend(standin.url).send(_email())
    after = time.time()
    # Until the reset, plus at most a second of jitter.
    wait_ms = error.value.retry_after_ms
    assert wait_ms is not None
    assert (reset - after) * 1000 <= wait_ms <= (reset - before) * 1000 + 1000


def test_a_slow_answer_is_a_timeout(standin):
    standin.script(Answer(delay=1.0))
    started = time.monotonic()
    email = _email()
    with pytest.raises(ProviderUnavailable):
        _backend(standin.url, timeout=0.3).send(email)
    assert time.monotonic() - started < 0.9, "the client waited for the slow answer"
    # Let the stand-in finish the abandoned request so it is not counted by the next test.
    wait_until(
        lambda: any(r.reference == email.reference for r in standin.requests),
        timeout=5,
        what="the slow request to finish",
    )


def test_connection_refused_is_transient():
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ProviderUnavailable):
        _backend(closed, timeout=1.0).send(_email())


def test_the_client_has_a_timeout():
    backend = SendGridBackend.from_settings(get_settings())
    assert backend.timeout == 2.0
    assert backend._client().client.timeout == 2.0
    assert _backend("http://127.0.0.1:1", timeout=0.7)._client().client.timeout == 0.7


def test_each_thread_gets_its_own_client():
    backend = _backend("http://127.0.0.1:1")
    clients: list[object] = []
    thread = threading.Thread(target=lambda: clients.append(backend._client()))
    thread.start()
    thread.join()
    assert backend._client() is backend._client()
    assert clients[0] is not backend._client()


def test_each_thread_builds_one_opener_and_every_request_still_goes_out(standin, monkeypatch):
    """python_http_client builds a urllib opener per request; each thread builds one, once."""
    import urllib.request

    built: list[str] = []
    real_build_opener = urllib.request.build_opener

    def counting_build_opener(*handlers: Any) -> Any:
        built.append(threading.current_thread().name)
        return real_build_opener(*handlers)

    monkeypatch.setattr(urllib.request, "build_opener", counting_build_opener)
    backend = _backend(standin.url)
    emails = [_email() for _ in range(6)]

    def send_all(batch: list[OutgoingEmail]) -> None:
        for email in batch:
            backend.send(email)

    threads = [
        threading.Thread(target=send_all, args=(emails[:3],), name="sender-1"),
        threading.Thread(target=send_all, args=(emails[3:],), name="sender-2"),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(built) == ["sender-1", "sender-2"]
    received = {r.reference for r in standin.accepted}
    assert {email.reference for email in emails} <= received
    # Installing it again changes nothing.
    from workers.email.sendgrid_backend import reuse_openers

    reuse_openers()
    again = threading.Thread(target=send_all, args=([_email(), _email()],), name="sender-3")
    again.start()
    again.join()
    assert sorted(built) == ["sender-1", "sender-2", "sender-3"]


@pytest.fixture
def own_standin(request: pytest.FixtureRequest) -> Any:
    """A stand-in of the test's own (options from ``@pytest.mark.standin(...)``): its connection
    counts are not shared with a worker of an earlier test still sending to the session's."""
    from tests.sendgrid_standin import SendGridStandIn

    marker = request.node.get_closest_marker("standin")
    server = SendGridStandIn(**(marker.kwargs if marker else {})).start()
    yield server
    server.stop()


def test_a_thread_sends_its_emails_on_one_kept_connection(own_standin):
    backend = _backend(own_standin.url)
    emails = [_email() for _ in range(5)]
    for email in emails:
        backend.send(email)
    assert own_standin.connections_opened == 1
    assert len({r.client_address for r in own_standin.accepted}) == 1
    assert {r.reference for r in own_standin.accepted} == {email.reference for email in emails}


def test_an_error_answer_is_read_to_its_end_and_the_connection_kept(own_standin):
    own_standin.script(Answer(status=500, body=b'{"errors":[{"message":"oops"}]}', kind="500"))
    backend = _backend(own_standin.url)
    with pytest.raises(ProviderUnavailable, match="oops"):
        backend.send(_email())
    email = _email()
    backend.send(email)
    assert [r.reference for r in own_standin.accepted] == [email.reference]
    assert own_standin.connections_opened == 1


def test_an_opener_called_without_a_timeout_reuses_its_connection(own_standin):
    """urllib's own default (no timeout given) on a kept connection: no error, one connection."""
    import urllib.request

    from workers.email.keep_alive import keep_alive_opener

    opener = keep_alive_opener()
    for _ in range(2):
        request = urllib.request.Request(  # noqa: S310 - the stand-in's http:// URL
            own_standin.url + "/v3/mail/send",
            data=json.dumps({"personalizations": []}).encode(),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        )
        with opener.open(request) as response:
            assert response.status == 202
            response.read()
    assert own_standin.connections_opened == 1


@pytest.mark.standin(idle_timeout=0.2)
def test_a_connection_the_provider_closed_is_replaced_before_anything_is_sent(own_standin):
    """SendGrid closes idle connections: the next email goes out on a new one, not into a closed one."""
    backend = _backend(own_standin.url)
    backend.send(_email())
    wait_until(
        lambda: own_standin.open_connections == 0, timeout=5, what="the stand-in to close the idle connection"
    )
    email = _email()
    backend.send(email)
    assert email.reference in {r.reference for r in own_standin.accepted}
    assert own_standin.connections_opened == 2


@pytest.mark.standin(keep_alive=False)
def test_a_provider_that_closes_after_each_answer_still_gets_every_email(own_standin):
    backend = _backend(own_standin.url)
    emails = [_email() for _ in range(3)]
    for email in emails:
        backend.send(email)
    assert [r.reference for r in own_standin.accepted] == [email.reference for email in emails]
    assert own_standin.connections_opened == 3


def test_a_timed_out_connection_is_dropped_and_the_next_email_goes_out(own_standin):
    own_standin.script(Answer(delay=1.0))
    backend = _backend(own_standin.url, timeout=0.3)
    with pytest.raises(ProviderUnavailable):
        backend.send(_email())
    email = _email()
    backend.send(email)
    # The late answer of the first request was never read as the second's.
    wait_until(lambda: len(own_standin.requests) == 2, timeout=5, what="the slow request to finish")
    assert email.reference in {r.reference for r in own_standin.accepted}
    assert own_standin.connections_opened == 2


def test_a_stopped_provider_is_unavailable_even_on_a_kept_connection(own_standin):
    backend = _backend(own_standin.url)
    backend.send(_email())
    own_standin.stop()
    with pytest.raises(ProviderUnavailable):
        backend.send(_email())
    assert len(own_standin.requests) == 1


@pytest.fixture
def https_standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A stand-in serving HTTPS with a throwaway certificate that the client trusts (SSL_CERT_FILE)."""
    from tests.sendgrid_standin import SendGridStandIn
    from tests.tls import self_signed, server_context
    from workers.email.keep_alive import forget_tls_context

    certificate, key = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate))
    forget_tls_context()
    server = SendGridStandIn(tls=server_context(certificate, key)).start()
    yield server
    server.stop()
    forget_tls_context()


def _in_threads(count: int, work: Any) -> None:
    """``work()`` in ``count`` new threads (each with its own client and opener); re-raises a failure."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


def test_over_https_one_tls_context_per_process_and_one_connection_per_thread(https_standin, monkeypatch):
    """A new TLS context loads the whole CA bundle (milliseconds of CPU): made once, not per email."""
    import ssl

    loads: list[int] = []
    real_load = ssl.SSLContext.load_default_certs

    def counting_load(self: ssl.SSLContext, *args: Any, **kwargs: Any) -> None:
        loads.append(1)
        real_load(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_default_certs", counting_load)
    assert https_standin.url.startswith("https://")
    backend = _backend(https_standin.url)
    emails = [_email() for _ in range(6)]
    batches = iter([emails[:3], emails[3:]])

    def send_batch() -> None:
        for email in next(batches):
            backend.send(email)

    _in_threads(2, send_batch)
    assert {r.reference for r in https_standin.accepted} == {email.reference for email in emails}
    assert len(loads) == 1
    assert https_standin.connections_opened == 2


def test_over_https_an_untrusted_certificate_is_refused(https_standin, monkeypatch, tmp_path):
    from tests.tls import self_signed
    from workers.email.keep_alive import forget_tls_context

    (tmp_path / "other").mkdir()
    other, _ = self_signed(tmp_path / "other")
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    forget_tls_context()
    with pytest.raises(ProviderUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        _backend(https_standin.url).send(_email())
    assert https_standin.requests == []


# -- secrets ------------------------------------------------------------------------


def _leaks(caplog: pytest.LogCaptureFixture, *secrets: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if any(s in r.getMessage() for s in secrets)]


def test_the_library_debug_log_never_shows_the_key_or_the_mail(standin, caplog):
    pinned = logging.getLogger(SENDGRID_HTTP_LOGGER)
    root = logging.getLogger()
    caplog.set_level(logging.DEBUG)
    assert root.level == logging.DEBUG
    marker = f"body-marker-{uuid.uuid4().hex}"

    # Without the pin the library does log both: this test can see a leak.
    unpinned = _backend(standin.url)  # building a backend pins the logger...
    # (read once pinned: run alone, this test builds the first backend of its process)
    saved_level, saved_filters = pinned.level, list(pinned.filters)
    pinned.setLevel(logging.NOTSET)  # ...so undo that for this one control send
    for f in saved_filters:
        pinned.removeFilter(f)
    try:
        unpinned.send(_email(text=marker))
        assert _leaks(caplog, API_KEY), "the control send should have logged the key"
        assert _leaks(caplog, marker), "the control send should have logged the mail"
    finally:
        pinned.setLevel(saved_level)
        for f in saved_filters:
            pinned.addFilter(f)
    caplog.clear()

    backend = _backend(standin.url)
    backend.send(_email(text=marker, html=f"<p>{marker}</p>"))
    assert pinned.getEffectiveLevel() >= logging.INFO
    # Even when something lowers the level again, the filter holds.
    pinned.setLevel(logging.DEBUG)
    try:
        backend.send(_email(text=marker, html=f"<p>{marker}</p>"))
    finally:
        pinned.setLevel(saved_level)
    # This test's three sends: the stand-in is this process's, and an email a worker of
    # an earlier test still had to send may arrive meanwhile.
    assert len([r for r in standin.accepted if marker in r.content("text/plain")]) == 3
    assert _leaks(caplog, API_KEY, marker) == []
    assert API_KEY not in caplog.text and marker not in caplog.text


def test_reprs_never_show_secrets():
    settings = get_settings()
    backend = SendGridBackend.from_settings(settings)
    assert settings.sendgrid_api_key is not None
    assert settings.sendgrid_api_key.get_secret_value() == API_KEY
    assert settings.secret_key is not None
    secret_key = settings.secret_key.get_secret_value()
    for shown in (repr(backend), str(backend), repr(settings), str(settings), settings.model_dump_json()):
        assert API_KEY not in shown
        assert secret_key not in shown


def test_an_error_keeps_the_providers_messages_only_and_never_the_emails_password(standin):
    """The error is kept on the email and its dead letter: a ``help``, or a body that is not
    SendGrid's error format, may quote the email; a message quoting it loses its password."""
    standin.script(
        Answer(
            status=400,
            body=json.dumps(
                {
                    "errors": [
                        {"message": "bad content: code K7Q2X9", "field": "content", "help": "quoted K7Q2X9"},
                        {"message": "no subject"},
                    ]
                }
            ).encode(),
        ),
        Answer(status=502, body=b"<html>proxy error: Mot de passe K7Q2X9</html>"),
    )
    backend = _backend(standin.url)
    with pytest.raises(ProviderRejected) as rejected:
        backend.send(_email(secrets=("K7Q2X9",)))
    assert str(rejected.value) == "SendGrid answered 400: bad content: code [redacted] (content); no subject"
    with pytest.raises(ProviderUnavailable) as unavailable:
        backend.send(_email(secrets=("K7Q2X9",)))
    assert str(unavailable.value) == "SendGrid answered 502"
