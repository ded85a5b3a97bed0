"""Other projects' reward-server protocols, for :class:`~advantageflow.rewards.remote.RemoteReward`
(client) and :mod:`~advantageflow.rewards.server` (``POST /compute``).

* ``flow_grpo``: the authors' reward servers (Flow-GRPO's ``geneval_score``, ``deqa_score_remote``,
  ``unifiedreward_score_remote``; the ``reward-server`` repository, a Flask app on ``POST /``):
  the request is a pickled dict ``{"images": [JPEG bytes], "prompts": [...], "meta_datas":
  [...], "only_strict": True}``; the reply a pickled dict whose ``"scores"`` (GenEval) or
  ``"outputs"`` (DeQA, UnifiedReward) hold one number per image.  Replies are unpickled ONLY
  through :class:`RestrictedUnpickler`: plain containers, numbers, strings and numeric numpy
  arrays; anything else (``os.system``, ``eval``, any class) is refused before it is loaded.
  Our own server never accepts pickle.
* ``flow_factory``: Flow-Factory's ``RemoteRewardClient`` JSON: ``POST /compute`` with
  ``{"prompt": [...], "image": [base64 PNG] | null, "video": [[base64 PNG frame]] | null,
  "condition_images": null, "condition_videos": null, "kwargs": {...} | null}`` answered with
  ``{"rewards": [...]}`` (or ``{"error": "..."}``), plus ``GET /health``.
"""

from __future__ import annotations

import base64
import builtins
import collections
import importlib
import io
import json
import math
import pickle
from typing import Any

import numpy as np
from torch import Tensor

from advantageflow.rewards.base import RewardError
from advantageflow.rewards.imageio import encode_images, encode_png
from advantageflow.rewards.wire import (
    BadRequest,
    ParsedRequest,
    _image_bytes,
    _numbers,
    is_image_batch,
    loads_strict,
)

PROTOCOLS = ("advantageflow", "flow_factory", "flow_grpo")
# Flow-GRPO's clients read one of these keys; the first present is used unless score_key is set.
FLOW_GRPO_SCORE_KEYS = ("scores", "outputs")
# Arrays a reply may rebuild: no object arrays (their items would be arbitrary objects).
ARRAY_KINDS = set("biufcUS")
MAX_ARRAY_ITEMS = 2**24  # what numpy's _reconstruct may allocate before the data arrives


class UnsafePickleError(pickle.UnpicklingError):
    """A pickled reply asked for something other than plain data; nothing of it was run."""


def _numpy_core(name: str) -> Any:
    """``numpy._core.<name>`` (numpy 2) or ``numpy.core.<name>`` (numpy 1)."""
    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{name}")


def _reconstruct(cls: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's ``_reconstruct`` for plain ndarrays of a bounded initial size (the data follows
    in the pickle; a huge initial shape would allocate before it is checked)."""
    if cls is not np.ndarray:
        raise UnsafePickleError("refused: _reconstruct of something other than numpy.ndarray")
    items = math.prod(shape) if isinstance(shape, tuple) else shape
    if not isinstance(items, int) or items > MAX_ARRAY_ITEMS:
        raise UnsafePickleError(f"refused: an array of {items} items")
    return _numpy_core("multiarray")._reconstruct(cls, shape, dtype)


def _latin1_encode(text: Any, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (latin-1 only)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refused: _codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _bytes_like(kind: type) -> Any:
    def build(*args: Any) -> Any:
        # bytes(n) / bytearray(n) would allocate n bytes from a few bytes of pickle.
        if any(not isinstance(a, (bytes, bytearray, memoryview, pickle.PickleBuffer)) for a in args):
            raise UnsafePickleError(f"refused: {kind.__name__} from {[type(a).__name__ for a in args]}")
        return kind(*args)

    return build


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain data only: dicts, lists, tuples, sets, numbers, strings, bytes and
    numeric numpy arrays / scalars.  Every global a pickle names goes through
    :meth:`find_class`, which admits the handful of constructors those need and refuses
    everything else with :class:`UnsafePickleError` (before anything is called)."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__"):
            if name in ("set", "frozenset", "complex"):
                return getattr(builtins, name)
            if name in ("bytes", "bytearray"):
                return _bytes_like(getattr(builtins, name))
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            if name == "_reconstruct":
                return _reconstruct
            if name == "scalar":
                return _numpy_core("multiarray").scalar
        if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
            return _numpy_core("numeric")._frombuffer  # the data is in the pickle: size is bounded
        raise UnsafePickleError(
            f"refused to unpickle '{module}.{name}': a reward reply may hold only plain containers, "
            "numbers, strings and numeric numpy arrays"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refused: persistent ids in a pickled reply")


def _check_plain(obj: Any, depth: int = 0) -> None:
    """What was rebuilt holds no object arrays or other types (a BUILD could change a dtype)."""
    if depth > 50:
        raise UnsafePickleError("refused: a reply nested deeper than 50 levels")
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject or obj.dtype.kind not in ARRAY_KINDS:
            raise UnsafePickleError(f"refused: a numpy array of dtype {obj.dtype}")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, depth + 1)
            _check_plain(v, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _check_plain(v, depth + 1)
    elif not isinstance(obj, (str, bytes, bytearray, int, float, complex, bool, type(None), np.generic)):
        raise UnsafePickleError(f"refused: a {type(obj).__name__} in a pickled reply")


def safe_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`; :class:`UnsafePickleError` for
    anything but plain data, ``ValueError`` for a corrupt pickle."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError:
        raise
    except Exception as err:  # noqa: BLE001 - truncated or malformed pickles raise many types
        raise ValueError(f"reply is not a valid pickle ({type(err).__name__}: {err})") from err
    _check_plain(obj)
    return obj


def encode_jpeg(images: Tensor) -> list[bytes]:
    """``(B, 3, H, W)`` in [0, 1] -> JPEG bytes per image, PIL's default quality (75), as
    Flow-GRPO's remote rewards send them."""
    return encode_images(images, "JPEG")


