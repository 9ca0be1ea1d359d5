"""Reading a training stage's settings from YAML: one way for SFT and RL alike.

Mistakes in a config (unreadable file, unknown or missing keys) come back as one
:class:`~MedSAMAgentLib.image_io.InputError` naming the file and what to fix.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import yaml

from MedSAMAgentLib.image_io import InputError


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML file ({} for an empty one)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"Cannot read the config {path}: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise InputError(f"The config {path} must be a mapping of settings (key: value lines).")
    return data


def check_keys(settings_class, data: dict, required: tuple[str, ...], where: str) -> None:
    """Every key of ``data`` a field of the dataclass ``settings_class``, every ``required`` one present."""
    known = {f.name for f in dataclasses.fields(settings_class)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"Unknown setting(s) in {where}: {', '.join(unknown)}. Known: {', '.join(sorted(known))}.")
    missing = [k for k in required if k not in data]
    if missing:
        raise InputError(f"{where} must set {', '.join(missing)}.")
    for f in dataclasses.fields(settings_class):
        expected = _accepted(f.type) if f.name in data else []
        if "a number" in expected and isinstance(data[f.name], str):  # YAML reads 1e-4 (no dot) as text
            try:
                data[f.name] = float(data[f.name])
            except ValueError:
                pass
        if expected and not _is(data[f.name], expected):
            raise InputError(f"{where}: {f.name} is {data[f.name]!r}, but must be {' or '.join(expected)}.")


_KINDS = {"int": "a whole number", "float": "a number", "str": "text", "bool": "true or false", "list": "a list",
          "dict": "a mapping", "None": "empty (null)"}


def _accepted(annotation) -> list[str]:
    """The kinds of value a field's annotation (a string: "int", "str | None", "list[str]") allows;
    [] when it is not one of these simple kinds (not checked)."""
    names = [part.strip().split("[")[0] for part in str(annotation).split("|")]
    return [_KINDS[n] for n in names] if all(n in _KINDS for n in names) else []


def _is(value, kinds: list[str]) -> bool:
    checks = {"a whole number": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "a number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "text": lambda v: isinstance(v, str), "true or false": lambda v: isinstance(v, bool),
              "a list": lambda v: isinstance(v, list), "a mapping": lambda v: isinstance(v, dict),
              "empty (null)": lambda v: v is None}
    return any(checks[k](value) for k in kinds)


def check_trainer_args(options: dict, class_name: str, named: tuple, where: str) -> None:
    """``trainer_args`` holds only fields of TRL's ``GRPOConfig`` or transformers' ``TrainingArguments``
    (``class_name``) that no named setting sets (one way to set each thing)."""
    import trl
    import transformers

    args_class = getattr(trl, class_name, None) or getattr(transformers, class_name)
    fields = {f.name for f in dataclasses.fields(args_class)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise InputError(f"{where}: trainer_args has {', '.join(unknown)}, which {class_name} does not have.")
    taken = sorted(set(options) & set(named))
    if taken:
        raise InputError(f"{where}: trainer_args sets {', '.join(taken)}, which the named settings of this config "
                         f"set; use those instead.")


def check_agent_eval(settings, where: str) -> None:
    """The agent-loop evaluation has what it needs when it is on."""
    if getattr(settings, "agent_eval_every", 0) and not getattr(settings, "agent_eval_dataset", None):
        raise InputError(f"{where}: agent_eval_every is set, so agent_eval_dataset must name a dataset with reference "
                         f"masks (a manifest, an nnU-Net v2 folder or a 2D image/mask folder).")
    tool = getattr(settings, "agent_eval_tool", {"name": "x"})
    if not isinstance(tool, dict) or "name" not in tool:
        raise InputError(f"{where}: agent_eval_tool must be a mapping with a name (medsam-lite, sam2 or classical).")


FSDP_LORA = ("LoRA under FSDP cannot be merged into one policy at the end; train LoRA with the DDP or ZeRO-3 "
             "accelerate config in training/configs/ (FSDP is for full fine-tuning).")


def check_common(settings, where: str) -> None:
    """Values every training stage needs in range (one line naming the setting when one is not)."""
    from transformers import SchedulerType

    for name in ("learning_rate", "batch_size", "grad_accum", "logging_steps", "save_steps", "epochs",
                 "images_per_step", "max_turns", "max_turn_tokens", "temperature", "lora_r", "lora_alpha",
                 "max_grad_norm"):
        value = getattr(settings, name, None)
        if value is not None and not value > 0:  # (NaN too)
            raise InputError(f"{where}: {name} is {value}, but must be more than 0.")
    for name, low, high in (("warmup_ratio", 0, 1), ("lora_dropout", 0, 1), ("top_p", 0, 1), ("beta", 0, None),
                            ("vllm_gpu_memory_utilization", 0, 1), ("seed", 0, None), ("max_episodes", 1, None),
                            ("validation_fraction", 0, 0.5), ("eval_steps", 1, None),
                            ("agent_eval_every", 0, None), ("agent_eval_items", 1, None)):
        value = getattr(settings, name, None)
        if value is not None and not (value >= low and (high is None or value <= high)):
            raise InputError(f"{where}: {name} is {value}, but must be "
                             + (f"between {low} and {high}." if high is not None else f"at least {low}."))
    for name, choices in (("scale_rewards", ("group", "batch", "none")),
                          ("report_to", ("none", "tensorboard", "wandb")),
                          ("lr_scheduler", tuple(t.value for t in SchedulerType))):
        value = getattr(settings, name, None)
        if value is not None and value not in choices:
            raise InputError(f"{where}: {name} is {value!r}; choose one of {', '.join(choices)}.")
    device = str(getattr(settings, "device", "auto"))
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise InputError(f"{where}: device '{device}' is not auto, cpu, cuda or cuda:N.")
    if getattr(settings, "lora", False) and os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise InputError(f"{where}: {FSDP_LORA}")  # before training, not after it


def check_packages(settings, where: str) -> None:
    """Optional packages the settings ask for are installed (checked when training starts, so a
    config written for a GPU server still reads anywhere)."""
    import importlib.util

    if getattr(settings, "use_vllm", False) and importlib.util.find_spec("vllm") is None:
        raise InputError(f"{where}: use_vllm is true, but vLLM is not installed here; install it (pip install vllm, "
                         f"on a CUDA machine) or set use_vllm: false.")
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(getattr(settings, "report_to", "none"))
    if package and importlib.util.find_spec(package) is None:
        raise InputError(f"{where}: report_to is {package}, but {package} is not installed; install it or set "
                         f"report_to: none.")
