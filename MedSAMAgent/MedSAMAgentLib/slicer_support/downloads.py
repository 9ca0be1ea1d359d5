"""Model downloads on a background thread, with progress the module's dialog reads on its timer.

:class:`DownloadJob` downloads catalogue models one after the other with
:func:`MedSAMAgentLib.models.download` (``huggingface_hub``: retries, a cut-off
transfer resumed, size- and hash-checked, through ``HTTPS_PROXY`` when set) into
the shared cache.  The GUI thread reads :meth:`DownloadJob.snapshot` -- never
blocks on the download -- and may :meth:`~DownloadJob.cancel`; finished files are
kept, the file being fetched starts over next time.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import models
from .background import BackgroundJob


class DownloadCancelled(Exception):
    """Raised inside the download thread when the user cancels."""


def model_summary(name: str) -> str:
    """``"medsam2 (0.16 GB, licence: Apache-2.0)"``: what the progress dialog says about a model."""
    try:
        e = models.get_entry(name)
    except models.ModelError:
        return name
    return f"{name} ({e.size_gb:g} GB, licence: {e.license})"


@dataclass(frozen=True)
class Snapshot:
    model: str | None  # the model being downloaded
    file: str | None
    done: int  # bytes of this file
    total: int | None  # bytes of this file (None: unknown)
    finished: list  # models complete so far
    running: bool
    error: str | None
    cancelled: bool

    def text(self) -> str:
        if self.error:
            return self.error
        if self.cancelled:
            return "Download cancelled; the files already fetched are kept, the rest is fetched next time."
        if not self.running:
            return "Download complete."
        mb = f"{self.done / 2**20:.0f}"
        size = f"{mb} of {self.total / 2**20:.0f} MB" if self.total else f"{mb} MB"
        return f"Downloading {model_summary(self.model)}\n{self.file or 'listing files'}: {size}"

    def percent(self) -> int | None:
        return None if not self.total else int(100 * min(self.done, self.total) / self.total)


class DownloadJob(BackgroundJob):
    thread_name = "medsam-download"

    def __init__(self, names: list[str], download=models.download):
        super().__init__()
        self.names = list(names)
        self._download = download
        self._state = dict(model=None, file=None, done=0, total=None, finished=[], error=None)

    def snapshot(self) -> Snapshot:
        with self._lock:
            s = dict(self._state)
            s["finished"] = list(s["finished"])
        return Snapshot(running=self.running, cancelled=self._cancel.is_set() and s["error"] is None
                        and len(s["finished"]) < len(self.names), **s)

    def _bar(self, filename: str, total: int | None):
        job = self

        class Bar:
            def __init__(self):
                with job._lock:
                    job._state.update(file=filename, done=0, total=total)

            def update(self, n: int) -> None:
                if job._cancel.is_set():
                    raise DownloadCancelled()
                with job._lock:
                    job._state["done"] += n

            def close(self) -> None:
                pass

        return Bar()

    def _run(self) -> None:
        for name in self.names:
            if self._cancel.is_set():
                return
            with self._lock:
                self._state.update(model=name, file=None, done=0, total=None)
            try:
                self._download(name, self._bar)
            except DownloadCancelled:
                return
            except models.ModelError as exc:
                with self._lock:
                    self._state["error"] = str(exc)
                return
            except Exception as exc:  # noqa: BLE001 - reported to the user, the thread must end cleanly
                with self._lock:
                    self._state["error"] = f"Download of {name} failed: {type(exc).__name__}: {exc}"
                return
            with self._lock:
                self._state["finished"].append(name)
