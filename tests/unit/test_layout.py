"""The import rules of DESIGN.md ("Boundaries"), read from the source: levels, no circles, one
deepspeed importer, nothing imports the console scripts, modules of about 400 lines at most."""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "dsembed"

# The path a run takes, from the foundation up (DESIGN.md, "Boundaries"); the longest prefix decides.
LEVELS = {
    "dsembed.config": 0, "dsembed.strict": 0, "dsembed.errors": 0, "dsembed.atomic": 0,
    "dsembed.instructions": 0, "dsembed.recipe_rules": 0,
    # testhooks reads the rank to aim a fault at one process, so it sits beside distributed
    "dsembed.distributed": 1, "dsembed.testhooks": 1,
    "dsembed.modeling": 2, "dsembed.data": 2, "dsembed.training.loss": 2, "dsembed.training.gradcache": 2,
    "dsembed.training.ds_config": 2, "dsembed.training.checkpoint_files": 2,
    "dsembed.training.engine": 3,
    "dsembed.training": 4, "dsembed.export": 4, "dsembed.evaluation": 4, "dsembed.mining": 4,
    "dsembed": 4,  # the package's own __init__ (EmbeddingModel)
    "dsembed.study": 5, "dsembed.bench": 5,
    "dsembed.cli": 6, "dsembed.train": 6,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _level(module: str) -> int:
    for prefix in sorted(LEVELS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LEVELS[prefix]
    raise AssertionError(f"{module} has no level in LEVELS: add it (and to DESIGN.md's boundaries)")


def _imports(path: Path) -> set[str]:
    """Every module this file imports, at the top or inside functions (lazy imports count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from dsembed import distributed` imports the submodule dsembed.distributed
            found |= {f"{node.module}.{alias.name}" for alias in node.names
                      if (PACKAGE.parent / f"{node.module}.{alias.name}".replace(".", "/")).with_suffix(".py").is_file()
                      or (PACKAGE.parent / f"{node.module}.{alias.name}".replace(".", "/")).is_dir()}
    return found


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: {m for m in _imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def test_every_module_has_a_level():
    for name in MODULES:
        _level(name)


def test_no_module_imports_from_a_higher_level():
    upward = [f"{name} (level {_level(name)}) imports {dep} (level {_level(dep)})"
              for name, deps in GRAPH.items() for dep in deps
              if _level(dep) > _level(name) and not name.startswith(dep + ".")]
    assert upward == []


def test_no_import_circle():
    def parents_of(name: str) -> set[str]:  # importing a.b.c runs a/__init__ and a/b/__init__ first
        parts = name.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts))} & set(MODULES)

    edges = {name: {d for d in deps if d not in parents_of(name)} for name, deps in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(edges[name]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[name] = 2
        return None

    for name in sorted(edges):
        if name not in state:
            cycle = visit(name)
            assert cycle is None, " -> ".join(cycle)


def test_only_the_engine_imports_deepspeed():
    importers = sorted(name for name, path in MODULES.items()
                       if any(m == "deepspeed" or m.startswith("deepspeed.") for m in _imports(path)))
    assert importers == ["dsembed.training.engine"]


def test_nothing_imports_the_console_scripts_or_train():
    offenders = sorted(f"{name} imports {dep}" for name, deps in GRAPH.items() for dep in deps
                       if (dep == "dsembed.train" or dep.startswith("dsembed.cli")) and not name.startswith("dsembed.cli"))
    assert offenders == []
    assert not any("tools" == m.split(".")[0] for path in MODULES.values() for m in _imports(path))


def test_the_rules_themselves_catch_a_violation(tmp_path):
    """The checks above read real imports: a planted upward import and circle are found."""
    planted = {"dsembed.config": {"dsembed.training.engine"}, "dsembed.training.engine": {"dsembed.config"}}
    assert any(_level(dep) > _level(name) for name, deps in planted.items() for dep in deps)
    (tmp_path / "m.py").write_text("def f():\n    from dsembed import distributed\n    import deepspeed.comm\n")
    assert {"dsembed", "dsembed.distributed", "deepspeed.comm"} <= _imports(tmp_path / "m.py")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_under_about_400_lines(name):
    lines = MODULES[name].read_text(encoding="utf-8").count("\n")
    assert lines <= 400, f"{MODULES[name].relative_to(REPO)} has {lines} lines: split it where the code has a seam"


def test_importing_modeling_and_data_does_not_import_deepspeed():
    code = ("import sys, dsembed.modeling, dsembed.data.rows, dsembed.data.batches, dsembed.training.loss, "
            "dsembed.training.ds_config; print('deepspeed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_user_facing_entry_points_still_import():
    """What users touch did not move: the package export, python -m dsembed.train, the console scripts."""
    import importlib

    from dsembed import EmbeddingModel
    from dsembed.modeling.model import EmbeddingModel as Same

    assert EmbeddingModel is Same
    for module in ("dsembed.train", "dsembed.cli.evaluate", "dsembed.cli.consolidate", "dsembed.cli.study",
                   "dsembed.cli.compare", "dsembed.cli.demo", "dsembed.cli.bench", "dsembed.cli.probe_layers",
                   "dsembed.cli.mine"):
        assert callable(importlib.import_module(module).cli)


def _top_level_names(module: str) -> set[str]:
    """Names a dsembed module defines or imports at its top level (what `from module import x` can get)."""
    path = MODULES[module]
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.If):  # try/except imports and TYPE_CHECKING blocks are rare here
            names |= {a.asname or a.name for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    if any(isinstance(node, ast.FunctionDef) and node.name == "__getattr__" for node in ast.parse(path.read_text()).body):
        names |= set(getattr(importlib.import_module(module), "__all__", []))  # lazy attributes (dsembed.EmbeddingModel)
    return names


def test_every_dsembed_import_in_the_package_and_tests_resolves():
    """Lazy imports inside functions run only when called: after a move they must still name real
    modules and names (a stale `from dsembed import portable` failed only inside an export)."""
    files = sorted(PACKAGE.rglob("*.py")) + sorted((REPO / "tests").rglob("*.py")) + sorted((REPO / "tools").glob("*.py"))
    broken = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                broken += [f"{path.relative_to(REPO)}: import {a.name}" for a in node.names
                           if a.name.startswith("dsembed") and a.name not in MODULES]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("dsembed"):
                if node.module not in MODULES:
                    broken.append(f"{path.relative_to(REPO)}: from {node.module} (no such module)")
                    continue
                names = _top_level_names(node.module)
                broken += [f"{path.relative_to(REPO)}: from {node.module} import {a.name}" for a in node.names
                           if a.name != "*" and a.name not in names and f"{node.module}.{a.name}" not in MODULES]
    assert broken == [], "\n".join(broken)
