"""Draw Resources/Screenshot1.png, the picture the Extensions Manager shows for MedSAM Agent.

What the agent does, turn by turn (weight-free: the expert policy and the classical tool on a
synthetic CT-like slice made in code): the box, then corrective clicks, the mask in green.
A screenshot of the Slicer panel taken in a Slicer session may replace it.

    python scripts/make_screenshot.py
"""
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from MedSAMAgentLib.agent import Agent, Episode
from MedSAMAgentLib.overlays import render_turn
from MedSAMAgentLib.policies import create_policy
from MedSAMAgentLib.profile import Profile
from MedSAMAgentLib.tools import create_tool

rng = np.random.default_rng(3)
h, w = 256, 320
organ = np.zeros((h, w), np.uint8)
cv2.ellipse(organ, (140, 125), (62, 44), 20, 0, 360, 1, -1)
lobe = np.zeros((h, w), np.uint8)
cv2.circle(lobe, (215, 160), 26, 1, -1)  # a darker lobe of the same organ: the box's mask misses it
organ |= lobe
body = np.zeros((h, w), np.uint8)
cv2.ellipse(body, (160, 128), (150, 118), 0, 0, 360, 1, -1)
image = rng.normal(30, 10, (h, w)) + body * 60 + organ * 90 - lobe * 45
image = np.clip(cv2.GaussianBlur(image.astype(np.float32), (5, 5), 0), 0, 255).astype(np.uint8)
rgb = np.dstack([image] * 3)
trajectory, = Agent(create_policy("expert"), create_tool("classical"), Profile.load()).run(
    [Episode("s", rgb, "liver", organ.astype(bool))])
panels, prompts, mask = [], [], None
for step in trajectory.steps:
    if step.pixels:
        prompts.append(step.pixels)
    if step.mask is not None:
        mask = step.mask
    name = step.action["name"] if step.action else "?"
    dice = f", Dice {step.dice:.2f}" if step.dice is not None else ""
    panels.append(render_turn(rgb, mask, prompts, min_side=320, caption=f"turn {step.turn + 1}: {name}{dice}"))
sheet = Image.new("RGB", (sum(p.width for p in panels), panels[0].height))
x = 0
for p in panels:
    sheet.paste(p, (x, 0))
    x += p.width
out = Path(__file__).resolve().parents[1] / "Resources" / "Screenshot1.png"
sheet.save(out)
print(out, sheet.size)
