"""Trajectory synthesis on real tool outputs: invariants, replay, determinism, shards, resume, exporters."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from MedSAMAgentLib.agent import Agent, Episode
from MedSAMAgentLib.actions import action_from_dict, format_action
from MedSAMAgentLib.image_io import InputError
from MedSAMAgentLib.masks import decode_rle
from MedSAMAgentLib.observation import policy_base, policy_frame
from MedSAMAgentLib.policies.replay import ReplayPolicy
from MedSAMAgentLib.profile import Profile
from MedSAMAgentLib.tools import create_tool
from medsam_training.datasets import SourceRenderer, list_units, unit_samples
from medsam_training.export import export, iter_records
from medsam_training.synthesis import SynthesisConfig, Synthesizer
from medsam_training.synthesis_run import synthesize

from conftest import synthetic_case


def make_folder_dataset(root, n=6):
    (root / "images").mkdir(parents=True)
    for i in range(n):
        gray, ref = synthetic_case(20 + i)
        Image.fromarray(gray).save(root / "images" / f"case{i}.png")
        (root / "masks" / f"case{i}").mkdir(parents=True)
        Image.fromarray(ref.astype(np.uint8) * 255).save(root / "masks" / f"case{i}" / "blob.png")
        Image.fromarray(np.zeros_like(gray)).save(root / "masks" / f"case{i}" / "tiny_dot.png")
    (root / "targets.json").write_text(json.dumps({"blob": "bright blob"}))
    return root


def make_nnunet_dataset(root, n=2):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                   "labels": {"background": 0, "kidney_left": 1, "spleen": 2}}))
    for c in range(n):
        img, lab = [], []
        for k in range(6):
            gray, ref = synthetic_case(40 + c * 10 + k, size=(64, 56), kind="ellipse")
            on = 1 <= k <= 4
            img.append((np.where(ref & on, 50, -950) + gray.astype(np.int16) // 4).astype(np.int16))
            lab.append((ref & on).astype(np.uint8))
        im = sitk.GetImageFromArray(np.stack(img))
        sitk.WriteImage(im, str(root / "imagesTr" / f"case{c}_0000.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(np.stack(lab)), str(root / "labelsTr" / f"case{c}.nii.gz"))
    return root


def all_records(out):
    return list(iter_records(out))


def strip_time(r):
    return {k: v for k, v in r.items() if k != "seconds"}


def test_kept_steps_raise_iou_by_tau_and_replay_reproduces_the_masks(tmp_path):
    data = make_folder_dataset(tmp_path / "d")
    cfg = SynthesisConfig(tau=0.02, iou_target=0.97, seed=3)
    summary = synthesize(data, tmp_path / "out", {"name": "classical"}, cfg)
    records = all_records(tmp_path / "out")
    assert summary.report["kept"] == len(records) >= 5
    assert summary.report["skipped_small_slices"] == 6  # the empty "tiny_dot" masks
    assert {r["target"] for r in records} == {"bright blob"}
    assert {r["strategy"] for r in records} == {"box_to_point", "sequential_click"}
    renderer, tool = SourceRenderer(), create_tool("classical")
    for r in records:
        gains = np.diff([0.0] + r["ious"])
        assert (gains >= cfg.tau - 1e-9).all() and r["actions"][-1]["name"] == "stop_action"
        assert len(r["actions"]) == len(r["masks"]) + 1 <= cfg.max_turns
        # replay the record's actions as a policy through the same tool: the same masks come back
        rgb = renderer.rgb(r["source"])
        ref = np.asarray(Image.open(data / "masks" / r["case"] / "blob.png")) > 127
        traj, = Agent(ReplayPolicy([format_action(action_from_dict(a)) for a in r["actions"]]), tool).run(
            [Episode(r["id"], rgb, r["target"], ref)])
        assert len(traj.mask_steps) == len(r["masks"])
        for step, rle, score in zip(traj.mask_steps, r["masks"], r["ious"]):
            assert np.array_equal(step.mask, decode_rle(rle)) and step.iou == pytest.approx(score, abs=1e-6)


def test_sam2_random_weights_plumbing_and_replay(sam2_tool):
    gray, ref = synthetic_case(7)
    from medsam_training.datasets import SliceSample
    from MedSAMAgentLib.observation import to_rgb

    sample = SliceSample("s/blob", "s", "blob", to_rgb(gray), ref, {"image": "-", "dim": 2})
    cfg = SynthesisConfig(tau=-1.0, iou_target=1.01, max_turns=4, box_fraction=1.0)  # accept every action
    record = Synthesizer(sam2_tool, cfg, {"name": "sam2"}).run(sample).record
    assert [a["name"] for a in record["actions"]] == ["add_bbox", "add_point", "add_point", "stop_action"]
    traj, = Agent(ReplayPolicy([format_action(action_from_dict(a)) for a in record["actions"]]), sam2_tool).run(
        [Episode("s", sample.rgb, "blob", ref)])
    for step, rle in zip(traj.mask_steps, record["masks"]):
        assert np.array_equal(step.mask, decode_rle(rle))


def test_same_seed_same_records_and_resume(tmp_path):
    data = make_folder_dataset(tmp_path / "d", n=4)
    a = synthesize(data, tmp_path / "a", {"name": "classical"}, SynthesisConfig(seed=5))
    synthesize(data, tmp_path / "b", {"name": "classical"}, SynthesisConfig(seed=5))
    synthesize(data, tmp_path / "c", {"name": "classical"}, SynthesisConfig(seed=6))
    ra, rb, rc = (list(map(strip_time, all_records(p))) for p in (tmp_path / "a", tmp_path / "b", tmp_path / "c"))
    assert ra == rb and ra != rc
    # an interrupted run: one unit's file is missing; resume redoes only that unit
    victim = sorted((tmp_path / "a" / "parts" / "000-of-001").glob("case2_blob*.jsonl"))[0]
    victim.unlink()
    with pytest.raises(InputError, match="--resume"):
        synthesize(data, tmp_path / "a", {"name": "classical"}, SynthesisConfig(seed=5))
    again = synthesize(data, tmp_path / "a", {"name": "classical"}, SynthesisConfig(seed=5), resume=True)
    assert again.units_run == 1 and list(map(strip_time, all_records(tmp_path / "a"))) == ra
    assert a.units == 8 and a.units_run == 8
    # a resume with other settings would mix two runs' records: refused, naming what differs
    with pytest.raises(InputError, match="config"):
        synthesize(data, tmp_path / "a", {"name": "classical"}, SynthesisConfig(seed=7, tau=0.05), resume=True)
    # and so is another split of the same folder (the export would read every record twice)
    with pytest.raises(InputError, match="another number of parts"):
        synthesize(data, tmp_path / "a", {"name": "classical"}, SynthesisConfig(seed=5), shard=(0, 2))


def test_a_failed_target_is_retried_records_are_usable_from_anywhere_and_names_never_collide(tmp_path, monkeypatch):
    make_folder_dataset(tmp_path / "d", n=2)
    mask = tmp_path / "d" / "masks" / "case1" / "blob.png"
    good = mask.read_bytes()
    mask.write_bytes(good[:40])  # the target's mask is broken for a while ...
    monkeypatch.chdir(tmp_path)
    first = synthesize("d", "o", {"name": "classical"}, SynthesisConfig(seed=1))
    assert list(first.report["failed_units"]) == ["case1/blob"]
    mask.write_bytes(good)  # ... and mended: a resume tries that target again
    again = synthesize("d", "o", {"name": "classical"}, SynthesisConfig(seed=1), resume=True)
    assert again.units_run == 1 and again.report["failed_units"] == {}
    records = all_records(tmp_path / "o")
    assert records and all(Path(r["source"]["image"]).is_absolute() for r in records)
    # export works from another folder, and ids that differ only in punctuation get their own images
    twin = dict(records[0], id=records[0]["id"].replace("/", "_"))
    monkeypatch.chdir(tmp_path / "d")
    result = export([records[0], twin], tmp_path / "e", "trl", Profile.load())
    rows = [json.loads(line) for line in (tmp_path / "e" / "medsam_agent_trl.jsonl").read_text(encoding="utf-8").splitlines()]
    assert result["examples"] == 2 and not set(rows[0]["images"]) & set(rows[1]["images"])
    # one image name with two files: refused (which one would the records mean?)
    Image.open(tmp_path / "d" / "images" / "case0.png").save(tmp_path / "d" / "images" / "case0.jpg")
    with pytest.raises(InputError, match="same name"):
        synthesize(tmp_path / "d", tmp_path / "p", {"name": "classical"}, SynthesisConfig())


def test_shards_split_the_dataset_disjointly(tmp_path):
    data = make_folder_dataset(tmp_path / "d", n=6)
    keys = []
    for i in range(3):
        synthesize(data, tmp_path / "o", {"name": "classical"}, SynthesisConfig(), shard=(i, 3))
        keys.append({r["id"] for r in iter_records(tmp_path / "o" / f"trajectories-{i:03d}-of-003.jsonl")})
    single = synthesize(data, tmp_path / "one", {"name": "classical"}, SynthesisConfig())
    assert sum(len(k) for k in keys) == len(set().union(*keys)) == single.report["kept"]


def test_two_workers_give_the_same_records(tmp_path):
    data = make_folder_dataset(tmp_path / "d", n=4)
    synthesize(data, tmp_path / "w1", {"name": "classical"}, SynthesisConfig(seed=2), workers=1)
    synthesize(data, tmp_path / "w2", {"name": "classical"}, SynthesisConfig(seed=2), workers=2)
    assert list(map(strip_time, all_records(tmp_path / "w1"))) == list(map(strip_time, all_records(tmp_path / "w2")))


def test_nnunet_folders_synonyms_sampling_and_negatives(tmp_path):
    data = make_nnunet_dataset(tmp_path / "nn")
    units = list_units(data, synonyms={"kidney_left": "left kidney"})
    assert [u.target_text for u in units] == ["left kidney", "spleen", "left kidney", "spleen"]
    assert units[0].values == [1] and units[0].modality == "CT"
    got = unit_samples(units[0], sampling="all")
    assert [s.source["slice"] for s in got.samples] == [1, 2, 3, 4]
    assert [s.source["slice"] for s in unit_samples(units[0], sampling="every:2").samples] == [1, 3]
    assert len(unit_samples(units[0], sampling="count:3").samples) == 3
    with_negative = unit_samples(units[0], sampling="count:1", negatives=True).samples
    assert len(with_negative) == 2 and not with_negative[-1].reference.any()
    summary = synthesize(data, tmp_path / "o", {"name": "classical"},
                         SynthesisConfig(sampling="count:2", negatives=True), synonyms={"kidney_left": "left kidney"})
    records = all_records(tmp_path / "o")
    negatives = [r for r in records if r["strategy"] == "negative"]
    assert negatives and all([a["name"] for a in r["actions"]] == ["stop_action"] for r in negatives)
    assert summary.report["failed_units"] == {}
    assert {r["target"] for r in records} == {"left kidney"}  # label 2 (spleen) is absent from these volumes
    assert all(r["source"]["dim"] == 3 and r["source"]["window"] == [-160.0, 240.0] for r in records)


def test_exported_conversations_put_images_and_tool_calls_in_place(tmp_path):
    data = make_folder_dataset(tmp_path / "d", n=3)
    synthesize(data, tmp_path / "o", {"name": "classical"}, SynthesisConfig(seed=1))
    records = all_records(tmp_path / "o")
    profile = Profile.load()
    trl = export(records, tmp_path / "trl", "trl", profile)
    rows = [json.loads(l) for l in Path(trl["file"]).read_text(encoding="utf-8").splitlines()]
    assert trl["examples"] == len(records) == len(rows)
    renderer = SourceRenderer()
    for row, record in zip(rows, records):
        msgs = row["messages"]
        assert msgs[0]["role"] == "system" and msgs[0]["content"][0]["text"] == profile.system_prompt
        users = [m for m in msgs if m["role"] == "user"]
        assistants = [m for m in msgs if m["role"] == "assistant"]
        placeholders = sum(p["type"] == "image" for m in msgs for p in m["content"])
        assert placeholders == len(row["images"]) == len(users) == len(assistants) == len(record["actions"])
        assert all(m["content"][0] == {"type": "image"} and m["content"][1]["type"] == "text" for m in users)
        assert [m["content"][0]["text"] for m in assistants] == [format_action(action_from_dict(a))
                                                                 for a in record["actions"]]
        base = policy_base(renderer.rgb(record["source"]), profile)
        assert np.array_equal(np.asarray(Image.open(tmp_path / "trl" / row["images"][0])), base)
        if record["masks"]:
            frame = policy_frame(base, decode_rle(record["masks"][0]), profile)
            assert np.array_equal(np.asarray(Image.open(tmp_path / "trl" / row["images"][1])), frame)
    share = export(records, tmp_path / "sg", "sharegpt", profile)
    rows = [json.loads(l) for l in Path(share["file"]).read_text(encoding="utf-8").splitlines()]
    info = json.loads((tmp_path / "sg" / "dataset_info.json").read_text(encoding="utf-8"))
    assert info["medsam_agent"]["formatting"] == "sharegpt" and info["medsam_agent"]["file_name"].endswith(".jsonl")
    for row in rows:
        tags = sum(t["value"].count("<image>") for t in row["conversations"])
        assert tags == len(row["images"]) and row["system"] == profile.system_prompt
        assert [t["from"] for t in row["conversations"]][:2] == ["human", "gpt"]
        assert all(t["value"].startswith("<image>") for t in row["conversations"] if t["from"] == "human")


def test_a_malformed_nnunet_or_folder_dataset_is_one_sentence(tmp_path):
    data = make_nnunet_dataset(tmp_path / "nn", n=1)
    for text, message in (("{bad", "is not valid JSON"), ("[]", "holds a JSON list"),
                          (json.dumps({"labels": ["spleen"]}), "'labels' maps each name"),
                          (json.dumps({"labels": {"spleen": "one"}}), "'labels' maps each name")):
        (data / "dataset.json").write_text(text)
        with pytest.raises(InputError, match=message):
            list_units(data)
    folder = tmp_path / "f"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    (folder / "targets.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="targets.json .* it should be targets.json"):
        list_units(folder)


def test_the_multi_gpu_entry_point_says_a_config_mistake_in_one_line(tmp_path, capsys):
    from medsam_training import sft

    (tmp_path / "c.yaml").write_text("model: nowhere\nbanana: 3\n")
    assert sft.main([str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medsam_training.sft: error:") and "banana" in err[0]


def test_synthesis_with_the_bundled_tool_compared_side_by_side_with_the_classical_one(tmp_path, capsys):
    """The same data synthesized with LiteMedSAM (its real weights) and with the classical tool; the
    records replay through LiteMedSAM; ``synthesis-compare`` puts the two runs in one table and plot."""
    from MedSAMAgentLib.cli import main

    data = make_folder_dataset(tmp_path / "d", n=2)
    cfg = SynthesisConfig(tau=0.01, seed=1)
    lite = synthesize(data, tmp_path / "lite", {"name": "medsam-lite", "device": "cpu"}, cfg)
    classical = synthesize(data, tmp_path / "classical", {"name": "classical"}, cfg)
    assert lite.report["tool"]["name"] == "medsam-lite" and lite.report["kept"] >= 2
    tool, renderer = create_tool("medsam-lite", device="cpu"), SourceRenderer()
    for r in all_records(tmp_path / "lite"):
        assert r["tool"]["name"] == "medsam-lite" and (np.diff([0.0] + r["ious"]) >= cfg.tau - 1e-9).all()
        ref = np.asarray(Image.open(data / "masks" / r["case"] / "blob.png")) > 127
        traj, = Agent(ReplayPolicy([format_action(action_from_dict(a)) for a in r["actions"]]), tool).run(
            [Episode(r["id"], renderer.rgb(r["source"]), r["target"], ref)])
        assert [round(s.iou, 5) for s in traj.mask_steps] == [round(v, 5) for v in r["ious"]]
    rc = main(["synthesis-compare", str(tmp_path / "lite"), str(tmp_path / "classical"), "--out", str(tmp_path / "c")])
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and set(summary) == {"medsam-lite", "classical"}
    assert summary["classical"]["mean_final_iou"] == classical.report["mean_final_iou"]
    table = (tmp_path / "c" / "compare.md").read_text()
    assert "| | medsam-lite | classical |" in table and "strategy mix" in table and (tmp_path / "c" / "compare.png").is_file()
    rc = main(["synthesis-compare", str(tmp_path / "d"), "--out", str(tmp_path / "c2")])
    assert rc == 2 and "is not a finished synthesis" in capsys.readouterr().err
