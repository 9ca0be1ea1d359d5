"""Writing outputs so that a file under its final name is always whole.

Every output the engine and the training package write (masks, trajectories, overlays, eval
records and reports, synthesis shards, exported datasets, our checkpoints' own files) goes
through :func:`atomic_output`: written to a temporary file in the target folder, flushed and
synced, checked (it reads back whole: a library that writes a cut-off ``.nii.gz`` on a full
disk without a word is caught here), then renamed over the final name and the folder synced.
A failure -- a full disk, a quota, a read-only or vanished folder -- raises
:class:`OutputError` with one sentence naming the file and what to do, and leaves the final
name as it was (an earlier file survives; no truncated file appears).

Line-by-line logs that a resumed run reads back (``records.jsonl``, ``episodes.jsonl``) are
appended with :class:`DurableAppender`: each line synced, a line that cannot be written whole
is cut off again, so the file never ends in half a record.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import InputError

_REASONS = {
    errno.ENOSPC: "the disk is full (no space left on device); free some space or choose another place",
    errno.EDQUOT: "your disk quota is used up; free some space or choose another place",
    errno.EROFS: "the folder is on a read-only file system; choose another place",
    errno.EACCES: "no permission to write there; choose another place",
    errno.EPERM: "the system does not allow writing there; choose another place",
    errno.ENOENT: "its folder no longer exists; make it again or choose another place",
    errno.ENOTDIR: "part of the path is a file, not a folder; choose another place",
    errno.EISDIR: "a folder has that name; choose another file name",
    errno.EIO: "the disk reported an input/output error; check the disk and try again",
    errno.ENAMETOOLONG: "the name is too long for the file system; choose a shorter one",
}


def _file_mode() -> int:
    """The mode a plain ``open()`` would give a new file (0o666 less the umask): the temporary file
    is made private by ``mkstemp`` and must not pass that on to the output."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()


class OutputError(InputError):
    """An output could not be written whole; nothing was left under its final name."""


def _ending(name: str) -> str:
    lower = name.lower()
    for double in (".nii.gz", ".tar.gz", ".jsonl.gz"):
        if lower.endswith(double):
            return name[-len(double):]
    return Path(name).suffix


def reason_for(folder: Path, exc: BaseException | None = None) -> str:
    """Why writing into ``folder`` failed, in words, from the OS error or, for a library's error
    (SimpleITK says only "cannot write"), from the folder's state."""
    if isinstance(exc, OSError) and exc.errno in _REASONS:
        return _REASONS[exc.errno]
    if not folder.is_dir():
        return _REASONS[errno.ENOENT]
    if not os.access(folder, os.W_OK):
        try:
            read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
        except (OSError, AttributeError):
            read_only = False
        return _REASONS[errno.EROFS] if read_only else "no permission to write in that folder; choose another place"
    try:
        if shutil.disk_usage(folder).free < (1 << 20):
            return _REASONS[errno.ENOSPC]
    except OSError:
        pass
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}; check the place and its free space"
    if exc is not None and str(exc).strip():
        return f"{str(exc).strip().splitlines()[-1][:160]}; check the place and its free space"
    return "the file did not read back whole (is the disk full?); check the place and its free space"


def _sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # Windows opens no folders: its rename is durable enough
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the file itself is synced
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | Path, what: str, verify: Callable[[Path], bool] | None = None,
                  make_folder: bool = True, detached: bool = False) -> Iterator[Path]:
    """Yields a temporary path (same folder, same ending) to write ``what`` (e.g. "the mask") to;
    after the block it is synced, ``verify(tmp)`` must be true, and it replaces ``path``.

    ``make_folder``: create a missing folder (else a vanished folder is an error).
    ``detached``: the writer makes files beside the one it is given (a ``.nhdr`` header's ``.raw.gz``,
    named inside the header): all are written in a temporary folder under their final names, and
    the others are moved into place before the named file."""
    path = Path(path)
    folder = path.parent
    if make_folder:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"Cannot write {what} {path}: {reason_for(folder, exc)}.") from None
    elif not folder.is_dir():
        raise OutputError(f"Cannot write {what} {path}: {_REASONS[errno.ENOENT]}.")
    try:
        if detached:
            tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=folder))
            tmp = tmp_dir / path.name
        else:
            tmp_dir = None
            fd, name = tempfile.mkstemp(prefix=f".{path.name[:80]}.", suffix=".tmp" + _ending(path.name), dir=folder)
            os.close(fd)
            tmp = Path(name)
            with contextlib.suppress(OSError):
                os.chmod(tmp, FILE_MODE)
    except OSError as exc:
        raise OutputError(f"Cannot write {what} {path}: {reason_for(folder, exc)}.") from None
    written = [tmp]
    try:
        try:
            yield tmp
            if tmp_dir is not None:
                written = [p for p in tmp_dir.iterdir()]
            for p in written:
                _sync_file(p)
            if verify is not None and not verify(tmp):
                raise OutputError(f"Cannot write {what} {path}: {reason_for(folder)}.")
            for p in sorted(written, key=lambda p: p == tmp):  # the data files first, the named file last
                os.replace(p, folder / p.name if tmp_dir is not None else path)
            _sync_folder(folder)
        except OutputError:
            raise
        except (OSError, RuntimeError) as exc:  # RuntimeError: what SimpleITK raises
            raise OutputError(f"Cannot write {what} {path}: {reason_for(folder, exc)}.") from None
    finally:
        for p in written:
            with contextlib.suppress(OSError):
                p.unlink()
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


