"""The rollout's vLLM sampling settings through vLLM's own ``SamplingParams`` (where vLLM imports).

    python docs/measurements/vllm_sampling_params.py TOKENIZER_DIR

Builds ``SamplingParams(**generation_kwargs(tok, "vllm"))``, tokenizes its bad words as vLLM
does (``update_from_tokenizer``) and checks each banned token is banned as its single id
(:func:`medsam_training.sampling.check_with_vllm`); then shows that transformers' words,
which the rollout sent before, are refused by vLLM.  Last printed line: JSON.
"""
import json
import sys

from transformers import AutoTokenizer

from medsam_training.sampling import check_with_vllm, generation_kwargs

tok = AutoTokenizer.from_pretrained(sys.argv[1])
import vllm.sampling_params as sp  # noqa: E402
import importlib.metadata as md  # noqa: E402

try:
    version = md.version("vllm")
except md.PackageNotFoundError:
    version = getattr(sp, "__file__", "?")
banned = check_with_vllm(generation_kwargs(tok, "vllm"), tok)
try:
    sp.SamplingParams(**generation_kwargs(tok, "transformers"))
    refused = None
except TypeError as exc:
    refused = str(exc)
print(json.dumps({"vllm": version, "banned_id_sequences": banned, "transformers_words_refused": refused}))
