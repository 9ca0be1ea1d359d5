"""The multi-turn loop: a policy looks, acts; the tool updates the mask; repeat.

Runs a batch of episodes together: all images are prepared by the tool at once
(one encoder pass each), then every turn sends all still-running episodes to the
policy in one call.  Per turn and episode:

* a parse failure ends that episode (``stop_reason="parse_failure"``, the reason
  kept), never the batch; so does a tool error (``"tool_error"``);
* ``stop_action`` ends it (``"stop"``), except on the first turn, where the
  policy is asked once more (the profile's ``first_turn_stop_retries``; with
  greedy decoding the answer is usually the same); a second stop gives an empty mask;
* a box or click goes to the tool with every prompt so far and the previous
  turn's state; the new mask is overlaid for the next turn;
* after ``max_turns`` turns it ends with ``"max_turns"``.

Events (``on_event(Event)``): ``action`` before the tool runs (a client can draw
the prompt at once), ``mask`` after it, ``error`` on a failure, and
``episode_done`` with the finished trajectory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .actions import ParseFailure, Stop, action_to_call, to_pixels
from .metrics import dice, iou
from .observation import policy_base, policy_frame, to_display
from .policies.base import Observation, Policy
from .profile import Profile
from .tools.base import SegmentationTool, ToolError
from .trajectory import Step, Trajectory, prompt_to_dict


@dataclass
class Episode:
    """One image and target. ``image``: H x W x 3 ``uint8`` RGB, or any 2D array (it is
    windowed with :func:`~MedSAMAgentLib.observation.to_display`); ``reference``:
    optional H x W mask, for scoring and for oracle policies."""

    id: str
    image: np.ndarray
    target: str
    reference: np.ndarray | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Event:
    """``kind``: action | mask | error | episode_done. ``data`` holds the payload:
    action -> {"action", "pixels", "text"}; mask -> {"mask" (H x W bool), "score",
    "dice", "iou"}; error -> {"reason"}; episode_done -> {"trajectory"}."""

    kind: str
    episode_id: str
    turn: int
    data: dict


class _Running:
    def __init__(self, episode: Episode, rgb: np.ndarray, key: str, profile: Profile):
        self.episode = episode
        self.rgb = rgb
        self.key = key
        self.height, self.width = rgb.shape[:2]
        self.base = policy_base(rgb, profile)
        self.reference = None if episode.reference is None else np.asarray(episode.reference, dtype=bool)
        self.images = [self.base]
        self.replies: list[str] = []
        self.actions: list = []
        self.prompts: list = []
        self.masks: list = []
        self.state: Any = None
        self.done = False
        self.retries_left = profile.first_turn_stop_retries
        self.trajectory = Trajectory(episode.id, episode.target, (self.width, self.height), meta=dict(episode.meta))

    def observation(self, turn: int) -> Observation:
        return Observation(self.episode.id, self.episode.target, turn, list(self.images), list(self.replies),
                           list(self.actions), list(self.masks), self.rgb, self.reference)


class Agent:
    """Drives ``policy`` and ``tool`` through episodes under a ``profile``."""

    def __init__(self, policy: Policy, tool: SegmentationTool, profile: Profile | None = None,
                 max_turns: int | None = None, on_event: Callable[[Event], None] | None = None):
        self.policy = policy
        self.tool = tool
        self.profile = profile or getattr(policy, "profile", None) or Profile.load()
        self.max_turns = int(max_turns or self.profile.max_turns)
        self.on_event = on_event

    def _emit(self, kind: str, run: _Running, turn: int, **data) -> None:
        if self.on_event is not None:
            self.on_event(Event(kind, run.episode.id, turn, data))

    def run(self, episodes: Sequence[Episode]) -> list[Trajectory]:
        """Run every episode to its end; trajectories come back in input order."""
        t_start = time.perf_counter()
        rgbs = [to_display(e.image) for e in episodes]
        t0 = time.perf_counter()
        keys = self.tool.prepare(rgbs)
        encode_each = (time.perf_counter() - t0) / max(1, len(episodes))
        runs = [_Running(e, rgb, k, self.profile) for e, rgb, k in zip(episodes, rgbs, keys)]
        for r in runs:
            r.trajectory.encode_s = encode_each
            r.trajectory.policy, r.trajectory.tool, r.trajectory.profile = (
                getattr(self.policy, "name", ""), getattr(self.tool, "name", ""), self.profile.name)

        for turn in range(self.max_turns):
            active = [r for r in runs if not r.done]
            if not active:
                break
            t0 = time.perf_counter()
            decisions = self.policy.act([r.observation(turn) for r in active])
            if turn == 0:
                again = [i for i, (r, d) in enumerate(zip(active, decisions))
                         if isinstance(d.action, Stop) and r.retries_left > 0]
                while again:
                    for i in again:
                        active[i].retries_left -= 1
                        active[i].trajectory.retried_first_stop = True
                    redo = self.policy.act([active[i].observation(turn) for i in again])
                    for i, d in zip(again, redo):
                        decisions[i] = d
                    again = [i for i in again if isinstance(decisions[i].action, Stop) and active[i].retries_left > 0]
            policy_each = (time.perf_counter() - t0) / len(active)
            for r, decision in zip(active, decisions):
                self._apply(r, turn, decision, policy_each)

        for r in runs:
            if not r.done:
                r.done = True
                r.trajectory.stop_reason = "max_turns"
                self._emit("episode_done", r, len(r.trajectory.steps), trajectory=r.trajectory)
        total = time.perf_counter() - t_start
        for r in runs:
            r.trajectory.total_s = total
        return [r.trajectory for r in runs]

    def _finish(self, r: _Running, turn: int, reason: str, failure: str | None = None) -> None:
        r.done = True
        r.trajectory.stop_reason = reason
        r.trajectory.failure = failure
        if failure:
            self._emit("error", r, turn, reason=failure)
        self._emit("episode_done", r, turn, trajectory=r.trajectory)

    def _apply(self, r: _Running, turn: int, decision, policy_s: float) -> None:
        action = decision.action
        if isinstance(action, ParseFailure):
            r.trajectory.steps.append(Step(turn, decision.text, None, policy_s=policy_s))
            self._finish(r, turn, "parse_failure", action.reason)
            return
        call = action_to_call(action)
        prompt = to_pixels(action, r.width, r.height)
        step = Step(turn, decision.text, call, prompt_to_dict(prompt), policy_s=policy_s)
        r.trajectory.steps.append(step)
        r.actions.append(action)
        r.replies.append(decision.text)
        self._emit("action", r, turn, action=call, pixels=step.pixels, text=decision.text)
        if isinstance(action, Stop):
            self._finish(r, turn, "stop")
            return
        r.prompts.append(prompt)
        t0 = time.perf_counter()
        try:
            result = self.tool.segment(r.key, r.prompts, r.state)
        except ToolError as exc:
            self._finish(r, turn, "tool_error", str(exc))
            return
        step.tool_s = time.perf_counter() - t0
        mask = np.asarray(result.mask, dtype=bool)
        step.mask, step.score = mask, result.score
        if r.reference is not None:
            step.dice, step.iou = dice(mask, r.reference), iou(mask, r.reference)
        r.state = result.state
        r.masks.append(mask)
        r.images.append(policy_frame(r.base, mask, self.profile))
        self._emit("mask", r, turn, mask=mask, score=step.score, dice=step.dice, iou=step.iou)
