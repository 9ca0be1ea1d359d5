"""Recorded actions for the replay policy: the module's self-test and demonstrations run with no model weights.

:func:`write_replay` writes a trajectory file (the format ``--replay`` reads)
in which every listed slice plays the same actions; the worker names its
episodes ``"{axis}:{slice}"``, so slices not listed stop at once.
"""
from __future__ import annotations

from pathlib import Path

from ..actions import Box, ParseFailure, Point, Stop, action_from_dict, format_action
from ..trajectory import Step, Trajectory, save_trajectories

# a box over the middle of the slice, a positive click in its centre, then stop (0-999 grid)
SELF_TEST_ACTIONS = (Box(250, 250, 750, 750), Point(500, 500, True), Stop())


def _parsed(actions) -> list:
    parsed = []
    for a in actions:
        action = action_from_dict(a) if isinstance(a, dict) else a
        if isinstance(action, ParseFailure):
            raise ValueError(f"Not an action: {a} ({action.reason})")
        parsed.append(action)
    return parsed


def write_replay(path: str | Path, axis: str, slices, actions=SELF_TEST_ACTIONS, target: str = "",
                 by_target: dict | None = None) -> Path:
    """A replay trajectory file: ``actions`` (actions or tool-call dicts) on each of ``slices`` along ``axis``
    (one axis, or several), recorded for ``target``; ``by_target`` ({target: actions}) adds other targets' own
    actions on the same slices (a run of several targets plays each one's)."""
    recorded = [(target, _parsed(actions))] + [(t, _parsed(a)) for t, a in (by_target or {}).items()]
    axes = (axis,) if isinstance(axis, str) else tuple(axis)
    trajectories = []
    for name, parsed in recorded:
        for a in axes:
            for i in slices:
                steps = [Step(turn=n, text=format_action(x), action={"name": x.name, "arguments": x.arguments()})
                         for n, x in enumerate(parsed)]
                trajectories.append(Trajectory(episode_id=f"{a}:{int(i)}", target=name, image_size=(1, 1),
                                               steps=steps, stop_reason="stop", policy="replay"))
    save_trajectories(trajectories, path, meta={"written_by": "MedSAMAgent slicer_support.replay"})
    return Path(path)
