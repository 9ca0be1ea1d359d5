"""Sessions (an open volume or image and the state of each of its slices) and runs (their events)."""
from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..image_io import LoadedImage
from ..masks import encode_rle
from ..observation import apply_window, choose_window, to_display, to_rgb
from ..segment import guess_modality
from ..volume import AXES, OrientedVolume


@dataclass
class SliceState:
    """What is on one slice now: the prompts (pixel dicts, oldest first) and the actions
    behind them, the mask after each, the tool's state, and an audit log (who did what).

    ``picture``: the slice as the agent sees it under the overlays, H x W uint8 (a volume's
    slice, windowed: a third of its RGB's memory) or H x W x 3 uint8 (a colour 2D image)."""

    picture: np.ndarray
    target: str = ""
    prompts: list = field(default_factory=list)  # pixel prompt dicts, as in trajectories
    actions: list = field(default_factory=list)  # grid actions (Box/Point) matching prompts
    masks: list = field(default_factory=list)  # mask after each action, bit-packed (masks.pack_mask); None = not computed (after an override)
    mask: np.ndarray | None = None  # current mask
    tool_state: Any = None
    log: list = field(default_factory=list)
    key: str | None = None  # the name the tool prepares the picture under: "<session>:<axis>:<index>" (no hashing)
    edits: int = 0  # a person's overrides so far: an agent episode begun before the latest one yields to it

    def audit(self, actor: str, **data) -> None:
        self.log.append({"actor": actor, "time": time.time(), **data})

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.picture.shape[:2]

    def tool_image(self) -> np.ndarray:
        """The picture as a tool takes it, H x W x 3 uint8, without a copy (a read-only view)."""
        if self.picture.ndim == 3:
            return self.picture
        return np.broadcast_to(self.picture[:, :, None], (*self.picture.shape, 3))


class Session:
    """An image or volume opened by a client, with per-slice state."""

    def __init__(self, loaded: LoadedImage, name: str = "", reference: np.ndarray | None = None):
        self.id = secrets.token_hex(8)
        self.name = name
        self.dim = loaded.dim
        image = loaded.image
        self.geometry = {"size": list(image.GetSize()), "spacing": list(image.GetSpacing()),
                         "origin": list(image.GetOrigin()), "direction": list(image.GetDirection())}
        # a volume's voxels are kept once, in its LPS view (not also as the file's image and array)
        self.image2d = loaded.array if loaded.dim == 2 else None
        self.created = self.last_used = time.time()
        self.lock = threading.RLock()
        self.slices: dict[tuple[str, int], SliceState] = {}
        if loaded.dim == 3:
            self.volume = OrientedVolume(loaded.image)
            self.window = choose_window(np.asarray(self.volume.array), guess_modality(self.volume.array, None))
            self.reference = None if reference is None else self.volume.from_original(reference)
        else:
            self.volume = None
            self.window = None
            self.reference = None if reference is None else (reference[..., 0] if reference.ndim == 3 else reference)

    def slice_reference(self, axis: str, index: int) -> np.ndarray | None:
        """The reference mask of a slice, when the session was opened with one (oracle policies, scoring)."""
        if self.reference is None:
            return None
        return self.reference if self.volume is None else self.volume.slice(axis, index, self.reference)

    def touch(self) -> None:
        self.last_used = time.time()

    def num_slices(self, axis: str) -> int:
        return 1 if self.volume is None else self.volume.num_slices(axis)

    def info(self) -> dict:
        info = {"session": self.id, "name": self.name, "dim": self.dim, **self.geometry}
        if self.volume is not None:
            info["orientation"] = self.volume.orientation
            info["slices"] = {a: self.volume.num_slices(a) for a in AXES}
            info["window"] = [self.window.lo, self.window.hi]
        else:
            info["slices"] = {"axial": 1}
        return info

    def slice_picture(self, axis: str, index: int) -> np.ndarray:
        """A slice as the agent sees it: H x W uint8 (a volume's slice, windowed) or H x W x 3
        uint8 (a 2D image, as :func:`~..observation.to_display` shows it)."""
        self.check_slice(axis, index)
        if self.volume is None:
            return to_display(self.image2d)
        return np.ascontiguousarray(apply_window(self.volume.slice(axis, index), self.window))

    def check_slice(self, axis: str, index: int) -> None:
        """IndexError (saying why) unless ``index`` is a slice along ``axis``."""
        if self.volume is None:
            if index != 0:
                raise IndexError("A 2D image has one slice, index 0.")
        elif not 0 <= index < self.volume.num_slices(axis):
            raise IndexError(f"Slice {index} is outside the volume: it has {self.volume.num_slices(axis)} "
                             f"slices along {axis}.")

    def slice_rgb(self, axis: str, index: int) -> np.ndarray:
        """A slice as a tool is given it: H x W x 3 uint8 (a new array)."""
        return to_rgb(self.slice_picture(axis, index))

    def slice_state(self, axis: str, index: int, create: bool = True) -> SliceState | None:
        """The slice's state, made on first use (its picture drawn outside the lock: ~1 ms a CT slice)."""
        key = (axis, int(index))
        state = self.slices.get(key)
        if state is None and create:
            picture = self.slice_picture(axis, index)
            with self.lock:  # two threads making the same slice's state keep the first
                state = self.slices.setdefault(key, SliceState(picture, key=f"{self.id}:{axis}:{int(index)}"))
        return state


