"""The model catalogue, the user-level model cache and resumable downloads.

* Catalogue: ``models.json`` beside this file (policies and tools, with sizes,
  memory and licences).
* Cache: ``$MEDSAM_AGENT_HOME/models`` if set, else the user cache folder
  (``$XDG_CACHE_HOME`` or ``~/.cache`` on Linux/macOS, ``%LOCALAPPDATA%`` on
  Windows) ``/medsam-agent/models``.  No version in the path, so every version of
  the package and every Slicer version share it.  Each model lives in
  ``<cache>/<name>/`` with the repository's own file layout, and a
  ``.complete.json`` once every file is verified.
* Downloads: from ``$MEDSAM_AGENT_HF_ENDPOINT`` or ``$HF_ENDPOINT`` (default
  https://huggingface.co), through the proxy in ``HTTPS_PROXY``/``HTTP_PROXY``
  if set (urllib's standard handling), with ``HF_TOKEN`` for gated repositories.
  Each file is fetched to ``<file>.part`` and resumed with an HTTP Range request
  after an interruption; its size is checked against the listing (or
  Content-Length) and its SHA-256 against the hub's LFS hash where the hub gives one.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

CATALOGUE_FILE = Path(__file__).resolve().parent / "models.json"
DEFAULT_ENDPOINT = "https://huggingface.co"
CHUNK = 1 << 20


class ModelError(RuntimeError):
    """A model that is unknown, missing or could not be downloaded; the message says what to do."""


@dataclass
class RemoteFile:
    path: str  # inside the repository
    size: int | None = None
    sha256: str | None = None


@dataclass
class ModelEntry:
    name: str
    kind: str  # "policy" or "tool"
    repo: str
    description: str = ""
    files: list = field(default_factory=list)
    checkpoint: str | None = None
    config: str | None = None
    size_gb: float = 0.0
    memory_gb: float = 0.0
    memory_gb_4bit: float | None = None
    params_b: float | None = None
    license: str = ""
    profile: str | None = None  # the conversation profile a policy runs under by default
    profile_why: str = ""  # why that one
    tool: str | None = None


def catalogue() -> dict[str, ModelEntry]:
    data = json.loads(CATALOGUE_FILE.read_text(encoding="utf-8"))["models"]
    known = set(ModelEntry.__dataclass_fields__)
    return {name: ModelEntry(name=name, **{k: v for k, v in d.items() if k in known}) for name, d in data.items()}


def get_entry(name: str) -> ModelEntry:
    cat = catalogue()
    if name not in cat:
        raise ModelError(f"Unknown model '{name}'. Known models: {', '.join(cat)} (see 'medsam-agent models list').")
    return cat[name]


def cache_dir() -> Path:
    """The user-level model cache (created on demand)."""
    home = os.environ.get("MEDSAM_AGENT_HOME")
    if home:
        return Path(home).expanduser() / "models"
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "medsam-agent" / "models"


def model_dir(name: str) -> Path:
    return cache_dir() / name


def endpoint() -> str:
    return (os.environ.get("MEDSAM_AGENT_HF_ENDPOINT") or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def is_complete(name: str) -> bool:
    return (model_dir(name) / ".complete.json").is_file()


def local_path(name: str) -> Path:
    """Where a downloaded model is: its folder (policies) or checkpoint file (tools).

    Raises ModelError saying how to get it when it is not (completely) there.
    """
    entry = get_entry(name)
    folder = model_dir(name)
    if not is_complete(name):
        raise ModelError(f"Model '{name}' is not downloaded. Run 'medsam-agent models download {name}' "
                         f"({entry.size_gb:g} GB; segment, eval and serve also take --download), or put its files "
                         f"in {folder} by hand: "
                         f"{manual_instructions(entry)}")
    return folder / entry.checkpoint if entry.checkpoint else folder


def manual_instructions(entry: ModelEntry) -> str:
    base = f"{DEFAULT_ENDPOINT}/{entry.repo}"
    folder = model_dir(entry.name)
    if entry.files:
        listing = "; ".join(f"{base}/resolve/main/{f} -> {folder / f}" for f in entry.files)
    else:
        listing = (f"every file of {base} (config.json, the *.safetensors shards and their index, the tokenizer, "
                   f"chat-template and preprocessor files) -> {folder}/")
    return f"{listing}; then create an empty file {folder / '.complete.json'}."


class _TokenStaysHome(urllib.request.HTTPRedirectHandler):
    """Follows redirects, but sends the hub token on only to the same scheme and host (the hub
    redirects file downloads to other hosts: a CDN must not receive the token)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            before, after = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
            if (before.scheme, before.netloc) != (after.scheme, after.netloc):
                new.remove_header("Authorization")
        return new


def _request(url: str, headers: dict | None = None):
    req = urllib.request.Request(url, headers=dict(headers or {}))
    token = os.environ.get("HF_TOKEN")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    req.add_header("User-Agent", "medsam-agent")
    return urllib.request.build_opener(_TokenStaysHome).open(req, timeout=60)


def _unreachable(entry: ModelEntry, exc: Exception) -> ModelError:
    reason = getattr(exc, "reason", exc)
    return ModelError(f"Cannot download '{entry.name}' from {endpoint()} ({reason}). If this machine is offline or "
                      f"behind a proxy, set HTTPS_PROXY, or copy the files by hand: {manual_instructions(entry)}")


