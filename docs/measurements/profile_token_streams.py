"""One episode under both profiles of the released checkpoint, with the tiny Qwen3-VL's real processor: the
token streams the policy would read, side by side (the text of each turn, vision tokens counted).

    .venv/bin/python docs/measurements/profile_token_streams.py ../shared/data/ct2d_amos_0004_75/image.png liver

The replies are fixed (box, click, stop) so that both episodes take the same actions; the pictures, texts
and token counts are each profile's own.  Prints a Markdown report (the last line is JSON).
"""
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def main(image_path: str, target: str) -> None:
    from transformers import AutoProcessor

    from MedSAMAgentLib.actions import Box, Point, Stop, format_action, parse_action
    from MedSAMAgentLib.agent import Agent, Episode
    from MedSAMAgentLib.image_io import load_image
    from MedSAMAgentLib.policies.base import Decision
    from MedSAMAgentLib.profile import Profile
    from MedSAMAgentLib.tools import create_tool
    from medsam_training.tiny_qwen import build_tiny_qwen3vl

    processor = AutoProcessor.from_pretrained(build_tiny_qwen3vl(Path(tempfile.mkdtemp(prefix="tiny_qwen"))))
    replies = [format_action(Box(300, 250, 700, 650)), format_action(Point(500, 450, True)), format_action(Stop())]

    class Fixed:
        name = "fixed"

        def __init__(self):
            self.left, self.last = list(replies), None

        def act(self, observations):
            self.last = observations[-1]
            text = self.left.pop(0)
            return [Decision(text, parse_action(text))]

    image = load_image(image_path).array
    streams = {}
    for name in ("medsam-agent-v1", "medsam-agent-v1-eval"):
        profile, policy = Profile.load(name), Fixed()
        (traj,) = Agent(policy, create_tool("classical"), profile).run([Episode("e", image, target)])
        obs = policy.last  # the conversation before the last reply: every picture, every earlier reply
        messages = profile.build_messages(target, [Image.fromarray(np.asarray(f)) for f in obs.images],
                                          obs.replies)
        enc = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
        ids = list(enc["input_ids"][0] if hasattr(enc["input_ids"][0], "__len__") else enc["input_ids"])
        pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        text, run = [], 0
        for t in ids:  # the stream, vision tokens collapsed into a count
            if t == pad:
                run += 1
                continue
            if run:
                text.append(f"<|image_pad|>x{run}")
                run = 0
            text.append(processor.tokenizer.decode([t]))
        streams[name] = {"tokens": len(ids), "vision_tokens": sum(t == pad for t in ids),
                         "text": "".join(text), "actions": [s.action["name"] for s in traj.steps]}
    rl, ev = streams["medsam-agent-v1"], streams["medsam-agent-v1-eval"]
    print(f"# One episode under both profiles ({Path(image_path).name}, target '{target}', tiny Qwen3-VL processor)\n")
    print("| | medsam-agent-v1 (RL path) | medsam-agent-v1-eval (evaluation path) |\n|---|---|---|")
    print(f"| tokens before the last reply | {rl['tokens']} | {ev['tokens']} |")
    print(f"| of them vision tokens | {rl['vision_tokens']} | {ev['vision_tokens']} |")
    print(f"| actions | {', '.join(rl['actions'])} | {', '.join(ev['actions'])} |\n")
    for name, s in streams.items():
        body = s["text"].split("<|im_end|>\n<|im_start|>user", 1)[1]  # the system prompt is the same in both
        print(f"## {name}: the stream after the system prompt\n\n```\n<|im_start|>user{body}\n```\n")
    print(json.dumps({k: {f: v[f] for f in ("tokens", "vision_tokens", "actions")} for k, v in streams.items()}))


if __name__ == "__main__":
    main(*(sys.argv[1:3] if len(sys.argv) > 2 else ("../shared/data/ct2d_amos_0004_75/image.png", "liver")))
