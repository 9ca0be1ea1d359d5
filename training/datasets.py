"""Datasets in: evaluation manifests, nnU-Net v2 folders and 2D image/mask folders, as slice samples.

Every source becomes *units* (one target of one case, with all its slices) that
yield :class:`SliceSample` s -- the display image the policy would see, the
reference mask and where they came from, so a record can be re-rendered later.

* manifest: ``{"cases": [...]}`` (see the engine's :mod:`manifest`);
* nnU-Net v2: ``dataset.json`` (``labels``: name -> value, ``file_ending``),
  ``imagesTr/<case>_0000<ending>``, ``labelsTr/<case><ending>``; the modality
  comes from ``channel_names`` (``CT`` selects CT windowing);
* 2D folder: ``images/<case>.<png|jpg|...>`` and ``masks/<case>/<target>.png``
  (one mask per target); target text from ``targets.json`` (mask stem -> text)
  when present, else from the mask's name.

Target text: an optional synonyms file (JSON, name -> text) maps label names
("kidney_left" -> "left kidney"); otherwise underscores become spaces.
3D volumes are cut along ``axis`` (LPS, as the engine does); slice sampling:
``all`` slices containing the target, ``every:K`` (every K-th of them) or
``count:N`` (N spread evenly).  Slices whose target area is below ``min_area``
pixels are skipped and counted.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from MedSAMAgentLib.json_files import read_json_file
from MedSAMAgentLib.image_io import IMAGE_2D_SUFFIXES, InputError, load_image, load_mask
from MedSAMAgentLib.manifest import load_manifest
from MedSAMAgentLib.nnunet import read_nnunet
from MedSAMAgentLib.observation import Window, apply_window, choose_window, to_display, to_rgb
from MedSAMAgentLib.volume import OrientedVolume


@dataclass
class SliceSample:
    """One training image: ``rgb`` (H x W x 3 uint8, as the policy sees it before resizing),
    ``reference`` (H x W bool), and ``source`` -- enough to render it again:
    ``{"image": path, "dim": 2|3, "axis", "slice", "window": [lo, hi] | None}``."""

    key: str
    case: str
    target: str
    rgb: np.ndarray
    reference: np.ndarray
    source: dict


@dataclass
class Unit:
    """One target of one case: the unit of work, of sharding and of resuming."""

    key: str
    case: str
    image: Path
    target_name: str
    target_text: str
    mask: Path
    values: list | None = None
    modality: str = ""
    extra: dict = field(default_factory=dict)

    def shard(self, count: int) -> int:
        """Deterministic shard of this unit among ``count`` (stable across machines and runs)."""
        return zlib.crc32(self.key.encode("utf-8")) % max(1, count)


def target_text(name: str, synonyms: dict | None = None) -> str:
    if synonyms and name in synonyms:
        return str(synonyms[name])
    return name.replace("_", " ").strip()


def load_synonyms(path: str | Path | None) -> dict:
    if not path:
        return {}
    data = read_json_file(path, "the synonyms file")
    if not isinstance(data, dict):
        raise InputError(f"The synonyms file {path} must map label names to target texts.")
    return data


def detect_format(path: Path) -> str:
    if path.is_file() and path.suffix == ".json":
        return "manifest"
    if (path / "dataset.json").is_file() and (path / "imagesTr").is_dir():
        return "nnunet"
    if (path / "images").is_dir() and (path / "masks").is_dir():
        return "folder"
    raise InputError(f"{path} is not a dataset I know: give a manifest .json, an nnU-Net v2 folder (dataset.json, "
                     f"imagesTr/, labelsTr/) or a folder with images/ and masks/<case>/<target>.png.")


def list_units(dataset: str | Path, fmt: str = "auto", synonyms: dict | None = None) -> list[Unit]:
    """Every (case, target) unit of a dataset, in a stable order."""
    path = Path(dataset).expanduser()
    if not path.exists():
        raise InputError(f"No dataset at {path}.")
    path = path.resolve()  # records keep absolute paths: export and training may run from elsewhere
    fmt = detect_format(path) if fmt == "auto" else fmt
    units: list[Unit] = []
    if fmt == "manifest":
        for case in load_manifest(path):
            for t in case.targets:
                units.append(Unit(f"{case.id}/{t.name}", case.id, case.image, t.name, target_text(t.name, synonyms),
                                  t.mask, t.values, case.modality))
    elif fmt == "nnunet":
        data = read_nnunet(path, splits=("imagesTr",))
        for case in data.cases:
            label_file = case.labels or path / "labelsTr" / f"{case.id}{data.ending}"  # missing: said when loaded
            for name, values in data.labels.items():
                units.append(Unit(f"{case.id}/{name}", case.id, case.image, name, target_text(name, synonyms),
                                  label_file, values, data.modality))
    elif fmt == "folder":
        mapping = {}
        if (path / "targets.json").is_file():
            mapping = _json_object(path / "targets.json", "targets.json (mask name -> target text)")
            if not all(isinstance(v, str) for v in mapping.values()):
                raise InputError(f"{path / 'targets.json'} maps mask names to target texts; every value must be a text.")
        for image in sorted(p for p in (path / "images").iterdir() if p.suffix.lower() in IMAGE_2D_SUFFIXES):
            for mask in sorted((path / "masks" / image.stem).glob("*.png")):
                text = mapping.get(mask.stem) or target_text(mask.stem, synonyms)
                units.append(Unit(f"{image.stem}/{mask.stem}", image.stem, image, mask.stem, text, mask))
    else:
        raise InputError(f"Unknown dataset format '{fmt}' (manifest, nnunet, folder or auto).")
    if not units:
        raise InputError(f"The dataset {path} holds no (case, target) pairs.")
    seen: dict = {}
    for u in units:  # e.g. images/a.png and images/a.jpg: one name, two images
        if u.key in seen and seen[u.key] != u.image:
            raise InputError(f"Two images of {path} have the same name ({Path(seen[u.key]).name}, {Path(u.image).name}); "
                             f"rename one.")
        seen[u.key] = u.image
    return units


def _json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object; InputError naming the file and what it should be."""
    data = read_json_file(path, what)
    if not isinstance(data, dict):
        raise InputError(f"{path} holds a JSON {type(data).__name__}; it should be {what} (a JSON object).")
    return data


