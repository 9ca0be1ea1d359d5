"""The report of a synthesis run: what was kept and pruned and why, and what the trajectories look like."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from MedSAMAgentLib.durable import write_json, write_text
from MedSAMAgentLib.plots import per_turn_plot


def read_records(path: str | Path) -> list[dict]:
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


def _per_turn(rows: list[list[float]]) -> list[float]:
    rows = [r for r in rows if r]
    if not rows:
        return []
    t = max(len(r) for r in rows)
    return [round(float(v), 4) for v in np.array([r + [r[-1]] * (t - len(r)) for r in rows]).mean(axis=0)]


def summarize(records: list[dict], stats: list[dict], run: dict | None = None) -> dict:
    pruned = Counter()
    for s in stats:
        pruned.update(s.get("pruned", {}))
    positive = [r for r in records if r["strategy"] != "negative"]
    gains = [g for r in positive for g in np.diff([0.0] + r["ious"]).tolist()]
    retries = [t for r in positive for t in r["retries"]]
    return {
        "kept": len(records),
        "pruned": sum(pruned.values()),
        "pruned_reasons": dict(pruned),
        "skipped_small_slices": sum(s.get("skipped_small", 0) for s in stats),
        "failed_units": {s["unit"]: s["failed"] for s in stats if s.get("failed")},
        "strategy_mix": dict(Counter(r["strategy"] for r in records)),
        "actions_per_trajectory": {str(k): v for k, v in sorted(Counter(len(r["actions"]) for r in records).items())},
        "mean_actions": round(float(np.mean([len(r["actions"]) for r in records])), 3) if records else None,
        "mean_iou_per_turn": _per_turn([r["ious"] for r in positive]),
        "mean_iou_per_turn_by_strategy": {s: _per_turn([r["ious"] for r in positive if r["strategy"] == s])
                                          for s in sorted({r["strategy"] for r in positive})},
        "mean_final_iou": round(float(np.mean([r["ious"][-1] for r in positive])), 4) if positive else None,
        "mean_iou_gain_per_action": round(float(np.mean(gains)), 4) if gains else None,
        "min_iou_gain": round(float(np.min(gains)), 4) if gains else None,
        "retries_used": int(sum(retries)),
        "retries_per_action": round(float(np.mean(retries)), 3) if retries else None,
        "run": run or {},
    }


def write_report(out: Path, tag: str, merged: Path, stats: list[dict], config, tool_spec: dict, run: dict) -> dict:
    """Write report-<tag>.json, .md and .png into ``out``; return the summary."""
    summary = summarize(read_records(merged), stats, run)
    summary["config"] = config.to_dict()
    summary["tool"] = tool_spec
    write_json(out / f"report-{tag}.json", summary, "the synthesis report")
    plot = _plot(summary, out / f"report-{tag}.png")
    lines = [f"# Trajectory synthesis, shard {tag}", "",
             f"Tool: {tool_spec}. Kept **{summary['kept']}** trajectories, pruned {summary['pruned']} "
             f"({', '.join(f'{k}: {v}' for k, v in summary['pruned_reasons'].items()) or 'none'}), skipped "
             f"{summary['skipped_small_slices']} slices below the minimum area, {len(summary['failed_units'])} "
             f"units failed.", "",
             f"- strategy mix: {summary['strategy_mix']}",
             f"- actions per trajectory (stop included): {summary['actions_per_trajectory']} "
             f"(mean {summary['mean_actions']})",
             f"- mean IoU after each action: {summary['mean_iou_per_turn']}; final {summary['mean_final_iou']}",
             f"- IoU gain per action: mean {summary['mean_iou_gain_per_action']}, smallest {summary['min_iou_gain']} "
             f"(tau {config.tau})",
             f"- retries used: {summary['retries_used']} ({summary['retries_per_action']} per action)",
             f"- this run: {run.get('records_run')} trajectories from {run.get('units_run')} units in "
             f"{run.get('seconds')} s with {run.get('workers')} worker(s): {run.get('traj_per_s')} trajectories/s"]
    if summary["failed_units"]:
        lines += ["", "## Failed units", ""] + [f"- {k}: {v}" for k, v in summary["failed_units"].items()]
    if plot:
        lines += ["", f"![IoU per action]({plot.name})"]
    write_text(out / f"report-{tag}.md", "\n".join(lines) + "\n", "the synthesis report")
    return summary


def _plot(summary: dict, path: Path):
    curves = {k.replace("_", " "): v for k, v in summary["mean_iou_per_turn_by_strategy"].items()}
    return per_turn_plot(curves, path, "action", "mean IoU", "Synthesized trajectories: IoU after each action")


def run_summary(folder: str | Path) -> dict:
    """The summary of a synthesis --out folder (all its shards' records and unit stats), with the
    tool and settings it ran with.  InputError when it is not such a folder."""
    from MedSAMAgentLib.errors import InputError
    from MedSAMAgentLib.json_files import read_json_file

    folder = Path(folder).expanduser()
    merged = sorted(folder.glob("trajectories-*.jsonl"))
    if not (folder / "config.json").is_file() or not merged:
        raise InputError(f"{folder} is not a finished synthesis (no config.json and trajectories-*.jsonl); give a "
                         f"'medsam-agent synthesize --out' folder.")
    settings = read_json_file(folder / "config.json", "the synthesis settings")
    records = [r for path in merged for r in read_records(path)]
    stats = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((folder / "parts").glob("*/*.stats.json"))]
    summary = summarize(records, stats)
    summary["tool"] = settings.get("tool", {}) if isinstance(settings, dict) else {}
    summary["dataset"] = settings.get("dataset") if isinstance(settings, dict) else None
    return summary


def compare_runs(folders: list, out: str | Path) -> dict:
    """Synthesis runs side by side (e.g. one per tool on the same data): ``out/compare.md``,
    ``compare.json`` and ``compare.png`` (mean IoU after each action, one curve per run)."""
    out = Path(out)
    runs = {}
    for folder in folders:
        s = run_summary(folder)
        name = s["tool"].get("name", "?")
        label = name if name not in runs else f"{name} ({Path(folder).name})"
        runs[label] = {**s, "folder": str(folder)}
    datasets = {r["dataset"] for r in runs.values()}
    rows = [("dataset", lambda r: Path(str(r["dataset"])).name),
            ("trajectories kept / pruned", lambda r: f"{r['kept']} / {r['pruned']}"),
            ("strategy mix", lambda r: ", ".join(f"{k} {v}" for k, v in sorted(r["strategy_mix"].items()))),
            ("actions per trajectory, stop included (mean)", lambda r: r["mean_actions"]),
            ("actions per trajectory (count)", lambda r: ", ".join(f"{k}: {v}" for k, v in
                                                                   r["actions_per_trajectory"].items())),
            ("mean IoU after each action", lambda r: ", ".join(f"{v:.3f}" for v in r["mean_iou_per_turn"])),
            ("mean final IoU", lambda r: r["mean_final_iou"]),
            ("mean IoU gain of a kept action", lambda r: r["mean_iou_gain_per_action"]),
            ("retries per action", lambda r: r["retries_per_action"])]
    names = list(runs)
    lines = ["# Synthesis runs side by side", ""]
    if len(datasets) > 1:
        lines += ["Note: these runs used different datasets, so their numbers are not a like-for-like comparison.", ""]
    lines += ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {label} | " + " | ".join(str(get(runs[n])) for n in names) + " |" for label, get in rows]
    plot = per_turn_plot({n: runs[n]["mean_iou_per_turn"] for n in names if runs[n]["mean_iou_per_turn"]},
                         out / "compare.png", "action", "mean IoU", "Synthesized trajectories: IoU after each action")
    if plot:
        lines += ["", f"![IoU per action]({plot.name})"]
    write_json(out / "compare.json", runs, "the synthesis comparison")
    write_text(out / "compare.md", "\n".join(lines) + "\n", "the synthesis comparison")
    return runs
