"""Make the shipped prompt sets from the lists in :mod:`advantageflow.prompts.vocab`.

    python -m advantageflow.prompts.generate NAME OUT     # one set, e.g. geneval_train OUT.jsonl
    python -m advantageflow.prompts.generate all FOLDER   # every set, as FOLDER/NAME.txt|.jsonl

Sets (``SETS``): ``geneval_{train,test}.jsonl`` (compositional prompts with the metadata a
GenEval-style detector checks), ``ocr_{train,test}.txt`` (a quoted word to render) and
``pickscore_{train,test}.txt`` (general prompts for preference rewards).

Deterministic: candidates are ordered by a SHA-256 hash of ``seed:set:key:text`` (no
dependence on Python's ``random`` or hash seed), so a set is the same on every machine.
Train and test are disjoint by a *key* coarser than the text (a GenEval object combination,
an OCR word, a PickScore subject in a setting), so no test prompt is a train prompt reworded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import combinations, permutations
from pathlib import Path

from advantageflow.prompts import vocab

SEED = "advantageflow-prompts-v1"
COLOR_ATTR_PER_PAIR = 4  # colour pairs drawn per object pair for GenEval's color_attr tag
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "assets" / "prompts"


@dataclass(frozen=True)
class Candidate:
    """One prompt before the split.  ``key``: what train and test must not share."""

    key: str
    text: str
    metadata: dict = field(default_factory=dict, hash=False, compare=False)


def _digest(text: str) -> str:
    return hashlib.sha256(f"{SEED}:{text}".encode()).hexdigest()


def _rank(name: str, cand: Candidate) -> str:
    return _digest(f"{name}:{cand.key}:{cand.text}")


def split(name: str, cands: Iterable[Candidate], n_test: int, n_train: int) -> tuple[list, list]:
    """``(test, train)``: the first ``n_test`` candidates in hash order, then the first
    ``n_train`` of the rest whose key no test candidate has.  Raises if too few remain."""
    ordered = sorted(cands, key=lambda c: _rank(name, c))
    test = ordered[:n_test]
    test_keys = {c.key for c in test}
    train = [c for c in ordered[n_test:] if c.key not in test_keys][:n_train]
    if len(test) < n_test or len(train) < n_train:
        raise ValueError(f"{name}: only {len(test)} test / {len(train)} train candidates (asked {n_test}/{n_train})")
    return test, train


def shuffled(name: str, cands: Iterable[Candidate]) -> list[Candidate]:
    """Candidates in a fixed hash order (so that a file's tail is a random subset)."""
    return sorted(cands, key=lambda c: _rank(name + ":order", c))


# --------------------------------------------------------------------------- GenEval-style


def singular(obj: str) -> str:
    """``"an apple"``, ``"a pair of skis"``."""
    irregular = vocab.OBJECTS[obj]
    if irregular:
        return irregular[0]
    return f"{'an' if obj[0] in 'aeiou' else 'a'} {obj}"


def plural(obj: str) -> str:
    """``"apples"``, ``"people"``."""
    irregular = vocab.OBJECTS[obj]
    return irregular[1] if irregular else obj + "s"


def with_color(color: str, obj: str) -> str:
    """``"an orange cat"``, ``"a red pair of skis"`` -> article agrees with the colour."""
    noun = singular(obj).split(" ", 1)[1]
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {noun}"


def _one(obj: str, **extra) -> dict:
    return {"class": obj, "count": 1, **extra}


def geneval_candidates() -> dict[str, list[Candidate]]:
    """Per GenEval tag, every candidate prompt with its metadata.

    Metadata (GenEval's layout): ``tag``; ``include``: ``[{"class", "count", ["color"],
    ["position": [relation, index of the reference in include]]}]``; ``exclude`` (counting:
    not ``count + 1`` of the class).
    """
    objs = list(vocab.OBJECTS)
    out: dict[str, list[Candidate]] = {
        t: [] for t in ("single_object", "two_object", "counting", "colors", "position", "color_attr")
    }

    def add(tag: str, key: str, text: str, include: list[dict], exclude: list[dict] | None = None) -> None:
        meta = {"tag": tag, "include": include, "exclude": exclude or []}
        out[tag].append(Candidate(f"{tag}:{key}", text, meta))

    for a in objs:
        add("single_object", a, f"a photo of {singular(a)}", [_one(a)])
        for n, word in vocab.COUNT_WORDS.items():
            add(
                "counting",
                f"{n}:{a}",
                f"a photo of {word} {plural(a)}",
                [{"class": a, "count": n}],
                [{"class": a, "count": n + 1}],
            )
        for color in vocab.COLORS:
            add("colors", f"{color}:{a}", f"a photo of {with_color(color, a)}", [_one(a, color=color)])
    for a, b in combinations(objs, 2):
        pair = "+".join(sorted((a, b)))
        add("two_object", pair, f"a photo of {singular(a)} and {singular(b)}", [_one(a), _one(b)])
    for a, b in permutations(objs, 2):
        pair = "+".join(sorted((a, b)))
        for rel in vocab.POSITIONS:
            add(
                "position", pair, f"a photo of {singular(a)} {rel} {singular(b)}", [_one(b), _one(a, position=[rel, 0])]
            )
    colour_pairs = list(permutations(vocab.COLORS, 2))
    for a, b in combinations(objs, 2):
        pair = "+".join(sorted((a, b)))
        # A few colour pairs per object pair (all 90 would make 284k candidates for 800 picks).
        for ca, cb in sorted(colour_pairs, key=lambda c: _digest(f"colors:{pair}:{c}"))[:COLOR_ATTR_PER_PAIR]:
            add(
                "color_attr",
                pair,
                f"a photo of {with_color(ca, a)} and {with_color(cb, b)}",
                [_one(a, color=ca), _one(b, color=cb)],
            )
    return out


# (test, train) per tag: about GenEval's own test mix (553 prompts), a train set of ~3000.
GENEVAL_SIZES = {
    "single_object": (16, 64),
    "two_object": (100, 600),
    "counting": (60, 180),
    "colors": (80, 720),
    "position": (100, 700),
    "color_attr": (100, 700),
}


@functools.cache
def geneval_sets() -> tuple[list[Candidate], list[Candidate]]:
    test, train = [], []
    for tag, cands in geneval_candidates().items():
        t, r = split(f"geneval:{tag}", cands, *GENEVAL_SIZES[tag])
        test += t
        train += r
    return shuffled("geneval_test", test), shuffled("geneval_train", train)


# --------------------------------------------------------------------------- OCR


def ocr_targets() -> list[str]:
    """The words and phrases to render, de-duplicated, in list order."""
    return list(dict.fromkeys([*vocab.OCR_WORDS, *vocab.OCR_PHRASES]))


def _ocr_text(word: str, template: str) -> str:
    # Signs and labels in capitals, handwriting and titles in title case: varied, readable targets.
    shown = word.upper() if ("sign" in template or "label" in template) else word.title()
    return template.format(w=shown)


@functools.cache
def ocr_sets(n_test_words: int = 60, n_test: int = 300, n_train: int = 2000) -> tuple[list, list]:
    """Test prompts use ``n_test_words`` words no train prompt uses (each word: one key)."""
    words = ocr_targets()
    ranked = sorted(words, key=lambda w: _digest(f"ocr-words:{w}"))
    test_words = set(ranked[:n_test_words])
    cands = [Candidate(w, _ocr_text(w, t)) for w in words for t in vocab.OCR_TEMPLATES]
    test, _ = split("ocr:test", [c for c in cands if c.key in test_words], n_test, 0)
    train, _ = split("ocr:train", [c for c in cands if c.key not in test_words], n_train, 0)
    return shuffled("ocr_test", test), shuffled("ocr_train", train)


# --------------------------------------------------------------------------- general (PickScore-like)


@functools.cache
def pickscore_sets(n_test: int = 300, n_train: int = 3000) -> tuple[list, list]:
    """``SETTING.format(subject) + ", " + STYLE``; train and test share no (setting, subject)."""
    cands = [
        Candidate(f"{si}:{subj}", f"{setting.format(s=subj)}, {style}")
        for si, setting in enumerate(vocab.SETTINGS)
        for subj in vocab.SUBJECTS
        for style in vocab.STYLES
    ]
    test, train = split("pickscore", cands, n_test, n_train)
    return shuffled("pickscore_test", test), shuffled("pickscore_train", train)


# --------------------------------------------------------------------------- files


def _pick(maker: Callable[[], tuple[list, list]], which: int) -> Callable[[], list[Candidate]]:
    return lambda: maker()[which]


# file name -> its candidates
SETS: dict[str, Callable[[], list[Candidate]]] = {
    "geneval_train.jsonl": _pick(geneval_sets, 1),
    "geneval_test.jsonl": _pick(geneval_sets, 0),
    "ocr_train.txt": _pick(ocr_sets, 1),
    "ocr_test.txt": _pick(ocr_sets, 0),
    "pickscore_train.txt": _pick(pickscore_sets, 1),
    "pickscore_test.txt": _pick(pickscore_sets, 0),
}


def render(file_name: str) -> str:
    """The text of a set's file: one prompt per line (``.txt``) or one JSON record (``.jsonl``)."""
    cands = SETS[file_name]()
    if file_name.endswith(".jsonl"):
        lines = [json.dumps({"prompt": c.text, "metadata": c.metadata}) for c in cands]
    else:
        lines = [c.text for c in cands]
    return "\n".join(lines) + "\n"


def file_name_of(name: str) -> str:
    """``geneval_train`` or ``geneval_train.jsonl`` -> ``geneval_train.jsonl``; ``KeyError`` if unknown."""
    if name in SETS:
        return name
    found = [f for f in SETS if f.rsplit(".", 1)[0] == name]
    if not found:
        raise KeyError(f"unknown prompt set '{name}' (known: {', '.join(sorted(SETS))})")
    return found[0]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    name, out = argv
    try:
        targets = {f: Path(out) / f for f in SETS} if name == "all" else {file_name_of(name): Path(out)}
    except KeyError as err:
        print(f"generate: {err.args[0]}", file=sys.stderr)
        return 2
    for file_name, path in targets.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        text = render(file_name)
        path.write_text(text, encoding="utf-8")
        print(f"{path}: {text.count(chr(10))} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
