"""A stand-in for a vLLM server, on 127.0.0.1, speaking the HTTP that TRL 1.16's ``VLLMClient`` uses.

Only the server mode of the two-process RL proofs uses it (no vLLM can run on these
CPUs).  TRL's real client talks to it: ``/health``, ``/v1/models``, ``/server_info``,
``/v1/chat/completions/render`` (images -> features) and ``/inference/v1/generate``
(token ids + features + sampling params -> completion).  The reply it generates is a
pure function of the prompt's images (:func:`reply_for`): the digest of the episode's
first image sets how many turns the episode lasts (1 to 4), so episodes -- and the
processes holding them -- end after different numbers of turns, and a completion that
reaches the wrong process is caught by comparing it with ``reply_for`` of that
process's own prompt.  Requests whose sampling params use transformers' words
(``suppress_tokens``, ``eos_token_id``), which vLLM's ``SamplingParams`` does not
have, are refused with 400, as vLLM refuses unknown fields.  Every generate request's
sampling params are appended to ``--log``.

Run: ``python Testing/distributed/vllm_stand_in.py --tokenizer DIR --port P --log FILE``.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

BOX = '<tool_call>\n{"name": "add_bbox", "arguments": {"bbox_2d": [250, 250, 750, 750]}}\n</tool_call>'
POINT = '<tool_call>\n{"name": "add_point", "arguments": {"point_2d": [500, 500], "point_type": "positive"}}\n</tool_call>'
STOP = '<tool_call>\n{"name": "stop_action", "arguments": {}}\n</tool_call>'
TRANSFORMERS_ONLY = ("suppress_tokens", "eos_token_id")


def image_digest(image) -> str:
    """A digest of an image's RGB pixels (the same for a PIL image and its PNG round trip)."""
    return hashlib.sha1(np.ascontiguousarray(np.asarray(image.convert("RGB"))).tobytes()).hexdigest()


def reply_for(digest: str, images_in_prompt: int) -> str:
    """The reply to a prompt holding ``images_in_prompt`` images whose first has ``digest``."""
    turns = 1 + int(digest[:8], 16) % 4
    turn = images_in_prompt  # 1 on the first turn
    if turn >= turns:
        return STOP
    return BOX if turn == 1 else POINT


def reply_ids(tokenizer, text: str) -> list:
    return tokenizer.encode(text, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def serve(tokenizer_dir: str, port: int, log_path: str | None, lenient: bool = False) -> ThreadingHTTPServer:
    """The server (not yet serving); ``lenient`` accepts transformers' words (to show what else goes wrong)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            path = self.path.split("?")[0]
            if path == "/health":
                self._send(200, {})
            elif path == "/v1/models":
                self._send(200, {"data": [{"id": "stand-in"}]})
            elif path == "/server_info":
                self._send(200, {"vllm_config": {"model_config": {"logprobs_mode": "processed_logprobs"}}})
            else:
                self._send(404, {"error": path})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/v1/chat/completions/render":
                parts = body["messages"][0]["content"]
                digests = [image_digest(Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",", 1)[1]))))
                           for p in parts]
                self._send(200, {"features": {"mm_placeholders": {"image": [{"offset": 0, "length": 0}] * len(parts)},
                                              "digests": digests}})
            elif self.path == "/inference/v1/generate":
                params = body["sampling_params"]
                bad = [k for k in TRANSFORMERS_ONLY if k in params]
                if bad and not lenient:
                    self._send(400, {"error": f"SamplingParams has no field(s) {bad}"})
                    return
                features = body["features"]
                ids = reply_ids(tokenizer, reply_for(features["digests"][0], len(features["digests"])))
                if log_path:
                    with lock, open(log_path, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps({"sampling_params": params, "prompt_length": len(body["token_ids"])}) + "\n")
                self._send(200, {"choices": [{"token_ids": ids, "logprobs": {"content": [
                    {"token": f"token_id:{t}", "logprob": -1.0, "top_logprobs": []} for t in ids]}}]})
            else:
                self._send(404, {"error": self.path})

    return ThreadingHTTPServer(("127.0.0.1", port), Handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log")
    parser.add_argument("--lenient", action="store_true", help="accept suppress_tokens/eos_token_id (vLLM does not)")
    args = parser.parse_args()
    server = serve(args.tokenizer, args.port, args.log, args.lenient)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
