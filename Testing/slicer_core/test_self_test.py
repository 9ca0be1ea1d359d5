"""The module's own self-test (``MedSAMAgentTest`` in Slicer) on slicer-core: a real CT volume loaded by
Slicer's Volumes logic, the bundled LiteMedSAM tool (classical where its package is missing), a replay policy,
a real worker process."""
from slicer_scene import CT, logic, scene, host_tmp, session_replay, shared_worker  # noqa: F401 - fixtures

from MedSAMAgentLogic.self_test import auto_segment_and_override


def test_the_module_self_test_passes_on_a_real_ct_volume(scene, logic, tmp_path):
    volume = scene.load(CT / "image.nii.gz", "abdomen CT")
    auto_segment_and_override(logic, volume, str(tmp_path), say=lambda text: None, target="liver")
