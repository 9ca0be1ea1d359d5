"""Segmenting from a person's own prompts, with no policy: the tool's mask for exactly the boxes and
clicks an annotator placed (as MedSAM's own Slicer plugin works), on one image or on any slices of
a volume.  Used by ``medsam-agent segment --box/--click/--prompts``.

Prompts are pixel index coordinates: of the image for a 2D input, of the slice image in display
orientation (:mod:`.volume`) for a volume, as the worker's override takes them.  A prompts file
is JSON ``{"image": [PROMPT, ...]}`` for a 2D image, or ``{"axial:12": [...], "axial:13": [...]}``
for slices of a volume (the episode ids of a trajectory file), each PROMPT ``{"box": [x1, y1, x2,
y2]}`` or ``{"point": [x, y], "positive": true}``.  Each slice's mask is the tool's for all its
prompts in order (``prompt_mode="cumulative"``); slices without prompts stay empty.
"""
from __future__ import annotations

import math
import time

import numpy as np

from .actions import PixelBox, PixelPoint, action_to_call, box_from_pixels, point_from_pixels
from .errors import InputError
from .image_io import LoadedImage
from .trajectory import Step, Trajectory, prompt_to_dict
from .worker.protocol import MAX_OVERRIDE_PROMPTS  # the same bound as a person's override on the worker



def parse_prompt(item, where: str):
    """One prompt dict -> PixelBox / PixelPoint; InputError naming ``where`` when it is malformed."""
    if not isinstance(item, dict) or ("box" in item) == ("point" in item):
        raise InputError(f'{where} must be {{"box": [x1, y1, x2, y2]}} or {{"point": [x, y], "positive": true}}.')
    values = item.get("box", item.get("point"))
    wanted = 4 if "box" in item else 2
    if not isinstance(values, list) or len(values) != wanted or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise InputError(f"{where}: {'box' if wanted == 4 else 'point'} must be {wanted} pixel numbers.")
    if "box" in item:
        x1, y1, x2, y2 = (float(v) for v in values)
        if x2 <= x1 or y2 <= y1:
            raise InputError(f"{where}: the box [x1, y1, x2, y2] needs x2 > x1 and y2 > y1.")
        return PixelBox(x1, y1, x2, y2)
    positive = item.get("positive", True)
    if not isinstance(positive, bool):
        raise InputError(f"{where}: 'positive' must be true or false.")
    return PixelPoint(float(values[0]), float(values[1]), positive)


def read_prompts_file(path) -> dict:
    """{episode id: [prompt, ...]} from a prompts file (see the module's docstring)."""
    from .json_files import read_json_file

    data = read_json_file(path, "the prompts file")
    if not isinstance(data, dict) or not data:
        raise InputError(f'The prompts file {path} must map "image" (2D) or "axial:N" (slices) to lists of prompts.')
    prompts = {}
    for key, items in data.items():
        if not isinstance(items, list) or not items or len(items) > MAX_OVERRIDE_PROMPTS:
            raise InputError(f"The prompts file {path}: '{key}' must be a list of 1 to {MAX_OVERRIDE_PROMPTS} "
                             f"prompts.")
        prompts[str(key)] = [parse_prompt(item, f"prompt {n} of '{key}' in {path}") for n, item in enumerate(items)]
    return prompts


def parse_box_option(text: str):
    """``--box X1,Y1,X2,Y2`` -> PixelBox (argparse type)."""
    import argparse

    try:
        values = [float(v) for v in text.split(",")]
        return parse_prompt({"box": values}, "--box")
    except (ValueError, InputError) as exc:
        raise argparse.ArgumentTypeError(f"'{text}' is not a box X1,Y1,X2,Y2 in pixels ({exc})") from None


def parse_click_option(text: str):
    """``--click X,Y`` (a positive click) or ``X,Y,-`` (a negative one) -> PixelPoint (argparse type)."""
    import argparse

    parts = [p.strip() for p in text.split(",")]
    sign = parts.pop() if len(parts) == 3 else "+"
    try:
        if sign not in ("+", "-") or len(parts) != 2:
            raise ValueError("give X,Y or X,Y,+ or X,Y,-")
        return parse_prompt({"point": [float(v) for v in parts], "positive": sign == "+"}, "--click")
    except (ValueError, InputError) as exc:
        raise argparse.ArgumentTypeError(f"'{text}' is not a click X,Y[,+|-] in pixels ({exc})") from None


