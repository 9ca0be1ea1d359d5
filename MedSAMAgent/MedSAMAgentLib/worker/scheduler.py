"""One thread for the agent's work on the models: runs' turns, in small pieces, taking turns.

Agent work is submitted as *steps* (one piece of one batch: a policy call or one
tool call); after each step the job goes to the back of its priority class, so
several sessions' runs take turns.  A user's override does not queue here: it
runs on its own thread while :meth:`Scheduler.hold` keeps new steps from
starting, so it waits at most for one tool call in flight (see
``service.Worker.override``).  ``URGENT`` jobs, if any, go ahead of every
queued step.
"""
from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from concurrent.futures import Future
from typing import Callable, Iterator

URGENT = 0
NORMAL = 1


class Scheduler:
    def __init__(self):
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._stopped = threading.Event()
        self._holds = 0
        self._released = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="medsam-gpu", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], object], priority: int = NORMAL) -> Future:
        """Run ``fn()`` once on the model thread; its result or exception lands in the future."""
        future: Future = Future()
        self._queue.put((priority, next(self._order), fn, future, False))
        return future

    def submit_steps(self, step: Callable[[], bool], priority: int = NORMAL) -> Future:
        """Call ``step()`` repeatedly (requeued after each call) until it returns False."""
        future: Future = Future()
        self._queue.put((priority, next(self._order), step, future, True))
        return future

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """While held, no new NORMAL job starts (the one running finishes its piece) for up to 2 s:
        urgent work done outside the queue (a user's override) gets the device to itself."""
        with self._released:
            self._holds += 1
        try:
            yield
        finally:
            with self._released:
                self._holds -= 1
                self._released.notify_all()

    def _wait_unheld(self, max_wait: float = 2.0) -> None:
        with self._released:
            if self._holds:
                self._released.wait_for(lambda: self._holds == 0, timeout=max_wait)

    def pending(self) -> int:
        return self._queue.qsize()

    def stop(self) -> None:
        self._stopped.set()
        self._queue.put((-1, next(self._order), None, None, False))
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stopped.is_set():
            if not self._run_one(self._queue.get()):
                break

    def _run_one(self, item: tuple) -> bool:
        """Runs one queued job; False for the stop marker.  A method of its own so that, while the
        thread waits for the next job, nothing keeps this one alive (a finished run's job holds
        its session: a whole volume)."""
        priority, _, fn, future, repeat = item
        if fn is None:
            return False
        if future.cancelled():
            return True
        if priority >= NORMAL:
            self._wait_unheld()
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - reported through the future; the thread lives on
            future.set_exception(exc)
            return True
        if repeat and result:
            self._queue.put((priority, next(self._order), fn, future, True))
        else:
            future.set_result(result)
        return True
