"""Evaluation manifests: ``{"cases": [{"id", "modality", "dim", "image", "targets": {name: {"mask", "values"?}}}]}``.

Paths are relative to the manifest's folder; ``values`` lists the label values
that make up a target (absent: any non-zero pixel).  Other keys are kept in
``extra``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .file_access import parse_user_path
from .image_io import InputError


@dataclass
class TargetSpec:
    name: str
    mask: Path
    values: list | None = None


@dataclass
class CaseSpec:
    id: str
    modality: str
    dim: int
    image: Path
    targets: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def load_manifest(path: str | Path) -> list[CaseSpec]:
    """Read and check a manifest; raises InputError with what is wrong."""
    from .json_files import read_json_file

    path = parse_user_path(path, "manifest path")
    if path.is_dir():
        raise InputError(f"{path} is a folder; give its manifest file (e.g. {path / 'cases.json'}).")
    if not path.is_file() and not path.exists():
        raise InputError(f"No manifest at {path}.")
    data = read_json_file(path, "the manifest")
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list) or not data["cases"]:
        raise InputError(f"The manifest {path} has no 'cases' list.")
    root = path.resolve().parent  # absolute: records made from it are usable from any folder
    cases, seen = [], set()
    for n, c in enumerate(data["cases"]):
        where = f"case #{n + 1}" + (f" ({c.get('id')})" if isinstance(c, dict) and c.get("id") else "")
        if not isinstance(c, dict) or not all(k in c for k in ("id", "image", "targets")):
            raise InputError(f"{where} of {path.name} needs 'id', 'image' and 'targets'.")
        if not isinstance(c["id"], (str, int)) or isinstance(c["id"], bool) or not str(c["id"]).strip():
            raise InputError(f"{where} of {path.name}: 'id' must be a text (or a number).")
        if not isinstance(c["image"], str) or not c["image"].strip():
            raise InputError(f"{where} of {path.name}: 'image' must be a path (a text).")
        if c["id"] in seen:
            raise InputError(f"{where}: the id '{c['id']}' appears twice in {path.name}.")
        seen.add(c["id"])
        if not isinstance(c["targets"], dict) or not c["targets"]:
            raise InputError(f"{where} of {path.name} has no targets.")
        targets = []
        for name, t in c["targets"].items():
            if not isinstance(t, dict) or not isinstance(t.get("mask"), str) or not t["mask"].strip():
                raise InputError(f"{where}, target '{name}': needs a 'mask' path (a text).")
            values = t.get("values")
            if values is not None and (not isinstance(values, list) or not values or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
                raise InputError(f"{where}, target '{name}': 'values' must be a list of label numbers.")
            if values and 0 in values:
                raise InputError(f"{where}, target '{name}': 'values' holds 0, the background; list the target's own "
                                 f"label values.")
            targets.append(TargetSpec(str(name), root / t["mask"], values))
        dim = c.get("dim", 3 if c["image"].lower().endswith((".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")) else 2)
        if dim not in (2, 3) or isinstance(dim, bool):
            raise InputError(f"{where} of {path.name}: 'dim' must be 2 or 3, not {json.dumps(dim)}.")
        cases.append(CaseSpec(str(c["id"]), str(c.get("modality", "unknown")), dim, root / c["image"], targets,
                              {k: v for k, v in c.items() if k not in ("id", "modality", "dim", "image", "targets")}))
    return cases
