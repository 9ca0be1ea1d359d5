"""The agent worker over real HTTP on 127.0.0.1: runs, overrides, cancel, auth, limits, crashes."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from MedSAMAgentLib.actions import PixelBox, PixelPoint
from MedSAMAgentLib.agent import Agent
from MedSAMAgentLib.image_io import load_image, load_mask
from MedSAMAgentLib.masks import decode_rle, unpack_mask
from MedSAMAgentLib.policies import create_policy
from MedSAMAgentLib.policies.replay import ReplayPolicy
from MedSAMAgentLib.profile import Profile
from MedSAMAgentLib.segment import SegmentOptions, segment
from MedSAMAgentLib.tools import create_tool
from MedSAMAgentLib.worker.app import WorkerServer, create_app
from MedSAMAgentLib.worker.client import ClientError, EventStream, WorkerClient, start_worker
from MedSAMAgentLib.worker.service import Worker, WorkerConfig

from conftest import write_volume

TOKEN = "test-token-123"


class Slow:
    """A real policy wrapped to take ``delay`` seconds per turn (to catch a run in flight)."""

    def __init__(self, policy, delay):
        self.policy, self.delay, self.name = policy, delay, policy.name

    def act(self, observations):
        time.sleep(self.delay)
        return self.policy.act(observations)


@pytest.fixture()
def served(tmp_path):
    servers = []

    def start(policy, tool, **config):
        worker = Worker(WorkerConfig(token=TOKEN, allowed_dirs=[tmp_path], **config))
        worker.load(lambda step: (policy, tool, Profile.load()))
        server = WorkerServer(create_app(worker)).start()
        worker.on_shutdown = lambda: setattr(server.server, "should_exit", True)
        client = WorkerClient(server.url, TOKEN)
        servers.append((server, worker, client))
        return worker, client

    yield start
    for server, worker, client in servers:
        client.close()
        server.stop()
        worker.close()


@pytest.fixture()
def volume(tmp_path):
    write_volume(tmp_path / "ct.nii.gz", tmp_path / "lab.nii.gz", n=9)
    return tmp_path / "ct.nii.gz", tmp_path / "lab.nii.gz"


def collect(client, run):
    return list(client.events(run))


def per_slice(events):
    actions, finals = {}, {}
    for e in events:
        if e["type"] == "action":
            actions.setdefault(e["slice"], []).append(e["action"])
        elif e["type"] == "slice_done":
            finals[e["slice"]] = decode_rle(e["mask"])
    return actions, finals


def direct(policy, tool, image, reference, batch=4):
    loaded = load_image(image)
    ref = load_mask(reference, [3], like=loaded) if reference else None
    result = segment(loaded, "blob", Agent(policy, tool, Profile.load()), SegmentOptions(batch_size=batch), ref)
    from MedSAMAgentLib.volume import OrientedVolume

    vol = OrientedVolume(loaded.image)
    return ({i: [s.action for s in t.steps] for i, t in zip(result.slices, result.trajectories)},
            {i: vol.slice("axial", i, vol.from_original(result.mask)) for i in result.slices})


@pytest.mark.parametrize("policy_name", ["expert", "replay"])
def test_a_run_streams_the_same_actions_and_masks_as_the_engine(served, volume, policy_name):
    image, labels = volume
    make = (lambda: create_policy("expert")) if policy_name == "expert" else (lambda: ReplayPolicy(
        ['<tool_call>\n{"name": "add_bbox", "arguments": {"bbox_2d": [200, 200, 800, 800]}}\n</tool_call>',
         '<tool_call>\n{"name": "add_point", "arguments": {"point_2d": [500, 500], "point_type": "negative"}}\n</tool_call>']))
    worker, client = served(make(), create_tool("classical"), batch_size=4)
    info = client.open_session(path=image, reference=labels, labels=[3])
    assert info["slices"]["axial"] == 9 and info["dim"] == 3
    run = client.start_run(info["session"], "blob", slices="all")
    events = collect(client, run)
    assert events[0]["type"] == "run_started" and events[-1] == {**events[-1], "type": "run_done", "status": "done"}
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert [json.loads(line) for line in worker.run(run).lines] == events  # kept as the JSON that was sent
    got_actions, got_masks = per_slice(events)
    want_actions, want_masks = direct(make(), create_tool("classical"), image, labels)
    assert got_actions == want_actions
    for i in want_masks:
        assert np.array_equal(got_masks[i], want_masks[i])
    first_box = next(e for e in events if e["type"] == "action" and e["action"]["name"] != "stop_action")
    assert first_box["actor"] == "agent" and first_box["pixels"] and first_box["text"]
    # what a session keeps a slice: each turn's mask at one bit a pixel; the volume's voxels once
    session = worker.session(info["session"])
    state = session.slice_state("axial", 4)
    h, w = state.shape
    assert state.masks and all(m[0].nbytes == (h * w + 7) // 8 for m in state.masks if m is not None)
    assert np.array_equal(unpack_mask(state.masks[-1]), state.mask) and np.array_equal(state.mask, got_masks[4])
    # the slice's picture at one byte a pixel (not its RGB); the tool is given a view of it, never a copy
    assert state.picture.shape == (h, w) and state.picture.dtype == np.uint8
    view = state.tool_image()
    assert view.shape == (h, w, 3) and np.shares_memory(view, state.picture) and not view.flags.writeable
    assert np.array_equal(view, session.slice_rgb("axial", 4))
    from MedSAMAgentLib.image_io import LoadedImage

    assert session.image2d is None and not any(isinstance(v, LoadedImage) for v in vars(session).values())


def test_tiny_qwen_policy_through_the_worker(served, tmp_path, taught_qwen_dir):
    from PIL import Image

    from conftest import synthetic_case

    gray, _ = synthetic_case(3)
    Image.fromarray(gray).save(tmp_path / "img.png")
    policy = create_policy("qwen", model=taught_qwen_dir, device="cpu")
    worker, client = served(policy, create_tool("classical"))
    sid = client.open_session(path=tmp_path / "img.png")["session"]
    events = collect(client, client.start_run(sid, "liver"))
    names = [e["action"]["name"] for e in events if e["type"] == "action"]
    assert names == ["add_bbox", "add_point", "stop_action"]
    traj, = Agent(policy, create_tool("classical")).run(
        [__import__("MedSAMAgentLib.agent", fromlist=["Episode"]).Episode("x", gray, "liver")])
    assert np.array_equal(decode_rle([e for e in events if e["type"] == "slice_done"][0]["mask"]), traj.final_mask)


@pytest.mark.parametrize("tool_name", ["sam2", "medsam-lite", "classical"])
def test_override_gives_the_tools_own_mask_then_continue(served, volume, tool_name, request):
    """SAM2 and LiteMedSAM (its real bundled weights) answer on the model thread (queued first); the
    classical tool right on the event loop.  A person's prompts on a slice no run has touched."""
    tool = (request.getfixturevalue("sam2_tool") if tool_name == "sam2" else
            create_tool("medsam-lite", device="cpu") if tool_name == "medsam-lite" else create_tool("classical"))
    image, labels = volume
    worker, client = served(create_policy("expert"), tool)
    assert worker.overrides_inline == (tool_name == "classical")
    sid = client.open_session(path=image, reference=labels, labels=[3])["session"]
    prompts = [{"box": [10.0, 8.0, 50.0, 40.0]}, {"point": [30.0, 20.0], "positive": False}]
    out = client.override(sid, "axial", 4, prompts)
    rgb = worker.session(sid).slice_rgb("axial", 4)
    key, = tool.prepare([rgb])
    want = tool.segment(key, [PixelBox(10, 8, 50, 40), PixelPoint(30, 20, False)], None, prompt_mode="cumulative")
    assert np.array_equal(decode_rle(out["mask"]), want.mask)
    assert 0 < out["seconds"] <= out["worker_seconds"] < 30  # the tool's time within the worker's
    state = client.slice_info(sid, "axial", 4)
    assert state["prompts"] == prompts and state["log"][-1]["actor"] == "user"
    assert state["log"][-1]["mask_pixels"] == int(decode_rle(out["mask"]).sum())
    # "continue": the agent (expert) takes more turns from the edited state
    run = client.continue_slice(sid, "axial", 4, target="blob", turns=2)
    events = collect(client, run)
    assert events[-1]["status"] == "done"
    assert [e["turn"] for e in events if e["type"] == "action"][0] == 2  # after the user's two prompts
    assert worker.session(sid).slice_state("axial", 4).key in tool.cache  # prepared under the slice's name, kept
    log = client.slice_info(sid, "axial", 4)["log"]
    assert [entry["actor"] for entry in log][:1] == ["user"] and "agent" in [entry["actor"] for entry in log]
    with pytest.raises(ClientError, match="outside"):
        client.override(sid, "axial", 4, [{"point": [999.0, 5.0], "positive": True}])
    assert decode_rle(client.override(sid, "axial", 4, [])["mask"]).sum() == 0  # every prompt deleted


