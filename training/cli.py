"""Training commands for ``medsam-agent`` (registered through the ``medsam_agent.commands`` entry point,
so the engine's command line never imports training)."""
from __future__ import annotations

import json


def _shard(text: str) -> tuple[int, int]:
    from MedSAMAgentLib.image_io import InputError

    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise InputError(f"--shard '{text}' is not i/N (for example 0/4).") from None
    return i, n


def _within(value, low, high, option: str, meaning: str) -> None:
    """One-line refusal of ``option``'s ``value`` outside [low, high] (None: no bound)."""
    from MedSAMAgentLib.image_io import InputError

    if value != value:  # NaN passes every comparison
        raise InputError(f"{option} is not a number: {meaning}.")
    if (low is not None and value < low) or (high is not None and value > high):
        raise InputError(f"{option} {value:g} is out of range: {meaning}.")


def cmd_synthesize(args) -> int:
    import numpy as np
    from tqdm import tqdm

    from MedSAMAgentLib.image_io import InputError
    from MedSAMAgentLib.outputs import check_output_folder

    from .datasets import choose_slices, load_synonyms
    from .synthesis import SynthesisConfig
    from .synthesis_run import synthesize

    if args.workers < 1:
        raise InputError("--workers must be at least 1.")
    if args.max_turns < 2:
        raise InputError("--max-turns must be at least 2 (an action and the final stop).")
    _within(args.box_fraction, 0, 1, "--box-fraction", "a share between 0 and 1")
    _within(args.jitter, 0, 0.5, "--jitter", "a fraction of the box between 0 and 0.5")
    _within(args.tau, 0, 1, "--tau", "an IoU gain between 0 and 1")
    _within(args.iou_target, 0.01, 1, "--iou-target", "an IoU between 0 and 1")
    _within(args.retries, 0, None, "--retries", "0 or more")
    _within(args.min_area, 0, None, "--min-area", "0 or more pixels")
    _within(args.seed, 0, None, "--seed", "0 or more")
    choose_slices(np.arange(3), args.slices)  # says what is wrong with the sampling, before any work
    check_output_folder(args.out, "The synthesis")
    config = SynthesisConfig(box_fraction=args.box_fraction, box_jitter=args.jitter, tau=args.tau,
                             retries=args.retries, iou_target=args.iou_target, max_turns=args.max_turns,
                             negatives=args.negatives, seed=args.seed, axis=args.axis, sampling=args.slices,
                             min_area=args.min_area)
    if args.tool is None:
        from MedSAMAgentLib.tools.medsam_lite import package_available

        args.tool = "medsam-lite" if package_available() else "classical"
    tool_spec = {"name": args.tool}
    if args.tool == "medsam-lite":
        tool_spec["device"] = args.device
    elif args.tool != "classical":
        tool_spec.update({"checkpoint": args.checkpoint, "config": args.tool_config, "device": args.device,
                          "prompt_mode": args.prompt_mode})
    bars, kept = [], [0]  # the bar starts with the first progress: a mistake in the dataset is said alone

    def progress(done, total, stats):
        if not bars:
            bars.append(tqdm(total=total, unit="target", desc="Synthesizing", disable=args.quiet, dynamic_ncols=True))
        bar = bars[0]
        kept[0] += stats.get("kept", 0)
        bar.total, bar.n = total, done
        bar.set_postfix_str(f"{kept[0]} trajectories")
        bar.refresh()

    try:
        summary = synthesize(args.dataset, args.out, tool_spec, config, fmt=args.format,
                             synonyms=load_synonyms(args.synonyms), shard=_shard(args.shard), workers=args.workers,
                             resume=args.resume, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    r = summary.report
    failed = r.get("failed_units") or {}
    if not args.quiet:
        print(f"Kept {r['kept']} trajectories, pruned {r['pruned']}, mean final IoU {r['mean_final_iou']}; "
              f"{r['run']['traj_per_s']} trajectories/s. Records: {summary.merged}")
        if failed:
            unit, why = next(iter(failed.items()))
            print(f"  {len(failed)} target(s) failed (see the report), e.g. {unit}: {why}")
    print(json.dumps({"kept": r["kept"], "pruned": r["pruned"], "mean_final_iou": r["mean_final_iou"],
                      "traj_per_s": r["run"]["traj_per_s"], "failed_units": len(failed), "records": str(summary.merged)}))
    return 0 if r["kept"] or not failed else 1  # nothing made and targets failed: the run did not work


def cmd_export(args) -> int:
    from MedSAMAgentLib.image_io import InputError
    from MedSAMAgentLib.profile import Profile

    from .export import export, iter_records

    from pathlib import Path

    from MedSAMAgentLib.outputs import check_output_folder

    src = Path(args.source)
    if not src.exists() or (src.is_dir() and not any(src.glob("trajectories-*.jsonl"))):
        raise InputError(f"No synthesized records at {src} (a synthesis --out folder or a trajectories-*.jsonl file).")
    check_output_folder(args.out, "The export")
    try:
        result = export(iter_records(src), args.out, args.format, Profile.load(args.profile))
    except (KeyError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{src} does not hold synthesized records (made by 'medsam-agent synthesize'): "
                         f"{type(exc).__name__} {exc}.") from None
    print(json.dumps(result))
    return 0


def cmd_sft(args) -> int:
    from .sft import SFTSettings, train

    settings = SFTSettings.from_yaml(args.config)
    result = train(settings)
    print(json.dumps({"final": result["final"], "resumed_from": result["resumed_from"]}))
    return 0


def cmd_rl(args) -> int:
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from .rl import RLSettings, train

    settings = RLSettings.from_yaml(args.config)
    result = train(settings)
    print(json.dumps({"final": result["final"], "resumed_from": result["resumed_from"]}))
    return 0


def cmd_toyworld_rl(args) -> int:
    import os
    from pathlib import Path

    from MedSAMAgentLib.image_io import InputError

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from .toyworld import run_rl

    for value, option in ((args.steps, "--steps"), (args.images_per_step, "--images-per-step"),
                          (args.train, "--train"), (args.eval_images, "--eval-images")):
        _within(value, 1, None, option, "at least 1")
    _within(args.group_size, 2, None, "--group-size", "at least 2 (GRPO compares episodes of one image)")
    _within(args.lr, 1e-12, 1.0, "--lr", "a learning rate above 0 (and at most 1)")
    _within(args.temperature, 1e-3, 10.0, "--temperature", "a sampling temperature above 0 (default 0.7)")
    _within(args.beta, 0, None, "--beta", "a KL coefficient of 0 or more")
    for seed in args.seeds + (args.ablation_seeds or []):
        _within(seed, 0, None, "--seeds", "each 0 or more")
    if not (Path(args.world) / "summary.json").is_file():
        raise InputError(f"{args.world} is not a finished toy world (it has no summary.json); make one with "
                         f"'medsam-agent toyworld --out {args.world}' first.")

    section = run_rl(args.world, seeds=tuple(args.seeds), steps=args.steps, group_size=args.group_size,
                     images_per_step=args.images_per_step, learning_rate=args.lr, temperature=args.temperature, beta=args.beta,
                     train_images=args.train, eval_images=args.eval_images,
                     ablations=not args.no_ablations, ablation_seeds=args.ablation_seeds, variants=args.variants)
    rows = {"sft": section["policies"]["sft"], **{k: v["test"] for k, v in section["runs"].items()}}
    for name, r in rows.items():
        print(f"{name:22} reward {r['reward']:.3f}  Dice {r['dice']:.3f}  turns {r['turns']:.2f}  "
              f"valid calls {r['valid_call_rate']:.0%}")
    print(json.dumps(section.get("rl_reward_gain", "no full-reward run finished yet")))
    return 0


def cmd_toyworld_report(args) -> int:
    from MedSAMAgentLib.outputs import check_output_folder

    from .toyworld_report import write_report

    check_output_folder(args.out, "The toy world report")
    report = write_report(args.worlds, args.out)
    print(f"Wrote {report['markdown']} ({len(report['rows'])} policies, {len(report['plots'])} plots)")
    return 0


def cmd_toyworld(args) -> int:
    from pathlib import Path

    from MedSAMAgentLib.image_io import InputError
    from MedSAMAgentLib.outputs import check_output_folder

    from .toyworld import run

    for value, option in ((args.train, "--train"), (args.test, "--test"), (args.steps, "--steps"),
                          (args.batch_size, "--batch-size"), (args.hidden, "--hidden"), (args.layers, "--layers")):
        _within(value, 1, None, option, "at least 1")
    _within(args.size, 32, 1024, "--size", "between 32 and 1024 pixels")
    _within(args.lr, 1e-12, 1.0, "--lr", "a learning rate above 0 (and at most 1)")
    _within(args.seed, 0, None, "--seed", "0 or more")
    if args.init_from and not Path(args.init_from).is_dir():
        raise InputError(f"--init-from {args.init_from} is not a model folder (e.g. a level-1 world's sft/final).")
    for value, option in ((args.distractor, "--distractor"), (args.faint_part, "--faint-part")):
        if value is not None:
            _within(value, 0.0, 1.0, option, "a probability between 0 and 1")
    if args.error_size is not None:
        _within(args.error_size, 0.1, 1.0, "--error-size", "a share of the target's radius between 0.1 and 1")
    if args.level != 3 and (args.distractor is not None or args.faint_part is not None or args.error_size is not None):
        raise InputError("--distractor, --faint-part and --error-size shape level 3 only; add --level 3.")
    from .toyworld import RefinementMix, check_tool_installed

    for name in [args.tool, *args.transfer_tool]:
        check_tool_installed(name)
    check_output_folder(args.out, "The toy world")
    defaults = RefinementMix()
    mix = RefinementMix(distractor=defaults.distractor if args.distractor is None else args.distractor,
                        faint_part=defaults.faint_part if args.faint_part is None else args.faint_part,
                        distractor_size=defaults.distractor_size if args.error_size is None else args.error_size,
                        faint_size=defaults.faint_size if args.error_size is None else args.error_size)
    summary = run(args.out, level=args.level, train_count=args.train, test_count=args.test, size=args.size,
                  steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed,
                  init_from=args.init_from, hidden=args.hidden, layers=args.layers, trajectories=args.trajectories,
                  tool=args.tool, transfer_tools=tuple(args.transfer_tool), mix=mix)
    expert = summary["expert"]
    if expert.get("trajectories"):
        print(f"expert       {expert['mean_actions']:.2f} actions per trajectory ({expert['mean_clicks']:.2f} clicks), "
              f"IoU {expert['iou_first']:.3f} after the first, {expert['iou_final']:.3f} at the end")
    for name, r in summary["policies"].items():
        print(f"{name:12} Dice first action {r['dice_first']:.3f}, episode {r['dice_episode']:.3f}, "
              f"reward {r['reward']:.3f}, valid calls {r['valid_call_rate']:.0%}, turns {r['mean_turns']:.2f}, "
              f"clicks {r['clicks_per_episode']:.2f}")
    print(json.dumps({k: v["dice_episode"] for k, v in summary["policies"].items()}))
    return 0


def cmd_synthesis_compare(args) -> int:
    from MedSAMAgentLib.outputs import check_output_folder, make_folder

    from .synthesis_report import compare_runs

    out = make_folder(check_output_folder(args.out, "The comparison"), "the comparison")
    runs = compare_runs(args.runs, out)
    print((out / "compare.md").read_text(encoding="utf-8"))
    print(json.dumps({name: {"mean_actions": r["mean_actions"], "mean_final_iou": r["mean_final_iou"]}
                      for name, r in runs.items()}))
    return 0


def cmd_export_corrections(args) -> int:
    from tqdm import tqdm

    from MedSAMAgentLib.image_io import InputError
    from MedSAMAgentLib.outputs import check_output_folder

    from .corrections import accepted_reviews, export_corrections, review_from_files
    from .synthesis import SynthesisConfig

    single = [args.audit, args.image]
    if any(single) and not all(single + [args.mask]):
        raise InputError("An exported audit trail needs its volume and accepted masks too: --audit FILE --image FILE "
                         "--mask TARGET=FILE (repeat --mask per target).")
    if not args.label_runs and not args.audit:
        raise InputError("Give label run folders (reviewed in the Slicer worklist), or --audit, --image and --mask.")
    masks = {}
    for item in args.mask:
        name, _, path = item.partition("=")
        if not name.strip() or not path.strip():
            raise InputError(f"--mask {item}: write TARGET=FILE (e.g. --mask liver=liver_corrected.nii.gz).")
        masks[name.strip()] = path.strip()
    check_output_folder(args.out, "The corrections")
    reviews = accepted_reviews(args.label_runs)
    if args.audit:
        reviews.append(review_from_files(args.audit, args.image, masks, args.series))
    if args.tool is None:
        from MedSAMAgentLib.tools.medsam_lite import package_available

        args.tool = "medsam-lite" if package_available() else "classical"
    config = SynthesisConfig(axis=args.axis, sampling=args.slices, seed=args.seed)
    bar = tqdm(total=0, unit="target", desc="Re-synthesizing", disable=args.quiet, dynamic_ncols=True)

    def progress(done, total, stats):
        bar.total, bar.n = total, done
        bar.refresh()

    try:
        result = export_corrections(reviews, args.out, {"name": args.tool}, config, progress)
    finally:
        bar.close()
    if not args.quiet:
        print(f"{result['cases']} accepted cases, {result['case_targets']} targets -> {result['records']} expert "
              f"trajectories against the accepted masks; the person's edits: {result['edits'] or 'none'}.\n"
              f"RL items / dataset: {result['manifest']}\nSFT records: {result['records_file']}")
    print(json.dumps(result))
    return 0


def register(sub) -> None:
    """Add the training commands to the ``medsam-agent`` subcommands."""
    p = sub.add_parser("synthesize", help="synthesize expert trajectories from a dataset with masks",
                       description="Make expert-like trajectories (Box-to-Point and Sequential-Click, every kept "
                                   "action raising IoU by at least --tau) from a manifest, an nnU-Net v2 folder or a "
                                   "2D image/mask folder.")
    p.add_argument("dataset", help="manifest .json, nnU-Net v2 folder, or folder with images/ and masks/")
    p.add_argument("--out", required=True, help="output folder (records, report)")
    p.add_argument("--format", default="auto", choices=["auto", "manifest", "nnunet", "folder"])
    p.add_argument("--synonyms", default=None, help="JSON mapping label names to target texts")
    p.add_argument("--tool", default=None, choices=["medsam-lite", "classical", "sam2"],
                   help="the tool the trajectories are made with (default: medsam-lite, LiteMedSAM with its bundled "
                        "weights, when its package is installed, else classical)")
    p.add_argument("--checkpoint", default=None, help="sam2 weights: catalogue name, .pt, or none (random)")
    p.add_argument("--tool-config", default=None)
    p.add_argument("--prompt-mode", default="released", choices=["released", "cumulative"])
    p.add_argument("--device", default="auto")
    p.add_argument("--box-fraction", type=float, default=0.5, help="share of Box-to-Point trajectories (default 0.5)")
    p.add_argument("--jitter", type=float, default=0.1, help="box jitter per side, fraction of the box (default 0.1)")
    p.add_argument("--tau", type=float, default=0.01, help="minimum IoU gain of a kept action (default 0.01)")
    p.add_argument("--retries", type=int, default=3, help="other candidates tried per step (default 3)")
    p.add_argument("--iou-target", type=float, default=0.9, help="stop once IoU reaches this (default 0.9)")
    p.add_argument("--max-turns", type=int, default=5, help="turns including the final stop (default 5)")
    p.add_argument("--negatives", action="store_true", help="add a slice without the target per unit (answer: stop)")
    p.add_argument("--axis", type=str.lower, default="axial", choices=["axial", "coronal", "sagittal"])
    p.add_argument("--slices", default="all", help="all | every:K | count:N of the slices containing the target")
    p.add_argument("--min-area", type=int, default=20, help="skip targets smaller than this many pixels (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard", default="0/1", help="i/N: this machine's share of the dataset (default 0/1)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    p.add_argument("--resume", action="store_true", help="continue in --out, skipping finished targets")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary: only the last JSON line")
    p.set_defaults(func=cmd_synthesize)

    p = sub.add_parser("export-corrections", help="accepted corrections -> expert trajectories and RL items",
                       description="Read the cases accepted in the Slicer worklist of label runs (or one exported "
                                   "audit trail with its volume and masks) and write a manifest of them (RL items), "
                                   "expert trajectories re-synthesized against the accepted masks (SFT records), "
                                   "and what the person changed.")
    p.add_argument("label_runs", nargs="*", help="label --out folders with accepted reviews (review/*.json)")
    p.add_argument("--out", required=True, help="output folder (cases.json, synthesis/, corrections.json)")
    p.add_argument("--audit", default=None, help="an exported audit trail (instead of, or besides, label runs)")
    p.add_argument("--image", default=None, help="with --audit: the volume (file or DICOM folder)")
    p.add_argument("--series", default=None, help="with --audit: the DICOM series UID, if the folder holds several")
    p.add_argument("--mask", action="append", default=[], metavar="TARGET=FILE", help="with --audit: an accepted mask")
    p.add_argument("--tool", default=None, choices=["medsam-lite", "classical"],
                   help="the tool the trajectories are re-synthesized with (default: medsam-lite where installed)")
    p.add_argument("--axis", type=str.lower, default="axial", choices=["axial", "coronal", "sagittal"])
    p.add_argument("--slices", default="all", help="all | every:K | count:N of the slices containing the target")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_export_corrections)

    p = sub.add_parser("synthesis-compare", help="synthesis runs side by side (e.g. one per tool on the same data)",
                       description="A table and a plot of several 'synthesize --out' folders: kept and pruned, "
                                   "strategy and action mix, IoU after each action, gain per action, retries.")
    p.add_argument("runs", nargs="+", help="synthesize --out folders")
    p.add_argument("--out", required=True, help="folder for compare.md, compare.json and compare.png")
    p.set_defaults(func=cmd_synthesis_compare)

    p = sub.add_parser("export", help="export synthesized records for TRL or LlamaFactory",
                       description="Write synthesized trajectories as TRL conversational JSONL or LlamaFactory "
                                   "ShareGPT (with dataset_info.json), images rendered to PNG.")
    p.add_argument("source", help="a synthesize --out folder or a trajectories-*.jsonl file")
    p.add_argument("--format", default="trl", choices=["trl", "sharegpt"])
    p.add_argument("--out", required=True)
    p.add_argument("--profile", default="medsam-agent-v1")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sft", help="supervised fine-tuning of a Qwen3-VL policy on synthesized trajectories",
                       description="Fine-tune per a YAML config (see training/configs/); resumes from the last "
                                   "checkpoint in output_dir; writes output_dir/final, loadable with --model.")
    p.add_argument("config", help="YAML file with SFTSettings fields")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("toyworld", help="prove the pipeline learns: toy images -> synthesis -> SFT -> evaluation",
                       description="Generate toy shapes, synthesize trajectories, train a small Qwen3-VL from scratch "
                                   "on the CPU, and compare it with the untrained model and a centred box on held-out "
                                   "images (DIR/summary.json).")
    p.add_argument("--out", required=True)
    p.add_argument("--level", type=int, choices=[1, 2, 3], default=1)
    p.add_argument("--train", type=int, default=6000, help="training images (default 6000)")
    p.add_argument("--test", type=int, default=100, help="held-out images (default 100)")
    p.add_argument("--size", type=int, default=64, help="image size in pixels (default 64)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", default=None, help="start from this model (e.g. a level-1 result: a curriculum)")
    p.add_argument("--trajectories", choices=["box", "click", "hybrid"], default=None,
                   help="the expert's strategy: Box-to-Point, Sequential-Click or half of each "
                        "(default: hybrid at level 3, box below)")
    p.add_argument("--tool", choices=["classical", "medsam-lite"], default="classical",
                   help="the tool the expert and the evaluation use (default classical)")
    p.add_argument("--transfer-tool", choices=["classical", "medsam-lite"], action="append", default=[],
                   help="also evaluate the trained policy with this tool (cross-tool transfer; repeatable)")
    p.add_argument("--distractor", type=float, default=None,
                   help="level 3: share of targets with a touching distractor of their intensity (default 0.7)")
    p.add_argument("--faint-part", type=float, default=None,
                   help="level 3: share of targets with a faint part (default 0.7)")
    p.add_argument("--error-size", type=float, default=None,
                   help="level 3: radius of the distractor and of the faint part, as a share of the target's "
                        "(default 0.6; 0.8 with --distractor 0.8 --faint-part 0.8 is the 'strong' mix)")
    p.set_defaults(func=cmd_toyworld)

    p = sub.add_parser("rl", help="reinforcement learning (multi-turn GRPO) of a policy with the tool in the loop",
                       description="GRPO per a YAML config (see training/configs/rl_*.yaml): whole episodes with "
                                   "the segmentation tool, reward = format + quality (final mask and path); "
                                   "resumes from the last checkpoint in output_dir; writes output_dir/final.")
    p.add_argument("config", help="YAML file with RLSettings fields")
    p.set_defaults(func=cmd_rl)

    p = sub.add_parser("toyworld-rl", help="RL on a finished toy world, compared with its SFT policy",
                       description="Continue a toy world's SFT policy with GRPO on the CPU (seeds, and ablations "
                                   "without the improvement bonus, the drop penalty or the per-mask cost); adds an 'rl' section "
                                   "to WORLD/summary.json.")
    p.add_argument("world", help="a folder made by 'medsam-agent toyworld'")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--images-per-step", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--beta", type=float, default=0.1, help="KL coefficient to the SFT policy (default 0.1)")
    p.add_argument("--train", type=int, default=2000, help="training images used (default 2000)")
    p.add_argument("--eval-images", type=int, default=1000,
                   help="new held-out images the SFT and RL policies are compared on (default 1000)")
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--ablation-seeds", type=int, nargs="+", default=None,
                   help="seeds of each ablation (each process term off in turn; default: the first of --seeds)")
    p.add_argument("--variants", nargs="+", default=None, choices=["rl", "no_gain_bonus", "no_drop_penalty", "no_turn_cost"],
                   help="only these runs of the plan (rl = the full reward); lets several processes share one "
                        "world, each its own runs, merged into its summary")
    p.set_defaults(func=cmd_toyworld_rl)

    p = sub.add_parser("toyworld-report", help="tables and plots of finished toy worlds (the ablations)",
                       description="Read toy worlds made by 'medsam-agent toyworld' (and 'toyworld-rl') and write "
                                   "report.md, report.json and plots (Dice per turn per policy, action mix, training "
                                   "reward per step per seed) into --out.")
    p.add_argument("worlds", nargs="+", help="folders made by 'medsam-agent toyworld'")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_toyworld_report)
