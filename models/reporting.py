"""Contracts by lead source over a period: what the marketplace bills on (rule 2).

Two measures per lead source, read in one statement so that they agree:

- the contracts *sent* in the period (accepted for sending: the time they were
  first recorded, ``created_at``), counted by their status now;
- the contracts *signed* in the period (``signed_at``), whenever they were sent.

A period is half-open, ``since <= t < until``, so that consecutive months never
count a contract twice; either end may be open.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, model_validator
from sqlalchemy import ColumnElement, literal, sql, union_all
from sqlmodel import Session, col, func, select

from models.contract import Contract, ContractStatus, LeadSource
from models.errors import InvalidLeadSource, UnknownWorkspace
from models.messages import is_valid_identifier
from models.workspace import Workspace

#: Which contracts a listing holds: sent in the period, or signed in it.
Measure = Literal["sent", "signed"]

#: Rows a listing fetches from the database at a time (streamed, never all held).
LISTING_BATCH_ROWS = 1000


class Period(BaseModel):
    """A half-open period, ``since <= t < until``; None leaves that end open."""

    #: Timezone-aware: the contracts' times are stored in UTC, a naive time is ambiguous.
    since: AwareDatetime | None = None
    until: AwareDatetime | None = None

    @model_validator(mode="after")
    def _since_before_until(self) -> Period:
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError("since must be before until")
        return self


class LeadSourceCounts(BaseModel):
    """One lead source's figures (``lead_source`` None: refused before it was read)."""

    lead_source: str | None
    #: Contracts sent in the period, whatever their status now.
    contracts: int = 0
    #: Those contracts by their status now: every status, zeros included.
    statuses: dict[str, int]
    #: Contracts signed in the period, whenever they were sent.
    signed_in_period: int = 0


class LeadSourceReport(BaseModel):
    """``lead-sources --json`` prints exactly this."""

    since: datetime | None
    until: datetime | None
    workspace_id: str | None
    #: Every lead source in ``LeadSource`` order, then None when some contract has none.
    lead_sources: list[LeadSourceCounts]
    total: LeadSourceCounts


class ReportedContract(BaseModel):
    """One contract of a listing (``lead-sources --contracts --json``: one per line)."""

    contract_id: str
    workspace_id: str
    resource_group_id: str | None
    lead_source: str | None
    status: str
    company_name: str
    sent_at: datetime
    signed_at: datetime | None


def _empty_counts(lead_source: str | None) -> LeadSourceCounts:
    return LeadSourceCounts(lead_source=lead_source, statuses=dict.fromkeys(ContractStatus, 0))


def _within(column: Any, period: Period) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = [column.is_not(None)]
    if period.since is not None:
        conditions.append(column >= period.since)
    if period.until is not None:
        conditions.append(column < period.until)
    return conditions


def _filters(
    session: Session, *, workspace_id: str | None, lead_source: str | None
) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if workspace_id is not None:
        # A mistyped id would report zeros, as if the workspace had sent nothing. One no
        # workspace can have is not looked up (PostgreSQL refuses a NUL as a parameter).
        if not is_valid_identifier(workspace_id) or session.get(Workspace, workspace_id) is None:
            raise UnknownWorkspace(f"workspace {workspace_id!r} is not registered")
        conditions.append(col(Contract.workspace_id) == workspace_id)
    if lead_source is not None:
        if lead_source not in set(LeadSource):
            raise InvalidLeadSource(f"{lead_source!r} is not a lead source ({', '.join(LeadSource)})")
        conditions.append(col(Contract.lead_source) == lead_source)
    return conditions


def lead_source_report(
    session: Session,
    *,
    period: Period,
    workspace_id: str | None = None,
    lead_source: str | None = None,
) -> LeadSourceReport:
    """Contracts sent in ``period`` by lead source and status now, and those signed in it."""
    filters = _filters(session, workspace_id=workspace_id, lead_source=lead_source)
    # Grouped by an expression, not the column: SQLite, which keeps no statistics,
    # would walk the index on lead_source and fetch every row by its key (a month
    # of 1,000,000 contracts: 0.84 s, against 0.29 s for the table scan it does now).
    grouped = func.coalesce(col(Contract.lead_source), "")
    sent = (
        select(literal("sent").label("measure"), grouped, col(Contract.status), func.count().label("n"))
        .where(*_within(col(Contract.created_at), period), *filters)
        .group_by(grouped, col(Contract.status))
    )
    signed = (
        select(
            literal("signed").label("measure"), grouped, literal("").label("status"), func.count().label("n")
        )
        .where(*_within(col(Contract.signed_at), period), *filters)
        .group_by(grouped)
    )
    wanted = [lead_source] if lead_source is not None else list(LeadSource)
    by_source: dict[str | None, LeadSourceCounts] = {
        str(source): _empty_counts(str(source)) for source in wanted
    }
    # One statement: on PostgreSQL two would read two moments (READ COMMITTED).
    for measure, source, status, count in session.execute(union_all(sent, signed)):
        key = source or None
        counts = by_source.setdefault(key, _empty_counts(key))
        if measure == "sent":
            counts.contracts += count
            counts.statuses[status] = counts.statuses.get(status, 0) + count
        else:
            counts.signed_in_period += count
    total = _empty_counts(None)
    for counts in by_source.values():
        total.contracts += counts.contracts
        total.signed_in_period += counts.signed_in_period
        for status, count in counts.statuses.items():
            total.statuses[status] = total.statuses.get(status, 0) + count
    return LeadSourceReport(
        since=period.since,
        until=period.until,
        workspace_id=workspace_id,
        lead_sources=list(by_source.values()),
        total=total,
    )


def reported_contracts(
    session: Session,
    *,
    measure: Measure,
    period: Period,
    workspace_id: str | None = None,
    lead_source: str | None = None,
) -> Iterator[ReportedContract]:
    """The contracts sent (or signed) in ``period``, in that order, streamed from the database."""
    moment = col(Contract.created_at) if measure == "sent" else col(Contract.signed_at)
    filters = _filters(session, workspace_id=workspace_id, lead_source=lead_source)
    query = (
        sql.select(
            col(Contract.id),
            col(Contract.workspace_id),
            col(Contract.resource_group_id),
            col(Contract.lead_source),
            col(Contract.status),
            col(Contract.company_name),
            col(Contract.created_at),
            col(Contract.signed_at),
        )
        .where(*_within(moment, period), *filters)
        .order_by(moment, col(Contract.id))
        .execution_options(yield_per=LISTING_BATCH_ROWS)
    )
    for row in session.execute(query):
        yield ReportedContract(
            contract_id=row[0],
            workspace_id=row[1],
            resource_group_id=row[2],
            lead_source=row[3] or None,
            status=row[4],
            company_name=row[5],
            sent_at=row[6],
            signed_at=row[7],
        )
