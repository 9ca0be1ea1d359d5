"""Stage 1: supervised fine-tuning of a Qwen3-VL policy on synthesized trajectories.

* One training example is one whole trajectory: every image (the plain image,
  then the overlay after each action, rendered on the fly from the record by the
  engine's own code) and every turn, as :meth:`Profile.build_messages` builds it
  -- the exact conversation the policy sees at inference.
* The loss is on the assistant's tool calls only: :func:`assistant_label_mask`
  keeps, for each ``<|im_start|>assistant`` block, the tokens after the role line
  up to and including its ``<|im_end|>``; system prompt, user text and image
  tokens are ``-100``.  The test suite checks it by decoding the kept tokens
  back into the replies.  (This works with Qwen's own chat template, which has
  no ``{% generation %}`` markers.)
* transformers' ``Trainer`` with our collator (TRL's VLM path wants a
  ``messages`` column and cannot render overlays from records on the fly).
  LoRA (peft) or full fine-tuning; the vision tower and its merger are frozen by
  default; bf16 on GPU; gradient checkpointing; seeds; resume from the last
  checkpoint in ``output_dir`` with the same data order (the Trainer's seeded
  sampler skips the batches already seen).
* The result is written to ``output_dir/final`` as a full model (LoRA merged)
  plus its processor: ``--model output_dir/final`` loads it as the qwen policy.

Run: ``medsam-agent sft CONFIG.yaml`` (one process), or on several GPUs
``accelerate launch --config_file training/configs/accelerate_zero3.yaml -m medsam_training.sft CONFIG.yaml``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from MedSAMAgentLib.durable import OutputError, reason_for, replace_folder, write_json

from .settings_io import FSDP_LORA, check_agent_eval, check_common, check_keys, check_trainer_args, read_yaml

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class SFTSettings:
    model: str  # local folder, hub id, or catalogue name (e.g. qwen3-vl-2b)
    records: list  # synthesis output folders or trajectories-*.jsonl files
    output_dir: str
    profile: str = "medsam-agent-v1"
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list = field(default_factory=lambda: list(LORA_TARGETS))
    freeze_vision: bool = True
    learning_rate: float = 1e-4
    batch_size: int = 1
    grad_accum: int = 8
    max_steps: int = -1
    epochs: float = 1.0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    seed: int = 42
    bf16: bool | None = None  # None: on when CUDA is available
    gradient_checkpointing: bool = True
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 2
    resume: bool = True  # continue from the last checkpoint in output_dir when there is one
    dataloader_workers: int = 0
    validation_fraction: float = 0.0  # cases held back (all slices of a case together) for an eval loss
    eval_steps: int | None = None  # steps between eval losses (default: save_steps)
    slice_cache: str | None = None  # where source slices are rendered once (default: output_dir/slice-cache)
    # the agent loop every N steps on held-back images with reference masks (0: off); see agent_eval.py
    agent_eval_every: int = 0
    agent_eval_dataset: str | None = None  # a manifest, nnU-Net v2 folder or 2D image/mask folder
    agent_eval_items: int = 8  # slices played at each evaluation
    agent_eval_tool: dict = field(default_factory=lambda: {"name": "medsam-lite"})  # the bundled LiteMedSAM
    device: str = "auto"  # "cpu" trains on the CPU even with a GPU present
    # any other TrainingArguments option, passed through as given (e.g. {optim: adamw_torch_fused});
    # the settings above are set by name
    trainer_args: dict = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "SFTSettings":
        data = read_yaml(path)
        if isinstance(data.get("records"), str):
            data["records"] = [data["records"]]
        check_keys(cls, data, ("model", "records", "output_dir"), str(path))
        settings = cls(**data)
        check_common(settings, str(path))
        check_trainer_args(settings.trainer_args, "TrainingArguments", NAMED_SFT_FIELDS, str(path))
        check_agent_eval(settings, str(path))
        return settings

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- encoding

def assistant_label_mask(input_ids, tokenizer) -> list[bool]:
    """True for the tokens the loss is taken on: each assistant reply and its closing ``<|im_end|>``."""
    ids = list(map(int, input_ids))
    start_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    keep = [False] * len(ids)
    p = 0
    while p < len(ids):
        if ids[p] != start_id:
            p += 1
            continue
        q = p + 1  # the role line: tokens up to and including the first newline
        while q < len(ids) and q - p <= 6 and "\n" not in tokenizer.decode(ids[p + 1:q + 1]):
            q += 1
        role = tokenizer.decode(ids[p + 1:q + 1]).strip()
        if role == "assistant":
            k = q + 1
            while k < len(ids) and ids[k] != end_id:
                keep[k] = True
                k += 1
            if k < len(ids):
                keep[k] = True
            p = k
        else:
            p = q + 1
    return keep


def encode_conversation(processor, messages: list[dict]) -> dict:
    """A whole trajectory -> model inputs (no batch dimension) with ``labels`` (-100 off the assistant)."""
    import torch

    enc = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    item = {k: v[0] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v for k, v in enc.items()}
    keep = torch.tensor(assistant_label_mask(item["input_ids"], processor.tokenizer))
    labels = item["input_ids"].clone()
    labels[~keep] = -100
    item["labels"] = labels
    return item


class TrajectoryDataset:
    """Synthesized records as training examples, the overlays drawn when an item is asked for on
    the source slice from ``slices`` (a :class:`~medsam_training.slice_cache.SliceCache`, or a
    renderer that reads the volume again)."""

    def __init__(self, records: list[dict], processor, profile, slices=None):
        from .datasets import SourceRenderer

        self.records, self.processor, self.profile = records, processor, profile
        self.renderer = slices if slices is not None else SourceRenderer()
        self.requested: list[int] = []  # item order as asked for (tests check resume with it)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        from .export import record_example

        self.requested.append(int(i))
        example = record_example(self.records[i], self.renderer, self.profile)
        return encode_conversation(self.processor, example["messages"])


def collate(items: list[dict], pad_id: int) -> dict:
    """Right-pad token tensors; concatenate the images' patches and grids."""
    import torch

    longest = max(len(it["input_ids"]) for it in items)

    def pad(key, value):
        return torch.stack([torch.nn.functional.pad(it[key], (0, longest - len(it[key])), value=value) for it in items])

    batch = {"input_ids": pad("input_ids", pad_id), "attention_mask": pad("attention_mask", 0),
             "labels": pad("labels", -100)}
    if "mm_token_type_ids" in items[0]:
        batch["mm_token_type_ids"] = pad("mm_token_type_ids", 0)
    if "pixel_values" in items[0]:
        batch["pixel_values"] = torch.cat([it["pixel_values"] for it in items])
        batch["image_grid_thw"] = torch.cat([it["image_grid_thw"] for it in items])
    return batch


