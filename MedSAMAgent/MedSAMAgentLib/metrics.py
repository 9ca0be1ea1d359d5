"""Overlap metrics between a predicted and a reference mask.

Empty cases, defined once here:

* both masks empty: Dice = IoU = 1.0 (the prediction agrees: there is nothing);
* exactly one empty: Dice = IoU = 0.0.
"""
from __future__ import annotations

import numpy as np


def _pair(pred, ref) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"Masks differ in shape: {pred.shape} vs {ref.shape}.")
    return pred, ref


def dice(pred, ref) -> float:
    """2|A∩B| / (|A|+|B|); 1.0 when both are empty."""
    pred, ref = _pair(pred, ref)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def iou(pred, ref) -> float:
    """|A∩B| / |A∪B|; 1.0 when both are empty."""
    pred, ref = _pair(pred, ref)
    union = int(np.logical_or(pred, ref).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(pred, ref).sum()) / union
