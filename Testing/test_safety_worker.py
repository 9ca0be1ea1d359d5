"""The worker as an attacker meets it, over real HTTP on 127.0.0.1: every file a request makes it
read lies inside --allow-dir (header-named data files, NIfTI pairs, DICOM folders, links), no
probing, exact Bearer authentication, bounded work, and a fuzzed request validation."""
import http.client
import json
import os
import shutil
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from MedSAMAgentLib.policies import create_policy
from MedSAMAgentLib.profile import Profile
from MedSAMAgentLib.tools import create_tool
from MedSAMAgentLib.worker.app import WorkerServer, create_app
from MedSAMAgentLib.worker.protocol import MAX_OVERRIDE_PROMPTS
from MedSAMAgentLib.worker.service import Worker, WorkerConfig

TOKEN = "a-test-token-of-some-length"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Served:
    """A real worker (expert policy, classical tool) on a free port, and raw HTTP calls to it."""

    def __init__(self, allowed):
        self.worker = Worker(WorkerConfig(token=TOKEN, allowed_dirs=[allowed]))
        self.worker.load(lambda step: (create_policy("expert"), create_tool("classical"), Profile.load()))
        self.server = WorkerServer(create_app(self.worker)).start()

    def call(self, method, path, body=None, headers=None, timeout=60):
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=timeout)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        head = dict(AUTH if headers is None else headers)
        if isinstance(body, (dict, list)) or (body is not None and not isinstance(body, bytes)):
            head.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=data, headers=head)
            reply = conn.getresponse()
            raw = reply.read()
        finally:
            conn.close()
        try:
            detail = json.loads(raw)
        except ValueError:
            detail = raw.decode(errors="replace")
        return reply.status, detail

    def open_path(self, path, **extra):
        return self.call("POST", "/v1/sessions", {"path": str(path), **extra})

    def upload(self, data: bytes, name: str):
        return self.call("POST", "/v1/sessions", data, {**AUTH, "Content-Type": "application/octet-stream",
                                                        "X-Filename": name})

    def close(self):
        self.server.stop()
        self.worker.close()


