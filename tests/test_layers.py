"""The package's layers (docs/architecture.md): every import between blip_toolkit's packages goes down
the layer list or stays within a layer, and no two packages import each other, directly or through
others. Read from the source (every `import` / `from ... import`, the lazy ones in function bodies
included), so a new upward import or cycle fails here whatever the test coverage."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "blip_toolkit"

# Lowest first. A package may import from its own layer and the layers below, never above.
LAYERS = [
    {"errors", "fsutil", "log", "config", "__init__"},  # core: no model, no data
    {"data", "engine", "metrics"},  # input formats, the training loop's machinery, pure metrics
    {"models", "embeddings"},  # model loading and model-level functions; embedding shard storage
    {"predictors", "pipeline", "dit"},  # batch predictors, the dataset pipeline, the DiT
    {"training", "jobs"},  # fine-tuning; dataset inference, extraction, evaluations
    {"ui", "demo"},
    {"cli", "__main__"},
]
LEVEL = {package: level for level, packages in enumerate(LAYERS) for package in packages}


def package_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else path.stem


def imported_packages(path: Path) -> set[str]:
    """blip_toolkit packages `path` imports (module level or in a function body)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "blip_toolkit" and len(parts) > 1:
                found.add(parts[1])
    return found


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        source = package_of(path)
        edges.setdefault(source, set()).update(p for p in imported_packages(path) if p != source)
    return edges


def test_every_package_has_a_layer():
    assert set(graph()) <= set(LEVEL), f"packages without a layer: {sorted(set(graph()) - set(LEVEL))}"


def test_no_import_goes_up_a_layer():
    upward = sorted(
        f"{source} (layer {LEVEL[source]}) imports {target} (layer {LEVEL[target]})"
        for source, targets in graph().items()
        for target in targets
        if LEVEL.get(target, -1) > LEVEL[source]
    )
    assert not upward, "\n".join(upward)


def test_no_package_cycle():
    edges = graph()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(edges.get(start, ()))
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(edges.get(node, ()))
        return False

    cycles = sorted(f"{a} <-> {b}" for a in edges for b in edges[a] if a < b and reaches(b, a))
    assert not cycles, cycles


def test_the_checker_sees_what_it_must(tmp_path):
    """The reader finds lazy imports in function bodies and `from blip_toolkit import x` forms (an
    import it missed would let a cycle through)."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def f():\n    from blip_toolkit.jobs.inference import x\nfrom blip_toolkit import models\n"
    )
    assert imported_packages(probe) == {"jobs", "models"}
