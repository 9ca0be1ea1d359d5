"""The qwen policy on a tiny Qwen3-VL built offline in code (random weights, and briefly taught)."""
import numpy as np
import pytest

from MedSAMAgentLib.actions import Box, ParseFailure, Point, Stop
from MedSAMAgentLib.agent import Agent, Episode
from MedSAMAgentLib.policies import PolicyError, create_policy
from MedSAMAgentLib.policies.base import Observation
from MedSAMAgentLib.tools import create_tool

from conftest import synthetic_case


def test_random_tiny_model_runs_batched_and_never_crashes_the_batch(tiny_qwen_dir):
    policy = create_policy("qwen", model=tiny_qwen_dir, device="cpu", batch_size=2)
    img = np.zeros((512, 512, 3), np.uint8)
    obs = [Observation("a", "liver", 0, [img]), Observation("b", "spleen", 1, [img, img], ["x"]),
           Observation("c", "aorta", 0, [img])]
    decisions = policy.act(obs)
    assert len(decisions) == 3
    for d in decisions:
        assert isinstance(d.text, str) and isinstance(d.action, (Box, Point, Stop, ParseFailure))
        assert "<|image_pad|>" not in d.text
    # the generation is bounded by the profile's 128 new tokens
    assert len(policy.last_token_counts) == 1 and 1 <= policy.last_token_counts[0] <= 128  # last chunk: one reply


def test_conversation_fed_to_the_model_has_one_image_per_turn(tiny_qwen_dir):
    policy = create_policy("qwen", model=tiny_qwen_dir, device="cpu")
    img = np.zeros((512, 512, 3), np.uint8)
    msgs = policy.messages(Observation("a", "liver", 2, [img, img, img], ["r1", "r2"]))
    inputs = policy.processor.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True,
                                                  return_dict=True, return_tensors="pt")
    image_token = policy.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert inputs["image_grid_thw"].tolist() == [[1, 32, 32]] * 3  # 512 px / patch 16, not resized
    assert int((inputs["input_ids"] == image_token).sum()) == 3 * 16 * 16  # 2x2 merge


@pytest.mark.parametrize("tool_name", ["classical", "sam2"])
def test_full_episodes_with_a_taught_tiny_model(taught_qwen_dir, tool_name, sam2_tool):
    policy = create_policy("qwen", model=taught_qwen_dir, device="cpu")
    tool = sam2_tool if tool_name == "sam2" else create_tool("classical")
    episodes = [Episode(f"e{i}", *synthetic_case(i)[:1], target=t, reference=synthetic_case(i)[1])
                for i, t in enumerate(["liver", "spleen"])]
    events = []
    trajs = Agent(policy, tool, on_event=events.append).run(episodes)
    for t in trajs:
        assert [s.action and s.action["name"] for s in t.steps] == ["add_bbox", "add_point", "stop_action"], \
            [s.text for s in t.steps]
        assert t.stop_reason == "stop" and t.num_actions == 2
        assert t.steps[0].pixels["box"] == pytest.approx([0.25 * 319 * 1000 / 999, 0.25 * 255 * 1000 / 999,
                                                          0.75 * 319 * 1000 / 999, 0.75 * 255 * 1000 / 999], abs=0.5)
        assert all(s.mask.shape == (256, 320) for s in t.mask_steps)
        assert all(0 <= d <= 1 for d in t.dice_per_turn)
    assert [e.kind for e in events].count("episode_done") == 2


def test_quantization_needs_a_gpu(tiny_qwen_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this checks the CPU-only message")
    with pytest.raises(PolicyError, match="CUDA GPU"):
        create_policy("qwen", model=tiny_qwen_dir, device="cpu", quantization="4bit")
    with pytest.raises(PolicyError, match="Cannot load the policy"):
        create_policy("qwen", model=str(tiny_qwen_dir) + "-missing", device="cpu", local_files_only=True)
    with pytest.raises(PolicyError, match="Unknown policy"):
        create_policy("gpt")
