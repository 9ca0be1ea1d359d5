"""The ``medsam-agent`` command line.

Every user mistake (a missing file, an unknown name, a bad option) ends with
one line on stderr saying what is wrong and what to do, and exit status 2 --
never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit status 2."""


def _cmd_profile(args) -> int:
    from .profile import Profile, ProfileError

    try:
        profile = Profile.load(args.name)
    except ProfileError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps(profile.to_dict(), indent=1, ensure_ascii=False))
        return 0
    w, h = profile.policy_image_size
    print(f"profile      {profile.name}")
    print(f"origin       {profile.origin}")
    how = ("letterbox: LANCZOS thumbnail on white" if profile.policy_resize == "letterbox"
           else "bilinear, aspect not kept")
    print(f"policy image {w}x{h} ({how}); tool image {profile.tool_image_size}")
    print(f"overlay      RGB {tuple(profile.overlay_color)} alpha {profile.overlay_alpha}, mask resized "
          f"{profile.overlay_resize}, on > {profile.overlay_threshold}")
    print(f"grid rule    {profile.grid_rule}; parser {profile.parser}; invalid replies asked again "
          f"{profile.invalid_reply_retries}x per turn ({profile.retry_context}); tool defaults "
          f"{profile.tool_defaults or 'none'}")
    print(f"grid         0..{profile.grid_max}; at most {profile.max_turns} turns; "
          f"{profile.max_new_tokens} new tokens per turn, greedy")
    print(f"tools        {', '.join(t['function']['name'] for t in profile.tools)}")
    if args.system_prompt:
        print("\n" + profile.system_prompt)
    return 0


def user_errors() -> tuple:
    """Exception types that mean 'the user asked for something that cannot work' (exit 2, one line)."""
    from .builders import ChoiceError
    from .image_io import InputError
    from .models import ModelError
    from .observation import ImageError
    from .policies import PolicyError
    from .profile import ProfileError
    from .tools import ToolError

    return (UserError, ChoiceError, InputError, ModelError, ImageError, PolicyError, ProfileError, ToolError)


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("policy and tool")
    g.add_argument("--policy", default=None,
                   help="qwen (default), openai (a vLLM/SGLang server), expert (reads the reference mask: "
                        "segment's --reference, eval's manifest, or a worker session opened with one) or replay "
                        "(segment's --box/--click/--prompts need none: the tool follows a person's prompts)")
    g.add_argument("--model", default=None,
                   help="qwen policy: catalogue name (default medsam-agent-8b), local folder or hub id; "
                        "openai policy: the model name the server serves")
    g.add_argument("--policy-url", default=None,
                   help="openai policy: the server's API root, e.g. http://gpu-server:8000/v1 "
                        "(API key, if any, in MEDSAM_AGENT_POLICY_API_KEY)")
    g.add_argument("--quantization", choices=["4bit", "8bit"], default=None, help="load the qwen policy in 4/8 bit (CUDA)")
    g.add_argument("--replay", default=None, help="replay policy: a trajectory JSON file")
    g.add_argument("--tool", default=None,
                   help="sam2 (SAM2.1 / MedSAM2 weights from the model cache), medsam-lite (LiteMedSAM, its trained "
                        "weights bundled: nothing to download) or classical (no model). Default: sam2 when MedSAM2 "
                        "is downloaded (or --download), else medsam-lite, else classical")
    g.add_argument("--checkpoint", default=None,
                   help="sam2 weights: catalogue name (default medsam2), a .pt file, or 'none' for random weights")
    g.add_argument("--tool-config", default=None, help="SAM2.1 config: tiny, small, base_plus, large or a config name")
    g.add_argument("--prompt-mode", choices=["released", "cumulative"], default=None,
                   help="sam2: newest prompt + previous logits (released, default) or all prompts so far")
    g.add_argument("--multimask", action=argparse.BooleanOptionalAction, default=None,
                   help="sam2: decode three masks and keep the best (default: the profile's; the eval profile: on)")
    g.add_argument("--tool-precision", choices=["bf16", "float32"], default=None,
                   help="sam2 on CUDA: bf16 autocast (faster) or float32 (the authors' evaluation; default: the "
                        "profile's, float32 for medsam-agent-v1-eval, bf16 otherwise)")
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N, for policy and tool")
    g.add_argument("--max-turns", type=int, default=None, help="turns per slice (default: the profile's 5)")
    g.add_argument("--batch-size", type=int, default=8, help="slices per policy batch (default 8)")
    g.add_argument("--profile", default=None,
                   help="conversation profile name or JSON file (default: the catalogue's for the policy's model: "
                        "medsam-agent-v1-eval for medsam-agent-8b, the authors' evaluation path; else "
                        "medsam-agent-v1, their RL path)")
    g.add_argument("--download", action="store_true",
                   help="download the catalogue models this run needs if they are not in the cache yet")


def default_profile_for(policy: str | None, model: str | None) -> str:
    """The profile a run uses when none is named: the catalogue's for a catalogue policy model (a qwen
    policy's default model is medsam-agent-8b), else medsam-agent-v1."""
    from .models import catalogue
    from .profile import DEFAULT_PROFILE

    if (policy or "qwen") in ("qwen", "openai"):
        entry = catalogue().get(model or ("medsam-agent-8b" if (policy or "qwen") == "qwen" else ""))
        if entry is not None and entry.kind == "policy" and entry.profile:
            return entry.profile
    return DEFAULT_PROFILE