def check_on_image(prompts: list, width: int, height: int, where: str) -> None:
    for p in prompts:
        xs, ys = ((p.x1, p.x2), (p.y1, p.y2)) if isinstance(p, PixelBox) else ((p.x,), (p.y,))
        if min(xs) < -0.5 or max(xs) > width - 0.5 or min(ys) < -0.5 or max(ys) > height - 0.5:
            raise InputError(f"{where}: a prompt lies outside the {width}x{height} picture "
                             f"({prompt_to_dict(p)}).")


def segment_from_prompts(loaded: LoadedImage, target: str, tool, prompts: dict, options, reference=None,
                         progress=None, keep_images: bool = False):
    """The tool's mask for a person's prompts: ``prompts`` {episode id: [PixelBox | PixelPoint]}
    ("image" for 2D, "axis:i" for slices along ``options.axis``).  Returns a
    :class:`~.segment.SegmentResult` whose trajectories hold one step per prompt (the mask after it)."""
    from .metrics import dice, iou
    from .observation import apply_window, choose_window, to_display, to_rgb
    from .segment import SegmentResult, guess_modality
    from .volume import OrientedVolume

    t0 = time.perf_counter()
    if loaded.dim == 2:
        if set(prompts) != {"image"}:
            raise InputError('A 2D image\'s prompts are listed under "image".')
        modality = guess_modality(loaded.array, options.modality) if loaded.array.ndim == 2 else None
        pictures = {"image": (to_display(loaded.array, modality, options.window), reference)}
        vol = out = None
    else:
        vol = OrientedVolume(loaded.image)
        n = vol.num_slices(options.axis)
        window = choose_window(np.asarray(vol.array), guess_modality(vol.array, options.modality), options.window)
        ref_lps = None if reference is None else vol.from_original(reference)
        pictures = {}
        for key in prompts:
            axis, _, index = key.partition(":")
            if axis != options.axis or not index.isdigit() or not 0 <= int(index) < n:
                raise InputError(f"'{key}' is not a slice of this volume along {options.axis} (\"{options.axis}:I\", "
                                 f"I from 0 to {n - 1}); use --axis for another direction.")
            i = int(index)
            pictures[key] = (to_rgb(apply_window(vol.slice(options.axis, i), window)),
                             None if ref_lps is None else vol.slice(options.axis, i, ref_lps))
        out = vol.empty_mask()
    for key, (rgb, _) in pictures.items():
        check_on_image(prompts[key], rgb.shape[1], rgb.shape[0], f"the prompts of {key}")
    keys = tool.prepare([rgb for rgb, _ in pictures.values()])
    trajectories, images, mask2d = [], [], None
    for (key, (rgb, ref)), tool_key in zip(pictures.items(), keys):
        h, w = rgb.shape[:2]
        traj = Trajectory(key, target, (w, h), policy="person", tool=getattr(tool, "name", ""), stop_reason="stop")
        for turn in range(len(prompts[key])):
            started = time.perf_counter()
            result = tool.segment(tool_key, prompts[key][:turn + 1], None, prompt_mode="cumulative")
            p = prompts[key][turn]
            action = (box_from_pixels(p.x1, p.y1, p.x2, p.y2, w, h) if isinstance(p, PixelBox)
                      else point_from_pixels(p.x, p.y, p.positive, w, h))
            traj.steps.append(Step(turn, "", action_to_call(action), prompt_to_dict(p), np.asarray(result.mask, bool),
                                   None if not np.isfinite(result.score) else float(result.score),
                                   None if ref is None else dice(result.mask, ref),
                                   None if ref is None else iou(result.mask, ref), tool_s=time.perf_counter() - started))
        trajectories.append(traj)
        images.append(rgb)
        if vol is not None:
            vol.put_slice(out, options.axis, int(key.partition(":")[2]), traj.final_mask)
        else:
            mask2d = traj.final_mask
        if progress:
            progress(len(trajectories), len(pictures), sum(len(t.steps) for t in trajectories))
    order = sorted(range(len(trajectories)), key=lambda k: int(trajectories[k].episode_id.partition(":")[2] or 0))
    mask = mask2d if vol is None else vol.to_original(out)
    return SegmentResult(mask, [trajectories[k] for k in order],
                         [] if vol is None else [int(trajectories[k].episode_id.partition(":")[2]) for k in order],
                         time.perf_counter() - t0, [images[k] for k in order] if keep_images else [])

