"""The worker's life cycle for the Slicer module: start, health-check, restart after a crash, stop.

One :class:`WorkerSupervisor` per Slicer session owns at most one worker
process (``medsam-agent serve`` in Slicer's own Python, on 127.0.0.1 with a
fresh token, via :func:`MedSAMAgentLib.worker.client.start_worker`):

* :meth:`~WorkerSupervisor.ensure_ready` returns a client of a worker whose
  models are loaded with the requested :class:`~.options.Launch`: it reuses a
  healthy worker with the same launch, replaces one with another launch, and
  restarts one that crashed -- unless it crashed ``max_crashes`` times within
  ``crash_window_s``, when it stops trying and reports the worker's last words.
  It blocks (the module calls it on a background thread) and can be cancelled.
* :meth:`~WorkerSupervisor.check` notices a crash without any request (the
  process's exit code), cheap enough for the module's timer.
* :meth:`~WorkerSupervisor.stop` asks the worker to shut down, then
  terminates it; the module calls it when Slicer quits.

``generation`` grows with every start, so the module knows its sessions (open
volumes) belong to a worker that is gone.
"""
from __future__ import annotations

import collections
import os
import threading
import time
from pathlib import Path

from ..worker.client import ClientError, WorkerClient, start_worker
from .options import Launch

STOPPED, LOADING, READY, CRASHED, FAILED = "stopped", "loading", "ready", "crashed", "failed"


class SupervisorError(RuntimeError):
    """The worker could not be started or kept running; the message says why (with its last words)."""


class Cancelled(RuntimeError):
    """ensure_ready was cancelled; the half-started worker was stopped."""


