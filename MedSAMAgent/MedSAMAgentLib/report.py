"""Writing an evaluation's results: ``results.json``, ``report.md`` and a per-turn Dice plot.

``results.json`` schema::

    {"manifest": str, "created": ISO time, "settings": {...},
     "methods": {name: label},
     "records": [{"key", "method", "case", "modality", "target", "slice" (3D) or null,
                  "status": "ok" | "failed", "reason" (failed),
                  "dice_per_turn": [...], "iou_per_turn": [...],   # after each box/click action
                  "dice", "iou",                                   # of the final mask
                  "turns", "actions", "stop_reason", "failure", "seconds",
                  "mode": "volume" (whole-volume records only)}],
     "summary": {"overall": {method: {"n", "failed", "dice", "iou", "turns"}},
                 "per_modality": {modality: {method: {...}}},
                 "dice_per_turn": {method: [mean after turn 1..T]}, "iou_per_turn": {...},
                 "volume": {method: {...}} (with --volume)}}
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

from .durable import write_json, write_text
from .evaluate import latest, summarize
from .plots import per_turn_plot


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def plot_dice_per_turn(summary: dict, labels: dict, path: Path) -> Path | None:
    return per_turn_plot({labels.get(m, m): v for m, v in summary["dice_per_turn"].items()}, path,
                         "turn (box or click actions so far)", "mean Dice",
                         "Dice after each turn (stopped episodes keep their last mask)")


def write_results(out: Path, manifest: str, records: list[dict], methods: dict, settings: dict) -> dict:
    """Write results.json, report.md and dice_per_turn.png into ``out``; return the summary."""
    out = Path(out)
    records = latest(records)
    summary = summarize(records, list(methods))
    doc = {"manifest": manifest, "created": _dt.datetime.now().isoformat(timespec="seconds"), "settings": settings,
           "methods": methods, "records": records, "summary": summary}
    write_json(out / "results.json", doc, "the evaluation results")
    plot = plot_dice_per_turn(summary, methods, out / "dice_per_turn.png")

    lines = [f"# Evaluation: {manifest}", "", f"Created {doc['created']}. Settings: "
             + ", ".join(f"{k}={v}" for k, v in settings.items()) + ".", "", "## Overall (slice items)", "",
             "| method | items | failed | mean Dice | mean IoU | mean turns | no mask | mean Dice, no-mask left out "
             "| retried replies | repaired replies |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, label in methods.items():
        s = summary["overall"][m]
        turns = "-" if s["turns"] is None else f"{s['turns']:.2f}"
        lines.append(f"| {label} | {s['n']} | {s['failed']} | {_fmt(s['dice'])} | {_fmt(s['iou'])} | {turns} | "
                     f"{s.get('no_mask', 0)} | {_fmt(s.get('dice_masked_only'))} | {s.get('retries', 0)} | "
                     f"{s.get('repaired', 0)} |")
    lines += ["", "Mean Dice counts an episode that ends with no mask as 0; the authors' evaluation scripts leave "
              "such episodes out (the column after *no mask*)."]
    lines += ["", "## Mean Dice per modality", "", "| modality | " + " | ".join(methods) + " |",
              "|---|" + "---:|" * len(methods)]
    for mod, per in summary["per_modality"].items():
        lines.append(f"| {mod} | " + " | ".join(_fmt(per[m]["dice"]) for m in methods) + " |")
    lines += ["", "## Mean Dice after each turn", ""]
    longest = max((len(v) for v in summary["dice_per_turn"].values()), default=0)
    if longest:
        lines += ["| method | " + " | ".join(f"turn {t}" for t in range(1, longest + 1)) + " |",
                  "|---|" + "---:|" * longest]
        for m, values in summary["dice_per_turn"].items():
            padded = values + [values[-1]] * (longest - len(values)) if values else []
            lines.append(f"| {m} | " + " | ".join(_fmt(v) for v in padded) + " |")
    if plot:
        lines += ["", f"![Dice per turn]({plot.name})"]
    if "volume" in summary:
        lines += ["", "## Whole volumes (3D Dice of the segment path)", "", "| method | volumes | mean Dice | mean IoU |",
                  "|---|---:|---:|---:|"]
        for m in methods:
            s = summary["volume"][m]
            lines.append(f"| {m} | {s['n']} | {_fmt(s['dice'])} | {_fmt(s['iou'])} |")
    failed = [r for r in records if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failed items", ""] + [f"- {r['key']} ({r['method']}): {r['reason']}" for r in failed]
    write_text(out / "report.md", "\n".join(lines) + "\n", "the evaluation report")
    return summary
