"""The ShapesEval prompt grammar, its parser, and the fixed train / test prompt splits.

Six tags, after GenEval (Ghosh et al. 2023, Table 1), on 8 shapes x 6 colours::

    single_object   "a circle"
    two_object      "a circle and a square"                 (two different shapes)
    counting        "three triangles", "three green triangles"  (counts 2-4)
    colors          "a red circle"
    position        "a yellow square left of a blue circle", "a square above a circle"
    color_attr      "a red square and a green circle"       (different shapes and colours)

``spec -> prompt -> spec`` is the identity (:func:`to_prompt`, :func:`parse_prompt`).

Splits are made over *canonical* specs, so that two phrasings of one constraint ("a circle
and a square" / "a square and a circle"; "A left of B" / "B right of A") always fall in the
same split: train and test never share a constraint.  The test split holds one phrasing per
canonical spec; the train split holds every phrasing.  Counting, position and colour
attribution have far more specs than the other tags; both splits take a fixed subset of them
(the rest is only seen in pretraining).  The eight single-object constraints are all held out
(the train split has none of that tag; every shape still appears in its other tags).
"""

from __future__ import annotations

import itertools
import random
import re
from functools import lru_cache

from advantageflow.tasks.shapes.scene import COLORS, RELATIONS, SHAPES, TAGS, ObjectSpec, Relation, SceneSpec

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
WORD_NUMBERS = {w: n for n, w in NUMBER_WORDS.items()}
PLURALS = {s: s + ("es" if s.endswith("ss") else "s") for s in SHAPES}
SINGULARS = {p: s for s, p in PLURALS.items()}

# canonical specs per tag put in the test split / the train split (None: all the rest)
TEST_SIZES = {"single_object": 8, "two_object": 16, "counting": 16, "colors": 16, "position": 16, "color_attr": 16}
TRAIN_CAPS = {"counting": 48, "position": 48, "color_attr": 48}
EVAL_SLOTS_PER_TAG = 16  # evaluation slots per tag; a tag with fewer test specs repeats them
SPLIT_SEED = 20251123


def _mention(o: ObjectSpec) -> str:
    color = f"{o.color} " if o.color else ""
    if o.count == 1:
        return f"a {color}{o.shape}"
    return f"{NUMBER_WORDS[o.count]} {color}{PLURALS[o.shape]}"


def to_prompt(spec: SceneSpec) -> str:
    """The prompt text of ``spec`` (deterministic)."""
    parts = [_mention(o) for o in spec.objects]
    if spec.relation is not None:
        if len(parts) != 2 or (spec.relation.a, spec.relation.b) != (0, 1):
            raise ValueError("a relation links objects 0 and 1 of a two-object spec")
        return f"{parts[0]} {spec.relation.kind} {parts[1]}"
    return " and ".join(parts)


_MENTION_RE = re.compile(
    r"^(?P<num>a|an|one|two|three|four)\s+(?:(?P<color>" + "|".join(COLORS) + r")\s+)?"
    r"(?P<shape>" + "|".join(list(SHAPES) + list(PLURALS.values())) + r")$"
)


def _parse_mention(text: str, prompt: str) -> ObjectSpec:
    m = _MENTION_RE.match(text.strip())
    if not m:
        raise ValueError(f"cannot parse '{text.strip()}' in prompt '{prompt}' as an object mention")
    num, shape = m.group("num"), m.group("shape")
    count = 1 if num in ("a", "an") else WORD_NUMBERS[num]
    plural = shape in SINGULARS
    if plural != (count > 1):
        raise ValueError(f"number and noun disagree in '{text.strip()}' (prompt '{prompt}')")
    return ObjectSpec(SINGULARS.get(shape, shape), m.group("color"), count)


def infer_tag(objects: tuple[ObjectSpec, ...], relation: Relation | None) -> str:
    """The GenEval tag that a parsed prompt belongs to."""
    if relation is not None:
        return "position"
    if len(objects) == 1:
        o = objects[0]
        if o.count > 1:
            return "counting"
        return "colors" if o.color else "single_object"
    return "color_attr" if all(o.color for o in objects) else "two_object"


