"""Which voxels the agent writes, through the Logic on real MRML (slicer-core) and a real worker: a target
sharing its labelmap layer with another segment (a second target, a person's own segment), a segmentation
on another grid than the volume, several targets in one Auto-segment with the overlap rule; undo in each
case leaves every other segment exactly as it was."""
import numpy as np
import pytest

from slicer_scene import (  # noqa: F401 - fixtures
    CT,
    host_tmp,
    logic,
    scene,
    segment_array,
    session_replay,
    shared_worker,
    slices_with_voxels,
    wait,
)

import slicer

from MedSAMAgentLib.slicer_support.processing import IDLE


def paint(segmentationNode, name, volumeNode, kji):
    """A segment painted as a person's Segment Editor would (a plain replace), on the volume's grid."""
    segmentId = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(name) or \
        segmentationNode.GetSegmentation().AddEmptySegment("", name)
    slicer.util.updateSegmentBinaryLabelmapFromArray(kji.astype(np.uint8), segmentationNode, segmentId, volumeNode)
    return segmentId


def all_segments(segmentationNode, volumeNode):
    seg = segmentationNode.GetSegmentation()
    names = [seg.GetNthSegment(n).GetName() for n in range(seg.GetNumberOfSegments())]
    return {name: segment_array(segmentationNode, name, volumeNode) for name in names}


def current_slice(scene, logic, volume, view="Red"):
    geometry = logic.geometryOf(volume)
    return geometry.view_slice_index(slicer.util.arrayFromVTKMatrix(scene.sliceNode(view).GetSliceToRAS()), "axial")


def test_a_persons_segment_in_the_same_layer_keeps_every_voxel_and_undo_restores_all(scene, logic):
    volume = scene.load(CT / "image.nii.gz", "CT")
    segmentation = logic.newSegmentation(volume)
    m = current_slice(scene, logic, volume)
    theirs = np.zeros(slicer.util.arrayFromVolume(volume).shape, bool)
    theirs[m - 1:m + 2, 40:60, 50:70] = True  # in the middle of the slice, where the agent's box goes
    paint(segmentation, "their kidney", volume, theirs)
    seg = segmentation.GetSegmentation()
    # the agent's segment is added to the same layer (AddEmptySegment shares it): the hard case
    logic.autoSegment(volume, segmentation, "liver", "Red", "range", before=1, after=1)
    assert wait(logic) == IDLE, logic.processing.message
    after = all_segments(segmentation, volume)
    assert np.array_equal(after["their kidney"], theirs)
    liver = after["liver"]
    assert all(liver[k].any() for k in (m - 1, m, m + 1))
    assert not (liver & theirs).any()  # overwrite none: their voxels stay theirs
    assert seg.GetNumberOfSegments() == 2
    while len(logic.undo):
        logic.undoLast()
    undone = all_segments(segmentation, volume)
    assert not undone["liver"].any()
    assert np.array_equal(undone["their kidney"], theirs)


def test_with_overlap_allowed_both_segments_hold_the_shared_voxels(scene, logic):
    volume = scene.load(CT / "image.nii.gz", "CT")
    segmentation = logic.newSegmentation(volume)
    m = current_slice(scene, logic, volume)
    theirs = np.zeros(slicer.util.arrayFromVolume(volume).shape, bool)
    theirs[m, 40:60, 50:70] = True
    paint(segmentation, "their kidney", volume, theirs)
    logic.autoSegment(volume, segmentation, "liver", "Red", "current slice", allowOverlap=True)
    assert wait(logic) == IDLE
    after = all_segments(segmentation, volume)
    assert np.array_equal(after["their kidney"], theirs)
    assert (after["liver"] & theirs).any()


def test_several_targets_in_one_auto_segment_each_into_its_own_segment(scene, logic):
    volume = scene.load(CT / "image.nii.gz", "CT")
    segmentation = logic.newSegmentation(volume)
    audit = logic.newAuditNode()
    geometry = logic.geometryOf(volume)
    texts = []
    logic.onStatus = lambda text, level: texts.append(text)
    axis, slices = logic.autoSegment(volume, segmentation, "spleen, kidney; Spleen", "Red", "range",
                                     before=1, after=1, auditNode=audit)
    assert wait(logic) == IDLE, logic.processing.message
    seg = segmentation.GetSegmentation()
    assert [seg.GetNthSegment(n).GetName() for n in range(seg.GetNumberOfSegments())] == ["spleen", "kidney"]
    spleen, kidney = segment_array(segmentation, "spleen", volume), segment_array(segmentation, "kidney", volume)
    for name in ("spleen", "kidney"):
        assert slices_with_voxels(segmentation, name, volume, geometry, axis) == slices
    # the replay boxes the spleen on the left of the picture the agent sees, the kidney on its right
    columns = lambda a: np.nonzero(geometry.read_slice(a, axis, slices[1]).any(axis=0))[0].mean()  # noqa: E731
    assert columns(spleen) < columns(kidney)
    # markups and audit runs per target
    contexts = {c.target: c for c in logic.contexts.values()}
    assert set(contexts) == {"spleen", "kidney"}
    for name, ctx in contexts.items():
        assert len(logic.roiNodes(ctx)) == 3
        assert all(name in roi.GetName() for roi in logic.roiNodes(ctx))
    assert [r.target for r in logic.audit.runs] == ["spleen", "kidney"]
    assert logic.targetsInWork() == ["spleen", "kidney"] and logic.currentContext.target == "kidney"
    assert logic.selectTarget("spleen") is contexts["spleen"] and logic.currentContext is contexts["spleen"]
    with pytest.raises(ValueError, match="No run of 'liver'"):
        logic.selectTarget("liver")
    assert any(t.startswith("spleen (1 of 2)") for t in texts) and any(t.startswith("kidney (2 of 2)") for t in texts)
    # an override on one target's slice changes that target only
    ctx = contexts["spleen"]
    roi = logic.roiNodes(ctx)[1]
    size = list(roi.GetSize())
    roi.SetSize(size[0] * 0.5, size[1] * 0.5, size[2])
    logic.flushOverrides()
    assert wait(logic) == IDLE
    assert np.array_equal(segment_array(segmentation, "kidney", volume), kidney)
    assert not np.array_equal(segment_array(segmentation, "spleen", volume), spleen)
    assert logic.audit.entries("user")[-1].edits[0]["edit"] == "resize_box"
    assert logic.audit.runs[0].entries[-1].author == "user"  # recorded in the spleen's run
    # undo: the spleen's override, then the kidney's actions; the other segment exactly as it was
    logic.undoLast()
    assert np.array_equal(segment_array(segmentation, "spleen", volume), spleen)
    logic.undoLast()
    assert np.array_equal(segment_array(segmentation, "spleen", volume), spleen)
    assert not np.array_equal(segment_array(segmentation, "kidney", volume), kidney)


