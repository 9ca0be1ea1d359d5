"""A policy served by an OpenAI-compatible chat server (vLLM, SGLang, ...), for departments
that serve one model to many workers across GPUs.

* The conversation is :meth:`Profile.build_messages`, as for the local ``qwen``
  policy; images travel as lossless PNG data URLs at the profile's policy image
  size, so a server running the same model folder (its processor and chat
  template) sees the same tokens the local policy would build.
* Greedy (``temperature`` 0), at most the profile's ``max_new_tokens``; the
  episodes of a batch go as concurrent requests (``batch_size`` at a time) and
  the server batches them.
* The reply text is parsed with :func:`~MedSAMAgentLib.actions.parse_action`.
  A server that parses tool calls itself (vLLM's ``--enable-auto-tool-choice``)
  returns them as ``tool_calls``; they are written back as the released
  ``<tool_call>`` text, so both server set-ups give the same decisions.
* The API key, when the server wants one, comes from the environment variable
  ``MEDSAM_AGENT_POLICY_API_KEY`` (never from a command line).
* Transport (``transport``): the ``openai`` client library where it is installed (its
  timeouts, retries with exponential backoff on 408/409/429/5xx and connection errors, keys,
  TLS and proxies), else a standard-library POST that retries 429 and 5xx the same number of
  times with backoff (honouring ``Retry-After``).  Either way the same request body goes out and
  errors are one :class:`PolicyError` sentence with the server's own words.
"""
from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
from PIL import Image

from ..actions import parse_action
from ..profile import Profile
from .base import Decision, Observation, PolicyError

API_KEY_ENV = "MEDSAM_AGENT_POLICY_API_KEY"
TRANSPORTS = ("auto", "openai", "urllib")


def openai_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("openai") is not None


def png_data_url(image) -> str:
    """An RGB image (H x W x 3 uint8 array or PIL image) as a ``data:image/png;base64,...`` URL."""
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def to_openai_messages(messages: list[dict]) -> list[dict]:
    """Profile messages (``{"type": "image", "image": ...}`` parts) in the OpenAI chat format
    (``{"type": "image_url", "image_url": {"url": data URL}}``); text parts unchanged."""
    out = []
    for message in messages:
        parts = []
        for part in message["content"]:
            if part["type"] == "image":
                parts.append({"type": "image_url", "image_url": {"url": png_data_url(part["image"])}})
            else:
                parts.append({"type": "text", "text": part["text"]})
        out.append({"role": message["role"], "content": parts})
    return out


def reply_text(message: dict) -> str:
    """The assistant's text; server-parsed ``tool_calls`` written back as ``<tool_call>`` blocks."""
    text = message.get("content") or ""
    for call in message.get("tool_calls") or []:
        function = call.get("function", {})
        arguments = function.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            pass  # left as the server sent it; the parser reports it
        block = json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)
        text = f"{text}\n<tool_call>\n{block}\n</tool_call>" if text else f"<tool_call>\n{block}\n</tool_call>"
    return text


