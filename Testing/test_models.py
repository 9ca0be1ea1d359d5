"""Model catalogue, cache and downloads, against a real HTTP server on 127.0.0.1 serving small files."""
import hashlib
import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from MedSAMAgentLib import models
from MedSAMAgentLib.cli import main


COMMIT = "c0ffee" * 6 + "c0ff"  # the repositories' one commit (40 hex digits)


class Hub:
    """A stand-in for the model hub, speaking its API as ``huggingface_hub`` calls it.

    ``GET /api/models/<repo>/tree/<rev>`` lists files (size, git oid, LFS sha256 and size);
    ``HEAD``/``GET /<repo>/resolve/<rev>/<path>`` give the file's commit, ETag and size, and its
    bytes with Range support; with ``cdn`` set, resolve answers 302 to ``localhost`` (another
    host than the endpoint's 127.0.0.1), as the real hub sends LFS files to its CDN.
    """

    def __init__(self):
        self.files = {}  # (repo, path) -> bytes
        self.hashes = {}  # (repo, path) -> sha256 to announce in the listing
        self.cuts = {}  # (repo, path) -> how many of its next GETs are cut off halfway
        self.cdn = False
        self.requests = []  # (method, path, Range header, Authorization header)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _record(self):
                hub.requests.append((self.command, self.path, self.headers.get("Range"),
                                     self.headers.get("Authorization")))

            def _send(self, code, headers, body=b""):
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(body)

            def _file(self):
                m = re.match(r"^/(?:cdn/)?(.+?/.+?)/resolve/[^/]+/(.+)$", urllib.parse.urlsplit(self.path).path)
                key = (m.group(1), urllib.parse.unquote(m.group(2))) if m else None
                return key, hub.files.get(key)

            def do_HEAD(self):
                self._record()
                key, data = self._file()
                if data is None:
                    return self._send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT,
                                            "Content-Length": "0"})
                etag = f'"{hashlib.sha256(data).hexdigest()}"'
                if hub.cdn and not self.path.startswith("/cdn/"):
                    return self._send(302, {"Location": f"http://localhost:{hub.port}/cdn{self.path}",
                                            "X-Repo-Commit": COMMIT, "X-Linked-Etag": etag,
                                            "X-Linked-Size": str(len(data)), "Content-Length": "0"})
                self._send(200, {"X-Repo-Commit": COMMIT, "ETag": etag, "Content-Length": str(len(data))})

            def do_GET(self):
                self._record()
                url = urllib.parse.urlsplit(self.path)
                m = re.match(r"^/api/models/(.+?/.+?)/tree/[^/]+$", url.path)
                if m:
                    repo = m.group(1)
                    items = [{"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest(),
                              "lfs": {"oid": hub.hashes.get((r, p), hashlib.sha256(d).hexdigest()),
                                      "size": len(d), "pointerSize": 134}}
                             for (r, p), d in hub.files.items() if r == repo]
                    if not items:
                        return self._send(404, {"X-Error-Code": "RepoNotFound", "Content-Length": "0"})
                    body = json.dumps(items).encode()
                    return self._send(200, {"Content-Type": "application/json", "Content-Length": str(len(body))},
                                      body)
                key, data = self._file()
                if data is None:
                    return self._send(404, {"X-Error-Code": "EntryNotFound", "Content-Length": "0"})
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
                headers = {"Content-Length": str(len(data) - start), "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
                if start:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                self.send_response(206 if start else 200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if hub.cuts.get(key):
                    hub.cuts[key] -= 1
                    self.wfile.write(data[start:start + (len(data) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def gets(self, path_part="/resolve/"):
        return [r for r in self.requests if r[0] == "GET" and path_part in r[1]]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_catalogue_lists_the_known_weights():
    cat = models.catalogue()
    assert cat["medsam-agent-8b"].repo == "Saint-lsy/MedSAM-Agent-Qwen3-VL-8B-MedSAM2"
    assert cat["medsam2"].files == ["MedSAM2_latest.pt"] and cat["medsam2"].config == "tiny"
    assert {"qwen3-vl-2b", "qwen3-vl-4b", "qwen3-vl-8b", "sam2.1-tiny", "sam2.1-small", "sam2.1-base-plus",
            "sam2.1-large"} <= set(cat)
    assert all(e.license and e.size_gb > 0 for e in cat.values())


def test_cache_folder_is_user_level_and_overridable(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDSAM_AGENT_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "medsam-agent" / "models"
    monkeypatch.setenv("MEDSAM_AGENT_HOME", str(tmp_path / "mine"))
    assert models.cache_dir() == tmp_path / "mine" / "models"


def test_a_cut_off_download_resumes_where_it_stopped_and_is_verified(hub, capsys, monkeypatch):
    import huggingface_hub.constants

    # the library writes whole chunks (10 MB by default): smaller ones, so a 2 MiB file has several
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    data = bytes(range(256)) * 8192  # 2 MiB
    hub.files[("wanglab/MedSAM2", "MedSAM2_latest.pt")] = data
    hub.cuts[("wanglab/MedSAM2", "MedSAM2_latest.pt")] = 1  # the first transfer is cut off halfway
    assert main(["models", "download", "medsam2", "-q"]) == 0
    path = models.local_path("medsam2")
    assert path.read_bytes() == data
    first, second = hub.gets()
    resumed_at = int(second[2].removeprefix("bytes=").removesuffix("-"))
    assert first[2] is None and len(data) // 4 < resumed_at <= len(data) // 2  # resumed near the cut, not restarted
    assert [p.name for p in path.parent.iterdir() if not p.name.startswith(".")] == ["MedSAM2_latest.pt"]
    capsys.readouterr()
    assert main(["models", "path", "medsam2"]) == 0
    assert capsys.readouterr().out.strip() == str(path)
    main(["models", "list"])
    listed = capsys.readouterr().out
    assert re.search(r"medsam2 .* downloaded", listed)
    assert "medsam-agent-8b runs under the profile medsam-agent-v1-eval by default" in listed


def test_a_download_cut_off_again_and_again_says_to_run_it_again(hub, capsys):
    hub.files[("wanglab/MedSAM2", "MedSAM2_latest.pt")] = b"m" * 400_000
    hub.cuts[("wanglab/MedSAM2", "MedSAM2_latest.pt")] = 100  # more than the library's retries
    assert main(["models", "download", "medsam2", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "was cut off" in err and "run the same command again" in err
    assert not models.is_complete("medsam2")
    hub.cuts.clear()
    assert main(["models", "download", "medsam2", "-q"]) == 0 and models.is_complete("medsam2")


def test_a_corrupt_download_is_removed(hub):
    hub.files[("facebook/sam2.1-hiera-tiny", "sam2.1_hiera_tiny.pt")] = b"x" * 1000
    hub.hashes[("facebook/sam2.1-hiera-tiny", "sam2.1_hiera_tiny.pt")] = "0" * 64
    with pytest.raises(models.ModelError, match="corrupt"):
        models.download("sam2.1-tiny")
    assert not (models.model_dir("sam2.1-tiny") / "sam2.1_hiera_tiny.pt").exists()
    assert not models.is_complete("sam2.1-tiny")
    hub.hashes.clear()  # the mirror fixed: the next run fetches it afresh
    assert models.download("sam2.1-tiny").read_bytes() == b"x" * 1000


def test_a_policy_is_the_whole_repository_snapshot(hub):
    repo = "Qwen/Qwen3-VL-2B-Instruct"
    for name, content in {"config.json": b"{}", "model.safetensors": b"w" * 5000, "tokenizer.json": b"{}",
                          "chat_template.json": b"{}", "README.md": b"# card", ".gitattributes": b"*",
                          "sub/extra.json": b"[]"}.items():
        hub.files[(repo, name)] = content
    folder = models.download("qwen3-vl-2b")
    assert folder == models.model_dir("qwen3-vl-2b") and models.is_complete("qwen3-vl-2b")
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts)) == [
        "chat_template.json", "config.json", "model.safetensors", "sub/extra.json", "tokenizer.json"]
    fetched = len(hub.gets())
    assert models.download("qwen3-vl-2b") == folder and len(hub.gets()) == fetched  # complete: nothing fetched


def test_progress_goes_to_the_callers_bars_and_raising_in_one_cancels(hub):
    data = bytes(range(256)) * 12000  # about 3 MB: several chunks
    hub.files[("wanglab/MedSAM2", "MedSAM2_latest.pt")] = data
    seen = []

    class Stop(Exception):
        pass

    class Bar:
        def __init__(self, name, total):
            seen.append([name, total, 0, False])

        def update(self, n):
            seen[-1][2] += n
            if cancel:
                raise Stop

        def close(self):
            seen[-1][3] = True

    cancel = True
    with pytest.raises(Stop):
        models.download("medsam2", Bar)
    assert not models.is_complete("medsam2") and not (models.model_dir("medsam2") / "MedSAM2_latest.pt").exists()
    cancel = False
    models.download("medsam2", Bar)
    assert seen[-1] == ["MedSAM2_latest.pt", len(data), len(data), True]


def test_offline_says_which_files_to_put_where(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # online, but the hub cannot be reached
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("MEDSAM_AGENT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEDSAM_AGENT_HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    rc = main(["models", "download", "medsam2"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "HTTPS_PROXY" in err and "MedSAM2_latest.pt" in err and str(tmp_path / "home" / "models" / "medsam2") in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(["models", "download", "medsam2"])
    err = capsys.readouterr().err
    assert rc == 2 and "HF_HUB_OFFLINE is set" in err and "MedSAM2_latest.pt" in err
    rc = main(["models", "path", "medsam-agent-8b"])
    err = capsys.readouterr().err
    assert rc == 2 and "not downloaded" in err and "safetensors" in err
    assert main(["models", "download", "no-such-model"]) == 2


def test_a_gated_or_missing_repository_says_what_to_do(hub):
    with pytest.raises(models.ModelError, match="has no repository wanglab/MedSAM2"):
        models.download("medsam2")  # the hub lists nothing for it: 404 RepoNotFound
    hub.files[("wanglab/MedSAM2", "other.pt")] = b"x"
    with pytest.raises(models.ModelError, match="has no MedSAM2_latest.pt"):
        models.download("medsam2")


def test_the_hub_token_is_not_sent_on_to_another_host(hub, monkeypatch):
    """The hub redirects LFS files to another host (its CDN): the token stays with the hub."""
    hub.files[("wanglab/MedSAM2", "MedSAM2_latest.pt")] = b"weights" * 1000
    hub.cdn = True
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert models.download("medsam2").read_bytes() == b"weights" * 1000
    to_hub = [auth for method, path, _, auth in hub.requests if not path.startswith("/cdn/")]
    to_cdn = [auth for method, path, _, auth in hub.requests if path.startswith("/cdn/")]
    assert to_hub and set(to_hub) == {"Bearer hf_secret"}  # the listing and the HEAD carried it
    assert to_cdn and set(to_cdn) == {None}  # the other host never saw it


def test_a_listing_that_escapes_the_folder_or_lists_nothing_is_refused(hub):
    hub.files[("Qwen/Qwen3-VL-2B-Instruct", "sub/../../../escaped.txt")] = b"x"
    with pytest.raises(models.ModelError, match="outside the model's folder"):
        models.download("qwen3-vl-2b")
    assert not models.is_complete("qwen3-vl-2b") and not hub.gets()
    hub.files.clear()
    hub.files[("Qwen/Qwen3-VL-2B-Instruct", "README.md")] = b"only a readme"
    with pytest.raises(models.ModelError, match="lists no files"):
        models.download("qwen3-vl-2b")
    assert not models.is_complete("qwen3-vl-2b")


def test_two_downloads_of_one_model_take_turns(hub):
    """The second waits for the first and finds the model complete (no two writers on one file)."""
    data = b"w" * 300_000
    hub.files[("wanglab/MedSAM2", "MedSAM2_latest.pt")] = data
    results = []
    threads = [threading.Thread(target=lambda: results.append(models.download("medsam2"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 2 and all(p.read_bytes() == data for p in results)
    assert len(hub.gets()) == 1  # fetched once


def test_a_hub_model_that_cannot_be_fetched_is_refused_at_once(monkeypatch, tmp_path):
    """Not cached and the hub unreachable: one sentence now, not minutes of download retries."""
    import time

    from MedSAMAgentLib.builders import ChoiceError, resolve_model

    for var in ("HTTPS_PROXY", "https_proxy", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    started = time.perf_counter()
    with pytest.raises(ChoiceError, match="not in this machine's model cache, and the hub .* cannot be reached"):
        resolve_model("someone/some-model")
    assert time.perf_counter() - started < 10
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline mode: the cache alone decides, later
    assert resolve_model("someone/some-model") == ("someone/some-model", "someone/some-model")
