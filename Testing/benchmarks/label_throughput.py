"""``medsam-agent label`` throughput: cases and slices per second with 1 and 2 processes, and
where the time goes (reading, the policy, the tool, writing).

The dataset is real dev data (``../shared/data``): the CT volume (liver, spleen) and the MR
spine volume, each listed ``--copies`` times under other ids.  The weight-free path: the expert
policy (reads the reference masks) with ``--tool`` (default medsam-lite, LiteMedSAM with its
bundled weights).  Two processes are two shards (``--shard 0/2``, ``1/2``) run at once, each
with half the cores' threads.  On this 2-core machine, wall times are CPU times: ratios side by
side, not GPU speeds.

Run: ``python Testing/benchmarks/label_throughput.py [--tool classical] [--copies 2]``.  Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"


def manifest(folder: Path, copies: int) -> Path:
    ct, mr = DATA / "ct3d_totalseg_abdomen", DATA / "mr3d_sct_t2_spine"
    cases = []
    for n in range(copies):
        cases.append({"id": f"ct-{n}", "modality": "CT", "image": str(ct / "image.nii.gz"),
                      "targets": {"liver": {"mask": str(ct / "labels.nii.gz"), "values": [5]},
                                  "spleen": {"mask": str(ct / "labels.nii.gz"), "values": [1]}}})
        cases.append({"id": f"mr-{n}", "modality": "MR", "image": str(mr / "image.nii.gz"),
                      "targets": {"spinal cord": {"mask": str(mr / "labels.nii.gz")}}})
    path = folder / "cases.json"
    path.write_text(json.dumps({"cases": cases}), encoding="utf-8")
    return path


def run(cases: Path, out: Path, tool: str, processes: int) -> dict:
    threads = max(1, (os.cpu_count() or 2) // processes)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "MedSAMAgentLib.cli", "label", str(cases), "-o", str(out), "--policy", "expert",
           "--tool", tool, "-q"]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd + ["--shard", f"{i}/{processes}"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for i in range(processes)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"label failed ({p.returncode}): {stderr.decode('utf-8', 'replace')[-2000:]}")
        results.append(json.loads(stdout.decode("utf-8", "replace").strip().splitlines()[-1]))
    wall = time.perf_counter() - t0
    split = {k: round(sum(r["seconds"][k] for r in results), 3) for k in ("read", "policy", "tool", "write")}
    cases_done, slices = sum(r["labelled"] for r in results), sum(r["slices"] for r in results)
    return {"processes": processes, "threads_each": threads, "cases": cases_done, "slices": slices,
            "seconds": round(wall, 2), "cases_per_s": round(cases_done / wall, 4),
            "slices_per_s": round(slices / wall, 3), "split_seconds": split,
            # the processes' wall time outside the four parts: start, imports, model loading, and a shard
            # that finished first waiting for the other
            "startup_and_idle_seconds": round(wall * processes - sum(split.values()), 2),
            "split_share": {k: round(v / max(1e-9, sum(split.values())), 3) for k, v in split.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", default="medsam-lite", choices=["medsam-lite", "classical"])
    parser.add_argument("--copies", type=int, default=1, help="times each dev volume is listed (default 1)")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"The dev data is not at {DATA}.")
    with tempfile.TemporaryDirectory() as tmp:
        cases = manifest(Path(tmp), args.copies)
        one = run(cases, Path(tmp) / "one", args.tool, 1)
        two = run(cases, Path(tmp) / "two", args.tool, 2)
    for r in (one, two):
        print(f"{r['processes']} process(es): {r['cases']} cases, {r['slices']} slices in {r['seconds']} s "
              f"({r['slices_per_s']} slices/s); time split {r['split_share']}")
    print(json.dumps({"tool": args.tool, "cpu_count": os.cpu_count(), "one_process": one, "two_processes": two,
                      "speedup_two_vs_one": round(one["seconds"] / two["seconds"], 3)}))


if __name__ == "__main__":
    main()
