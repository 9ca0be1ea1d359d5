"""What the Logic needs from the application, as one small injected interface.

The Logic (:mod:`MedSAMAgentLogic.logic`) depends on MRML and VTK only.  The few things it needs from
Slicer's application -- a timer, settings, dialogs, the temporary folder, the layout's slice nodes,
processing events -- come through a :class:`Host`.  ``MedSAMAgent.py`` gives Slicer's implementation
(Qt timer, QSettings, message boxes); :class:`PlainHost` here is the one for tests and scripts that run
on ``slicer-core`` (no Qt): a timer the caller drives, settings in a dict, scripted answers to dialogs.
"""
from __future__ import annotations

import shutil
import sys
import tempfile


class Host:
    """The application services the Logic uses.  Every method runs on the GUI thread."""

    scene = None  # the vtkMRMLScene the Logic works in

    def makeTimer(self, interval_ms: int, callback):
        """A repeating timer calling ``callback()``: an object with ``start()``, ``stop()``, ``isActive()``."""
        raise NotImplementedError

    def processEvents(self) -> None:
        """Let the application handle pending events (a busy wait in scripts and tests)."""

    def settingsValue(self, key: str, default: str = "") -> str:
        raise NotImplementedError

    def setSettingsValue(self, key: str, value: str) -> None:
        raise NotImplementedError

    def temporaryPath(self) -> str:
        """The application's temporary folder (the volume files for the worker go below it)."""
        raise NotImplementedError

    def pythonExecutable(self) -> str:
        """The Python that runs the worker and the package installs (Slicer's ``PythonSlicer``)."""
        return shutil.which("PythonSlicer") or sys.executable

    def sliceNode(self, viewName: str):
        """The vtkMRMLSliceNode of a slice view ("Red", "Green", "Yellow"), or None."""
        return self.scene.GetNodeByID(f"vtkMRMLSliceNode{viewName}")

    def selectionNode(self):
        """The application's vtkMRMLSelectionNode (the active volume), or None."""
        return self.scene.GetFirstNodeByClass("vtkMRMLSelectionNode")

    def confirm(self, text: str, title: str) -> bool:
        """An OK/Cancel question; True for OK."""
        raise NotImplementedError

    def askModels(self, text: str) -> str:
        """The model download question: "download", "local" or "cancel"."""
        raise NotImplementedError

    def chooseFolder(self, title: str) -> str:
        """A folder the person picks ("" when cancelled)."""
        raise NotImplementedError

    def chooseFile(self, title: str, nameFilter: str) -> str:
        """A file the person picks ("" when cancelled)."""
        raise NotImplementedError

    def progressDialog(self, title: str, onCancel):
        """A non-modal progress dialog with a Cancel button calling ``onCancel()``: an object with
        ``setLabelText(text)``, ``setRange(lo, hi)`` (0, 0: busy), ``setValue(v)`` and ``close()``."""
        raise NotImplementedError


class ManualTimer:
    """A timer that fires only when its owner ticks it (:class:`PlainHost`): ``tick()`` calls the callback
    while the timer is active, as a Qt timer would on its own."""

    def __init__(self, callback):
        self.callback, self.active = callback, False

    def start(self):
        self.active = True

    def stop(self):
        self.active = False

    def isActive(self):
        return self.active

    def tick(self):
        if self.active:
            self.callback()


class RecordedDialog:
    """A progress dialog that keeps what it was shown (:class:`PlainHost`); ``cancel()`` presses Cancel."""

    def __init__(self, title, onCancel):
        self.title, self.onCancel = title, onCancel
        self.labels, self.range, self.value, self.closed = [], (0, 100), 0, False

    def setLabelText(self, text):
        if not self.labels or self.labels[-1] != text:
            self.labels.append(text)

    def setRange(self, lo, hi):
        self.range = (lo, hi)

    def setValue(self, value):
        self.value = value

    def close(self):
        self.closed = True

    def cancel(self):
        self.onCancel()


class PlainHost(Host):
    """The application services without Qt: for tests and scripts on ``slicer-core``.

    ``answers`` scripts the dialogs: ``confirm`` (bool), ``models`` ("download" / "local" / "cancel"),
    ``folder`` and ``file`` (paths, "" for cancel).  Every question asked is appended to ``asked``."""

    def __init__(self, scene, temporaryPath=None, answers=None, settings=None):
        self.scene = scene
        self._temporaryPath = temporaryPath or tempfile.mkdtemp(prefix="MedSAMAgentHost")
        self.answers = {"confirm": True, "models": "cancel", "folder": "", "file": ""}
        self.answers.update(answers or {})
        self.settings = dict(settings or {})
        self.asked, self.dialogs, self.timers = [], [], []

    def makeTimer(self, interval_ms, callback):
        timer = ManualTimer(callback)
        self.timers.append(timer)
        return timer

    def processEvents(self):
        for timer in list(self.timers):
            timer.tick()

    def settingsValue(self, key, default=""):
        return self.settings.get(key, default)

    def setSettingsValue(self, key, value):
        self.settings[key] = value

    def temporaryPath(self):
        return self._temporaryPath

    def confirm(self, text, title):
        self.asked.append(("confirm", title, text))
        return bool(self.answers["confirm"])

    def askModels(self, text):
        self.asked.append(("models", text))
        return self.answers["models"]

    def chooseFolder(self, title):
        self.asked.append(("folder", title))
        return self.answers["folder"]

    def chooseFile(self, title, nameFilter):
        self.asked.append(("file", title, nameFilter))
        return self.answers["file"]

    def progressDialog(self, title, onCancel):
        dialog = RecordedDialog(title, onCancel)
        self.dialogs.append(dialog)
        return dialog
