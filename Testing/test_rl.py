"""Stage 2 (RL): the reward on hand-computed episodes, the multi-turn environment with a real tiny
Qwen3-VL and the classical tool, token parity with inference, and GRPO steps through TRL."""
import json
import subprocess
import sys

import numpy as np
import pytest

from MedSAMAgentLib.agent import Episode
from MedSAMAgentLib.policies.base import Observation
from MedSAMAgentLib.policies.qwen import QwenPolicy
from MedSAMAgentLib.profile import Profile
from MedSAMAgentLib.tools import create_tool
from medsam_training.reward import RewardSettings, episode_reward, format_score, trajectory_reward

from conftest import synthetic_case

BOX, POINT, STOP = "add_bbox", "add_point", "stop_action"


# ----------------------------------------------------------------------------- reward

def test_reward_defaults_are_the_contracts():
    from pathlib import Path

    rl = Profile.load().extra["reward_rl"]
    contract = Path(__file__).resolve().parents[2] / "shared" / "contract" / "medsam-agent-v1.json"
    if contract.is_file():
        assert rl == json.loads(contract.read_text(encoding="utf-8"))["reward_rl"]
    s = RewardSettings()
    assert f"{s.format_weight}*format + {s.quality_weight}*quality" in rl["score"]
    assert f"{s.drop_penalty}*(max_IoU - IoU_final)" in rl["quality"]
    assert f"{s.mask_cost}*num_masks" in rl["quality"] and f"{s.gain_bonus}*sum_t" in rl["quality"]


@pytest.mark.parametrize("calls,expected", [
    ([BOX, STOP], 1.0), ([BOX, POINT, STOP], 1.0), ([BOX, BOX, BOX, BOX, BOX], 0.5), ([STOP], 0.5),
    ([None], 0.0), ([BOX, None], 0.5), ([], 0.0), ([STOP, BOX], 0.5)])
def test_format_term(calls, expected):
    assert format_score(calls) == expected


def test_one_box_then_stop_by_hand():
    r = episode_reward([BOX, STOP], [0.6], [0.75])
    # base = 0.5*0.6 + 0.5*0.75 = 0.675; one mask: no drop, no cost, no gain
    assert r.quality == pytest.approx(0.675) and r.drop == 0 and r.cost == 0 and r.bonus == 0
    assert r.score == pytest.approx(0.2 * 1.0 + 0.8 * 0.675)


def test_refinement_with_a_drop_by_hand():
    ious, dices = [0.5, 0.7, 0.6], [0.667, 0.8235, 0.75]
    r = episode_reward([BOX, POINT, POINT, STOP], ious, dices)
    base = 0.5 * 0.6 + 0.5 * 0.75
    drop = 1.0 * (0.7 - 0.6)
    cost = 0.01 * 3
    bonus = 0.1 * (0.7 - 0.5)  # only the gain counts, not the fall
    assert (r.base, r.drop, r.cost, r.bonus) == pytest.approx((base, drop, cost, bonus))
    assert r.quality == pytest.approx(base - drop - cost + bonus)
    assert r.score == pytest.approx(0.2 + 0.8 * (base - drop - cost + bonus))
    assert r.ious == ious and r.num_masks == 3


def test_ablations_switch_single_terms():
    ious, dices = [0.5, 0.7, 0.6], [0.667, 0.8235, 0.75]
    full = episode_reward([BOX, POINT, POINT, STOP], ious, dices)
    no_bonus = episode_reward([BOX, POINT, POINT, STOP], ious, dices, RewardSettings(use_gain_bonus=False))
    no_cost = episode_reward([BOX, POINT, POINT, STOP], ious, dices, RewardSettings(use_mask_cost=False))
    no_format = episode_reward([BOX, POINT, POINT, STOP], ious, dices, RewardSettings(use_format=False))
    assert full.quality - no_bonus.quality == pytest.approx(0.02)
    assert no_cost.quality - full.quality == pytest.approx(0.03)
    assert full.score - no_format.score == pytest.approx(0.2)


