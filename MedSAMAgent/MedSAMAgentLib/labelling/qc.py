"""The label run's quality report: per case and target the voxels, slices, turns and the
tool's score, and a review list of the cases most worth a person's look.

Review reasons (a case is listed once, with all of its reasons, most serious first):

* ``empty``: a target's mask is empty;
* ``low score``: the tool's own score of its masks (mean over slices) is below ``LOW_SCORE``;
* ``jumps``: between neighbouring slices the mask's area changes more than ``JUMP_RATIO``
  times, or its overlap (IoU) falls below ``JUMP_IOU``; ``gaps``: empty slices inside the
  target's extent (changes at the first and last slice are an organ tapering off, not
  counted).  Organs change smoothly from slice to slice; these are where the agent
  most likely went wrong.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..durable import write_json, write_text

LOW_SCORE = 0.5
JUMP_RATIO = 2.5
JUMP_IOU = 0.3


def _slice_masks(per_slice: dict) -> dict:
    return {int(i): np.asarray(t.final_mask, bool) for i, t in per_slice.items()}


def target_stats(mask: np.ndarray, per_slice: dict, axis: str, loaded) -> dict:
    """Numbers of one target's result: voxels, slices with mask, turns, the tool's score, jumps and gaps."""
    slices = _slice_masks(per_slice)
    on = sorted(i for i, m in slices.items() if m.any())
    jumps = 0
    for a, b in zip(on, on[1:]):
        if b != a + 1 or a == on[0] or b == on[-1]:  # an organ's end slices taper off: not a jump
            continue
        ma, mb = slices[a], slices[b]
        area_a, area_b = int(ma.sum()), int(mb.sum())
        iou = float((ma & mb).sum()) / max(1, int((ma | mb).sum()))
        if max(area_a, area_b) > JUMP_RATIO * min(area_a, area_b) or iou < JUMP_IOU:
            jumps += 1
    gaps = (on[-1] - on[0] + 1 - len(on)) if on else 0
    scores = []
    for i in on:
        steps = [s for s in per_slice[i].steps if s.mask is not None and s.score is not None]
        if steps and not math.isnan(float(steps[-1].score)):
            scores.append(float(steps[-1].score))
    return {"voxels": int(np.count_nonzero(mask)), "slices": len(on), "slices_run": len(slices),
            "first_slice": on[0] if on else None, "last_slice": on[-1] if on else None,
            "turns": int(sum(len(t.steps) for t in per_slice.values())),
            "tool_score": round(float(np.mean(scores)), 4) if scores else None,
            "jumps": jumps, "gaps": int(gaps)}


def review_reasons(targets: dict) -> list[str]:
    reasons = []
    for name, t in targets.items():
        if t["voxels"] == 0:
            reasons.append(f"{name}: empty")
    for name, t in targets.items():
        if t["voxels"] and t.get("tool_score") is not None and t["tool_score"] < LOW_SCORE:
            reasons.append(f"{name}: low score {t['tool_score']:.2f}")
    for name, t in targets.items():
        if t["voxels"] and (t["jumps"] or t["gaps"]):
            reasons.append(f"{name}: {t['jumps']} jumps, {t['gaps']} gaps")
    return reasons


def _priority(targets: dict) -> tuple:
    empty = sum(1 for t in targets.values() if t["voxels"] == 0)
    scores = [t["tool_score"] for t in targets.values() if t["voxels"] and t.get("tool_score") is not None]
    low = sum(1 for s in scores if s < LOW_SCORE)
    irregular = sum((t["jumps"] + t["gaps"]) / max(1, t["slices"]) for t in targets.values() if t["voxels"])
    return (empty, low, round(irregular, 4), -min(scores, default=1.0))


def load_cases(out: Path) -> list[dict]:
    """Every finished case's record (``case.json``) under ``out/cases``, sorted by case id."""
    records = []
    for path in sorted((out / "cases").glob("*/case.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        record["folder"] = path.parent.name
        records.append(record)
    return sorted(records, key=lambda r: str(r["case"]))


def write_report(out: Path, failed: list | None = None) -> dict:
    """report.json and report.md over every finished case; returns the report."""
    cases = load_cases(out)
    review = []
    for r in cases:
        reasons = review_reasons(r["targets"])
        if reasons:
            review.append({"case": r["case"], "folder": r["folder"], "reasons": reasons,
                           "priority": list(_priority(r["targets"]))})
    review.sort(key=lambda x: tuple(x["priority"]), reverse=True)
    dices = [t["dice_vs_reference"] for r in cases for t in r["targets"].values()
             if t.get("dice_vs_reference") is not None]
    report = {"cases": len(cases), "case_targets": sum(len(r["targets"]) for r in cases),
              "mean_dice_vs_reference": round(float(np.mean(dices)), 4) if dices else None,
              "empty": sum(1 for r in cases for t in r["targets"].values() if t["voxels"] == 0),
              "failed": [{"case": c, "reason": why} for c, why in (failed or [])],
              "review": review,
              "per_case": [{"case": r["case"], "folder": r["folder"], "targets": r["targets"]} for r in cases]}
    write_json(out / "report.json", report, "the label report")
    lines = ["# Label run: quality report", "",
             f"{report['cases']} cases, {report['case_targets']} case-targets finished; "
             f"{report['empty']} empty masks; {len(report['failed'])} cases failed in the last run."
             + (f" Mean Dice against the source's reference masks: {report['mean_dice_vs_reference']:.3f} (a check "
                f"of the labels where the dataset has references)." if dices else ""), ""]
    lines += ["## Worth a look first", ""]
    if review:
        lines += ["| # | case | why | contact sheet |", "|---:|---|---|---|"]
        lines += [f"| {n} | {x['case']} | {'; '.join(x['reasons'])} | [png](cases/{x['folder']}/contact.png) |"
                  for n, x in enumerate(review, start=1)]
    else:
        lines.append("Nothing stands out: no empty masks, low scores, jumps or gaps.")
    if report["failed"]:
        lines += ["", "## Failed (run again to retry them)", ""]
        lines += [f"- {f['case']}: {f['reason']}" for f in report["failed"]]
    lines += ["", "## Every case", "",
              "| case | target | voxels | slices | turns | tool score | jumps | gaps | Dice vs reference |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in cases:
        for name, t in r["targets"].items():
            score = "-" if t.get("tool_score") is None else f"{t['tool_score']:.3f}"
            dice = "-" if t.get("dice_vs_reference") is None else f"{t['dice_vs_reference']:.3f}"
            lines.append(f"| {r['case']} | {name} | {t['voxels']} | {t['slices']} | {t['turns']} | {score} | "
                         f"{t['jumps']} | {t['gaps']} | {dice} |")
    write_text(out / "report.md", "\n".join(lines) + "\n", "the label report")
    return report


def key_slices(areas: np.ndarray, count: int = 3) -> list[int]:
    """Up to ``count`` slices worth showing, from the mask's area per slice: its largest, and two
    inside its extent (the middle slice when the mask is empty)."""
    on = np.flatnonzero(areas)
    if not len(on):
        return [int(len(areas) // 2)]
    picks = [int(on[np.argmax(areas[on])]), int(on[len(on) // 4]), int(on[(3 * len(on)) // 4])]
    return sorted(dict.fromkeys(picks))[:count]


def contact_sheet(loaded, masks: dict, targets: dict, axis: str, window, modality, path: Path) -> Path:
    """A PNG with a row per target: its key slices, the mask in colour (volumes; a 2D image: one panel each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..observation import apply_window, choose_window, overlay, to_display, to_rgb
    from ..volume import OrientedVolume

    rows = []
    if loaded.dim == 3:
        vol = OrientedVolume(loaded.image)
        win = choose_window(np.asarray(vol.array), modality, window)
        for name, mask in masks.items():
            lps = vol.from_original(mask)
            n = vol.num_slices(axis)
            areas = np.array([int(vol.slice(axis, i, lps).sum()) for i in range(n)])
            picks = key_slices(areas)
            rows.append((name, [(f"{axis} {i}", overlay(to_rgb(apply_window(vol.slice(axis, i), win)),
                                                         vol.slice(axis, i, lps), (255, 80, 0), 0.45)) for i in picks]))
    else:
        rgb = to_display(loaded.array, modality, window)
        rows = [(name, [("image", overlay(rgb, mask, (255, 80, 0), 0.45))]) for name, mask in masks.items()]
    cols = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(3 * cols, 3 * len(rows)), squeeze=False)
    for r, (name, panels) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(panels):
                ax.imshow(panels[c][1])
                t = targets.get(name, {})
                ax.set_title(f"{name}, {panels[c][0]}" + (" (empty)" if t.get("voxels") == 0 else ""), fontsize=8)
    fig.tight_layout()
    from ..durable import atomic_output

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, "the contact sheet") as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path
