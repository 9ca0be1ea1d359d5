"""The annotator's edits to a slice's prompts, and when the worker recomputes the mask.

The markups are the source of truth: after every markups change the module
reads the prompts of the affected slices (pixel coordinates, via
:mod:`geometry`) as :class:`PromptItem` lists and hands them to
:class:`OverrideManager`.  The manager

* diffs them against what it knew, recording each edit (add, delete, move a
  point; move or resize a box; a point dragged to another slice) with author
  ``user`` in its trajectory -- so edits live in the markups *and* in the
  trajectory, never only in the worker;
* runs one state machine per slice::

      idle/shown/error --edit--> editing --quiet for debounce_s--> recomputing
      recomputing --answer--> shown        (or editing again if edited meanwhile)
      recomputing --failure--> error       (the edits stay; the next edit retries)

* hands out the requests to send (``{"axis", "slice", "prompts"}`` in the
  worker's override format, prompts in the order the agent placed them, the
  annotator's additions after), one at a time per slice.

A change that does not move anything by more than ``tolerance_px`` (a click on
a point without dragging it) is not an edit and triggers nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

IDLE, EDITING, RECOMPUTING, SHOWN, ERROR = "idle", "editing", "recomputing", "shown", "error"


@dataclass(frozen=True)
class PromptItem:
    """One prompt as the markups show it.

    ``id``: stable markup identity (ROI node ID, or points node ID + control
    point ID).  ``coords``: pixel index coordinates on the slice image --
    ``(x1, y1, x2, y2)`` for a box, ``(x, y)`` for a point.  ``turn``: the
    agent's turn that placed it (None: placed by the annotator).
    """

    id: str
    kind: str  # "box" | "point"
    coords: tuple
    positive: bool = True
    turn: int | None = None

    @property
    def author(self) -> str:
        return "user" if self.turn is None else "agent"

    def wire(self, width: int, height: int) -> dict | None:
        """The worker's prompt dict; boxes are clipped to the slice, points outside it give None."""
        lo_x, hi_x, lo_y, hi_y = -0.5, width - 0.5, -0.5, height - 0.5
        if self.kind == "box":
            x1, y1, x2, y2 = self.coords
            x1, x2 = sorted((min(max(x1, lo_x), hi_x), min(max(x2, lo_x), hi_x)))
            y1, y2 = sorted((min(max(y1, lo_y), hi_y), min(max(y2, lo_y), hi_y)))
            if x2 - x1 < 1e-6 or y2 - y1 < 1e-6:
                return None
            return {"box": [round(x1, 3), round(y1, 3), round(x2, 3), round(y2, 3)]}
        x, y = self.coords
        if not (lo_x <= x <= hi_x and lo_y <= y <= hi_y):
            return None
        return {"point": [round(x, 3), round(y, 3)], "positive": bool(self.positive)}


@dataclass
class Request:
    """One override to send: ``prompts`` for ``slice`` along ``axis``; ``id`` ties the answer to it."""

    id: int
    axis: str
    slice: int
    prompts: list
    dropped: list = field(default_factory=list)  # ids of prompts lying outside the slice (not sent)
    items: list = field(default_factory=list)  # the PromptItems behind ``prompts``

    def payload(self) -> dict:
        return {"axis": self.axis, "slice": self.slice, "prompts": self.prompts}


