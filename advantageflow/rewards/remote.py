"""The ``remote`` reward: a client of :mod:`advantageflow.rewards.server` (or of another
project's reward server, ``protocol``).

Sends the batch as JSON (PNG images, or raw float32 for non-image samples such as the 2-D
task's points), retries transient failures with exponential backoff, and otherwise raises
:class:`~advantageflow.rewards.base.RewardError` so the run stops (and can be resumed) rather
than training on missing or NaN rewards.  Every response is validated: one finite number per
sample in ``scores`` and in each component.

``protocol``: ``advantageflow`` (default; ``POST /score``, JSON, never pickle),
``flow_factory`` (Flow-Factory's ``POST /compute`` JSON) or ``flow_grpo`` (Flow-GRPO's pickled
request to the URL as given; the pickled reply is read only through the restricted unpickler
of :mod:`advantageflow.rewards.protocols`, and a reply naming anything but plain data ends the
run at once).
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from torch import Tensor

from advantageflow.registry import closest
from advantageflow.rewards.base import RewardError
from advantageflow.rewards.protocols import (
    PROTOCOLS,
    UnsafePickleError,
    decode_flow_factory_response,
    decode_flow_grpo_response,
    encode_flow_factory_request,
    encode_flow_grpo_request,
)
from advantageflow.rewards.wire import decode_response, encode_request, loads_strict

TOKEN_ENV = "ADVANTAGEFLOW_REWARD_TOKEN"
# Answers that retrying cannot change: bad request, auth, route, size, media type.
FATAL_STATUS = {400, 401, 403, 404, 405, 411, 413, 415}
MAX_RESPONSE_BYTES = 64 * 2**20


class RemoteReward:
    """Score batches on a reward server.  ``(B, ...)`` samples -> ``(B,)`` or named parts.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000`` (``/score`` is appended unless given).
        token: bearer token; defaults to ``$ADVANTAGEFLOW_REWARD_TOKEN`` when unset, so configs
            need not hold secrets.
        timeout: socket timeout of each attempt, in seconds (connecting, and each wait for
            the server's answer).
        retries: extra attempts after the first for transient failures (connection refused or
            reset, timeouts, 5xx/429, unparsable or invalid responses).
        backoff: the first wait in seconds; doubled after each failure, capped at ``max_backoff``.
        encoding: ``auto`` (PNG for ``(B, 3, H, W)`` images, float32 otherwise), ``png``, or
            ``float32`` (exact floats; the server then scores unquantised images).  Protocol
            ``advantageflow`` only (Flow-Factory: PNG; Flow-GRPO: JPEG at quality 75).
        protocol: ``advantageflow`` (``url`` + ``/score``), ``flow_factory`` (``url`` +
            ``/compute``) or ``flow_grpo`` (``url`` as given, e.g. ``http://127.0.0.1:18085``).
        score_key: ``flow_grpo`` only: the reply's key holding the scores (default: ``scores``
            if present, else ``outputs``).
    """

    differentiable = False
    builds_cheaply = True  # no request until the first score

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        encoding: str = "auto",
        protocol: str = "advantageflow",
        score_key: str | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"remote reward: url must start with http:// or https://, got '{url}'")
        if encoding not in ("auto", "png", "float32"):
            raise ValueError(f"remote reward: unknown encoding '{encoding}' (auto, png, float32)")
        if retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("remote reward: need retries >= 0, timeout > 0, backoff >= 0")
        if protocol not in PROTOCOLS:
            hint = closest(str(protocol), list(PROTOCOLS))
            more = f"; did you mean '{hint}'?" if hint else ""
            raise ValueError(f"remote reward: unknown protocol '{protocol}'{more} (options: {', '.join(PROTOCOLS)})")
        if score_key is not None and protocol != "flow_grpo":
            raise ValueError("remote reward: score_key applies to protocol 'flow_grpo' only")
        if encoding != "auto" and protocol != "advantageflow":
            raise ValueError(f"remote reward: encoding applies to protocol 'advantageflow' only, not '{protocol}'")
        self.protocol, self.score_key = protocol, score_key
        base = url.rstrip("/")
        suffix = {"advantageflow": "/score", "flow_factory": "/compute", "flow_grpo": ""}[protocol]
        self.url = base if base.endswith(suffix) else base + suffix
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.timeout, self.retries = float(timeout), int(retries)
        self.backoff, self.max_backoff, self.encoding = float(backoff), float(max_backoff), encoding
        self.attempts_made = 0  # total HTTP attempts, for tests and logs
        host = urllib.parse.urlsplit(self.url).hostname or ""
        # A server on this machine is never reached through $http_proxy.
        local = host == "localhost" or _is_loopback(host)
        self._opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if local else []))

    def _post(self, body: bytes) -> bytes:
        ctype = "application/octet-stream" if self.protocol == "flow_grpo" else "application/json"
        headers = {"Content-Type": ctype}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        self.attempts_made += 1
        with self._opener.open(req, timeout=self.timeout) as resp:
            data = resp.read(MAX_RESPONSE_BYTES + 1)
            announced = resp.headers.get("Content-Length")
        if announced is not None and announced.isdigit() and len(data) < int(announced):
            raise ValueError(f"response cut short: {len(data)} of {announced} bytes")
        if len(data) > MAX_RESPONSE_BYTES:
            raise ValueError(f"response larger than {MAX_RESPONSE_BYTES} bytes")
        return data

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Any:
        batch = images.shape[0]
        body = self._encode(images, prompts, metadata)
        last = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))
            try:
                raw = self._post(body)
                scores, parts = self._decode(raw, batch)
            except UnsafePickleError as err:  # a hostile or broken server: retrying cannot help
                raise RewardError(f"remote reward at {self.url}: {err}") from err
            except urllib.error.HTTPError as err:
                detail = _error_detail(err)
                if err.code in FATAL_STATUS:
                    raise RewardError(
                        f"remote reward at {self.url} refused the request: HTTP {err.code}: {detail}"
                    ) from err
                last = f"HTTP {err.code}: {detail}"
            except (OSError, http.client.HTTPException) as err:  # refused, timeouts, resets, cut replies
                reason = getattr(err, "reason", err)
                last = f"{type(reason).__name__}: {reason}"
            except ValueError as err:  # invalid response body
                last = f"invalid response: {err}"
            else:
                if not parts:
                    return scores.to(images.device)
                dev = images.device
                return {"score": scores.to(dev), **{k: v.to(dev) for k, v in parts.items()}}
        raise RewardError(f"remote reward at {self.url} failed after {self.retries + 1} attempts; last error: {last}")

    def _encode(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> bytes:
        if self.protocol == "flow_factory":
            return encode_flow_factory_request(images, prompts, metadata)
        if self.protocol == "flow_grpo":
            return encode_flow_grpo_request(images, prompts, metadata)
        return encode_request(images, prompts, metadata, self.encoding)

    def _decode(self, raw: bytes, batch: int) -> tuple[Tensor, dict[str, Tensor]]:
        if self.protocol == "flow_factory":
            return decode_flow_factory_response(raw, batch), {}
        if self.protocol == "flow_grpo":
            return decode_flow_grpo_response(raw, batch, self.score_key)
        return decode_response(raw, batch)


def _error_detail(err: urllib.error.HTTPError) -> str:
    try:
        obj = loads_strict(err.read(4096))
        return str(obj.get("error", obj)) if isinstance(obj, dict) else str(obj)
    except Exception:  # noqa: BLE001 - best effort
        return err.reason if isinstance(err.reason, str) else "no detail"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
