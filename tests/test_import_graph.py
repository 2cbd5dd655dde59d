"""fst's modules import each other top-down: no cycle, counting imports inside functions."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import fst

ROOT = Path(fst.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = ["fst", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str, modules: dict) -> bool:
    """A Python module of fst's, or its compiled core (which imports nothing of fst's)."""
    if name in modules:
        return True
    if not name.startswith("fst."):
        return False
    parent = name.rpartition(".")[0]
    if parent not in modules or not modules[parent].name == "__init__.py":
        return False  # only packages have submodules
    return importlib.util.find_spec(name) is not None


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule; `from pkg import name` runs pkg.
                targets = [f"{base}.{a.name}" if is_module(f"{base}.{a.name}", modules) else base
                           for a in node.names]
            for t in targets:
                while t and not is_module(t, modules):
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
                    graph.setdefault(t, set())
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return []


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


# The command line and the benchmark use fst's public API, as a user's program would; so does
# fst.torch (load_model, public API built on fst.load), and so does the vLLM plugin (fst.vllm),
# which also runs iter_tensors' plain stream itself (vLLM always initialises torch.distributed,
# which sends iter_tensors down the distributed path).
API_USERS = ("fst.cli", "fst.__main__", "fst.benchmark", "fst.vllm")


def test_only_the_tools_import_the_package_or_the_api():
    graph = import_graph()
    offenders = sorted(m for m, deps in graph.items() if deps & {"fst", "fst._api"}
                       and not m.startswith(API_USERS) and m not in ("fst", "fst.torch"))
    assert not offenders, f"internal modules importing fst or fst._api: {offenders}"