def test_quality_clamps_and_edge_cases():
    assert episode_reward([BOX, STOP], [0.0], [0.0]).quality == 0.0  # Dice 0: IoU alone, 0
    assert episode_reward([STOP], [], []).score == pytest.approx(0.2 * 0.5)  # a lone stop
    assert episode_reward([None], [], []).score == 0.0  # nothing parsed
    # no target on the slice: drawing nothing is right (the empty mask scores IoU = Dice = 1), as released
    assert episode_reward([STOP], [], [], reference_empty=True).score == pytest.approx(0.2 * 0.5 + 0.8)
    assert episode_reward([None], [], [], reference_empty=True).score == pytest.approx(0.8)
    assert episode_reward([BOX, STOP], [0.0], [0.0], reference_empty=True).quality == 0.0  # a mask there is wrong
    # a big drop cannot make the quality negative
    assert episode_reward([BOX, POINT, STOP], [0.9, 0.05], [0.95, 0.1]).quality == 0.0
    # gains cannot push it above 1
    big = RewardSettings(gain_bonus=10.0)
    assert episode_reward([BOX, POINT, STOP], [0.5, 1.0], [0.667, 1.0], big).quality == 1.0
    with pytest.raises(ValueError):
        RewardSettings.from_dict({"gain_bonsu": 0.1})


# ----------------------------------------------------------------------------- environment

def _episodes(n=3):
    out = []
    for i in range(n):
        image, ref = synthetic_case(40 + i)[:2]
        out.append(Episode(f"e{i}", image, ["liver", "spleen", "tumour"][i % 3], ref))
    return out


