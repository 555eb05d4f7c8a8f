"""`python -m dsembed.train`: one-line errors with exit 2 and no run directory, --dry-run, --local_rank."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dsembed.config import load_recipe
from dsembed.errors import run_cli
from dsembed.modeling.pooling import count_head_parameters
from dsembed.train import main

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "tiny-cpu.yaml"


def _recipe(tmp_path: Path, **sections) -> tuple[Path, Path]:
    data = yaml.safe_load(TINY.read_text())
    out = tmp_path / "out"
    data["train"]["output_dir"] = str(out)
    for section, values in sections.items():
        if values is None:
            data.pop(section, None)
        else:
            data.setdefault(section, {}).update(values)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, out


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = run_cli(main, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_misspelt_key_is_one_line_exit_2_without_traceback(tmp_path: Path) -> None:
    path, out = _recipe(tmp_path, train={"max_step": 5})
    proc = subprocess.run([sys.executable, "-m", "dsembed.train", str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(path) in lines[0] and "train.max_step" in lines[0] and "max_steps" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("sections, key", [
    ({"train": {"max_steps": "ten"}}, "train.max_steps"),
    ({"pooling": {"type": "multi_layer"}}, "pooling.type"),
    ({"deepspeed": {"zero_stage": 4}}, "deepspeed.zero_stage"),
])
def test_recipe_errors_name_file_and_key(tmp_path: Path, capsys, sections, key) -> None:
    path, out = _recipe(tmp_path, **sections)
    code, _, err = _run([str(path)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and str(path) in err and key in err
    assert not out.exists()


def test_bad_override_is_a_recipe_error(tmp_path: Path, capsys) -> None:
    path, out = _recipe(tmp_path)
    code, _, err = _run([str(path), "train.cache_chunk_size=99"], capsys)
    assert code == 2 and "train.cache_chunk_size" in err and not out.exists()


@pytest.mark.parametrize("extra", [[], ["--local_rank=0"], ["--local_rank", "1"], ["--local-rank=0"]])
def test_dry_run_prints_recipe_and_head_size(tmp_path: Path, capsys, extra) -> None:
    path, out = _recipe(tmp_path)
    code, stdout, _ = _run([str(path), "--dry-run", "pooling.num_latents=8", *extra], capsys)
    assert code == 0
    recipe = load_recipe(path, ["pooling.num_latents=8"])
    expected = count_head_parameters(recipe.pooling, 64, 4)  # tiny-cpu: hidden 64, 4 layers
    assert expected > 0
    assert f"pooling head (multi_layer_attention) parameters: {expected:,}" in stdout
    assert "num_latents: 8" in stdout and "hidden size 64, 4 decoder layers" in stdout
    assert not out.exists()


def test_dry_run_missing_data_file_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    path, out = _recipe(tmp_path, data={"train": ["no-such-rows.jsonl"]})
    code, stdout, err = _run([str(path), "--dry-run"], capsys)
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert str(path) in err and "data.train" in err and str(tmp_path / "no-such-rows.jsonl") in err
    assert not out.exists()


def test_dry_run_world_size_checks_batch_arithmetic(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path, _ = _recipe(tmp_path, train={"global_batch_size": 64, "micro_batch_size": 8})
    code, _, err = _run([str(path), "--dry-run", "--world-size", "4"], capsys)  # 8 x 1 x 4 = 32, not 64
    assert code == 2 and "train.global_batch_size = 64" in err and "8 x 1 x 4 = 32" in err
    code, stdout, _ = _run([str(path), "--dry-run", "--world-size", "8"], capsys)  # 8 x 1 x 8 = 64
    assert code == 0 and "global_batch_size: 64" in stdout
    code, _, err = _run([str(path), "--world-size", "8"], capsys)  # only with --dry-run
    assert code == 2 and "--world-size" in err


def test_dry_run_hub_model_offline_reports_unknown(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, _ = _recipe(tmp_path, model=None)
    text = path.read_text() + "model:\n  name_or_path: no-such-org/no-such-model\n  tokenizer: bytes\n"
    path.write_text(text)
    code, stdout, _ = _run([str(path), "--dry-run"], capsys)
    assert code == 0 and "unknown (config not available offline)" in stdout


def test_resume_never_with_checkpoints_refuses(tmp_path: Path, capsys) -> None:
    path, out = _recipe(tmp_path, train={"resume": "never"})
    (out / "checkpoints" / "step-5").mkdir(parents=True)
    code, _, err = _run([str(path)], capsys)
    assert code == 2 and "train.resume" in err and "train.overwrite" in err and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]  # nothing written
