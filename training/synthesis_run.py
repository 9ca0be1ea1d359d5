"""Running synthesis over a dataset: shards, local worker processes, atomic outputs, resume.

Layout of ``out``::

    parts/<i>-of-<N>/<unit>.jsonl       records of one (case, target) unit, written atomically
    parts/<i>-of-<N>/<unit>.stats.json  kept / pruned (with reasons) / skipped counts of that unit
    trajectories-<i>-of-<N>.jsonl       all records of shard i, merged at the end
    report-<i>-of-<N>.json / .md / .png the run's report (see :mod:`synthesis_report`)

``shard=(i, N)`` keeps the units whose key hashes to ``i`` (crc32 mod N): N
machines (a SLURM array, say) split a dataset without talking to each other.
``resume`` skips units whose records file exists; without it, existing outputs
of this shard are an error (nothing is overwritten by accident).
"""
from __future__ import annotations

import json
import os
import re
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

from MedSAMAgentLib.durable import write_json, write_text
from MedSAMAgentLib.image_io import InputError
from MedSAMAgentLib.json_files import read_json_file

from .datasets import Unit, list_units, unit_samples
from .synthesis import SynthesisConfig, Synthesizer


@dataclass
class RunSummary:
    shard: tuple
    units: int
    units_run: int
    records: int
    seconds: float
    merged: Path
    report: dict


def build_tool(spec: dict):
    from MedSAMAgentLib.builders import build_tool as engine_build_tool

    return engine_build_tool(**spec)


def unit_file(folder: Path, unit: Unit) -> Path:
    """The unit's records file: a readable name plus a hash, so distinct keys never collide."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", unit.key).strip("_")[:80]
    return folder / f"{safe}-{zlib.crc32(unit.key.encode('utf-8')):08x}.jsonl"


def _atomic_write(path: Path, text: str) -> None:
    write_text(path, text, "the synthesis shard")


def _finished(folder: Path, unit: Unit) -> bool:
    """Whether a unit's records were written and it did not fail."""
    path = unit_file(folder, unit)
    if not path.is_file():
        return False
    try:
        return json.loads(path.with_suffix(".stats.json").read_text(encoding="utf-8")).get("failed") is None
    except (OSError, ValueError):
        return False


def process_unit(synth: Synthesizer, unit: Unit, folder: Path) -> dict:
    """Synthesize one unit and write its records and stats; returns the stats."""
    cfg = synth.config
    t0 = time.perf_counter()
    stats = {"unit": unit.key, "kept": 0, "pruned": {}, "skipped_small": 0, "failed": None}
    records = []
    try:
        got = unit_samples(unit, cfg.axis, cfg.sampling, cfg.min_area, cfg.negatives)
        stats["skipped_small"] = got.skipped_small
        synth.tool.prepare([s.rgb for s in got.samples])  # one encoder batch for the unit
        for sample in got.samples:
            outcome = synth.run(sample)
            if outcome.record is not None:
                records.append(outcome.record)
            else:
                stats["pruned"][outcome.reason] = stats["pruned"].get(outcome.reason, 0) + 1
    except (InputError, ValueError) as exc:
        stats["failed"] = str(exc)
    stats["kept"] = len(records)
    stats["seconds"] = round(time.perf_counter() - t0, 4)
    path = unit_file(folder, unit)
    _atomic_write(path.with_suffix(".stats.json"), json.dumps(stats))
    _atomic_write(path, "".join(json.dumps(r) + "\n" for r in records))
    return stats


_WORKER: Synthesizer | None = None


def _init_worker(tool_spec: dict, config: SynthesisConfig) -> None:
    global _WORKER
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER = Synthesizer(build_tool(tool_spec), config, tool_spec)


def _work(args) -> dict:
    unit, folder = args
    return process_unit(_WORKER, unit, Path(folder))