class WorkerSupervisor:
    def __init__(self, python: str | None = None, module_dir: str | Path | None = None, env: dict | None = None,
                 starter=start_worker, max_crashes: int = 3, crash_window_s: float = 600.0,
                 start_timeout_s: float = 120.0, ready_timeout_s: float = 3600.0, clock=time.monotonic):
        self.python = python
        self.module_dir = None if module_dir is None else str(module_dir)
        self.extra_env = dict(env or {})
        self.starter = starter
        self.max_crashes = max_crashes
        self.crash_window_s = crash_window_s
        self.start_timeout_s = start_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.clock = clock
        self.state = STOPPED
        self.launch: Launch | None = None
        self.proc = None
        self.client: WorkerClient | None = None
        self.generation = 0
        self.load_step = ""
        self.last_error: str | None = None
        self.exit_code: int | None = None
        self.crashes: list[float] = []
        self.log: collections.deque = collections.deque(maxlen=200)
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ environment
    def environment(self) -> dict:
        """Variables for the worker: the module folder on PYTHONPATH (so ``-m MedSAMAgentLib.cli`` imports),
        plus the caller's extras (``MEDSAM_AGENT_HOME`` for a chosen model cache, proxies...)."""
        env = dict(self.extra_env)
        if self.module_dir:
            parts = [self.module_dir] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
        return env

    def last_words(self, lines: int = 12) -> str:
        return "\n".join(list(self.log)[-lines:])

    # ------------------------------------------------------------------ health
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> str:
        """The state, after noticing a worker that exited on its own (a crash).  Never waits: while
        another thread starts or stops the worker (which can take minutes), it answers the state as
        it stands -- the module's GUI timer calls this."""
        if not self._lock.acquire(blocking=False):
            return self.state
        try:
            if self.proc is not None and self.state in (LOADING, READY) and self.proc.poll() is not None:
                self._crashed(f"The worker stopped unexpectedly (exit code {self.proc.returncode}).")
            return self.state
        finally:
            self._lock.release()

    def healthy(self, timeout_s: float = 5.0) -> bool:
        """A live process that answers its health check within ``timeout_s``."""
        client = self.client
        if not self.alive() or client is None:
            return False
        try:
            return bool(client.health(timeout=timeout_s).get("ok"))
        except ClientError:
            return False

    def _crashed(self, message: str) -> None:
        self.exit_code = None if self.proc is None else self.proc.poll()
        self.crashes.append(self.clock())
        self.state = CRASHED
        words = self.last_words()
        self.last_error = message + (f" It said:\n{words}" if words else "")
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.client is not None:
            self.client.close()
        self.proc, self.client = None, None

    def recent_crashes(self) -> int:
        now = self.clock()
        return sum(1 for t in self.crashes if now - t <= self.crash_window_s)

    # ------------------------------------------------------------------ start / stop
    def ensure_ready(self, launch: Launch, cancel: threading.Event | None = None, on_step=None,
                     poll_s: float = 0.2) -> WorkerClient:
        """A client of a ready worker running ``launch`` (see the module docstring).  Blocks."""
        with self._lock:
            self.check()
            if self.state == READY and launch.same_worker(self.launch):
                if self.healthy():
                    return self.client
                self._crashed("The worker stopped answering its health check.")
            if self.alive():
                self.stop()
            if self.state == CRASHED and self.recent_crashes() >= self.max_crashes:
                raise SupervisorError(f"The worker crashed {self.recent_crashes()} times in "
                                      f"{self.crash_window_s / 60:.0f} minutes; not restarting it. "
                                      f"{self.last_error or ''}".strip())
            self.log.clear()
            self.launch, self.state, self.load_step, self.last_error = launch, LOADING, "starting", None
            try:
                self.proc, self.client = self.starter(launch.serve_args(), python=self.python,
                                                      env=self.environment(), timeout=self.start_timeout_s,
                                                      log=self.log)
            except ClientError as exc:
                self.state, self.last_error = FAILED, str(exc)
                raise SupervisorError(str(exc)) from None
            self.generation += 1
        deadline = self.clock() + self.ready_timeout_s
        while True:
            if cancel is not None and cancel.is_set():
                self.stop()
                raise Cancelled("Loading was cancelled.")
            with self._lock:
                if self.check() == CRASHED:
                    raise SupervisorError(self.last_error)
                if self.state == STOPPED:
                    raise Cancelled("The worker was stopped while loading.")
                client = self.client
            try:
                status = client.status()
            except ClientError:
                status = {"state": "loading"}
            step = status.get("load_step") or ""
            if step and step != self.load_step:
                self.load_step = step
                if on_step:
                    on_step(step)
            if status.get("state") == "ready":
                with self._lock:
                    self.state = READY
                return client
            if status.get("state") == "error":
                message = f"The worker could not load its models: {status.get('load_error')}"
                self.stop()
                with self._lock:
                    self.state, self.last_error = FAILED, message
                raise SupervisorError(message)
            if self.clock() > deadline:
                self.stop()
                raise SupervisorError(f"The models were not loaded after {self.ready_timeout_s:.0f} s.")
            time.sleep(poll_s)

    def open_volume(self, client: WorkerClient, path: str | Path) -> dict:
        """Open the volume file written for the worker: by path (the worker runs on this computer)."""
        return client.open_session(path=path)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Shut the worker down (politely, then by force).  Safe to call at any time, more than once."""
        with self._lock:
            proc, client = self.proc, self.client
            self.proc, self.client = None, None
            self.state = STOPPED
        if proc is None:
            return
        if client is not None:
            client.close()
        if proc.poll() is None and client is not None:
            try:
                with WorkerClient(client.url, client.token, timeout=2.0) as polite:
                    polite.shutdown()
            except ClientError:
                pass
        try:
            proc.wait(timeout_s)
        except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired; whatever happens, end it below
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except Exception:  # noqa: BLE001
                proc.kill()
                proc.wait()
        self.exit_code = proc.returncode

    def describe(self) -> str:
        """One line for the panel's status."""
        s = self.check()
        if s == READY:
            return f"Worker ready ({self.client.url if self.client else ''})."
        if s == LOADING:
            return f"Worker loading models ({self.load_step})..."
        if s in (CRASHED, FAILED):
            return self.last_error or "The worker failed."
        return "Worker not running."
