"""Sampling settings for the RL rollout, in the words of each generation backend.

The policy must never emit a vision or chat-structure token (a sampled
``<|image_pad|>`` would break the next turn's image features) and a reply ends
at ``<|im_end|>``.  TRL hands ``GRPOConfig.generation_kwargs`` unchanged to the
backend it generates with, so they must be written in that backend's terms:

* transformers ``generate`` (``GenerationConfig``): ``suppress_tokens`` (ids) and
  ``eos_token_id``;
* vLLM ``SamplingParams`` (colocated, or forwarded by TRL's client to
  ``trl vllm-serve``): ``bad_words`` (the tokens' strings; vLLM tokenizes each
  into its single special-token id) and ``stop_token_ids``.  vLLM has no
  ``suppress_tokens``: given the transformers words, colocate mode fails at its
  first generation and server mode forwards them raw.

:func:`check_with_vllm` builds vLLM's own ``SamplingParams`` from the settings
where vLLM is installed, at the start of a run rather than at its first rollout.
"""
from __future__ import annotations

import importlib.util

from MedSAMAgentLib.image_io import InputError
from MedSAMAgentLib.policies.qwen import SUPPRESSED_TOKENS

BACKENDS = ("transformers", "vllm")


def suppressed_tokens(tokenizer) -> list[tuple[str, int]]:
    """(text, id) of every vision and chat-structure token in the tokenizer's vocabulary, by id."""
    vocab = tokenizer.get_vocab()
    return sorted(((t, vocab[t]) for t in SUPPRESSED_TOKENS if t in vocab), key=lambda p: p[1])


def generation_kwargs(tokenizer, backend: str) -> dict:
    """``GRPOConfig.generation_kwargs`` for ``backend`` (``transformers`` or ``vllm``)."""
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    banned = suppressed_tokens(tokenizer)
    if backend == "transformers":
        return {"suppress_tokens": [i for _, i in banned], "eos_token_id": end_id}
    if backend == "vllm":
        return {"bad_words": [t for t, _ in banned], "stop_token_ids": [end_id]}
    raise ValueError(f"unknown generation backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def vllm_importable() -> bool:
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def check_with_vllm(kwargs: dict, tokenizer) -> list[list[int]]:
    """vLLM's ``SamplingParams(**kwargs)``, its bad words tokenized as vLLM does; returns the
    banned token-id sequences.  Raises :class:`InputError` when vLLM refuses the settings or a
    banned token does not tokenize to its single id (it would not be banned)."""
    from vllm.sampling_params import SamplingParams

    try:  # the tokenizer as vLLM's engine wraps it (vocabulary bounds)
        from vllm.tokenizers.hf import get_cached_tokenizer

        tokenizer = get_cached_tokenizer(tokenizer)
    except ImportError:
        pass
    try:
        params = SamplingParams(max_tokens=8, **kwargs)
        params.update_from_tokenizer(tokenizer)
    except (TypeError, ValueError) as exc:
        raise InputError(f"vLLM refuses the rollout's sampling settings {kwargs}: {exc}") from None
    banned = [list(ids) for ids in (getattr(params, "_bad_words_token_ids", None) or [])]
    singles = {ids[0] for ids in banned if len(ids) == 1}
    missing = [t for t, i in suppressed_tokens(tokenizer) if i not in singles]
    if missing:
        raise InputError(f"vLLM would not ban {', '.join(missing)}: the tokenizer does not read them as single "
                         f"special tokens.")
    return banned