class SliceEditor:
    """The state of one slice's prompts (see the module docstring)."""

    def __init__(self, axis: str, index: int, size: tuple[int, int], items=(), debounce_s: float = 0.35):
        self.axis, self.index = axis, int(index)
        self.width, self.height = int(size[0]), int(size[1])
        self.debounce_s = debounce_s
        self.items: list[PromptItem] = list(items)
        self.shown: list[PromptItem] = list(items)  # the prompts whose mask the segment shows now
        self.state = IDLE
        self.deadline = 0.0
        self.dirty = False  # edited while a request was out
        self.request: Request | None = None
        self.error: str | None = None

    def replace(self, items, now: float) -> None:
        """New prompts from the markups (already known to differ); schedules a recompute."""
        self.items = list(items)
        if self.state == RECOMPUTING:
            self.dirty = True
        else:
            self.state, self.deadline = EDITING, now + self.debounce_s

    def due(self, now: float) -> bool:
        return self.state == EDITING and now >= self.deadline

    def start(self, request_id: int) -> Request:
        prompts, dropped = [], []
        for item in self.items:
            w = item.wire(self.width, self.height)
            if w is None:
                dropped.append(item.id)
            else:
                prompts.append(w)
        self.state, self.dirty, self.error = RECOMPUTING, False, None
        self.request = Request(request_id, self.axis, self.index, prompts, dropped, list(self.items))
        return self.request

    def finish(self, request_id: int, error: str | None, now: float) -> bool:
        """The answer to a request arrived; True when its mask should be shown."""
        if self.request is None or request_id != self.request.id:
            return False  # an answer nobody waits for any more
        request, self.request = self.request, None
        if error is not None:
            self.error = error
            if self.dirty:  # edited again while this one failed: the newer prompts are sent (once, now)
                self.state, self.deadline, self.dirty = EDITING, now, False
            else:
                self.state = ERROR
            return False
        self.shown = list(request.items)
        if self.dirty:
            self.state, self.deadline, self.dirty = EDITING, now, False  # edited meanwhile: go again at once
        else:
            self.state = SHOWN
        return True


def _moved(a: tuple, b: tuple, tol: float) -> bool:
    return len(a) != len(b) or any(abs(float(x) - float(y)) > tol for x, y in zip(a, b))


class OverrideManager:
    """Per-slice editors, the edit trajectory, and the requests to send (see the module docstring)."""

    def __init__(self, sizes: dict[str, tuple[int, int]], debounce_s: float = 0.35, tolerance_px: float = 0.05,
                 clock=time.monotonic):
        self.sizes = dict(sizes)  # axis -> (width, height) of its slice images
        self.debounce_s = debounce_s
        self.tolerance_px = tolerance_px
        self.clock = clock
        self.editors: dict[tuple[str, int], SliceEditor] = {}
        self.trajectory: list[dict] = []
        self._next_id = 0

    def editor(self, axis: str, index: int) -> SliceEditor:
        key = (axis, int(index))
        if key not in self.editors:
            self.editors[key] = SliceEditor(axis, index, self.sizes[axis], (), self.debounce_s)
        return self.editors[key]

    def baseline(self, axis: str, index: int, items) -> None:
        """What the agent left on a slice (its mask is already shown): no edit, no recompute."""
        ed = self.editor(axis, index)
        ed.items, ed.shown = list(items), list(items)
        ed.state, ed.dirty, ed.error, ed.request = SHOWN, False, None, None

    def state(self, axis: str, index: int) -> str:
        ed = self.editors.get((axis, int(index)))
        return IDLE if ed is None else ed.state

    def update(self, axis: str, items_by_slice: dict[int, list], now: float | None = None) -> list[dict]:
        """Prompts now on the markups for the given slices (a slice missing from the dict is unchanged;
        give ``[]`` for a slice whose prompts were all deleted).  Returns the edits found."""
        now = self.clock() if now is None else now
        edits: list[dict] = []
        changed: dict[int, list] = {}
        removed: dict[str, tuple[int, PromptItem]] = {}
        added: dict[str, tuple[int, PromptItem]] = {}
        for index, new_items in items_by_slice.items():
            ed = self.editor(axis, index)
            old = {it.id: it for it in ed.items}
            new = {it.id: it for it in new_items}
            for pid, it in old.items():
                if pid not in new:
                    removed[pid] = (index, it)
            moved = False
            for pid, it in new.items():
                if pid not in old:
                    added[pid] = (index, it)
                elif _moved(old[pid].coords, it.coords, self.tolerance_px) or old[pid].positive != it.positive:
                    edits.append(self._edit(axis, index, old[pid], it))
                    moved = True
            if moved or set(old) != set(new):
                # keep the known order; newcomers after, in the order the markups list them
                changed[index] = [new[pid] for pid in old if pid in new] + [it for pid, it in new.items()
                                                                            if pid not in old]
        for pid in list(removed):
            if pid in added:  # dragged from one slice to another
                (src, before), (dst, after) = removed.pop(pid), added.pop(pid)
                edits.append({"edit": f"move_{after.kind}", "from_slice": src,
                              **self._fields(axis, dst, before, after)})
        for pid, (index, it) in removed.items():
            edits.append({"edit": f"delete_{it.kind}", **self._fields(axis, index, it, None)})
        for pid, (index, it) in added.items():
            edits.append({"edit": f"add_{it.kind}", **self._fields(axis, index, None, it)})
        for index, ordered in changed.items():
            self.editor(axis, index).replace(ordered, now)
        for e in edits:
            e["time"] = time.time()
            self.trajectory.append(e)
        return edits

    def _fields(self, axis: str, index: int, before: PromptItem | None, after: PromptItem | None) -> dict:
        it = after or before
        return {"author": "user", "axis": axis, "slice": int(index), "id": it.id,
                "before": None if before is None else list(before.coords),
                "after": None if after is None else list(after.coords), "positive": it.positive}

    def _edit(self, axis: str, index: int, before: PromptItem, after: PromptItem) -> dict:
        if before.kind == "box":
            bw, bh = before.coords[2] - before.coords[0], before.coords[3] - before.coords[1]
            aw, ah = after.coords[2] - after.coords[0], after.coords[3] - after.coords[1]
            kind = "resize_box" if _moved((bw, bh), (aw, ah), self.tolerance_px) else "move_box"
        elif before.positive != after.positive:
            kind = "flip_point"
        else:
            kind = "move_point"
        return {"edit": kind, **self._fields(axis, index, before, after)}

    def due_requests(self, now: float | None = None) -> list[Request]:
        """Requests to send now (slices whose edits have been quiet for ``debounce_s``)."""
        now = self.clock() if now is None else now
        out = []
        for ed in self.editors.values():
            if ed.due(now):
                self._next_id += 1
                out.append(ed.start(self._next_id))
        return out

    def next_deadline(self) -> float | None:
        """When the next debounced recompute falls due (for the module's timer), or None."""
        times = [ed.deadline for ed in self.editors.values() if ed.state == EDITING]
        return min(times) if times else None

    def finish(self, request: Request, error: str | None = None, now: float | None = None) -> bool:
        """Record a request's answer; True when its mask should be written into the segment."""
        now = self.clock() if now is None else now
        ed = self.editors.get((request.axis, request.slice))
        return False if ed is None else ed.finish(request.id, error, now)

    def recompute_now(self, axis: str, index: int) -> None:
        """Ask for a recompute of a slice at the next :meth:`due_requests` (after a worker restart, for example)."""
        ed = self.editor(axis, index)
        if ed.state == RECOMPUTING:
            ed.dirty = True
        else:
            ed.state, ed.deadline = EDITING, self.clock()


