"""Write a Slicer volume for the worker: a NRRD file from a KJI array and the IJKToRAS matrix.

The module hands the worker a file path (inside a folder the worker may read), never pickles.
The file is written by SimpleITK (which Slicer ships, and which the worker reads with), not
through the volume node's storage node, so the node's own storage (where the user saves the
scene) is untouched.  SimpleITK works in LPS: the RAS matrix is turned into LPS spacing,
direction and origin; the test suite checks the worker's slices against the module's, pixel
for pixel, for flipped and oblique volumes, and against Slicer's own storage node (slicer-core).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .geometry import RAS_TO_LPS


def write_nrrd(path: str | Path, kji_array, ijk_to_ras) -> Path:
    """Write a scalar volume (``[k, j, i]`` array as ``slicer.util.arrayFromVolume`` gives it) as raw NRRD.

    ``ijk_to_ras``: 4x4.  Written whole or not at all (:func:`~MedSAMAgentLib.durable.atomic_output`:
    a reader never sees half a file).  Returns the path.
    """
    import SimpleITK as sitk

    from ..durable import atomic_output

    array = np.asarray(kji_array)
    if array.ndim != 3:
        raise ValueError(f"The worker takes scalar 3D volumes; this array has shape {array.shape}.")
    if array.dtype.kind not in "iuf" or array.dtype.itemsize > 8:
        raise ValueError(f"Voxel type {array.dtype} cannot be written for the worker.")
    m = RAS_TO_LPS @ np.asarray(ijk_to_ras, float).reshape(4, 4)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    if not np.all(spacing > 0):
        raise ValueError("The volume's IJK-to-RAS matrix is singular (a zero spacing).")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in (m[:3, :3] / spacing).ravel()])  # row-major; columns are the axes
    image.SetOrigin([float(v) for v in m[:3, 3]])
    with atomic_output(path, "the volume file for the worker") as tmp:
        sitk.WriteImage(image, str(tmp), False)  # uncompressed: the worker reads it at once
    return Path(path)
