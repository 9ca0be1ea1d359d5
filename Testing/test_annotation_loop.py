"""The annotation loop end to end on real dev data, weight-free (the expert reads the reference masks):
label a small dataset (a NIfTI volume and a DICOM series made here) -> a correction through the
worker's override -> accepted in the worklist -> export-corrections -> a short SFT run reads it."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SHARED
from dicom_series import write_dicom_series
from MedSAMAgentLib.cli import main

CASE = SHARED / "data" / "ct3d_totalseg_abdomen"
TARGETS = {"liver": [5], "spleen": [1]}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    if not CASE.is_dir():
        pytest.fail(f"the dev data is missing ({CASE}); CI provides ../shared beside the repository")
    root = tmp_path_factory.mktemp("loop")
    dicom = write_dicom_series(sitk.ReadImage(str(CASE / "image.nii.gz")), root / "dicom" / "study1" / "ct")
    targets = {n: {"mask": str(CASE / "labels.nii.gz"), "values": v} for n, v in TARGETS.items()}
    manifest = root / "cases.json"
    manifest.write_text(json.dumps({"cases": [
        {"id": "ct_nifti", "modality": "CT", "image": str(CASE / "image.nii.gz"), "targets": targets},
        {"id": "study1/ct", "modality": "CT", "dim": 3, "image": str(dicom), "targets": targets}]}))
    out = root / "labels"
    assert main(["label", str(manifest), "-o", str(out), "--policy", "expert", "--tool", "classical", "-q"]) == 0
    return root, manifest, out, dicom


def test_label_writes_masks_in_the_input_geometry_and_dicom_seg_with_the_same_voxels(labelled):
    from MedSAMAgentLib.labelling.dicom_seg import read_seg

    root, manifest, out, dicom = labelled
    image = sitk.ReadImage(str(CASE / "image.nii.gz"))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(CASE / "labels.nii.gz")))
    folders = {json.loads(p.read_text())["case"]: p.parent for p in (out / "cases").glob("*/case.json")}
    assert set(folders) == {"ct_nifti", "study1/ct"}
    for case, folder in folders.items():
        for name, values in TARGETS.items():
            mask = sitk.ReadImage(str(folder / f"{name}.nii.gz"))
            assert mask.GetSize() == image.GetSize() and np.allclose(mask.GetDirection(), image.GetDirection())
            assert np.allclose(mask.GetOrigin(), image.GetOrigin(), atol=1e-3)
            got = sitk.GetArrayFromImage(mask).astype(bool)
            ref = np.isin(labels, values)
            dice = 2 * (got & ref).sum() / (got.sum() + ref.sum())
            assert dice > 0.5, (case, name, dice)  # on the target (the expert with the classical tool: 0.68-0.9)
    seg = read_seg(folders["study1/ct"] / "segmentation.dcm", dicom, None)
    assert set(seg) == set(TARGETS)
    for name in TARGETS:
        nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(folders["study1/ct"] / f"{name}.nii.gz"))).astype(bool)
        assert seg[name].any() and np.array_equal(seg[name], nifti)
    report = json.loads((out / "report.json").read_text())
    assert report["cases"] == 2 and report["case_targets"] == 4 and not report["failed"]
    for case in report["per_case"]:
        for t in case["targets"].values():
            assert t["voxels"] > 0 and t["slices"] > 0 and t["turns"] >= t["slices"]
    assert (out / "report.md").read_text().startswith("# Label run: quality report")
    audit = json.loads((folders["ct_nifti"] / "audit.json").read_text())
    assert audit["format"] == "medsam-agent-audit" and len(audit["runs"]) == 2
    assert all(e["author"] == "agent" for r in audit["runs"] for e in r["entries"])


def test_label_resumes_skips_finished_cases_and_redoes_an_interrupted_one(labelled, capsys):
    root, manifest, out, dicom = labelled
    capsys.readouterr()
    args = ["label", str(manifest), "-o", str(out), "--policy", "expert", "--tool", "classical", "-q"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped"] == 2
    case_dir = next(p.parent for p in (out / "cases").glob("*/case.json") if "ct_nifti" in p.parent.name)
    before = (case_dir / "liver.nii.gz").read_bytes()
    (case_dir / "case.json").unlink()  # as if the run had stopped inside this case
    (case_dir / "liver.nii.gz").write_bytes(b"cut off")
    assert main(args) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["labelled"] == 1 and last["skipped"] == 1
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(case_dir / "liver.nii.gz"))).any()
    assert (case_dir / "liver.nii.gz").read_bytes() == before  # the same expert, the same mask
    assert main(args + ["--label-map"]) == 2  # other settings into the same folder: refused, nothing touched
    assert "--label-map" in capsys.readouterr().err
    assert main(args[:-1] + ["--shard", "3/2", "-q"]) == 2


def test_shards_split_the_cases_between_processes(labelled, tmp_path, capsys):
    root, manifest, _, _ = labelled
    out = tmp_path / "sharded"
    done = []
    for i in range(2):
        assert main(["label", str(manifest), "-o", str(out), "--policy", "expert", "--tool", "classical",
                     "--shard", f"{i}/2", "-q", "--targets", "spleen"]) == 0
        done.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["labelled"])
    assert sorted(done) == [0, 2] or done == [1, 1]
    assert sum(done) == 2 and json.loads((out / "report.json").read_text())["cases"] == 2


def test_a_correction_accepted_in_the_worklist_becomes_training_data(labelled, tmp_path, capsys, tiny_qwen_dir):
    from MedSAMAgentLib.image_io import load_image
    from MedSAMAgentLib.masks import decode_rle
    from MedSAMAgentLib.policies import create_policy
    from MedSAMAgentLib.profile import Profile
    from MedSAMAgentLib.slicer_support.audit import AuditLog
    from MedSAMAgentLib.slicer_support.worklist import Worklist
    from MedSAMAgentLib.tools import create_tool
    from MedSAMAgentLib.volume import OrientedVolume
    from MedSAMAgentLib.worker.service import Worker, WorkerConfig

    root, manifest, out, _ = labelled
    worklist = Worklist(out)
    item = worklist.go("ct_nifti")
    loaded = load_image(item.image)
    masks = {n: sitk.GetArrayFromImage(sitk.ReadImage(str(p))).astype(bool) for n, p in item.masks.items()}
    # the annotator redraws the spleen on slice 12 with a box, through a worker session's override
    worker = Worker(WorkerConfig(token="t" * 32, allowed_dirs=[tmp_path]))
    worker.load(lambda step: (create_policy("expert"), create_tool("classical"), Profile.load()))
    try:
        sid = worker.open_session(loaded, "ct_nifti")["session"]
        vol = OrientedVolume(loaded.image)
        spleen = vol.from_original(masks["spleen"])
        ys, xs = np.nonzero(vol.slice("axial", 12, spleen))
        box = [int(xs.min()) - 2, int(ys.min()) - 2, int(xs.max()) + 2, int(ys.max()) + 2]
        answer = worker.override(sid, "axial", 12, [{"box": box}])
    finally:
        worker.close()
    slice_mask = decode_rle(answer["mask"])
    vol.put_slice(spleen, "axial", 12, slice_mask)
    corrected = vol.to_original(spleen)
    audit = AuditLog.from_json(item.audit.read_text())
    audit.record_override("ct_nifti:spleen", "axial", 12, [{"kind": "add", "item": "box", "to": box}],
                          [{"box": box}], answer["mask"])
    review = worklist.accept({"spleen": corrected, "liver": masks["liver"]}, audit.to_json(), loaded)
    assert Worklist(out).go("ct_nifti").accepted and json.loads(review.read_text())["accepted"]
    accepted = sitk.GetArrayFromImage(sitk.ReadImage(json.loads(review.read_text())["masks"]["spleen"])).astype(bool)
    assert np.array_equal(accepted, corrected) and not np.array_equal(accepted, masks["spleen"])

    exported = tmp_path / "corrections"
    capsys.readouterr()
    assert main(["export-corrections", str(out), "--out", str(exported), "--tool", "classical", "-q"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["cases"] == 1 and result["case_targets"] == 2 and result["records"] > 0
    assert result["edits"] == {"add": 1}
    cases = json.loads((exported / "cases.json").read_text())["cases"]
    assert cases[0]["targets"]["spleen"]["mask"] == json.loads(review.read_text())["masks"]["spleen"]
    records = [json.loads(line) for line in Path(result["records_file"]).read_text().splitlines()]
    spleen = [r for r in records if r["target"] == "spleen"]
    assert spleen and all(r["corrections"]["edits"] == {"add": 1} for r in spleen)
    assert all(r["corrections"]["edits"] == {} for r in records if r["target"] == "liver")

    from medsam_training.sft import SFTSettings, train
    from medsam_training.toyworld import toy_profile

    profile = tmp_path / "p.json"
    profile.write_text(json.dumps(toy_profile(64).to_dict()))
    settings = SFTSettings(model=str(tiny_qwen_dir), records=[str(exported / "synthesis")],
                           output_dir=str(tmp_path / "sft"), profile=str(profile), lora=False, freeze_vision=False,
                           batch_size=1, grad_accum=1, max_steps=2, gradient_checkpointing=False, logging_steps=1,
                           save_steps=100, device="cpu")
    summary = train(settings)
    assert (tmp_path / "sft" / "final").is_dir() and summary


def test_an_exported_audit_trail_with_its_volume_and_masks_is_exported_too(labelled, tmp_path, capsys):
    from MedSAMAgentLib.slicer_support.audit import AuditLog

    root, manifest, out, _ = labelled
    case_dir = next(p.parent for p in (out / "cases").glob("*/case.json") if "ct_nifti" in p.parent.name)
    audit = AuditLog.from_json((case_dir / "audit.json").read_text())
    audit.record_override("ct_nifti:liver", "axial", 5, [{"kind": "delete", "item": "point"},
                                                          {"kind": "move", "item": "box"}], [], None)
    trail = tmp_path / "trail.json"
    audit.export(trail)
    capsys.readouterr()
    assert main(["export-corrections", "--audit", str(trail), "--out", str(tmp_path / "x"), "-q"]) == 2
    assert "needs its volume and accepted masks" in capsys.readouterr().err
    assert main(["export-corrections", "--audit", str(trail), "--image", str(CASE / "image.nii.gz"), "--mask",
                 f"liver={case_dir / 'liver.nii.gz'}", "--out", str(tmp_path / "x"), "--tool", "classical",
                 "--slices", "count:3", "-q"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["cases"] == 1 and result["records"] > 0 and result["edits"] == {"delete": 1, "move": 1}
