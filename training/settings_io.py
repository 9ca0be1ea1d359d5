"""Reading a training stage's settings from YAML: one way for SFT and RL alike.

Mistakes in a config (unreadable file, unknown or missing keys) come back as one
:class:`~MedSAMAgentLib.image_io.InputError` naming the file and what to fix.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from MedSAMAgentLib.image_io import InputError


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML file ({} for an empty one)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"Cannot read the config {path}: {exc}") from None
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
