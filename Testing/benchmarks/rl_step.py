"""RL cost: rollout throughput (episodes per minute) and one GRPO step's time and peak memory.

Builds a Qwen3-VL with random weights offline -- ``--size 2b`` has Qwen3-VL-2B's shape
(text 2048 x 28 layers, 16/8 heads, MLP 6144, vocabulary padded to 151,936, tied
embeddings; vision 24 x 1024, 16 heads), ``--size tiny`` a toy one -- with the
released profile (512x512 pictures, the full system prompt), and runs
``SegmentationGRPOTrainer`` on generated toy images (classical tool, or ``--tool
sam2`` with random SAM2 hiera-tiny weights on the same device).  Rollouts: one
batch of ``--images x --group`` whole episodes with sampling (temperature 1);
step: ``--steps`` GRPO steps, the last one timed (rollout + loss + optimizer).
Peak GPU memory from ``torch.cuda.max_memory_allocated``.  Last printed line: JSON.

GPU:  python Testing/benchmarks/rl_step.py --size 2b --device cuda
CPU:  python Testing/benchmarks/rl_step.py --size tiny   (checks the script; no absolute times from a CPU)
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

SIZES = {
    "tiny": dict(hidden_size=128, layers=2, heads=4, kv_heads=2, vision_depth=2, vision_hidden=64),
    "2b": dict(hidden_size=2048, layers=28, heads=16, kv_heads=8, intermediate_size=6144, vision_depth=24,
               vision_hidden=1024, vision_heads=16, vision_intermediate=4096, vocab_size=151936,
               tie_embeddings=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tool", default="classical", choices=["classical", "sam2"])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--lora", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

    import torch

    from MedSAMAgentLib.agent import Episode
    from medsam_training.rl import RLSettings, build_trainer
    from medsam_training.tiny_qwen import build_model, build_processor, build_tokenizer
    from medsam_training.toyworld import generate

    cuda = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = build_tokenizer()
        model = build_model(tokenizer, **SIZES[args.size])
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp / "model")
        build_processor(tokenizer).save_pretrained(tmp / "model")
        del model
        data = generate(tmp / "data", level=2, count=max(8, args.images * 4), first_seed=99_000, size=256)
        tool = {"name": "classical"} if args.tool == "classical" else {
            "name": "sam2", "config": "tiny", "checkpoint": None, "device": args.device}
        settings = RLSettings(model=str(tmp / "model"), dataset=str(data), output_dir=str(tmp / "out"), tool=tool,
                              min_area=10, group_size=args.group, images_per_step=args.images,
                              max_steps=args.steps, lora=args.lora, gradient_checkpointing=cuda,
                              device="cuda" if cuda else "cpu", save_steps=10_000, resume=False,
                              learning_rate=1e-6)
        trainer, processor, environment, episodes = build_trainer(settings)
        batch = [Episode(f"{e.id}#{g}", e.image, e.target, e.reference)
                 for e in episodes[:args.images] for g in range(args.group)]
        trainer.model.eval()
        environment.run(batch[:2], trainer._generate_turn)  # warm-up
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        results = environment.run(batch, trainer._generate_turn)
        if cuda:
            torch.cuda.synchronize()
        rollout_s = time.perf_counter() - t0
        trainer.model.train()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        step_times = [h["step_time"] for h in trainer.state.log_history if "step_time" in h]
        out = {"size": args.size, "parameters": params, "device": args.device, "tool": args.tool, "lora": args.lora,
               "episodes": len(batch), "mean_turns": round(sum(len(r.trajectory.steps) for r in results) / len(results), 2),
               "rollout_s": round(rollout_s, 3), "episodes_per_min": round(60 * len(batch) / rollout_s, 1),
               "step_s": round(step_times[-1], 3) if step_times else None,
               "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
        print(json.dumps(out))


if __name__ == "__main__":
    main()
