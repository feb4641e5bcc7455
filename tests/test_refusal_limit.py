"""Per-workspace refusal limit (issue 6, item 3): enumeration by trial and error is bounded.

Each test turns the limit on (the session runs with it off) in a workspace of
its own, through the producer API and the CLI, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from contract_dispatch import contract_status, send_contract, set_workspace
from models.binding import bind_account
from models.errors import (
    EmailBoundToOtherCompany,
    RefusalsRateLimited,
    Rejected,
    UnknownResourceGroup,
)
from tests.support import RedisServer, contract_payload, send_args, unique, wait_until
from workers.cli import main as cli_main
from workers.database import session_scope
from workers.refusal_limit import KEY_FORMAT
from workers.settings import get_settings, reset_settings

LIMIT = 3

BOUND = EmailBoundToOtherCompany


@pytest.fixture
def limit(database: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Turn the refusal limit on: ``limit(count, window_seconds=60)``."""

    def turn_on(count: int, *, window_seconds: int = 60) -> None:
        monkeypatch.setenv("REFUSAL_RATE_LIMIT", str(count))
        monkeypatch.setenv("REFUSAL_RATE_WINDOW_SECONDS", str(window_seconds))
        reset_settings()

    yield turn_on
    monkeypatch.undo()
    reset_settings()


@pytest.fixture
def workspace() -> str:
    """A workspace of the test's own, with one resource group."""
    name = unique("ws-limit")
    set_workspace(name, ["rg-1"])
    return name


def bound_address(company: str) -> str:
    """A new address bound to ``company`` (as a first contract would)."""
    email = f"{unique('bound')}@example.com"
    with session_scope() as session:
        bind_account(session, email=email, company_name=company)
    return email


def attempt(workspace: str, **overrides: Any) -> dict[str, Any]:
    return contract_payload(workspace_id=workspace, **overrides)


def refusal_of(payload: dict[str, Any]) -> Rejected:
    with pytest.raises(Rejected) as caught:
        send_contract(**payload)
    return caught.value


def without_figures(message: str) -> str:
    return re.sub(r"\d+", "N", message)


