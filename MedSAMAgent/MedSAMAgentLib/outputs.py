"""Checks on where results go, made before any work starts (a long run must not end on a bad path).

Every check raises :class:`~.image_io.InputError` with one sentence saying what is
wrong and what to do.
"""
from __future__ import annotations

import os
from pathlib import Path

from .file_access import parse_user_path
from .image_io import InputError


def _same_file(a: Path, b: Path) -> bool:
    """The same file (links followed), or the same place for files not written yet."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _inside(what: str) -> str:
    """``what`` inside a sentence ("The mask" -> "the mask"; "--overlays" stays)."""
    return what[:1].lower() + what[1:] if what[:1].isupper() and what[1:2].islower() else what


def _first_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path(".")


def check_output_file(path: str | Path, what: str, inputs: dict | None = None) -> Path:
    """``path`` may be written as ``what`` (e.g. "the mask"): not a folder, its folder exists (or can be
    made) and is writable, and it is none of ``inputs`` ({option: path}: files this run reads)."""
    p = parse_user_path(path, f"path of {_inside(what)}")
    if p.is_dir():
        raise InputError(f"{what} {p} is a folder; give a file name.")
    for option, source in (inputs or {}).items():
        if source and _same_file(p, Path(source).expanduser()):
            raise InputError(f"{what} {p} is the {option} file: writing there would destroy it; choose another name.")
    base = _first_existing(p.parent)
    if not base.is_dir():
        raise InputError(f"Cannot write {_inside(what)} {p}: {base} is a file, not a folder.")
    if not os.access(base, os.W_OK):
        from .durable import reason_for

        raise InputError(f"Cannot write {_inside(what)} {p}: {reason_for(base)}.")
    return p


def partial_path(path: str | Path) -> Path:
    """Where the finished part of an interrupted run goes: ``liver.nii.gz`` -> ``liver.partial.nii.gz``."""
    p = Path(path)
    name = p.name
    suffix = ".nii.gz" if name.lower().endswith(".nii.gz") else p.suffix
    stem = name[: len(name) - len(suffix)] if suffix else name
    return p.with_name(f"{stem}.partial{suffix}")


def check_output_folder(path: str | Path, what: str) -> Path:
    """``path`` may hold ``what`` (e.g. "the evaluation"): a folder or nothing yet, in a writable place."""
    p = parse_user_path(path, f"folder for {_inside(what)}")
    if p.exists() and not p.is_dir():
        raise InputError(f"{what} needs a folder, but {p} is a file; choose another folder.")
    base = _first_existing(p)
    if not base.is_dir():
        raise InputError(f"Cannot make the folder {p} for {_inside(what)}: {base} is a file.")
    if not os.access(base, os.W_OK):
        raise InputError(f"Cannot write {_inside(what)} into {base} (no permission); choose another place.")
    return p


def make_folder(path: Path, what: str) -> Path:
    """Creates ``path`` (and its parents), saying in one sentence why when it cannot."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"Cannot make the folder {path} for {what} ({exc.strerror}); choose another place.") from None
    return path


def _overlaps(a: Path, b: Path) -> bool:
    """The same place, or one inside the other (a file named inside a folder output)."""
    a, b = Path(os.path.abspath(a)), Path(os.path.abspath(b))
    return _same_file(a, b) or a in b.parents or b in a.parents


def check_distinct_outputs(outputs: dict, partial: dict | None = None) -> None:
    """Refuses, before any work, outputs that would overwrite each other: ``outputs`` is {option: path
    or None} (files and folders alike, e.g. ``-o X --overlays X``); ``partial``: where the same
    options write an interrupted run's part, which must not land on another output either."""
    given = [(option, Path(p).expanduser()) for option, p in outputs.items() if p]
    given += [(f"{option} (its .partial file)", Path(p).expanduser()) for option, p in (partial or {}).items() if p]
    for i, (first, a) in enumerate(given):
        for second, b in given[i + 1:]:
            if first.split()[0] != second.split()[0] and _overlaps(a, b):
                raise InputError(f"{first} {a} and {second} {b} would write over each other; give each output its "
                                 f"own name and place.")
