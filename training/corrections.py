"""Accepted corrections -> training data: re-synthesized expert trajectories and RL items.

Input: the review records the Slicer worklist writes into a label run (``review/<case>.json``:
the accepted masks and the audit trail with the annotator's entries), or one exported audit
trail with its volume and accepted masks.  Output ``out``::

    cases.json        a manifest of the accepted cases (image, accepted mask per target): the RL
                      items, and a dataset ``synthesize``, ``rl`` and ``eval`` read as they are
    images/<case>.nii.gz  a DICOM case's volume (exact geometry), so the manifest stands alone
    synthesis/        ``synthesize`` run on cases.json: trajectories-*.jsonl, each record also
                      holding ``corrections`` (what the person changed in that target's slices)
    corrections.json  per case and target: the edits counted (prompts added, moved, deleted)

``sft`` takes ``synthesis/`` in ``records``; ``rl`` takes ``cases.json`` as ``dataset``.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from MedSAMAgentLib.durable import write_json
from MedSAMAgentLib.image_io import InputError
from MedSAMAgentLib.json_files import read_json_file
from MedSAMAgentLib.slicer_support.audit import AuditLog

REVIEW_FORMAT = "medsam-agent-review"


def person_changes(audit: AuditLog, target: str) -> dict:
    """What the annotator changed for ``target`` (its text or the run's name): edit kinds counted,
    and per slice the edits and the prompt set the mask was made from."""
    kinds, slices = Counter(), {}
    for run in audit.runs:
        if target not in (run.target, run.run.rsplit(":", 1)[-1]):  # another target's run
            continue
        for e in run.entries:
            if e.author != "user":
                continue
            for edit in e.edits or []:
                kinds[str(edit.get("kind", "edit")) if isinstance(edit, dict) else "edit"] += 1
            slices.setdefault(f"{e.axis}:{e.slice}", []).append({"kind": e.kind, "edits": e.edits or [],
                                                                 "prompts": e.prompts or []})
    return {"edits": dict(kinds), "slices_edited": len(slices), "slices": slices}


def accepted_reviews(label_dirs: list) -> list[dict]:
    """The accepted review records of label runs (``review/*.json``), each with its audit loaded."""
    found = []
    for folder in label_dirs:
        folder = Path(folder).expanduser()
        if not (folder / "label.json").is_file():
            raise InputError(f"{folder} is not a 'medsam-agent label' output folder (no label.json).")
        for path in sorted((folder / "review").glob("*.json")) if (folder / "review").is_dir() else []:
            rec = read_json_file(path, "a review record")
            if isinstance(rec, dict) and rec.get("format") == REVIEW_FORMAT and rec.get("accepted"):
                found.append(rec)
    return found


def review_from_files(audit: str, image: str, masks: dict, series: str | None = None) -> dict:
    """A review record for one case from an exported audit trail, its volume and accepted masks."""
    for what, p in [("--audit", audit), ("--image", image), *[(f"--mask {n}", m) for n, m in masks.items()]]:
        if not Path(p).expanduser().exists():
            raise InputError(f"{what}: no file at {p}.")
    return {"format": REVIEW_FORMAT, "case": Path(image).name.split(".")[0], "accepted": True,
            "image": str(Path(image).expanduser().resolve()), "series": series,
            "dim": 3 if Path(image).is_dir() or str(image).lower().endswith((".nii", ".nii.gz", ".nrrd", ".mha", ".mhd"))
            else 2, "masks": {n: str(Path(m).expanduser().resolve()) for n, m in masks.items()},
            "texts": {n: n for n in masks}, "audit": str(Path(audit).expanduser().resolve())}


def _case_image(rec: dict, out: Path) -> str:
    """The case's image as a file the manifest can name (a DICOM series is written as NIfTI, same geometry)."""
    image = Path(rec["image"])
    if not image.is_dir():
        return str(image)
    from MedSAMAgentLib.image_io import load_image

    import SimpleITK as sitk

    from MedSAMAgentLib.durable import atomic_output

    loaded = load_image(image, series=rec.get("series"))
    dest = out / "images" / f"{_safe(rec['case'])}.nii.gz"
    with atomic_output(dest, "the case's volume") as tmp:
        sitk.WriteImage(loaded.image, str(tmp), True)
    return str(dest)


def _safe(text: str) -> str:
    import re
    import zlib

    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "case"
    return safe if safe == text else f"{safe}-{zlib.crc32(text.encode('utf-8')):08x}"


def export_corrections(reviews: list[dict], out: str | Path, tool_spec: dict, config=None,
                       progress=None) -> dict:
    """Write the manifest, the corrections and the re-synthesized records of ``reviews`` into ``out``."""
    from .synthesis_run import synthesize

    if not reviews:
        raise InputError("No accepted case to export: accept cases in the Slicer worklist first (or give --audit, "
                         "--image and --mask).")
    out = Path(out)
    cases, changes = [], {}
    for rec in reviews:
        audit = AuditLog.from_json(Path(rec["audit"]).read_text(encoding="utf-8")) if rec.get("audit") else AuditLog()
        texts = rec.get("texts") or {}
        per_target = {name: person_changes(audit, texts.get(name, name)) for name in rec["masks"]}
        changes[rec["case"]] = per_target
        cases.append({"id": rec["case"], "modality": rec.get("modality", "unknown"), "dim": int(rec.get("dim", 3)),
                      "image": _case_image(rec, out),
                      "targets": {texts.get(name, name): {"mask": path} for name, path in rec["masks"].items()},
                      "corrections": {texts.get(name, name): {k: v for k, v in c.items() if k != "slices"}
                                      for name, c in per_target.items()}})
    manifest = write_json(out / "cases.json", {"cases": cases}, "the corrections manifest")
    write_json(out / "corrections.json", changes, "the corrections")
    summary = synthesize(manifest, out / "synthesis", tool_spec, config, resume=True, progress=progress)
    from .datasets import target_text

    by_key = {(c["id"], target_text(t)): c["corrections"][t] for c in cases for t in c["targets"]}
    merged = summary.merged
    lines = []
    for line in merged.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            record["corrections"] = by_key.get((record.get("case"), record.get("target")), {})
            lines.append(json.dumps(record))
    from MedSAMAgentLib.durable import write_text

    write_text(merged, "".join(line + "\n" for line in lines), "the synthesis records")
    return {"cases": len(cases), "case_targets": sum(len(c["targets"]) for c in cases), "records": len(lines),
            "manifest": str(manifest), "records_file": str(merged),
            "edits": dict(sum((Counter(t["edits"]) for c in changes.values() for t in c.values()), Counter()))}
