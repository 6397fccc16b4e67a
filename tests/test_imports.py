"""Code health (issue 16): no import cycle between the modules of ``freeact/`` (function-local imports
included: a cycle hidden in a function is still a cycle)."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "freeact"


def module_graph() -> dict[str, set[str]]:
    files = {".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in files else mod for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in files and t != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_the_graph_walker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = module_graph()
    assert "freeact.models.loading" in graph["freeact.experiment"]  # relative imports resolved


def test_no_import_cycle_in_freeact():
    cycle = find_cycle(module_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_config_layer_and_artifacts_stand_alone():
    graph = module_graph()
    config = {m for m in graph if m == "freeact.config" or m.startswith("freeact.config.")}
    outside = {(m, d) for m in config for d in graph[m] if d not in config}
    assert not outside, f"the config package imports the rest of the project: {sorted(outside)}"
    assert "freeact.experiment" not in graph["freeact.artifacts"]
