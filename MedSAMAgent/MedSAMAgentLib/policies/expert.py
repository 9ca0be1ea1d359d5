"""The oracle annotator: reads the reference mask and acts as an expert would.

First action (``first_action``):

* ``"box"`` -- the reference's bounding box, each side moved by a uniform random
  amount up to ``box_jitter`` x the box's width (x sides) or height (y sides);
* ``"point"`` -- a positive click at the peak of the reference's distance
  transform (the point deepest inside the target).

Then corrective clicks: of the false-negative (missed) and false-positive
(extra) regions of the current mask, the larger one gets a click at the peak of
its distance transform (positive for missed, negative for extra).  It stops
when IoU reaches ``iou_target``; when a corrective click gained no more than
``min_gain`` IoU (by default: when IoU stopped improving); or at once on an
empty reference (nothing to segment).  Random choices
come from ``seed`` and the episode id, so a run is reproducible.

Trajectory synthesis (``medsam_training.synthesis``) places its actions by the same
rules (:func:`deepest_point`, the larger error region) but also *tries* each one
with the tool and keeps it only when IoU rises by ``tau``, with other candidates
after a failed try; a policy cannot look ahead like that, so this expert may keep
a click that lowered IoU (and then stop).  It is a strong reference for
evaluation, not a bound on what synthesis reaches.
"""
from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from ..actions import Action, Stop, box_from_pixels, format_action, point_from_pixels
from ..metrics import iou
from .base import Decision, Observation, PolicyError


@dataclass(frozen=True)
class ExpertConfig:
    first_action: str = "box"  # "box" or "point"
    box_jitter: float = 0.05  # fraction of the box's width/height, per side
    iou_target: float = 0.95
    min_gain: float = 0.0  # stop once an action gains no more IoU than this
    seed: int = 0


def deepest_point(region: np.ndarray) -> tuple[int, int]:
    """(x, y) pixel of ``region`` farthest from its border (the image edge counts as border)."""
    dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(x), int(y)


def jittered_box(reference: np.ndarray, jitter: float, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """The reference's bounding box (pixel index coords) with each side moved randomly."""
    ys, xs = np.nonzero(reference)
    x1, x2, y1, y2 = float(xs.min()), float(xs.max()), float(ys.min()), float(ys.max())
    bw, bh = x2 - x1 + 1, y2 - y1 + 1
    if jitter > 0:
        dx = rng.uniform(-jitter, jitter, 2) * bw
        dy = rng.uniform(-jitter, jitter, 2) * bh
        x1, x2, y1, y2 = x1 + dx[0], x2 + dx[1], y1 + dy[0], y2 + dy[1]
    h, w = reference.shape
    return (float(np.clip(x1, 0, w - 1)), float(np.clip(y1, 0, h - 1)),
            float(np.clip(x2, 0, w - 1)), float(np.clip(y2, 0, h - 1)))


def corrective_click(mask: np.ndarray, reference: np.ndarray) -> tuple[int, int, bool] | None:
    """(x, y, positive) at the deepest pixel of the larger error region; None when there is no error."""
    missed = reference & ~mask
    extra = mask & ~reference
    n_missed, n_extra = int(missed.sum()), int(extra.sum())
    if n_missed == 0 and n_extra == 0:
        return None
    positive = n_missed >= n_extra
    x, y = deepest_point(missed if positive else extra)
    return x, y, positive


class ExpertPolicy:
    name = "expert"
    reads_reference = True  # every episode needs its reference mask (callers check before a run)

    def __init__(self, config: ExpertConfig | None = None, **overrides):
        self.config = config or ExpertConfig(**overrides)
        if self.config.first_action not in ("box", "point"):
            raise PolicyError(f"first_action must be 'box' or 'point', got '{self.config.first_action}'.")

    def params(self) -> dict:
        return asdict(self.config)

    def rng(self, episode_id: str) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, zlib.crc32(episode_id.encode())])

    def act(self, observations: Sequence[Observation]) -> list[Decision]:
        out = []
        for obs in observations:
            action = self.decide(obs)
            out.append(Decision(format_action(action), action))
        return out

    def decide(self, obs: Observation) -> Action:
        if obs.reference is None:
            raise PolicyError("The expert policy needs the reference mask of every episode.")
        ref = np.asarray(obs.reference, dtype=bool)
        h, w = ref.shape
        if not ref.any():
            return Stop()
        cfg = self.config
        if obs.turn == 0 or obs.current_mask is None:
            if cfg.first_action == "box":
                return box_from_pixels(*jittered_box(ref, cfg.box_jitter, self.rng(obs.episode_id)), w, h)
            x, y = deepest_point(ref)
            return point_from_pixels(x, y, True, w, h)
        mask = np.asarray(obs.current_mask, dtype=bool)
        now = iou(mask, ref)
        before = iou(obs.masks[-2], ref) if len(obs.masks) >= 2 else 0.0
        if now >= cfg.iou_target or (len(obs.masks) >= 2 and now - before <= cfg.min_gain):
            return Stop()
        click = corrective_click(mask, ref)
        if click is None:
            return Stop()
        return point_from_pixels(click[0], click[1], click[2], w, h)


def region_peaks(region: np.ndarray, count: int, min_separation: int = 5) -> list[tuple[int, int]]:
    """Up to ``count`` local maxima (x, y) of ``region``'s distance transform, deepest first.

    Peaks closer than ``min_separation`` pixels to a deeper one are skipped, so the
    candidates are genuinely different places.
    """
    if not region.any():
        return []
    dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    size = 2 * min_separation + 1
    peaks = (dist == ndimage.maximum_filter(dist, size=size)) & (dist > 0)
    ys, xs = np.nonzero(peaks)
    order = np.argsort(-dist[ys, xs], kind="stable")
    chosen: list[tuple[int, int]] = []
    for i in order:
        x, y = int(xs[i]), int(ys[i])
        if all((x - cx) ** 2 + (y - cy) ** 2 >= min_separation ** 2 for cx, cy in chosen):
            chosen.append((x, y))
            if len(chosen) == count:
                break
    return chosen


def click_candidates(mask: np.ndarray, reference: np.ndarray, per_region: int = 3) -> list[tuple[int, int, bool]]:
    """Corrective clicks to try, best first: peaks of the larger error region, then of the other one.

    Each is (x, y, positive): positive in missed (false-negative) pixels, negative in extra ones.
    The first candidate is :func:`corrective_click`'s choice.
    """
    missed = reference & ~mask
    extra = mask & ~reference
    regions = [(missed, True), (extra, False)]
    if int(extra.sum()) > int(missed.sum()):
        regions.reverse()
    return [(x, y, positive) for region, positive in regions for x, y in region_peaks(region, per_region)]
