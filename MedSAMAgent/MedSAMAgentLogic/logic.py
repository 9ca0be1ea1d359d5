"""The module's Logic: runs the agent on a volume through the worker, draws its markups, follows edits.

Its parts by concern: :mod:`.contexts` (what is kept per target), :mod:`.markups` (the points and boxes),
:mod:`.setup_jobs` (packages and models before the worker runs), :mod:`.segment_voxels` (segment writes);
this file holds runs, overrides, undo, the audit trail and the timer.

Depends on MRML and VTK (Slicer's own, or the ``slicer-core`` wheels) and on the Slicer-free decisions in
``MedSAMAgentLib.slicer_support``; never on Qt.  What it needs from the application comes through a
:class:`~MedSAMAgentLogic.host.Host` given to it.

Threads: the GUI thread owns every MRML node.  Worker events arrive on a background thread
(``EventStream``) and wait in a queue; the host's timer drains the queue on the GUI thread.  Slow calls
(starting the worker, loading models, opening the volume, overrides) run in a thread pool; the timer picks
up their results.  The GUI never waits on the worker.
"""
import concurrent.futures
import logging
import os
import threading
import time
import weakref

import vtk

import slicer
from slicer.util import VTKObservationMixin

from MedSAMAgentLib.masks import decode_rle, encode_rle
from MedSAMAgentLib.slicer_support import dependencies as deps
from MedSAMAgentLib.slicer_support.audit import AuditLog
from MedSAMAgentLib.slicer_support.downloads import DownloadJob
from MedSAMAgentLib.slicer_support.geometry import AXES, VolumeGeometry
from MedSAMAgentLib.slicer_support.markup_plan import (
    AddBox,
    AddPoint,
    BeginUndoStep,
    ClearSliceMarkups,
    RunFinished,
    ShowStatus,
    WriteMaskSlice,
    parse_description,
)
from MedSAMAgentLib.slicer_support.options import Launch, missing_models
from MedSAMAgentLib.slicer_support.override import EDITING, RECOMPUTING
from MedSAMAgentLib.slicer_support.override import ERROR as EDIT_ERROR
from MedSAMAgentLib.slicer_support.processing import (
    CANCELLING,
    ERROR,
    IDLE,
    INSTALLING,
    LOADING,
    RUNNING,
    ProcessingStateMachine,
)
from MedSAMAgentLib.slicer_support.remote_worker import TOKEN_SETTING, URL_SETTING, RemoteWorker, worker_address
from MedSAMAgentLib.slicer_support.undo import UndoStack
from MedSAMAgentLib.slicer_support.volume_file import write_nrrd
from MedSAMAgentLib.slicer_support.worker_supervisor import READY, Cancelled, SupervisorError, WorkerSupervisor
from MedSAMAgentLib.worker.client import ClientError, EventStream
from MedSAMAgentLib.slicer_support.run_choice import parse_targets, slices_for_mode
from MedSAMAgentLogic.contexts import VolumeContext, _Run
from MedSAMAgentLogic.markups import ATTRIBUTE, MARKUPS_EVENTS, MarkupNodes
from MedSAMAgentLogic.segment_voxels import leave_others_their_voxels, read_block, write_block
from MedSAMAgentLogic.setup_jobs import MODULE_DIR, SetupJobs

_SUPERVISORS = weakref.WeakSet()  # every worker this process started, stopped when the application quits


def stopAllWorkers():
    """Stop every worker this process started (Slicer calls it when it quits)."""
    for supervisor in list(_SUPERVISORS):
        try:
            supervisor.stop()
        except Exception:  # noqa: BLE001 - quitting must go on
            logging.exception("MedSAM Agent: could not stop a worker")


