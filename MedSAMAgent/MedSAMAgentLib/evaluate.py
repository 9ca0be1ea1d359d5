"""Evaluation on a manifest: per-turn Dice and IoU for the agent and single-turn baselines.

Items: every target of a 2D case; for a 3D case, the slices along ``axis`` that
contain the target (all, or ``max_slices`` spread evenly).  Methods:

* ``agent``  -- the given policy and tool;
* baselines (``baselines=True``), all on the same tool: ``box`` -- the reference
  box alone, one turn; ``point`` -- one positive click at the target's deepest
  point, one turn; ``expert`` -- the multi-turn oracle (a strong reference; left
  out when the agent's policy is itself the expert).

Per-turn Dice: Dice after each box/click action; an episode that stopped
earlier keeps its last value for the later turns (what a user would be left
with).  A target the policy never produced a mask for scores 0.

Records are appended to ``out/records.jsonl`` as they finish (nothing is lost
on an interruption; ``resume`` skips finished ones).  ``volume=True`` also runs
the whole-volume ``segment`` path for 3D cases and scores the 3D mask.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .agent import Agent, Episode
from .durable import DurableAppender, write_json, write_text
from .image_io import InputError, load_image, load_mask
from .json_files import read_json_file
from .manifest import CaseSpec
from .metrics import dice, iou
from .observation import apply_window, choose_window, to_display, to_rgb
from .policies.expert import ExpertPolicy
from .volume import OrientedVolume

RECORDS = "records.jsonl"


@dataclass
class Item:
    key: str
    case: str
    modality: str
    target: str
    slice: int | None
    rgb: np.ndarray
    reference: np.ndarray


@dataclass
class Method:
    name: str
    policy: object
    max_turns: int
    label: str


def baseline_methods(max_turns: int, include_expert: bool = True) -> list[Method]:
    methods = [Method("box", ExpertPolicy(first_action="box", box_jitter=0.0), 1, "single box (reference box, 1 turn)"),
               Method("point", ExpertPolicy(first_action="point"), 1, "single point (deepest point, 1 turn)")]
    if include_expert:
        methods.append(Method("expert", ExpertPolicy(), max_turns, f"multi-turn expert (oracle, up to {max_turns} turns)"))
    return methods


def empty_reason(target) -> str:
    """Why a target of the manifest has nothing to score: its mask, or its labels in it, are empty."""
    if target.values:
        return f"the mask of '{target.name}' has no pixel with the label {' or '.join(map(str, target.values))}"
    return f"the mask of '{target.name}' is empty"


def case_items(case: CaseSpec, axis: str = "axial", max_slices: int | None = None) -> tuple[list[Item], dict]:
    """The evaluation items of one case, and {target name: why it has none} for targets that
    cannot be used (an empty or unreadable mask: the case's other targets still count).  Raises
    InputError when the image itself is unusable."""
    loaded = load_image(case.image)
    items, failed = [], {}
    ct = case.modality.strip().upper() == "CT"
    if loaded.dim == 2:
        rgb = to_display(loaded.array, "CT" if ct and loaded.array.ndim == 2 else None)
        for t in case.targets:
            try:
                ref = load_mask(t.mask, t.values, like=loaded)
            except (InputError, ValueError) as exc:
                failed[t.name] = str(exc)
                continue
            if not ref.any():
                failed[t.name] = empty_reason(t)
                continue
            items.append(Item(f"{case.id}/{t.name}", case.id, case.modality, t.name, None, rgb, ref))
        return items, failed
    vol = OrientedVolume(loaded.image)
    window = choose_window(np.asarray(vol.array), "CT" if ct else None)
    for t in case.targets:
        try:
            ref = vol.from_original(load_mask(t.mask, t.values, like=loaded))
        except (InputError, ValueError) as exc:
            failed[t.name] = str(exc)
            continue
        a = vol.axis_index(axis)
        present = np.nonzero(ref.any(axis=tuple(i for i in range(3) if i != a)))[0]
        if present.size == 0:
            failed[t.name] = empty_reason(t)
            continue
        if max_slices and present.size > max_slices:
            present = present[np.unique(np.round(np.linspace(0, present.size - 1, max_slices)).astype(int))]
        for i in present:
            rgb = to_rgb(apply_window(vol.slice(axis, int(i)), window))
            items.append(Item(f"{case.id}/{t.name}/{axis}:{int(i)}", case.id, case.modality, t.name, int(i), rgb,
                              vol.slice(axis, int(i), ref)))
    return items, failed


def record_from(item: Item, method: str, traj) -> dict:
    dices = [round(float(d), 6) for d in traj.dice_per_turn]
    ious = [round(float(s.iou), 6) for s in traj.mask_steps]
    final = traj.final_mask
    return {"key": item.key, "method": method, "case": item.case, "modality": item.modality, "target": item.target,
            "slice": item.slice, "status": "ok", "dice_per_turn": dices, "iou_per_turn": ious,
            "dice": round(dice(final, item.reference), 6), "iou": round(iou(final, item.reference), 6),
            "turns": len(traj.steps), "actions": traj.num_actions, "stop_reason": traj.stop_reason,
            "failure": traj.failure, "seconds": round(traj.total_s, 4), "no_mask": not bool(final.any()),
            "retries": len(traj.retries), "repaired": sum(1 for s in traj.steps if s.repaired)}


def failed_record(key: str, method: str, case: CaseSpec, target: str, reason: str) -> dict:
    return {"key": key, "method": method, "case": case.id, "modality": case.modality, "target": target,
            "slice": None, "status": "failed", "reason": reason}


SETTINGS = "run-settings.json"


def check_eval_folder(out: Path, settings: dict, resume: bool, defaults: dict | None = None) -> None:
    """Refuses (InputError) an --out that would mix runs or overwrite someone's files: without
    ``resume`` it must be new or empty; with it, it must hold a run with the same ``settings``
    (recorded in ``run-settings.json`` when the run started).  Records the settings of a new run.
    ``defaults``: what an option recorded as None (not given, by older versions) meant."""
    from .image_io import InputError

    saved = out / SETTINGS
    if resume and saved.is_file():
        try:
            before = read_json_file(saved, "the evaluation's settings")
        except InputError:
            before = None
        if not isinstance(before, dict):
            raise InputError(f"{saved} is not the settings file an evaluation writes (changed by hand?); "
                             f"delete it to resume with the options given now, or choose another --out.")
        before.update({k: v for k, v in (defaults or {}).items() if k in before and before[k] is None})
        differ = [k for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k)]
        if differ:
            changes = ", ".join(f"{k}: {before.get(k)!r} then, {settings.get(k)!r} now" for k in differ)
            raise InputError(f"{out} holds a run with other settings ({changes}); resume it with the same options, "
                             f"or choose another --out.")
        return
    if resume and (out / RECORDS).is_file():
        return  # a run from before settings were recorded: taken as it is
    if out.is_dir() and any(p.name != SETTINGS for p in out.iterdir()):  # (a run that never started: reused)
        raise InputError(f"{out} is not empty" + (" and holds no evaluation to resume" if resume else
                         (" (it holds an evaluation: add --resume to continue it)" if (out / RECORDS).is_file()
                          else "")) + "; choose a new or empty --out.")
    out.mkdir(parents=True, exist_ok=True)
    write_json(saved, settings, "the evaluation's settings")


def load_records(out: Path) -> list[dict]:
    path = out / RECORDS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by an interruption: that item is redone
            if not (isinstance(record, dict) and isinstance(record.get("key"), str) and record.get("method")
                    and record.get("status") in ("ok", "failed")):
                from .image_io import InputError

                raise InputError(f"{path} has a line that is not an evaluation record ({line[:80]}); it was changed "
                                 f"by hand or by another program. Remove that line, or choose a new --out.")
            records.append(record)
    return records


class Evaluation:
    """Runs methods over a manifest's items, appending records to ``out/records.jsonl``."""

    def __init__(self, cases: list[CaseSpec], tool, methods: list[Method], out: Path, axis: str = "axial",
                 max_slices: int | None = None, batch_size: int = 8, resume: bool = False, profile=None,
                 progress: Callable[[int, int], None] | None = None):
        self.cases, self.tool, self.methods, self.out = cases, tool, methods, Path(out)
        self.axis, self.max_slices, self.batch_size, self.profile = axis, max_slices, max(1, batch_size), profile
        self.progress = progress
        self.out.mkdir(parents=True, exist_ok=True)
        self.records = load_records(self.out) if resume else []
        # start the file afresh, or rewrite it with the records that survived (drops a half-written line)
        write_text(self.out / RECORDS, "".join(json.dumps(r) + "\n" for r in self.records), "the evaluation records")
        self.done = {(r["key"], r["method"]) for r in self.records if r.get("status") == "ok"}  # failed ones are retried
        self.planned: set = set()  # (key, method) of every item this run covers, done or failed

    def _append(self, records: Iterable[dict]) -> None:
        with DurableAppender(self.out / RECORDS, "the evaluation records") as log:
            for r in records:
                log.append(json.dumps(r))
                self.records.append(r)
                if r["status"] == "ok":
                    self.done.add((r["key"], r["method"]))

    def run_slices(self) -> None:
        plan = []
        for case in self.cases:
            try:
                items, failed = case_items(case, self.axis, self.max_slices)
            except (InputError, ValueError) as exc:
                failed, items = {t.name: str(exc) for t in case.targets}, []
            self._append(failed_record(f"{case.id}/{name}", m.name, case, name, reason)
                         for name, reason in failed.items() for m in self.methods)
            self.planned.update((f"{case.id}/{name}", m.name) for name in failed for m in self.methods)
            self.planned.update((it.key, m.name) for it in items for m in self.methods)
            plan.append(items)
        total = sum(len(items) for items in plan) * len(self.methods)
        finished = sum(1 for items in plan for it in items for m in self.methods if (it.key, m.name) in self.done)
        if self.progress:
            self.progress(finished, total)
        for items in plan:
            for m in self.methods:
                todo = [it for it in items if (it.key, m.name) not in self.done]
                agent = Agent(m.policy, self.tool, self.profile, max_turns=m.max_turns)
                for start in range(0, len(todo), self.batch_size):
                    chunk = todo[start:start + self.batch_size]
                    trajs = agent.run([Episode(it.key, it.rgb, it.target, it.reference) for it in chunk])
                    self._append(record_from(it, m.name, t) for it, t in zip(chunk, trajs))
                    finished += len(chunk)
                    if self.progress:
                        self.progress(finished, total)

    def _fail_volume(self, case: CaseSpec, reasons: dict, methods: list | None = None) -> None:
        keys = [(f"{case.id}/{name}/volume", m, name, reason) for name, reason in reasons.items()
                for m in (methods or self.methods)]
        self.planned.update((key, m.name) for key, m, _, _ in keys)
        self._append({**failed_record(key, m.name, case, name, reason), "mode": "volume"}
                     for key, m, name, reason in keys)

    def results(self) -> list[dict]:
        """This run's records: the latest one of every (item, method) it planned -- not records an
        earlier run in the same folder left for items no longer in it (a case since fixed or removed)."""
        return [r for r in latest(self.records) if (r["key"], r["method"]) in self.planned]

    def run_volumes(self) -> None:
        """Whole-volume segmentation of every 3D target, per method, scored in 3D."""
        from .segment import SegmentOptions, segment

        for case in self.cases:
            try:
                loaded = load_image(case.image)
            except (InputError, ValueError) as exc:
                if case.dim == 3:
                    self._fail_volume(case, {t.name: str(exc) for t in case.targets})
                continue
            if loaded.dim != 3:  # what the file holds decides, not its name
                continue
            refs, failed = {}, {}
            for t in case.targets:
                try:
                    refs[t.name] = load_mask(t.mask, t.values, like=loaded)
                except (InputError, ValueError) as exc:
                    failed[t.name] = str(exc)
                    continue
                if not refs[t.name].any():
                    failed[t.name] = empty_reason(t)
            self._fail_volume(case, failed)
            for t in case.targets:
                if t.name in failed:
                    continue
                for m in self.methods:
                    key = f"{case.id}/{t.name}/volume"
                    self.planned.add((key, m.name))
                    if (key, m.name) in self.done:
                        continue
                    agent = Agent(m.policy, self.tool, self.profile, max_turns=m.max_turns)
                    t0 = time.perf_counter()
                    try:
                        res = segment(loaded, t.name, agent, SegmentOptions(
                            axis=self.axis, batch_size=self.batch_size,
                            modality=case.modality if case.modality.upper() == "CT" else None), reference=refs[t.name])
                    except (InputError, ValueError) as exc:
                        self._fail_volume(case, {t.name: str(exc)}, [m])
                        continue
                    self._append([{"key": key, "method": m.name, "case": case.id, "modality": case.modality,
                                   "target": t.name, "slice": None, "status": "ok", "mode": "volume",
                                   "dice": round(dice(res.mask, refs[t.name]), 6),
                                   "iou": round(iou(res.mask, refs[t.name]), 6),
                                   "turns": sum(len(x.steps) for x in res.trajectories),
                                   "seconds": round(time.perf_counter() - t0, 3)}])


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.mean(values)), 4) if values else None


