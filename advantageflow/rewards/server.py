"""Serve any registered reward over HTTP (``advantageflow serve-reward NAME``).

Standard library only (``http.server.ThreadingHTTPServer``); JSON in, JSON out, never
pickle.  See :mod:`advantageflow.rewards.wire` for the body formats.

* ``GET /health`` -> ``{"status": "ok", "reward": NAME, "differentiable": false, "max_bytes": N}``
* ``POST /score`` -> ``{"scores": [...], "components": {...}}``

Safety: binds ``127.0.0.1`` unless told otherwise; bearer token checked on every route when
set (401); bodies need a ``Content-Length`` (411) no larger than ``max_bytes`` (413) and
``Content-Type: application/json`` (415); anything malformed is a 400 and the server goes on.

Batching: one scorer thread owns the reward.  Request threads queue their decoded batch;
the scorer takes every queued request whose samples have the same shape, up to
``max_batch`` samples, scores them in one call and splits the result.  If a coalesced call
fails, each request is rescored alone so one bad request cannot fail the others.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import os
import queue
import signal
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
import yaml
from torch import Tensor

from advantageflow.rewards.base import as_components, build_reward, call_reward, is_differentiable
from advantageflow.rewards.wire import BadRequest, ScoreRequest, decode_request, encode_response

TOKEN_ENV = "ADVANTAGEFLOW_REWARD_TOKEN"


@dataclass
class _Job:
    request: ScoreRequest
    done: threading.Event = field(default_factory=threading.Event)
    scores: Tensor | None = None
    components: dict[str, Tensor] = field(default_factory=dict)
    error: str | None = None


def split_output(out: Any, name: str, batch: int) -> tuple[Tensor, dict[str, Tensor]]:
    """A reward's output -> ``(scores (B,), extra named parts)``, as CompositeReward reads it."""
    parts = as_components(out, name, batch)
    if len(parts) == 1:
        return next(iter(parts.values())), {}
    if "score" not in parts:
        raise ValueError(f"reward returned parts {sorted(parts)}; one must be 'score'")
    return parts["score"], {k: v for k, v in parts.items() if k != "score"}


class BatchingScorer:
    """Owns the reward; scores queued requests in coalesced batches on one thread."""

    def __init__(self, reward: Any, name: str, max_batch: int = 256) -> None:
        self.reward, self.name, self.max_batch = reward, name, max(1, int(max_batch))
        self.queue: queue.Queue[_Job | None] = queue.Queue()
        self.batches_scored = 0
        self._held: list[_Job] = []
        self._thread = threading.Thread(target=self._loop, name="reward-scorer", daemon=True)
        self._thread.start()

    def score(self, request: ScoreRequest) -> _Job:
        job = _Job(request)
        self.queue.put(job)
        job.done.wait()
        return job

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=5)

    def _next_group(self) -> list[_Job] | None:
        first = self._held.pop(0) if self._held else self.queue.get()
        if first is None:
            return None
        group, size = [first], first.request.samples.shape[0]
        shape = first.request.samples.shape[1:]
        candidates = self._held + self._drain()
        self._held = []
        for job in candidates:
            n = job.request.samples.shape[0]
            if job.request.samples.shape[1:] == shape and size + n <= self.max_batch:
                group.append(job)
                size += n
            else:
                self._held.append(job)
        return group

    def _drain(self) -> list[_Job]:
        jobs = []
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return jobs
            if job is None:  # keep the stop signal for after the held jobs
                self.queue.put(None)
                return jobs
            jobs.append(job)

    def _loop(self) -> None:
        while True:
            group = self._next_group()
            if group is None:
                return
            try:
                self._score_group(group)
            except Exception as err:  # noqa: BLE001 - reported to the clients
                if len(group) == 1:
                    group[0].error = f"{type(err).__name__}: {err}"
                else:
                    for job in group:
                        try:
                            self._score_group([job])
                        except Exception as one:  # noqa: BLE001
                            job.error = f"{type(one).__name__}: {one}"
            for job in group:
                job.done.set()

    def _score_group(self, group: list[_Job]) -> None:
        samples = torch.cat([j.request.samples for j in group])
        prompts = [p for j in group for p in j.request.prompts]
        metadata = [m for j in group for m in j.request.metadata]
        with torch.no_grad():
            out = call_reward(self.reward, samples, prompts, metadata)
        scores, parts = split_output(out, self.name, samples.shape[0])
        for value in [scores, *parts.values()]:
            if not torch.isfinite(value.detach().float()).all():
                raise ValueError("the reward returned non-finite scores")
        self.batches_scored += 1
        start = 0
        for job in group:
            n = job.request.samples.shape[0]
            job.scores = scores[start:start + n].detach().cpu().float()
            job.components = {k: v[start:start + n].detach().cpu().float() for k, v in parts.items()}
            start += n


