"""Synthesized records -> the conversations trainers read, built by the engine's profile code.

The conversation of a record is exactly what the policy sees at inference:
:meth:`Profile.build_messages` over the record's images (the plain image, then
the overlay after each box/click, rendered by
:func:`~MedSAMAgentLib.observation.policy_frame`) and its actions formatted by
:func:`~MedSAMAgentLib.actions.format_action`.

* :func:`record_example` renders one record on the fly (PIL images inside the
  messages) -- what our SFT uses.
* :func:`export` writes files for other trainers: ``trl`` (TRL's conversational
  format: ``messages`` with ``{"type": "image"}`` placeholders plus an
  ``images`` list of PNG paths) or ``sharegpt`` (LlamaFactory: ``conversations``
  with ``<image>`` tags, ``system``, ``images``, and a ``dataset_info.json`` entry).
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from MedSAMAgentLib.durable import atomic_output, write_json
from MedSAMAgentLib.actions import action_from_dict, format_action
from MedSAMAgentLib.masks import decode_rle
from MedSAMAgentLib.observation import policy_base, policy_frame
from MedSAMAgentLib.profile import Profile

from .datasets import SourceRenderer
from .synthesis_report import read_records


def iter_records(path: str | Path) -> Iterator[dict]:
    """Records from a synthesis output folder (every trajectories-*.jsonl) or one JSONL file."""
    path = Path(path)
    files = sorted(path.glob("trajectories-*.jsonl")) if path.is_dir() else [path]
    for f in files:
        yield from read_records(f)


def record_frames(record: dict, rgb: np.ndarray, profile: Profile) -> list[np.ndarray]:
    """Policy-size pictures before each action: the plain image, then one overlay per mask."""
    base = policy_base(rgb, profile)
    return [base] + [policy_frame(base, decode_rle(m), profile) for m in record["masks"]]


def record_replies(record: dict) -> list[str]:
    replies = []
    for call in record["actions"]:
        action = action_from_dict(call)
        replies.append(format_action(action))
    return replies


def record_example(record: dict, renderer: SourceRenderer, profile: Profile) -> dict:
    """``{"messages": [...]}`` with PIL images in the image items: one whole trajectory."""
    frames = record_frames(record, renderer.rgb(record["source"]), profile)
    replies = record_replies(record)
    images = [Image.fromarray(f) for f in frames]
    return {"messages": profile.build_messages(record["target"], images, replies), "images": images}


def _placeholder(messages: list[dict]) -> list[dict]:
    """The same messages with image payloads removed (``{"type": "image"}``), for files."""
    out = []
    for m in messages:
        content = [{"type": "image"} if part["type"] == "image" else dict(part) for part in m["content"]]
        out.append({"role": m["role"], "content": content})
    return out


def to_sharegpt(messages: list[dict], image_paths: list[str]) -> dict:
    system = "".join(p["text"] for p in messages[0]["content"] if p["type"] == "text")
    turns = []
    for m in messages[1:]:
        value = "".join("<image>" if p["type"] == "image" else p["text"] for p in m["content"])
        turns.append({"from": "human" if m["role"] == "user" else "gpt", "value": value})
    return {"conversations": turns, "system": system, "images": image_paths}


def export(records: Iterable[dict], out: str | Path, fmt: str = "trl", profile: Profile | None = None,
           name: str = "medsam_agent") -> dict:
    """Write ``out/<name>_<fmt>.jsonl`` and ``out/images/*.png`` (and LlamaFactory's dataset_info.json)."""
    if fmt not in ("trl", "sharegpt"):
        raise ValueError(f"Unknown export format '{fmt}': trl or sharegpt.")
    profile = profile or Profile.load()
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    renderer = SourceRenderer()
    data_file = out / f"{name}_{fmt}.jsonl"
    count = 0
    with atomic_output(data_file, "the exported dataset") as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for record in records:
            example = record_example(record, renderer, profile)
            stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in record["id"])
            stem += f"-{zlib.crc32(record['id'].encode('utf-8')):08x}"  # a/b_c and a_b/c: one readable name, two files
            paths = []
            for t, image in enumerate(example["images"]):
                rel = f"images/{stem}_{t}.png"
                with atomic_output(out / rel, "an exported picture") as picture:
                    image.save(picture, format="PNG")
                paths.append(rel)
            if fmt == "trl":
                row = {"messages": _placeholder(example["messages"]), "images": paths, "id": record["id"]}
            else:
                row = {**to_sharegpt(example["messages"], paths), "id": record["id"]}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    if fmt == "sharegpt":
        info = {name: {"file_name": data_file.name, "formatting": "sharegpt",
                       "columns": {"messages": "conversations", "system": "system", "images": "images"},
                       "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                                "assistant_tag": "gpt"}}}
        write_json(out / "dataset_info.json", info, "the dataset description")
    return {"file": str(data_file), "examples": count}
