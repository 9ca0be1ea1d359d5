"""Synthesis throughput: trajectories per second with 1 and 2 local worker processes, side by side.

Runs ``medsam_training.synthesis_run.synthesize`` on a manifest (default: the
development cases beside the repository, ``../shared/data/cases.json``) with
the classical tool (``--tool sam2 --checkpoint none --device cuda`` measures
SAM2 hiera-tiny with random weights on a GPU instead).  Worker start-up (process
spawn, imports, tool build) is inside the timing.  Last printed line: JSON
``{"traj_per_s_1", "traj_per_s_2", "kept_fraction", "mean_final_iou", ...}``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

DEFAULT_MANIFEST = Path(__file__).resolve().parents[3] / "shared" / "data" / "cases.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", nargs="?", default=str(DEFAULT_MANIFEST))
    parser.add_argument("--tool", default="classical")
    parser.add_argument("--checkpoint", default="none")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", default="1,2", help="worker counts to compare (default 1,2)")
    args = parser.parse_args()

    from medsam_training.synthesis import SynthesisConfig
    from medsam_training.synthesis_run import synthesize

    spec = {"name": args.tool}
    if args.tool != "classical":
        spec.update({"checkpoint": args.checkpoint, "device": args.device})
    result = {}
    reports = {}
    for w in (int(v) for v in args.workers.split(",")):
        with tempfile.TemporaryDirectory() as out:
            summary = synthesize(args.manifest, out, spec, SynthesisConfig(), workers=w)
        reports[w] = summary.report
        result[f"traj_per_s_{w}"] = summary.report["run"]["traj_per_s"]
        print(f"{args.tool}, {w} worker(s): {summary.report['kept']} trajectories in "
              f"{summary.report['run']['seconds']} s = {summary.report['run']['traj_per_s']} trajectories/s")
    first = next(iter(reports.values()))
    result["kept_fraction"] = round(first["kept"] / max(1, first["kept"] + first["pruned"]), 4)
    result["mean_final_iou"] = first["mean_final_iou"]
    result["trajectories"] = first["kept"]
    result["tool"] = args.tool
    result["same_records_across_worker_counts"] = len({r["kept"] for r in reports.values()}) == 1
    print(json.dumps(result))


if __name__ == "__main__":
    main()
