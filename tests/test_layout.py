"""The package's shape: data flows one way (lower layers never import higher ones), no import
cycle anywhere, and one decode loop (only the engine runs the model with a KV cache)."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "llmos"

# corpus -> tokens -> model -> engine -> text -> writing/chat -> CLI/server, bottom first
LAYERS = [
    {"settings", "languages", "db", "kernels", "heap"},
    {"tokenizer", "fast_bpe", "model", "cards"},
    {"data", "weights"},
    {"engine", "embedder", "safety"},
    {"llm", "remote", "train", "explain"},
    {"writing"},
    {"chat"},
    {"eval"},
    {"server"},
    {"cli", "__main__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every llmos module a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmos"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from llmos.x import module`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("llmos"))
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else module
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_every_module_has_a_layer():
    for name in graph():
        if name != "llmos":
            layer(name)


def test_lower_layers_never_import_higher_ones():
    wrong = [(a, b) for a, deps in graph().items() if a != "llmos" for b in deps if layer(b) > layer(a)]
    assert wrong == []


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for dep in sorted(g[node]):
            if dep.startswith(node + "."):
                continue  # a package importing its own submodule is not a cycle
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_one_decode_loop():
    """Only the engine calls the model with a KV cache; only the text layer cuts stop strings."""
    callers, cutters = set(), set()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if "cache=" in text or "KVCache.__new__" in text:  # the model run on a cache, or a hand-made view
            callers.add(module_name(path))
        if "StopStrings(" in text:
            cutters.add(module_name(path))
    assert callers == {"llmos.engine.generate"}
    assert cutters == {"llmos.llm"}
