"""Actions the policy can take, the parser for a model's text, and the formatter back.

Actions live on the 0-999 grid (see :mod:`grid`); ``to_pixels`` turns them into
pixel prompts for a tool.  The wire form is the Qwen3 tool call the released
checkpoint was trained on::

    <tool_call>
    {"name": "add_bbox", "arguments": {"bbox_2d": [x1, y1, x2, y2]}}
    </tool_call>

Parsing rules (``parse_action`` never raises; it returns an action or a
:class:`ParseFailure` with the reason):

* whitespace, text before/after the call, and Markdown code fences are tolerated;
* exactly one ``<tool_call>`` block is expected; several blocks fail
  (``several tool calls``).  A single block whose closing tag is missing (output
  cut at the token limit) is accepted when its JSON is complete.  With no tags at
  all, one bare JSON object with a ``"name"`` key is accepted;
* the tool name must be ``add_bbox``, ``add_point`` or ``stop_action``;
* ``arguments`` must be an object (a JSON string holding an object is also
  accepted); it may be omitted for ``stop_action``.  Keys the schema does not name
  are ignored (the schemas do not forbid additional properties);
* ``bbox_2d`` needs exactly 4 numbers, ``point_2d`` exactly 2; booleans, strings,
  NaN and infinities are rejected; floats are rounded to the nearest integer;
  every value must lie in ``0..999`` after rounding (out-of-range values are
  rejected, not clipped);
* a box whose corners come reversed is reordered; a box with no width or no
  height is rejected;
* ``point_type`` must be ``positive`` or ``negative`` (case and surrounding
  spaces ignored).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Union

from .grid import GRID_MAX, grid_to_pixel, pixel_to_grid

TOOL_NAMES = ("add_bbox", "add_point", "stop_action")
MAX_TEXT_CHARS = 20_000


@dataclass(frozen=True)
class Box:
    """A box on the 0-999 grid, corners inclusive, x1 < x2 and y1 < y2."""

    x1: int
    y1: int
    x2: int
    y2: int
    name = "add_bbox"

    def arguments(self) -> dict:
        return {"bbox_2d": [self.x1, self.y1, self.x2, self.y2]}


@dataclass(frozen=True)
class Point:
    """A click on the 0-999 grid; positive adds to the mask, negative removes."""

    x: int
    y: int
    positive: bool
    name = "add_point"

    def arguments(self) -> dict:
        return {"point_2d": [self.x, self.y], "point_type": "positive" if self.positive else "negative"}


@dataclass(frozen=True)
class Stop:
    """The policy declares the mask finished."""

    name = "stop_action"

    def arguments(self) -> dict:
        return {}


@dataclass(frozen=True)
class ParseFailure:
    """A model output that is not exactly one valid action; ``reason`` says why."""

    reason: str
    text: str = ""


Action = Union[Box, Point, Stop]


@dataclass(frozen=True)
class PixelBox:
    """A box in pixel index coordinates (floats, x1 <= x2, y1 <= y2)."""

    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True)
class PixelPoint:
    """A click in pixel index coordinates (floats)."""

    x: float
    y: float
    positive: bool


Prompt = Union[PixelBox, PixelPoint]


# --------------------------------------------------------------------------- formatting

def action_to_call(action: Action) -> dict:
    """Action -> ``{"name": ..., "arguments": {...}}`` (the JSON inside a tool call)."""
    return {"name": action.name, "arguments": action.arguments()}


def format_action(action: Action) -> str:
    """Action -> the assistant text the model writes (Qwen3 tool-call style)."""
    return "<tool_call>\n" + json.dumps(action_to_call(action), ensure_ascii=False) + "\n</tool_call>"


# --------------------------------------------------------------------------- grid <-> pixels

def to_pixels(action: Action, width: int, height: int, rule: str = "centre") -> Prompt | None:
    """Grid action -> pixel prompt for an image of ``width`` x ``height``; Stop -> None.  ``rule``: the grid
    rule (:func:`grid.grid_to_pixel`; a profile's ``grid_rule``)."""
    if isinstance(action, Box):
        x1, x2 = sorted((grid_to_pixel(action.x1, width, rule=rule), grid_to_pixel(action.x2, width, rule=rule)))
        y1, y2 = sorted((grid_to_pixel(action.y1, height, rule=rule), grid_to_pixel(action.y2, height, rule=rule)))
        return PixelBox(x1, y1, x2, y2)
    if isinstance(action, Point):
        return PixelPoint(grid_to_pixel(action.x, width, rule=rule), grid_to_pixel(action.y, height, rule=rule),
                          action.positive)
    return None


def box_from_pixels(x1: float, y1: float, x2: float, y2: float, width: int, height: int) -> Box:
    """Pixel box (index coordinates) -> grid Box; a box thinner than one grid step is widened."""
    gx1, gx2 = sorted((pixel_to_grid(x1, width), pixel_to_grid(x2, width)))
    gy1, gy2 = sorted((pixel_to_grid(y1, height), pixel_to_grid(y2, height)))
    if gx1 == gx2:
        gx1, gx2 = (gx1 - 1, gx2) if gx2 == GRID_MAX else (gx1, gx2 + 1)
    if gy1 == gy2:
        gy1, gy2 = (gy1 - 1, gy2) if gy2 == GRID_MAX else (gy1, gy2 + 1)
    return Box(gx1, gy1, gx2, gy2)


def point_from_pixels(x: float, y: float, positive: bool, width: int, height: int) -> Point:
    """Pixel click (index coordinates) -> grid Point."""
    return Point(pixel_to_grid(x, width), pixel_to_grid(y, height), bool(positive))


# --------------------------------------------------------------------------- parsing

_CALL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_FENCE = re.compile(r"```[A-Za-z0-9_-]*")
_DECODER = json.JSONDecoder()


def _json_objects(text: str) -> list[Any]:
    """Every JSON object that starts at a '{' of ``text`` and does not overlap an earlier one."""
    found, i = [], 0
    while True:
        i = text.find("{", i)
        if i < 0:
            return found
        try:
            obj, end = _DECODER.raw_decode(text, i)
        except (ValueError, RecursionError):
            i += 1
            continue
        found.append(obj)
        i = end


def _integer(value: Any, what: str) -> int | str:
    """A grid coordinate as int, or the reason it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{what} must be a number, got {json.dumps(value)[:40]}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{what} must be finite"
    v = int(round(value))
    if not 0 <= v <= GRID_MAX:
        return f"{what} = {v} is outside 0..{GRID_MAX}"
    return v


def _coordinates(args: dict, key: str, count: int, labels: str) -> list[int] | str:
    if key not in args:
        return f"missing argument '{key}'"
    values = args[key]
    if not isinstance(values, list) or len(values) != count:
        return f"'{key}' must be a list of {count} numbers"
    out = []
    for label, v in zip(labels.split(","), values):
        r = _integer(v, label)
        if isinstance(r, str):
            return r
        out.append(r)
    return out


def action_from_call(name: Any, arguments: Any = None, text: str = "") -> Action | ParseFailure:
    """Validate a tool name and its arguments (as decoded JSON) into an action."""
    if not isinstance(name, str):
        return ParseFailure("the tool name must be a string", text)
    if name not in TOOL_NAMES:
        return ParseFailure(f"unknown tool '{name[:40]}' (expected add_bbox, add_point or stop_action)", text)
    if arguments is None:
        if name != "stop_action":
            return ParseFailure(f"{name} needs arguments", text)
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return ParseFailure("arguments are a string that is not JSON", text)
    if not isinstance(arguments, dict):
        return ParseFailure("arguments must be a JSON object", text)
    if name == "stop_action":
        return Stop()
    if name == "add_bbox":
        c = _coordinates(arguments, "bbox_2d", 4, "x1,y1,x2,y2")
        if isinstance(c, str):
            return ParseFailure(c, text)
        x1, x2 = sorted((c[0], c[2]))
        y1, y2 = sorted((c[1], c[3]))
        if x1 == x2 or y1 == y2:
            return ParseFailure("the box has no area (x1 == x2 or y1 == y2)", text)
        return Box(x1, y1, x2, y2)
    c = _coordinates(arguments, "point_2d", 2, "x,y")
    if isinstance(c, str):
        return ParseFailure(c, text)
    kind = arguments.get("point_type")
    if not isinstance(kind, str) or kind.strip().lower() not in ("positive", "negative"):
        return ParseFailure("point_type must be 'positive' or 'negative'", text)
    return Point(c[0], c[1], kind.strip().lower() == "positive")


def action_from_dict(call: dict) -> Action | ParseFailure:
    """``{"name": ..., "arguments": ...}`` -> action (the inverse of :func:`action_to_call`)."""
    if not isinstance(call, dict):
        return ParseFailure("a tool call must be a JSON object")
    return action_from_call(call.get("name"), call.get("arguments"))


def parse_action(text: Any) -> Action | ParseFailure:
    """A model's raw output -> exactly one action, or a :class:`ParseFailure`. Never raises."""
    try:
        return _parse(text)
    except Exception as exc:  # noqa: BLE001 - the contract is: never raise to the caller
        return ParseFailure(f"unparseable output ({type(exc).__name__})", str(text)[:200])


def _parse(text: Any) -> Action | ParseFailure:
    if not isinstance(text, str):
        return ParseFailure("the model output is not text")
    if len(text) > MAX_TEXT_CHARS:
        return ParseFailure(f"the model output is longer than {MAX_TEXT_CHARS} characters", text[:200])
    blocks = _CALL_BLOCK.findall(text)
    opened = text.count("<tool_call>")
    if len(blocks) > 1 or opened > 1:
        return ParseFailure("several tool calls in one turn (exactly one is expected)", text)
    if blocks:
        payload = blocks[0]
    elif opened == 1:
        payload = text.split("<tool_call>", 1)[1]  # closing tag cut off
    else:
        payload = text
    payload = _FENCE.sub(" ", payload)
    calls = [o for o in _json_objects(payload) if isinstance(o, dict) and ("name" in o or blocks or opened)]
    if not calls:
        return ParseFailure("no tool call found" if not (blocks or opened) else "the tool call holds no valid JSON object", text)
    if len(calls) > 1:
        return ParseFailure("several tool calls in one turn (exactly one is expected)", text)
    call = calls[0]
    if "name" not in call:
        return ParseFailure("the tool call has no 'name'", text)
    return action_from_call(call["name"], call.get("arguments"), text)


# --------------------------------------------------------------------------- the reference's parser

_REFERENCE_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)
_UNQUOTED_KEY = re.compile(r'([,{]\s*)([a-zA-Z_]\w*)(\s*":\s*)')


