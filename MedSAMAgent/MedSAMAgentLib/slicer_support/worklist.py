"""A ``medsam-agent label`` output folder as a review worklist (pure Python; the module is the glue).

Order: the QC report's review list first (the cases most worth a look), then the rest by
case id.  Each :class:`WorkItem` says what to load -- the case's image (a file or a DICOM
series), its masks (one per target, input geometry) and its audit trail (how each slice
was made) -- and whether it was accepted.  :meth:`Worklist.accept` writes the accepted
masks and the audit trail (the agent's entries plus the annotator's) into
``review/<case folder>/`` and ``review/<case folder>.json`` last, which is what
``medsam-agent export-corrections`` reads.  The label run's own files are never changed.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

REVIEW_FORMAT = "medsam-agent-review"


@dataclass
class WorkItem:
    case: str
    folder: Path  # the label run's case folder
    image: Path
    series: str | None
    dim: int
    axis: str
    masks: dict  # target name -> mask file
    texts: dict  # target name -> the text the policy was given
    audit: Path
    reasons: list = field(default_factory=list)  # why the QC report lists it (empty: not listed)
    accepted: bool = False


class Worklist:
    """The cases of a label run; ``index`` is the current one."""

    def __init__(self, folder: str | Path):
        from ..image_io import InputError

        self.folder = Path(folder).expanduser().resolve()
        if not (self.folder / "label.json").is_file() or not (self.folder / "cases").is_dir():
            raise InputError(f"{self.folder} is not a 'medsam-agent label' output folder (it has no label.json and "
                             f"cases/); choose the folder given to label as --out.")
        reasons = {}
        report = self.folder / "report.json"
        if report.is_file():
            try:
                for entry in json.loads(report.read_text(encoding="utf-8")).get("review", []):
                    reasons[entry["folder"]] = list(entry.get("reasons", []))
            except (OSError, ValueError, KeyError, TypeError):
                reasons = {}
        items = []
        for path in sorted((self.folder / "cases").glob("*/case.json")):
            try:
                rec = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # an unfinished or damaged case: not reviewable yet
            case_dir = path.parent
            items.append(WorkItem(str(rec["case"]), case_dir, Path(rec["image"]), rec.get("series"), int(rec["dim"]),
                                  rec.get("axis", "axial"),
                                  {n: case_dir / t["file"] for n, t in rec["targets"].items()},
                                  {n: t.get("text", n) for n, t in rec["targets"].items()},
                                  case_dir / "audit.json", reasons.get(case_dir.name, []),
                                  self.review_file(case_dir.name).is_file()))
        if not items:
            raise InputError(f"{self.folder} holds no finished case yet; run label first.")
        order = {name: n for n, name in enumerate(reasons)}
        items.sort(key=lambda it: (it.folder.name not in order, order.get(it.folder.name, 0), it.case))
        self.items = items
        self.index = 0

    def review_file(self, case_folder: str) -> Path:
        return self.folder / "review" / f"{case_folder}.json"

    @property
    def current(self) -> WorkItem:
        return self.items[self.index]

    def next(self) -> WorkItem:
        """The next case; after the last, the first again (one case: itself)."""
        self.index = (self.index + 1) % len(self.items)
        return self.current

    def previous(self) -> WorkItem:
        """The previous case; before the first, the last."""
        self.index = (self.index - 1) % len(self.items)
        return self.current

    def go(self, case: str) -> WorkItem:
        for n, it in enumerate(self.items):
            if it.case == case:
                self.index = n
                return it
        raise KeyError(case)

    def next_unreviewed(self) -> WorkItem | None:
        """The first case after the current one (wrapping) not accepted yet; None when all are."""
        for step in range(1, len(self.items) + 1):
            n = (self.index + step) % len(self.items)
            if not self.items[n].accepted:
                self.index = n
                return self.current
        return None

    def sources(self, it: WorkItem | None = None) -> tuple[dict, Path]:
        """What to load for a case (default: the current one): ({target: mask file}, audit file) -- the
        accepted copies under ``review/`` for an accepted case (where each is there), else the label run's."""
        it = it or self.current
        out = self.folder / "review" / it.folder.name
        if not it.accepted:
            return dict(it.masks), it.audit
        masks = {n: (out / p.name if (out / p.name).is_file() else p) for n, p in it.masks.items()}
        return masks, (out / "audit.json" if (out / "audit.json").is_file() else it.audit)

    def counts(self) -> dict:
        accepted = sum(1 for it in self.items if it.accepted)
        return {"cases": len(self.items), "accepted": accepted, "to_review": len(self.items) - accepted}

    def status_text(self) -> str:
        it, c = self.current, self.counts()
        why = f" -- worth a look: {'; '.join(it.reasons)}" if it.reasons else ""
        return (f"Case {self.index + 1} of {c['cases']}: {it.case}{' (accepted)' if it.accepted else ''}; "
                f"{c['accepted']} accepted{why}")

    def accept(self, masks: dict, audit_json: str, like) -> Path:
        """Accept the current case: ``masks`` {target: bool array in ``like``'s (the case image's) array
        shape}, ``audit_json`` the trail with the annotator's entries. Returns the review record's path."""
        from ..durable import write_json, write_text
        from ..image_io import save_mask

        it = self.current
        unknown = sorted(set(masks) - set(it.masks))
        if unknown:
            raise ValueError(f"Case {it.case} has no target {', '.join(unknown)}; its targets: {', '.join(it.masks)}.")
        out = self.folder / "review" / it.folder.name
        files = {}
        for name, mask in masks.items():
            files[name] = save_mask(mask, like, out / it.masks[name].name)
        audit = write_text(out / "audit.json", audit_json, "the reviewed audit trail")
        record = {"format": REVIEW_FORMAT, "case": it.case, "accepted": True, "time": time.time(),
                  "image": str(it.image), "series": it.series, "dim": it.dim, "axis": it.axis,
                  "masks": {n: str(p) for n, p in files.items()}, "texts": {n: it.texts[n] for n in files},
                  "agent_masks": {n: str(it.masks[n]) for n in files}, "audit": str(audit)}
        path = write_json(self.review_file(it.folder.name), record, "the review record")
        it.accepted = True
        return path
