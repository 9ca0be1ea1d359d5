"""3D Slicer module: MedSAM Agent -- Auto-segment with live markups, human override, audit.

Slicer glue only: the Module, the panel (Widget), and Slicer's implementation of the services the
Logic needs (:class:`SlicerHost`).  The Logic itself is :mod:`MedSAMAgentLogic.logic` (MRML and VTK, no
Qt; tested on slicer-core), and every decision is made by Slicer-free code in
``MedSAMAgentLib.slicer_support``.  The models run in a separate worker process.  Nothing here
imports torch, installs a package or downloads a model when the module loads: that happens on the
first Auto-segment, after the user agrees.
"""
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTextNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from MedSAMAgentLib.slicer_support.options import (
    DEVICES,
    POLICY_DEFAULT_PROFILE,
    PROFILES,
    QUANTIZATIONS,
    TARGET_SUGGESTIONS,
    policy_choices,
    tool_choices,
)
from MedSAMAgentLib.slicer_support.processing import CANCELLING, LOADING, RUNNING
from MedSAMAgentLib.slicer_support.remote_worker import TOKEN_SETTING, URL_SETTING
from MedSAMAgentLib.slicer_support.worker_supervisor import SupervisorError
from MedSAMAgentLogic.host import Host
from MedSAMAgentLogic.logic import AgentLogic, stopAllWorkers
from MedSAMAgentLogic.worklist_review import WorklistReview
from MedSAMAgentLib.slicer_support.run_choice import SLICE_MODES, VIEWS, parse_targets

#
# MedSAMAgent
#


class MedSAMAgent(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedSAM Agent"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedSAM Agent developers"]
        self.parent.helpText = """
Agentic segmentation: a vision-language policy (Qwen3-VL) places boxes and clicks, a SAM2-family model
(MedSAM2, SAM2.1) updates the mask, slice by slice.  Every box and click appears as a markup while it happens;
move, delete or add them and the slice's mask follows.
See <a href="https://github.com/medsam-agent/SlicerMedSAMAgent#3d-slicer">the documentation</a>.
"""
        self.parent.acknowledgementText = """
Built on SAM2 (Meta), MedSAM2 (Wang lab) and Qwen3-VL (Qwen team), and on the MedSAM-Agent checkpoint
(CUHK AIM group).  Uses Slicer's scripted module template and the PyTorch extension.
"""
        slicer.app.connect("aboutToQuit()", stopAllWorkers)


#
# MedSAMAgentParameterNode
#