@pytest.fixture()
def places(tmp_path):
    """An allowed folder with a volume in it, and a secret volume outside it."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    rng = np.random.default_rng(0)
    secret = sitk.GetImageFromArray(rng.integers(0, 1000, (6, 20, 24)).astype(np.int16))
    sitk.WriteImage(secret, str(outside / "secret.mhd"))  # writes secret.raw beside it
    sitk.WriteImage(secret, str(outside / "secret.nii"))
    sitk.WriteImage(secret, str(allowed / "fine.mhd"))  # header and data both inside
    served = Served(allowed)
    yield allowed, outside, served
    served.close()


def header_with_data_file(source_header, target, data_path):
    """A copy of a detached header (``.mhd`` or ``.nhdr``) whose data-file line names ``data_path``."""
    text = source_header.read_text(encoding="latin-1")
    key = "ElementDataFile = " if source_header.suffix == ".mhd" else "data file: "
    lines = [f"{key}{data_path}" if line.startswith(key) else line for line in text.splitlines()]
    target.write_text("\n".join(lines) + "\n", encoding="latin-1")
    return target


def test_a_header_can_never_make_the_worker_read_outside_the_allowed_folders(places):
    allowed, outside, served = places
    status, info = served.open_path(allowed / "fine.mhd")
    assert status == 200 and info["session"], info  # the legitimate case works
    secret_raw = outside / "secret.raw"
    (outside / "nrrd").mkdir()
    sitk.WriteImage(sitk.ReadImage(str(outside / "secret.mhd")), str(outside / "nrrd" / "secret.nhdr"))
    nrrd_raw = next(p for p in (outside / "nrrd").iterdir() if p.suffix != ".nhdr")
    attacks = {
        # MetaImage: .mha and .mhd alike may name their data, by absolute or relative path
        "abs.mha": header_with_data_file(outside / "secret.mhd", allowed / "abs.mha", secret_raw),
        "rel.mhd": header_with_data_file(outside / "secret.mhd", allowed / "rel.mhd", "../outside/secret.raw"),
        # NRRD: an attached .nrrd may carry a data-file line too, not only a .nhdr
        "abs.nrrd": header_with_data_file(outside / "nrrd" / "secret.nhdr", allowed / "abs.nrrd", nrrd_raw),
        "rel.nhdr": header_with_data_file(outside / "nrrd" / "secret.nhdr", allowed / "rel.nhdr",
                                          f"../outside/nrrd/{nrrd_raw.name}"),
    }
    # a detached NIfTI pair whose .img is a link out of the folder
    sitk.WriteImage(sitk.ReadImage(str(outside / "secret.nii")), str(outside / "pair.hdr"))
    shutil.copy(outside / "pair.hdr", allowed / "pair.nii")
    os.symlink(outside / "pair.img", allowed / "pair.img")
    attacks["pair.nii"] = allowed / "pair.nii"
    # a plain link, and a DICOM folder holding a link out
    os.symlink(outside / "secret.nii", allowed / "link.nii")
    attacks["link.nii"] = allowed / "link.nii"
    (allowed / "series").mkdir()
    os.symlink(outside / "secret.nii", allowed / "series" / "slice1.dcm")
    attacks["series"] = allowed / "series"
    for name, path in attacks.items():
        assert sitk.GetArrayFromImage(sitk.ReadImage(str(path))).any() if name != "series" else True  # reads out
        status, info = served.open_path(path)
        assert status == 403 and "outside the folders" in info["detail"], (name, status, info)
    assert served.worker.sessions.__len__() == 1  # only the legitimate one was opened


def test_no_probing_and_malformed_paths_are_400(places, tmp_path):
    allowed, outside, served = places
    answers = []
    for path in (outside / "secret.nii", outside / "no-such-file.nii", tmp_path / "nowhere" / "x.nii",
                 f"{allowed}/../outside/secret.nii", f"{allowed}/../outside/nothing.nii"):
        status, info = served.open_path(path)
        answers.append((status, info["detail"].replace(str(path), "PATH")))
    assert len(set(answers)) == 1 and answers[0][0] == 403, answers  # exists or not: the same answer
    status, info = served.open_path(allowed / "missing.nii")
    assert status == 404  # inside the allowed folder a missing file may be said
    for bad, words in (("a\x00b.nii", "NUL"), ("~nosuchuser-xyz/a.nii", "no user"), ("x" * 5000, "characters long"),
                       ("   ", "empty")):
        status, info = served.open_path(bad)
        assert status == 400 and words in info["detail"], (bad, status, info)
    status, info = served.call("POST", "/v1/sessions", {"path": str(allowed / "fine.mhd"), "reference": "a\x00"})
    assert status == 400 and "NUL" in info["detail"]
    status, info = served.call("POST", "/v1/sessions", {"path": str(allowed / "fine.mhd"),
                                                        "reference": str(outside / "secret.nii")})
    assert status == 403


def test_an_upload_may_name_no_other_file(places):
    allowed, outside, served = places
    raw = (outside / "secret.raw").resolve()
    mha = header_with_data_file(outside / "secret.mhd", outside / "up.mha", raw).read_bytes()
    (outside / "nrrd").mkdir()
    sitk.WriteImage(sitk.ReadImage(str(outside / "secret.mhd")), str(outside / "nrrd" / "up.nhdr"))
    nrrd_raw = next(p for p in (outside / "nrrd").iterdir() if p.suffix != ".nhdr")
    nrrd = header_with_data_file(outside / "nrrd" / "up.nhdr", outside / "up2.nhdr", nrrd_raw.resolve()).read_bytes()
    pair = (outside / "secret.nii").read_bytes()
    pair = pair[:344] + b"ni1\x00" + pair[348:352]  # a NIfTI header that says its voxels are in a .img
    for data, name in ((mha, "scan.mha"), (nrrd, "scan.nrrd"), (pair, "scan.nii")):
        status, info = served.upload(data, name)
        assert status == 403 and "names another file" in info["detail"] and name in info["detail"], (name, info)
    status, info = served.upload((outside / "secret.nii").read_bytes(), "scan.nii")
    assert status == 200, info  # a whole file is fine


def test_only_an_exact_bearer_token_is_let_in(places):
    allowed, outside, served = places
    refused = [{}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"},
               {"Authorization": f"Token {TOKEN}"}, {"Authorization": f"Bearer  {TOKEN}"},
               {"Authorization": f"Bearer {TOKEN} extra"}, {"Authorization": f"Bearer {TOKEN[:-1]}"},
               {"Authorization": "Bearer "}, {"X-Token": TOKEN}, {"Cookie": f"token={TOKEN}"}]
    for headers in refused:
        status, info = served.call("GET", "/v1/status", headers=headers)
        assert status == 401 and "Bearer" in info["detail"], (headers, status)
    status, _ = served.call("GET", f"/v1/status?token={TOKEN}", headers={})
    assert status == 401
    # two Authorization headers: refused even if one is right
    conn = http.client.HTTPConnection("127.0.0.1", served.server.port, timeout=10)
    conn.putrequest("GET", "/v1/status")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.putheader("Authorization", "Bearer wrong")
    conn.endheaders()
    assert conn.getresponse().status == 401
    conn.close()
    for scheme in ("Bearer", "bearer"):  # the scheme's name is case-insensitive in HTTP
        status, info = served.call("GET", "/v1/health", headers={"Authorization": f"{scheme} {TOKEN}"})
        assert status == 200 and info["ok"]


def test_work_per_request_is_bounded_and_closed_sessions_free_their_runs(places):
    allowed, outside, served = places
    status, info = served.open_path(allowed / "fine.mhd")
    sid = info["session"]
    too_many = [{"point": [3, 3], "positive": True}] * (MAX_OVERRIDE_PROMPTS + 1)
    status, reply = served.call("POST", f"/v1/sessions/{sid}/override", {"axis": "axial", "slice": 2,
                                                                         "prompts": too_many})
    assert status == 422 and str(MAX_OVERRIDE_PROMPTS) in reply["detail"]
    status, reply = served.call("POST", f"/v1/sessions/{sid}/override", {"axis": "axial", "slice": 2,
                                                                         "prompts": too_many[:MAX_OVERRIDE_PROMPTS]})
    assert status == 200
    # a run on a slice, then the session closed: its finished run is forgotten at once
    served.worker.sessions.get(sid).reference = np.ones((6, 20, 24), bool)
    status, run = served.call("POST", f"/v1/sessions/{sid}/runs", {"target": "blob", "slices": [2]})
    assert status == 200
    deadline = time.time() + 30
    while served.worker.runs[run["run"]].status == "running" and time.time() < deadline:
        time.sleep(0.05)
    status, before = served.call("GET", "/v1/status")
    assert before["runs_kept"] == 1 and before["limits"]["override_prompts"] == MAX_OVERRIDE_PROMPTS
    served.call("DELETE", f"/v1/sessions/{sid}")
    status, after = served.call("GET", "/v1/status")
    assert after["runs_kept"] == 0 and after["sessions"] == 0
    assert served.call("GET", f"/v1/runs/{run['run']}/events")[0] == 404


def test_health_answers_while_an_override_of_a_huge_picture_runs(places, tmp_path):
    """An 8000x8000 picture's override runs on a thread: /v1/health is answered meanwhile."""
    allowed, outside, served = places
    big = np.zeros((8000, 8000), np.uint8)
    big[2000:6000, 2500:5500] = 200
    big += np.random.default_rng(1).integers(0, 30, big.shape, dtype=np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(big), str(allowed / "big.png"))
    status, info = served.open_path(allowed / "big.png")
    assert status == 200, info
    sid = info["session"]
    prompts = [{"box": [2400, 1900, 5600, 6100]}] + [{"point": [3000 + 10 * k, 3000], "positive": True}
                                                    for k in range(MAX_OVERRIDE_PROMPTS - 1)]
    done, answers = threading.Event(), []

    def override():
        answers.append(served.call("POST", f"/v1/sessions/{sid}/override",
                                   {"axis": "axial", "slice": 0, "prompts": prompts}, timeout=300))
        done.set()

    thread = threading.Thread(target=override)
    thread.start()
    health_during = 0
    while not done.is_set():
        status, reply = served.call("GET", "/v1/health")
        assert status == 200
        health_during += not done.is_set()
        time.sleep(0.01)
    thread.join()
    assert answers[0][0] == 200 and answers[0][1]["mask"]["size"] == [8000, 8000]
    assert health_during >= 1  # answered while the override was still being computed


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10 ** 20, 10 ** 20) | st.floats() | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                                         max_size=4), max_leaves=12)
FIELDS = {"axis": st.sampled_from(["axial", "coronal", "sagittal", "", "AXIAL", "x"]) | JSON,
          "slice": st.integers(-5, 10) | JSON, "prompts": st.lists(
              st.fixed_dictionaries({}, optional={"box": st.lists(st.integers(-3, 30) | st.floats(), max_size=5),
                                                  "point": st.lists(st.integers(-3, 30) | st.floats(), max_size=3),
                                                  "positive": st.booleans() | JSON}) | JSON, max_size=5) | JSON,
          "target": st.text(max_size=10) | JSON, "slices": st.sampled_from(["all", "auto", "1:3", "x"]) | JSON,
          "turns": st.integers(-2, 12) | JSON, "key_slice": st.integers(-2, 8) | JSON, "path": st.text(max_size=30) | JSON,
          "series": JSON, "reference": JSON, "labels": JSON, "batch_size": JSON, "max_turns": JSON}


