"""Running reminder sweeps and the housekeeping jobs the scheduler asks for."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import update

from models.access_codes import AccessCodePolicy, access_code_fields_many
from models.account import Account
from models.code_refusal import purge_refusals
from models.delivery import touch_deliveries
from models.reminders import (
    ReminderPolicy,
    ReminderSweep,
    SweepResult,
    accounts_to_renew,
    stale_pending_deliveries,
    sweep_due_reminders,
)
from models.types import utc_now
from models.upsert import affected_rows, table_of
from workers.database import session_scope
from workers.ops.metrics import count_reminders, count_sweep
from workers.settings import Settings, get_settings

logger = logging.getLogger(__name__)

#: A pending email untouched for this long beyond the longest retry delay lost its
#: message (a broker that lost data, a crash between commit and enqueue), in seconds.
STALE_MARGIN_SECONDS = 600

#: Stale emails re-driven per sweep.
STALE_BATCH = 1000


@dataclass
class SweepReport:
    """What ``reminders run`` prints."""

    as_of: str
    claimed: int
    postponed: int
    lost_races: int
    codes_renewed: int
    redriven: int
    batches: int
    duration_ms: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _enqueue(delivery_ids: list[int]) -> None:
    if not delivery_ids:
        return
    from actors.deliver_email import enqueue_deliveries

    enqueue_deliveries(delivery_ids)


def _record_totals(row: ReminderSweep, total: SweepResult) -> None:
    row.claimed = len(total.claimed)
    row.postponed = total.postponed
    row.lost_races = total.lost_races
    row.codes_renewed = total.codes_renewed


def _renewed_codes(
    settings: Settings, *, as_of: datetime, policy: ReminderPolicy, codes: AccessCodePolicy
) -> dict[int, dict[str, object]]:
    """New codes for the accounts the next batch renews, hashed before its transaction.

    On all the hasher's threads at once (``ARGON2_MAX_CONCURRENT``); a batch of
    1,000 reminders can renew hundreds of codes.
    """
    if not policy.in_window(as_of):
        # Outside the window the batch only postpones.
        return {}
    with session_scope() as session:
        account_ids = accounts_to_renew(
            session,
            now=as_of,
            limit=settings.reminder_batch_size,
            max_failed_attempts=settings.access_code_max_attempts,
        )
    fields = access_code_fields_many(policy=codes, now=as_of, count=len(account_ids))
    return dict(zip(account_ids, fields, strict=True))


def run_sweep(*, as_of: datetime | None = None, settings: Settings | None = None) -> SweepReport:
    """Claim every due reminder as of ``as_of`` (now by default), in batches, and enqueue them.

    Each batch is committed before its emails are enqueued; a crash in between
    leaves pending emails that a later sweep re-drives once they are stale.
    """
    settings = settings or get_settings()
    started = utc_now()
    as_of = as_of or started
    policy = settings.reminder_policy()
    codes = settings.access_code_policy()
    total = SweepResult()
    batches = 0
    with session_scope() as session:
        sweep = ReminderSweep(started_at=started, as_of=as_of)
        session.add(sweep)
        session.flush()
        sweep_id = sweep.id
    try:
        while True:
            renewals = _renewed_codes(settings, as_of=as_of, policy=policy, codes=codes)
            with session_scope() as session:
                batch = sweep_due_reminders(
                    session,
                    now=as_of,
                    policy=policy,
                    codes=codes,
                    limit=settings.reminder_batch_size,
                    max_failed_attempts=settings.access_code_max_attempts,
                    renewals=renewals,
                )
            batches += 1
            # Counted once committed: a failing enqueue below still leaves them claimed
            # (pending, re-driven by a later sweep), and the sweep's row says so.
            total.claimed += batch.claimed
            total.postponed += batch.postponed
            total.lost_races += batch.lost_races
            total.codes_renewed += batch.codes_renewed
            count_reminders("postponed", batch.postponed)
            _enqueue(batch.claimed)
            count_reminders("enqueued", len(batch.claimed))
            if len(batch.claimed) + batch.postponed + batch.lost_races < settings.reminder_batch_size:
                break
        redriven = redrive_stale_deliveries(settings=settings)
    except Exception as exc:
        count_sweep("failed")
        with session_scope() as session:
            failed = session.get(ReminderSweep, sweep_id)
            if failed is not None:
                _record_totals(failed, total)
                failed.error = f"{type(exc).__name__}: {exc}"[:1000]
                failed.finished_at = utc_now()
        raise
    finished = utc_now()
    with session_scope() as session:
        done = session.get(ReminderSweep, sweep_id)
        if done is not None:
            _record_totals(done, total)
            done.redriven = redriven
            done.finished_at = finished
    count_sweep("done")
    report = SweepReport(
        as_of=as_of.isoformat(),
        claimed=len(total.claimed),
        postponed=total.postponed,
        lost_races=total.lost_races,
        codes_renewed=total.codes_renewed,
        redriven=redriven,
        batches=batches,
        duration_ms=int((finished - started).total_seconds() * 1000),
    )
    logger.info("Reminder sweep as of %s: %s", report.as_of, report.as_dict())
    return report


def redrive_stale_deliveries(*, settings: Settings | None = None) -> int:
    """Enqueue again pending emails whose message was lost; the claim makes a duplicate harmless."""
    settings = settings or get_settings()
    now = utc_now()
    longest_wait = timedelta(milliseconds=settings.max_backoff_ms, seconds=STALE_MARGIN_SECONDS)
    with session_scope() as session:
        stale = stale_pending_deliveries(session, older_than=now - longest_wait, limit=STALE_BATCH)
        touch_deliveries(session, stale, now=now)
    if stale:
        logger.warning("Re-driving %d pending email(s) whose message was lost.", len(stale))
    _enqueue(stale)
    return len(stale)


def expire_access_codes(*, now: datetime | None = None) -> int:
    """Forget the hashes of expired temporary passwords (they can never be used again)."""
    now = now or utc_now()
    table = table_of(Account)
    with session_scope() as session:
        result = session.execute(
            update(table)
            .where(table.c.access_code_hash.is_not(None), table.c.access_code_expires_at <= now)
            .values(access_code_hash=None)
        )
        return affected_rows(result)


def purge_code_refusals(*, now: datetime | None = None) -> int:
    """Delete refusal counts over ``REFUSAL_RETENTION`` old (see ``models.code_refusal``)."""
    with session_scope() as session:
        return purge_refusals(session, now=now or utc_now())
