"""Pictures of each turn for people: the image, the mask in green, the prompts drawn on top.

Boxes are yellow rectangles; positive clicks green dots, negative clicks red
dots; the newest prompt is drawn thicker.  Small images are scaled up (nearest
neighbour) so the longer side is at least ``min_side`` pixels.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .observation import overlay

BOX_COLOR = (255, 210, 0)
POSITIVE_COLOR = (0, 230, 80)
NEGATIVE_COLOR = (255, 60, 60)


def render_turn(rgb: np.ndarray, mask: np.ndarray | None, prompts: list[dict], min_side: int = 512,
                caption: str | None = None) -> Image.Image:
    """``rgb``: H x W x 3 uint8; ``mask``: H x W bool or None; ``prompts``: pixel prompts as stored
    in a trajectory step (``{"box": [...]}`` or ``{"point": [x, y], "positive": bool}``), oldest first."""
    h, w = rgb.shape[:2]
    scale = max(1.0, min_side / max(h, w))
    img = Image.fromarray(overlay(rgb, mask)).resize((round(w * scale), round(h * scale)), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    for n, p in enumerate(prompts):
        width = 3 if n == len(prompts) - 1 else 1
        if "box" in p:
            x1, y1, x2, y2 = (v * scale for v in p["box"])
            draw.rectangle((x1, y1, x2, y2), outline=BOX_COLOR, width=width)
        else:
            x, y = (v * scale for v in p["point"])
            r = 4 + width
            draw.ellipse((x - r, y - r, x + r, y + r), fill=POSITIVE_COLOR if p["positive"] else NEGATIVE_COLOR,
                         outline=(255, 255, 255), width=1)
    if caption:
        draw.rectangle((0, 0, img.width, 16), fill=(0, 0, 0))
        draw.text((4, 2), caption, fill=(255, 255, 255))
    return img


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "item"


def _save_png(picture, path: Path) -> None:
    """One overlay PNG, whole or not at all (:func:`~.durable.atomic_output`)."""
    from .durable import atomic_output

    with atomic_output(path, "the overlay") as tmp:
        picture.save(tmp, format="PNG")


def write_turn_pngs(trajectory, rgb: np.ndarray, folder: str | Path, prefix: str = "") -> list[Path]:
    """One PNG per turn of ``trajectory`` (and one for the image before any action) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = safe_name(prefix + trajectory.episode_id)
    written = []
    prompts, mask = [], None
    path = folder / f"{stem}_turn0_input.png"
    _save_png(render_turn(rgb, None, [], caption=f"{trajectory.target}: input"), path)
    written.append(path)
    for step in trajectory.steps:
        name = step.action["name"] if step.action else "unparsed"
        if step.pixels:
            prompts.append(step.pixels)
        if step.mask is not None:
            mask = step.mask
        score = f" Dice {step.dice:.3f}" if step.dice is not None else ""
        path = folder / f"{stem}_turn{step.turn + 1}_{name}.png"
        _save_png(render_turn(rgb, mask, prompts, caption=f"{trajectory.target}: turn {step.turn + 1} {name}{score}"), path)
        written.append(path)
    return written
