"""Layout rules of the package, checked on the source: no import cycle between modules of
``src/lowbit`` (imports inside functions count), no Python file over 600 lines, and
``import lowbit.runtime`` (and ``lowbit.contract``) without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lowbit

PACKAGE = Path(lowbit.__file__).parent
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The lowbit modules ``name`` imports anywhere in its file (top level, functions, type
    checking blocks): ``from p import x`` is an edge to module ``p.x`` when it is one, else to
    ``p`` (as pylint's cyclic-import check counts them)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                root = ".".join([*base, node.module] if node.module else base)
            else:
                root = node.module or ""
            targets = [
                f"{root}.{a.name}" if f"{root}.{a.name}" in known else root for a in node.names
            ]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    # compiled extensions (runtime/_kernels*.so) are modules too
    ext = {module_name(p.with_name(p.name.split(".")[0] + ".py")) for p in PACKAGE.rglob("*.so")}
    known = set(mods) | ext
    return {name: imported(name, path, known) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, first == last), or None. Every edge counts, also
    those between a package's ``__init__`` and its own modules."""
    edges = graph
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                return [*stack[stack.index(t) :], t]
            if t not in state and (cycle := visit(t)) is not None:
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)) is not None:
            return cycle
    return None


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"p": {"p.x"}, "p.x": {"p"}}) == ["p", "p.x", "p"]


def test_imports_inside_functions_are_seen(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from .runtime import loader\n")
    known = {"lowbit.runtime", "lowbit.runtime.loader"}
    assert imported("lowbit.m", src, known) == {"lowbit.runtime.loader"}
    src.write_text("def f():\n    from .runtime import load\n")  # a name: the package
    assert imported("lowbit.m", src, known) == {"lowbit.runtime"}


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_python_file_over_600_lines(name: str) -> None:
    lines = modules()[name].read_text().count("\n")
    assert lines <= MAX_LINES, f"{name}: {lines} lines"


@pytest.mark.parametrize("module", ["lowbit.runtime", "lowbit.contract"])
def test_runtime_imports_without_torch(module: str) -> None:
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"


def test_run_code_path_is_torch_free(tmp_path: Path) -> None:
    """What ``lowbit run model.lowbit image.png`` does (load, read the image, classify) never
    imports torch."""
    image = tmp_path / "x.png"
    model = Path(__file__).parent / "data" / "v1_lsq.lowbit"
    code = (
        "import sys; import numpy as np; from PIL import Image; "
        f"Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save({str(image)!r}); "
        "from lowbit.runtime import classify, load; "
        f"out = classify(load({str(model)!r}), [{str(image)!r}], top_k=3); "
        "assert len(out) == 1 and len(out[0][1]) == 3, out; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"
