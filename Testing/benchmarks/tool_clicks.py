"""How should a tool use a click?  Dice per turn of the multi-turn expert, for each click rule.

The expert policy (the reference box, then corrective clicks at the deepest point of the larger
error, stopping when a click no longer helps) drives the tool over an evaluation manifest (the
development data by default), once per click rule of the bundled LiteMedSAM tool and once with
the classical tool; the single-box baseline is the first turn.  The images are encoded once and
shared by every rule.  ``--max-slices-per-target`` bounds the 3D items (default 5, spread evenly).

Last printed line: JSON ``{rule: {"dice_per_turn": [...], "final": mean, "first_box": mean,
"n": items}}``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from MedSAMAgentLib.agent import Agent, Episode
    from MedSAMAgentLib.evaluate import case_items
    from MedSAMAgentLib.manifest import load_manifest
    from MedSAMAgentLib.metrics import dice
    from MedSAMAgentLib.policies.expert import ExpertPolicy
    from MedSAMAgentLib.profile import Profile
    from MedSAMAgentLib.tools import create_tool

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", nargs="?", default="../shared/data/cases.json")
    parser.add_argument("--max-slices-per-target", type=int, default=5)
    parser.add_argument("--max-turns", type=int, default=5)
    parser.add_argument("--rules", nargs="+", default=["box", "decoder", "local"])
    args = parser.parse_args()

    items = []
    for case in load_manifest(args.manifest):
        found, _ = case_items(case, "axial", args.max_slices_per_target)
        items += [(case.modality, it) for it in found]
    print(f"{len(items)} items from {args.manifest}")
    lite = create_tool("medsam-lite", device="cpu", cache_size=len(items) + 8)
    t0 = time.perf_counter()
    lite.prepare([it.rgb for _, it in items])
    print(f"encoded {len(items)} images in {time.perf_counter() - t0:.1f} s")
    profile = Profile.load()
    results = {}
    for name, tool, rule in [(f"medsam-lite:{r}", lite, r) for r in args.rules] + [("classical", None, None)]:
        if tool is None:
            tool = create_tool("classical")
        else:
            tool.click_mode = rule
        agent = Agent(ExpertPolicy(), tool, profile, max_turns=args.max_turns)
        t0 = time.perf_counter()
        trajs = agent.run([Episode(it.key, it.rgb, it.target, it.reference) for _, it in items])
        per_turn = [[] for _ in range(args.max_turns)]
        finals, firsts, clicks, by_modality = [], [], [], {}
        for (modality, it), traj in zip(items, trajs):
            masks = [s.mask for s in traj.steps if s.has_mask]
            scores = [dice(m, it.reference) for m in masks] or [0.0]
            for t in range(args.max_turns):  # a stopped episode keeps its last mask
                per_turn[t].append(scores[min(t, len(scores) - 1)])
            finals.append(scores[-1])
            firsts.append(scores[0])
            clicks.append(max(0, len(masks) - 1))
            by_modality.setdefault(modality, []).append((scores[0], scores[-1]))
        results[name] = {"dice_per_turn": [round(float(np.mean(v)), 4) for v in per_turn],
                         "first_box": round(float(np.mean(firsts)), 4), "final": round(float(np.mean(finals)), 4),
                         "worse_than_box": int(sum(f < b - 1e-9 for f, b in zip(finals, firsts))),
                         "clicks_per_item": round(float(np.mean(clicks)), 2), "n": len(items),
                         "per_modality": {m: {"first_box": round(float(np.mean([a for a, _ in v])), 4),
                                              "final": round(float(np.mean([b for _, b in v])), 4), "n": len(v)}
                                          for m, v in sorted(by_modality.items())},
                         "seconds": round(time.perf_counter() - t0, 1)}
        r = results[name]
        print(f"{name:22} box {r['first_box']:.3f} -> final {r['final']:.3f}  per turn {r['dice_per_turn']}  "
              f"clicks/item {r['clicks_per_item']}  worse than its box: {r['worse_than_box']}/{r['n']}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
