"""A Slicer-free client for the worker (standard library only: http.client), and a way to start a worker process.

The Slicer module uses :class:`WorkerClient` from its own Python: requests are
short, except :meth:`WorkerClient.events`, which streams a run's events and
reconnects on its own from the last event seen; :class:`EventStream` does that
on a background thread and puts every event in a queue the GUI drains on its
timer.  Errors come as :class:`ClientError` with the worker's own message.
"""
from __future__ import annotations

import collections
import http.client
import json
import os
import queue
import secrets
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Iterator

from .protocol import TOKEN_ENV


class ClientError(RuntimeError):
    """A request the worker refused or could not answer; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class WorkerClient:
    """Talks to one worker. Short requests reuse one kept-alive connection per thread;
    :meth:`close` (or ``with WorkerClient(...)``) closes them all."""

    def __init__(self, url: str, token: str, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClientError(f"'{url}' is not a worker address (http://host:port or https://host).")
        # https (a server behind a TLS proxy): encrypted, so the token never crosses the network in clear
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port or (443 if self._https else 80)
        self._local = threading.local()
        self._kept: list[http.client.HTTPConnection] = []  # every thread's kept-alive connection
        self._kept_lock = threading.Lock()

    def __enter__(self) -> "WorkerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the kept-alive connections (a later request opens a new one)."""
        with self._kept_lock:
            kept, self._kept = self._kept, []
        for conn in kept:
            conn.close()

    # ------------------------------------------------------------------ plumbing
    def _new_connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout)  # verifies the certificate
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _kept_connection(self, timeout: float) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        with self._kept_lock:
            if conn is None or conn not in self._kept:  # first request on this thread, or closed since
                conn = self._local.conn = self._new_connection(timeout)
                self._kept.append(conn)
        conn.timeout = timeout  # for its next connect; an open socket keeps its own, so set that too
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _open(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json",
              headers: dict | None = None, timeout: float | None = None,
              conn: http.client.HTTPConnection | None = None):
        """Send a request on this thread's kept-alive connection (or on ``conn``); returns the
        response (read it before the next request on this thread)."""
        h = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        if body is not None:
            h["Content-Type"] = content_type
        for attempt in (0, 1):
            used = conn or self._kept_connection(timeout or self.timeout)
            try:
                used.request(method, path, body=body, headers=h)
                resp = used.getresponse()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                used.close()  # a kept-alive connection the worker had closed: once more on a new one
                if attempt or conn is not None:
                    raise ClientError(f"The worker at {self.url} does not answer ({exc}).") from None
            except (http.client.HTTPException, OSError) as exc:
                used.close()
                raise ClientError(f"The worker at {self.url} does not answer ({exc}).") from None
        if resp.status >= 400:
            raw = resp.read()
            try:
                detail = json.loads(raw.decode("utf-8")).get("detail", resp.reason)
            except (ValueError, AttributeError):
                detail = resp.reason
            raise ClientError(f"{detail}", resp.status)
        return resp

    def _json(self, method: str, path: str, payload: dict | None = None, **kw) -> dict:
        body = None if payload is None else json.dumps(payload).encode("utf-8")
        resp = self._open(method, path, body, **kw)
        try:
            return json.loads(resp.read().decode("utf-8"))
        except (http.client.HTTPException, OSError) as exc:
            raise ClientError(f"The worker at {self.url} broke off its answer ({exc}).") from None

    # ------------------------------------------------------------------ API
    def health(self, timeout: float = 5.0) -> dict:
        return self._json("GET", "/v1/health", timeout=timeout)

    def status(self) -> dict:
        return self._json("GET", "/v1/status")

    def wait_ready(self, timeout: float = 600.0, poll: float = 0.2) -> dict:
        """Wait until the models are loaded; raises ClientError if loading failed or took too long."""
        deadline = time.time() + timeout
        while True:
            try:
                status = self.status()
                if status["state"] == "ready":
                    return status
                if status["state"] == "error":
                    raise ClientError(f"The worker could not load its models: {status.get('load_error')}")
            except ClientError as exc:
                if exc.status or time.time() > deadline:
                    raise
            if time.time() > deadline:
                raise ClientError(f"The worker was not ready after {timeout:.0f} s.")
            time.sleep(poll)

    def open_session(self, path: str | Path | None = None, data: bytes | None = None, filename: str = "volume.nrrd",
                     series: str | None = None, reference: str | Path | None = None,
                     labels: list[int] | None = None) -> dict:
        """Open a volume by path (on the worker's machine, inside its allowed folders) or by uploading its bytes.

        ``reference`` (a mask path, with ``labels``) is for oracle policies and demos."""
        if path is not None:
            return self._json("POST", "/v1/sessions", {"path": str(path), "series": series,
                                                       "reference": None if reference is None else str(reference),
                                                       "labels": labels})
        if data is None:
            raise ValueError("open_session needs a path or data.")
        resp = self._open("POST", "/v1/sessions", data, "application/octet-stream", {"X-Filename": filename})
        return json.loads(resp.read().decode("utf-8"))

    def close_session(self, session: str) -> dict:
        return self._json("DELETE", f"/v1/sessions/{session}")

    def start_run(self, session: str, target: str, axis: str = "axial", slices="all", key_slice: int | None = None,
                  batch_size: int | None = None, max_turns: int | None = None) -> str:
        payload = {"target": target, "axis": axis, "slices": slices, "key_slice": key_slice,
                   "batch_size": batch_size, "max_turns": max_turns}
        return self._json("POST", f"/v1/sessions/{session}/runs", payload)["run"]

    def cancel(self, run: str) -> dict:
        return self._json("POST", f"/v1/runs/{run}/cancel", {})

    def override(self, session: str, axis: str, index: int, prompts: list[dict]) -> dict:
        return self._json("POST", f"/v1/sessions/{session}/override",
                          {"axis": axis, "slice": int(index), "prompts": prompts})

    def continue_slice(self, session: str, axis: str, index: int, target: str | None = None, turns: int = 2) -> str:
        return self._json("POST", f"/v1/sessions/{session}/continue",
                          {"axis": axis, "slice": int(index), "target": target, "turns": turns})["run"]

    def slice_info(self, session: str, axis: str, index: int) -> dict:
        return self._json("GET", f"/v1/sessions/{session}/slices/{axis}/{int(index)}")

    def shutdown(self) -> dict:
        return self._json("POST", "/v1/shutdown", {})

    def events(self, run: str, after: int = -1, retries: int = 20, stop: threading.Event | None = None) -> Iterator[dict]:
        """Yield the run's events in order until ``run_done``, reconnecting after a broken connection."""
        failures = 0
        while stop is None or not stop.is_set():
            conn = self._new_connection(timeout=30)  # its own: a stream holds its connection for long
            try:
                resp = self._open("GET", f"/v1/runs/{run}/events?after={after}", conn=conn)
                failures = 0
                for line in resp:
                    if stop is not None and stop.is_set():
                        return
                    line = line.strip()
                    if not line:
                        continue
                    event = json.loads(line)
                    if event["seq"] > after:  # (a stream reopened after the end repeats run_done: not yielded twice)
                        after = event["seq"]
                        yield event
                    if event["type"] == "run_done":
                        return
                failures += 1  # ended without run_done: the connection broke (a worker killed looks like this)
            except ClientError as exc:
                if exc.status:  # the worker answered: no point retrying
                    raise
                failures += 1
            except (OSError, ValueError, http.client.HTTPException):
                failures += 1
            finally:
                conn.close()
            if failures > retries:
                raise ClientError(f"Lost the worker at {self.url} while following run {run}.")
            time.sleep(min(2.0, 0.1 * 2 ** failures))


