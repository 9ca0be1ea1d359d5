"""Slicing a volume along patient axes and putting slice masks back.

The volume is reoriented to LPS with ``DICOMOrient`` -- a permutation and flips
of the voxel axes, no resampling -- so its array is ``[S, P, L]`` (z: inferior
-> superior, y: anterior -> posterior, x: right -> left) whatever the file's
direction matrix.  Slices are shown the way radiologists look at them:

* axial: rows anterior -> posterior, columns right -> left (patient's right on the left);
* coronal: rows superior -> inferior, columns right -> left;
* sagittal: rows superior -> inferior, columns anterior -> posterior.

Pixels keep the voxel spacing (a thick-slice coronal image is not resampled to
square pixels; the policy image is stretched to 512x512 anyway).
"""
from __future__ import annotations

import numpy as np

AXES = ("axial", "coronal", "sagittal")


class OrientedVolume:
    """A scalar 3D SimpleITK image seen in LPS; ``to_original`` maps an LPS mask array back."""

    def __init__(self, image):
        import SimpleITK as sitk

        if image.GetDimension() != 3:
            raise ValueError("OrientedVolume needs a 3D image.")
        # the original geometry only (no second copy of the voxels): from_original needs nothing more
        self.original_geometry = (image.GetOrigin(), image.GetSpacing(), image.GetDirection())
        self.orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
        self.lps = image if self.orientation == "LPS" else sitk.DICOMOrient(image, "LPS")  # shared when already LPS
        self.array = sitk.GetArrayViewFromImage(self.lps)  # [S, P, L], a read-only view

    @staticmethod
    def axis_index(axis: str) -> int:
        if axis not in AXES:
            raise ValueError(f"Unknown axis '{axis}'; choose one of {', '.join(AXES)}.")
        return AXES.index(axis)

    def num_slices(self, axis: str) -> int:
        return int(self.array.shape[self.axis_index(axis)])

    def slice(self, axis: str, index: int, array: np.ndarray | None = None) -> np.ndarray:
        """Slice ``index`` along ``axis`` of ``array`` (default: the image) in display orientation."""
        vol = self.array if array is None else array
        a = self.axis_index(axis)
        if a == 0:
            return np.asarray(vol[index])
        if a == 1:
            return np.asarray(vol[::-1, index, :])
        return np.asarray(vol[::-1, :, index])

    def put_slice(self, volume: np.ndarray, axis: str, index: int, mask: np.ndarray) -> None:
        """Write a display-orientation slice mask into an LPS-shaped ``volume`` in place."""
        a = self.axis_index(axis)
        if a == 0:
            volume[index] = mask
        elif a == 1:
            volume[:, index, :] = mask[::-1]
        else:
            volume[:, :, index] = mask[::-1]

    def empty_mask(self) -> np.ndarray:
        return np.zeros(self.array.shape, dtype=bool)

    def to_original(self, lps_mask: np.ndarray) -> np.ndarray:
        """An LPS ``[S, P, L]`` mask -> an array in the original file's voxel order ``[z, y, x]``."""
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.asarray(lps_mask, dtype=np.uint8))
        img.CopyInformation(self.lps)
        back = sitk.DICOMOrient(img, self.orientation)
        return sitk.GetArrayFromImage(back).astype(bool)

    def from_original(self, mask: np.ndarray) -> np.ndarray:
        """A mask in the original voxel order -> LPS ``[S, P, L]``."""
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.asarray(mask, dtype=np.uint8))
        origin, spacing, direction = self.original_geometry
        img.SetOrigin(origin)
        img.SetSpacing(spacing)
        img.SetDirection(direction)
        return sitk.GetArrayFromImage(sitk.DICOMOrient(img, "LPS")).astype(bool)


def parse_slices(spec: str, count: int) -> tuple[str, range | None]:
    """``all`` | ``A:B`` (inclusive A, exclusive B, Python style; either may be empty) | ``auto``.

    Returns ("auto", None) or ("range", range).  Raises ValueError with a user message.
    """
    spec = (spec or "all").strip().lower()
    if spec == "auto":
        return "auto", None
    if spec == "all":
        return "range", range(0, count)
    if ":" in spec:
        a, b = spec.split(":", 1)
        try:
            start = int(a) if a.strip() else 0
            stop = int(b) if b.strip() else count
        except ValueError:
            raise ValueError(f"--slices '{spec}' is not all, auto or A:B with integers.") from None
    else:
        try:
            start = int(spec)
        except ValueError:
            raise ValueError(f"--slices '{spec}' is not all, auto or A:B with integers.") from None
        stop = start + 1
    if start >= stop and 0 <= start < count:
        raise ValueError(f"--slices {spec} is empty: A:B runs slices A to B-1, so B must be greater than A "
                         f"(e.g. {start}:{start + 1} for slice {start} alone).")
    if not (0 <= start < stop <= count):
        raise ValueError(f"--slices {spec} is outside the volume: it has {count} slices along this axis (0:{count}).")
    return "range", range(start, stop)


EMPTY_RUN_TO_STOP = 2


class SlicePlanner:
    """Which slices to run next, batch by batch.

    ``spec``: ``all``, ``A:B`` or a single index (batches in order), or ``auto``:
    the key slice (default: the middle) first, then outwards both ways, half a
    batch each way per round, a direction ending once the mask has been empty on
    two consecutive slices.  After each batch, :meth:`report` takes which slices
    came out empty and returns those that lie past a stop (their results are not
    part of the answer).
    """

    def __init__(self, count: int, spec: str = "all", key_slice: int | None = None, batch: int = 8):
        self.count = count
        self.batch = max(1, int(batch))
        self.mode, chosen = parse_slices(spec, count)
        self.order = list(chosen) if chosen is not None else []
        self.total = len(self.order) if self.mode == "range" else count
        key = count // 2 if key_slice is None else int(key_slice)
        if self.mode == "auto" and not 0 <= key < count:
            raise ValueError(f"--key-slice {key} is outside the volume: it has {count} slices along this axis "
                             f"(0..{count - 1}).")
        self.key = key
        self.started = False
        self.fronts = {+1: key + 1, -1: key - 1}
        self.empties = {+1: 0, -1: 0}
        self.pending: dict[int, list[int]] = {}

    def next_batch(self) -> list[int] | None:
        if self.mode == "range":
            if not self.order:
                return None
            batch, self.order = self.order[:self.batch], self.order[self.batch:]
            return batch
        if not self.started:
            self.started = True
            self.pending = {0: [self.key]}
            return [self.key]
        self.pending = {}
        for d in (+1, -1):
            if self.empties[d] >= EMPTY_RUN_TO_STOP:
                continue
            span = [self.fronts[d] + d * k for k in range((self.batch + 1) // 2)]
            span = [i for i in span if 0 <= i < self.count]
            if span:
                self.pending[d] = span
        if not self.pending:
            return None
        return [i for d in self.pending for i in self.pending[d]]

    def report(self, empty: dict[int, bool]) -> list[int]:
        """Record which slices of the last batch came out empty; returns slices past a stop."""
        if self.mode == "range":
            return []
        if 0 in self.pending:  # the key slice counts for both directions
            e = int(bool(empty.get(self.key, False)))
            self.empties = {+1: e, -1: e}
            return []
        dropped = []
        for d, span in self.pending.items():
            for pos, i in enumerate(span):
                self.empties[d] = self.empties[d] + 1 if empty.get(i, False) else 0
                self.fronts[d] = i + d
                if self.empties[d] >= EMPTY_RUN_TO_STOP:
                    dropped.extend(span[pos + 1:])
                    break
        return dropped
