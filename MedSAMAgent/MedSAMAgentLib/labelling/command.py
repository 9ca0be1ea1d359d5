"""``medsam-agent label``: the command-line glue over :mod:`.run` (options, checks, progress bars)."""
from __future__ import annotations

import json
import re
from pathlib import Path


def add_parser(sub, add_engine_options) -> None:
    p = sub.add_parser("label", help="label a whole dataset: every case and target, resumable, with a QC report",
                       description="Label every case of a dataset (a manifest, an nnU-Net v2 folder, a folder of "
                                   "volumes or a DICOM tree) for each target, writing one mask per case and target "
                                   "in the input's geometry (and a DICOM SEG for DICOM input), then a QC report. "
                                   "Finished cases are kept and skipped when run again.")
    p.add_argument("source", help="manifest .json, nnU-Net v2 folder, folder of .nii.gz/.nrrd/.mha, or DICOM tree")
    p.add_argument("-o", "--out", required=True, help="output folder (cases/<case>/..., report.md, report.json)")
    p.add_argument("--targets", default=None,
                   help="comma-separated target names: a manifest's or nnU-Net label names to keep (default: all "
                        "of them), or what to label in a folder without reference masks (e.g. liver,spleen)")
    p.add_argument("--label-map", action="store_true", help="also write one label map per case (labels.nii.gz + labels.json)")
    p.add_argument("--no-dicom-seg", action="store_true", help="for DICOM input, write NIfTI masks only")
    p.add_argument("--shard", default="0/1", metavar="I/N", help="label the I-th of N parts (SLURM arrays, several GPUs)")
    p.add_argument("--axis", type=str.lower, choices=["axial", "coronal", "sagittal"], default="axial")
    p.add_argument("--slices", default="all", help="all (default), or auto (grow from the middle; stops where the target ends)")
    p.add_argument("--window", default=None, help="intensity window (as for segment); default per modality")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars: only the last JSON line")
    add_engine_options(p)
    p.set_defaults(func=run_command)


def parse_shard(text: str) -> tuple:
    from ..cli import UserError

    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise UserError(f"--shard {text}: write I/N with 0 <= I < N (e.g. --shard 0/4 ... --shard 3/4).")
    return int(m.group(1)), int(m.group(2))


def check_apart(source: Path, out: Path, cases: list) -> None:
    """The output may not lie inside a dataset folder (its masks would be read as images next time),
    nor hold the dataset's own files where the run writes."""
    from ..cli import UserError

    src, dest = source.expanduser().resolve(), out.expanduser().resolve()
    if src.is_dir() and (dest == src or dest.is_relative_to(src)):
        raise UserError(f"--out {out} is inside the dataset folder {source}; its masks would be taken for images "
                        f"the next time. Choose an --out outside it.")
    written = dest / "cases"
    for c in cases:
        for path in [c.image, *[t.mask for t in c.targets if t.mask is not None]]:
            if Path(path).resolve().is_relative_to(written):
                raise UserError(f"The dataset's file {path} lies where label writes ({written}); choose another --out.")


def run_command(args) -> int:
    from tqdm import tqdm

    from ..cli import UserError, _build_agent, _parse_window, check_options_apply
    from ..outputs import check_output_folder
    from .run import LabelSettings, label_dataset
    from .sources import describe, list_cases

    shard = parse_shard(args.shard)
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1.")
    if str(args.slices).strip().lower() not in ("all", "auto"):
        raise UserError(f"--slices {args.slices}: label takes all or auto (a range differs from case to case).")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    cases = list_cases(args.source, targets)
    check_options_apply(args)
    if args.policy.strip().lower() == "expert":
        missing = [f"{c.id}/{t.name}" for c in cases for t in c.targets if t.mask is None]
        if missing:
            raise UserError(f"The expert policy reads reference masks, and {len(missing)} case-targets have none "
                            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); use a model policy, "
                            f"or a manifest with masks.")
    out = check_output_folder(args.out, "--out")
    check_apart(Path(args.source), out, cases)
    settings = LabelSettings(axis=args.axis, slices=args.slices, batch_size=args.batch_size,
                             window=_parse_window(args.window), label_map=args.label_map,
                             dicom_seg=not args.no_dicom_seg, policy=args.policy, tool=args.tool)
    if not args.quiet:
        print(f"Labelling {describe(cases)}; shard {shard[0]}/{shard[1]} -> {out}")
    agent = _build_agent(args)
    cases_bar = tqdm(total=0, unit="case", desc="Cases", disable=args.quiet, dynamic_ncols=True, position=0)
    slices_bar = tqdm(total=0, unit="slice", desc="Slices", disable=args.quiet, dynamic_ncols=True, position=1,
                      leave=False)

    def on_case(done, total, case_id):
        cases_bar.total, cases_bar.n = total, done
        cases_bar.set_postfix_str(case_id)
        cases_bar.refresh()

    def on_slice(done, total):
        slices_bar.total, slices_bar.n = total, done
        slices_bar.refresh()

    try:
        summary = label_dataset(args.source, cases, out, agent, settings, shard, resume=True,
                                case_progress=on_case, slice_progress=on_slice)
    finally:
        slices_bar.close()
        cases_bar.close()
    if not args.quiet:
        print(f"{summary.labelled} labelled, {summary.skipped} finished before, {len(summary.failed)} failed; "
              f"{len(summary.report.get('review', []))} cases worth a look first: {Path(out) / 'report.md'}")
        for case_id, why in summary.failed:
            print(f"  failed: {case_id}: {why}")
    print(json.dumps({"cases": summary.cases, "labelled": summary.labelled, "skipped": summary.skipped,
                      "failed": len(summary.failed), "slices": summary.slices, "seconds": summary.seconds,
                      "review": len(summary.report.get("review", [])), "report": str(Path(out) / "report.md")}))
    return 1 if summary.failed else 0
