"""Reviewing a ``medsam-agent label`` output folder: one case at a time in the scene, corrected with the module's
override tools (or Slicer's Segment Editor), then accepted (:class:`~MedSAMAgentLib.slicer_support.worklist.Worklist`
decides the order and writes ``review/``).

A case in the scene: its image as a scalar volume node (a file through Slicer's Volumes logic, a DICOM series
read with SimpleITK and pushed in), a segmentation with one segment per target (named by the target) from the
case's mask files, and a text node with its audit trail, which becomes the Logic's trail, so that the
annotator's overrides go into it (each slice's edits into the label run that made the slice).

Frames: the case image as SimpleITK reads it, array [z, y, x]; the volume node's IJK is that grid (i, j, k =
x, y, z) with IJKToRAS = diag(-1, -1, 1, 1) @ [direction * spacing | origin] (SimpleITK's LPS to RAS); the
segments are on that grid, so a segment read on the volume is the [z, y, x] array a mask file holds.
"""
import numpy as np
import vtk

import slicer

from MedSAMAgentLib.errors import InputError
from MedSAMAgentLib.image_io import load_image, load_mask
from MedSAMAgentLib.slicer_support.geometry import RAS_TO_LPS
from MedSAMAgentLib.slicer_support.worklist import Worklist
from MedSAMAgentLogic.segment_voxels import write_block

SINGLE_FILE_AUTO_WL = 4 | 8  # AddArchetypeVolume options: this file only (no series guessed), auto window/level


def ijk_to_ras_of(image) -> np.ndarray:
    """The 4x4 IJKToRAS of a 3D SimpleITK image (its index (i, j, k) = array [k, j, i])."""
    m = np.eye(4)
    m[:3, :3] = np.array(image.GetDirection(), float).reshape(3, 3) * np.array(image.GetSpacing(), float)
    m[:3, 3] = image.GetOrigin()
    return RAS_TO_LPS @ m


def vtk_matrix(m) -> vtk.vtkMatrix4x4:
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r][c]))
    return out


