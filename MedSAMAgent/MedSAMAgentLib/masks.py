"""Compact run-length encoding of binary masks for JSON.

``{"size": [height, width], "counts": [n0, n1, n2, ...]}``: the mask is read row
by row (C order); runs alternate starting with *off* pixels (``n0`` may be 0).
"""
from __future__ import annotations

import numpy as np


def encode_rle(mask: np.ndarray) -> dict:
    """Boolean H x W mask -> RLE dict (JSON-ready)."""
    flat = np.asarray(mask, dtype=bool).ravel()
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    counts = np.diff(bounds).tolist()  # Python ints, ready for JSON
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def decode_rle(rle: dict) -> np.ndarray:
    """RLE dict -> boolean H x W mask."""
    h, w = (int(v) for v in rle["size"])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected {h * w} for a {h}x{w} mask.")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape(h, w)


def pack_mask(mask: np.ndarray) -> tuple[np.ndarray, tuple]:
    """A bool mask kept at one bit a pixel (a 512x512 mask: 32 KB instead of 256 KB): (bytes, shape)."""
    mask = np.asarray(mask, dtype=bool)
    return np.packbits(mask, axis=None), mask.shape


def unpack_mask(packed: tuple[np.ndarray, tuple]) -> np.ndarray:
    """:func:`pack_mask`'s bool mask again (a new array each call)."""
    bits, shape = packed
    return np.unpackbits(bits, count=int(np.prod(shape, dtype=np.int64))).reshape(shape).view(bool)
