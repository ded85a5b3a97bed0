"""Import directions inside the package (read from the source with ``ast``, including imports
inside functions), so a layering break does not come back unnoticed.

Bottom to top: the shared modules (sampling, types, seeding, ...) < models, tasks, rewards <
algorithms < rollouts, evaluation < trainer, cli.  ``advantageflow.testing`` is for tests only.
"""

from __future__ import annotations

import ast

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "advantageflow"
SHARED = ("sampling", "types", "seeding", "distributed", "configbase", "registry", "faults", "numerics", "toydata")
TOP = ("trainer", "cli", "build", "config", "parallel", "rollouts", "evaluation")


def _modules() -> dict[str, set[str]]:
    """Dotted module name -> the ``advantageflow`` modules it imports."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module)
                imported |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
        out[name] = {m for m in imported if m.split(".")[0] == "advantageflow"}
    return out


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == f"advantageflow.{p}" or module.startswith(f"advantageflow.{p}.") for p in prefixes)


def _forbidden(importer: str) -> tuple[str, ...]:
    """What ``importer`` must not import (package-relative prefixes)."""
    if importer == "advantageflow.testing" or importer.startswith("advantageflow.testing."):
        return ()
    never = ("testing",)
    if _under(importer, SHARED):
        return never + ("models", "tasks", "rewards", "algorithms", *TOP)
    if _under(importer, ("models",)):
        return never + ("tasks", "rewards", "algorithms", *TOP)
    if _under(importer, ("algorithms",)):
        # base and common are shared by every algorithm; an algorithm never imports another one
        own = importer.removeprefix("advantageflow.algorithms").lstrip(".")
        return never + ("tasks", "rewards", *TOP) + tuple(f"algorithms.{m}" for m in ALGORITHM_FILES if m != own)
    if _under(importer, ("rollouts", "evaluation")):
        return never + ("algorithms", "trainer", "cli")
    return never


ALGORITHM_FILES = sorted(p.stem for p in (PACKAGE / "algorithms").glob("*.py")
                         if p.stem not in ("__init__", "base", "common"))
MODULES = _modules()


@pytest.mark.parametrize("importer", sorted(MODULES))
def test_imports_point_down(importer):
    bad = sorted(m for m in MODULES[importer] if _under(m, _forbidden(importer)))
    assert not bad, f"{importer} imports {bad}"


def test_the_rules_catch_the_breaks_they_were_written_for():
    assert _under("advantageflow.algorithms.awm", _forbidden("advantageflow.algorithms.flow_grpo"))
    assert _under("advantageflow.algorithms.base", _forbidden("advantageflow.rollouts"))
    assert _under("advantageflow.tasks.toy2d", _forbidden("advantageflow.models.toy"))
    assert _under("advantageflow.testing.tiny_pipelines", _forbidden("advantageflow.models.diffusers_common"))
    assert not _under("advantageflow.algorithms.common", _forbidden("advantageflow.algorithms.flow_grpo"))


SEED_KEY_WORDS = {"prompts", "sampler", "noise", "eval", "loss"}
SEEDING_CALLS = ("seeded_generator", "derive_seed")


def _seed_key_literals(tree: ast.AST) -> list[int]:
    """Lines of tuple literals spelling a seed key (3 or more items: a key word and a variable
    such as the seed), or of key words passed straight to ``seeded_generator`` / ``derive_seed``."""
    lines = []
    for node in ast.walk(tree):
        seeding_call = isinstance(node, ast.Call) and getattr(node.func, "id", "") in SEEDING_CALLS
        key_tuple = isinstance(node, ast.Tuple) and len(node.elts) >= 3 and not all(
            isinstance(i, ast.Constant) for i in node.elts)
        items = node.elts if key_tuple else node.args if seeding_call else []
        if any(isinstance(i, ast.Constant) and i.value in SEED_KEY_WORDS for i in items):
            lines.append(node.lineno)
    return lines


def test_seed_keys_are_built_in_seeding_only():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "seeding.py":
            lines = _seed_key_literals(ast.parse(path.read_text(encoding="utf-8")))
            if lines:
                found[str(path.relative_to(REPO))] = lines
    assert not found, f"seed keys spelled outside advantageflow/seeding.py: {found}"
    assert _seed_key_literals(ast.parse('seeded_generator(seed, "loss", 1)\nk = (seed, "noise", e, i)')) == [1, 2]