# ----------------------------------------------------------------------------- training

def split_by_case(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held back): a seeded ``fraction`` of the cases (at least one when ``fraction`` > 0,
    never all), every record of a held-back case in it, so no slice of a held-back volume is trained on."""
    import numpy as np

    cases = sorted({str(r.get("case", r.get("id"))) for r in records})
    if fraction <= 0 or len(cases) < 2:
        return list(records), []
    count = min(len(cases) - 1, max(1, round(fraction * len(cases))))
    held = {cases[i] for i in np.random.default_rng(seed).permutation(len(cases))[:count]}
    return ([r for r in records if str(r.get("case", r.get("id"))) not in held],
            [r for r in records if str(r.get("case", r.get("id"))) in held])


def load_records(sources: list) -> list[dict]:
    from MedSAMAgentLib.image_io import InputError

    from .export import iter_records

    records = []
    for src in sources:
        p = Path(src)
        if not p.exists():
            raise InputError(f"No records at {src}.")
        records.extend(iter_records(p))
    if not records:
        raise InputError(f"No trajectories in {', '.join(map(str, sources))}.")
    return records


def last_checkpoint(output_dir: str | Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(output_dir)
    return get_last_checkpoint(str(out)) if out.is_dir() else None


def precision(settings) -> tuple[bool, bool]:
    """(use_cpu, bf16) for SFT or RL ``settings``: bf16 on CUDA unless set."""
    import torch

    use_cpu = settings.device == "cpu" or not torch.cuda.is_available()
    return use_cpu, (not use_cpu) if settings.bf16 is None else settings.bf16


def load_policy_processor(settings):
    """The processor of the policy ``settings.model`` names (a catalogue name, a folder or a hub id)."""
    from transformers import AutoProcessor

    from MedSAMAgentLib.builders import resolve_model

    return AutoProcessor.from_pretrained(str(resolve_model(settings.model)[1]))


def load_trainable_policy(settings):
    """The policy model for SFT or RL ``settings``, bf16 on CUDA unless set, the vision tower frozen
    when asked.  Call it after the training arguments exist: under DeepSpeed ZeRO-3 they make each
    process load only its shard of the weights."""
    import torch
    from transformers import AutoModelForImageTextToText

    from MedSAMAgentLib.builders import resolve_model

    _, bf16 = precision(settings)
    where = resolve_model(settings.model)[1]
    model = AutoModelForImageTextToText.from_pretrained(str(where), dtype=torch.bfloat16 if bf16 else torch.float32)
    if settings.freeze_vision:
        for name, param in model.named_parameters():
            if ".visual." in f".{name}":
                param.requires_grad_(False)
    return model


def lora_config(settings):
    """The peft LoraConfig of SFT or RL ``settings`` (None when ``lora`` is off)."""
    if not settings.lora:
        return None
    from peft import LoraConfig

    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=list(settings.lora_target_modules), task_type="CAUSAL_LM")


def checkpointing_arg(args_class, on: bool) -> dict:
    """Activation checkpointing for a ``TrainingArguments`` (or TRL config) class, by the name
    the installed transformers uses (``activation_checkpointing`` since 5.x, before that
    ``gradient_checkpointing``, which 5.x still takes with a FutureWarning)."""
    fields = {f.name for f in dataclasses.fields(args_class)}
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": on}


# TrainingArguments fields the named SFT settings set (trainer_args may not set them again)
NAMED_SFT_FIELDS = (
    "output_dir", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "max_steps",
    "num_train_epochs", "warmup_steps", "weight_decay", "lr_scheduler_type", "max_grad_norm", "seed", "data_seed",
    "bf16", "activation_checkpointing", "gradient_checkpointing", "logging_steps", "save_steps", "save_total_limit",
    "remove_unused_columns", "dataloader_num_workers", "use_cpu", "eval_strategy", "eval_steps",
    "per_device_eval_batch_size", "prediction_loss_only")


def training_arguments(settings: SFTSettings):
    """transformers' ``TrainingArguments`` for SFT ``settings`` (built before the model loads)."""
    from transformers import TrainingArguments

    use_cpu, bf16 = precision(settings)
    evaluate = settings.validation_fraction > 0
    return TrainingArguments(
        output_dir=settings.output_dir, per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum, learning_rate=settings.learning_rate,
        max_steps=settings.max_steps, num_train_epochs=settings.epochs, warmup_steps=settings.warmup_ratio,
        weight_decay=settings.weight_decay, lr_scheduler_type=settings.lr_scheduler,
        max_grad_norm=settings.max_grad_norm, seed=settings.seed, data_seed=settings.seed, bf16=bf16,
        **checkpointing_arg(TrainingArguments, settings.gradient_checkpointing), logging_steps=settings.logging_steps,
        save_steps=settings.save_steps, save_total_limit=settings.save_total_limit,
        remove_unused_columns=False, dataloader_num_workers=settings.dataloader_workers, use_cpu=use_cpu,
        eval_strategy="steps" if evaluate else "no", eval_steps=(settings.eval_steps or settings.save_steps) if evaluate
        else None, per_device_eval_batch_size=settings.batch_size, prediction_loss_only=True,
        **{"report_to": "none", "disable_tqdm": False, "logging_first_step": True, **settings.trainer_args})


