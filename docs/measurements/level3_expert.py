"""What the expert's trajectories ask at toy-world level 3, per tool, strategy and error mix.

    python docs/measurements/level3_expert.py OUT TOOL COUNT default,strong

TOOL: classical or medsam-lite (on the CPU).  Prints one JSON line per mix and strategy
(Box-to-Point: box_fraction 1.0; Sequential-Click: 0.0) with the synthesis' mean actions per
trajectory, clicks, IoU after the first action and at the end, and the IoU each click added.
Results: docs/measurements/level3_expert.md.
"""
import json
import sys
import time
from pathlib import Path

from medsam_training.export import iter_records
from medsam_training.synthesis import SynthesisConfig
from medsam_training.synthesis_run import synthesize
from medsam_training.toyworld import RefinementMix, generate, tool_spec, trajectory_stats

MIXES = {"default": RefinementMix(),
         "strong": RefinementMix(distractor=0.8, faint_part=0.8, distractor_size=0.8, faint_size=0.8)}

root, tool, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for name in sys.argv[4].split(","):
    data = generate(root / name / "data", 3, count, 3_000_000, 64, MIXES[name])
    for box_fraction in (1.0, 0.0):
        t0 = time.time()
        out = root / name / f"synth-{tool}-{box_fraction}"
        synthesize(data, out, tool_spec(tool), SynthesisConfig(box_fraction=box_fraction, box_jitter=0.05, seed=0,
                                                               min_area=10), resume=True)
        stats = trajectory_stats(list(iter_records(out)))
        print(json.dumps({"mix": name, "tool": tool, "box_fraction": box_fraction,
                          "seconds": round(time.time() - t0, 1), **stats}), flush=True)
