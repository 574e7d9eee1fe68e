"""The package's imports point one way: no module imports, at any depth (function-level imports
included), one that imports it back."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "afford"


def import_graph() -> dict[str, set[str]]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        name = ".".join(f.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.ImportFrom) and n.module and n.level == 0 and n.module.startswith("afford"):
                deps.add(n.module)
                deps |= {f"{n.module}.{a.name}" for a in n.names}        # `from afford.x import module`
            elif isinstance(n, ast.Import):
                deps |= {a.name for a in n.names if a.name.startswith("afford")}
        mods[name] = deps
    return {m: {d for d in ds if d in mods and d not in (m, "afford")} for m, ds in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}                   # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None
    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
