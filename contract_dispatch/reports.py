"""Reports from Python: contracts by lead source over a period (see ``models.reporting``)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from sqlalchemy.exc import OperationalError

from models.reporting import LeadSourceReport, Measure, Period, ReportedContract
from models.reporting import lead_source_report as _lead_source_report
from models.reporting import reported_contracts as _reported_contracts
from workers.database import raising_unavailable, require_database, session_scope, unavailable


@raising_unavailable
def lead_source_report(
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    workspace_id: str | None = None,
    lead_source: str | None = None,
) -> LeadSourceReport:
    """Contracts sent from ``since`` to ``until`` (excluded) by lead source and status now,
    and those signed in that period; both ends timezone-aware, None for open.

    Raises ``UnknownWorkspace`` for a workspace never registered, ``InvalidLeadSource``
    for a lead source that is none of bap, network and other, ``DatabaseMissing``
    when DATABASE_URL names a SQLite file that does not exist, pydantic's
    ``ValidationError`` for a naive time or ``since`` not before ``until``.
    """
    require_database()
    with session_scope() as session:
        return _lead_source_report(
            session,
            period=Period(since=since, until=until),
            workspace_id=workspace_id,
            lead_source=lead_source,
        )


def reported_contracts(
    *,
    measure: Measure = "sent",
    since: datetime | None = None,
    until: datetime | None = None,
    workspace_id: str | None = None,
    lead_source: str | None = None,
) -> Iterator[ReportedContract]:
    """The contracts sent (``measure="sent"``) or signed in the period, oldest first, streamed.

    The checks (as ``lead_source_report``'s) raise at the first item;
    the database's transaction stays open while the iterator is consumed.
    """
    try:
        require_database()
        with session_scope() as session:
            yield from _reported_contracts(
                session,
                measure=measure,
                period=Period(since=since, until=until),
                workspace_id=workspace_id,
                lead_source=lead_source,
            )
    except OperationalError as error:
        raise unavailable(error) from None
