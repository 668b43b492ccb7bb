"""A pass that runs every few seconds in a daemon thread of the API process (reaper, webhooks)."""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)


class Periodic:
    """Calls :meth:`run_once` every :attr:`interval_s` until :meth:`stop`; a failing pass is
    logged and the next one runs anyway (a store hiccup must not end the loop)."""

    name = "simmim-periodic"
    interval_s = 1.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> Any:
        raise NotImplementedError

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except Exception:
                log.warning("%s pass failed", self.name, exc_info=True)
