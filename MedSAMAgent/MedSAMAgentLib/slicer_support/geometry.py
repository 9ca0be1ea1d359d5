"""Geometry between a Slicer volume (IJK voxels, RAS millimetres) and the worker's slice images.

Frames and units:

* **IJK**: Slicer's voxel index of the volume node, continuous (voxel centres at
  integers).  ``slicer.util.arrayFromVolume`` gives the voxels as a numpy array
  indexed ``[k, j, i]`` ("KJI").
* **RAS**: Slicer's world frame in millimetres (x: right->Left is *negative*:
  R is +x, A is +y, S is +z).  ``ijk_to_ras`` is the node's 4x4 IJKToRAS matrix
  (``GetIJKToRASMatrix``), oblique directions included.
* **LPS-oriented index**: what the worker slices.  The worker reads the volume
  file with SimpleITK and reorients it with ``DICOMOrient(image, "LPS")``, a
  permutation and flips of the voxel axes chosen from the direction cosines
  (never a resampling); its array is ``[S, P, L]`` (see
  :mod:`MedSAMAgentLib.volume`).  :func:`lps_axes` reproduces ITK's choice.
* **Slice image pixel** ``(x, y)``: index coordinates of the worker's 2D slice in
  display orientation, ``x`` = column, ``y`` = row, pixel centres at integers,
  exactly as :class:`MedSAMAgentLib.volume.OrientedVolume` cuts it:

  - axial (index along S): rows anterior->posterior, columns right->left;
  - coronal (index along P): rows superior->inferior, columns right->left;
  - sagittal (index along L): rows superior->inferior, columns anterior->posterior.

* **Grid**: the policy's 0-999 grid over a slice image (:mod:`MedSAMAgentLib.grid`).

Every map here is affine, so points off the voxel centres map exactly too.
"""
from __future__ import annotations

import numpy as np

from ..grid import grid_to_pixel, pixel_to_grid

AXES = ("axial", "coronal", "sagittal")
_LPS_AXIS_OF = {"axial": 2, "coronal": 1, "sagittal": 0}  # which LPS axis a slice index runs along
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_axes(ijk_to_ras) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """For each IJK axis, the LPS axis (0=L, 1=P, 2=S) ``DICOMOrient`` maps it to and the sign (+1: no flip).

    ITK's rule: repeatedly take the largest ``|direction cosine|`` left in the
    3x3 direction matrix (LPS rows, IJK columns), pair its row and column, and
    strike both out; ties go to the larger (row, column) pair.
    """
    m = RAS_TO_LPS @ np.asarray(ijk_to_ras, float)
    d = m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)
    cells = sorted(((abs(d[r, c]), r, c) for r in range(3) for c in range(3)), reverse=True)
    physical, signs = [-1, -1, -1], [1, 1, 1]
    used_r, used_c = set(), set()
    for _, r, c in cells:
        if r in used_r or c in used_c:
            continue
        physical[c], signs[c] = r, (1 if d[r, c] >= 0 else -1)
        used_r.add(r)
        used_c.add(c)
    return tuple(physical), tuple(signs)


