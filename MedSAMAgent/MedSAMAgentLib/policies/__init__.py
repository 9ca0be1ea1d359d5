"""Policies behind one batched protocol; ``create_policy`` builds one by name."""
from __future__ import annotations

from .base import Decision, Observation, Policy, PolicyError

POLICY_NAMES = ("qwen", "openai", "expert", "replay")


def create_policy(name: str, **options) -> Policy:
    """Build a policy by name: ``qwen`` (model=...), ``openai`` (url=..., model=...), ``expert`` (ExpertConfig fields) or ``replay`` (actions=...)."""
    key = name.strip().lower()
    if key == "expert":
        from .expert import ExpertPolicy
        return ExpertPolicy(**options)
    if key == "replay":
        from .replay import ReplayPolicy
        if "actions" not in options:
            raise PolicyError("The replay policy plays recorded actions: create_policy('replay', actions=[...]) (one "
                              "sequence for every episode, or a dict by episode id), or "
                              "ReplayPolicy.from_trajectories(load_trajectories(path)).")
        return ReplayPolicy(**options)
    if key == "qwen":
        from .qwen import QwenPolicy
        return QwenPolicy(**options)
    if key == "openai":
        from .openai_server import OpenAIServerPolicy
        return OpenAIServerPolicy(**options)
    raise PolicyError(f"Unknown policy '{name}'. Choose one of: {', '.join(POLICY_NAMES)}.")


__all__ = ["create_policy", "Decision", "Observation", "Policy", "PolicyError", "POLICY_NAMES"]