def _build_agent(args, on_event=None):
    from .agent import Agent
    from .builders import build_policy
    from .profile import Profile

    if args.max_turns is not None and args.max_turns < 1:
        raise UserError("--max-turns must be at least 1.")
    check_device(args.device)
    check_options_apply(args, UserError)
    profile = Profile.load(args.profile)
    if args.download:
        _download_missing(args)
    policy = build_policy(args.policy, model=args.model, device=args.device, quantization=args.quantization,
                          batch_size=args.batch_size, profile=profile, replay=args.replay,
                          policy_url=args.policy_url)
    return Agent(policy, _tool_for(args, profile), profile, max_turns=args.max_turns, on_event=on_event)


def tool_settings(args, profile) -> dict:
    """SAM2's multimask and precision: the options given, else the profile's ``tool_defaults``."""
    defaults = profile.tool_defaults
    multimask = getattr(args, "multimask", None)
    precision = getattr(args, "tool_precision", None)
    return {"multimask": bool(defaults.get("multimask", False)) if multimask is None else multimask,
            "precision": precision or defaults.get("precision", "bf16")}


def _tool_for(args, profile=None):
    """The tool the run's options name (checked and downloaded already)."""
    from .builders import build_tool
    from .profile import Profile

    settings = tool_settings(args, profile or Profile.load(args.profile))
    return build_tool(args.tool, checkpoint=args.checkpoint, config=args.tool_config, device=args.device,
                      prompt_mode=args.prompt_mode or "released", **settings)


def check_options_apply(args, error=None) -> None:
    """An option the run's policy and tool do not read is refused (:mod:`.engine_options`); a tool not
    named is chosen first (:func:`~.builders.default_tool`)."""
    from .builders import default_tool
    from .engine_options import check_options_apply as check

    person = bool(getattr(args, "box", None) or getattr(args, "click", None) or getattr(args, "prompts", None))
    if person and args.policy not in (None, "person"):
        raise (error or UserError)(f"--box, --click and --prompts are a person's own prompts, which the tool follows "
                                   f"without a policy; leave --policy {args.policy} out, or the prompts.")
    if getattr(args, "policy", "") is None:
        args.policy = "person" if person else "qwen"
    if getattr(args, "tool", "") is None:
        sam2_named = any(getattr(args, o, None) not in (None, False) for o in ("checkpoint", "tool_config",
                                                                               "prompt_mode", "multimask",
                                                                               "tool_precision"))
        args.tool = "sam2" if sam2_named else default_tool(download=getattr(args, "download", False))
    check(args, error or UserError)


def check_device(device: str) -> None:
    import re

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(device).strip().lower()):
        raise UserError(f"--device '{device}' is not auto, cpu, cuda or cuda:N.")


def _download_with_bar(name: str, quiet: bool):
    """Download a catalogue model with one byte progress bar per file."""
    from tqdm import tqdm

    from . import models

    return models.download(name, lambda f, total: tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                                       desc=f, disable=quiet))


def _catalogue_models(args) -> tuple[str | None, str | None]:
    """(policy, tool): the catalogue names this run loads from the model cache (None: not one)."""
    from . import models

    policy = (args.model or "medsam-agent-8b") if args.policy.strip().lower() == "qwen" else None
    tool = (args.checkpoint or "medsam2") if args.tool.strip().lower() in ("sam2", "medsam2") else None
    return tuple(n if n in models.catalogue() else None for n in (policy, tool))


def _require_downloaded(args) -> None:
    """ModelError (how to get it) for a catalogue model this run names that is not in the cache."""
    from . import models

    for name in _catalogue_models(args):
        if name:
            models.local_path(name)


def _download_missing(args) -> None:
    """--download: fetch the catalogue models this run needs (after checking the policy fits this machine)."""
    from . import models
    from .builders import check_policy_fits

    policy, tool = _catalogue_models(args)
    if policy:
        check_policy_fits(policy, int(models.get_entry(policy).size_gb * 1024 ** 3), args.device, args.quantization)
    for name in (policy, tool):
        if name and not models.is_complete(name):
            entry = models.get_entry(name)
            print(f"Downloading {name} ({entry.size_gb:g} GB, licence: {entry.license}) into {models.model_dir(name)}",
                  file=sys.stderr)
            _download_with_bar(name, getattr(args, "quiet", False))


def _parse_window(text: str | None):
    """--window as the engine takes it (a preset name, "percentile" or (level, width)), checked now,
    before any model loads or progress shows."""
    import numpy as np

    from .observation import ImageError, choose_window

    if text is None:
        return None
    window = text
    if "," in text:
        try:
            level, width = (float(v) for v in text.split(","))
        except ValueError:
            raise UserError(f"--window '{text}' is not LEVEL,WIDTH (numbers), a preset name or percentile.") from None
        window = (level, width)
    try:
        choose_window(np.zeros((2, 2), np.float32), None, window)
    except ImageError as exc:
        raise UserError(str(exc).replace("Unknown window", "Unknown --window")) from None
    return window


