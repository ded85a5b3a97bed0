"""The ``vlm_judge`` reward against a real local server speaking OpenAI's chat-completions API.

The server's judge is a rule of the request itself: it decodes the data-URL PNG and answers
``Score: <round(10 x mean brightness)> + <the caption's length mod 3>``, so every score checks
that the image and the prompt both arrived where the API puts them.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from advantageflow.rewards import RewardError, build_reward


def judge_value(png: bytes, caption: str) -> int:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64) / 255
    return int(round(10 * pixels.mean())) // 2 + len(caption) % 3


class ChatServer(BaseHTTPRequestHandler):
    """``POST /v1/chat/completions``; captions starting with ``slow``, ``garbage``, ``flaky``
    or ``huge`` misbehave in the obvious way."""

    inflight = 0
    peak = 0
    calls: list = []
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802 - http.server's naming
        cls = type(self)
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        # A request counts as in flight from its arrival until its reply starts: counting it until
        # the reply is written would race a client that already has the reply and sends the next.
        with cls.lock:
            cls.inflight += 1
            cls.peak = max(cls.peak, cls.inflight)
        try:
            reply = self._answer(req)
        finally:
            with cls.lock:
                cls.inflight -= 1
        self._send(*reply)

    def _answer(self, req: dict) -> tuple[int, dict]:
        cls = type(self)
        (message,) = req["messages"]
        image_part, text_part = message["content"]
        url = image_part["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        png = base64.b64decode(url.split(",", 1)[1])
        caption = re.search(r"Caption: (.*)$", text_part["text"]).group(1)
        with cls.lock:
            cls.calls.append((req["model"], caption, self.headers.get("Authorization")))
            attempt = sum(c[1] == caption for c in cls.calls)
        time.sleep(0.15)  # long enough for concurrent requests to overlap
        if caption.startswith("slow"):
            time.sleep(1.5)
        if caption.startswith("flaky") and attempt == 1:
            return 503, {"error": {"message": "overloaded"}}
        if caption.startswith("garbage"):
            text = "I cannot rate this image."
        elif caption.startswith("huge"):
            text = "Score: 99"
        else:
            text = f"The colours are fine.\nScore: {judge_value(png, caption)}"
        return 200, {
            "id": "x",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
        }

    def _send(self, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat():
    handler = type("Chat", (ChatServer,), {"inflight": 0, "peak": 0, "calls": [], "lock": threading.Lock()})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def judge(url: str, **kw):
    args = {"url": url, "model": "judge-7b", "prompt_template": "Rate 0-10.\nCaption: {prompt}", "retries": 0}
    return build_reward("vlm_judge", {**args, **kw})


def grey(values: list[float], size: int = 8) -> torch.Tensor:
    return torch.tensor(values).view(-1, 1, 1, 1).expand(-1, 3, size, size).contiguous()


def test_scores_follow_the_image_and_the_prompt(chat):
    handler, url = chat
    reward = judge(url, api_key="sk-test")
    assert reward.differentiable is False and reward.url.endswith("/v1/chat/completions")
    images = grey([0.0, 1.0, 1.0, 0.6])
    prompts = ["a", "b", "abc", "a red {cube}"]  # braces in prompts are text, not format fields
    scores = reward(images, prompts, [{}] * 4)
    # value = round(10 * brightness) // 2 + len(caption) % 3, on the default 0-10 scale
    expected = torch.tensor([0 + 1, 5 + 1, 5 + 0, 3 + 0]) / 10
    assert torch.allclose(scores, expected), scores
    assert {c[0] for c in handler.calls} == {"judge-7b"}
    assert {c[2] for c in handler.calls} == {"Bearer sk-test"}
    assert sorted(c[1] for c in handler.calls) == sorted(prompts)


def test_scale_maps_linearly_to_unit_interval(chat):
    _, url = chat
    reward = judge(url, scale_min=1, scale_max=6)
    assert torch.allclose(reward(grey([1.0]), ["abc"], [{}]), torch.tensor([(5 - 1) / 5]))


def test_concurrency_is_bounded(chat):
    handler, url = chat
    reward = judge(url, concurrency=2)
    start = time.perf_counter()
    reward(grey([0.5] * 6), [f"p{i}" for i in range(6)], [{}] * 6)
    assert handler.peak == 2, handler.peak  # overlapping, never more than 2
    assert time.perf_counter() - start >= 3 * 0.15
    pickle.loads(pickle.dumps(reward))  # process workers can receive it


def test_unparseable_and_out_of_scale_replies_fail_clearly(chat):
    handler, url = chat
    with pytest.raises(RewardError, match=r"image 1: .*after 2 attempts.*no score in the reply 'I cannot rate"):
        judge(url, retries=1, backoff=0)(grey([0.5, 0.5]), ["fine", "garbage"], [{}, {}])
    assert sum(c[1] == "garbage" for c in handler.calls) == 2  # retried once
    with pytest.raises(RewardError, match=r"score 99 is outside the scale \[0, 10\]"):
        judge(url)(grey([0.5]), ["huge"], [{}])


def test_timeouts_and_transient_errors(chat):
    handler, url = chat
    with pytest.raises(RewardError, match=r"after 1 attempts; last error: timed out.*timeout 0.5 s"):
        judge(url, timeout=0.5)(grey([0.5]), ["slow"], [{}])
    # a 503 is retried with backoff, then the answer counts
    reward = judge(url, retries=2, backoff=0.05)
    assert torch.allclose(reward(grey([1.0]), ["flaky"], [{}]), torch.tensor([(5 + 2) / 10]))
    assert reward.attempts_made == 2
    # a 404 (wrong path) is not retried
    with pytest.raises(RewardError, match="refused the request: HTTP 404"):
        judge(url + "/v2/chat/completions", retries=3)(grey([0.5]), ["x"], [{}])


def test_arguments_checked():
    with pytest.raises(ValueError, match="needs a group"):
        build_reward("vlm_judge", {"url": "http://127.0.0.1:1", "model": "m", "score_pattern": r"\d+"})
    with pytest.raises(ValueError, match="scale_max > scale_min"):
        build_reward("vlm_judge", {"url": "http://127.0.0.1:1", "model": "m", "scale_min": 5, "scale_max": 5})
    with pytest.raises(ValueError, match="missing required argument"):
        build_reward("vlm_judge", {"url": "http://127.0.0.1:1"})
    assert build_reward("vlm_judge", {"url": "http://h:1/v1", "model": "m"}).url == "http://h:1/v1/chat/completions"
