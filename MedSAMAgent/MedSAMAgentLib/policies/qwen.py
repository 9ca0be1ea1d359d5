"""Qwen3-VL policy on transformers: the released MedSAM-Agent checkpoint, base
Qwen3-VL models, our own fine-tunes, or a tiny model built in code.

* Loads any local folder or hub id with ``AutoProcessor`` and
  ``AutoModelForImageTextToText`` (``local_files_only`` for offline sites).
* bf16 on CUDA, float32 on CPU; ``quantization="4bit"|"8bit"`` loads through
  bitsandbytes (CUDA only) for 8-12 GB cards.
* The conversation comes from :meth:`Profile.build_messages`; many episodes go
  through one left-padded ``generate`` call (``batch_size`` at a time).
* Greedy decoding, at most the profile's ``max_new_tokens`` (128) new tokens.
  Vision and chat-structure tokens (``<|image_pad|>``, ``<|vision_start|>``, ...)
  are suppressed: a policy that emitted them would break the next turn's input.
* The reply is decoded with special tokens skipped (as the authors did) and
  parsed with :func:`~MedSAMAgentLib.actions.parse_action`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..actions import parse_action
from ..profile import Profile
from .base import Decision, Observation, PolicyError

SUPPRESSED_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>",
                     "<|vision_pad|>", "<|im_start|>", "<|box_start|>", "<|box_end|>",
                     "<|quad_start|>", "<|quad_end|>", "<|object_ref_start|>", "<|object_ref_end|>")


class QwenPolicy:
    name = "qwen"

    def __init__(self, model: str | Path, profile: Profile | None = None, device: str | None = "auto",
                 quantization: str | None = None, batch_size: int = 8, max_new_tokens: int | None = None,
                 local_files_only: bool = False, dtype: str | None = None):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.profile = profile or Profile.load()
        self.batch_size = max(1, int(batch_size))
        self.max_new_tokens = int(max_new_tokens or self.profile.max_new_tokens)
        self.model_id = str(model)
        cuda = torch.cuda.is_available()
        if device in (None, "", "auto"):
            device = "cuda" if cuda else "cpu"
        if str(device).startswith("cuda") and not cuda:
            raise PolicyError(f"Device '{device}' was asked for, but no CUDA GPU is available; use device 'cpu' (--device cpu).")
        self.device = str(device)
        if dtype is None:
            torch_dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
        kwargs = {"dtype": torch_dtype, "local_files_only": local_files_only}
        if quantization:
            if quantization not in ("4bit", "8bit"):
                raise PolicyError(f"quantization must be '4bit' or '8bit', got '{quantization}'.")
            if not self.device.startswith("cuda"):
                raise PolicyError("4-bit and 8-bit loading needs a CUDA GPU (bitsandbytes); on CPU load the full model.")
            try:
                from transformers import BitsAndBytesConfig
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise PolicyError("4-bit/8-bit loading needs bitsandbytes: pip install 'medsam-agent[quant]'.") from None
            kwargs["quantization_config"] = (
                BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
                if quantization == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
            kwargs["device_map"] = {"": self.device}
        try:
            self.processor = AutoProcessor.from_pretrained(str(model), local_files_only=local_files_only)
            self.model = AutoModelForImageTextToText.from_pretrained(str(model), **kwargs)
        except OSError as exc:
            raise PolicyError(f"Cannot load the policy '{model}': {str(exc).splitlines()[0].rstrip('.')}. Give a local "
                              "model folder, or download it first ('medsam-agent models download NAME'; the names: "
                              "'medsam-agent models list').") from None
        except ValueError as exc:  # transformers: a folder without a recognisable model or processor
            raise PolicyError(f"'{model}' is not a Qwen3-VL model folder ({str(exc).splitlines()[0][:120]}); give the "
                              "folder a training run wrote (its final/), or a catalogue name.") from None
        if not quantization:
            self.model.to(self.device)
        self.model.eval()
        tok = self.processor.tokenizer
        tok.padding_side = "left"
        vocab = tok.get_vocab()
        self.suppress_ids = sorted({vocab[t] for t in SUPPRESSED_TOKENS if t in vocab})
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.last_token_counts: list[int] = []
        self._torch = torch

    def messages(self, obs: Observation) -> list[dict]:
        """The chat messages for one observation, as the profile builds them."""
        images = [Image.fromarray(np.asarray(im)) for im in obs.images]
        return self.profile.build_messages(obs.target, images, obs.replies)

    def generate(self, conversations: list[list[dict]]) -> list[str]:
        """Greedy replies for a batch of conversations (each ending on a user turn)."""
        torch = self._torch
        inputs = self.processor.apply_chat_template(
            conversations, tokenize=True, add_generation_prompt=True, return_dict=True,
            return_tensors="pt", processor_kwargs={"padding": True})
        inputs = inputs.to(self.model.device)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                suppress_tokens=self.suppress_ids or None, pad_token_id=self.pad_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        self.last_token_counts = (new != self.pad_id).sum(dim=1).tolist()  # new tokens per reply, for logs
        return self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)

    def act(self, observations: Sequence[Observation]) -> list[Decision]:
        out: list[Decision] = []
        for start in range(0, len(observations), self.batch_size):
            chunk = observations[start:start + self.batch_size]
            texts = self.generate([self.messages(o) for o in chunk])
            out.extend(Decision(t, parse_action(t)) for t in texts)
        return out