def _cmd_segment(args) -> int:
    import json as _json

    import numpy as np

    from tqdm import tqdm

    from .image_io import check_mask_format, load_image, load_mask
    from .outputs import check_distinct_outputs, check_output_file, check_output_folder, make_folder, partial_path
    from .segment import SegmentOptions, segment

    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1.")
    check_options_apply(args)
    if not args.target.strip():
        raise UserError("--target is empty; say what to segment (e.g. --target liver).")
    window = _parse_window(args.window)
    if args.key_slice is not None and str(args.slices).strip().lower() != "auto":
        raise UserError(f"--key-slice is where --slices auto starts; with --slices {args.slices} it would be ignored. "
                        f"Add --slices auto, or leave --key-slice out.")
    loaded = load_image(args.input, series=args.series)
    if loaded.dim == 2 and (args.axis != "axial" or str(args.slices).strip().lower() != "all"):
        raise UserError(f"--axis and --slices choose slices of a volume, and {Path(args.input).name} is a 2D image; "
                        f"leave them out.")
    reference = None
    if args.reference:
        reference = load_mask(args.reference, args.label or None, like=loaded, one_target=True)
        if loaded.dim == 2 and reference.ndim == 3:
            reference = reference[..., 0]
    person_prompts = _person_prompts(args, loaded) if args.policy == "person" else None
    if args.policy.strip().lower() == "expert" and reference is None:
        raise UserError("The expert policy reads the reference mask: give --reference MASK (and --label V for label maps).")
    options = SegmentOptions(axis=args.axis, slices=args.slices, key_slice=args.key_slice, batch_size=args.batch_size,
                             modality=args.modality, window=window)
    if loaded.dim == 3:  # check the slice choice before loading any model
        from .volume import OrientedVolume, SlicePlanner

        try:
            SlicePlanner(OrientedVolume(loaded.image).num_slices(args.axis), args.slices, args.key_slice)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    out = Path(args.output)
    if loaded.dim == 3 and out.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
        raise UserError(f"A volume's mask cannot be written as {out.suffix}; use .nii.gz, .nrrd or .mha.")
    # every destination checked before the run (its slow part must not end on a bad path), and none may
    # be a file this run reads
    profile_file = args.profile if args.profile and Path(args.profile).expanduser().is_file() else None
    inputs = {"input": args.input, "--reference": args.reference, "--replay": args.replay, "--profile": profile_file}
    check_output_file(out, "The mask", inputs)
    check_mask_format(out)
    if args.trajectory:
        check_output_file(args.trajectory, "The trajectory file", {**inputs, "-o": out})
    if args.overlays:
        check_output_folder(args.overlays, "--overlays")
    check_distinct_outputs({"-o": out, "--trajectory": args.trajectory, "--overlays": args.overlays},
                           partial={"-o": partial_path(out), "--trajectory": args.trajectory and partial_path(args.trajectory)})
    for folder, what in ((out.parent, "the mask"), (args.trajectory and Path(args.trajectory).expanduser().parent,
                                                    "the trajectory file"), (args.overlays, "the overlays")):
        if folder:
            make_folder(Path(folder).expanduser(), what)  # made now: at the end, a folder that vanished is said
    agent = _build_agent(args) if person_prompts is None else None
    tool = agent.tool if agent is not None else _build_tool(args)
    profile_name = agent.profile.name if agent is not None else "-"
    bar = tqdm(total=1, unit="slice", desc=f"Segmenting {args.target}", disable=args.quiet, dynamic_ncols=True)

    def progress(done, total, turns):
        bar.total = total
        bar.n = done
        bar.set_postfix_str(f"{turns} turns")
        bar.refresh()

    try:
        if person_prompts is not None:
            from .prompted import segment_from_prompts

            result = segment_from_prompts(loaded, args.target, tool, person_prompts, options, reference, progress,
                                          keep_images=bool(args.overlays))
        else:
            result = segment(loaded, args.target, agent, options, reference, progress, keep_images=bool(args.overlays))
    except (KeyboardInterrupt, Exception) as exc:
        bar.close()
        kept = _save_partial(getattr(exc, "partial", None), loaded, args, profile_name)
        if isinstance(exc, KeyboardInterrupt):
            print(f"medsam-agent: interrupted{kept}", file=sys.stderr)
            return 130
        if kept:
            print(f"medsam-agent: the run stopped{kept}", file=sys.stderr)
        if isinstance(exc, ValueError):
            raise UserError(str(exc)) from None
        raise
    finally:
        bar.close()
    replayed = _replayed_episodes(args, agent) if agent is not None else None
    if replayed is not None and not {t.episode_id for t in result.trajectories} & replayed:
        raise UserError(f"The replay file {args.replay} has no action for any slice of this input (its episodes are "
                        f"named like 'axial:12' for a volume, or 'image' for a 2D image); nothing was written.")
    # the mask first (an interrupt waits for it), then the extras: one that fails never costs the mask
    written = _write_outputs(result, loaded, args, profile_name, out, args.trajectory)
    if isinstance(written, int):
        return written
    turns = sum(len(t.steps) for t in result.trajectories)
    failures = [t for t in result.trajectories if t.failure]
    summary = {"output": str(out), "voxels": int(result.mask.sum()), "slices_run": max(1, len(result.slices)),
               "turns": turns, "seconds": round(result.seconds, 2)}
    if reference is not None:
        from .metrics import dice

        summary["dice"] = round(dice(result.mask, reference), 4)  # the whole image or volume
        from .volume import OrientedVolume

        vol = OrientedVolume(loaded.image) if loaded.dim == 3 else None
        if vol is not None and len(result.slices) < vol.num_slices(args.axis):  # also within the slices run
            run = vol.empty_mask()
            for i in result.slices:
                vol.put_slice(run, args.axis, i, np.ones(vol.slice(args.axis, i).shape, bool))
            run = vol.to_original(run)
            summary["dice_in_slices_run"] = round(dice(result.mask[run], reference[run]), 4)
    if failures:
        summary["failed_slices"] = len(failures)
        summary["first_failure"] = failures[0].failure
    if not summary["voxels"]:
        print(f"medsam-agent: note: the mask is empty: no {args.target} was found in "
              f"{'the image' if loaded.dim == 2 else 'any slice run'}. {_empty_mask_advice(args, loaded)}",
              file=sys.stderr)
    if not args.quiet:
        print(f"Wrote {out}: {summary['voxels']} {'voxels' if loaded.dim == 3 else 'pixels'} in the mask, {summary['slices_run']} slice(s), "
              f"{turns} turns, {summary['seconds']} s" + (f", Dice {summary['dice']}" if "dice" in summary else "")
              + (f" over the whole volume, {summary['dice_in_slices_run']} within the slices run"
                 if "dice_in_slices_run" in summary else ""))
        if failures:
            print(f"  {len(failures)} slice(s) ended on a policy or tool failure, e.g.: {failures[0].failure}")
    print(_json.dumps(summary))
    return 0