def test_past_the_limit_nothing_is_checked(limit, workspace, capsys):
    limit(LIMIT)
    secret = f"Alpha Holding {unique('co')}"
    email = bound_address(secret)

    # Refusals of every kind count: the binding, and a resource group.
    assert isinstance(
        refusal_of(attempt(workspace, email=email, company_name="Beta")), EmailBoundToOtherCompany
    )
    assert isinstance(refusal_of(attempt(workspace, resource_group_id="nowhere")), UnknownResourceGroup)
    assert isinstance(
        refusal_of(attempt(workspace, email=email, company_name="Gamma")), EmailBoundToOtherCompany
    )

    # The limit is reached: every send of the workspace gets the limit error,
    # whether it would be refused (a known address) or accepted (a new one).
    known = attempt(workspace, email=email, company_name="Delta")
    unknown = attempt(workspace)
    same_company = attempt(workspace, email=email, company_name=secret)
    answers = [refusal_of(payload) for payload in (known, unknown, same_company)]
    for answer, payload in zip(answers, (known, unknown, same_company), strict=True):
        assert isinstance(answer, RefusalsRateLimited), answer
        assert answer.code == "refusals_rate_limited"
        assert 1 <= answer.retry_after_seconds <= 60
        assert f"try again in {answer.retry_after_seconds} seconds" in answer.message
        # It tells nothing about the address, the names or the contract.
        for value in (
            payload["email"],
            email,
            secret,
            "Alpha",
            payload["company_name"],
            payload["contract_id"],
        ):
            assert value not in answer.message
        assert contract_status(payload["contract_id"]) is None, "nothing is recorded past the limit"
    assert len({without_figures(a.message) for a in answers}) == 1, "the same answer, whatever the address"

    # The CLI: exit 2, the code and when to try again on stderr.
    capsys.readouterr()
    assert cli_main(send_args(known)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("refusals_rate_limited: ")
    assert "try again in " in err
    assert secret not in err and email not in err


def test_another_workspace_is_unaffected(limit, workspace, standin, worker):
    limit(LIMIT)
    email = bound_address(f"Alpha {unique('co')}")
    for _ in range(LIMIT):
        refusal_of(attempt(workspace, email=email, company_name="Beta"))
    assert isinstance(refusal_of(attempt(workspace, email=email, company_name="Beta")), RefusalsRateLimited)

    other = unique("ws-other")
    set_workspace(other, ["rg-1"])
    refusal = refusal_of(attempt(other, email=email, company_name="Beta"))
    assert isinstance(refusal, EmailBoundToOtherCompany), "another workspace's refusals are its own"
    accepted = attempt(other)
    assert send_contract(**accepted).status == "queued"


def test_the_limit_resets_when_its_window_ends(limit, workspace, redis_server: RedisServer):
    limit(LIMIT, window_seconds=1)
    email = bound_address(f"Alpha {unique('co')}")
    for _ in range(LIMIT):
        assert isinstance(
            refusal_of(attempt(workspace, email=email, company_name="Beta")), EmailBoundToOtherCompany
        )
    limited = refusal_of(attempt(workspace, email=email, company_name="Beta"))
    assert isinstance(limited, RefusalsRateLimited)
    assert limited.retry_after_seconds == 1

    # The count lives in the service's namespace and expires with the window.
    key = KEY_FORMAT.format(namespace=get_settings().redis_namespace, workspace_id=workspace)
    client = redis_server.client()
    try:
        assert int(client.get(key) or 0) == LIMIT
        assert 0 < int(client.pttl(key)) <= 1000
    finally:
        client.close()

    answers: list[Rejected] = []

    def answered_again() -> bool:
        answers.append(refusal_of(attempt(workspace, email=email, company_name="Beta")))
        return isinstance(answers[-1], EmailBoundToOtherCompany)

    # Probing while limited does not extend the window (it is not a refusal).
    wait_until(answered_again, timeout=5, what="the window to end")
    assert all(isinstance(a, RefusalsRateLimited) for a in answers[:-1])


def test_racing_producers_get_no_more_than_the_limit(limit, workspace):
    limit(LIMIT)
    email = bound_address(f"Alpha {unique('co')}")
    payloads = [attempt(workspace, email=email, company_name=f"Beta {n}") for n in range(12)]
    answers: list[Rejected] = []
    start = threading.Barrier(len(payloads))

    def send(payload: dict[str, Any]) -> None:
        start.wait(timeout=10)
        answers.append(refusal_of(payload))

    threads = [threading.Thread(target=send, args=(payload,)) for payload in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    codes = sorted(answer.code for answer in answers)
    assert len(codes) == len(payloads)
    assert codes.count("email_bound_to_other_company") == LIMIT, codes
    assert codes.count("refusals_rate_limited") == len(payloads) - LIMIT, codes


def test_zero_turns_the_limit_off(limit, workspace, redis_server: RedisServer):
    limit(0)
    email = bound_address(f"Alpha {unique('co')}")
    for _ in range(LIMIT * 3):
        assert isinstance(
            refusal_of(attempt(workspace, email=email, company_name="Beta")), EmailBoundToOtherCompany
        )
    client = redis_server.client()
    try:
        key = KEY_FORMAT.format(namespace=get_settings().redis_namespace, workspace_id=workspace)
        assert client.exists(key) == 0, "nothing is counted when the limit is off"
    finally:
        client.close()


def test_the_batch_api_has_the_same_limit(limit, workspace):
    from contract_dispatch import send_contracts

    limit(LIMIT)
    email = bound_address(f"Alpha {unique('co')}")
    answers = send_contracts(
        [attempt(workspace, email=email, company_name=f"Beta {n}") for n in range(LIMIT + 2)]
    )
    codes = [getattr(answer, "code", None) for answer in answers]
    assert codes == ["email_bound_to_other_company"] * LIMIT + ["refusals_rate_limited"] * 2
