"""The batched policy protocol: observations in, one decision each out."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, Union, runtime_checkable

import numpy as np

from ..actions import Action, ParseFailure


class PolicyError(RuntimeError):
    """A policy could not be built or run (missing model, no GPU, missing reference)."""


@dataclass
class Observation:
    """What a policy may look at before its action number ``turn`` (0-based).

    ``images``: policy-size RGB ``uint8`` pictures, ``images[0]`` the plain image and
    ``images[t]`` the overlay after action ``t-1`` (so ``len(images) == turn + 1``; from the
    agent a lazily rendered sequence, so a policy that never indexes it never pays for it);
    ``replies``: the assistant texts so far; ``actions``: the parsed actions so far;
    ``masks``: the tool's mask after each box/click action (H x W bool, image
    resolution); ``image``: the full-resolution H x W x 3 RGB image;
    ``reference``: the reference mask, for oracle policies only (None otherwise).
    """

    episode_id: str
    target: str
    turn: int
    images: Sequence = field(default_factory=list)
    replies: list = field(default_factory=list)
    actions: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    image: np.ndarray | None = None
    reference: np.ndarray | None = None

    @property
    def current_mask(self) -> np.ndarray | None:
        return self.masks[-1] if self.masks else None


@dataclass
class Decision:
    """The policy's raw text and what it parsed to (an action or a ParseFailure)."""

    text: str
    action: Union[Action, ParseFailure]


@runtime_checkable
class Policy(Protocol):
    name: str

    def act(self, observations: Sequence[Observation]) -> list[Decision]:
        """One decision per observation, in order."""