def _reference_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def parse_reference(text: Any) -> tuple[Action | ParseFailure, str | None]:
    """A reply read as the authors' evaluation scripts read it (``process_response`` in
    infer/models/model_loader.py, CUHK-AIM-Group/MedSAM-Agent at bfb43be), so that the released model is
    never refused a reply their code acted on.  Returns (action or ParseFailure, what was irregular or None).

    Their rules: the first ``<tool_call>{...}</tool_call>`` only (a reply without the tags is invalid); a key
    missing its opening quote is repaired (``{"x": 5, y": 6}``); ``add_bbox`` takes exactly four numbers,
    passed on as they are (outside 0..999, reversed or with no area); ``add_point`` takes the first two of
    ``point_2d`` (two or more) and a ``point_type`` of any case; the legacy ``add_positive_point`` /
    ``add_negative_point`` with ``x`` and ``y``; ``stop_action``.  Anything else is invalid (their loop then
    retries the turn).  Coordinates that are not finite numbers are invalid here (their code would fail)."""
    if not isinstance(text, str):
        return ParseFailure("the model output is not text"), None
    if len(text) > MAX_TEXT_CHARS:
        return ParseFailure(f"the model output is longer than {MAX_TEXT_CHARS} characters", text[:200]), None
    notes = []
    match = _REFERENCE_CALL.search(text)
    if not match:
        return ParseFailure("no <tool_call>{...}</tool_call> found", text), None
    if len(_REFERENCE_CALL.findall(text)) > 1:
        notes.append("several tool calls: the first one taken")
    raw = match.group(1)
    fixed = _UNQUOTED_KEY.sub(r'\1"\2\3', raw)
    if fixed != raw:
        notes.append("a key missing its opening quote repaired")
    try:
        call = json.loads(fixed)
    except (ValueError, RecursionError):
        return ParseFailure("the tool call holds no valid JSON object", text), None
    if not isinstance(call, dict):
        return ParseFailure("the tool call is not a JSON object", text), None
    name, args = call.get("name", ""), call.get("arguments", {})
    if not isinstance(args, dict):
        return ParseFailure("arguments must be a JSON object", text), None

    def done(action):
        return action, "; ".join(notes) or None

    def grid_note(values):
        if any(not 0 <= v <= GRID_MAX for v in values):
            notes.append("a coordinate outside 0..999 passed on")
        if any(v != int(v) for v in values):
            notes.append("a fractional coordinate passed on")

    if name == "add_bbox":
        box = args.get("bbox_2d")
        values = [_reference_number(v) for v in box] if isinstance(box, list) and len(box) == 4 else None
        if values is None or None in values:
            return ParseFailure("'bbox_2d' must be a list of 4 numbers", text), None
        grid_note(values)
        if values[0] >= values[2] or values[1] >= values[3]:
            notes.append("a box with reversed corners or no area passed on")
        return done(Box(*values))
    if name == "add_point":
        kind = str(args.get("point_type", "")).lower()
        point = args.get("point_2d")
        if kind not in ("positive", "negative") or not point:
            return ParseFailure("add_point needs point_type 'positive' or 'negative' and point_2d", text), None
        if not isinstance(point, list) or len(point) < 2:
            return ParseFailure("'point_2d' must be a list of 2 numbers", text), None
        values = [_reference_number(v) for v in point[:2]]
        if None in values:
            return ParseFailure("'point_2d' must hold numbers", text), None
        if len(point) > 2:
            notes.append(f"point_2d had {len(point)} numbers: the first two taken")
        if args.get("point_type") != kind:
            notes.append("point_type in another case")
        grid_note(values)
        return done(Point(values[0], values[1], kind == "positive"))
    if name in ("add_positive_point", "add_negative_point"):
        values = [_reference_number(args.get(k)) for k in ("x", "y")]
        if None in values:
            return ParseFailure(f"{name} needs numbers x and y", text), None
        notes.append(f"the legacy {name}")
        grid_note(values)
        return done(Point(values[0], values[1], name == "add_positive_point"))
    if name == "stop_action":
        return done(Stop())
    return ParseFailure(f"unknown tool '{str(name)[:40]}'", text), None
