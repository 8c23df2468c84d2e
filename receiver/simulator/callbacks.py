"""Status callbacks: a small pool of workers POSTing JSON to each message's callbackUrl, with retries.

A job counts as outstanding from submission until it is delivered or given up, so `idle` can tell a
test that every callback has been dealt with.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests

from .scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass
class CallbackJob:
    url: str
    body: bytes
    attempt: int = 0


class CallbackSender:
    def __init__(self, scheduler: Scheduler, config: Callable, count: Callable[[str, str], None]) -> None:
        self._scheduler = scheduler
        self._config = config             # returns the current SimConfig (quirks change at run time)
        self._count = count               # count("callback", outcome)
        self._queue: queue.Queue[CallbackJob | None] = queue.Queue()
        self._lock = threading.Lock()
        self._outstanding = 0
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(max(1, self._config().callback_workers)):
            thread = threading.Thread(target=self._work, name=f"twin-sim-callback-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=5)

    def outstanding(self) -> int:
        with self._lock:
            return self._outstanding

    def submit(self, url: str, payload: dict, delay: float = 0.0) -> None:
        # ensure_ascii=False: real services send UTF-8, and Cyrillic callbackData must survive it.
        job = CallbackJob(url, json.dumps(payload, ensure_ascii=False).encode("utf-8"))
        with self._lock:
            self._outstanding += 1
        if delay > 0:
            self._scheduler.after(delay, lambda: self._queue.put(job))
        else:
            self._queue.put(job)

    def _done(self) -> None:
        with self._lock:
            self._outstanding -= 1

    def _work(self) -> None:
        session = requests.Session()
        while True:
            job = self._queue.get()
            if job is None:
                return
            self._deliver(session, job)

    def _deliver(self, session: requests.Session, job: CallbackJob) -> None:
        config = self._config()
        try:
            response = session.post(job.url, data=job.body, timeout=config.callback_timeout,
                                    headers={"Content-Type": "application/json; charset=utf-8"})
            outcome = str(response.status_code)
            retry = response.status_code >= 500 or response.status_code == 429
        except requests.RequestException as exc:
            outcome = "connection_error"
            retry = True
            # Only scheme://host:port and the kind of failure: the URL's path holds the receiver's
            # callback token (and its user part may hold a password); requests' messages repeat the path.
            parts = urlsplit(job.url)
            origin = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
            log.debug("callback to %s failed: %s", origin, type(exc).__name__)
        self._count("callback", outcome)
        if retry and job.attempt < config.callback_retries:
            self._count("callback", "retry")
            job.attempt += 1
            delay = config.callback_retry_delay * 2 ** (job.attempt - 1)
            self._scheduler.after(delay, lambda: self._queue.put(job))
            return
        if retry:
            self._count("callback", "gave_up")
        elif not outcome.startswith("2"):
            self._count("callback", "rejected")   # a 4xx other than 429: TWIN would not retry it
        self._done()
