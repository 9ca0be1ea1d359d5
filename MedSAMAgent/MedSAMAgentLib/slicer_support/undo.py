"""The module's own undo history: one step per agent action or per override.

A step remembers the markups it created and, for each slice it wrote, the
segment's voxels there *before* the first write of the step (extent and a
uint8 ``[k, j, i]`` block, as :meth:`geometry.VolumeGeometry.mask_block`
gives).  Undoing a step removes those markups and writes the blocks back --
nothing else in the scene is touched, so it works whatever the scene's own
undo setting is.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class UndoStep:
    label: str
    axis: str
    slice: int
    owner: object = None  # what the module needs to undo it (its volume context)
    markups: list = field(default_factory=list)  # references to created markups (module-defined tuples)
    masks: dict = field(default_factory=dict)  # (axis, slice) -> (extent, block before)
    prompts: list | None = None  # the slice's prompts before an override (PromptItems), to put back


class UndoStack:
    """Most recent step last; at most ``limit`` steps (the oldest are forgotten).

    Agent events of a batch interleave (actions of several slices, then their
    masks), so a mask write belongs to the newest step *of its slice*, not to
    the newest step overall.
    """

    def __init__(self, limit: int = 100):
        self.limit = limit
        self.steps: list[UndoStep] = []

    def begin(self, label: str, axis: str, index: int, owner=None) -> UndoStep:
        step = UndoStep(label, axis, int(index), owner)
        self.steps.append(step)
        if len(self.steps) > self.limit:
            del self.steps[: len(self.steps) - self.limit]
        return step

    @property
    def current(self) -> UndoStep | None:
        return self.steps[-1] if self.steps else None

    def step_for(self, axis: str, index: int, owner=None) -> UndoStep | None:
        """The newest step of a slice (of ``owner``, when given)."""
        for step in reversed(self.steps):
            if step.axis == axis and step.slice == int(index) and (owner is None or step.owner is owner):
                return step
        return None

    def add_markup(self, ref) -> None:
        if self.current is not None:
            self.current.markups.append(ref)

    def needs_before(self, axis: str, index: int, owner=None) -> bool:
        """True when the slice's newest step has not yet saved the slice's voxels."""
        step = self.step_for(axis, index, owner)
        return step is not None and (axis, int(index)) not in step.masks

    def save_before(self, axis: str, index: int, extent: tuple, block: np.ndarray, owner=None) -> None:
        step = self.step_for(axis, index, owner)
        if step is not None and (axis, int(index)) not in step.masks:
            step.masks[(axis, int(index))] = (tuple(extent), np.array(block, np.uint8, copy=True))

    def pop(self) -> UndoStep | None:
        return self.steps.pop() if self.steps else None

    def label(self) -> str | None:
        return self.current.label if self.current else None

    def forget(self, owner) -> None:
        """Drop the steps of a volume context that went away."""
        self.steps = [s for s in self.steps if s.owner is not owner]

    def clear(self) -> None:
        self.steps.clear()

    def __len__(self) -> int:
        return len(self.steps)
