"""Each training record's source slice rendered once per run, kept as a PNG file.

SFT reads every trajectory's plain image again for each epoch; re-rendering it
means reading its whole volume (a CT can be hundreds of MB), in shuffled order,
so a run would be input-bound.  :class:`SliceCache` renders every distinct
source slice once at the start -- records sorted by volume, so each volume is
read once -- into ``folder/<key>.png`` (H x W x 3 uint8, lossless), and the
dataset reads those.  The key covers the source description and the source
file's size and modification time, so an edited volume is rendered again.
It has the renderer's ``rgb(source)`` interface.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from MedSAMAgentLib.durable import write_bytes

from .datasets import SourceRenderer


def slice_key(source: dict) -> str:
    """A file name for ``source`` (changes when the source file changes)."""
    path = Path(source["image"])
    try:
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
    except OSError:
        stamp = None
    text = json.dumps({"source": source, "file": stamp}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:24]


class SliceCache:
    """Source slices as PNG files under ``folder``; ``rendered`` counts the slices this process rendered."""

    def __init__(self, folder: str | Path, renderer: SourceRenderer | None = None):
        self.folder = Path(folder)
        self.renderer = renderer or SourceRenderer()
        self.rendered = 0

    def path(self, source: dict) -> Path:
        return self.folder / f"{slice_key(source)}.png"

    def _render(self, source: dict, path: Path) -> np.ndarray:
        rgb = np.ascontiguousarray(self.renderer.rgb(source), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="PNG")
        write_bytes(path, buffer.getvalue(), "a rendered training slice")
        self.rendered += 1
        return rgb

    def fill(self, records: list[dict], progress: bool = True) -> int:
        """Renders every source slice of ``records`` not yet in the folder, each volume read once;
        returns how many were rendered."""
        from tqdm.auto import tqdm

        todo: dict[Path, dict] = {}
        for record in records:
            path = self.path(record["source"])
            if path not in todo and not path.is_file():
                todo[path] = record["source"]
        order = sorted(todo.items(), key=lambda item: (str(item[1]["image"]), item[1].get("slice", 0)))
        before = self.rendered
        for path, source in tqdm(order, desc="Rendering training slices", unit="slice", disable=not progress or not order):
            self._render(source, path)
        return self.rendered - before

    def rgb(self, source: dict) -> np.ndarray:
        """The slice as the policy saw it (H x W x 3 uint8)."""
        path = self.path(source)
        if path.is_file():
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"))
        return self._render(source, path)
