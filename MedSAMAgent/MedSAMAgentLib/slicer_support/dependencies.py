"""Which Python packages the worker needs in Slicer's Python, which are missing, and how to install them.

This module only *decides*; :mod:`.installer` carries out the :class:`InstallPlan`
after the user agreed, in child processes of Slicer's Python (Slicer stays
responsive):

* ``torch``: torch and torchvision the way the PyTorch extension installs them
  (light-the-torch, which picks the build matching the GPU driver, or the CPU);
* ``pip``: the rest; sam2 separately, after torch: ``SAM2_BUILD_CUDA=0`` and
  ``--no-build-isolation`` so pip builds it against Slicer's torch instead of
  fetching a second one.

Requirements are the lines of ``Resources/requirements.txt``: ``name>=version``,
lower bounds only.  Groups: ``core`` runs the worker with the classical tool
(no model weights); ``models`` adds the Qwen3-VL policy and SAM2 tools.
"""
from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

CORE = ("numpy", "scipy", "pillow", "opencv-python-headless", "simpleitk", "fastapi", "uvicorn", "httptools", "psutil")
TORCH = ("torch>=2.5.1", "torchvision>=0.20.1")  # what sam2 itself requires (else pip replaces torch)
QUANT = "bitsandbytes>=0.45"
BUILD_AGAINST_TORCH = {"sam2": {"SAM2_BUILD_CUDA": "0"}}  # name -> environment for its build
# a package that satisfies a requirement under another name
ALTERNATIVES = {
    "opencv-python-headless": ("opencv-python", "opencv-contrib-python", "opencv-contrib-python-headless"),
}
_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:>=\s*([0-9][0-9A-Za-z.+!-]*))?\s*$")


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Requirement:
    name: str
    minimum: str | None = None

    @property
    def key(self) -> str:
        return normalize(self.name)

    def __str__(self) -> str:
        return self.name + (f">={self.minimum}" if self.minimum else "")


def parse_requirements(text: str) -> list[Requirement]:
    """``name>=version`` per line; comments and blank lines skipped.  Other forms raise ValueError."""
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if not m:
            raise ValueError(f"requirements line {n} ('{line}') is not 'name>=version'.")
        out.append(Requirement(m.group(1), m.group(2)))
    return out


def load_requirements(path: str | Path) -> list[Requirement]:
    return parse_requirements(Path(path).read_text(encoding="utf-8"))


def release(version: str) -> tuple[int, ...]:
    """The numeric release part of a version: ``"2.5.1+cu121"`` -> (2, 5, 1); ``"1.0rc1"`` -> (1, 0)."""
    m = re.match(r"^\s*v?(\d+(?:\.\d+)*)", version or "")
    if not m:
        return ()
    parts = [int(p) for p in m.group(1).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def satisfies(installed: str, minimum: str | None) -> bool:
    """``installed >= minimum`` on release numbers (pre-releases of a release count as that release)."""
    return minimum is None or release(installed) >= release(minimum)


def installed_version(name: str) -> str | None:
    """The installed distribution's version (trying known alternative names), or None."""
    for candidate in (name, *ALTERNATIVES.get(normalize(name), ())):
        try:
            return importlib.metadata.version(candidate)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@dataclass(frozen=True)
class Missing:
    requirement: Requirement
    installed: str | None  # None: not installed; else too old

    def describe(self) -> str:
        r = self.requirement
        if self.installed is None:
            return f"{r} (not installed)"
        return f"{r} (installed: {self.installed})"


def check(requirements, version_of: Callable[[str], str | None] = installed_version) -> list[Missing]:
    """The requirements not satisfied by what is installed."""
    out = []
    for r in requirements:
        r = r if isinstance(r, Requirement) else parse_requirements(str(r))[0]
        have = version_of(r.name)
        if have is None or not satisfies(have, r.minimum):
            out.append(Missing(r, have))
    return out


def needed(requirements: list[Requirement], group: str, quantization: str | None = None) -> list[Requirement]:
    """What a launch needs: ``core`` (worker + classical tool) or ``models`` (everything, torch included)."""
    if group not in ("core", "models"):
        raise ValueError(f"Unknown dependency group '{group}'.")
    if group == "core":
        return [r for r in requirements if r.key in CORE]
    out = list(requirements) + parse_requirements("\n".join(TORCH))
    if quantization in ("4bit", "8bit"):
        out += parse_requirements(QUANT)
    return out


@dataclass
class InstallStep:
    method: str  # "torch" (light-the-torch) | "pip"
    requirements: list[str]
    pip_args: list[str] = field(default_factory=list)  # extra pip arguments ("pip" only)
    environment: dict = field(default_factory=dict)  # variables to set while this step runs


@dataclass
class InstallPlan:
    missing: list[Missing]
    steps: list[InstallStep]

    @property
    def empty(self) -> bool:
        return not self.steps

    def confirmation_text(self, requester: str = "MedSAM Agent") -> str:
        """What the confirmation dialog says."""
        lines = [f"{requester} needs these Python packages in Slicer's Python:", ""]
        lines += [f"  - {m.describe()}" for m in self.missing]
        if any(s.method == "torch" for s in self.steps):
            lines += ["", "PyTorch is installed as the PyTorch extension installs it (light-the-torch), for this "
                          "computer's GPU (or the CPU)."]
        lines += ["", "Downloading and installing can take several minutes (PyTorch is about 2-3 GB); Slicer stays "
                      "usable meanwhile, and Cancel stops it. Install now?"]
        return "\n".join(lines)


def plan_install(missing: list[Missing]) -> InstallPlan:
    """The steps to install ``missing``: torch first, then the rest, then packages built against torch."""
    torch = [m for m in missing if m.requirement.key in ("torch", "torchvision")]
    built = [m for m in missing if m.requirement.key in BUILD_AGAINST_TORCH]
    rest = [m for m in missing if m not in torch and m not in built]
    steps = []
    if torch:
        steps.append(InstallStep("torch", [str(m.requirement) for m in torch]))
    if rest:
        steps.append(InstallStep("pip", [str(m.requirement) for m in rest]))
    for m in built:
        steps.append(InstallStep("pip", [str(m.requirement)], ["--no-build-isolation"],
                                 dict(BUILD_AGAINST_TORCH[m.requirement.key])))
    return InstallPlan(list(missing), steps)


def upgraded_while_loaded(missing: list[Missing], modules=None) -> list[str]:
    """The packages of ``missing`` that were installed but too old and that this process has already
    imported (``modules``: default ``sys.modules``): the upgrade reaches this process only after a
    restart (the worker, a new process, uses it at once)."""
    import sys

    modules = sys.modules if modules is None else modules
    imports: dict[str, set] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            imports.setdefault(normalize(dist), set()).add(module)
    return [m.requirement.name for m in missing
            if m.installed is not None and imports.get(m.requirement.key, set()) & set(modules)]
