"""The medsam-agent command line, run in-process on real files written by the tests."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from MedSAMAgentLib.actions import Stop, format_action
from MedSAMAgentLib.cli import main
from MedSAMAgentLib.trajectory import Step, Trajectory, load_trajectories, save_trajectories

from conftest import synthetic_case, write_volume


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_segment_a_2d_image_with_expert_and_classical(tmp_path, capsys):
    gray, ref = synthetic_case(2)
    Image.fromarray(gray).save(tmp_path / "img.png")
    Image.fromarray(ref.astype(np.uint8) * 255).save(tmp_path / "ref.png")
    rc, out, err = run(capsys, "segment", tmp_path / "img.png", "--target", "blob", "-o", tmp_path / "out.png",
                       "--policy", "expert", "--reference", tmp_path / "ref.png", "--tool", "classical",
                       "--trajectory", tmp_path / "t.json", "--overlays", tmp_path / "ov", "-q")
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["dice"] > 0.85
    mask = np.asarray(Image.open(tmp_path / "out.png"))
    assert mask.shape == gray.shape and set(np.unique(mask)) <= {0, 255}
    traj, = load_trajectories(tmp_path / "t.json")
    assert np.array_equal(traj.final_mask, mask > 127)
    pngs = sorted(p.name for p in (tmp_path / "ov").iterdir())
    assert pngs[0] == "image_turn0_input.png" and len(pngs) == len(traj.steps) + 1


@pytest.mark.parametrize("slices", ["all", "3:6", "auto"])
def test_segment_a_volume_keeps_geometry(tmp_path, capsys, slices):
    img = write_volume(tmp_path / "ct.nii.gz", tmp_path / "lab.nii.gz", direction=(0, 1, 0, -1, 0, 0, 0, 0, 1))
    rc, out, err = run(capsys, "segment", tmp_path / "ct.nii.gz", "--target", "blob", "-o", tmp_path / "m.nrrd",
                       "--policy", "expert", "--reference", tmp_path / "lab.nii.gz", "--label", "3",
                       "--tool", "classical", "--slices", slices, "--batch-size", "2",
                       "--trajectory", tmp_path / "t.json", "-q")
    assert rc == 0, err
    mask = sitk.ReadImage(str(tmp_path / "m.nrrd"))
    assert mask.GetSize() == img.GetSize() and np.allclose(mask.GetDirection(), img.GetDirection())
    assert np.allclose(mask.GetOrigin(), img.GetOrigin()) and np.allclose(mask.GetSpacing(), img.GetSpacing())
    m = sitk.GetArrayFromImage(mask).astype(bool)
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "lab.nii.gz"))) == 3
    trajs = load_trajectories(tmp_path / "t.json")
    run_slices = [t.meta["slice"] for t in trajs]
    if slices == "3:6":
        assert run_slices == [3, 4, 5] and not m[:3].any() and not m[6:].any()
    if slices == "auto":  # grows from the middle, stops after two empty slices each way
        assert 4 in run_slices and set(run_slices) <= set(range(0, 9))
        assert len(run_slices) < 9 or m.sum() > 0
    if slices != "3:6":
        assert json.loads(out.strip().splitlines()[-1])["dice"] > 0.8
    assert (m & ~ref).sum() < 0.2 * max(1, m.sum())


def test_qwen_policy_and_sam2_tool_through_the_command_line(tmp_path, capsys, taught_qwen_dir):
    gray, _ = synthetic_case(3)
    Image.fromarray(gray).save(tmp_path / "img.png")
    rc, out, err = run(capsys, "segment", tmp_path / "img.png", "--target", "liver", "-o", tmp_path / "o.png",
                       "--model", taught_qwen_dir, "--checkpoint", "none", "--device", "cpu",
                       "--trajectory", tmp_path / "t.json", "-q")
    assert rc == 0, err
    traj, = load_trajectories(tmp_path / "t.json")
    assert [s.action["name"] for s in traj.steps] == ["add_bbox", "add_point", "stop_action"]
    assert traj.policy == "qwen" and traj.tool == "sam2"


def one_line_error(rc, err):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    return rc == 2 and len(lines) == 1 and lines[0].startswith("medsam-agent: error:") and "Traceback" not in err


def test_bad_input_gives_one_clear_line_and_status_2(tmp_path, capsys):
    write_volume(tmp_path / "ct.nii.gz", tmp_path / "lab.nii.gz")
    zero = sitk.ReadImage(str(tmp_path / "lab.nii.gz")) * 0
    sitk.WriteImage(zero, str(tmp_path / "zero.nii.gz"))
    base = ["segment", tmp_path / "ct.nii.gz", "--target", "liver", "-o", tmp_path / "o.nii.gz"]
    cases = [
        (["segment", tmp_path / "nope.nii.gz", "--target", "x", "-o", tmp_path / "o.nii.gz"], "No such file"),
        (base + ["--policy", "gpt5", "--tool", "classical"], "Unknown policy"),
        (base + ["--policy", "expert", "--reference", tmp_path / "lab.nii.gz", "--tool", "grabcut"], "Unknown tool"),
        (base + ["--policy", "expert", "--tool", "classical"], "--reference"),
        (base + ["--policy", "expert", "--reference", tmp_path / "lab.nii.gz", "--tool", "classical", "--slices", "5:40"],
         "outside the volume"),
        (base + ["--policy", "expert", "--reference", tmp_path / "lab.nii.gz", "--tool", "classical", "--key-slice", "99",
                 "--slices", "auto"], "outside the volume"),
        (base + ["--policy", "expert", "--reference", tmp_path / "lab.nii.gz", "--tool", "classical", "--key-slice", "4"],
         "--key-slice is where --slices auto starts"),  # an option that would do nothing: said, not ignored
        (base + ["--policy", "expert", "--tool", "classical", "--window", "foo"], "Unknown --window 'foo'"),
        (base + ["--policy", "expert", "--tool", "classical", "--reference", tmp_path / "lab.nii.gz", "--trajectory",
                 tmp_path / "o.nii.gz"], "is the -o file"),  # two outputs in one file: one would be lost
        (base + ["--policy", "expert", "--tool", "classical", "--reference", tmp_path / "zero.nii.gz"],
         "zero.nii.gz is empty (every pixel is 0)"),  # not a Dice of 1.0 for an empty mask
        (base + ["--policy", "expert", "--tool", "classical", "--reference", tmp_path], "is a folder"),
        (base + ["--policy", "expert", "--tool", "classical", "--window", "40,-5"], "width must be positive"),
        (base + ["--policy", "expert", "--reference", tmp_path / "lab.nii.gz", "--tool", "classical", "--replay",
                 tmp_path / "lab.nii.gz"], "--replay is read by --policy replay only"),
        (base + ["--tool", "classical"], "needs a CUDA GPU"),  # the default 8B policy on a CPU-only machine
        (base + ["--model", "qwen3-vl-2b", "--tool", "classical", "--quantization", "4bit"], "CUDA GPU"),
        (base + ["--policy", "expert", "--reference", tmp_path / "lab.nii.gz", "--tool", "sam2"], "not downloaded"),
        (base[:-1] + [tmp_path / "o.png", "--policy", "expert", "--reference", tmp_path / "lab.nii.gz",
                      "--tool", "classical"], "cannot be written"),
        (["profile", "nope"], "No profile"),
        (base + ["--series", "1.2.3", "--policy", "expert", "--reference", tmp_path / "lab.nii.gz",
                 "--tool", "classical"], "is a file"),
    ]
    for argv, message in cases:
        rc, out, err = run(capsys, *argv)
        assert one_line_error(rc, err) and message in err, (argv, err)


def test_modality_names_people_use_are_understood(tmp_path, capsys):
    from MedSAMAgentLib.cli import build_parser

    parse = build_parser().parse_args
    for given, meant in [("ct", "CT"), ("MRI", "MR"), ("Ultrasound", "US"), ("xray", "X-ray"), ("X_ray", "X-ray")]:
        args = parse(["segment", "i.png", "--target", "x", "-o", "o.png", "--modality", given])
        assert args.modality == meant, given
    with pytest.raises(SystemExit) as raised:
        main(["segment", str(tmp_path / "i.png"), "--target", "x", "-o", str(tmp_path / "o.png"), "--modality", "CTT"])
    err = capsys.readouterr().err
    assert raised.value.code == 2 and one_line_error(2, err) and "unknown modality 'CTT'; use one of CT, MR" in err


def test_no_run_ends_by_destroying_a_users_file(tmp_path, capsys):
    """Outputs are checked before the run: never an input, the reference or a folder; a wrong label
    is named before anything runs; and a failure writing the extras leaves an earlier mask as it was."""
    write_volume(tmp_path / "ct.nii.gz", tmp_path / "lab.nii.gz")
    ct, lab = tmp_path / "ct.nii.gz", tmp_path / "lab.nii.gz"
    before = {p: p.read_bytes() for p in (ct, lab)}
    engine = ["--policy", "expert", "--tool", "classical", "-q"]
    cases = [
        (["-o", ct, "--reference", lab, "--label", "3"], "is the input file"),
        (["-o", lab, "--reference", lab, "--label", "3"], "is the --reference file"),
        (["-o", tmp_path, "--reference", lab, "--label", "3"], "is a folder"),
        (["-o", tmp_path / "m.nii.gz", "--reference", lab, "--label", "3", "--trajectory", lab], "is the --reference"),
        (["-o", tmp_path / "m.nii.gz", "--reference", lab, "--label", "3", "--overlays", ct], "needs a folder"),
        (["-o", tmp_path / "m.nii.gz", "--reference", lab, "--label", "7"], "No voxel of lab.nii.gz has the label 7"),
        (["-o", tmp_path / "m.nii.gz", "--reference", lab, "--label", "0"], "background"),
        (["-o", tmp_path / "m.nii.gz", "--reference", ct], "say which label is the target"),
    ]
    for extra, message in cases:
        rc, out, err = run(capsys, "segment", ct, "--target", "blob", *engine, *extra)
        assert one_line_error(rc, err) and message in err, (extra, err)
    assert all(p.read_bytes() == data for p, data in before.items())
    # a run whose trajectory cannot be written: one line, and the mask from before is untouched
    assert run(capsys, "segment", ct, "--target", "blob", "-o", tmp_path / "m.nii.gz", "--reference", lab,
               "--label", "3", *engine)[0] == 0
    mask = (tmp_path / "m.nii.gz").read_bytes()
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "t.json").mkdir()  # a folder where the trajectory's temporary file would go
    rc, out, err = run(capsys, "segment", ct, "--target", "blob", "-o", tmp_path / "m.nii.gz", "--reference", lab,
                       "--label", "3", "--slices", "2:5", "--trajectory", tmp_path / "locked" / "t.json", *engine)
    assert one_line_error(rc, err) and "is a folder" in err
    assert (tmp_path / "m.nii.gz").read_bytes() == mask
    # outputs that would write over each other: refused before any work, whatever the order of options
    for extra in (["-o", tmp_path / "same.nii.gz", "--overlays", tmp_path / "same.nii.gz"],
                  ["-o", tmp_path / "ov" / "m.nii.gz", "--overlays", tmp_path / "ov"],
                  ["-o", tmp_path / "m3.nii.gz", "--trajectory", tmp_path / "m3.partial.nii.gz"]):
        rc, out, err = run(capsys, "segment", ct, "--target", "blob", "--reference", lab, "--label", "3", *extra,
                           *engine)
        assert one_line_error(rc, err) and "would write over each other" in err, (extra, err)
    assert not (tmp_path / "same.nii.gz").exists() and not (tmp_path / "ov").exists()
    # a range of slices: Dice is also given within the slices run
    rc, out, err = run(capsys, "segment", ct, "--target", "blob", "-o", tmp_path / "r.nii.gz", "--reference", lab,
                       "--label", "3", "--slices", "2:5", *engine)
    summary = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and summary["dice_in_slices_run"] > summary["dice"] > 0
    # a replay file made for another input: said, not an empty mask with exit 0
    traj = tmp_path / "t.json"
    assert run(capsys, "segment", ct, "--target", "blob", "-o", tmp_path / "t.nii.gz", "--reference", lab, "--label",
               "3", "--slices", "2:4", "--trajectory", traj, *engine)[0] == 0
    # JPEG would blur a mask
    gray, ref = synthetic_case(2)
    Image.fromarray(gray).save(tmp_path / "img.png")
    Image.fromarray(ref.astype(np.uint8) * 255).save(tmp_path / "ref.png")
    rc, out, err = run(capsys, "segment", tmp_path / "img.png", "--target", "blob", "-o", tmp_path / "m.jpg",
                       "--reference", tmp_path / "ref.png", *engine)
    assert one_line_error(rc, err) and "JPEG" in err
    rc, out, err = run(capsys, "segment", tmp_path / "img.png", "--target", "blob", "-o", tmp_path / "m.png",
                       "--reference", tmp_path / "ref.png", "--slices", "2:5", *engine)
    assert one_line_error(rc, err) and "is a 2D image" in err
    rc, out, err = run(capsys, "segment", tmp_path / "img.png", "--target", "blob", "-o", tmp_path / "r.png",
                       "--policy", "replay", "--replay", traj, "--tool", "classical", "-q")
    assert one_line_error(rc, err) and "no action for any slice" in err and not (tmp_path / "r.png").exists()


def test_eval_refuses_to_mix_runs_or_overwrite_a_users_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDSAM_AGENT_HOME", str(tmp_path / "home"))  # no model downloaded there
    manifest = write_manifest(tmp_path)
    out = tmp_path / "out"
    args = ["eval", manifest, "--policy", "expert", "--tool", "classical", "--out", out, "-q"]
    assert run(capsys, *args, "--max-turns", "3")[0] == 0
    rc, _, err = run(capsys, *args, "--max-turns", "2", "--resume")
    assert one_line_error(rc, err) and "max_turns: 3 then, 2 now" in err
    assert run(capsys, *args, "--max-turns", "3", "--resume")[0] == 0
    # the default number of turns and the same number given are one setting, also for a folder that
    # an older version recorded with "max_turns": null
    plain = tmp_path / "plain"
    assert run(capsys, *args[:-3], "--out", plain, "-q")[0] == 0
    assert json.loads((plain / "run-settings.json").read_text())["max_turns"] == 5
    assert run(capsys, *args[:-3], "--out", plain, "-q", "--max-turns", "5", "--resume")[0] == 0
    saved = json.loads((plain / "run-settings.json").read_text())
    (plain / "run-settings.json").write_text(json.dumps({**saved, "max_turns": None}))
    assert run(capsys, *args[:-3], "--out", plain, "-q", "--max-turns", "5", "--resume")[0] == 0
    rc, _, err = run(capsys, *args[:-3], "--out", plain, "-q", "--max-turns", "4", "--resume")
    assert one_line_error(rc, err) and "max_turns: 5 then, 4 now" in err
    # a replay file whose episodes are named for another input: said, not a report of empty masks with exit 0
    save_trajectories([Trajectory("axial:3", "blob", (64, 48), [Step(0, format_action(Stop()), None)])],
                      tmp_path / "other.json")
    rc, _, err = run(capsys, *args[:-3], "--out", tmp_path / "replayed", "-q", "--policy", "replay", "--replay",
                     tmp_path / "other.json")
    assert one_line_error(rc, err) and "no action for any item of this evaluation" in err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my notes")
    for extra in ([], ["--resume"]):
        rc, _, err = run(capsys, *args[:-3], "--out", mine, "-q", *extra)
        assert one_line_error(rc, err) and "not empty" in err
    assert (mine / "report.md").read_text() == "my notes"
    (tmp_path / "afile").write_text("x")
    rc, _, err = run(capsys, *args[:-3], "--out", tmp_path / "afile", "-q")
    assert one_line_error(rc, err) and "is a file" in err
    # a run that stopped before it began (a model missing, say) leaves a folder the same command reuses
    rc, _, err = run(capsys, *args[:-3], "--out", tmp_path / "first", "--tool", "sam2", "-q")
    assert one_line_error(rc, err) and "not downloaded" in err
    assert run(capsys, *args[:-3], "--out", tmp_path / "first", "-q")[0] == 0


def test_default_8b_policy_message_names_memory_and_smaller_choices(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU-only message is checked on machines without CUDA")
    write_volume(tmp_path / "ct.nii.gz")
    rc, out, err = run(capsys, "segment", tmp_path / "ct.nii.gz", "--target", "liver", "-o", tmp_path / "o.nii.gz")
    assert one_line_error(rc, err)
    assert "GB" in err and "4bit" in err  # what the 8B policy would take on a GPU
    # the smaller choices as this machine can run them: on the CPU, without quantization (which needs a GPU)
    assert re.search(r"qwen3-vl-2b \(about \d+ GB of memory on the CPU\)", err), err


def write_manifest(tmp_path):
    gray, ref = synthetic_case(5)
    (tmp_path / "a").mkdir()
    Image.fromarray(np.dstack([gray] * 3)).save(tmp_path / "a" / "image.png")
    Image.fromarray(ref.astype(np.uint8) * 255).save(tmp_path / "a" / "blob.png")
    Image.fromarray(np.zeros_like(gray)).save(tmp_path / "a" / "empty.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "a" / "wrong_size.png")
    (tmp_path / "v").mkdir()
    write_volume(tmp_path / "v" / "ct.nii.gz", tmp_path / "v" / "lab.nii.gz")
    manifest = {"cases": [
        {"id": "img", "modality": "Ultrasound", "dim": 2, "image": "a/image.png", "targets": {"blob": {"mask": "a/blob.png"}}},
        {"id": "vol", "modality": "CT", "dim": 3, "image": "v/ct.nii.gz",
         "targets": {"blob": {"mask": "v/lab.nii.gz", "values": [3]}}},
        {"id": "bad", "modality": "X-ray", "dim": 2, "image": "a/image.png",
         "targets": {"blob": {"mask": "a/wrong_size.png"}}},
        {"id": "empty", "modality": "X-ray", "dim": 2, "image": "a/image.png",
         "targets": {"nothing": {"mask": "a/empty.png"}}},
    ]}
    (tmp_path / "cases.json").write_text(json.dumps(manifest))
    return tmp_path / "cases.json"


def test_eval_with_baselines_writes_results_report_and_plot(tmp_path, capsys):
    manifest = write_manifest(tmp_path)
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "eval", manifest, "--policy", "expert", "--tool", "classical", "--baselines",
                          "--out", out, "--max-slices-per-target", "3", "--volume", "-q")
    assert rc == 0, err
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert set(results["methods"]) == {"agent", "box", "point"}
    ok = [r for r in results["records"] if r["status"] == "ok" and r.get("mode") != "volume"]
    assert {r["key"] for r in ok} == {"img/blob", "vol/blob/axial:2", "vol/blob/axial:4", "vol/blob/axial:6"}
    assert all(len(r["dice_per_turn"]) == 1 for r in ok if r["method"] in ("box", "point"))
    failed = {r["key"]: r["reason"] for r in results["records"] if r["status"] == "failed"}
    assert "differ" in failed["bad/blob"] or "is 10x10" in failed["bad/blob"]
    assert "empty" in failed["empty/nothing"]
    summary = results["summary"]
    assert summary["overall"]["agent"]["n"] == 4 and summary["overall"]["agent"]["failed"] == 2
    assert set(summary["per_modality"]) == {"CT", "Ultrasound", "X-ray"}
    assert summary["per_modality"]["X-ray"]["agent"] == {"n": 0, "failed": 2, "dice": None, "iou": None, "turns": None,
                                                         "no_mask": 0, "dice_masked_only": None,
                                                         "iou_masked_only": None, "retries": 0, "repaired": 0}
    assert len(summary["dice_per_turn"]["agent"]) >= 1 and summary["volume"]["agent"]["n"] == 1
    assert summary["overall"]["agent"]["dice"] == pytest.approx(np.mean([r["dice"] for r in ok if r["method"] == "agent"]),
                                                                abs=1e-4)
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| single box (reference box, 1 turn) |" in report and "![Dice per turn](dice_per_turn.png)" in report
    assert (out / "dice_per_turn.png").stat().st_size > 1000
    # the same folder again without --resume: refused, nothing overwritten
    rc, _, err = run(capsys, "eval", manifest, "--policy", "expert", "--tool", "classical", "--out", out)
    assert one_line_error(rc, err) and "--resume" in err


def test_eval_resume_redoes_nothing_finished(tmp_path, capsys):
    manifest = write_manifest(tmp_path)
    out = tmp_path / "out"
    args = ["eval", manifest, "--policy", "expert", "--tool", "classical", "--baselines", "--out", out, "-q"]
    assert run(capsys, *args)[0] == 0
    full = (out / "records.jsonl").read_text(encoding="utf-8").splitlines()
    ok_lines = [l for l in full if '"status": "ok"' in l]
    # an interruption: only the first three finished records and half a line survived
    (out / "records.jsonl").write_text("\n".join(ok_lines[:3]) + "\n" + ok_lines[3][:40])
    rc, _, err = run(capsys, *args, "--resume")
    assert rc == 0, err
    again = [json.loads(l) for l in (out / "records.jsonl").read_text(encoding="utf-8").splitlines()[:4] if l.endswith("}")]
    assert [json.dumps(r) for r in again[:3]] == ok_lines[:3]  # kept as they were
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    ok = [r for r in results["records"] if r["status"] == "ok"]
    assert len(ok) == len(ok_lines) and len({(r["key"], r["method"]) for r in ok}) == len(ok)
    # files changed by hand: said in one line, and nothing of the finished records is lost
    kept = (out / "records.jsonl").read_text(encoding="utf-8")
    with open(out / "records.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"key": 5}\n')
    rc, _, err = run(capsys, *args, "--resume")
    assert one_line_error(rc, err) and "not an evaluation record" in err
    (out / "records.jsonl").write_text(kept, encoding="utf-8")
    settings = (out / "run-settings.json").read_text(encoding="utf-8")
    for broken in ("{bad", "[]"):
        (out / "run-settings.json").write_text(broken, encoding="utf-8")
        rc, _, err = run(capsys, *args, "--resume")
        assert one_line_error(rc, err) and "not the settings file" in err
    (out / "run-settings.json").write_text(settings, encoding="utf-8")
    assert run(capsys, *args, "--resume")[0] == 0
    oks = lambda text: [l for l in text.splitlines() if '"status": "ok"' in l]  # noqa: E731
    assert oks((out / "records.jsonl").read_text(encoding="utf-8")) == oks(kept)  # nothing finished is redone


def test_policy_memory_check_before_loading():
    from MedSAMAgentLib.builders import ChoiceError, check_policy_fits

    gb = 1024 ** 3
    eight_b = int(17.5 * gb)
    with pytest.raises(ChoiceError, match=r"about 20 GB of GPU memory; this GPU has 12 GB free.*qwen3-vl-2b"):
        check_policy_fits("medsam-agent-8b", eight_b, "cuda", None, gpu_free=12 * gb, ram=64 * gb, probe=False)
    check_policy_fits("medsam-agent-8b", eight_b, "cuda", "4bit", gpu_free=12 * gb, ram=64 * gb, probe=False)
    check_policy_fits("medsam-agent-8b", eight_b, "auto", None, gpu_free=40 * gb, ram=64 * gb, probe=False)
    with pytest.raises(ChoiceError, match="no CUDA GPU"):
        check_policy_fits("medsam-agent-8b", eight_b, "auto", None, gpu_free=None, ram=64 * gb, probe=False)
    check_policy_fits("tiny", 5_000_000, "cpu", None, gpu_free=None, ram=8 * gb, probe=False)  # tiny models run on CPU


def test_serve_and_training_commands_check_their_options_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDSAM_AGENT_HOME", str(tmp_path / "home"))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "fake.jsonl").write_text('{"not": "a record"}\n')
    manifest = write_manifest(tmp_path)
    cases = [
        (["serve", "--port", "70000"], "not a port number"),
        (["serve", "--policy", "banana"], "Unknown policy"),
        (["serve", "--max-upload-mb", "-1"], "--max-upload-mb must be more than 0"),
        (["serve"], "is not downloaded"),  # the default 8B policy: said now, not after "listening"
        (["serve", "--host", "127.0.0.2", "--policy", "expert", "--tool", "classical", "--port", "70000"], "port"),
        (["segment", "x.nii.gz", "--target", "t", "-o", "y.nii.gz", "--label", "5,x"], "is not a label value"),
        (["synthesize", manifest, "--out", tmp_path / "s", "--slices", "foo"], "Slice sampling 'foo'"),
        (["synthesize", manifest, "--out", tmp_path / "s", "--jitter", "-1"], "--jitter -1 is out of range"),
        (["synthesize", manifest, "--out", tmp_path / "afile"], "is a file"),
        (["export", tmp_path / "fake.jsonl", "--out", tmp_path / "e"], "does not hold synthesized records"),
        (["toyworld", "--out", tmp_path / "t", "--size", "0"], "--size 0 is out of range"),
        (["toyworld", "--out", tmp_path / "t", "--lr", "-1"], "--lr -1 is out of range"),  # before 6000 images
        (["synthesize", manifest, "--out", tmp_path / "s", "--tau", "nan"], "--tau is not a number"),
        (["synthesize", manifest, "--out", tmp_path / "s", "--seed", "-1"], "--seed -1 is out of range"),
        (["toyworld-rl", tmp_path / "nowhere", "--seeds", "0", "-1"], "--seeds -1 is out of range"),
        (["toyworld-rl", tmp_path / "nowhere"], "not a finished toy world"),
        (["toyworld-rl", tmp_path / "nowhere", "--temperature", "0"], "--temperature 0 is out of range"),
        (["serve", "--policy", "replay", "--replay", tmp_path / "fake.jsonl", "--tool", "classical", "--port", "0"],
         "not a trajectory file"),  # read before listening, not a load error in the status
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) if "--label" in argv else __import__("contextlib").nullcontext() as raised:
            rc, out, err = run(capsys, *argv)
        if raised is not None:  # argparse exits by itself, with the same one line
            rc, err = raised.value.code, capsys.readouterr().err
        assert one_line_error(rc, err) and message in err, (argv, err)
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()  # nothing started
    monkeypatch.setenv("MEDSAM_AGENT_TOKEN", "secret")
    rc, _, err = run(capsys, "serve", "--host", "0.0.0.0", "--allow-remote", "--policy", "expert", "--tool", "classical")
    assert one_line_error(rc, err) and "needs at least 16" in err


def test_eval_counts_each_target_on_its_own_and_reports_only_this_runs_items(tmp_path, capsys):
    """One unusable target fails alone (its case's other targets still count, in slices and in
    whole volumes, where an empty reference is a failure, not a perfect score); a resumed run
    after the data was fixed reports the fixed item, not the old failure."""
    manifest = write_manifest(tmp_path)
    data = json.loads(manifest.read_text())
    img, vol = data["cases"][0], data["cases"][1]
    img["targets"]["nothing"] = {"mask": "a/empty.png"}
    vol["targets"]["absent"] = {"mask": "v/lab.nii.gz", "values": [250]}
    data["cases"] = [img, vol]
    manifest.write_text(json.dumps(data))
    out = tmp_path / "out"
    args = ["eval", manifest, "--policy", "expert", "--tool", "classical", "--out", out, "--volume", "-q"]
    assert run(capsys, *args)[0] == 0
    records = json.loads((out / "results.json").read_text())["records"]
    status = {(r["key"], r["method"]): r["status"] for r in records}
    assert status[("img/blob", "agent")] == "ok" and status[("img/nothing", "agent")] == "failed"
    assert status[("vol/blob/volume", "agent")] == "ok" and status[("vol/absent/volume", "agent")] == "failed"
    assert any(k.startswith("vol/blob/axial:") and v == "ok" for (k, _), v in status.items())
    # the empty mask is fixed, the run resumed: the report counts the item, and no longer the failure
    Image.open(tmp_path / "a" / "blob.png").save(tmp_path / "a" / "empty.png")
    data["cases"][0]["targets"]["nothing"] = {"mask": "a/empty.png"}
    assert run(capsys, *args, "--resume")[0] == 0
    results = json.loads((out / "results.json").read_text())
    failed = sorted(r["key"] for r in results["records"] if r["status"] == "failed" and r["method"] == "agent")
    assert failed == ["vol/absent", "vol/absent/volume"], failed  # still absent: still failed; the fixed one is not
    reasons = {r["key"]: r["reason"] for r in results["records"] if r["status"] == "failed"}
    assert reasons["vol/absent"] == "the mask of 'absent' has no pixel with the label 250"
    assert ("img/nothing", "agent") in {(r["key"], r["method"]) for r in results["records"] if r["status"] == "ok"}
    assert results["summary"]["overall"]["agent"]["failed"] == 1  # slices: vol/absent
    assert results["summary"]["volume"]["agent"]["failed"] == 1 and results["summary"]["volume"]["agent"]["n"] == 1


def test_output_read_only_in_part_ends_quietly():
    """`medsam-agent serve --openapi | head`: the reader stops early; no error for the person."""
    proc = subprocess.Popen([sys.executable, "-m", "MedSAMAgentLib.cli", "serve", "--openapi"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first write
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and err == ""


def test_an_interrupted_segment_keeps_the_slices_it_finished(tmp_path, capsys, monkeypatch):
    """Ctrl-C (or a failure) midway through a volume: the finished slices are saved as *.partial.*."""
    from MedSAMAgentLib.agent import Agent

    write_volume(tmp_path / "ct.nii.gz", tmp_path / "lab.nii.gz", n=9)
    engine = ["--reference", tmp_path / "lab.nii.gz", "--label", "3", "--policy", "expert", "--tool", "classical",
              "--batch-size", "2", "-q"]
    assert run(capsys, "segment", tmp_path / "ct.nii.gz", "--target", "blob", "-o", tmp_path / "whole.nii.gz",
               *engine)[0] == 0
    real, batches = Agent.run, []

    def pressed_ctrl_c_at_the_third_batch(self, episodes):
        batches.append(len(episodes))
        if len(batches) == 3:
            raise KeyboardInterrupt
        return real(self, episodes)

    monkeypatch.setattr(Agent, "run", pressed_ctrl_c_at_the_third_batch)
    rc, _, err = run(capsys, "segment", tmp_path / "ct.nii.gz", "--target", "blob", "-o", tmp_path / "m.nii.gz",
                     "--trajectory", tmp_path / "t.json", *engine)
    assert rc == 130 and "interrupted after 4 finished slice(s)" in err and "m.partial.nii.gz" in err, err
    assert not (tmp_path / "m.nii.gz").exists() and not (tmp_path / "t.json").exists()  # nothing looks complete
    whole = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "whole.nii.gz")))
    partial_image = sitk.ReadImage(str(tmp_path / "m.partial.nii.gz"))
    partial = sitk.GetArrayFromImage(partial_image)
    assert partial_image.GetSpacing() == sitk.ReadImage(str(tmp_path / "ct.nii.gz")).GetSpacing()
    done = [t.meta["slice"] if "slice" in t.meta else int(t.episode_id.split(":")[1])
            for t in load_trajectories(tmp_path / "t.partial.json")]
    assert sorted(done) == [0, 1, 2, 3]
    kept = np.zeros(9, bool)
    kept[done] = True  # axial slices in patient order; the test volume's direction is the identity
    assert partial[kept].any() and np.array_equal(partial[kept], whole[kept]) and not partial[~kept].any()


def test_a_malformed_manifest_is_one_line_naming_the_case_and_field(tmp_path, capsys):
    good = {"id": "a", "modality": "CT", "image": "a.png", "targets": {"blob": {"mask": "m.png"}}}
    for case, message in (({**good, "dim": "two"}, "'dim' must be 2 or 3"),
                          ({**good, "image": 123}, "'image' must be a path"),
                          ({**good, "id": [1]}, "'id' must be a text"),
                          ({**good, "targets": {"blob": {"mask": None}}}, "needs a 'mask' path"),
                          ({**good, "targets": {"blob": {"mask": "m.png", "values": "3"}}}, "must be a list")):
        (tmp_path / "cases.json").write_text(json.dumps({"cases": [case]}))
        rc, _, err = run(capsys, "eval", tmp_path / "cases.json", "--policy", "expert", "--tool", "classical",
                         "--out", tmp_path / "out", "-q")
        assert one_line_error(rc, err) and "case #1" in err and message in err, err
    rc, _, err = run(capsys, "eval", tmp_path, "--policy", "expert", "--tool", "classical", "--out", tmp_path / "o")
    assert one_line_error(rc, err) and "is a folder; give its manifest file" in err
