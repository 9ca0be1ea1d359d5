"""The cases of a dataset to label: a manifest, an nnU-Net v2 folder, a folder of volumes, a DICOM tree.

A :class:`LabelCase` is one image (a file, or a DICOM series: folder + series UID) with the
targets to segment in it, each with a reference mask where the source has one (a manifest's
masks, an nnU-Net folder's ``labelsTr``) -- what the expert policy reads.

* manifest (``.json``): every case and, by default, all of its targets;
* nnU-Net v2 (``dataset.json`` with ``imagesTr/`` and/or ``imagesTs/``): channel 0000 of each
  case, targets from ``labels``, references from ``labelsTr`` when present;
* a folder of ``.nii``/``.nii.gz``/``.nrrd``/``.mha``/``.mhd`` volumes (any depth): one case each;
* a DICOM tree (any depth; every folder holding DICOM files): one case per series.

Without references (``--targets`` names them) only a model policy can label.
"""
from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ..image_io import InputError, dicom_series_ids

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


@dataclass
class LabelTarget:
    name: str  # as written in file names and reports
    text: str  # what the policy is asked to segment
    mask: Path | None = None  # reference mask (None: none in the source)
    values: list | None = None  # its label values (None: any non-zero voxel)


@dataclass
class LabelCase:
    id: str  # unique in the dataset; may hold "/" (a DICOM study/series path)
    image: Path  # a file, or a DICOM folder
    series: str | None = None  # DICOM series UID (folder input)
    modality: str | None = None
    targets: list = field(default_factory=list)
    dicom: bool = False

    def shard(self, count: int) -> int:
        """Deterministic shard among ``count`` (the same on every machine and run)."""
        return zlib.crc32(self.id.encode("utf-8")) % max(1, count)

    @property
    def folder_name(self) -> str:
        """A file-system-safe, collision-free name for the case's output folder."""
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", self.id).strip("_")[:80] or "case"
        return safe if safe == self.id else f"{safe}-{zlib.crc32(self.id.encode('utf-8')):08x}"


def _modality(text: str | None) -> str | None:
    if not text:
        return None
    return "CT" if str(text).strip().upper() == "CT" else str(text)


def _filter(case: LabelCase, wanted: list | None, where: str) -> LabelCase:
    if not wanted:
        return case
    by_name = {t.name: t for t in case.targets}
    missing = [w for w in wanted if w not in by_name]
    if missing:
        raise InputError(f"{where} has no target {', '.join(repr(m) for m in missing)}; it has "
                         f"{', '.join(repr(n) for n in by_name)}.")
    case.targets = [by_name[w] for w in wanted]
    return case


def _from_manifest(path: Path, targets: list | None) -> list[LabelCase]:
    from ..manifest import load_manifest

    cases = []
    for c in load_manifest(path):
        is_dicom = c.image.is_dir()
        case = LabelCase(c.id, c.image, c.extra.get("series"), _modality(c.modality if c.modality != "unknown" else None),
                         [LabelTarget(t.name, t.name, t.mask, t.values) for t in c.targets], dicom=is_dicom)
        cases.append(_filter(case, targets, f"Case {c.id} of {path.name}"))
    return cases


def _from_nnunet(path: Path, targets: list | None) -> list[LabelCase]:
    from ..nnunet import read_nnunet

    data = read_nnunet(path)
    modality = _modality(data.modality or None)
    cases = []
    for c in data.cases:
        tlist = [LabelTarget(n, n.replace("_", " "), c.labels, v) for n, v in data.labels.items()]
        if targets:
            tlist = [t for t in tlist if t.name in targets] + [LabelTarget(w, w.replace("_", " ")) for w in targets
                                                              if w not in data.labels]
        cases.append(LabelCase(c.id, c.image, None, modality, tlist))
    return cases


def _from_folder(path: Path, targets: list | None) -> list[LabelCase]:
    if not targets:
        raise InputError(f"{path} is a folder of images without reference masks: say what to label with --targets "
                         f"(e.g. --targets liver,spleen), and use a model policy.")
    tlist = lambda: [LabelTarget(t, t) for t in targets]  # noqa: E731 - a fresh list per case
    cases = []
    volumes = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES))
    for v in volumes:
        rel = v.relative_to(path).as_posix()
        cid = re.sub(r"(\.nii\.gz|\.nii|\.nrrd|\.mha|\.mhd)$", "", rel, flags=re.I)
        cases.append(LabelCase(cid, v, None, None, tlist()))
    folders = [path] + sorted(p for p in path.rglob("*") if p.is_dir())
    for folder in folders:
        if not any(f.is_file() and not f.name.lower().endswith(VOLUME_SUFFIXES) for f in folder.iterdir()):
            continue
        ids = dicom_series_ids(folder)
        rel = folder.relative_to(path).as_posix()
        for sid in ids:
            cid = (rel if rel != "." else path.name) + (f"/{sid}" if len(ids) > 1 else "")
            cases.append(LabelCase(cid, folder, sid, None, tlist(), dicom=True))
    return cases


def list_cases(source: str | Path, targets: list | None = None) -> list[LabelCase]:
    """Every case of ``source`` with its targets (``targets``: names to keep, or to ask for); InputError if none."""
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"No dataset at {path}.")
    path = path.resolve()
    if path.is_file() and path.suffix.lower() == ".json":
        cases = _from_manifest(path, targets)
    elif path.is_file():
        raise InputError(f"{path} is a file; label takes a manifest (.json), an nnU-Net folder, a folder of volumes "
                         f"or a DICOM tree (for one image, use 'medsam-agent segment').")
    elif (path / "dataset.json").is_file():
        cases = _from_nnunet(path, targets)
    else:
        cases = _from_folder(path, targets)
    if not cases:
        raise InputError(f"{path} holds no images to label (volumes: {', '.join(VOLUME_SUFFIXES)}; or DICOM series).")
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise InputError(f"Two images of {path} have the same case name ({', '.join(twice[:3])}); rename one.")
    for c in cases:
        if not c.targets:
            raise InputError(f"Case {c.id} has no target to label; name them with --targets.")
    return cases


def describe(cases: list) -> str:
    """One line for the user: how many cases, series, targets, references."""
    refs = sum(1 for c in cases for t in c.targets if t.mask is not None)
    pairs = sum(len(c.targets) for c in cases)
    dicom = sum(1 for c in cases if c.dicom)
    return (f"{len(cases)} cases ({dicom} DICOM series), {pairs} case-targets, {refs} with a reference mask")


def settings_key(cases: list) -> str:
    """A fingerprint of what is labelled (case ids and targets), for the resume check."""
    return json.dumps(sorted([c.id, [t.name for t in c.targets]] for c in cases))