def _stats(records: list[dict]) -> dict:
    """Means over the items scored.  Two accountings of episodes that end with no mask: ``dice`` counts
    them as 0 (ours), ``dice_masked_only`` leaves them out (the authors' evaluation scripts), with
    ``no_mask`` their number; ``retries`` and ``repaired`` count retried and repaired replies."""
    ok = [r for r in records if r["status"] == "ok"]
    masked = [r for r in ok if not r.get("no_mask", False)]
    return {"n": len(ok), "failed": sum(r["status"] == "failed" for r in records), "dice": _mean(r["dice"] for r in ok),
            "iou": _mean(r["iou"] for r in ok), "turns": _mean(r.get("turns") for r in ok),
            "no_mask": len(ok) - len(masked), "dice_masked_only": _mean(r["dice"] for r in masked),
            "iou_masked_only": _mean(r["iou"] for r in masked),
            "retries": sum(r.get("retries", 0) for r in ok), "repaired": sum(r.get("repaired", 0) for r in ok)}


def per_turn(records: list[dict], key: str = "dice_per_turn") -> list[float]:
    """Mean value after turn 1..T (T: the longest episode), last value carried forward; 0 when none."""
    rows = [r.get(key) or [0.0] for r in records if r["status"] == "ok" and r.get("mode") != "volume"]
    if not rows:
        return []
    t_max = max(len(r) for r in rows)
    padded = np.array([r + [r[-1]] * (t_max - len(r)) for r in rows])
    return [round(float(v), 4) for v in padded.mean(axis=0)]


def latest(records: list[dict]) -> list[dict]:
    """One record per (item, method): the last one written (a retried failure is replaced)."""
    by_key = {}
    for r in records:
        by_key[(r["key"], r["method"])] = r
    return list(by_key.values())


def summarize(records: list[dict], methods: list[str]) -> dict:
    records = latest(records)
    slices = [r for r in records if r.get("mode") != "volume"]
    volumes = [r for r in records if r.get("mode") == "volume"]
    modalities = sorted({r["modality"] for r in slices})
    summary = {
        "overall": {m: _stats([r for r in slices if r["method"] == m]) for m in methods},
        "per_modality": {mod: {m: _stats([r for r in slices if r["method"] == m and r["modality"] == mod])
                               for m in methods} for mod in modalities},
        "dice_per_turn": {m: per_turn([r for r in slices if r["method"] == m]) for m in methods},
        "iou_per_turn": {m: per_turn([r for r in slices if r["method"] == m], "iou_per_turn") for m in methods},
    }
    if volumes:
        summary["volume"] = {m: _stats([r for r in volumes if r["method"] == m]) for m in methods}
    return summary
