"""The released checkpoint's two paths (issue: the evaluation path and the RL path): the profile
``medsam-agent-v1-eval`` reproduces the authors' evaluation scripts (infer/ in CUHK-AIM-Group/MedSAM-Agent,
bfb43be), ``medsam-agent-v1`` their RL code.  Texts, pictures (against independent implementations here),
grid, parser, retries, SAM2's settings, the eval report's two accountings, and the default per model."""
import argparse

import numpy as np
import pytest
from PIL import Image

from MedSAMAgentLib.actions import Box, ParseFailure, Point, Stop, format_action, parse_action, parse_reference
from MedSAMAgentLib.agent import Agent, Episode
from MedSAMAgentLib.observation import policy_base, policy_frame
from MedSAMAgentLib.policies.base import Decision
from MedSAMAgentLib.profile import Profile

from conftest import synthetic_case


@pytest.fixture(scope="module")
def classical_tool():
    from MedSAMAgentLib.tools import create_tool

    return create_tool("classical")

EVAL, RL = Profile.load("medsam-agent-v1-eval"), Profile.load("medsam-agent-v1")

# the reference's strings, as its evaluation scripts write them (infer/models/model_loader.py:186, :188)
REFERENCE_FIRST = ("<image>The target to be segmented is: {target_description}.\n Now, please analyze the original "
                   "image, then decide your first action.")
REFERENCE_LATER = ("<image>Here is the updated mask after your previous action. Based on this, what is your next "
                   "action? If the mask is now accurate, you can call 'stop_action' to finish.")


# ---------------------------------------------------------------------- texts
def test_each_profile_speaks_its_own_paths_texts():
    assert EVAL.user_text(0, "liver") == REFERENCE_FIRST.format(target_description="liver")
    assert EVAL.user_text(3, "liver") == REFERENCE_LATER
    assert RL.user_text(0, "liver") == ("The target to be segmented is: liver.\nNow, please analyze the original "
                                        "image, then decide your first action.")
    assert "action.\nBased on this" in RL.user_text(1, "liver")
    assert EVAL.system_prompt == RL.system_prompt and EVAL.tools == RL.tools  # the same in both paths
    messages = EVAL.build_messages("liver", ["IMG0", "IMG1"], ["<tool_call>x</tool_call>"])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"] == [{"type": "image", "image": "IMG0"},
                                      {"type": "text", "text": REFERENCE_FIRST.format(target_description="liver")}]
    for field in ("first_user_text", "policy_resize", "overlay", "grid_rule", "parser", "invalid_reply_retries"):
        assert EVAL.sources[field].startswith("infer/")  # the profile says where each field comes from


# ---------------------------------------------------------------------- pictures
def independent_letterbox(rgb, side=512):
    """Aspect kept, only shrunk (PIL's thumbnail rule: the longer side to ``side``, the other rounded), LANCZOS,
    centred on white."""
    h, w = rgb.shape[:2]
    if max(w, h) > side:
        scale = side / max(w, h)
        size = (side, max(1, round(h * scale))) if w >= h else (max(1, round(w * scale)), side)
        picture = Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)
    else:
        picture = Image.fromarray(rgb)
    out = np.full((side, side, 3), 255, np.uint8)
    x0, y0 = (side - picture.size[0]) // 2, (side - picture.size[1]) // 2
    out[y0:y0 + picture.size[1], x0:x0 + picture.size[0]] = np.asarray(picture)
    return out


def independent_nearest_overlay(base, mask):
    """The mask (image size) to the picture's size by nearest neighbour, on where > 128, blended green 50%
    and truncated (model_loader.py:57 overlay_mask)."""
    h, w = base.shape[:2]
    mh, mw = mask.shape
    rows = np.minimum(((np.arange(h) + 0.5) * mh / h).astype(int), mh - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * mw / w).astype(int), mw - 1)
    on = (mask.astype(np.uint8) * 255)[rows][:, cols] > 128
    out = base.copy()
    out[on] = (base[on] * 0.5 + np.array([0, 255, 0]) * 0.5).astype(np.uint8)
    return out


@pytest.mark.parametrize("size", [(700, 460), (300, 200), (1024, 1024)])
def test_the_eval_picture_is_the_letterbox_and_its_overlay_pixel_for_pixel(size):
    gray, mask = synthetic_case(3, size=size)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    base = policy_base(rgb, EVAL)
    assert base.shape == (512, 512, 3)
    assert np.array_equal(base, independent_letterbox(rgb))
    frame = policy_frame(base, mask.astype(bool), EVAL)
    assert np.array_equal(frame, independent_nearest_overlay(base, mask.astype(bool)))
    # the RL path stretches instead (no white bands)
    assert not np.array_equal(policy_base(rgb, RL), base) or size[0] == size[1] == 512


