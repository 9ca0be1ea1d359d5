"""Worker under load: 8 sessions at once, each a 20-slice run while it sends 50 overrides.

Everything on loopback: a real worker process (``medsam-agent serve``,
classical tool, replay policy: a box, three clicks, then stop), as the Slicer
module starts it, and one client process per session (``--clients threads``:
threads of this process).  The sessions' volumes are opened first (setup, not
timed); then each session starts its run and streams its events (counting them
against the run's own sequence numbers) while another thread sends its 50
overrides one after the other, a person's pace apart (``--think``: exponential
pauses, mean 0.1 s), timing each round trip.  CT-sized 512x512 slices.  Then
the same override prompts go straight to the tool (prepare + segment), one by
one with no load, for comparison.  Bounded: every run must finish within
--timeout seconds.

Last printed line: JSON ``{"override_p50_s", "override_p95_s", "direct_p95_s",
"runs_completed", "errors", "events_lost", ...}``.  Targets: no errors, no lost
events, override p95 under load at most 2x the direct p95.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all processors since boot, from /proc/stat (None off Linux)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used, from /proc (None off Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def warm_up(_) -> None:
    import MedSAMAgentLib.worker.client  # noqa: F401

    time.sleep(0.5)


def run_session(job: dict) -> dict:
    """One workstation: open a session, start its run and follow the events on a thread, while
    sending the overrides a person's pace apart; returns latencies, errors and event counts."""
    from MedSAMAgentLib.worker.client import WorkerClient

    out = {"latencies": [], "sent_at": [], "tool_seconds": [], "worker_seconds": [], "errors": [], "lost": 0, "completed": 0,
           "run_window": None}
    n, slices = job["n"], job["slices"]
    client = WorkerClient(job["url"], job["token"], timeout=job["timeout"])
    try:
        sid = job["session"]  # opened before the clock: opening a volume is setup, not the load measured
        run_started = time.time()
        run = client.start_run(sid, "blob", slices="all") if job["runs"] else None
        seen = []

        def follow():
            try:
                for e in client.events(run):
                    seen.append(e)
                out["run_window"] = (run_started, time.time())
            except Exception as exc:  # noqa: BLE001 - counted as an error
                out["errors"].append(f"events: {exc}")

        follower = threading.Thread(target=follow if run else (lambda: None))
        follower.start()
        pauses = (np.random.default_rng(1000 + n).exponential(job["think"], job["overrides"] + 1)
                  if job["pace"] == "random" else np.full(job["overrides"] + 1, job["think"]))
        if job["pace"] == "random":
            time.sleep(pauses[-1])  # people do not start at the same instant either
        for k in range(job["overrides"]):
            t0 = time.perf_counter()
            out["sent_at"].append(time.time())
            reply = client.override(sid, "axial", (n + k) % slices, job["prompts"][k])
            out["latencies"].append(time.perf_counter() - t0)
            out["tool_seconds"].append(reply["seconds"])
            out["worker_seconds"].append(reply["worker_seconds"])
            time.sleep(pauses[k])
        follower.join(job["timeout"])
        if run is None:
            return out
        if seen and seen[-1]["type"] == "run_done" and seen[-1]["status"] == "done":
            out["completed"] = 1
            out["lost"] = seen[-1]["seq"] + 1 - len(seen)  # gaps in the sequence numbers
            out["lost"] += sum(a["seq"] != b for a, b in zip(seen, range(len(seen))))
            slices_done = sum(e["type"] == "slice_done" for e in seen)
            if slices_done != slices:
                out["errors"].append(f"session {n}: {slices_done} slices done of {slices}")
        else:
            out["errors"].append(f"session {n}: run did not finish")
    except Exception as exc:  # noqa: BLE001 - counted as an error
        out["errors"].append(f"session {n}: {exc}")
    finally:
        client.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--slices", type=int, default=20)
    parser.add_argument("--overrides", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--batch-size", type=int, default=4, help="slices per agent step in the worker (default 4)")
    parser.add_argument("--no-runs", action="store_true", help="overrides only (to see the HTTP path's own cost)")
    parser.add_argument("--think", type=float, default=0.1,
                        help="mean seconds between one person's overrides (default 0.1: a fast annotator)")
    parser.add_argument("--clients", choices=["processes", "threads"], default="processes",
                        help="processes (default): each session is its own client process, as separate "
                             "workstations are; threads: all sessions share this process (and its GIL)")
    parser.add_argument("--pace", choices=["random", "lockstep"], default="random",
                        help="random (default): independent people, each pause drawn from an exponential "
                             "distribution with mean --think (Poisson arrivals); lockstep: every session "
                             "sends at the same moments, exactly --think apart (the worst case)")
    args = parser.parse_args()

    import SimpleITK as sitk

    from MedSAMAgentLib.actions import Box, Point, Stop, format_action
    from MedSAMAgentLib.tools import create_tool
    from MedSAMAgentLib.trajectory import Step, Trajectory, prompt_from_dict, save_trajectories
    from MedSAMAgentLib.worker.client import start_worker

    tmp = Path(tempfile.mkdtemp(prefix="medsam-load-"))
    rng = np.random.default_rng(0)
    vol = rng.normal(40, 20, (args.slices, 512, 512)).astype(np.float32)  # CT-sized slices
    zz, yy, xx = np.mgrid[:args.slices, :512, :512]
    vol[((yy - 256) / 120) ** 2 + ((xx - 250) / 160) ** 2 < 1] += 120
    img = sitk.GetImageFromArray(vol.astype(np.int16))
    sitk.WriteImage(img, str(tmp / "vol.nrrd"))

    # a full-length episode, as the released agent's: a box, three clicks, then stop (5 turns)
    replies = [format_action(a) for a in (Box(250, 250, 750, 750), Point(500, 500, False), Point(400, 450, True),
                                          Point(600, 520, True), Stop())]
    save_trajectories([Trajectory(f"axial:{i}", "blob", (512, 512), [Step(t, text, None) for t, text in enumerate(replies)])
                       for i in range(args.slices)], tmp / "replay.json")
    tool = create_tool("classical")
    # the worker in its own process, as Slicer runs it
    proc, boot = start_worker(["--policy", "replay", "--replay", str(tmp / "replay.json"), "--tool", "classical",
                               "--allow-dir", str(tmp), "--batch-size", str(args.batch_size)])
    boot.wait_ready(timeout=120)
    url, token = boot.url, boot.token

    prompts = [[{"box": [90.0 + k % 7, 130.0, 420.0, 390.0 - k % 5]}, {"point": [250.0, 250.0 + k % 9], "positive": bool(k % 2)}]
               for k in range(args.overrides)]
    from MedSAMAgentLib.worker.client import WorkerClient

    opener = WorkerClient(url, token)
    sessions = [opener.open_session(path=tmp / "vol.nrrd")["session"] for _ in range(args.sessions)]
    opener.close()
    jobs = [dict(n=n, url=url, token=token, session=sessions[n], prompts=prompts, slices=args.slices,
                 overrides=args.overrides, think=args.think, pace=args.pace, runs=not args.no_runs,
                 timeout=args.timeout) for n in range(args.sessions)]
    t0, ticks0, worker_cpu0 = time.perf_counter(), cpu_ticks(), process_cpu_seconds(proc.pid)
    if args.clients == "processes":  # one process per workstation, as in a department: no shared GIL
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(args.sessions) as pool:
            pool.map(warm_up, range(args.sessions), chunksize=1)  # imports done before the clock starts
            t0, ticks0, worker_cpu0 = time.perf_counter(), cpu_ticks(), process_cpu_seconds(proc.pid)
            results = pool.map(run_session, jobs, chunksize=1)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.sessions) as pool:
            results = list(pool.map(run_session, jobs))
    latencies = [v for r in results for v in r["latencies"]]
    # the overrides sent while some session's run was still going (the agent working)
    windows = [r["run_window"] for r in results if r["run_window"]]
    busy_until = max((w[1] for w in windows), default=None)
    during_runs = [v for r in results for v, t in zip(r["latencies"], r["sent_at"])
                   if busy_until is not None and t < busy_until]
    after_runs = [v for r in results for v, t in zip(r["latencies"], r["sent_at"])
                  if busy_until is not None and t >= busy_until]  # the agent done, people still editing
    tool_seconds = [v for r in results for v in r["tool_seconds"]]
    in_worker = [v for r in results for v in r["worker_seconds"]]
    # the rest of each round trip: the network (loopback) and waiting for the worker's event loop
    outside = [lat - w for r in results for lat, w in zip(r["latencies"], r["worker_seconds"])]
    errors = [e for r in results for e in r["errors"]]
    lost = [sum(r["lost"] for r in results)]
    completed = [sum(r["completed"] for r in results)]
    wall, ticks1 = time.perf_counter() - t0, cpu_ticks()
    # how busy the processors were under load (worker + clients): near 1.0, every queue grows
    cpu_busy = None if not (ticks0 and ticks1) else round((ticks1[0] - ticks0[0]) / max(1, ticks1[1] - ticks0[1]), 3)
    worker_cpu1 = process_cpu_seconds(proc.pid)
    worker_cpu = None if worker_cpu0 is None or worker_cpu1 is None else round(worker_cpu1 - worker_cpu0, 2)
    boot.shutdown()
    proc.wait(timeout=30)

    # the same override prompts straight through the tool, no load
    from MedSAMAgentLib.observation import apply_window, choose_window, to_rgb
    from MedSAMAgentLib.volume import OrientedVolume

    ov = OrientedVolume(img)
    window = choose_window(np.asarray(ov.array), None)
    rgbs = [to_rgb(apply_window(ov.slice("axial", i), window)) for i in range(args.slices)]

    def direct_timings(paced: bool) -> list[float]:
        """200 prepare + segment calls (after 10 warm-up calls), as the worker makes them for an
        override: the slice's picture found prepared by name, then the decoder.  ``paced``: with
        the same pauses as a person's overrides between them (the like-for-like baseline), else
        back to back."""
        rng = np.random.default_rng(7)
        times = []
        for k in range(args.overrides * 4 + 10):
            t = time.perf_counter()
            # named as the worker names its slices: the picture is prepared once, later calls find it
            # (the worker never hashes a slice; hashing 768 KB would add about 1 ms to this baseline)
            key, = tool.prepare([rgbs[k % args.slices]], [f"axial:{k % args.slices}"])
            tool.segment(key, [prompt_from_dict(p) for p in prompts[k % args.overrides]], None,
                         prompt_mode="cumulative")
            if k >= 10:
                times.append(time.perf_counter() - t)
            if paced:
                time.sleep(rng.exponential(args.think) if args.pace == "random" else args.think)
        return times

    direct, direct_hot = direct_timings(paced=True), direct_timings(paced=False)

    result = {
        "override_p50_s": round(percentile(latencies, 50), 4), "override_p95_s": round(percentile(latencies, 95), 4),
        "direct_p95_s": round(percentile(direct, 95), 4), "direct_p50_s": round(percentile(direct, 50), 4),
        "direct_hot_p95_s": round(percentile(direct_hot, 95), 4),
        "runs_completed": completed[0], "errors": len(errors), "events_lost": lost[0],
        "sessions": args.sessions, "pace": args.pace, "clients": args.clients, "slices_per_run": args.slices, "overrides_per_session": args.overrides,
        "wall_s": round(wall, 2),
        "runs_s": None if not windows else round(busy_until - min(w[0] for w in windows), 2),
        "overrides_during_runs": len(during_runs),
        "override_p95_during_runs_s": round(percentile(during_runs, 95), 4) if during_runs else None,
        "overrides_after_runs": len(after_runs),
        "override_p95_after_runs_s": round(percentile(after_runs, 95), 4) if after_runs else None,
        "tool_in_worker_p95_s": round(percentile(tool_seconds, 95), 4),
        "in_worker_p50_s": round(percentile(in_worker, 50), 4), "in_worker_p95_s": round(percentile(in_worker, 95), 4),
        "outside_worker_p50_s": round(percentile(outside, 50), 4),
        "outside_worker_p95_s": round(percentile(outside, 95), 4),
        "cpu_busy": cpu_busy, "worker_cpu_s": worker_cpu, "cpus": os.cpu_count(),
    }
    result["p95_ratio"] = round(result["override_p95_s"] / result["direct_p95_s"], 2)
    result["p95_ratio_vs_hot"] = round(result["override_p95_s"] / result["direct_hot_p95_s"], 2)
    for e in errors[:5]:
        print("error:", e)
    print(f"{completed[0]}/{args.sessions} runs completed in {wall:.1f} s; override p50 {result['override_p50_s']} s, "
          f"p95 {result['override_p95_s']} s under load vs {result['direct_p95_s']} s direct "
          f"(x{result['p95_ratio']}; x{result['p95_ratio_vs_hot']} against {result['direct_hot_p95_s']} s back to back); "
          f"{len(errors)} errors, {lost[0]} events lost")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
