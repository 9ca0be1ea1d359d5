"""Reading a person's JSON files (manifests, profiles, replay and trajectory files, targets,
settings): one reader, so that every such file gets the same clear answers.

:func:`read_json_file` refuses, in one sentence naming the file: a missing file, a folder, a FIFO
or device, a file too large to be one of ours, text that is not UTF-8 or not JSON, and JSON nested
deeper than :data:`MAX_DEPTH` (which would otherwise end in a RecursionError, in the parser or in
the code that walks it).  What the document must hold is checked by its own reader.
"""
from __future__ import annotations

import json

from .errors import InputError
from .file_access import parse_user_path, require_regular_file

MAX_DEPTH = 64  # none of our formats nests deeper than about 8
MAX_BYTES = 1 << 30


def json_depth(data) -> int:
    """How deeply ``data`` (parsed JSON) nests lists and objects; iterative, so any depth is measured."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json_text(text: str, what: str):
    """``text`` parsed as JSON; InputError naming ``what`` (e.g. "The manifest cases.json") when it is
    not JSON or nests deeper than :data:`MAX_DEPTH`."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise InputError(f"{what} nests its JSON too deeply to be read (more than {MAX_DEPTH} levels); it is not a "
                         f"file this program wrote or documents.") from None
    except ValueError as exc:
        raise InputError(f"{what} is not valid JSON ({exc}).") from None
    if json_depth(data) > MAX_DEPTH:
        raise InputError(f"{what} nests its JSON {json_depth(data)} levels deep, more than the {MAX_DEPTH} any of "
                         f"this program's files needs; it is not one of them.")
    return data


def read_json_file(path, what: str):
    """The parsed JSON document in the file ``path``; ``what`` names it in messages ("the manifest")."""
    path = parse_user_path(path, f"path of {what}")
    label = f"{what[:1].upper()}{what[1:]} {path}"
    if path.is_dir():
        raise InputError(f"{label} is a folder; give the file.")
    if not path.exists():
        raise InputError(f"{label} does not exist.")
    require_regular_file(path, label)
    if path.stat().st_size > MAX_BYTES:
        raise InputError(f"{label} is {path.stat().st_size / 2 ** 30:.1f} GB, too large to be {what}.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{label} is not UTF-8 text; is it {what}?") from None
    except OSError as exc:
        raise InputError(f"{label} cannot be read ({exc.strerror or exc}).") from None
    return parse_json_text(text, label)
