"""Writing the agent's mask into one segment of a Slicer segmentation, and nothing else.

A segment may share its labelmap layer with other segments (a second target in the same
output segmentation, or a user's existing segmentation): the layer then holds each segment's
own label value, and Slicer's MIN/MAX merges work on those raw values.  Writing a 0/1 block with
them into a shared layer puts the 1s into whichever segment has label value 1 and leaves the
target empty (measured on slicer-core: ``Testing/test_slicer_segment_voxels.py``).  So the target
segment is first moved to a layer of its own (``vtkSegmentation.SeparateSegmentLabelmap``, as
Slicer does when segments overlap), where it keeps its label value, and the block is written with
that value (a 0/1 block into a separated segment whose label value is 2 went astray the same way:
measured through the Logic with two targets, ``Testing/slicer_core/test_logic_segments.py``); its
voxels are then set over the block's extent only, and the other segments keep every voxel they had.
"""
from __future__ import annotations

import numpy as np


def shares_its_layer(segmentation, segment_id: str) -> bool:
    """Whether other segments are in the segment's labelmap layer.  (``IsSharedBinaryLabelmap``
    answers False for segments that are still empty, though they share the layer.)"""
    layer = segmentation.GetLayerIndex(segment_id)
    return layer >= 0 and len(segmentation.GetSegmentIDsForLayer(layer)) > 1


def write_block(segmentation_node, segment_id: str, extent, block, ijk_to_ras) -> None:
    """Set ``segment_id``'s voxels over ``extent`` (i0, i1, j0, j1, k0, k1, the volume's IJK) to
    ``block`` (uint8 [k, j, i], nonzero = in the segment); voxels outside the extent stay as they
    are, and so do the other segments.  ``ijk_to_ras``: the volume's vtkMatrix4x4.  RuntimeError
    when Slicer refuses the write."""
    import slicer
    import vtk
    import vtk.util.numpy_support

    segmentation = segmentation_node.GetSegmentation()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    was_modified = segmentation_node.StartModify()
    try:
        if shares_its_layer(segmentation, segment_id):
            segmentation.SeparateSegmentLabelmap(segment_id)  # its layer now holds it alone
        # the layer holds the segment's own label value (kept when it was separated from others): the block
        # is written with that value, so that a minimum with it clears what it leaves out and a maximum sets
        # what it holds, both only over the extent (a plain replace would replace the whole segment)
        value = segmentation.GetSegment(segment_id).GetLabelValue()
        layer = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
        scalar_type = layer.GetScalarType() if layer is not None and layer.GetPointData().GetScalars() else \
            vtk.VTK_UNSIGNED_CHAR
        image = slicer.vtkOrientedImageData()
        image.SetExtent(*[int(v) for v in extent])
        image.AllocateScalars(scalar_type if value <= 255 or scalar_type != vtk.VTK_UNSIGNED_CHAR
                              else vtk.VTK_UNSIGNED_SHORT, 1)
        scalars = vtk.util.numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
        scalars[:] = np.where(np.ascontiguousarray(block).ravel() > 0, value, 0)
        image.SetImageToWorldMatrix(ijk_to_ras)
        for mode in (logic.MODE_MERGE_MIN, logic.MODE_MERGE_MAX):
            if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, mode,
                                                    [int(v) for v in extent]):
                name = segmentation.GetSegment(segment_id).GetName() if segmentation.GetSegment(segment_id) else ""
                raise RuntimeError(f"Could not write the mask into segment '{name or segment_id}'.")
    finally:
        segmentation_node.EndModify(was_modified)


def read_block(segmentation_node, segment_id: str, volume_node, extent) -> np.ndarray:
    """The segment's voxels over ``extent`` (i0, i1, j0, j1, k0, k1 of ``volume_node``'s IJK) as uint8
    [k, j, i], 0/1.  A segmentation on another voxel grid is read resampled onto the volume's."""
    import slicer
    import vtk

    i0, i1, j0, j1, k0, k1 = extent
    block = np.zeros((k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1), np.uint8)
    labelmap = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    if labelmap is None:
        return block
    e = labelmap.GetExtent()
    if e[1] < e[0] or e[3] < e[2] or e[5] < e[4]:
        return block  # an empty segment
    labelmap_to_ras, volume_to_ras = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(labelmap_to_ras)
    volume_node.GetIJKToRASMatrix(volume_to_ras)
    if not np.allclose(slicer.util.arrayFromVTKMatrix(labelmap_to_ras), slicer.util.arrayFromVTKMatrix(volume_to_ras),
                       atol=1e-4):
        whole = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume_node)
        return (whole[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1] > 0).astype(np.uint8)
    arr = slicer.util.arrayFromSegmentInternalBinaryLabelmap(segmentation_node, segment_id)
    value = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    lo = [max(a, b) for a, b in ((i0, e[0]), (j0, e[2]), (k0, e[4]))]
    hi = [min(a, b) for a, b in ((i1, e[1]), (j1, e[3]), (k1, e[5]))]
    if any(h < l for l, h in zip(lo, hi)):
        return block
    src = arr[lo[2] - e[4]:hi[2] - e[4] + 1, lo[1] - e[2]:hi[1] - e[2] + 1, lo[0] - e[0]:hi[0] - e[0] + 1]
    block[lo[2] - k0:hi[2] - k0 + 1, lo[1] - j0:hi[1] - j0 + 1, lo[0] - i0:hi[0] - i0 + 1] = src == value
    return block


def leave_others_their_voxels(segmentation_node, segment_id: str, volume_node, extent, block) -> np.ndarray:
    """``block`` (uint8 [k, j, i] over ``extent``) without the voxels another segment of the segmentation
    already holds: Slicer's "overwrite none" (what its Segment Editor does when segments must not overlap)."""
    out = np.array(block, np.uint8, copy=True)
    segmentation = segmentation_node.GetSegmentation()
    for n in range(segmentation.GetNumberOfSegments()):
        other = segmentation.GetNthSegmentID(n)
        if other != segment_id:
            out[read_block(segmentation_node, other, volume_node, extent) > 0] = 0
    return out
