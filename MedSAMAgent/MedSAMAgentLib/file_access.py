"""Which files reading an input touches, and the gate that decides whether they may be read.

One mechanism for every input the engine opens (images, volumes, masks, DICOM series):
:func:`files_read_for` lists every file a read will open -- the file itself and any data
file its header names (NRRD ``data file:``, MetaImage ``ElementDataFile``, the ``.img`` of a
detached NIfTI pair), keyed on the reader SimpleITK will actually pick for it, not on the
name's ending -- and a :class:`FileGate` checks each before anything is read.  The worker
gates every client read with one (its ``--allow-dir`` folders, or, for an upload, the
uploaded file alone); the command line reads the user's own files and has none.

Paths given by a client are parsed with :func:`parse_user_path`: a NUL byte, an unknown
``~user`` or an over-long path is a mistake said in one sentence, never an exception.
"""
from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path

from .errors import InputError

MAX_PATH_CHARS = 4096
HEADER_SCAN_BYTES = 1 << 20  # a header is read this far looking for its data file (MetaImage ends with it)

# the readers an input may be read with, and which of them can name another file
IMAGE_READERS = ("PNGImageIO", "JPEGImageIO", "BMPImageIO", "TIFFImageIO", "NiftiImageIO", "NrrdImageIO",
                 "MetaImageIO", "GDCMImageIO")


class AccessDenied(InputError):
    """A file the gate may not let be read. ``status``: the HTTP status the worker answers with."""

    status = 403


class NotFound(InputError):
    status = 404


def parse_user_path(text, what: str = "path") -> Path:
    """A path typed by a person or sent by a client, ``~`` expanded; InputError (status 400) for
    one that cannot name a file: not text, empty, a NUL byte, an unknown ``~user``, too long."""
    if not isinstance(text, (str, os.PathLike)):
        raise InputError(f"The {what} must be text, not {type(text).__name__}.")
    text = os.fspath(text)
    if isinstance(text, bytes):
        raise InputError(f"The {what} must be text.")
    if not text.strip():
        raise InputError(f"The {what} is empty; give the file's path.")
    if "\x00" in text:
        raise InputError(f"The {what} holds a NUL character, which no file name can; check how it was made.")
    if len(text) > MAX_PATH_CHARS:
        raise InputError(f"The {what} is {len(text)} characters long, more than any file name this program opens "
                         f"({MAX_PATH_CHARS}).")
    try:
        return Path(text).expanduser()
    except RuntimeError:  # ~nosuchuser
        user = text[1:].split("/", 1)[0].split(os.sep, 1)[0]
        raise InputError(f"The {what} {text} starts with ~{user}, but there is no user '{user}' on this machine; "
                         f"give the full path.") from None


