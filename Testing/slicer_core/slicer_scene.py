"""Slicer's scene and logics stood up without Slicer's application, on the ``slicer-core`` wheels, and the
module's Logic on it with a :class:`PlainHost` (fixtures for the tests of this folder).

What it takes (see ../shared/notes/slicer-core.md): a scene, an application logic on it (selection and
interaction nodes, default colours), the module logics Slicer's util reaches through ``slicer.modules``,
the segmentation converter rules, and one slice logic per view (Red axial, Yellow sagittal, Green coronal).
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core has no wheel for this platform (Linux x86_64, Windows, "
                                              "macOS arm64 only)")
vtk = pytest.importorskip("vtk")

MODULE_DIR = Path(__file__).resolve().parents[2] / "MedSAMAgent"
sys.path.insert(0, str(MODULE_DIR))  # as Slicer puts the module's folder on the path

from MedSAMAgentLib.slicer_support.options import CLASSICAL, REPLAY, Launch  # noqa: E402
from MedSAMAgentLib.slicer_support.replay import write_replay  # noqa: E402
from MedSAMAgentLib.slicer_support.worker_supervisor import WorkerSupervisor  # noqa: E402
from MedSAMAgentLogic.host import PlainHost  # noqa: E402
from MedSAMAgentLogic.logic import AgentLogic  # noqa: E402

SHARED = Path(__file__).resolve().parents[3] / "shared"
CT = SHARED / "data" / "ct3d_totalseg_abdomen"
VIEWS = (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal"))
_RULES = []


def register_converter_rules() -> None:
    """Once per process: without them a segmentation cannot hold a binary labelmap."""
    if _RULES:
        return
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                 slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        factory.RegisterConverterRule(rule())
    _RULES.append(True)


class SlicerScene:
    """A real MRML scene with Slicer's logics and three slice views; ``slicer.mrmlScene`` is it."""

    def __init__(self):
        register_converter_rules()
        self.scene = slicer.vtkMRMLScene()
        slicer.mrmlScene = self.scene
        import tempfile

        self.cache = slicer.vtkCacheManager()  # data bundles unpack into its folder (as Slicer's cache)
        self.cache.SetRemoteCacheDirectory(tempfile.mkdtemp(prefix="slicer-cache"))
        self.io = slicer.vtkDataIOManager()
        self.io.SetCacheManager(self.cache)
        self.scene.SetCacheManager(self.cache)
        self.scene.SetDataIOManager(self.io)
        self.app = slicer.vtkSlicerApplicationLogic()
        self.app.SetMRMLScene(self.scene)
        self.colors = self._logic(slicer.vtkSlicerColorLogic, "Colors")
        self.volumes = self._logic(slicer.vtkSlicerVolumesLogic, "Volumes")
        self.segmentations = self._logic(slicer.vtkSlicerSegmentationsModuleLogic, "Segmentations")
        self.markups = self._logic(slicer.vtkSlicerMarkupsLogic, "Markups")
        slicer.modules = types.SimpleNamespace(**{
            name: types.SimpleNamespace(logic=(lambda logic=logic: logic))
            for name, logic in (("colors", self.colors), ("volumes", self.volumes),
                                ("segmentations", self.segmentations), ("markups", self.markups))})
        self.sliceLogics = {}
        for view, orientation in VIEWS:
            logic = slicer.vtkMRMLSliceLogic()
            logic.SetMRMLApplicationLogic(self.app)
            logic.SetMRMLScene(self.scene)
            node = logic.AddSliceNode(view)
            node.SetOrientation(orientation)
            self.sliceLogics[view] = logic

    def _logic(self, cls, name):
        logic = cls()
        logic.SetMRMLApplicationLogic(self.app)
        logic.SetMRMLScene(self.scene)
        self.app.SetModuleLogic(name, logic)
        return logic

    def load(self, path, name="volume"):
        """A volume file loaded as Slicer loads it (the Volumes logic)."""
        node = self.volumes.AddArchetypeVolume(str(path), name, 0)
        assert node is not None, f"Slicer could not load {path}"
        self.show(node)
        return node

    def volume(self, kji, ijk_to_ras, name="volume"):
        """A scalar volume node holding ``kji`` ([k, j, i]) with the given 4x4 IJK-to-RAS matrix."""
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        matrix = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                matrix.SetElement(r, c, float(ijk_to_ras[r][c]))
        node.SetIJKToRASMatrix(matrix)
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(kji))
        node.CreateDefaultDisplayNodes()
        self.show(node)
        return node

    def show(self, volumeNode) -> None:
        """The volume in every view, fitted, each view on a slice of it (as Slicer shows a loaded volume)."""
        self.app.GetSelectionNode().SetActiveVolumeID(volumeNode.GetID())
        for logic in self.sliceLogics.values():
            logic.GetSliceCompositeNode().SetBackgroundVolumeID(volumeNode.GetID())
            logic.FitSliceToBackground(256, 256)
            logic.SnapSliceOffsetToIJK()

    def sliceNode(self, view):
        return self.sliceLogics[view].GetSliceNode()

    def close(self) -> None:
        self.scene.Clear(True)


