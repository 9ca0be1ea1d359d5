"""Does /v1/health stay fast while the largest allowed override runs?

A real worker process on loopback (``medsam-agent serve``, classical tool, expert policy) opens an
8000x8000 picture (the largest a person would send: a whole-slide-like X-ray); one client thread
sends overrides with the most prompts the protocol allows (``MAX_OVERRIDE_PROMPTS``: one box and
clicks), back to back, while another polls ``/v1/health`` every 20 ms and times each answer.
The same polling runs first with no override going, side by side, for comparison.

Last printed line: JSON ``{"health_p99_s", "health_p99_idle_s", "override_points", "overrides",
"override_p50_s", "errors"}``.  Target: ``health_p99_s`` under 0.1 s, no errors.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def poll_health(client, stop: threading.Event, every_s: float, out: list, errors: list) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            client.health(timeout=10)
            out.append(time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - counted: the benchmark reports errors, it does not stop
            errors.append(f"health: {exc}")
        stop.wait(every_s)


def main() -> None:
    import SimpleITK as sitk

    from MedSAMAgentLib.worker.client import WorkerClient, start_worker
    from MedSAMAgentLib.worker.protocol import MAX_OVERRIDE_PROMPTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8000, help="picture side in pixels (default 8000)")
    parser.add_argument("--overrides", type=int, default=40, help="overrides sent back to back (default 40)")
    parser.add_argument("--idle-s", type=float, default=3.0, help="seconds of polling with no override first")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="medsam-health-"))
    rng = np.random.default_rng(0)
    n = args.size
    picture = rng.integers(0, 40, (n, n), dtype=np.uint8)
    picture[n // 4: 3 * n // 4, n // 3: 2 * n // 3] += 160
    sitk.WriteImage(sitk.GetImageFromArray(picture), str(folder / "big.png"))
    proc, client = start_worker(["--policy", "expert", "--tool", "classical", "--allow-dir", str(folder)])
    errors: list = []
    try:
        client.wait_ready(timeout=120)
        session = client.open_session(folder / "big.png")["session"]
        poller = WorkerClient(client.url, client.token)
        prompts = [{"box": [n // 3 - 20, n // 4 - 20, 2 * n // 3 + 20, 3 * n // 4 + 20]}]
        prompts += [{"point": [n // 2 + 3 * k % (n // 4), n // 2], "positive": bool(k % 2)}
                    for k in range(MAX_OVERRIDE_PROMPTS - 1)]

        idle, stop = [], threading.Event()
        thread = threading.Thread(target=poll_health, args=(poller, stop, 0.02, idle, errors))
        thread.start()
        time.sleep(args.idle_s)
        stop.set()
        thread.join()

        busy, stop, seconds = [], threading.Event(), []
        thread = threading.Thread(target=poll_health, args=(poller, stop, 0.02, busy, errors))
        thread.start()
        for _ in range(args.overrides):
            t0 = time.perf_counter()
            try:
                answer = client.override(session, "axial", 0, prompts)
                assert answer["mask"]["size"] == [n, n]
                seconds.append(time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"override: {exc}")
        stop.set()
        thread.join()
        poller.close()
    finally:
        try:
            client.shutdown()
        except Exception:  # noqa: BLE001 - it may be gone already
            pass
        proc.wait(timeout=30)
    result = {"health_p99_s": round(float(np.percentile(busy, 99)), 4) if busy else None,
              "health_p50_s": round(float(np.percentile(busy, 50)), 4) if busy else None,
              "health_p99_idle_s": round(float(np.percentile(idle, 99)), 4) if idle else None,
              "health_calls_during_overrides": len(busy), "override_points": len(prompts),
              "picture": f"{n}x{n}", "overrides": len(seconds),
              "override_p50_s": round(float(np.median(seconds)), 3) if seconds else None,
              "errors": len(errors)}
    for e in errors[:5]:
        print("error:", e)
    print(f"health p99 {result['health_p99_s']} s while {len(seconds)} overrides of {len(prompts)} prompts on a "
          f"{n}x{n} picture ran (idle p99 {result['health_p99_idle_s']} s); override p50 {result['override_p50_s']} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
