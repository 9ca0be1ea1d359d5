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


FSDP_LORA = ("LoRA under FSDP cannot be merged into one policy at the end; train LoRA with the DDP or ZeRO-3 "
             "accelerate config in training/configs/ (FSDP is for full fine-tuning).")


def check_common(settings, where: str) -> None:
    """Values every training stage needs in range (one line naming the setting when one is not)."""
    for name in ("learning_rate", "batch_size", "grad_accum", "logging_steps", "save_steps", "epochs",
                 "images_per_step", "max_turns"):
        value = getattr(settings, name, None)
        if value is not None and value <= 0:
            raise InputError(f"{where}: {name} is {value}, but must be more than 0.")
    device = str(getattr(settings, "device", "auto"))
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise InputError(f"{where}: device '{device}' is not auto, cpu, cuda or cuda:N.")
    if getattr(settings, "lora", False) and os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise InputError(f"{where}: {FSDP_LORA}")  # before training, not after it