def parse_prompt(prompt: str) -> SceneSpec:
    """The spec of a grammar prompt; ``ValueError`` with the reason otherwise."""
    text = " ".join(prompt.lower().strip().rstrip(".").split())
    for kind in RELATIONS:
        sep = f" {kind} "
        if sep in text:
            left, right = text.split(sep, 1)
            objects = (_parse_mention(left, prompt), _parse_mention(right, prompt))
            relation = Relation(kind, 0, 1)
            break
    else:
        objects = tuple(_parse_mention(p, prompt) for p in text.split(" and "))
        relation = None
    if len(objects) > 2:
        raise ValueError(f"prompt '{prompt}' mentions more than two objects")
    return SceneSpec(infer_tag(objects, relation), objects, relation)


def canonical(spec: SceneSpec) -> str:
    """A key equal for specs that state the same constraint in different words."""
    objs = [(o.shape, o.color or "", o.count) for o in spec.objects]
    if spec.relation is None:
        return f"{spec.tag}|{sorted(objs)}"
    kind, a, b = spec.relation.kind, objs[0], objs[1]
    if kind in ("right of", "below"):
        kind, a, b = {"right of": "left of", "below": "above"}[kind], b, a
    return f"{spec.tag}|{kind}|{a}|{b}"


def specs_for_tag(tag: str) -> list[SceneSpec]:
    """Every spec of ``tag`` the grammar can say (all phrasings), in a fixed order."""
    colors, out = list(COLORS), []
    if tag == "single_object":
        out = [SceneSpec(tag, (ObjectSpec(s),)) for s in SHAPES]
    elif tag == "colors":
        out = [SceneSpec(tag, (ObjectSpec(s, c),)) for s in SHAPES for c in colors]
    elif tag == "counting":
        for s, n in itertools.product(SHAPES, (2, 3, 4)):
            out += [SceneSpec(tag, (ObjectSpec(s, c, n),)) for c in [None, *colors]]
    elif tag == "two_object":
        out = [SceneSpec(tag, (ObjectSpec(a), ObjectSpec(b))) for a, b in itertools.permutations(SHAPES, 2)]
    elif tag == "color_attr":
        for (a, b), (ca, cb) in itertools.product(itertools.permutations(SHAPES, 2),
                                                  itertools.permutations(colors, 2)):
            out.append(SceneSpec(tag, (ObjectSpec(a, ca), ObjectSpec(b, cb))))
    elif tag == "position":
        for kind in RELATIONS:
            for a, b in itertools.permutations(SHAPES, 2):  # without colours: different shapes
                out.append(SceneSpec(tag, (ObjectSpec(a), ObjectSpec(b)), Relation(kind)))
            pairs = itertools.permutations(itertools.product(SHAPES, colors), 2)
            for (sa, ca), (sb, cb) in pairs:
                out.append(SceneSpec(tag, (ObjectSpec(sa, ca), ObjectSpec(sb, cb)), Relation(kind)))
    else:
        raise ValueError(f"unknown tag '{tag}' (known: {', '.join(TAGS)})")
    return out


def all_specs() -> list[SceneSpec]:
    """Every spec of every tag (the pretraining distribution draws a tag, then a spec)."""
    return [s for tag in TAGS for s in specs_for_tag(tag)]


@lru_cache(maxsize=1)
def splits() -> tuple[tuple[SceneSpec, ...], tuple[SceneSpec, ...]]:
    """The fixed ``(train, test)`` specs: disjoint canonical keys, seeded shuffle per tag."""
    train: list[SceneSpec] = []
    test: list[SceneSpec] = []
    rng = random.Random(SPLIT_SEED)
    for tag in TAGS:
        groups: dict[str, list[SceneSpec]] = {}
        for spec in specs_for_tag(tag):
            groups.setdefault(canonical(spec), []).append(spec)
        keys = sorted(groups)
        rng.shuffle(keys)
        n_test = TEST_SIZES[tag]
        test += [groups[k][0] for k in keys[:n_test]]
        rest = keys[n_test:]
        cap = TRAIN_CAPS.get(tag)
        for k in rest[:cap] if cap else rest:
            train += groups[k]
    return tuple(train), tuple(test)


def eval_slots() -> tuple[SceneSpec, ...]:
    """The test specs as evaluation slots: :data:`EVAL_SLOTS_PER_TAG` per tag, in tag order;
    a tag with fewer held-out specs (single objects: 8) cycles through them, so every tag
    gets the same number of images and weighs the same in the headline score's error."""
    test = splits()[1]
    out: list[SceneSpec] = []
    for tag in TAGS:
        mine = [s for s in test if s.tag == tag]
        out += [mine[i % len(mine)] for i in range(EVAL_SLOTS_PER_TAG)]
    return tuple(out)
