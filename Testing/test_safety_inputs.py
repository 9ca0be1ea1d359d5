"""A person's mistakes get one line and exit 2, never a traceback: deep JSON, odd files, wrong
values, options that would do nothing; and every JSON file reader, fuzzed, raises only its
documented error."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from MedSAMAgentLib.builders import ChoiceError, build_policy
from MedSAMAgentLib.cli import main
from MedSAMAgentLib.errors import InputError
from MedSAMAgentLib.manifest import load_manifest
from MedSAMAgentLib.profile import Profile, ProfileError
from MedSAMAgentLib.trajectory import load_trajectories

from conftest import synthetic_case, write_volume


def run(capsys, *argv):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own one-line usage errors
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err) -> bool:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return rc == 2 and len(lines) == 1 and "Traceback" not in err and "error" in lines[0]


@pytest.fixture()
def case(tmp_path):
    write_volume(tmp_path / "ct.nii.gz", tmp_path / "lab.nii.gz")
    return tmp_path / "ct.nii.gz", tmp_path / "lab.nii.gz"


def deep(n: int) -> str:
    return "[" * n + "]" * n


def test_each_mistake_gets_one_line(tmp_path, capsys, case):
    ct, lab = case
    engine = ["--policy", "expert", "--tool", "classical", "--reference", lab, "--label", "3"]
    seg = ["segment", ct, "--target", "blob", "-o", tmp_path / "m.nii.gz"]
    os.mkfifo(tmp_path / "pipe.nii.gz")
    (tmp_path / "deep.json").write_text(deep(100000))
    (tmp_path / "deep-ok.json").write_text('{"trajectories": ' + deep(200) + "}")
    (tmp_path / "id.json").write_text(json.dumps({"trajectories": [{"episode_id": 12, "target": "b", "steps": []}]}))
    (tmp_path / "badmask.json").write_text(json.dumps({"trajectories": [{"episode_id": "axial:2", "target": "b", "steps": [
        {"turn": 0, "text": "", "mask": {"size": [10 ** 9, 10 ** 9], "counts": [10 ** 18]}}]}]}))
    (tmp_path / "l0.json").write_text(json.dumps({"cases": [{"id": "a", "image": str(ct), "targets": {
        "blob": {"mask": str(lab), "values": [0, 3]}}}]}))
    nan = sitk.GetArrayFromImage(sitk.ReadImage(str(ct))).astype(np.float32)
    nan[4, 10, 10] = np.nan
    image = sitk.GetImageFromArray(nan)
    image.CopyInformation(sitk.ReadImage(str(ct)))
    sitk.WriteImage(image, str(tmp_path / "nan.nii.gz"))
    cases = [
        (["segment", tmp_path / "pipe.nii.gz", "--target", "b", "-o", tmp_path / "o.nii.gz", *engine], "FIFO"),
        (["segment", "/dev/null", "--target", "b", "-o", tmp_path / "o.nii.gz", *engine], "device"),
        (["segment", "~nosuchuser-xyz/ct.nii.gz", "--target", "b", "-o", tmp_path / "o.nii.gz", *engine], "no user"),
        ([*seg[:-1], "~nosuchuser-xyz/o.nii.gz", *engine], "no user"),
        ([*seg, *engine[:-2], "--reference", "~nosuchuser-xyz/l.nii.gz"], "no user"),
        (["segment", tmp_path / "nan.nii.gz", "--target", "b", "-o", tmp_path / "o.nii.gz", *engine], "NaN"),
        ([*seg, "--policy", "replay", "--replay", tmp_path / "deep.json", "--tool", "classical"], "too deeply"),
        ([*seg, "--policy", "replay", "--replay", tmp_path / "deep-ok.json", "--tool", "classical"], "levels deep"),
        ([*seg, "--policy", "replay", "--replay", tmp_path / "id.json", "--tool", "classical"], "episode_id"),
        ([*seg, "--policy", "replay", "--replay", tmp_path / "badmask.json", "--tool", "classical"], "mask is malformed"),
        ([*seg, *engine, "--profile", tmp_path / "deep.json"], "too deeply"),
        (["eval", tmp_path / "deep.json", "--out", tmp_path / "e1", "--policy", "expert", "--tool", "classical"],
         "too deeply"),
        (["eval", tmp_path / "l0.json", "--out", tmp_path / "e2", "--policy", "expert", "--tool", "classical"],
         "the background"),
        (["synthesize", tmp_path / "deep.json", "--out", tmp_path / "s", "--tool", "classical"], "too deeply"),
        # an option the chosen policy and tool do not read: one rule for all of them
        ([*seg, *engine, "--checkpoint", "medsam2"], "--checkpoint is read by --tool sam2 only"),
        ([*seg, *engine, "--multimask"], "--multimask is read by --tool sam2 only"),
        ([*seg, *engine, "--prompt-mode", "cumulative"], "--prompt-mode is read by"),
        ([*seg, *engine, "--model", "x"], "--model is read by --policy openai or --policy qwen only"),
        ([*seg, *engine, "--quantization", "4bit"], "--quantization is read by --policy qwen only"),
        ([*seg, *engine, "--device", "cuda"], "--device is read by"),
        ([*seg, *engine, "--replay", tmp_path / "id.json"], "--replay is read by --policy replay only"),
        (["serve", "--policy", "expert", "--tool", "classical", "--keep-slices", "4"], "--keep-slices is read by"),
    ]
    for argv, words in cases:
        rc, out, err = run(capsys, *argv)
        assert one_line_error(rc, err) and words in err, (argv, err)
    assert not (tmp_path / "o.nii.gz").exists() and not (tmp_path / "m.nii.gz").exists()


def test_labels_by_comma_and_an_empty_result_says_what_to_try(tmp_path, capsys, case):
    ct, lab = case
    rc, out, err = run(capsys, "segment", ct, "--target", "blob", "-o", tmp_path / "a.nii.gz", "--policy", "expert",
                       "--tool", "classical", "--reference", lab, "--label", "3,5", "-q")
    rc2, out2, _ = run(capsys, "segment", ct, "--target", "blob", "-o", tmp_path / "b.nii.gz", "--policy", "expert",
                       "--tool", "classical", "--reference", lab, "--label", "3", "--label", "5", "-q")
    assert rc == rc2 == 0 and json.loads(out.splitlines()[-1])["voxels"] == json.loads(out2.splitlines()[-1])["voxels"]
    # a run that finds nothing anywhere says so, and what to try
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"trajectories": [{"episode_id": f"axial:{i}", "target": "blob", "image_size": [48, 64], "steps": [
        {"turn": 0, "text": '<tool_call>\n{"name": "stop_action", "arguments": {}}\n</tool_call>'}]} for i in range(9)]}))
    rc, out, err = run(capsys, "segment", ct, "--target", "blob", "-o", tmp_path / "c.nii.gz", "--policy", "replay",
                       "--replay", empty, "--tool", "classical", "--slices", "auto", "-q")
    assert rc == 0 and "the mask is empty" in err and "--key-slice" in err, err


JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats() | st.text(max_size=12),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=5),
                    max_leaves=20)
KEYS = st.sampled_from(["cases", "id", "image", "targets", "mask", "values", "dim", "trajectories", "episode_id",
                        "steps", "text", "target", "size", "counts", "turn", "labels", "file_ending", "channel_names",
                        "system_prompt", "tools", "overlay", "grid_max", "max_turns", "policy_image_size"])
SHAPED = st.recursive(st.none() | st.booleans() | st.integers(-5, 10 ** 6) | st.text(max_size=8),
                      lambda kids: st.lists(kids, max_size=3) | st.dictionaries(KEYS, kids, max_size=5),
                      max_leaves=25)


def test_every_json_file_reader_fuzzed_raises_only_its_documented_error(tmp_path):
    """Thousands of generated documents (and broken text) through each reader of a person's JSON."""
    from medsam_training.datasets import list_units, load_synonyms

    (tmp_path / "nn" / "imagesTr").mkdir(parents=True)
    (tmp_path / "nn" / "labelsTr").mkdir()
    (tmp_path / "folder" / "images").mkdir(parents=True)
    gray, ref = synthetic_case(1, size=(32, 32))
    Image.fromarray(gray).save(tmp_path / "folder" / "images" / "a.png")
    (tmp_path / "folder" / "masks" / "a").mkdir(parents=True)
    Image.fromarray(ref.astype(np.uint8) * 255).save(tmp_path / "folder" / "masks" / "a" / "m.png")
    readers = {
        "manifest": (lambda p: load_manifest(p), (InputError,)),
        "profile": (lambda p: Profile.load(str(p)), (ProfileError,)),
        "replay": (lambda p: build_policy("replay", replay=str(p)), (ChoiceError,)),
        "trajectories": (lambda p: load_trajectories(p), (InputError, ValueError)),
        "synonyms": (lambda p: load_synonyms(p), (InputError,)),
        "dataset.json": (lambda p: list_units(Path(p).parent, "nnunet"), (InputError,)),
        "targets.json": (lambda p: list_units(Path(p).parent, "folder"), (InputError,)),
    }
    where = {"dataset.json": tmp_path / "nn" / "dataset.json", "targets.json": tmp_path / "folder" / "targets.json"}
    counted = {name: 0 for name in readers}

    @settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(name=st.sampled_from(sorted(readers)), doc=JSON | SHAPED, cut=st.integers(0, 3), depth=st.integers(0, 3))
    def check(name, doc, cut, depth):
        read, allowed = readers[name]
        path = where.get(name, tmp_path / f"{name}.json")
        text = json.dumps(doc, allow_nan=True)
        if depth == 3:
            text = "[" * 5000 + text + "]" * 5000
        if cut == 3:
            text = text[: len(text) // 2]
        path.write_text(text, encoding="utf-8")
        counted[name] += 1
        try:
            read(path)
        except allowed:
            pass  # the documented error, with its one sentence

    check()
    assert sum(counted.values()) >= 3000 and all(counted.values())