def list_files(entry: ModelEntry) -> list[RemoteFile]:
    """The files to fetch, with sizes and SHA-256 where the hub's tree listing gives them."""
    url = f"{endpoint()}/api/models/{entry.repo}/tree/main?recursive=true"
    try:
        with _request(url) as resp:
            tree = json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        if entry.files:  # a tool's files are known: go on without sizes and hashes
            return [RemoteFile(f) for f in entry.files]
        raise ModelError(f"The hub refused to list {entry.repo} (HTTP {exc.code}). Gated model? Set HF_TOKEN.") from None
    except (urllib.error.URLError, OSError) as exc:
        raise _unreachable(entry, exc) from None
    found = {}
    for item in tree:
        if item.get("type") != "file":
            continue
        lfs = item.get("lfs") or {}
        found[item["path"]] = RemoteFile(item["path"], item.get("size"), lfs.get("oid") or lfs.get("sha256"))
    if entry.files:
        return [found.get(f, RemoteFile(f)) for f in entry.files]
    return [f for p, f in sorted(found.items()) if not p.startswith(".") and p != "README.md"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download_file(url: str, dest: Path, size: int | None = None, sha256: str | None = None,
                  progress: Callable[[int, int | None], None] | None = None) -> Path:
    """Fetch ``url`` to ``dest``, resuming ``dest.part``; check size and hash; return ``dest``.

    ``progress(done_bytes, total_bytes)`` is called as data arrives.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    if size is None or have < size:
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            resp = _request(url, headers)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and size is not None and have == size:  # already whole
                resp = None
            else:
                raise
        if resp is not None:
            with resp:
                if have and resp.status != 206:  # the server ignored the range: start over
                    have = 0
                length = resp.headers.get("Content-Length")
                total = have + int(length) if length is not None else size
                if size is None:
                    size = total
                with open(part, "ab" if have else "wb") as out:
                    done = have
                    if progress:
                        progress(done, total)
                    while True:
                        block = resp.read(CHUNK)
                        if not block:
                            break
                        out.write(block)
                        done += len(block)
                        if progress:
                            progress(done, total)
    got = part.stat().st_size
    if size is None:  # no listing size and no Content-Length: a short read could not be told from a whole file
        raise ModelError(f"The server did not say how large {dest.name} is, so a cut-off download cannot be told "
                         f"from a whole one; download it by hand or through another mirror.")
    if size is not None and got != size:
        raise ModelError(f"Download of {dest.name} stopped at {got} of {size} bytes; run the same command again to resume.")
    if sha256 and _sha256(part) != sha256:
        part.unlink()
        raise ModelError(f"{dest.name} is corrupt (SHA-256 mismatch); it was removed, run the command again.")
    part.replace(dest)
    return dest


def download(name: str, progress_factory: Callable[[str, int | None], object] | None = None) -> Path:
    """Download catalogue model ``name`` into the cache (resuming); returns :func:`local_path`.

    ``progress_factory(filename, total)`` may return an object with ``update(n)``
    and ``close()`` (a tqdm bar, for example).
    """
    entry = get_entry(name)
    folder = model_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder / ".lock"):  # two downloads of one model take turns (never two writers on a file)
        if is_complete(name):  # the other one finished it meanwhile
            return local_path(name)
        return _download(entry, folder, progress_factory)


@contextlib.contextmanager
def _exclusive(path: Path):
    """An exclusive lock on ``path`` across processes, held for the block (waits for another holder)."""
    with open(path, "a+b") as fh:
        if os.name == "nt":
            import msvcrt

            fh.seek(0)
            while True:
                try:
                    msvcrt.locking(fh.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:  # LK_LOCK gives up after 10 s: keep waiting
                    continue
        else:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if os.name == "nt":
                fh.seek(0)
                msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
            else:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _download(entry: ModelEntry, folder: Path, progress_factory) -> Path:
    files = list_files(entry)
    if not files:
        raise ModelError(f"The hub lists no files for {entry.repo}; check the mirror ({endpoint()}), or copy the "
                         f"files by hand: {manual_instructions(entry)}")
    root = folder.resolve()
    done = []
    for f in files:
        dest = folder / f.path
        if Path(f.path).is_absolute() or not dest.resolve().is_relative_to(root):
            raise ModelError(f"The hub listed a file outside the model's folder ({f.path!r}); not downloading it. "
                             f"Check the mirror ({endpoint()}).")
        if dest.is_file() and (f.size is None or dest.stat().st_size == f.size):
            done.append(f.path)
            continue
        url = f"{endpoint()}/{entry.repo}/resolve/main/{urllib.parse.quote(f.path)}"
        bar, last = None, [0]

        def report(n, total, _f=f):
            nonlocal bar
            if progress_factory and bar is None:
                bar = progress_factory(_f.path, total)
                if n:
                    bar.update(n)
                last[0] = n
            elif bar is not None:
                bar.update(n - last[0])
                last[0] = n

        try:
            download_file(url, dest, f.size, f.sha256, report)
        except urllib.error.HTTPError as exc:
            raise ModelError(f"The hub answered HTTP {exc.code} for {f.path} of {entry.repo}. "
                             f"{'Gated model? Set HF_TOKEN. ' if exc.code in (401, 403) else ''}"
                             f"Or copy the files by hand: {manual_instructions(entry)}") from None
        except (http.client.HTTPException, ConnectionError, TimeoutError) as exc:
            raise ModelError(f"The download of {f.path} was interrupted ({type(exc).__name__}); run the same command "
                             f"again to resume where it stopped.") from None
        except (urllib.error.URLError, OSError) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, urllib.error.URLError) and exc.errno == 28:
                raise ModelError(f"The disk is full while writing {dest}; free space and run again (it resumes).") from None
            raise _unreachable(entry, exc) from None
        finally:
            if bar is not None:
                bar.close()
        done.append(f.path)
    from .durable import write_json

    write_json(folder / ".complete.json", {"repo": entry.repo, "files": done}, "the download's completeness marker")
    return local_path(entry.name)
