"""Two-process RL on the CPU: steps completed, episodes logged, completions that reached the wrong process.

Builds a random-weight tiny Qwen3-VL and a toy dataset offline, starts the vLLM-server
stand-in on 127.0.0.1 (``Testing/distributed/vllm_stand_in.py``; its replies end
episodes after 1 to 4 turns, so one process runs out of episodes first), and runs
``Testing/distributed/rl_run.py`` in two processes joined by gloo::

    accelerate launch --multi_gpu --num_processes 2 Testing/distributed/rl_run.py --mode server ...

(on a machine without GPUs ``--multi_gpu`` starts CPU processes; accelerate's ``--cpu`` starts
one).  Generation goes through TRL's real ``VLLMClient`` and ``VLLMGeneration`` server path.
Counts come from the processes' own records and ``episodes.jsonl``; ``seconds`` is the
training's wall time on rank 0 (a CPU time: the check, not a speed claim).

Run: ``python Testing/benchmarks/rl_distributed.py [--steps 3]``.  Last printed line: JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DISTRIBUTED = ROOT / "Testing" / "distributed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--images", type=int, default=2, help="images per process and step")
    parser.add_argument("--group", type=int, default=2, help="episodes per image")
    args = parser.parse_args()

    from medsam_training.tiny_qwen import build_tiny_qwen3vl
    from medsam_training.toyworld import generate

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_qwen3vl(tmp / "model")
        data = generate(tmp / "data", level=1, count=8, first_seed=321, size=64)
        port = _free_port()
        server = subprocess.Popen([sys.executable, str(DISTRIBUTED / "vllm_stand_in.py"), "--tokenizer", str(model),
                                   "--port", str(port)], stdout=subprocess.PIPE, text=True, encoding="utf-8")
        try:
            if server.stdout.readline().strip() != "ready":
                raise SystemExit("the stand-in server did not start")
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), str(DISTRIBUTED / "rl_run.py"), "--model", str(model),
                   "--data", str(data), "--out", str(tmp / "run"), "--mode", "server",
                   "--server-url", f"http://127.0.0.1:{port}", "--steps", str(args.steps),
                   "--images", str(args.images), "--group", str(args.group)]
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
            proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=1800)
        finally:
            server.kill()
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"the two-process run failed (exit {proc.returncode})")
        ranks = [json.loads((tmp / "run" / f"rank{k}.json").read_text()) for k in (0, 1)]
        episodes = [json.loads(line) for line in (tmp / "run" / "episodes.jsonl").read_text().splitlines()]

    rounds = list(zip(ranks[0]["rounds"], ranks[1]["rounds"]))
    uneven = sum(a[0] != b[0] for a, b in rounds)
    padded = sum(w - n for r in ranks for n, w in r["rounds"])
    print(f"{len(rounds)} generation calls, {uneven} with one process holding fewer episodes than the other; "
          f"{padded} inert prompts padded in")
    print(json.dumps({
        "processes": 2, "steps": min(r["steps"] for r in ranks), "episodes_logged": len(episodes),
        "episodes_expected": 2 * args.steps * args.images * args.group,
        "completion_mismatches": sum(t["foreign"] + (t["sent"] != t["got"]) for r in ranks for t in r["turns"]),
        "uneven_calls": uneven, "padded_prompts": padded, "seconds": round(ranks[0]["seconds"], 1)}))


if __name__ == "__main__":
    main()
