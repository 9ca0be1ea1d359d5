"""SAM2-family tool (SAM2.1, MedSAM2) on the ``sam2`` package's ``SAM2ImagePredictor``.

* The model is built from one of the package's SAM2.1 configs (``tiny``,
  ``small``, ``base_plus``, ``large``, or a config name/path such as
  ``configs/sam2.1/sam2.1_hiera_t.yaml``), then a checkpoint is loaded with
  ``torch.load(weights_only=True)`` -- tensors only, no pickled code runs.  No
  checkpoint gives random weights (tests, benchmarks).  MedSAM2
  (``MedSAM2_latest.pt``) uses the hiera-tiny config.
* ``prepare`` encodes each distinct image once at the model's resolution
  (1024 for SAM2.1; the predictor resizes internally) and keeps the embeddings
  in an LRU cache; ``segment`` runs the prompt encoder and mask decoder only.
* Prompt modes: ``released`` -- only the newest prompt (a box, or one click)
  plus the previous turn's low-res logits as ``mask_input``, as the released
  checkpoint's tool was driven; ``cumulative`` -- the newest box and every click
  so far plus the previous logits.
* ``multimask=False`` (the released RL setting) asks for one mask; with True the
  decoder gives three (the authors' evaluation scripts: the predictor's default).  Either way the mask
  with the highest predicted IoU is kept.
* ``precision``: ``bf16`` autocast on CUDA (faster, about half the activation memory) or ``float32``
  (the evaluation scripts ran SAM2 without autocast); on CPU always float32.

Relies on ``SAM2ImagePredictor``'s per-image state (``_features``,
``_orig_hw``), swapped per cache entry; the test suite checks it against
``set_image`` + ``predict``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..actions import PixelBox, PixelPoint, Prompt
from .base import PreparedCache, ToolError, ToolResult, check_rgb, prepare_keys

SAM2_CONFIGS = {
    "tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "large": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
PROMPT_MODES = ("released", "cumulative")


def resolve_config(config: str) -> str:
    """A short name, file name or package path -> the ``configs/...yaml`` name hydra knows."""
    import sam2

    if config in SAM2_CONFIGS:
        return SAM2_CONFIGS[config]
    name = config if config.endswith(".yaml") else config + ".yaml"
    pkg = Path(sam2.__file__).resolve().parent
    for candidate in (name, f"configs/sam2.1/{name}", f"configs/sam2/{name}"):
        if (pkg / candidate).is_file():
            return candidate
    known = ", ".join(list(SAM2_CONFIGS) + [p.name for p in sorted((pkg / "configs/sam2.1").glob("*.yaml"))])
    raise ToolError(f"Unknown SAM2 config '{config}'. Known: {known}.")


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ToolError(f"Device '{device}' was asked for, but no CUDA GPU is available; use device 'cpu' (--device cpu).")
    return str(device)


def load_checkpoint(model, path: str | Path) -> None:
    """Load SAM2 weights safely (tensors only) into ``model``; clear errors for a wrong file."""
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise ToolError(f"Checkpoint not found: {path}. Give the right path, or download MedSAM2 with 'medsam-agent "
                        f"models download medsam2' (other checkpoints: 'medsam-agent models list').")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets one clear message
        raise ToolError(f"Cannot read checkpoint {path} as plain tensors ({type(exc).__name__}: {str(exc)[:200]}). "
                        "Only weights-only checkpoints are loaded.") from None
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise ToolError(f"Checkpoint {path} holds no state dict.")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ToolError(f"Checkpoint {path} does not fit this SAM2 config: {len(missing)} missing and "
                        f"{len(unexpected)} unexpected weights (e.g. {(list(missing) + list(unexpected))[:3]}). "
                        "Check the config (MedSAM2 uses 'tiny').")


class Sam2Tool:
    name = "sam2"
    concurrent_safe = False  # one predictor whose per-image state is swapped per call: one caller at a time

    def __init__(self, config: str = "tiny", checkpoint: str | Path | None = None, device: str | None = "auto",
                 prompt_mode: str = "released", multimask: bool = False, cache_size: int = 16,
                 postprocessing: bool = True, precision: str = "bf16"):
        import torch
        from sam2.build_sam import build_sam2
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        if prompt_mode not in PROMPT_MODES:
            raise ToolError(f"Unknown prompt mode '{prompt_mode}'. Choose one of: {', '.join(PROMPT_MODES)}.")
        self.config = resolve_config(config)
        self.device = resolve_device(device)
        self.prompt_mode = prompt_mode
        self.multimask = bool(multimask)
        if precision not in ("bf16", "float32"):
            raise ToolError(f"Unknown precision '{precision}'; bf16 or float32.")
        self.precision = precision
        self.checkpoint = str(checkpoint) if checkpoint else None
        # postprocessing=True is build_sam2's default (the authors' setting): dynamic multimask fallback.
        model = build_sam2(self.config, ckpt_path=None, device="cpu", apply_postprocessing=postprocessing)
        if checkpoint:
            load_checkpoint(model, checkpoint)
        self.model = model.to(self.device).eval()
        self.predictor = SAM2ImagePredictor(self.model)
        self.cache = PreparedCache(cache_size)
        self.image_size = int(self.model.image_size)
        self._torch = torch

    def _autocast(self):
        """bf16 autocast on CUDA (speed); none in float32 (the authors' evaluation) and on CPU."""
        if self.device.startswith("cuda") and self.precision == "bf16":
            return self._torch.autocast("cuda", dtype=self._torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ protocol
    def prepare(self, images: Sequence[np.ndarray], keys: Sequence[str | None] | None = None) -> list[str]:
        """Encode every image not cached yet (one encoder batch), return their keys."""
        self.cache.reserve(len(images))
        images = [check_rgb(im) for im in images]
        keys = prepare_keys(images, keys)
        todo = {}
        for key, im in zip(keys, images):
            if key in self.cache:
                self.cache.get(key)
            else:
                todo.setdefault(key, np.ascontiguousarray(im))
        if todo:
            with self._torch.inference_mode(), self._autocast():
                todo_keys = list(todo)
                if len(todo_keys) == 1:
                    self.predictor.set_image(todo[todo_keys[0]])
                else:
                    self.predictor.set_image_batch([todo[k] for k in todo_keys])
                feats, hws = self.predictor._features, self.predictor._orig_hw
                # each image's own copy of its features: a view would keep the whole batch's memory
                # alive for as long as any one of its images stays in the cache
                def own(t, i):
                    return t[i:i + 1].clone() if len(todo_keys) > 1 else t[i:i + 1]

                for i, key in enumerate(todo_keys):
                    self.cache.put(key, ({"image_embed": own(feats["image_embed"], i),
                                          "high_res_feats": [own(f, i) for f in feats["high_res_feats"]]},
                                         [tuple(hws[i])]))
            self.predictor.reset_predictor()
        return keys

    def release(self, key: str) -> None:
        self.cache.pop(key)

    def select_prompts(self, prompts: Sequence[Prompt], mode: str | None = None) -> tuple[PixelBox | None, list[PixelPoint]]:
        """The box and clicks sent to the decoder this turn, per the prompt mode (default: the tool's)."""
        if not prompts:
            return None, []
        if (mode or self.prompt_mode) == "released":
            newest = prompts[-1]
            return (newest, []) if isinstance(newest, PixelBox) else (None, [newest])
        boxes = [p for p in prompts if isinstance(p, PixelBox)]
        return (boxes[-1] if boxes else None), [p for p in prompts if isinstance(p, PixelPoint)]

    def segment(self, key: str, prompts: Sequence[Prompt], previous: Any = None, *,
                prompt_mode: str | None = None) -> ToolResult:
        features, orig_hw = self.cache.get(key)
        if prompt_mode is not None and prompt_mode not in PROMPT_MODES:
            raise ToolError(f"Unknown prompt mode '{prompt_mode}'. Choose one of: {', '.join(PROMPT_MODES)}.")
        box, points = self.select_prompts(prompts, prompt_mode)
        if box is None and not points:
            raise ToolError("SAM2 needs at least one box or click.")
        p = self.predictor
        p._features, p._orig_hw, p._is_image_set, p._is_batch = features, orig_hw, True, False
        try:
            with self._torch.inference_mode(), self._autocast():
                masks, scores, logits = p.predict(
                    point_coords=np.array([[q.x, q.y] for q in points], np.float32) if points else None,
                    point_labels=np.array([1 if q.positive else 0 for q in points], np.int32) if points else None,
                    box=np.array([box.x1, box.y1, box.x2, box.y2], np.float32) if box is not None else None,
                    mask_input=None if previous is None else np.asarray(previous, np.float32).reshape(1, *np.shape(previous)[-2:]),
                    multimask_output=self.multimask,
                )
        finally:
            p.reset_predictor()
        best = int(np.argmax(scores))
        return ToolResult(masks[best] > 0, logits[best][None].astype(np.float32), float(scores[best]))
