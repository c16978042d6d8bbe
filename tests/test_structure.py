"""The code's shape: imports point down the layers, and the trainer and driver keep short functions.

Layers, lowest first: config -> algo -> data -> verifiers -> models -> rollout -> eval -> train ->
workers -> launch (bench and tests sit above all). A module may import its own layer or lower ones;
function-local imports count too, since they only hide a dependency, they do not remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("prime.config", "prime.algo", "prime.data", "prime.verifiers", "prime.models", "prime.rollout",
          "prime.eval", "prime.train", "workers", "launch")
MAX_FUNCTION_LINES = 60


def layer_of(module: str) -> int | None:
    """Index in LAYERS of a dotted module name; None for third-party modules and the `prime` root."""
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return i
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.AST, this_module: str) -> list[tuple[str, int]]:
    """(module, line) of every import anywhere in the tree, relative imports resolved."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = this_module.split(".")[: -node.level]
                base = ".".join(anchor + ([base] if base else []))
            # `from prime import data` imports the package prime.data.
            found += [(f"{base}.{alias.name}" if layer_of(base) is None else base, node.lineno) for alias in node.names]
    return found


def source_files() -> list[Path]:
    return sorted(p for top in ("prime", "workers", "launch") for p in (REPO / top).rglob("*.py"))


def upward_imports() -> list[str]:
    bad = []
    for path in source_files():
        name = module_name(path)
        own = layer_of(name)
        if own is None:
            continue
        for target, line in imported_modules(ast.parse(path.read_text(), str(path)), name):
            layer = layer_of(target)
            if layer is not None and layer > own:
                bad.append(f"{path.relative_to(REPO)}:{line} ({LAYERS[own]}) imports {target} ({LAYERS[layer]})")
    return bad


def test_layer_of_and_the_checker_itself():
    assert layer_of("prime.train.trainer") == LAYERS.index("prime.train")
    assert layer_of("prime.algo") == 1 and layer_of("prime") is None and layer_of("torch.nn") is None
    # The checker finds a function-local upward import and resolves relative ones.
    tree = ast.parse("def f():\n    from prime.train.sft import x\nfrom . import loading\nimport torch\n")
    assert sorted(imported_modules(tree, "prime.models.tiny")) == [
        ("prime.models", 3), ("prime.train.sft", 2), ("torch", 4)]


def test_imports_point_down_the_layers():
    assert source_files(), "no sources found"
    bad = upward_imports()
    assert not bad, "upward imports:\n" + "\n".join(bad)


@pytest.mark.parametrize("folder", ["prime/train", "launch"])
def test_functions_stay_short(folder):
    long = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
