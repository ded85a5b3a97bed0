"""The reward service under load and abuse (issue 19), on 127.0.0.1 only.

200 concurrent clients (no resets, scores equal to sequential ones), a slow request and
trickling clients that do not delay the others beyond the deadline, and the memory bomb
(4096x4096 black PNGs) refused from the PNG headers with the server's peak memory bounded.
Figures are printed (``pytest -s``) and quoted in docs/rewards.md.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from PIL import Image

from advantageflow.rewards import build_reward
from advantageflow.rewards.server import serve
from advantageflow.rewards.wire import encode_request
from tests.conftest import REPO

CLIENTS = 200


def post(server, body: bytes, timeout: float = 60.0, headers: dict | None = None) -> tuple[int, dict, float]:
    host, port = server.server_address if hasattr(server, "server_address") else server
    start = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.request("POST", "/score", body=body, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read() or b"{}")
    conn.close()
    return out[0], out[1], time.monotonic() - start


def client_images(i: int) -> torch.Tensor:
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(i))


@pytest.mark.slow
@pytest.mark.two_cores
def test_200_concurrent_clients_no_resets_and_sequential_scores():
    server = serve("jpeg_incompressibility", deadline_s=120.0, workers=2)
    try:
        bodies = [encode_request(client_images(i), [f"p{i}"], None, "png") for i in range(CLIENTS)]
        sequential = []
        for body in bodies:
            status, reply, _ = post(server, body)
            assert status == 200
            sequential.append(reply["scores"])
        results: dict[int, object] = {}
        barrier = threading.Barrier(CLIENTS)

        def client(i: int) -> None:
            barrier.wait()
            try:
                results[i] = post(server, bodies[i], timeout=120.0)
            except Exception as err:  # noqa: BLE001 - counted: resets, refusals, timeouts
                results[i] = err

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - start
        errors = [r for r in results.values() if isinstance(r, Exception)]
        assert not errors, f"{len(errors)} of {CLIENTS} failed, e.g. {errors[0]!r}"
        assert all(results[i][0] == 200 for i in range(CLIENTS))
        assert [results[i][1]["scores"] for i in range(CLIENTS)] == sequential
        latencies = sorted(results[i][2] for i in range(CLIENTS))
        local = build_reward("jpeg_incompressibility")
        assert sequential[7] == local(torch.round(client_images(7) * 255) / 255, [""], [{}]).double().tolist()
        print(f"\n[load] {CLIENTS} concurrent clients: 0 errors, wall {wall:.2f} s, latency p50 "
              f"{latencies[CLIENTS // 2]:.2f} s, p99 {latencies[int(CLIENTS * 0.99)]:.2f} s, "
              f"batches {server.scorer.batches_scored - CLIENTS}")
    finally:
        server.shutdown()


class SlowOnCue:
    """Sums pixels; a request whose prompt is 'slow' takes ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __call__(self, x, prompts, metadata):
        if "slow" in prompts:
            time.sleep(self.delay)
        return x.flatten(1).sum(1)


def _trickle(host, port, prefix: bytes, drip: bytes, every: float, stop: threading.Event, out: dict) -> None:
    """Send ``prefix``, then ``drip`` one byte every ``every`` seconds; record when and how
    the server ends it."""
    sock = socket.create_connection((host, port), timeout=30)
    start = time.monotonic()
    out["reply"] = b""
    try:
        sock.sendall(prefix)
        for byte in drip:
            if stop.is_set() or select.select([sock], [], [], 0)[0]:
                break  # the server answered or closed
            sock.sendall(bytes([byte]))
            time.sleep(every)
        out["reply"] = sock.recv(4096)
    except OSError as err:
        out["error"] = repr(err)
    out["held_s"] = time.monotonic() - start
    sock.close()


