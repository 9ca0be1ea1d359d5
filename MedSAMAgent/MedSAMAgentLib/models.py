"""The model catalogue, the user-level model cache and downloads through ``huggingface_hub``.

* Catalogue: ``models.json`` beside this file (policies and tools, with sizes,
  memory and licences).
* Cache: ``$MEDSAM_AGENT_HOME/models`` if set, else the user cache folder
  (``$XDG_CACHE_HOME`` or ``~/.cache`` on Linux/macOS, ``%LOCALAPPDATA%`` on
  Windows) ``/medsam-agent/models``.  No version in the path, so every version of
  the package and every Slicer version share it.  Each model lives in
  ``<cache>/<name>/`` with the repository's own file layout, and a
  ``.complete.json`` once every file is verified.
* Downloads: ``huggingface_hub`` (its tree listing, then ``hf_hub_download`` per
  file into the model's folder as ``local_dir``) from ``$MEDSAM_AGENT_HF_ENDPOINT``
  or ``$HF_ENDPOINT`` (default https://huggingface.co).  It brings the proxies
  (``HTTPS_PROXY``), ``HF_TOKEN`` (kept from CDN hosts), redirects, Xet-backed
  repositories, retries, and resuming a cut-off transfer with a Range request.
  On top: the catalogue's file list as the allow-list, files that would land
  outside the folder refused, each file's SHA-256 checked against the hub's LFS
  hash, one download per model at a time (a file lock), progress through the
  caller's bar factory (whose ``update`` may raise to cancel), and messages that
  say what to do.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

CATALOGUE_FILE = Path(__file__).resolve().parent / "models.json"
DEFAULT_ENDPOINT = "https://huggingface.co"
SKIPPED = [".*", "*/.*", "README.md"]  # never fetched for a whole-repository model


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


def _network_errors() -> tuple[type[BaseException], ...]:
    """The HTTP library's transport errors (connect, timeout, cut-off body, proxy), whichever one
    ``huggingface_hub`` is built on."""
    for name in ("httpx2", "httpx"):
        try:
            return (importlib.import_module(name).TransportError,)
        except (ImportError, AttributeError):
            continue
    return ()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _unreachable(entry: ModelEntry, exc: BaseException) -> ModelError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ModelError(f"Cannot download '{entry.name}' from {endpoint()} ({reason}). If this machine is offline or "
                      f"behind a proxy, set HTTPS_PROXY, or copy the files by hand: {manual_instructions(entry)}")


def _refused(entry: ModelEntry, exc: BaseException, what: str) -> ModelError:
    """A ModelError for the hub's HTTP errors (gated, missing, server trouble)."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, GatedRepoError) or status in (401, 403):
        advice = "The repository is gated or private: accept its licence on the hub and set HF_TOKEN. "
    elif isinstance(exc, RepositoryNotFoundError):
        advice = f"The hub at {endpoint()} has no repository {entry.repo} (check the mirror, or set HF_TOKEN). "
    elif isinstance(exc, HfHubHTTPError):
        advice = ""
    else:
        return _unreachable(entry, exc)
    return ModelError(f"The hub answered HTTP {status} for {what} of {entry.repo}. {advice}"
                      f"Or copy the files by hand: {manual_instructions(entry)}")


