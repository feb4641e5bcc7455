"""Query plans: the producer's check reads an address's contracts by the address, a
contract's pending emails are read by the contract, and the email counts of ``status``
and the metrics read only their window's emails, so each costs the same behind a
backlog or a history of any size (contracts queued, emails pending during a provider
outage, emails sent over the months).

Planned without statistics on the columns, as SQLite always plans here (it gathers
none) and PostgreSQL plans a table until it is first analyzed: with one index per
column, SQLite read every queued contract or pending email through the index on
``status``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import insert, text

from models.cancelling import record_cancellation
from models.contract import Contract, ContractStatus
from models.delivery import DeliveryStatus, EmailDelivery, EmailKind, pending_delivery_ids
from models.messages import CancelContract, SendContract, parse_message
from models.sending import SendChecks, check_send_contract
from models.types import utc_now
from models.upsert import table_of
from tests.conftest import database_of_its_own
from tests.support import Sent, contract_payload, recorded_statements
from workers.database import autocommit_session, get_engine, session_scope
from workers.ops.snapshot import WINDOWS, database_figures

#: Contracts queued to other addresses, and emails pending for other contracts.
BACKLOG = 2000

#: What marks the statements that look for an address's queued contracts.
QUEUED_FILTER = "contracts.status ="

#: What marks the statements that look for a contract's pending emails.
PENDING_FILTERS = ("email_deliveries.contract_id", "email_deliveries.status =")

#: What marks the statements that count the emails sent in a window.
SENT_SINCE_FILTER = "email_deliveries.sent_at >="


def _backlog(count: int) -> list[dict[str, Any]]:
    now = utc_now()
    return [
        {
            "id": f"backlog-{number}",
            "status": ContractStatus.QUEUED.value,
            "content_hash": f"{number:064x}",
            "workspace_id": "ws-main",
            "email": f"backlog-{number}@example.com",
            "company_name": f"Backlog {number}",
            "lead_source": "network",
            "locale": "fr",
            "sections": [],
            "signatories": [],
            "created_at": now,
            "updated_at": now,
        }
        for number in range(count)
    ]


def _pending_emails(count: int) -> list[dict[str, Any]]:
    """A pending invitation for each contract of ``_backlog(count)``."""
    now = utc_now()
    return [
        {
            "kind": EmailKind.INVITATION.value,
            "contract_id": f"backlog-{number}",
            "recipient": f"backlog-{number}@example.com",
            "step": 0,
            "locale": "fr",
            "includes_access_code": False,
            "status": DeliveryStatus.PENDING.value,
            "attempts": 0,
            "created_at": now,
            "updated_at": now,
        }
        for number in range(count)
    ]


def _queue_backlog(connection: Any) -> None:
    connection.execute(insert(table_of(Contract)), _backlog(BACKLOG))
    connection.execute(insert(table_of(EmailDelivery)), _pending_emails(BACKLOG))


def _count_pages(engine: Any) -> None:
    """On PostgreSQL, the tables' sizes without statistics on their columns (``VACUUM``
    without ``ANALYZE``; the table's own autovacuum is off). SQLite keeps neither."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT").execute(
                text("VACUUM contracts, email_deliveries")
            )


@contextmanager
def _backlogged(tmp_path: Any) -> Iterator[Any]:
    """A database of the test's own holding the backlog, planned without statistics."""
    with database_of_its_own(os.environ["DATABASE_URL"], tmp_path / "plans.db") as url:
        engine = get_engine(url)
        with engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                # No statistics, however long the test takes: the case to plan for.
                for table in ("contracts", "email_deliveries"):
                    connection.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))
            _queue_backlog(connection)
        _count_pages(engine)
        yield engine


def _scans(engine: Any, table: str, statement: str, parameters: Any) -> list[str]:
    """How the plan of ``statement`` reads ``table``: one condition per read ("SCAN" for
    a read of the whole table)."""
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            rows = connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
            return [
                "SCAN" if detail.startswith("SCAN") else detail.partition(" USING ")[2]
                for *_ids, detail in rows
                if detail.split(" ")[:2] in (["SCAN", table], ["SEARCH", table])
            ]
        (plan,) = connection.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters).one()
    scans: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        if node.get("Relation Name") == table:
            condition = node.get("Index Cond") or node.get("Recheck Cond")
            scans.append("SCAN" if node["Node Type"] == "Seq Scan" else str(condition))
        for child in node.get("Plans", ()):
            walk(child)

    walk((plan if isinstance(plan, list) else json.loads(plan))[0]["Plan"])
    return scans