def test_an_override_does_not_wait_for_the_policys_turn(served, volume, sam2_tool):
    """A language model's turn can take seconds on the model thread; a person's override needs
    only the tool (SAM2 here, one call at a time), so it answers while that turn is still running."""
    import threading

    thinking = threading.Event()

    class Thinking(Slow):
        def act(self, observations):
            thinking.set()
            return super().act(observations)

    image, labels = volume
    worker, client = served(Thinking(create_policy("expert"), 3.0), sam2_tool)
    sid = client.open_session(path=image, reference=labels, labels=[3])["session"]
    client.override(sid, "axial", 2, [{"box": [12.0, 10.0, 48.0, 38.0]}])  # slice 2 encoded: edits are decoder-only
    run = client.start_run(sid, "blob", slices=[4])
    assert thinking.wait(20)
    time.sleep(0.2)  # the model thread is inside the policy's 3 s turn
    t0 = time.perf_counter()
    out = client.override(sid, "axial", 2, [{"box": [10.0, 8.0, 50.0, 40.0]}])
    waited = time.perf_counter() - t0
    client.cancel(run)
    with worker.tool.lock:  # the run may still be using the tool: one caller at a time
        key, = sam2_tool.prepare([worker.session(sid).slice_rgb("axial", 2)])
        want = sam2_tool.segment(key, [PixelBox(10, 8, 50, 40)], None, prompt_mode="cumulative")
    assert np.array_equal(decode_rle(out["mask"]), want.mask)
    assert waited < 1.5, f"the override waited {waited:.1f} s for the policy"


