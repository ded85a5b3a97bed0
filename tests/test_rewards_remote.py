"""The reward server and the ``remote`` client, on 127.0.0.1 only."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from advantageflow.rewards import CompositeReward, RewardError, build_reward
from advantageflow.rewards.server import serve
from advantageflow.rewards.wire import BadRequest, decode_request, encode_request


def images(batch: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


class SumReward:
    """Deterministic, identifies each sample: sum of its values (+ a logged part)."""

    differentiable = False

    def __init__(self, delay: float = 0.0, parts: bool = False) -> None:
        self.delay, self.parts, self.calls, self.sizes = delay, parts, 0, []

    def __call__(self, x, prompts, metadata):
        self.calls += 1
        self.sizes.append(x.shape[0])
        time.sleep(self.delay)
        total = x.flatten(1).sum(1)
        if self.parts:
            return {"score": total, "length": torch.tensor([float(len(p)) for p in prompts])}
        return total


class FailingReward:
    def __call__(self, x, prompts, metadata):
        raise RuntimeError("boom")


class NaNReward:
    def __call__(self, x, prompts, metadata):
        return torch.full((x.shape[0],), float("nan"))


@pytest.fixture
def jpeg_server():
    server = serve("jpeg_incompressibility", max_bytes=2_000_000)
    yield server
    server.shutdown()


def post(url: str, body: bytes, content_type: str = "application/json", headers: dict | None = None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", "/score", body=body, headers={"Content-Type": content_type, **(headers or {})})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read() or b"{}")
    conn.close()
    return out


def assert_alive(url: str) -> None:
    x = torch.full((1, 3, 8, 8), 0.5)
    status, body = post(url, encode_request(x, [""], None, "png"))
    assert status == 200 and len(body["scores"]) == 1


def test_server_scores_exactly_as_in_process(jpeg_server):
    x = images(4, 32)
    prompts = ["a", "b", "c", "d"]
    local = build_reward("jpeg_incompressibility")(x, prompts, [{}] * 4)
    remote = build_reward("remote", {"url": jpeg_server.url})
    got = remote(x, prompts, [{}] * 4)
    assert torch.equal(got, local)  # the JPEG reward quantises to 8 bits exactly as PNG does
    conn = http.client.HTTPConnection(*jpeg_server.server_address[:2], timeout=5)
    conn.request("GET", "/health")
    health = json.loads(conn.getresponse().read())
    assert health["status"] == "ok" and health["reward"] == "jpeg_incompressibility"


def test_float32_arrays_carry_non_image_samples_exactly():
    server = serve("toy2d_smooth")
    try:
        points = torch.randn(64, 2, generator=torch.Generator().manual_seed(1)) * 3
        local = build_reward("toy2d_smooth")(points, [""] * 64, [{}] * 64)
        got = build_reward("remote", {"url": server.url})(points, [""] * 64, [{}] * 64)
        assert torch.equal(got, local)
        # an image sent as float32 is not quantised
        reward = SumReward()
        server2 = serve("sum", reward=reward)
        x = images(2)
        exact = build_reward("remote", {"url": server2.url, "encoding": "float32"})(x, ["", ""], [{}, {}])
        assert torch.allclose(exact, x.flatten(1).sum(1), rtol=0, atol=1e-4)
        server2.shutdown()
    finally:
        server.shutdown()


def test_named_parts_reach_composite_logging():
    server = serve("sum", reward=SumReward(parts=True))
    try:
        comp = CompositeReward({"remote": build_reward("remote", {"url": server.url})}, {"remote": 2.0})
        x = images(2)
        res = comp(x, ["ab", "abcd"], [{}, {}])
        assert torch.equal(res.components["remote/length"], torch.tensor([2.0, 4.0]))
        assert torch.allclose(res.total, 2 * res.components["remote"])
    finally:
        server.shutdown()


def test_token_required():
    server = serve("sum", reward=SumReward(), token="s3cret")
    try:
        client = build_reward("remote", {"url": server.url, "retries": 3, "backoff": 0.0})
        with pytest.raises(RewardError, match="HTTP 401"):
            client(images(1), [""], [{}])
        assert client.attempts_made == 1  # a wrong token is not retried
        wrong = build_reward("remote", {"url": server.url, "token": "nope"})
        with pytest.raises(RewardError, match="401"):
            wrong(images(1), [""], [{}])
        ok = build_reward("remote", {"url": server.url, "token": "s3cret"})
        assert ok(images(1), [""], [{}]).shape == (1,)
        status, _ = post(server.url, b"{}")
        assert status == 401
    finally:
        server.shutdown()


def test_server_rejects_oversized_and_stays_up():
    server = serve("jpeg_incompressibility", max_bytes=1000)
    try:
        body = encode_request(images(4, 32), [""] * 4, None, "png")
        assert len(body) > 1000
        status, err = post(server.url, body)
        assert status == 413 and "limit" in err["error"]
        # announced size only (no body sent): refused before reading
        host, port = server.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.putrequest("POST", "/score")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(10**9))
        conn.endheaders()
        assert conn.getresponse().status == 413
        conn.close()
        client = build_reward("remote", {"url": server.url, "retries": 2, "backoff": 0})
        with pytest.raises(RewardError, match="413"):
            client(images(4, 32), [""] * 4, [{}] * 4)
        assert_alive(server.url)
    finally:
        server.shutdown()


def _png_b64(size=(8, 8)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, "red").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_server_rejects_malformed_and_pickled_payloads(jpeg_server):
    url = jpeg_server.url
    good = _png_b64()
    truncated = base64.b64encode(base64.b64decode(good)[:30]).decode()
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    cases = [
        b"not json",
        b"\xff\xfe\x00",
        b"[1, 2]",
        b'{"images": ["' + good.encode() + b'"], "prompts": [NaN]}',
        json.dumps({"images": [good], "prompts": []}).encode(),
        json.dumps({"images": ["%%%"], "prompts": [""]}).encode(),
        json.dumps({"images": [base64.b64encode(b"hello").decode()], "prompts": [""]}).encode(),
        json.dumps({"images": [truncated], "prompts": [""]}).encode(),
        json.dumps({"images": [base64.b64encode(jpeg.getvalue()).decode()], "prompts": [""]}).encode(),
        json.dumps({"images": [good, _png_b64((4, 4))], "prompts": ["", ""]}).encode(),
        json.dumps({"images": [good], "prompts": [""], "extra": 1}).encode(),
        json.dumps({"images": [good], "prompts": [""], "metadata": [1]}).encode(),
        json.dumps({"prompts": [""]}).encode(),
        json.dumps({"array": {"dtype": "float64", "shape": [1], "data": ""}, "prompts": [""]}).encode(),
        json.dumps({"array": {"dtype": "float32", "shape": [2], "data": "AAAA"},
                    "prompts": ["", ""]}).encode(),
        b"[" * 100000 + b"]" * 100000,
    ]
    for body in cases:
        status, err = post(url, body)
        assert status == 400, (body[:80], status, err)
        assert isinstance(err["error"], str)
    pickled = pickle.dumps({"images": [torch.zeros(3)], "prompts": [""]})
    assert post(url, pickled)[0] == 400
    assert post(url, pickled, content_type="application/python-pickle")[0] == 415
    assert post(url, json.dumps({"images": [good], "prompts": [""]}).encode(), "text/plain")[0] == 415
    assert_alive(url)


def test_reward_failure_is_500_and_client_gives_up_clearly():
    for reward, msg in [(FailingReward(), "boom"), (NaNReward(), "non-finite")]:
        server = serve("bad", reward=reward)
        try:
            client = build_reward("remote", {"url": server.url, "retries": 1, "backoff": 0.0})
            with pytest.raises(RewardError, match=f"after 2 attempts.*HTTP 500.*{msg}"):
                client(images(1), [""], [{}])
            assert client.attempts_made == 2
        finally:
            server.shutdown()


def test_client_timeout_on_slow_server():
    server = serve("slow", reward=SumReward(delay=0.8))
    try:
        client = build_reward("remote", {"url": server.url, "timeout": 0.2, "retries": 1, "backoff": 0.05})
        start = time.monotonic()
        with pytest.raises(RewardError, match="(?i)timed out"):
            client(images(1), [""], [{}])
        assert time.monotonic() - start < 1.4  # two waits on the slow reward would take 1.6 s
        assert client.attempts_made == 2
    finally:
        server.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_when_server_is_down_backs_off_then_fails():
    url = f"http://127.0.0.1:{_free_port()}"
    client = build_reward("remote", {"url": url, "retries": 2, "backoff": 0.1})
    start = time.monotonic()
    with pytest.raises(RewardError, match="(?i)failed after 3 attempts.*refused"):
        client(images(1), [""], [{}])
    assert time.monotonic() - start >= 0.1 + 0.2  # waits 0.1 then 0.2
    assert client.attempts_made == 3


def test_client_survives_server_restart():
    reward = SumReward()
    server = serve("sum", reward=reward)
    port = server.server_address[1]
    client = build_reward("remote", {"url": server.url, "retries": 6, "backoff": 0.1})
    x = images(2)
    first = client(x, ["", ""], [{}, {}])
    server.shutdown()
    restarted = {}

    def restart():
        time.sleep(0.4)
        restarted["server"] = serve("sum", reward=SumReward(), port=port)

    thread = threading.Thread(target=restart)
    thread.start()
    try:
        before = client.attempts_made
        second = client(x, ["", ""], [{}, {}])
        assert torch.equal(first, second)
        assert client.attempts_made - before >= 2  # failed while down, then succeeded
    finally:
        thread.join()
        restarted["server"].shutdown()


class _Garbage(BaseHTTPRequestHandler):
    body = b""

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


@pytest.mark.parametrize("body,reason", [
    (b"<html>oops</html>", "not JSON"),
    (b'{"score": [1]}', "no 'scores'"),
    (b'{"scores": [1.0]}', "should hold 2"),
    (b'{"scores": [1.0, NaN]}', "not JSON"),
    (b'{"scores": [1.0, 1e999]}', "non-finite"),
    (b'{"scores": [1.0, "2"]}', "non-numbers"),
    (b'{"scores": [true, 1]}', "non-numbers"),
    (b'{"scores": [1, 2], "components": {"a": [1]}}', "should hold 2"),
])
def test_client_rejects_garbage_responses(body, reason):
    handler = type("H", (_Garbage,), {"body": body})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        client = build_reward("remote", {"url": f"http://127.0.0.1:{httpd.server_address[1]}",
                                         "retries": 1, "backoff": 0.0})
        with pytest.raises(RewardError, match=f"invalid response.*{reason}"):
            client(images(2), ["", ""], [{}, {}])
        assert client.attempts_made == 2
    finally:
        httpd.shutdown()
        httpd.server_close()


class _CutShort(_Garbage):
    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b'{"scores": [1.0, ')  # then the connection closes


def test_client_retries_a_reply_cut_short():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _CutShort)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        client = build_reward("remote", {"url": f"http://127.0.0.1:{httpd.server_address[1]}",
                                         "retries": 2, "backoff": 0.0})
        with pytest.raises(RewardError, match="after 3 attempts.*cut short: 17 of 1000 bytes"):
            client(images(2), ["", ""], [{}, {}])
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_server_coalesces_concurrent_requests():
    reward = SumReward(delay=0.3)
    server = serve("sum", reward=reward, max_batch=64)
    try:
        client = build_reward("remote", {"url": server.url, "encoding": "float32"})
        inputs = [torch.full((2, 3), float(i)) for i in range(8)]
        results: dict[int, torch.Tensor] = {}

        def work(i):
            results[i] = client(inputs[i], ["", ""], [{}, {}])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(8):
            assert torch.equal(results[i], torch.full((2,), 3.0 * i))
        assert sum(reward.sizes) == 16
        assert reward.calls < 8 and max(reward.sizes) > 2  # coalesced
    finally:
        server.shutdown()


def test_served_as_a_real_subprocess():
    """``advantageflow serve-reward`` (the CLI wraps ``advantageflow.rewards.server.main``)."""
    env = dict(os.environ, ADVANTAGEFLOW_REWARD_TOKEN="tok")
    proc = subprocess.Popen(
        [sys.executable, "-m", "advantageflow", "serve-reward", "jpeg_incompressibility", "--port", "0",
         "--arg", "quality=80"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving reward 'jpeg_incompressibility' on http://127.0.0.1:"), (
            line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" on ")[1].strip()
        x = images(3, 32)
        got = build_reward("remote", {"url": url, "token": "tok"})(x, [""] * 3, [{}] * 3)
        local = build_reward("jpeg_incompressibility", {"quality": 80})(x, [""] * 3, [{}] * 3)
        assert torch.equal(got, local)
        assert post(url, b"{}")[0] == 401  # token taken from the environment
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0  # (generous: a busy test machine)


def test_serve_reward_cli_errors():
    from advantageflow.rewards.server import main

    assert main(["no_such_reward_name", "--port", "0"]) == 2
    with pytest.raises(SystemExit):
        main(["jpeg_compressibility", "--arg", "novalue"])


@settings(max_examples=150, deadline=None)
@given(st.one_of(
    st.binary(max_size=300),
    st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
                 lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                 max_leaves=20).map(lambda o: json.dumps(o).encode()),
    st.fixed_dictionaries({
        "images": st.lists(st.text(max_size=40), max_size=3),
        "prompts": st.lists(st.text(max_size=5), max_size=3),
        "metadata": st.lists(st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), max_size=3),
    }).map(lambda o: json.dumps(o).encode()),
))
def test_request_parser_fuzz(body):
    """Any body either parses into a consistent request or is a BadRequest, nothing else."""
    try:
        req = decode_request(body, max_batch_items=8, max_pixels=4096)
    except BadRequest:
        return
    assert req.samples.shape[0] == len(req.prompts) == len(req.metadata)


def test_shapes_eval_served_with_named_parts_and_metadata():
    """The ShapesEval reward (dict output, JSON metadata) over the wire equals in-process."""
    import random

    from advantageflow.rewards.imageio import quantize
    from advantageflow.tasks.shapes.grammar import all_specs, to_prompt
    from advantageflow.tasks.shapes.scene import render, sample_scene

    rng = random.Random(0)
    specs = rng.sample(all_specs(), 6)
    x = render([sample_scene(s, rng) for s in specs])
    prompts, metadata = [to_prompt(s) for s in specs], [s.to_dict() for s in specs]
    local = build_reward("shapes_eval")
    server = serve("shapes_eval")
    try:
        for encoding, inputs in (("float32", x), ("png", quantize(x))):
            expected = local(inputs, prompts, metadata)
            got = build_reward("remote", {"url": server.url, "encoding": encoding})(x, prompts, metadata)
            assert set(got) == set(expected) == {"score", "strict"}
            for key in got:
                assert torch.equal(got[key], expected[key].float()), (encoding, key)
        assert expected["score"].mean() > 0.5  # rendered to spec: mostly right
    finally:
        server.shutdown()
