"""The house's layout: imports between the tools' groups go one way, no module imports another in a loop,
and analysis_lib uses no tool and touches no import path."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A group may import the groups to its right (and itself), nothing to its left.
ORDER = ["kit.benchmarks", "kit.runs", "kit.patching", "kit.data", "analysis_lib", "core"]
ALLOWED = {
    "kit.benchmarks": {"kit.runs", "kit.patching", "analysis_lib", "core"},
    "kit.runs": {"kit.patching", "core"},
    "kit.patching": {"core"},
    "kit.data": {"core"},
    "analysis_lib": {"core"},
    "core": set(),
}


def modules():
    """{dotted module name: path} for core, analysis_lib and tools/kit."""
    found = {}
    for base, top in ((ROOT, "core"), (ROOT, "analysis_lib"), (ROOT / "tools", "kit")):
        for path in (base / top).rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported(path, name):
    """Dotted names a module imports (function-level imports included, relative ones resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def group_of(name):
    return next((g for g in ORDER if name == g or name.startswith(g + ".")), None)


def test_groups_import_one_way():
    wrong = []
    for name, path in modules().items():
        mine = group_of(name)
        for target in imported(path, name):
            theirs = group_of(target)
            if theirs and theirs != mine and theirs not in ALLOWED[mine]:
                wrong.append(f"{name} imports {target}")
            if target == "kit" or (target.startswith("kit.") and theirs is None):
                wrong.append(f"{name} imports {target}, a module outside the groups")
    assert not wrong, wrong


def test_no_module_loops():
    mods = modules()
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        for target in imported(path, name):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                graph[name].add(target)
    state, loops = {}, []

    def visit(m, trail):
        state[m] = "open"
        for n in graph[m]:
            if state.get(n) == "open":
                loops.append(trail[trail.index(n):] + [n])
            elif n not in state:
                visit(n, trail + [n])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not loops, loops


def test_analysis_lib_touches_no_import_path():
    for path in (ROOT / "analysis_lib").rglob("*.py"):
        assert "sys.path" not in path.read_text(), path


def test_the_check_sees_a_loop(tmp_path, monkeypatch):
    """The loop finder is not blind: two modules that import each other are reported."""
    import sys

    this = sys.modules[__name__]
    fake = {"kit.patching.a": tmp_path / "a.py", "kit.patching.b": tmp_path / "b.py"}
    fake["kit.patching.a"].write_text("from kit.patching import b\n")
    fake["kit.patching.b"].write_text("from kit.patching import a\n")
    monkeypatch.setattr(this, "modules", lambda: fake)
    try:
        test_no_module_loops()
    except AssertionError as e:
        assert "kit.patching.a" in str(e)
    else:
        raise AssertionError("a loop of two modules was not found")
