"""What the worker needs before it runs: Python packages installed into Slicer's Python (after the person
agrees) and models downloaded (or local files chosen), as background jobs with a progress dialog.  A mixin of
:class:`~MedSAMAgentLogic.logic.AgentLogic` (``self.host``, ``self.processing`` and the timer are the Logic's).
"""
import dataclasses
import importlib
import os
import time

from MedSAMAgentLib.slicer_support import dependencies as deps
from MedSAMAgentLib.slicer_support.installer import InstallJob, install_commands
from MedSAMAgentLib.slicer_support.options import LOCAL, download_prompt
from MedSAMAgentLib.slicer_support.processing import ERROR, IDLE

MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the module's folder (MedSAMAgent/)


class SetupJobs:
    """Packages and models for the worker (see the module docstring)."""

    def missingDependencies(self, group, quantization="none"):
        requirements = deps.load_requirements(self.resourcePath("requirements.txt"))
        return deps.check(deps.needed(requirements, group, quantization))

    def resourcePath(self, name):
        return os.path.join(MODULE_DIR, "Resources", name)

    def installPlan(self, group, quantization="none"):
        """What to install for the worker (None when nothing is missing)."""
        missing = self.missingDependencies(group, quantization)
        return deps.plan_install(missing) if missing else None

    def installJob(self, plan):
        """The plan's commands with Slicer's own Python, in child processes (not started)."""
        return InstallJob(install_commands(plan, self.host.pythonExecutable()), os.path.join(self.workDir(), "install.log"))

    def _checkInstalled(self, group, quantization):
        importlib.invalidate_caches()  # the packages a child process just installed
        still = self.missingDependencies(group, quantization)
        if still:
            raise RuntimeError("Still missing after the install: " + ", ".join(m.describe() for m in still) +
                               ". Restart Slicer and try again.")

    def ensureDependencies(self, group, quantization="none", confirm=True):
        """Install what the worker needs and wait for it (the module's self-test; the panel uses
        :meth:`_startJob` with an install job instead); False when declined."""
        plan = self.installPlan(group, quantization)
        if plan is None:
            return True
        if confirm and not self.host.confirm(plan.confirmation_text(), "MedSAM Agent: install"):
            return False
        job = self.installJob(plan).start()
        while job.running:
            self.host.processEvents()
            time.sleep(0.05)
        snap = job.snapshot()
        if snap.error or snap.cancelled:
            raise RuntimeError(snap.text())
        self._checkInstalled(group, quantization)
        return True

    def _askModels(self, launch, missing):
        """The download question: 'download', 'local' or 'cancel'."""
        return self.host.askModels(download_prompt(missing))

    def _useLocalFiles(self, launch, missing):
        """Ask for a local copy of each missing model; the new launch, or None when cancelled."""
        changes = {}
        if launch.policy in missing:
            folder = self.host.chooseFolder(f"Folder of the {launch.policy} model")
            if not folder:
                return None
            changes.update(policy=LOCAL, policy_path=folder)
        if launch.tool in missing:
            path = self.host.chooseFile(f"{launch.tool} checkpoint", "SAM2 checkpoint (*.pt)")
            if not path:
                return None
            changes.update(tool=LOCAL, tool_path=path)
        newLaunch = dataclasses.replace(launch, **changes)
        if self.onLaunchChanged:
            self.onLaunchChanged(newLaunch)
        return newLaunch

    def _startJob(self, job, continuation, title):
        """Run a background job (a model download or a package install) with a progress dialog;
        ``continuation()`` runs on the GUI thread once it succeeded.  Slicer stays usable meanwhile."""
        job.start()
        dialog = self.host.progressDialog(title, job.cancel)
        self._job = (job, dialog, continuation)
        self._wake()

    def _tickJob(self):
        if self._job is None:
            return
        job, dialog, continuation = self._job
        snap = job.snapshot()
        dialog.setLabelText(snap.text())
        percent = snap.percent()
        if percent is None:
            dialog.setRange(0, 0)
        else:
            dialog.setRange(0, 100)
            dialog.setValue(percent)
        if snap.running:
            return
        self._job = None
        dialog.close()
        if snap.error or snap.cancelled:
            self.processing.to(ERROR if snap.error else IDLE, snap.text())
            self._status(snap.text(), "error" if snap.error else "warning")
            return
        continuation()
