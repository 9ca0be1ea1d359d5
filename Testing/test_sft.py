"""Supervised fine-tuning: label masking, training/inference parity, resume order, and a toy world that learns."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from PIL import Image

from MedSAMAgentLib.actions import Box, Point, Stop, action_from_dict, format_action
from MedSAMAgentLib.agent import Agent, Episode
from MedSAMAgentLib.policies.replay import ReplayPolicy
from MedSAMAgentLib.profile import Profile
from MedSAMAgentLib.tools import create_tool
from medsam_training.datasets import SourceRenderer
from medsam_training.export import iter_records, record_example
from medsam_training.sft import SFTSettings, assistant_label_mask, build_trainer, encode_conversation
from medsam_training.synthesis import SynthesisConfig
from medsam_training.synthesis_run import synthesize
from medsam_training.toyworld import generate, make_image, toy_profile


@pytest.fixture(scope="module")
def toy_records(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    generate(root / "train", 1, 10, 123, 64)
    synthesize(root / "train", root / "synth", {"name": "classical"}, SynthesisConfig(box_fraction=1.0, min_area=10))
    return root, list(iter_records(root / "synth"))


def test_loss_only_on_assistant_tool_calls(tiny_qwen_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_qwen_dir)
    profile = Profile.load()
    img = Image.fromarray(np.zeros((512, 512, 3), np.uint8))
    replies = [format_action(Box(1, 2, 300, 400)), format_action(Point(5, 6, False)), format_action(Stop())]
    messages = profile.build_messages("liver", [img] * 3, replies)
    item = encode_conversation(processor, messages)
    kept = item["labels"] != -100
    tok = processor.tokenizer
    assert tok.decode(item["input_ids"][kept]) == "".join(r + "<|im_end|>" for r in replies)
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert not kept[item["input_ids"] == image_id].any()
    # the same mask as the template's own {% generation %} markers give, found independently
    enc = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt",
                                        return_assistant_tokens_mask=True)
    assert torch.equal(torch.as_tensor(enc["assistant_masks"][0]).bool(), kept)
    last = max(i for i, k in enumerate(assistant_label_mask(item["input_ids"], tok)) if k)
    assert tok.convert_ids_to_tokens(int(item["input_ids"][last])) == "<|im_end|>"  # the closing tag is learned


def test_training_conversation_is_the_inference_conversation_byte_for_byte(toy_records, tiny_qwen_dir):
    from transformers import AutoProcessor

    from MedSAMAgentLib.policies.qwen import QwenPolicy

    root, records = toy_records
    profile = toy_profile(64)
    processor = AutoProcessor.from_pretrained(tiny_qwen_dir)
    policy_view = QwenPolicy.__new__(QwenPolicy)  # only its message building is used here
    policy_view.profile = profile
    renderer = SourceRenderer()
    record = next(r for r in records if len(r["actions"]) >= 3)
    example = record_example(record, renderer, profile)
    training_text = processor.apply_chat_template(example["messages"], tokenize=False)

    seen = []

    class Recording(ReplayPolicy):
        def act(self, observations):
            seen.extend(observations)
            return super().act(observations)

    rgb = renderer.rgb(record["source"])
    replies = [format_action(action_from_dict(a)) for a in record["actions"]]
    Agent(Recording(replies), create_tool("classical"), profile).run([Episode(record["id"], rgb, record["target"])])
    assert len(seen) == len(replies)
    for obs in seen:
        inference_text = processor.apply_chat_template(policy_view.messages(obs), tokenize=False,
                                                       add_generation_prompt=True)
        assert training_text.startswith(inference_text)
        assert training_text[len(inference_text):].startswith(replies[obs.turn] + "<|im_end|>")
        for a, b in zip(policy_view.messages(obs), example["messages"]):  # the very same pixels, turn by turn
            for pa, pb in zip(a["content"], b["content"]):
                if pa["type"] == "image":
                    assert np.array_equal(np.asarray(pa["image"]), np.asarray(pb["image"]))


def small_settings(tmp, root, init, **kw):
    return SFTSettings(model=str(init), records=[str(root / "synth")], output_dir=str(tmp), profile=str(root / "p.json"),
                       lora=False, freeze_vision=False, learning_rate=1e-3, batch_size=2, grad_accum=1,
                       gradient_checkpointing=False, logging_steps=1, device="cpu", **kw)


def test_resume_continues_with_the_same_next_batches(toy_records, tmp_path):
    from medsam_training.toyworld import build_model_dir

    root, _ = toy_records
    (root / "p.json").write_text(json.dumps(toy_profile(64).to_dict()), encoding="utf-8")
    init = build_model_dir(tmp_path / "init", toy_profile(64), hidden=32, layers=1)
    straight, _, data = build_trainer(small_settings(tmp_path / "a", root, init, max_steps=4, save_steps=100))
    straight.train()
    order = list(data.requested)
    first, _, _ = build_trainer(small_settings(tmp_path / "b", root, init, max_steps=2, save_steps=2))
    first.train()
    resumed, _, data_b = build_trainer(small_settings(tmp_path / "b", root, init, max_steps=4, save_steps=2))
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    # batches 3 and 4 (and the loader's look-ahead), exactly as in the uninterrupted run
    assert data_b.requested[:4] == order[4:8] and data_b.requested == order[4:4 + len(data_b.requested)]
    assert resumed.state.global_step == 4


def test_a_run_never_continues_another_and_its_result_is_written_whole(toy_records, tmp_path, monkeypatch):
    """Other data behind the same path is refused on resume; resume: false moves the earlier run aside
    (nothing lost, nothing mixed later); a crash while saving leaves no half-written final/."""
    from MedSAMAgentLib.image_io import InputError
    from medsam_training.sft import train
    from medsam_training.toyworld import build_model_dir

    import shutil

    shared, _ = toy_records
    root = tmp_path / "data"  # a copy: this test changes the records (the fixture is shared)
    shutil.copytree(shared / "synth", root / "synth")
    (root / "p.json").write_text(json.dumps(toy_profile(64).to_dict()), encoding="utf-8")
    init = build_model_dir(tmp_path / "init", toy_profile(64), hidden=32, layers=1)
    out = tmp_path / "run"
    first = train(small_settings(out, root, init, max_steps=2, save_steps=2))
    assert (Path(first["final"]) / "medsam_agent_sft.json").is_file()
    # the same records folder, other contents (one trajectory fewer): a resume is refused, naming the data
    files = sorted((root / "synth").glob("trajectories-*.jsonl"))
    lines = files[0].read_text(encoding="utf-8").splitlines()
    files[0].write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match="the data"):
        train(small_settings(out, root, init, max_steps=3, save_steps=2))
    # resume: false starts afresh there, with the earlier run moved aside
    train(small_settings(out, root, init, max_steps=2, save_steps=2, resume=False))
    aside = sorted(out.glob("previous-*"))
    assert len(aside) == 1 and (aside[0] / "checkpoint-2").is_dir() and (aside[0] / "final").is_dir()
    # a crash while writing the result: no final/ that looks finished
    import transformers

    def broken(*args, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.ProcessorMixin, "save_pretrained", broken)
    with pytest.raises(InputError, match="Cannot write the trained model .*disk is full.*checkpoints .* are kept"):
        train(small_settings(tmp_path / "crash", root, init, max_steps=1, save_steps=1))
    assert not (tmp_path / "crash" / "final").exists() and not list((tmp_path / "crash").glob("final.tmp-*"))


def test_lora_with_frozen_vision_trains_only_adapters_and_merges(toy_records, tmp_path):
    from medsam_training.sft import save_final
    from medsam_training.toyworld import build_model_dir

    root, _ = toy_records
    (root / "p.json").write_text(json.dumps(toy_profile(64).to_dict()), encoding="utf-8")
    init = build_model_dir(tmp_path / "init", toy_profile(64), hidden=32, layers=1)
    settings = small_settings(tmp_path / "out", root, init, max_steps=2, save_steps=100)
    settings.lora, settings.freeze_vision, settings.lora_r = True, True, 4
    settings.gradient_checkpointing = True  # the default for real models
    trainer, processor, _ = build_trainer(settings)
    assert trainer.args.gradient_checkpointing  # under whichever name this transformers reads
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable) and not any(".visual." in n for n in trainable)
    trainer.train()
    final = save_final(trainer, processor, settings)
    from MedSAMAgentLib.policies.qwen import QwenPolicy

    policy = QwenPolicy(final, profile=toy_profile(64), device="cpu")  # loads as the qwen policy
    assert not any("lora" in n for n, _ in policy.model.named_parameters())


def test_sft_config_is_checked(tmp_path):
    from MedSAMAgentLib.image_io import InputError

    (tmp_path / "c.yaml").write_text("model: x\nrecords: y\noutput_dir: z\nlearning_rat: 1\n")
    with pytest.raises(InputError, match="learning_rat"):
        SFTSettings.from_yaml(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("model: x\nrecords: y\noutput_dir: z\nlearning_rate: 0.001\n")
    s = SFTSettings.from_yaml(tmp_path / "d.yaml")
    assert s.records == ["y"] and s.learning_rate == 0.001 and s.lora
    (tmp_path / "e.yaml").write_text("model: x\noutput_dir: z\n")
    with pytest.raises(InputError, match="must set records"):
        SFTSettings.from_yaml(tmp_path / "e.yaml")
    (tmp_path / "f.yaml").write_text("- model: x\n")  # a list, not key: value lines
    with pytest.raises(InputError, match="must be a mapping"):
        SFTSettings.from_yaml(tmp_path / "f.yaml")
    with pytest.raises(InputError, match="Cannot read the config"):
        SFTSettings.from_yaml(tmp_path / "absent.yaml")
    # values of the wrong kind or out of range: named before any model loads
    for line, message in (("learning_rate: abc", "learning_rate is 'abc', but must be a number"),
                          ("batch_size: 0", "batch_size is 0, but must be more than 0"),
                          ("lora: maybe", "lora is 'maybe', but must be true or false"),
                          ("epochs: -1", "epochs is -1"), ("device: banana", "device 'banana'"),
                          ("records: 5", "records is 5, but must be a list")):
        (tmp_path / "g.yaml").write_text(f"model: x\nrecords: [y]\noutput_dir: z\n{line}\n")
        with pytest.raises(InputError, match=message):
            SFTSettings.from_yaml(tmp_path / "g.yaml")
    (tmp_path / "h.yaml").write_text("model: x\nrecords: y\noutput_dir: z\nlearning_rate: 1e-4\n")
    assert SFTSettings.from_yaml(tmp_path / "h.yaml").learning_rate == 1e-4  # YAML's text "1e-4" read as the number


def test_lora_under_fsdp_is_refused_before_training(tmp_path, monkeypatch):
    from MedSAMAgentLib.image_io import InputError

    (tmp_path / "c.yaml").write_text("model: x\nrecords: y\noutput_dir: z\nlora: true\n")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch sets for an FSDP config
    with pytest.raises(InputError, match="LoRA under FSDP"):
        SFTSettings.from_yaml(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("model: x\nrecords: y\noutput_dir: z\nlora: false\n")
    assert not SFTSettings.from_yaml(tmp_path / "d.yaml").lora  # full fine-tuning under FSDP is fine


def test_toy_images_name_their_target():
    image, mask, text = make_image(1, 5)
    assert image.shape == (64, 64) and mask.any() and text in ("ellipse", "rectangle", "triangle")
    assert image[mask].mean() > image[~mask].mean() + 60
    image, mask, text = make_image(2, 7)
    assert text.split()[0] in ("bright", "dark") and text.split()[1] in ("ellipse", "rectangle", "triangle")


def test_level_three_targets_carry_the_errors_a_click_fixes():
    from medsam_training.toyworld import RefinementMix, make_refinement_image
    both = RefinementMix(distractor=1.0, faint_part=1.0)
    for seed in range(12):
        image, reference, text, found = make_refinement_image(seed, 64, both)
        assert text.split()[0] == "bright" and text.split()[1] in ("ellipse", "rectangle", "triangle")
        again = make_refinement_image(seed, 64, both)
        assert (again[0] == image).all() and (again[1] == reference).all()  # a seed is one image
        assert found["faint_part"] and found["distractor"]
        core = image[reference] >= np.percentile(image[reference], 75)
        # the faint part lies in the reference, darker than the rest of the target
        assert image[reference].min() < image[reference][core].mean() - 30
        # the distractor: bright pixels touching the target that are not in the reference
        grown = ndimage.binary_dilation(reference, iterations=3) & ~reference
        assert (image[grown] > image[reference][core].mean() - 25).sum() > 5
    none = RefinementMix(distractor=0.0, faint_part=0.0)
    _, reference, _, found = make_refinement_image(3, 64, none)
    assert not any(found.values()) and reference.any()


def test_a_small_toy_world_learns_the_format(tmp_path):
    from medsam_training.toyworld import run

    summary = run(tmp_path, level=1, train_count=16, test_count=4, steps=80, batch_size=8, learning_rate=3e-3,
                  hidden=64, layers=2)
    assert summary["loss_last"] < 0.5 * summary["loss_first"]
    sft = summary["policies"]["sft"]
    assert sft["valid_call_rate"] >= 0.75, sft
    assert json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))["policies"]["sft"] == sft


RANK_SCRIPT = """
import json, sys
from pathlib import Path
from accelerate import Accelerator
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration
from medsam_training.sft import check_resumable, save_policy

