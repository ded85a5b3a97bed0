"""Other projects' reward-server protocols, each against a real server on 127.0.0.1:
Flow-Factory's JSON ``/compute`` (served by ``serve-reward`` and called by ``remote``) and
Flow-GRPO's pickle protocol (client only; replies read through the restricted unpickler)."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import threading
import urllib.error
import urllib.request
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from advantageflow.rewards import RewardError, build_reward
from advantageflow.rewards.imageio import encode_png, quantize
from advantageflow.rewards.protocols import UnsafePickleError, safe_loads
from advantageflow.rewards.server import serve


class MeanReward:
    """Mean of each sample's values (any shape: images or videos) plus ``metadata["bonus"]``."""

    def __call__(self, x, prompts, metadata):
        bonus = torch.tensor([float(m.get("bonus", 0.0)) for m in metadata])
        return x.flatten(1).mean(1) + bonus


def flat_images(values: list[float], size: int = 16) -> torch.Tensor:
    """``(B, 3, size, size)``, image ``i`` filled with ``values[i]`` (survives JPEG almost exactly)."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, size, size).contiguous()


@pytest.fixture
def mean_server():
    server = serve("mean", reward=MeanReward())
    yield server
    server.shutdown()


def http(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=20) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def b64_pngs(x: torch.Tensor) -> list[str]:
    return [base64.b64encode(p).decode() for p in encode_png(x)]


# ---------------------------------------------------------------- Flow-Factory, server side


def test_serve_reward_answers_flow_factory_compute_and_health(mean_server):
    url = mean_server.url
    status, health = http(url + "/health")
    assert status == 200 and health["status"] == "ok"
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    # The payload exactly as Flow-Factory's RemoteRewardClient builds it.
    payload = {
        "prompt": ["a", "b", "c"],
        "image": b64_pngs(x),
        "video": None,
        "condition_images": None,
        "condition_videos": None,
        "kwargs": None,
    }
    status, out = http(url + "/compute", payload)
    assert status == 200 and set(out) == {"rewards"}, out
    expected = quantize(x).flatten(1).mean(1)
    assert torch.allclose(torch.tensor(out["rewards"]), expected, atol=1e-6)
    # metadata through kwargs
    status, out = http(url + "/compute", {**payload, "kwargs": {"metadata": [{"bonus": 1}, {}, {"bonus": 2}]}})
    assert torch.allclose(torch.tensor(out["rewards"]), expected + torch.tensor([1.0, 0.0, 2.0]), atol=1e-6)
    # videos: B lists of T frames -> (B, T, 3, H, W)
    v = torch.rand(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    status, out = http(url + "/compute", {"prompt": ["p", "q"], "video": [b64_pngs(clip) for clip in v]})
    assert status == 200, out
    assert torch.allclose(torch.tensor(out["rewards"]), quantize(v.flatten(0, 1)).reshape(2, -1).mean(1), atol=1e-6)


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda png: {"prompt": ["a"]}, "exactly one of 'image'"),
        (lambda png: {"prompt": ["a", "b"], "image": ["x"]}, "not valid base64"),
        (lambda png: {"prompt": ["a"], "image": png}, "'images' must be a non-empty list"),
        (lambda png: {"prompt": ["a"], "image": [png], "condition_images": [[png]]}, "'condition_images' is not"),
        (lambda png: {"prompt": ["a"], "image": [png], "extra": 1}, "unknown fields ['extra']"),
        (lambda png: {"prompt": "a", "image": [png]}, "'prompt' must be a list of 1 strings"),
        (lambda png: {"prompt": ["a", "b"], "video": [[png], [png, png]]}, "same number of frames"),
        (lambda png: {"prompt": ["a"], "image": [png], "kwargs": {"metadata": [1]}}, "'kwargs.metadata' must be"),
    ],
)
def test_flow_factory_bad_requests_are_400(mean_server, make, reason):
    status, out = http(mean_server.url + "/compute", make(b64_pngs(torch.zeros(1, 3, 4, 4))[0]))
    assert status == 400 and reason in out["error"], out
    assert http(mean_server.url + "/health")[0] == 200


# ---------------------------------------------------------------- Flow-Factory, client side


def test_remote_client_speaks_flow_factory(mean_server):
    client = build_reward("remote", {"url": mean_server.url, "protocol": "flow_factory", "retries": 0})
    assert client.url.endswith("/compute")
    x = torch.rand(2, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    scores = client(x, ["a", "b"], [{"bonus": 3}, {}])
    assert torch.allclose(scores, quantize(x).flatten(1).mean(1) + torch.tensor([3.0, 0.0]), atol=1e-6)
    v = torch.rand(2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(client(v, ["a", "b"], []), quantize(v.flatten(0, 1)).reshape(2, -1).mean(1), atol=1e-6)
    with pytest.raises(RewardError, match=r"needs \(B, 3, H, W\) images or \(B, T, 3, H, W\) videos"):
        client(torch.zeros(2, 2), ["a", "b"], [])


def test_remote_protocol_and_its_options_are_checked():
    with pytest.raises(ValueError, match=r"unknown protocol 'flowgrpo'; did you mean 'flow_grpo'\?"):
        build_reward("remote", {"url": "http://127.0.0.1:1", "protocol": "flowgrpo"})
    with pytest.raises(ValueError, match="options: advantageflow, flow_factory, flow_grpo"):
        build_reward("remote", {"url": "http://127.0.0.1:1", "protocol": "grpc"})
    with pytest.raises(ValueError, match="score_key applies to protocol 'flow_grpo' only"):
        build_reward("remote", {"url": "http://127.0.0.1:1", "score_key": "outputs"})
    assert build_reward("remote", {"url": "http://127.0.0.1:1/", "protocol": "flow_grpo"}).url == "http://127.0.0.1:1"


# ---------------------------------------------------------------- Flow-GRPO (pickle), client side


class FlowGrpoServer(BaseHTTPRequestHandler):
    """A Flow-GRPO-style reward server (``POST /``, pickle in and out).  It scores each JPEG by
    its mean pixel value plus the prompt's length / 100 plus ``meta_datas[i]["bonus"]``, and
    answers with numpy types as the authors' servers do; ``reply`` swaps the answer."""

    reply: bytes | None = None
    key = "scores"
    seen: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        data = pickle.loads(self.rfile.read(int(self.headers["Content-Length"])))  # our own request
        type(self).seen.append(data)
        means = [
            np.asarray(Image.open(io.BytesIO(j)).convert("RGB"), dtype=np.float64).mean() / 255 for j in data["images"]
        ]
        scores = np.array(
            [m + len(p) / 100 + md.get("bonus", 0) for m, p, md in zip(means, data["prompts"], data["meta_datas"])]
        )
        body = self.reply or pickle.dumps(
            {
                self.key: scores,
                "rewards": [np.float64(s) for s in scores],
                "group_rewards": {"colour": [1.0]},
                "note": "ok",
            }
        )
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def run_server(handler: type) -> tuple[ThreadingHTTPServer, str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


@pytest.mark.parametrize("key", ["scores", "outputs"])
def test_remote_client_speaks_flow_grpo(key):
    handler = type("H", (FlowGrpoServer,), {"key": key, "seen": []})
    httpd, url = run_server(handler)
    try:
        client = build_reward("remote", {"url": url, "protocol": "flow_grpo", "retries": 0})
        x = flat_images([0.2, 0.6, 0.9])
        out = client(x, ["ab", "abcd", ""], [{"bonus": 1}, {}, {}])
        expected = torch.tensor([0.2 + 0.02 + 1, 0.6 + 0.04, 0.9])
        assert torch.allclose(out["score"], expected, atol=0.01), out
        assert torch.allclose(out["rewards"], out["score"])  # another per-sample key: a logged part
        assert set(out) == {"score", "rewards"}
        sent = handler.seen[0]
        assert set(sent) == {"images", "prompts", "meta_datas", "only_strict"}
        assert all(j[:2] == b"\xff\xd8" for j in sent["images"])  # JPEG, as the authors send
    finally:
        httpd.shutdown()


def test_flow_grpo_score_key_picks_the_reply_field():
    handler = type("H", (FlowGrpoServer,), {"key": "strict", "seen": []})
    httpd, url = run_server(handler)
    try:
        x = flat_images([0.5])
        with pytest.raises(RewardError, match="no 'scores or outputs'.*set score_key"):
            build_reward("remote", {"url": url, "protocol": "flow_grpo", "retries": 0})(x, ["p"], [])
        out = build_reward("remote", {"url": url, "protocol": "flow_grpo", "score_key": "strict"})(x, ["p"], [])
        assert abs(float(out["score"][0]) - 0.51) < 0.01
    finally:
        httpd.shutdown()


class _SystemCall:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_flow_grpo_malicious_reply_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"scores": [1.0], "x": _SystemCall(str(marker))})
    handler = type("H", (FlowGrpoServer,), {"reply": evil, "seen": []})
    httpd, url = run_server(handler)
    try:
        client = build_reward("remote", {"url": url, "protocol": "flow_grpo", "retries": 3, "backoff": 0.0})
        with pytest.raises(RewardError, match=r"refused to unpickle '(posix|os|nt)\.system'"):
            client(flat_images([0.5]), ["p"], [])
        assert client.attempts_made == 1  # refused at once, not retried
        assert not marker.exists()
    finally:
        httpd.shutdown()


