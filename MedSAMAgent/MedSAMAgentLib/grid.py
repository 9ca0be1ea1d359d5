"""The one rule that maps the policy's 0-999 grid to pixels and back.

The policy speaks integers on a grid ``0..GRID_MAX`` (999) laid over the image,
x along the width, y along the height, (0, 0) at the top-left corner.  Pixels
here are *index* coordinates: pixel column ``i`` has its centre at ``x = i``,
so a W-pixel row spans centres ``0 .. W-1``.

Rule (used everywhere: tools, expert, overlays, Slicer markups)::

    pixel = grid * (size - 1) / GRID_MAX          # float, in [0, size-1]
    grid  = round(pixel * GRID_MAX / (size - 1))  # int, clipped to [0, GRID_MAX]

Grid 0 is the centre of the first pixel and grid 999 the centre of the last one,
so every grid value lands inside the image.  The authors' code used
``v / 999 * W`` at inference and ``v * W / 1000`` in RL; both differ from this
rule by less than one pixel (``v/999 <= 1``), which is below the policy's own
resolution (a 512-pixel image has about two grid steps per pixel).
"""
from __future__ import annotations

GRID_MAX = 999


GRID_RULES = ("centre", "scaled")


def grid_to_pixel(value: float, size: int, grid_max: int = GRID_MAX, rule: str = "centre") -> float:
    """Grid value (0..grid_max) -> pixel coordinate.  ``centre`` (this engine's rule, above): a float in
    0..size-1.  ``scaled``: ``round(value / 999 * size)``, the authors' evaluation scripts (infer/
    unibiomed_inference_toolusing.py), for the ``medsam-agent-v1-eval`` profile; a value outside the grid
    is scaled as it is (their code passes it on)."""
    if rule == "scaled":
        return float(round(float(value) / grid_max * size))
    if size <= 1:
        return 0.0
    return float(value) * (size - 1) / grid_max


def pixel_to_grid(value: float, size: int, grid_max: int = GRID_MAX) -> int:
    """Pixel index coordinate (0..size-1) -> nearest grid integer (0..grid_max)."""
    if size <= 1:
        return 0
    g = int(round(float(value) * grid_max / (size - 1)))
    return min(max(g, 0), grid_max)