class OpenAIServerPolicy:
    name = "openai"

    def __init__(self, url: str, model: str, profile: Profile | None = None, batch_size: int = 8,
                 max_new_tokens: int | None = None, timeout: float = 120.0, api_key: str | None = None,
                 transport: str = "auto", retries: int = 2, backoff_s: float = 0.5):
        """``url``: the server's API root (``http://gpu-server:8000/v1``); ``model``: the name it serves;
        ``retries``: further tries of a request the server answered 429/5xx (or never answered)."""
        parts = urllib.parse.urlsplit(url or "")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise PolicyError(f"The policy server address '{url}' is not an http(s) URL, e.g. http://gpu-server:8000/v1.")
        if not model:
            raise PolicyError("The openai policy needs --model: the model name the server serves.")
        self.url = url.rstrip("/")
        self.model_id = model
        self.profile = profile or Profile.load()
        self.batch_size = max(1, int(batch_size))
        self.max_new_tokens = int(max_new_tokens or self.profile.max_new_tokens)
        self.timeout = float(timeout)
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        if transport not in TRANSPORTS:
            raise PolicyError(f"Unknown transport '{transport}': {', '.join(TRANSPORTS)}.")
        if transport == "openai" and not openai_installed():
            raise PolicyError("The openai transport needs the openai package (pip install openai).")
        self.transport = ("openai" if openai_installed() else "urllib") if transport == "auto" else transport
        self.retries, self.backoff_s = max(0, int(retries)), float(backoff_s)
        self._client = None
        if self.transport == "openai":
            import openai

            self._client = openai.OpenAI(base_url=self.url, api_key=self.api_key or "none", timeout=self.timeout,
                                         max_retries=self.retries)

    def messages(self, obs: Observation) -> list[dict]:
        """The chat messages for one observation, as the profile builds them (PIL images)."""
        images = [Image.fromarray(np.asarray(im)) for im in obs.images]
        return self.profile.build_messages(obs.target, images, obs.replies)

    def request_body(self, obs: Observation) -> dict:
        return {"model": self.model_id, "messages": to_openai_messages(self.messages(obs)),
                "max_tokens": self.max_new_tokens, "temperature": 0.0}

    def complete(self, body: dict) -> str:
        """One chat completion; its reply text.  Raises PolicyError with the server's own words."""
        answer = self._with_openai(body) if self._client is not None else self._with_urllib(body)
        try:
            return reply_text(answer["choices"][0]["message"])
        except (KeyError, IndexError, TypeError, AttributeError):  # e.g. "message": null, a tool call not an object
            raise PolicyError(f"The policy server {self.url} answered without a reply: {str(answer)[:200]}") from None

    def _refused(self, status: int, detail: str) -> PolicyError:
        hint = f" Set {API_KEY_ENV}." if status in (401, 403) else ""
        return PolicyError(f"The policy server {self.url} refused the request ({status}): {detail[:300]}{hint}")

    def _unreachable(self, reason) -> PolicyError:
        return PolicyError(f"Cannot reach the policy server at {self.url} ({reason}). Is it running (for example "
                           f"'vllm serve MODEL'), and is the address right?")

    def _with_openai(self, body: dict) -> dict:
        """The completion through the ``openai`` client, as a plain dict (as the server sent it)."""
        import openai

        try:
            raw = self._client.chat.completions.with_raw_response.create(**body)
            return json.loads(raw.http_response.text)
        except openai.APIStatusError as exc:
            return self._raise(self._refused(exc.status_code, exc.response.text))
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            return self._raise(self._unreachable(type(exc).__name__.replace("API", "").replace("Error", " error")))
        except ValueError:
            return self._raise(PolicyError(f"The policy server {self.url} did not answer with JSON; is it an "
                                           f"OpenAI-compatible server?"))

    @staticmethod
    def _raise(error: PolicyError):
        raise error from None

    def _with_urllib(self, body: dict) -> dict:
        """The completion through a standard-library POST, retrying 429 and 5xx with backoff."""
        for attempt in range(self.retries + 1):
            try:
                return self._post(body)
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode("utf-8", "replace")
                if exc.code not in (408, 409, 429) and exc.code < 500 or attempt == self.retries:
                    raise self._refused(exc.code, detail) from None
                wait = exc.headers.get("Retry-After") if exc.headers else None
            except (urllib.error.URLError, OSError) as exc:
                if attempt == self.retries:
                    raise self._unreachable(getattr(exc, "reason", exc)) from None
                wait = None
            except ValueError:
                raise PolicyError(f"The policy server {self.url} did not answer with JSON; is it an "
                                  f"OpenAI-compatible server?") from None
            try:
                delay = min(30.0, float(wait)) if wait else self.backoff_s * 2 ** attempt
            except ValueError:
                delay = self.backoff_s * 2 ** attempt
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.url}/chat/completions", data=json.dumps(body).encode("utf-8"),
                                         headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read().decode("utf-8"))

    def act(self, observations: Sequence[Observation]) -> list[Decision]:
        bodies = [self.request_body(o) for o in observations]
        with ThreadPoolExecutor(max_workers=min(self.batch_size, max(1, len(bodies)))) as pool:
            texts = list(pool.map(self.complete, bodies))
        return [Decision(t, parse_action(t)) for t in texts]