@parameterNodeWrapper
class MedSAMAgentParameterNode:
    """The panel's choices, saved with the scene.

    inputVolume - volume to segment (default: the active one).
    target - what to segment, in words; also the segment's name.  Several, separated by commas, run one
        after the other, each into its own segment.
    allowOverlap - whether a target's mask may take voxels another segment already has (default: no).
    outputSegmentation - where the segment goes (created when empty).
    sliceView - the view whose orientation and current slice are used.
    sliceMode - current slice, a range around it, or auto-grow from it.
    rangeBefore, rangeAfter - the range, in slices before and after the current one.
    policy, policyPath, tool, toolPath, device, quantization, maxTurns - the agent.
    profile - the conversation profile: the policy's own (the released policy: its authors' evaluation path,
        medsam-agent-v1-eval), or one named (medsam-agent-v1: their RL path).
    auditNode - text node holding the audit trail (JSON), saved with the scene.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    target: str = ""
    allowOverlap: bool = False
    sliceView: Annotated[str, Choice(list(VIEWS))] = "Red"
    sliceMode: Annotated[str, Choice(list(SLICE_MODES))] = "current slice"
    rangeBefore: Annotated[int, WithinRange(0, 1000)] = 5
    rangeAfter: Annotated[int, WithinRange(0, 1000)] = 5
    policy: Annotated[str, Choice(policy_choices())] = "medsam-agent-8b"
    policyPath: str = ""
    tool: Annotated[str, Choice(tool_choices())] = "medsam2"
    toolPath: str = ""
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    quantization: Annotated[str, Choice(list(QUANTIZATIONS))] = "none"
    profile: Annotated[str, Choice(list(PROFILES))] = POLICY_DEFAULT_PROFILE
    maxTurns: Annotated[int, WithinRange(1, 10)] = 5
    auditNode: vtkMRMLTextNode


#
# MedSAMAgentWidget
#


class _Bound:
    """The widgets bound to parameters (``connectGui`` reads every attribute's SlicerParameterName)."""


class MedSAMAgentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        # Nothing heavy here: no install, no download, no worker (they wait for the first Auto-segment).
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    # ------------------------------------------------------------------ building the panel
    def _bind(self, widget, name):
        widget.setProperty("SlicerParameterName", name)
        setattr(self.ui, name, widget)
        return widget

    def _section(self, title, collapsed=False):
        import ctk

        box = ctk.ctkCollapsibleButton()
        box.text = title
        box.collapsed = collapsed
        self.layout.addWidget(box)
        return qt.QFormLayout(box)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = MedSAMAgentLogic()
        self.review = WorklistReview(self.logic)
        self.ui = _Bound()

        form = self._section("Inputs")
        volume = self._bind(slicer.qMRMLNodeComboBox(), "inputVolume")
        volume.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        volume.addEnabled = volume.removeEnabled = False
        volume.noneEnabled = False
        volume.setMRMLScene(slicer.mrmlScene)
        volume.toolTip = "The volume to segment (by default the one shown in the views)."
        form.addRow("Volume:", volume)
        target = self._bind(qt.QLineEdit(), "target")
        completer = qt.QCompleter(list(TARGET_SUGGESTIONS), target)
        completer.setCaseSensitivity(qt.Qt.CaseInsensitive)
        target.setCompleter(completer)
        target.toolTip = ("What to segment, in words (e.g. 'liver', 'left kidney'); also the segment's name. "
                          "Several, separated by commas ('liver, spleen, left kidney'), each get their own segment.")
        form.addRow("Target(s):", target)
        overlap = self._bind(qt.QCheckBox("Segments may overlap"), "allowOverlap")
        overlap.toolTip = ("Off: a voxel already in another segment is left to it (Segment Editor's 'overwrite "
                           "none'). On: the agent's mask is written whole, overlapping other segments.")
        form.addRow("", overlap)
        seg = self._bind(slicer.qMRMLNodeComboBox(), "outputSegmentation")
        seg.nodeTypes = ["vtkMRMLSegmentationNode"]
        seg.addEnabled = seg.removeEnabled = seg.renameEnabled = True
        seg.noneEnabled = True
        seg.noneDisplay = "(create new)"
        seg.setMRMLScene(slicer.mrmlScene)
        form.addRow("Output segmentation:", seg)
        form.addRow("Slice view:", self._bind(qt.QComboBox(), "sliceView"))
        form.addRow("Slices:", self._bind(qt.QComboBox(), "sliceMode"))
        before, after = self._bind(qt.QSpinBox(), "rangeBefore"), self._bind(qt.QSpinBox(), "rangeAfter")
        rangeRow = qt.QHBoxLayout()
        rangeRow.addWidget(qt.QLabel("before:"))
        rangeRow.addWidget(before)
        rangeRow.addWidget(qt.QLabel("after:"))
        rangeRow.addWidget(after)
        form.addRow("Range (slices):", rangeRow)

        form = self._section("Agent", collapsed=True)
        form.addRow("Policy:", self._bind(qt.QComboBox(), "policy"))
        form.addRow("Policy folder / replay file:", self._bind(qt.QLineEdit(), "policyPath"))
        form.addRow("Tool:", self._bind(qt.QComboBox(), "tool"))
        form.addRow("Tool checkpoint (.pt):", self._bind(qt.QLineEdit(), "toolPath"))
        form.addRow("Device:", self._bind(qt.QComboBox(), "device"))
        form.addRow("4/8-bit policy:", self._bind(qt.QComboBox(), "quantization"))
        profile = self._bind(qt.QComboBox(), "profile")
        profile.toolTip = ("How the policy is talked to. The released policy's own is its authors' evaluation path "
                           "(medsam-agent-v1-eval, behind the published numbers); medsam-agent-v1 is their RL path.")
        form.addRow("Profile:", profile)
        turns = self._bind(qt.QSpinBox(), "maxTurns")
        turns.toolTip = "At most this many boxes and clicks per slice."
        form.addRow("Max turns:", turns)

        self.applyButton = qt.QPushButton("Auto-segment")
        self.applyButton.toolTip = "Run the agent on the chosen slices."
        self.layout.addWidget(self.applyButton)
        self.progressBar = qt.QProgressBar()
        self.progressBar.visible = False
        self.layout.addWidget(self.progressBar)
        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        self.layout.addWidget(self.statusLabel)

        form = self._section("Review and correct")
        self.reviewTarget = qt.QComboBox()
        self.reviewTarget.toolTip = "The target that Continue, Redo and Add box act on (after a run of several)."
        form.addRow("Correct target:", self.reviewTarget)
        self.positivePlace = slicer.qSlicerMarkupsPlaceWidget()
        self.negativePlace = slicer.qSlicerMarkupsPlaceWidget()
        for w in (self.positivePlace, self.negativePlace):
            w.setMRMLScene(slicer.mrmlScene)
            w.buttonsVisible = False
            w.placeButton().show()
            w.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup
        row = qt.QHBoxLayout()
        row.addWidget(qt.QLabel("Add positive point:"))
        row.addWidget(self.positivePlace)
        row.addWidget(qt.QLabel("negative:"))
        row.addWidget(self.negativePlace)
        self.addBoxButton = qt.QPushButton("Add box")
        self.addBoxButton.toolTip = "A box in the middle of the current slice; drag its handles to fit."
        row.addWidget(self.addBoxButton)
        form.addRow(row)
        buttons = qt.QHBoxLayout()
        self.continueButton = qt.QPushButton("Continue agent")
        self.continueButton.toolTip = "The agent takes two more turns on the current slice, from its current prompts."
        self.redoButton = qt.QPushButton("Redo slice")
        self.redoButton.toolTip = "Run the agent again on the current slice, from scratch."
        self.undoButton = qt.QPushButton("Undo")
        self.undoButton.toolTip = "Undo the last agent action or override (its markups and mask)."
        for b in (self.continueButton, self.redoButton, self.undoButton):
            buttons.addWidget(b)
        form.addRow(buttons)
        self.overrideLabel = qt.QLabel("Move, delete or add points, or resize a box: the slice's mask follows.")
        self.overrideLabel.wordWrap = True
        form.addRow(self.overrideLabel)

        form = self._section("Review a label run", collapsed=True)
        self.worklistOpenButton = qt.QPushButton("Open folder...")
        self.worklistOpenButton.toolTip = ("A 'medsam-agent label' output folder: its cases one at a time (those its "
                                           "report lists for review first), each with its masks and audit trail.")
        self.worklistPreviousButton = qt.QPushButton("Previous")
        self.worklistNextButton = qt.QPushButton("Next")
        self.worklistAcceptButton = qt.QPushButton("Accept case")
        self.worklistAcceptButton.toolTip = ("Save the case's segments as they are now, with the audit trail, into "
                                             "the folder's review/ (the label run's own files are kept).")
        form.addRow(self.worklistOpenButton)
        row = qt.QHBoxLayout()
        for b in (self.worklistPreviousButton, self.worklistNextButton, self.worklistAcceptButton):
            row.addWidget(b)
        form.addRow(row)
        self.worklistLabel = qt.QLabel(self.review.statusText())
        self.worklistLabel.wordWrap = True
        form.addRow(self.worklistLabel)

        form = self._section("Audit and worker", collapsed=True)
        self.exportButton = qt.QPushButton("Export trajectory as JSON...")
        self.exportButton.toolTip = "Every action of every run, who made it (agent or user) and the mask after it."
        form.addRow(self.exportButton)
        self.workerLabel = qt.QLabel("Worker not running.")
        self.workerLabel.wordWrap = True
        self.stopWorkerButton = qt.QPushButton("Stop worker")
        self.stopWorkerButton.toolTip = "Free the GPU memory the models hold; the next run starts the worker again."
        form.addRow(self.workerLabel)
        form.addRow(self.stopWorkerButton)
        self.workerUrlEdit = qt.QLineEdit(slicer.util.settingsValue(URL_SETTING, ""))
        self.workerUrlEdit.placeholderText = "empty: a worker on this computer"
        self.workerUrlEdit.toolTip = ("A department worker server, e.g. http://gpu-server:8765 (its administrator "
                                      "gives the address and token). Its models are the server's own.")
        self.workerTokenEdit = qt.QLineEdit(slicer.util.settingsValue(TOKEN_SETTING, ""))
        self.workerTokenEdit.echoMode = qt.QLineEdit.Password
        self.workerConnectButton = qt.QPushButton("Use this worker")
        form.addRow("Worker server:", self.workerUrlEdit)
        form.addRow("Token:", self.workerTokenEdit)
        form.addRow(self.workerConnectButton)
        self.layout.addStretch(1)

        self.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.addBoxButton.connect("clicked(bool)", self.onAddBox)
        self.continueButton.connect("clicked(bool)", self.onContinue)
        self.redoButton.connect("clicked(bool)", self.onRedoSlice)
        self.undoButton.connect("clicked(bool)", self.onUndo)
        self.exportButton.connect("clicked(bool)", self.onExport)
        self.stopWorkerButton.connect("clicked(bool)", self.onStopWorker)
        self.workerConnectButton.connect("clicked(bool)", self.onUseWorker)
        self.reviewTarget.connect("activated(int)", self.onReviewTarget)
        self.worklistOpenButton.connect("clicked(bool)", self.onWorklistOpen)
        self.worklistPreviousButton.connect("clicked(bool)", lambda _=False: self.onWorklistMove("previous"))
        self.worklistNextButton.connect("clicked(bool)", lambda _=False: self.onWorklistMove("next"))
        self.worklistAcceptButton.connect("clicked(bool)", self.onWorklistAccept)
        self.logic.onStatus = self._showStatus
        self.logic.onStateChanged = self._refresh
        self.logic.onLaunchChanged = self._storeLaunch

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    # ------------------------------------------------------------------ parameter node
    def cleanup(self) -> None:
        self.removeObservers()
        if self.logic:
            self.logic.cleanup()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._refresh)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self.logic.forgetScene()
        self.review.forgetScene()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            volume = self.logic.activeVolume()
            if volume:
                self._parameterNode.inputVolume = volume

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._refresh)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._refresh)
            self._refresh()

    def _storeLaunch(self, launch) -> None:
        p = self._parameterNode
        if p:
            p.policy, p.policyPath = launch.policy, launch.policy_path
            p.tool, p.toolPath = launch.tool, launch.tool_path

    # ------------------------------------------------------------------ state shown
    def _inputsOk(self):
        p = self._parameterNode
        if not p or not p.inputVolume:
            return False, "Choose a volume."
        try:
            parse_targets(p.target)
        except ValueError as exc:
            return False, str(exc)
        return True, ""

    def _refresh(self, *args) -> None:
        if not self._parameterNode:
            return
        ok, why = self._inputsOk()
        view = self.logic.processing.button(ok, why)
        self.applyButton.text = view.text
        self.applyButton.enabled = view.enabled
        self.applyButton.toolTip = view.tooltip
        idle = not self.logic.processing.busy
        ctx = self.logic.currentContext
        # while an edit's mask is being recomputed, nothing may take its slice over (its answer would be lost)
        settled = idle and not self.logic.recomputing
        for b in (self.continueButton, self.redoButton):
            b.enabled = settled and ctx is not None
        self.addBoxButton.enabled = idle and ctx is not None
        self.undoButton.enabled = settled and len(self.logic.undo) > 0
        self.undoButton.toolTip = (("Wait: a slice's mask is being recomputed. " if self.logic.recomputing else "")
                                   + (f"Undo: {self.logic.undo.label()}" if len(self.logic.undo) else "Nothing to undo."))
        self.positivePlace.setCurrentNode(self.logic.pointsNode(ctx, True) if ctx else None)
        self.negativePlace.setCurrentNode(self.logic.pointsNode(ctx, False) if ctx else None)
        progress = self.logic.progress
        self.progressBar.visible = self.logic.processing.state in (LOADING, RUNNING, CANCELLING)
        fraction = progress.fraction() if progress else None
        if fraction is None:
            self.progressBar.setRange(0, 0)  # busy indicator (loading, auto-grow)
        else:
            self.progressBar.setRange(0, 100)
            self.progressBar.value = int(100 * fraction)
        self.workerLabel.text = self.logic.supervisor.describe()
        targets = self.logic.targetsInWork()
        if [self.reviewTarget.itemText(i) for i in range(self.reviewTarget.count)] != targets:
            self.reviewTarget.clear()
            self.reviewTarget.addItems(targets)
        if ctx is not None and ctx.target in targets:
            self.reviewTarget.currentIndex = targets.index(ctx.target)
        self.reviewTarget.enabled = idle and len(targets) > 1
        self.worklistOpenButton.enabled = settled
        for b in (self.worklistPreviousButton, self.worklistNextButton):
            b.enabled = settled and self.review.worklist is not None
        self.worklistAcceptButton.enabled = settled and self.review.volumeNode is not None

    def _showStatus(self, text, level="info") -> None:
        self.statusLabel.text = text
        color = {"warning": "#b36b00", "error": "#c00000"}.get(level, "")
        self.statusLabel.setStyleSheet(f"color: {color}" if color else "")
        self._refresh()

    # ------------------------------------------------------------------ actions
    def _launch(self):
        p = self._parameterNode
        return self.logic.launchFromParameters(p)

    def onApplyButton(self) -> None:
        view = self.logic.processing.button(*self._inputsOk())
        if view.action == "cancel":
            self.logic.cancel()
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Auto-segment could not start.", waitCursor=False):
            if not p.outputSegmentation:
                p.outputSegmentation = self.logic.newSegmentation(p.inputVolume)
            self.logic.autoSegment(p.inputVolume, p.outputSegmentation, p.target, p.sliceView, p.sliceMode,
                                   p.rangeBefore, p.rangeAfter, self._launch(), auditNode=self._auditNode(),
                                   allowOverlap=p.allowOverlap)

    def onReviewTarget(self, index) -> None:
        with slicer.util.tryWithErrorDisplay("Could not choose that target.", waitCursor=False):
            self.logic.selectTarget(self.reviewTarget.itemText(index))

    def _auditNode(self):
        p = self._parameterNode
        if not p.auditNode:
            p.auditNode = self.logic.newAuditNode()
        return p.auditNode

    def _currentSlice(self, sameAxis=True):
        """(context, axis, slice index) of the slice in the chosen view."""
        p = self._parameterNode
        ctx = self.logic.currentContext
        if ctx is None:
            raise ValueError("Run Auto-segment first.")
        axis, index = self.logic.viewAxisAndSlice(ctx.volumeNode, p.sliceView)
        if sameAxis and axis != ctx.axis:
            raise ValueError(f"The agent worked along {ctx.axis}; show an {ctx.axis} slice in the {p.sliceView} view.")
        return ctx, axis, index

    def onContinue(self) -> None:
        with slicer.util.tryWithErrorDisplay("Continue agent failed.", waitCursor=False):
            ctx, axis, index = self._currentSlice()
            self.logic.continueAgent(ctx, axis, index, self._launch(), turns=2)

    def onRedoSlice(self) -> None:
        with slicer.util.tryWithErrorDisplay("Redo slice failed.", waitCursor=False):
            ctx, axis, index = self._currentSlice(sameAxis=False)
            self.logic.startAutoSegment(ctx.volumeNode, ctx.segmentationNode, ctx.target, axis, [index], index,
                                        self._launch(), auditNode=self._auditNode(), kind="redo",
                                        allowOverlap=self._parameterNode.allowOverlap)

    def onAddBox(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not add a box.", waitCursor=False):
            ctx, axis, index = self._currentSlice()
            h, w = ctx.geometry.slice_shape(axis)
            self.logic.addBox(ctx, axis, index, (w * 0.375, h * 0.375, w * 0.625, h * 0.625))

    def onUndo(self) -> None:
        with slicer.util.tryWithErrorDisplay("Undo failed.", waitCursor=True):
            self.logic.undoLast()
        self._refresh()

    def onExport(self) -> None:
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Export the trajectory",
                                              "medsam-agent-trajectory.json", "JSON (*.json)")
        if path:
            with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
                self.logic.exportAudit(path)
                self._showStatus(f"Trajectory written to {path}.")

    # ------------------------------------------------------------------ reviewing a label run
    def _leaveCaseOk(self) -> bool:
        """True when the case shown may be left: nothing changed since loaded or accepted, or the person agrees."""
        r = self.review
        if r.volumeNode is None or not r.edited:
            return True
        return slicer.util.confirmOkCancelDisplay(f"Case {r.worklist.current.case} has changes that are not "
                                                  f"accepted. Leave it and lose them?", "MedSAM Agent: review")

    def _showCase(self, loaded=False) -> None:
        r = self.review
        self.worklistLabel.text = r.statusText()
        if loaded and r.volumeNode is not None and self._parameterNode:
            p = self._parameterNode
            p.inputVolume, p.outputSegmentation, p.auditNode = r.volumeNode, r.segmentationNode, r.auditNode
            p.target = ", ".join(r.worklist.current.masks)
            slicer.util.setSliceViewerLayers(background=r.volumeNode, fit=True)
        self._refresh()

    def onWorklistOpen(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Open a label output folder")
        if folder and self._leaveCaseOk():
            with slicer.util.tryWithErrorDisplay("Could not open the label run.", waitCursor=True):
                self.review.open(folder)
        self._showCase(loaded=True)

    def onWorklistMove(self, step) -> None:
        if self._leaveCaseOk():
            with slicer.util.tryWithErrorDisplay("Could not load the case.", waitCursor=True):
                getattr(self.review, step)()
        self._showCase(loaded=True)

    def onWorklistAccept(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not accept the case.", waitCursor=True):
            path = self.review.accept()
            self._showStatus(f"Case accepted ({path}).")
        self._showCase()

    def onStopWorker(self) -> None:
        self.logic.stopWorker()
        self._refresh()

    def onUseWorker(self) -> None:
        if self.logic.processing.busy:
            slicer.util.warningDisplay("Wait for the run to finish (or cancel it) before changing the worker.")
            return
        try:
            self.logic.useWorkerServer(self.workerUrlEdit.text, self.workerTokenEdit.text)
        except SupervisorError as exc:
            slicer.util.errorDisplay(str(exc))
        self._refresh()


#
# MedSAMAgentLogic
#


class SlicerHost(Host):
    """Slicer's application services for the Logic: its Qt timer, settings, dialogs, layout and temporary folder."""

    @property
    def scene(self):
        return slicer.mrmlScene

    def makeTimer(self, interval_ms, callback):
        timer = qt.QTimer()
        timer.setInterval(interval_ms)
        timer.connect("timeout()", callback)
        return timer

    def processEvents(self):
        slicer.app.processEvents()

    def settingsValue(self, key, default=""):
        return slicer.util.settingsValue(key, default)

    def setSettingsValue(self, key, value):
        qt.QSettings().setValue(key, value)

    def temporaryPath(self):
        return slicer.app.temporaryPath

    def sliceNode(self, viewName):
        lm = slicer.app.layoutManager()
        if lm and lm.sliceWidget(viewName):
            return lm.sliceWidget(viewName).mrmlSliceNode()
        return super().sliceNode(viewName)

    def selectionNode(self):
        return slicer.app.applicationLogic().GetSelectionNode()

    def confirm(self, text, title):
        return slicer.util.confirmOkCancelDisplay(text, title)

    def askModels(self, text):
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setWindowTitle("MedSAM Agent: models")
        box.setText(text)
        download = box.addButton("Download", qt.QMessageBox.AcceptRole)
        local = box.addButton("Use local files...", qt.QMessageBox.ActionRole)
        box.addButton(qt.QMessageBox.Cancel)
        box.exec_()
        if box.clickedButton() == download:
            return "download"
        return "local" if box.clickedButton() == local else "cancel"

    def chooseFolder(self, title):
        return qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), title)

    def chooseFile(self, title, nameFilter):
        return qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), title, "", nameFilter)

    def progressDialog(self, title, onCancel):
        dialog = qt.QProgressDialog("Starting...", "Cancel", 0, 100, slicer.util.mainWindow())
        dialog.setWindowTitle(title)
        dialog.minimumDuration = 0
        dialog.connect("canceled()", onCancel)
        dialog.show()
        return dialog


