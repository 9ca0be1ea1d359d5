"""The Slicer side against a real worker process on 127.0.0.1 (classical tool, replay policy, no weights):
the supervisor's start / reuse / crash / restart / stop, and a whole Auto-segment + override round trip
carried out the way MedSAMAgent.py does it, with numpy arrays standing in for the MRML nodes."""
import time

import numpy as np
import pytest

from MedSAMAgentLib.masks import decode_rle
from MedSAMAgentLib.slicer_support.audit import AuditLog
from MedSAMAgentLib.slicer_support.geometry import VolumeGeometry
from MedSAMAgentLib.slicer_support.markup_plan import AddBox, AddPoint, MarkupPlanner, RunFinished, WriteMaskSlice
from MedSAMAgentLib.slicer_support.options import CLASSICAL, LOCAL, REPLAY, Launch
from MedSAMAgentLib.slicer_support.override import SHOWN, OverrideManager, box_item, by_slice, point_item
from MedSAMAgentLib.slicer_support.replay import write_replay
from MedSAMAgentLib.slicer_support.volume_file import write_nrrd
from MedSAMAgentLib.slicer_support.worker_supervisor import (
    CRASHED,
    FAILED,
    READY,
    STOPPED,
    SupervisorError,
    WorkerSupervisor,
)
from MedSAMAgentLib.worker.client import EventStream

from conftest import synthetic_case

MODULE_DIR = __import__("pathlib").Path(__file__).resolve().parents[1] / "MedSAMAgent"


def oblique_volume():
    """A CT-like KJI volume (9 slices of 48 x 64) with a bright ellipse, and an oblique IJKToRAS."""
    slices = []
    for k in range(9):
        gray, _ = synthetic_case(10 + k % 3, size=(64, 48), kind="ellipse")
        slices.append(gray.astype(np.int16))
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    m = np.eye(4)
    m[:3, :3] = np.array([[-c, -s, 0], [-s, c, 0], [0, 0, 1]]) * [0.8, 0.8, 2.0]
    m[:3, 3] = (10, -20, 30)
    return np.stack(slices), m


@pytest.fixture()
def replay_launch(tmp_path):
    replay = write_replay(tmp_path / "replay.json", "axial", [3, 4, 5], target="blob")
    return Launch(policy=REPLAY, tool=CLASSICAL, device="cpu", max_turns=5, policy_path=str(replay),
                  allow_dirs=(str(tmp_path),))


def test_the_supervisor_starts_reuses_restarts_after_a_crash_and_stops(replay_launch):
    sup = WorkerSupervisor(module_dir=MODULE_DIR, max_crashes=2)
    try:
        client = sup.ensure_ready(replay_launch)
        assert sup.state == READY and sup.generation == 1 and sup.healthy()
        assert client.status()["policy"] == "replay" and client.status()["tool"] == "classical"
        assert sup.ensure_ready(replay_launch) is client and sup.generation == 1  # healthy: reused
        first_url = client.url
        sup.proc.kill()  # a crash
        sup.proc.wait(10)
        assert sup.check() == CRASHED and "exit code" in sup.last_error and sup.client is None
        client = sup.ensure_ready(replay_launch)  # restarted
        assert sup.generation == 2 and sup.healthy() and client.url != first_url
        sup.proc.kill()
        sup.proc.wait(10)
        assert sup.check() == CRASHED
        with pytest.raises(SupervisorError, match="crashed 2 times"):
            sup.ensure_ready(replay_launch)  # it keeps crashing: stop trying, say so
    finally:
        sup.stop()
    assert sup.state == STOPPED and not sup.alive()
    assert "not running" in sup.describe()


def test_the_panel_never_waits_for_a_worker_being_started(replay_launch):
    """Starting a worker can take minutes (models loading); the module's GUI timer asks the
    supervisor for its state meanwhile, and must get it at once."""
    import threading

    from MedSAMAgentLib.worker.client import start_worker

    started = threading.Event()

    def slow_start(*args, **kw):
        started.set()
        time.sleep(2.0)  # a child that takes its time to say where it listens
        return start_worker(*args, **kw)

    sup = WorkerSupervisor(module_dir=MODULE_DIR, starter=slow_start)
    t = threading.Thread(target=sup.ensure_ready, args=(replay_launch,), daemon=True)
    try:
        t.start()
        assert started.wait(10)
        t0 = time.perf_counter()
        text, state = sup.describe(), sup.check()
        assert time.perf_counter() - t0 < 0.5 and "loading" in text.lower() and state == "loading"
        t.join(60)
        assert sup.check() == READY
    finally:
        sup.stop()


