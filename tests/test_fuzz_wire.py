"""Bad input on the wire (issue 6, item 4): raw Redis messages, as any producer may write them.

Hypothesis draws a batch of broken messages and the test writes them to Redis
with plain commands (README, "Enqueueing without Python"), shuffled among valid
``send_contract`` messages (some to internationalised addresses), then lets the
in-process ``worker`` (real Dramatiq worker threads on the real broker) take
them all. Broken means, at every layer:

- the body: not JSON, JSON that is not an object, a Dramatiq envelope with a
  field missing, an extra field, a field of the wrong type, no Redis id, another
  queue's name, Dramatiq options no producer may set (callbacks, ``throws``,
  retry counters that are not numbers);
- the call: an actor nobody declared, no argument, two arguments, unknown
  keyword arguments;
- the payload: every breakage of ``tests.test_fuzz_producer`` (wrong types,
  control characters and CR/LF in names and titles, huge strings, invalid
  addresses), fields missing or extra, not an object, for ``send_contract``,
  ``notify_signatories``, ``cancel_contract`` and ``deliver_email``.

Then, for each broken message: exactly one SQL dead letter, filed under its
Redis id, with a named reason (the exception type expected for that breakage and
a message), processed once (``attempts == 1``: a permanent error is never
retried), and Redis agrees (one copy in the dead-letter queue, none left in the
queue, its hash, the delay queue or a worker's reserved set). Every valid message
is delivered: one invitation per contract reaches the SendGrid stand-in. And the
worker is still whole: every worker thread alive, none of them stuck.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dramatiq
import pytest
import redis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import func
from sqlmodel import col, select

from models.dead_letter import DeadLetter
from models.messages import CancelContract, NotifySignatories, SendContract, WireMessage
from tests.sendgrid_standin import SendGridStandIn
from tests.support import contract_payload, wait_until
from tests.test_fuzz_producer import (
    CONTROL_CHARACTERS,
    Breakage,
    huge_string,
    notify_breakages,
    send_contract_breakages,
    wrong_types,
)
from workers import dead_letters
from workers.database import session_scope

#: Batches per database, and broken messages per batch (with a valid one every few).
BATCHES = 8
BROKEN_PER_BATCH = 40
VALID_PER_BATCH = 10

#: How long a batch may take to settle, in seconds (it takes a few).
SETTLE_TIMEOUT_SECONDS = 60

#: The exception type each refusal code is raised as (``models.errors``).
EXCEPTION_OF_CODE = {
    "invalid_payload": "InvalidPayload",
    "invalid_email": "InvalidEmail",
    "invalid_company_name": "InvalidCompanyName",
    "invalid_lead_source": "InvalidLeadSource",
}

#: A message that is not a Dramatiq message at all, and one whose envelope lies.
NOT_A_MESSAGE = frozenset({"DecodeError"})
BAD_ENVELOPE = frozenset({"MalformedMessage"})

#: Valid addresses, some of them internationalised (accepted: see test_fuzz_producer).
VALID_DOMAINS = ("example.com", "exämple.com", "例子.广告", "bücher.de")
VALID_LOCAL_PARTS = ("client", "josé", "用户", "Δοκιμή")


#: Dramatiq's consumer threads, running beside the tests, draw their idle backoff
#: jitter from the global ``random``: Hypothesis takes that for a strategy using it.
pytestmark = pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")

# -- what a broken message is --------------------------------------------------------


@dataclass(frozen=True)
class Broken:
    """A recipe for one broken message: its body given its Redis id, and the reasons it may die with."""

    label: str
    build: Callable[[str], bytes]
    reasons: frozenset[str]
    queue: str = "contracts"

    def __repr__(self) -> str:
        return f"Broken({self.label!r})"


def envelope(
    redis_id: str, *, actor: str, args: Any, queue: str = "contracts", changes: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Dramatiq's message JSON (README), then ``changes`` (a value of ``...`` removes the field)."""
    fields: dict[str, Any] = {
        "queue_name": queue,
        "actor_name": actor,
        "args": args,
        "kwargs": {},
        "options": {"redis_message_id": redis_id},
        "message_id": redis_id,
        "message_timestamp": int(time.time() * 1000),
    }
    for name, value in (changes or {}).items():
        if value is ...:
            fields.pop(name, None)
        else:
            fields[name] = value
    return fields