def list_files(entry: ModelEntry) -> list[RemoteFile]:
    """The files to fetch, with sizes and SHA-256 where the hub's tree listing gives them (LFS files)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import filter_repo_objects

    try:
        tree = [f for f in HfApi(endpoint=endpoint(), library_name="medsam-agent")
                .list_repo_tree(entry.repo, recursive=True) if isinstance(f, RepoFile)]
    except HfHubHTTPError as exc:
        raise _refused(entry, exc, "the file listing") from None
    except _network_errors() + (OSError,) as exc:
        raise _unreachable(entry, exc) from None
    found = {f.path: RemoteFile(f.path, f.size, f.lfs.sha256 if f.lfs else None) for f in tree}
    root = model_dir(entry.name).resolve()
    for path in found:
        if Path(path).is_absolute() or not (root / path).resolve().is_relative_to(root):
            raise ModelError(f"The hub listed a file outside the model's folder ({path!r}); not downloading it. "
                             f"Check the mirror ({endpoint()}).")
    if entry.files:
        missing = [f for f in entry.files if f not in found]
        if missing:
            raise ModelError(f"The hub's {entry.repo} at {endpoint()} has no {', '.join(missing)}; check the mirror, "
                             f"or copy the files by hand: {manual_instructions(entry)}")
        return [found[f] for f in entry.files]
    keep = filter_repo_objects(sorted(found), ignore_patterns=SKIPPED)
    return [found[p] for p in keep]


def download(name: str, progress_factory: Callable[[str, int | None], object] | None = None) -> Path:
    """Download catalogue model ``name`` into the cache; returns :func:`local_path`.

    ``progress_factory(filename, total_bytes)`` may return an object with ``update(n_bytes)``
    and ``close()`` (a tqdm bar, for example); an exception raised by ``update`` stops the
    download (the Slicer dialog's Cancel).
    """
    entry = get_entry(name)
    folder = model_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(folder / ".lock"), _library_quiet():  # two downloads of one model take turns, across processes
        if is_complete(name):  # the other one finished it meanwhile
            return local_path(name)
        return _download(entry, folder, progress_factory)


@contextlib.contextmanager
def _library_quiet():
    """``huggingface_hub`` logs each retry to stderr; the bars and our one message say it for the user."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _bar_class(path: str, progress_factory):
    """A tqdm-shaped class for ``huggingface_hub`` that reports to ``progress_factory(path, total)``."""

    class Bar:
        def __init__(self, *args, total=None, initial=0, **kwargs):
            self._bar = progress_factory(path, total) if progress_factory else None
            if initial:
                self.update(initial)

        def update(self, n=1):
            if self._bar is not None:
                self._bar.update(n)

        def close(self):
            if self._bar is not None:
                self._bar.close()
                self._bar = None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

    return Bar


def _sha256(path: Path) -> str:
    from huggingface_hub.utils.sha import sha_fileobj

    with open(path, "rb") as fh:
        return sha_fileobj(fh).hex()


def _download(entry: ModelEntry, folder: Path, progress_factory) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    if _offline():
        raise ModelError(f"HF_HUB_OFFLINE is set, so '{entry.name}' is not downloaded. Unset it, or copy the files "
                         f"by hand: {manual_instructions(entry)}")
    files = list_files(entry)
    if not files:
        raise ModelError(f"The hub lists no files for {entry.repo}; check the mirror ({endpoint()}), or copy the "
                         f"files by hand: {manual_instructions(entry)}")
    for f in files:
        try:
            path = Path(hf_hub_download(entry.repo, f.path, local_dir=folder, endpoint=endpoint(),
                                        library_name="medsam-agent", tqdm_class=_bar_class(f.path, progress_factory)))
        except (OfflineModeIsEnabled, LocalEntryNotFoundError) as exc:
            raise _unreachable(entry, exc) from None
        except HfHubHTTPError as exc:
            raise _refused(entry, exc, f.path) from None
        except _network_errors() as exc:
            raise ModelError(f"The download of {f.path} was cut off ({type(exc).__name__}) after the hub's retries; "
                             f"run the same command again (finished files are kept).") from None
        except OSError as exc:
            if exc.errno == 28:
                raise ModelError(f"The disk is full while writing {folder / f.path}; free space and run again "
                                 f"(finished files are kept).") from None
            if "Consistency check failed" in str(exc):
                raise ModelError(f"The download of {f.path} stopped short of its size; run the same command again "
                                 f"(finished files are kept).") from None
            raise _unreachable(entry, exc) from None
        if f.sha256 and _sha256(path) != f.sha256:
            path.unlink(missing_ok=True)
            (folder / ".cache" / "huggingface" / "download" / f"{f.path}.metadata").unlink(missing_ok=True)
            raise ModelError(f"{f.path} is corrupt (its SHA-256 is not the hub's); it was removed, run the command "
                             f"again.")
    from .durable import write_json

    write_json(folder / ".complete.json", {"repo": entry.repo, "files": [f.path for f in files]},
               "the download's completeness marker")
    return local_path(entry.name)
