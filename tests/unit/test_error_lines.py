"""The one-line errors of every command reach stderr in a single write: ranks that fail together
share one pipe, and a line written in two pieces (text, then newline) let the other rank's line
land in between (seen in tests/reliability/test_damaged_checkpoint.py: two ranks' lines run together)."""
from __future__ import annotations

import sys

import pytest

from dsembed.errors import TrainingError, UserError, run_cli


class _Writes:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("raised, code", [(UserError("bad key\nin two lines"), 2), (TrainingError("loss is nan"), 3),
                                          (KeyboardInterrupt(), 130)])
def test_the_line_is_one_write_with_its_newline(monkeypatch, raised, code) -> None:
    writes = _Writes()
    monkeypatch.setattr(sys, "stderr", writes)

    def main(argv):
        raise raised

    assert run_cli(main, []) == code
    assert len(writes.calls) == 1 and writes.calls[0].endswith("\n") and writes.calls[0].count("\n") == 1
    if code != 130:
        assert writes.calls[0].startswith("error: ")