def as_json(fields: Any) -> bytes:
    return json.dumps(fields).encode()


def changed_envelope(what: str, changes: dict[str, Any], expected: frozenset[str] = BAD_ENVELOPE) -> Broken:
    """A valid send_contract message whose envelope has ``changes``."""
    return Broken(
        what,
        lambda redis_id: as_json(
            envelope(redis_id, actor="send_contract", args=[contract_payload()], changes=changes)
        ),
        expected,
    )


def payload_breakage(actor: str, breakage: Breakage, base: Callable[[], dict[str, Any]]) -> Broken:
    return Broken(
        f"{actor} {breakage.field}={str(breakage.value)[:40]!r}",
        lambda redis_id: as_json(envelope(redis_id, actor=actor, args=[breakage.apply(base())])),
        frozenset({EXCEPTION_OF_CODE[breakage.code]}),
    )


def notify_base() -> dict[str, Any]:
    return {
        "contract_id": f"c-{uuid.uuid4().hex[:10]}",
        "legal_name": "Dupont SARL",
        "accepted_sections": ["conditions"],
    }


def cancel_base() -> dict[str, Any]:
    return {"contract_id": f"c-{uuid.uuid4().hex[:10]}", "reason": "changed plans"}


MODELS: dict[str, type[WireMessage]] = {
    "send_contract": SendContract,
    "notify_signatories": NotifySignatories,
    "cancel_contract": CancelContract,
}

BASES: dict[str, Callable[[], dict[str, Any]]] = {
    "send_contract": contract_payload,
    "notify_signatories": notify_base,
    "cancel_contract": cancel_base,
}


@st.composite
def broken_payload(draw: st.DrawFn) -> Broken:
    """A public message whose one JSON object is broken."""
    kind = draw(
        st.sampled_from(["send_field", "notify_field", "cancel_field", "missing", "extra", "not_object"])
    )
    if kind == "send_field":
        return payload_breakage("send_contract", draw(send_contract_breakages), contract_payload)
    if kind == "notify_field":
        return payload_breakage("notify_signatories", draw(notify_breakages), notify_base)
    actor = draw(st.sampled_from(sorted(BASES)))
    base = BASES[actor]
    if kind == "cancel_field":
        breakage = Breakage(
            "reason",
            draw(st.one_of(wrong_types, st.sampled_from(CONTROL_CHARACTERS).map(lambda c: f"a{c}b"))),
            "",
        )
        return payload_breakage(
            "cancel_contract", Breakage(breakage.field, breakage.value, "invalid_payload"), base
        )
    if kind == "missing":
        required = {
            "send_contract": [
                "contract_id",
                "email",
                "company_name",
                "lead_source",
                "workspace_id",
                "signatories",
                "sections",
            ],
            "notify_signatories": ["contract_id", "legal_name", "accepted_sections"],
            "cancel_contract": ["contract_id"],
        }[actor]
        field = draw(st.sampled_from(required))

        def without(redis_id: str) -> bytes:
            payload = base()
            del payload[field]
            return as_json(envelope(redis_id, actor=actor, args=[payload]))

        return Broken(f"{actor} without {field}", without, frozenset({"InvalidPayload"}))
    if kind == "extra":
        name = draw(st.text(min_size=1, max_size=30).filter(lambda n: n not in MODELS[actor].model_fields))
        value = draw(st.one_of(wrong_types, st.text(max_size=20)))

        def extra(redis_id: str) -> bytes:
            payload = base()
            payload[name] = value
            return as_json(envelope(redis_id, actor=actor, args=[payload]))

        return Broken(f"{actor} extra field {name!r}", extra, frozenset({"InvalidPayload"}))
    not_object: Any = draw(
        st.one_of(wrong_types, st.text(max_size=20), st.none()).filter(lambda v: not isinstance(v, dict))
    )
    return Broken(
        f"{actor} payload {not_object!r}",
        lambda redis_id: as_json(envelope(redis_id, actor=actor, args=[not_object])),
        frozenset({"InvalidPayload"}),
    )