@contextlib.contextmanager
def native_stderr_held() -> Iterator[None]:
    """Holds back what native libraries print on the process's stderr (file descriptor 2) inside the
    block: a writer that fails on a full disk prints its own lines ("** ERROR: NWAD ...") before the
    one sentence :class:`OutputError` says.  Passed on if the block succeeds, dropped if it raises."""
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
        held = tempfile.TemporaryFile()
    except (OSError, ValueError, AttributeError):
        yield
        return
    os.dup2(held.fileno(), 2)
    ok = False
    try:
        yield
        ok = True
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        if ok:
            held.seek(0)
            text = held.read()
            if text:
                with contextlib.suppress(OSError):
                    os.write(2, text)
        held.close()


def write_bytes(path: str | Path, data: bytes, what: str, make_folder: bool = True) -> Path:
    """``data`` as the whole file ``path`` (atomically; read back to the byte count)."""
    with atomic_output(path, what, verify=lambda p: p.stat().st_size == len(data), make_folder=make_folder) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(path)


def write_text(path: str | Path, text: str, what: str, make_folder: bool = True) -> Path:
    return write_bytes(path, text.encode("utf-8"), what, make_folder)


def write_json(path: str | Path, data, what: str, indent: int | None = 1, make_folder: bool = True) -> Path:
    return write_text(path, json.dumps(data, indent=indent, ensure_ascii=False), what, make_folder)


class DurableAppender:
    """Appends whole lines to a log that a resumed run reads back: each :meth:`append` is flushed and
    synced; one that fails (a full disk) is cut off again, so the file ends on a whole line, and
    raises :class:`OutputError`.  A file that ended in half a line (a crash mid-write before this
    class) is cut back to its last whole line when opened."""

    def __init__(self, path: str | Path, what: str):
        self.path, self.what = Path(path), what
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
            self._trim_partial_line()
        except OSError as exc:
            raise OutputError(f"Cannot write {what} {self.path}: {reason_for(self.path.parent, exc)}.") from None

    def _trim_partial_line(self) -> None:
        size = os.fstat(self.fd).st_size
        if size == 0:
            return
        with open(self.path, "rb") as fh:
            fh.seek(max(0, size - (1 << 20)))
            tail = fh.read()
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        if cut >= 0 or size <= len(tail):
            os.ftruncate(self.fd, size - len(tail) + cut + 1)

    def append(self, line: str) -> None:
        data = (line if line.endswith("\n") else line + "\n").encode("utf-8")
        start = os.fstat(self.fd).st_size
        try:
            view = memoryview(data)
            while view:  # unbuffered: nothing is left to be written later, after a failure was handled
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, start)
            raise OutputError(f"Cannot write {self.what} {self.path}: {reason_for(self.path.parent, exc)}; the "
                              f"lines written before are kept, and a resumed run starts after them.") from None

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "DurableAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def replace_folder(staging: Path, final: Path, what: str) -> Path:
    """Puts the folder ``staging`` (written whole: a saved model) in place of ``final``: its files are
    synced, an earlier ``final`` is moved aside and removed only once the new one is in place."""
    staging, final = Path(staging), Path(final)
    try:
        for p in staging.rglob("*"):
            if p.is_file():
                _sync_file(p)
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
        _sync_folder(final.parent)
    except OSError as exc:
        raise OutputError(f"Cannot put {what} in place at {final}: {reason_for(final.parent, exc)}.") from None
    shutil.rmtree(old, ignore_errors=True)
    return final


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C inside the block waits until it ends (then raises KeyboardInterrupt): the write of a
    finished result is not cut short.  Only in the main thread, where Python takes signals."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
    if pending:
        raise KeyboardInterrupt