@pytest.fixture(scope="module")
def taught(taught_qwen_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(taught_qwen_dir).eval(), AutoProcessor.from_pretrained(
        taught_qwen_dir)


def test_environment_plays_whole_episodes_with_the_tiny_policy(taught):
    from medsam_training.rl_env import ModelGenerator, SegmentationEnvironment

    model, processor = taught
    env = SegmentationEnvironment(create_tool("classical"), processor, Profile.load())
    results = env.run(_episodes(), ModelGenerator(model, processor, greedy=True))
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for r in results:
        t, roll = r.trajectory, r.rollout
        assert [s.action["name"] for s in t.steps] == [BOX, POINT, STOP] and t.stop_reason == "stop"
        assert r.reward.ious == pytest.approx([s.iou for s in t.mask_steps]) and r.reward.num_masks == 2
        assert r.reward.score == pytest.approx(trajectory_reward(t).score)
        assert len(roll.env_mask) == len(roll.completion_ids) == len(roll.logprobs)
        # the sampled tokens are the three replies, each closed by <|im_end|>; all else is environment
        sampled = [tok for tok, m in zip(roll.completion_ids, roll.env_mask) if m]
        assert processor.tokenizer.decode(sampled, skip_special_tokens=True) == "".join(roll.replies)
        assert [s.text for s in t.steps] == roll.replies
        # one image per user turn: the plain one, then the overlay after the box and after the click
        assert len(roll.images) == 3
        assert sum(tok == image_pad for tok in roll.ids) == 3 * 16 * 16
        assert all(m == 0 for tok, m in zip(roll.completion_ids, roll.env_mask) if tok == image_pad)
        assert not roll.truncated and roll.noncanonical == 0


def test_rollout_tokens_are_the_inference_prompts_token_for_token(taught, taught_qwen_dir):
    """Every prefix the RL policy generated from equals what the engine's qwen policy feeds the model."""
    from medsam_training.rl_env import ModelGenerator, SegmentationEnvironment

    model, processor = taught
    env = SegmentationEnvironment(create_tool("classical"), processor, Profile.load())
    results = env.run(_episodes(2), ModelGenerator(model, processor, greedy=True))
    inference = QwenPolicy(taught_qwen_dir, device="cpu")
    for r in results:
        roll, t = r.rollout, r.trajectory
        frames = [np.asarray(im) for im in roll.images]
        assert len(roll.turn_starts) == len(t.steps)
        for turn, start in enumerate(roll.turn_starts):
            obs = Observation(t.episode_id, t.target, turn, frames[:turn + 1], roll.replies[:turn])
            enc = inference.processor.apply_chat_template(
                [inference.messages(obs)], tokenize=True, add_generation_prompt=True, return_dict=True,
                return_tensors="pt", processor_kwargs={"padding": True})
            assert roll.ids[:start] == enc["input_ids"][0].tolist()
        # and the whole sequence is the finished conversation as training renders it
        full = processor.apply_chat_template(Profile.load().build_messages(t.target, roll.images, roll.replies),
                                             tokenize=True, return_dict=True)["input_ids"]
        full = full[0] if isinstance(full[0], list) else full
        end = len(full) - 1 if full[-1] != processor.tokenizer.convert_tokens_to_ids("<|im_end|>") else len(full)
        assert roll.ids == full[:end]


def test_unparseable_and_cut_off_replies_end_the_episode(tiny_qwen_dir):
    from transformers import AutoProcessor

    from medsam_training.rl_env import SegmentationEnvironment

    processor = AutoProcessor.from_pretrained(tiny_qwen_dir)
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    replies = {"e0": tok.encode("hello", add_special_tokens=False) + [end],  # no tool call
               "e1": tok.encode('<tool_call>\n{"name": "add_bbox"', add_special_tokens=False)}  # hit the limit

    def generator(sequences, images):
        # one episode each: tell them apart by the target text in the prompt
        return [replies["e0"] if tok.decode(s).count("liver") else replies["e1"] for s in sequences], None

    env = SegmentationEnvironment(create_tool("classical"), processor, Profile.load())
    results = env.run(_episodes(2), generator)
    assert [r.trajectory.stop_reason for r in results] == ["parse_failure", "parse_failure"]
    assert results[1].rollout.truncated and not results[0].rollout.truncated
    assert [r.reward.score for r in results] == [0.0, 0.0]


# ----------------------------------------------------------------------------- GRPO through TRL

@pytest.fixture(scope="module")
def toy_dataset(tmp_path_factory):
    from medsam_training.toyworld import generate

    return generate(tmp_path_factory.mktemp("rl_data"), level=1, count=6, first_seed=123, size=64)


def _settings(model, data, out, **kw):
    from medsam_training.rl import RLSettings

    base = dict(model=str(model), dataset=str(data), output_dir=str(out), min_area=10, group_size=2,
                images_per_step=2, learning_rate=1e-3, max_steps=2, lora=False, freeze_vision=False,
                gradient_checkpointing=False, device="cpu", save_steps=1, temperature=1.0, max_turn_tokens=48)
    base.update(kw)
    return RLSettings(**base)


def test_the_loss_sees_every_turn_in_the_context_it_was_sampled_in(taught_qwen_dir, toy_dataset, tmp_path):
    """The training forward pass rebuilds each whole episode (every turn's tokens at their positions,
    the loss mask on the sampled replies only) as the rollout saw it: near-greedy replies (T = 0.01)
    are, token for token, what the trained-on logits pick.  Were a turn's tokens misplaced or the mask
    shifted, the masked tokens would be far from the argmax and the advantages would train noise.
    (Swapping the overlays among turns is not caught with this tiny model: it hardly looks at them.)"""
    import torch

    from medsam_training.rl import build_trainer

    trainer, _, _, _ = build_trainer(_settings(taught_qwen_dir, toy_dataset, tmp_path / "rl", temperature=0.01,
                                               group_size=2, images_per_step=2))
    trainer.model.eval()
    out = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in (0, 0, 1, 1)])
    assert max(out["num_images"]) >= 2  # episodes of several turns: later overlays inside the completion
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([out["prompt_ids"], out["completion_ids"]], 1),
            torch.cat([out["prompt_mask"], out["completion_mask"]], 1), out["completion_ids"].size(1),
            pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"], num_images=out["num_images"],
            mm_token_type_ids=out.get("mm_token_type_ids"))
    sampled = logps[(out["completion_mask"] * out["tool_mask"]).bool()]
    assert sampled.numel() > 20
    # at T = 0.01 a token other than the argmax has log-probability around -100 * (logit gap)
    assert (sampled < -1.0).float().mean().item() < 0.02, sampled.min()
    assert sampled.mean().item() > -0.1