def test_turns_and_batch_size_change_without_reloading_the_models(replay_launch):
    """They travel with each run; only another model, device or folder needs another worker."""
    import dataclasses

    from MedSAMAgentLib.worker.client import start_worker

    starts = []

    def counting(*args, **kw):
        starts.append(args)
        return start_worker(*args, **kw)

    sup = WorkerSupervisor(module_dir=MODULE_DIR, starter=counting)
    try:
        client = sup.ensure_ready(replay_launch)
        assert sup.ensure_ready(dataclasses.replace(replay_launch, max_turns=2, batch_size=3)) is client
        assert len(starts) == 1
        sup.ensure_ready(dataclasses.replace(replay_launch, device="auto"))  # another device: another worker
        assert len(starts) == 2
    finally:
        sup.stop()


def test_a_worker_that_cannot_load_its_models_is_reported(tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")  # found, so the worker listens; loading it fails
    replay = write_replay(tmp_path / "replay.json", "axial", [3], target="blob")
    launch = Launch(policy=REPLAY, tool=LOCAL, device="cpu", policy_path=str(replay), tool_path=str(broken))
    sup = WorkerSupervisor(module_dir=MODULE_DIR)
    try:
        with pytest.raises(SupervisorError, match="could not load its models.*broken.pt"):
            sup.ensure_ready(launch)
        assert sup.state == FAILED and not sup.alive()
    finally:
        sup.stop()


def test_a_worker_refused_at_start_says_why(tmp_path):
    bad = tmp_path / "not-a-trajectory.json"
    bad.write_text("{}")  # read before the worker listens
    launch = Launch(policy=REPLAY, tool=CLASSICAL, device="cpu", policy_path=str(bad))
    sup = WorkerSupervisor(module_dir=MODULE_DIR)
    try:
        with pytest.raises(SupervisorError, match=r"exited at start: .*not-a-trajectory.json is not a trajectory file"):
            sup.ensure_ready(launch)
        assert sup.state == FAILED and not sup.alive()
    finally:
        sup.stop()


def apply(instructions, segment, markups):
    """What MedSAMAgent.py does with a plan, on numpy: masks into the segment, markups into a dict."""
    finished = None
    for ins in instructions:
        if isinstance(ins, WriteMaskSlice):
            i0, i1, j0, j1, k0, k1 = ins.extent
            segment[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1] = ins.block
        elif isinstance(ins, AddBox):
            markups[f"roi-s{ins.slice}-t{ins.turn}"] = ("box", np.array(ins.object_to_ras), ins.size, ins.turn)
        elif isinstance(ins, AddPoint):
            markups[f"pts/{ins.label}"] = ("point", ins.position_ras, ins.positive, ins.turn)
        elif isinstance(ins, RunFinished):
            finished = ins
    return finished


def scan(geometry, markups):
    """Prompts read back off the markups, by slice (as the module's scanPrompts does)."""
    pairs = []
    for mid, (kind, a, b, turn) in markups.items():
        item = (box_item(geometry, "axial", mid, a, b, turn) if kind == "box"
                else point_item(geometry, "axial", mid, a, b, turn))
        if item:
            pairs.append(item)
    return by_slice(pairs)


def test_auto_segment_then_override_round_trip(tmp_path, replay_launch):
    kji, ijk_to_ras = oblique_volume()
    geometry = VolumeGeometry.from_arrays(kji.shape, ijk_to_ras)
    path = write_nrrd(tmp_path / "volume.nrrd", kji, ijk_to_ras)
    sup = WorkerSupervisor(module_dir=MODULE_DIR)
    try:
        client = sup.ensure_ready(replay_launch)
        info = client.open_session(path=str(path))
        assert {a: info["slices"][a] for a in ("axial", "coronal", "sagittal")} == {
            a: geometry.num_slices(a) for a in ("axial", "coronal", "sagittal")}
        run = client.start_run(info["session"], "blob", "axial", [3, 4, 5])
        planner, audit = MarkupPlanner(geometry), AuditLog()
        audit.start_run(run, "blob", "axial", "test volume", replay_launch.to_dict())
        segment = np.zeros(kji.shape, np.uint8)
        markups, finished = {}, None
        stream = EventStream(client, run)
        while (event := stream.queue.get(timeout=60)) is not None:
            audit.record_event(event)
            finished = apply(planner.plan(event), segment, markups) or finished
        assert finished.status == "done"

        # markups: one box and one positive point per slice, each on its slice
        assert sorted(k for k in markups if k.startswith("roi")) == ["roi-s3-t0", "roi-s4-t0", "roi-s5-t0"]
        assert sorted(k for k in markups if k.startswith("pts")) == ["pts/s3-t2", "pts/s4-t2", "pts/s5-t2"]
        prompts = scan(geometry, markups)
        assert sorted(prompts) == [3, 4, 5] and all(len(v) == 2 for v in prompts.values())
        # the boxes read back off the ROIs are the worker's own prompts
        worker_slice = client.slice_info(info["session"], "axial", 4)
        assert np.allclose(prompts[4][0].coords, worker_slice["prompts"][0]["box"], atol=1e-6)
        # the segment: the worker's final masks, on exactly those slices
        for i in range(geometry.num_slices("axial")):
            got = geometry.read_slice(segment, "axial", i).astype(bool)
            if i in (3, 4, 5):
                want = decode_rle(client.slice_info(info["session"], "axial", i)["mask"])
                assert got.any() and np.array_equal(got, want)
            else:
                assert not got.any()

        # override: the annotator adds a negative point inside slice 4's mask
        overrides = OverrideManager({"axial": tuple(reversed(geometry.slice_shape("axial")))}, debounce_s=0.05)
        for i, items in prompts.items():
            overrides.baseline("axial", i, items)
        before = geometry.read_slice(segment, "axial", 4).astype(bool)
        ys, xs = np.nonzero(before)
        pick = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
        markups["pts/user-1"] = ("point", geometry.pixel_to_ras("axial", 4, float(xs[pick]), float(ys[pick])),
                                 False, None)
        edits = overrides.update("axial", scan(geometry, markups))
        assert [e["edit"] for e in edits] == ["add_point"] and edits[0]["slice"] == 4
        time.sleep(0.06)
        (request,) = overrides.due_requests()
        assert [list(p) for p in request.prompts] == [["box"], ["point", "positive"], ["point", "positive"]]
        answer = client.override(info["session"], request.axis, request.slice, request.prompts)
        assert overrides.finish(request) and overrides.state("axial", 4) == SHOWN
        mask = decode_rle(answer["mask"])
        apply(planner.mask_instruction("axial", 4, mask, force=True), segment, markups)
        after = geometry.read_slice(segment, "axial", 4).astype(bool)
        assert not np.array_equal(before, after) and not after[ys[pick], xs[pick]]  # the clicked part is gone
        assert np.array_equal(geometry.read_slice(segment, "axial", 3).astype(bool),
                              decode_rle(client.slice_info(info["session"], "axial", 3)["mask"]))  # others untouched
        audit.record_override(run, "axial", 4, edits, request.prompts, answer["mask"])
        assert [e.author for e in AuditLog.from_json(audit.to_json()).entries() if e.slice == 4][-1] == "user"
        assert client.slice_info(info["session"], "axial", 4)["log"][-1]["actor"] == "user"

        # the worker crashes: its sessions are gone, the edits are not (they live in the markups)
        sup.proc.kill()
        sup.proc.wait(10)
        client = sup.ensure_ready(replay_launch)
        session = client.open_session(path=str(path))["session"]
        overrides.recompute_now("axial", 4)
        (again,) = overrides.due_requests()
        assert again.prompts == request.prompts
        assert np.array_equal(decode_rle(client.override(session, "axial", 4, again.prompts)["mask"]), mask)
    finally:
        sup.stop()


def test_a_department_worker_server_is_used_by_upload_and_left_running(tmp_path_factory):
    """The module's remote mode against a real worker process: the server's own folders are not
    this computer's, so volumes go up as uploads; disconnecting leaves the shared server serving."""
    from MedSAMAgentLib.slicer_support.remote_worker import RemoteWorker
    from MedSAMAgentLib.worker.client import WorkerClient, start_worker

    server_dir, desk = tmp_path_factory.mktemp("server"), tmp_path_factory.mktemp("workstation")
    replay = write_replay(server_dir / "replay.json", "axial", [3, 4, 5], target="blob")
    proc, boot = start_worker(["--policy", "replay", "--replay", str(replay), "--tool", "classical",
                               "--allow-dir", str(server_dir)])
    try:
        boot.wait_ready(timeout=120)
        kji, ijk_to_ras = oblique_volume()
        path = write_nrrd(desk / "volume.nrrd", kji, ijk_to_ras)  # outside the server's allowed folders
        with pytest.raises(Exception, match="outside the folders"):
            boot.open_session(path=str(path))  # so opening it by path is refused ...

        remote = RemoteWorker(boot.url + "/", boot.token)
        client = remote.ensure_ready(Launch())  # the panel's choices do not apply to a server's models
        assert remote.state == READY and remote.generation == 1 and remote.healthy()
        assert "policy replay, tool classical" in remote.describe()
        info = remote.open_volume(client, path)  # ... and uploaded instead
        assert info["slices"]["axial"] == kji.shape[0]
        events = list(client.events(client.start_run(info["session"], "blob", "axial", [3, 4, 5])))
        assert events[-1]["type"] == "run_done" and events[-1]["status"] == "done"
        assert sum(e["type"] == "slice_done" for e in events) == 3

        remote.stop()  # disconnect: the shared server keeps serving
        assert remote.state == STOPPED
        with WorkerClient(boot.url, boot.token) as other:
            assert other.health()["ok"]

        # a restarted server (another start id) means sessions must be opened again, however soon
        remote.ensure_ready()
        generation, status = remote.generation, remote.server
        remote._note_status({**status, "uptime_s": status["uptime_s"] + 5})  # the same server, later
        assert remote.generation == generation
        remote._note_status({**status, "uptime_s": 0.0, "instance": "another-start"})
        assert remote.generation == generation + 1
        # an older server without start ids: a restart shows as its uptime going down
        old = {k: v for k, v in status.items() if k != "instance"}
        remote._note_status({**old, "uptime_s": 30.0})
        remote._note_status({**old, "uptime_s": 0.5})
        assert remote.generation == generation + 2

        wrong = RemoteWorker(boot.url, "not-the-token")
        with pytest.raises(SupervisorError, match="refused the token"):
            wrong.ensure_ready()
        assert wrong.state == FAILED and "ask its administrator" in wrong.describe()
        remote.stop()
        wrong.stop()
    finally:
        boot.shutdown()
        boot.close()
        proc.wait(timeout=30)


def test_where_the_worker_server_address_comes_from():
    from MedSAMAgentLib.slicer_support.remote_worker import (
        TOKEN_SETTING,
        URL_ENV,
        URL_SETTING,
        RemoteWorker,
        worker_address,
    )
    from MedSAMAgentLib.worker.protocol import TOKEN_ENV

    none = {}.get
    assert worker_address(lambda k: none(k, ""), {}) is None  # nothing set: a worker on this computer
    env = {URL_ENV: "http://gpu:8765/", TOKEN_ENV: "site-token"}
    assert worker_address(lambda k: "", env) == ("http://gpu:8765", "site-token")
    panel = {URL_SETTING: "https://other:9000", TOKEN_SETTING: "mine"}
    assert worker_address(lambda k: panel.get(k, ""), env) == ("https://other:9000", "mine")  # the panel wins
    with pytest.raises(SupervisorError, match="needs its token"):
        worker_address(lambda k: {URL_SETTING: "http://gpu:8765"}.get(k, ""), {})
    with pytest.raises(SupervisorError, match="not a worker address"):
        worker_address(lambda k: {URL_SETTING: "gpu:8765", TOKEN_SETTING: "t"}.get(k, ""), {})
    unreachable = RemoteWorker("http://127.0.0.1:9", "t", timeout_s=2)
    with pytest.raises(SupervisorError, match="Cannot reach the worker server"):
        unreachable.ensure_ready()
    # an https address is spoken to over TLS (its token never travels in clear), on 443 by default
    import http.client

    from MedSAMAgentLib.worker.client import WorkerClient

    conn = WorkerClient("https://gpu-server.example", "t")._new_connection(5)
    assert isinstance(conn, http.client.HTTPSConnection) and conn.port == 443
    assert not isinstance(WorkerClient("http://gpu:8765", "t")._new_connection(5), http.client.HTTPSConnection)
