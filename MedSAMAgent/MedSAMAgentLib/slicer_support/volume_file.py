"""Write a Slicer volume for the worker: a raw NRRD file from a KJI array and the IJKToRAS matrix.

The module hands the worker a file path (inside a folder the worker may read),
never pickles.  Writing the file here -- rather than with Slicer's storage
nodes -- leaves the volume node's own storage (where the user saves the scene)
untouched and keeps the geometry in tested code: NRRD stores the voxel axes
in LPS (``space: left-posterior-superior``), which is what SimpleITK, and so
the worker, reads.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .geometry import RAS_TO_LPS

_NRRD_TYPES = {
    "int8": "int8", "uint8": "uint8", "int16": "int16", "uint16": "uint16", "int32": "int32",
    "uint32": "uint32", "int64": "int64", "uint64": "uint64", "float32": "float", "float64": "double",
}


def _vector(values) -> str:
    return "(" + ",".join(repr(float(v)) for v in values) + ")"


def write_nrrd(path: str | Path, kji_array, ijk_to_ras) -> Path:
    """Write a scalar volume (``[k, j, i]`` array as ``slicer.util.arrayFromVolume`` gives it) as raw NRRD.

    ``ijk_to_ras``: 4x4.  The file is written next to its final name and then
    renamed, so a reader never sees half a file.  Returns the path.
    """
    array = np.asarray(kji_array)
    if array.ndim != 3:
        raise ValueError(f"The worker takes scalar 3D volumes; this array has shape {array.shape}.")
    kind = _NRRD_TYPES.get(array.dtype.name)
    if kind is None:
        raise ValueError(f"Voxel type {array.dtype} cannot be written for the worker.")
    m = RAS_TO_LPS @ np.asarray(ijk_to_ras, float).reshape(4, 4)
    nk, nj, ni = array.shape
    header = "\n".join([
        "NRRD0004",
        "# written by MedSAM Agent for its worker",
        f"type: {kind}",
        "dimension: 3",
        "space: left-posterior-superior",
        f"sizes: {ni} {nj} {nk}",
        "space directions: " + " ".join(_vector(m[:3, a]) for a in range(3)),
        "kinds: domain domain domain",
        "endian: little",
        "encoding: raw",
        f"space origin: {_vector(m[:3, 3])}",
    ]) + "\n\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out:
        out.write(header.encode("ascii"))
        out.write(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
    tmp.replace(path)
    return path
