"""Tables and plots of finished toy worlds: the paper's ablations at CPU scale.

Reads each world folder made by ``medsam-agent toyworld`` (``summary.json``, ``test_rewards.json``)
and, where ``toyworld-rl`` ran on it, its ``rl`` section and the RL runs' ``episodes.jsonl``;
writes into the output folder ``report.md`` (a table per ablation), ``report.json`` (every row)
and PNG plots: Dice after each turn per policy, the action mix per policy, and the training
reward per step of every RL run.  Worlds with the same level, tool and seed hold the same
held-out images, so their policies are compared episode by episode (paired bootstrap).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from MedSAMAgentLib.image_io import InputError
from MedSAMAgentLib.durable import atomic_output, write_json, write_text

from .toyworld import ACTION_KINDS, paired_gain, run_folder


def load_world(folder: str | Path) -> dict:
    """A world's summary, with its folder and (when saved) each held-out episode's reward per policy."""
    folder = Path(folder)
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputError(f"{folder} is not a finished toy world (no readable summary.json); make one with "
                         f"'medsam-agent toyworld --out {folder}'.") from None
    rewards = folder / "test_rewards.json"
    summary["_folder"] = str(folder)
    summary["_rewards"] = json.loads(rewards.read_text(encoding="utf-8")) if rewards.is_file() else {}
    return summary


def _world_name(world: dict) -> str:
    return Path(world["_folder"]).name


def errors_label(world: dict) -> str:
    """The level-3 error mix in a few words ("default", or the fields that differ from it); "" below level 3."""
    from .toyworld import RefinementMix

    mix = world.get("mix")
    if not mix:
        return ""
    defaults = RefinementMix()
    changed = [f"{k} {v:g}" for k, v in mix.items() if getattr(defaults, k, None) != v]
    return ", ".join(changed) or "default"


def policy_rows(worlds: list[dict]) -> list[dict]:
    """One row per world and policy: the world's settings and the policy's held-out scores."""
    rows = []
    for w in worlds:
        base = {"world": _world_name(w), "level": w.get("level"), "tool": w.get("tool", "classical"),
                "trajectories": w.get("trajectory_mix", "box"), "seed": w.get("seed", 0), "steps": w.get("steps"),
                "train_seconds": w.get("train_seconds")}
        for name, r in w["policies"].items():
            rows.append({**base, "stage": "sft", "policy": name, "eval_tool": r.get("tool", base["tool"]),
                         **{k: v for k, v in r.items() if k != "tool"}})
        rl = w.get("rl")
        if not rl:
            continue
        sft = rl["policies"]["sft"]
        rows.append({**base, "stage": "rl-test", "policy": "sft", "eval_tool": rl.get("tool", base["tool"]),
                     **_rl_scores(sft)})
        for name, run in rl["runs"].items():
            rows.append({**base, "stage": "rl-test", "policy": name, "variant": run["variant"], "rl_seed": run["seed"],
                         "eval_tool": rl.get("tool", base["tool"]), "rl_train_seconds": run.get("train_seconds"),
                         "gain_vs_sft": run["reward_gain_vs_sft"], "gain_vs_full_rl": run.get("reward_gain_vs_full_rl"),
                         "run_dir": str(run_folder(w["_folder"], name, run)),
                         **_rl_scores(run["test"])})
    return rows


def _rl_scores(r: dict) -> dict:
    """The RL evaluation's scores under the SFT evaluation's names."""
    return {"reward": r["reward"], "dice_episode": r["dice"], "mean_turns": r["turns"],
            "valid_call_rate": r["valid_call_rate"], "clicks_per_episode": r["clicks_per_episode"],
            "dice_per_turn": r.get("dice_per_turn"), "action_mix": r.get("action_mix"),
            "dice_first": (r.get("dice_per_turn") or [None])[0]}


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _spread(values: list) -> str:
    """Mean, and the range over seeds when there are several."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def _interval(g: dict | None) -> str:
    if not g:
        return ""
    return f"{g['mean']:+.3f} ({g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f})"


def _table(header: list[str], body: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in body]
    return lines


