"""Scene specs and the renderer of ShapesEval: coloured shapes on a plain dark background.

A :class:`SceneSpec` is what a prompt asks for (objects with shape / colour / count and an
optional spatial relation); a :class:`Scene` is one concrete layout that satisfies it (each
object's shape, colour, centre and size).  :func:`render` draws scenes as ``(B, 3, H, W)``
images in ``[0, 1]`` with 4x4 supersampled (anti-aliased) edges.

Coordinates are pixels with ``x`` to the right and ``y`` downwards; "above" means a smaller
``y``.  Objects never overlap in rendered scenes (at least ``GAP`` pixels between boxes).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "ring", "frame", "bar", "pillar")
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.15, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
    "purple": (0.70, 0.20, 0.80),
    "white": (0.92, 0.92, 0.92),
}
BACKGROUND: tuple[float, float, float] = (0.06, 0.06, 0.06)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

IMAGE_SIZE = 32
MIN_SIZE, MAX_SIZE = 9.0, 12.0  # side of an object's bounding box, in pixels
GAP = 2.0  # minimum empty pixels between two objects' boxes
POSITION_MIN_OFFSET = 8.0  # rendered "A left of B": B's centre at least this far right of A's
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ObjectSpec:
    """``count`` objects of ``shape``; ``color`` is ``None`` when the prompt names none."""

    shape: str
    color: str | None = None
    count: int = 1

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape '{self.shape}' (known: {', '.join(SHAPES)})")
        if self.color is not None and self.color not in COLORS:
            raise ValueError(f"unknown colour '{self.color}' (known: {', '.join(COLORS)})")
        if not 1 <= self.count <= 4:
            raise ValueError(f"count must be in 1..4, got {self.count}")


@dataclass(frozen=True)
class Relation:
    """``objects[a]`` is ``kind`` ``objects[b]`` (e.g. "left of")."""

    kind: str
    a: int = 0
    b: int = 1

    def __post_init__(self) -> None:
        if self.kind not in RELATIONS:
            raise ValueError(f"unknown relation '{self.kind}' (known: {', '.join(RELATIONS)})")


@dataclass(frozen=True)
class SceneSpec:
    """What a prompt asks for; JSON-able via :meth:`to_dict` / :meth:`from_dict`.

    Attributes:
        tag: one of :data:`TAGS` (GenEval's six categories).
        objects: the mentioned objects, in prompt order.
        relation: the spatial relation between ``objects[0]`` and ``objects[1]``, if any.
    """

    tag: str
    objects: tuple[ObjectSpec, ...]
    relation: Relation | None = None

    def __post_init__(self) -> None:
        if self.tag not in TAGS:
            raise ValueError(f"unknown tag '{self.tag}' (known: {', '.join(TAGS)})")
        if not self.objects:
            raise ValueError("a scene spec needs at least one object")
        if sum(o.count for o in self.objects) > 4:
            raise ValueError("a scene spec may ask for at most 4 objects in all")

    def to_dict(self) -> dict:
        return {
            "tag": self.tag,
            "objects": [asdict(o) for o in self.objects],
            "relation": asdict(self.relation) if self.relation else None,
        }

    @staticmethod
    def from_dict(data: dict) -> SceneSpec:
        try:
            objects = tuple(ObjectSpec(**o) for o in data["objects"])
            rel = data.get("relation")
            return SceneSpec(data["tag"], objects, Relation(**rel) if rel else None)
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed scene spec {json.dumps(data)[:200]}: {err}") from None


@dataclass
class PlacedObject:
    """One drawn object: ``size`` is the side of its bounding box, ``(cx, cy)`` its centre."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    def box(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return self.cx - h, self.cy - h, self.cx + h, self.cy + h


@dataclass
class Scene:
    """A concrete layout; ``objects`` are drawn on :data:`BACKGROUND`."""

    objects: list[PlacedObject] = field(default_factory=list)
    size: int = IMAGE_SIZE


def _boxes_apart(a: PlacedObject, b: PlacedObject, gap: float) -> bool:
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def relation_offset(kind: str, a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """``(primary, secondary)`` offsets of centre ``a`` relative to ``b`` for relation ``kind``.

    ``primary > 0`` means the relation holds in the right direction (e.g. for "left of",
    ``primary = b.x - a.x``); ``secondary`` is the offset along the other axis.
    """
    dx, dy = b[0] - a[0], b[1] - a[1]
    if kind == "left of":
        return dx, dy
    if kind == "right of":
        return -dx, dy
    if kind == "above":
        return dy, dx
    if kind == "below":
        return -dy, dx
    raise ValueError(f"unknown relation '{kind}'")


@dataclass(frozen=True)
class Layout:
    """How :func:`sample_scene` draws sizes and centres.  The default (the benchmark's scenes):
    sizes uniform in ``[MIN_SIZE, MAX_SIZE]``, centres uniform wherever the object fits.
    ``size`` > 0 fixes every object's size; ``centre_step`` > 0 puts centres on the lattice of
    multiples of that many pixels (a lower-entropy pretraining corpus; the prompts, and what
    satisfies them, are unchanged)."""

    size: float = 0.0
    centre_step: float = 0.0

    def object_size(self, rng: random.Random) -> float:
        return self.size or rng.uniform(MIN_SIZE, MAX_SIZE)

    def centre(self, rng: random.Random, obj_size: float, image_size: int) -> float:
        lo, hi = obj_size / 2 + 1, image_size - obj_size / 2 - 1
        if not self.centre_step:
            return rng.uniform(lo, hi)
        step = self.centre_step
        return step * rng.randint(math.ceil(lo / step), math.floor(hi / step))


def sample_scene(
    spec: SceneSpec,
    rng: random.Random,
    distractors: int = 0,
    size: int = IMAGE_SIZE,
    max_tries: int = 2000,
    layout: Layout | None = None,
) -> Scene:
    """A random layout satisfying ``spec`` (rejection sampling).

    Unnamed colours are drawn uniformly.  In position scenes the primary offset is at least
    :data:`POSITION_MIN_OFFSET` and dominates the secondary one (``|secondary| <= primary / 2``)
    so the relation is unambiguous.  ``distractors`` adds objects that do not change the
    answer: their (shape, colour) matches no mentioned object's shape, so counts, colours and
    relations of the mentioned objects are untouched.  ``layout`` (default: sizes uniform in
    ``[MIN_SIZE, MAX_SIZE]``, centres anywhere) restricts sizes and centres.
    """
    layout = layout or Layout()
    wanted = [(o.shape, o.color) for o in spec.objects for _ in range(o.count)]
    mentioned_shapes = {o.shape for o in spec.objects}
    free_shapes = [s for s in SHAPES if s not in mentioned_shapes]
    if distractors and not free_shapes:
        raise ValueError("distractors need a shape that the spec does not mention")
    wanted += [(rng.choice(free_shapes), None) for _ in range(distractors)]
    for _ in range(max_tries):
        placed: list[PlacedObject] = []
        ok = True
        for shape, color in wanted:
            s = layout.object_size(rng)
            for _ in range(50):
                drawn_color = color or rng.choice(list(COLORS))  # colour before centres: the draws of earlier versions
                cx, cy = layout.centre(rng, s, size), layout.centre(rng, s, size)
                obj = PlacedObject(shape, drawn_color, cx, cy, s)
                if all(_boxes_apart(obj, p, GAP) for p in placed):
                    placed.append(obj)
                    break
            else:
                ok = False
                break
        if not ok:
            continue
        if spec.relation is not None:
            a, b = placed[spec.relation.a], placed[spec.relation.b]
            primary, secondary = relation_offset(spec.relation.kind, (a.cx, a.cy), (b.cx, b.cy))
            if primary < POSITION_MIN_OFFSET or abs(secondary) > primary / 2:
                continue
        return Scene(placed, size)
    raise RuntimeError(f"could not place the objects of {spec} in {max_tries} tries")


def _coverage(obj: PlacedObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean mask of supersample points inside ``obj``: ``xs``, ``ys`` broadcastable grids.

    Every shape fits the object's box of side ``size`` (half side ``h``); the proportions
    below keep the eight shapes apart for the detector's moment features (see the evaluator).
    """
    h = obj.size / 2
    dx, dy = xs - obj.cx, ys - obj.cy
    ax, ay = np.abs(dx), np.abs(dy)
    if obj.shape == "circle":
        return dx * dx + dy * dy <= h * h
    if obj.shape == "square":
        side = 0.85 * h  # squares a little smaller so the shapes have similar areas
        return (ax <= side) & (ay <= side)
    if obj.shape == "triangle":  # upright isosceles: apex at the top, base at the bottom
        depth = dy + h  # 0 at the apex, size at the base
        return (depth >= 0) & (depth <= 2 * h) & (ax <= depth / 2)
    if obj.shape == "diamond":  # a square standing on a corner
        return ax + ay <= h
    if obj.shape == "ring":  # a disc with a hole of half its radius
        r2 = dx * dx + dy * dy
        return (r2 <= h * h) & (r2 >= (0.5 * h) ** 2)
    if obj.shape == "frame":  # a square outline, a hole of half its side
        outer, inner = 0.9 * h, 0.45 * h
        return (ax <= outer) & (ay <= outer) & ((ax > inner) | (ay > inner))
    if obj.shape == "bar":  # a lying rectangle, 2.5 : 1
        return (ax <= h) & (ay <= 0.4 * h)
    if obj.shape == "pillar":  # a standing rectangle, 1 : 2.5
        return (ay <= h) & (ax <= 0.4 * h)
    raise ValueError(f"unknown shape '{obj.shape}'")


def render(scenes: list[Scene]) -> Tensor:
    """Images ``(B, 3, H, W)`` float32 in ``[0, 1]`` of ``scenes`` (all of the same size).

    Each object is rasterised on a 4x4 supersampled grid over its own pixel window only
    (numpy: small per-object operations are far cheaper there than in multi-threaded torch).
    """
    if not scenes:
        raise ValueError("render needs at least one scene")
    size = scenes[0].size
    out = np.empty((len(scenes), 3, size, size), dtype=np.float32)
    out[:] = np.asarray(BACKGROUND, dtype=np.float32)[None, :, None, None]
    sub = (np.arange(SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE
    for i, scene in enumerate(scenes):
        if scene.size != size:
            raise ValueError("all scenes of a batch must have the same size")
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box()
            px0, py0 = max(int(math.floor(x0)) - 1, 0), max(int(math.floor(y0)) - 1, 0)
            px1, py1 = min(int(math.ceil(x1)) + 1, size), min(int(math.ceil(y1)) + 1, size)
            if px1 <= px0 or py1 <= py0:
                continue
            xs = (np.arange(px0, px1, dtype=np.float32)[:, None] + sub[None]).reshape(1, -1)
            ys = (np.arange(py0, py1, dtype=np.float32)[:, None] + sub[None]).reshape(-1, 1)
            mask = _coverage(obj, xs, ys).astype(np.float32)
            h, w = py1 - py0, px1 - px0
            alpha = mask.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3))
            color = np.asarray(COLORS[obj.color], dtype=np.float32)[:, None, None]
            patch = out[i, :, py0:py1, px0:px1]
            out[i, :, py0:py1, px0:px1] = patch * (1 - alpha) + color * alpha
    return torch.from_numpy(out)


def render_specs(
    specs: list[SceneSpec], rng: random.Random, distractors: int = 0, layout: Layout | None = None
) -> tuple[Tensor, list[Scene]]:
    """Render one random layout per spec: ``(B, 3, H, W)`` images and the scenes drawn."""
    scenes = [sample_scene(s, rng, distractors=distractors, layout=layout) for s in specs]
    return render(scenes), scenes
