"""The volume file the module hands the worker, against Slicer's own storage node on real MRML
(slicer-core): for flipped and oblique volumes, the file we write and the file Slicer writes read
back (as the worker reads them) with the same voxels and geometry, and the worker's slices equal
the module's, pixel for pixel."""
import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core has no wheel for this platform (Linux x86_64, Windows, "
                                              "macOS arm64 only)")
vtk = pytest.importorskip("vtk")

from MedSAMAgentLib.image_io import load_image  # noqa: E402
from MedSAMAgentLib.slicer_support.geometry import AXES, VolumeGeometry  # noqa: E402
from MedSAMAgentLib.slicer_support.volume_file import write_nrrd  # noqa: E402
from MedSAMAgentLib.volume import OrientedVolume  # noqa: E402

from conftest import rotation  # noqa: E402


DIRECTIONS = {
    "lps": np.diag([-1.0, -1.0, 1.0]),
    "flipped": np.diag([1.0, -1.0, -1.0]),
    "sagittal": np.array([[0, 0, -1], [-1, 0, 0], [0, -1, 0]], float),
    "oblique": rotation(1, 38) @ rotation(0, 20) @ np.diag([-1.0, -1.0, 1.0]),
}


def volume_node(scene, direction, kji):
    """A real scalar volume node holding ``kji`` ([k, j, i]) with the given RAS directions."""
    from vtk.util import numpy_support

    m = np.eye(4)
    m[:3, :3] = direction * np.array([0.7, 1.1, 2.5])
    m[:3, 3] = (12.0, -30.0, 45.0)
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(m[r, c]))
    image = vtk.vtkImageData()
    image.SetDimensions(kji.shape[2], kji.shape[1], kji.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(kji.ravel(), deep=True,
                                                               array_type=vtk.VTK_SHORT))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(matrix)
    return node, m


def array_of(node) -> np.ndarray:
    """The node's voxels as [k, j, i], as slicer.util.arrayFromVolume gives them."""
    from vtk.util import numpy_support

    i, j, k = node.GetImageData().GetDimensions()
    return numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars()).reshape(k, j, i)


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_our_volume_file_reads_back_as_slicers_own_and_slices_match(tmp_path, name):
    scene = slicer.vtkMRMLScene()
    kji = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    node, m = volume_node(scene, DIRECTIONS[name], kji)
    ours = write_nrrd(tmp_path / "ours.nrrd", array_of(node), m)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "slicer.nrrd"))
    storage.SetUseCompression(False)
    assert storage.WriteData(node), "Slicer's storage node could not write the volume"
    a, b = sitk.ReadImage(str(ours)), sitk.ReadImage(str(tmp_path / "slicer.nrrd"))
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    for what in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(a, what)(), getattr(b, what)(), atol=1e-6), what
    # the worker's slices (its own reader and orientation) equal the module's, pixel for pixel
    worker = OrientedVolume(load_image(ours).image)
    module = VolumeGeometry(m, kji.shape[::-1])
    for axis in AXES:
        for index in range(module.num_slices(axis)):
            assert np.array_equal(worker.slice(axis, index), module.read_slice(array_of(node), axis, index)), \
                (name, axis, index)