def test_the_second_of_two_targets_with_the_same_mask_leaves_the_first_its_voxels(scene, logic):
    volume = scene.load(CT / "image.nii.gz", "CT")
    segmentation = logic.newSegmentation(volume)
    logic.autoSegment(volume, segmentation, ["liver", "organ"], "Red", "current slice")
    assert wait(logic) == IDLE
    liver, organ = segment_array(segmentation, "liver", volume), segment_array(segmentation, "organ", volume)
    assert liver.any() and not (liver & organ).any()
    # allowed to overlap, the same replay gives the second target the same voxels
    other = logic.newSegmentation(volume)
    logic.autoSegment(volume, other, ["liver", "organ"], "Red", "current slice", allowOverlap=True)
    assert wait(logic) == IDLE
    assert np.array_equal(segment_array(other, "liver", volume), segment_array(other, "organ", volume))


def test_a_failed_target_stops_the_press_and_says_what_was_not_run(scene, logic):
    volume = scene.load(CT / "image.nii.gz", "CT")
    segmentation = logic.newSegmentation(volume)
    texts = []
    logic.onStatus = lambda text, level: texts.append((text, level))
    logic.autoSegment(volume, segmentation, "spleen, kidney, liver", "Red", "range", before=1, after=1)
    while logic.run is None:  # a target's run has started: cancel it
        logic.host.processEvents()
    # on a loaded machine the first target's 3 slices can be done within one event-loop pass, and the
    # run seen here is then the second target's: the press stops at whichever run was cancelled
    cancelled = logic.run.ctx.target
    logic.cancel()
    assert wait(logic) == IDLE
    order = ["spleen", "kidney", "liver"]
    ran = order[:order.index(cancelled) + 1]
    assert cancelled in ("spleen", "kidney") and [r.target for r in logic.audit.runs] == ran
    left = 3 - len(ran)
    assert any(f"{left} more target{'s' * (left != 1)} not run" in t for t, _ in texts)


def test_a_segmentation_on_another_grid_gets_the_mask_and_keeps_its_other_segment(scene, logic):
    volume = scene.load(CT / "image.nii.gz", "CT")
    m = current_slice(scene, logic, volume)
    # a person's segmentation made on a finer grid (half the voxel size in-plane), one segment in it
    fine = scene.volume(np.zeros((30, 202, 244), np.int16), fine_ijk_to_ras(volume), "fine grid")
    segmentation = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "their segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(fine)
    theirs = np.zeros((30, 202, 244), bool)
    theirs[m, 10:30, 10:40] = True
    paint(segmentation, "their lesion", fine, theirs)
    before = segment_array(segmentation, "their lesion", fine)
    logic.autoSegment(volume, segmentation, "liver", "Red", "current slice")
    assert wait(logic) == IDLE, logic.processing.message
    liver = segment_array(segmentation, "liver", volume)
    geometry = logic.geometryOf(volume)
    assert slices_with_voxels(segmentation, "liver", volume, geometry, "axial") == [m]
    assert liver[m].sum() > 50
    assert np.array_equal(segment_array(segmentation, "their lesion", fine), before)
    while len(logic.undo):
        logic.undoLast()
    assert not segment_array(segmentation, "liver", volume).any()
    assert np.array_equal(segment_array(segmentation, "their lesion", fine), before)


def fine_ijk_to_ras(volume):
    m = vtk_matrix_to_array(volume)
    m[:3, :2] *= 0.5  # i and j steps halved
    m[:3, 3] -= 0.25 * (vtk_matrix_to_array(volume)[:3, 0] + vtk_matrix_to_array(volume)[:3, 1])
    return m


def vtk_matrix_to_array(volume):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix).copy()