# ---------------------------------------------------------------------- grid
def test_each_profile_maps_the_grid_by_its_paths_rule():
    w, h = 700, 460
    box = EVAL.to_pixels(Box(100, 200, 999, 1000), w, h)
    assert (box.x1, box.y1, box.x2, box.y2) == (round(100 / 999 * w), round(200 / 999 * h), w, round(1000 / 999 * h))
    point = EVAL.to_pixels(Point(500, 250, True), w, h)
    assert (point.x, point.y) == (round(500 / 999 * w), round(250 / 999 * h))
    rl = RL.to_pixels(Point(999, 0, True), w, h)
    assert (rl.x, rl.y) == (w - 1, 0)  # the engine's centre rule


# ---------------------------------------------------------------------- parser
TWO_CALLS = ('<tool_call>\n{"name": "add_bbox", "arguments": {"bbox_2d": [10, 20, 300, 400]}}\n</tool_call>\n'
             '<tool_call>\n{"name": "stop_action", "arguments": {}}\n</tool_call>')
LEGACY = '<tool_call>{"name": "add_positive_point", "arguments": {"x": 500, "y": 300}}</tool_call>'
MISSING_QUOTE = '<tool_call>{"name": "add_point", "arguments": {"point_2d": [5, 6], point_type": "negative"}}</tool_call>'
THOUSAND = '<tool_call>{"name": "add_point", "arguments": {"point_2d": [1000, 20], "point_type": "positive"}}</tool_call>'
THREE = '<tool_call>{"name": "add_point", "arguments": {"point_2d": [7, 8, 9], "point_type": "Positive"}}</tool_call>'
FLAT = '<tool_call>{"name": "add_bbox", "arguments": {"bbox_2d": [10, 20, 10, 400]}}</tool_call>'


@pytest.mark.parametrize("text, action, note", [
    (TWO_CALLS, Box(10, 20, 300, 400), "the first one taken"),
    (LEGACY, Point(500, 300, True), "legacy add_positive_point"),
    (MISSING_QUOTE, Point(5, 6, False), "opening quote repaired"),
    (THOUSAND, Point(1000, 20, True), "outside 0..999"),
    (THREE, Point(7, 8, True), "the first two taken"),
    (FLAT, Box(10, 20, 10, 400), "no area"),
])
def test_irregular_replies_parse_under_the_eval_profile_and_are_refused_under_strict(text, action, note):
    parsed, repaired = EVAL.parse(text)
    assert parsed == action and note in repaired
    strict, nothing = RL.parse(text)
    assert isinstance(strict, ParseFailure) and nothing is None


def test_the_reference_parser_refuses_what_its_authors_code_could_not_act_on():
    for text in ('{"name": "stop_action"}', "<tool_call>not json</tool_call>",
                 '<tool_call>{"name": "add_bbox", "arguments": {"bbox_2d": [1, 2, 3]}}</tool_call>',
                 '<tool_call>{"name": "add_point", "arguments": {"point_2d": [1, 2], "point_type": "maybe"}}</tool_call>',
                 '<tool_call>{"name": "draw", "arguments": {}}</tool_call>'):
        assert isinstance(parse_reference(text)[0], ParseFailure), text
    regular = format_action(Box(1, 2, 30, 40))
    assert parse_reference(regular) == (Box(1, 2, 30, 40), None) and parse_action(regular) == Box(1, 2, 30, 40)


# ---------------------------------------------------------------------- retries
class Scripted:
    """A policy that answers the given replies in order, whatever it is shown, and keeps what it was shown."""

    name = "scripted"

    def __init__(self, replies):
        self.replies, self.seen = list(replies), []

    def act(self, observations):
        out = []
        for obs in observations:
            self.seen.append(obs)
            text = self.replies.pop(0)
            out.append(Decision(text, parse_action(text)))
        return out


def one_episode(profile, replies, tool):
    gray, mask = synthetic_case(5, size=(96, 80))
    policy = Scripted(replies)
    (traj,) = Agent(policy, tool, profile).run([Episode("e", gray, "blob", mask.astype(bool))])
    return traj, policy


BOX = format_action(Box(200, 200, 800, 800))
CLICK = format_action(Point(500, 500, True))
STOP = format_action(Stop())


