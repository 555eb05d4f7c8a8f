"""Bad recipes through the real CLI: exit code 2, one `error:` line naming the file and the key, no
traceback, and no run directory created (errors found after the model is built included).

All cases run once, two at a time, in a module fixture (each is a separate `python -m dsembed.train`
process); the parametrised test then checks each case's outcome.
"""
from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from relhelp import TINY, cli, error_lines

GPT2 = ("model.random_init={model_type: gpt2, n_embd: 64, n_layer: 2, n_head: 4, vocab_size: 260, "
        "n_positions: 128}")
# id: (recipe text or None for tiny-cpu.yaml, overrides, substrings the error line must contain)
CASES: dict[str, tuple[str | None, list[str], list[str]]] = {
    "unknown_key": (None, ["train.bogus=1"], ["train.bogus"]),
    "unknown_key_did_you_mean": (None, ["optim.learning_rate=1e-4"], ["optim.learning_rate"]),
    "unknown_section": ("trainer: {max_steps: 3}\n", [], ["trainer"]),
    "wrong_type_int": (None, ["train.max_steps=ten"], ["train.max_steps"]),
    "wrong_type_bool": (None, ["lora.enabled=maybe"], ["lora.enabled"]),
    "wrong_type_list": (None, ["data.train=synthetic:64"], ["data.train"]),
    "batch_arithmetic": (None, ["train.global_batch_size=12"], ["train.global_batch_size"]),
    "layers_beyond_depth": (None, ["pooling.layers=[1, 9]"], ["pooling.layers"]),
    "top_k_beyond_depth": (None, ["pooling.layers=top-9"], ["pooling.layers"]),
    "missing_data_file": (None, ["data.train=[no-such-file.jsonl]"], ["no-such-file.jsonl", "data.train"]),
    "missing_model_dir": (None, ["model.random_init=null", "model.name_or_path=/nonexistent/dsembed-model"],
                          ["model.name_or_path"]),
    "bidirectional_gpt2": (None, [GPT2, "pooling={type: mean}"], ["attention.mode", "gpt2"]),
    "flash_attention_missing": (None, ["model.attn_implementation=flash_attention_2"], ["model.attn_implementation"]),
    "bad_enum_attention": (None, ["attention.mode=sideways"], ["attention.mode"]),
    "bad_enum_scheduler": (None, ["optim.scheduler=cosinus"], ["optim.scheduler"]),
    "bad_enum_zero_stage": (None, ["deepspeed.zero_stage=4"], ["deepspeed.zero_stage"]),
    "bad_dtype": (None, ["model.dtype=fp8"], ["model.dtype"]),
    "negative_lr": (None, ["optim.lr=-1e-3"], ["optim.lr"]),
    "zero_temperature": (None, ["loss.temperature=0"], ["loss.temperature"]),
    "chunk_bigger_than_micro_batch": (None, ["train.cache_chunk_size=16"], ["train.cache_chunk_size"]),
    "zero_save_total_limit": (None, ["train.save_total_limit=0"], ["train.save_total_limit"]),
    "bad_yaml_syntax": ("model:\n  random_init: [unclosed\ntrain: {max_steps: 3}\n", [], [":3:"]),
    "non_mapping_recipe": ("- model\n- train\n", [], ["mapping"]),
    "empty_recipe": ("", [], ["model.name_or_path", "model.random_init"]),
    "unknown_pooling_type": (None, ["pooling={type: cls}"], ["pooling.type"]),
    "option_of_another_pooling": (None, ["pooling={type: mean, num_latents: 4}"], ["pooling.num_latents"]),
    "two_model_sources": (None, ["model.name_or_path=some/model"], ["model.name_or_path", "model.random_init"]),
    "missing_ds_template": (None, ["deepspeed.template=no-such.json"], ["deepspeed.template"]),
    "lora_targets_missing": (None, ["lora.target_modules=[no_such_proj]"], ["lora.target_modules"]),
    "missing_recipe_file": ("<missing>", [], ["not found"]),
    "negative_warmup": (None, ["optim.warmup_steps=-1"], ["optim.warmup_steps"]),
    "eval_every_steps_without_tasks": (None, ["eval.every_steps=2"], ["eval.every_steps", "eval.tasks_dir"]),
    "eval_tasks_dir_missing": (None, ["eval.every_steps=2", "eval.tasks_dir=no-such-tasks"], ["eval", "no-such-tasks"]),
}


def _run_case(root: Path, name: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    text, overrides, _ = CASES[name]
    folder = root / name
    folder.mkdir()
    out = folder / "run"
    if text is None:
        recipe = folder / "recipe.yaml"
        recipe.write_text(TINY.read_text())
    elif text == "<missing>":
        recipe = folder / "missing.yaml"
    else:
        recipe = folder / "recipe.yaml"
        recipe.write_text(text)
    args = [*overrides, f"train.output_dir={out}"] if text is None else overrides
    return cli(args, recipe=recipe, timeout=120), recipe, out


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess, Path, Path]]:
    root = tmp_path_factory.mktemp("bad-recipes")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run_case, root, name) for name in CASES}
        return {name: future.result() for name, future in futures.items()}


def test_at_least_twenty_cases() -> None:
    assert len(CASES) >= 20


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_recipe_exits_2_with_one_line_naming_file_and_key(outcomes, name: str) -> None:
    run, recipe, out = outcomes[name]
    detail = f"exit {run.returncode}\n{run.stderr[-3000:]}"
    assert run.returncode == 2, detail
    assert "Traceback" not in run.stderr, detail
    lines = error_lines(run)
    assert len(lines) == 1, detail
    line = lines[0]
    named = str(recipe.parent / "no-such-file.jsonl") if name == "missing_data_file" else str(recipe)
    assert named in line, f"the error does not name the file at fault: {line}"
    for needle in CASES[name][2]:
        assert needle in line, f"{needle!r} missing from: {line}"
    assert not out.exists(), f"a run directory was created: {sorted(p.name for p in out.iterdir())}"
    # the user's recipe file is never rewritten
    if recipe.exists() and CASES[name][0] is None:
        assert yaml.safe_load(recipe.read_text()) == yaml.safe_load(TINY.read_text())