@pytest.fixture()
def scene():
    s = SlicerScene()
    yield s
    s.close()


@pytest.fixture(scope="session")
def shared_worker():
    """One worker process for the tests that use the classical tool and the session's replay file."""
    supervisor = WorkerSupervisor(module_dir=MODULE_DIR)
    yield supervisor
    supervisor.stop()


@pytest.fixture(scope="session")
def session_replay(tmp_path_factory):
    """The replay every slice of every axis of the test volumes plays: "blob"-like targets get the self-test's
    box and click; "spleen" a box over the left part, "kidney" one over the right part."""
    folder = tmp_path_factory.mktemp("replay")
    slices = range(0, 160)
    left = [{"name": "add_bbox", "arguments": {"bbox_2d": [100, 300, 480, 700]}}, {"name": "stop_action", "arguments": {}}]
    right = [{"name": "add_bbox", "arguments": {"bbox_2d": [520, 300, 900, 700]}}, {"name": "stop_action", "arguments": {}}]
    return write_replay(folder / "replay.json", ("axial", "coronal", "sagittal"), slices,
                        by_target={"spleen": left, "kidney": right})


@pytest.fixture(scope="session")
def host_tmp(tmp_path_factory):
    """The hosts' temporary folder: one for the session, so that the shared worker's folders stay the same."""
    return str(tmp_path_factory.mktemp("slicer-tmp"))


@pytest.fixture()
def logic(scene, host_tmp, shared_worker, session_replay):
    """The module's Logic on the scene, with a plain host, the shared worker and a default launch
    (replay policy, classical tool, CPU)."""
    host = PlainHost(scene.scene, temporaryPath=host_tmp)
    agent = AgentLogic(host)
    agent.supervisor = shared_worker
    agent.defaultLaunch = launch_for(agent, session_replay)
    yield agent
    agent.cancel()
    try:
        agent.waitUntilIdle(60)
    finally:
        agent.forgetScene()
        agent.timer.stop()
        agent.executor.shutdown(wait=True)


def launch_for(agent, replay, tool=CLASSICAL, max_turns=5):
    return Launch(policy=REPLAY, tool=tool, device="cpu", max_turns=max_turns, policy_path=str(replay),
                  allow_dirs=(agent.workDir(),))


def segment_array(segmentationNode, name, volumeNode):
    """A segment's voxels on the volume's grid ([k, j, i] bool), by name."""
    segmentId = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(name)
    assert segmentId, f"no segment {name}"
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode) > 0


def slice_mask(segmentationNode, name, volumeNode, geometry, axis, index):
    """One slice of a segment (rows x columns of the worker's picture), bool."""
    return geometry.read_slice(segment_array(segmentationNode, name, volumeNode), axis, index).astype(bool)


def slices_with_voxels(segmentationNode, name, volumeNode, geometry, axis):
    """The slice indices along ``axis`` where the segment has voxels."""
    whole = segment_array(segmentationNode, name, volumeNode)
    return [i for i in range(geometry.num_slices(axis)) if geometry.read_slice(whole, axis, i).any()]


def oblique_ct(scene, kind="oblique"):
    """The real CT's voxels on a flipped or an oblique grid (the IJK-to-RAS Slicer would read from a file
    with those directions)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(CT / "image.nii.gz"))
    kji = sitk.GetArrayFromImage(image)
    if kind == "flipped":
        direction = np.diag([1.0, -1.0, -1.0])
    else:
        a, b = np.radians(25), np.radians(15)
        rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
        direction = rz @ rx @ np.diag([-1.0, -1.0, 1.0])
    m = np.eye(4)
    m[:3, :3] = direction * np.array(image.GetSpacing())
    m[:3, 3] = (20.0, -15.0, 40.0)
    return scene.volume(kji, m, f"{kind} CT")


def wait(logic, timeout_s=120):
    logic.waitUntilIdle(timeout_s)
    return logic.processing.state