class AgentLogic(MarkupNodes, SetupJobs, VTKObservationMixin):
    """Runs the agent on a volume through the worker; usable without the widget (see the self-test).

    ``host`` gives the application's services (:class:`MedSAMAgentLogic.host.Host`): Slicer's in the module,
    :class:`~MedSAMAgentLogic.host.PlainHost` on slicer-core."""

    def __init__(self, host) -> None:
        VTKObservationMixin.__init__(self)
        self.host = host
        self.processing = ProcessingStateMachine()
        self.processing.listeners.append(lambda old, new, message: self._changed())
        self.supervisor = self._makeSupervisor()
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=3, thread_name_prefix="medsam-agent")
        self.timer = host.makeTimer(50, self._onTick)
        self.audit = AuditLog()
        self.auditNode = None
        self.undo = UndoStack()
        self.contexts = {}
        self.currentContext = None
        self.run = None
        self.progress = None
        self._loading = None  # (future, cancel event, ctx, kind)
        self._loadingSlice = None  # the key slice of the run being started (a continue's slice)
        self._loadingPosition = (0, 1)  # its target's place among the press's targets
        self._nextTargets = []  # the press's other targets still to run (each a loader)
        self._volumeFiles = {}  # volume node ID -> (path, stamp): one file per volume, whatever its targets
        self._editStartTried = False  # a worker was started (or tried) for prompts placed before any run
        self._overrideFutures = []
        self._job = None  # (job, dialog, continuation): a model download or a package install
        self._applying = False
        self._sessionLock = threading.Lock()
        self.onStatus = None
        self.onStateChanged = None
        self.onLaunchChanged = None
        self.defaultLaunch = None  # the Launch edits use before any run (the module reads the panel instead)

    @property
    def scene(self):
        return self.host.scene

    def cleanup(self) -> None:
        self.removeObservers()
        self.timer.stop()
        # a reloaded module must not leave its worker (and its GPU memory) running past Slicer's exit
        threading.Thread(target=self.supervisor.stop, daemon=True).start()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def forgetScene(self) -> None:
        """The scene is closing: drop every context (their nodes go away); the worker keeps its models."""
        if self.run is not None:
            self.run.stream.stop()
            if self.supervisor.client is not None:
                self.executor.submit(self.supervisor.client.cancel, self.run.id)
            self.run = None
        if self._loading is not None:
            self._loading[1].set()
            self._loading = None
        self._nextTargets = []
        self._volumeFiles.clear()
        if self._job is not None:
            self._job[0].cancel()
        self._overrideFutures = []
        self.processing.reset("The scene was closed.")
        client = self.supervisor.client
        sessions = [ctx.session for ctx in self.contexts.values() if ctx.session] if client is not None else []
        if sessions:  # the worker frees its copies of the closed scene's volumes now, not after its idle hour
            self.executor.submit(self._closeSessions, client, sessions)
        self.contexts.clear()
        self.currentContext = None
        self.undo.clear()
        self.audit = AuditLog()
        self.auditNode = None
        self.removeObservers()

    def forgetVolume(self, volumeNode) -> None:
        """Drop the contexts on ``volumeNode`` (a reviewed case being left): their markups nodes are removed,
        their undo steps dropped, their worker sessions closed; other volumes' work stays.  RuntimeError while
        the agent is busy or an edit is being recomputed (its answer would land on a removed node)."""
        if self.processing.busy or self._overrideFutures:
            raise RuntimeError("The agent is still working on this case; wait for it, or cancel it, first.")
        gone = [key for key, ctx in self.contexts.items() if ctx.volumeNode is volumeNode]
        sessions = []
        self._applying = True  # the removals are not edits
        try:
            for key in gone:
                ctx = self.contexts.pop(key)
                for node in [self.pointsNode(ctx, True), self.pointsNode(ctx, False), *self.roiNodes(ctx)]:
                    if node is not None:
                        for event in (vtk.vtkCommand.ModifiedEvent, *MARKUPS_EVENTS):
                            if self.hasObserver(node, event, self._onMarkupsModified):
                                self.removeObserver(node, event, self._onMarkupsModified)
                        self.scene.RemoveNode(node)
                self.undo.forget(ctx)
                sessions += [s for s in (ctx.session, ctx.staleSession) if s]
                if self.currentContext is ctx:
                    self.currentContext = None
        finally:
            self._applying = False
        self._volumeFiles.pop(volumeNode.GetID(), None)
        client = self.supervisor.client
        if sessions and client is not None:
            self.executor.submit(self._closeSessions, client, sessions)

    @staticmethod
    def _closeSessions(client, sessions):
        """Pool thread: close worker sessions nobody uses any more (best effort)."""
        for sid in set(sessions):
            try:
                client.close_session(sid)
            except ClientError:
                pass

    # ------------------------------------------------------------------ which worker
    def _makeSupervisor(self):
        """A worker server when one is configured (panel settings or environment), else a local worker."""
        try:
            address = worker_address(lambda key: self.host.settingsValue(key, ""), os.environ)
        except SupervisorError as exc:  # e.g. an address without its token: say so, and work locally
            logging.warning("MedSAM Agent: %s", exc)
            address = None
        if address:
            supervisor = RemoteWorker(*address)
        else:
            supervisor = WorkerSupervisor(python=self.host.pythonExecutable(), module_dir=MODULE_DIR, env=self._workerEnvironment())
        _SUPERVISORS.add(supervisor)
        return supervisor

    def useWorkerServer(self, url, token):
        """Save the worker server's address (empty URL: a worker on this computer) and switch to it.
        Raises SupervisorError for an address or token that cannot work."""
        if url.strip():
            worker_address(lambda key: {URL_SETTING: url, TOKEN_SETTING: token}[key], {})  # checks them
        self.host.setSettingsValue(URL_SETTING, url.strip())
        self.host.setSettingsValue(TOKEN_SETTING, token.strip() if url.strip() else "")  # kept only with its address
        old = self.supervisor
        self.supervisor = self._makeSupervisor()
        _SUPERVISORS.discard(old)
        self.executor.submit(old.stop)  # seconds (a polite shutdown, then waiting): never on the GUI thread
        for ctx in self.contexts.values():
            ctx.session = None  # volumes are opened again on the new worker
        self._changed()

    # ------------------------------------------------------------------ small helpers
    def _workerEnvironment(self):
        """The worker's extra environment: the model cache chosen in the settings (one cache for every
        Slicer version).  Set in Slicer's own process too, so that its checks of what is downloaded,
        and its downloads, use the folder the worker reads."""
        env = {}
        home = self.host.settingsValue("MedSAMAgent/ModelCache", "")
        if home:
            env["MEDSAM_AGENT_HOME"] = home
            os.environ["MEDSAM_AGENT_HOME"] = home
        return env

    def _changed(self):
        if self.onStateChanged:
            self.onStateChanged()

    def _status(self, text, level="info"):
        (logging.warning if level != "info" else logging.info)("MedSAM Agent: %s", text)
        if self.onStatus:
            self.onStatus(text, level)

    def _wake(self):
        if not self.timer.isActive():
            self.timer.start()

    def activeVolume(self):
        selection = self.host.selectionNode()
        node = self.scene.GetNodeByID(selection.GetActiveVolumeID() or "") if selection else None
        return node or self.scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def geometryOf(self, volumeNode):
        m = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(m)
        return VolumeGeometry(slicer.util.arrayFromVTKMatrix(m), volumeNode.GetImageData().GetDimensions())

    def sliceNode(self, viewName):
        node = self.host.sliceNode(viewName)
        if node is None:
            raise ValueError(f"There is no {viewName} slice view in this layout.")
        return node

    def viewAxisAndSlice(self, volumeNode, viewName):
        """The worker axis of a slice view and the slice index through its centre."""
        geometry = self.geometryOf(volumeNode)
        sliceToRas = slicer.util.arrayFromVTKMatrix(self.sliceNode(viewName).GetSliceToRAS())
        axis = geometry.axis_for_view(sliceToRas)
        return axis, geometry.view_slice_index(sliceToRas, axis)

    def launchFromParameters(self, p):
        allow = (self.workDir(),)
        return Launch(policy=p.policy, tool=p.tool, device=p.device, quantization=p.quantization,
                      max_turns=p.maxTurns, policy_path=p.policyPath, tool_path=p.toolPath, allow_dirs=allow,
                      profile=p.profile)

    def workDir(self):
        path = os.path.join(self.host.temporaryPath(), "MedSAMAgent")
        os.makedirs(path, exist_ok=True)
        return path

    def newSegmentation(self, volumeNode):
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volumeNode.GetName()} MedSAM Agent")
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        return node

    def newAuditNode(self):
        node = self.scene.AddNewNodeByClass("vtkMRMLTextNode", "MedSAM Agent audit")
        if hasattr(node, "SetForceCreateStorageNode"):
            node.SetForceCreateStorageNode(slicer.vtkMRMLTextNode.CreateStorageNodeAlways)
        return node

    # ------------------------------------------------------------------ contexts and markups
    def context(self, volumeNode, segmentationNode, target):
        """The context of (volume, segmentation, segment named ``target``), created when new."""
        seg = segmentationNode.GetSegmentation()
        segmentId = seg.GetSegmentIdBySegmentName(target)
        if not segmentId:
            if not segmentationNode.GetDisplayNode():
                segmentationNode.CreateDefaultDisplayNodes()
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            segmentId = seg.AddEmptySegment("", target)
        key = (volumeNode.GetID(), segmentationNode.GetID(), segmentId)
        ctx = self.contexts.get(key)
        if ctx is None:
            ctx = self.contexts[key] = VolumeContext(volumeNode, segmentationNode, segmentId, target)
            for positive in (True, False):
                self._observeMarkups(ctx, self.pointsNode(ctx, positive, create=True))
            axes = []
            for roi in self.roiNodes(ctx):  # markups saved with the scene: carry on along their axis
                self._observeMarkups(ctx, roi)
                info = parse_description(roi.GetAttribute(ATTRIBUTE))
                axes.append(info.get("axis", "axial"))
                if info.get("run") and "slice" in info:  # edits of the slice go to the run that made it
                    ctx.sliceRun[(info.get("axis", "axial"), int(info["slice"]))] = info["run"]
            self.setAxis(ctx, max(set(axes), key=axes.count) if axes else "axial")
        self.currentContext = ctx
        return ctx

    def targetsInWork(self):
        """The targets of the current context's volume and segmentation that the agent has worked on, in the
        order they were first run (the panel's "Correct target" choice)."""
        ctx = self.currentContext
        if ctx is None:
            return []
        return [c.target for c in self.contexts.values()
                if c.volumeNode is ctx.volumeNode and c.segmentationNode is ctx.segmentationNode]

    def selectTarget(self, target):
        """Continue, Redo and Add box act on ``target`` from now on (one of :meth:`targetsInWork`)."""
        ctx = self.currentContext
        for c in self.contexts.values():
            if ctx is not None and c.target == target and c.volumeNode is ctx.volumeNode \
                    and c.segmentationNode is ctx.segmentationNode:
                self.currentContext = c
                self._changed()
                return c
        raise ValueError(f"No run of '{target}' on this volume yet; run Auto-segment for it first.")

    def setAxis(self, ctx, axis):
        """Edits are read along ``axis`` from now on; what the markups show there is taken as it is (no recompute)."""
        if axis not in ctx.baselined:
            for index, items in self.scanPrompts(ctx, axis).items():
                ctx.overrides.baseline(axis, index, items)
            ctx.baselined.add(axis)
        ctx.axis = axis

    # ------------------------------------------------------------------ segment voxels
    def _writeBlock(self, ctx, extent, block, restore=False):
        """Set the segment's voxels over ``extent`` to ``block`` (uint8 [k, j, i]); voxels outside stay as they
        are, and so do the other segments, even those sharing its layer (:mod:`MedSAMAgentLogic.segment_voxels`).
        Voxels of other segments are left out unless the context allows overlap; ``restore`` (undo) writes
        the block exactly as it was saved."""
        m = vtk.vtkMatrix4x4()
        ctx.volumeNode.GetIJKToRASMatrix(m)
        if not ctx.allowOverlap and not restore:
            block = leave_others_their_voxels(ctx.segmentationNode, ctx.segmentId, ctx.volumeNode, extent, block)
        write_block(ctx.segmentationNode, ctx.segmentId, extent, block, m)

    def _readBlock(self, ctx, extent):
        """The segment's voxels over an extent (uint8 [k, j, i], 0/1)."""
        return read_block(ctx.segmentationNode, ctx.segmentId, ctx.volumeNode, extent)

    # ------------------------------------------------------------------ applying the plan
    def _apply(self, ctx, instructions):
        self._applying = True
        try:
            for ins in instructions:
                if isinstance(ins, BeginUndoStep):
                    self.scene.SaveStateForUndo()  # no-op unless the scene's undo is on
                    self.undo.begin(ins.label, ins.axis, ins.slice, ctx)
                elif isinstance(ins, ClearSliceMarkups):
                    step = self.undo.step_for(ins.axis, ins.slice, ctx)
                    if step is not None and step is self.undo.current and step.prompts is None:
                        step.prompts = self.scanPrompts(ctx, ins.axis).get(ins.slice, [])  # what undo puts back
                    self._clearSliceMarkups(ctx, ins.axis, ins.slice)
                elif isinstance(ins, AddBox):
                    roi = self._addRoi(ctx, ins.axis, ins.slice, ins.turn, ins.run, ins.author, ins.object_to_ras,
                                       ins.size, f"{ctx.target} box {ins.label}")
                    self.undo.add_markup(("roi", roi.GetID()))
                    ctx.sliceRun[(ins.axis, ins.slice)] = ins.run
                elif isinstance(ins, AddPoint):
                    node, pid = self._addPoint(ctx, ins.axis, ins.slice, ins.turn, ins.run, ins.author, ins.positive,
                                               ins.position_ras, ins.label)
                    self.undo.add_markup(("point", node.GetID(), pid))
                    ctx.sliceRun[(ins.axis, ins.slice)] = ins.run
                elif isinstance(ins, WriteMaskSlice):
                    if self.undo.needs_before(ins.axis, ins.slice, ctx):
                        self.undo.save_before(ins.axis, ins.slice, ins.extent, self._readBlock(ctx, ins.extent), ctx)
                    self._writeBlock(ctx, ins.extent, ins.block)
                elif isinstance(ins, ShowStatus):
                    self._status(ins.text, ins.level)
                elif isinstance(ins, RunFinished):
                    self._finishRun(ins)
        finally:
            self._applying = False

    # ------------------------------------------------------------------ the worker side
    def _volumeFile(self, ctx):
        """Write the volume for the worker when it changed (GUI thread); its path.  One file per volume node,
        shared by the contexts (targets) on it; a context whose file changed opens a new worker session."""
        stamp = (ctx.volumeNode.GetImageData().GetMTime(), ctx.volumeNode.GetMTime())
        path, written = self._volumeFiles.get(ctx.volumeNode.GetID(), (None, None))
        if path is None or written != stamp or not os.path.exists(path):
            path = os.path.join(self.workDir(), f"{ctx.volumeNode.GetID()}.nrrd")
            write_nrrd(path, slicer.util.arrayFromVolume(ctx.volumeNode), ctx.geometry.ijk_to_ras)
            self._volumeFiles[ctx.volumeNode.GetID()] = (path, stamp)
        if ctx.volumeFile != path or ctx.volumeStamp != stamp:
            ctx.volumeFile, ctx.volumeStamp = path, stamp
            ctx.staleSession, ctx.session = ctx.session or ctx.staleSession, None
        return ctx.volumeFile

    def _session(self, ctx, launch, cancel=None, reuse=True):
        """(client, session id) of a ready worker with the volume open.  Runs on a pool thread."""
        with self._sessionLock:
            return self._sessionLocked(ctx, launch, cancel, reuse)

    def _withSession(self, ctx, launch, call, cancel=None, reuse=True):
        """``call(client, session id)`` on a ready worker with the volume open; when the worker has
        forgotten the session (closed after an idle hour, say), the volume is opened again, once."""
        client, sid = self._session(ctx, launch, cancel, reuse)
        try:
            return call(client, sid)
        except ClientError as exc:
            if exc.status != 404 or "No session" not in str(exc):
                raise
        with self._sessionLock:
            if ctx.session == sid:
                ctx.session = None
        client, sid = self._session(ctx, launch, cancel, reuse)
        return call(client, sid)

    def _sessionLocked(self, ctx, launch, cancel, reuse):
        if reuse and self.supervisor.check() == READY and self.supervisor.healthy():
            client = self.supervisor.client
        else:
            client = self.supervisor.ensure_ready(launch, cancel, lambda step: None)
        if ctx.session is None or ctx.sessionGeneration != self.supervisor.generation:
            if ctx.staleSession and ctx.sessionGeneration == self.supervisor.generation:
                try:  # the volume changed since: the worker's copy of the old one is freed now
                    client.close_session(ctx.staleSession)
                except ClientError:
                    pass
            ctx.staleSession = None
            info = self.supervisor.open_volume(client, ctx.volumeFile)
            for axis in AXES:
                if info["slices"][axis] != ctx.geometry.num_slices(axis):
                    raise RuntimeError(f"The worker sees {info['slices'][axis]} {axis} slices where Slicer has "
                                       f"{ctx.geometry.num_slices(axis)}; the volume geometry did not survive.")
            ctx.session, ctx.sessionGeneration = info["session"], self.supervisor.generation
        return client, ctx.session

    def _prepareRun(self, ctx, launch, cancel, axis, slices, keySlice, target, kind, turns):
        """Pool thread: worker ready, volume open, run started; returns (client, run id)."""
        def start(client, sid):
            if cancel.is_set():
                raise Cancelled("cancelled")
            if kind == "continue":
                prompts = ctx.continuePrompts
                # the worker holds exactly what the markups show (the person's prompts, recorded as theirs)
                ctx.continueAnswer = client.override(sid, axis, keySlice, prompts)
                return client, client.continue_slice(sid, axis, keySlice, target, turns)
            return client, client.start_run(sid, target, axis, slices if slices != "auto" else "auto",
                                            key_slice=keySlice, max_turns=launch.max_turns,
                                            batch_size=launch.batch_size)

        return self._withSession(ctx, launch, start, cancel, reuse=launch.same_worker(self.supervisor.launch))

    # ------------------------------------------------------------------ runs
    def autoSegment(self, volumeNode, segmentationNode, targets, viewName="Red", sliceMode="current slice",
                    before=5, after=5, launch=None, auditNode=None, confirm=True, allowOverlap=False):
        """The panel's Auto-segment: the agent on the slices ``sliceMode`` picks around the slice ``viewName``
        shows (:func:`~MedSAMAgentLib.slicer_support.run_choice.slices_for_mode`), along that view's axis, for
        each of ``targets`` (a list, or the panel's text: "liver, spleen, left kidney"), each into its own
        segment of ``segmentationNode``.  Returns (axis, slices) at once; the runs go on through the timer."""
        names = parse_targets(targets if isinstance(targets, str) else ",".join(targets))
        axis, current = self.viewAxisAndSlice(volumeNode, viewName)
        slices = slices_for_mode(sliceMode, current, self.geometryOf(volumeNode).num_slices(axis), before, after)
        self.startAutoSegment(volumeNode, segmentationNode, names, axis, slices, current,
                              launch or self._defaultLaunch(), auditNode=auditNode, confirm=confirm,
                              allowOverlap=allowOverlap)
        return axis, slices

    def startAutoSegment(self, volumeNode, segmentationNode, target, axis, slices, keySlice, launch,
                         auditNode=None, confirm=True, kind="run", turns=2, allowOverlap=False):
        """Start the agent on ``slices`` (a list of indices, or "auto" to grow from ``keySlice``) along ``axis``.

        ``target``: one target, or a list of them, run one after the other on the same slices by the same
        worker, each into its own segment (its own markups, overrides, undo steps and audit runs).  Where
        the targets' masks meet, a voxel already in another segment is left to it (as Slicer's Segment
        Editor does with "overwrite none"); ``allowOverlap=True`` lets segments overlap instead.  Returns at
        once; the runs go on through the timer.  ``confirm=False`` skips the install and download questions
        (tests, scripts).
        """
        if self.processing.busy:
            raise RuntimeError("The agent is already busy; cancel it first.")
        targets = [target] if isinstance(target, str) else list(target)
        if not targets or not all(isinstance(t, str) and t.strip() for t in targets):
            raise ValueError("Type a target (what to segment).")
        if volumeNode.GetImageData() is None or volumeNode.GetImageData().GetNumberOfScalarComponents() != 1:
            raise ValueError("The agent segments scalar volumes (one value per voxel).")
        remote = isinstance(self.supervisor, RemoteWorker)  # its models, packages and files are the server's
        if not remote:
            launch.check()  # LaunchError says what to change
        contexts = [self.context(volumeNode, segmentationNode, t.strip()) for t in targets]
        for c in contexts:
            c.allowOverlap = allowOverlap
            self.setAxis(c, axis)
        ctx = self.currentContext = contexts[0]
        if auditNode is not None:
            self._attachAudit(auditNode)
        if self.processing.state == ERROR:
            self.processing.to(IDLE)

        def load(ctx=ctx, position=0):
            self.currentContext = ctx
            self.processing.to(LOADING, "Starting the worker and loading the models...")
            self._status("Starting the worker and loading the models...")
            self._setMarkupsLocked(ctx, True)  # no edits while loading: they would be taken for the agent's
            try:
                self._volumeFile(ctx)
            except Exception as exc:  # noqa: BLE001 - e.g. no room for the volume file: said, nothing stuck
                self._setMarkupsLocked(ctx, False)
                self.processing.to(ERROR, str(exc))
                self._status(f"Could not write the volume for the worker: {exc}", "error")
                return
            if kind == "continue":
                self._takeEdits(ctx, time.monotonic())  # edits made just before: the trail records them as theirs
                items = self.scanPrompts(ctx, axis).get(keySlice, [])
                h, w = ctx.geometry.slice_shape(axis)
                ctx.continuePrompts = [p for p in (i.wire(w, h) for i in items) if p is not None]
            cancel = threading.Event()
            future = self.executor.submit(self._prepareRun, ctx, launch, cancel, axis, slices, keySlice, ctx.target,
                                          kind, turns)
            ctx.launch = launch
            self._loading = (future, cancel, ctx, kind)
            self._loadingSlice = keySlice
            self._loadingPosition = (position, len(contexts))
            self._nextTargets = [lambda c=c, n=n: load(c, n) for n, c in enumerate(contexts) if n > position]
            self._wake()

        def models():
            missing = missing_models(launch)
            if not missing:
                return load()
            if not confirm:
                self.processing.to(INSTALLING, "Downloading models...")
                return self._startJob(DownloadJob(missing), load, "MedSAM Agent: downloading models")
            choice = self._askModels(launch, missing)
            if choice == "download":
                self.processing.to(INSTALLING, "Downloading models...")
                return self._startJob(DownloadJob(missing), load, "MedSAM Agent: downloading models")
            if choice == "local":
                newLaunch = self._useLocalFiles(launch, missing)
                if newLaunch is not None:
                    self.processing.to(IDLE)
                    return self.startAutoSegment(volumeNode, segmentationNode, targets, axis, slices, keySlice,
                                                 newLaunch, auditNode, confirm, kind, turns, allowOverlap)
            self.processing.to(IDLE, "Cancelled.")

        if remote:
            return load()
        plan = self.installPlan(launch.dependency_group(), launch.quantization)
        if plan is None:
            return models()
        if confirm and not self.host.confirm(plan.confirmation_text(), "MedSAM Agent: install"):
            self.processing.to(IDLE, "Installation declined.")
            self._status("The agent needs these packages to run; nothing was installed.", "warning")
            return

        def installed():
            try:
                self._checkInstalled(launch.dependency_group(), launch.quantization)
            except RuntimeError as exc:
                self.processing.to(ERROR, str(exc))
                self._status(str(exc), "error")
                return
            upgraded = deps.upgraded_while_loaded(plan.missing)
            if upgraded:
                self._status(f"{', '.join(upgraded)} upgraded while Slicer had it loaded: the agent uses the new "
                             f"version now; restart Slicer when convenient.", "warning")
            models()

        self.processing.to(INSTALLING, "Installing Python packages...")
        self._startJob(self.installJob(plan), installed, "MedSAM Agent: installing Python packages")

    def continueAgent(self, ctx, axis, index, launch, turns=2):
        """The agent takes ``turns`` more turns on one slice, from the prompts the markups show now."""
        self.startAutoSegment(ctx.volumeNode, ctx.segmentationNode, ctx.target, axis, [index], index, launch,
                              kind="continue", turns=turns)

    def cancel(self):
        """Stop loading or the run (slices already done are kept).  Returns the future of the cancel
        request sent to the worker, if one was sent."""
        if self.processing.state == LOADING and self._loading:
            self._loading[1].set()
            self.processing.to(CANCELLING, "Cancelling...")
        elif self.processing.state == RUNNING and self.run:
            self.processing.to(CANCELLING, "Cancelling...")
            client, runId = self.supervisor.client, self.run.id
            if client is not None:
                return self.executor.submit(client.cancel, runId)
        elif self._job is not None:
            self._job[0].cancel()
        return None

    def _tickLoading(self):
        if self._loading is None or not self._loading[0].done():
            return
        future, cancel, ctx, kind = self._loading
        self._loading = None
        try:
            if kind == "worker":  # started for a person's prompts: they go now
                future.result()
                self.processing.to(IDLE, "Worker ready.")
                self._status("Worker ready; recomputing your slice...")
                return
            client, runId = future.result()
        except Cancelled:
            self._dropNextTargets()
            self._setMarkupsLocked(ctx, False)
            self.processing.to(IDLE, "Cancelled.")
            self._status("Cancelled.")
            return
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self._dropNextTargets()
            self._setMarkupsLocked(ctx, False)
            self.processing.to(ERROR, str(exc))
            self._status(f"Could not start: {exc}", "error")
            return
        if cancel.is_set() or self.processing.state == CANCELLING:
            self.executor.submit(client.cancel, runId)
        self.audit.start_run(runId, ctx.target, ctx.axis, ctx.volumeNode.GetName(), self._provenance(ctx), kind)
        answer, ctx.continueAnswer = ctx.continueAnswer, None
        if kind == "continue" and answer is not None:  # the prompt set the agent continues from: the person's
            index = self._loadingSlice
            self.audit.record_override(runId, ctx.axis, index, ctx.pendingEdits.pop((ctx.axis, index), []),
                                       answer["prompts"], answer["mask"], kind="continue")
        self.run = _Run(ctx, EventStream(client, runId), runId, kind)
        self.progress = self.run.progress.among_targets(ctx.target, *self._loadingPosition)
        self._setMarkupsLocked(ctx, True)
        if self.processing.state == LOADING:
            self.processing.to(RUNNING, "Running...")

    def _tickRun(self, budget_s=0.04):
        run = self.run
        if run is None:
            return
        gone = self.supervisor.check() != READY  # crashed, or stopped by the user
        if gone:
            run.stream.stop()
        deadline = time.monotonic() + budget_s
        while (gone or time.monotonic() < deadline) and self.run is run:  # gone: every event it sent is kept
            try:
                event = run.stream.queue.get_nowait()
            except Exception:  # queue.Empty
                break
            if event is None:
                if self.run is run:  # the stream ended without run_done
                    self._apply(run.ctx, [RunFinished("failed", "The event stream ended early.")])
                break
            run.progress.update(event)
            self.audit.record_event(event)
            if "slice" in event:
                run.slices.add(int(event["slice"]))
            if event.get("type") == "client_error":  # gave up following: the worker must not go on alone
                self.executor.submit(self._cancelQuietly, run.id)
            self._apply(run.ctx, run.ctx.planner.plan(event))
        if gone and self.run is run:
            status = "cancelled" if self.processing.state == CANCELLING else "failed"
            self._apply(run.ctx, [RunFinished(status, self.supervisor.last_error or "The worker stopped.")])
        elif self.run is run:
            self._status(run.progress.text())

    def _cancelQuietly(self, runId):
        """Pool thread: ask the worker to cancel a run this module no longer follows (best effort)."""
        client = self.supervisor.client
        if client is not None:
            try:
                client.cancel(runId)
            except ClientError:
                pass

    def _finishRun(self, finished):
        run = self.run
        if run is None:
            return
        self.run = None
        run.stream.stop()
        ctx = run.ctx
        self._setMarkupsLocked(ctx, False)
        scanned = self.scanPrompts(ctx, ctx.axis)
        for index in run.slices:  # what the agent left is the baseline the annotator edits
            ctx.overrides.baseline(ctx.axis, index, scanned.get(index, []))
            unsent = ctx.pendingEdits.pop((ctx.axis, index), None)
            if unsent:  # edits not yet sent when the run took the slice over: kept in the trail, not lost
                self.audit.record_override(run.id, ctx.axis, index, unsent, [], None, kind="superseded")
        ctx.markupsDirty = False
        rec = self.audit.run(run.id)
        if rec is not None and rec.status == "running":
            rec.status, rec.reason, rec.finished = finished.status, finished.reason, time.time()
        self._saveAudit()
        run.progress.status = run.progress.status or finished.status
        run.progress.reason = run.progress.reason or finished.reason
        if finished.status == "failed":
            self.processing.to(ERROR, finished.reason or "failed")
            self._status(run.progress.text() + self._dropNextTargets(), "error")
        elif finished.status != "done" or not self._nextTargets or self.processing.state == CANCELLING:
            self.processing.to(IDLE, run.progress.text())
            self._status(run.progress.text() + self._dropNextTargets())
        else:  # the press's next target, on the same slices
            self.processing.to(IDLE, run.progress.text())
            self._nextTargets.pop(0)()

    def _dropNextTargets(self) -> str:
        """Forget the press's targets not run yet; what to tell the person about them ("" when none)."""
        left, self._nextTargets = len(self._nextTargets), []
        return f" {left} more target{'s' * (left != 1)} not run." if left else ""

    def waitUntilIdle(self, timeout_s=300.0):
        """Process events until nothing is loading, running or waiting for an override (tests, scripts)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.host.processEvents()
            self._onTick()
            if not self._pending():
                return True
            time.sleep(0.02)
        raise TimeoutError(f"MedSAM Agent still busy after {timeout_s:.0f} s ({self.processing.state}).")

    # ------------------------------------------------------------------ overrides
    def _tickOverrides(self):
        if self.processing.busy:
            return
        now = time.monotonic()
        for ctx in list(self.contexts.values()):
            self._takeEdits(ctx, now)
            due = ctx.overrides.next_deadline()
            if due is not None and due <= now and self._workerNeededForEdits():
                self._startWorkerForEdits(ctx)
                return  # the edits wait, due, until the worker is ready
            for request in ctx.overrides.due_requests(now):
                self._volumeFile(ctx)  # (re)written only when the volume changed
                edits = ctx.pendingEdits.pop((request.axis, request.slice), [])
                if request.dropped:
                    self._status(f"Slice {request.slice}: {len(request.dropped)} prompt(s) outside the slice were "
                                 f"left out.", "warning")
                launch = ctx.launch or self._defaultLaunch()
                future = self.executor.submit(self._sendOverride, ctx, launch, request)
                self._overrideFutures.append((future, ctx, request, edits))
                self._status(f"Recomputing slice {request.slice}...")
        still = []
        for entry in self._overrideFutures:
            future, ctx, request, edits = entry
            if not future.done():
                still.append(entry)
                continue
            try:
                answer, error = future.result(), None
            except Exception as exc:  # noqa: BLE001 - shown, the edits stay on the markups
                answer, error = None, str(exc)
            before = list(ctx.overrides.editor(request.axis, request.slice).shown)  # what undo puts back
            if ctx.overrides.finish(request, error) and answer is not None:
                mask = decode_rle(answer["mask"])
                step = self.undo.begin(f"Override on slice {request.slice}", request.axis, request.slice, ctx)
                step.prompts = before
                self._apply(ctx, ctx.planner.mask_instruction(request.axis, request.slice, mask, force=True))
                self.audit.record_override(self._runOf(ctx, request.axis, request.slice), request.axis,
                                           request.slice, edits, request.prompts, encode_rle(mask))
                self._saveAudit()
                self._status(f"Slice {request.slice}: mask recomputed from {len(request.prompts)} prompt(s).")
            elif error is not None:
                # the edits stay on the markups and in the trail: they go with the next override of the slice
                ctx.pendingEdits.setdefault((request.axis, request.slice), [])[:0] = edits
                self._status(f"Slice {request.slice}: the override failed ({error}); the edits are kept.", "error")
        self._overrideFutures = still

    def _workerNeededForEdits(self) -> bool:
        """A person's prompts placed before any worker ran here (no Auto-segment yet): a worker is started
        for them, once.  A worker that was stopped or that ended is not restarted by an edit (the person
        starts it again with a run); the edit then stays on the markups, said."""
        return self.supervisor.generation == 0 and self.supervisor.check() != READY and not self._editStartTried

    def _startWorkerForEdits(self, ctx):
        """Start the worker (the panel's choices, or the context's last launch) as a run would, for edits:
        loading shows, Cancel stops it.  Packages to install or models to download need a run (it asks)."""
        self._editStartTried = True
        try:
            launch = ctx.launch or self._defaultLaunch()
            if not isinstance(self.supervisor, RemoteWorker):
                launch.check()
                if self.installPlan(launch.dependency_group(), launch.quantization) is not None \
                        or missing_models(launch):
                    raise RuntimeError("the agent is not set up on this computer yet (packages or models to get); "
                                       "press Auto-segment once, it asks before fetching anything")
        except Exception as exc:  # noqa: BLE001 - said; the edits stay on the markups
            self._status(f"Your prompts cannot be computed yet: {exc}.", "warning")
            return
        cancel = threading.Event()
        self.processing.to(LOADING, "Starting the worker for your prompts...")
        self._status("Starting the worker for your prompts...")
        future = self.executor.submit(self.supervisor.ensure_ready, launch, cancel, lambda step: None)
        ctx.launch = launch
        self._loading = (future, cancel, ctx, "worker")
        self._wake()

    def _takeEdits(self, ctx, now):
        """What the person changed on the context's markups since last looked at, kept per slice for the
        trail (``ctx.pendingEdits``); the slices' editors start their quiet time."""
        if not ctx.markupsDirty:
            return
        ctx.markupsDirty = False
        # the current axis first (a point just placed is claimed for it), then every other axis whose
        # slices have prompts (after a Redo in another view): moving or deleting those still recomputes
        axes = [ctx.axis] + sorted({a for (a, _) in ctx.overrides.editors} - {ctx.axis})
        for axis in axes:
            for edit in ctx.overrides.update(axis, self.scanPrompts(ctx, axis), now):
                ctx.pendingEdits.setdefault((edit["axis"], edit["slice"]), []).append(edit)
                if "from_slice" in edit:
                    ctx.pendingEdits.setdefault((edit["axis"], edit["from_slice"]), []).append(edit)

    def _runOf(self, ctx, axis, index):
        """The audit run a slice's edits go to: the run that made the slice (known from its markups after a
        reload too), else the target's own run of manual work."""
        run = ctx.sliceRun.get((axis, index))
        if run:
            return run
        manual = f"manual:{ctx.role}"
        if self.audit.run(manual) is None:
            self.audit.start_run(manual, ctx.target, axis, ctx.volumeNode.GetName(), kind="manual")
        return manual

    def _provenance(self, ctx) -> dict:
        """What ran a run, for the audit trail: the panel's choice for a local worker; for a worker
        server, the policy, tool and device the server reports (it may serve other models)."""
        chosen = ctx.launch.to_dict()
        server = getattr(self.supervisor, "server", None)  # a RemoteWorker's last status
        if not server:
            return chosen
        return {"worker_server": self.supervisor.url, "policy": server.get("policy"), "tool": server.get("tool"),
                "device": server.get("device"), "panel_choice": chosen}

    @property
    def recomputing(self) -> bool:
        """True while an edit's mask is being recomputed by the worker."""
        return bool(self._overrideFutures)

    def _sendOverride(self, ctx, launch, request):
        """Pool thread: the worker's mask for the edited prompts.  Never starts a stopped or ended worker
        (minutes of loading, with nothing on screen to cancel it): the person starts it with a run."""
        if self.supervisor.check() != READY:
            raise RuntimeError("the worker is not running (stopped, or it ended), so the mask was not recomputed. "
                               "Start it with Auto-segment or Continue, then move a prompt again")
        return self._withSession(ctx, launch, lambda client, sid: client.override(sid, request.axis, request.slice,
                                                                                   request.prompts))

    def _defaultLaunch(self):
        """The launch for an edit on a volume no run has used yet (the module: the panel's choices)."""
        if self.defaultLaunch is None:
            raise RuntimeError("choose the agent first (run Auto-segment once)")
        return self.defaultLaunch

    def flushOverrides(self):
        """Send pending edits now instead of after the quiet time (tests, scripts)."""
        for ctx in self.contexts.values():
            if ctx.markupsDirty:
                self._tickOverrides()
            for (axis, index), ed in ctx.overrides.editors.items():
                if ed.state == "editing":
                    ed.deadline = 0.0
        self._wake()

    # ------------------------------------------------------------------ undo
    def undoLast(self):
        """Undo the newest agent action or override: its markups go, the slice's voxels come back."""
        step = self.undo.current
        if step is None:
            return None
        ctx = step.owner
        state = None if ctx is None else ctx.overrides.state(step.axis, step.slice)
        # a failed recompute does not block an override's undo: its prompts and mask come back whole
        if state in (EDITING, RECOMPUTING) or (state == EDIT_ERROR and step.prompts is None):
            raise RuntimeError(f"Slice {step.slice} has edits that are not applied yet (its mask is being "
                               f"recomputed, or the recompute failed); wait for it, or fix the edit, then undo.")
        if state == EDIT_ERROR:  # those edits are given up by the undo: kept in the trail, not lost
            unsent = ctx.pendingEdits.pop((step.axis, step.slice), None)
            if unsent:
                self.audit.record_override(self._runOf(ctx, step.axis, step.slice), step.axis,
                                           step.slice, unsent, [], None, kind="superseded")
        self.undo.pop()
        self._applying = True
        try:
            for ref in step.markups:
                if ref[0] == "roi":
                    node = self.scene.GetNodeByID(ref[1])
                    if node:
                        self.scene.RemoveNode(node)
                else:
                    node = self.scene.GetNodeByID(ref[1])
                    n = node.GetNthControlPointIndexByID(ref[2]) if node else -1
                    if n >= 0:
                        node.RemoveNthControlPoint(n)
            if step.prompts is not None:
                self._restorePrompts(ctx, step.axis, step.slice, step.prompts)
            for (axis, index), (extent, block) in step.masks.items():
                self._writeBlock(ctx, extent, block, restore=True)
                ctx.planner.forget(axis, index)
        finally:
            self._applying = False
        scanned = self.scanPrompts(ctx, step.axis)
        ctx.overrides.baseline(step.axis, step.slice, scanned.get(step.slice, []))
        h, w = ctx.geometry.slice_shape(step.axis)
        for (axis, index), (extent, block) in step.masks.items():  # the trail records the undo too
            prompts = [p for p in (i.wire(w, h) for i in scanned.get(index, [])) if p is not None]
            mask = ctx.geometry.block_to_mask(axis, index, extent, block)
            self.audit.record_override(self._runOf(ctx, axis, index), axis, index,
                                       [{"edit": "undo", "author": "user", "label": step.label}], prompts,
                                       encode_rle(mask), kind="undo")
        self._saveAudit()
        self._status(f"Undone: {step.label}.")
        return step.label

    # ------------------------------------------------------------------ audit
    def _attachAudit(self, node):
        if node is not self.auditNode:
            self.auditNode = node
            try:
                self.audit = AuditLog.from_json(node.GetText() or "")
            except ValueError as exc:
                self._status(f"The audit node holds something else ({exc}); starting a new trail.", "warning")
                self.audit = AuditLog()

    def _saveAudit(self):
        if self.auditNode is not None:
            self.auditNode.SetText(self.audit.to_json())

    def exportAudit(self, path):
        return str(self.audit.export(path))

    # ------------------------------------------------------------------ worker
    def stopWorker(self):
        sent, supervisor = self.cancel(), self.supervisor

        def stop():  # the run's cancel reaches the worker first (a shared server would otherwise go on with it)
            if sent is not None:
                concurrent.futures.wait([sent], timeout=10)
            supervisor.stop()

        self.executor.submit(stop)  # the timer sees it stopped and finishes the run
        for ctx in self.contexts.values():
            ctx.session = None

    # ------------------------------------------------------------------ the timer
    def _onTick(self):
        try:
            self._tickJob()
            self._tickLoading()
            self._tickRun()
            self._tickOverrides()
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the timer silently
            logging.exception("MedSAM Agent")
            self._status(f"Internal error: {exc}", "error")
            if self.processing.busy and self.processing.can(ERROR):
                self.processing.to(ERROR, str(exc))
        self._changed()
        if not self._pending():
            self.timer.stop()

    def _pending(self):
        """Anything for the timer to do: loading, a run, a download, edits or overrides under way."""
        return (self.processing.busy or bool(self._overrideFutures) or self._job is not None
                or any(c.markupsDirty or c.overrides.next_deadline() is not None for c in self.contexts.values()))