def build_trainer(settings: SFTSettings, callbacks: list | None = None):
    """Model, data and ``Trainer`` for ``settings`` (nothing trained yet)."""
    from accelerate import PartialState
    from transformers import Trainer

    from MedSAMAgentLib.outputs import check_output_folder
    from MedSAMAgentLib.profile import Profile

    from .agent_eval import agent_evaluation
    from .slice_cache import SliceCache

    profile = Profile.load(settings.profile)
    records = load_records(settings.records)  # and the output folder: checked before a large model loads
    check_output_folder(settings.output_dir, "The training run")
    processor = load_policy_processor(settings)
    args = training_arguments(settings)  # before the model: ZeRO-3 loads shards only
    slices = SliceCache(settings.slice_cache or Path(settings.output_dir) / "slice-cache")
    with PartialState().main_process_first():  # one process renders, the others then read its files
        slices.fill(records)
    train_records, held_back = split_by_case(records, settings.validation_fraction, settings.seed)
    model = load_trainable_policy(settings)
    if settings.lora:
        from peft import get_peft_model

        if settings.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, lora_config(settings))
    dataset = TrajectoryDataset(train_records, processor, profile, slices)
    held = TrajectoryDataset(held_back, processor, profile, slices) if held_back else None
    pad_id = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0
    evaluation = agent_evaluation(settings, settings.agent_eval_tool, processor)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, eval_dataset=held,
                      data_collator=lambda b: collate(b, pad_id),
                      callbacks=[*(callbacks or []), *([evaluation] if evaluation else [])])
    if evaluation:
        evaluation.trainer = trainer
    return trainer, processor, dataset


