"""A worker on another machine (a department GPU server), with the interface of
:class:`~.worker_supervisor.WorkerSupervisor` so the module drives either one.

The server is started by its administrator (``medsam-agent serve --host 0.0.0.0
--allow-remote`` with ``MEDSAM_AGENT_TOKEN`` set); this side never starts or
stops it, and its models are whatever the server loaded (the panel's policy and
tool choices do not apply).  Volumes are uploaded (the server cannot read this
computer's files).  A server restart is noticed (its status names another
``instance``; from an older server, its uptime went down; or it forgot our
session) and bumps ``generation``, so volumes are opened again.

Where the address comes from: the panel, saved in the Slicer settings
``MedSAMAgent/WorkerURL`` and ``MedSAMAgent/WorkerToken``, or for a site-wide
set-up the environment variables ``MEDSAM_AGENT_WORKER_URL`` and
``MEDSAM_AGENT_TOKEN`` (see :func:`worker_address`).
"""
from __future__ import annotations

import threading
import time
import urllib.parse
from pathlib import Path
from typing import Callable

from ..worker.client import ClientError, WorkerClient
from ..worker.protocol import TOKEN_ENV
from .worker_supervisor import FAILED, LOADING, READY, STOPPED, Cancelled, SupervisorError

URL_ENV = "MEDSAM_AGENT_WORKER_URL"
URL_SETTING, TOKEN_SETTING = "MedSAMAgent/WorkerURL", "MedSAMAgent/WorkerToken"


def check_worker_url(url: str) -> str:
    """``url`` without a trailing slash; raises SupervisorError naming what is wrong."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SupervisorError(f"'{url}' is not a worker address; it looks like http://gpu-server:8765.")
    return url.strip().rstrip("/")


def worker_address(setting: Callable[[str], str], environ: dict) -> tuple[str, str] | None:
    """(url, token) of the worker server to use, or None to run a worker on this computer.
    The panel's settings win over the environment; a URL without a token is an error."""
    url = (setting(URL_SETTING) or environ.get(URL_ENV) or "").strip()
    if not url:
        return None
    token = (setting(TOKEN_SETTING) if setting(URL_SETTING) else environ.get(TOKEN_ENV, "")) or ""
    if not token.strip():
        raise SupervisorError(f"The worker server {url} needs its token: ask its administrator and enter it in "
                              f"the panel (or set {TOKEN_ENV}).")
    return check_worker_url(url), token.strip()


class RemoteWorker:
    def __init__(self, url: str, token: str, timeout_s: float = 30.0, ready_timeout_s: float = 600.0,
                 clock=time.monotonic):
        self.url, self.token = check_worker_url(url), token
        self.timeout_s = timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.clock = clock
        self.state = STOPPED
        self.launch = None
        self.client: WorkerClient | None = None
        self.generation = 0
        self.load_step = ""
        self.last_error: str | None = None
        self.server: dict = {}  # the server's last status (policy, tool, device, uptime)
        self._uptime = None
        self._instance = None  # the server's start id (status "instance")
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ health
    def check(self) -> str:
        """The state as last seen (no network: the module calls this on its GUI timer)."""
        return self.state

    def healthy(self) -> bool:
        """The server answers, with the same life as before (not restarted since)."""
        if self.client is None:
            return False
        try:
            self._note_status(self.client.status())
        except ClientError as exc:
            self._failed(self._explain(exc))
            return False
        return self.state == READY

    def _note_status(self, status: dict) -> None:
        with self._lock:
            uptime, instance = float(status.get("uptime_s", 0.0)), status.get("instance")
            if instance is not None:  # restarted: the sessions we opened there are gone
                restarted = self._instance is not None and instance != self._instance
            else:  # a server without start ids: its uptime went down (a restart within a second is missed)
                restarted = self._uptime is not None and uptime + 1.0 < self._uptime
            if restarted:
                self.generation += 1
            self._uptime, self._instance = uptime, instance
            self.server = status
            if status.get("state") == "ready":
                self.state = READY
            elif status.get("state") == "error":
                self._failed(f"The worker server could not load its models: {status.get('load_error')}")

    def _failed(self, message: str) -> None:
        self.state, self.last_error = FAILED, message

    def _explain(self, exc: ClientError) -> str:
        if getattr(exc, "status", None) == 401:
            return (f"The worker server {self.url} refused the token; ask its administrator for the current one "
                    "and enter it in the panel.")
        return f"Cannot reach the worker server {self.url}: {exc}. Check the address and that it is running."

    # ------------------------------------------------------------------ start / stop
    def ensure_ready(self, launch=None, cancel: threading.Event | None = None, on_step=None,
                     poll_s: float = 0.5) -> WorkerClient:
        """A client of the server once its models are loaded.  Blocks (call it off the GUI thread)."""
        with self._lock:
            self.launch = launch
            if self.client is None:
                self.client = WorkerClient(self.url, self.token, timeout=self.timeout_s)
                self.generation += 1
            self.state, self.last_error = LOADING, None
        deadline = self.clock() + self.ready_timeout_s
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled("Connecting was cancelled.")
            try:
                status = self.client.status()
            except ClientError as exc:
                self._failed(self._explain(exc))
                raise SupervisorError(self.last_error) from None
            self._note_status(status)
            if self.state == FAILED:
                raise SupervisorError(self.last_error)
            step = status.get("load_step") or ""
            if step and step != self.load_step:
                self.load_step = step
                if on_step:
                    on_step(step)
            if self.state == READY:
                return self.client
            if self.clock() > deadline:
                self._failed(f"The worker server {self.url} was still loading its models after "
                             f"{self.ready_timeout_s:.0f} s.")
                raise SupervisorError(self.last_error)
            time.sleep(poll_s)

    def open_volume(self, client: WorkerClient, path: str | Path) -> dict:
        """Open the volume file written for the worker: uploaded, since the server cannot read it."""
        path = Path(path)
        return client.open_session(data=path.read_bytes(), filename=path.name)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Disconnect.  The server is shared: it keeps running."""
        with self._lock:
            client, self.client, self.state = self.client, None, STOPPED
        if client is not None:
            client.close()

    def describe(self) -> str:
        if self.state == READY:
            s = self.server
            return (f"Worker server {self.url} ready (policy {s.get('policy')}, tool {s.get('tool')}, "
                    f"{s.get('device')}).")
        if self.state == LOADING:
            return f"Connecting to the worker server {self.url} ({self.load_step or 'waiting'})..."
        if self.state == FAILED:
            return self.last_error or f"The worker server {self.url} failed."
        return f"Worker server {self.url} (not connected)."
