"""One thread and a heap of timed jobs: 10,000 messages must not mean 10,000 threads."""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()       # ties keep submission order
        self._cond = threading.Condition()
        self._running = 0                   # jobs taken off the heap but not finished
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="twin-sim-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    def at(self, due: float, job: Callable[[], None]) -> None:
        """Run `job` at epoch time `due` (or as soon as possible after)."""
        with self._cond:
            heapq.heappush(self._heap, (due, next(self._seq), job))
            self._cond.notify()

    def after(self, delay: float, job: Callable[[], None]) -> None:
        self.at(time.time() + delay, job)

    def pending(self) -> int:
        with self._cond:
            return len(self._heap) + self._running

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.time()):
                    timeout = self._heap[0][0] - time.time() if self._heap else None
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                _, _, job = heapq.heappop(self._heap)
                self._running += 1
            try:
                job()
            except Exception:  # a bad job must not kill the lifecycle of every other message
                log.exception("scheduled job failed")
            finally:
                with self._cond:
                    self._running -= 1