def test_an_invalid_reply_on_turn_two_is_asked_again_once_under_the_eval_profile(classical_tool):
    traj, policy = one_episode(EVAL, [BOX, "I think the mask is fine", CLICK, STOP], classical_tool)
    assert [s.action["name"] for s in traj.steps] == ["add_bbox", "add_point", "stop_action"]
    assert traj.stop_reason == "stop" and traj.retries == [{"turn": 1, "text": "I think the mask is fine",
                                                             "reason": "no <tool_call>{...}</tool_call> found"}]
    retry = policy.seen[2]  # what the policy saw when asked again: its refused reply and the same picture
    assert retry.replies[-1] == "I think the mask is fine" and len(retry.images) == len(retry.replies) + 1
    assert np.array_equal(retry.images[-1], retry.images[-2])
    messages = EVAL.build_messages("blob", retry.images, retry.replies)
    assert messages[-1]["content"][1]["text"] == REFERENCE_LATER
    # a second invalid reply in the same turn ends the episode, keeping the mask it had
    traj, _ = one_episode(EVAL, [BOX, "no", "still no"], classical_tool)
    assert traj.stop_reason == "parse_failure" and len(traj.retries) == 1 and traj.final_mask.any()
    # the RL path ends at the first invalid reply
    traj, _ = one_episode(RL, [BOX, "I think the mask is fine"], classical_tool)
    assert traj.stop_reason == "parse_failure" and traj.retries == []


def test_a_first_turn_stop_is_asked_again_and_shares_the_turns_retry_under_the_eval_profile(classical_tool):
    traj, policy = one_episode(EVAL, [STOP, BOX, STOP], classical_tool)
    assert traj.retried_first_stop and [s.action["name"] for s in traj.steps] == ["add_bbox", "stop_action"]
    assert policy.seen[1].replies == [STOP]  # the refused stop stays in the context
    traj, _ = one_episode(EVAL, ["garbage", STOP], classical_tool)  # the turn's one retry is spent
    assert traj.stop_reason == "stop" and not traj.final_mask.any()
    traj, policy = one_episode(RL, [STOP, BOX, STOP], classical_tool)  # RL: asked again as before
    assert traj.retried_first_stop and policy.seen[1].replies == []


def test_repaired_replies_are_recorded_in_the_trajectory(classical_tool):
    traj, _ = one_episode(EVAL, [BOX.replace('"bbox_2d"', ' bbox_2d"'), LEGACY, STOP], classical_tool)
    assert "opening quote repaired" in traj.steps[0].repaired and "legacy" in traj.steps[1].repaired
    assert traj.to_dict()["steps"][0]["repaired"] == traj.steps[0].repaired
    assert traj.steps[2].repaired is None


# ---------------------------------------------------------------------- SAM2, report, defaults
def test_sam2_runs_multimask_in_float32_under_the_eval_profile_unless_told_otherwise():
    from MedSAMAgentLib.cli import tool_settings

    given = argparse.Namespace(multimask=None, tool_precision=None)
    assert tool_settings(given, EVAL) == {"multimask": True, "precision": "float32"}
    assert tool_settings(given, RL) == {"multimask": False, "precision": "bf16"}
    assert tool_settings(argparse.Namespace(multimask=False, tool_precision="bf16"), EVAL) == \
        {"multimask": False, "precision": "bf16"}
    from MedSAMAgentLib.tools.sam2_tool import Sam2Tool

    tool = Sam2Tool("tiny", None, device="cpu", multimask=True, precision="float32")
    assert tool.precision == "float32" and tool.multimask
    tool.device = "cuda"  # as on a GPU: float32 means no autocast
    import contextlib

    assert isinstance(tool._autocast(), contextlib.nullcontext)
    with pytest.raises(Exception, match="precision"):
        Sam2Tool("tiny", None, device="cpu", precision="fp8")


def test_the_eval_summary_gives_both_accountings_of_episodes_with_no_mask():
    from MedSAMAgentLib.evaluate import summarize

    records = [{"key": k, "method": "agent", "modality": "CT", "status": "ok", "dice": d, "iou": d, "turns": 2,
                "no_mask": d == 0.0, "retries": r, "repaired": 0, "dice_per_turn": [d]}
               for k, d, r in (("a", 0.9, 0), ("b", 0.7, 1), ("c", 0.0, 1))]
    s = summarize(records, ["agent"])["overall"]["agent"]
    assert s["dice"] == pytest.approx((0.9 + 0.7) / 3, abs=1e-4)  # ours: no mask counts 0
    assert s["dice_masked_only"] == pytest.approx(0.8, abs=1e-4) and s["no_mask"] == 1  # theirs: left out
    assert s["retries"] == 2


def test_the_released_policy_runs_under_the_eval_profile_by_default():
    from MedSAMAgentLib.cli import default_profile_for
    from MedSAMAgentLib.models import get_entry

    assert default_profile_for("qwen", None) == "medsam-agent-v1-eval"
    assert default_profile_for("qwen", "medsam-agent-8b") == "medsam-agent-v1-eval"
    assert "evaluation" in get_entry("medsam-agent-8b").profile_why
    assert default_profile_for("qwen", "/some/folder") == "medsam-agent-v1"
    assert default_profile_for("replay", None) == "medsam-agent-v1"
