"""Labelling a dataset: every case and target, resumable, sharded, in the input's geometry.

Layout of ``out``::

    label.json                    the run's settings (a resume must match them)
    cases/<case>/<target>.nii.gz  one mask per target (``.png`` for a 2D image), input geometry;
                                  the name without spaces: left_kidney.nii.gz
    cases/<case>/labels.nii.gz    with ``label_map``: one label map, values in labels.json
    cases/<case>/labels.json      {value: target} of the label map
    cases/<case>/segmentation.dcm a DICOM SEG (one segment per target) when the input is DICOM
    cases/<case>/audit.json       how each slice was made (the audit-trail format of the Slicer module)
    cases/<case>/contact.png      key slices of each target with its mask
    cases/<case>/case.json        written last: the case is finished (stats per target)
    report.md / report.json       the QC report over every finished case (see :mod:`qc`)

A case whose ``case.json`` exists is finished and skipped; one without it (interrupted,
failed) is done again from the start.  ``shard=(i, N)`` keeps the cases whose id hashes to
``i`` (crc32 mod N), so N processes (a SLURM array, several GPUs) split a dataset.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..durable import write_json
from ..image_io import InputError, load_image, load_mask, save_mask
from ..json_files import read_json_file
from ..segment import SegmentOptions, segment
from . import qc
from .sources import LabelCase, settings_key

LABEL_FORMAT = "medsam-agent-label"


@dataclass
class LabelSettings:
    axis: str = "axial"
    slices: str = "all"
    batch_size: int = 8
    window: object = None
    label_map: bool = False
    dicom_seg: bool = True  # for DICOM series inputs
    policy: str = ""  # as given, for label.json and the audit
    tool: str = ""


@dataclass
class LabelSummary:
    cases: int  # in this shard
    skipped: int  # finished before
    labelled: int
    failed: list = field(default_factory=list)  # (case id, reason)
    seconds: dict = field(default_factory=dict)  # read / policy / tool / write, summed
    slices: int = 0
    report: dict = field(default_factory=dict)


def case_folder(out: Path, case: LabelCase) -> Path:
    return out / "cases" / case.folder_name


def is_finished(out: Path, case: LabelCase) -> bool:
    return (case_folder(out, case) / "case.json").is_file()


def check_out_folder(out: Path, source: str, cases: list, settings: LabelSettings, resume: bool) -> None:
    """Refuse to mix runs: an existing label folder must be of the same source, cases and settings."""
    saved = out / "label.json"
    if not saved.is_file():
        if (out / "cases").is_dir() and any((out / "cases").iterdir()):
            raise InputError(f"{out} holds case folders but no label.json; choose another --out.")
        return
    before = read_json_file(saved, "the label run's settings")
    now = _settings(source, cases, settings)
    if not isinstance(before, dict) or before.get("format") != LABEL_FORMAT:
        raise InputError(f"{saved} is not a label run's settings file; choose another --out.")
    differ = [k for k in now if k not in ("cases", "settings") and before.get(k) != now[k]]
    differ += [f"--{k.replace('_', '-')}" for k, v in now["settings"].items()
               if (before.get("settings") or {}).get(k) != v]
    if differ:
        raise InputError(f"{out} was labelled with other settings ({', '.join(differ)} differ); run with the same "
                         f"options to resume, or choose another --out.")
    if before.get("cases") != now["cases"] and not resume:
        raise InputError(f"{out} was labelled from other cases or targets; choose another --out.")


def _settings(source: str, cases: list, settings: LabelSettings) -> dict:
    s = asdict(settings)
    s["window"] = None if settings.window is None else str(settings.window)
    return {"format": LABEL_FORMAT, "source": str(source), "settings": s, "cases": settings_key(cases)}


def _audit(log, case: LabelCase, target, axis: str, results: dict, settings: LabelSettings):
    """Adds the run of ``target`` to ``log``: one agent entry per step of every slice's trajectory."""
    from ..slicer_support.audit import AuditEntry
    from ..masks import encode_rle

    rec = log.start_run(f"{case.id}:{target.name}", target.text, axis, str(case.image),
                        {"policy": settings.policy, "tool": settings.tool, "source": "label"})
    for index, traj in results.items():
        for step in traj.steps:
            kind = "action" if step.pixels else ("stop" if (step.action or {}).get("name") == "stop_action" else "invalid")
            rec.entries.append(AuditEntry("agent", kind, axis, int(index), int(step.turn), step.action, step.pixels,
                                          mask=None if step.mask is None else encode_rle(step.mask),
                                          score=None if step.score is None or step.score != step.score else float(step.score)))
    rec.status, rec.finished = "done", time.time()
    return rec


def file_stem(name: str, used: set) -> str:
    """A target's file name without spaces or odd characters ("left kidney" -> left_kidney), unique in ``used``."""
    import re

    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "target"
    base, n = stem, 2
    while stem.lower() in used or stem.lower() in ("labels", "audit", "case", "contact", "segmentation"):
        stem, n = f"{base}_{n}", n + 1
    used.add(stem.lower())
    return stem


