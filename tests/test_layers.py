"""The layers import one way: bottom (models/io, audio, text, data) -> models/ -> eval/ -> align/.

Walks every import the code states (module level and inside functions) with ``ast``: nothing in
``models/`` or ``eval/`` imports ``align/``, and no package module imports itself round a cycle.
"""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("align", "models", "eval")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from x import y`` counts x, and x.y when y is a module)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.split(".")[0] in PACKAGES:
                    deps.add(node.module)
                    deps |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_models_and_eval_never_import_align():
    graph = import_graph()
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() if m.split(".")[0] in ("models", "eval")
                    for d in deps if d.split(".")[0] == "align")
    assert upward == []


def test_models_never_import_eval():
    graph = import_graph()
    assert sorted(f"{m} -> {d}" for m, deps in graph.items() if m.startswith("models")
                  for d in deps if d.startswith("eval")) == []


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_the_check_sees_a_cycle_and_an_upward_import():
    # the walker itself must be able to fail: a planted cycle is found
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "models.io" in graph["align.run"] and "align.config" in graph["align.run"]


def test_config_schema_imports_no_stage_or_trainer():
    """Reading a YAML loads neither the stages nor TRL (``eval/gate.py`` reads seven floats with it)."""
    import subprocess
    import sys

    code = ("import sys, align.config; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('trl', 'align') and m not in ('align', 'align.config')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
