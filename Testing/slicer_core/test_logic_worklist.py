"""Reviewing a label run in the Logic on real MRML (slicer-core): a ``medsam-agent label`` output (weight-free:
the expert policy, the classical tool, the real dev CT as a NIfTI file and as a DICOM series) opened as a
worklist; a case loads with the image's exact voxels and geometry, one segment per target equal to its mask
file, and its trail in the audit node; a correction (voxels changed, or an override through the worker) is
accepted into review/ with exactly the corrected voxels and the trail; next/previous wrap with one and two
cases, replacing the case's nodes; a case that cannot be read leaves the scene as it was."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from slicer_scene import (  # noqa: F401 - fixtures
    CT,
    host_tmp,
    logic,
    scene,
    segment_array,
    session_replay,
    shared_worker,
    slicer,
    slices_with_voxels,
    wait,
)

from dicom_series import write_dicom_series
from MedSAMAgentLib.cli import main
from MedSAMAgentLib.errors import InputError
from MedSAMAgentLib.slicer_support.processing import IDLE
from MedSAMAgentLib.slicer_support.worklist import Worklist
from MedSAMAgentLogic.worklist_review import WorklistReview, node_matrix

TARGETS = {"liver": [5], "spleen": [1]}


@pytest.fixture(scope="module")
def label_run(tmp_path_factory):
    """A label output of two cases: "ct" (the NIfTI file) and "ct_dicom" (the same CT as a DICOM series)."""
    if not CT.is_dir():
        pytest.fail(f"the dev data is missing ({CT}); CI provides ../shared beside the repository")
    root = tmp_path_factory.mktemp("label")
    dicom = write_dicom_series(sitk.ReadImage(str(CT / "image.nii.gz")), root / "dicom")
    targets = {n: {"mask": str(CT / "labels.nii.gz"), "values": v} for n, v in TARGETS.items()}
    manifest = root / "cases.json"
    manifest.write_text(json.dumps({"cases": [
        {"id": "ct", "modality": "CT", "image": str(CT / "image.nii.gz"), "targets": targets},
        {"id": "ct_dicom", "modality": "CT", "dim": 3, "image": str(dicom), "targets": targets}]}))
    out = root / "out"
    assert main(["label", str(manifest), "-o", str(out), "--policy", "expert", "--tool", "classical", "-q"]) == 0
    return out


@pytest.fixture()
def folder(label_run, tmp_path):
    """A copy of the label output the test may change."""
    return shutil.copytree(label_run, tmp_path / "out")


def one_case(folder, keep="ct"):
    for case in (folder / "cases").iterdir():
        if case.name != keep:
            shutil.rmtree(case)
    return folder


def expected_ijk_to_ras(image):
    m = np.eye(4)
    m[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ m


def mask_file(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(bool)


def count(scene, cls):
    return scene.scene.GetNodesByClass(cls).GetNumberOfItems()


@pytest.mark.parametrize("case", ["ct", "ct_dicom"])
def test_a_case_loads_with_the_images_voxels_and_geometry_its_masks_and_its_trail(scene, logic, folder, case):
    review = WorklistReview(logic)
    review.open(folder)
    item = review.go(case)
    image = sitk.ReadImage(str(CT / "image.nii.gz"))
    volume = review.volumeNode
    assert np.array_equal(slicer.util.arrayFromVolume(volume), sitk.GetArrayFromImage(image))
    assert np.allclose(node_matrix(volume), expected_ijk_to_ras(image), atol=1e-4)
    storage = volume.GetStorageNode()
    assert (storage is not None and storage.GetFileName() == str(CT / "image.nii.gz")) == (case == "ct")
    for name in TARGETS:
        agent = mask_file(item.masks[name])
        assert agent.any() and np.array_equal(segment_array(review.segmentationNode, name, volume), agent)
        assert np.array_equal(review.segmentMask(name), agent)
    trail = json.loads(review.auditNode.GetText())
    assert trail == json.loads(item.audit.read_text())
    assert [r.run for r in logic.audit.runs] == [f"{case}:liver", f"{case}:spleen"]
    assert logic.auditNode is review.auditNode
    assert logic.targetsInWork() == ["liver", "spleen"] and logic.currentContext.target == "liver"
    assert logic.currentContext.sliceRun[("axial", 12)] == f"{case}:liver"
    assert not review.edited and "Case" in review.statusText()


def test_a_corrected_case_is_accepted_with_exactly_its_voxels_and_the_trail(scene, logic, folder):
    review = WorklistReview(logic)
    item = review.open(one_case(folder))
    volume, segmentation = review.volumeNode, review.segmentationNode
    agent = {n: mask_file(p) for n, p in item.masks.items()}
    corrected = agent["liver"].copy()
    corrected[10] = False  # a slice cleared, a blob added on another
    corrected[20, 40:52, 30:47] = True
    assert not np.array_equal(corrected, agent["liver"])
    liver = segmentation.GetSegmentation().GetSegmentIdBySegmentName("liver")
    slicer.util.updateSegmentBinaryLabelmapFromArray(corrected.astype(np.uint8), segmentation, liver, volume)
    assert review.edited
    record_path = review.accept()
    assert record_path == folder / "review" / "ct.json" and not review.edited
    record = json.loads(record_path.read_text())
    assert record["accepted"] and record["case"] == "ct" and set(record["masks"]) == set(TARGETS)
    assert np.array_equal(mask_file(record["masks"]["liver"]), corrected)
    assert np.array_equal(mask_file(record["masks"]["spleen"]), agent["spleen"])
    accepted = sitk.ReadImage(record["masks"]["liver"])
    image = sitk.ReadImage(str(CT / "image.nii.gz"))
    assert accepted.GetSize() == image.GetSize() and np.allclose(accepted.GetOrigin(), image.GetOrigin())
    assert np.array_equal(mask_file(item.masks["liver"]), agent["liver"])  # the label run's own file untouched
    assert json.loads((folder / "review" / "ct" / "audit.json").read_text()) == json.loads(item.audit.read_text())
    assert Worklist(folder).current.accepted and "(accepted)" in review.statusText()
    review.load()  # an accepted case comes back as accepted
    assert np.array_equal(segment_array(review.segmentationNode, "liver", review.volumeNode), corrected)


def test_an_override_on_a_reviewed_slice_goes_into_the_label_runs_trail_and_is_accepted(scene, logic, folder):
    review = WorklistReview(logic)
    item = review.open(one_case(folder))
    ctx = logic.currentContext
    h, w = ctx.geometry.slice_shape("axial")
    logic.addBox(ctx, "axial", 12, (w * 0.3, h * 0.3, w * 0.7, h * 0.7))
    logic.flushOverrides()
    assert wait(logic) == IDLE, logic.processing.message
    user = [(r.run, e.kind, e.slice) for r in logic.audit.runs for e in r.entries if e.author == "user"]
    assert user == [("ct:liver", "override", 12)] and review.edited
    assert 12 in slices_with_voxels(review.segmentationNode, "liver", review.volumeNode, ctx.geometry, "axial")
    record = json.loads(review.accept().read_text())
    trail = json.loads((folder / "review" / "ct" / "audit.json").read_text())
    assert [e["author"] for r in trail["runs"] if r["run"] == "ct:liver" for e in r["entries"]][-1] == "user"
    assert np.array_equal(mask_file(record["masks"]["liver"]), review.segmentMask("liver"))
    assert not np.array_equal(mask_file(record["masks"]["liver"]), mask_file(item.masks["liver"]))


def test_next_and_previous_wrap_and_replace_the_cases_nodes(scene, logic, folder):
    review = WorklistReview(logic)
    first = review.open(folder).case
    nodes = {cls: count(scene, cls) for cls in ("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode",
                                                "vtkMRMLTextNode", "vtkMRMLMarkupsFiducialNode")}
    assert nodes["vtkMRMLMarkupsFiducialNode"] == 4  # each target's positive and negative points
    seen = [first, review.next().case, review.next().case, review.previous().case]
    assert seen[0] != seen[1] and seen[2] == seen[0] and seen[3] == seen[1]
    assert {cls: count(scene, cls) for cls in nodes} == nodes  # the case left took its nodes along
    assert review.volumeNode.GetName() == seen[3] and len(logic.contexts) == 2
    assert all(c.volumeNode is review.volumeNode for c in logic.contexts.values())

    # a case that cannot be read: said, and the scene still shows the case it was on
    shown = review.volumeNode
    other = review.worklist.items[1 - review.worklist.index]
    (other.folder / "liver.nii.gz").write_bytes(b"cut off")
    with pytest.raises(InputError):
        review.next()
    assert review.worklist.current.case == seen[3] and review.volumeNode is shown
    assert scene.scene.IsNodePresent(shown)


def test_one_case_wraps_onto_itself(scene, logic, folder):
    review = WorklistReview(logic)
    assert review.open(one_case(folder)).case == "ct"
    assert review.next().case == "ct" and review.previous().case == "ct"
    assert count(scene, "vtkMRMLScalarVolumeNode") == 1 and count(scene, "vtkMRMLSegmentationNode") == 1
    assert "Case 1 of 1: ct" in review.statusText()
