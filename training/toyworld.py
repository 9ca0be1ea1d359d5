"""A toy world where the whole pipeline can be shown to learn on a CPU.

Procedural images with reference masks, split by seed into train and held-out:

* level 1: one shape (ellipse, rectangle or triangle; random size, position and
  brightness) on a noisy background; the target is named by its kind;
* level 2: two or three shapes of different kinds, each bright or dark; the
  target is named among them ("bright ellipse", "dark rectangle");
* level 3 (refinement): a bright target whose first box leaves errors a click
  fixes -- a faint part of the target, a distractor of its intensity touching it
  inside its box -- with a second shape elsewhere, shading and noise
  (:func:`make_refinement_image`).

Then: synthesize trajectories with the classical tool (Box-to-Point), train a
small Qwen3-VL from scratch (tokenizer, processor and model built in code) with
:mod:`sft`, and evaluate on the held-out images the untrained model, a fixed
centred box, and the trained policy -- Dice after the first action and after
the episode, valid tool-call rate, turns.  The toy profile is the released one
with a smaller picture (``size`` pixels, patch 8); training and inference share it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from MedSAMAgentLib.durable import write_json

KINDS = ("ellipse", "rectangle", "triangle")


def draw_shape(canvas: np.ndarray, kind: str, cx: float, cy: float, rx: float, ry: float, value) -> np.ndarray:
    """Draw a filled shape; returns its mask."""
    import cv2

    mask = np.zeros(canvas.shape[:2], np.uint8)
    if kind == "ellipse":
        cv2.ellipse(mask, (int(cx), int(cy)), (max(2, int(rx)), max(2, int(ry))), 0, 0, 360, 1, -1)
    elif kind == "rectangle":
        cv2.rectangle(mask, (int(cx - rx), int(cy - ry)), (int(cx + rx), int(cy + ry)), 1, -1)
    else:
        cv2.fillPoly(mask, [np.array([[cx, cy - ry], [cx - rx, cy + ry], [cx + rx, cy + ry]], np.int32)], 1)
    canvas[mask > 0] = value
    return mask > 0


@dataclass(frozen=True)
class RefinementMix:
    """How often a level-3 target carries each error its first box leaves (probabilities, 0-1),
    and how strong the shading is (grey levels across the image)."""

    distractor: float = 0.7  # a blob of the target's own intensity touching it inside its box: needs a negative click
    faint_part: float = 0.7  # a part of the target much fainter than the rest: needs a positive click
    distractor_size: float = 0.6  # its radius, as a share of the target's
    faint_size: float = 0.6  # the faint lobe's radius, as a share of the target's
    shading: float = 40.0  # the most a smooth ramp adds across the image
    noise: float = 10.0  # the standard deviation of the pixel noise


def _boundary_point(mask: np.ndarray, angle: float) -> tuple[float, float]:
    """The target's boundary pixel farthest from its centre in direction ``angle`` (radians)."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    d = np.array([np.cos(angle), np.sin(angle)])
    proj = (xs - cx) * d[0] + (ys - cy) * d[1]
    perp = np.abs(-(xs - cx) * d[1] + (ys - cy) * d[0])
    near = perp <= max(1.0, np.percentile(perp, 10))
    k = np.argmax(np.where(near, proj, -np.inf))
    return float(xs[k]), float(ys[k])