def _gathered(model):
    """Under DeepSpeed ZeRO-3, a context in which every rank holds the whole weights (each rank must
    enter it: gathering is collective; rank 0's changes are the ones kept); otherwise nothing."""
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:
        return contextlib.nullcontext()
    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0)


def save_policy(model, processor, output_dir: str | Path, settings: dict, stage: str, accelerator=None) -> Path:
    """The trained policy as one loadable folder ``output_dir/final`` (LoRA merged into the
    weights), with the run's settings in ``medsam_agent_<stage>.json``.  With several processes
    (``accelerator``: the trainer's), every one calls this: ZeRO-3's partitioned weights are
    gathered first, and only the main process writes; all return once ``final`` is in place."""
    final = Path(output_dir) / "final"
    main = accelerator is None or accelerator.is_main_process
    state_dict = None
    if accelerator is not None:
        accelerator.wait_for_everyone()
        if accelerator.distributed_type.name == "FSDP":  # sharded: the full weights, gathered on the main process
            wrapped, model = model, accelerator.unwrap_model(model)
            if hasattr(model, "merge_and_unload"):
                raise ValueError(FSDP_LORA)
            state_dict = accelerator.get_state_dict(wrapped)  # collective: every process takes part
    with _gathered(model):
        if main:
            staging = Path(output_dir) / f"final.tmp-{os.getpid()}"  # written whole, then put in place
            shutil.rmtree(staging, ignore_errors=True)
            if hasattr(model, "merge_and_unload"):
                model = model.merge_and_unload()
            try:
                model.save_pretrained(staging, state_dict=state_dict)
                processor.save_pretrained(staging)
            except OSError as exc:
                shutil.rmtree(staging, ignore_errors=True)
                raise OutputError(f"Cannot write the trained model {final}: {reason_for(Path(output_dir), exc)}; "
                                  f"the checkpoints in {output_dir} are kept.") from None
            write_json(staging / f"medsam_agent_{stage}.json", settings, "the training settings")  # last
            replace_folder(staging, final, "the trained model")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return final


def save_final(trainer, processor, settings: SFTSettings) -> Path:
    return save_policy(trainer.model, processor, settings.output_dir, settings.to_dict(), "sft",
                       getattr(trainer, "accelerator", None))


# settings a resumed run may change: how long it runs and how often it logs and saves
RESUMABLE_CHANGES = {"max_steps", "epochs", "save_steps", "logging_steps", "save_total_limit", "resume",
                     "dataloader_workers"}
RUN_SETTINGS_FILE = "run_settings.json"


def data_fingerprint(ids) -> str:
    """A short hash of the training items' ids, in order (the same paths with other contents differ)."""
    return hashlib.sha256("\n".join(map(str, ids)).encode("utf-8")).hexdigest()[:16]