@st.composite
def broken_delivery(draw: st.DrawFn) -> Broken:
    """deliver_email (internal, but on the same Redis) with an id that is not a recorded delivery's."""
    value: Any = draw(
        st.one_of(
            st.sampled_from([0, -1, 1.5, None, "abc", "", [], {}]),
            # Never recorded (ids grow from 1), up to the largest a SQL integer column holds, and past it.
            st.sampled_from([10**9, 2**31 - 1, 2**31, 10**12, 2**63, 10**30]),
        )
    )
    fits = isinstance(value, int) and 1 <= value <= 2**31 - 1
    reasons = frozenset({"UnknownDelivery"}) if fits else frozenset({"InvalidPayload"})
    return Broken(
        f"deliver_email delivery_id={value!r}",
        lambda redis_id: as_json(
            envelope(redis_id, actor="deliver_email", args=[{"delivery_id": value}], queue="emails")
        ),
        reasons,
        queue="emails",
    )


@st.composite
def broken_body(draw: st.DrawFn) -> Broken:
    """A body that is no Dramatiq message: not JSON, or JSON that is not an envelope object."""
    kind = draw(st.sampled_from(["bytes", "text", "json_not_object", "missing_field", "extra_field"]))
    if kind == "bytes":
        raw = draw(st.binary(min_size=0, max_size=200).filter(_not_json))
        return Broken("binary body", lambda redis_id: raw, NOT_A_MESSAGE)
    if kind == "text":
        raw = draw(
            st.one_of(
                st.sampled_from(
                    ["{", "}", "nul", "{'single': 'quotes'}", "<xml/>", "\x00", '{"a":}', "NaN-ish"]
                ),
                st.text(max_size=80),
            ).filter(lambda t: _not_json(t.encode()))
        ).encode()
        return Broken("text body", lambda redis_id: raw, NOT_A_MESSAGE)
    if kind == "json_not_object":
        value = draw(
            st.one_of(
                st.none(),
                st.booleans(),
                st.integers(),
                st.text(max_size=20),
                st.lists(st.integers(), max_size=3),
            )
        )
        return Broken(f"body {value!r}", lambda redis_id: as_json(value), NOT_A_MESSAGE)
    if kind == "missing_field":
        field = draw(st.sampled_from(["queue_name", "actor_name", "args", "kwargs", "options"]))
        return Broken(
            f"envelope without {field}",
            lambda redis_id: as_json(
                envelope(redis_id, actor="send_contract", args=[contract_payload()], changes={field: ...})
            ),
            NOT_A_MESSAGE,
        )
    name = draw(st.text(min_size=1, max_size=20).filter(lambda n: n not in _ENVELOPE_FIELDS))
    return Broken(
        f"envelope with extra field {name!r}",
        lambda redis_id: as_json(
            envelope(redis_id, actor="send_contract", args=[contract_payload()], changes={name: 1})
        ),
        NOT_A_MESSAGE,
    )


_ENVELOPE_FIELDS = {
    "queue_name",
    "actor_name",
    "args",
    "kwargs",
    "options",
    "message_id",
    "message_timestamp",
}


def _not_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except ValueError:
        return True
    return False