def node_matrix(volumeNode) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def push_volume(scene, loaded, name):
    """A scalar volume node holding ``loaded.array`` ([z, y, x]) on the image's exact grid."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras_of(loaded.image)))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(loaded.array))
    node.CreateDefaultDisplayNodes()
    if node.GetDisplayNode() is not None:
        node.GetDisplayNode().AutoWindowLevelOn()
    return node


def load_volume(scene, loaded, name):
    """The case image as a volume node: a file through Slicer's Volumes logic (its storage node keeps the file),
    a DICOM series pushed from SimpleITK.  A file Slicer reads onto another grid than SimpleITK's (voxel order or
    geometry) is replaced by the pushed voxels, so that the segments always match the mask files voxel for voxel."""
    from pathlib import Path

    path = Path(loaded.source)
    if path.is_file():
        node = slicer.modules.volumes.logic().AddArchetypeVolume(str(path), name, SINGLE_FILE_AUTO_WL)
        if node is not None:
            same = node.GetImageData() is not None and np.allclose(node_matrix(node), ijk_to_ras_of(loaded.image),
                                                                   atol=1e-4)
            if same:
                voxels = slicer.util.arrayFromVolume(node)
                same = voxels.shape == loaded.array.shape and np.array_equal(voxels, loaded.array)
            if same:
                return node
            remove_node(scene, node)
    return push_volume(scene, loaded, name)


def remove_node(scene, node) -> None:
    """Remove ``node`` with its display and storage nodes (nothing when it is gone already)."""
    if node is None or not scene.IsNodePresent(node):
        return
    extra = []
    if hasattr(node, "GetNumberOfDisplayNodes"):
        extra += [node.GetNthDisplayNode(n) for n in range(node.GetNumberOfDisplayNodes())]
    if hasattr(node, "GetStorageNode"):
        extra.append(node.GetStorageNode())
    scene.RemoveNode(node)
    for e in extra:
        if e is not None and scene.IsNodePresent(e):
            scene.RemoveNode(e)


class WorklistReview:
    """A label run under review in ``logic``'s scene (an :class:`~MedSAMAgentLogic.logic.AgentLogic`).

    ``volumeNode``, ``segmentationNode``, ``auditNode``: the current case's nodes (None before a case is
    loaded); ``image``: its LoadedImage (what accepted masks are written like)."""

    def __init__(self, logic):
        self.logic = logic
        self.worklist = None
        self.volumeNode = self.segmentationNode = self.auditNode = None
        self.image = None
        self._baseline = None  # the case's fingerprint when loaded or last accepted

    @property
    def scene(self):
        return self.logic.scene

    # ------------------------------------------------------------------ moving
    def open(self, folder):
        """Open a label output folder and load its first case (InputError: not one, or nothing finished)."""
        worklist = Worklist(folder)
        self._checkIdle()
        before, self.worklist = self.worklist, worklist
        try:
            return self.load()
        except Exception:
            self.worklist = before if self.image is not None else worklist  # the case shown is still before's
            raise

    def next(self):
        return self._move(self.worklist.next)

    def previous(self):
        return self._move(self.worklist.previous)

    def go(self, case):
        return self._move(lambda: self.worklist.go(case))

    def _move(self, step):
        if self.worklist is None:
            raise RuntimeError("Open a label output folder first.")
        self._checkIdle()
        before = self.worklist.index
        step()
        try:
            return self.load()
        except Exception:
            self.worklist.index = before  # what the scene shows is still that case
            raise

    def _checkIdle(self):
        if self.logic.processing.busy or self.logic.recomputing:
            raise RuntimeError("The agent is still working on this case; wait for it, or cancel it, first.")

    def load(self):
        """Load the worklist's current case into the scene, replacing the case shown; returns its WorkItem.
        Its files are read first: a case that cannot be read leaves the scene as it was (InputError)."""
        it = self.worklist.current
        image = load_image(it.image, it.series)
        if image.dim != 3:
            raise InputError(f"Case {it.case} is a 2D image; the Slicer worklist reviews volumes.")
        files, audit = self.worklist.sources(it)
        masks = {name: load_mask(path, like=image) for name, path in files.items()}
        text = audit.read_text(encoding="utf-8") if audit.is_file() else ""
        self.leave()
        self.image = image
        try:
            self.volumeNode = load_volume(self.scene, image, it.case)
            self.segmentationNode = self.logic.newSegmentation(self.volumeNode)
            self.segmentationNode.SetName(f"{it.case} segmentation")
            m = vtk_matrix(ijk_to_ras_of(image.image))
            nz, ny, nx = image.array.shape
            segmentation = self.segmentationNode.GetSegmentation()
            for name, mask in masks.items():
                segmentId = segmentation.AddEmptySegment("", name)
                write_block(self.segmentationNode, segmentId, (0, nx - 1, 0, ny - 1, 0, nz - 1),
                            mask.astype(np.uint8), m)
            self.auditNode = self.logic.newAuditNode()
            self.auditNode.SetName(f"{it.case} audit")
            self.auditNode.SetText(text)
            self.logic._attachAudit(self.auditNode)
            self._makeContexts(it)
        except Exception:
            self.leave()
            raise
        selection = self.logic.host.selectionNode()
        if selection is not None:
            selection.SetActiveVolumeID(self.volumeNode.GetID())
        self._baseline = self._fingerprint()
        return it

    def _makeContexts(self, it):
        """One Logic context per target (the panel's "Correct target"), its slices' edits going to the run that
        made them (the label run's ``<case>:<target>``)."""
        first = None
        for name in it.masks:
            ctx = self.logic.context(self.volumeNode, self.segmentationNode, name)
            self.logic.setAxis(ctx, it.axis)
            for run in self.logic.audit.runs:
                if run.run.rsplit(":", 1)[-1] == name or run.target in (name, it.texts.get(name)):
                    for e in run.entries:
                        ctx.sliceRun.setdefault((e.axis, int(e.slice)), run.run)
            first = first or ctx
        self.logic.currentContext = first

    def leave(self):
        """Remove the current case's nodes (its markups, undo steps and worker sessions too); the worklist stays."""
        if self.volumeNode is not None:
            self.logic.forgetVolume(self.volumeNode)
        if self.auditNode is not None and self.logic.auditNode is self.auditNode:
            from MedSAMAgentLib.slicer_support.audit import AuditLog

            self.logic.auditNode, self.logic.audit = None, AuditLog()
        for node in (self.segmentationNode, self.auditNode, self.volumeNode):
            remove_node(self.scene, node)
        self.volumeNode = self.segmentationNode = self.auditNode = None
        self.image, self._baseline = None, None

    def forgetScene(self):
        """The scene was closed: its nodes are gone; the worklist stays (``load()`` shows the case again)."""
        self.volumeNode = self.segmentationNode = self.auditNode = None
        self.image, self._baseline = None, None

    # ------------------------------------------------------------------ state
    def segmentMask(self, target) -> np.ndarray:
        """A target's segment as bool [z, y, x] on the case image's grid (ValueError when it is gone)."""
        segmentId = self.segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(target) \
            if self.segmentationNode is not None and self.scene.IsNodePresent(self.segmentationNode) else ""
        if not segmentId:
            raise ValueError(f"The segment '{target}' is gone from the case's segmentation; add it back (or undo) "
                             f"before accepting.")
        array = slicer.util.arrayFromSegmentBinaryLabelmap(self.segmentationNode, segmentId, self.volumeNode)
        if array is None:
            return np.zeros(self.image.array.shape, bool)
        return np.asarray(array) > 0

    def _fingerprint(self):
        import hashlib

        if self.worklist is None or self.image is None:
            return None
        marks = {}
        for name in self.worklist.current.masks:
            try:
                marks[name] = hashlib.sha1(np.packbits(self.segmentMask(name)).tobytes()).hexdigest()
            except ValueError:
                marks[name] = None
        return marks, len(self.logic.audit.entries("user"))

    @property
    def edited(self) -> bool:
        """Whether the current case changed since it was loaded or last accepted (a segment's voxels, a
        segment removed, or an annotator's entry in the trail)."""
        return self._baseline is not None and self._fingerprint() != self._baseline

    def statusText(self) -> str:
        if self.worklist is None:
            return "No label run open."
        return self.worklist.status_text()

    # ------------------------------------------------------------------ accepting
    def accept(self):
        """Accept the current case as the scene shows it: each target's segment and the trail the Logic holds
        (agent and annotator entries) go to ``review/`` (Worklist.accept); returns the review record's path."""
        if self.image is None:
            raise RuntimeError("No case is loaded; open a label output folder first.")
        self._checkIdle()
        masks = {name: self.segmentMask(name) for name in self.worklist.current.masks}
        if self.logic.auditNode is self.auditNode:
            self.logic._saveAudit()
        text = self.auditNode.GetText() if self.auditNode is not None else self.logic.audit.to_json()
        path = self.worklist.accept(masks, text, self.image)
        self._baseline = self._fingerprint()
        return path