def test_cancel_stops_within_one_turn(served, volume):
    image, labels = volume
    worker, client = served(Slow(create_policy("expert"), 0.3), create_tool("classical"), batch_size=2)
    sid = client.open_session(path=image, reference=labels, labels=[3])["session"]
    run = client.start_run(sid, "blob", slices="all")
    stream = EventStream(client, run)
    while True:
        e = stream.queue.get(timeout=20)
        if e and e["type"] == "action":
            break
    client.cancel(run)
    cancelled_at = time.time()
    events = []
    while (e := stream.queue.get(timeout=20)) is not None:
        events.append(e)
    assert events[-1]["type"] == "run_done" and events[-1]["status"] == "cancelled"
    assert time.time() - cancelled_at < 2.0
    # after the first action seen: the rest of that turn (1 slice) and at most one more turn (2 slices)
    assert sum(e["type"] == "action" for e in events) <= 3
    assert len({e["slice"] for e in events if e["type"] == "slice_done"}) <= 4  # two batches of 2, of 9 planned


def test_token_limits_and_allowed_folders(served, volume, tmp_path_factory):
    image, labels = volume
    worker, client = served(create_policy("expert"), create_tool("classical"), max_upload_bytes=2000)
    for token in ("wrong", ""):
        bad = WorkerClient(client.url, token)
        for request in (bad.health, lambda: bad.override("any", "axial", 0, []),
                        lambda: bad.open_session(data=image.read_bytes(), filename="ct.nii.gz")):
            with pytest.raises(ClientError) as err:  # the token is checked first: even before the size
                request()
            assert err.value.status == 401 and "token" in str(err.value)
        bad.close()
    assert client.health()["ok"]
    with pytest.raises(ClientError) as err:
        client.open_session(data=image.read_bytes(), filename="ct.nii.gz")
    assert err.value.status == 413
    outside = tmp_path_factory.mktemp("elsewhere") / "x.nii.gz"
    outside.write_bytes(image.read_bytes())
    with pytest.raises(ClientError) as err:
        client.open_session(path=outside)
    assert err.value.status == 403
    with pytest.raises(ClientError) as err:
        client.start_run("nope", "blob")
    assert err.value.status == 404
    # a malformed request gets one sentence naming the field, not the validator's records
    sid = client.open_session(path=image)["session"]
    with pytest.raises(ClientError, match=r"override: prompts: Input should be a valid list\.$") as err:
        client._json("POST", f"/v1/sessions/{sid}/override", {"axis": "axial", "slice": 1, "prompts": "x"})
    assert err.value.status == 422
    with pytest.raises(ClientError, match="the body is not valid JSON") as err:
        client._open("POST", f"/v1/sessions/{sid}/override", b"{not json")
    assert err.value.status == 422
    with pytest.raises(ClientError, match="Slice 99 is outside the volume: it has 9 slices along axial") as err:
        client.slice_info(sid, "axial", 99)
    assert err.value.status == 400
    for prompt, message in (({"point": [10 ** 400, 10], "positive": True}, "has malformed coordinates"),
                            ({"point": [10 ** 30, 10], "positive": True}, "lies outside the 64x48 slice"),
                            ({"box": [1, 2, "3", 4]}, "has malformed coordinates")):  # a client's bug: a 400
        with pytest.raises(ClientError, match=f"prompt 0 {message}") as err:
            client.override(sid, "axial", 1, [prompt])
        assert err.value.status == 400


def test_upload_session_slice_checks_and_expiry(served, volume):
    image, _ = volume
    worker, client = served(create_policy("replay", actions=[]), create_tool("classical"))
    info = client.open_session(data=image.read_bytes(), filename="ct.nii.gz")
    assert info["slices"] == {"axial": 9, "coronal": 48, "sagittal": 64}
    with pytest.raises(ClientError, match="X-Filename header") as err:  # an upload without its name
        client._open("POST", "/v1/sessions", image.read_bytes(), "application/octet-stream")
    assert err.value.status == 400
    with pytest.raises(ClientError, match="Cannot read notes.nrrd") as err:  # said of the client's file
        client.open_session(data=b"not an image", filename="notes.nrrd")
    assert err.value.status == 400 and "medsam-upload" not in str(err.value)
    with pytest.raises(ClientError, match="^path is empty"):
        client._json("POST", "/v1/sessions", {"path": " "})
    for slices, message in (([], "slices is an empty list"), ([1, 1, 2], r"slices lists \[1\] more than once")):
        with pytest.raises(ClientError, match=message):
            client.start_run(info["session"], "blob", slices=slices)
    with pytest.raises(ClientError, match="outside the volume"):
        client.start_run(info["session"], "blob", slices="3:40")
    run = client.start_run(info["session"], "blob", slices=[2, 3])
    events = collect(client, run)
    assert [e["slice"] for e in events if e["type"] == "slice_done"] == [2, 3]
    later = list(client.events(run, after=2))
    assert later[0]["seq"] == 3 and later == events[3:]  # a reconnect picks up after the last event seen
    keys = [s.key for s in worker.session(info["session"]).slices.values()]
    assert keys and all(k in worker.tool.cache for k in keys)  # prepared under the slices' names
    import gc
    import weakref

    session = weakref.ref(worker.session(info["session"]))  # the volume, its slices' pictures and masks
    worker.expire_sessions(now=time.time() + worker.config.session_idle_s + 1)
    assert not any(k in worker.tool.cache for k in keys)  # an expired session's slices are freed
    with pytest.raises(ClientError, match="expired"):
        client.start_run(info["session"], "blob")
    gc.collect()
    assert session() is None  # nothing in the worker keeps an expired session's memory alive
    sid = client.open_session(data=image.read_bytes(), filename="ct.nii.gz")["session"]
    collect(client, client.start_run(sid, "blob", slices=[4]))
    client.override(sid, "axial", 4, [{"box": [10.0, 8.0, 50.0, 40.0]}])
    session = weakref.ref(worker.session(sid))
    client.close_session(sid)
    gc.collect()
    assert session() is None  # nor a closed one's
    worker.expire_sessions(now=time.time() + 3700)  # finished runs are forgotten after an hour
    with pytest.raises(ClientError, match="No run"):
        list(client.events(run))


