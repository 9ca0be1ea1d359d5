"""Tool latency: encode once and decode per turn, against re-encoding every turn.

SAM2.1 hiera-tiny (random weights, built from the sam2 package's config), CPU
unless --device says otherwise, tool resolution 1024, one 512x512 image, 5 turns
(a box, then clicks).  Measured side by side in one run:

* first_turn_s   -- prepare (encoder) + the first decode, as the engine does it;
* next_turn_s    -- median of the later turns: decoder only, embedding cached;
* reencode_turn_s -- median of the same later turns done as the authors' RL
  server did: ``set_image`` (re-encode) before every ``predict``.

Also the classical tool's turn on the same image, for reference, and the bundled LiteMedSAM
(``medsam-lite``, its real weights) when its package is installed: encode per image (one alone,
and per image in a batch of 8), decode per turn (the box; then clicks, which read the box's
confidence map).
Last printed line: JSON with the numbers and ``speedup = reencode_turn_s / next_turn_s``, and a
``medsam_lite`` entry.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="episodes to time (medians are reported)")
    args = parser.parse_args()

    from MedSAMAgentLib.actions import PixelBox, PixelPoint
    from MedSAMAgentLib.tools import create_tool

    rng = np.random.default_rng(0)
    image = rng.integers(0, 60, (512, 512, 3), dtype=np.uint8)
    image[150:350, 120:400] += 150
    prompts = [PixelBox(120, 150, 400, 350), PixelPoint(200, 200, True), PixelPoint(390, 160, False),
               PixelPoint(300, 340, True), PixelPoint(130, 345, False)]
    tool = create_tool("sam2", config="tiny", checkpoint=None, device=args.device, prompt_mode="released")
    tool.prepare([rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)])  # warm-up (allocations, kernels)

    first, later, reencode = [], [], []
    for r in range(args.repeats):
        img = image.copy()
        img[0, 0, 0] = r  # a new image each repeat: no cache hit for the first turn
        t0 = time.perf_counter()
        key, = tool.prepare([img])
        state = tool.segment(key, prompts[:1]).state
        first.append(time.perf_counter() - t0)
        for t in range(2, 6):
            t0 = time.perf_counter()
            state = tool.segment(key, prompts[:t], state).state
            later.append(time.perf_counter() - t0)
        # the authors' way: the predictor re-encodes the image for every request
        pred = tool.predictor
        logits = None
        for t in range(2, 6):
            p = prompts[t - 1]
            t0 = time.perf_counter()
            pred.set_image(img)
            _, scores, lows = pred.predict(point_coords=np.array([[p.x, p.y]], np.float32),
                                           point_labels=np.array([int(p.positive)]), mask_input=logits,
                                           multimask_output=False)
            logits = lows[int(np.argmax(scores))][None]
            reencode.append(time.perf_counter() - t0)
        pred.reset_predictor()

    classical = create_tool("classical")
    ckey, = classical.prepare([image])
    classical.segment(ckey, prompts[:1])
    ctimes = []
    for t in range(1, 6):
        t0 = time.perf_counter()
        classical.segment(ckey, prompts[:t])
        ctimes.append(time.perf_counter() - t0)

    lite = None
    from MedSAMAgentLib.tools.medsam_lite import package_available

    if package_available():
        tool_lite = create_tool("medsam-lite", device=args.device, cache_size=16)
        tool_lite.prepare([rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)])  # warm-up
        single, box_turn, click_turn = [], [], []
        for r in range(args.repeats):
            img = image.copy()
            img[0, 0, 0] = 100 + r
            t0 = time.perf_counter()
            key, = tool_lite.prepare([img])
            single.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            state = tool_lite.segment(key, prompts[:1]).state
            box_turn.append(time.perf_counter() - t0)
            for t in range(2, 6):
                t0 = time.perf_counter()
                state = tool_lite.segment(key, prompts[:t], state).state
                click_turn.append(time.perf_counter() - t0)
        batch = [image.copy() for _ in range(8)]
        for i, im in enumerate(batch):
            im[0, 1, 0] = i
        tool_lite.encode_batch = 8
        t0 = time.perf_counter()
        tool_lite.prepare(batch)
        batch_s = time.perf_counter() - t0
        lite = {"encode_s": round(statistics.median(single), 4), "encode_per_image_in_batch_of_8_s": round(batch_s / 8, 4),
                "decode_box_turn_s": round(statistics.median(box_turn), 4),
                "decode_click_turn_s": round(statistics.median(click_turn), 4), "input_size": 256}

    result = {
        "first_turn_s": round(statistics.median(first), 4),
        "next_turn_s": round(statistics.median(later), 4),
        "reencode_turn_s": round(statistics.median(reencode), 4),
        "speedup": round(statistics.median(reencode) / statistics.median(later), 1),
        "classical_turn_s": round(statistics.median(ctimes), 4),
        "device": args.device, "tool_image_size": tool.image_size, "image": "512x512", "turns": 5,
        "repeats": args.repeats, "medsam_lite": lite,
    }
    print(f"sam2 hiera-tiny on {args.device}: first turn {result['first_turn_s']} s, next turn "
          f"{result['next_turn_s']} s, re-encoding turn {result['reencode_turn_s']} s "
          f"(x{result['speedup']}); classical turn {result['classical_turn_s']} s")
    if lite:
        print(f"medsam-lite on {args.device}: encode {lite['encode_s']} s an image alone, "
              f"{lite['encode_per_image_in_batch_of_8_s']} s each in a batch of 8; decode {lite['decode_box_turn_s']} s "
              f"(box), {lite['decode_click_turn_s']} s (click)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
