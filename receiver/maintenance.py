"""Housekeeping: a consistent copy of the SQLite file while the service runs, event retention, and
the worker's periodic jobs (PeriodicPrune, PeriodicSummaries).

Rule: a backup is one read transaction (SQLite's online backup API, one step), written beside the
destination, checked, and only then renamed into place: a destination never holds half a backup.
The commands: `python -m receiver backup --help` / `prune --help`; README.md ("Commands", "Settings").
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from peewee import SqliteDatabase

from . import summaries
from .db import db, utcnow, write_transaction
from .models import Event, Rejected

log = logging.getLogger(__name__)

BACKUP_PREFIX = "receiver-"
BACKUP_SUFFIX = ".db"
PRUNE_BATCH = 1000
PRUNE_INTERVAL = 3600.0         # seconds between the worker's prunes
PRUNE_BATCHES_PER_PASS = 10     # the worker's share of one pass: 10,000 rows, then back to its other work
PRUNE_RETRY = 60.0              # seconds before a prune that failed (the database busy or away) is tried again


class MaintenanceError(RuntimeError):
    """A maintenance command cannot do what was asked; str(error) says why and what to do instead."""


def sqlite_path() -> Path:
    """The file of the bound SQLite database, or MaintenanceError on PostgreSQL."""
    database = db.obj
    if not isinstance(database, SqliteDatabase):
        raise MaintenanceError(
            "backup works on the SQLite file only; DATABASE_URL is PostgreSQL: back it up with "
            "pg_dump (e.g. pg_dump --format=custom --file=receiver.dump \"$DATABASE_URL\") or your "
            "provider's snapshots")
    return Path(database.database)


def backup(dest: str | os.PathLike, *, keep: int = 0, now: dt.datetime | None = None) -> Path:
    """Copy the live SQLite database to `dest`; the path written.

    `dest` is a file name, or an existing directory where `receiver-<UTC time>.db` is created; there,
    `keep` > 0 removes all but the `keep` newest such backups afterwards.
    """
    source_path = sqlite_path()
    dest = Path(dest)
    into_directory = dest.is_dir()
    if into_directory:
        stamp = (now or utcnow()).strftime("%Y%m%dT%H%M%SZ")
        dest = dest / f"{BACKUP_PREFIX}{stamp}{BACKUP_SUFFIX}"
    if dest.resolve() == source_path.resolve():
        raise MaintenanceError(f"backup: {dest} is the live database itself")
    if not dest.parent.is_dir():
        raise MaintenanceError(f"backup: directory {dest.parent} does not exist")

    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    # The copy holds the tokens kept in the database: readable by its owner only.
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    try:
        timeout = max(float(getattr(db.obj, "_timeout", None) or 30.0), 1.0)
        source = sqlite3.connect(source_path, timeout=timeout)
        target = sqlite3.connect(partial)
        try:
            # pages=-1: one step, one read transaction, one consistent snapshot. (In small steps,
            # every write by another connection would restart the copy, and a busy service could
            # keep it from ever finishing.)
            source.backup(target, pages=-1)
            target.execute("PRAGMA journal_mode=DELETE")     # one self-contained file, no -wal
            problem = target.execute("PRAGMA quick_check").fetchone()[0]
            if problem != "ok":
                raise MaintenanceError(f"backup: the copy failed its check: {problem}")
        finally:
            target.close()
            source.close()
        os.replace(partial, dest)
    except BaseException:
        for leftover in (partial, Path(f"{partial}-journal")):
            if leftover.exists():
                leftover.unlink()
        raise
    if into_directory and keep > 0:
        prune_backups(dest.parent, keep)
    return dest


def prune_backups(directory: Path, keep: int) -> list[Path]:
    """Remove all but the `keep` newest receiver-*.db backups in `directory`; the removed paths."""
    backups = sorted(p for p in directory.glob(f"{BACKUP_PREFIX}*{BACKUP_SUFFIX}") if p.is_file())
    removed = backups[:-keep] if keep > 0 else []
    for path in removed:
        path.unlink()
    return removed


@dataclass(frozen=True)
class PruneResult:
    cutoff: dt.datetime
    events: int
    rejected: int
    dry_run: bool
    finished: bool = True       # False: max_batches ran out before the old rows did


def prune(days: int, *, batch_size: int = PRUNE_BATCH, dry_run: bool = False,
          now: dt.datetime | None = None, max_batches: int | None = None) -> PruneResult:
    """Delete events (and refused callbacks) received more than `days` days ago.

    Messages are never touched: a message's current status, chat id and result stay. The rows go
    in batches of `batch_size`, each its own short write transaction, so that callbacks keep being
    stored while a large backlog is pruned; `max_batches` bounds the batches of one call.

    Rows are appended as they come, so the table in id order is in received order: each batch reads
    the next `batch_size` rows by primary key and deletes those past the retention, and the walk
    stops at the first row that is not. So event needs no index on received_at (it would be one more
    write on every callback), and a prune with nothing to do reads one batch, not the table.
    A row received out of order behind a younger one (clocks of several web hosts a little apart)
    goes in a later prune.
    """
    if days < 1:
        raise MaintenanceError("prune: the retention must be at least 1 day (EVENT_RETENTION_DAYS or --days)")
    if batch_size < 1:
        raise MaintenanceError("prune: the batch size must be at least 1")
    cutoff = (now or utcnow()) - dt.timedelta(days=days)
    counts, finished = {}, True
    for model in (Event, Rejected):
        if dry_run:
            counts[model] = model.select().where(model.received_at < cutoff).count()
            continue
        counts[model], done = _delete_before(model, cutoff, batch_size, max_batches)
        finished = finished and done
    return PruneResult(cutoff=cutoff, events=counts[Event], rejected=counts[Rejected], dry_run=dry_run,
                       finished=finished)


def _delete_before(model, cutoff: dt.datetime, batch_size: int, max_batches: int | None) -> tuple[int, bool]:
    """(rows deleted, whether the walk reached the rows to keep)."""
    deleted, batches, after = 0, 0, 0
    while max_batches is None or batches < max_batches:
        rows = list(model.select(model.id, model.received_at).where(model.id > after)
                    .order_by(model.id).limit(batch_size).tuples())
        old = [row_id for row_id, received_at in rows if received_at < cutoff]
        if old:
            # Read outside, delete inside: on SQLite a transaction that reads before it writes
            # cannot wait for the write lock, and a callback may hold it.
            with write_transaction():
                deleted += model.delete().where(model.id.in_(old)).execute()
        batches += 1
        if len(old) < batch_size:
            return deleted, True
        after = rows[-1][0]
    return deleted, False


class PeriodicPrune:
    """Event retention, run from the worker's loop: a prune every `interval` seconds, in passes of a
    few batches so that the worker's other work is never held up for long; a pass that leaves old
    rows behind (the first prune of a large table) is followed by the next one on the next turn of
    the loop. EVENT_RETENTION_DAYS=0 turns it off."""

    def __init__(self, days: int, *, interval: float = PRUNE_INTERVAL,
                 batches_per_pass: int = PRUNE_BATCHES_PER_PASS, clock=time.monotonic):
        self.days = days
        self.interval = interval
        self.batches_per_pass = batches_per_pass
        self.clock = clock
        self.next_at = clock()          # the first prune comes at start

    @property
    def due(self) -> bool:
        return self.days >= 1 and self.clock() >= self.next_at

    def run_if_due(self) -> PruneResult | None:
        """Prune one pass if it is time; what it did, or None."""
        if not self.due:
            return None
        self.next_at = self.clock() + PRUNE_RETRY      # stays if the prune raises
        result = prune(self.days, max_batches=self.batches_per_pass)
        self.next_at = self.clock() + (self.interval if result.finished else 0.0)
        if result.events or result.rejected:
            log.info("pruned %d events and %d refused callbacks received before %s UTC (EVENT_RETENTION_DAYS=%d)",
                     result.events, result.rejected, f"{result.cutoff:%Y-%m-%d %H:%M:%S}", self.days)
        return result


SUMMARY_INTERVAL = 30.0         # seconds between the starts of two rounds of stored summaries
SUMMARY_UNITS_PER_PASS = 5      # mailings counted per turn of the worker's loop


class PeriodicSummaries:
    """The stored summaries (receiver/summaries.py), kept by the worker's loop: a round every
    `interval` seconds, counted a few mailings per turn so that the worker's other work is never held
    up for long. The readers' lag is at most about one interval plus the time a round takes."""

    def __init__(self, *, interval: float = SUMMARY_INTERVAL, units_per_pass: int = SUMMARY_UNITS_PER_PASS,
                 clock=time.monotonic):
        self.interval = interval
        self.units_per_pass = units_per_pass
        self.clock = clock
        self.next_at = clock()          # the first round comes at start
        self.round = None

    def run_if_due(self) -> int:
        """Count the next few mailings of the round, starting one if it is time; how many were counted."""
        if self.round is None:
            if self.clock() < self.next_at:
                return 0
            self.next_at = self.clock() + PRUNE_RETRY       # stays if the count raises
            self.round = summaries.plan()
        batch = self.round.units[:self.units_per_pass]
        for kind, value in batch:
            summaries.count_unit(kind, value, self.round.started_at)
        del self.round.units[:len(batch)]
        if not self.round.units:
            summaries.finish(self.round)
            self.round = None
            self.next_at = self.clock() + self.interval
        return len(batch)
