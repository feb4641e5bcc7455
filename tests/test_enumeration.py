"""Enumeration and cross-tenant safety (issue 6, item 3; DESIGN §1.4 and §5).

- A binding refusal never shows the company an address is bound to, on any path:
  the producer API, the CLI, the actor (the contract's status, ``contract-status
  --json``, the dead letter in SQL, the worker's log). The case-or-spacing hint
  may quote only the sender's own name.
- The producer-side check does the same work whether or not the address is
  known: the same SQL statements (counted with an engine event listener), and,
  loosely, the same time.
"""

from __future__ import annotations

import gc
import json
import logging
import random
import statistics
import time
from collections.abc import Callable

import pytest
from sqlmodel import select

import actors
from contract_dispatch import send_contract
from models.binding import bind_account
from models.dead_letter import DeadLetter
from models.errors import EmailBoundToOtherCompany
from models.messages import SendContract, parse_message
from models.sending import check_send_contract
from tests.support import (
    contract_payload,
    recorded_statements,
    send_args,
    unique,
    wait_for_contract,
    wait_until,
)
from workers.cli import main as cli_main
from workers.database import session_scope

CASE_OR_SPACING = "differ only by letter case or spacing"

#: Interleaved timed calls per path; the medians must agree within TIMING_FACTOR.
TIMING_ROUNDS = 150

#: Generous: the paths run the same statements, so their medians are close, but a
#: loaded two-core machine adds noise to any one measurement.
TIMING_FACTOR = 2.0


def bind(company: str) -> str:
    """A new address bound to ``company`` (as its first contract would)."""
    email = f"{unique('bound')}@example.com"
    with session_scope() as session:
        bind_account(session, email=email, company_name=company)
    return email


# -- no refusal shows the bound name -----------------------------------------------