def test_fuzzed_requests_get_answers_never_a_server_error(places):
    """Thousands of generated bodies to every JSON route over real HTTP: 2xx or 4xx, never a 500."""
    allowed, outside, served = places
    status, info = served.open_path(allowed / "fine.mhd")
    sid = info["session"]
    routes = [f"/v1/sessions/{sid}/override", f"/v1/sessions/{sid}/continue", f"/v1/sessions/{sid}/runs",
              "/v1/sessions", f"/v1/sessions/{sid}/slices/axial/2"]
    seen = []

    @settings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(route=st.sampled_from(routes), body=st.fixed_dictionaries({}, optional=FIELDS) | JSON,
           raw=st.booleans())
    def check(route, body, raw):
        if raw:
            data = json.dumps(body, allow_nan=True).encode()[: len(str(body)) // 2] or b"{"
            status, reply = served.call("POST", route, data, {**AUTH, "Content-Type": "application/json"})
        else:
            status, reply = served.call("GET" if "/slices/" in route else "POST", route,
                                        None if "/slices/" in route else body)
        seen.append(status)
        assert status < 500, (route, body, status, reply)
        if status >= 400:
            assert isinstance(reply, dict) and isinstance(reply.get("detail"), str) and reply["detail"], reply
        for run in list(served.worker.runs.values()):
            run.cancel_requested = True  # keep the worker's queue short

    check()
    assert len(seen) >= 2500 and {200, 422} <= set(seen)


def test_the_readmes_weight_free_worker_example_runs_as_written():
    """The documented worker example for a machine without weights (docs/worker.md), run as a user would
    paste it from the repository's root."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data = root.parent / "shared" / "data" / "ct3d_totalseg_abdomen"
    if not data.is_dir():
        pytest.skip(f"the development data is not beside this checkout ({data})")
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]  # where a user reads about the worker
    blocks = [b for page in pages for b in re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)]
    example = next(b for b in blocks if '"--policy", "expert", "--tool", "classical"' in b and "start_worker" in b)
    done = subprocess.run([sys.executable, "-c", example], cwd=root, capture_output=True, text=True, timeout=300)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stderr[-2000:]
    assert lines[-1] == "run_done None" and sum(line.startswith("slice_done") for line in lines) >= 5