def _plans_in_every_index_order(
    engine: Any, model: Any, looking: list[Sent]
) -> Iterator[tuple[str, str, list[str]]]:
    """Each statement's reads of ``model``'s table, planned with each of its indexes made the
    newest in turn: (index made newest, statement, reads).

    Without statistics, two indexes with one equality each cost the same, and which
    one a planner takes then depends on things such as their order, which varied from
    one database to the next: an order that happened to favour the right index would
    hide the wrong plan.
    """
    table = table_of(model)
    for newest in sorted(table.indexes, key=lambda index: str(index.name)):
        with engine.begin() as connection:
            newest.drop(connection)
            newest.create(connection)
        _count_pages(engine)
        for statement, parameters in looking:
            yield str(newest.name), statement, _scans(engine, table.name, statement, parameters)


@pytest.mark.usefixtures("database")  # it sets DATABASE_URL: SQLite, then PostgreSQL
def test_the_producers_check_reads_an_addresses_queued_contracts_by_the_address(tmp_path):
    with _backlogged(tmp_path) as engine:
        message = parse_message(SendContract, contract_payload())
        with recorded_statements(engine) as seen:
            with autocommit_session() as session:
                assert check_send_contract(session, message) is None
            with session_scope() as session:
                assert SendChecks(session, [message]).check(message) is None
        looking = [sent for sent in seen if QUEUED_FILTER in sent.statement]
        # send_contract's one statement, and send_contracts' query of the batch's addresses.
        assert len(looking) == 2, looking
        for newest, statement, scans in _plans_in_every_index_order(engine, Contract, looking):
            assert scans and "SCAN" not in scans, (newest, scans, statement)
            # By the address (or, for the contract itself, by its id), never by status alone.
            by_key = all("email" in scan or "(id=" in scan or "(id)" in scan for scan in scans)
            assert by_key and any("email" in scan for scan in scans), (newest, scans, statement)


@pytest.mark.usefixtures("database")
def test_a_contracts_pending_emails_are_read_by_the_contract(tmp_path):
    with _backlogged(tmp_path) as engine:
        contract_id = "c-plans"
        with engine.begin() as connection:
            row = _backlog(1)[0] | {"id": contract_id, "email": "plans@example.com"}
            connection.execute(insert(table_of(Contract)), [row])
        with recorded_statements(engine) as seen, session_scope() as session:
            # What every signed event, resend and redelivered send asks...
            assert pending_delivery_ids(session, contract_id, EmailKind.INVITATION) == []
            # ...and a cancellation.
            cancel = parse_message(CancelContract, {"contract_id": contract_id})
            assert record_cancellation(session, cancel, now=utc_now()) == []
        looking = [sent for sent in seen if all(marker in sent.statement for marker in PENDING_FILTERS)]
        assert len(looking) == 2, looking
        for newest, statement, scans in _plans_in_every_index_order(engine, EmailDelivery, looking):
            assert scans and all("contract_id" in scan for scan in scans), (newest, scans, statement)


@pytest.mark.usefixtures("database")
def test_the_email_counts_of_status_and_metrics_read_only_their_windows_emails(tmp_path):
    """``status`` and every scrape of the metrics count the emails sent in the last hour and
    day: through (status, sent_at), not every email ever sent."""
    with _backlogged(tmp_path) as engine:
        with recorded_statements(engine) as seen, session_scope() as session:
            assert database_figures(session, now=utc_now())["emails"]["last_day"] == {}
        looking = [sent for sent in seen if SENT_SINCE_FILTER in sent.statement]
        assert len(looking) == len(WINDOWS), looking
        for newest, statement, scans in _plans_in_every_index_order(engine, EmailDelivery, looking):
            assert scans and all("sent_at" in scan for scan in scans), (newest, scans, statement)
