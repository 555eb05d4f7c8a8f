"""A rank of a multi-process run exits without the interpreter's finalization (where gloo's worker
threads can call std::terminate and turn exit code 3 into SIGABRT); a single process exits normally."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import atexit, sys
from dsembed.distributed import exit_process
atexit.register(lambda: print("finalized", flush=True))
print("error: one line", file=sys.stderr)  # buffered text still reaches the pipe
exit_process(3)
"""


@pytest.mark.parametrize("world, finalized", [("2", False), ("1", True)])
def test_exit_code_kept_and_finalization_skipped_only_for_ranks(world, finalized):
    env = dict(os.environ, WORLD_SIZE=world, RANK="0")
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 3
    assert run.stderr.strip().endswith("error: one line")
    assert ("finalized" in run.stdout) is finalized
