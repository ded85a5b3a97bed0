"""Serve any registered reward over HTTP (``advantageflow serve-reward NAME``).

An ASGI app (Starlette) on uvicorn: the listen backlog, connection limits, keep-alive and
header parsing are a maintained library's job.  JSON in, JSON out, never pickle; see
:mod:`advantageflow.rewards.wire` for the body formats.

* ``GET /health`` -> ``{"status": "ok", "reward": NAME, "differentiable": false, "max_bytes": N, ...}``
* ``POST /score`` -> ``{"scores": [...], "components": {...}}``
* ``POST /compute`` (Flow-Factory's protocol, :mod:`advantageflow.rewards.protocols`):
  ``{"prompt": [...], "image": [base64 PNG] | "video": [[...]]}`` -> ``{"rewards": [...]}``

Safety: binds ``127.0.0.1`` unless told otherwise; bearer token checked on every route when
set (401); bodies need a ``Content-Length`` (411) no larger than ``max_bytes`` (413) and
``Content-Type: application/json`` (415); anything malformed is a 400 and the server goes on.

Resource limits (:class:`ServerLimits`), each checked before the work it guards:

* pixels: every PNG's size is read from its header before anything is decoded; an image
  over ``max_pixels`` or a request over ``max_request_pixels`` is refused (413), and the
  pixels decoded at once over all requests never exceed ``max_inflight_pixels`` (a request
  waits for room, or is answered 503 at its deadline).  This bounds the decoded memory.
* prompts: at most ``max_prompt_chars`` characters each (400).
* time: each request has ``deadline_s`` from its first byte of body to its answer: reading a
  trickled body past it is a 408, waiting for room a 503, scoring past it a 504; the request
  is then dropped from the queue (scoring already under way cannot be interrupted, but its
  answer is no longer awaited).  A connection that has not sent its headers within
  ``header_timeout_s`` is closed.

Scoring: ``workers`` threads share a queue.  Each takes the oldest request plus every queued
request whose samples have the same shape, up to ``max_batch`` samples, scores them in one
call and splits the result; if a coalesced call fails, each request is rescored alone so one
bad request cannot fail the others.  With two or more workers one slow request does not
stall the rest (the reward must then tolerate concurrent calls; ``--workers 1`` if not).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import yaml
from torch import Tensor

from advantageflow.rewards.base import as_components, build_reward, call_reward, is_differentiable
from advantageflow.rewards.protocols import encode_flow_factory_response, parse_flow_factory_request
from advantageflow.rewards.wire import (
    BadRequest,
    ScoreRequest,
    TooLarge,
    encode_response,
    materialise,
    parse_request,
)

TOKEN_ENV = "ADVANTAGEFLOW_REWARD_TOKEN"


@dataclass
class ServerLimits:
    """What one request, and all of them together, may cost (see the module docstring)."""

    max_bytes: int = 64 * 2**20
    max_batch_items: int = 1024
    max_pixels: int = 2048 * 2048
    max_request_pixels: int = 4096 * 4096
    max_inflight_pixels: int = 2 * 4096 * 4096
    max_prompt_chars: int = 4096
    max_inflight_bytes: int = 4 * 64 * 2**20
    deadline_s: float = 60.0
    header_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"server limit {key} must be > 0, got {value}")
        if self.max_request_pixels > self.max_inflight_pixels:
            raise ValueError("max_request_pixels must not exceed max_inflight_pixels")
        if self.max_bytes > self.max_inflight_bytes:
            raise ValueError("max_bytes must not exceed max_inflight_bytes")


class ByteBudget:
    """Request bodies held at once (bytes); used from the event loop only."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.used = int(capacity), 0
        self._cond = asyncio.Condition()

    async def acquire(self, n: int, timeout: float) -> bool:
        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(lambda: self.used + n <= self.capacity), max(0.0, timeout))
            except asyncio.TimeoutError:
                return False
            self.used += n
            return True

    async def release(self, n: int) -> None:
        async with self._cond:
            self.used -= n
            self._cond.notify_all()