def test_a_killed_client_leaves_the_worker_serving_others(served, volume):
    image, labels = volume
    worker, client = served(Slow(create_policy("expert"), 0.05), create_tool("classical"))
    sid = client.open_session(path=image, reference=labels, labels=[3])["session"]
    run = client.start_run(sid, "blob")
    code = ("import sys; from MedSAMAgentLib.worker.client import WorkerClient\n"
            f"c = WorkerClient({client.url!r}, {TOKEN!r})\n"
            f"for e in c.events({run!r}):\n    print(e['seq'], flush=True)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "0"
    child.kill()
    child.wait()
    child.stdout.close()
    events = collect(client, client.start_run(sid, "blob", slices="2:5"))
    assert events[-1]["status"] == "done" and client.status()["state"] == "ready"


SLOW_WORKER = """
import sys, time
from MedSAMAgentLib.policies import create_policy
from MedSAMAgentLib.profile import Profile
from MedSAMAgentLib.tools import create_tool
from MedSAMAgentLib.worker.app import WorkerServer, create_app
from MedSAMAgentLib.worker.service import Worker, WorkerConfig

class Slow:
    def __init__(self, policy):
        self.policy, self.name = policy, policy.name
    def act(self, observations):
        time.sleep(0.05)
        return self.policy.act(observations)

worker = Worker(WorkerConfig(token=sys.argv[1], allowed_dirs=[sys.argv[2]], batch_size=1))
worker.load(lambda step: (Slow(create_policy("expert")), create_tool("classical"), Profile.load()))
server = WorkerServer(create_app(worker))
print(server.url, flush=True)
server.serve_forever()
"""


def test_a_worker_crash_loses_no_slice_the_client_already_has(volume):
    """Killed mid-run, the worker has already streamed every finished slice: the client holds
    them (the same masks as the engine's), in order with no gap, and gets a clear error."""
    image, labels = volume
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WORKER, TOKEN, str(image.parent)], stdout=subprocess.PIPE,
                            text=True)
    client = WorkerClient(proc.stdout.readline().strip(), TOKEN)
    try:
        client.wait_ready(timeout=60)
        sid = client.open_session(path=image, reference=labels, labels=[3])["session"]
        run = client.start_run(sid, "blob", slices="2:6")  # the slices with the blob
        got = []
        with pytest.raises(ClientError, match="Lost the worker"):
            for event in client.events(run, retries=1):
                got.append(event)
                if sum(e["type"] == "slice_done" for e in got) == 2 and proc.poll() is None:
                    proc.kill()  # the crash, with the run half done
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()
    assert [e["seq"] for e in got] == list(range(len(got)))  # everything sent, in order, nothing missing
    done = {e["slice"]: decode_rle(e["mask"]) for e in got if e["type"] == "slice_done"}
    assert 2 <= len(done) < 5 and not any(e["type"] == "run_done" for e in got)
    _, want = direct(create_policy("expert"), create_tool("classical"), image, labels)
    for i, mask in done.items():
        assert mask.any() and np.array_equal(mask, want[i])