def _build_tool(args):
    """The run's tool alone (a person's prompts need no policy)."""
    check_device(args.device)
    if args.download:
        _download_missing(args)
    return _tool_for(args)


def _person_prompts(args, loaded) -> dict:
    """{episode id: prompts} from --prompts, or from --box/--click on the image or on the slice --slices N."""
    from .prompted import read_prompts_file

    if args.prompts and (args.box or args.click):
        raise UserError("Give the prompts either as --box/--click (one image or slice) or in a --prompts file, "
                        "not both.")
    if args.prompts:
        prompts = read_prompts_file(args.prompts)
        if loaded.dim == 3 and str(args.slices).strip().lower() != "all":
            raise UserError("With a --prompts file the slices are those it names; leave --slices out.")
        return prompts
    given = ([args.box] if args.box else []) + list(args.click)
    if loaded.dim == 2:
        return {"image": given}
    if not str(args.slices).strip().isdigit():
        raise UserError("--box and --click place prompts on one slice of a volume: say which with --slices N (or "
                        "give a --prompts file for several slices).")
    return {f"{args.axis}:{int(args.slices)}": given}


def _replayed_episodes(args, agent) -> set | None:
    """The episode ids a replay file holds actions for (None: not a replay policy by episode)."""
    actions = getattr(agent.policy, "actions", None) if args.policy.strip().lower() == "replay" else None
    return set(actions) if isinstance(actions, dict) else None


def _empty_mask_advice(args, loaded) -> str:
    """What to try when a run's mask came out empty everywhere, for the options it ran with."""
    tips = []
    if loaded.dim == 3 and str(args.slices).strip().lower() == "auto":
        tips.append("--key-slice N at a slice where the target shows (auto grows from there)")
    elif loaded.dim == 3:
        tips.append("--slices A:B over the slices where the target shows")
    if args.window is None and args.modality is None:
        tips.append("--modality or --window (the intensity window may hide it)")
    tips.append(f"other words for --target (e.g. an anatomical name instead of '{args.target}')")
    return "Try " + "; ".join(tips) + "."


def _write_outputs(result, loaded, args, profile_name: str, mask_path: Path, trajectory_path, meta: dict | None = None):
    """Writes a run's mask, then its trajectory, then its overlays.  The mask is written whole
    first, with Ctrl-C held back until it is; an extra that fails or is interrupted afterwards
    keeps the mask (and the overlays already written) and says so.  Returns the paths written, or
    the exit status after saying what went wrong (2: an extra could not be written, 130: Ctrl-C)."""
    from .durable import interrupts_deferred
    from .image_io import save_mask
    from .overlays import write_turn_pngs
    from .trajectory import save_trajectories

    with interrupts_deferred():
        save_mask(result.mask, loaded, mask_path, make_folder=False)
    written, overlays = [str(mask_path)], 0
    try:
        if trajectory_path:
            save_trajectories(result.trajectories, trajectory_path, meta={
                "input": str(args.input), "target": args.target, "axis": args.axis if loaded.dim == 3 else None,
                "slices": result.slices, "policy": args.policy, "tool": args.tool, "profile": profile_name,
                **(meta or {})})
            written.append(str(trajectory_path))
        if args.overlays:
            for traj, rgb in zip(result.trajectories, result.images):
                overlays += len(write_turn_pngs(traj, rgb, args.overlays))
    except (KeyboardInterrupt, *user_errors()) as exc:
        kept = " and ".join(written) + (f", and {overlays} overlay picture(s) in {args.overlays}" if overlays else "")
        if isinstance(exc, KeyboardInterrupt):
            print(f"medsam-agent: interrupted while writing the extras; kept: {kept}.", file=sys.stderr)
            return 130
        print(f"medsam-agent: error: {exc} Kept: {kept}.", file=sys.stderr)
        return 2
    return written


