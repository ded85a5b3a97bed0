"""The JSON wire format of the reward service (no pickle anywhere).

Request (``POST /score``, ``Content-Type: application/json``)::

    {"images": ["<base64 PNG>", ...],            # (B, 3, H, W) images, 8-bit RGB PNG
     "prompts": ["...", ...],                     # B strings
     "metadata": [{...}, ...]}                    # optional, B JSON objects

or, for samples that are not images (e.g. the (B, 2) points of the 2-D task), ``"array"``
instead of ``"images"``::

    {"array": {"dtype": "float32", "shape": [B, ...], "data": "<base64 little-endian bytes>"}}

Response: ``{"scores": [B floats], "components": {"<part>": [B floats], ...}}``; errors
``{"error": "<one line>"}``.  Non-finite numbers are refused in both directions.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from advantageflow.rewards.base import RewardError
from advantageflow.rewards.imageio import decode_png, encode_png, from_uint8


class BadRequest(ValueError):
    """A request the server refuses with HTTP 400; the message is sent back."""


@dataclass
class ScoreRequest:
    """A decoded request.  ``samples``: ``(B, 3, H, W)`` in [0, 1] or ``(B, ...)`` float32."""

    samples: Tensor
    prompts: list[str]
    metadata: list[dict] = field(default_factory=list)


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} is not allowed")


def loads_strict(data: bytes | str) -> object:
    """``json.loads`` that refuses ``NaN``/``Infinity`` (Python accepts them by default)."""
    return json.loads(data, parse_constant=_reject_constant)


def is_image_batch(samples: Tensor) -> bool:
    return samples.dim() == 4 and samples.shape[1] == 3


def encode_request(samples: Tensor, prompts: list[str], metadata: list[dict] | None, encoding: str) -> bytes:
    """JSON bytes of a request; ``encoding``: ``png`` (images only), ``float32``, or ``auto``
    (PNG for ``(B, 3, H, W)`` images, float32 otherwise)."""
    batch = samples.shape[0]
    if len(prompts) != batch:
        raise RewardError(f"remote reward: {len(prompts)} prompts for a batch of {batch}")
    metadata = list(metadata) if metadata else [{} for _ in range(batch)]
    if encoding == "auto":
        encoding = "png" if is_image_batch(samples) else "float32"
    body: dict = {"prompts": list(prompts), "metadata": metadata}
    if encoding == "png":
        if not is_image_batch(samples):
            raise RewardError(
                f"remote reward: encoding 'png' needs (B, 3, H, W) images, got {tuple(samples.shape)}; "
                "use encoding 'float32'"
            )
        body["images"] = [base64.b64encode(png).decode("ascii") for png in encode_png(samples)]
    elif encoding == "float32":
        arr = samples.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4")
        body["array"] = {
            "dtype": "float32",
            "shape": list(arr.shape),
            "data": base64.b64encode(arr.tobytes()).decode("ascii"),
        }
    else:
        raise RewardError(f"remote reward: unknown encoding '{encoding}' (auto, png, float32)")
    try:
        return json.dumps(body, allow_nan=False).encode()
    except (TypeError, ValueError) as err:
        raise RewardError(f"remote reward: metadata is not JSON-serialisable: {err}") from err


def _b64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise BadRequest(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadRequest(f"{what} is not valid base64") from err


class TooLarge(BadRequest):
    """A request over a pixel budget (HTTP 413)."""


@dataclass
class ParsedRequest:
    """A request checked up to decoding: the PNG bytes (or the float array), prompts,
    metadata, and ``pixels``, the decoded pixels it will take (from the PNG headers)."""

    prompts: list[str]
    metadata: list[dict]
    pixels: int
    pngs: list[bytes] | None = None
    array: np.ndarray | None = None
    max_pixels: int = 0
    frames: int = 0  # > 0: the PNGs are B videos of this many frames each -> (B, T, 3, H, W)


def png_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from a PNG's header, without decoding it."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("not a PNG image")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            return img.size
    except Exception as err:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise ValueError(f"corrupt PNG: {type(err).__name__}") from err


def parse_request(
    body: bytes,
    max_batch_items: int,
    max_pixels: int,
    max_request_pixels: int | None = None,
    max_prompt_chars: int | None = None,
) -> ParsedRequest:
    """Everything but decoding: JSON, fields, prompt lengths, and each image's size read from
    its header (:class:`TooLarge` over ``max_pixels`` per image or ``max_request_pixels`` in
    all), so nothing large is allocated for a request that will be refused."""
    try:
        obj = loads_strict(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise BadRequest(f"body is not UTF-8 JSON: {type(err).__name__}") from err
    if not isinstance(obj, dict):
        raise BadRequest("body must be a JSON object")
    unknown = set(obj) - {"images", "array", "prompts", "metadata"}
    if unknown:
        raise BadRequest(f"unknown fields {sorted(unknown)} (images|array, prompts, metadata)")
    if ("images" in obj) == ("array" in obj):
        raise BadRequest("give exactly one of 'images' (base64 PNGs) or 'array'")
    budget = max_request_pixels or max_pixels * max_batch_items
    if "images" in obj:
        pngs, pixels = _image_bytes(obj["images"], max_batch_items, max_pixels, budget)
        parsed = ParsedRequest([], [], pixels, pngs=pngs, max_pixels=max_pixels)
        batch = len(pngs)
    else:
        array = _decode_array(obj["array"], max_batch_items, max_pixels, budget)
        parsed = ParsedRequest([], [], math.ceil(array.size / 3), array=array)
        batch = array.shape[0]
    prompts = obj.get("prompts")
    if not isinstance(prompts, list) or len(prompts) != batch or not all(isinstance(p, str) for p in prompts):
        raise BadRequest(f"'prompts' must be a list of {batch} strings")
    if max_prompt_chars is not None:
        longest = max((len(p) for p in prompts), default=0)
        if longest > max_prompt_chars:
            raise BadRequest(f"a prompt of {longest} characters exceeds the limit of {max_prompt_chars}")
    metadata = obj.get("metadata")
    if metadata is None:
        metadata = [{} for _ in range(batch)]
    if not isinstance(metadata, list) or len(metadata) != batch or not all(isinstance(m, dict) for m in metadata):
        raise BadRequest(f"'metadata' must be a list of {batch} objects")
    parsed.prompts, parsed.metadata = prompts, metadata
    return parsed


def materialise(parsed: ParsedRequest) -> ScoreRequest:
    """Decode a parsed request's images (or wrap its array) into a :class:`ScoreRequest`."""
    if parsed.array is not None:
        return ScoreRequest(torch.from_numpy(parsed.array.astype(np.float32)), parsed.prompts, parsed.metadata)
    arrays = []
    for i, png in enumerate(parsed.pngs or []):
        try:
            arrays.append(decode_png(png, parsed.max_pixels))
        except ValueError as err:
            raise BadRequest(f"images[{i}]: {err}") from err
    if len({a.shape for a in arrays}) != 1:
        raise BadRequest("all images of a request must have the same size")
    samples = from_uint8(np.stack(arrays))
    if parsed.frames:
        samples = samples.reshape(-1, parsed.frames, *samples.shape[1:])
    return ScoreRequest(samples, parsed.prompts, parsed.metadata)


