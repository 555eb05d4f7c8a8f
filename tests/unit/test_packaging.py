"""The installed package has no top-level `tools` module: console scripts live in dsembed.cli."""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _setup_kwargs() -> dict:
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {kw.arg: kw.value for kw in call.keywords}


def test_packages_exclude_tools_and_entry_points_live_in_dsembed_cli():
    kwargs = _setup_kwargs()
    include = ast.literal_eval(kwargs["packages"].keywords[0].value)
    assert "tools" not in include and all(p.startswith("dsembed") for p in include)
    scripts = ast.literal_eval(kwargs["entry_points"])["console_scripts"]
    assert len(scripts) >= 7
    for line in scripts:
        name, target = (s.strip() for s in line.split("="))
        module, func = target.split(":")
        assert module.startswith("dsembed."), line
        assert callable(getattr(importlib.import_module(module), func)), line


def test_library_never_spawns_or_imports_tools():
    offenders = []
    for path in (REPO / "dsembed").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if re.search(r'"-m",\s*"tools\.|^\s*(from|import)\s+tools\b', text, flags=re.M):
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def test_tools_wrappers_only_forward_to_dsembed_cli():
    for path in sorted((REPO / "tools").glob("*.py")):
        if path.name == "__init__.py":
            continue
        text = path.read_text(encoding="utf-8")
        assert f"from dsembed.cli.{path.stem} import cli" in text, path
        assert len([l for l in text.splitlines() if l.strip()]) <= 4, path