class PixelBudget:
    """A counting semaphore over decoded pixels (the decoded memory of requests in flight);
    acquired on decoding threads, released by the scorer threads."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.used, self.peak = int(capacity), 0, 0
        self._cond = threading.Condition()

    def acquire(self, n: int, timeout: float) -> bool:
        end = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while self.used + n > self.capacity:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            self.used += n
            self.peak = max(self.peak, self.used)
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


@dataclass
class _Job:
    request: ScoreRequest | None
    pixels: int
    future: Future = field(default_factory=Future)
    released: bool = False


def split_output(out: Any, name: str, batch: int) -> tuple[Tensor, dict[str, Tensor]]:
    """A reward's output -> ``(scores (B,), extra named parts)``, as CompositeReward reads it."""
    parts = as_components(out, name, batch)
    if len(parts) == 1:
        return next(iter(parts.values())), {}
    if "score" not in parts:
        raise ValueError(f"reward returned parts {sorted(parts)}; one must be 'score'")
    return parts["score"], {k: v for k, v in parts.items() if k != "score"}


class ScorerPool:
    """Owns the reward; ``workers`` threads score queued requests in coalesced batches."""

    def __init__(self, reward: Any, name: str, budget: PixelBudget, max_batch: int = 256, workers: int = 2) -> None:
        self.reward, self.name, self.budget = reward, name, budget
        self.max_batch = max(1, int(max_batch))
        self.queue: queue.Queue[_Job | None] = queue.Queue()
        self.batches_scored = 0
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._loop, name=f"reward-scorer-{i}", daemon=True)
            for i in range(max(1, int(workers)))
        ]
        for t in self._threads:
            t.start()

    def submit(self, request: ScoreRequest, pixels: int) -> _Job:
        job = _Job(request, pixels)
        self.queue.put(job)
        return job

    def abandon(self, job: _Job) -> None:
        """The client's deadline passed: drop the job unless scoring has begun."""
        if job.future.cancel():
            self._release(job)

    def _release(self, job: _Job) -> None:
        with self._lock:
            if job.released:
                return
            job.released = True
        job.request = None  # the decoded samples can go now
        self.budget.release(job.pixels)

    def close(self) -> None:
        for _ in self._threads:
            self.queue.put(None)
        for t in self._threads:
            t.join(timeout=5)

    def _next_group(self) -> list[_Job] | None:
        while True:
            first = self.queue.get()
            if first is None:
                return None
            if first.future.set_running_or_notify_cancel():
                break
            self._release(first)
        group, size = [first], first.request.samples.shape[0]
        shape = first.request.samples.shape[1:]
        with self._lock:  # one worker drains at a time; the others' jobs stay queued
            for _ in range(self.queue.qsize()):
                try:
                    job = self.queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self.queue.put(None)
                    continue
                req = job.request  # abandon() may clear it concurrently; it then owns the release
                if req is None or job.future.cancelled():
                    if not job.released:
                        job.released, job.request = True, None
                        self.budget.release(job.pixels)
                    continue
                n = req.samples.shape[0]
                if req.samples.shape[1:] == shape and size + n <= self.max_batch:
                    if job.future.set_running_or_notify_cancel():
                        group.append(job)
                        size += n
                else:
                    self.queue.put(job)
        return group

    def _loop(self) -> None:
        while True:
            group = self._next_group()
            if group is None:
                return
            try:
                results = self._score_group(group)
            except Exception as err:  # noqa: BLE001 - reported to the clients
                if len(group) == 1:
                    results = [err]
                else:
                    results = []
                    for job in group:
                        try:
                            results += self._score_group([job])
                        except Exception as one:  # noqa: BLE001
                            results.append(one)
            for job, result in zip(group, results):
                self._release(job)
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def _score_group(self, group: list[_Job]) -> list[tuple[Tensor, dict[str, Tensor]]]:
        samples = torch.cat([j.request.samples for j in group])
        prompts = [p for j in group for p in j.request.prompts]
        metadata = [m for j in group for m in j.request.metadata]
        with torch.no_grad():
            out = call_reward(self.reward, samples, prompts, metadata)
        scores, parts = split_output(out, self.name, samples.shape[0])
        for value in [scores, *parts.values()]:
            if not torch.isfinite(value.detach().float()).all():
                raise ValueError("the reward returned non-finite scores")
        with self._lock:
            self.batches_scored += 1
        out_list, start = [], 0
        for job in group:
            n = job.request.samples.shape[0]
            out_list.append(
                (
                    scores[start : start + n].detach().cpu().float(),
                    {k: v[start : start + n].detach().cpu().float() for k, v in parts.items()},
                )
            )
            start += n
        return out_list


