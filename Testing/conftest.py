"""Shared fixtures: synthetic images, a tiny Qwen3-VL built offline, SAM2 hiera-tiny with random weights."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[2] / "shared"


def synthetic_case(seed: int, size=(320, 256), kind: str | None = None):
    """A noisy grayscale image (H x W uint8) with one or two shapes and the reference mask of the first.

    ``size`` is (width, height).  Shapes: ellipse, rectangle, triangle or a two-lobed blob.
    """
    import cv2

    rng = np.random.default_rng(seed)
    w, h = size
    kinds = ("ellipse", "rectangle", "triangle", "lobes")
    kind = kind or kinds[seed % len(kinds)]
    ref = np.zeros((h, w), np.uint8)
    cx, cy = rng.uniform(0.35, 0.65) * w, rng.uniform(0.35, 0.65) * h
    rx, ry = rng.uniform(0.12, 0.25) * w, rng.uniform(0.12, 0.25) * h
    if kind == "ellipse":
        cv2.ellipse(ref, (int(cx), int(cy)), (int(rx), int(ry)), float(rng.uniform(0, 180)), 0, 360, 1, -1)
    elif kind == "rectangle":
        cv2.rectangle(ref, (int(cx - rx), int(cy - ry)), (int(cx + rx), int(cy + ry)), 1, -1)
    elif kind == "triangle":
        pts = np.array([[cx, cy - ry], [cx - rx, cy + ry], [cx + rx, cy + ry]], np.int32)
        cv2.fillPoly(ref, [pts], 1)
    else:
        cv2.circle(ref, (int(cx - rx / 2), int(cy)), int(min(rx, ry) * 0.7), 1, -1)
        cv2.circle(ref, (int(cx + rx / 2), int(cy + ry / 3)), int(min(rx, ry) * 0.6), 1, -1)
    bright = rng.uniform(150, 210)
    image = rng.normal(70, 18, (h, w)) + ref * (bright - 70)
    image = cv2.GaussianBlur(image.astype(np.float32), (3, 3), 0)
    return np.clip(image, 0, 255).astype(np.uint8), ref.astype(bool)


def write_volume(path, label_path=None, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), n=9):
    """A small CT-like volume (HU) with a blob on the middle slices, and its label map (label 3)."""
    import SimpleITK as sitk

    imgs, labels = [], []
    for k in range(n):
        gray, ref = synthetic_case(k % 4 + 10, size=(64, 48), kind="ellipse")
        on = 2 <= k <= n - 3
        imgs.append(np.where(ref & on, 60 + gray * 0.3, -900 + gray * 0.5 + 800 * (gray > 40)).astype(np.int16))
        labels.append((ref & on).astype(np.uint8) * 3)
    img = sitk.GetImageFromArray(np.stack(imgs))
    img.SetSpacing((0.8, 0.8, 2.0))
    img.SetOrigin((-20, 30, 100))
    img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    if label_path:
        lab = sitk.GetImageFromArray(np.stack(labels))
        lab.CopyInformation(img)
        sitk.WriteImage(lab, str(label_path))
    return img


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    """A random-weight tiny Qwen3-VL with an offline tokenizer and processor, saved to disk."""
    from medsam_training.tiny_qwen import build_tiny_qwen3vl

    return build_tiny_qwen3vl(tmp_path_factory.mktemp("tiny_qwen"))


SCRIPTED_REPLIES = (
    '<tool_call>\n{"name": "add_bbox", "arguments": {"bbox_2d": [250, 250, 750, 750]}}\n</tool_call>',
    '<tool_call>\n{"name": "add_point", "arguments": {"point_2d": [500, 500], "point_type": "positive"}}\n</tool_call>',
    '<tool_call>\n{"name": "stop_action", "arguments": {}}\n</tool_call>',
)


@pytest.fixture(scope="session")
def taught_qwen_dir(tiny_qwen_dir, tmp_path_factory) -> Path:
    """The tiny Qwen3-VL taught (a short training run on CPU) to answer box, then click, then stop.

    Lets the tests drive full episodes through a real generate loop: the model must
    follow the conversation the profile builds to know which turn it is on.
    """
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from MedSAMAgentLib.observation import overlay, resize_mask, resize_rgb, to_rgb
    from MedSAMAgentLib.profile import Profile

    profile = Profile.load()
    processor = AutoProcessor.from_pretrained(tiny_qwen_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen_dir)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    w, h = profile.policy_image_size
    batches = []
    for i in range(16):  # varied images, so the model has to read the turn from the text
        if i % 2:
            gray, mask = synthetic_case(100 + i)
            base = resize_rgb(to_rgb(gray), (w, h))
            mask = resize_mask(mask, (w, h))
        else:
            base = np.repeat(rng.integers(0, 255, (h, w, 1), dtype=np.uint8), 3, axis=2)
            mask = np.zeros((h, w), bool)
            y0, x0 = rng.integers(0, h // 2, 2)
            mask[y0:y0 + rng.integers(20, h // 2), x0:x0 + rng.integers(20, w // 2)] = True
        images = [Image.fromarray(base)] + [Image.fromarray(overlay(base, mask))] * 2
        msgs = profile.build_messages(["liver", "spleen", "left kidney", "tumour"][i % 4], images, list(SCRIPTED_REPLIES))
        enc = processor.apply_chat_template(msgs, tokenize=True, return_dict=True, return_tensors="pt",
                                            return_assistant_tokens_mask=True)
        labels = enc["input_ids"].clone()
        labels[enc.pop("assistant_masks") == 0] = -100  # loss on the assistant's tool calls only
        batches.append((enc, labels))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    for step in range(160):
        enc, labels = batches[step % len(batches)]
        model(**enc, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        warmup.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("taught_qwen")
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def sam2_tool():
    """SAM2.1 hiera-tiny with random weights on CPU (released prompt mode)."""
    from MedSAMAgentLib.tools import create_tool

    return create_tool("sam2", config="tiny", checkpoint=None, device="cpu", prompt_mode="released")


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """A model hub (``test_models.Hub``) on 127.0.0.1, with the model cache in ``tmp_path/home``."""
    from test_models import Hub

    import huggingface_hub.constants

    server = Hub()
    # the test session is offline (above); downloads from this hub are the one exception
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("MEDSAM_AGENT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEDSAM_AGENT_HF_ENDPOINT", server.url)
    yield server
    server.close()


def rotation(axis: int, degrees: float) -> np.ndarray:
    """A 3x3 rotation by ``degrees`` about axis 0, 1 or 2 (for oblique volume directions)."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [i for i in range(3) if i != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r
