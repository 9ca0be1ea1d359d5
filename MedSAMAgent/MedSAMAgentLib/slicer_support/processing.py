"""The module's processing state machine, what the Apply button shows, and progress per slice.

States and the moves between them::

    idle --------> installing --> loading --> running --> idle
      |               |  |          |  |        |   \\
      |               |  +-> idle   |  |        |    +--> cancelling --> idle
      |               |  (declined) |  +--> cancelling      (cancel)      |
      +--> loading    +-> error     +--> error  +--> error                 +--> error
      +--> running (worker already up)

    error --> idle | installing | loading | running     (acknowledged, or tried again)

``installing`` covers Python packages and model downloads; ``loading`` covers
starting the worker, waiting for its models and opening the volume.  The
Apply button reads "Auto-segment" when nothing runs, "Cancel" while loading or
running, and is disabled (with a reason) while installing or cancelling.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

IDLE, INSTALLING, LOADING, RUNNING, CANCELLING, ERROR = (
    "idle", "installing", "loading", "running", "cancelling", "error")
STATES = (IDLE, INSTALLING, LOADING, RUNNING, CANCELLING, ERROR)

TRANSITIONS = {
    IDLE: {INSTALLING, LOADING, RUNNING, ERROR},
    INSTALLING: {IDLE, LOADING, ERROR},
    LOADING: {RUNNING, CANCELLING, IDLE, ERROR},
    RUNNING: {CANCELLING, IDLE, ERROR},
    CANCELLING: {IDLE, ERROR},
    ERROR: {IDLE, INSTALLING, LOADING, RUNNING},
}


class InvalidTransition(RuntimeError):
    """A move the state machine does not allow (a bug in the caller, never a user mistake)."""


@dataclass(frozen=True)
class ButtonView:
    text: str
    enabled: bool
    tooltip: str
    action: str | None  # what a click does: "start", "cancel" or None


class ProcessingStateMachine:
    """Holds the state and a message; listeners are called ``(old, new, message)`` after each move."""

    def __init__(self):
        self.state = IDLE
        self.message = ""
        self.listeners: list = []
        self.history: list[tuple[str, str]] = []  # (state, message) after each move

    def can(self, new: str) -> bool:
        return new in TRANSITIONS[self.state]

    def to(self, new: str, message: str = "") -> None:
        if new not in STATES:
            raise InvalidTransition(f"Unknown state '{new}'.")
        if new == self.state:
            self.message = message or self.message
            return
        if not self.can(new):
            raise InvalidTransition(f"Cannot go from {self.state} to {new}.")
        old, self.state, self.message = self.state, new, message
        self.history.append((new, message))
        for listener in list(self.listeners):
            listener(old, new, message)

    def reset(self, message: str = "") -> None:
        """Back to idle whatever the state (the scene was closed: the work it belonged to is gone)."""
        old, self.state, self.message = self.state, IDLE, message
        self.history.append((IDLE, message))
        if old != IDLE:
            for listener in list(self.listeners):
                listener(old, IDLE, message)

    @property
    def busy(self) -> bool:
        return self.state in (INSTALLING, LOADING, RUNNING, CANCELLING)

    def button(self, inputs_ok: bool = True, why_not: str = "") -> ButtonView:
        """What the Apply button shows now; ``inputs_ok``/``why_not``: whether the inputs allow a run."""
        s = self.state
        if s in (IDLE, ERROR):
            if inputs_ok:
                return ButtonView("Auto-segment", True, "Run the agent on the chosen slices.", "start")
            return ButtonView("Auto-segment", False, why_not or "Choose a volume and a target first.", None)
        if s == INSTALLING:
            return ButtonView("Installing...", False, "Installing what the agent needs; see the dialog.", None)
        if s == LOADING:
            return ButtonView("Cancel", True, "Stop loading the models.", "cancel")
        if s == RUNNING:
            return ButtonView("Cancel", True, "Stop the agent; slices already done are kept.", "cancel")
        return ButtonView("Cancelling...", False, "Waiting for the current turn to end.", None)


class RunProgress:
    """Progress of one run from its events: slices planned and done, the slice and turn now in work."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.started = clock()
        self.total: int | None = None  # None: auto-grow (not known in advance)
        self.done: list[int] = []
        self.current: int | None = None
        self.turn = 0
        self.actions = 0
        self.status: str | None = None
        self.reason: str | None = None
        self.axis = "axial"
        self.target, self.target_index, self.target_count = "", 0, 1  # this run's target among a press's

    def among_targets(self, target: str, index: int, count: int) -> "RunProgress":
        """This run is target ``index`` (0-based) of ``count`` run one after the other by one Auto-segment."""
        self.target, self.target_index, self.target_count = target, index, count
        return self

    def update(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "run_started":
            slices = event.get("slices")
            self.total = len(slices) if isinstance(slices, list) else None
            self.axis = event.get("axis", self.axis)
        elif kind == "action":
            self.current, self.turn = int(event["slice"]), int(event.get("turn", 0))
            if event.get("pixels"):
                self.actions += 1
        elif kind == "slice_done":
            self.done.append(int(event["slice"]))
        elif kind == "run_done":
            self.status, self.reason = event.get("status", "done"), event.get("reason")
        elif kind == "client_error":
            self.status, self.reason = "failed", event.get("reason")

    def fraction(self) -> float | None:
        """Share of the press's work done (0..1): of the planned slices, over every target of the press;
        None while auto-grow does not know the total."""
        if self.status == "done":
            own = 1.0
        elif not self.total:
            return None
        else:
            own = min(1.0, len(self.done) / self.total)
        return (self.target_index + own) / self.target_count

    def text(self) -> str:
        """What the run is doing, in the panel's words ("spleen (2 of 3): Slice 4 of 11 ...")."""
        own = self._own_text()
        return f"{self.target} ({self.target_index + 1} of {self.target_count}): {own}" if self.target_count > 1 \
            else own

    def _own_text(self) -> str:
        seconds = self.clock() - self.started
        n = len(self.done)
        if self.status == "done":
            return f"Done: {n} slice{'s' * (n != 1)}, {self.actions} actions in {seconds:.1f} s."
        if self.status == "cancelled":
            return f"Cancelled after {n} slice{'s' * (n != 1)}; the slices done are kept."
        if self.status == "failed":
            return f"Failed after {n} slice{'s' * (n != 1)}: {self.reason}"
        if self.current is None:
            return "Starting..."
        where = f"slice {self.current}, turn {self.turn + 1}"
        if self.total:
            return f"Slice {min(n + 1, self.total)} of {self.total} ({where})"
        return f"Auto-grow: {n} slice{'s' * (n != 1)} done ({where})"