def test_grpo_steps_train_log_and_resume(taught_qwen_dir, toy_dataset, tmp_path):
    import torch
    from safetensors.torch import load_file

    from medsam_training.rl import train

    out = tmp_path / "rl"
    # a hot sampler, so the episodes of a group differ (equal rewards give no advantage, hence no update)
    result = train(_settings(taught_qwen_dir, toy_dataset, out, temperature=1.3, group_size=8, images_per_step=1))
    logs = [h for h in result["log_history"] if "reward" in h]
    assert logs, result["log_history"]
    for key in ("rewards/format_reward/mean", "rewards/quality_reward/mean", "episode/dice", "episode/turns",
                "actions/add_bbox", "reward_terms/bonus", "reward_terms/cost", "iou/mask_1"):
        assert key in logs[0], key
    # the groups' episodes differed (else GRPO has no advantage to learn from) and the policy changed;
    # the result loads as the engine's qwen policy
    assert min(h["frac_reward_zero_std"] for h in logs) < 1.0
    before = load_file(str(taught_qwen_dir / "model.safetensors"))
    after = load_file(str(out / "final" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    QwenPolicy(out / "final", device="cpu")
    lines = (out / "episodes.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 * 1 * 8  # steps x images x group
    rec = json.loads(lines[0])
    assert {"calls", "ious", "format", "quality", "score", "stop_reason"} <= set(rec)
    # resume: a longer run picks up from the last checkpoint; the episodes an interrupted step had
    # logged before the interruption are dropped, as that step is trained (and logged) again
    with open(out / "episodes.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"step": 2, "id": "interrupted"}) + "\n" + '{"step": 2, "id": "cut')
    again = train(_settings(taught_qwen_dir, toy_dataset, out, temperature=1.3, group_size=8, images_per_step=1,
                            max_steps=3))
    assert again["resumed_from"] and again["resumed_from"].endswith("checkpoint-2")
    logged = [json.loads(line) for line in (out / "episodes.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in logged] == [0] * 8 + [1] * 8 + [2] * 8
    assert len({r["id"] for r in logged}) == len(logged) and lines == [json.dumps(r) for r in logged[:16]]
    # a finished run run again keeps its result (no extra step)
    done = load_file(str(out / "final" / "model.safetensors"))
    third = train(_settings(taught_qwen_dir, toy_dataset, out, temperature=1.3, group_size=8, images_per_step=1,
                            max_steps=3))
    assert third["resumed_from"].endswith("checkpoint-3") and third["already_finished"]
    assert all(torch.equal(v, load_file(str(out / "final" / "model.safetensors"))[k]) for k, v in done.items())
    # ... but never a run with other settings: that is refused, naming what differs
    from MedSAMAgentLib.image_io import InputError

    with pytest.raises(InputError, match="learning_rate"):
        train(_settings(taught_qwen_dir, toy_dataset, out, temperature=1.3, group_size=8, images_per_step=1,
                        max_steps=4, learning_rate=1e-2))


def test_lora_rl_merges_into_a_loadable_policy(taught_qwen_dir, toy_dataset, tmp_path):
    from medsam_training.rl import train

    result = train(_settings(taught_qwen_dir, toy_dataset, tmp_path / "lora", lora=True, max_steps=1,
                             lora_target_modules=["q_proj", "v_proj"], freeze_vision=True,
                             agent_eval_every=1, agent_eval_dataset=str(toy_dataset), agent_eval_items=2))
    policy = QwenPolicy(result["final"], device="cpu")
    assert not any("lora" in name for name, _ in policy.model.named_parameters())
    # the agent loop was played with the model being trained (LoRA-wrapped) after the step, and logged
    evaluated = [json.loads(x) for x in (tmp_path / "lora" / "agent_eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evaluated] == [1] and evaluated[0]["agent_eval/turns"] >= 1
    assert any("agent_eval/dice_turn_1" in h for h in result["log_history"])


def test_rl_config_errors_are_one_line(tmp_path, taught_qwen_dir, toy_dataset):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {taught_qwen_dir}\ndataset: {toy_dataset}\noutput_dir: {tmp_path}/o\nlearning_rte: 1\n",
                   encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "MedSAMAgentLib.cli", "rl", str(bad)], capture_output=True,
                          text=True)
    assert proc.returncode == 2, proc.stderr
    assert "learning_rte" in proc.stderr and "Traceback" not in proc.stderr
    bad.write_text(f"model: {taught_qwen_dir}\ndataset: {toy_dataset}\noutput_dir: {tmp_path}/o\ngroup_size: 1\n",
                   encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "MedSAMAgentLib.cli", "rl", str(bad)], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "group_size" in proc.stderr and "Traceback" not in proc.stderr
    bad.write_text(f"model: {taught_qwen_dir}\ndataset: {toy_dataset}\noutput_dir: {tmp_path}/o\n"
                   "tool: {name: sam2, checkpoint: medsam2, prompt_mod: released}\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "MedSAMAgentLib.cli", "rl", str(bad)], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "prompt_mod" in proc.stderr and "Traceback" not in proc.stderr


def test_rl_finds_a_catalogue_tool_where_the_models_command_puts_it(tmp_path, taught_qwen_dir, toy_dataset):
    """The shipped configs name the tool's checkpoint by catalogue name: RL resolves it as synthesis
    and segment do (here: not downloaded yet, so it says how to get it, before loading the policy)."""
    import os

    config = tmp_path / "rl.yaml"
    config.write_text(f"model: {taught_qwen_dir}\ndataset: {toy_dataset}\noutput_dir: {tmp_path}/o\n"
                      "tool: {name: sam2, checkpoint: medsam2, prompt_mode: released}\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "MedSAMAgentLib.cli", "rl", str(config)], capture_output=True,
                          text=True, env={**os.environ, "MEDSAM_AGENT_HOME": str(tmp_path / "home")})
    assert proc.returncode == 2, proc.stderr
    assert "medsam-agent models download medsam2" in proc.stderr and "Traceback" not in proc.stderr


def test_shipped_rl_configs_parse():
    from pathlib import Path

    from medsam_training.reward import RewardSettings
    from medsam_training.rl import RLSettings

    configs = sorted((Path(__file__).resolve().parents[1] / "training" / "configs").glob("rl_*.yaml"))
    assert len(configs) >= 2
    for path in configs:
        s = RLSettings.from_yaml(path)
        RewardSettings.from_dict(s.reward)
        assert s.group_size == 8 and s.beta == 0.0 and s.use_vllm


def test_paired_gain_counts_and_brackets_the_mean():
    from medsam_training.toyworld import paired_gain

    base = [0.5] * 100
    new = [0.6] * 30 + [0.4] * 10 + [0.5] * 60
    g = paired_gain(base, new)
    assert g["mean"] == pytest.approx(0.02) and g["episodes_better"] == 30 and g["episodes_worse"] == 10
    assert g["ci95"][0] < 0.02 < g["ci95"][1] and g["ci95"][1] - g["ci95"][0] < 0.05
    assert paired_gain(base, base)["ci95"] == [0.0, 0.0]


def test_rl_values_out_of_range_are_refused_before_any_work(tmp_path, taught_qwen_dir, toy_dataset):
    from MedSAMAgentLib.image_io import InputError
    from medsam_training.rl import RLSettings, build_trainer

    base = {"model": str(taught_qwen_dir), "dataset": str(toy_dataset), "output_dir": str(tmp_path / "o")}
    for change, message in (({"temperature": 0}, "temperature is 0, but must be more than 0"),
                            ({"beta": -1}, "beta is -1, but must be at least 0"),
                            ({"top_p": 5}, "top_p is 5, but must be between 0 and 1"),
                            ({"max_turn_tokens": 0}, "max_turn_tokens is 0"),
                            ({"learning_rate": float("nan")}, "learning_rate is nan"),
                            ({"scale_rewards": "banana"}, "scale_rewards is 'banana'; choose one of group"),
                            ({"lr_scheduler": "foo"}, "lr_scheduler is 'foo'; choose one of"),
                            ({"max_episodes": -1}, "max_episodes is -1, but must be at least 1")):
        with pytest.raises(InputError, match=message):
            RLSettings.from_dict({**base, **change})
    import importlib.util

    if importlib.util.find_spec("vllm") is None:  # a config for a GPU server reads anywhere, and says so at start
        settings = RLSettings.from_dict({**base, "use_vllm": True})
        with pytest.raises(InputError, match="vLLM is not installed"):
            build_trainer(settings)