def _save_partial(partial, loaded, args, profile_name: str) -> str:
    """Writes the slices a stopped run finished (``segment``'s ``exc.partial``) next to the
    requested files, named ``*.partial.*`` (their overlays too, with --overlays); returns the clause
    that tells the person where."""
    from .outputs import partial_path

    if partial is None or not partial.trajectories:
        return ""
    mask = partial_path(args.output)
    trajectory = partial_path(args.trajectory) if args.trajectory else None
    try:
        written = _write_outputs(partial, loaded, args, profile_name, mask, trajectory, meta={"partial": True})
    except KeyboardInterrupt:
        return f"; the {len(partial.slices)} finished slice(s) could not be saved (interrupted again)"
    except user_errors() as exc:  # the reason the run stopped matters more
        return f"; the {len(partial.slices)} finished slice(s) could not be saved ({exc})"
    if isinstance(written, int):
        return f"; of the {len(partial.slices)} finished slice(s), only {mask} is saved"
    where = " and ".join(written) + (f", their overlays in {args.overlays}" if args.overlays else "")
    return (f" after {len(partial.slices)} finished slice(s); those are saved in {where} (the other slices are "
            f"empty there)")


def _cmd_eval(args) -> int:
    from tqdm import tqdm

    from .evaluate import Evaluation, Method, baseline_methods, check_eval_folder
    from .manifest import load_manifest
    from .outputs import check_output_folder
    from .report import write_results

    check_options_apply(args)
    cases = load_manifest(args.manifest)
    out = check_output_folder(args.out, "The evaluation")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1.")
    if args.max_slices_per_target is not None and args.max_slices_per_target < 1:
        raise UserError("--max-slices-per-target must be at least 1.")
    # what decides the records: a resumed run must be the same run, or its results would mix two
    import hashlib

    from .profile import Profile

    if args.max_turns is not None and args.max_turns < 1:
        raise UserError("--max-turns must be at least 1.")
    default_turns = Profile.load(args.profile).max_turns
    turns = args.max_turns or default_turns  # what the agent will take, recorded as such
    manifest = Path(args.manifest).expanduser().resolve()
    settings = {"manifest": str(manifest), "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
                "policy": args.policy,
                "model": args.model, "tool": args.tool, "checkpoint": args.checkpoint, "tool_config": args.tool_config,
                "prompt_mode": args.prompt_mode, "multimask": args.multimask, "max_turns": turns,
                "axis": args.axis, "max_slices_per_target": args.max_slices_per_target, "volume": args.volume,
                "profile": args.profile, "baselines": args.baselines}
    check_eval_folder(out, settings, args.resume, defaults={"max_turns": default_turns})
    agent = _build_agent(args)
    main_name = f"{args.policy}+{args.tool}"
    methods = [Method("agent", agent.policy, agent.max_turns, f"{main_name} (up to {agent.max_turns} turns)")]
    if args.baselines:
        methods += baseline_methods(agent.max_turns, include_expert=args.policy.strip().lower() != "expert")
    bar = tqdm(total=1, unit="item", desc="Evaluating", disable=args.quiet, dynamic_ncols=True)

    def progress(done, total):
        bar.total, bar.n = total, done
        bar.refresh()

    run = Evaluation(cases, agent.tool, methods, out, axis=args.axis, max_slices=args.max_slices_per_target,
                     batch_size=args.batch_size, resume=args.resume, profile=agent.profile, progress=progress)
    try:
        run.run_slices()
        if args.volume:
            bar.set_description("Whole volumes")
            run.run_volumes()
    finally:
        bar.close()
        shown = {**settings, "max_turns": agent.max_turns, "profile": agent.profile.name}
        summary = write_results(out, str(args.manifest), run.results(), {m.name: m.label for m in methods}, shown)
    replayed = _replayed_episodes(args, agent)
    if replayed is not None and not any(m == "agent" and key in replayed for key, m in run.planned):
        raise UserError(f"The replay file {args.replay} has no action for any item of this evaluation (eval names them "
                        f"'CASE/TARGET' for an image and 'CASE/TARGET/axial:12' for a volume's slice), so the report "
                        f"in {out} scores empty masks only.")
    if not args.quiet:
        rows = [(m.label, summary["overall"][m.name], "items") for m in methods]
        rows += [(f"{m.label}, whole volumes", summary["volume"][m.name], "volumes")
                 for m in (methods if "volume" in summary else [])]  # --volume: the 3D scores too
        width = max(len(label) for label, _, _ in rows)
        for label, s, what in rows:
            dice = "-" if s["dice"] is None else f"{s['dice']:.3f}"
            print(f"{label:{width}}  Dice {dice}  ({s['n']} {what}, {s['failed']} failed)")
        print(f"Report: {out / 'report.md'}")
    print(json.dumps({m: v["dice"] for m, v in summary["overall"].items()}))
    overall = summary["overall"].get("agent", {})
    if not overall.get("n") and overall.get("failed"):
        print(f"medsam-agent: every item failed; see the reasons in {out / 'report.md'}.", file=sys.stderr)
        return 1
    return 0


