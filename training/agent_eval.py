"""Agent-loop evaluation during training: Dice per turn on held-back images, every N steps.

A loss says how well the policy imitates or scores; what a user gets is the mask
after the agent's turns.  :class:`AgentLoopEvaluation` (a ``TrainerCallback``, for
SFT and RL alike) plays whole episodes with the model being trained -- greedy
replies, the engine's own agent loop and conversation
(:class:`~medsam_training.rl_env.SegmentationEnvironment`) -- on slices of a
held-back dataset with reference masks, and logs ``agent_eval/dice_turn_k`` (the
Dice of the mask after turn ``k``, the last mask carried on after a stop, 0 before
the first), ``agent_eval/final_dice``, ``agent_eval/turns`` and
``agent_eval/stopped``; each evaluation is also a line of ``agent_eval.jsonl`` in
the output folder.  With several processes every process plays the same episodes
(generation under ZeRO-3/FSDP is collective) and the main one logs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from MedSAMAgentLib.durable import DurableAppender


def slice_episodes(dataset: str, dataset_format: str = "auto", axis: str = "axial", sampling: str = "every:4",
                   min_area: int = 20, synonyms: str | None = None, limit: int | None = None, seed: int = 0) -> list:
    """The slices of ``dataset`` holding a target of at least ``min_area`` pixels, as engine episodes
    (image, target, reference); at most ``limit``, a seeded choice kept in dataset order."""
    from MedSAMAgentLib.agent import Episode
    from MedSAMAgentLib.image_io import InputError

    from .datasets import list_units, load_synonyms, unit_samples

    episodes = []
    for unit in list_units(dataset, dataset_format, load_synonyms(synonyms)):
        for s in unit_samples(unit, axis, sampling, min_area).samples:
            episodes.append(Episode(s.key, s.rgb, s.target, s.reference, meta={"case": s.case}))
    if not episodes:
        raise InputError(f"No slice in {dataset} has a target of at least {min_area} pixels.")
    if limit:
        order = np.random.default_rng(seed).permutation(len(episodes))[:limit]
        episodes = [episodes[i] for i in sorted(order)]
    return episodes


def dice_per_turn(trajectory, turns: int) -> list[float]:
    """Dice after each of ``turns`` turns (the last mask carried on; 0.0 before the first)."""
    out, current = [], 0.0
    for k in range(turns):
        if k < len(trajectory.steps) and trajectory.steps[k].dice is not None and trajectory.steps[k].mask is not None:
            current = float(trajectory.steps[k].dice)
        out.append(current)
    return out


def evaluate(model, processor, environment, episodes: list, max_new_tokens: int = 128) -> dict:
    """Plays ``episodes`` greedily with ``model``; the summary metrics (see the module docstring)."""
    import torch

    from .rl_env import ModelGenerator

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            results = environment.run(episodes, ModelGenerator(model, processor, max_new_tokens, greedy=True))
    finally:
        model.train(was_training)
    turns = environment.max_turns
    per_turn = np.array([dice_per_turn(r.trajectory, turns) for r in results])
    metrics = {f"agent_eval/dice_turn_{k + 1}": float(per_turn[:, k].mean()) for k in range(turns)}
    metrics["agent_eval/final_dice"] = float(np.mean([r.reward.final_dice for r in results]))
    metrics["agent_eval/turns"] = float(np.mean([len(r.trajectory.steps) for r in results]))
    metrics["agent_eval/stopped"] = float(np.mean([r.trajectory.stop_reason == "stop" for r in results]))
    return metrics


def agent_evaluation(settings, tool_spec: dict, processor, tool=None):
    """The callback for SFT or RL ``settings`` (None when ``agent_eval_every`` is 0); ``tool``: one
    already built (RL's own), else one is built from ``tool_spec``."""
    if not settings.agent_eval_every:
        return None
    from MedSAMAgentLib.builders import build_tool
    from MedSAMAgentLib.profile import Profile

    from .reward import RewardSettings
    from .rl_env import SegmentationEnvironment

    spec = dict(tool_spec)
    if spec.get("name") in ("sam2", "medsam-lite") and "device" not in spec:
        spec["device"] = "cpu" if settings.device == "cpu" else "auto"
    episodes = slice_episodes(settings.agent_eval_dataset, limit=settings.agent_eval_items, seed=settings.seed)
    profile = Profile.load(settings.profile)
    environment = SegmentationEnvironment(tool if tool is not None else build_tool(**spec), processor, profile,
                                          RewardSettings(),
                                          getattr(settings, "max_turns", None))
    return AgentLoopEvaluation(environment, processor, episodes, settings.agent_eval_every,
                               Path(settings.output_dir) / "agent_eval.jsonl")


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class AgentLoopEvaluation(_callback_base()):
    """Every ``every`` optimizer steps: :func:`evaluate` on ``episodes``, logged through ``trainer``
    (set :attr:`trainer` after the trainer exists) and appended to ``log_file``."""

    def __init__(self, environment, processor, episodes: list, every: int, log_file: Path):
        self.environment, self.processor, self.episodes = environment, processor, episodes
        self.every, self.log_file = int(every), Path(log_file)
        self.trainer = None
        self.history: list[dict] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every <= 0 or state.global_step % self.every or model is None:
            return control
        metrics = evaluate(model, self.processor, self.environment, self.episodes)
        self.history.append({"step": state.global_step, **metrics})
        if state.is_world_process_zero:
            with DurableAppender(self.log_file, "the agent-loop evaluation log") as fh:
                fh.append(json.dumps({"step": state.global_step, **metrics}))
        if self.trainer is not None:
            self.trainer.log(metrics)
        return control
