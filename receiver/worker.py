"""The worker process (`python -m receiver worker`): send what POST /api/sends queued, enrich what is
due, forward events, prune and summarise, as peers, pass after pass until SIGTERM/SIGINT. Without TWIN
credentials it only prunes and summarises: callbacks still arrive, and the results page still reads the
stored summaries."""
from __future__ import annotations

import logging
import signal
import time

from peewee import DatabaseError, InterfaceError

from . import forwarding
from .callbudget import CallBudget
from .db import db
from .enrich import Enricher
from .health import count_twin_call
from .maintenance import PeriodicPrune, PeriodicSummaries
from .sending import send_pending
from .settings import Settings
from .twin24 import TwinClient

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, settings: Settings, client: TwinClient | None, enricher: Enricher | None,
                 sleep=time.sleep):
        self.settings = settings
        self.client = client            # one client, one call budget: shared by sending and the enricher
        self.enricher = enricher        # None: no TWIN credentials, so nothing is sent, looked up or forwarded
        self.sleep = sleep
        self.stopping = False
        self.prune = PeriodicPrune(settings.event_retention_days)   # EVENT_RETENTION_DAYS, once an hour
        self.summaries = PeriodicSummaries()        # the results' stored summaries (receiver/summaries.py)

    @classmethod
    def from_app(cls, app) -> Worker:
        return cls.from_settings(app.config["SETTINGS"])

    @classmethod
    def from_settings(cls, settings: Settings) -> Worker:
        if not settings.has_twin24_credentials:
            return cls(settings, None, None)
        budget = CallBudget.from_settings(settings)     # TWIN24_MAX_CALLS_PER_MINUTE, shared by every worker
        client = TwinClient(settings, on_call=count_twin_call, pacer=budget.reserve if budget else None)
        return cls(settings, client, Enricher(settings, client, budget=budget))

    def run(self, once: bool = False) -> None:
        """Send what POST /api/sends queued, sweep whatever is due, prune old events and keep the stored
        summaries, until stopped (SIGTERM/SIGINT finish the current pass first)."""
        if not once:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self._stop)
            log.info("enrichment worker started" if self.twin else "worker started without TWIN credentials")
        # Not connection_context(): a failed pass reconnects, and the context would then close a
        # connection it no longer knows.
        db.connect(reuse_if_open=True)
        forwarder = self.start_forwarding(once) if self.twin else None
        try:
            while not self.stopping:
                try:
                    self.run_pass(once)
                except (DatabaseError, InterfaceError):
                    # The database went away, is busy beyond the timeout, or chose this pass as a
                    # deadlock's victim: leases we hold expire by themselves, so nothing is lost by
                    # trying again later.
                    log.exception("enrichment pass failed; trying again shortly")
                    self._reconnect()
                    self.sleep(self.settings.enrich_backoff_start)
                if once:
                    return
                self.sleep(self.settings.enrich_poll_interval)
        finally:
            if forwarder is not None:
                forwarder.stop(self.settings.forward_timeout + 5)
            if not db.is_closed():
                db.close()
        log.info("enrichment worker stopped")

    @property
    def twin(self) -> bool:
        return self.enricher is not None

    def run_pass(self, once: bool) -> None:
        if self.twin:
            send_pending(self.settings, self.client)        # mailings queued by POST /api/sends
            self.enricher.run_once(force=once)
        self.prune.run_if_due()
        self.summaries.run_if_due()
        if once and self.twin:
            self.forward_once()

    def start_forwarding(self, once: bool) -> forwarding.Forwarder | None:
        """Make FORWARD_URL's subscription, then deliver events in a thread of their own (a slow target
        must not hold up enrichment); a single pass (`once`) delivers inline instead."""
        try:
            forwarding.ensure_settings_subscription(self.settings)
        except (DatabaseError, InterfaceError):
            log.exception("could not record FORWARD_URL's subscription; the next start tries again")
        if once:
            return None
        forwarder = forwarding.Forwarder(self.settings)
        forwarder.start()
        return forwarder

    def forward_once(self) -> None:
        try:
            forwarding.deliver_due(self.settings)
        except (DatabaseError, InterfaceError):
            log.exception("forwarding pass failed")

    @staticmethod
    def _reconnect() -> None:
        if not db.is_closed():
            db.close()
        db.connect()

    def _stop(self, *_args) -> None:
        self.stopping = True