def strategy_table(worlds: list[dict]) -> tuple[list[str], list[dict]]:
    """SFT by the expert's strategy (box / click / hybrid), seeds pooled; each strategy's reward
    against Box-to-Point on the same held-out images (paired, per seed)."""
    groups = defaultdict(list)
    for w in worlds:
        groups[(w.get("level"), errors_label(w), w.get("tool", "classical"), w.get("trajectory_mix", "box"))].append(w)
    body, pairs = [], []
    for (level, errors, tool, mix), ws in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        sft = [w["policies"]["sft"] for w in ws]
        gains = []
        for w in ws:  # the same level, errors, tool and seed: the same held-out images
            box = [b for b in groups.get((level, errors, tool, "box"), []) if b.get("seed", 0) == w.get("seed", 0)]
            if mix != "box" and box and "sft" in w["_rewards"] and "sft" in box[0]["_rewards"]:
                g = paired_gain(box[0]["_rewards"]["sft"], w["_rewards"]["sft"])
                gains.append(g)
                pairs.append({"level": level, "errors": errors, "tool": tool, "trajectories": mix, "seed": w.get("seed", 0),
                              "reward_gain_vs_box": g})
        body.append([level, errors, tool, mix, len(ws), _spread([s.get("reward") for s in sft]),
                     _spread([s["dice_first"] for s in sft]), _spread([s["dice_episode"] for s in sft]),
                     _spread([s["dice_episode"] - s["dice_first"] for s in sft]),
                     _spread([s["mean_turns"] for s in sft]), _spread([s.get("clicks_per_episode") for s in sft]),
                     _spread([s["valid_call_rate"] for s in sft]), "; ".join(_interval(g) for g in gains)])
    header = ["level", "errors", "tool", "trajectories", "seeds", "reward", "Dice, first action", "Dice, episode",
              "refinement (episode - first)", "turns", "clicks/episode", "valid calls", "reward vs box (95%, per seed)"]
    return ["### SFT by the expert's strategy", "", *_table(header, body)], pairs


def rl_table(rows: list[dict]) -> list[str]:
    """SFT vs SFT + RL and each process-term ablation, one row per run."""
    body = [[r["world"], r["policy"], r.get("variant", "sft"), r.get("rl_seed", ""), r["reward"],
             _interval(r.get("gain_vs_sft")), _interval(r.get("gain_vs_full_rl")), r["dice_episode"], r["mean_turns"], r["clicks_per_episode"],
             r["valid_call_rate"], r.get("rl_train_seconds")]
            for r in rows if r["stage"] == "rl-test"]
    if not body:
        return []
    header = ["world", "policy", "reward terms", "seed", "reward", "gain over SFT (95%)",
              "vs full reward, same seed (95%)", "Dice", "turns",
              "clicks/episode", "valid calls", "train s"]
    return ["### SFT vs SFT + RL, and RL without each process term", "",
            "Every policy is scored with the full reward on the same held-out images.", "", *_table(header, body)]


def transfer_table(rows: list[dict]) -> list[str]:
    """The SFT policy evaluated with its own tool and with each other one."""
    body = [[r["world"], r["tool"], r["eval_tool"], r.get("reward"), r["dice_first"], r["dice_episode"],
             r["mean_turns"], r["valid_call_rate"]]
            for r in rows if r["stage"] == "sft" and r["policy"].split("@")[0] == "sft"
            and any(o["world"] == r["world"] and "@" in o["policy"] for o in rows)]
    if not body:
        return []
    header = ["world", "trained with", "evaluated with", "reward", "Dice, first action", "Dice, episode", "turns",
              "valid calls"]
    return ["### Cross-tool transfer", "", *_table(header, body)]


def training_rewards(run_dir: str | Path) -> list[tuple[int, float]]:
    """(step, mean reward of that step's training episodes) from an RL run's ``episodes.jsonl``."""
    path = Path(run_dir) / "episodes.jsonl"
    per_step = defaultdict(list)
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a line cut by an interruption
            if e.get("mode", "train") == "train" and "score" in e:
                per_step[int(e["step"])].append(float(e["score"]))
    return [(s, float(np.mean(v))) for s, v in sorted(per_step.items())]