def openapi_schema() -> dict:
    """The worker's OpenAPI document (no models loaded)."""
    from .worker.app import create_app
    from .worker.service import Worker, WorkerConfig

    worker = Worker(WorkerConfig(token="-"))
    try:
        return create_app(worker).openapi()
    finally:
        worker.close()


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cmd_serve(args) -> int:
    import os
    import secrets
    import tempfile

    from .builders import build_policy, build_tool
    from .policies import POLICY_NAMES
    from .profile import Profile
    from .worker.app import WorkerServer, create_app, exit_with_parent
    from .worker.protocol import PROTOCOL_VERSION, TOKEN_ENV
    from .worker.service import Worker, WorkerConfig

    if args.openapi:
        print(json.dumps(openapi_schema(), indent=1, sort_keys=True))
        return 0
    loopback = _is_loopback(args.host)
    token = (os.environ.get(TOKEN_ENV) or "").strip() or None  # set but empty: as if not set (one is made)
    if not loopback:
        import socket

        try:
            socket.getaddrinfo(args.host, None)
        except (OSError, UnicodeError):
            raise UserError(f"--host {args.host} is not an address or a name this machine knows; give one of its "
                            f"addresses (0.0.0.0 for all), or leave --host out for 127.0.0.1.") from None
        if not args.allow_remote:
            raise UserError(f"Binding {args.host} opens the worker to the network; add --allow-remote to mean it "
                            f"(and put it behind a firewall or VPN).")
        if not token:
            raise UserError(f"A worker open to the network needs a token you choose: set {TOKEN_ENV}.")
        if len(token) < 16:
            raise UserError(f"The token in {TOKEN_ENV} is {len(token)} characters; a worker open to the network "
                            f"needs at least 16 (e.g. python -c \"import secrets; print(secrets.token_urlsafe(32))\").")
    show_token = token is None
    token = token or secrets.token_urlsafe(32)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port number (0-65535; 0 picks a free one).")
    for value, option in ((args.max_upload_mb, "--max-upload-mb"), (args.session_idle_min, "--session-idle-min"),
                          (args.batch_size, "--batch-size")):
        if value <= 0:
            raise UserError(f"{option} must be more than 0.")
    if args.max_turns is not None and args.max_turns < 1:
        raise UserError("--max-turns must be at least 1.")
    if args.keep_slices is not None and args.keep_slices < 1:
        raise UserError("--keep-slices must be at least 1.")
    # names are checked now: the models load after the worker listens, where a typo would only show in status
    check_options_apply(args)  # a tool not named is chosen here
    if args.policy.strip().lower() not in POLICY_NAMES:
        raise UserError(f"Unknown policy '{args.policy}'. Choose one of: {', '.join(POLICY_NAMES)}.")
    if args.tool.strip().lower() not in ("sam2", "medsam2", "medsam-lite", "classical"):
        raise UserError(f"Unknown tool '{args.tool}'. Choose one of: sam2, medsam-lite, classical.")
    check_options_apply(args)
    if args.policy.strip().lower() == "replay":  # its file read now: a bad one is said here, not in the status
        build_policy("replay", replay=args.replay)
    profile = Profile.load(args.profile)
    if args.download:  # before listening: a client waits for "ready" only once the worker listens
        _download_missing(args)
    _require_downloaded(args)  # a missing model said now, not as a load error in the status
    allowed = [Path(d).expanduser() for d in args.allow_dir] or [Path(tempfile.gettempdir())]
    for d in allowed:
        if not d.is_dir():
            raise UserError(f"--allow-dir {d} is not a folder.")
    config = WorkerConfig(token=token, allowed_dirs=allowed, max_upload_bytes=int(args.max_upload_mb * 2 ** 20),
                          session_idle_s=args.session_idle_min * 60, batch_size=args.batch_size,
                          max_turns=args.max_turns)
    worker = Worker(config)
    try:
        server = WorkerServer(create_app(worker), args.host, args.port)
    except OSError as exc:
        worker.close()
        raise UserError(f"Cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); choose another --port "
                        f"(0 picks a free one) or --host.") from None
    worker.on_shutdown = lambda: setattr(server.server, "should_exit", True)

    def say(message: dict) -> None:
        print(json.dumps(message), flush=True)

    if args.parent_pid is not None:
        def parent_gone() -> None:
            try:  # its pipes may have gone with it
                print(f"medsam-agent: the program that started this worker (process {args.parent_pid}) has ended; "
                      f"shutting down.", file=sys.stderr, flush=True)
            except (OSError, ValueError):
                pass
            worker.on_shutdown()

        exit_with_parent(args.parent_pid, parent_gone)

    def build(step):
        step("tool")
        tool = build_tool(args.tool, checkpoint=args.checkpoint, config=args.tool_config, device=args.device,
                          prompt_mode=args.prompt_mode, keep_slices=args.keep_slices, **tool_settings(args, profile))
        step("policy")
        policy = build_policy(args.policy, model=args.model, device=args.device, quantization=args.quantization,
                              batch_size=args.batch_size, profile=profile, replay=args.replay,
                              policy_url=args.policy_url)
        return policy, tool, profile

    say({"event": "listening", "url": server.url, "protocol": PROTOCOL_VERSION,
         **({"token": token} if show_token else {})})
    worker.load_async(build, say)
    try:
        server.serve_forever()
    finally:
        worker.close()
    return 0