def make_refinement_image(seed: int, size: int = 64, mix: RefinementMix = RefinementMix()):
    """Level 3: a named target whose first box leaves errors a click fixes (see :class:`RefinementMix`).

    The target (an ellipse, rectangle or triangle, bright) may carry a *faint part* (a lobe
    attached to it, 45-70 grey levels darker: in the reference, but a box's intensity model
    leaves it out) and a *distractor* (a blob of the target's intensity touching it, inside its
    bounding box: not in the reference, but a box's model takes it in); a second shape of
    another kind stands elsewhere; a smooth ramp and noise lie over all.  Returns (grayscale
    uint8 image, target mask, target text, {"distractor": bool, "faint_part": bool})."""
    rng = np.random.default_rng(seed)
    canvas = np.zeros((size, size), np.float32)
    kinds = list(rng.permutation(KINDS))
    kind, other = kinds[0], kinds[1]
    rx, ry = rng.uniform(0.14, 0.21, 2) * size
    cx, cy = rng.uniform(0.35, 0.65, 2) * size
    value = rng.uniform(175, 215)
    target = draw_shape(canvas, kind, cx, cy, rx, ry, value)
    reference = target.copy()
    found = {"distractor": False, "faint_part": False}
    angle = rng.uniform(0, 2 * np.pi)
    if rng.random() < mix.faint_part:
        px, py = _boundary_point(target, angle)
        lobe = draw_shape(np.zeros_like(canvas), "ellipse", px, py, mix.faint_size * rx, mix.faint_size * ry, 1) & ~target
        canvas[lobe] = value - rng.uniform(45, 70)
        reference |= lobe
        found["faint_part"] = bool(lobe.any())
    if rng.random() < mix.distractor:
        px, py = _boundary_point(target, angle + np.pi + rng.uniform(-0.6, 0.6))
        blob = draw_shape(np.zeros_like(canvas), "ellipse", px, py, mix.distractor_size * rx, mix.distractor_size * ry, 1) & ~reference
        canvas[blob] = value + rng.uniform(-5, 5)
        found["distractor"] = bool(blob.any())
    taken = canvas > 0
    for _ in range(50):  # the second shape, clear of everything drawn
        orx, ory = rng.uniform(0.08, 0.13, 2) * size
        ox, oy = rng.uniform(orx + 1, size - orx - 1), rng.uniform(ory + 1, size - ory - 1)
        trial = draw_shape(np.zeros_like(canvas), other, ox, oy, orx + 2, ory + 2, 1)
        if not (trial & taken).any():
            draw_shape(canvas, other, ox, oy, orx, ory, rng.uniform(175, 215) if rng.random() < 0.5
                       else rng.uniform(95, 130))
            break
    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1)
    theta = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(theta) * xx + np.sin(theta) * yy)
    ramp = (ramp - ramp.min()) / max(1e-6, np.ptp(ramp)) * rng.uniform(0, mix.shading)
    image = canvas + np.where(canvas == 0, 45, 0) + ramp + rng.normal(0, mix.noise, canvas.shape)
    return np.clip(image, 0, 255).astype(np.uint8), reference, f"bright {kind}", found


def make_image(level: int, seed: int, size: int = 64, mix: RefinementMix = RefinementMix()
               ) -> tuple[np.ndarray, np.ndarray, str]:
    """(grayscale uint8 image, target mask, target text) for one toy case (``mix``: level 3 only)."""
    if level == 3:
        return make_refinement_image(seed, size, mix)[:3]
    rng = np.random.default_rng(seed)
    canvas = np.zeros((size, size), np.float32)
    count = 1 if level == 1 else int(rng.integers(2, 4))
    kinds = list(rng.permutation(KINDS))[:count]
    placed: list[np.ndarray] = []
    target_mask, target_text = None, ""
    for n, kind in enumerate(kinds):
        for _ in range(50):  # find a place that does not overlap the shapes already drawn
            rx, ry = rng.uniform(0.10, 0.24 if level == 1 else 0.17, 2) * size
            cx, cy = rng.uniform(rx + 1, size - rx - 1), rng.uniform(ry + 1, size - ry - 1)
            trial = draw_shape(np.zeros_like(canvas), kind, cx, cy, rx, ry, 1)
            if not any((trial & p).any() for p in placed):
                break
        bright = bool(rng.random() < 0.5) if level == 2 else True
        value = rng.uniform(175, 235) if bright else rng.uniform(95, 130)
        mask = draw_shape(canvas, kind, cx, cy, rx, ry, value)
        placed.append(mask)
        if n == 0:
            target_mask = mask
            target_text = kind if level == 1 else f"{'bright' if bright else 'dark'} {kind}"
    image = canvas + rng.normal(0, 12, canvas.shape) + np.where(canvas == 0, 45, 0)
    return np.clip(image, 0, 255).astype(np.uint8), target_mask, target_text


def generate(folder: Path, level: int, count: int, first_seed: int, size: int = 64,
             mix: RefinementMix = RefinementMix()) -> Path:
    """A 2D dataset folder (images/, masks/<case>/<target>.png) the synthesis reads."""
    from PIL import Image

    for i in range(count):
        image, mask, text = make_image(level, first_seed + i, size, mix)
        case = f"toy{first_seed + i:06d}"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "masks" / case).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / "images" / f"{case}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / case / f"{text.replace(' ', '_')}.png")
    return folder


