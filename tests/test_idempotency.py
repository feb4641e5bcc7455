"""Idempotency and provider outcomes (DESIGN §2 and §5), through the real broker and worker.

Duplicates are waited out, not slept on: a test ends once no message about its
contract is left in Redis (ready, reserved or delayed), so anything a duplicate
could still send has been sent by then.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import pytest
import redis
from sqlmodel import select

import actors
from actors.deliver_email import FAILED_OPTION
from contract_dispatch import send_contract
from models.contract import Contract
from models.dead_letter import DeadLetter
from models.delivery import EmailDelivery
from models.errors import BrokerUnavailable, ContractConflict, Rejected
from models.messages import SendContract, parse_message
from models.sending import reserve_new_contract
from models.types import utc_now
from tests.sendgrid_standin import Answer, Incoming, SendGridStandIn
from tests.support import all_emails_sent, contract_payload, record_resend, wait_for_contract, wait_until
from tests.test_access_codes import _first_arg, deliveries_of, requests_for, wait_settled
from tests.test_dead_letters import wait_email_dead
from workers.database import session_scope
from workers.dead_letters import ATTEMPTS_OPTION, FIRST_FAILED_OPTION
from workers.retry_policy import retry_when
from workers.settings import get_settings


def _contract(contract_id: str) -> Contract:
    with session_scope() as session:
        contract = session.get(Contract, contract_id)
        assert contract is not None
        return contract


def _delivery(delivery_id: int) -> EmailDelivery:
    with session_scope() as session:
        delivery = session.get(EmailDelivery, delivery_id)
        assert delivery is not None
        return delivery


def _dead_letters(client: redis.Redis, queue: str) -> list[dict]:
    namespace = get_settings().redis_namespace
    return [json.loads(raw) for raw in client.hvals(f"{namespace}:{queue}.XQ.msgs")]


def _message_done(client: redis.Redis, queue: str, message_id: str) -> bool:
    """The message was processed: neither waiting, reserved nor delayed any more."""
    namespace = get_settings().redis_namespace
    for key in (f"{namespace}:{queue}.msgs", f"{namespace}:{queue}.DQ.msgs"):
        if any(json.loads(raw)["message_id"] == message_id for raw in client.hvals(key)):
            return False
    return True


def _one_invitation(standin: SendGridStandIn, contract_id: str) -> None:
    assert len(standin.accepted_for(f"invitation:{contract_id}:")) == 1
    (delivery,) = deliveries_of(contract_id)
    assert (delivery.kind, delivery.status) == ("invitation", "sent")


# -- duplicate messages -------------------------------------------------------


def test_same_send_contract_enqueued_twice_sends_one_invitation(worker, standin, redis_server):
    payload = contract_payload()
    actors.send_contract.send(payload)
    actors.send_contract.send(payload)
    wait_for_contract(payload["contract_id"], all_emails_sent(1), what="the invitation")
    wait_settled(redis_server.client(), payload["contract_id"])
    _one_invitation(standin, payload["contract_id"])
    assert _contract(payload["contract_id"]).status == "sent"


def test_producer_called_twice_returns_a_receipt_and_sends_once(worker, standin, redis_server):
    payload = contract_payload()
    first = send_contract(**payload)
    again = send_contract(**payload)
    assert (first.contract_id, first.status) == (payload["contract_id"], "queued")
    assert again.contract_id == payload["contract_id"]
    assert again.status in ("queued", "sent")
    wait_for_contract(payload["contract_id"], all_emails_sent(1), what="the invitation")

    # Once sent, a repeat is answered from the record and enqueues nothing.
    later = send_contract(**payload)
    assert (later.contract_id, later.status) == (payload["contract_id"], "sent")
    wait_settled(redis_server.client(), payload["contract_id"])
    _one_invitation(standin, payload["contract_id"])


def test_a_reservation_made_by_another_producer_after_the_check_is_left_to_it(database, monkeypatch):
    """The check runs outside a transaction: another producer may reserve the contract
    before this one inserts it. This call then did not create the reservation, so a
    broker failure must not release it (the other producer's message is on its way)."""
    import contract_dispatch.producer as producer

    payload = contract_payload()
    message = parse_message(SendContract, payload)

    def checked_before_the_other_insert(session: Any, checked: SendContract) -> None:
        # What the check read: no contract yet; the row appears before this call
        # inserts it (written through the check's own connection: on SQLite the
        # check and the insert hold the write lock, so no other producer could).
        reserve_new_contract(session, checked, now=utc_now())

    def broker_down(_message: Any) -> None:
        raise BrokerUnavailable("the message broker is unreachable; nothing was sent")

    monkeypatch.setattr(producer, "check_send_contract", checked_before_the_other_insert)
    monkeypatch.setattr(producer, "_enqueue", broker_down)
    with pytest.raises(BrokerUnavailable):
        producer.submit_send_contract(message)
    assert _contract(payload["contract_id"]).status == "queued"

    monkeypatch.setattr(producer, "_enqueue", lambda _message: None)
    receipt = producer.submit_send_contract(message)
    assert (receipt.contract_id, receipt.status) == (payload["contract_id"], "queued")
    with session_scope() as session:
        rows = session.exec(select(Contract).where(Contract.id == payload["contract_id"])).all()
    assert [row.status for row in rows] == ["queued"]


def test_the_same_id_recorded_with_other_content_after_the_check_is_refused_at_once(database, monkeypatch):
    """Two producers, one contract id, two contents: the one whose insert finds the
    other's row is refused with contract_conflict, not answered queued (its worker
    would only dead-letter it, and the contract would read sent with the other content)."""
    import contract_dispatch.producer as producer

    payload = contract_payload()
    message = parse_message(SendContract, payload)
    other = parse_message(SendContract, {**payload, "title": "Another contract"})
    enqueued: list[Any] = []

    def checked_before_the_other_insert(session: Any, checked: SendContract) -> None:
        # What the check read: no contract yet; the other producer's row appears now.
        reserve_new_contract(session, other, now=utc_now())

    monkeypatch.setattr(producer, "check_send_contract", checked_before_the_other_insert)
    monkeypatch.setattr(producer, "_enqueue", enqueued.append)
    with pytest.raises(ContractConflict):
        producer.submit_send_contract(message)
    assert enqueued == []
    stored = _contract(payload["contract_id"])
    assert (stored.status, stored.title, stored.content_hash) == (
        "queued",
        "Another contract",
        other.content_hash(),
    )


def test_same_id_with_different_content_is_a_conflict(worker, standin, redis_server):
    payload = contract_payload()
    send_contract(**payload)
    wait_for_contract(payload["contract_id"], all_emails_sent(1), what="the invitation")
    original = _contract(payload["contract_id"])

    changed = {**payload, "title": "Un autre bureau", "sections": [{"id": "conditions"}]}
    with pytest.raises(Rejected) as refused:
        send_contract(**changed)
    assert refused.value.code == "contract_conflict"

    client = redis_server.client()
    message = actors.send_contract.send(changed)
    wait_until(
        lambda: any(m["message_id"] == message.message_id for m in _dead_letters(client, "contracts")),
        what="the conflicting message to be refused",
    )
    wait_settled(client, payload["contract_id"])

    after = _contract(payload["contract_id"])
    assert after.status == "sent"
    assert after.error_code is None and after.error_message is None
    assert after.content_hash == original.content_hash
    assert after.title == payload["title"]
    assert after.sections == original.sections
    assert after.updated_at == original.updated_at
    _one_invitation(standin, payload["contract_id"])


def test_redelivered_deliver_email_does_not_send_again(worker, standin, redis_server):
    payload = contract_payload()
    send_contract(**payload)
    wait_for_contract(payload["contract_id"], all_emails_sent(1), what="the invitation")
    client = redis_server.client()
    wait_settled(client, payload["contract_id"])
    (sent,) = deliveries_of(payload["contract_id"])
    assert sent.id is not None
    requests_before = len(requests_for(standin, f"invitation:{payload['contract_id']}:"))
    assert requests_before == 1

    message = actors.deliver_email.send({"delivery_id": sent.id})
    wait_until(lambda: _message_done(client, "emails", message.message_id), what="the redelivered message")

    assert len(requests_for(standin, f"invitation:{payload['contract_id']}:")) == requests_before
    after = _delivery(sent.id)
    assert after.status == "sent"
    assert after.attempts == sent.attempts
    assert after.provider_message_id == sent.provider_message_id
    assert after.sent_at == sent.sent_at
    # Finding the email sent is success, not a failure to dead-letter.
    assert not [m for m in _dead_letters(client, "emails") if m["message_id"] == message.message_id]


def test_notify_signatories_twice_tells_each_signatory_once(worker, standin, redis_server):
    payload = contract_payload(
        signatories=[
            {"email": "first-boss@example.com", "name": "Alice"},
            {"email": "second-boss@example.com"},
        ]
    )
    send_contract(**payload)
    wait_for_contract(payload["contract_id"], all_emails_sent(1), what="the invitation")

    signature = {
        "contract_id": payload["contract_id"],
        "legal_name": payload["company_name"],
        "accepted_sections": ["conditions", "tarifs"],
    }
    actors.notify_signatories.send(signature)
    actors.notify_signatories.send(signature)
    wait_for_contract(
        payload["contract_id"],
        lambda r: r.status == "signed" and all_emails_sent(3)(r),
        what="both signatories to be told",
    )
    wait_settled(redis_server.client(), payload["contract_id"])

    prefix = f"signed_notification:{payload['contract_id']}:"
    received = sorted(r.to[0] for r in standin.accepted_for(prefix))
    assert received == ["first-boss@example.com", "second-boss@example.com"]
    notifications = [d for d in deliveries_of(payload["contract_id"]) if d.kind == "signed_notification"]
    assert sorted(d.recipient for d in notifications) == received


# -- the invitation's first attempt -------------------------------------------


def answer_invitation(
    monkeypatch: pytest.MonkeyPatch, standin: SendGridStandIn, contract_id: str, *answers: Answer
) -> None:
    """These answers for this contract's invitation only, in order (then 202): a late email
    of another test (a delayed retry of the in-process worker) cannot take them."""
    waiting = list(answers)
    lock = threading.Lock()

    def choose(incoming: Incoming) -> Answer:
        if (incoming.reference or "").startswith(f"invitation:{contract_id}:"):
            with lock:
                if waiting:
                    return waiting.pop(0)
        return Answer()

    monkeypatch.setattr(standin, "chooser", choose)


def here() -> int:
    return threading.get_ident()


def _enqueued_here(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The queues this thread enqueued messages on (Dramatiq logs each enqueue at DEBUG)."""
    return [
        str(record.args[1])
        for record in caplog.records
        if record.thread == here()
        and record.msg == "Enqueueing message %r on queue %r."
        and isinstance(record.args, tuple)
    ]


def test_the_invitation_goes_out_from_the_send_contract_that_records_it(database, standin, caplog):
    # Run in this thread: whatever the actor enqueues is logged by this thread.
    caplog.set_level(logging.DEBUG)
    payload = contract_payload()
    actors.send_contract.fn(payload)

    (accepted,) = standin.accepted_for(f"invitation:{payload['contract_id']}:")
    (delivery,) = deliveries_of(payload["contract_id"])
    assert (delivery.status, delivery.attempts) == ("sent", 1)
    assert delivery.provider_message_id == accepted.message_id
    # No deliver_email message: the email went out before the actor returned.
    assert _enqueued_here(caplog) == []


def test_a_failed_first_attempt_is_handed_to_deliver_email(worker, standin, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    payload = contract_payload()
    answer_invitation(monkeypatch, standin, payload["contract_id"], Answer(status=500))
    actors.send_contract.fn(payload)

    (delivery,) = deliveries_of(payload["contract_id"])
    assert (delivery.status, delivery.attempts) == ("pending", 1)
    assert delivery.last_error is not None and "500" in delivery.last_error
    # Detected the same way as the test above: one deliver_email message took it over.
    assert _enqueued_here(caplog) == ["emails.DQ"]
    (warning,) = [r for r in caplog.records if r.name == "actors.deliver_email" and r.thread == here()]
    assert warning.levelname == "WARNING"
    expected = f"Delivery {delivery.id}: first attempt failed (ProviderUnavailable)"
    assert warning.getMessage().startswith(expected)
    report = wait_for_contract(
        payload["contract_id"],
        lambda r: all_emails_sent(1)(r) and r.emails[0].attempts == 2,
        what="deliver_email to send it on its second attempt",
    )
    assert report.emails[0].last_error is None


def test_a_duplicate_that_meets_its_invitation_being_sent_leaves_it_to_a_later_check(
    worker, standin, caplog, monkeypatch
):
    caplog.set_level(logging.DEBUG)
    payload = contract_payload()
    arrived, release = threading.Event(), threading.Event()

    def hold_the_invitation(incoming: Incoming) -> Answer:
        if (incoming.reference or "").startswith(f"invitation:{payload['contract_id']}:"):
            arrived.set()
            release.wait(60)
        return Answer()

    monkeypatch.setattr(standin, "chooser", hold_the_invitation)
    # What the duplicate, run in this thread, enqueues.
    handed_over: list[Any] = []
    duplicate_thread = here()
    enqueue = actors.broker.enqueue

    def recording_enqueue(message: Any, *, delay: int | None = None) -> Any:
        if here() == duplicate_thread:
            handed_over.append(message)
        return enqueue(message, delay=delay)

    monkeypatch.setattr(actors.broker, "enqueue", recording_enqueue)
    first = threading.Thread(target=actors.send_contract.fn, args=(payload,))
    first.start()
    try:
        assert arrived.wait(60), "the first send never reached the provider"
        # The same message again (a producer's retry), while the first one's email is out.
        actors.send_contract.fn(payload)
    finally:
        release.set()
        first.join(60)

    _one_invitation(standin, payload["contract_id"])
    (delivery,) = deliveries_of(payload["contract_id"])
    assert delivery.attempts == 1
    # A check after the first attempt's lease, in case its worker died meanwhile.
    assert _enqueued_here(caplog) == ["emails.DQ"]
    # No retry and no attempt of its own: the duplicate made none, so the check keeps
    # deliver_email's whole retry budget and a dead letter counts only real attempts.
    (check,) = handed_over
    assert check.actor_name == "deliver_email"
    assert not {"retries", ATTEMPTS_OPTION, FIRST_FAILED_OPTION} & set(check.options), check.options
    (note,) = [r for r in caplog.records if r.name == "actors.deliver_email" and r.thread == here()]
    # Not a failure: nothing for an operator to look at.
    assert note.levelname == "INFO"
    assert note.getMessage().startswith(f"Delivery {delivery.id} is being sent by another attempt")


def test_with_no_retry_allowed_a_failed_first_attempt_is_dead_lettered_without_another_request(
    worker, standin, redis_server, monkeypatch
):
    # DELIVER_EMAIL_MAX_RETRIES=0, as deliver_email was declared with it (its options
    # are read when the actor is declared; the worker in this process shares them).
    monkeypatch.setitem(actors.deliver_email.options, "max_retries", 0)
    monkeypatch.setitem(actors.deliver_email.options, "retry_when", retry_when(0))
    payload = contract_payload()
    answer_invitation(monkeypatch, standin, payload["contract_id"], Answer(status=503), Answer(status=503))
    actors.send_contract.fn(payload)

    (delivery,) = deliveries_of(payload["contract_id"])
    assert delivery.status == "failed" and delivery.id is not None
    delivery_id = delivery.id
    record = wait_email_dead(delivery_id)
    wait_settled(redis_server.client(), payload["contract_id"])
    assert (record.exception_type, record.attempts) == ("ProviderUnavailable", 1)
    # Its payload names only the delivery; the record names the delivery's contract.
    assert record.contract_id == payload["contract_id"]
    assert "503" in record.exception_message
    # One request: the first attempt's; none from the message that filed the dead letter.
    assert [r.status for r in requests_for(standin, f"invitation:{payload['contract_id']}:")] == [503]
    assert (_delivery(delivery_id).status, _delivery(delivery_id).attempts) == ("failed", 1)


def test_a_first_attempt_failed_for_good_is_dead_lettered_when_the_broker_refuses_its_message(
    database, standin, monkeypatch
):
    """The message that files the dead letter cannot be enqueued: the record is filed
    in SQL at once (a redelivered send_contract would find nothing left to send)."""
    payload = contract_payload()
    answer_invitation(monkeypatch, standin, payload["contract_id"], Answer(status=400))

    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")

    monkeypatch.setattr(actors.broker, "enqueue", refuse)
    actors.send_contract.fn(payload)
    monkeypatch.undo()

    (delivery,) = deliveries_of(payload["contract_id"])
    assert (delivery.status, delivery.attempts) == ("failed", 1)
    with session_scope() as session:
        (record,) = session.exec(
            select(DeadLetter).where(DeadLetter.contract_id == payload["contract_id"])
        ).all()
    assert (record.actor_name, record.exception_type, record.attempts) == (
        "deliver_email",
        "ProviderRejected",
        1,
    )
    assert record.message_args == [{"version": 1, "delivery_id": delivery.id}]
    assert record.status == "dead" and record.redis_message_id is None
    assert "400" in record.exception_message
    assert [r.status for r in requests_for(standin, f"invitation:{payload['contract_id']}:")] == [400]


def test_the_failed_option_kills_only_a_delivery_failed_for_good(worker, standin, redis_server):
    """A deliver_email with the option ``first_attempt_failed`` (``FAILED_OPTION``) on a
    delivery that is not failed sends it."""
    payload = contract_payload()
    actors.send_contract.fn(payload)
    # A second step, recorded and not sent: what a resend records.
    pending = record_resend(payload["contract_id"])
    failed: Any = {FAILED_OPTION: True}
    message = actors.deliver_email.send_with_options(args=({"version": 1, "delivery_id": pending},), **failed)
    # Settled either way: sent, or failed when its (wrong) dead letter is filed.
    wait_until(lambda: _delivery(pending).status != "pending", what="the second step to settle")
    wait_until(lambda: _message_done(redis_server.client(), "emails", message.message_id), what="the message")

    assert (_delivery(pending).status, _delivery(pending).attempts) == ("sent", 1)
    assert len(requests_for(standin, f"invitation:{payload['contract_id']}:")) == 2
    with session_scope() as session:
        dead = session.exec(select(DeadLetter).where(DeadLetter.message_id == message.message_id)).all()
    assert dead == []


# -- provider outcomes --------------------------------------------------------


def test_permanent_provider_refusal_fails_without_retry(worker, standin, redis_server):
    payload = contract_payload()
    standin.script(Answer(status=400, body=b'{"errors":[{"message":"The to field is invalid."}]}'))
    send_contract(**payload)
    report = wait_for_contract(
        payload["contract_id"], lambda r: [e.status for e in r.emails] == ["failed"], what="the email to fail"
    )
    client = redis_server.client()
    wait_settled(client, payload["contract_id"])

    (request,) = requests_for(standin, f"invitation:{payload['contract_id']}:")
    assert request.status == 400
    (delivery,) = deliveries_of(payload["contract_id"])
    assert delivery.status == "failed"
    assert delivery.attempts == 1
    assert delivery.provider_message_id is None
    assert delivery.last_error is not None and "400" in delivery.last_error
    assert report.emails[0].last_error == delivery.last_error
    assert [m for m in _dead_letters(client, "emails") if _first_arg(m).get("delivery_id") == delivery.id]


def test_server_error_is_retried_and_ends_sent(worker, standin, redis_server):
    payload = contract_payload()
    standin.script(Answer(status=500), Answer(status=202))
    send_contract(**payload)
    report = wait_for_contract(
        payload["contract_id"],
        lambda r: all_emails_sent(1)(r) and r.emails[0].attempts == 2,
        what="the email to be sent on its second attempt",
    )
    wait_settled(redis_server.client(), payload["contract_id"])

    failed, accepted = requests_for(standin, f"invitation:{payload['contract_id']}:")
    assert (failed.status, accepted.status) == (500, 202)
    (delivery,) = deliveries_of(payload["contract_id"])
    assert (delivery.status, delivery.attempts) == ("sent", 2)
    assert delivery.provider_message_id == accepted.message_id
    assert delivery.last_error is None
    assert report.emails[0].provider_message_id == accepted.message_id


def test_rate_limited_send_waits_for_the_reset(worker, standin, redis_server):
    payload = contract_payload()
    reset = int(time.time()) + 2  # whole seconds, as SendGrid sends it: 1 to 2 s ahead
    standin.script(Answer(status=429, headers={"X-RateLimit-Reset": str(reset)}))
    send_contract(**payload)
    prefix = f"invitation:{payload['contract_id']}:"
    wait_until(lambda: requests_for(standin, prefix), what="the rate-limited request")
    assert time.time() < reset, "the first request came too late to tell a wait from no wait"

    arrival: list[float] = []

    def retried() -> bool:
        if len(requests_for(standin, prefix)) >= 2:
            arrival.append(time.time())
            return True
        return False

    wait_until(retried, what="the retry after the rate-limit reset")
    # The retry is seen a little after it arrived, never before: an early retry
    # (the 20-200 ms backoff) would be seen well before the reset.
    assert arrival[0] >= reset
    wait_for_contract(payload["contract_id"], all_emails_sent(1), what="the email to be sent")
    wait_settled(redis_server.client(), payload["contract_id"])

    limited, accepted = requests_for(standin, prefix)
    assert (limited.status, accepted.status) == (429, 202)
    (delivery,) = deliveries_of(payload["contract_id"])
    assert (delivery.status, delivery.attempts) == ("sent", 2)
    assert delivery.provider_message_id == accepted.message_id


def test_slow_provider_answer_times_out_and_is_retried(worker, standin, redis_server):
    assert get_settings().sendgrid_timeout == 2
    payload = contract_payload()
    standin.script(Answer(delay=3))
    send_contract(**payload)
    report = wait_for_contract(
        payload["contract_id"],
        lambda r: all_emails_sent(1)(r) and r.emails[0].attempts == 2,
        # Without a timeout the slow answer would be a success on the first attempt.
        what="the email to be sent after the timeout",
    )
    prefix = f"invitation:{payload['contract_id']}:"
    # The stand-in records the slow request once its delay is over.
    wait_until(lambda: len(requests_for(standin, prefix)) == 2, what="the slow request to be recorded")
    wait_settled(redis_server.client(), payload["contract_id"])

    first, second = requests_for(standin, prefix)
    assert first.body == second.body
    (delivery,) = deliveries_of(payload["contract_id"])
    assert (delivery.status, delivery.attempts) == ("sent", 2)
    # The message id is the one of the answer that arrived in time.
    assert report.emails[0].provider_message_id in {first.message_id, second.message_id}