class MedSAMAgentLogic(AgentLogic, ScriptedLoadableModuleLogic):
    """The Logic (:mod:`MedSAMAgentLogic.logic`) in Slicer: its parameter node, and edits before any run use
    the panel's choices."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)  # its moduleName finds the parameter node
        AgentLogic.__init__(self, SlicerHost())

    def getParameterNode(self):
        return MedSAMAgentParameterNode(super().getParameterNode())

    def _defaultLaunch(self):
        return self.launchFromParameters(self.getParameterNode())


#
# MedSAMAgentTest
#


class MedSAMAgentTest(ScriptedLoadableModuleTest):
    """Runs in Slicer ("Reload and Test", or ctest): no model weights are downloaded.

    Loads the MRHead sample, runs Auto-segment with the bundled LiteMedSAM tool (the classical tool where its
    package is not installed) and a replay policy on three axial
    slices, checks the markups (one box per slice lying in its slice plane, one positive point each, labelled
    with slice and turn) and the segment (voxels on exactly those slices), then adds a negative point on one
    slice -- an override -- and checks that slice's mask changed and the audit trail recorded the user.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_AutoSegmentAndOverride()

    def test_AutoSegmentAndOverride(self):
        import tempfile

        import SampleData

        from MedSAMAgentLogic.self_test import auto_segment_and_override

        self.delayDisplay("Loading MRHead")
        volume = SampleData.downloadSample("MRHead")
        logic = MedSAMAgentLogic()
        self.assertTrue(logic.ensureDependencies("core", confirm=False))
        auto_segment_and_override(logic, volume, tempfile.mkdtemp(prefix="MedSAMAgentTest"), self.delayDisplay)
        self.delayDisplay("Test passed")