@pytest.mark.parametrize(
    ("requested", "hint"),
    [
        (lambda bound: f"Beta Industries {unique('co')}", False),
        (lambda bound: bound.upper(), True),
        (lambda bound: bound.replace(" ", "  ", 1), True),
        (lambda bound: bound.replace(" ", "", 1), True),
    ],
    ids=["another-company", "letter-case", "extra-space", "missing-space"],
)
def test_no_refusal_shows_the_bound_name(
    worker, standin, capsys, caplog, requested: Callable[[str], str], hint: bool
):
    bound = f"Alpha Conseil {unique('co')}"
    email = bind(bound)
    payload = contract_payload(email=email, company_name=requested(bound))
    sender_name = parse_message(SendContract, payload).company_name
    assert sender_name != bound

    def check(text: str) -> None:
        assert bound not in text, "a refusal showed the bound name"
        # The hint is given exactly when the names differ only by case or spacing.
        assert (CASE_OR_SPACING in text) == hint

    # The producer API.
    with pytest.raises(EmailBoundToOtherCompany) as caught:
        send_contract(**payload)
    check(caught.value.message)

    # The CLI.
    capsys.readouterr()
    assert cli_main(send_args(payload)) == 2
    out, err = capsys.readouterr()
    assert err.startswith("email_bound_to_other_company: ")
    check(out + err)

    # The actor, bypassing the producer: status, status JSON, dead letter, log.
    caplog.set_level(logging.DEBUG)
    actors.send_contract.send(payload)
    report = wait_for_contract(payload["contract_id"], lambda r: r.status == "rejected", what="the rejection")
    assert report.error is not None and report.error.code == "email_bound_to_other_company"
    check(report.error.message)
    assert cli_main(["contract-status", payload["contract_id"], "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["error"]["code"] == "email_bound_to_other_company"
    check(out + err)

    def dead_letter() -> DeadLetter | None:
        with session_scope() as session:
            row = session.exec(
                select(DeadLetter).where(DeadLetter.contract_id == payload["contract_id"])
            ).first()
            if row is not None:
                session.expunge(row)
            return row

    letter = wait_until(dead_letter, what="the refused message's dead letter")
    assert letter is not None
    check(letter.exception_message)
    assert bound not in json.dumps(letter.model_dump(mode="json"), ensure_ascii=False)
    assert payload["contract_id"] in caplog.text, "the worker's log lines were captured"
    assert bound not in caplog.text, "the worker logged the bound name"


# -- the same work, known address or not --------------------------------------------


def check_paths(company: str) -> dict[str, SendContract]:
    """One message per path of the producer-side check, all in the same workspace."""
    known = bind(company)
    return {
        "unknown address": parse_message(SendContract, contract_payload(company_name=company)),
        "known, same name": parse_message(SendContract, contract_payload(email=known, company_name=company)),
        "known, other name": parse_message(
            SendContract, contract_payload(email=known, company_name="Other SA")
        ),
        "known, other case": parse_message(
            SendContract, contract_payload(email=known, company_name=company.upper())
        ),
    }


def run_check(message: SendContract) -> str:
    with session_scope() as session:
        try:
            check_send_contract(session, message)
        except EmailBoundToOtherCompany:
            return "refused"
    return "accepted"


def test_the_check_does_the_same_work_for_known_and_unknown_addresses(database, monkeypatch):
    import models.binding

    comparisons: list[str] = []
    loosely = models.binding._loosely

    def counted(name: str) -> str:
        comparisons.append(name)
        return loosely(name)

    monkeypatch.setattr(models.binding, "_loosely", counted)
    paths = check_paths(f"Alpha Conseil {unique('co')}")
    statements: dict[str, list[str]] = {}
    outcomes: dict[str, str] = {}
    steps: dict[str, int] = {}
    for name, message in paths.items():
        run_check(message)  # warm: the first use of a statement may differ (caches)
        comparisons.clear()
        with recorded_statements() as seen:
            outcomes[name] = run_check(message)
        statements[name] = [sent.statement for sent in seen]
        steps[name] = len(comparisons)
    # The name comparisons run for an unknown address too: no early return.
    assert steps == dict.fromkeys(paths, 2), steps
    assert outcomes == {
        "unknown address": "accepted",
        "known, same name": "accepted",
        "known, other name": "refused",
        "known, other case": "refused",
    }
    reference = statements["unknown address"]
    assert any("accounts" in statement for statement in reference), "the check looks the address up"
    for name, run in statements.items():
        assert run == reference, f"{name!r} runs other statements than an unknown address"


def test_sending_to_a_known_or_an_unknown_address_runs_the_same_statements(database, monkeypatch):
    # Nothing to enqueue for this comparison: the broker is not what is measured.
    import contract_dispatch.producer as producer

    monkeypatch.setattr(producer, "_enqueue", lambda message: None)
    company = f"Alpha Conseil {unique('co')}"
    known = bind(company)
    send_contract(**contract_payload(company_name=company))  # warm
    statements = {}
    for name, email in [("unknown", f"{unique('new')}@example.com"), ("known", known)]:
        with recorded_statements() as seen:
            assert send_contract(**contract_payload(email=email, company_name=company)).status == "queued"
        statements[name] = [sent.statement for sent in seen]
    assert statements["known"] == statements["unknown"]


def test_the_check_takes_the_same_time_for_known_and_unknown_addresses(database):
    paths = check_paths(f"Alpha Conseil {unique('co')}")
    timings: dict[str, list[float]] = {name: [] for name in paths}
    for message in paths.values():
        run_check(message)
    order = list(paths.items())
    seed = random.randrange(2**32)
    shuffler = random.Random(seed)
    # The collector's pauses come every so many allocations, not with a path.
    gc.collect()
    gc.disable()
    try:
        for _ in range(TIMING_ROUNDS):
            # Interleaved: a slow spell of the machine hits every path alike. In a new
            # order each round: the pool hands out its connections in turn (FIFO), so
            # in a fixed order each path kept the same one, and one slow connection
            # made two paths of four read twice as slow as the other two.
            shuffler.shuffle(order)
            for name, message in order:
                started = time.perf_counter()
                run_check(message)
                timings[name].append(time.perf_counter() - started)
    finally:
        gc.enable()
    medians = {name: statistics.median(values) for name, values in timings.items()}
    fastest, slowest = min(medians.values()), max(medians.values())
    assert slowest <= fastest * TIMING_FACTOR, (
        {name: f"{m * 1000:.2f} ms" for name, m in medians.items()},
        f"order seed {seed}",
    )