def test_a_reference_is_checked_as_the_command_line_checks_it(served, volume):
    import SimpleITK as sitk

    image, labels = volume
    worker, client = served(create_policy("expert"), create_tool("classical"))
    two = sitk.ReadImage(str(labels))
    array = sitk.GetArrayFromImage(two)
    array[4, :6, :6] = 5  # a second organ, on the middle slice (the same index in any axial order)
    both = sitk.GetImageFromArray(array)
    both.CopyInformation(two)
    sitk.WriteImage(both, str(labels.parent / "two.nii.gz"))
    with pytest.raises(ClientError, match=r"more than one value.*\"labels\": \[V\]"):
        client.open_session(path=image, reference=labels.parent / "two.nii.gz")
    with pytest.raises(ClientError, match="No voxel of lab.nii.gz has the label 12"):
        client.open_session(path=image, reference=labels, labels=[12])
    with pytest.raises(ClientError, match="0 is the background"):
        client.open_session(path=image, reference=labels, labels=[0])
    bare = client.open_session(path=image)["session"]  # no reference: the expert cannot run it
    with pytest.raises(ClientError, match="expert policy reads a reference mask"):
        client.start_run(bare, "blob")
    with pytest.raises(ClientError, match="expert policy reads a reference mask"):
        client.continue_slice(bare, "axial", 4, "blob")
    sid = client.open_session(path=image, reference=labels.parent / "two.nii.gz", labels=[5])["session"]
    done = [e for e in collect(client, client.start_run(sid, "organ", slices=[0, 4])) if e["type"] == "slice_done"]
    assert {e["slice"]: decode_rle(e["mask"]).any() for e in done} == {0: False, 4: True}  # label 5 alone


def test_start_worker_process_and_shutdown(volume):
    proc, client = start_worker(["--policy", "expert", "--tool", "classical", "--allow-dir", str(volume[0].parent)])
    try:
        status = client.wait_ready(timeout=120)
        assert status["policy"] == "expert" and status["tool"] == "classical"
        sid = client.open_session(path=volume[0], reference=volume[1], labels=[3])["session"]
        events = collect(client, client.start_run(sid, "blob", slices="4"))
        assert [e["type"] for e in events][-1] == "run_done"
        client.override(sid, "axial", 4, [{"box": [10.0, 8.0, 50.0, 40.0]}])
        assert client.status()["memory"]["rss_mb"] > 0
        maps = Path(f"/proc/{proc.pid}/maps")
        if maps.exists():  # Linux: a weight-free worker never loads torch (seconds and ~300 MB for nothing)
            assert "libtorch" not in maps.read_text()
        client.shutdown()
        assert proc.wait(timeout=20) == 0
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()


def test_a_worker_that_cannot_start_says_why_in_its_own_words():
    with pytest.raises(ClientError) as failure:
        start_worker(["--host", "0.0.0.0"])  # refused by the command line before it listens
    assert str(failure.value) == ("The worker exited at start: Binding 0.0.0.0 opens the worker to the network; add "
                                  "--allow-remote to mean it (and put it behind a firewall or VPN).")


def test_an_empty_token_in_the_environment_counts_as_none():
    """MEDSAM_AGENT_TOKEN set but empty: the worker makes a token and prints it, as when unset."""
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "MedSAMAgentLib.cli", "serve", "--policy", "expert", "--tool",
                             "classical"], env={**os.environ, "MEDSAM_AGENT_TOKEN": " "}, stdout=subprocess.PIPE,
                            text=True)
    try:
        listening = json.loads(proc.stdout.readline())
        assert listening["event"] == "listening" and len(listening["token"]) >= 32
        client = WorkerClient(listening["url"], listening["token"])
        assert client.wait_ready(timeout=60)["state"] == "ready"
        client.shutdown()
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()


def test_client_close_ends_every_threads_connection_and_a_later_request_reconnects(served):
    import threading

    worker, client = served(create_policy("expert"), create_tool("classical"))
    threads = [threading.Thread(target=client.health) for _ in range(3)]
    for t in threads:
        t.start()
        t.join()
    client.health()
    kept = list(client._kept)
    assert len(kept) == 4 and all(conn.sock is not None for conn in kept)  # one per thread, kept alive
    client.close()
    assert all(conn.sock is None for conn in kept) and not client._kept
    assert client.health()["ok"]  # a new connection
    assert len(client._kept) == 1 and client._kept[0] not in kept


def test_overrides_jump_ahead_of_queued_agent_steps():
    from MedSAMAgentLib.worker.scheduler import NORMAL, URGENT, Scheduler

    sched = Scheduler()
    order = []
    try:
        gate = __import__("threading").Event()
        sched.submit(lambda: gate.wait(5), NORMAL)  # keeps the model thread busy while we queue
        counts = {"a": 0, "b": 0}

        def steps(name):
            def step():
                counts[name] += 1
                order.append(name)
                return counts[name] < 3
            return step

        fa, fb = sched.submit_steps(steps("a"), NORMAL), sched.submit_steps(steps("b"), NORMAL)
        fu = sched.submit(lambda: order.append("override"), URGENT)
        gate.set()
        fu.result(5), fa.result(5), fb.result(5)
        assert order[0] == "override"  # ahead of both runs' queued steps
        assert order[1:] == ["a", "b", "a", "b", "a", "b"]  # runs take turns, step by step
        with sched.hold():  # urgent work done outside the queue: no new agent step starts meanwhile
            f = sched.submit(lambda: order.append("later"), NORMAL)
            time.sleep(0.2)
            assert "later" not in order
        f.result(5)
        assert order[-1] == "later"
    finally:
        sched.stop()


def test_the_published_openapi_document_is_current():
    from pathlib import Path

    from MedSAMAgentLib.cli import openapi_schema

    published = json.loads((Path(__file__).resolve().parents[1] / "docs" / "worker-openapi.json").read_text(encoding="utf-8"))
    assert published == json.loads(json.dumps(openapi_schema())), "regenerate: medsam-agent serve --openapi > docs/worker-openapi.json"
    assert {"/v1/sessions", "/v1/runs/{rid}/events", "/v1/sessions/{sid}/override"} <= set(published["paths"])
    assert published["security"] == [{"token": []}]
    assert published["components"]["securitySchemes"]["token"]["scheme"] == "bearer"


