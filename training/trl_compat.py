"""The TRL internals the RL rollout relies on, checked when a run starts.

:class:`~medsam_training.rl.SegmentationGRPOTrainer` replaces TRL's private
``GRPOTrainer._generate`` (whose return changed shape three times between 1.0
and 1.9) and calls ``_generate_single_turn`` and the vLLM backend's ``generate``.
The package pins TRL to the tested minor; this check says so in one line when a
different TRL is installed anyway, instead of a failure deep inside a step.
"""
from __future__ import annotations

import inspect

from MedSAMAgentLib.image_io import InputError

TESTED = ("1.16.0", "1.17.0")  # [low, high)
INSTALL = 'pip install "trl>=1.16,<1.17"'

# what the rollout calls, with the parameters it passes
SINGLE_TURN_PARAMS = ["prompt_ids", "images", "multimodal_fields", "num_generations", "has_tool_images"]
VLLM_GENERATE_PARAMS = ["prompts", "images", "num_generations"]
# the eight values _generate returns (TRL unpacks them in _generate_and_score_completions)
GENERATE_RETURNS = "prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images"


def _params(function) -> list[str]:
    return [p for p in inspect.signature(function).parameters if p != "self"]


def problems() -> list[str]:
    """What differs from the TRL internals the rollout was written against ([] when nothing)."""
    import trl
    from packaging.version import Version
    from trl import GRPOTrainer

    found = []
    version = Version(Version(trl.__version__).base_version)
    if not Version(TESTED[0]) <= version < Version(TESTED[1]):
        found.append(f"TRL {trl.__version__} is installed; the rollout is tested with TRL >= {TESTED[0]}, < {TESTED[1]}")
    single = getattr(GRPOTrainer, "_generate_single_turn", None)
    if single is None or _params(single)[:len(SINGLE_TURN_PARAMS)] != SINGLE_TURN_PARAMS:
        found.append("GRPOTrainer._generate_single_turn no longer takes " + ", ".join(SINGLE_TURN_PARAMS))
    generate = getattr(GRPOTrainer, "_generate", None)
    if generate is None or _params(generate) != ["prompts"]:
        found.append("GRPOTrainer._generate(prompts) is gone or takes other arguments")
    else:
        returns = " ".join(inspect.getsource(generate).split())
        if f"return {GENERATE_RETURNS}" not in returns:
            found.append(f"GRPOTrainer._generate no longer returns ({GENERATE_RETURNS})")
    try:
        from trl.generation.vllm_generation import VLLMGeneration
    except ImportError:
        found.append("trl.generation.vllm_generation.VLLMGeneration is gone")
    else:
        if _params(VLLMGeneration.generate)[:len(VLLM_GENERATE_PARAMS)] != VLLM_GENERATE_PARAMS:
            found.append("VLLMGeneration.generate no longer takes " + ", ".join(VLLM_GENERATE_PARAMS))
    return found


def check_trl() -> None:
    """Raises one :class:`InputError` naming every difference and the supported versions."""
    found = problems()
    if found:
        raise InputError("The RL rollout cannot run with the installed TRL: " + "; ".join(found)
                         + f". Install the supported TRL: {INSTALL}.")