def _cmd_models(args) -> int:
    from . import models

    if args.action == "list":
        cache = models.cache_dir()
        print(f"Model cache: {cache} (set MEDSAM_AGENT_HOME to move it)")
        print(f"{'name':18} {'kind':6} {'size':>8} {'GPU mem':>8}  {'status':11} licence / description")
        for e in models.catalogue().values():
            status = "downloaded" if models.is_complete(e.name) else "-"
            print(f"{e.name:18} {e.kind:6} {e.size_gb:>6g}GB {e.memory_gb:>6g}GB  {status:11} {e.license}; {e.description}")
        from .tools.medsam_lite import PACKAGE, package_available

        status = "bundled" if package_available() else "not installed"
        print(f"{'medsam-lite':18} {'tool':6} {0.04:>6g}GB {0.3:>6g}GB  {status:11} Apache-2.0; LiteMedSAM (TinyViT, "
              f"256 px), its trained weights inside the {PACKAGE} package: --tool medsam-lite, nothing to download")
        for e in models.catalogue().values():
            if e.kind == "policy" and e.profile_why:
                print(f"{e.name} runs under the profile {e.profile} by default: {e.profile_why}.")
        return 0
    if not args.name:
        raise UserError(f"'models {args.action}' needs a model name (see 'medsam-agent models list').")
    entry = models.get_entry(args.name)
    if args.action == "path":  # not downloaded yet: the error says where its files go
        print(models.local_path(args.name))
        return 0
    print(f"Downloading {entry.name} ({entry.size_gb:g} GB, licence: {entry.license}) from {models.endpoint()}/{entry.repo}")
    path = _download_with_bar(args.name, args.quiet)
    print(path)
    return 0


MODALITIES = ("CT", "MR", "US", "X-ray", "PET", "other")
_MODALITY_NAMES = {"ct": "CT", "mr": "MR", "mri": "MR", "us": "US", "ultrasound": "US", "x-ray": "X-ray",
                   "xray": "X-ray", "xr": "X-ray", "cr": "X-ray", "dx": "X-ray", "radiograph": "X-ray",
                   "pet": "PET", "pt": "PET", "other": "other"}


def _modality(value: str) -> str:
    """--modality's value, any case, common names accepted (MRI -> MR, ultrasound -> US, XR -> X-ray)."""
    name = _MODALITY_NAMES.get(value.strip().lower().replace("_", "-"))
    if name is None:
        raise argparse.ArgumentTypeError(f"unknown modality '{value}'; use one of {', '.join(MODALITIES)}")
    return name


class _Parser(argparse.ArgumentParser):
    """argparse with the command line's one-line errors (its subcommands' parsers are of this class too)."""

    def error(self, message):
        self.exit(2, f"medsam-agent: error: {message} (see '{self.prog} --help').\n")


