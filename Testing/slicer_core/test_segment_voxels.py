"""The module writes the agent's mask into the right segment, on Slicer's real MRML (slicer-core):
also when another segment shares its labelmap layer (a second target, a user's segmentation),
where Slicer's MIN/MAX merges of a 0/1 block used to fill the other segment and leave the target
empty."""

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core has no wheel for this platform (Linux x86_64, Windows, "
                                              "macOS arm64 only)")
vtk = pytest.importorskip("vtk")

import slicer_scene  # noqa: E402 - also puts the module folder on the path, as Slicer does

from MedSAMAgentLogic.segment_voxels import shares_its_layer, write_block  # noqa: E402

SHAPE = (4, 12, 10)  # k, j, i


@pytest.fixture(scope="module", autouse=True)
def converter_rules():
    slicer_scene.register_converter_rules()


def ijk_to_ras():
    m = vtk.vtkMatrix4x4()
    for r, row in enumerate([[-0.8, 0, 0, 10], [0, -0.8, 0, -5], [0, 0, 2.5, 30]]):
        for c, v in enumerate(row):
            m.SetElement(r, c, v)
    return m


def labelmap(extent, array):
    """A 0/1 oriented image over ``extent`` holding ``array`` ([k, j, i]) on the volume's grid."""
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    image.SetExtent(*extent)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = np.asarray(array).ravel()
    image.SetImageToWorldMatrix(ijk_to_ras())
    return image


def paint_whole(node, segment_id, array) -> None:
    """A segment painted as a person's Segment Editor would (a plain replace): it stays in the shared layer."""
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    whole = (0, SHAPE[2] - 1, 0, SHAPE[1] - 1, 0, SHAPE[0] - 1)
    assert logic.SetBinaryLabelmapToSegment(labelmap(whole, array), node, segment_id, logic.MODE_REPLACE)


def voxels(node, segment_id) -> np.ndarray:
    """The segment's voxels on the volume's grid, by its own label value in its layer."""
    segmentation = node.GetSegmentation()
    image = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(node, segment_id, image)
    out = np.zeros(SHAPE, bool)
    e = image.GetExtent()
    if e[1] >= e[0]:
        from vtk.util import numpy_support

        raw = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(
            e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
        out[e[4]:e[5] + 1, e[2]:e[3] + 1, e[0]:e[1] + 1] = raw == segmentation.GetSegment(segment_id).GetLabelValue()
    return out


def slice_extent(k):
    return (0, SHAPE[2] - 1, 0, SHAPE[1] - 1, k, k)


def test_the_mask_goes_into_the_target_even_when_another_segment_shares_its_layer():
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation = node.GetSegmentation()
    other = segmentation.AddEmptySegment("user's kidney")
    target = segmentation.AddEmptySegment("liver")
    kidney = np.zeros(SHAPE, np.uint8)
    kidney[:, 7:, :] = 1
    paint_whole(node, other, kidney)
    assert shares_its_layer(segmentation, target) and segmentation.GetNumberOfLayers() == 1  # the hard case
    written = {}
    for k in range(SHAPE[0]):  # the agent's slices, one after another
        block = np.zeros((1,) + SHAPE[1:], np.uint8)
        block[0, 1:5, 1:3 + k] = 1
        write_block(node, target, slice_extent(k), block, ijk_to_ras())
        written[k] = block[0].astype(bool)
    liver = voxels(node, target)
    assert all(np.array_equal(liver[k], written[k]) for k in written)
    assert np.array_equal(voxels(node, other), kidney.astype(bool))  # the user's segment untouched
    # a slice done again (an override) with a smaller mask: that slice shrinks, the others stay
    smaller = np.zeros((1,) + SHAPE[1:], np.uint8)
    smaller[0, 2:3, 1:2] = 1
    write_block(node, target, slice_extent(1), smaller, ijk_to_ras())
    liver = voxels(node, target)
    assert np.array_equal(liver[1], smaller[0].astype(bool))
    assert all(np.array_equal(liver[k], written[k]) for k in (0, 2, 3))
    # a mask overlapping the other segment: both keep their voxels (an overlap, never an overwrite)
    overlapping = np.zeros((1,) + SHAPE[1:], np.uint8)
    overlapping[0, 5:10, :] = 1
    write_block(node, target, slice_extent(2), overlapping, ijk_to_ras())
    assert np.array_equal(voxels(node, target)[2], overlapping[0].astype(bool))
    assert np.array_equal(voxels(node, other), kidney.astype(bool))


def test_slicers_plain_merge_into_a_shared_layer_is_the_bug_this_avoids():
    """What the module did before: MIN then MAX of a 0/1 block straight into the shared layer."""
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation = node.GetSegmentation()
    other = segmentation.AddEmptySegment("first target")
    target = segmentation.AddEmptySegment("second target")
    first = np.zeros(SHAPE, np.uint8)
    first[:, 8:, :] = 1
    paint_whole(node, other, first)
    assert shares_its_layer(segmentation, target)
    block = np.zeros(SHAPE[1:], np.uint8)
    block[1:5, 1:4] = 1
    image = labelmap(slice_extent(1), block)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    for mode in (logic.MODE_MERGE_MIN, logic.MODE_MERGE_MAX):
        logic.SetBinaryLabelmapToSegment(image, node, target, mode, list(slice_extent(1)))
    assert not voxels(node, target).any()  # the target stayed empty ...
    assert voxels(node, other)[1][block > 0].all()  # ... and the other segment took the mask
