"""Model catalogue, cache and downloads, against a real HTTP server on 127.0.0.1 serving small files."""
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from MedSAMAgentLib import models
from MedSAMAgentLib.cli import main


class Hub:
    """A tiny stand-in for the model hub's file API: tree listings and resolvable files with Range support."""

    def __init__(self):
        self.files = {}  # (repo, path) -> bytes
        self.hashes = {}  # (repo, path) -> sha256 to announce
        self.cut_once = set()  # (repo, path) whose first download is cut off halfway
        self.requests = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.requests.append((self.path, self.headers.get("Range")))
                m = re.match(r"^/api/models/(.+)/tree/main", self.path)
                if m:
                    repo = m.group(1)
                    items = [{"type": "file", "path": p, "size": len(d),
                              "lfs": {"oid": hub.hashes.get((r, p), hashlib.sha256(d).hexdigest()), "size": len(d)}}
                             for (r, p), d in hub.files.items() if r == repo]
                    if not items:
                        return self.send_error(404)
                    body = json.dumps(items).encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    return self.wfile.write(body)
                m = re.match(r"^/(.+?/.+?)/resolve/main/(.+)$", self.path)
                key = (m.group(1), m.group(2)) if m else None
                if key not in hub.files:
                    return self.send_error(404)
                data = hub.files[key]
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if key in hub.cut_once:
                    hub.cut_once.discard(key)
                    self.wfile.write(data[start:start + (len(data) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

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


def test_interrupted_download_resumes_and_is_verified(hub, capsys):
    data = bytes(range(256)) * 8192  # 2 MiB
    hub.files[("wanglab/MedSAM2", "MedSAM2_latest.pt")] = data
    hub.cut_once.add(("wanglab/MedSAM2", "MedSAM2_latest.pt"))
    with pytest.raises(models.ModelError, match="run the same command again to resume|stopped at"):
        models.download("medsam2")
    part = models.model_dir("medsam2") / "MedSAM2_latest.pt.part"
    assert 0 < part.stat().st_size < len(data)
    assert main(["models", "download", "medsam2", "-q"]) == 0
    path = models.local_path("medsam2")
    assert path.read_bytes() == data and not part.exists()
    ranges = [r for p, r in hub.requests if "resolve" in p and r]
    assert ranges and ranges[-1].startswith("bytes=") and int(ranges[-1][6:-1]) > 0  # resumed, not restarted
    capsys.readouterr()
    assert main(["models", "path", "medsam2"]) == 0
    assert capsys.readouterr().out.strip() == str(path)
    main(["models", "list"])
    listed = capsys.readouterr().out
    assert re.search(r"medsam2 .* downloaded", listed)
    assert "medsam-agent-8b runs under the profile medsam-agent-v1-eval by default" in listed


def test_a_corrupt_download_is_removed(hub):
    hub.files[("facebook/sam2.1-hiera-tiny", "sam2.1_hiera_tiny.pt")] = b"x" * 1000
    hub.hashes[("facebook/sam2.1-hiera-tiny", "sam2.1_hiera_tiny.pt")] = "0" * 64
    with pytest.raises(models.ModelError, match="corrupt"):
        models.download("sam2.1-tiny")
    assert not (models.model_dir("sam2.1-tiny") / "sam2.1_hiera_tiny.pt").exists()
    assert not models.is_complete("sam2.1-tiny")


def test_a_policy_is_the_whole_repository_snapshot(hub):
    repo = "Qwen/Qwen3-VL-2B-Instruct"
    for name, content in {"config.json": b"{}", "model.safetensors": b"w" * 5000, "tokenizer.json": b"{}",
                          "chat_template.json": b"{}", "README.md": b"# card"}.items():
        hub.files[(repo, name)] = content
    folder = models.download("qwen3-vl-2b")
    assert folder == models.model_dir("qwen3-vl-2b") and models.is_complete("qwen3-vl-2b")
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "chat_template.json", "config.json", "model.safetensors", "tokenizer.json"]


def test_offline_says_which_files_to_put_where(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDSAM_AGENT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEDSAM_AGENT_HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    rc = main(["models", "download", "medsam2"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "HTTPS_PROXY" in err and "MedSAM2_latest.pt" in err and str(tmp_path / "home" / "models" / "medsam2") in err
    rc = main(["models", "path", "medsam-agent-8b"])
    err = capsys.readouterr().err
    assert rc == 2 and "not downloaded" in err and "safetensors" in err
    assert main(["models", "download", "no-such-model"]) == 2


def test_the_hub_token_is_not_sent_on_to_another_host(monkeypatch):
    """The hub redirects file downloads to other hosts (a CDN): the token stays with the hub."""
    seen = []

    class Target(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    target = ThreadingHTTPServer(("127.0.0.1", 0), Target)
    threading.Thread(target=target.serve_forever, daemon=True).start()

    class Hub302(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{target.server_address[1]}/file")
            self.send_header("Content-Length", "0")
            self.end_headers()

    hub = ThreadingHTTPServer(("127.0.0.1", 0), Hub302)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    try:
        with models._request(f"http://127.0.0.1:{hub.server_address[1]}/x") as resp:
            assert resp.read() == b"ok"
    finally:
        hub.shutdown(), target.shutdown(), hub.server_close(), target.server_close()
    assert seen == ["Bearer hf_secret", None]  # the hub got it; the other host did not


def test_a_listing_that_escapes_the_folder_or_lists_nothing_is_refused(hub):
    hub.files[("Qwen/Qwen3-VL-2B-Instruct", "sub/../../../escaped.txt")] = b"x"
    with pytest.raises(models.ModelError, match="outside the model's folder"):
        models.download("qwen3-vl-2b")
    assert not models.is_complete("qwen3-vl-2b")
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
    assert sum(1 for path, _ in hub.requests if "/resolve/" in path) == 1  # fetched once


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
