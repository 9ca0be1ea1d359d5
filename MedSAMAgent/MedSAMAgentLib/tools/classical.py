"""A weight-free tool: OpenCV's GrabCut seeded by the box and the clicks.

No download, deterministic (OpenCV's RNG is re-seeded before every call), and
fast: GrabCut runs on a copy scaled so its longer side is at most
``work_size`` pixels (default 256), and the mask is scaled back.

It always uses every prompt so far (GrabCut has no memory of its own):

* the newest box: outside is background, inside "probably foreground";
* without a box: a box around the positive clicks grown by ``margin`` of the
  image size, and everything else "probably background";
* the previous turn's mask (its ``state``) refines the inside of the box:
  previous foreground stays "probably foreground", the rest "probably background";
* positive clicks are certain foreground, negative clicks certain background,
  as disks of ``click_radius`` (fraction of the shorter side);
* finally, when there are positive clicks, only the connected parts touching one
  are kept.

``score`` is NaN: GrabCut has no quality estimate.
"""
from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np

from ..actions import PixelBox, PixelPoint, Prompt
from .base import PreparedCache, ToolError, ToolResult, check_rgb, image_key


class ClassicalTool:
    name = "classical"

    def __init__(self, work_size: int = 256, iterations: int = 4, click_radius: float = 0.02,
                 margin: float = 0.15, cache_size: int = 64, seed: int = 0):
        self.work_size = int(work_size)
        self.iterations = int(iterations)
        self.click_radius = float(click_radius)
        self.margin = float(margin)
        self.seed = int(seed)
        self.cache = PreparedCache(cache_size)

    # ------------------------------------------------------------------ protocol
    def prepare(self, images: Sequence[np.ndarray]) -> list[str]:
        keys = []
        for image in images:
            image = check_rgb(image)
            key = image_key(image)
            if key not in self.cache:
                h, w = image.shape[:2]
                scale = min(1.0, self.work_size / max(h, w))
                small = image if scale == 1.0 else cv2.resize(
                    image, (max(2, round(w * scale)), max(2, round(h * scale))), interpolation=cv2.INTER_AREA)
                self.cache.put(key, (np.ascontiguousarray(small[:, :, ::-1]), (h, w)))  # GrabCut wants BGR
            else:
                self.cache.get(key)
            keys.append(key)
        return keys

    def release(self, key: str) -> None:
        self.cache.pop(key)

    def segment(self, key: str, prompts: Sequence[Prompt], previous: Any = None) -> ToolResult:
        small, (h, w) = self.cache.get(key)
        if not prompts:
            raise ToolError("The classical tool needs at least one box or click.")
        sh, sw = small.shape[:2]
        sx, sy = sw / w, sh / h
        boxes = [p for p in prompts if isinstance(p, PixelBox)]
        points = [p for p in prompts if isinstance(p, PixelPoint)]
        positives = [p for p in points if p.positive]

        if boxes:
            b = boxes[-1]
            x1, y1, x2, y2 = b.x1 * sx, b.y1 * sy, b.x2 * sx, b.y2 * sy
        elif positives:
            mx, my = self.margin * sw, self.margin * sh
            x1 = min(p.x for p in positives) * sx - mx
            x2 = max(p.x for p in positives) * sx + mx
            y1 = min(p.y for p in positives) * sy - my
            y2 = max(p.y for p in positives) * sy + my
        else:
            return ToolResult(np.zeros((h, w), bool), np.zeros((h, w), np.float32) - 1.0)
        x1, x2 = int(np.clip(np.floor(x1), 0, sw - 1)), int(np.clip(np.ceil(x2), 0, sw - 1))
        y1, y2 = int(np.clip(np.floor(y1), 0, sh - 1)), int(np.clip(np.ceil(y2), 0, sh - 1))

        seeds = np.full((sh, sw), cv2.GC_BGD, np.uint8)
        seeds[y1:y2 + 1, x1:x2 + 1] = cv2.GC_PR_FGD
        if previous is not None:
            prev = cv2.resize((np.asarray(previous) > 0).astype(np.uint8), (sw, sh), interpolation=cv2.INTER_NEAREST)
            inside = seeds == cv2.GC_PR_FGD
            seeds[inside & (prev == 0)] = cv2.GC_PR_BGD
            if not boxes:  # clicks only: the previous mask may reach outside the click box
                seeds[(prev > 0) & ~inside] = cv2.GC_PR_FGD
        radius = max(1, int(round(self.click_radius * min(sh, sw))))
        for p in points:
            cv2.circle(seeds, (int(round(p.x * sx)), int(round(p.y * sy))), radius,
                       int(cv2.GC_FGD if p.positive else cv2.GC_BGD), -1)

        labels = seeds.copy()
        has_fg = np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD)).any()
        has_bg = np.isin(labels, (cv2.GC_BGD, cv2.GC_PR_BGD)).any()
        if has_fg and has_bg:
            cv2.setRNGSeed(self.seed)
            bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
            try:
                cv2.grabCut(small, labels, None, bgd, fgd, self.iterations, cv2.GC_INIT_WITH_MASK)
            except cv2.error:  # degenerate colour models (e.g. a constant image): keep the seeds
                labels = seeds
        fg = np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8)
        if positives:
            fg = _components_touching(fg, [(p.x * sx, p.y * sy) for p in positives])
        mask = cv2.resize(fg, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
        return ToolResult(mask, np.where(mask, 1.0, -1.0).astype(np.float32))


def _components_touching(fg: np.ndarray, points: list[tuple[float, float]]) -> np.ndarray:
    """Keep the 8-connected parts of ``fg`` that contain one of ``points`` (x, y)."""
    count, labels = cv2.connectedComponents(fg, connectivity=8)
    if count <= 2:
        return fg
    h, w = fg.shape
    keep = {int(labels[min(h - 1, max(0, round(y))), min(w - 1, max(0, round(x)))]) for x, y in points}
    keep.discard(0)
    return np.isin(labels, list(keep)).astype(np.uint8)
