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