TOY_SYSTEM = ("You segment the named target. Tools: add_bbox {\"bbox_2d\": [x1, y1, x2, y2]}, add_point "
              "{\"point_2d\": [x, y], \"point_type\": \"positive\" or \"negative\"}, stop_action {}. Coordinates "
              "0-999. Answer with one <tool_call>.")


def trajectory_stats(records) -> dict:
    """What the expert's trajectories ask of a policy: per trajectory the actions before the stop,
    clicks, IoU after the first action and at the end, and the IoU each click added (mean)."""
    records = [r for r in records if r.get("ious")]
    if not records:
        return {"trajectories": 0}
    actions = [len(r["ious"]) for r in records]
    clicks = [sum(a["name"] == "add_point" for a in r["actions"]) for r in records]
    negatives = [sum(a["name"] == "add_point" and a["arguments"].get("point_type") == "negative"
                     for a in r["actions"]) for r in records]
    steps = [b - a for r in records for a, b in zip(r["ious"][:-1], r["ious"][1:])]
    first = [r["ious"][0] for r in records]
    final = [r["ious"][-1] for r in records]
    mean = lambda xs: round(float(np.mean(xs)), 4) if len(xs) else None  # noqa: E731
    return {"trajectories": len(records), "mean_actions": mean(actions), "mean_clicks": mean(clicks),
            "negative_click_share": round(sum(negatives) / max(1, sum(clicks)), 4),
            "with_clicks": round(float(np.mean([c > 0 for c in clicks])), 4),
            "iou_first": mean(first), "iou_final": mean(final), "iou_gain_per_click": mean(steps),
            "iou_gain_per_action": mean([f / a for f, a in zip(final, actions)]),
            "strategies": {k: sum(r.get("strategy") == k for r in records)
                           for k in sorted({r.get("strategy") for r in records})}}


def toy_profile(size: int):
    """The released profile's turn structure, tools and overlay, with small pictures and short texts
    (a 550-token system prompt would make CPU training five times slower and teaches a toy nothing)."""
    from MedSAMAgentLib.profile import Profile

    data = Profile.load().to_dict()
    data.update(name=f"toy-{size}", policy_image_size=[size, size], system_prompt=TOY_SYSTEM,
                first_user_text="Target: {target}.", later_user_text="Updated mask. Next action?",
                origin=f"toy world: medsam-agent-v1's tools, turns and overlay; {size}x{size} pictures, short texts")
    return Profile.from_dict(data)


