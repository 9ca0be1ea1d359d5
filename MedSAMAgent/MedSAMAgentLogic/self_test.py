"""The module's self-test, on any scene: Slicer's "Reload and Test" (``MedSAMAgentTest``) runs it on the
MRHead sample, and the slicer-core tests run it on a real CT volume.  No model weights are downloaded.

Auto-segment with the bundled LiteMedSAM tool (the classical tool where its package is not installed) and a
replay policy on three slices along the volume's axial axis; the markups (one box per slice lying in its
slice plane, one positive point each, labelled with slice and turn) and the segment (voxels on exactly those
slices); then a negative point on the middle slice -- an override -- changes that slice's mask, the audit
trail records the person, exports as JSON, and undo brings the mask back.
"""
import json
import os

import numpy as np

import slicer

from MedSAMAgentLib.slicer_support.options import REPLAY, Launch, bundled_tool
from MedSAMAgentLib.slicer_support.processing import IDLE
from MedSAMAgentLib.slicer_support.replay import write_replay


def auto_segment_and_override(logic, volume, workDir, say=print, tool=None, target="brain"):
    """Run the self-test with ``logic`` on ``volume`` (a scalar volume node); AssertionError when it fails."""
    geometry = logic.geometryOf(volume)
    axis = "axial"
    middle = geometry.num_slices(axis) // 2
    slices = [middle - 1, middle, middle + 1]
    replay = write_replay(os.path.join(workDir, "replay.json"), axis, slices, target=target)
    launch = Launch(policy=REPLAY, tool=tool or bundled_tool(), device="cpu", max_turns=5, policy_path=str(replay),
                    allow_dirs=(logic.workDir(),))
    segmentation = logic.newSegmentation(volume)
    audit = logic.newAuditNode()
    try:
        say(f"Auto-segment: {launch.tool} tool, replay policy, 3 slices")
        logic.startAutoSegment(volume, segmentation, target, axis, slices, middle, launch, auditNode=audit,
                               confirm=False)
        logic.waitUntilIdle(300)
        assert logic.processing.state == IDLE, logic.processing.message
        ctx = logic.currentContext

        # markups: one box per slice, in its plane; one positive point per slice, labelled s{slice}-t2
        rois = logic.roiNodes(ctx)
        assert len(rois) == len(slices), f"{len(rois)} boxes for {len(slices)} slices"
        for roi in rois:
            centre = slicer.util.arrayFromVTKMatrix(roi.GetObjectToNodeMatrix())[:3, 3]
            _, _, z = geometry.ras_to_pixel(axis, centre)
            assert abs(z - round(z)) < 1e-3 and round(z) in slices, f"a box off its slice plane (z={z})"
        positive = logic.pointsNode(ctx, True)
        labels = sorted(positive.GetNthControlPointLabel(n) for n in range(positive.GetNumberOfControlPoints()))
        assert labels == sorted(f"s{i}-t2" for i in slices), labels

        # segment: voxels on the three slices and nowhere else
        segmentId = segmentation.GetSegmentation().GetSegmentIdBySegmentName(target)
        assert segmentId
        labelmap = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
        for i in range(geometry.num_slices(axis)):
            count = int(geometry.read_slice(labelmap, axis, i).sum())
            assert (count > 0) == (i in slices), f"slice {i}: {count} voxels"

        # override: a negative point in the middle of the middle slice's mask changes that mask
        before = geometry.read_slice(labelmap, axis, middle).astype(bool)
        ys, xs = np.nonzero(before)
        inside = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))  # the mask pixel nearest its centre
        logic.addPoint(ctx, axis, middle, float(xs[inside]), float(ys[inside]), positive=False)
        logic.flushOverrides()
        logic.waitUntilIdle(120)
        labelmap = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
        after = geometry.read_slice(labelmap, axis, middle).astype(bool)
        assert not np.array_equal(before, after), "the override did not change the mask"
        users = logic.audit.entries("user")
        assert len(users) == 1 and users[0].edits[0]["edit"] == "add_point", users
        assert len(users[0].prompts) == 3  # box, positive point, the new negative point

        # the trail is in the scene and exports as JSON
        saved = json.loads(audit.GetText())
        assert {e["author"] for r in saved["runs"] for e in r["entries"]} == {"agent", "user"}
        exported = logic.exportAudit(os.path.join(workDir, "trail.json"))
        with open(exported, encoding="utf-8") as f:
            assert json.load(f)["format"] == "medsam-agent-audit"

        # undo the override: the middle slice's mask comes back
        assert logic.undoLast().startswith("Override")
        labelmap = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
        assert np.array_equal(geometry.read_slice(labelmap, axis, middle).astype(bool), before)
    finally:
        logic.stopWorker()
