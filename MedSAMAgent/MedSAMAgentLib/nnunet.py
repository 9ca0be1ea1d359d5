"""An nnU-Net v2 dataset folder read once, for labelling (engine) and for synthesis (training).

``dataset.json`` gives ``labels`` (name -> value or list of values; ``background`` left out),
``file_ending`` (default ``.nii.gz``) and ``channel_names`` (or the older ``modality``); a case is
``imagesTr/<case>_0000<ending>`` (channel 0 only) with its reference ``labelsTr/<case><ending>``,
or ``imagesTs/<case>_0000<ending>`` without one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .image_io import InputError
from .json_files import read_json_file


@dataclass
class NnunetCase:
    id: str
    image: Path  # channel 0000
    labels: Path | None  # labelsTr/<id><ending> when it exists (imagesTr only)
    split: str  # "imagesTr" or "imagesTs"


@dataclass
class NnunetDataset:
    labels: dict  # target name -> [label values], background left out
    modality: str  # channel 0's name ("CT", "T2", ...; "" when not given)
    ending: str  # the files' ending, e.g. ".nii.gz"
    cases: list  # [NnunetCase], imagesTr then imagesTs, each sorted by file name


def read_nnunet(root: Path, splits=("imagesTr", "imagesTs")) -> NnunetDataset:
    """The dataset at ``root``; InputError naming ``dataset.json`` and what it should hold when it is not v2."""
    meta = read_json_file(root / "dataset.json", "the nnU-Net dataset.json")
    if not isinstance(meta, dict):
        raise InputError(f"{root / 'dataset.json'} holds a JSON {type(meta).__name__}; it should be an nnU-Net v2 "
                         f"dataset.json (a JSON object with 'labels', 'channel_names' and 'file_ending').")
    ending = meta.get("file_ending", ".nii.gz")
    channels = meta.get("channel_names") or meta.get("modality") or {}
    labels = meta.get("labels", {})
    if not isinstance(ending, str) or not isinstance(channels, dict) or not isinstance(labels, dict) or not all(
            isinstance(v, int) or (isinstance(v, list) and all(isinstance(x, int) for x in v))
            for v in labels.values()):
        raise InputError(f"{root / 'dataset.json'} is not an nnU-Net v2 dataset.json: 'labels' maps each name to "
                         f"a label value (or a list of values), 'channel_names' maps channels to names and "
                         f"'file_ending' is a text such as \".nii.gz\".")
    cases = []
    for split in splits:
        folder = root / split
        for image in sorted(folder.glob(f"*_0000{ending}")) if folder.is_dir() else []:
            cid = image.name[: -len(f"_0000{ending}")]
            ref = root / "labelsTr" / f"{cid}{ending}"
            cases.append(NnunetCase(cid, image, ref if split == "imagesTr" and ref.is_file() else None, split))
    return NnunetDataset({str(k): [int(x) for x in (v if isinstance(v, list) else [v])]
                                for k, v in labels.items() if str(k).lower() != "background"},
                         str(next(iter(channels.values()), "")) if channels else "", ending, cases)
