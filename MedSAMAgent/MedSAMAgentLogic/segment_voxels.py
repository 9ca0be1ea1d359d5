"""Writing the agent's mask into one segment of a Slicer segmentation, and nothing else.

A segment may share its labelmap layer with other segments (a second target in the same
output segmentation, or a user's existing segmentation): the layer then holds each segment's
own label value, and Slicer's MIN/MAX merges work on those raw values.  Writing a 0/1 block with
them into a shared layer puts the 1s into whichever segment has label value 1 and leaves the
target empty (measured on slicer-core: ``Testing/test_slicer_segment_voxels.py``).  So the target
segment is first moved to a layer of its own (``vtkSegmentation.SeparateSegmentLabelmap``, as
Slicer does when segments overlap); its voxels are then set over the block's extent only, and
the other segments keep every voxel they had (an overlap is allowed, never an overwrite).
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
    image = slicer.vtkOrientedImageData()
    image.SetExtent(*[int(v) for v in extent])
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    scalars = vtk.util.numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    scalars[:] = (np.ascontiguousarray(block).ravel() > 0).astype(np.uint8)
    image.SetImageToWorldMatrix(ijk_to_ras)
    was_modified = segmentation_node.StartModify()
    try:
        if shares_its_layer(segmentation, segment_id):
            segmentation.SeparateSegmentLabelmap(segment_id)  # its layer now holds it alone: 0/1 means it
        # a minimum with the block clears what it leaves out, a maximum sets what it holds, both only over
        # the extent (a plain replace would replace the whole segment)
        for mode in (logic.MODE_MERGE_MIN, logic.MODE_MERGE_MAX):
            if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, mode,
                                                    [int(v) for v in extent]):
                name = segmentation.GetSegment(segment_id).GetName() if segmentation.GetSegment(segment_id) else ""
                raise RuntimeError(f"Could not write the mask into segment '{name or segment_id}'.")
    finally:
        segmentation_node.EndModify(was_modified)
