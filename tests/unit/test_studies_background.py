"""tools/studies_background.sh: the long studies run in the background from a frozen copy of the
checkout, as one process group that status reports and pause / resume / stop act on as a whole."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "studies_background.sh"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path):
    """A checkout of its own holding the script: the copy `start` makes is a worktree of it."""
    missing = [tool for tool in ("git", "setsid", "ps", "nohup") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    repo = tmp_path / "checkout"
    (repo / "tools").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "tools")
    _git(repo, "init", "-q")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    return repo


def _run(repo, action, out, *extra, env_command="sleep 30"):
    env = {"PATH": os.environ["PATH"], "HOME": str(out.parent), "STUDIES_COMMAND": env_command,
           "STUDIES_CHECKOUT": str(repo.parent / "copy")}
    return subprocess.run(["bash", str(repo / "tools" / "studies_background.sh"), action, str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=60)


def _states(pgid: str) -> set[str]:
    ps = subprocess.run(["ps", "-e", "-o", "pgid=,stat="], capture_output=True, text=True).stdout
    return {stat[0] for group, stat in (line.split() for line in ps.splitlines()) if group == pgid}


def test_start_status_pause_resume_stop_act_on_the_whole_chain(repo, tmp_path):
    out = tmp_path / "out"
    assert _run(repo, "status", out).stdout.startswith("not running")
    started = _run(repo, "start", out)
    assert started.returncode == 0, started.stderr
    pgid = (out / "pgid").read_text().strip()
    copy = repo.parent / "copy"
    try:
        assert _git(copy, "rev-parse", "HEAD") == _git(repo, "rev-parse", "HEAD")  # the frozen copy
        again = _run(repo, "start", out)
        assert again.returncode == 2 and f"process group {pgid}" in again.stderr  # one chain at a time
        assert _run(repo, "status", out).stdout.startswith(f"running (process group {pgid})")

        assert _run(repo, "pause", out, "unit tests").returncode == 0
        deadline = time.time() + 10
        while _states(pgid) != {"T"} and time.time() < deadline:
            time.sleep(0.1)
        assert _states(pgid) == {"T"}  # every process of the group is stopped
        assert _run(repo, "status", out).stdout.startswith("paused")
        assert _run(repo, "resume", out).returncode == 0
        assert "T" not in _states(pgid)
    finally:
        stopped = _run(repo, "stop", out)
    assert stopped.returncode == 0
    deadline = time.time() + 10
    while _states(pgid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _states(pgid)
    assert _run(repo, "status", out).stdout.startswith("not running")
    log = (out / "pauses.txt").read_text().splitlines()
    assert [line.split(" ", 1)[1].split(" (")[0].split(" at ")[0] for line in log] == ["start", "pause", "resume", "stop"]
    assert log[1].endswith("pause (unit tests)")


def test_pause_without_a_chain_and_an_unknown_action_exit_2(repo, tmp_path):
    out = tmp_path / "out"
    paused = _run(repo, "pause", out)
    assert paused.returncode == 2 and "no chain runs" in paused.stderr
    unknown = _run(repo, "restart", out)
    assert unknown.returncode == 2 and "unknown action restart" in unknown.stderr
