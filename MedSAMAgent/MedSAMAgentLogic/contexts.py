"""What the Logic keeps per (volume, segmentation, segment): :class:`VolumeContext`; and the run in progress."""
import vtk

import slicer

from MedSAMAgentLib.slicer_support.geometry import AXES, VolumeGeometry
from MedSAMAgentLib.slicer_support.markup_plan import MarkupPlanner
from MedSAMAgentLib.slicer_support.override import OverrideManager
from MedSAMAgentLib.slicer_support.processing import RunProgress


class VolumeContext:
    """One volume and the segment the agent writes: geometry, planner, overrides, markups, worker session."""

    def __init__(self, volumeNode, segmentationNode, segmentId, target):
        self.volumeNode, self.segmentationNode = volumeNode, segmentationNode
        self.segmentId, self.target = segmentId, target
        m = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(m)
        self.geometry = VolumeGeometry(slicer.util.arrayFromVTKMatrix(m), volumeNode.GetImageData().GetDimensions())
        self.planner = MarkupPlanner(self.geometry)
        sizes = {}
        for a in AXES:
            h, w = self.geometry.slice_shape(a)
            sizes[a] = (w, h)
        self.overrides = OverrideManager(sizes)
        self.axis = "axial"
        self.launch = None
        self.session = None
        self.continueAnswer = None  # the override a "continue" sent first (the person's prompts), for the audit
        self.staleSession = None  # the worker's session of an earlier copy of the volume, closed when it reopens
        self.sessionGeneration = -1
        self.volumeFile = None
        self.volumeStamp = None
        self.sliceRun = {}  # (axis, slice) -> run id that last wrote it (for the audit)
        self.pendingEdits = {}  # (axis, slice) -> the annotator's edits not yet sent
        self.markupsDirty = False
        self.baselined = set()  # axes whose markups the override manager has taken in
        self.continuePrompts = []  # a "continue" run's prompts, read off the markups on the GUI thread
        self.role = "".join(c if c.isalnum() else "_" for c in segmentId)
        self.allowOverlap = False  # False: a voxel already in another segment is left to it

    @property
    def key(self):
        return (self.volumeNode.GetID(), self.segmentationNode.GetID(), self.segmentId)


class _Run:
    """The run in progress: its stream of events, progress, and where they go."""

    def __init__(self, ctx, stream, runId, kind):
        self.ctx, self.stream, self.id, self.kind = ctx, stream, runId, kind
        self.progress = RunProgress()
        self.slices = set()