def test_replies_are_not_held_back_by_nagle():
    """Quick successive requests (a person dragging a box) must not wait ~40 ms each for the
    client's delayed ACK: the listening socket has TCP_NODELAY, which its connections inherit."""
    import socket

    worker = Worker(WorkerConfig(token=TOKEN))
    server = WorkerServer(create_app(worker))
    try:
        assert server.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        server.sock.listen()
        with socket.create_connection((server.host, server.port)):
            accepted, _ = server.sock.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        server.sock.close()
        worker.close()


def test_status_reports_memory_now_not_only_its_peak(served):
    """An admin watching ``status`` sees memory come back: ``rss_mb`` is the resident memory now
    (it falls when a large block is freed), ``peak_rss_mb`` the highest so far."""
    worker, client = served(create_policy("expert"), create_tool("classical"))
    before = client.status()["memory"]
    block = np.ones(256 * 2 ** 20, np.uint8)  # 256 MiB, touched: resident
    during = client.status()["memory"]
    del block
    after = client.status()["memory"]
    assert during["rss_mb"] - before["rss_mb"] > 200
    assert during["rss_mb"] - after["rss_mb"] > 200
    if "peak_rss_mb" in after:  # not on Windows
        assert after["peak_rss_mb"] >= during["rss_mb"] - 1 and after["peak_rss_mb"] > after["rss_mb"] + 200
        assert all(m["peak_rss_mb"] >= m["rss_mb"] for m in (before, during, after))  # never a peak below now


def test_many_waiting_event_streams_are_woken_at_once_without_threads():
    """Each stream waits on the event loop itself: 40 followers (more than any thread pool here)
    all get their run's event as soon as the model thread emits it; a quiet run times out empty."""
    import asyncio
    import threading

    from MedSAMAgentLib.worker.sessions import Run

    runs = [Run("s") for _ in range(40)]

    async def follow_all():
        waiting = [asyncio.create_task(run.next_lines(-1, timeout=10.0)) for run in runs]
        await asyncio.sleep(0.05)
        assert not any(task.done() for task in waiting)
        threads_before = threading.active_count()
        t0 = time.perf_counter()
        emitter = threading.Thread(target=lambda: [run.emit("action", slice=n) for n, run in enumerate(runs)])
        emitter.start()
        got = await asyncio.gather(*waiting)
        emitter.join()
        assert time.perf_counter() - t0 < 2.0  # not the 10 s timeout, nor one pool-full after another
        assert threading.active_count() <= threads_before + 1
        assert [json.loads(batch[0])["slice"] for batch in got] == list(range(40))
        assert await Run("s").next_lines(-1, timeout=0.05) == []  # nothing new: empty after the timeout
        runs[0].finish("done")
        runs[0].emit("action", slice=99)  # too late: a run's events end with run_done
        assert [json.loads(line)["type"] for line in await runs[0].next_lines(0, timeout=5.0)] == ["run_done"]

    asyncio.run(follow_all())


def test_a_cpu_tool_prepares_a_new_volume_in_the_background(served, volume, sam2_tool):
    image, _ = volume
    worker, client = served(create_policy("replay", actions=[]), create_tool("classical"))
    sid = client.open_session(path=image)["session"]
    session = worker.session(sid)
    deadline = time.time() + 10
    while len(session.slices) < 9 and time.time() < deadline:
        time.sleep(0.05)
    assert sorted(i for _, i in session.slices) == list(range(9))  # every axial slice, in the background
    assert all(state.key in worker.tool.cache for state in session.slices.values())
    # a model tool does not: encoding every slice would cost GPU time and embedding memory
    worker2, client2 = served(create_policy("replay", actions=[]), sam2_tool)
    sid2 = client2.open_session(path=image)["session"]
    time.sleep(0.3)
    assert not worker2.session(sid2).slices


class LockWatch:
    """The classical tool shared like a model tool (one call at a time), noting for every call
    whether a session's lock was held while the tool worked (another thread tries to take it)."""

    concurrent_safe = False
    name = "classical"

    def __init__(self):
        self.inner, self.session, self.held = create_tool("classical"), None, []

    def prepare(self, images, keys=None):
        return self.inner.prepare(images, keys)

    def release(self, key):
        self.inner.release(key)

    def segment(self, key, prompts, previous=None, **kw):
        if self.session is not None:
            import threading

            free = []

            def probe():
                got = self.session.lock.acquire(timeout=1.0)
                free.append(got)
                if got:
                    self.session.lock.release()

            t = threading.Thread(target=probe)
            t.start()
            t.join()
            self.held.append(not free[0])
        return self.inner.segment(key, prompts, previous, **kw)