@st.composite
def broken_envelope(draw: st.DrawFn) -> Broken:
    """A JSON envelope whose fields lie: wrong types, wrong queue, no Redis id, bad options."""
    value: Any
    kind = draw(
        st.sampled_from(["field_type", "queue", "no_redis_id", "options", "unknown_actor", "args", "kwargs"])
    )
    if kind == "field_type":
        field = draw(st.sampled_from(["actor_name", "kwargs", "options", "message_id"]))
        value = draw(st.one_of(st.integers(), st.lists(st.integers(), max_size=2), st.booleans(), st.none()))
        if field == "kwargs" and value is None:
            value = 5
        return changed_envelope(f"envelope {field}={value!r}", {field: value})
    if kind == "queue":
        name = draw(
            st.one_of(
                st.sampled_from(["emails", "maintenance", "contracts.DQ", ""]),
                st.text(max_size=30),
                st.integers(),
            )
        )
        return changed_envelope(f"queue_name {name!r} on contracts", {"queue_name": name})
    if kind == "no_redis_id":
        options = draw(st.sampled_from([{}, {"redis_message_id": None}, {"redis_message_id": 7}]))
        return changed_envelope(f"options {options!r}", {"options": options})
    if kind == "options":
        name, value = draw(
            st.one_of(
                st.tuples(
                    st.sampled_from(["throws", "retry_when"]),
                    st.one_of(st.text(max_size=10), st.lists(st.text(max_size=5), max_size=2)),
                ),
                st.tuples(
                    st.sampled_from(["on_success", "on_failure", "on_retry_exhausted", "pipe_target"]),
                    st.one_of(
                        st.sampled_from(["send_contract", "no_such_actor"]),
                        st.integers(),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=1),
                    ),
                ),
                st.tuples(
                    st.sampled_from(
                        [
                            "retries",
                            "max_retries",
                            "min_backoff",
                            "max_backoff",
                            "max_age",
                            "time_limit",
                            "eta",
                            "requeue_timestamp",
                            "attempts",
                            "first_failed_at",
                        ]
                    ),
                    st.one_of(
                        st.text(max_size=10),
                        st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=1),
                    ),
                ),
            )
        )
        # A refusal first (a payload that fails), so failure paths read the option too.
        payload = draw(st.sampled_from(["valid_unknown_workspace", "not_an_object"]))

        def with_option(redis_id: str) -> bytes:
            args = (
                [contract_payload(workspace_id=f"ws-{uuid.uuid4().hex[:8]}")]
                if payload == "valid_unknown_workspace"
                else ["x"]
            )
            return as_json(
                envelope(
                    redis_id,
                    actor="send_contract",
                    args=args,
                    changes={"options": {"redis_message_id": redis_id, name: value}},
                )
            )

        return Broken(f"option {name}={value!r}", with_option, BAD_ENVELOPE)
    if kind == "unknown_actor":
        name = draw(
            st.one_of(
                st.text(min_size=1, max_size=40),
                st.sampled_from(CONTROL_CHARACTERS).map(lambda c: f"send{c}contract"),
                huge_string(200),
                st.just("send_contract "),
                st.just("Send_Contract"),
            ).filter(lambda n: n not in {"send_contract", "notify_signatories", "cancel_contract"})
        )
        return Broken(
            f"actor {name[:40]!r}",
            lambda redis_id: as_json(envelope(redis_id, actor=name, args=[contract_payload()])),
            frozenset({"ActorNotFound"}),
        )
    if kind == "args":
        args = draw(
            st.sampled_from(
                [
                    [],
                    "__payload_twice__",
                    "abc",
                    {"a": 1, "b": 2},
                ]
            )
        )

        def with_args(redis_id: str) -> bytes:
            value = [contract_payload(), contract_payload()] if args == "__payload_twice__" else args
            return as_json(envelope(redis_id, actor="send_contract", args=value))

        return Broken(f"args {str(args)[:30]!r}", with_args, frozenset({"TypeError", "MalformedMessage"}))
    key = draw(st.one_of(st.text(min_size=1, max_size=20), st.sampled_from(CONTROL_CHARACTERS)))
    return changed_envelope(
        f"kwargs {{{key!r}: 1}}", {"kwargs": {key: 1}}, frozenset({"TypeError", "MalformedMessage"})
    )