def build_model_dir(out: Path, profile, hidden: int = 128, layers: int = 4, seed: int = 0) -> Path:
    from .tiny_qwen import build_model, build_processor, build_tokenizer

    tokenizer = build_tokenizer(profile)
    processor = build_processor(tokenizer, patch_size=8)
    model = build_model(tokenizer, hidden_size=hidden, layers=layers, patch_size=8, vision_depth=2,
                        vision_hidden=64, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


TRAJECTORY_MIXES = {"box": 1.0, "click": 0.0, "hybrid": 0.5}  # share of Box-to-Point trajectories
ACTION_KINDS = ("box", "positive_click", "negative_click", "stop", "invalid")


def tool_spec(name: str) -> dict:
    """The toy world's tool ``name`` (classical, or the bundled medsam-lite on the CPU)."""
    return {"name": name, "device": "cpu"} if name in ("medsam-lite", "sam2") else {"name": name}


def check_tool_installed(name: str) -> None:
    """A clear :class:`InputError` when the toy world's tool ``name`` cannot be built here."""
    from MedSAMAgentLib.builders import build_tool
    from MedSAMAgentLib.image_io import InputError

    try:
        build_tool(**tool_spec(name))
    except Exception as error:  # noqa: BLE001 - any failure to build is the user's to fix, in words
        raise InputError(f"The tool '{name}' cannot be used here: {error}") from None


def action_kind(action: dict | None) -> str:
    """One of :data:`ACTION_KINDS` for a step's parsed call (None: the reply did not parse)."""
    if not action:
        return "invalid"
    if action["name"] == "add_point":
        return "negative_click" if action["arguments"].get("point_type") == "negative" else "positive_click"
    return {"add_bbox": "box", "stop_action": "stop"}.get(action["name"], "invalid")


def evaluate(policy, episodes, profile, max_turns: int = 5, tool: str = "classical") -> dict:
    """Greedy episodes with ``tool``: Dice after the first action, after each turn (the last mask
    carried on) and after the episode, the full reward, valid tool-call rate, turns, clicks per
    episode and the action mix (share of all steps); ``rewards``: each episode's reward, in order."""
    from MedSAMAgentLib.agent import Agent
    from MedSAMAgentLib.builders import build_tool
    from MedSAMAgentLib.metrics import dice

    from .agent_eval import dice_per_turn
    from .reward import trajectory_reward

    trajs = Agent(policy, build_tool(**tool_spec(tool)), profile, max_turns=max_turns).run(episodes)
    first, final, turns, valid, total, gains, rewards, per_turn = [], [], [], 0, 0, [], [], []
    kinds = {k: 0 for k in ACTION_KINDS}
    for t, e in zip(trajs, episodes):
        d = t.dice_per_turn
        first.append(d[0] if d else 0.0)
        final.append(dice(t.final_mask, e.reference))
        turns.append(len(t.steps))
        total += len(t.steps)
        valid += sum(s.action is not None for s in t.steps)
        for s in t.steps:
            kinds[action_kind(s.action)] += 1
        if len(d) > 1:
            gains.append(d[-1] - d[0])
        rewards.append(float(trajectory_reward(t).score))
        per_turn.append(dice_per_turn(t, max_turns))
    clicks = kinds["positive_click"] + kinds["negative_click"]
    return {"tool": tool, "dice_first": round(float(np.mean(first)), 4), "dice_episode": round(float(np.mean(final)), 4),
            "dice_per_turn": [round(float(v), 4) for v in np.mean(per_turn, axis=0)],
            "reward": round(float(np.mean(rewards)), 4),
            "valid_call_rate": round(valid / max(1, total), 4), "mean_turns": round(float(np.mean(turns)), 3),
            "clicks_per_episode": round(clicks / max(1, len(trajs)), 3),
            "action_mix": {k: round(v / max(1, total), 4) for k, v in kinds.items()},
            "episodes_with_clicks": len(gains),
            "click_dice_gain": round(float(np.mean(gains)), 4) if gains else None, "rewards": rewards}


def run(out: str | Path, level: int = 1, train_count: int = 6000, test_count: int = 100, size: int = 64,
        steps: int = 3000, batch_size: int = 16, learning_rate: float = 1e-3, seed: int = 0,
        init_from: str | None = None, hidden: int = 96, layers: int = 2, trajectories: str | None = None,
        tool: str = "classical", transfer_tools: tuple = (), mix: RefinementMix = RefinementMix(),
        log=print) -> dict:
    """Generate, synthesize, train, evaluate; writes ``out/summary.json`` and returns it.

    ``trajectories``: the expert's strategy (:data:`TRAJECTORY_MIXES`; default hybrid at level 3,
    Box-to-Point below); ``tool``: the tool the expert and the evaluation use;
    ``transfer_tools``: further tools the trained policy is evaluated with (cross-tool transfer,
    ``policies["sft@TOOL"]``); ``mix``: the level-3 errors (:class:`RefinementMix`)."""
    from MedSAMAgentLib.actions import Box, Stop, format_action
    from MedSAMAgentLib.agent import Episode
    from MedSAMAgentLib.policies.qwen import QwenPolicy
    from MedSAMAgentLib.policies.replay import ReplayPolicy

    from .sft import SFTSettings, train
    from .synthesis import SynthesisConfig
    from .synthesis_run import synthesize

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    profile = toy_profile(size)
    write_json(out / "profile.json", profile.to_dict(), "the toy world profile")
    t0 = time.time()
    trajectories = trajectories or ("hybrid" if level == 3 else "box")
    if trajectories not in TRAJECTORY_MIXES:
        raise ValueError(f"trajectories must be one of {', '.join(TRAJECTORY_MIXES)}, not {trajectories!r}")
    train_dir = generate(out / "data" / "train", level, train_count, 1_000_000 * level + seed * 10_000, size, mix)
    test_dir = generate(out / "data" / "test", level, test_count, 5_000_000 + 1_000_000 * level + seed * 10_000,
                        size, mix)
    synth = synthesize(train_dir, out / "synth", tool_spec(tool),
                       SynthesisConfig(box_fraction=TRAJECTORY_MIXES[trajectories], box_jitter=0.05, seed=seed,
                                       min_area=10), resume=True)
    from .export import iter_records

    expert = trajectory_stats(list(iter_records(out / "synth")))
    log(f"synthesized {synth.report['kept']} trajectories: {expert}")
    init = Path(init_from) if init_from else build_model_dir(out / "model_init", profile, hidden, layers, seed)
    settings = SFTSettings(model=str(init), records=[str(out / "synth")], output_dir=str(out / "sft"),
                           profile=str(out / "profile.json"), lora=False, freeze_vision=False,
                           learning_rate=learning_rate, batch_size=batch_size, grad_accum=1, max_steps=steps,
                           warmup_ratio=0.05, lr_scheduler="cosine", seed=seed, gradient_checkpointing=False,
                           logging_steps=max(1, steps // 50), save_steps=max(50, steps // 5), device="cpu")
    t_train = time.time()
    result = train(settings)
    train_seconds = time.time() - t_train
    losses = [h["loss"] for h in result["log_history"] if "loss" in h]
    from PIL import Image

    test = []
    for case_dir in sorted((test_dir / "masks").iterdir()):
        mask_file = next(case_dir.glob("*.png"))
        image = np.asarray(Image.open(test_dir / "images" / f"{case_dir.name}.png"))
        test.append(Episode(case_dir.name, image, mask_file.stem.replace("_", " "),
                            np.asarray(Image.open(mask_file)) > 127))
    centred = ReplayPolicy([format_action(Box(250, 250, 750, 750)), format_action(Stop())])
    start = "untrained" if not init_from else "start"  # a curriculum starts from an earlier result, not from scratch
    trained = QwenPolicy(result["final"], profile=profile, device="cpu", batch_size=64)
    results = {
        start: evaluate(QwenPolicy(init, profile=profile, device="cpu", batch_size=64), test, profile, tool=tool),
        "centred_box": evaluate(centred, test, profile, tool=tool),
        "sft": evaluate(trained, test, profile, tool=tool),
    }
    for other in transfer_tools:
        results[f"sft@{other}"] = evaluate(trained, test, profile, tool=other)
    per_episode = {name: r.pop("rewards") for name, r in results.items()}
    write_json(out / "test_rewards.json", per_episode, "each held-out episode's reward, per policy")
    summary = {"level": level, "image_size": size, "train_images": train_count, "test_images": test_count,
               "trajectory_mix": trajectories, "tool": tool, "seed": seed,
               "mix": {k: getattr(mix, k) for k in mix.__dataclass_fields__} if level == 3 else None,
               "expert": expert,
               "trajectories": synth.report["kept"], "steps": steps, "batch_size": batch_size,
               "learning_rate": learning_rate, "train_seconds": round(train_seconds, 1),
               "total_seconds": round(time.time() - t0, 1), "init": str(init),
               "parameters": _count_parameters(result["final"]), "loss_first": losses[0] if losses else None,
               "loss_last": losses[-1] if losses else None, "policies": results, "final_model": result["final"]}
    write_json(out / "summary.json", summary, "the toy world summary")
    return summary


def _count_parameters(folder: str) -> int:
    from safetensors import safe_open

    total = 0
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(str(f), "np") as fh:
            for k in fh.keys():
                total += int(np.prod(fh.get_slice(k).get_shape()))
    return total


# ----------------------------------------------------------------------------- stage 2: RL

def load_folder_episodes(folder: Path) -> list:
    """The toy images of a generated folder as engine episodes."""
    from PIL import Image

    from MedSAMAgentLib.agent import Episode

    episodes = []
    for case_dir in sorted((Path(folder) / "masks").iterdir()):
        mask_file = next(case_dir.glob("*.png"))
        image = np.asarray(Image.open(Path(folder) / "images" / f"{case_dir.name}.png"))
        episodes.append(Episode(case_dir.name, image, mask_file.stem.replace("_", " "),
                                np.asarray(Image.open(mask_file)) > 127))
    return episodes


def evaluate_rewarded(model_dir, episodes, profile, reward=None, per_episode: list | None = None,
                      tool: str = "classical") -> dict:
    """Greedy episodes in the RL environment with ``tool``: mean reward (and its parts), Dice (after
    each turn and the episode), IoU, turns, valid calls, clicks and the action mix.
    ``per_episode``: a list that receives each episode's reward, in order (for paired comparisons)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from MedSAMAgentLib.tools import create_tool

    from .reward import RewardSettings
    from .rl_env import ModelGenerator, SegmentationEnvironment

    processor = AutoProcessor.from_pretrained(str(model_dir))
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir)).eval()
    from .agent_eval import dice_per_turn

    env = SegmentationEnvironment(create_tool(**tool_spec(tool)), processor, profile, reward or RewardSettings())
    results = env.run(episodes, ModelGenerator(model, processor, profile.max_new_tokens, greedy=True))
    steps = [s for r in results for s in r.trajectory.steps]
    kinds = [action_kind(s.action) for s in steps]
    if per_episode is not None:
        per_episode.extend(float(r.reward.score) for r in results)
    mean = lambda xs: round(float(np.mean(xs)), 4)  # noqa: E731
    return {"reward": mean([r.reward.score for r in results]), "format": mean([r.reward.format for r in results]),
            "quality": mean([r.reward.quality for r in results]),
            "dice": mean([r.reward.final_dice for r in results]), "iou": mean([r.reward.final_iou for r in results]),
            "turns": mean([len(r.trajectory.steps) for r in results]),
            "valid_call_rate": round(sum(s.action is not None for s in steps) / max(1, len(steps)), 4),
            "clicks_per_episode": mean([sum(bool(s.action) and s.action["name"] == "add_point"
                                            for s in r.trajectory.steps) for r in results]),
            "dice_per_turn": [round(float(v), 4) for v in
                              np.mean([dice_per_turn(r.trajectory, env.max_turns) for r in results], axis=0)],
            "action_mix": {k: round(kinds.count(k) / max(1, len(kinds)), 4) for k in ACTION_KINDS}}


# first image seeds of the RL images (+ 1,000,000 x level); the SFT world uses
# 1,000,000 x level (training) and 5,000,000 + 1,000,000 x level (held out), below 10,000,000
RL_TRAIN_SEED = 20_000_000
RL_TEST_SEED = 40_000_000


def _fresh_images(folder: Path, level: int, count: int, first_seed: int, size: int,
                  mix: RefinementMix = RefinementMix()) -> Path:
    """``folder`` holding toy images ``first_seed`` ... ``first_seed + count - 1`` (made when missing)."""
    names = {f"toy{first_seed + i:06d}" for i in range(count)}
    have = {p.name for p in (folder / "masks").iterdir()} if (folder / "masks").is_dir() else set()
    if not names <= have:
        generate(folder, level, count, first_seed, size, mix)
    return folder


def paired_gain(base: list, new: list, draws: int = 2000, seed: int = 0) -> dict:
    """Mean of ``new - base`` over the same episodes, with a 95% bootstrap interval (episodes resampled)."""
    diff = np.asarray(new, float) - np.asarray(base, float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (draws, len(diff)))].mean(axis=1)
    return {"mean": round(float(diff.mean()), 4), "ci95": [round(float(v), 4) for v in np.percentile(means, [2.5, 97.5])],
            "episodes_better": int((diff > 1e-9).sum()), "episodes_worse": int((diff < -1e-9).sum())}


RL_VARIANTS = {"rl": {}, "no_gain_bonus": {"use_gain_bonus": False}, "no_drop_penalty": {"use_drop_penalty": False},
               "no_turn_cost": {"use_mask_cost": False}}


# what makes two RL runs on one world comparable (the held-out folder is always <world>/data/rl-test,
# so its path, which depends on the folder a command ran in, is not compared)
RL_SETTINGS_KEYS = ("from", "steps", "group_size", "images_per_step", "learning_rate", "temperature", "train_images",
                    "scale_rewards", "beta", "test_images", "tool")


@contextlib.contextmanager
def _summary_lock(world: Path):
    """Holds an exclusive lock on ``world/.summary.lock`` so processes sharing a world update its
    summary one at a time (read, merge, write) and none overwrites another's finished runs."""
    with open(world / ".summary.lock", "a") as handle:  # closing the file releases the lock
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def run_folder(world: str | Path, name: str, run: dict) -> Path:
    """An RL run's folder: ``<world>/rl/<run>`` where it is there (the recorded ``final_model`` path
    may be relative to the folder its command ran in), else the folder holding ``final_model``."""
    inside = Path(world) / "rl" / name
    return inside if inside.is_dir() else Path(run["final_model"]).parent


def _model_exists(world: Path, name: str, run: dict) -> bool:
    """Whether a run's final model is still on disk, found as :func:`run_folder` finds the run."""
    return (run_folder(world, name, run) / Path(run["final_model"]).name).exists()


def _merge_finished_runs(world: Path, section: dict) -> None:
    """Into ``section``: the runs finished on this world with the same settings, by this or another
    process: each finished run leaves ``rl/<run>/run.json`` (its record and settings), so a run
    whose process stopped before updating the summary still counts.  Ordered as ``RL_VARIANTS``,
    then seed; then each ablation's paired gain over the full-reward run of its seed, where both
    runs' held-out rewards are saved."""
    for record_file in sorted((world / "rl").glob("*/run.json")):
        record = json.loads(record_file.read_text(encoding="utf-8"))
        name = record_file.parent.name
        same = all(record.get("settings", {}).get(k) == section.get(k) for k in RL_SETTINGS_KEYS)
        if same and name not in section["runs"] and _model_exists(world, name, record["run"]):
            section["runs"][name] = record["run"]
    other = json.loads((world / "summary.json").read_text(encoding="utf-8")).get("rl") or {}
    if all(other.get(k) == section.get(k) for k in RL_SETTINGS_KEYS):  # runs recorded before run.json existed
        for name, run in other.get("runs", {}).items():
            if name not in section["runs"] and _model_exists(world, name, run):
                section["runs"][name] = run
    order = list(RL_VARIANTS)
    section["runs"] = dict(sorted(section["runs"].items(),
                                  key=lambda kv: (order.index(kv[1]["variant"]), kv[1]["seed"])))
    for name, run in section["runs"].items():
        full = world / "rl" / f"rl-seed{run['seed']}" / "held_out_rewards.json"
        mine = world / "rl" / name / "held_out_rewards.json"
        if run["variant"] != "rl" and full.is_file() and mine.is_file():
            run["reward_gain_vs_full_rl"] = paired_gain(json.loads(full.read_text(encoding="utf-8")),
                                                        json.loads(mine.read_text(encoding="utf-8")))


def run_rl(world: str | Path, seeds=(0, 1), steps: int = 300, group_size: int = 8, images_per_step: int = 8,
           learning_rate: float = 3e-5, temperature: float = 0.7, train_images: int = 2000,
           scale_rewards: str = "none", beta: float = 0.1, ablations: bool = True, eval_images: int = 1000,
           ablation_seeds=None, variants=None, log=print) -> dict:
    """Stage 2 on a finished toy world: GRPO from its SFT model, on CPU.

    RL images are new ones (``data/rl-train``, seeds apart from the SFT training
    and held-out images: the SFT model has seen its training images many times);
    the comparison uses ``eval_images`` further unseen images (``data/rl-test``),
    more than the world's 100 test images so one flipped episode moves the mean
    reward by 0.001, not 0.01.  Runs the
    full reward with every seed in ``seeds``, and (``ablations``) each process term off (the
    improvement bonus, the drop penalty, the per-mask cost) with every seed of ``ablation_seeds``
    (default: the first seed); ``variants`` (names of ``RL_VARIANTS``) keeps only those runs, so
    several processes can share one world, each its own runs.  Episodes use the world's own tool;
    evaluates the SFT model and each result greedily on the held-out images, saving each run's
    per-episode rewards (``rl/<run>/held_out_rewards.json``); an ablation is also compared, episode
    by episode, with the full-reward run of its seed when that one is finished.  Adds an ``rl``
    section to ``world/summary.json`` (keeping the runs another process finished with the same
    settings) and returns it.
    """
    from MedSAMAgentLib.profile import Profile

    from .reward import RewardSettings
    from .rl import RLSettings, train

    world = Path(world)
    summary = json.loads((world / "summary.json").read_text(encoding="utf-8"))
    profile = Profile.load(world / "profile.json")
    sft_model = summary["final_model"]  # as the world recorded it: the runs' "from"
    # that path may be relative to the folder the world was made in: load from inside the world
    sft_path = str(world / "sft" / "final") if (world / "sft" / "final").is_dir() else sft_model
    t0 = time.time()
    level = int(summary.get("level", 1))
    size = int(summary.get("image_size", 64))
    tool = summary.get("tool", "classical")
    mix = RefinementMix(**summary["mix"]) if summary.get("mix") else RefinementMix()
    rl_data = _fresh_images(world / "data" / "rl-train", level, train_images, RL_TRAIN_SEED + 1_000_000 * level, size,
                            mix)
    test_data = _fresh_images(world / "data" / "rl-test", level, eval_images, RL_TEST_SEED + 1_000_000 * level, size,
                              mix)
    test = load_folder_episodes(test_data)[:eval_images]
    section = {"from": sft_model, "steps": steps, "group_size": group_size, "images_per_step": images_per_step,
               "learning_rate": learning_rate, "temperature": temperature, "train_images": train_images,
               "scale_rewards": scale_rewards, "beta": beta,
               "train_data": str(rl_data), "test_data": str(test_data), "test_images": len(test), "policies": {}, "runs": {}}
    previous = summary.get("rl", {}).get("runs", {})
    sft_rewards: list = []
    section["tool"] = tool
    section["policies"]["sft"] = evaluate_rewarded(sft_path, test, profile, per_episode=sft_rewards, tool=tool)
    log(f"SFT on the held-out images: {section['policies']['sft']}")
    plan = [("rl", seed) for seed in seeds]
    if ablations:
        plan += [(variant, seed) for variant in RL_VARIANTS if variant != "rl"
                 for seed in (ablation_seeds if ablation_seeds is not None else seeds[:1])]
    if variants is not None:
        unknown = sorted(set(variants) - set(RL_VARIANTS))
        if unknown:
            raise ValueError(f"unknown RL variants {unknown}; choose from {sorted(RL_VARIANTS)}")
        plan = [(variant, seed) for variant, seed in plan if variant in variants]
    for variant, seed in plan:
        name = f"{variant}-seed{seed}"
        settings = RLSettings(
            model=sft_path, dataset=str(rl_data), output_dir=str(world / "rl" / name),
            profile=str(world / "profile.json"), min_area=10, max_episodes=train_images,
            reward=RL_VARIANTS[variant], tool=tool_spec(tool), group_size=group_size, images_per_step=images_per_step,
            learning_rate=learning_rate, temperature=temperature, scale_rewards=scale_rewards, beta=beta, max_steps=steps,
            lora=False, freeze_vision=False,
            gradient_checkpointing=False, device="cpu", seed=seed, save_steps=max(10, steps // 3), logging_steps=5)
        t_run = time.time()
        result = train(settings)
        # every policy is scored with the full reward, so the ablations compare on one scale
        rewards: list = []
        scores = evaluate_rewarded(result["final"], test, profile, RewardSettings(), per_episode=rewards, tool=tool)
        seconds = round(time.time() - t_run, 1)
        if result.get("already_finished") and name in previous:
            seconds = previous[name].get("train_seconds", seconds)  # finished before: re-scored, not retrained
        write_json(world / "rl" / name / "held_out_rewards.json", rewards, "the run's held-out rewards")
        section["runs"][name] = {"variant": variant, "seed": seed, "reward_settings": RL_VARIANTS[variant],
                                 "train_seconds": seconds, "final_model": result["final"],
                                 "test": scores, "reward_gain_vs_sft": paired_gain(sft_rewards, rewards)}
        write_json(world / "rl" / name / "run.json",
                   {"run": section["runs"][name], "settings": {k: section.get(k) for k in RL_SETTINGS_KEYS}},
                   "the run's record")
        log(f"{name}: {scores}")
    with _summary_lock(world):
        return _update_summary(world, section, t0)


def _update_summary(world: Path, section: dict, t0: float) -> dict:
    """Merges the finished runs into ``section``, adds the full-reward gain over SFT across seeds,
    and writes ``section`` as the ``rl`` part of ``world/summary.json`` (call under the lock)."""
    _merge_finished_runs(world, section)
    full = [r["test"]["reward"] for r in section["runs"].values() if r["variant"] == "rl"]
    base = section["policies"]["sft"]["reward"]
    gains = [round(v - base, 4) for v in full]
    section["total_seconds"] = round(time.time() - t0, 1)
    summary = json.loads((world / "summary.json").read_text(encoding="utf-8"))  # as another process left it
    summary["rl"] = section
    if not gains:  # only ablations here, no full-reward run yet
        write_json(world / "summary.json", summary, "the toy world summary")
        return section
    section["rl_reward_gain"] = {"per_seed": gains, "mean": round(float(np.mean(gains)), 4),
                                 "min": min(gains), "max": max(gains),
                                 "std": round(float(np.std(gains)), 4)}
    for key in ("dice", "turns"):
        vals = [r["test"][key] for r in section["runs"].values() if r["variant"] == "rl"]
        section["rl_reward_gain"][f"{key}_change_mean"] = round(float(np.mean(vals)) - section["policies"]["sft"][key], 4)
    write_json(world / "summary.json", summary, "the toy world summary")
    return section
