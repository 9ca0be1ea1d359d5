"""What to draw for each worker event: plain instructions the Slicer module carries out.

:class:`MarkupPlanner` turns the worker's run events (see
:mod:`MedSAMAgentLib.worker.protocol`) into a list of instructions:

* :class:`BeginUndoStep` before each box or click, so one agent action (its
  markup and the mask after it) is one undo step;
* :class:`AddBox`: an ROI markup lying in the slice plane;
* :class:`AddPoint`: a control point in the markups node of its sign
  (positive / negative), labelled ``s{slice}-t{turn}`` with a 1-based turn;
* :class:`WriteMaskSlice`: the mask of exactly one slice (extent and voxels),
  only when it differs from what the planner last wrote there;
* :class:`ClearSliceMarkups`: a fresh run replaces what was on a slice;
* :class:`ShowStatus` and :class:`RunFinished`.

The planner never touches Slicer; the module maps each instruction to MRML
calls, which keeps this part testable event by event.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from ..masks import decode_rle
from .geometry import VolumeGeometry

POSITIVE_COLOR = (0.18, 0.80, 0.25)  # green, as in the overlays
NEGATIVE_COLOR = (0.90, 0.20, 0.20)  # red
BOX_COLOR = (1.00, 0.85, 0.10)  # yellow


@dataclass(frozen=True)
class BeginUndoStep:
    label: str
    axis: str
    slice: int


@dataclass(frozen=True)
class AddBox:
    axis: str
    slice: int
    turn: int  # the worker's 0-based turn
    run: str
    author: str
    label: str
    pixels: tuple  # (x1, y1, x2, y2), slice pixel index coordinates
    object_to_ras: tuple  # 4x4 nested tuples: ROI axes (columns 0-2) and centre (column 3)
    size: tuple  # mm along the ROI's x, y, z


@dataclass(frozen=True)
class AddPoint:
    axis: str
    slice: int
    turn: int
    run: str
    author: str
    positive: bool
    label: str
    pixel: tuple  # (x, y)
    position_ras: tuple  # (3,)


@dataclass(frozen=True, eq=False)
class WriteMaskSlice:
    axis: str
    slice: int
    extent: tuple  # (i0, i1, j0, j1, k0, k1), inclusive
    block: np.ndarray = field(repr=False)  # uint8 [k, j, i] over the extent
    voxels: int = 0


@dataclass(frozen=True)
class ClearSliceMarkups:
    axis: str
    slice: int


@dataclass(frozen=True)
class ShowStatus:
    text: str
    level: str = "info"  # info | warning | error


@dataclass(frozen=True)
class RunFinished:
    status: str  # done | cancelled | failed
    reason: str | None = None


def point_label(slice_index: int, turn: int | None) -> str:
    """``s12-t2`` for the agent's second turn on slice 12; ``s12-user`` for a point the annotator added."""
    return f"s{slice_index}-user" if turn is None else f"s{slice_index}-t{turn + 1}"


def _nested(m: np.ndarray) -> tuple:
    return tuple(tuple(float(v) for v in row) for row in m)


