"""Builds a training config's arguments the way ``accelerate launch --config_file ACCEL`` would run them.

Run in a fresh process (the launcher's environment variables are process-wide)::

    python Testing/distributed/check_launch_config.py ACCEL.yaml TOKENIZER_DIR TRAINING.yaml [...]

For each training config: the settings are read (``RLSettings``/``SFTSettings``), the
environment ``accelerate launch`` sets for ACCEL is applied (computed by accelerate's
own launch code), the ``GRPOConfig``/``TrainingArguments`` are built by the training
code, and -- for DeepSpeed -- transformers' own check of the DeepSpeed config against
them is run (``HfTrainerDeepSpeedConfig.trainer_config_process``), and the
accumulation and clipping DeepSpeed ends up with must be the training config's.  Prints one JSON line per training config:
``{"config", "ok", "error", "zero3_init", "accumulation", "clipping"}``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def launch_environment(accelerate_config: str) -> dict:
    """The environment variables ``accelerate launch --config_file accelerate_config`` gives the script."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", accelerate_config, "script.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config.keys()) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def main() -> None:
    accelerate_config, tokenizer_dir, configs = sys.argv[1], sys.argv[2], sys.argv[3:]
    os.environ.update(launch_environment(accelerate_config))
    from transformers import AutoTokenizer
    from transformers.integrations import is_deepspeed_zero3_enabled

    from MedSAMAgentLib.image_io import InputError
    from medsam_training.rl import RLSettings, grpo_arguments
    from medsam_training.sft import SFTSettings, training_arguments

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for path in configs:
        row = {"config": Path(path).name, "accelerate": Path(accelerate_config).name, "ok": False, "error": None}
        try:
            if Path(path).name.startswith("rl_"):
                args = grpo_arguments(RLSettings.from_yaml(path), tokenizer)
            else:
                args = training_arguments(SFTSettings.from_yaml(path))
            if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
                from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

                ds = HfTrainerDeepSpeedConfig(args.deepspeed_plugin.deepspeed_config)
                ds.trainer_config_process(args)
                row.update(accumulation=ds.config["gradient_accumulation_steps"],
                           clipping=ds.config["gradient_clipping"])
                if (row["accumulation"], row["clipping"]) != (args.gradient_accumulation_steps, args.max_grad_norm):
                    raise ValueError(f"DeepSpeed would accumulate {row['accumulation']} steps and clip at "
                                     f"{row['clipping']}; the training config says {args.gradient_accumulation_steps}"
                                     f" and {args.max_grad_norm}")
            if os.environ.get("ACCELERATE_USE_FSDP") == "true":
                from accelerate.utils import FullyShardedDataParallelPlugin

                FullyShardedDataParallelPlugin()
            row.update(ok=True, zero3_init=bool(is_deepspeed_zero3_enabled()),
                       grad_accum=args.gradient_accumulation_steps, max_grad_norm=args.max_grad_norm)
        except (InputError, ValueError, TypeError) as exc:
            row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