def encode_flow_grpo_request(samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> bytes:
    """The pickled request of Flow-GRPO's reward-server clients (we only pickle our own data)."""
    if not is_image_batch(samples):
        raise RewardError(f"remote reward (flow_grpo): needs (B, 3, H, W) images, got {tuple(samples.shape)}")
    batch = samples.shape[0]
    if len(prompts) != batch:
        raise RewardError(f"remote reward: {len(prompts)} prompts for a batch of {batch}")
    meta = [dict(m) for m in metadata] if metadata else [{} for _ in range(batch)]
    body = {"images": encode_jpeg(samples), "prompts": list(prompts), "meta_datas": meta, "only_strict": True}
    return pickle.dumps(body, protocol=4)


def decode_flow_grpo_response(raw: bytes, batch: int, score_key: str | None) -> tuple[Tensor, dict[str, Tensor]]:
    """Scores from a pickled reply: ``score_key`` (default: ``scores``, else ``outputs``) must
    hold ``batch`` finite numbers; other keys holding ``batch`` numbers become components.
    :class:`UnsafePickleError` for a reply that is not plain data, ``ValueError`` otherwise."""
    obj = safe_loads(raw)
    if not isinstance(obj, dict):
        raise ValueError(f"reply is a {type(obj).__name__}, expected a dict")
    keys = [score_key] if score_key else [k for k in FLOW_GRPO_SCORE_KEYS if k in obj]
    if not keys or keys[0] not in obj:
        want = score_key or " or ".join(FLOW_GRPO_SCORE_KEYS)
        raise ValueError(f"reply has no '{want}' (keys: {sorted(map(str, obj))}); set score_key")
    scores = _numbers(_plain_list(obj[keys[0]]), batch, keys[0])
    parts = {}
    for key, value in obj.items():
        if key == keys[0] or not isinstance(key, str):
            continue
        try:
            parts[key] = _numbers(_plain_list(value), batch, key)
        except ValueError:
            continue  # other fields (per-group dicts, strings) are not per-sample numbers
    return scores, parts


def _plain_list(value: Any) -> Any:
    """numpy arrays and numpy scalars -> Python lists / numbers, for the shared validation."""
    if isinstance(value, np.ndarray):
        return value.tolist() if value.ndim == 1 and value.dtype.kind in "iuf" else value
    if isinstance(value, (list, tuple)):
        return [v.item() if isinstance(v, np.generic) and v.dtype.kind in "iuf" else v for v in value]
    return value


def encode_flow_factory_request(samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> bytes:
    """Flow-Factory's ``/compute`` JSON: ``(B, 3, H, W)`` images as ``image``, ``(B, T, 3, H, W)``
    as ``video`` (base64 PNG frames); non-empty metadata travels as ``kwargs.metadata``."""
    batch = samples.shape[0]
    if len(prompts) != batch:
        raise RewardError(f"remote reward: {len(prompts)} prompts for a batch of {batch}")
    body: dict[str, Any] = {
        "prompt": list(prompts),
        "image": None,
        "video": None,
        "condition_images": None,
        "condition_videos": None,
        "kwargs": None,
    }
    if is_image_batch(samples):
        body["image"] = [base64.b64encode(p).decode("ascii") for p in encode_png(samples)]
    elif samples.dim() == 5 and samples.shape[2] == 3:
        body["video"] = [[base64.b64encode(p).decode("ascii") for p in encode_png(v)] for v in samples]
    else:
        raise RewardError(
            f"remote reward (flow_factory): needs (B, 3, H, W) images or (B, T, 3, H, W) videos, "
            f"got {tuple(samples.shape)}"
        )
    if metadata and any(metadata):
        body["kwargs"] = {"metadata": list(metadata)}
    try:
        return json.dumps(body, allow_nan=False).encode()
    except (TypeError, ValueError) as err:
        raise RewardError(f"remote reward: metadata is not JSON-serialisable: {err}") from err


def decode_flow_factory_response(raw: bytes, batch: int) -> Tensor:
    """``{"rewards": [batch finite numbers]}``; ``ValueError`` otherwise (also for ``error``)."""
    try:
        obj = loads_strict(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"response is not JSON ({type(err).__name__})") from err
    if not isinstance(obj, dict):
        raise ValueError("response is not a JSON object")
    if obj.get("error"):
        raise ValueError(f"server error: {str(obj['error'])[:300]}")
    if "rewards" not in obj:
        raise ValueError("response has no 'rewards'")
    return _numbers(obj["rewards"], batch, "rewards")


def parse_flow_factory_request(
    body: bytes, max_batch_items: int, max_pixels: int, max_request_pixels: int, max_prompt_chars: int
) -> ParsedRequest:
    """A ``POST /compute`` body -> :class:`~advantageflow.rewards.wire.ParsedRequest` (images
    sized from their PNG headers before anything is decoded, as for ``/score``)."""
    try:
        obj = loads_strict(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise BadRequest(f"body is not UTF-8 JSON: {type(err).__name__}") from err
    if not isinstance(obj, dict):
        raise BadRequest("body must be a JSON object")
    unknown = set(obj) - {"prompt", "image", "video", "condition_images", "condition_videos", "kwargs"}
    if unknown:
        raise BadRequest(f"unknown fields {sorted(unknown)} (prompt, image|video, kwargs)")
    for key in ("condition_images", "condition_videos"):
        if obj.get(key):
            raise BadRequest(f"'{key}' is not supported by this server")
    image, video = obj.get("image"), obj.get("video")
    if (image is None) == (video is None):
        raise BadRequest("give exactly one of 'image' (base64 PNGs) or 'video' (lists of base64 PNG frames)")
    frames = 0
    if image is not None:
        pngs, pixels = _image_bytes(image, max_batch_items, max_pixels, max_request_pixels)
        batch = len(pngs)
    else:
        if not isinstance(video, list) or not video or not all(isinstance(v, list) and v for v in video):
            raise BadRequest("'video' must be a non-empty list of non-empty lists of base64 PNG frames")
        frames = len(video[0])
        if any(len(v) != frames for v in video):
            raise BadRequest("all videos of a request must have the same number of frames")
        flat = [f for v in video for f in v]
        pngs, pixels = _image_bytes(flat, max_batch_items * frames, max_pixels, max_request_pixels)
        batch = len(video)
    prompts = obj.get("prompt")
    if not isinstance(prompts, list) or len(prompts) != batch or not all(isinstance(p, str) for p in prompts):
        raise BadRequest(f"'prompt' must be a list of {batch} strings")
    longest = max((len(p) for p in prompts), default=0)
    if longest > max_prompt_chars:
        raise BadRequest(f"a prompt of {longest} characters exceeds the limit of {max_prompt_chars}")
    kwargs = obj.get("kwargs") or {}
    metadata = kwargs.get("metadata") if isinstance(kwargs, dict) else None
    if metadata is None:
        metadata = [{} for _ in range(batch)]
    if not isinstance(metadata, list) or len(metadata) != batch or not all(isinstance(m, dict) for m in metadata):
        raise BadRequest(f"'kwargs.metadata' must be a list of {batch} objects")
    return ParsedRequest(prompts, metadata, pixels, pngs=pngs, max_pixels=max_pixels, frames=frames)


def encode_flow_factory_response(scores: Tensor) -> bytes:
    """``{"rewards": [...]}``; ``ValueError`` if anything is non-finite."""
    return json.dumps({"rewards": scores.detach().cpu().double().tolist()}, allow_nan=False).encode()
