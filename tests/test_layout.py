"""The layout's rules, checked on the source (README, "Layout"): imports point one way
(pipeline -> stages -> data_schemas; inside stages/, rl -> training -> modeling -> core and
evaluation -> modeling -> core), there is no import cycle, a stage's entry module is imported by no
other stage module, and no module of stages/ or pipeline/ outgrows 400 lines."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "data_schemas")
ENTRY_MODULES = {f"stages.{s}" for s in ("sft", "reward", "ppo", "baseline", "compare")}
# What each sub-package of stages/ may import from stages/ (the entry modules may import them all).
SUBPACKAGE_DEPS = {"core": set(), "modeling": {"core"}, "training": {"core", "modeling"},
                   "rl": {"core", "modeling", "training"}, "evaluation": {"core", "modeling"}}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """Every module of ours that `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def test_no_import_cycle():
    g, state, cycles = graph(), {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(g[m]):
            if state.get(d) == "open":
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_imports_point_one_way():
    order = {pkg: i for i, pkg in enumerate(PACKAGES)}
    wrong = [(m, d) for m, deps in graph().items() for d in deps
             if order[d.split(".")[0]] < order[m.split(".")[0]]]
    assert not wrong, wrong


def test_no_stage_module_imports_another_stage():
    wrong = [(m, d) for m, deps in graph().items() if m.startswith("stages.") for d in deps if d in ENTRY_MODULES]
    assert not wrong, wrong


def test_stage_subpackages_are_layered():
    def sub(m):
        parts = m.split(".")
        return parts[1] if parts[0] == "stages" and len(parts) > 1 and parts[1] in SUBPACKAGE_DEPS else None

    wrong = [(m, d) for m, deps in graph().items() if sub(m) for d in deps
             if d.startswith("stages.") and sub(d) != sub(m) and sub(d) not in SUBPACKAGE_DEPS[sub(m)]]
    assert not wrong, wrong


def test_no_stage_or_pipeline_module_over_400_lines():
    long = {m: n for m, p in modules().items()
            if m.split(".")[0] in ("stages", "pipeline") and (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