class MarkupPlanner:
    """Turns one volume's worker events into drawing instructions (see the module docstring).

    It remembers, per slice, the mask it last asked to write, so an unchanged
    mask (a stop, the ``slice_done`` repeat of the last mask) writes nothing.
    """

    def __init__(self, geometry: VolumeGeometry):
        self.geometry = geometry
        self._written: dict[tuple[str, int], np.ndarray | None] = {}
        self._fresh: dict[str, bool] = {}  # run id -> a fresh run (replaces slices) rather than "continue"
        self._touched: set[tuple[str, str, int]] = set()  # (run, axis, slice) already cleared for a fresh run

    def forget(self, axis: str, index: int) -> None:
        """The slice's segment content changed outside the planner (undo, override): write the next mask."""
        self._written.pop((axis, int(index)), None)

    def written_mask(self, axis: str, index: int) -> np.ndarray | None:
        return self._written.get((axis, int(index)))

    def mask_instruction(self, axis: str, index: int, mask: np.ndarray, force: bool = False) -> list:
        """[WriteMaskSlice] when ``mask`` (H x W bool) differs from what was last written there, else []."""
        key = (axis, int(index))
        mask = np.asarray(mask, bool)
        last = self._written.get(key)
        if not force and last is not None and last.shape == mask.shape and np.array_equal(last, mask):
            return []
        extent, block = self.geometry.mask_block(axis, index, mask)
        self._written[key] = mask.copy()
        return [WriteMaskSlice(axis, int(index), extent, block, int(mask.sum()))]

    def _begin_slice(self, run: str, axis: str, index: int) -> list:
        key = (run, axis, index)
        if key in self._touched:
            return []
        self._touched.add(key)
        if not self._fresh.get(run, True):
            return []
        self._written.pop((axis, index), None)  # unknown now: the slice_done mask is written even if empty
        # its own undo step first: undoing it puts the slice's earlier prompts back (a person's too)
        return [BeginUndoStep(f"MedSAM Agent: new run on slice {index}", axis, index), ClearSliceMarkups(axis, index)]

    def plan(self, event: dict) -> list:
        """The instructions for one worker event (a dict as the event stream yields it)."""
        kind = event.get("type")
        run = event.get("run", "")
        if kind == "run_started":
            self._fresh[run] = event.get("kind") != "continue"
            return [ShowStatus(f"Segmenting {event.get('target', '')} along {event.get('axis', 'axial')}...")]
        if kind == "client_error":
            return [RunFinished("failed", event.get("reason"))]
        if kind == "run_done":
            return [RunFinished(event.get("status", "done"), event.get("reason"))]
        axis, index = event.get("axis", "axial"), int(event.get("slice", 0))
        if kind == "action":
            return self._action(event, run, axis, index)
        if kind == "mask":
            return self._begin_slice(run, axis, index) + self.mask_instruction(axis, index, decode_rle(event["mask"]))
        if kind == "slice_done":
            out = self._begin_slice(run, axis, index) + self.mask_instruction(axis, index, decode_rle(event["mask"]))
            if event.get("failure"):
                out.append(ShowStatus(f"Slice {index}: {event['failure']}", "warning"))
            return out
        if kind == "error":
            turn = int(event.get("turn", 0)) + 1
            return [ShowStatus(f"Slice {index}, turn {turn}: {event.get('reason')}", "warning")]
        return []

    def _action(self, event: dict, run: str, axis: str, index: int) -> list:
        out = self._begin_slice(run, axis, index)
        turn = int(event.get("turn", 0))
        name = (event.get("action") or {}).get("name", "")
        pixels = event.get("pixels")
        author = "user" if event.get("actor") == "user" else "agent"
        if not pixels:
            if name == "stop_action":
                return out + [ShowStatus(f"Slice {index}: the agent stopped at turn {turn + 1}.")]
            return out + [ShowStatus(f"Slice {index}, turn {turn + 1}: the policy's answer was not a valid action.",
                                     "warning")]
        if "box" in pixels:
            box = tuple(float(v) for v in pixels["box"])
            obj, size = self.geometry.box_to_roi(axis, index, box)
            return out + [BeginUndoStep(f"MedSAM Agent: box on slice {index}, turn {turn + 1}", axis, index),
                          AddBox(axis, index, turn, run, author, f"s{index}-t{turn + 1}", box, _nested(obj),
                                 tuple(float(v) for v in size))]
        x, y = (float(v) for v in pixels["point"])
        positive = bool(pixels.get("positive", True))
        ras = self.geometry.pixel_to_ras(axis, index, x, y)
        sign = "positive" if positive else "negative"
        return out + [BeginUndoStep(f"MedSAM Agent: {sign} point on slice {index}, turn {turn + 1}", axis, index),
                      AddPoint(axis, index, turn, run, author, positive, point_label(index, turn), (x, y),
                               tuple(float(v) for v in ras))]


def markup_description(axis: str, slice_index: int, turn: int | None, run: str = "", author: str = "agent") -> str:
    """What the module stores in a control point's description (or an ROI's attribute): where it came from."""
    return json.dumps({"medsam": 1, "axis": axis, "slice": int(slice_index), "turn": turn, "run": run,
                       "author": author})


def parse_description(text: str | None) -> dict:
    """The dict :func:`markup_description` wrote, or {} for anything else (a point the annotator added)."""
    try:
        data = json.loads(text or "")
    except ValueError:
        return {}
    return data if isinstance(data, dict) and data.get("medsam") == 1 else {}
