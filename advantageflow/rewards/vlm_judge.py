"""The ``vlm_judge`` reward: a vision-language model asked to grade each image, through any
OpenAI-compatible ``POST /v1/chat/completions`` endpoint (vLLM, SGLang, llama.cpp, TGI, hosted
APIs) -- the pattern of Flow-GRPO's UnifiedReward scorer.

Per image, one request::

    {"model": MODEL, "temperature": 0, "max_tokens": N,
     "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
         {"type": "text", "text": TEMPLATE with {prompt} replaced by the sample's prompt}]}]}

The reply's ``choices[0].message.content`` is searched with ``score_pattern``; its first group
is the score on ``[scale_min, scale_max]``, mapped linearly to ``[0, 1]``.  A reply without a
score or with one outside the scale is an error (retried, then the run stops with the reply
quoted), never a silent 0.  At most ``concurrency`` requests are in flight per reward object.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from advantageflow.rewards.base import RewardError
from advantageflow.rewards.imageio import check_images, encode_png

API_KEY_ENV = "ADVANTAGEFLOW_JUDGE_API_KEY"
DEFAULT_TEMPLATE = (
    "You are given a text caption and an image generated from it. Rate how well the image matches "
    "the caption and how good it looks, from {scale_min:g} (worst) to {scale_max:g} (best). "
    'Answer with one line "Score: <number>".\nCaption: {prompt}'
)
DEFAULT_PATTERN = r"(?i)score\s*[:=]?\s*\**\s*(-?\d+(?:\.\d+)?)"
FATAL_STATUS = {400, 401, 403, 404, 405, 413, 415, 422}
MAX_RESPONSE_BYTES = 4 * 2**20


class JudgeReplyError(ValueError):
    """A reply without a usable score (retried like a transient failure)."""


class VlmJudgeReward:
    """VLM-as-judge.  ``(B, 3, H, W)`` in [0, 1] -> ``(B,)`` in [0, 1].

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000`` (``/v1/chat/completions`` is appended
            unless the path already ends in ``/chat/completions``; a path ending in ``/v1``
            gets ``/chat/completions``).
        model: the ``model`` field of each request.
        prompt_template: the question; ``{prompt}``, ``{scale_min}`` and ``{scale_max}`` are
            filled in (other braces are left as they are).
        score_pattern: regular expression whose first group is the number (the first match
            in the reply counts).
        scale_min, scale_max: the judge's scale, mapped to [0, 1].
        api_key: bearer token; default ``$ADVANTAGEFLOW_JUDGE_API_KEY``, else none.
        timeout: seconds per attempt (connect, and each wait for the answer).
        retries: extra attempts per image after transient failures (connection errors,
            timeouts, HTTP 429/5xx, replies without a score), waiting ``backoff``,
            ``2 backoff``, ... (at most ``max_backoff``) seconds.
        concurrency: requests in flight at once (a thread pool of this size).
        max_tokens, temperature: sampling settings sent with each request.
    """

    differentiable = False
    builds_cheaply = True  # no request until the first score
    arg_ranges = {
        "timeout": ((">", 0),),
        "retries": ((">=", 0),),
        "backoff": ((">=", 0),),
        "max_backoff": ((">=", 0),),
        "concurrency": ((">=", 1), ("<=", 256)),
        "max_tokens": ((">=", 1),),
        "temperature": ((">=", 0),),
    }

    def __init__(
        self,
        url: str,
        model: str,
        prompt_template: str = DEFAULT_TEMPLATE,
        score_pattern: str = DEFAULT_PATTERN,
        scale_min: float = 0.0,
        scale_max: float = 10.0,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        concurrency: int = 8,
        max_tokens: int = 256,
        temperature: float = 0.0,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"vlm_judge reward: url must start with http:// or https://, got '{url}'")
        if not scale_max > scale_min:
            raise ValueError(f"vlm_judge reward: need scale_max > scale_min, got [{scale_min}, {scale_max}]")
        try:
            self.pattern = re.compile(score_pattern)
        except re.error as err:
            raise ValueError(f"vlm_judge reward: score_pattern is not a regular expression: {err}") from None
        if self.pattern.groups < 1:
            raise ValueError("vlm_judge reward: score_pattern needs a group around the number, e.g. 'Score: (\\d+)'")
        if retries < 0 or timeout <= 0 or backoff < 0 or concurrency < 1:
            raise ValueError("vlm_judge reward: need retries >= 0, timeout > 0, backoff >= 0, concurrency >= 1")
        self.url = _endpoint(url)
        self.model, self.template = model, prompt_template
        self.scale = (float(scale_min), float(scale_max))
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.timeout, self.retries = float(timeout), int(retries)
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.concurrency, self.max_tokens, self.temperature = int(concurrency), int(max_tokens), float(temperature)
        self.attempts_made = 0
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._opener = _opener(self.url)

    def question(self, prompt: str) -> str:
        """The text sent with an image (``str.replace``, so braces in prompts are harmless)."""
        lo, hi = self.scale
        return (
            self.template.replace("{scale_min}", f"{lo:g}")
            .replace("{scale_max}", f"{hi:g}")
            .replace("{prompt}", prompt)
        )

    def parse(self, reply: str) -> float:
        """A reply's text -> the score in [0, 1]; :class:`JudgeReplyError` when there is none."""
        match = self.pattern.search(reply)
        if match is None:
            raise JudgeReplyError(f"no score in the reply {_excerpt(reply)}")
        try:
            value = float(match.group(1))
        except (TypeError, ValueError):
            raise JudgeReplyError(f"'{match.group(1)}' is not a number (reply {_excerpt(reply)})") from None
        lo, hi = self.scale
        if not lo <= value <= hi:
            raise JudgeReplyError(f"score {value:g} is outside the scale [{lo:g}, {hi:g}] (reply {_excerpt(reply)})")
        return (value - lo) / (hi - lo)

    def _request(self, png: bytes, prompt: str) -> bytes:
        image_url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        content = [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": self.question(prompt)},
        ]
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        return json.dumps(body).encode()

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with self._lock:
            self.attempts_made += 1
        with self._opener.open(req, timeout=self.timeout) as resp:
            data = resp.read(MAX_RESPONSE_BYTES + 1)
        if len(data) > MAX_RESPONSE_BYTES:
            raise JudgeReplyError(f"response larger than {MAX_RESPONSE_BYTES} bytes")
        return _reply_text(data)

    def score_one(self, png: bytes, prompt: str) -> float:
        """One image's score, with retries; :class:`RewardError` once they are spent."""
        body = self._request(png, prompt)
        last = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))
            try:
                return self.parse(self._post(body))
            except urllib.error.HTTPError as err:
                detail = _excerpt(err.read(300).decode("utf-8", errors="replace"))
                if err.code in FATAL_STATUS:
                    raise RewardError(
                        f"vlm_judge at {self.url} refused the request: HTTP {err.code}: {detail}"
                    ) from err
                last = f"HTTP {err.code}: {detail}"
            except JudgeReplyError as err:
                last = f"unusable reply: {err}"
            except (OSError, http.client.HTTPException) as err:  # refused, reset, timeouts
                reason = getattr(err, "reason", err)
                kind = "timed out" if "timed out" in str(reason) else type(reason).__name__
                last = f"{kind}: {reason} (timeout {self.timeout:g} s)" if kind == "timed out" else f"{kind}: {reason}"
        raise RewardError(f"vlm_judge at {self.url} failed after {self.retries + 1} attempts; last error: {last}")

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        check_images(images, "vlm_judge")
        if len(prompts) != images.shape[0]:
            raise RewardError(f"vlm_judge reward: {len(prompts)} prompts for {images.shape[0]} images")
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="vlm-judge")
        futures = [self._pool.submit(self.score_one, png, p) for png, p in zip(encode_png(images), prompts)]
        scores = []
        for i, fut in enumerate(futures):
            try:
                scores.append(fut.result())
            except RewardError as err:
                for other in futures:
                    other.cancel()
                raise RewardError(f"image {i}: {err}") from err
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    def __getstate__(self) -> dict[str, Any]:  # picklable for process workers: no pool, no lock
        state = dict(self.__dict__)
        state.update(_pool=None, _lock=None, _opener=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._opener = _opener(self.url)


def _opener(url: str) -> urllib.request.OpenerDirector:
    """A server on this machine is never reached through ``$http_proxy``."""
    host = urllib.parse.urlsplit(url).hostname or ""
    local = host in ("localhost", "127.0.0.1", "::1")
    return urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if local else []))


def _endpoint(url: str) -> str:
    base = url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    if base.endswith("/v1"):
        return base + "/chat/completions"
    return base + "/v1/chat/completions"


def _reply_text(data: bytes) -> str:
    """``choices[0].message.content`` of an OpenAI-style answer (a string, or text parts)."""
    try:
        obj = json.loads(data.decode("utf-8"))
        content = obj["choices"][0]["message"]["content"]
    except (UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError) as err:
        raise JudgeReplyError(f"not an OpenAI chat completion ({type(err).__name__}): {_excerpt(data[:300])}") from None
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise JudgeReplyError(f"message content is a {type(content).__name__}, not text")
    return content


def _excerpt(text: Any, limit: int = 160) -> str:
    text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
    one_line = " ".join(text.split())
    return repr(one_line if len(one_line) <= limit else one_line[:limit] + "...")
