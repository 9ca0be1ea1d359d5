"""What an episode leaves behind: its steps, masks, scores and timings, as JSON.

Masks are stored run-length encoded (:mod:`masks`) at the image's own
resolution; actions as tool-call dicts on the 0-999 grid plus their pixel
prompts (index coordinates of the full-resolution image).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .actions import PixelBox, PixelPoint, Prompt
from .masks import decode_rle, encode_rle, pack_mask, unpack_mask

STOP_REASONS = ("stop", "max_turns", "parse_failure", "tool_error", "cancelled")


def prompt_to_dict(prompt: Prompt | None) -> dict | None:
    if isinstance(prompt, PixelBox):
        return {"box": [prompt.x1, prompt.y1, prompt.x2, prompt.y2]}
    if isinstance(prompt, PixelPoint):
        return {"point": [prompt.x, prompt.y], "positive": prompt.positive}
    return None


def prompt_from_dict(data: dict | None) -> Prompt | None:
    if not data:
        return None
    if "box" in data:
        return PixelBox(*(float(v) for v in data["box"]))
    return PixelPoint(float(data["point"][0]), float(data["point"][1]), bool(data["positive"]))


def _num(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


@dataclass
class Step:
    """One policy turn: raw text, parsed action (grid), pixel prompt, resulting mask and scores.

    ``action`` is None when the text did not parse; ``mask`` (H x W bool) is None for stop and
    failed turns; it is kept bit-packed (a 500-slice volume's five turns a slice: about 80 MB, not
    650 MB), so reading it gives a new array each time: assign to change it.  ``dice``/``iou`` are
    against the reference (None without one).
    """

    turn: int
    text: str
    action: dict | None
    pixels: dict | None = None
    mask: np.ndarray | None = None
    score: float | None = None
    dice: float | None = None
    iou: float | None = None
    policy_s: float = 0.0
    tool_s: float = 0.0
    repaired: str | None = None  # an irregular reply the profile's parser accepted: what it had to repair

    def to_dict(self) -> dict:
        d = {"turn": self.turn, "text": self.text, "action": self.action, "pixels": self.pixels,
             "mask": None if self.mask is None else encode_rle(self.mask), "score": _num(self.score),
             "dice": _num(self.dice), "iou": _num(self.iou),
             "policy_s": round(self.policy_s, 6), "tool_s": round(self.tool_s, 6)}
        if self.repaired:
            d["repaired"] = self.repaired
        return d

    @property
    def has_mask(self) -> bool:
        return self.__dict__.get("_packed_mask") is not None

    @classmethod
    def from_dict(cls, d: dict) -> "Step":
        return cls(turn=int(d["turn"]), text=d.get("text", ""), action=d.get("action"), pixels=d.get("pixels"),
                   mask=None if d.get("mask") is None else decode_rle(d["mask"]), score=d.get("score"),
                   dice=d.get("dice"), iou=d.get("iou"), policy_s=float(d.get("policy_s", 0.0)),
                   tool_s=float(d.get("tool_s", 0.0)), repaired=d.get("repaired"))


def _get_step_mask(step: Step) -> np.ndarray | None:
    packed = step.__dict__.get("_packed_mask")
    return None if packed is None else unpack_mask(packed)


def _set_step_mask(step: Step, mask: np.ndarray | None) -> None:
    step.__dict__["_packed_mask"] = None if mask is None else pack_mask(mask)


Step.mask = property(_get_step_mask, _set_step_mask)  # after @dataclass: __init__ still takes ``mask=``


@dataclass
class Trajectory:
    """One episode. ``image_size`` is (width, height) in pixels; ``stop_reason`` one of
    :data:`STOP_REASONS`; ``failure`` says what went wrong for parse/tool failures."""

    episode_id: str
    target: str
    image_size: tuple
    steps: list = field(default_factory=list)
    stop_reason: str = "max_turns"
    failure: str | None = None
    retried_first_stop: bool = False
    retries: list = field(default_factory=list)  # replies asked again: {"turn", "text", "reason"}
    policy: str = ""
    tool: str = ""
    profile: str = ""
    encode_s: float = 0.0
    total_s: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def mask_steps(self) -> list:
        return [s for s in self.steps if s.has_mask]

    @property
    def final_mask(self) -> np.ndarray:
        """The last mask produced (H x W bool); all False when no action produced one."""
        masks = self.mask_steps
        if masks:
            return masks[-1].mask
        w, h = self.image_size
        return np.zeros((h, w), dtype=bool)

    @property
    def final_dice(self) -> float | None:
        masks = self.mask_steps
        return masks[-1].dice if masks else None

    @property
    def dice_per_turn(self) -> list:
        return [s.dice for s in self.mask_steps]

    @property
    def num_actions(self) -> int:
        """Box and click actions taken (stop and failed turns not counted)."""
        return len(self.mask_steps)

    def to_dict(self) -> dict:
        return {"episode_id": self.episode_id, "target": self.target, "image_size": list(self.image_size),
                "steps": [s.to_dict() for s in self.steps], "stop_reason": self.stop_reason,
                "failure": self.failure, "retried_first_stop": self.retried_first_stop,
                "retries": list(self.retries), "policy": self.policy,
                "tool": self.tool, "profile": self.profile, "encode_s": round(self.encode_s, 6),
                "total_s": round(self.total_s, 6), "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> "Trajectory":
        return cls(episode_id=d["episode_id"], target=d["target"], image_size=tuple(d["image_size"]),
                   steps=[Step.from_dict(s) for s in d.get("steps", [])], stop_reason=d.get("stop_reason", "max_turns"),
                   failure=d.get("failure"), retried_first_stop=bool(d.get("retried_first_stop", False)),
                   retries=list(d.get("retries", [])), policy=d.get("policy", ""), tool=d.get("tool", ""), profile=d.get("profile", ""),
                   encode_s=float(d.get("encode_s", 0.0)), total_s=float(d.get("total_s", 0.0)),
                   meta=d.get("meta", {}))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "Trajectory":
        return cls.from_dict(json.loads(text))


def save_trajectories(trajectories: list, path: str | Path, meta: dict | None = None) -> None:
    """Write trajectories as one JSON document ``{"meta": {...}, "trajectories": [...]}`` (atomically)."""
    from .durable import write_json

    write_json(path, {"meta": meta or {}, "trajectories": [t.to_dict() for t in trajectories]}, "the trajectory file",
               indent=None)


def load_trajectories(path: str | Path) -> list:
    """The trajectories of a file :func:`save_trajectories` wrote.  Raises ValueError saying what is
    wrong when the file is not one (not JSON, or the wrong shape or types)."""
    from .json_files import read_json_file

    data: Any = read_json_file(path, "the trajectory file")
    if not isinstance(data, dict) or not isinstance(data.get("trajectories"), list):
        raise ValueError('expected a JSON object {"trajectories": [...]}')
    trajectories = []
    for k, d in enumerate(data["trajectories"]):
        try:
            steps = d.get("steps", []) if isinstance(d, dict) else None
            if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
                raise TypeError("a trajectory must be a JSON object, its steps a list of objects")
            if not all(isinstance(s.get("text", ""), str) for s in steps):
                raise TypeError("a step's text must be a string")
            if not isinstance(d.get("episode_id"), str):
                raise TypeError(f"its episode_id must be a string (e.g. \"axial:12\"), not "
                                f"{json.dumps(d.get('episode_id'))[:40]}")
            for n, s in enumerate(steps):
                if s.get("mask") is not None:
                    try:
                        decode_rle(s["mask"], check_only=True)
                    except ValueError as exc:
                        raise TypeError(f"step {n}'s mask is malformed ({exc})") from None
            trajectories.append(Trajectory.from_dict(d))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            what = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ValueError(f"trajectory {k} is malformed: {what}") from None
    return trajectories
