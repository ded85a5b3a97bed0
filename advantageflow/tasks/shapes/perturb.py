"""Perturbations of ShapesEval renders used to measure the detector (tests and
``benchmarks/shapes_detector.py``): a Gaussian blur, and negative controls that break exactly
one clause of a prompt."""

from __future__ import annotations

import random

import torch

from advantageflow.tasks.shapes.grammar import infer_tag
from advantageflow.tasks.shapes.scene import COLORS, RELATIONS, SHAPES, ObjectSpec, Relation, SceneSpec


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, 3, H, W)`` images (replicate padding)."""
    r = int(3 * sigma) + 1
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma**2))
    k = k / k.sum()
    b, c, h, w = x.shape
    y = torch.nn.functional.pad(x.reshape(b * c, 1, h, w), (r, r, r, r), mode="replicate")
    y = torch.nn.functional.conv2d(y, k.view(1, 1, 1, -1))
    y = torch.nn.functional.conv2d(y, k.view(1, 1, -1, 1))
    return y.reshape(b, c, h, w)


def break_one_clause(spec: SceneSpec, rng: random.Random) -> tuple[SceneSpec, str]:
    """A spec that differs from ``spec`` in exactly one checked clause, and which clause.

    wrong count (counting: one more or one fewer), wrong colour (a named colour replaced),
    swapped relation (position: the opposite direction), missing object (one mentioned object
    left out; a lone object replaced by another shape)."""
    objs = list(spec.objects)
    options = ["missing object"]
    if spec.tag == "counting":
        options.append("wrong count")
    if any(o.color for o in objs):
        options.append("wrong colour")
    if spec.relation is not None:
        options.append("swapped relation")
    kind = rng.choice(options)
    if kind == "wrong count":
        o = objs[0]
        n = o.count + 1 if o.count < 4 and (o.count == 2 or rng.random() < 0.5) else o.count - 1
        objs[0] = ObjectSpec(o.shape, o.color, n)
    elif kind == "wrong colour":
        i = rng.choice([k for k, o in enumerate(objs) if o.color])
        o = objs[i]
        objs[i] = ObjectSpec(o.shape, rng.choice([c for c in COLORS if c != o.color]), o.count)
        return SceneSpec(spec.tag, tuple(objs), spec.relation), kind
    elif kind == "swapped relation":
        opposite = dict(zip(RELATIONS, ("right of", "left of", "below", "above")))
        return SceneSpec(spec.tag, tuple(objs), Relation(opposite[spec.relation.kind])), kind
    elif len(objs) == 1:  # missing object: draw another shape instead of the only one asked for
        o = objs[0]
        objs[0] = ObjectSpec(rng.choice([s for s in SHAPES if s != o.shape]), o.color, o.count)
    else:
        objs.pop(rng.randrange(len(objs)))
        return SceneSpec(infer_tag(tuple(objs), None), tuple(objs)), kind
    return SceneSpec(spec.tag, tuple(objs), spec.relation), kind