def label_case(case: LabelCase, out: Path, agent, settings: LabelSettings,
               slice_progress: Callable[[int, int], None] | None = None) -> dict:
    """Label one case; writes its folder, ``case.json`` last. Returns the case record."""
    from ..slicer_support.audit import AuditLog

    folder = case_folder(out, case)
    (folder / "case.json").unlink(missing_ok=True)
    seconds = {"read": 0.0, "policy": 0.0, "tool": 0.0, "write": 0.0}
    t0 = time.perf_counter()
    loaded = load_image(case.image, series=case.series)
    seconds["read"] += time.perf_counter() - t0
    axis = settings.axis if loaded.dim == 3 else "image"
    options = SegmentOptions(axis=settings.axis, slices=settings.slices, batch_size=settings.batch_size,
                             modality=case.modality, window=settings.window)
    log, masks, targets, used = AuditLog(), {}, {}, set()
    for target in case.targets:
        t0 = time.perf_counter()
        reference = None
        if target.mask is not None:
            reference = load_mask(target.mask, target.values, like=loaded)
            if loaded.dim == 2 and reference.ndim == 3:
                reference = reference[..., 0]
        seconds["read"] += time.perf_counter() - t0
        result = segment(loaded, target.text, agent, options, reference,
                         (lambda d, n, turns: slice_progress(d, n)) if slice_progress else None)
        per_slice = dict(zip(result.slices, result.trajectories)) if loaded.dim == 3 else {0: result.trajectories[0]}
        seconds["policy"] += sum(s.policy_s for t in result.trajectories for s in t.steps)
        seconds["tool"] += sum(s.tool_s for t in result.trajectories for s in t.steps) + sum(
            t.encode_s for t in result.trajectories)
        _audit(log, case, target, axis, per_slice, settings)
        t0 = time.perf_counter()
        name = file_stem(target.name, used) + (".nii.gz" if loaded.dim == 3 else ".png")
        save_mask(result.mask, loaded, folder / name)
        seconds["write"] += time.perf_counter() - t0
        masks[target.name] = result.mask
        dice = None
        if reference is not None:
            both = int(np.count_nonzero(result.mask)) + int(np.count_nonzero(reference))
            dice = round(2 * int(np.count_nonzero(result.mask & reference)) / both, 4) if both else 1.0
        targets[target.name] = {**qc.target_stats(result.mask, per_slice, settings.axis, loaded), "file": name,
                                "dice_vs_reference": dice,
                                "text": target.text, "reference": None if target.mask is None else str(target.mask)}
    t0 = time.perf_counter()
    if settings.label_map:
        labels = np.zeros(loaded.array.shape[:3] if loaded.dim == 3 else loaded.array.shape[:2], np.uint8)
        for value, name in enumerate(masks, start=1):
            labels[masks[name]] = value  # a voxel claimed twice goes to the later target
        _save_label_map(labels, loaded, folder / ("labels.nii.gz" if loaded.dim == 3 else "labels.png"))
        write_json(folder / "labels.json", {str(v): n for v, n in enumerate(masks, start=1)}, "the label table")
    if case.dicom and settings.dicom_seg:
        from .dicom_seg import write_seg

        write_seg(case.image, case.series, masks, folder / "segmentation.dcm")
    log.export(folder / "audit.json")
    qc.contact_sheet(loaded, masks, targets, settings.axis, settings.window, case.modality, folder / "contact.png")
    seconds["write"] += time.perf_counter() - t0
    record = {"case": case.id, "image": str(case.image), "series": case.series, "dicom": case.dicom,
              "dim": loaded.dim, "axis": axis, "targets": targets,
              "seconds": {k: round(v, 4) for k, v in seconds.items()}}
    write_json(folder / "case.json", record, "the case's record")
    return record


def _save_label_map(labels: np.ndarray, like, path: Path) -> None:
    import SimpleITK as sitk

    from ..durable import atomic_output

    image = sitk.GetImageFromArray(labels)
    if like.dim == 3:
        image.CopyInformation(like.image)
    with atomic_output(path, "the label map") as tmp:
        sitk.WriteImage(image, str(tmp), True)


def label_dataset(source: str, cases: list, out: str | Path, agent, settings: LabelSettings,
                  shard: tuple = (0, 1), resume: bool = True,
                  case_progress: Callable[[int, int, str], None] | None = None,
                  slice_progress: Callable[[int, int], None] | None = None) -> LabelSummary:
    """Label shard ``i`` of ``N`` of ``cases`` into ``out``; then write the QC report over all finished cases."""
    index, count = shard
    if not 0 <= index < count:
        raise InputError(f"--shard {index}/{count} is not a valid shard (0 <= i < N).")
    out = Path(out)
    check_out_folder(out, source, cases, settings, resume)
    mine = [c for c in cases if c.shard(count) == index]
    write_json(out / "label.json", _settings(source, cases, settings), "the label run's settings")
    summary = LabelSummary(len(mine), 0, 0)
    totals = {"read": 0.0, "policy": 0.0, "tool": 0.0, "write": 0.0}
    for n, case in enumerate(mine):
        if case_progress:
            case_progress(n, len(mine), case.id)
        if is_finished(out, case):
            summary.skipped += 1
            continue
        try:
            record = label_case(case, out, agent, settings, slice_progress)
        except (InputError, ValueError) as exc:  # this case's data: reported, the others go on
            summary.failed.append((case.id, str(exc)))
            continue
        summary.labelled += 1
        summary.slices += sum(t["slices_run"] for t in record["targets"].values())
        for k, v in record["seconds"].items():
            totals[k] += v
    if case_progress:
        case_progress(len(mine), len(mine), "")
    summary.seconds = {k: round(v, 3) for k, v in totals.items()}
    summary.report = qc.write_report(out, failed=summary.failed)
    return summary