class Settings:  # the fields check_resumable reads
    output_dir, resume = sys.argv[2], False
    def to_dict(self):
        return {"output_dir": self.output_dir, "resume": False, "lr": 1e-4}

acc = Accelerator(cpu=True)
model = Qwen3VLForConditionalGeneration.from_pretrained(sys.argv[1])
# only the main process may write: on the other, a processor that cannot be saved would fail the run
processor = AutoProcessor.from_pretrained(sys.argv[1]) if acc.is_main_process else None
checkpoint = check_resumable(Settings(), "sft", "data-1", main_process=acc.is_main_process)
acc.wait_for_everyone()
final = save_policy(model, processor, sys.argv[2], Settings().to_dict(), "sft", acc)
print(json.dumps({"rank": acc.process_index, "final": str(final), "checkpoint": checkpoint,
                  "complete": (final / "medsam_agent_sft.json").is_file()}))
"""


def test_with_two_processes_only_the_main_one_moves_and_writes(tiny_qwen_dir, tmp_path):
    """Two real processes (gloo on the CPU, as accelerate launch starts them): an earlier run is moved
    aside once, the result is written by the main process only, and both see it complete."""
    import os
    import socket
    import subprocess
    import sys

    out = tmp_path / "run"
    (out / "checkpoint-3").mkdir(parents=True)  # an earlier run, to be moved aside (resume: false)
    (out / "final").mkdir()
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT, encoding="utf-8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "MASTER_", "RANK", "WORLD_SIZE",
                                                                     "LOCAL_RANK", "LOCAL_WORLD_SIZE"))}
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]  # files, not pipes: a full pipe would stall a rank
    procs = [subprocess.Popen([sys.executable, str(script), str(tiny_qwen_dir), str(out)], stdout=subprocess.PIPE,
                              stderr=open(logs[r], "w"), text=True,
                              env={**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
                                   "RANK": str(r), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2",
                                   "OMP_NUM_THREADS": "1"})
             for r in range(2)]
    results = []
    for p, log in zip(procs, logs):
        stdout, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log.read_text()[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["complete"] and r["final"] == str(out / "final") and r["checkpoint"] is None for r in results)
    aside = list(out.glob("previous-*"))
    assert len(aside) == 1 and (aside[0] / "checkpoint-3").is_dir()
    assert not list(out.glob("final.tmp-*")) and not list(out.glob("checkpoint-*"))
    assert json.loads((out / "run_settings.json").read_text())["settings"]["data"] == "data-1"


def test_source_slices_are_rendered_once_per_run_and_read_back_exactly(toy_records, tmp_path, monkeypatch):
    from medsam_training.slice_cache import SliceCache

    _, records = toy_records
    reads = []
    original = SourceRenderer.rgb
    monkeypatch.setattr(SourceRenderer, "rgb", lambda self, source: reads.append(source["image"]) or original(self, source))
    cache = SliceCache(tmp_path / "cache")
    distinct = {json.dumps(r["source"], sort_keys=True) for r in records}
    assert cache.fill(records, progress=False) == len(distinct) == len(reads)
    assert cache.fill(records, progress=False) == 0  # a second fill (a resumed run) renders nothing
    for record in records:  # what the dataset reads is what the renderer drew, pixel for pixel
        assert np.array_equal(cache.rgb(record["source"]), original(SourceRenderer(), record["source"]))
    assert len(reads) == len(distinct)
    # an edited source is rendered again
    source = Path(records[0]["source"]["image"])
    os_stat = source.stat()
    import os

    os.utime(source, ns=(os_stat.st_atime_ns, os_stat.st_mtime_ns + 10**9))
    assert cache.fill(records, progress=False) >= 1


def test_a_volume_is_read_once_for_all_its_slices(tmp_path, monkeypatch):
    import SimpleITK as sitk

    from medsam_training import datasets
    from medsam_training.slice_cache import SliceCache

    volume = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).integers(-200, 200, (6, 32, 32)).astype(np.int16)),
                    str(volume))
    records = [{"source": {"image": str(volume), "dim": 3, "axis": "axial", "slice": k % 6, "window": [-100, 100]}}
               for k in (5, 0, 3, 1, 4, 2, 0, 5)]  # shuffled, with repeats
    loads = []
    original = datasets.load_image
    monkeypatch.setattr(datasets, "load_image", lambda p, *a, **k: loads.append(p) or original(p, *a, **k))
    cache = SliceCache(tmp_path / "cache", datasets.SourceRenderer(capacity=1))
    assert cache.fill(records, progress=False) == 6 and len(loads) == 1


def test_held_back_cases_give_an_eval_loss_and_are_never_trained_on(toy_records, tmp_path):
    from medsam_training.sft import split_by_case
    from medsam_training.toyworld import build_model_dir

    root, records = toy_records
    train, held = split_by_case(records, 0.3, seed=1)
    cases = {r["case"] for r in records}
    assert held and train and not {r["case"] for r in held} & {r["case"] for r in train}
    assert len({r["case"] for r in held}) == round(0.3 * len(cases)) and len(train) + len(held) == len(records)
    assert split_by_case(records, 0.3, seed=1) == (train, held) and split_by_case(records, 0.0, 1) == (records, [])
    (root / "p.json").write_text(json.dumps(toy_profile(64).to_dict()), encoding="utf-8")
    init = build_model_dir(tmp_path / "init", toy_profile(64), hidden=32, layers=1)
    trainer, _, data = build_trainer(small_settings(tmp_path / "v", root, init, max_steps=2, save_steps=100,
                                                    validation_fraction=0.3, eval_steps=1))
    trainer.train()
    assert [h for h in trainer.state.log_history if "eval_loss" in h]
    train, held = split_by_case(records, 0.3, seed=42)  # the run's seed
    assert trainer.args.seed == 42 and {r["case"] for r in data.records} == {r["case"] for r in train}
    assert trainer.eval_dataset is not None and len(trainer.eval_dataset) == len(held)
    assert (tmp_path / "v" / "slice-cache").is_dir()


def test_the_agent_loop_is_evaluated_every_n_steps_with_dice_per_turn(toy_records, tmp_path):
    from medsam_training.toyworld import build_model_dir

    root, _ = toy_records
    (root / "p.json").write_text(json.dumps(toy_profile(64).to_dict()), encoding="utf-8")
    init = build_model_dir(tmp_path / "init", toy_profile(64), hidden=32, layers=1)
    trainer, _, _ = build_trainer(small_settings(
        tmp_path / "e", root, init, max_steps=2, save_steps=100, agent_eval_every=1,
        agent_eval_dataset=str(root / "train"), agent_eval_items=3, agent_eval_tool={"name": "classical"}))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "agent_eval/final_dice" in h]
    lines = [json.loads(x) for x in (tmp_path / "e" / "agent_eval.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and len(logged) == 2
    turns = toy_profile(64).max_turns
    for x in lines:
        per_turn = [x[f"agent_eval/dice_turn_{k}"] for k in range(1, turns + 1)]
        assert all(0.0 <= d <= 1.0 for d in per_turn) and 1.0 <= x["agent_eval/turns"] <= turns
        assert per_turn[-1] == pytest.approx(x["agent_eval/final_dice"], abs=1e-6) or x["agent_eval/final_dice"] == 0.0
    with pytest.raises(Exception, match="agent_eval_dataset must name"):
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"model: {init}\nrecords: [{root / 'synth'}]\noutput_dir: {tmp_path / 'x'}\nagent_eval_every: 5\n")
        SFTSettings.from_yaml(bad)
