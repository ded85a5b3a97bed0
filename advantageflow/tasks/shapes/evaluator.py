"""ShapesEval's detector and clause checker (the benchmark and, via :mod:`.reward`, the reward).

Detection, per image ``(3, H, W)`` in ``[0, 1]`` (numpy; no learned parts):

1. foreground strength ``d = max_c |img_c - background_c|``, smoothed by a 3x3 median (robust
   to speckle noise), thresholded at :data:`FG_THRESHOLD`;
2. 4-connected components; components smaller than :data:`MIN_AREA` pixels are noise;
3. colour: the mean RGB of the component's core pixels, nearest palette colour (none when
   farther than :data:`MAX_COLOR_DIST` from every palette colour diluted with the background
   down to :data:`MIN_COLOR_MIX`);
4. shape, from rotation-free moment features of the component's pixels (see
   :func:`shape_features`): vertical skewness (upright triangles have their mass low) and the
   ratio of fourth moments along the diagonals to those along the axes (4/3 for a square,
   1 for a disc).

Clauses (GenEval, Ghosh et al. 2023, Sec. 3: presence / count / colour / position checks),
for each mentioned object ``o`` with ``count`` n:

- ``count``: the number of detected objects of ``o``'s shape is ``>= n`` (``== n`` for the
  counting tag; ``==`` the total asked of that shape for every tag with ``exact_counts``);
- ``color`` (when ``o`` names one): at least ``n`` of them have ``o``'s colour;
- ``position`` (position tag): some detected ``o_a`` and ``o_b`` (shape and colour as named)
  have centres offset by more than :data:`POSITION_MARGIN` pixels in the named direction.

Strict correctness is all clauses true (GenEval's score); partial credit is the fraction of
true clauses (the training reward, in the spirit of Flow-GRPO's partial GenEval reward).
``strict_exact`` is strict correctness with every count exact: an image that draws more of a
named shape than the prompt asks for (``Verdict.overdrawn``) fails it, which GenEval's
"at least" rule lets pass outside counting (reward hacking by over-drawing).
The per-tag summary averages over images of each tag; the overall score is the mean over
tags, as GenEval reports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from advantageflow.numerics import thread_invariant_kernels
from advantageflow.tasks.shapes.scene import BACKGROUND, COLORS, SHAPES, TAGS, SceneSpec, relation_offset

FG_THRESHOLD = 0.3
MIN_AREA = 12
MAX_AREA = 220
MAX_COLOR_DIST = 0.3
MIN_COLOR_MIX = 0.5  # a core colour may be diluted with the background down to half strength
POSITION_MARGIN = 2.0
TRIANGLE_SKEW = -0.25  # vertical skewness below this: an upright triangle (ideal -0.56)
ELONGATED = 0.9  # |log variance ratio| above this: a bar or a pillar (ideal 1.8)
HOLLOW = 0.5  # centre emptier than this: a ring or a frame (ideal 1)
SQUARE_EXCESS = 0.1  # diagonal minus axis fourth moments above this: a square or frame (ideal 0.29 / 0.25)
DIAMOND_EXCESS = -0.1  # below this: a diamond (ideal -0.29)

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.asarray([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)


@dataclass
class Detection:
    """One found object: ``shape`` / ``color`` are ``None`` when unclassifiable."""

    shape: str | None
    color: str | None
    cx: float
    cy: float
    area: int


def foreground(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Foreground strength ``(B, H, W)`` of images ``(B, 3, H, W)``: raw and 3x3-median smoothed."""
    bg = np.asarray(BACKGROUND, dtype=np.float32)[None, :, None, None]
    d = np.abs(images - bg).max(axis=1)
    padded = np.pad(d, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = d.shape[1:]
    stack = np.stack([padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=0)
    return d, np.median(stack, axis=0)


def connected_components(mask: np.ndarray) -> np.ndarray:
    """4-connected labels ``(B, H, W)`` int (0 = background) by min-label propagation."""
    b, h, w = mask.shape
    big = b * h * w + 1
    labels = np.where(mask, np.arange(1, b * h * w + 1).reshape(b, h, w), big)
    while True:
        new = labels.copy()
        new[:, 1:, :] = np.minimum(new[:, 1:, :], labels[:, :-1, :])
        new[:, :-1, :] = np.minimum(new[:, :-1, :], labels[:, 1:, :])
        new[:, :, 1:] = np.minimum(new[:, :, 1:], labels[:, :, :-1])
        new[:, :, :-1] = np.minimum(new[:, :, :-1], labels[:, :, 1:])
        new = np.where(mask, new, big)
        if np.array_equal(new, labels):
            break
        labels = new
    return np.where(mask, labels, 0)


@dataclass
class ShapeFeatures:
    """Moment features of one weighted pixel set (:func:`shape_features`), invariant to
    translation and scale.  Ideal values of clean renders in brackets.

    Attributes:
        skew_y: vertical skewness ``E[y^3] / E[y^2]^1.5`` (upright triangle -0.56, others 0).
        elongation: ``log(E[x^2] / E[y^2])`` (bar +1.8, pillar -1.8, others within +-0.3).
        diag_excess: ``(E[u^4] + E[w^4] - E[x^4] - E[y^4]) / (E[x^2] + E[y^2])^2`` with
            ``u, w = (x +- y) / sqrt 2``: fourth moments along the diagonals minus along the
            axes (square +0.29, frame +0.25, disc and ring 0, diamond -0.29).
        hollow: ``1 -`` foreground strength near the centroid / the component's core strength
            (ring and frame 1, filled shapes 0).
    """

    skew_y: float
    elongation: float
    diag_excess: float
    hollow: float


def shape_features(ys: np.ndarray, xs: np.ndarray, weights: np.ndarray, centre_strength: float | None = None,
                   core_strength: float | None = None) -> ShapeFeatures:
    """Features of a weighted pixel set (pixel-centre coordinates and weights ``(n,)``).

    An isotropic blur of variance ``s^2`` adds ``6 s^2 E[x^2] + 3 s^4`` to ``E[x^4]`` and the
    matching terms to the other three fourth moments; they cancel in ``diag_excess``'s
    numerator because ``u^2 + w^2 = x^2 + y^2``, so blur only shrinks it through the
    denominator (a square's 0.29 becomes 0.22 at blur sigma 1 px).  ``hollow`` is 0 unless
    ``centre_strength`` and ``core_strength`` are given.
    """
    w = weights / weights.sum()
    x = xs - (w * xs).sum()
    y = ys - (w * ys).sum()
    var_x, var_y = float((w * x * x).sum()), float((w * y * y).sum())
    skew = float((w * y**3).sum()) / (var_y + 1e-6) ** 1.5
    u, v = (x + y) / math.sqrt(2), (x - y) / math.sqrt(2)
    excess = float((w * (u**4 + v**4 - x**4 - y**4)).sum()) / ((var_x + var_y) ** 2 + 1e-6)
    hollow = 0.0
    if centre_strength is not None and core_strength:
        hollow = float(np.clip(1.0 - centre_strength / core_strength, 0.0, 1.0))
    return ShapeFeatures(skew, math.log((var_x + 1e-6) / (var_y + 1e-6)), excess, hollow)


def classify_shape(f: ShapeFeatures) -> str:
    """Shape name from :class:`ShapeFeatures`: a fixed decision list with thresholds about
    halfway between the shapes' values (checked on noisy and blurred renders in the tests)."""
    if f.hollow > HOLLOW:
        return "frame" if f.diag_excess > SQUARE_EXCESS else "ring"
    if f.elongation > ELONGATED:
        return "bar"
    if f.elongation < -ELONGATED:
        return "pillar"
    if f.skew_y < TRIANGLE_SKEW:
        return "triangle"
    if f.diag_excess > SQUARE_EXCESS:
        return "square"
    if f.diag_excess < DIAMOND_EXCESS:
        return "diamond"
    return "circle"


def _centre_strength(raw: np.ndarray, gy: np.ndarray, gx: np.ndarray, weight: np.ndarray) -> float:
    """Mean foreground strength (minus the 0.05 floor) of the pixels within 1.5 px of the
    weighted centroid of a component: low for a ring's hole."""
    cy = float((weight * (gy + 0.5)).sum() / weight.sum())
    cx = float((weight * (gx + 0.5)).sum() / weight.sum())
    h, w = raw.shape
    yy, xx = np.mgrid[0:h, 0:w]
    near = (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= 1.5**2
    return float(np.clip(raw[near] - 0.05, 0.0, None).mean()) if near.any() else 0.0


def classify_color(rgb: np.ndarray) -> str | None:
    """Nearest palette colour of a mean RGB ``(3,)``, or ``None`` when none is close.

    A thin or blurred object's core pixels are a mix ``bg + a (c - bg)`` of its colour ``c``
    and the background, so each palette colour is compared at its best mixing weight ``a`` in
    ``[MIN_COLOR_MIX, 1]`` (the distance from ``rgb`` to that segment)."""
    bg = np.asarray(BACKGROUND, dtype=np.float32)
    offset = _PALETTE - bg[None]  # (K, 3)
    mix = np.clip((offset @ (rgb - bg)) / (offset * offset).sum(axis=1), MIN_COLOR_MIX, 1.0)
    dist = np.sqrt((((bg[None] + mix[:, None] * offset) - rgb[None]) ** 2).sum(axis=1))
    k = int(dist.argmin())
    return _PALETTE_NAMES[k] if dist[k] <= MAX_COLOR_DIST else None


def detect(images: Tensor | np.ndarray) -> list[list[Detection]]:
    """Objects found in each image of ``(B, 3, H, W)`` in ``[0, 1]``."""
    arr = images.detach().float().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images, np.float32)
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError(f"detect expects images (B, 3, H, W), got shape {tuple(arr.shape)}")
    arr = np.clip(arr, 0.0, 1.0)
    raw, smooth = foreground(arr)
    labels = connected_components(smooth > FG_THRESHOLD)
    out: list[list[Detection]] = []
    h, w = raw.shape[1:]
    for i in range(arr.shape[0]):
        found = []
        ids, counts = np.unique(labels[i], return_counts=True)
        for lab, area in zip(ids, counts):
            if lab == 0 or area < MIN_AREA:
                continue
            comp = labels[i] == lab
            ys, xs = np.nonzero(comp)
            core = smooth[i, ys, xs] >= 0.6 * smooth[i, ys, xs].max()
            rgb = arr[i][:, ys[core], xs[core]].mean(axis=1)
            # moments over the component grown by one pixel (the median filter trims corners),
            # weighted by the raw strength, so anti-aliased and blurred edges count as they are
            grown = comp.copy()
            grown[1:] |= comp[:-1]
            grown[:-1] |= comp[1:]
            grown[:, 1:] |= comp[:, :-1]
            grown[:, :-1] |= comp[:, 1:]
            grown &= (labels[i] == 0) | comp
            gy, gx = np.nonzero(grown)
            weight = np.clip(raw[i, gy, gx] - 0.05, 0.0, None)
            shape = None
            if area <= MAX_AREA and weight.sum() > 0:
                core_strength = float(np.clip(raw[i, ys[core], xs[core]] - 0.05, 0.0, None).mean())
                shape = classify_shape(shape_features(
                    gy + 0.5, gx + 0.5, weight, _centre_strength(raw[i], gy, gx, weight), core_strength))
            found.append(Detection(shape, classify_color(rgb), float(xs.mean()) + 0.5,
                                   float(ys.mean()) + 0.5, int(area)))
        out.append(found)
    return out


@dataclass
class Verdict:
    """The clauses of one image: ``clauses`` maps a clause name to whether it holds."""

    tag: str
    clauses: dict[str, bool]
    overdrawn: bool = False  # more of some named shape than the prompt asks for

    @property
    def strict(self) -> float:
        return float(all(self.clauses.values()))

    @property
    def strict_exact(self) -> float:
        """Strict correctness with every count exact (no named shape drawn too often)."""
        return float(all(self.clauses.values()) and not self.overdrawn)

    @property
    def partial(self) -> float:
        return sum(self.clauses.values()) / len(self.clauses)


def check(spec: SceneSpec, found: list[Detection], exact_counts: bool = False) -> Verdict:
    """Check every clause of ``spec`` against one image's detections (module docstring).

    ``exact_counts``: every count clause requires exactly the number of objects of its shape
    that the prompt asks for in all (two objects of one shape in different colours ask for two),
    not GenEval's "at least" outside the counting tag."""
    clauses: dict[str, bool] = {}
    asked: dict[str, int] = {}
    for o in spec.objects:
        asked[o.shape] = asked.get(o.shape, 0) + o.count
    drawn = {shape: sum(d.shape == shape for d in found) for shape in asked}
    for i, o in enumerate(spec.objects):
        n = drawn[o.shape]
        if exact_counts:
            clauses[f"count[{i}]"] = n == asked[o.shape]
        else:
            clauses[f"count[{i}]"] = n == o.count if spec.tag == "counting" else n >= o.count
        if o.color is not None:
            clauses[f"color[{i}]"] = sum(d.shape == o.shape and d.color == o.color for d in found) >= o.count
    if spec.relation is not None:
        rel = spec.relation

        def matches(k: int) -> list[Detection]:
            o = spec.objects[k]
            return [d for d in found if d.shape == o.shape and (o.color is None or d.color == o.color)]

        clauses["position"] = any(
            relation_offset(rel.kind, (a.cx, a.cy), (b.cx, b.cy))[0] > POSITION_MARGIN
            for a in matches(rel.a)
            for b in matches(rel.b)
            if a is not b
        )
    overdrawn = any(drawn[shape] > n for shape, n in asked.items())
    return Verdict(spec.tag, clauses, overdrawn)


def score(images: Tensor, specs: list[SceneSpec], exact_counts: bool = False) -> list[Verdict]:
    """One :class:`Verdict` per image of ``(B, 3, H, W)`` against ``B`` specs (``exact_counts``:
    see :func:`check`)."""
    if images.shape[0] != len(specs):
        raise ValueError(f"{images.shape[0]} images but {len(specs)} specs")
    return [check(s, f, exact_counts) for s, f in zip(specs, detect(images))]


def summarize(verdicts: list[Verdict]) -> dict[str, float]:
    """GenEval-style table: ``strict`` / ``partial`` overall (mean over tags present) and per
    tag (``strict/<tag>``, ``partial/<tag>``, ``count/<tag>``), ``strict_se`` (the standard
    error of ``strict``, :func:`strict_standard_error`), plus ``strict/images`` (mean over all
    images), and the over-drawing guard: ``strict_exact`` (``strict`` with every count exact,
    mean over tags) and ``overdrawn`` (the share of images that draw more of a named shape than
    asked, per tag ``overdrawn/<tag>`` and their mean)."""
    out: dict[str, float] = {}
    per_tag: dict[str, list[float]] = {"strict": [], "partial": [], "strict_exact": [], "overdrawn": []}
    for tag in TAGS:
        vs = [v for v in verdicts if v.tag == tag]
        if not vs:
            continue
        s = sum(v.strict for v in vs) / len(vs)
        p = sum(v.partial for v in vs) / len(vs)
        out[f"strict/{tag}"], out[f"partial/{tag}"], out[f"count/{tag}"] = s, p, float(len(vs))
        per_tag["strict"].append(s)
        per_tag["partial"].append(p)
        out[f"overdrawn/{tag}"] = sum(v.overdrawn for v in vs) / len(vs)
        per_tag["overdrawn"].append(out[f"overdrawn/{tag}"])
        per_tag["strict_exact"].append(sum(v.strict_exact for v in vs) / len(vs))
    for key, means in per_tag.items():
        out[key] = sum(means) / len(means) if means else float("nan")
    out["strict_se"] = strict_standard_error(verdicts)
    out["strict/images"] = sum(v.strict for v in verdicts) / len(verdicts) if verdicts else float("nan")
    return dict(sorted(out.items()))


def strict_standard_error(verdicts: list[Verdict]) -> float:
    """Standard error of the headline ``strict`` (the mean over the ``T`` tags present of each
    tag's mean strict score), treating images as independent draws:
    ``sqrt(sum_t s_t^2 / n_t) / T`` with ``s_t^2`` the sample variance of tag ``t``'s ``n_t``
    strict scores (``p (1 - p) n / (n - 1)``).  NaN with no verdicts; a tag with one image
    contributes no variance estimate (0)."""
    var_sum, tags = 0.0, 0
    for tag in TAGS:
        vs = [v.strict for v in verdicts if v.tag == tag]
        if not vs:
            continue
        tags += 1
        n = len(vs)
        if n > 1:
            p = sum(vs) / n
            var_sum += p * (1 - p) * n / (n - 1) / n
    return math.sqrt(var_sum) / tags if tags else float("nan")


# --------------------------------------------------------------------------- guards


def sample_diversity(images: Tensor, group_ids: Tensor | list[int]) -> float:
    """Mean within-prompt pairwise RMS pixel distance of ``(B, 3, H, W)`` images.

    Pairs are taken only within groups (same ``group_ids``, shape ``(B,)``); groups of one
    image are skipped.  0 means every prompt's samples are identical (mode collapse, a sign of
    reward hacking); renders of random layouts of the same spec score about 0.2-0.3.
    """
    gid = torch.as_tensor(group_ids).cpu()
    flat = images.detach().float().cpu().reshape(images.shape[0], -1)
    dists = []
    for g in torch.unique(gid):
        rows = flat[gid == g]
        if rows.shape[0] < 2:
            continue
        d = torch.cdist(rows, rows) / math.sqrt(rows.shape[1])
        k = rows.shape[0]
        dists.append(d.sum() / (k * (k - 1)))
    if not dists:
        raise ValueError("sample_diversity needs at least one prompt with two or more samples")
    return float(torch.stack(dists).mean())


def prompt_groups(texts: list[str]) -> list[int]:
    """Group ids for :func:`sample_diversity`: images of the same prompt text share one (first
    seen, first numbered).  Both evaluation paths group this way -- ``advantageflow eval`` / the
    trainer (:meth:`~.task.ShapesTask.evaluate`) and the end of pretraining
    (:func:`evaluate_shapes_eval`) -- so two slots with the same prompt pool their samples."""
    ids: dict[str, int] = {}
    return [ids.setdefault(text, len(ids)) for text in texts]


@torch.no_grad()
def flow_matching_loss(
    policy,
    specs: list[SceneSpec] | None = None,
    num_images: int = 256,
    times: int = 4,
    seed: int = 0,
    batch_size: int = 128,
) -> float:
    """The model's flow-matching loss ``E ||v(x_t, t, c) - (eps - x0)||^2`` on real renders.

    Deterministic given ``seed`` (same renders, noise and times for every model), so the
    losses of a tuned model and its base are directly comparable: a tuned model that forgot
    how real scenes look (reward hacking) has a higher loss.  ``times`` stratified values of
    ``t`` per image; ``specs`` default to the test split (cycled to ``num_images``).
    Guidance is off (the plain conditional velocity).
    """
    import random

    from advantageflow.tasks.shapes.grammar import splits, to_prompt
    from advantageflow.tasks.shapes.scene import render_specs

    specs = list(specs or splits()[1])
    chosen = [specs[i % len(specs)] for i in range(num_images)]
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    images, _ = render_specs(chosen, rng)
    x0 = images * 2 - 1
    total, n = 0.0, 0
    for start in range(0, num_images, batch_size):
        xb = x0[start : start + batch_size]
        cond = policy.encode([to_prompt(s) for s in chosen[start : start + batch_size]])
        for k in range(times):
            t = (k + torch.rand(xb.shape[0], generator=gen)) / times
            eps = torch.randn(xb.shape, generator=gen)
            tb = t.view(-1, 1, 1, 1)
            x_t = ((1 - tb) * xb + tb * eps).to(policy.device)
            v = policy.velocity(x_t, t.to(policy.device), cond, guidance_scale=1.0)
            total += float(((v.cpu() - (eps - xb)) ** 2).mean()) * xb.shape[0]
            n += xb.shape[0]
    return total / n


def asset_sampler(policy, steps: int | None = None, guidance_scale: float | None = None, batch_size: int = 128):
    """The evaluation sampler (a :class:`~advantageflow.config.SamplerConfig`) recorded in a
    ShapesDiT asset's ``sampling`` section (solver, ``eval_steps``, shift, guidance), with
    ``steps`` / ``guidance_scale`` overriding it when given."""
    from advantageflow.config import SamplerConfig

    rec = policy.sampling
    solver = rec.get("solver", "euler")
    scale = rec.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale
    return SamplerConfig(
        steps=int(rec.get("steps", 10)),
        eval_steps=int(steps or rec.get("eval_steps", 20)),
        shift=float(rec.get("shift", 1.0)),
        solver=solver,
        eval_solver=solver,
        guidance_scale=float(scale),
        batch_size=batch_size,
    )


@dataclass
class EvalSamples:
    """Samples of the evaluation's noise keys before decoding: ``x0`` ``(N, C, h, w)`` (the
    policy's latents), their ``prompts`` (``N``, text and scene metadata) and the sampling
    ``spec`` they were drawn with (its ``chunk`` decodes them)."""

    x0: Tensor
    prompts: list
    spec: object


@torch.no_grad()
@thread_invariant_kernels()  # the trainer's kernels: the same images as its evaluation
def generate_shapes_eval(
    policy, specs: list[SceneSpec], samples_per_prompt: int = 1, sampler=None, seed: int = 0
) -> EvalSamples:
    """Latents of each spec's prompt (``samples_per_prompt`` consecutive rows per spec), sampled
    by :func:`~advantageflow.rollouts.generate` with the evaluation settings of ``sampler`` (a
    ``SamplerConfig``: ``eval_steps``, ``eval_solver``, ``shift``, guidance, ``batch_size``;
    default :func:`asset_sampler`) from the evaluation's noise keys
    (:func:`~advantageflow.seeding.eval_noise_key`, sample ``i`` of spec
    ``i // samples_per_prompt``)."""
    from advantageflow.rollouts import SamplingSpec, generate
    from advantageflow.seeding import eval_noise_key
    from advantageflow.tasks.base import Prompt
    from advantageflow.tasks.shapes.grammar import to_prompt

    spec = SamplingSpec.for_evaluation(policy, sampler or asset_sampler(policy))
    rows = [k for k in range(len(specs)) for _ in range(samples_per_prompt)]
    prompts = [Prompt(to_prompt(specs[k]), specs[k].to_dict()) for k in rows]
    keys = [eval_noise_key(seed, i) for i in range(len(rows))]
    return EvalSamples(generate(policy, prompts, keys, rows, spec).x0, prompts, spec)


@torch.no_grad()
@thread_invariant_kernels()
def sample_shapes_eval(
    policy, specs: list[SceneSpec], samples_per_prompt: int = 1, sampler=None, seed: int = 0
) -> Tensor:
    """Images ``(len(specs) * samples_per_prompt, 3, H, W)`` in ``[0, 1]`` of
    :func:`generate_shapes_eval`'s samples: on the evaluation slots these are the images
    ``advantageflow eval`` and the trainer's evaluation score."""
    from advantageflow.rollouts import decode_samples

    out = generate_shapes_eval(policy, specs, samples_per_prompt, sampler, seed)
    return decode_samples(policy, out.x0, out.spec.chunk)


def evaluate_shapes_eval(
    policy,
    specs: list[SceneSpec] | None = None,
    samples_per_prompt: int = 4,
    sampler=None,
    seed: int = 0,
) -> dict[str, float]:
    """ShapesEval of a policy (e.g. ``ShapesDiTPolicy``) on ``specs`` (default: the evaluation
    slots of the test split, :func:`~.grammar.eval_slots`, 16 per tag), sampled by
    :func:`sample_shapes_eval`.  Adds ``diversity`` (:func:`sample_diversity`) when
    ``samples_per_prompt > 1``, with the samples of slots that share a prompt pooled
    (:func:`prompt_groups`, as the trainer's evaluation)."""
    from advantageflow.tasks.shapes.grammar import eval_slots, to_prompt

    specs = list(specs or eval_slots())
    imgs = sample_shapes_eval(policy, specs, samples_per_prompt, sampler, seed)
    rows = [k for k in range(len(specs)) for _ in range(samples_per_prompt)]
    result = summarize(score(imgs, [specs[k] for k in rows]))
    if samples_per_prompt > 1:
        result["diversity"] = sample_diversity(imgs, prompt_groups([to_prompt(specs[k]) for k in rows]))
    return result


def evaluate_checkpoint(
    path: str = "",
    samples_per_prompt: int = 9,
    seed: int = 0,
    steps: int | None = None,
    guidance_scale: float | None = None,
    device: str = "cpu",
) -> dict:
    """:func:`evaluate_shapes_eval` of the ShapesDiT asset at ``path`` ('' = shipped) with its
    recorded sampler (``steps`` / ``guidance_scale`` override it), recorded in the result;
    the network samples on ``device`` (the detector runs on the CPU)."""
    from advantageflow.models.dit import ShapesDiTPolicy

    policy = ShapesDiTPolicy.from_config(ShapesDiTPolicy.Config(path=path), device=device)
    sampler = asset_sampler(policy, steps, guidance_scale)
    result = evaluate_shapes_eval(policy, samples_per_prompt=samples_per_prompt, sampler=sampler, seed=seed)
    used = {
        "solver": sampler.eval_solver,
        "steps": sampler.eval_steps,
        "shift": sampler.shift,
        "guidance_scale": sampler.guidance_scale,
        "samples_per_prompt": samples_per_prompt,
        "seed": seed,
    }
    return {"sampler": used, **result}


__all__ = [
    "SHAPES",
    "Detection",
    "EvalSamples",
    "Verdict",
    "asset_sampler",
    "check",
    "detect",
    "evaluate_checkpoint",
    "evaluate_shapes_eval",
    "flow_matching_loss",
    "generate_shapes_eval",
    "prompt_groups",
    "sample_diversity",
    "sample_shapes_eval",
    "score",
    "summarize",
]
