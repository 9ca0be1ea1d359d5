"""The worker's core, independent of HTTP: models, sessions, runs, overrides, on one model thread."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import __version__
from ..actions import ParseFailure, action_from_dict, box_from_pixels, point_from_pixels
from ..agent import Agent, Episode, Event
from ..file_access import FileGate
from ..image_io import LoadedImage
from ..masks import pack_mask, unpack_mask
from ..trajectory import prompt_from_dict, prompt_to_dict
from ..volume import AXES, SlicePlanner
from .protocol import INLINE_OVERRIDE_PIXELS, MAX_KEPT_RUNS, MAX_OVERRIDE_PROMPTS, MAX_SESSIONS, PROTOCOL_VERSION
from .scheduler import NORMAL, Scheduler
from .sessions import Run, Session, SessionStore, mask_rle


class WorkerError(ValueError):
    """A request the worker cannot serve; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class WorkerConfig:
    token: str
    allowed_dirs: list = field(default_factory=list)  # folders whose files may be opened by path
    max_upload_bytes: int = 1 << 30
    max_json_bytes: int = 8 << 20
    session_idle_s: float = 1800.0
    batch_size: int = 8
    max_turns: int | None = None


def _is_coordinate(value) -> bool:
    """A finite JSON number (an integer too large for a float is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def parse_prompts(items: list, width: int, height: int) -> list:
    """Client prompt dicts -> pixel prompts, checked to lie on the slice (at most
    :data:`~.protocol.MAX_OVERRIDE_PROMPTS` of them)."""
    if not isinstance(items, list):
        raise WorkerError("prompts must be a list of boxes and points.", 422)
    if len(items) > MAX_OVERRIDE_PROMPTS:
        raise WorkerError(f"prompts: {len(items)} prompts in one request, more than the {MAX_OVERRIDE_PROMPTS} the "
                          f"worker takes at once; send the boxes and points that stand.", 422)
    prompts = []
    for n, item in enumerate(items):
        if not isinstance(item, dict) or not (("box" in item) ^ ("point" in item)):
            raise WorkerError(f"prompt {n} must be {{'box': [x1, y1, x2, y2]}} or {{'point': [x, y], 'positive': bool}}")
        values = item.get("box", item.get("point"))
        if not isinstance(values, list) or len(values) != (4 if "box" in item else 2) or not all(
                _is_coordinate(v) for v in values):
            raise WorkerError(f"prompt {n} has malformed coordinates (pixel numbers expected, "
                              f"{'[x1, y1, x2, y2]' if 'box' in item else '[x, y]'})")
        xs, ys = values[0::2], values[1::2]
        if min(xs) < -0.5 or max(xs) > width - 0.5 or min(ys) < -0.5 or max(ys) > height - 0.5:
            raise WorkerError(f"prompt {n} lies outside the {width}x{height} slice")
        if "point" in item and not isinstance(item.get("positive"), bool):
            raise WorkerError(f"prompt {n}: 'positive' must be true or false")
        prompts.append(prompt_from_dict(item))
    return prompts


def grid_action(prompt, width: int, height: int):
    if hasattr(prompt, "positive"):
        return point_from_pixels(prompt.x, prompt.y, prompt.positive, width, height)
    return box_from_pixels(prompt.x1, prompt.y1, prompt.x2, prompt.y2, width, height)


def process_memory_mb() -> dict:
    """This process's resident memory now (``rss_mb``) and at its highest so far (``peak_rss_mb``,
    where the OS keeps it), in MiB.  Now, not the peak: an admin sees memory come back when
    sessions close."""
    import psutil

    memory = {"rss_mb": round(psutil.Process().memory_info().rss / 2 ** 20, 1)}
    try:
        import resource  # not on Windows
    except ImportError:
        return memory
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    # the kernel updates its high-water mark lazily: it can lag a fresh reading of the memory now
    memory["peak_rss_mb"] = max(memory["rss_mb"], round(peak / (2 ** 20 if sys.platform == "darwin" else 2 ** 10), 1))
    return memory


class SerializedTool:
    """A tool that takes one call at a time, shared by the model thread (the agent's turns) and
    override threads; everything else passes through.  ``lock`` (re-entrant) lets an override
    hold the tool across its prepare and segment calls."""

    def __init__(self, tool):
        self.inner = tool
        self.lock = threading.RLock()

    def prepare(self, images, keys=None):
        with self.lock:
            return self.inner.prepare(images, keys)

    def segment(self, key, prompts, previous=None, **kw):
        with self.lock:
            return self.inner.segment(key, prompts, previous, **kw)

    def release(self, key):
        with self.lock:
            return self.inner.release(key)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class Worker:
    """Loads the policy and tool once and serves sessions, runs and overrides."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.state = "loading"
        self.load_step = "starting"
        self.load_error: str | None = None
        self.policy = self.tool = self.profile = None
        self.device = "cpu"
        self.sessions = SessionStore(config.session_idle_s)
        self.runs: dict[str, Run] = {}
        self.scheduler = Scheduler()
        self.started = time.time()
        self.instance = secrets.token_hex(8)  # new at every start: a client notices a restart by it
        self._stop = threading.Event()
        self.on_shutdown: Callable[[], None] | None = None
        threading.Thread(target=self._reaper, name="medsam-reaper", daemon=True).start()

    # ------------------------------------------------------------------ models
    def load(self, build: Callable[[Callable[[str], None]], tuple], on_progress: Callable[[dict], None] | None = None):
        """Build (policy, tool, profile) with ``build(report_step)``; sets the state to ready or error."""
        def step(name: str) -> None:
            self.load_step = name
            if on_progress:
                on_progress({"event": "loading", "step": name})
        try:
            self.policy, tool, self.profile = build(step)
            self.tool = tool if getattr(tool, "concurrent_safe", False) else SerializedTool(tool)
            self.device = getattr(self.tool, "device", "cpu")
            self.state, self.load_step = "ready", "done"
            if on_progress:
                on_progress({"event": "ready"})
        except Exception as exc:  # noqa: BLE001 - reported in status; the service stays up to say so
            self.state, self.load_error = "error", f"{type(exc).__name__}: {exc}"
            if on_progress:
                on_progress({"event": "error", "reason": self.load_error})

    def load_async(self, build, on_progress=None) -> threading.Thread:
        t = threading.Thread(target=self.load, args=(build, on_progress), name="medsam-load", daemon=True)
        t.start()
        return t

    def require_ready(self) -> None:
        if self.state == "loading":
            raise WorkerError(f"The models are still loading ({self.load_step}); try again shortly.", 503)
        if self.state != "ready":
            raise WorkerError(f"The models failed to load: {self.load_error}", 503)

    # ------------------------------------------------------------------ status
    def health(self) -> dict:
        return {"ok": True, "protocol": PROTOCOL_VERSION, "version": __version__, "state": self.state}

    def status(self) -> dict:
        memory = process_memory_mb()
        torch = sys.modules.get("torch")  # only if the models use it: importing it here would cost seconds and ~300 MB
        try:
            if torch is not None and torch.cuda.is_available():
                free, total = torch.cuda.mem_get_info()
                memory.update({"gpu_free_mb": free >> 20, "gpu_total_mb": total >> 20,
                               "gpu_allocated_mb": torch.cuda.memory_allocated() >> 20})
        except Exception:  # noqa: BLE001 - status must answer even if CUDA misbehaves
            pass
        running = sum(1 for r in list(self.runs.values()) if r.status == "running")
        return {**self.health(), "load_step": self.load_step, "load_error": self.load_error,
                "device": str(self.device), "policy": getattr(self.policy, "name", None),
                "tool": getattr(self.tool, "name", None), "profile": getattr(self.profile, "name", None),
                "memory": memory, "queue": self.scheduler.pending(), "sessions": len(self.sessions),
                "runs_running": running, "runs_kept": len(self.runs) - running,
                "limits": {"sessions": MAX_SESSIONS, "runs_kept": MAX_KEPT_RUNS,
                           "override_prompts": MAX_OVERRIDE_PROMPTS, "upload_bytes": self.config.max_upload_bytes},
                "uptime_s": round(time.time() - self.started, 1), "instance": self.instance}

    # ------------------------------------------------------------------ sessions
    @property
    def gate(self) -> FileGate:
        """What a client may read: the files inside the allowed folders, links followed."""
        return FileGate(self.config.allowed_dirs)

    def open_session(self, loaded: LoadedImage, name: str = "", reference=None) -> dict:
        self.expire_sessions()
        if len(self.sessions) >= MAX_SESSIONS:
            raise WorkerError(f"{MAX_SESSIONS} sessions are open on this worker, the most it holds; close one "
                              f"(DELETE /v1/sessions/ID) or wait until idle ones expire.", 429)
        session = self.sessions.add(Session(loaded, name, reference))
        self._prewarm(session)
        return session.info()

    def _prewarm(self, session: Session, axis: str = "axial") -> None:
        """With a CPU tool, prepares the session's slices in the background (one per agent step,
        never ahead of anything a person waits for), so a first edit on any slice is decoder-only too.
        Skipped for model tools (GPU time and embedding memory) and for volumes too large to
        keep prepared."""
        capacity = getattr(getattr(self.tool, "cache", None), "capacity", 0)
        todo = list(range(session.num_slices(axis)))
        if not self.overrides_inline or len(todo) > capacity // 2:
            return

        def step() -> bool:
            if not todo or self.sessions.get(session.id, touch=False) is None:
                return False  # done, or the session was closed meanwhile
            self.prepare_slice(session.slice_state(axis, todo.pop(0)))
            return bool(todo)

        self.scheduler.submit_steps(step, NORMAL)

    def prepare_slice(self, state) -> str:
        """The tool's key for a slice's picture, prepared under the slice's name (found when it
        already is: decoder-only from then on)."""
        return self.tool.prepare([state.tool_image()], [state.key])[0]

    @staticmethod
    def requested_slice(session: Session, axis: str, index: int, create: bool = True):
        """A client's slice (:meth:`Session.slice_state`), or WorkerError saying what is wrong with
        the axis or index it named."""
        if axis not in AXES:
            raise WorkerError(f"Unknown axis '{axis}'.")
        try:
            session.check_slice(axis, index)
        except IndexError as exc:
            raise WorkerError(str(exc)) from None
        return session.slice_state(axis, index, create)

    def session(self, sid: str) -> Session:
        s = self.sessions.get(sid)
        if s is None:
            raise WorkerError(f"No session {sid} (closed, or expired after {self.config.session_idle_s:.0f} s idle).", 404)
        return s

    def close_session(self, sid: str) -> None:
        session = self.sessions.close(sid)
        if session is None:
            raise WorkerError(f"No session {sid}.", 404)
        self._forget(session)

    def _forget(self, session: Session) -> None:
        """Cancels a closed session's runs (they stop within one turn) and frees what the tool keeps
        for its slices (SAM2: image embeddings)."""
        for run in list(self.runs.values()):
            if run.session_id == session.id:
                if run.status == "running":
                    run.cancel_requested = True  # forgotten once it has stopped (expire_sessions)
                else:
                    self.runs.pop(run.id, None)  # nobody can read it any more: freed at once
        if self.tool is None:
            return
        for state in list(session.slices.values()):
            if state.key is not None:
                self.tool.release(state.key)

    def _reaper(self) -> None:
        while not self._stop.wait(min(30.0, max(0.5, self.config.session_idle_s / 4))):
            try:
                self.expire_sessions()
            except Exception:  # noqa: BLE001 - one bad pass must not end expiry for the worker's life
                logging.getLogger(__name__).exception("Expiring idle sessions failed; trying again later")

    def expire_sessions(self, now: float | None = None) -> None:
        """Closes sessions idle longer than the limit (freeing their slices in the tool) and forgets
        finished runs older than an hour (or the idle limit, if longer)."""
        busy = {r.session_id for r in list(self.runs.values()) if r.status == "running"}
        for session in self.sessions.expire(now, keep=busy):  # a session with work going is not idle
            self._forget(session)
        self.forget_runs(now)

    def forget_runs(self, now: float | None = None) -> None:
        """Forgets finished runs of closed sessions, runs finished over an hour ago (or the idle limit,
        if longer), and beyond :data:`MAX_KEPT_RUNS` finished runs the oldest."""
        cutoff = (time.time() if now is None else now) - max(3600.0, self.config.session_idle_s)
        finished = []
        for rid, r in list(self.runs.items()):
            if r.status == "running":
                continue
            if (r.finished or r.created) < cutoff or self.sessions.get(r.session_id, touch=False) is None:
                self.runs.pop(rid, None)
            else:
                finished.append(r)
        finished.sort(key=lambda r: r.finished or r.created)
        for r in finished[:max(0, len(finished) - MAX_KEPT_RUNS)]:
            self.runs.pop(r.id, None)

    # ------------------------------------------------------------------ runs
    def run(self, rid: str) -> Run:
        r = self.runs.get(rid)
        if r is None:
            raise WorkerError(f"No run {rid}.", 404)
        return r

    def start_run(self, sid: str, target: str, axis: str = "axial", slices="all", key_slice: int | None = None,
                  batch_size: int | None = None, max_turns: int | None = None) -> Run:
        self.require_ready()
        session = self.session(sid)
        if not target or not str(target).strip():
            raise WorkerError("A run needs a target (what to segment).")
        self.check_reference(session)
        if axis not in AXES:
            raise WorkerError(f"Unknown axis '{axis}'; one of {', '.join(AXES)}.")
        n = session.num_slices(axis)
        try:
            if isinstance(slices, list):
                if not slices:
                    raise ValueError("slices is an empty list; give slice numbers, \"all\", \"A:B\" or \"auto\"")
                bad = [i for i in slices if not isinstance(i, int) or not 0 <= i < n]
                if bad:
                    raise ValueError(f"slices {bad[:5]} are outside the volume (0..{n - 1})")
                twice = sorted({i for i in slices if slices.count(i) > 1})
                if twice:
                    raise ValueError(f"slices lists {twice[:5]} more than once; list each slice once")
                planner = SlicePlanner(n, "all", None, batch_size or self.config.batch_size)
                planner.order = list(slices)
                planner.total = len(slices)
            else:
                planner = SlicePlanner(n, str(slices), key_slice, batch_size or self.config.batch_size)
        except ValueError as exc:
            raise WorkerError(str(exc).replace("--", "")) from None
        run = Run(session.id)
        self.forget_runs()
        self.runs[run.id] = run
        run.emit("run_started", axis=axis, target=target,
                 slices=planner.order if planner.mode == "range" else "auto")
        job = _RunJob(self, run, session, target, axis, planner, max_turns or self.config.max_turns)
        self.scheduler.submit_steps(job.step, NORMAL)
        return run

    def check_reference(self, session: Session) -> None:
        """A policy that reads the reference mask (the expert) cannot run a session opened without one."""
        if getattr(self.policy, "reads_reference", False) and session.reference is None:
            raise WorkerError(f"The {getattr(self.policy, 'name', 'chosen')} policy reads a reference mask, and this "
                              f"session has none: open the volume with \"reference\" (and \"labels\" for a label map).")

    def cancel(self, rid: str) -> dict:
        run = self.run(rid)
        run.cancel_requested = True
        return {"run": rid, "status": run.status}

    @property
    def overrides_inline(self) -> bool:
        """True for a CPU tool whose calls may overlap (classical): its overrides run right on the
        web server's event loop.  False (a model such as SAM2): on a thread of their own, one tool
        call at a time (:class:`SerializedTool`)."""
        return bool(getattr(self.tool, "concurrent_safe", False))

    def override(self, sid: str, axis: str, index: int, prompts: list) -> dict:
        """The tool's mask for exactly this prompt set (decoder only), ahead of the agent's work.

        No new agent step starts meanwhile, and the override never waits for the policy (a
        language model's turn can take seconds): at most for one tool call already running."""
        return self._answer(self.override_job(sid, axis, index, prompts))

    async def override_async(self, sid: str, axis: str, index: int, prompts: list) -> dict:
        """:meth:`override` for the event loop.  A CPU tool's override (a few ms) runs on the loop
        itself: overrides take turns instead of fighting over the GIL in a thread pool, with no
        thread hop; a model's override runs on a thread, so waiting for the tool blocks nothing."""
        job = self.override_job(sid, axis, index, prompts)
        if self.overrides_inline and job.pixels <= INLINE_OVERRIDE_PIXELS:
            return self._answer(job)
        return await asyncio.to_thread(self._answer, job)

    def _answer(self, job: Callable[[], dict]) -> dict:
        with self.scheduler.hold():  # no new agent step: the person's edit has the device
            return job()

    def tool_turn(self):
        """Held around a prepare + segment pair that must not interleave with the agent's calls:
        a model tool's lock (the call in flight finishes first), nothing for a CPU tool.  Never
        take a session's lock inside it (the model thread takes the two in the other order)."""
        return contextlib.nullcontext() if self.overrides_inline else self.tool.lock

    def override_job(self, sid: str, axis: str, index: int, prompts: list) -> Callable[[], dict]:
        """Checks an override request (WorkerError if wrong) and returns the work that answers it."""
        self.require_ready()
        session = self.session(sid)
        state = self.requested_slice(session, axis, index)
        h, w = state.shape
        pixel = parse_prompts(prompts, w, h)

        def job():
            t0 = time.perf_counter()
            if pixel:
                with self.tool_turn():
                    key = self.prepare_slice(state)  # kept from earlier turns and edits
                    result = self.tool.segment(key, pixel, None, prompt_mode="cumulative")
                mask, tool_state, score = np.asarray(result.mask, bool), result.state, result.score
            else:
                mask, tool_state, score = np.zeros((h, w), bool), None, float("nan")
            seconds = time.perf_counter() - t0
            with session.lock:
                state.edits += 1  # an agent episode running on this slice ends: the person's edit stands
                state.prompts = [prompt_to_dict(p) for p in pixel]
                state.actions = [grid_action(p, w, h) for p in pixel]
                state.masks = [None] * (len(pixel) - 1) + [pack_mask(mask)] if pixel else []
                state.mask, state.tool_state = mask, tool_state
                rle = mask_rle(mask)
                state.audit("user", prompts=state.prompts, mask_pixels=int(np.count_nonzero(mask)))
            if h * w > INLINE_OVERRIDE_PIXELS:  # encoded here, off the event loop (run lengths of a huge slice)
                rle = json.dumps(rle).encode()
            return {"mask": rle, "score": None if not np.isfinite(score) else float(score),
                    "seconds": round(seconds, 5), "prompts": state.prompts}

        job.pixels = h * w
        return job

    def continue_slice(self, sid: str, axis: str, index: int, target: str | None = None, turns: int = 2) -> Run:
        """The agent takes up to ``turns`` more turns on one slice, from its current prompts and mask."""
        self.require_ready()
        session = self.session(sid)
        state = self.requested_slice(session, axis, index)
        self.check_reference(session)
        target = target or state.target
        if not target:
            raise WorkerError("Continue needs a target: this slice has not been run yet.")
        if not 1 <= int(turns) <= 10:
            raise WorkerError("turns must be between 1 and 10.")
        planner = SlicePlanner(session.num_slices(axis), "all", None, 1)
        planner.order, planner.total = [int(index)], 1
        run = Run(session.id)
        self.forget_runs()
        self.runs[run.id] = run
        run.emit("run_started", axis=axis, target=target, slices=[int(index)], kind="continue")
        job = _RunJob(self, run, session, target, axis, planner, None, continue_turns=int(turns))
        self.scheduler.submit_steps(job.step, NORMAL)
        return run

    def slice_info(self, sid: str, axis: str, index: int) -> dict:
        state = self.requested_slice(self.session(sid), axis, index, create=False)
        if state is None:
            return {"axis": axis, "slice": index, "prompts": [], "mask": None, "log": [], "target": None}
        return {"axis": axis, "slice": index, "target": state.target, "prompts": state.prompts,
                "mask": None if state.mask is None else mask_rle(state.mask), "log": state.log}

    def close(self) -> None:
        self._stop.set()
        for run in self.runs.values():
            run.cancel_requested = True
        self.scheduler.stop()


class _RunJob:
    """One run as scheduler steps: plan a batch, start it (encoder), then one agent turn per step."""

    def __init__(self, worker: Worker, run: Run, session: Session, target: str, axis: str,
                 planner: SlicePlanner, max_turns: int | None, continue_turns: int | None = None):
        self.worker, self.run, self.session = worker, run, session
        self.target, self.axis, self.planner = target, axis, planner
        self.max_turns = max_turns
        self.continue_turns = continue_turns
        self.agent_run = None
        self.pieces = None
        self.batch: list[int] = []
        self.unready: list[int] | None = None  # slices of the batch not yet drawn (and prepared)
        self.edits: dict[int, int] = {}  # slice -> its edit count when its episode began

    def step(self) -> bool:
        try:
            return self._step()
        except Exception as exc:  # noqa: BLE001 - a failed run must end with an event, never hang the client
            self.run.finish("failed", reason=f"{type(exc).__name__}: {exc}")
            return False

    def _step(self) -> bool:
        run = self.run
        self.session.touch()  # a session with a run going is in use, whoever is watching
        if run.cancel_requested:
            if self.agent_run is not None:
                self.agent_run.cancel()
            run.finish("cancelled")
            return False
        if self.agent_run is None:
            if self.unready is None:
                indices = self.planner.next_batch()
                if indices is None:
                    run.finish("done")
                    return False
                self.batch, self.unready = indices, list(indices)
                return True
            if self.unready:  # one slice per piece: its picture, and a CPU tool's preparation
                self._ready(self.unready.pop(0))
                return True
            self.agent_run = self._start(self.batch)
            self.unready = self.pieces = None
            return True
        for i in self.batch:  # a person edited a slice of this batch meanwhile: its episode ends there
            state = self.session.slice_state(self.axis, i, create=False)
            if state is not None and state.edits != self.edits.get(i, state.edits):
                self.agent_run.end(f"{self.axis}:{i}", "overridden")
        if self.pieces is None:
            self.pieces = self.agent_run.substeps()  # one turn, in pieces (policy call, then each tool call)
        if next(self.pieces, StopIteration) is StopIteration:
            self.pieces = None
            if self.agent_run.done:
                trajectories = self.agent_run.trajectories
                self.agent_run = None
                self.planner.report({i: not t.final_mask.any() for i, t in zip(self.batch, trajectories)})
        return True

    def _ready(self, index: int) -> None:
        """Draws one slice's picture; a CPU tool also prepares it here, one slice per piece, so a
        person's override never waits behind a whole batch's preparation.  (A GPU tool prepares
        the batch at once in :meth:`_start`: one encoder call.)"""
        state = self.session.slice_state(self.axis, index)
        if self.worker.overrides_inline:
            self.worker.prepare_slice(state)

    def _start(self, indices: list[int]):
        w = self.worker
        episodes = []
        max_turns = self.max_turns
        states = [self.session.slice_state(self.axis, i) for i in indices]  # drawn by _ready already
        histories = [self._history(state) if self.continue_turns is not None else [] for state in states]
        with self.session.lock:
            for i, state, history in zip(indices, states, histories):
                self.edits[i] = state.edits
                tool_state = None
                if self.continue_turns is not None:
                    tool_state = state.tool_state
                    max_turns = len(history) + self.continue_turns
                else:  # a fresh run replaces what was on the slice
                    state.prompts, state.actions, state.masks, state.mask, state.tool_state = [], [], [], None, None
                state.target = self.target
                episodes.append(Episode(f"{self.axis}:{i}", state.picture, self.target,
                                        self.session.slice_reference(self.axis, i),
                                        {"axis": self.axis, "slice": i}, history=history, tool_state=tool_state,
                                        tool_key=state.key))
        agent = Agent(w.policy, w.tool, w.profile, max_turns=max_turns, on_event=self._on_event)
        return agent.start(episodes)

    def _history(self, state) -> list:
        """(action, mask) pairs for the slice's prompts; masks an override did not compute are computed
        now, with the tool, outside the session's lock (an override takes the tool, then that lock)."""
        with self.session.lock:
            actions, prompts = list(state.actions), list(state.prompts)
            masks = [None if m is None else unpack_mask(m) for m in state.masks]
        if not actions:
            return []
        missing = [n for n, m in enumerate(masks) if m is None]
        if missing:
            key = self.worker.prepare_slice(state)
            pixel = [prompt_from_dict(p) for p in prompts]
            for n in missing:
                masks[n] = np.asarray(self.worker.tool.segment(key, pixel[:n + 1], None,
                                                               prompt_mode="cumulative").mask, bool)
            with self.session.lock:
                if state.prompts == prompts:  # unless a person's edit replaced them meanwhile
                    state.masks = [pack_mask(m) for m in masks]
        return list(zip(actions, masks))

    def _on_event(self, event: Event) -> None:
        axis, _, idx = event.episode_id.rpartition(":")
        i = int(idx)
        state = self.session.slice_state(axis, i)
        run, d = self.run, event.data
        if state.edits != self.edits.get(i, state.edits):  # a person's override came after this episode began
            if event.kind == "episode_done":  # the slice is done, with the person's prompts and mask
                final = state.mask if state.mask is not None else np.zeros(state.shape, bool)
                run.emit("slice_done", axis=axis, slice=i, stop_reason="overridden", failure=None,
                         mask=mask_rle(final), turns=len(state.prompts))
            return  # the agent's later actions and masks are not applied over the edit
        if event.kind == "action":
            action = action_from_dict(d["action"])
            if d.get("pixels") and not isinstance(action, ParseFailure):
                with self.session.lock:
                    state.prompts.append(d["pixels"])
                    state.actions.append(action)
            state.audit("agent", action=d["action"], turn=event.turn)
            run.emit("action", axis=axis, slice=i, turn=event.turn, action=d["action"], pixels=d.get("pixels"),
                     text=d.get("text"), actor="agent")
        elif event.kind == "mask":
            with self.session.lock:
                state.masks.append(pack_mask(d["mask"]))
                state.mask, state.tool_state = d["mask"], d.get("state")
            score = d.get("score")
            run.emit("mask", axis=axis, slice=i, turn=event.turn, mask=mask_rle(d["mask"]),
                     score=None if score is None or not np.isfinite(score) else float(score))
        elif event.kind == "error":
            run.emit("error", axis=axis, slice=i, turn=event.turn, reason=d.get("reason"))
        elif event.kind == "episode_done":
            traj = d["trajectory"]
            final = state.mask if state.mask is not None else np.zeros(state.shape, bool)
            run.emit("slice_done", axis=axis, slice=i, stop_reason=traj.stop_reason, failure=traj.failure,
                     mask=mask_rle(final), turns=len(traj.steps))
