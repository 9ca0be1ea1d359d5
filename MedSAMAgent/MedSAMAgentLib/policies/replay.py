"""Plays back recorded actions: per episode id (and target), or one sequence for every episode.

After the recorded actions run out it answers ``stop_action``.  Recorded items
may be actions, tool-call dicts (``{"name", "arguments"}``) or raw model text
(parsed as a model's would be).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..actions import ParseFailure, Stop, action_from_dict, format_action, parse_action
from .base import Decision, Observation


def _decision(item: Any) -> Decision:
    if isinstance(item, str):
        return Decision(item, parse_action(item))
    action = action_from_dict(item) if isinstance(item, dict) else item
    return Decision("" if isinstance(action, ParseFailure) else format_action(action), action)


class ReplayPolicy:
    name = "replay"

    def __init__(self, actions: Sequence[Any] | Mapping[str, Sequence[Any]]):
        self.actions = actions

    @classmethod
    def from_trajectories(cls, trajectories) -> "ReplayPolicy":
        """Replay the raw texts of recorded trajectories, keyed by episode id, and by target and episode id
        (``"{target}::{episode id}"``) where a trajectory names its target: a file recorded for several
        targets plays each one's own actions; an episode of another target plays the first recorded."""
        actions = {}
        for t in trajectories:
            texts = [s.text for s in t.steps]
            actions.setdefault(t.episode_id, texts)
            if t.target:
                actions.setdefault(f"{t.target}::{t.episode_id}", texts)
        return cls(actions)

    def _sequence(self, episode_id: str, target: str = "") -> Sequence[Any]:
        if isinstance(self.actions, Mapping):
            return self.actions.get(f"{target}::{episode_id}", self.actions.get(episode_id, ()))
        return self.actions

    def act(self, observations: Sequence[Observation]) -> list[Decision]:
        out = []
        for obs in observations:
            seq = self._sequence(obs.episode_id, obs.target)
            out.append(_decision(seq[obs.turn]) if obs.turn < len(seq) else _decision(Stop()))
        return out
