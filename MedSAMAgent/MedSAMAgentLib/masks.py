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


MAX_SIDE = 1 << 16  # pixels along one side of a mask read from a file or a client


def decode_rle(rle: dict, check_only: bool = False) -> np.ndarray | None:
    """RLE dict -> boolean H x W mask; ValueError (saying what) for one that is not an RLE mask:
    ``size`` not two whole numbers in 1..65536, ``counts`` not whole numbers >= 0 adding up to
    H x W.  ``check_only``: validate without building the mask."""
    if not isinstance(rle, dict) or not isinstance(rle.get("size"), list) or not isinstance(rle.get("counts"), list):
        raise ValueError('an RLE mask is {"size": [height, width], "counts": [...]}')
    size, counts = rle["size"], rle["counts"]
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SIDE for v in size):
        raise ValueError(f"its size must be [height, width], whole numbers from 1 to {MAX_SIDE}")
    h, w = size
    if len(counts) > h * w + 1 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
        raise ValueError("its counts must be whole numbers >= 0, at most one more than the pixels")
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected {h * w} for a {h}x{w} mask.")
    if check_only:
        return None
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
