"""Multi-process RL on the CPU: the real training code in two processes (gloo), and the shipped configs.

* Rank-synchronised rollouts: :class:`RankSynchronisedGenerator` with threads as processes.
* Two real processes (``accelerate launch --multi_gpu --num_processes 2``, which on a machine
  without GPUs starts two CPU processes joined by gloo; accelerate's ``--cpu`` starts only one):
  generation by TRL's transformers path, and through TRL's real vLLM client to a stand-in
  server on 127.0.0.1 (``Testing/distributed/vllm_stand_in.py``).  Episodes end after
  different numbers of turns, so one process runs out of episodes before the other.
* Every shipped training config with every shipped accelerate config, through TRL's and
  transformers' own argument classes and accelerate's own launch environment.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTED = ROOT / "Testing" / "distributed"
CONFIGS = ROOT / "training" / "configs"


# ----------------------------------------------------------------------------- in one process, threads as ranks

class ThreadExchange:
    """All-gather of one int among ``n`` threads (a stand-in for the processes' gather)."""

    def __init__(self, n: int):
        self.n, self.values, self.barrier = n, [0] * n, threading.Barrier(n)
        self.log: list = []

    def for_rank(self, rank: int):
        def exchange(count: int) -> list:
            self.barrier.wait()
            self.values[rank] = count
            self.barrier.wait()
            out = list(self.values)
            self.barrier.wait()
            return out
        return exchange


def test_synchronised_generator_pads_to_equal_calls_and_drains():
    from medsam_training.rollout_sync import RankSynchronisedGenerator

    exchange = ThreadExchange(2)
    calls = {0: [], 1: []}
    results = {}

    def run(rank: int, turns: list[int]):
        def generator(sequences, images):
            calls[rank].append(len(sequences))
            return [[rank, s[0]] for s in sequences], None  # the reply names its own prompt

        gen = RankSynchronisedGenerator(generator, exchange.for_rank(rank))
        got = []
        for k, n in enumerate(turns):
            seqs = [[100 * rank + 10 * k + i] for i in range(n)]
            out, _ = gen(seqs, [["img"]] * n)
            got.append(out == [[rank, s[0]] for s in seqs])
        gen.drain()
        results[rank] = (got, gen.rounds)

    threads = [threading.Thread(target=run, args=(0, [4, 2])), threading.Thread(target=run, args=(1, [4, 4, 3, 1]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert all(results[r][0] == [True] * len(results[r][0]) for r in (0, 1))  # each got its own replies
    assert calls[0] == calls[1] == [4, 4, 3, 1]  # the same calls, of the same size, on both
    assert results[0][1] == [(4, 4), (2, 4), (0, 3), (0, 1)] and results[1][1] == [(4, 4), (4, 4), (3, 3), (1, 1)]


def test_synchronised_generator_refuses_short_answers_and_foreign_echoes():
    from medsam_training.rollout_sync import RankSynchronisedGenerator, RolloutDesync, check_echoed_prompts

    short = RankSynchronisedGenerator(lambda s, i: ([[1]] * (len(s) - 1), None), lambda n: [n, 3])
    with pytest.raises(RolloutDesync, match="2 completions for 3 prompts"):
        short([[5], [6]], [[], []])
    check_echoed_prompts([[1, 9, 9, 2]], [[1, 9, 2]], image_token=9)  # placeholders may be expanded
    with pytest.raises(RolloutDesync, match="another process"):
        check_echoed_prompts([[1, 2]], [[1, 3]], image_token=9)
    with pytest.raises(RolloutDesync, match="1 prompts came back for 2"):
        check_echoed_prompts([[1], [2]], [[1]], image_token=None)


def test_sampling_settings_are_each_backends_own_words(tiny_qwen_dir):
    from transformers import AutoTokenizer

    from medsam_training.sampling import generation_kwargs

    tok = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    hf = generation_kwargs(tok, "transformers")
    vllm = generation_kwargs(tok, "vllm")
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert pad in hf["suppress_tokens"] and hf["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert "<|image_pad|>" in vllm["bad_words"] and vllm["stop_token_ids"] == [hf["eos_token_id"]]
    assert not set(vllm) & {"suppress_tokens", "eos_token_id"}
    # vLLM tokenizes each bad word with the tokenizer: each must be its token alone
    assert all(tok.encode(w, add_special_tokens=False) == [tok.convert_tokens_to_ids(w)] for w in vllm["bad_words"])


def test_trl_internals_are_the_expected_ones(monkeypatch):
    import trl

    from MedSAMAgentLib.image_io import InputError
    from medsam_training import trl_compat

    assert trl_compat.problems() == []
    monkeypatch.setattr(trl, "__version__", "1.19.0")
    with pytest.raises(InputError, match=r"TRL 1\.19\.0 .*trl>=1\.16,<1\.17"):
        trl_compat.check_trl()


def test_trainer_args_pass_through_and_refuse_what_named_settings_set(tmp_path, tiny_qwen_dir):
    from MedSAMAgentLib.image_io import InputError
    from medsam_training.rl import RLSettings, grpo_arguments

    from transformers import AutoTokenizer

    base = dict(model=str(tiny_qwen_dir), dataset=str(tmp_path), output_dir=str(tmp_path / "o"), device="cpu")
    settings = RLSettings.from_dict({**base, "trainer_args": {"dataloader_num_workers": 2, "vllm_enable_sleep_mode": True}})
    args = grpo_arguments(settings, AutoTokenizer.from_pretrained(tiny_qwen_dir))
    assert args.dataloader_num_workers == 2 and args.vllm_enable_sleep_mode and args.loss_type == "dapo"
    with pytest.raises(InputError, match="learning_rate, which the named settings"):
        RLSettings.from_dict({**base, "trainer_args": {"learning_rate": 0.1}})
    with pytest.raises(InputError, match="no_such_option, which GRPOConfig does not have"):
        RLSettings.from_dict({**base, "trainer_args": {"no_such_option": 1}})


# ----------------------------------------------------------------------------- two real processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(model, data, out, mode: str, server_url: str | None = None, timeout: int = 420):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(DISTRIBUTED / "rl_run.py"), "--model", str(model),
           "--data", str(data), "--out", str(out), "--mode", mode]
    if server_url:
        cmd += ["--server-url", server_url]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.loads((Path(out) / f"rank{k}.json").read_text()) for k in (0, 1)]
    episodes = [json.loads(line) for line in (Path(out) / "episodes.jsonl").read_text().splitlines()]
    return ranks, episodes


def _check_lockstep(ranks, episodes, steps: int, per_step: int):
    r0, r1 = ranks
    assert r0["steps"] == r1["steps"] == steps
    # every call had both processes, with the same number of prompts each
    assert len(r0["rounds"]) == len(r1["rounds"])
    assert [w for _, w in r0["rounds"]] == [w for _, w in r1["rounds"]]
    assert all(t["sent"] == t["got"] for r in ranks for t in r["turns"])
    # ... and the case the synchronisation exists for happened: a call where one process had fewer episodes left
    assert any(a[0] != b[0] for a, b in zip(r0["rounds"], r1["rounds"])), (r0["rounds"], r1["rounds"])
    # every episode of every process was logged, once
    assert len(episodes) == 2 * steps * per_step
    assert {(e["rank"], e["step"]) for e in episodes} == {(r, s) for r in (0, 1) for s in range(steps)}
    assert len({e["id"] for e in episodes}) == len(episodes)


@pytest.fixture(scope="module")
def two_rank_data(tmp_path_factory):
    from medsam_training.toyworld import generate

    return generate(tmp_path_factory.mktemp("rl2_data"), level=1, count=6, first_seed=123, size=64)


def test_two_processes_through_trls_vllm_client_get_their_own_completions(tiny_qwen_dir, two_rank_data, tmp_path):
    log = tmp_path / "requests.jsonl"
    port = _free_port()
    server = subprocess.Popen([sys.executable, str(DISTRIBUTED / "vllm_stand_in.py"), "--tokenizer", str(tiny_qwen_dir),
                               "--port", str(port), "--log", str(log)], stdout=subprocess.PIPE, text=True,
                              encoding="utf-8")
    try:
        assert server.stdout.readline().strip() == "ready"
        ranks, episodes = _launch(tiny_qwen_dir, two_rank_data, tmp_path / "run", "server", f"http://127.0.0.1:{port}")
    finally:
        server.kill()
    _check_lockstep(ranks, episodes, steps=2, per_step=4)
    # each process's completions were the stand-in's replies to its own prompts (by the prompts' images)
    assert sum(t["foreign"] for r in ranks for t in r["turns"]) == 0
    # the stand-in's reply sets each episode's length; the logged episodes follow it
    assert len({len(e["calls"]) for e in episodes}) > 1
    # the sampling settings reached the server in vLLM's words, through TRL's client
    requests = [json.loads(line)["sampling_params"] for line in log.read_text().splitlines()]
    assert requests and all("<|image_pad|>" in r["bad_words"] and r["stop_token_ids"] for r in requests)
    assert not any({"suppress_tokens", "eos_token_id"} & set(r) for r in requests)


def test_two_processes_generating_with_the_model_stay_in_step(taught_qwen_dir, two_rank_data, tmp_path):
    ranks, episodes = _launch(taught_qwen_dir, two_rank_data, tmp_path / "run", "transformers")
    _check_lockstep(ranks, episodes, steps=2, per_step=4)
    assert Path(ranks[0]["final"], "model.safetensors").is_file()


# ----------------------------------------------------------------------------- the shipped configs

def _launch_command_config(training_config: Path) -> str | None:
    """The accelerate config a training config's launch comment names (None: one process)."""
    for line in training_config.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") and "--config_file" in line:
            return line.split("--config_file", 1)[1].split()[0]
    return None


def _check_configs(accelerate_config: Path, tiny_qwen_dir) -> dict:
    configs = sorted(CONFIGS.glob("rl_*.yaml")) + sorted(CONFIGS.glob("sft_*.yaml"))
    proc = subprocess.run([sys.executable, str(DISTRIBUTED / "check_launch_config.py"), str(accelerate_config),
                           str(tiny_qwen_dir), *map(str, configs)], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(configs)
    return {r["config"]: r for r in rows}


@pytest.mark.parametrize("accelerate_name", ["accelerate_ddp.yaml", "accelerate_zero3.yaml", "accelerate_fsdp.yaml"])
def test_every_shipped_config_builds_under_every_accelerate_config(accelerate_name, tiny_qwen_dir):
    rows = _check_configs(CONFIGS / accelerate_name, tiny_qwen_dir)
    for name, row in rows.items():
        lora = "lora" in name
        if accelerate_name == "accelerate_fsdp.yaml" and lora:  # refused before training, in one line
            assert not row["ok"] and "LoRA under FSDP" in row["error"], row
            continue
        assert row["ok"], row
        # ZeRO-3: weights sharded while loading (the arguments exist before the model), and DeepSpeed's
        # accumulation and clipping are the training config's own
        assert row["zero3_init"] == (accelerate_name == "accelerate_zero3.yaml"), row
        if accelerate_name == "accelerate_zero3.yaml":
            assert (row["accumulation"], row["clipping"]) == (row["grad_accum"], row["max_grad_norm"]), row


def test_every_training_config_names_a_shipped_accelerate_config():
    for config in sorted(CONFIGS.glob("rl_*.yaml")) + sorted(CONFIGS.glob("sft_*.yaml")):
        named = _launch_command_config(config)
        assert named and (ROOT / named).is_file(), (config.name, named)


def test_an_accelerate_config_fixing_accumulation_is_caught(tmp_path, tiny_qwen_dir):
    fixed = tmp_path / "zero3_fixed.yaml"
    fixed.write_text((CONFIGS / "accelerate_zero3.yaml").read_text().replace(
        "  zero_stage: 3\n", "  zero_stage: 3\n  gradient_accumulation_steps: 8\n"), encoding="utf-8")
    rows = _check_configs(fixed, tiny_qwen_dir)
    assert not rows["rl_qwen3vl_2b_lora.yaml"]["ok"] and "accumulate 8 steps" in rows["rl_qwen3vl_2b_lora.yaml"]["error"]
    assert rows["sft_qwen3vl_8b_full.yaml"]["ok"]  # its grad_accum is 8