def decode_request(
    body: bytes,
    max_batch_items: int,
    max_pixels: int,
    max_request_pixels: int | None = None,
    max_prompt_chars: int | None = None,
) -> ScoreRequest:
    """Parse and validate a request body; :class:`BadRequest` for anything malformed."""
    return materialise(parse_request(body, max_batch_items, max_pixels, max_request_pixels, max_prompt_chars))


def _image_bytes(images: object, max_batch_items: int, max_pixels: int, budget: int) -> tuple[list[bytes], int]:
    if not isinstance(images, list) or not images:
        raise BadRequest("'images' must be a non-empty list of base64 PNG strings")
    if len(images) > max_batch_items:
        raise BadRequest(f"{len(images)} images exceed the limit of {max_batch_items}")
    pngs, total = [], 0
    for i, text in enumerate(images):
        png = _b64(text, f"images[{i}]")
        try:
            width, height = png_size(png)
        except ValueError as err:
            raise BadRequest(f"images[{i}]: {err}") from err
        if width * height > max_pixels:
            raise TooLarge(f"images[{i}]: image {width}x{height} exceeds the limit of {max_pixels} pixels")
        total += width * height
        if total > budget:
            raise TooLarge(f"the images of this request exceed the limit of {budget} pixels in all")
        pngs.append(png)
    return pngs, total


def _decode_array(spec: object, max_batch_items: int, max_values: int, budget: int) -> np.ndarray:
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data"}:
        raise BadRequest("'array' must be an object with exactly dtype, shape, data")
    if spec["dtype"] != "float32":
        raise BadRequest("'array.dtype' must be 'float32'")
    shape = spec["shape"]
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 5
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise BadRequest("'array.shape' must be a list of 1 to 5 positive integers")
    if shape[0] > max_batch_items:
        raise BadRequest(f"batch of {shape[0]} exceeds the limit of {max_batch_items}")
    count = math.prod(shape)
    if count > 3 * budget:  # the float memory of an image request at the pixel budget
        raise TooLarge(f"'array' of {count} values exceeds the limit of {3 * budget}")
    data = _b64(spec["data"], "'array.data'")
    if len(data) != 4 * count:
        raise BadRequest(f"'array.data' has {len(data)} bytes, shape {shape} needs {4 * count}")
    arr = np.frombuffer(data, dtype="<f4").reshape(shape)
    if not np.isfinite(arr).all():
        raise BadRequest("'array' contains non-finite values")
    return arr


def encode_response(scores: Tensor, components: dict[str, Tensor]) -> bytes:
    """JSON bytes of a response; ``ValueError`` if anything is non-finite."""
    body = {
        "scores": scores.detach().cpu().double().tolist(),
        "components": {k: v.detach().cpu().double().tolist() for k, v in components.items()},
    }
    return json.dumps(body, allow_nan=False).encode()


def decode_response(body: bytes, batch: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Validate a response: ``batch`` finite numbers in ``scores`` and in each component.

    Raises ``ValueError`` with a one-line reason otherwise.
    """
    try:
        obj = loads_strict(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"response is not JSON ({type(err).__name__})") from err
    if not isinstance(obj, dict) or "scores" not in obj:
        raise ValueError("response has no 'scores'")
    scores = _numbers(obj["scores"], batch, "scores")
    comps = obj.get("components", {})
    if not isinstance(comps, dict):
        raise ValueError("response 'components' is not an object")
    return scores, {str(k): _numbers(v, batch, f"components[{k}]") for k, v in comps.items()}


def _numbers(values: object, batch: int, what: str) -> Tensor:
    if not isinstance(values, list) or len(values) != batch:
        got = len(values) if isinstance(values, list) else type(values).__name__
        raise ValueError(f"response '{what}' should hold {batch} numbers, got {got}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"response '{what}' holds non-numbers")
    out = torch.tensor(values, dtype=torch.float32)
    if not torch.isfinite(out).all():
        raise ValueError(f"response '{what}' holds non-finite values")
    return out
