"""A click that edits a mask locally: the one rule the classical and LiteMedSAM tools share.

Given the mask so far and a *candidate* (what the tool would segment with this click), a positive
click adds the connected part of (candidate minus mask) that holds it, a negative click removes
the connected part of (mask minus candidate) that holds it -- in both cases only within twice the
click's depth inside that part (an expert's click sits deep inside the error it corrects), and the
click's own disk always changes.  All arrays are H x W bool on one pixel grid; coordinates are
that grid's pixels (x to the right, y down).
"""
from __future__ import annotations

import cv2
import numpy as np


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background not 4-connected to the image's edge becomes foreground (as
    ``scipy.ndimage.binary_fill_holes``); a flood fill from a one-pixel frame."""
    framed = np.pad(mask.astype(np.uint8), 1)
    cv2.floodFill(framed, None, (0, 0), 2, flags=4)
    return framed[1:-1, 1:-1] != 2


def depth_at(region: np.ndarray, x: int, y: int) -> float:
    """Euclidean distance (pixels) from ``region[y, x]`` to the nearest pixel outside the region,
    the image's outside counting as outside; 0 off the region.  Exact: OpenCV's precise
    transform gives float32, rounded back to the integer squared distance."""
    framed = np.pad(region.astype(np.uint8), 1)
    d = cv2.distanceTransform(framed, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[y + 1, x + 1]
    return float(np.sqrt(np.round(np.float64(d) ** 2)))


def click_disk(shape: tuple, x: float, y: float, radius: float) -> np.ndarray:
    """The pixels within ``radius`` of (x, y), as an H x W bool mask (only the square around it is computed)."""
    h, w = shape
    out = np.zeros((h, w), bool)
    c0, c1 = max(0, int(np.floor(x - radius))), min(w, int(np.ceil(x + radius)) + 1)
    r0, r1 = max(0, int(np.floor(y - radius))), min(h, int(np.ceil(y + radius)) + 1)
    if c0 < c1 and r0 < r1:
        yy, xx = np.ogrid[r0:r1, c0:c1]
        out[r0:r1, c0:c1] = (xx - x) ** 2 + (yy - y) ** 2 <= radius * radius
    return out


def edit_locally(previous: np.ndarray, candidate: np.ndarray, x: float, y: float, positive: bool,
                 radius: float, reach: float = 2.0) -> np.ndarray:
    """``previous`` changed by one click at (x, y) as the module docstring says (``reach``: how many
    times the click's depth the change may extend from it); a new array."""
    h, w = previous.shape
    px, py = min(w - 1, max(0, int(round(x)))), min(h - 1, max(0, int(round(y))))
    change = ((candidate & ~previous) if positive else (previous & ~candidate)) | click_disk((h, w), x, y, radius)
    _, labels = cv2.connectedComponents(change.view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    region = labels == labels[py, px]
    reach = max(reach * depth_at(region, px, py), 2.0 * radius)
    yy, xx = np.ogrid[:h, :w]
    region &= (xx - px) ** 2 + (yy - py) ** 2 <= reach * reach
    return fill_holes(previous | region) if positive else previous & ~region
