"""The scene round trip and the audit trail through the Logic on real MRML (slicer-core): saved as a data
bundle (.mrb) and loaded into a fresh scene, the markups, segment and trail come back, nothing is recomputed
until the person edits, and an edit then works; the trail exports as JSON; a trail node holding something
else is said and replaced, never trusted."""
import json

import numpy as np

from slicer_scene import (  # noqa: F401 - fixtures
    CT,
    SlicerScene,
    host_tmp,
    logic,
    scene,
    segment_array,
    session_replay,
    shared_worker,
    wait,
)

from MedSAMAgentLib.slicer_support.processing import IDLE
from MedSAMAgentLogic.host import PlainHost
from MedSAMAgentLogic.logic import AgentLogic


def test_save_and_reload_as_a_data_bundle_brings_everything_back_with_no_spurious_override(
        scene, logic, tmp_path, host_tmp, shared_worker):
    volume = scene.load(CT / "image.nii.gz", "CT")
    segmentation = logic.newSegmentation(volume)
    audit = logic.newAuditNode()
    axis, slices = logic.autoSegment(volume, segmentation, "liver", "Red", "range", before=1, after=1,
                                     auditNode=audit)
    assert wait(logic) == IDLE
    saved_mask = segment_array(segmentation, "liver", volume)
    saved_trail = json.loads(audit.GetText())
    bundle = tmp_path / "case.mrb"
    assert scene.scene.WriteToMRB(str(bundle)), "Slicer could not write the data bundle"
    launch = logic.defaultLaunch

    fresh = SlicerScene()
    try:
        assert fresh.scene.ReadFromMRB(str(bundle)), "Slicer could not read the data bundle"
        again = AgentLogic(PlainHost(fresh.scene, temporaryPath=host_tmp))
        again.supervisor, again.defaultLaunch = shared_worker, launch
        volume2 = fresh.scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        segmentation2 = fresh.scene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
        audit2 = fresh.scene.GetFirstNodeByClass("vtkMRMLTextNode")
        assert np.array_equal(segment_array(segmentation2, "liver", volume2), saved_mask)
        assert json.loads(audit2.GetText()) == saved_trail
        ctx = again.context(volume2, segmentation2, "liver")
        again._attachAudit(audit2)
        assert len(again.roiNodes(ctx)) == 3 and again.pointsNode(ctx, True).GetNumberOfControlPoints() == 3
        again.flushOverrides()
        assert wait(again) == IDLE
        assert again.audit.entries("user") == [] and ctx.session is None  # nothing sent to the worker
        assert np.array_equal(segment_array(segmentation2, "liver", volume2), saved_mask)
        # the person's first edit after the reload recomputes its slice (the volume opened on the worker)
        node = again.pointsNode(ctx, True)
        pos = [0.0, 0.0, 0.0]
        node.GetNthControlPointPosition(0, pos)
        node.SetNthControlPointPosition(0, pos[0] + 15.0, pos[1] + 10.0, pos[2])
        again.flushOverrides()
        assert wait(again) == IDLE, again.processing.message
        assert len(again.audit.entries("user")) == 1
        assert not np.array_equal(segment_array(segmentation2, "liver", volume2), saved_mask)
        assert json.loads(audit2.GetText())["runs"][0]["entries"][-1]["author"] == "user"  # saved to the node
        again.forgetScene()
        again.executor.shutdown(wait=True)
    finally:
        fresh.close()


def test_the_trail_exports_as_json_and_a_foreign_trail_node_is_replaced(scene, logic, tmp_path):
    volume = scene.load(CT / "image.nii.gz", "CT")
    segmentation = logic.newSegmentation(volume)
    foreign = logic.newAuditNode()
    foreign.SetText('{"some": "other module\'s text"}')
    texts = []
    logic.onStatus = lambda text, level: texts.append((text, level))
    logic.autoSegment(volume, segmentation, "liver", "Red", auditNode=foreign)
    assert wait(logic) == IDLE
    assert any(level == "warning" and "audit node holds something else" in t for t, level in texts)
    trail = json.loads(foreign.GetText())
    assert trail["format"] == "medsam-agent-audit" and len(trail["runs"]) == 1
    run = trail["runs"][0]
    assert run["target"] == "liver" and run["status"] == "done"
    assert run["settings"]["policy"] == "replay" and run["settings"]["tool"] == "classical"
    exported = logic.exportAudit(str(tmp_path / "trail.json"))
    assert json.loads(open(exported, encoding="utf-8").read()) == trail
