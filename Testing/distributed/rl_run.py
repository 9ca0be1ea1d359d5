"""One RL run of the real training code in several processes, for the two-process proofs.

Launched by the tests and ``Testing/benchmarks/rl_distributed.py``::

    accelerate launch --cpu --num_processes 2 Testing/distributed/rl_run.py \\
        --model DIR --data DIR --out DIR --mode transformers|server [--server-url URL]

``transformers``: every process generates with the trained model itself (TRL's
transformers path).  ``server``: generation goes through TRL's real ``VLLMClient``
to the stand-in server (``vllm_stand_in.py``); only the client's weight-sync
transport (NCCL, which needs vLLM) is replaced by no-ops.

Each process writes ``OUT/rank{k}.json``: per generation call the number of prompts
it sent and the completions it got, and -- in server mode -- how many completions
differ from the stand-in's reply to that process's own prompt (another process's
completion); and the trainer's rounds: per call, its own prompts and the call's width.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def install_server_client() -> None:
    """TRL's VLLMClient, real over HTTP, without the NCCL weight-sync group (vLLM-only)."""
    import trl.generation.vllm_client as client_module
    import trl.generation.vllm_generation as generation_module

    class HttpOnlyClient(client_module.VLLMClient):
        def init_communicator(self, device=0):
            self.weight_syncs = 0

        def update_named_params(self, metadata, named_params):
            for _ in named_params:  # walked, as the real transport does
                pass
            self.weight_syncs += 1

        def reset_prefix_cache(self):
            pass

    client_module.is_vllm_available = generation_module.is_vllm_available = lambda *a, **k: True
    generation_module.VLLMClient = HttpOnlyClient


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=["transformers", "server"], default="transformers")
    parser.add_argument("--server-url")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--group", type=int, default=2)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import medsam_training.rl as rl
    from vllm_stand_in import image_digest, reply_for, reply_ids

    server = args.mode == "server"
    if server:
        install_server_client()
        rl.check_packages = lambda *a, **k: None  # vLLM is on the (stand-in) server, not here
    settings = rl.RLSettings(
        model=args.model, dataset=args.data, output_dir=args.out, min_area=10, group_size=args.group,
        images_per_step=args.images, learning_rate=1e-3, max_steps=args.steps, lora=False, freeze_vision=False,
        gradient_checkpointing=False, device="cpu", save_steps=1000, temperature=1.3, max_turn_tokens=48,
        seed=args.seed, use_vllm=server, vllm_mode="server", vllm_server_base_url=args.server_url)
    trainer, processor, _, _ = rl.build_trainer(settings)
    rank = trainer.accelerator.process_index
    turns, original = [], trainer._generate_turn
    tokenizer = processor.tokenizer

    def recorded(sequences, images):
        out, logprobs = original(sequences, images)
        foreign = 0
        if server:
            foreign = sum(list(ids) != reply_ids(tokenizer, reply_for(image_digest(ims[0]), len(ims)))
                          for ids, ims in zip(out, images))
        turns.append({"sent": len(sequences), "got": len(out), "foreign": foreign})
        return out, logprobs

    trainer._generate_turn = recorded  # instrumentation only: the call itself is the trainer's
    started = time.perf_counter()
    result = rl.train_and_save(trainer, processor, settings, "rl")
    record = {"rank": rank, "distributed": trainer.accelerator.distributed_type.name, "turns": turns, "rounds": getattr(trainer, "generation_rounds", None),
              "steps": trainer.state.global_step, "seconds": time.perf_counter() - started,
              "final": result["final"]}
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(record), encoding="utf-8")


if __name__ == "__main__":
    main()