class VolumeGeometry:
    """A volume's voxel grid: IJK <-> RAS, and the worker's slice images along each axis.

    ``ijk_to_ras``: 4x4 (Slicer's IJKToRAS).  ``dims``: (ni, nj, nk), the voxel
    counts along I, J, K (``imageData.GetDimensions()``; a KJI array has shape
    ``(nk, nj, ni)``).
    """

    def __init__(self, ijk_to_ras, dims):
        self.ijk_to_ras = np.asarray(ijk_to_ras, float).reshape(4, 4)
        self.dims = tuple(int(n) for n in dims)
        if len(self.dims) != 3 or min(self.dims) < 1:
            raise ValueError(f"A volume needs three positive dimensions, got {dims}.")
        if abs(np.linalg.det(self.ijk_to_ras[:3, :3])) < 1e-12:
            raise ValueError("The IJK-to-RAS matrix is singular.")
        self.ras_to_ijk = np.linalg.inv(self.ijk_to_ras)
        self.physical, self.signs = lps_axes(self.ijk_to_ras)
        lps = [0, 0, 0]
        for a in range(3):
            lps[self.physical[a]] = self.dims[a]
        self.lps_dims = tuple(lps)  # (nL, nP, nS) of the worker's reoriented array
        # out (LPS-oriented index) -> ijk, as a 4x4 matrix
        o = np.zeros((4, 4))
        for a in range(3):
            o[a, self.physical[a]] = self.signs[a]
            o[a, 3] = 0.0 if self.signs[a] > 0 else self.dims[a] - 1
        o[3, 3] = 1.0
        self._out_to_ijk = o

    @classmethod
    def from_arrays(cls, kji_shape, ijk_to_ras) -> "VolumeGeometry":
        """From a KJI array shape (as ``arrayFromVolume`` gives) and the IJKToRAS matrix."""
        nk, nj, ni = kji_shape[:3]
        return cls(ijk_to_ras, (ni, nj, nk))

    # ------------------------------------------------------------------ IJK <-> RAS
    def ijk_to_ras_points(self, ijk) -> np.ndarray:
        """(N, 3) or (3,) IJK -> RAS millimetres."""
        p = np.asarray(ijk, float)
        out = p.reshape(-1, 3) @ self.ijk_to_ras[:3, :3].T + self.ijk_to_ras[:3, 3]
        return out.reshape(p.shape)

    def ras_to_ijk_points(self, ras) -> np.ndarray:
        """(N, 3) or (3,) RAS millimetres -> continuous IJK."""
        p = np.asarray(ras, float)
        out = p.reshape(-1, 3) @ self.ras_to_ijk[:3, :3].T + self.ras_to_ijk[:3, 3]
        return out.reshape(p.shape)

    @property
    def orientation(self) -> str:
        """ITK's orientation code of the volume file (e.g. ``"LPS"``, ``"RAS"``, ``"PIL"``): one letter per IJK axis."""
        letters = ("RL", "AP", "IS")  # index 1 when the axis points towards L / P / S
        return "".join(letters[self.physical[a]][1 if self.signs[a] > 0 else 0] for a in range(3))

    # ------------------------------------------------------------------ slices
    @staticmethod
    def check_axis(axis: str) -> str:
        if axis not in AXES:
            raise ValueError(f"Unknown axis '{axis}'; one of {', '.join(AXES)}.")
        return axis

    def num_slices(self, axis: str) -> int:
        return self.lps_dims[_LPS_AXIS_OF[self.check_axis(axis)]]

    def slice_shape(self, axis: str) -> tuple[int, int]:
        """(height, width) of the worker's slice image along ``axis``."""
        n_l, n_p, n_s = self.lps_dims
        return {"axial": (n_p, n_l), "coronal": (n_s, n_l), "sagittal": (n_s, n_p)}[self.check_axis(axis)]

    def _display_to_out(self, axis: str, index: float) -> np.ndarray:
        """4x4: (x, y, z, 1) -> LPS-oriented index; ``z`` moves off the slice along increasing index."""
        n_s = self.lps_dims[2]
        d = np.zeros((4, 4))
        d[3, 3] = 1.0
        if self.check_axis(axis) == "axial":
            d[0, 0], d[1, 1], d[2, 2], d[2, 3] = 1, 1, 1, index
        elif axis == "coronal":
            d[0, 0], d[1, 2], d[1, 3], d[2, 1], d[2, 3] = 1, 1, index, -1, n_s - 1
        else:
            d[0, 2], d[0, 3], d[1, 0], d[2, 1], d[2, 3] = 1, index, 1, -1, n_s - 1
        return d

    def display_to_ijk_matrix(self, axis: str, index: float = 0) -> np.ndarray:
        """4x4: slice pixel ``(x, y, z, 1)`` -> IJK, for slice ``index``; ``z`` is the offset in slices."""
        return self._out_to_ijk @ self._display_to_out(axis, index)

    def display_to_ras_matrix(self, axis: str, index: float = 0) -> np.ndarray:
        """4x4: slice pixel ``(x, y, z, 1)`` -> RAS mm.  Columns 0-2: RAS step per column, row and slice."""
        return self.ijk_to_ras @ self.display_to_ijk_matrix(axis, index)

    def pixel_to_ras(self, axis: str, index: float, x: float, y: float) -> np.ndarray:
        """A slice pixel (column ``x``, row ``y``, index coordinates) of slice ``index`` -> RAS (3,)."""
        return (self.display_to_ras_matrix(axis, index) @ [x, y, 0.0, 1.0])[:3]

    def ras_to_pixel(self, axis: str, ras) -> tuple[float, float, float]:
        """RAS (3,) -> (x, y, slice) along ``axis``, all continuous (round ``slice`` for the slice it lies on)."""
        inv = np.linalg.inv(self.display_to_ras_matrix(axis, 0))
        x, y, z, _ = inv @ [*np.asarray(ras, float)[:3], 1.0]
        return float(x), float(y), float(z)

    def slice_index_at(self, axis: str, ras) -> int:
        """The slice along ``axis`` nearest to a RAS point, clamped into the volume."""
        _, _, z = self.ras_to_pixel(axis, ras)
        return int(min(max(round(z), 0), self.num_slices(axis) - 1))

    def pixel_size(self, axis: str) -> tuple[float, float, float]:
        """Millimetres per column step, per row step and per slice step along ``axis``."""
        m = self.display_to_ras_matrix(axis, 0)
        return tuple(float(np.linalg.norm(m[:3, c])) for c in range(3))

    def normal_ras(self, axis: str) -> np.ndarray:
        """Unit RAS vector in which the slice index along ``axis`` grows."""
        v = self.display_to_ras_matrix(axis, 0)[:3, 2]
        return v / np.linalg.norm(v)

    # ------------------------------------------------------------------ slice views
    def axis_for_view(self, slice_to_ras) -> str:
        """The worker axis whose slices best match a slice view's plane.

        ``slice_to_ras``: the view's 4x4 SliceToRAS matrix (column 2 is the view
        normal).  Red (axial), Green (coronal) and Yellow (sagittal) views give
        their own axis; an oblique view gives the axis closest to its normal.
        """
        n = np.asarray(slice_to_ras, float).reshape(4, 4)[:3, 2]
        n = n / np.linalg.norm(n)
        return max(AXES, key=lambda a: (abs(float(n @ self.normal_ras(a))), -AXES.index(a)))

    def view_slice_index(self, slice_to_ras, axis: str | None = None) -> int:
        """The slice index along ``axis`` (default: :meth:`axis_for_view`) through the view's centre."""
        m = np.asarray(slice_to_ras, float).reshape(4, 4)
        return self.slice_index_at(axis or self.axis_for_view(m), m[:3, 3])

    def view_tilt_degrees(self, slice_to_ras, axis: str) -> float:
        """Angle between a view's plane and the volume's slices along ``axis`` (0: they coincide)."""
        n = np.asarray(slice_to_ras, float).reshape(4, 4)[:3, 2]
        c = abs(float(n @ self.normal_ras(axis))) / np.linalg.norm(n)
        return float(np.degrees(np.arccos(min(1.0, c))))

    # ------------------------------------------------------------------ grid
    def grid_to_pixel(self, axis: str, gx: float, gy: float) -> tuple[float, float]:
        h, w = self.slice_shape(axis)
        return grid_to_pixel(gx, w), grid_to_pixel(gy, h)

    def pixel_to_grid(self, axis: str, x: float, y: float) -> tuple[int, int]:
        h, w = self.slice_shape(axis)
        return pixel_to_grid(x, w), pixel_to_grid(y, h)

    def grid_to_ras(self, axis: str, index: int, gx: float, gy: float) -> np.ndarray:
        return self.pixel_to_ras(axis, index, *self.grid_to_pixel(axis, gx, gy))

    def ras_to_grid(self, axis: str, ras) -> tuple[int, int, int]:
        """RAS -> (grid x, grid y, slice index)."""
        x, y, _ = self.ras_to_pixel(axis, ras)
        gx, gy = self.pixel_to_grid(axis, x, y)
        return gx, gy, self.slice_index_at(axis, ras)

    # ------------------------------------------------------------------ boxes as ROIs
    def box_to_roi(self, axis: str, index: int, box) -> tuple[np.ndarray, np.ndarray]:
        """A pixel box ``(x1, y1, x2, y2)`` on slice ``index`` -> (ObjectToRAS 4x4, size mm (3,)).

        The ROI lies in the slice plane: its x axis runs along the slice's columns,
        its y axis along the rows, its z axis (right-handed) across the slice, one
        slice thick.  The box corners are pixel centres, so a box from x1 to x2
        spans ``|x2 - x1|`` columns.
        """
        x1, y1, x2, y2 = (float(v) for v in box)
        m = self.display_to_ras_matrix(axis, index)
        ex, ey = m[:3, 0], m[:3, 1]
        sx, sy, sz = self.pixel_size(axis)
        ux, uy = ex / sx, ey / sy
        uz = np.cross(ux, uy)
        obj = np.eye(4)
        obj[:3, 0], obj[:3, 1], obj[:3, 2] = ux, uy, uz
        obj[:3, 3] = (m @ [(x1 + x2) / 2, (y1 + y2) / 2, 0.0, 1.0])[:3]
        return obj, np.array([abs(x2 - x1) * sx, abs(y2 - y1) * sy, sz])

    def roi_to_box(self, axis: str, object_to_ras, size) -> tuple[int, tuple[float, float, float, float]]:
        """An ROI (ObjectToRAS 4x4, size mm) -> (slice index of its centre, pixel box x1, y1, x2, y2).

        A rotated ROI gives the bounding box of its in-plane corners.
        """
        obj = np.asarray(object_to_ras, float).reshape(4, 4)
        half = np.asarray(size, float)[:3] / 2
        centre = obj[:3, 3]
        xs, ys = [], []
        for a in (-1, 1):
            for b in (-1, 1):
                corner = centre + a * half[0] * obj[:3, 0] + b * half[1] * obj[:3, 1]
                x, y, _ = self.ras_to_pixel(axis, corner)
                xs.append(x)
                ys.append(y)
        return self.slice_index_at(axis, centre), (min(xs), min(ys), max(xs), max(ys))

    # ------------------------------------------------------------------ masks
    def _slice_ijk(self, axis: str, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Integer I, J, K arrays (H x W) of every pixel of slice ``index``."""
        if not 0 <= int(index) < self.num_slices(axis):
            raise IndexError(f"Slice {index} is outside the volume: {self.num_slices(axis)} slices along {axis}.")
        h, w = self.slice_shape(axis)
        ys, xs = np.indices((h, w))
        m = self.display_to_ijk_matrix(axis, int(index))
        ijk = np.rint(m[:3, 0, None, None] * xs + m[:3, 1, None, None] * ys + m[:3, 3, None, None]).astype(np.int64)
        return ijk[0], ijk[1], ijk[2]

    def slice_extent(self, axis: str, index: int) -> tuple[int, int, int, int, int, int]:
        """The slice's voxels as a VTK extent ``(i0, i1, j0, j1, k0, k1)``, inclusive; one voxel thick."""
        i, j, k = self._slice_ijk(axis, index)
        return (int(i.min()), int(i.max()), int(j.min()), int(j.max()), int(k.min()), int(k.max()))

    def mask_block(self, axis: str, index: int, mask) -> tuple[tuple, np.ndarray]:
        """A slice mask (H x W, display orientation) -> (extent, uint8 block ``[k, j, i]`` covering that extent).

        The block is what to write into the segment's labelmap for exactly this
        slice, and nothing else.
        """
        mask = np.asarray(mask, bool)
        if mask.shape != self.slice_shape(axis):
            raise ValueError(f"A {axis} mask must be {self.slice_shape(axis)} (rows, columns), got {mask.shape}.")
        i, j, k = self._slice_ijk(axis, index)
        extent = (int(i.min()), int(i.max()), int(j.min()), int(j.max()), int(k.min()), int(k.max()))
        block = np.zeros((extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1), np.uint8)
        block[k - extent[4], j - extent[2], i - extent[0]] = mask
        return extent, block

    def block_to_mask(self, axis: str, index: int, extent, block) -> np.ndarray:
        """The inverse of :meth:`mask_block`: a ``[k, j, i]`` block over ``extent`` -> the slice mask (H x W bool)."""
        i, j, k = self._slice_ijk(axis, index)
        i0, _, j0, _, k0, _ = extent
        return np.asarray(block)[k - k0, j - j0, i - i0] > 0

    def read_slice(self, kji_array, axis: str, index: int) -> np.ndarray:
        """Slice ``index`` of a KJI array (volume or labelmap) in display orientation, H x W."""
        i, j, k = self._slice_ijk(axis, index)
        return np.asarray(kji_array)[k, j, i]

    def write_slice(self, kji_array: np.ndarray, axis: str, index: int, values) -> None:
        """Write a display-orientation slice (H x W) into a KJI array in place."""
        i, j, k = self._slice_ijk(axis, index)
        kji_array[k, j, i] = values
