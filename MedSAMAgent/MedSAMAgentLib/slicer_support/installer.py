"""Carrying out an :class:`~.dependencies.InstallPlan` in the background, so Slicer stays responsive.

Every step is a command run with Slicer's own Python (``PythonSlicer``) in a child
process, one after the other, on a thread of its own; the GUI polls
:meth:`InstallJob.snapshot` on a timer (as it does for model downloads) and shows
the newest line pip printed.  Nothing here touches Qt or ``slicer``.

* ``torch``: the way the PyTorch extension installs it -- ``light-the-torch``
  (installed first if missing) picks the build for the GPU driver, or the CPU --
  ``python -m light_the_torch install torch>=A torchvision>=B``;
* ``pip``: ``python -m pip install [pip args] REQUIREMENTS``, with the step's
  environment (sam2: ``SAM2_BUILD_CUDA=0``, built against the installed torch).

Every line of output goes to a log file (``log_path``); a failed step's message
names it and quotes pip's last error line.  Cancel stops the running command.
"""
from __future__ import annotations

import os
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from .background import BackgroundJob
from .dependencies import InstallPlan, parse_requirements

LIGHT_THE_TORCH = "light-the-torch>=0.5"  # the version the PyTorch extension installs


@dataclass
class InstallCommand:
    title: str  # what the person sees while it runs
    argv: list[str]
    environment: dict = field(default_factory=dict)  # added to this process's environment


def install_commands(plan: InstallPlan, python: str) -> list[InstallCommand]:
    """The commands that carry out ``plan`` with the interpreter at ``python`` (Slicer's ``PythonSlicer``)."""
    commands = []
    for step in plan.steps:
        names = ", ".join(parse_requirements(r)[0].name for r in step.requirements)
        if step.method == "torch":
            commands.append(InstallCommand("Installing light-the-torch (it picks the PyTorch build for this computer)",
                                           [python, "-m", "pip", "install", LIGHT_THE_TORCH], dict(step.environment)))
            commands.append(InstallCommand(f"Installing {names} (about 2-3 GB; several minutes)",
                                           [python, "-m", "light_the_torch", "install", *step.requirements],
                                           dict(step.environment)))
        else:
            commands.append(InstallCommand(f"Installing {names}",
                                           [python, "-m", "pip", "install", *step.pip_args, *step.requirements],
                                           dict(step.environment)))
    return commands


@dataclass
class InstallSnapshot:
    step: int  # the command running now (0-based); == steps when all finished
    steps: int
    title: str | None  # the running command's title
    line: str  # the newest line it printed
    running: bool
    error: str | None
    cancelled: bool
    log_path: str

    def text(self) -> str:
        if self.error:
            return self.error
        if self.cancelled:
            return "Installation cancelled; nothing more is installed. Start again to finish it."
        if not self.running and self.step >= self.steps:
            return "Python packages installed."
        return f"Step {min(self.step + 1, self.steps)} of {self.steps}: {self.title or 'starting'}\n{self.line[:120]}"

    def percent(self) -> int | None:
        """Finished commands out of all (pip gives no byte counts on a pipe)."""
        return int(100 * min(self.step, self.steps) / self.steps) if self.steps else 100


class InstallJob(BackgroundJob):
    """Runs :func:`install_commands` one after another in child processes, on a background thread."""

    thread_name = "medsam-install"

    def __init__(self, commands: list[InstallCommand], log_path: str | Path):
        super().__init__()
        self.commands = list(commands)
        self.log_path = str(log_path)
        self._state = dict(step=0, line="", error=None)
        self._proc: subprocess.Popen | None = None

    def cancel(self) -> None:
        """Stop the running command (pip leaves the packages it finished installed) and run no more."""
        super().cancel()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()

    def snapshot(self) -> InstallSnapshot:
        with self._lock:
            s = dict(self._state)
        step = s["step"]
        title = self.commands[step].title if step < len(self.commands) else None
        return InstallSnapshot(step=step, steps=len(self.commands), title=title, line=s["line"],
                               running=self.running, error=s["error"],
                               cancelled=self._cancel.is_set() and s["error"] is None and step < len(self.commands),
                               log_path=self.log_path)

    def _run(self) -> None:
        Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8", errors="replace") as log:
            log.write(f"\n=== MedSAM Agent install, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            for k, command in enumerate(self.commands):
                if self._cancel.is_set():
                    return
                with self._lock:
                    self._state.update(step=k, line="")
                error = self._run_one(command, log)
                if self._cancel.is_set():
                    return
                if error:
                    with self._lock:
                        self._state["error"] = error
                    return
            with self._lock:
                self._state["step"] = len(self.commands)

    def _run_one(self, command: InstallCommand, log) -> str | None:
        """Runs one command to its end; the message to show when it failed, else None."""
        log.write(f"$ {' '.join(command.argv)}\n")
        log.flush()
        env = {**os.environ, **command.environment, "PYTHONUNBUFFERED": "1", "PIP_NO_INPUT": "1",
               "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        try:
            proc = subprocess.Popen(command.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, text=True, errors="replace", bufsize=1)
        except OSError as exc:
            return f"Could not start {command.argv[0]}: {exc.strerror or exc}. Is Slicer's Python there?"
        with self._lock:
            self._proc = proc
        tail: deque[str] = deque(maxlen=30)
        for line in proc.stdout:
            line = line.rstrip()
            log.write(line + "\n")
            if line.strip():
                tail.append(line)
                with self._lock:
                    self._state["line"] = line.strip()
        code = proc.wait()
        log.flush()
        with self._lock:
            self._proc = None
        if code == 0 or self._cancel.is_set():
            return None
        errors = [t for t in tail if "error" in t.lower()] or list(tail)
        why = errors[-1].strip()[:300] if errors else f"exit status {code}"
        return (f"{command.title.split(' (')[0]} failed: {why}\nThe whole output is in {self.log_path}. "
                f"Check the internet connection (or the proxy settings), then try again.")