def test_slow_request_and_trickling_clients_do_not_delay_the_others():
    deadline = 1.5
    server = serve("slow", reward=SlowOnCue(delay=4.0), deadline_s=deadline, header_timeout_s=1.0,
                   workers=2, max_batch=1)
    host, port = server.server_address
    x = torch.full((1, 3, 4, 4), 0.5)
    stop = threading.Event()
    slow_out: dict = {}
    body_trickle: dict = {}
    head_trickle: dict = {}
    try:
        slow = threading.Thread(target=lambda: slow_out.update(r=post(server, encode_request(x, ["slow"], None,
                                                                                              "png"))))
        slow.start()
        body_head = (b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 500\r\n\r\n")
        trickles = [threading.Thread(target=_trickle, args=(host, port, body_head, b"{" * 500, 0.05, stop,
                                                            body_trickle)),
                    threading.Thread(target=_trickle, args=(host, port, b"", b"POST /score HTTP/1.1\r\nHost: x\r\n",
                                                            0.3, stop, head_trickle))]
        for t in trickles:
            t.start()
        time.sleep(0.3)
        latencies = []
        for i in range(12):
            status, reply, took = post(server, encode_request(x * (i / 12), [f"n{i}"], None, "png"))
            assert status == 200 and reply["scores"] == [pytest.approx(48 * round(i / 12 * 0.5 * 255) / 255)]
            latencies.append(took)
        slow.join()
        for t in trickles:
            t.join()
        status, reply, took = slow_out["r"]
        assert status == 504 and "deadline" in reply["error"] and took < deadline + 1.0
        assert max(latencies) < deadline, latencies
        assert b" 408 " in body_trickle["reply"] and body_trickle["held_s"] < deadline + 1.0
        assert head_trickle["held_s"] < 1.0 + 1.0  # closed at the header deadline
        print(f"\n[slow] normal requests beside a 4 s request: max latency {max(latencies) * 1000:.0f} ms; "
              f"slow one answered {status} after {took:.2f} s; body trickler cut after "
              f"{body_trickle['held_s']:.2f} s (408); header trickler after {head_trickle['held_s']:.2f} s")
        # a 1 MB prompt is refused at once
        status, reply, took = post(server, encode_request(x, ["a" * 2**20], None, "png"))
        assert status == 400 and "exceeds the limit of 4096" in reply["error"] and took < 1.0
    finally:
        stop.set()
        server.shutdown()


def test_bad_content_length_and_dropped_connections_leave_it_serving(capfd):
    server = serve("jpeg_incompressibility", deadline_s=5.0)
    host, port = server.server_address
    try:
        for length in ("\u00b2", "1\u0660", "-1", "1e3", "99999999999999999999999"):
            sock = socket.create_connection((host, port), timeout=10)
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + b"Content-Length: " + length.encode() + b"\r\n\r\n{}")
            reply = sock.recv(4096)
            sock.close()
            assert reply.split(b" ")[1] in (b"400", b"411", b"413"), (length, reply[:80])
        for _ in range(50):  # stalled connections closed by the client
            sock = socket.create_connection((host, port), timeout=10)
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n")
            sock.close()
        status, _, _ = post(server, encode_request(torch.rand(1, 3, 8, 8), [""], None, "png"))
        assert status == 200
    finally:
        server.shutdown()
    assert "Traceback" not in capfd.readouterr().err


def _black_png_b64(size: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


BOMB_BOUND_MB = 64  # the refused bomb may not raise the server's peak memory by more than this


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_memory_bomb_is_refused_from_the_headers_and_memory_stays_bounded():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "advantageflow", "serve-reward", "jpeg_incompressibility",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "serving reward" in line, proc.stderr.read() if proc.poll() is not None else line
        host, port = line.rsplit("//", 1)[1].strip().split(":")
        address = (host, int(port))
        ok = encode_request(torch.rand(2, 3, 64, 64), ["", ""], None, "png")
        assert post(address, ok)[0] == 200
        before = _peak_rss_mb(proc.pid)
        bomb_png = _black_png_b64(4096)
        bomb = json.dumps({"images": [bomb_png] * 8, "prompts": [""] * 8}).encode()
        status, reply, took = post(address, bomb)
        assert status == 413 and "4096x4096 exceeds the limit of 4194304 pixels" in reply["error"]
        # within the per-image limit, over the per-request one: 8 x 2048^2 = 33.5 M pixels
        wide = json.dumps({"images": [_black_png_b64(2048)] * 8, "prompts": [""] * 8}).encode()
        status2, reply2, _ = post(address, wide)
        assert status2 == 413 and "16777216 pixels in all" in reply2["error"]
        after = _peak_rss_mb(proc.pid)
        assert after - before < BOMB_BOUND_MB, (before, after)
        assert post(address, ok)[0] == 200
        print(f"\n[bomb] {len(bomb) // 1024} KB request of 8 x 4096x4096 black PNGs: {status} in "
              f"{took * 1000:.0f} ms; server peak RSS {before:.0f} MB -> {after:.0f} MB (bound +{BOMB_BOUND_MB} MB)")
    finally:
        proc.terminate()
        assert proc.wait(timeout=120) == 0