def test_no_thread_waits_for_the_tool_while_holding_a_session_and_none_the_reverse(served, volume):
    """The model thread (a continue run filling in masks an override left out) and a person's
    override both use the tool and the slice state: neither may hold one lock while waiting for the
    other, or the two wait for each other forever (every later run and override hangs)."""
    import threading

    image, labels = volume
    tool = LockWatch()
    worker, client = served(create_policy("expert"), tool)
    sid = client.open_session(path=image, reference=labels, labels=[3])["session"]
    session = tool.session = worker.session(sid)
    client.override(sid, "axial", 4, [{"box": [10.0, 8.0, 50.0, 40.0]}, {"point": [30.0, 20.0], "positive": True}])
    run = client.continue_slice(sid, "axial", 4, target="blob", turns=1)  # computes the box's mask first
    assert collect(client, run)[-1]["status"] == "done"
    assert tool.held and not any(tool.held), "the session's lock was held during a tool call"
    # an override waiting for the slice's state must not hold the tool meanwhile
    session.lock.acquire()
    try:
        answer = []
        t = threading.Thread(target=lambda: answer.append(client.override(sid, "axial", 4, [{"box": [9.0, 8.0, 50.0, 40.0]}])))
        t.start()
        time.sleep(0.5)  # the override has done its tool call and waits for the session
        assert not answer
        assert worker.tool.lock.acquire(timeout=1.0), "the override held the tool while it waited"
        worker.tool.lock.release()
    finally:
        session.lock.release()
    t.join(10)
    assert answer and answer[0]["prompts"] == [{"box": [9.0, 8.0, 50.0, 40.0]}]


def test_a_running_session_does_not_expire_closing_it_cancels_its_runs_and_the_reaper_survives(served, volume):
    image, labels = volume
    worker, client = served(Slow(create_policy("expert"), 0.2), create_tool("classical"), batch_size=1,
                            session_idle_s=1.0)
    sid = client.open_session(path=image, reference=labels, labels=[3])["session"]
    run = client.start_run(sid, "blob", slices="all")
    worker.expire_sessions(now=time.time() + 3600)  # idle by the clock, but its run is going
    assert worker.session(sid) is not None
    client.close_session(sid)  # the person closed the volume: its run stops within a turn
    t0 = time.time()
    events = collect(client, run)
    assert events[-1]["status"] == "cancelled" and time.time() - t0 < 5
    assert len([e for e in events if e["type"] == "slice_done"]) < 9
    # the idle-session reaper runs every 0.5 s here; one failing pass does not end it
    calls = []
    real = worker.expire_sessions

    def flaky(now=None):
        calls.append(time.time())
        if len(calls) == 1:
            raise RuntimeError("dictionary changed size during iteration")
        real(now)

    worker.expire_sessions = flaky
    deadline = time.time() + 10
    while len(calls) < 2 and time.time() < deadline:
        time.sleep(0.1)
    assert len(calls) >= 2, "the reaper stopped after one failure"


def test_a_stream_reopened_after_the_end_ends_at_once_and_bad_positions_are_refused(served, volume):
    import threading

    image, labels = volume
    worker, client = served(create_policy("expert"), create_tool("classical"))
    sid = client.open_session(path=image, reference=labels, labels=[3])["session"]
    run = client.start_run(sid, "blob", slices=[3])
    events = collect(client, run)
    got = []
    t = threading.Thread(target=lambda: got.append(list(client.events(run, after=events[-1]["seq"]))), daemon=True)
    t.start()
    t.join(5)
    assert got == [[]], "the stream of a finished run did not end"
    import http.client

    host, port = client.url.split("//")[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", f"/v1/runs/{run}/events?after={events[-1]['seq']}", headers={"Authorization": f"Bearer {TOKEN}"})
    lines = [json.loads(x) for x in conn.getresponse().read().splitlines() if x.strip()]
    conn.close()
    assert lines == [events[-1]]  # the run's end, said again: every stream ends with run_done
    with pytest.raises(ClientError) as err:
        list(client.events(run, after=-5))
    assert err.value.status == 400


def test_a_body_without_declared_length_is_still_held_to_the_limit(served):
    import http.client

    worker, client = served(create_policy("expert"), create_tool("classical"), max_json_bytes=1000)
    host, port = client.url.split("//")[1].rsplit(":", 1)
    for path in ("/v1/sessions/any/override", "/v1/sessions"):
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("POST", path, body=(b"x" * 500 for _ in range(100)), encode_chunked=True,
                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json",
                              "Transfer-Encoding": "chunked"})
        reply = conn.getresponse()
        assert reply.status == 413 and b"limit" in reply.read(), path
        conn.close()
    with pytest.raises(ClientError) as err:  # malformed JSON: a clear 400, not a server error
        client._json("POST", "/v1/sessions", {"pth": "x"})
    assert err.value.status == 400 and "path" in str(err.value)
    assert client.health()["ok"]