class EventStream:
    """Follows a run on a background thread; events (then ``None``) go into ``queue`` for the GUI to drain.

    A failure is put in the queue as ``{"type": "client_error", "reason": ...}`` before ``None``.
    """

    def __init__(self, client: WorkerClient, run: str, after: int = -1):
        self.queue: queue.Queue = queue.Queue()
        self.last_seq = after
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, args=(client, run), daemon=True)
        self._thread.start()

    def _follow(self, client: WorkerClient, run: str) -> None:
        try:
            for event in client.events(run, self.last_seq, stop=self._stop):
                self.last_seq = event["seq"]
                self.queue.put(event)
        except ClientError as exc:
            self.queue.put({"type": "client_error", "reason": str(exc)})
        finally:
            self.queue.put(None)

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


def startup_failure(stderr_lines: list[str]) -> str:
    """What a worker that ended at start said, for a person: its one-line error whole (the command
    line's ``medsam-agent: error: ...``), else its last few lines (e.g. a traceback's end)."""
    lines = [line.rstrip() for line in stderr_lines if line.strip()]
    for line in reversed(lines):
        if line.startswith("medsam-agent: error:"):
            return line.removeprefix("medsam-agent: error:").strip()
    return "\n".join(lines[-5:]) or "no message (see the worker's log)"


