"""Bad training data: through the CLI a clear `file:line` error and exit 2 (no run directory), or,
with data.skip_malformed, the skipped-row count on the console and in TensorBoard. Over-long rows
are truncated with the EOS kept last (checked on the collated batch, in process).
"""
from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from relhelp import cli, error_lines

GOOD = [json.dumps({"query": f"is otter {i} teal?", "positive": f"otter {i} is teal",
                    "negative": f"heron {i} is teal"}) for i in range(40)]
# id: (file bytes, the 1-based line at fault or None, substrings of the error)
CASES: dict[str, tuple[bytes, int | None, list[str]]] = {
    "malformed_json": ("\n".join([GOOD[0], '{"query": "a", "positive": ', GOOD[1]]).encode(), 2, ["invalid JSON"]),
    "missing_field": ("\n".join([GOOD[0], GOOD[1], json.dumps({"query": "q only"})]).encode(), 3, ["'positive'"]),
    "empty_string": ("\n".join([json.dumps({"query": "   ", "positive": "p"}), GOOD[0]]).encode(), 1, ["'query'", "empty"]),
    "wrong_type": ("\n".join([GOOD[0], json.dumps({"query": "q", "positive": 7})]).encode(), 2, ["'positive'", "string"]),
    "not_an_object": ("\n".join([GOOD[0], json.dumps(["q", "p"])]).encode(), 2, ["JSON object"]),
    "not_utf8": (GOOD[0].encode() + b"\n" + b'{"query": "caf\xe9", "positive": "x"}\n', 2, ["UTF-8", "0xe9"]),
    "empty_dataset": (b"\n\n", None, ["no usable rows"]),
}


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / f"{name}.jsonl"
    path.write_bytes(data)
    return path


def _run(root: Path, name: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    folder = root / name
    folder.mkdir()
    path = _write(folder, name, CASES[name][0])
    out = folder / "run"
    return cli([f"data.train=[{path}]", f"train.output_dir={out}"], timeout=120), path, out


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("bad-data")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run, root, name) for name in CASES}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_data_exits_2_naming_file_and_line(outcomes, name: str) -> None:
    run, path, out = outcomes[name]
    detail = f"exit {run.returncode}\n{run.stderr[-3000:]}"
    assert run.returncode == 2 and "Traceback" not in run.stderr, detail
    lines = error_lines(run)
    assert len(lines) == 1, detail
    _, line_no, needles = CASES[name]
    where = f"{path}:{line_no}:" if line_no is not None else f"{path}:"
    assert lines[0].startswith(f"error: {where}"), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    if line_no is not None:
        assert "data.skip_malformed" in lines[0]  # the message offers the way out
    assert not out.exists()


def test_skip_malformed_reports_the_count(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    bad = ['{"query": "broken', json.dumps({"query": "q"}), json.dumps({"query": "", "positive": "p"})]
    path = _write(tmp_path, "mixed", "\n".join(GOOD[:20] + bad + GOOD[20:]).encode() + b"\n\xff\xfe\n")
    out = tmp_path / "run"
    run = cli([f"data.train=[{path}]", "data.skip_malformed=true", f"train.output_dir={out}",
               "train.max_steps=1", "train.save_steps=1"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"skipped 4 malformed row(s), trained on 40 (first: {path}:21:" in run.stderr, run.stderr[-3000:]
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("data/skipped_rows")] == [4]
    assert any("data/skipped_rows" in tag for tag in acc.Tags()["tensors"])  # the text note


def test_long_rows_are_truncated_with_eos_last(tmp_path: Path) -> None:
    from dsembed.config import load_recipe
    from dsembed.data.batches import collate
    from dsembed.data.rows import load_examples
    from dsembed.modeling.tokenization import byte_tokenizer

    from relhelp import TINY

    long_text = "word " * 500  # 2,500 bytes, far beyond model.max_length = 64
    rows = [json.dumps({"query": long_text, "positive": long_text, "negative": "short"}),
            json.dumps({"query": "short q", "positive": "short p", "negative": "short n"})]
    path = _write(tmp_path, "long", "\n".join(rows).encode())
    recipe = load_recipe(TINY, [f"data.train=[{path}]", "data.instructions={}", "model.padding_side=right"])
    examples = load_examples(recipe)
    tokenizer = byte_tokenizer()
    batch = collate(list(examples), tokenizer, recipe)
    eos, limit = tokenizer.eos_token_id, recipe.model.max_length
    for part in ("query", "documents"):
        ids, mask = batch[part]["input_ids"], batch[part]["attention_mask"]  # [B, T]
        assert ids.shape[1] == limit, (part, ids.shape)
        assert mask[0].sum() == limit and ids[0, -1] == eos  # the long row: cut, EOS kept last
        assert (ids[0, :-1] != eos).all()
        short = int(mask[1].sum())  # right padding: the short row's EOS is its last real token
        assert short < limit and ids[1, short - 1] == eos
    # the long document row decodes to the start of the text (truncated at the end, not the start)
    assert tokenizer.decode(batch["documents"]["input_ids"][0, :-1]) == long_text[:limit - 1]
