"""The ``remote`` reward: a client of :mod:`advantageflow.rewards.server`.

Sends the batch as JSON (PNG images, or raw float32 for non-image samples such as the 2-D
task's points), retries transient failures with exponential backoff, and otherwise raises
:class:`~advantageflow.rewards.base.RewardError` so the run stops (and can be resumed) rather
than training on missing or NaN rewards.  Every response is validated: one finite number per
sample in ``scores`` and in each component.
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

from advantageflow.rewards.base import RewardError
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
            ``float32`` (exact floats; the server then scores unquantised images).
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
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"remote reward: url must start with http:// or https://, got '{url}'")
        if encoding not in ("auto", "png", "float32"):
            raise ValueError(f"remote reward: unknown encoding '{encoding}' (auto, png, float32)")
        if retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("remote reward: need retries >= 0, timeout > 0, backoff >= 0")
        base = url.rstrip("/")
        self.url = base if base.endswith("/score") else base + "/score"
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.timeout, self.retries = float(timeout), int(retries)
        self.backoff, self.max_backoff, self.encoding = float(backoff), float(max_backoff), encoding
        self.attempts_made = 0  # total HTTP attempts, for tests and logs
        host = urllib.parse.urlsplit(self.url).hostname or ""
        # A server on this machine is never reached through $http_proxy.
        local = host == "localhost" or _is_loopback(host)
        self._opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if local else []))

    def _post(self, body: bytes) -> bytes:
        headers = {"Content-Type": "application/json"}
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
        body = encode_request(images, prompts, metadata, self.encoding)
        last = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))
            try:
                raw = self._post(body)
                scores, parts = decode_response(raw, batch)
            except urllib.error.HTTPError as err:
                detail = _error_detail(err)
                if err.code in FATAL_STATUS:
                    raise RewardError(f"remote reward at {self.url} refused the request: "
                                      f"HTTP {err.code}: {detail}") from err
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
        raise RewardError(
            f"remote reward at {self.url} failed after {self.retries + 1} attempts; last error: {last}"
        )


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
