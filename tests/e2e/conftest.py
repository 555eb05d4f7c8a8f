"""Shared e2e fixtures: one run of the tiny-cpu study, reused by test_study.py and test_demo.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_STUDY = REPO / "recipes" / "studies" / "tiny-cpu.yaml"


def study_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["DSEMBED_CACHE"] = env.get("DSEMBED_CACHE", str(tmp / "cache"))
    return env


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """(output dir, completed process) of `dsembed-study recipes/studies/tiny-cpu.yaml` run once."""
    out = tmp_path_factory.mktemp("tiny-study") / "out"
    proc = subprocess.run([sys.executable, "-m", "dsembed.cli.study", str(TINY_STUDY), "--output-dir", str(out)],
                          cwd=REPO, env=study_env(out.parent), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc
