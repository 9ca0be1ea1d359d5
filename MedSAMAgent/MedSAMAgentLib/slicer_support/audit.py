"""The audit trail: every run's actions, who made each (agent or user), and the mask after it.

An :class:`AuditLog` holds runs; a run holds entries in the order they
happened.  Agent entries come from the worker's events (an ``action`` and the
``mask`` after it), user entries from overrides (the edits and the prompt set
sent, with the mask the tool returned), from "Continue agent" and "Redo
slice".  Masks are run-length encoded (:mod:`MedSAMAgentLib.masks`) at the
slice image's resolution; slices are indices along the run's axis in the
worker's display orientation.

The Slicer module keeps the JSON in a text node, so the trail is saved with
the scene, and exports it to a file on request.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = "medsam-agent-audit"
VERSION = 1
AUTHORS = ("agent", "user")


@dataclass
class AuditEntry:
    author: str  # agent | user
    kind: str  # agent: action | stop | invalid; user: override | undo | continue | superseded (edits a run replaced)
    axis: str
    slice: int
    turn: int | None = None
    action: dict | None = None  # agent: the tool call on the 0-999 grid
    pixels: dict | None = None  # agent: the prompt in slice pixels
    edits: list | None = None  # user: what the annotator changed (see override.py)
    prompts: list | None = None  # user: the whole prompt set sent for the slice
    mask: dict | None = None  # RLE mask after this entry (None: none yet / stop)
    score: float | None = None
    time: float = field(default_factory=time.time)

    def __post_init__(self):
        if self.author not in AUTHORS:
            raise ValueError(f"author must be one of {AUTHORS}, not {self.author!r}")


@dataclass
class RunRecord:
    run: str
    target: str
    axis: str
    volume: str = ""
    settings: dict = field(default_factory=dict)  # policy, tool, device... as launched
    started: float = field(default_factory=time.time)
    finished: float | None = None
    status: str = "running"
    reason: str | None = None
    entries: list = field(default_factory=list)


class AuditLog:
    """All runs of a scene; :meth:`record_event` takes worker events, :meth:`record_override` user edits."""

    def __init__(self):
        self.runs: list[RunRecord] = []
        self._by_id: dict[str, RunRecord] = {}

    # ------------------------------------------------------------------ recording
    def start_run(self, run: str, target: str, axis: str, volume: str = "", settings: dict | None = None,
                  kind: str = "run") -> RunRecord:
        rec = RunRecord(run, target, axis, volume, dict(settings or {}, kind=kind))
        self.runs.append(rec)
        self._by_id[run] = rec
        return rec

    def run(self, run: str) -> RunRecord | None:
        return self._by_id.get(run)

    def record_event(self, event: dict) -> None:
        """A worker event of a run started with :meth:`start_run` (other runs' events are ignored)."""
        rec = self._by_id.get(event.get("run", ""))
        if rec is None:
            return
        kind = event.get("type")
        if kind == "action":
            pixels = event.get("pixels")
            name = (event.get("action") or {}).get("name")
            what = "action" if pixels else ("stop" if name == "stop_action" else "invalid")
            rec.entries.append(AuditEntry("agent", what, event.get("axis", rec.axis), int(event["slice"]),
                                          int(event.get("turn", 0)), event.get("action"), pixels))
        elif kind == "mask":
            for e in reversed(rec.entries):
                if e.author == "agent" and e.slice == int(event["slice"]) and e.turn == int(event.get("turn", -1)):
                    e.mask, e.score = event.get("mask"), event.get("score")
                    break
        elif kind in ("run_done", "client_error"):
            rec.finished = time.time()
            rec.status = event.get("status", "failed") if kind == "run_done" else "failed"
            rec.reason = event.get("reason")

    def record_override(self, run: str, axis: str, index: int, edits: list, prompts: list, mask: dict | None,
                        kind: str = "override") -> AuditEntry:
        """An annotator's override of one slice (``run``: the run whose slice it is)."""
        rec = self._by_id.get(run)
        if rec is None:
            rec = self.start_run(run, "", axis, kind="manual")
        entry = AuditEntry("user", kind, axis, int(index), edits=list(edits), prompts=list(prompts), mask=mask)
        rec.entries.append(entry)
        return entry

    # ------------------------------------------------------------------ queries
    def entries(self, author: str | None = None) -> list[AuditEntry]:
        return [e for r in self.runs for e in r.entries if author is None or e.author == author]

    def last_mask(self, axis: str, index: int) -> dict | None:
        """The newest mask recorded for a slice, agent or user."""
        for r in reversed(self.runs):
            for e in reversed(r.entries):
                if e.axis == axis and e.slice == int(index) and e.mask is not None:
                    return e.mask
        return None

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION,
                "runs": [{**{k: v for k, v in asdict(r).items() if k != "entries"},
                          "entries": [asdict(e) for e in r.entries]} for r in self.runs]}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "AuditLog":
        """Read a trail written by :meth:`to_json`; empty text gives an empty log."""
        log = cls()
        if not text or not text.strip():
            return log
        from ..errors import InputError
        from ..json_files import parse_json_text

        try:
            data = parse_json_text(text, "The audit trail")
        except InputError as exc:
            raise ValueError(str(exc)) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("This is not a MedSAM Agent audit trail.")
        if int(data.get("version", 0)) > VERSION:
            raise ValueError(f"This audit trail has version {data['version']}; this module reads up to {VERSION}.")
        for r in data.get("runs", []):
            entries = [AuditEntry(**e) for e in r.pop("entries", [])]
            rec = RunRecord(**r)
            rec.entries = entries
            log.runs.append(rec)
            log._by_id[rec.run] = rec
        return log

    def export(self, path: str | Path) -> Path:
        """Write the trail as indented JSON (atomically)."""
        from ..durable import write_text

        return write_text(path, self.to_json(indent=1), "the audit trail")