def test_our_json_service_never_accepts_pickle(mean_server):
    body = pickle.dumps({"images": [], "prompts": []})
    req = urllib.request.Request(
        mean_server.url + "/score", data=body, headers={"Content-Type": "application/octet-stream"}
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as info:
        opener.open(req, timeout=20)
    assert info.value.code == 415


# ---------------------------------------------------------------- the restricted unpickler


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_loads_plain_data(protocol):
    data = {
        "scores": np.array([0.5, 1.5], dtype=np.float32),
        "ints": np.arange(3, dtype=np.int64),
        "grid": np.ones((2, 2), dtype=np.float64),
        "flags": np.array([True, False]),
        "names": np.array(["a", "bc"]),
        "scalars": [np.float64(0.25), np.int32(7), np.bool_(True)],
        "plain": [1, 2.5, "s", b"\x00\x01", None, True, (1, 2), {3, 4}, frozenset({5}), 1 + 2j],
        "ordered": OrderedDict(a=1),
        "empty": b"",
    }
    out = safe_loads(pickle.dumps(data, protocol=protocol))
    assert out.keys() == data.keys()
    for key in ("scores", "ints", "grid", "flags", "names"):
        assert out[key].dtype == data[key].dtype and np.array_equal(out[key], data[key])
    assert out["scalars"] == data["scalars"] and out["plain"] == data["plain"] and out["empty"] == b""


class _Evil:
    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize(
    "payload,reason",
    [
        (_Evil(eval, "1 + 1"), "refused to unpickle 'builtins.eval'"),
        (_Evil(getattr, "text", "upper"), "refused to unpickle 'builtins.getattr'"),
        (_Evil(__import__("subprocess").Popen, ["true"]), "refused to unpickle 'subprocess.Popen'"),
        (np.array([1, "x"], dtype=object), "dtype object"),
        (_Evil(bytes, 10**12), r"refused: bytes from \['int'\]"),
        (_Evil(np.empty, (10**6, 10**6)), "refused to unpickle 'numpy"),
        (torch.zeros(2), "refused to unpickle 'torch"),
        (threading.Lock, "refused to unpickle '_thread"),
    ],
)
def test_restricted_unpickler_refuses_everything_else(payload, reason):
    with pytest.raises(UnsafePickleError, match=reason):
        safe_loads(pickle.dumps(payload))


def test_restricted_unpickler_bounds_numpy_reconstruct():
    from advantageflow.rewards.protocols import _numpy_core

    huge = _Evil(_numpy_core("multiarray")._reconstruct, np.ndarray, (10**6, 10**6), b"b")
    with pytest.raises(UnsafePickleError, match="an array of 1000000000000 items"):
        safe_loads(pickle.dumps(huge))
    with pytest.raises(ValueError, match="not a valid pickle"):
        safe_loads(b"\x80\x04garbage")