def _save(fig, path: Path, made: list) -> None:
    """The figure laid out and written as a PNG, whole or not at all, then closed; its name goes to ``made``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_output(path, "the plot") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    made.append(path.name)


def _plots(rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    # an untrained policy's zeros would squash the lines people compare: it is in the tables
    shown = [r for r in rows if r.get("dice_per_turn") and any(r["dice_per_turn"])]
    if shown:
        fig, ax = plt.subplots(figsize=(10, 4.5))
        for r in shown:
            ax.plot(range(1, len(r["dice_per_turn"]) + 1), r["dice_per_turn"], marker="o",
                    label=f"{r['world']}: {r['policy']}" + (" (RL test)" if r["stage"] == "rl-test" else ""))
        ax.set_xticks(range(1, max(len(r["dice_per_turn"]) for r in shown) + 1))
        ax.set_xlabel("turn")
        ax.set_ylabel("mean Dice after the turn (held-out)")
        ax.set_title("Dice per turn (policies with a non-zero Dice)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the lines, not over them
        ax.grid(alpha=0.3)
        _save(fig, out / "dice_per_turn.png", made)
    mixed = [r for r in rows if r.get("action_mix")]
    if mixed:
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(mixed) + 1.5))
        left = np.zeros(len(mixed))
        labels = [f"{r['world']}: {r['policy']}" for r in mixed]
        for kind in ACTION_KINDS:
            share = np.array([r["action_mix"].get(kind, 0.0) for r in mixed])
            ax.barh(labels, share, left=left, label=kind)
            left += share
        ax.set_xlabel("share of all steps")
        ax.set_title("Action mix")
        ax.legend(fontsize=7, ncol=len(ACTION_KINDS), loc="lower center", bbox_to_anchor=(0.5, 1.05))
        ax.tick_params(axis="y", labelsize=7)
        _save(fig, out / "action_mix.png", made)
    runs = [(r, training_rewards(r["run_dir"])) for r in rows if r.get("run_dir")]
    runs = [(r, c) for r, c in runs if c]
    if runs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r, curve in runs:
            ax.plot([s for s, _ in curve], [v for _, v in curve], label=f"{r['world']}: {r['policy']}", alpha=0.8)
        ax.set_xlabel("GRPO step")
        ax.set_ylabel("mean reward of the step's logged episodes (sampled)")
        ax.set_title("Training reward per step, per seed")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        _save(fig, out / "rl_training_reward.png", made)
    return made


def write_report(world_folders: list, out: str | Path) -> dict:
    """Writes ``out/report.md``, ``out/report.json`` and the plots; returns what was written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    worlds = [load_world(f) for f in world_folders]
    rows = policy_rows(worlds)
    strategy, pairs = strategy_table(worlds)
    expert = [[_world_name(w), errors_label(w), w.get("tool", "classical"), w.get("trajectory_mix", "box"),
               *(w.get("expert", {}).get(k) for k in ("trajectories", "mean_actions", "mean_clicks", "iou_first",
                                                      "iou_final", "iou_gain_per_click"))] for w in worlds]
    plots = _plots(rows, out)
    lines = ["# Toy-world report", "", f"Worlds: {', '.join(_world_name(w) for w in worlds)}.", "",
             "### What the expert's trajectories ask", "",
             *_table(["world", "errors", "tool", "trajectories", "kept", "actions", "clicks", "IoU first", "IoU final",
                      "IoU per click"], expert), "", *strategy, ""]
    for section in (rl_table(rows), transfer_table(rows)):
        if section:
            lines += [*section, ""]
    lines += [f"![{p}]({p})" for p in plots]
    write_text(out / "report.md", "\n".join(lines) + "\n", "the toy-world report")
    write_json(out / "report.json", {"rows": rows, "strategy_pairs": pairs}, "the toy-world report")
    return {"markdown": str(out / "report.md"), "rows": rows, "plots": plots, "strategy_pairs": pairs}