def require_regular_file(path: Path, what: str) -> None:
    """InputError unless ``path`` is a regular file (a FIFO or a device would block or never end)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        raise InputError(f"{what} cannot be read (no such file, or no permission).") from None
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise InputError(f"{what} is {kind}, not a file; give an image file (or a DICOM folder).")


def reader_for(path: Path) -> str:
    """The name of the ImageIO SimpleITK will read ``path`` with ("" if none can)."""
    import SimpleITK as sitk

    try:
        return sitk.ImageFileReader.GetImageIOFromFileName(str(path)) or ""
    except RuntimeError:
        return ""


class DataFiles:
    """What a header says of its voxel data. ``files``: the other files it names (resolved against the
    header's folder, links not yet followed); ``spread``: True when it names a list or a numbered
    pattern of files, which is refused rather than expanded."""

    def __init__(self, files: list | None = None, spread: bool = False):
        self.files, self.spread = files or [], spread


def _header_lines(path: Path, separator: str):
    """(key lower-cased, value) of a text header's lines, up to :data:`HEADER_SCAN_BYTES`.  NRRD's header
    ends at its first blank line; MetaImage's at ElementDataFile (said by the caller)."""
    with open(path, "rb") as fh:
        text = fh.read(HEADER_SCAN_BYTES).decode("latin-1")
    for line in text.splitlines():
        if separator == ":" and not line.strip():
            return  # the end of a NRRD header: the data follow
        key, sep, value = line.partition(separator)
        if sep:
            yield key.strip().lower(), value.strip()


def _nrrd_data(path: Path) -> DataFiles:
    for key, value in _header_lines(path, ":"):
        if key in ("data file", "datafile"):
            if value.upper().startswith("LIST") or len(value.split()) > 1 and "%" in value:
                return DataFiles(spread=True)
            return DataFiles([path.parent / value]) if value else DataFiles(spread=True)
    return DataFiles()


def _meta_data(path: Path) -> DataFiles:
    for key, value in _header_lines(path, "="):
        if key == "elementdatafile":
            if value.upper() == "LOCAL":
                return DataFiles()
            if value.upper().startswith("LIST") or "%" in value or not value:
                return DataFiles(spread=True)
            return DataFiles([path.parent / value])
    return DataFiles()


def _nifti_magic(path: Path) -> bytes:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            head = fh.read(540)
    except (OSError, EOFError):
        return b""
    return head[344:348] if len(head) >= 348 and head[344:346] in (b"n+", b"ni") else head[4:8]


def _nifti_data(path: Path) -> DataFiles:
    """A NIfTI header whose magic says its voxels are in a separate ``.img`` (a detached pair, "ni1"
    or "ni2"), or an Analyze/NIfTI ``.hdr``/``.img`` name: every name the NIfTI library tries."""
    name = path.name
    lower = name.lower()
    for ending in (".nii.gz", ".nii", ".hdr.gz", ".hdr", ".img.gz", ".img"):
        if lower.endswith(ending):
            stem = name[: len(name) - len(ending)]
            break
    else:
        return DataFiles()
    paired = lower.endswith((".hdr", ".hdr.gz", ".img", ".img.gz")) or _nifti_magic(path)[:3] in (b"ni1", b"ni2")
    if not paired:
        return DataFiles()
    names = [stem + e for e in (".img", ".IMG", ".img.gz", ".IMG.gz", ".hdr", ".HDR", ".hdr.gz", ".HDR.gz")]
    return DataFiles([path.parent / n for n in names if n != name])


def data_files_named_by(path: Path, reader: str | None = None) -> DataFiles:
    """The other files reading ``path`` opens, by the reader that will read it."""
    reader = reader_for(path) if reader is None else reader
    if reader == "NrrdImageIO":
        return _nrrd_data(path)
    if reader == "MetaImageIO":
        return _meta_data(path)
    if reader == "NiftiImageIO":
        return _nifti_data(path)
    return DataFiles()


class FileGate:
    """Decides which files may be read for a client: those that lie inside one of ``roots`` once
    links are followed, or -- ``only`` -- that one file alone (an upload, whose header may name no
    other file).  Answers the same for a file that exists and one that does not (no probing)."""

    def __init__(self, roots=(), only: Path | None = None, shown_as: str | None = None):
        self.roots = [Path(os.path.realpath(Path(r).expanduser())) for r in roots]
        self.only = None if only is None else Path(os.path.realpath(only))
        self.shown_as = shown_as  # how an upload is named in messages (the client's file name)

    def allows(self, real: Path) -> bool:
        """Whether the file at ``real`` (links already resolved) may be read."""
        if self.only is not None:
            return real == self.only
        return any(real == root or root in real.parents for root in self.roots)

    def check(self, path, named_by: Path | None = None) -> Path:
        """``path`` with links resolved, if it may be read; AccessDenied otherwise, NotFound for an
        allowed path that does not exist.  ``named_by``: the header that names ``path``."""
        path = parse_user_path(path) if not isinstance(path, Path) else path
        real = Path(os.path.realpath(path))
        if not self.allows(real):
            if self.only is not None:
                shown = self.shown_as or self.only.name
                raise AccessDenied(f"The uploaded {shown} names another file for its data ({path.name}); an upload "
                                   f"must hold its own voxels: save it as one NRRD, NIfTI or MHA file.")
            if named_by is not None:
                raise AccessDenied(f"{named_by.name} names its data file {path}, which is outside the folders this "
                                   f"worker may read; keep the data beside its header in an allowed folder.")
            raise AccessDenied(f"{path} is outside the folders this worker may read; upload the file instead, or "
                               f"start the worker with --allow-dir.")
        if not real.exists() and named_by is None:
            raise NotFound(f"No such file or folder on the worker: {path}")
        return real


def files_read_for(path: Path, gate: FileGate | None = None) -> list[Path]:
    """Every file reading the image file ``path`` opens: itself first, then its header's data files
    that exist.  With ``gate``, each is checked (AccessDenied) before its contents are looked at;
    a header that spreads its data over a list or pattern of files is refused under a gate."""
    path = Path(path)
    if gate is not None:
        path = gate.check(path)
    reader = reader_for(path)
    if gate is not None and reader and reader not in IMAGE_READERS:
        raise AccessDenied(f"{path.name} would be read as {reader.replace('ImageIO', '')}, which this worker does "
                           f"not open; send NRRD, NIfTI, MHA, DICOM or a 2D picture.")
    data = data_files_named_by(path, reader)
    if data.spread and gate is not None:
        raise AccessDenied(f"{path.name} spreads its data over several files; save the volume as one NRRD, NIfTI "
                           f"or MHA file to open it here.")
    files = [path]
    for f in data.files:
        if gate is not None:
            gate.check(f, named_by=path)  # said whether or not the named file exists
        if os.path.lexists(f):
            files.append(f)
    return files


def dicom_folder_entries(folder: Path, gate: FileGate | None = None) -> None:
    """Checks the files a DICOM folder scan opens (every entry of the folder): each link must stay
    inside the gate, and no entry may be a FIFO, device or socket (reading one would block)."""
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise InputError(f"Cannot list the folder {folder} ({exc.strerror}).") from None
    for entry in entries:
        full = Path(entry.path)
        if gate is not None and entry.is_symlink() and not gate.allows(Path(os.path.realpath(full))):
            raise AccessDenied(f"The folder {folder.name} holds {entry.name}, a link to a file outside the folders "
                               f"this worker may read; remove the link or copy the file in.")
        try:
            mode = os.stat(full).st_mode
        except OSError:
            continue  # a dangling link: nothing to read
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise InputError(f"The folder {folder} holds {entry.name}, which is not a file (a FIFO, device or "
                             f"socket); move it away to read the series.")