def choose_slices(present: np.ndarray, sampling: str) -> np.ndarray:
    """Pick from the slice indices that contain the target: ``all`` | ``every:K`` | ``count:N``."""
    kind, _, arg = sampling.partition(":")
    if kind == "all":
        return present
    try:
        n = int(arg)
    except ValueError:
        raise InputError(f"Slice sampling '{sampling}' is not all, every:K or count:N.") from None
    if n < 1:
        raise InputError(f"Slice sampling '{sampling}' needs a positive number.")
    if kind == "every":
        return present[::n]
    if kind == "count":
        if present.size <= n:
            return present
        return present[np.unique(np.round(np.linspace(0, present.size - 1, n)).astype(int))]
    raise InputError(f"Slice sampling '{sampling}' is not all, every:K or count:N.")


@dataclass
class UnitSamples:
    samples: list
    skipped_small: int = 0


def unit_samples(unit: Unit, axis: str = "axial", sampling: str = "all", min_area: int = 0,
                 negatives: bool = False) -> UnitSamples:
    """The slice samples of one unit (raises InputError for an unreadable or mismatched case).

    With ``negatives``, one slice without the target (the nearest empty one) is added
    per unit, whose correct answer is an immediate stop.
    """
    loaded = load_image(unit.image)
    ref_all = load_mask(unit.mask, unit.values, like=loaded)
    ct = unit.modality.strip().upper() == "CT"
    samples, small = [], 0
    if loaded.dim == 2:
        ref = ref_all[..., 0] if ref_all.ndim == 3 else ref_all
        rgb = to_display(loaded.array, "CT" if ct and loaded.array.ndim == 2 else None)
        if int(ref.sum()) < max(1, min_area):
            return UnitSamples([], 1)
        source = {"image": str(unit.image), "dim": 2, "axis": None, "slice": None, "window": None, "ct": ct}
        return UnitSamples([SliceSample(unit.key, unit.case, unit.target_text, rgb, ref, source)])
    vol = OrientedVolume(loaded.image)
    window = choose_window(np.asarray(vol.array), "CT" if ct else None)
    ref = vol.from_original(ref_all)
    a = vol.axis_index(axis)
    areas = ref.sum(axis=tuple(i for i in range(3) if i != a))
    present = np.nonzero(areas > 0)[0]
    big = present[areas[present] >= max(1, min_area)]
    small = int(present.size - big.size)
    chosen = list(choose_slices(big, sampling))
    if negatives and present.size:
        empty = [i for i in range(vol.num_slices(axis)) if areas[i] == 0]
        if empty:
            chosen.append(min(empty, key=lambda i: min(abs(i - present[0]), abs(i - present[-1]))))
    for i in chosen:
        i = int(i)
        rgb = to_rgb(apply_window(vol.slice(axis, i), window))
        source = {"image": str(unit.image), "dim": 3, "axis": axis, "slice": i, "window": [window.lo, window.hi]}
        samples.append(SliceSample(f"{unit.key}/{axis}:{i}", unit.case, unit.target_text, rgb,
                                   vol.slice(axis, i, ref), source))
    return UnitSamples(samples, small)


class SourceRenderer:
    """Renders a record's source image again (the RGB the policy saw), caching the last volumes read."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._volumes: dict[str, object] = {}

    def rgb(self, source: dict) -> np.ndarray:
        path = source["image"]
        if source.get("dim", 2) == 2:
            loaded = load_image(path)
            return to_display(loaded.array, None if loaded.array.ndim == 3 else ("CT" if source.get("ct") else None))
        vol = self._volumes.get(path)
        if vol is None:
            vol = OrientedVolume(load_image(path).image)
            if len(self._volumes) >= self.capacity:
                self._volumes.pop(next(iter(self._volumes)))
            self._volumes[path] = vol
        lo, hi = source["window"]
        return to_rgb(apply_window(vol.slice(source["axis"], int(source["slice"])), Window(lo, hi)))
