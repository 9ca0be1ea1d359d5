"""The toy world's ablation path end to end, at test size: level-3 worlds with the expert's
strategies, cross-tool evaluation with the bundled LiteMedSAM, an RL run, and the report
command's tables, plots and paired comparisons."""
import json
from pathlib import Path

import numpy as np
from PIL import Image

from MedSAMAgentLib.cli import main


def test_worlds_by_strategy_rl_and_transfer_make_one_report(tmp_path, capsys, monkeypatch):
    from medsam_training.toyworld import RL_VARIANTS, run, run_rl

    small = dict(level=3, train_count=16, test_count=4, batch_size=8, learning_rate=3e-3, hidden=64, layers=2,
                 log=lambda *a: None)
    box = run(tmp_path / "box", trajectories="box", steps=20, **small)
    hybrid = run(tmp_path / "hybrid", trajectories="hybrid", steps=20, transfer_tools=("medsam-lite",), **small)
    # what the expert asks: Box-to-Point only vs half Sequential-Click, with the IoU each click adds
    assert set(box["expert"]["strategies"]) == {"box_to_point"}
    assert set(hybrid["expert"]["strategies"]) == {"box_to_point", "sequential_click"}
    assert hybrid["expert"]["mean_actions"] >= 1 and hybrid["expert"]["iou_final"] >= hybrid["expert"]["iou_first"]
    sft = hybrid["policies"]["sft"]  # (learning the format is test_sft's; here the scores' bookkeeping)
    assert len(sft["dice_per_turn"]) == 5 and abs(sum(sft["action_mix"].values()) - 1) < 1e-3
    assert np.isclose(sft["dice_per_turn"][-1], sft["dice_episode"], atol=1e-3)
    centred = hybrid["policies"]["centred_box"]  # a box, then stop: every score follows from that
    assert centred["valid_call_rate"] == 1 and centred["action_mix"]["box"] == centred["action_mix"]["stop"] == 0.5
    assert centred["dice_first"] > 0 and centred["dice_per_turn"] == [centred["dice_first"]] * 5
    assert centred["clicks_per_episode"] == 0 and 0 < centred["reward"] <= 1
    assert hybrid["policies"]["sft@medsam-lite"]["tool"] == "medsam-lite"  # the same policy, the other tool
    rewards = json.loads((tmp_path / "hybrid" / "test_rewards.json").read_text(encoding="utf-8"))
    assert len(rewards["sft"]) == 4 and np.isclose(np.mean(rewards["sft"]), sft["reward"], atol=1e-4)

    assert {"no_gain_bonus", "no_drop_penalty", "no_turn_cost"} <= set(RL_VARIANTS)
    section = run_rl(tmp_path / "hybrid", seeds=(0,), steps=2, group_size=2, images_per_step=2, train_images=4,
                     eval_images=4, ablations=False, log=lambda *a: None)
    assert section["tool"] == "classical" and list(section["runs"]) == ["rl-seed0"]
    # another process's run on the same world: only that ablation trained, the full run kept, paired with it
    section = run_rl(tmp_path / "hybrid", seeds=(0,), steps=2, group_size=2, images_per_step=2, train_images=4,
                     eval_images=4, variants=["no_turn_cost"], log=lambda *a: None)
    assert list(section["runs"]) == ["rl-seed0", "no_turn_cost-seed0"]
    assert section["runs"]["rl-seed0"]["train_seconds"] > 0 and "rl_reward_gain" in section
    versus = section["runs"]["no_turn_cost-seed0"]["reward_gain_vs_full_rl"]
    full, ablated = (json.loads((tmp_path / "hybrid" / "rl" / n / "held_out_rewards.json").read_text(encoding="utf-8"))
                     for n in ("rl-seed0", "no_turn_cost-seed0"))
    assert len(full) == 4 and np.isclose(versus["mean"], np.mean(ablated) - np.mean(full), atol=1e-4)
    assert json.loads((tmp_path / "hybrid" / "summary.json").read_text(encoding="utf-8"))["rl"]["runs"].keys() == \
        section["runs"].keys()
    # a process that stopped after its run but before the summary: its run.json still brings the run in
    summary_file = tmp_path / "hybrid" / "summary.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    del summary["rl"]["runs"]["no_turn_cost-seed0"]
    summary_file.write_text(json.dumps(summary), encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # this run given the world relative to where its command runs
    section = run_rl("hybrid", seeds=(0,), steps=2, group_size=2, images_per_step=2, train_images=4,
                     eval_images=4, variants=["no_drop_penalty"], log=lambda *a: None)
    assert list(section["runs"]) == ["rl-seed0", "no_drop_penalty-seed0", "no_turn_cost-seed0"]
    assert (tmp_path / "hybrid" / "rl" / "no_turn_cost-seed0" / "run.json").is_file()

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the report and later runs find every run from another folder
    assert main(["toyworld-report", str(tmp_path / "box"), str(tmp_path / "hybrid"), "--out",
                 str(tmp_path / "report")]) == 0
    assert "3 plots" in capsys.readouterr().out
    text = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    for heading in ("What the expert's trajectories ask", "SFT by the expert's strategy",
                    "SFT vs SFT + RL", "Cross-tool transfer", "vs full reward, same seed"):
        assert heading in text
    report = json.loads((tmp_path / "report" / "report.json").read_text(encoding="utf-8"))
    pairs = report["strategy_pairs"]  # hybrid against box on the same held-out images, episode by episode
    assert [p["trajectories"] for p in pairs] == ["hybrid"]
    gain = pairs[0]["reward_gain_vs_box"]
    assert gain["ci95"][0] <= gain["mean"] <= gain["ci95"][1]
    assert {r["policy"] for r in report["rows"]} >= {"sft", "centred_box", "sft@medsam-lite", "rl-seed0"}
    for row in (r for r in report["rows"] if r.get("run_dir")):
        assert (Path(row["run_dir"]) / "episodes.jsonl").is_file(), row["policy"]
    for name in ("dice_per_turn.png", "action_mix.png", "rl_training_reward.png"):
        with Image.open(tmp_path / "report" / name) as im:
            assert im.format == "PNG" and im.size[0] > 300


def test_report_and_toyworld_options_refuse_bad_input_in_words(tmp_path, capsys):
    assert main(["toyworld-report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) != 0
    assert "not a finished toy world" in capsys.readouterr().err
    assert main(["toyworld", "--out", str(tmp_path / "t"), "--distractor", "0.5"]) != 0
    assert "level 3 only" in capsys.readouterr().err
    assert main(["toyworld", "--out", str(tmp_path / "t"), "--level", "3", "--faint-part", "1.5"]) != 0
    assert "--faint-part 1.5 is out of range" in capsys.readouterr().err
    assert main(["toyworld", "--out", str(tmp_path / "t"), "--level", "3", "--error-size", "2"]) != 0
    assert "--error-size 2" in capsys.readouterr().err


def test_the_toyworld_command_reports_the_expert_and_each_policy(tmp_path, capsys):
    assert main(["toyworld", "--out", str(tmp_path / "w"), "--level", "3", "--trajectories", "click", "--train", "8",
                 "--test", "2", "--steps", "4", "--batch-size", "4", "--hidden", "32", "--layers", "1",
                 "--faint-part", "1", "--distractor", "0", "--error-size", "0.8"]) == 0
    out = capsys.readouterr().out
    assert "expert" in out and "actions per trajectory" in out and "centred_box" in out
    summary = json.loads((tmp_path / "w" / "summary.json").read_text(encoding="utf-8"))
    assert summary["mix"]["faint_part"] == 1 and summary["mix"]["distractor"] == 0
    assert summary["mix"]["faint_size"] == 0.8 and summary["mix"]["distractor_size"] == 0.8
    assert summary["trajectory_mix"] == "click" and set(summary["expert"]["strategies"]) == {"sequential_click"}


def test_worlds_of_different_error_mixes_are_not_compared_episode_by_episode():
    from medsam_training.toyworld import RefinementMix
    from medsam_training.toyworld_report import errors_label, strategy_table

    def world(name, trajectories, **mix):
        scores = {"reward": 0.8, "dice_first": 0.7, "dice_episode": 0.8, "mean_turns": 3.0, "valid_call_rate": 1.0}
        fields = {k: getattr(RefinementMix(**mix), k) for k in RefinementMix.__dataclass_fields__}
        return {"_folder": name, "level": 3, "seed": 0, "trajectory_mix": trajectories, "mix": fields,
                "policies": {"sft": scores}, "_rewards": {"sft": [0.7, 0.8, 0.9]}}

    box = world("box", "box")
    strong = world("click-strong", "click", distractor=0.8, faint_part=0.8, distractor_size=0.8, faint_size=0.8)
    assert errors_label(box) == "default" and "faint_size 0.8" in errors_label(strong)
    lines, pairs = strategy_table([box, strong])
    assert pairs == [] and sum("| 3 |" in line for line in lines) == 2  # two groups, each on its own row
    _, pairs = strategy_table([box, world("click", "click")])
    assert [p["trajectories"] for p in pairs] == ["click"] and pairs[0]["reward_gain_vs_box"]["mean"] == 0