def start_worker(args: list[str] | None = None, python: str | None = None, env: dict | None = None,
                 timeout: float = 120.0, log=None) -> tuple[subprocess.Popen, WorkerClient]:
    """Start ``medsam-agent serve`` as a child process on 127.0.0.1 with a fresh token; return it and a client.

    ``python`` defaults to this interpreter (in Slicer: Slicer's own Python).  The
    token travels in the environment, not on the command line.  The worker shuts down when
    this process ends (``serve --parent-pid``).  ``log``: a list or
    ``collections.deque`` that receives the worker's stderr lines (what it said
    before a crash); by default they are read and dropped (the last ones are kept to explain a
    failed start).  Never blocks longer than ``timeout`` seconds, whatever the child does.
    """
    token = secrets.token_urlsafe(32)
    child_env = {**os.environ, **(env or {}), TOKEN_ENV: token, "PYTHONUNBUFFERED": "1"}
    # tied to this process: if it ends, crashes or is killed, the worker shuts itself down
    cmd = [python or sys.executable, "-m", "MedSAMAgentLib.cli", "serve", "--port", "0",
           "--parent-pid", str(os.getpid()), *(args or [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env, text=True,
                            encoding="utf-8", errors="replace")
    said = log if log is not None else collections.deque(maxlen=50)  # stderr, read from the start (never blocks it)
    errors = threading.Thread(target=_drain, args=(proc.stderr, said.append), daemon=True)
    errors.start()
    lines: queue.Queue = queue.Queue()
    to = [lines.put]  # where stdout lines go: here until the worker listens, then nowhere
    threading.Thread(target=_drain, args=(proc.stdout, lambda line: to[0](line), lambda: to[0](None)),
                     daemon=True).start()
    deadline = time.time() + timeout
    while (left := deadline - time.time()) > 0:
        try:
            line = lines.get(timeout=min(left, 0.5))
        except queue.Empty:
            continue
        if line is None:  # stdout closed: the worker has ended
            proc.wait()
            errors.join(5)
            raise ClientError(f"The worker exited at start: {startup_failure(list(said))}")
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if message.get("event") == "listening":
            to[0] = lambda line: None
            return proc, WorkerClient(message["url"], token)
    proc.kill()
    proc.wait()
    raise ClientError(f"The worker did not start within {timeout:.0f} s.")


def _drain(stream, sink, at_end=None) -> None:
    """Reads a worker's pipe until the worker ends (so it never blocks on a full pipe), giving each
    line to ``sink``; then closes it and calls ``at_end``."""
    with stream:
        for line in stream:
            sink(line.rstrip("\n"))
    if at_end is not None:
        at_end()