def synthesize(dataset: str | Path, out: str | Path, tool_spec: dict, config: SynthesisConfig | None = None,
               fmt: str = "auto", synonyms: dict | None = None, shard: tuple = (0, 1), workers: int = 1,
               resume: bool = False, progress: Callable[[int, int, dict], None] | None = None) -> RunSummary:
    """Synthesize shard ``i`` of ``N`` of a dataset into ``out``. ``progress(done, total, stats)`` per unit."""
    from .synthesis_report import write_report

    config = config or SynthesisConfig()
    index, count = shard
    if not 0 <= index < count:
        raise InputError(f"--shard {index}/{count} is not a valid shard (0 <= i < N).")
    units = [u for u in list_units(dataset, fmt, synonyms) if u.shard(count) == index]
    out = Path(out)
    tag = f"{index:03d}-of-{count:03d}"
    folder = out / "parts" / tag
    if folder.is_dir() and any(folder.glob("*.jsonl")) and not resume:
        raise InputError(f"{out} already holds records of shard {index}/{count}; add --resume to continue, "
                         f"or choose another --out.")
    other = sorted({p.name for p in (out / "parts").glob("*-of-*")} - {tag}) if (out / "parts").is_dir() else []
    if any(not name.endswith(f"-of-{count:03d}") for name in other):
        raise InputError(f"{out} holds shards of a split into another number of parts ({', '.join(other)}); "
                         f"use the same --shard i/N as they did, or another --out.")
    settings = {"dataset": str(Path(dataset).expanduser().resolve()), "format": fmt, "tool": tool_spec,
                "config": config.to_dict()}
    saved = out / "config.json"
    if saved.is_file() and any((out / "parts").glob("*/*.jsonl")):  # resuming, or another shard of the same run
        before = read_json_file(saved, "the synthesis settings")
        if not isinstance(before, dict):
            raise InputError(f"{saved} is not the settings file a synthesis writes; delete it, or choose another --out.")
        differ = [k for k in settings if before.get(k) != settings[k]]
        if differ:
            raise InputError(f"{out} was synthesized with other settings ({', '.join(differ)} differ); resume with "
                             f"the same options, or choose another --out.")
    folder.mkdir(parents=True, exist_ok=True)
    write_json(saved, settings, "the synthesis settings")
    # finished units are skipped; a failed one is tried again (its data may have been fixed since)
    todo = [u for u in units if not _finished(folder, u)]
    t0 = time.perf_counter()
    done = len(units) - len(todo)
    run_stats: list[dict] = []
    if progress:
        progress(done, len(units), {})
    if todo and workers <= 1:
        synth = Synthesizer(build_tool(tool_spec), config, tool_spec)
        for unit in todo:
            run_stats.append(process_unit(synth, unit, folder))
            done += 1
            if progress:
                progress(done, len(units), run_stats[-1])
    elif todo:
        ctx = get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(tool_spec, config)) as pool:
            for stats in pool.map(_work, [(u, str(folder)) for u in todo]):
                run_stats.append(stats)
                done += 1
                if progress:
                    progress(done, len(units), stats)
    seconds = time.perf_counter() - t0
    merged = out / f"trajectories-{tag}.jsonl"
    lines = []
    for unit in units:
        path = unit_file(folder, unit)
        if path.is_file():
            lines.append(path.read_text(encoding="utf-8"))
    _atomic_write(merged, "".join(lines))
    all_stats = []
    for unit in units:
        sp = unit_file(folder, unit).with_suffix(".stats.json")
        if sp.is_file():
            all_stats.append(json.loads(sp.read_text(encoding="utf-8")))
    new_records = sum(s["kept"] for s in run_stats)
    report = write_report(out, tag, merged, all_stats, config, tool_spec,
                          {"seconds": round(seconds, 3), "units_run": len(todo), "records_run": new_records,
                           "workers": workers, "traj_per_s": round(new_records / seconds, 3) if seconds > 0 else None})
    return RunSummary(shard, len(units), len(todo), report["kept"], seconds, merged, report)
