"""Expert trajectory synthesis: the hybrid Box-to-Point / Sequential-Click strategy, checked step by step.

For each slice sample (a display image and its reference mask) one trajectory:

* **Box-to-Point** (``box_fraction`` of samples): a box around the reference,
  each side jittered by up to ``box_jitter`` of the box size; then corrective clicks.
* **Sequential-Click**: a positive click at the deepest point of the target; then
  corrective clicks.
* Corrective clicks: candidates are the distance-transform peaks of the larger
  error region (missed or extra pixels), then of the other one.  An action is
  kept only when the tool's new mask raises IoU by at least ``tau``; otherwise
  the next candidate (another jitter for a box, another peak for a click) is
  tried, up to ``retries`` extra tries per step.  Synthesis stops when IoU
  reaches ``iou_target``, when no candidate makes progress, or at ``max_turns``
  (the final stop counts as a turn).  The last action of every kept trajectory
  is ``stop_action``.
* A trajectory whose first action cannot make progress is pruned (and counted).
* Negative episodes (slices without the target, optional) are a lone stop.

Every random choice comes from ``seed`` and the sample's key, so the same seed
gives the same records.  Actions go through the grid exactly as a policy's
would (grid -> :func:`~MedSAMAgentLib.actions.to_pixels`), so replaying a
record's actions with the same tool reproduces its masks.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from MedSAMAgentLib.actions import Stop, action_to_call, box_from_pixels, point_from_pixels, to_pixels
from MedSAMAgentLib.masks import encode_rle
from MedSAMAgentLib.metrics import iou
from MedSAMAgentLib.policies.expert import click_candidates, deepest_point, jittered_box, region_peaks

RECORD_VERSION = 1


@dataclass(frozen=True)
class SynthesisConfig:
    box_fraction: float = 0.5  # share of Box-to-Point trajectories; the rest are Sequential-Click
    box_jitter: float = 0.1  # per side, fraction of the box's width/height
    tau: float = 0.01  # minimum IoU gain for an action to be kept
    retries: int = 3  # extra candidates tried per step
    iou_target: float = 0.9
    max_turns: int = 5  # policy turns, the final stop included
    negatives: bool = False  # add one slice without the target per unit (answer: stop)
    seed: int = 0
    axis: str = "axial"
    sampling: str = "all"  # all | every:K | count:N slices containing the target
    min_area: int = 20  # pixels; smaller targets are skipped

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Outcome:
    """A kept ``record`` or a pruned sample with its ``reason``."""

    record: dict | None = None
    reason: str | None = None


def sample_rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


class Synthesizer:
    """Makes trajectories for slice samples with a real tool."""

    def __init__(self, tool, config: SynthesisConfig | None = None, tool_spec: dict | None = None):
        self.tool = tool
        self.config = config or SynthesisConfig()
        self.tool_spec = tool_spec or {"name": getattr(tool, "name", "")}

    def _try(self, key, prompts, state, action, w, h, reference):
        prompt = to_pixels(action, w, h)
        result = self.tool.segment(key, prompts + [prompt], state)
        mask = np.asarray(result.mask, dtype=bool)
        return prompt, result, mask, iou(mask, reference)

    def first_candidates(self, strategy: str, reference: np.ndarray, rng: np.random.Generator, w: int, h: int):
        cfg = self.config
        if strategy == "box_to_point":
            yield box_from_pixels(*jittered_box(reference, cfg.box_jitter, rng), w, h)
            for _ in range(cfg.retries):
                yield box_from_pixels(*jittered_box(reference, cfg.box_jitter, rng), w, h)
        else:
            x, y = deepest_point(reference)
            yield point_from_pixels(x, y, True, w, h)
            for x, y in region_peaks(reference, cfg.retries + 1)[1:]:
                yield point_from_pixels(x, y, True, w, h)

    def run(self, sample) -> Outcome:
        cfg = self.config
        t0 = time.perf_counter()
        rng = sample_rng(cfg.seed, sample.key)
        reference = np.asarray(sample.reference, dtype=bool)
        h, w = reference.shape
        key, = self.tool.prepare([sample.rgb])
        strategy = "box_to_point" if rng.random() < cfg.box_fraction else "sequential_click"
        base = {"version": RECORD_VERSION, "id": sample.key, "case": sample.case, "target": sample.target,
                "source": sample.source, "image_size": [w, h], "params": cfg.to_dict(), "tool": self.tool_spec,
                "seed": cfg.seed}
        if not reference.any():
            return Outcome({**base, "strategy": "negative", "actions": [action_to_call(Stop())], "masks": [],
                            "ious": [], "retries": [], "seconds": round(time.perf_counter() - t0, 4)})
        actions, masks, ious, retries = [], [], [], []
        prompts: list = []
        state: Any = None
        current = 0.0
        for turn in range(cfg.max_turns - 1):  # leave the last turn for the stop
            if turn == 0:
                candidates = self.first_candidates(strategy, reference, rng, w, h)
            else:
                found = click_candidates(masks[-1], reference, per_region=cfg.retries + 1)
                candidates = (point_from_pixels(x, y, pos, w, h) for x, y, pos in found[:cfg.retries + 1])
            accepted = None
            for tries, action in enumerate(candidates):
                prompt, result, mask, score = self._try(key, prompts, state, action, w, h, reference)
                if score - current >= cfg.tau:
                    accepted = (action, prompt, result, mask, score, tries)
                    break
            if accepted is None:
                if turn == 0:
                    return Outcome(reason="first action made no progress")
                break
            action, prompt, result, mask, score, tries = accepted
            actions.append(action_to_call(action))
            masks.append(mask)
            ious.append(round(score, 6))
            retries.append(tries)
            prompts.append(prompt)
            state = result.state
            current = score
            if current >= cfg.iou_target:
                break
        actions.append(action_to_call(Stop()))
        return Outcome({**base, "strategy": strategy, "actions": actions, "masks": [encode_rle(m) for m in masks],
                        "ious": ious, "retries": retries, "seconds": round(time.perf_counter() - t0, 4)})