def check_resumable(settings, stage: str, data: str | None = None, main_process: bool = True) -> str | None:
    """The checkpoint to resume from (None: start afresh); records the run's settings (and
    ``data``, a fingerprint of its items) in ``output_dir/run_settings.json``.  A folder holding
    checkpoints of a run with other settings or other data is refused with one clear message,
    so a rerun never silently continues somebody else's run; ``resume: false`` moves an
    earlier run's checkpoints and result aside (``previous-<time>/``), so none is lost and no
    later resume picks them up.  With several processes each decides (the same way: they read the
    same files) and only the main one (``main_process``) moves or writes anything."""
    from MedSAMAgentLib.image_io import InputError

    out = Path(settings.output_dir)
    if not settings.resume and main_process and (last_checkpoint(out) or (out / "final").exists()):
        aside = out / time.strftime("previous-%Y%m%d-%H%M%S")
        aside.mkdir(parents=True)
        for old in [*out.glob("checkpoint-*"), out / "final", out / RUN_SETTINGS_FILE]:
            if old.exists():
                old.replace(aside / old.name)
        print(f"An earlier run's checkpoints in {out} were moved to {aside}.", file=sys.stderr)
    checkpoint = last_checkpoint(out) if settings.resume else None
    current = json.loads(json.dumps(settings.to_dict()))
    if data is not None:
        current["data"] = data
    stored_file = out / RUN_SETTINGS_FILE
    if checkpoint and stored_file.is_file():
        stored = json.loads(stored_file.read_text(encoding="utf-8")).get("settings", {})
        changed = sorted(k for k in set(stored) | set(current)
                         if k not in RESUMABLE_CHANGES and stored.get(k) != current.get(k))
        if changed:
            what = ", ".join("the data (same paths, other contents)" if k == "data" else k for k in changed)
            raise InputError(
                f"{out} holds checkpoints of a {stage} run with other settings ({what} differ). "
                f"Use a new output_dir, or set resume: false to start afresh there (the old run is moved aside).")
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json(stored_file, {"stage": stage, "settings": current}, "the training settings")
    return checkpoint


def train_and_save(trainer, processor, settings, stage: str, data_ids=None) -> dict:
    """Run ``trainer`` (from the last checkpoint in ``settings.output_dir`` when ``settings.resume``
    and that run had the same settings), save ``final``; returns ``{"final", "resumed_from",
    "log_history", "already_finished"}`` (True: the run had reached ``max_steps`` before and its
    ``final`` is returned as it was).  Shared by SFT and RL."""
    accelerator = getattr(trainer, "accelerator", None)
    checkpoint = check_resumable(settings, stage, None if data_ids is None else data_fingerprint(data_ids),
                                 main_process=accelerator is None or accelerator.is_main_process)
    if accelerator is not None:
        accelerator.wait_for_everyone()  # an earlier run moved aside before any process looks for checkpoints
    final = Path(settings.output_dir) / "final"
    if checkpoint and (final / f"medsam_agent_{stage}.json").is_file():  # written last: a whole result
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
        if 0 < settings.max_steps <= state.get("global_step", 0):
            # finished before: resuming would take one more step (transformers does), so keep the result
            return {"final": str(final), "resumed_from": checkpoint, "log_history": state.get("log_history", []),
                    "already_finished": True}
    trainer.train(resume_from_checkpoint=checkpoint)
    final = save_policy(trainer.model, processor, settings.output_dir, settings.to_dict(), stage, accelerator)
    return {"final": str(final), "resumed_from": checkpoint, "log_history": trainer.state.log_history,
            "already_finished": False}


def train(settings: SFTSettings, callbacks: list | None = None) -> dict:
    """Train (resuming when a checkpoint exists and ``resume``), save ``final``; returns the log history."""
    trainer, processor, dataset = build_trainer(settings, callbacks)
    return train_and_save(trainer, processor, settings, "sft", [r.get("id") for r in dataset.records])


def config_main(argv: list[str] | None, settings_class, train_function, module: str) -> int:
    """``python -m MODULE CONFIG.yaml``: train per the YAML config, print where the result is."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(f"usage: python -m {module} CONFIG.yaml", file=sys.stderr)
        return 2
    from MedSAMAgentLib.cli import user_errors

    try:
        result = train_function(settings_class.from_yaml(argv[0]))
    except user_errors() as exc:  # a mistake in the config or the data: one line, as the command line says it
        print(f"{module}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{module}: interrupted (resume with the same config: it continues from the last checkpoint)",
              file=sys.stderr)
        return 130
    print(json.dumps({"final": result["final"], "resumed_from": result["resumed_from"]}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return config_main(argv, SFTSettings, train, "medsam_training.sft")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
