"""Building a policy and a tool from user-level choices, with checks before anything heavy loads.

``--model`` / ``--checkpoint`` accept a catalogue name (``medsam-agent-8b``,
``medsam2``, ...; resolved in the model cache) or a local path.  A policy too
large for this machine is refused *before* loading, with the memory it needs and
the smaller choices.
"""
from __future__ import annotations

import json
from pathlib import Path

from .models import ModelError, catalogue, get_entry, is_complete, local_path
from .policies import Policy, PolicyError, create_policy
from .tools import SegmentationTool, ToolError, create_tool


class ChoiceError(ValueError):
    """A policy/tool choice that cannot work here; the message says what to do instead."""


def _weights_bytes(folder: Path) -> int | None:
    """Size of a model folder's weights (safetensors index total, or the files' sizes)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            return int(json.loads(index.read_text(encoding="utf-8"))["metadata"]["total_size"])
        except (KeyError, ValueError, TypeError):
            pass
    files = list(folder.glob("*.safetensors")) + list(folder.glob("*.bin"))
    return sum(f.stat().st_size for f in files) or None


def _machine_memory() -> tuple[int | None, int | None]:
    """(free CUDA memory in bytes or None without a GPU, total system RAM in bytes or None)."""
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = int(torch.cuda.mem_get_info()[0])
    except Exception:  # noqa: BLE001 - no usable CUDA: treated as no GPU
        gpu = None
    try:
        import os

        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = None
    return gpu, ram


def smaller_choices(below_bytes: float, limit_gb: float | None = None, on_cpu: bool = False) -> str:
    """Catalogue policies smaller than ``below_bytes`` whose 4-bit memory fits ``limit_gb`` (GB of GPU
    memory); ``on_cpu``: described by the memory they take on a CPU (quantization needs a GPU)."""
    gb = 1024 ** 3

    def described(e) -> str:
        if on_cpu:
            return f"{e.name} (about {e.size_gb * 2.3:.0f} GB of memory on the CPU)"
        return f"{e.name} ({e.memory_gb:g} GB; {e.memory_gb_4bit:g} GB with --quantization 4bit)"

    options = [described(e) for e in catalogue().values() if e.kind == "policy" and e.memory_gb_4bit is not None
               and e.size_gb * gb < 0.9 * below_bytes and (limit_gb is None or e.memory_gb_4bit <= limit_gb)]
    return ", ".join(options) or "none in the catalogue"


def check_policy_fits(name: str, weights_bytes: int | None, device: str | None, quantization: str | None,
                      gpu_free: int | None = None, ram: int | None = None, probe: bool = True) -> None:
    """Refuse a policy this machine cannot hold, before loading it. Sizes in bytes."""
    if weights_bytes is None:
        return
    if probe:
        gpu_free, ram = _machine_memory()
    gb = 1024 ** 3
    bf16 = weights_bytes * 1.15  # weights plus activations and the KV cache of a 5-turn episode
    need = bf16 * {None: 1.0, "8bit": 0.55, "4bit": 0.33}[quantization]
    wants_cuda = device in (None, "", "auto") or str(device).startswith("cuda")
    if gpu_free is not None and wants_cuda:
        if need > gpu_free:
            raise ChoiceError(
                f"The policy {name} needs about {need / gb:.0f} GB of GPU memory; this GPU has {gpu_free / gb:.0f} GB "
                f"free. Try --quantization 4bit, or a smaller policy: {smaller_choices(weights_bytes, gpu_free / gb)}.")
        return
    cpu_need = weights_bytes * 2.3  # float32 on the CPU
    if str(device).startswith("cuda"):
        raise ChoiceError(f"--device {device} was asked for, but this machine has no CUDA GPU.")
    if quantization:
        raise ChoiceError("--quantization needs a CUDA GPU; this machine has none.")
    if weights_bytes > 6 * gb or (ram is not None and cpu_need > 0.7 * ram):
        entry = catalogue().get(name)
        four = entry.memory_gb_4bit if entry is not None and entry.memory_gb_4bit else bf16 * 0.33 / gb  # as listed
        raise ChoiceError(
            f"The policy {name} needs a CUDA GPU with about {bf16 / gb:.0f} GB ({four:.0f} GB with "
            f"--quantization 4bit); this machine has no CUDA GPU, and on the CPU it would need about "
            f"{cpu_need / gb:.0f} GB of memory and minutes per slice. Smaller choices: {smaller_choices(weights_bytes, on_cpu=True)}; or run "
            f"the worker on a GPU server.")


def check_hub_reachable(repo: str, timeout_s: float = 3.0) -> None:
    """For a hub id that is not in the local Hugging Face cache: refuse at once (ChoiceError) when the
    hub cannot be reached, instead of minutes of retries.  Skipped behind a proxy or when offline
    mode is on (then the cache alone decides)."""
    import os
    import socket
    import urllib.parse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo, "config.json"), str):
            return  # cached: nothing to fetch
    except Exception:  # noqa: BLE001 - an odd id or an old huggingface_hub: let the probe decide
        pass
    hub = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    parts = urllib.parse.urlsplit(hub)
    try:
        socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                 timeout=timeout_s).close()
    except OSError:
        raise ChoiceError(f"The model '{repo}' is not in this machine's model cache, and the hub ({parts.hostname}) "
                          f"cannot be reached from here. Download it on a connected machine and give its folder, "
                          f"or set HTTPS_PROXY / HF_ENDPOINT for a proxy or a mirror.") from None


def resolve_model(value: str) -> tuple[str, Path | str]:
    """A catalogue name -> (name, local path, raising ModelError when not downloaded); a path -> (path, path)."""
    path = Path(value).expanduser()
    if path.is_file():
        raise ChoiceError(f"The model {value} is a file; give a model folder (with config.json and the weights), a "
                          f"catalogue name ({', '.join(catalogue())}) or a hub id.")
    if path.exists():
        return str(path), path
    if value in catalogue():
        return value, local_path(value)
    if "/" in value and not value.startswith((".", "/")):
        check_hub_reachable(value)
        return value, value  # a hub id: transformers resolves it (its own cache)
    raise ChoiceError(f"'{value}' is neither a known model ({', '.join(catalogue())}) nor an existing path.")


def build_policy(name: str, model: str | None = None, device: str | None = "auto", quantization: str | None = None,
                 batch_size: int = 8, profile=None, expert_options: dict | None = None,
                 replay: str | None = None, policy_url: str | None = None) -> Policy:
    """A policy by name with its options, checked and built. Raises ChoiceError / ModelError / PolicyError."""
    key = name.strip().lower()
    if key == "expert":
        return create_policy("expert", **(expert_options or {}))
    if key == "replay":
        from .trajectory import load_trajectories

        if not replay:
            raise ChoiceError("The replay policy needs --replay TRAJECTORY.json.")
        if Path(replay).is_dir():
            raise ChoiceError(f"--replay {replay} is a folder; give a trajectory file (JSON).")
        if not Path(replay).is_file():
            raise ChoiceError(f"No trajectory file {replay}.")
        try:
            trajectories = load_trajectories(replay)
        except (ValueError, KeyError) as exc:
            raise ChoiceError(f"{replay} is not a trajectory file ({exc}).") from None
        from .policies.replay import ReplayPolicy

        return ReplayPolicy.from_trajectories(trajectories)
    if key == "openai":
        if not policy_url:
            raise ChoiceError("The openai policy needs --policy-url, the server's API root "
                              "(e.g. http://gpu-server:8000/v1), and --model, the model name it serves.")
        kwargs = {"url": policy_url, "model": model or "", "batch_size": batch_size}
        if profile is not None:
            kwargs["profile"] = profile
        return create_policy("openai", **kwargs)
    if key != "qwen":
        raise PolicyError(f"Unknown policy '{name}'. Choose one of: qwen, openai, expert, replay.")
    choice = model or "medsam-agent-8b"
    if choice in catalogue() and not Path(choice).exists():  # size known before any download or load
        check_policy_fits(choice, int(get_entry(choice).size_gb * 1024 ** 3), device, quantization)
    label, where = resolve_model(choice)
    if isinstance(where, Path):
        check_policy_fits(label, _weights_bytes(where), device, quantization)
    kwargs = {"device": device, "quantization": quantization, "batch_size": batch_size}
    if profile is not None:
        kwargs["profile"] = profile
    return create_policy("qwen", model=where, **kwargs)


def default_tool(download: bool = False) -> str:
    """The tool a run uses when none is named: SAM2 with MedSAM2 once its weights are in the model
    cache (or are to be downloaded), else the bundled LiteMedSAM when its package is installed, else
    the classical tool, which needs nothing."""
    from .tools.medsam_lite import package_available

    if download or is_complete("medsam2"):
        return "sam2"
    return "medsam-lite" if package_available() else "classical"


def build_tool(name: str, checkpoint: str | None = None, config: str | None = None, device: str | None = "auto",
               prompt_mode: str = "released", multimask: bool = False, keep_slices: int | None = None,
               precision: str = "bf16") -> SegmentationTool:
    """A tool by name; ``checkpoint`` may be a catalogue name (sets the config too) or a path;
    ``keep_slices``: how many prepared slices SAM2 keeps (its embeddings, about 16 MB each; default 16)."""
    key = name.strip().lower()
    if key == "classical":
        return create_tool("classical")
    if key == "medsam-lite":
        extra = {} if keep_slices is None else {"cache_size": int(keep_slices)}
        return create_tool("medsam-lite", device=device, **extra)
    if key not in ("sam2", "medsam2"):
        raise ToolError(f"Unknown tool '{name}'. Choose one of: sam2, medsam-lite, classical.")
    ckpt = checkpoint if checkpoint is not None else "medsam2"
    if ckpt.lower() in ("none", "random"):
        ckpt_path = None  # random weights: plumbing tests only
    elif ckpt in catalogue():
        entry = get_entry(ckpt)
        if entry.kind != "tool":
            raise ChoiceError(f"'{ckpt}' is a policy, not a tool checkpoint.")
        ckpt_path = local_path(ckpt)
        config = config or entry.config
    else:
        ckpt_path = Path(ckpt).expanduser()
        if not ckpt_path.is_file():
            raise ChoiceError(f"No checkpoint '{ckpt}': give a catalogue name ({', '.join(n for n, e in catalogue().items() if e.kind == 'tool')}) or a .pt file.")
    extra = {} if keep_slices is None else {"cache_size": int(keep_slices)}
    return create_tool("sam2", config=config or "tiny", checkpoint=ckpt_path, device=device,
                       prompt_mode=prompt_mode, multimask=multimask, precision=precision, **extra)


__all__ = ["build_policy", "build_tool", "check_policy_fits", "ChoiceError", "ModelError"]
