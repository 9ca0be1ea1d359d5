"""The main job: segment a target in a 2D image or a whole volume, slice by slice.

Used by ``medsam-agent segment``, by evaluation's volume mode and by the worker.

* 2D: one episode on the image (windowed per :func:`observation.to_display`).
* 3D: slices along ``axis`` of the LPS-oriented volume (:mod:`volume`), one
  intensity window for the whole volume (a CT preset by default for CT, else
  percentiles), episodes batched ``batch_size`` slices at a time.
  ``slices``: ``all``, ``A:B`` or ``auto`` -- start at ``key_slice`` (default:
  the middle) and grow outwards both ways, stopping in a direction once the
  mask has been empty for two consecutive slices.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .agent import Agent, Episode
from .image_io import LoadedImage
from .observation import apply_window, choose_window, to_display, to_rgb, voxel_sample
from .volume import AXES, OrientedVolume, SlicePlanner



@dataclass
class SegmentOptions:
    axis: str = "axial"
    slices: str = "all"
    key_slice: int | None = None
    batch_size: int = 8
    modality: str | None = None  # "CT" selects CT windowing; None guesses from the values
    window: object = None  # preset name, (level, width), "percentile" or None


@dataclass
class SegmentResult:
    """``mask``: bool, the input's array shape (2D: H x W; 3D: file order [z, y, x]);
    ``trajectories``: one per slice run, in slice order; ``slices``: their indices (3D)."""

    mask: np.ndarray
    trajectories: list = field(default_factory=list)
    slices: list = field(default_factory=list)
    seconds: float = 0.0
    images: list = field(default_factory=list)  # the RGB each trajectory saw (only with keep_images)


def guess_modality(array: np.ndarray, modality: str | None) -> str | None:
    """The given modality, or "CT" when the values look like Hounsfield units (air near -1000)."""
    if modality:
        return modality
    if np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating):
        lo = float(np.min(array))
        if -1100 <= lo <= -900 or (lo <= -900 and np.percentile(voxel_sample(array), 1) <= -900):
            return "CT"
    return None


def segment(loaded: LoadedImage, target: str, agent: Agent, options: SegmentOptions | None = None,
            reference: np.ndarray | None = None, progress: Callable[[int, int, int], None] | None = None,
            keep_images: bool = False) -> SegmentResult:
    """Run the agent on ``loaded`` for ``target``. ``reference`` (input's array shape) is
    passed to the episodes (oracle policies, scores). ``progress(done, total, turns)`` is
    called after every batch; ``keep_images`` keeps each slice's RGB in the result (for pictures).

    A volume's run stopped midway (Ctrl-C, a failure) raises as it would, carrying the slices
    finished before it as ``exc.partial`` (a :class:`SegmentResult`), so nothing finished is lost."""
    options = options or SegmentOptions()
    t0 = time.perf_counter()
    if loaded.dim == 2:
        modality = guess_modality(loaded.array, options.modality) if loaded.array.ndim == 2 else None
        rgb = to_display(loaded.array, modality, options.window)
        traj, = agent.run([Episode("image", rgb, target, reference)])
        if progress:
            progress(1, 1, len(traj.steps))
        return SegmentResult(traj.final_mask, [traj], [], time.perf_counter() - t0, [rgb] if keep_images else [])
    return _segment_volume(loaded, target, agent, options, reference, progress, t0, keep_images)


def _segment_volume(loaded, target, agent, options, reference, progress, t0, keep_images) -> SegmentResult:
    vol = OrientedVolume(loaded.image)
    n = vol.num_slices(options.axis)
    if min(vol.slice(options.axis, 0).shape) < 2:  # e.g. a single sagittal slice cut along the axial axis
        usable = [a for a in AXES if min(vol.slice(a, 0).shape) >= 2]
        raise ValueError(f"Along {options.axis}, this volume's slices are "
                         f"{'x'.join(map(str, vol.slice(options.axis, 0).shape[::-1]))} pixels: nothing to segment. "
                         + (f"Use --axis {' or '.join(usable)}." if usable else "It is too thin in every direction."))
    modality = guess_modality(vol.array, options.modality)
    window = choose_window(np.asarray(vol.array), modality, options.window)
    ref_lps = None if reference is None else vol.from_original(reference)
    out = vol.empty_mask()
    trajectories: dict[int, object] = {}
    images: dict[int, np.ndarray] = {}
    planner = SlicePlanner(n, options.slices, options.key_slice, options.batch_size)

    def run(indices: list[int]) -> dict[int, object]:
        episodes = []
        for i in indices:
            rgb = to_rgb(apply_window(vol.slice(options.axis, i), window))
            ref = None if ref_lps is None else vol.slice(options.axis, i, ref_lps)
            episodes.append(Episode(f"{options.axis}:{i}", rgb, target, ref, {"axis": options.axis, "slice": i}))
            if keep_images:
                images[i] = rgb
        done = dict(zip(indices, agent.run(episodes)))
        for i, traj in done.items():
            vol.put_slice(out, options.axis, i, traj.final_mask)
        trajectories.update(done)
        if progress:
            progress(len(trajectories), planner.total, sum(len(t.steps) for t in trajectories.values()))
        return done

    def finished() -> SegmentResult:
        order = sorted(trajectories)
        return SegmentResult(vol.to_original(out), [trajectories[i] for i in order], order, time.perf_counter() - t0,
                             [images[i] for i in order] if keep_images else [])

    try:
        while True:
            indices = planner.next_batch()
            if indices is None:
                break
            results = run(indices)
            for j in planner.report({i: not t.final_mask.any() for i, t in results.items()}):
                vol.put_slice(out, options.axis, j, np.zeros_like(results[j].final_mask))  # past a stop: not kept
                trajectories.pop(j, None)
    except (KeyboardInterrupt, Exception) as exc:  # stopped midway: the finished slices go with it
        exc.partial = finished()
        raise
    if progress:
        progress(len(trajectories), len(trajectories), sum(len(t.steps) for t in trajectories.values()))
    return finished()