class SessionStore:
    """Open sessions; ones idle longer than ``idle_s`` are closed by :meth:`expire`."""

    def __init__(self, idle_s: float = 1800.0):
        self.idle_s = idle_s
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def add(self, session: Session) -> Session:
        with self._lock:
            self._sessions[session.id] = session
        return session

    def get(self, sid: str, touch: bool = True) -> Session | None:
        with self._lock:
            s = self._sessions.get(sid)
        if s is not None and touch:
            s.touch()
        return s

    def close(self, sid: str) -> Session | None:
        with self._lock:
            return self._sessions.pop(sid, None)

    def expire(self, now: float | None = None, keep=()) -> list[Session]:
        """Removes and returns the sessions idle longer than the limit, except those in ``keep`` (ids)."""
        now = time.time() if now is None else now
        with self._lock:
            old = [sid for sid, s in self._sessions.items() if now - s.last_used > self.idle_s and sid not in keep]
            return [self._sessions.pop(sid) for sid in old]

    def __len__(self) -> int:
        return len(self._sessions)


class Run:
    """A run's events, in order, each with a sequence number; readers wait for new ones.

    Events are added from the model thread and kept as the JSON lines the event stream sends
    (written once, on that thread: a mask's run lengths take a sixth of the memory they would
    as Python lists, and the web server's event loop never encodes them); the loop waits for
    them without a thread of its own (:meth:`next_lines`), woken by :meth:`emit`."""

    def __init__(self, session_id: str):
        self.id = secrets.token_hex(8)
        self.session_id = session_id
        self.lines: list[str] = []  # event number seq -> its JSON, newline-terminated
        self.status = "running"
        self.cancel_requested = False
        self.lock = threading.Lock()
        self._waiters: set = set()  # (event loop, asyncio.Event) of readers waiting for news
        self.created = time.time()
        self.finished: float | None = None  # when it ended (time.time()); finished runs are forgotten an hour later

    @property
    def done_seq(self) -> int | None:
        """The run_done event's number once the run has ended (it is the last event), else None."""
        return None if self.status == "running" else len(self.lines) - 1

    def emit(self, type_: str, **data) -> dict:
        """Adds an event (``data``: JSON-ready values); returns it as a dict (not kept)."""
        return self._append(type_, data)

    def finish(self, status: str, **data) -> None:
        """Ends the run: its status and the ``run_done`` event change together (a reader never sees
        the run ended without that event).  Events emitted after it are not kept."""
        self._append("run_done", {"status": status, **data}, ended=status)

    def _append(self, type_: str, data: dict, ended: str | None = None) -> dict:
        with self.lock:
            event = {"seq": len(self.lines), "type": type_, "run": self.id, **data}
            if self.status != "running":  # every stream ends at run_done: nothing after it is sent
                return event
            self.lines.append(json.dumps(event) + "\n")
            if ended is not None:
                self.status, self.finished = ended, time.time()
            waiters, self._waiters = self._waiters, set()
        for loop, news in waiters:
            try:
                loop.call_soon_threadsafe(news.set)
            except RuntimeError:  # that reader's event loop has closed (server stopping): nobody to wake
                pass
        return event

    async def next_lines(self, after: int, timeout: float = 15.0) -> list[str]:
        """The JSON lines of the events with ``seq > after``, in order; waits up to ``timeout`` s
        for one when there are none."""
        news = asyncio.Event()
        with self.lock:
            if len(self.lines) > after + 1 or self.status != "running":
                return self.lines[after + 1:]
            waiter = (asyncio.get_running_loop(), news)
            self._waiters.add(waiter)
        try:
            await asyncio.wait_for(news.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self.lock:
                self._waiters.discard(waiter)
        with self.lock:
            return self.lines[after + 1:]


def mask_rle(mask: np.ndarray) -> dict:
    return encode_rle(np.asarray(mask, dtype=bool))