broken_messages = st.one_of(
    broken_payload(), broken_payload(), broken_delivery(), broken_body(), broken_envelope()
)


# -- writing them, and what must be true after -------------------------------------------------


@dataclass
class Written:
    broken: Broken
    redis_id: str


def write_batch(client: redis.Redis, namespace: str, items: list[tuple[str, str, bytes]]) -> None:
    """HSET + RPUSH per message, all in one MULTI/EXEC (README)."""
    with client.pipeline(transaction=True) as pipe:
        for queue, redis_id, body in items:
            pipe.hset(f"{namespace}:{queue}.msgs", redis_id, body)
            pipe.rpush(f"{namespace}:{queue}", redis_id)
        pipe.execute()


def valid_send_contract(redis_id: str, number: int) -> tuple[bytes, str, str]:
    """A valid send_contract (every other one to an internationalised address): body, contract id, address."""
    local = VALID_LOCAL_PARTS[number % len(VALID_LOCAL_PARTS)]
    domain = VALID_DOMAINS[(number // 2) % len(VALID_DOMAINS)]
    payload = contract_payload(email=f"{local}.{uuid.uuid4().hex[:8]}@{domain}")
    return (
        as_json(envelope(redis_id, actor="send_contract", args=[payload])),
        payload["contract_id"],
        payload["email"],
    )


def records_of(redis_ids: list[str]) -> dict[str, DeadLetter]:
    with session_scope() as session:
        found = session.exec(select(DeadLetter).where(col(DeadLetter.message_id).in_(redis_ids))).all()
    return {record.message_id: record for record in found}


def reserved_anywhere(client: redis.Redis, namespace: str, redis_id: str) -> list[str]:
    """Every place but the dead-letter queue where Redis still holds the message."""
    places = []
    for queue in ("contracts", "emails"):
        if client.hexists(f"{namespace}:{queue}.msgs", redis_id):
            places.append(f"{queue}.msgs")
        if redis_id.encode() in client.lrange(f"{namespace}:{queue}", 0, -1):
            places.append(queue)
        if client.hexists(f"{namespace}:{queue}.DQ.msgs", redis_id):
            places.append(f"{queue}.DQ.msgs")
    for acks in client.scan_iter(f"{namespace}:__acks__.*"):
        if client.sismember(acks, redis_id):
            places.append(acks.decode())
    return places


def worker_whole(worker: dramatiq.Worker) -> list[str]:
    """What is wrong with the worker: dead worker threads or consumers."""
    problems = [f"worker thread {thread.name} died" for thread in worker.workers if not thread.is_alive()]
    problems += [
        f"consumer of {name} died" for name, thread in worker.consumers.items() if not thread.is_alive()
    ]
    return problems


def run_batch(
    worker: dramatiq.Worker,
    broker: Any,
    redis_server: Any,
    standin: SendGridStandIn,
    batch: list[Broken],
    seed: int,
) -> None:
    """``check_batch``, then its dead letters purged from SQL and Redis.

    The batch's raw bodies are no Dramatiq messages: left in the shared
    dead-letter queues they would trip other tests that read those queues.
    """
    with session_scope() as session:
        before = session.exec(select(func.max(DeadLetter.id))).one() or 0
    try:
        check_batch(worker, broker, redis_server, standin, batch, seed)
    finally:
        with session_scope() as session:
            created = session.exec(select(DeadLetter.id).where(col(DeadLetter.id) > before)).all()
        dead_letters.purge(broker, [record_id for record_id in created if record_id is not None])


def check_batch(
    worker: dramatiq.Worker,
    broker: Any,
    redis_server: Any,
    standin: SendGridStandIn,
    batch: list[Broken],
    seed: int,
) -> None:
    """Write ``batch`` shuffled among valid messages, let the worker take them all, check every outcome."""
    client = redis_server.client()
    namespace = broker.namespace
    written = [Written(broken, str(uuid.uuid4())) for broken in batch]
    items = [(w.broken.queue, w.redis_id, w.broken.build(w.redis_id)) for w in written]
    valid: dict[str, str] = {}
    for number in range(VALID_PER_BATCH):
        redis_id = str(uuid.uuid4())
        body, contract_id, address = valid_send_contract(redis_id, number)
        valid[contract_id] = address
        items.append(("contracts", redis_id, body))
    random.Random(seed).shuffle(items)
    write_batch(client, namespace, items)

    by_id = {w.redis_id: w for w in written}

    def settled() -> bool:
        delivered = all(standin.accepted_for(f"invitation:{contract_id}:") for contract_id in valid)
        return delivered and len(records_of(list(by_id))) == len(by_id)

    try:
        wait_until(
            settled,
            timeout=SETTLE_TIMEOUT_SECONDS,
            what="every broken message dead and every valid one delivered",
        )
    except AssertionError:
        records = records_of(list(by_id))
        missing = [w.broken.label for w in written if w.redis_id not in records]
        undelivered = [c for c in valid if not standin.accepted_for(f"invitation:{c}:")]
        raise AssertionError(
            f"no dead letter for {missing}; not delivered: {undelivered}; worker: {worker_whole(worker)}"
        ) from None

    problems: list[str] = []
    records = records_of(list(by_id))
    for redis_id, item in by_id.items():
        record = records[redis_id]
        label = item.broken.label
        if record.exception_type not in item.broken.reasons:
            problems.append(
                f"{label}: died of {record.exception_type} ({record.exception_message[:120]}), "
                f"expected {set(item.broken.reasons)}"
            )
        if not record.exception_message.strip():
            problems.append(f"{label}: no reason given")
        if record.attempts != 1:
            problems.append(
                f"{label}: processed {record.attempts} times (a permanent error is never retried)"
            )
        if record.status != "dead" or record.redis_message_id != redis_id:
            problems.append(f"{label}: record {record.status} for Redis id {record.redis_message_id}")
        if client.zscore(f"{namespace}:{item.broken.queue}.XQ", redis_id) is None or not client.hexists(
            f"{namespace}:{item.broken.queue}.XQ.msgs", redis_id
        ):
            problems.append(f"{label}: not in Redis's dead-letter queue")
        left = reserved_anywhere(client, namespace, redis_id)
        if left:
            problems.append(f"{label}: still in {left}")
    assert not problems, "\n".join(problems)

    # Each valid message delivered exactly once, to its address, and none of them dead.
    for contract_id, address in valid.items():
        received = standin.accepted_for(f"invitation:{contract_id}:")
        assert len(received) == 1 and received[0].to == [address], (contract_id, [r.to for r in received])
    with session_scope() as session:
        dead_valid = session.exec(
            select(DeadLetter).where(col(DeadLetter.contract_id).in_(list(valid)))
        ).all()
    assert not dead_valid, [(d.contract_id, d.exception_type) for d in dead_valid]
    assert not worker_whole(worker), worker_whole(worker)


@settings(
    max_examples=BATCHES,
    deadline=None,
    database=None,
    # A failure reports its whole batch; shrinking would replay many slow batches.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(
    batch=st.lists(broken_messages, min_size=BROKEN_PER_BATCH, max_size=BROKEN_PER_BATCH),
    seed=st.integers(0, 2**32),
)
def test_broken_messages_die_once_with_their_reason_and_valid_ones_are_delivered(
    worker: dramatiq.Worker,
    broker: Any,
    redis_server: Any,
    standin: SendGridStandIn,
    batch: list[Broken],
    seed: int,
) -> None:
    run_batch(worker, broker, redis_server, standin, batch, seed)


def _with_options(label: str, options: dict[str, Any], payload: Any) -> Broken:
    return Broken(
        label,
        lambda redis_id: as_json(
            envelope(
                redis_id,
                actor="send_contract",
                args=[payload],
                changes={"options": {"redis_message_id": redis_id, **options}},
            )
        ),
        BAD_ENVELOPE,
    )


HAZARDS = [
    _with_options("throws text", {"throws": "x"}, "x"),
    _with_options("throws list", {"throws": ["x"]}, "x"),
    _with_options("on_failure unknown", {"on_failure": "no_such_actor"}, "x"),
    _with_options("on_failure real", {"on_failure": "send_contract"}, "x"),
    _with_options("retries text", {"retries": "x"}, "x"),
    _with_options("attempts text", {"attempts": "x"}, "x"),
    _with_options("time_limit text", {"time_limit": "x"}, "x"),
    _with_options("max_age text", {"max_age": "x"}, "x"),
    _with_options("eta text", {"eta": "x"}, "x"),
    _with_options("pipe_target", {"pipe_target": {"a": 1}}, "x"),
    # Held in memory against the prefetch: a few stopped the queue for a year.
    _with_options("eta a year ahead", {"eta": int(time.time() * 1000) + 365 * 86_400_000}, "x"),
    Broken(
        "message_timestamp text",
        lambda redis_id: as_json(
            envelope(redis_id, actor="send_contract", args=["x"], changes={"message_timestamp": "now"})
        ),
        BAD_ENVELOPE,
    ),
    Broken(
        "actor name with a lone surrogate",
        lambda redis_id: as_json(envelope(redis_id, actor="send_\ud800contract", args=[contract_payload()])),
        BAD_ENVELOPE,
    ),
    Broken(
        "kwargs key with a lone surrogate",
        lambda redis_id: as_json(
            envelope(
                redis_id, actor="send_contract", args=[contract_payload()], changes={"kwargs": {"\ud800": 1}}
            )
        ),
        BAD_ENVELOPE,
    ),
    Broken(
        "actor name of 300 characters",
        lambda redis_id: as_json(envelope(redis_id, actor="x" * 300, args=[contract_payload()])),
        frozenset({"ActorNotFound"}),
    ),
    Broken(
        "actor name with NUL",
        lambda redis_id: as_json(envelope(redis_id, actor="send\x00contract", args=[contract_payload()])),
        frozenset({"ActorNotFound"}),
    ),
    Broken(
        "kwargs key with NUL",
        lambda redis_id: as_json(
            envelope(
                redis_id, actor="send_contract", args=[contract_payload()], changes={"kwargs": {"\x00": 1}}
            )
        ),
        frozenset({"TypeError", "MalformedMessage"}),
    ),
    Broken(
        "payload with NUL everywhere",
        lambda redis_id: as_json(
            envelope(redis_id, actor="send_contract", args=[{"contract_id": "c-\x00", "\x00": "\x00"}])
        ),
        frozenset({"InvalidPayload"}),
    ),
    Broken(
        "message_id with NUL",
        lambda redis_id: as_json(
            envelope(redis_id, actor="send_contract", args=["x"], changes={"message_id": "m\x00id"})
        ),
        BAD_ENVELOPE,
    ),
    Broken(
        "message_id of 100 characters",
        lambda redis_id: as_json(
            envelope(redis_id, actor="send_contract", args=["x"], changes={"message_id": "m" * 100})
        ),
        BAD_ENVELOPE,
    ),
]


def test_known_hazards_die_once_and_leave_the_worker_whole(
    worker: dramatiq.Worker, broker: Any, redis_server: Any, standin: SendGridStandIn
) -> None:
    """Each of these once killed a worker thread (losing the message) or its dead letter on PostgreSQL."""
    run_batch(worker, broker, redis_server, standin, HAZARDS, seed=6)
