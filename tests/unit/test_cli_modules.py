"""Every console script also runs as `python -m dsembed.cli.<name>` (the study runner and the
studies' shell scripts call them that way): a module without the __main__ guard exits 0 having done
nothing, as dsembed-dims once did in the Matryoshka study."""
from __future__ import annotations

import ast
from pathlib import Path

CLI = Path(__file__).resolve().parents[2] / "dsembed" / "cli"


def test_every_cli_module_with_an_entry_point_runs_under_python_m():
    missing = []
    for path in sorted(CLI.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        has_cli = any(isinstance(node, ast.FunctionDef) and node.name == "cli" for node in tree.body)
        guarded = any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)
        if has_cli and not guarded:
            missing.append(path.name)
    assert missing == []
