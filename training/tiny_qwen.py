"""A tiny Qwen3-VL built from scratch, offline: tokenizer, processor and model.

Used by the test suite (no weights are ever downloaded) and as the starting
point of toy-world training.  The tokenizer is a byte-level BPE trained on the
profile's own strings plus tool-call examples, with Qwen's chat and vision
special tokens; the chat template is ChatML as Qwen3-VL renders it, with the
assistant part marked by ``{% generation %}`` so ``return_assistant_tokens_mask``
finds the assistant tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

from MedSAMAgentLib.actions import Box, Point, Stop, format_action
from MedSAMAgentLib.profile import Profile

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
TOOL_TOKENS = ["<tool_call>", "</tool_call>"]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _corpus(profile: Profile, extra: list[str]) -> list[str]:
    lines = [profile.system_prompt, profile.first_user_text, profile.later_user_text, *extra]
    for v in range(0, 1000, 7):
        lines.append(format_action(Box(v % 500, v // 2, 500 + v % 499, 999 - v // 3)))
        lines.append(format_action(Point(v, 999 - v, v % 2 == 0)))
    lines.append(format_action(Stop()))
    lines.extend(" ".join(str(i) for i in range(k, k + 50)) for k in range(0, 1000, 50))
    return lines


def build_tokenizer(profile: Profile | None = None, vocab_size: int = 3000, extra_texts: list[str] | None = None):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with Qwen's special tokens, trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    profile = profile or Profile.load()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(profile, extra_texts or []), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})
    fast.add_tokens(TOOL_TOKENS)  # single, non-special tokens, as in Qwen's vocabulary
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(tokenizer, patch_size: int = 16, merge_size: int = 2):
    """A ``Qwen3VLProcessor`` around ``tokenizer`` with Qwen3-VL's image settings."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(
        patch_size=patch_size, temporal_patch_size=2, merge_size=merge_size,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": (patch_size * merge_size) ** 2 * 4, "longest_edge": (patch_size * merge_size) ** 2 * 16384})
    video_processor = Qwen3VLVideoProcessor(patch_size=patch_size, temporal_patch_size=2, merge_size=merge_size)
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                            chat_template=CHAT_TEMPLATE)


def build_model(tokenizer, hidden_size: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                vision_depth: int = 2, vision_hidden: int = 64, patch_size: int = 16, merge_size: int = 2,
                seed: int = 0, intermediate_size: int | None = None, vision_heads: int = 4,
                vision_intermediate: int | None = None, vocab_size: int | None = None, tie_embeddings: bool = False):
    """A randomly initialised ``Qwen3VLForConditionalGeneration`` sized by the arguments
    (``vocab_size`` larger than the tokenizer pads the embedding, to match a real model's size)."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    head_dim = hidden_size // heads
    quarter = head_dim // 4  # M-RoPE sections (t, h, w) sum to head_dim / 2
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config={"hidden_size": hidden_size, "intermediate_size": intermediate_size or hidden_size * 2, "num_hidden_layers": layers,
                     "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
                     "vocab_size": max(len(tokenizer), vocab_size or 0), "pad_token_id": tokenizer.pad_token_id,
                     "max_position_embeddings": 8192,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter],
                                         "mrope_interleaved": True}},
        vision_config={"depth": vision_depth, "hidden_size": vision_hidden, "intermediate_size": vision_intermediate or vision_hidden * 2,
                       "num_heads": vision_heads, "patch_size": patch_size, "spatial_merge_size": merge_size,
                       "temporal_patch_size": 2, "out_hidden_size": hidden_size, "num_position_embeddings": 256,
                       "deepstack_visual_indexes": list(range(min(2, vision_depth)))},
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=tie_embeddings,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False
    return model


def build_tiny_qwen3vl(out_dir: str | Path, profile: Profile | None = None, seed: int = 0, **model_kwargs) -> Path:
    """Build and save a tiny Qwen3-VL (model + processor) to ``out_dir``; loadable offline by path."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(profile)
    processor = build_processor(tokenizer, model_kwargs.get("patch_size", 16), model_kwargs.get("merge_size", 2))
    model = build_model(tokenizer, seed=seed, **model_kwargs)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "medsam_agent_tiny.json").write_text(json.dumps({"built_by": "medsam_training.tiny_qwen", "seed": seed}))
    return out_dir
