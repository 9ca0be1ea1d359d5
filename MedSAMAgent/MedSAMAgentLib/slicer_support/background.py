"""Work on a thread of its own that the Slicer module polls on a timer (downloads, installs)."""
from __future__ import annotations

import threading


class BackgroundJob:
    """``start()`` runs :meth:`_run` on a daemon thread and returns at once; ``cancel()`` sets a flag
    that ``_run`` checks; subclasses report progress through a ``snapshot()`` read under ``_lock``."""

    thread_name = "medsam-job"

    def __init__(self):
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self):
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        raise NotImplementedError