# ---------------------------------------------------------------------- reading prompts off the markups
def point_item(geometry, axis: str, pid: str, position_ras, positive: bool, turn: int | None = None):
    """A control point (RAS) -> (slice index, PromptItem), or None when it lies outside the volume's slices."""
    x, y, z = geometry.ras_to_pixel(axis, position_ras)
    index = int(round(z))
    if not 0 <= index < geometry.num_slices(axis):
        return None
    return index, PromptItem(pid, "point", (x, y), bool(positive), turn)


def box_item(geometry, axis: str, rid: str, object_to_ras, size, turn: int | None = None):
    """An ROI (ObjectToRAS 4x4, size mm) -> (slice index of its centre, PromptItem), or None outside the volume."""
    obj = np.asarray(object_to_ras, float).reshape(4, 4)
    _, _, z = geometry.ras_to_pixel(axis, obj[:3, 3])
    if not 0 <= int(round(z)) < geometry.num_slices(axis):
        return None
    index, box = geometry.roi_to_box(axis, obj, size)
    return index, PromptItem(rid, "box", tuple(float(v) for v in box), True, turn)


def by_slice(pairs, slices=()) -> dict[int, list]:
    """(slice, PromptItem) pairs -> {slice: [items, agent's by turn first, then the annotator's]}.

    ``slices``: slices to include even with no prompt left (so deletions are seen)."""
    out: dict[int, list] = {int(s): [] for s in slices}
    for index, item in pairs:
        out.setdefault(int(index), []).append(item)
    for index, items in out.items():
        agent = sorted((i for i in items if i.turn is not None), key=lambda i: i.turn)
        out[index] = agent + [i for i in items if i.turn is None]
    return out