class _Answer(Exception):
    """Leave the handler with this HTTP status and one-line message."""

    def __init__(self, status: int, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.close = status, message, close


def _json_response(status: int, payload: dict | bytes, headers: dict | None = None):
    from starlette.responses import Response

    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return Response(body, status_code=status, media_type="application/json", headers=headers)


class RewardApp:
    """The ASGI application: routes, token, limits, deadline; scoring goes to the pool."""

    def __init__(
        self, reward: Any, name: str, token: str | None, limits: ServerLimits, max_batch: int, workers: int
    ) -> None:
        from starlette.applications import Starlette
        from starlette.routing import Route

        self.reward_name, self.token, self.limits = name, token or None, limits
        self.budget = PixelBudget(limits.max_inflight_pixels)
        self.bytes: ByteBudget | None = None  # made on the server's event loop
        self.scorer = ScorerPool(reward, name, self.budget, max_batch, workers)
        # JSON parsing and PNG decoding run here, off the event loop; a thread may wait for
        # pixel room, so there are more of them than cores.
        self.decoders = ThreadPoolExecutor(max_workers=32, thread_name_prefix="reward-decode")
        methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
        self.asgi = Starlette(routes=[Route("/{path:path}", self._dispatch, methods=methods)])

    async def _dispatch(self, request):
        from starlette.requests import ClientDisconnect

        try:
            self._authorise(request)
            route = (request.method, request.url.path)
            if route == ("GET", "/health"):
                return self._health()
            if route == ("POST", "/score"):
                return await self._score(request)
            if route == ("POST", "/compute"):  # Flow-Factory's RemoteRewardClient
                return await self._score(request, flow_factory=True)
            raise _Answer(
                404,
                f"no route {request.method} {request.url.path} (GET /health, POST /score, POST /compute)",
                close=request.method != "GET",
            )
        except _Answer as answer:
            headers = {"Connection": "close"} if answer.close else {}
            if answer.status == 401:
                headers["WWW-Authenticate"] = "Bearer"
            return _json_response(answer.status, {"error": answer.message}, headers)
        except ClientDisconnect:
            return _json_response(400, {"error": "client went away"}, {"Connection": "close"})

    def _authorise(self, request) -> None:
        if not self.token:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise _Answer(401, "missing or wrong bearer token", close=True)

    def _health(self):
        return _json_response(
            200,
            {
                "status": "ok",
                "reward": self.reward_name,
                "differentiable": is_differentiable(self.scorer.reward),
                "max_bytes": self.limits.max_bytes,
                "limits": asdict(self.limits),
            },
        )

    async def _score(self, request, flow_factory: bool = False):
        """``/score`` (our JSON) or ``/compute`` (Flow-Factory's JSON): the same limits,
        queue and scorer; only the body formats differ."""
        lim = self.limits
        deadline = time.monotonic() + lim.deadline_s
        length = request.headers.get("content-length")
        if request.headers.get("transfer-encoding") or length is None or not length.isascii() or not length.isdigit():
            raise _Answer(411, "a Content-Length header is required", close=True)
        if int(length) > lim.max_bytes:
            raise _Answer(413, f"body of {length} bytes exceeds the limit of {lim.max_bytes}", close=True)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise _Answer(415, f"Content-Type must be application/json, got '{ctype}'", close=True)
        if self.bytes is None:
            self.bytes = ByteBudget(lim.max_inflight_bytes)
        n = int(length)
        if not await self.bytes.acquire(n, deadline - time.monotonic()):
            raise _Answer(
                503,
                f"server busy: no room for a body of {n} bytes within the deadline "
                f"of {lim.deadline_s:g} s; retry later",
                close=True,
            )
        try:
            body = await self._read_body(request, n, deadline)
            loop = asyncio.get_running_loop()
            request_data, pixels = await loop.run_in_executor(self.decoders, self._decode, body, deadline, flow_factory)
            del body
        finally:
            await self.bytes.release(n)
        job = self.scorer.submit(request_data, pixels)
        del request_data
        try:
            scores, parts = await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(job.future)), timeout=max(0.0, deadline - time.monotonic())
            )
        except asyncio.TimeoutError:
            self.scorer.abandon(job)
            raise _Answer(504, f"scoring did not finish within the deadline of {lim.deadline_s:g} s") from None
        except Exception as err:  # noqa: BLE001 - the reward failed: 500 with its reason
            first = (str(err).strip().splitlines() or [""])[0][:300]
            raise _Answer(500, f"reward failed: {type(err).__name__}: {first}") from None
        try:
            if flow_factory:
                return _json_response(200, encode_flow_factory_response(scores))
            return _json_response(200, encode_response(scores, parts))
        except ValueError as err:
            raise _Answer(500, f"reward failed: {err}") from None

    async def _read_body(self, request, length: int, deadline: float) -> bytes:
        chunks, got = [], 0

        async def pull() -> None:
            nonlocal got
            async for chunk in request.stream():
                got += len(chunk)
                chunks.append(chunk)

        try:
            await asyncio.wait_for(pull(), timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise _Answer(
                408, f"body not received within the deadline of {self.limits.deadline_s:g} s", close=True
            ) from None
        if got != length:
            raise _Answer(400, f"body of {got} bytes, Content-Length says {length}", close=True)
        return b"".join(chunks)

    def _decode(self, body: bytes, deadline: float, flow_factory: bool = False) -> tuple[ScoreRequest, int]:
        """Parse, count the pixels from the headers, wait for room, then decode (a thread)."""
        lim = self.limits
        parse = parse_flow_factory_request if flow_factory else parse_request
        try:
            parsed = parse(body, lim.max_batch_items, lim.max_pixels, lim.max_request_pixels, lim.max_prompt_chars)
        except TooLarge as err:
            raise _Answer(413, str(err)) from None
        except BadRequest as err:
            raise _Answer(400, str(err)) from None
        pixels = parsed.pixels
        if not self.budget.acquire(pixels, deadline - time.monotonic()):
            raise _Answer(
                503,
                f"server busy: no room for {pixels} decoded pixels within the deadline "
                f"of {lim.deadline_s:g} s; retry later",
            )
        try:
            request = materialise(parsed)
        except BaseException as err:
            self.budget.release(pixels)
            if isinstance(err, BadRequest):
                raise _Answer(400, str(err)) from None
            raise
        return request, pixels


def _header_deadline_protocol(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol, closing connections that send no complete request head within
    ``header_timeout_s`` (uvicorn itself only times out idle keep-alive connections)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineProtocol(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            handle = getattr(self, "_header_timer", None)
            if handle is not None:
                handle.cancel()
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_deadline_passed)

        def _header_deadline_passed(self) -> None:
            waiting_for_head = self.cycle is None or self.cycle.response_complete
            if waiting_for_head and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc) -> None:
            handle = getattr(self, "_header_timer", None)
            if handle is not None:
                handle.cancel()
            super().connection_lost(exc)

    return HeaderDeadlineProtocol


class RewardHTTPServer:
    """The reward service: ``url`` and ``server_address`` say where it listens, ``start()``
    serves on a background thread, ``run()`` in this one (until SIGINT/SIGTERM), and
    ``shutdown()`` stops it and the scorer threads."""

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
        max_pixels: int = 2048 * 2048,
        max_request_pixels: int = 4096 * 4096,
        max_inflight_pixels: int | None = None,
        max_prompt_chars: int = 4096,
        max_inflight_bytes: int | None = None,
        deadline_s: float = 60.0,
        header_timeout_s: float = 10.0,
        workers: int = 2,
        max_connections: int = 1024,
        backlog: int = 2048,
        verbose: bool = False,
    ) -> None:
        import uvicorn

        self.limits = ServerLimits(
            max_bytes=int(max_bytes),
            max_batch_items=int(max_batch_items),
            max_pixels=int(max_pixels),
            max_request_pixels=int(max_request_pixels),
            max_inflight_pixels=int(max_inflight_pixels or 2 * max_request_pixels),
            max_prompt_chars=int(max_prompt_chars),
            max_inflight_bytes=int(max_inflight_bytes or 4 * max_bytes),
            deadline_s=float(deadline_s),
            header_timeout_s=float(header_timeout_s),
        )
        self.app = RewardApp(reward, name, token, self.limits, max_batch, workers)
        self.scorer = self.app.scorer
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
            self.socket.listen(backlog)  # connections queue from now on, before the loop runs
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()[:2]
        config = uvicorn.Config(
            self.app.asgi,
            lifespan="off",
            http=_header_deadline_protocol(self.limits.header_timeout_s),
            log_level="info" if verbose else "warning",
            access_log=verbose,
            limit_concurrency=max_connections,
            backlog=backlog,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}"

    def run(self) -> None:
        """Serve in this thread until SIGINT / SIGTERM (uvicorn's handlers), then clean up."""
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self._close()

    def start(self) -> RewardHTTPServer:
        """Serve on a background thread (for tests and notebooks)."""
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self.socket]}, name="reward-http", daemon=True
        )
        self._thread.start()
        end = time.monotonic() + 30
        while not self._server.started and self._thread.is_alive() and time.monotonic() < end:
            time.sleep(0.01)
        return self

    def shutdown(self) -> None:
        """Stop serving, close the socket and the scorer threads."""
        if self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self._thread = None
        self._close()

    def _close(self) -> None:
        try:
            self.socket.close()
        except OSError:
            pass
        self.scorer.close()
        self.app.decoders.shutdown(wait=False, cancel_futures=True)


