"""What `label` reads: manifests, nnU-Net v2 folders, folders of volumes and DICOM trees (real files made here)."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from MedSAMAgentLib.cli import main
from MedSAMAgentLib.image_io import InputError
from MedSAMAgentLib.labelling.qc import key_slices, review_reasons, target_stats
from MedSAMAgentLib.labelling.sources import list_cases
from dicom_series import write_dicom_series


def volume(path, seed=0, shape=(6, 40, 48)):
    rng = np.random.default_rng(seed)
    arr = rng.normal(40, 10, shape).astype(np.int16)
    arr[:, 10:30, 12:36] += 300
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.8, 2.5))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    lab = sitk.GetImageFromArray((arr > 200).astype(np.uint8) * 2)
    lab.CopyInformation(img)
    return img, lab


def test_an_nnunet_folder_gives_every_case_with_its_labels_as_references(tmp_path):
    root = tmp_path / "Dataset001"
    for split, cid in (("imagesTr", "a"), ("imagesTr", "b"), ("imagesTs", "c")):
        img, lab = volume(root / split / f"{cid}_0000.nii.gz")
        if split == "imagesTr":
            (root / "labelsTr").mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(lab, str(root / "labelsTr" / f"{cid}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0,
                                                  "left_kidney": 2}, "file_ending": ".nii.gz"}))
    cases = list_cases(root)
    assert [c.id for c in cases] == ["a", "b", "c"] and all(c.modality == "CT" for c in cases)
    assert [t.text for t in cases[0].targets] == ["left kidney"] and cases[0].targets[0].values == [2]
    assert cases[0].targets[0].mask.name == "a.nii.gz" and cases[2].targets[0].mask is None  # imagesTs: no labels
    out = tmp_path / "out"
    # the expert needs a reference for every case: imagesTs has none, said before any work
    assert main(["label", str(root), "-o", str(out), "--policy", "expert", "--tool", "classical", "-q"]) == 2
    assert not out.exists()


def test_a_folder_of_volumes_and_a_dicom_tree_become_cases_one_per_series(tmp_path):
    img, _ = volume(tmp_path / "data" / "site1" / "p1.nii.gz")
    volume(tmp_path / "data" / "site2" / "p2.nrrd", seed=1)
    write_dicom_series(img, tmp_path / "data" / "dicom" / "study9" / "s1")
    with pytest.raises(InputError, match="--targets"):
        list_cases(tmp_path / "data")
    cases = list_cases(tmp_path / "data", ["liver", "spleen"])
    assert [c.id for c in cases] == ["site1/p1", "site2/p2", "dicom/study9/s1"]
    assert [c.dicom for c in cases] == [False, False, True] and cases[2].series
    assert all([t.name for t in c.targets] == ["liver", "spleen"] and all(t.mask is None for t in c.targets)
               for c in cases)
    assert len({c.folder_name for c in cases}) == 3 and all("/" not in c.folder_name for c in cases)
    with pytest.raises(InputError, match="No dataset"):
        list_cases(tmp_path / "nothing")


def test_a_manifest_keeps_the_targets_asked_for_and_names_a_missing_one(tmp_path):
    img, lab = volume(tmp_path / "v.nii.gz")
    sitk.WriteImage(lab, str(tmp_path / "lab.nii.gz"))
    (tmp_path / "m.json").write_text(json.dumps({"cases": [{"id": "v", "image": "v.nii.gz", "targets": {
        "kidney": {"mask": "lab.nii.gz", "values": [2]}, "cyst": {"mask": "lab.nii.gz", "values": [2]}}}]}))
    assert [t.name for t in list_cases(tmp_path / "m.json")[0].targets] == ["kidney", "cyst"]
    assert [t.name for t in list_cases(tmp_path / "m.json", ["cyst"])[0].targets] == ["cyst"]
    with pytest.raises(InputError, match="no target 'liver'"):
        list_cases(tmp_path / "m.json", ["liver"])


def test_a_label_map_holds_every_target_and_its_table_names_them(tmp_path, capsys):
    img, lab = volume(tmp_path / "v.nii.gz")
    arr = sitk.GetArrayFromImage(lab)
    arr[:, 30:36, 40:46] = 3
    lab2 = sitk.GetImageFromArray(arr)
    lab2.CopyInformation(img)
    sitk.WriteImage(lab2, str(tmp_path / "lab.nii.gz"))
    (tmp_path / "m.json").write_text(json.dumps({"cases": [{"id": "v", "image": "v.nii.gz", "targets": {
        "organ": {"mask": "lab.nii.gz", "values": [2]}, "renal nodule": {"mask": "lab.nii.gz", "values": [3]}}}]}))
    assert main(["label", str(tmp_path / "m.json"), "-o", str(tmp_path / "out"), "--policy", "expert", "--tool",
                 "classical", "--label-map", "-q"]) == 0
    folder = tmp_path / "out" / "cases" / "v"
    table = json.loads((folder / "labels.json").read_text())
    labels = sitk.ReadImage(str(folder / "labels.nii.gz"))
    assert table == {"1": "organ", "2": "renal nodule"} and np.allclose(labels.GetSpacing(), img.GetSpacing())
    values = sitk.GetArrayFromImage(labels)
    for value, name in table.items():
        file = json.loads((folder / "case.json").read_text())["targets"][name]["file"]
        assert " " not in file  # renal nodule -> renal_nodule.nii.gz
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / file))).astype(bool)
        assert np.array_equal(values == int(value), mask & ~(values > int(value)))  # later targets win overlaps


def test_the_review_list_names_empty_masks_low_scores_jumps_and_gaps():
    class Traj:
        def __init__(self, mask, score):
            self.final_mask, self.steps = mask, [type("S", (), {"mask": mask, "score": score})()]

    def masks(areas, score=0.9):
        out = {}
        for i, a in enumerate(areas):
            m = np.zeros((20, 20), bool)
            m[:a // 10 if a else 0, :10] = True
            out[i] = Traj(m, score)
        return out

    class Loaded:
        pass

    smooth = masks([50, 100, 100, 100, 90, 30])
    jumpy = masks([50, 100, 20, 100, 0, 0, 100, 50], score=0.3)
    stats = {"smooth": target_stats(np.ones(3, bool), smooth, "axial", Loaded()),
             "jumpy": target_stats(np.ones(3, bool), jumpy, "axial", Loaded()),
             "empty": {"voxels": 0, "tool_score": None, "jumps": 0, "gaps": 0}}
    assert stats["smooth"]["jumps"] == 0 and stats["smooth"]["gaps"] == 0  # the ends taper: not jumps
    assert stats["jumpy"]["jumps"] == 2 and stats["jumpy"]["gaps"] == 2 and stats["jumpy"]["tool_score"] == 0.3
    assert review_reasons(stats) == ["empty: empty", "jumpy: low score 0.30", "jumpy: 2 jumps, 2 gaps"]
    assert key_slices(np.array([0, 0, 5, 9, 7, 0])) == [2, 3, 4] and key_slices(np.zeros(5)) == [2]


def test_a_folder_without_references_is_labelled_by_a_model_policy_and_empty_masks_head_the_review(
        tmp_path, tiny_qwen_dir, capsys):
    """A real (random-weight) tiny Qwen3-VL: its replies do not make masks, and the report says so first."""
    img, _ = volume(tmp_path / "data" / "p1.nii.gz", shape=(2, 40, 48))
    out = tmp_path / "out"
    assert main(["label", str(tmp_path / "data"), "-o", str(out), "--targets", "liver", "--policy", "expert",
                 "--tool", "classical", "-q"]) == 2  # the expert cannot work without references
    assert "reference masks" in capsys.readouterr().err
    assert main(["label", str(tmp_path / "data"), "-o", str(out), "--targets", "liver", "--policy", "qwen",
                 "--model", str(tiny_qwen_dir), "--tool", "classical", "--max-turns", "2", "--device", "cpu",
                 "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    (only,) = report["per_case"]
    mask = sitk.ReadImage(str(out / "cases" / only["folder"] / "liver.nii.gz"))
    assert mask.GetSize() == img.GetSize() and only["targets"]["liver"]["dice_vs_reference"] is None
    if only["targets"]["liver"]["voxels"] == 0:
        assert report["review"][0]["reasons"] == ["liver: empty"]
    assert only["targets"]["liver"]["turns"] >= 2  # both slices asked the policy


def test_an_output_inside_the_dataset_folder_is_refused_before_any_work(tmp_path, capsys):
    volume(tmp_path / "data" / "p1.nii.gz")
    rc = main(["label", str(tmp_path / "data"), "-o", str(tmp_path / "data" / "out"), "--targets", "liver",
               "--policy", "qwen", "--model", str(tmp_path / "no-model"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "inside the dataset folder" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "data" / "out").exists()