def build_parser() -> argparse.ArgumentParser:
    from .engine_options import label_values
    from .prompted import parse_box_option, parse_click_option

    parser = _Parser(
        prog="medsam-agent",
        description="MedSAM Agent: a language-model policy drives a promptable segmentation tool, turn by turn.")
    parser.add_argument("--version", action="version", version=f"medsam-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("profile", help="show a conversation profile (the contract a policy runs under)")
    p.add_argument("name", nargs="?", default="medsam-agent-v1", help="profile name or JSON file")
    p.add_argument("--json", action="store_true", help="print the whole profile as JSON")
    p.add_argument("--system-prompt", action="store_true", help="also print the system prompt")
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser("segment", help="segment a target in an image or volume (the main job)",
                       description="Segment TARGET in a 2D image, a 3D volume or a DICOM series folder; the mask is "
                                   "written in the input's exact geometry.")
    p.add_argument("input", help="NIfTI / NRRD / MHA volume, DICOM series folder, or PNG / JPEG / BMP / TIFF image")
    p.add_argument("--target", required=True, help="what to segment, in words (e.g. 'liver')")
    p.add_argument("-o", "--output", required=True, help="mask file: .nii.gz / .nrrd / .mha (3D) or .png (2D)")
    p.add_argument("--axis", type=str.lower, choices=["axial", "coronal", "sagittal"], default="axial", help="slice direction (3D)")
    p.add_argument("--slices", default="all", help="all (default), A:B, N (slice N alone), or auto (grow from --key-slice)")
    p.add_argument("--key-slice", type=int, default=None, help="auto: the slice to start from (default: middle)")
    p.add_argument("--series", default=None, help="DICOM series UID, when the folder holds several")
    p.add_argument("--modality", default=None, type=_modality, metavar="MODALITY",
                   help=f"{', '.join(MODALITIES)}; CT gives CT windowing, the others a percentile window "
                        f"(default: CT when the values look like Hounsfield units)")
    p.add_argument("--window", default=None,
                   help="intensity window: soft_tissue, lung, bone, brain, liver, abdomen, mediastinum, LEVEL,WIDTH or percentile")
    p.add_argument("--reference", default=None, help="reference mask (needed by --policy expert; also reports Dice)")
    p.add_argument("--label", type=label_values, action="extend", default=[], metavar="V[,V...]",
                   help="label value(s) of the target in --reference (repeat, or 1,2,3)")
    g = p.add_argument_group("a person's prompts (no policy: the tool's mask for exactly these)")
    g.add_argument("--box", type=parse_box_option, default=None, metavar="X1,Y1,X2,Y2",
                   help="a box in pixels of the image (of the slice, for a volume: with --slices N)")
    g.add_argument("--click", type=parse_click_option, action="append", default=[], metavar="X,Y[,+|-]",
                   help="a click in pixels, positive (+, the default) or negative (-); repeat for more, in order")
    g.add_argument("--prompts", default=None, metavar="FILE",
                   help='JSON {"image": [...]} or {"axial:12": [...], ...}: each slice\'s boxes and clicks '
                        '({"box": [x1, y1, x2, y2]}, {"point": [x, y], "positive": true})')
    p.add_argument("--trajectory", default=None, help="write every slice's actions, masks and timings as JSON")
    p.add_argument("--overlays", default=None, help="write a PNG of every turn into this folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary: only the last JSON line")
    _add_engine_options(p)
    p.set_defaults(func=_cmd_segment)

    from .labelling.command import add_parser as add_label_parser

    add_label_parser(sub, _add_engine_options)

    p = sub.add_parser("eval", help="evaluate on a manifest of images with reference masks",
                       description="Score the agent (and, with --baselines, single-box, single-point and multi-turn "
                                   "expert references) on every case of an evaluation manifest.")
    p.add_argument("manifest", help="evaluation manifest JSON (see docs/command-line.md)")
    p.add_argument("--out", required=True, help="folder for records.jsonl, results.json, report.md and the plot")
    p.add_argument("--baselines", action="store_true", help="also run the single-turn box/point and expert references")
    p.add_argument("--axis", type=str.lower, choices=["axial", "coronal", "sagittal"], default="axial", help="slice direction for 3D cases")
    p.add_argument("--max-slices-per-target", type=int, default=None, help="3D: at most K slices per target, spread evenly")
    p.add_argument("--volume", action="store_true", help="3D: also segment whole volumes and score them in 3D")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary: only the last JSON line")
    _add_engine_options(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("models", help="list, download or locate model weights",
                       description="The catalogue of known weights and the user-level cache they are kept in.")
    p.add_argument("action", choices=["list", "download", "path"])
    p.add_argument("name", nargs="?", help="catalogue name (see 'models list')")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_models)
    p = sub.add_parser("serve", help="run the agent worker (the service the Slicer module drives)",
                       description="A long-lived worker: loads the policy and tool once, serves sessions, runs, "
                                   "overrides over HTTP on 127.0.0.1 with a random token (printed, or taken from "
                                   "MEDSAM_AGENT_TOKEN).")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one, printed at start)")
    p.add_argument("--allow-remote", action="store_true", help="allow binding an address other than loopback")
    p.add_argument("--allow-dir", action="append", default=[],
                   help="folder whose files clients may open by path (repeatable; default: the temp folder)")
    p.add_argument("--max-upload-mb", type=float, default=1024, help="largest upload accepted (default 1024 MB)")
    p.add_argument("--session-idle-min", type=float, default=30, help="close sessions idle this long (default 30)")
    p.add_argument("--keep-slices", type=int, default=None,
                   help="sam2: prepared slices (image embeddings, about 16 MB each) kept for decoder-only overrides "
                        "(default 16); an edit on a slice prepared longer ago runs the encoder again")
    p.add_argument("--openapi", action="store_true", help="print the protocol's OpenAPI document and exit")
    p.add_argument("--parent-pid", type=int, default=None, metavar="PID",
                   help="shut down when process PID ends (how Slicer ties its worker to itself: a crashed Slicer "
                        "leaves no worker holding the GPU)")
    _add_engine_options(p)
    p.set_defaults(func=_cmd_serve)
    _load_plugins(sub)
    return parser


def _load_plugins(sub) -> None:
    """Commands other packages add (the training package's synthesize, export, ...), by entry point."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="medsam_agent.commands"):
        try:
            register = ep.load()
        except ImportError as exc:  # a broken optional package must not break the engine's commands
            print(f"medsam-agent: note: commands from {ep.value} unavailable ({exc})", file=sys.stderr)
            continue
        register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "profile") and args.profile is None:
        args.profile = default_profile_for(getattr(args, "policy", None), getattr(args, "model", None))
    if not getattr(args, "func", None):  # no command: what there is, and the usual status for a usage error
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except user_errors() as exc:
        print(f"medsam-agent: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the output's reader stopped early (`| head`): nothing is wrong, nothing to say
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the final flush must not fail again
        except (OSError, ValueError):
            pass
        return 0
    except OSError as exc:  # a file or folder the system refused (no space, no permission, a bad place)
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"medsam-agent: error: {exc.strerror or exc}{where}; check the path, its permissions and free "
              f"space.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medsam-agent: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