class _Handler(BaseHTTPRequestHandler):
    server: RewardHTTPServer
    server_version = "advantageflow-reward/1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, code: int, payload: dict | bytes, headers: dict | None = None) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _authorised(self) -> bool:
        token = self.server.token
        if not token:
            return True
        given = self.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return True
        self.close_connection = True
        self._send(401, {"error": "missing or wrong bearer token"}, {"WWW-Authenticate": "Bearer"})
        return False

    def do_GET(self) -> None:  # noqa: N802
        if not self._authorised():
            return
        if self.path != "/health":
            self._send(404, {"error": f"no route GET {self.path} (GET /health, POST /score)"})
            return
        s = self.server
        self._send(200, {"status": "ok", "reward": s.reward_name,
                         "differentiable": is_differentiable(s.scorer.reward), "max_bytes": s.max_bytes})

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorised():
            return
        if self.path != "/score":
            self.close_connection = True
            self._send(404, {"error": f"no route POST {self.path} (POST /score)"})
            return
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length is None or not length.isdigit():
            self.close_connection = True
            self._send(411, {"error": "a Content-Length header is required"})
            return
        if int(length) > self.server.max_bytes:
            self.close_connection = True
            self._send(413, {"error": f"body of {length} bytes exceeds the limit of {self.server.max_bytes}"})
            return
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            self.close_connection = True
            self._send(415, {"error": f"Content-Type must be application/json, got '{ctype}'"})
            return
        try:
            body = self.rfile.read(int(length))
        except OSError:  # the client stalled past the timeout or went away
            self.close_connection = True
            return
        try:
            request = decode_request(body, self.server.max_batch_items, self.server.max_pixels)
        except BadRequest as err:
            self._send(400, {"error": str(err)})
            return
        job = self.server.scorer.score(request)
        if job.error is not None:
            self._send(500, {"error": f"reward failed: {job.error}"})
            return
        self._send(200, encode_response(job.scores, job.components))


class RewardHTTPServer(ThreadingHTTPServer):
    """The HTTP server; ``url`` is where it listens, ``shutdown()`` stops it and the scorer."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        reward: Any,
        name: str,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        max_bytes: int = 64 * 2**20,
        max_batch: int = 256,
        max_batch_items: int = 1024,
        max_pixels: int = 4096 * 4096,
        request_timeout: float = 60.0,
        verbose: bool = False,
    ) -> None:
        handler = type("Handler", (_Handler,), {"timeout": request_timeout})
        super().__init__((host, port), handler)
        self.reward_name, self.token, self.verbose = name, token or None, verbose
        self.max_bytes, self.max_batch_items, self.max_pixels = int(max_bytes), max_batch_items, max_pixels
        self.scorer = BatchingScorer(reward, name, max_batch)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}"

    def start(self) -> RewardHTTPServer:
        """Serve on a background thread (for tests and notebooks)."""
        self._thread = threading.Thread(
            target=self.serve_forever, args=(0.05,), name="reward-http", daemon=True
        )
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop serving, close the socket and the scorer thread."""
        if self._thread is not None:
            super().shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.server_close()
        self.scorer.close()


def serve(name: str, args: dict | None = None, *, reward: Any = None, **kwargs: Any) -> RewardHTTPServer:
    """Build reward ``name`` (or use ``reward``) and serve it on a background thread.

    ``kwargs`` go to :class:`RewardHTTPServer` (``host``, ``port`` (0: ephemeral), ``token``,
    ``max_bytes``, ``max_batch``, ...).  Returns the started server (``.url``, ``.shutdown()``).
    """
    reward = build_reward(name, args) if reward is None else reward
    return RewardHTTPServer(reward, name, **kwargs).start()


def _parse_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--arg expects key=value, got '{text}'")
    return key, yaml.safe_load(value)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> int:
    """``advantageflow serve-reward NAME [--host H] [--port P] [--token T] [--max-bytes N] [--arg k=v]``."""
    parser = argparse.ArgumentParser(prog="advantageflow serve-reward",
                                     description="Serve a registered reward over HTTP (JSON, no pickle).")
    parser.add_argument("name", help="registered reward name or dotted path 'pkg.module:factory'")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    parser.add_argument("--token", default=None,
                        help=f"bearer token required from clients (default: ${TOKEN_ENV} if set)")
    parser.add_argument("--max-bytes", type=int, default=64 * 2**20, help="request size limit (413 beyond)")
    parser.add_argument("--max-batch", type=int, default=256,
                        help="most samples scored in one coalesced call")
    parser.add_argument("--arg", action="append", type=_parse_arg, default=[], metavar="KEY=VALUE",
                        help="reward argument (value parsed as YAML), repeatable")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    opts = parser.parse_args(argv)
    token = opts.token if opts.token is not None else os.environ.get(TOKEN_ENV)
    try:
        reward = build_reward(opts.name, dict(opts.arg))
    except Exception as err:  # noqa: BLE001 - one clear line for the user
        print(f"error: cannot build reward '{opts.name}': {err}", file=sys.stderr)
        return 2
    if not _is_loopback(opts.host) and not token:
        print(f"warning: serving on {opts.host} without a token; anyone who can reach it can use it",
              file=sys.stderr)
    try:
        server = RewardHTTPServer(reward, opts.name, opts.host, opts.port, token=token,
                                  max_bytes=opts.max_bytes, max_batch=opts.max_batch, verbose=opts.verbose)
    except OSError as err:
        print(f"error: cannot listen on {opts.host}:{opts.port}: {err}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def _stop(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server.start()
    print(f"serving reward '{opts.name}' on {server.url}", flush=True)
    while not stop.wait(0.5):
        pass
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