def test_a_header_whose_data_lies_outside_the_allowed_folders_is_refused(served, volume, tmp_path_factory):
    import SimpleITK as sitk

    image, _ = volume
    worker, client = served(create_policy("expert"), create_tool("classical"))
    vol = sitk.ReadImage(str(image))
    inside = image.parent / "inside.mhd"
    sitk.WriteImage(vol, str(inside))  # inside.mhd + inside.raw, both allowed
    assert client.open_session(path=inside)["size"] == list(vol.GetSize())
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    sitk.WriteImage(vol, str(elsewhere / "secret.mhd"))
    header = (elsewhere / "secret.mhd").read_text().replace("ElementDataFile = secret.raw",
                                                           f"ElementDataFile = {elsewhere / 'secret.raw'}")
    (image.parent / "pointer.mhd").write_text(header)
    with pytest.raises(ClientError) as err:
        client.open_session(path=image.parent / "pointer.mhd")
    assert err.value.status == 403 and "outside the folders" in str(err.value)


def test_an_edit_on_a_slice_the_agent_is_still_working_on_stands(served, volume):
    """A person's override on a slice whose episode is still running ends that episode: the agent's
    later turns are not drawn over the edit, and the slice ends with the person's prompts and mask."""
    image, labels = volume
    worker, client = served(Slow(create_policy("expert"), 0.4), create_tool("classical"))
    sid = client.open_session(path=image, reference=labels, labels=[3])["session"]
    run = client.start_run(sid, "blob", slices=[4])
    stream = EventStream(client, run)
    seen = []
    while not any(e["type"] == "mask" for e in seen):  # the agent's first turn is on the slice
        seen.append(stream.queue.get(timeout=20))
    edit = [{"box": [12.0, 10.0, 40.0, 30.0]}]
    answer = client.override(sid, "axial", 4, edit)
    while (e := stream.queue.get(timeout=20)) is not None:
        seen.append(e)
    after = seen[[n for n, e in enumerate(seen) if e["type"] == "mask"][0] + 1:]
    assert not [e for e in after if e["type"] in ("action", "mask")], after  # nothing drawn over the edit
    done = [e for e in seen if e["type"] == "slice_done"]
    assert len(done) == 1 and done[0]["stop_reason"] == "overridden"
    assert np.array_equal(decode_rle(done[0]["mask"]), decode_rle(answer["mask"]))
    info = client.slice_info(sid, "axial", 4)
    assert info["prompts"] == edit and np.array_equal(decode_rle(info["mask"]), decode_rle(answer["mask"]))
    assert seen[-1]["type"] == "run_done" and seen[-1]["status"] == "done"


def test_a_cancelled_turn_ends_at_once_and_each_episode_ends_once():
    from MedSAMAgentLib.agent import Episode

    events = []
    cases = [synthetic_case_pair(s) for s in (1, 2, 3)]
    agent = Agent(create_policy("expert"), create_tool("classical"), Profile.load(),
                  on_event=lambda e: events.append((e.kind, e.episode_id)))
    run = agent.start([Episode(f"e{n}", img, "blob", ref) for n, (img, ref) in enumerate(cases)])
    pieces = run.substeps()
    next(pieces)  # the policy has chosen every episode's first action
    run.cancel()
    list(pieces)  # the rest of that turn
    assert [k for k, _ in events if k in ("action", "mask")] == []
    assert sorted(i for k, i in events if k == "episode_done") == ["e0", "e1", "e2"]
    assert all(t.stop_reason == "cancelled" and not t.steps for t in run.trajectories)


def synthetic_case_pair(seed):
    from conftest import synthetic_case

    gray, ref = synthetic_case(seed)[:2]
    return np.dstack([gray] * 3), ref


def test_an_upload_cut_off_by_its_client_leaves_no_error_behind(served, volume, caplog):
    import logging
    import socket
    import urllib.parse

    worker, client = served(create_policy("expert"), create_tool("classical"))
    address = urllib.parse.urlsplit(client.url)
    data = volume[0].read_bytes()
    caplog.set_level(logging.ERROR)
    seen = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = seen.append  # uvicorn's loggers do not pass records up to the root logger
    logging.getLogger("uvicorn.error").addHandler(handler)
    try:
        with socket.create_connection((address.hostname, address.port)) as sock:
            sock.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() +
                         b"\r\nX-Filename: ct.nii.gz\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data[:len(data) // 2])
            time.sleep(0.3)  # the worker is reading the body when the client goes away
        time.sleep(0.5)
        assert client.health()["ok"]
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    errors = [r for r in seen + caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert client.open_session(data=data, filename="ct.nii.gz")["slices"]["axial"] == 9  # and it serves on


def test_a_worker_ends_when_the_program_that_started_it_is_killed(tmp_path):
    """A crashed or killed Slicer leaves no worker behind holding the GPU (serve --parent-pid)."""
    import json
    import signal
    import subprocess
    import sys

    import psutil

    script = tmp_path / "parent.py"
    script.write_text("import json, time\n"
                      "from MedSAMAgentLib.worker.client import start_worker\n"
                      "proc, client = start_worker(['--policy', 'expert', '--tool', 'classical'])\n"
                      "print(json.dumps({'pid': proc.pid, 'ready': client.wait_ready(60)['state']}), flush=True)\n"
                      "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        started = json.loads(parent.stdout.readline())
        assert started["ready"] == "ready"
        worker = psutil.Process(started["pid"])
        parent.send_signal(signal.SIGKILL)  # no chance to stop its worker
        parent.wait(10)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                if worker.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.2)
        else:
            worker.kill()
            pytest.fail("the worker outlived the program that started it")
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.stdout.close()
