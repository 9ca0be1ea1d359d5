"""The multi-turn loop: a policy looks, acts; the tool updates the mask; repeat.

Runs a batch of episodes together: all images are prepared by the tool at once
(one encoder pass each), then every turn sends all still-running episodes to the
policy in one call.  Per turn and episode:

* the reply is read by the profile's parser (strict, or the reference's: an irregular reply it accepts
  is recorded in the step's ``repaired``);
* a parse failure ends that episode (``stop_reason="parse_failure"``, the reason
  kept), never the batch, unless the profile asks an invalid reply again
  (``invalid_reply_retries`` per turn, the evaluation scripts' rule; the mask is kept); a tool error
  ends it too (``"tool_error"``);
* ``stop_action`` ends it (``"stop"``), except on the first turn, where the
  policy is asked once more (the profile's ``first_turn_stop_retries``; with
  greedy decoding the answer is usually the same); a second stop gives an empty mask.
  Where the profile retries invalid replies, the two retries share that turn's budget, as in the
  evaluation scripts.  A retried reply stays in the conversation when the profile's
  ``retry_context`` is ``with_reply`` (the evaluation scripts: the same picture follows it), and is
  recorded in the trajectory's ``retries``;
* a box or click goes to the tool with every prompt so far and the previous
  turn's state; the new mask is overlaid for the next turn;
* after ``max_turns`` turns it ends with ``"max_turns"``; ``AgentRun.cancel()``
  ends it with ``"cancelled"``.

Events (``on_event(Event)``): ``action`` before the tool runs (a client can draw
the prompt at once), ``mask`` after it, ``error`` on a failure, and
``episode_done`` with the finished trajectory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .actions import ParseFailure, Stop, action_to_call, format_action
from .metrics import dice, iou
from .observation import PolicyFrames, to_display
from .policies.base import Observation, Policy
from .profile import Profile
from .tools.base import NotPrepared, SegmentationTool, ToolError
from .trajectory import Step, Trajectory, prompt_to_dict


@dataclass
class Episode:
    """One image and target. ``image``: H x W x 3 ``uint8`` RGB, or any 2D array (it is
    windowed with :func:`~MedSAMAgentLib.observation.to_display`); ``reference``:
    optional H x W mask, for scoring and for oracle policies. ``history`` continues an
    episode: the (grid action, resulting mask) pairs already on the image, which the
    policy sees as its own earlier turns (replies formatted from the actions)."""

    id: str
    image: np.ndarray
    target: str
    reference: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # [(action, mask)] already applied (a user's edits, earlier turns)
    tool_state: Any = None  # the tool's state after the history (SAM2: its low-res logits)
    tool_key: str | None = None  # a name the caller gives ``image`` for the tool (one name, one picture): no hashing


@dataclass
class Event:
    """``kind``: action | mask | error | episode_done. ``data`` holds the payload:
    action -> {"action", "pixels", "text"}; mask -> {"mask" (H x W bool), "score",
    "dice", "iou", "state" (the tool's state for the next turn)}; error -> {"reason"};
    episode_done -> {"trajectory"}."""

    kind: str
    episode_id: str
    turn: int
    data: dict


def prepare(tool: SegmentationTool, rgbs: Sequence[np.ndarray], names: Sequence[str | None]) -> list[str]:
    """``tool.prepare``, passing the caller's names for the images only when there are any
    (a tool from elsewhere may take images alone)."""
    return tool.prepare(rgbs, names) if any(n is not None for n in names) else tool.prepare(rgbs)


@dataclass(frozen=True)
class _Read:
    """A policy's decision as the profile's parser read it."""

    text: str
    action: Any
    repaired: str | None = None


class _Running:
    def __init__(self, episode: Episode, rgb: np.ndarray, key: str, profile: Profile):
        self.episode = episode
        self.rgb = rgb
        self.key = key
        self.height, self.width = rgb.shape[:2]
        self.reference = None if episode.reference is None else np.asarray(episode.reference, dtype=bool)
        self.images = PolicyFrames(rgb, profile)  # rendered only if the policy looks
        self.replies: list[str] = []
        self.actions: list = []
        self.prompts: list = []
        self.masks: list = []
        self.state: Any = episode.tool_state
        for action, mask in episode.history:
            mask = np.asarray(mask, dtype=bool)
            self.actions.append(action)
            self.replies.append(format_action(action))
            self.prompts.append(profile.to_pixels(action, self.width, self.height))
            self.masks.append(mask)
            self.images.add_mask(mask)
        self.turn = len(episode.history)
        self.done = False
        self.retries_left = profile.first_turn_stop_retries  # first-turn stops asked again
        self.turn_budget = profile.invalid_reply_retries  # this turn's retries of invalid replies
        self.trajectory = Trajectory(episode.id, episode.target, (self.width, self.height), meta=dict(episode.meta))

    def observation(self) -> Observation:
        return Observation(self.episode.id, self.episode.target, self.turn, self.images.upto(), list(self.replies),
                           list(self.actions), list(self.masks), self.rgb, self.reference)


class AgentRun:
    """A batch of episodes in progress; ``step()`` plays one turn of every running episode.

    Lets a scheduler interleave other work (a user's override) between turns, and
    ``cancel()`` end the run within one turn.
    """

    def __init__(self, agent: "Agent", episodes: Sequence[Episode]):
        self.agent = agent
        self.t_start = time.perf_counter()
        rgbs = [to_display(e.image) for e in episodes]
        t0 = time.perf_counter()
        keys = prepare(agent.tool, rgbs, [e.tool_key for e in episodes])
        encode_each = (time.perf_counter() - t0) / max(1, len(episodes))
        self.runs = [_Running(e, rgb, k, agent.profile) for e, rgb, k in zip(episodes, rgbs, keys)]
        for r in self.runs:
            r.trajectory.encode_s = encode_each
            r.trajectory.policy, r.trajectory.tool, r.trajectory.profile = (
                getattr(agent.policy, "name", ""), getattr(agent.tool, "name", ""), agent.profile.name)
            if r.turn >= agent.max_turns:
                self._close(r, "max_turns")

    @property
    def done(self) -> bool:
        return all(r.done for r in self.runs)

    @property
    def trajectories(self) -> list[Trajectory]:
        return [r.trajectory for r in self.runs]

    def _close(self, r: _Running, reason: str) -> None:
        if r.done:  # ended already (each episode ends once, with one episode_done)
            return
        r.done = True
        r.trajectory.stop_reason = reason
        r.trajectory.total_s = time.perf_counter() - self.t_start
        self.agent._emit("episode_done", r, r.turn, trajectory=r.trajectory)

    def cancel(self) -> None:
        """End every running episode now (``stop_reason="cancelled"``), keeping what they have."""
        for r in self.runs:
            if not r.done:
                self._close(r, "cancelled")

    def end(self, episode_id: str, reason: str) -> None:
        """End one episode now with ``stop_reason=reason`` (e.g. a person edited that slice meanwhile).
        Call it from the thread that steps the run."""
        for r in self.runs:
            if r.episode.id == episode_id and not r.done:
                self._close(r, reason)

    def step(self) -> bool:
        """Play one turn of every running episode; returns True while some are still running."""
        for _ in self.substeps():
            pass
        return not self.done

    def substeps(self):
        """One turn, yielding after the policy's batch call and after each episode's tool call.

        A scheduler that runs other work between the pieces (a user's override)
        keeps it waiting for at most one piece.
        """
        agent = self.agent
        active = [r for r in self.runs if not r.done]
        if not active:
            return
        t0 = time.perf_counter()
        decisions = [agent.read(d) for d in agent.policy.act([r.observation() for r in active])]
        again = [i for i, (r, d) in enumerate(zip(active, decisions)) if agent.retry(r, d)]
        while again:
            redo = agent.policy.act([active[i].observation() for i in again])
            for i, d in zip(again, redo):
                decisions[i] = agent.read(d)
            again = [i for i in again if agent.retry(active[i], decisions[i])]
        policy_each = (time.perf_counter() - t0) / len(active)
        yield
        for r, decision in zip(active, decisions):
            if r.done:  # ended meanwhile (cancelled, or ended between the pieces): no more turns
                continue
            agent._apply(r, decision, policy_each)
            r.turn += 1
            r.turn_budget = agent.profile.invalid_reply_retries
            if r.done:
                r.trajectory.total_s = time.perf_counter() - self.t_start
            elif r.turn >= agent.max_turns:
                self._close(r, "max_turns")
            yield


class Agent:
    """Drives ``policy`` and ``tool`` through episodes under a ``profile``."""

    def __init__(self, policy: Policy, tool: SegmentationTool, profile: Profile | None = None,
                 max_turns: int | None = None, on_event: Callable[[Event], None] | None = None):
        self.policy = policy
        self.tool = tool
        self.profile = profile or getattr(policy, "profile", None) or Profile.load()
        self.max_turns = int(max_turns or self.profile.max_turns)
        self.on_event = on_event

    def read(self, decision):
        """The policy's decision with its reply read by the profile's parser: (text, action, repaired).
        A decision without text (replay of actions, the expert) keeps its action."""
        if decision.text and self.profile.parser == "reference":
            action, repaired = self.profile.parse(decision.text)
            return _Read(decision.text, action, repaired)
        return _Read(decision.text, decision.action, None)

    def retry(self, r: _Running, d) -> bool:
        """Whether the reply ``d`` is refused and asked again (see the module docstring); if so the retry is
        recorded, and with ``retry_context`` ``with_reply`` the reply and the same picture join the context."""
        shared = self.profile.invalid_reply_retries > 0
        if r.turn == 0 and isinstance(d.action, Stop) and r.retries_left > 0 and (not shared or r.turn_budget > 0):
            r.retries_left -= 1
            r.turn_budget -= int(shared)
            r.trajectory.retried_first_stop = True
            reason = "stop on the first turn"
        elif isinstance(d.action, ParseFailure) and r.turn_budget > 0:
            r.turn_budget -= 1
            reason = d.action.reason
        else:
            return False
        r.trajectory.retries.append({"turn": r.turn, "text": d.text, "reason": reason})
        if self.profile.retry_context == "with_reply":
            r.replies.append(d.text)
            r.images.add_mask(r.masks[-1] if r.masks else None)
        return True

    def _emit(self, kind: str, run: _Running, turn: int, **data) -> None:
        if self.on_event is not None:
            self.on_event(Event(kind, run.episode.id, turn, data))

    def start(self, episodes: Sequence[Episode]) -> AgentRun:
        """Prepare the images (one encoder pass each) and return the run, to be stepped turn by turn."""
        return AgentRun(self, episodes)

    def run(self, episodes: Sequence[Episode]) -> list[Trajectory]:
        """Run every episode to its end; trajectories come back in input order."""
        run = self.start(episodes)
        while run.step():
            pass
        return run.trajectories

    def _finish(self, r: _Running, turn: int, reason: str, failure: str | None = None) -> None:
        if r.done:
            return
        r.done = True
        r.trajectory.stop_reason = reason
        r.trajectory.failure = failure
        if failure:
            self._emit("error", r, turn, reason=failure)
        self._emit("episode_done", r, turn, trajectory=r.trajectory)

    def _apply(self, r: _Running, decision, policy_s: float) -> None:
        turn = r.turn
        action = decision.action
        if isinstance(action, ParseFailure):
            r.trajectory.steps.append(Step(turn, decision.text, None, policy_s=policy_s))
            self._finish(r, turn, "parse_failure", action.reason)
            return
        call = action_to_call(action)
        prompt = self.profile.to_pixels(action, r.width, r.height)
        step = Step(turn, decision.text, call, prompt_to_dict(prompt), policy_s=policy_s,
                    repaired=decision.repaired)
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
            try:
                result = self.tool.segment(r.key, r.prompts, r.state)
            except NotPrepared:  # evicted by other work sharing the tool (another run, a user's override)
                r.key, = prepare(self.tool, [r.rgb], [r.episode.tool_key])
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
        r.images.add_mask(mask)
        self._emit("mask", r, turn, mask=mask, score=step.score, dice=step.dice, iou=step.iou, state=result.state)
