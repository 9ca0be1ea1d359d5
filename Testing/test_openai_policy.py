"""The openai policy against an OpenAI-compatible chat server on 127.0.0.1.

vLLM cannot run here (no GPU), so the server below speaks the same wire format
(``POST /v1/chat/completions``) in front of a real tiny Qwen3-VL: it turns the
image data URLs back into pictures, applies the model folder's own chat template
and generates greedily, as vLLM does with the same folder.  The policy must give
exactly the replies the local qwen policy gives.
"""
import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from MedSAMAgentLib.actions import Box, parse_action
from MedSAMAgentLib.agent import Agent, Episode
from MedSAMAgentLib.builders import ChoiceError, build_policy
from MedSAMAgentLib.policies import PolicyError, create_policy
from MedSAMAgentLib.policies.base import Observation
from MedSAMAgentLib.policies.openai_server import API_KEY_ENV
from MedSAMAgentLib.tools import create_tool

from conftest import synthetic_case


class ChatServer:
    """``/v1/chat/completions`` serving a transformers model; ``tool_calls=True`` answers as vLLM's
    tool parser does (calls in ``tool_calls``, no text); ``api_key`` demands a Bearer key."""

    def __init__(self, model_dir, served_name="medsam-agent", api_key=None, tool_calls=False):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
        self.served_name, self.api_key, self.tool_calls = served_name, api_key, tool_calls
        self.requests, self.lock = [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "not found"}})
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self._send(401, {"error": {"message": "invalid api key"}})
                if body.get("model") != server.served_name:
                    return self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
                server.requests.append(body)
                return self._send(200, server.complete(body))

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def complete(self, body):
        import torch

        messages = []
        for m in body["messages"]:
            parts = []
            for p in m["content"]:
                if p["type"] == "image_url":
                    raw = base64.b64decode(p["image_url"]["url"].split(",", 1)[1])
                    parts.append({"type": "image", "image": Image.open(io.BytesIO(raw)).convert("RGB")})
                else:
                    parts.append({"type": "text", "text": p["text"]})
            messages.append({"role": m["role"], "content": parts})
        with self.lock, torch.inference_mode():
            inputs = self.processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                        return_dict=True, return_tensors="pt")
            out = self.model.generate(**inputs, max_new_tokens=body["max_tokens"], do_sample=False)
        text = self.processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        message = {"role": "assistant", "content": text}
        if self.tool_calls and "<tool_call>" in text:
            call = json.loads(text.split("<tool_call>", 1)[1].split("</tool_call>", 1)[0])
            message = {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call0", "type": "function",
                 "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]}
        return {"object": "chat.completion", "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def chat_server():
    servers = []

    def start(model_dir, **kw):
        servers.append(ChatServer(model_dir, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.mark.parametrize("transport", ["openai", "urllib"])
def test_served_random_model_replies_exactly_as_the_local_policy(tiny_qwen_dir, chat_server, transport):
    """A random model's replies change with any change of its input tokens: equal replies over several
    turns mean the server saw the conversation the local policy builds (images lossless); through the
    openai client and through the standard-library fallback alike."""
    server = chat_server(tiny_qwen_dir)
    remote = create_policy("openai", url=server.url, model="medsam-agent", batch_size=3, transport=transport)
    assert remote.transport == transport
    local = create_policy("qwen", model=tiny_qwen_dir, device="cpu")
    rng = np.random.default_rng(3)
    imgs = [rng.integers(0, 255, (512, 512, 3), dtype=np.uint8) for _ in range(3)]
    obs = [Observation("a", "liver", 0, imgs[:1]), Observation("b", "left kidney", 1, imgs[:2], ["first reply"]),
           Observation("c", "aorta", 2, imgs, ["r1", "r2"])]
    assert [d.text for d in remote.act(obs)] == [d.text for d in local.act(obs)]
    assert len(server.requests) == 3
    for body in server.requests:
        assert body["temperature"] == 0.0 and body["max_tokens"] == remote.profile.max_new_tokens


@pytest.mark.parametrize("tool_calls", [False, True])
def test_full_episodes_through_the_server_match_the_local_policy(taught_qwen_dir, chat_server, tool_calls):
    server = chat_server(taught_qwen_dir, tool_calls=tool_calls)
    remote = build_policy("openai", model="medsam-agent", policy_url=server.url)
    local = create_policy("qwen", model=taught_qwen_dir, device="cpu")
    episodes = [Episode(f"e{i}", synthetic_case(i)[0], target=t, reference=synthetic_case(i)[1])
                for i, t in enumerate(["liver", "spleen"])]
    tool = create_tool("classical")
    served, direct = Agent(remote, tool).run(episodes), Agent(local, tool).run(episodes)
    for a, b in zip(served, direct):
        assert [s.action for s in a.steps] == [s.action for s in b.steps]
        assert [s.action and s.action["name"] for s in a.steps] == ["add_bbox", "add_point", "stop_action"]
        assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.mask_steps, b.mask_steps))
    if tool_calls:  # the calls the server parsed come back as the released text, which parses the same
        assert isinstance(parse_action(served[0].steps[0].text), Box)
        assert served[0].steps[0].text.startswith("<tool_call>\n{")


@pytest.mark.parametrize("transport", ["openai", "urllib"])
def test_policy_server_errors_are_one_clear_message(tiny_qwen_dir, chat_server, monkeypatch, transport):
    import functools
    import socket

    create = functools.partial(create_policy, transport=transport, backoff_s=0.05)

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    obs = [Observation("a", "liver", 0, [np.zeros((64, 64, 3), np.uint8)])]
    with pytest.raises(PolicyError, match="Cannot reach the policy server"):
        create("openai", url=f"http://127.0.0.1:{port}/v1", model="m", timeout=5).act(obs)
    server = chat_server(tiny_qwen_dir, api_key="s3cret")
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with pytest.raises(PolicyError, match=rf"refused the request \(401\).*{API_KEY_ENV}"):
        create("openai", url=server.url, model="medsam-agent").act(obs)
    with pytest.raises(PolicyError, match="does not exist"):
        create("openai", url=server.url, model="other", api_key="s3cret").act(obs)
    monkeypatch.setenv(API_KEY_ENV, "s3cret")
    assert len(create("openai", url=server.url, model="medsam-agent").act(obs)) == 1
    with pytest.raises(PolicyError, match="not an http"):
        create("openai", url="gpu-server:8000", model="m")
    with pytest.raises(ChoiceError, match="--policy-url"):
        build_policy("openai", model="m")


@pytest.mark.parametrize("transport", ["openai", "urllib"])
def test_a_malformed_server_reply_is_one_clear_message(transport):
    """A server that answers JSON of the wrong shape ("message": null) gets the policy's own error."""
    import http.server
    import threading

    class Odd(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"choices": [{"message": None}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Odd)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        obs = [Observation("a", "liver", 0, [np.zeros((64, 64, 3), np.uint8)])]
        with pytest.raises(PolicyError, match="answered without a reply"):
            create_policy("openai", url=f"http://127.0.0.1:{server.server_port}/v1", model="m", timeout=5,
                          transport=transport).act(obs)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("transport", ["openai", "urllib"])
def test_a_busy_server_is_retried_with_backoff_then_answers(transport):
    """429 then 503, then a reply: both transports retry (the openai client's own backoff, or ours
    with Retry-After) and give the reply; with no retries left the last refusal is said."""
    import http.server
    import threading

    answers = [(429, {"error": {"message": "slow down"}}), (503, {"error": {"message": "warming up"}}),
               (200, {"choices": [{"message": {"role": "assistant", "content": "<tool_call>\n{\"name\": "
                                                "\"stop_action\", \"arguments\": {}}\n</tool_call>"}}]})]
    seen = []

    class Busy(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            status, payload = answers[min(len(seen), len(answers) - 1)]
            seen.append(status)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 429:
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/v1"
    obs = [Observation("a", "liver", 0, [np.zeros((32, 32, 3), np.uint8)])]
    try:
        decision, = create_policy("openai", url=url, model="m", transport=transport, retries=2, backoff_s=0.05).act(obs)
        assert seen == [429, 503, 200] and decision.text.startswith("<tool_call>")
        seen.clear()
        with pytest.raises(PolicyError, match=r"refused the request \(503\).*warming up"):
            create_policy("openai", url=url, model="m", transport=transport, retries=1, backoff_s=0.05).act(obs)
        assert seen == [429, 503]
    finally:
        server.shutdown()
        server.server_close()