def serve(name: str, args: dict | None = None, *, reward: Any = None, **kwargs: Any) -> RewardHTTPServer:
    """Build reward ``name`` (or use ``reward``) and serve it on a background thread.

    ``kwargs`` go to :class:`RewardHTTPServer` (``host``, ``port`` (0: ephemeral), ``token``,
    ``max_bytes``, ``max_batch``, ``workers``, ``deadline_s``, pixel limits ...).  Returns the
    started server (``.url``, ``.shutdown()``).
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


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got '{text}'") from None
        if not value > 0 or (isinstance(value, float) and value == float("inf")):
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got '{text}'")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    """``advantageflow serve-reward NAME [--host H] [--port P] [--token T] [limits] [--arg k=v]``."""
    d = ServerLimits()
    parser = argparse.ArgumentParser(
        prog="advantageflow serve-reward",
        allow_abbrev=False,
        description="Serve a registered reward over HTTP (JSON, no pickle).",
    )
    parser.add_argument("name", help="registered reward name or dotted path 'pkg.module:factory'")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    parser.add_argument(
        "--token", default=None, help=f"bearer token required from clients (default: ${TOKEN_ENV} if set)"
    )
    parser.add_argument("--max-bytes", type=_positive(int), default=d.max_bytes, help="request size limit (413)")
    parser.add_argument(
        "--max-batch", type=_positive(int), default=256, help="most samples scored in one coalesced call"
    )
    parser.add_argument(
        "--max-pixels",
        type=_positive(int),
        default=d.max_pixels,
        help="most pixels of one image, read from its header before decoding (413)",
    )
    parser.add_argument(
        "--max-request-pixels",
        type=_positive(int),
        default=d.max_request_pixels,
        help="most pixels of all images of one request (413)",
    )
    parser.add_argument(
        "--max-inflight-pixels",
        type=_positive(int),
        default=None,
        help="most decoded pixels held at once over all requests (default 2 x request limit)",
    )
    parser.add_argument(
        "--max-prompt-chars", type=_positive(int), default=d.max_prompt_chars, help="longest prompt (400)"
    )
    parser.add_argument(
        "--deadline",
        type=_positive(float),
        default=d.deadline_s,
        help="seconds a request may take, body to answer (408 / 503 / 504 beyond)",
    )
    parser.add_argument(
        "--workers",
        type=_positive(int),
        default=2,
        help="scorer threads (1 if the reward cannot be called concurrently)",
    )
    parser.add_argument(
        "--arg",
        action="append",
        type=_parse_arg,
        default=[],
        metavar="KEY=VALUE",
        help="reward argument (value parsed as YAML), repeatable",
    )
    parser.add_argument("--verbose", action="store_true", help="log every request")
    opts = parser.parse_args(argv)
    token = opts.token if opts.token is not None else os.environ.get(TOKEN_ENV)
    try:
        reward = build_reward(opts.name, dict(opts.arg))
    except Exception as err:  # noqa: BLE001 - one clear line for the user
        print(f"error: cannot build reward '{opts.name}': {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    if not _is_loopback(opts.host) and not token:
        print(f"warning: serving on {opts.host} without a token; anyone who can reach it can use it", file=sys.stderr)
    try:
        server = RewardHTTPServer(
            reward,
            opts.name,
            opts.host,
            opts.port,
            token=token,
            max_bytes=opts.max_bytes,
            max_batch=opts.max_batch,
            max_pixels=opts.max_pixels,
            max_request_pixels=opts.max_request_pixels,
            max_inflight_pixels=opts.max_inflight_pixels,
            max_prompt_chars=opts.max_prompt_chars,
            deadline_s=opts.deadline,
            workers=opts.workers,
            verbose=opts.verbose,
        )
    except OSError as err:
        print(f"error: cannot listen on {opts.host}:{opts.port}: {err.strerror or err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"serving reward '{opts.name}' on {server.url}", flush=True)
    # uvicorn stops on SIGINT / SIGTERM, then re-raises the signal to the handler it found:
    # a recording one, so that a requested stop is a clean exit (0).
    stops: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {
            sig: signal.signal(sig, lambda signum, frame: stops.append(signum))
            for sig in (signal.SIGINT, signal.SIGTERM)
        }
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
