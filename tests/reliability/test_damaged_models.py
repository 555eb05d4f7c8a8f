"""A damaged or truncated weights, tokenizer or config file in a model folder (exported, base model
folder, cached hub download, GGUF) is one CheckpointError naming the file and what to do: from
`EmbeddingModel.load`, from building a recipe's model, and as one line with exit code 2 from
dsembed-evaluate, dsembed-probe-layers and dsembed-consolidate, which write nothing.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dsembed.errors import CheckpointError
from dsembed.modeling.model import EmbeddingModel, build_model, replace_model

from relhelp import REPO, env
from launch import write_sts_task
from tests.conftest import make_tiny_recipe


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:16] = b"\xff" * 16  # the header: a length / opening brace overwritten
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An exported (merged) folder and one that keeps its LoRA adapter (adapter/)."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    recipe = make_tiny_recipe(pooling={"type": "latent_attention", "num_latents": 4, "num_heads": 4}, lora=True)
    model = build_model(recipe)
    return {"merged": model.save(root / "merged"), "adapter": model.save(root / "adapter", merge_lora=False)}


def _damaged_copy(src: Path, dst: Path, name: str, damage=_truncate) -> Path:
    shutil.copytree(src, dst)
    damage(dst / name)
    return dst


CASES = [("merged", "model.safetensors", _truncate), ("merged", "pooler.safetensors", _garble),
         ("merged", "config.json", _truncate), ("merged", "tokenizer.json", _truncate),
         ("merged", "tokenizer_config.json", _garble), ("merged", "dsembed.json", _truncate),
         ("adapter", "adapter/adapter_model.safetensors", _truncate), ("adapter", "adapter/adapter_config.json", _truncate)]


@pytest.mark.parametrize("form, name, damage", CASES, ids=[f"{f}:{n}:{d.__name__[1:]}" for f, n, d in CASES])
def test_load_names_the_damaged_file(saved, tmp_path, form, name, damage):
    folder = _damaged_copy(saved[form], tmp_path / "m", name, damage)
    with pytest.raises(CheckpointError) as info:
        EmbeddingModel.load(folder)
    message = str(info.value)
    assert message.startswith(f"{folder / name}: ") and "re-export it with dsembed-consolidate" in message, message
    assert "\n" not in message


def test_damaged_recipe_yaml_in_the_folder(saved, tmp_path):
    folder = _damaged_copy(saved["merged"], tmp_path / "m", "recipe.yaml")
    with pytest.raises(CheckpointError, match=r"recipe\.yaml.*re-export it with dsembed-consolidate"):
        EmbeddingModel.load(folder)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_base_model_folder(saved, tmp_path, name):
    """A recipe's model.name_or_path (a local transformers folder) and its tokenizer."""
    folder = _damaged_copy(saved["merged"], tmp_path / "base", name)
    recipe = replace_model(make_tiny_recipe(), name_or_path=str(folder), random_init=None, tokenizer=None)
    with pytest.raises(CheckpointError, match=rf"^{folder / name}: .*copy or download the model folder again"):
        build_model(recipe)


def test_cached_hub_download(saved, tmp_path, monkeypatch):
    """A hub id whose cached snapshot holds a truncated file: named, with the cache command."""
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(saved["merged"], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    _truncate(snapshot / "model.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    recipe = replace_model(make_tiny_recipe(), name_or_path="org/tiny", random_init=None, tokenizer=None)
    with pytest.raises(CheckpointError, match=rf"^{snapshot / 'model.safetensors'}: .*hf cache rm model/org/tiny"):
        build_model(recipe)


def test_damaged_gguf_file(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    monkeypatch.setenv("DSEMBED_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 10)  # a header cut short
    recipe = replace_model(make_tiny_recipe(), name_or_path=str(gguf), random_init=None, tokenizer=None)
    with pytest.raises(CheckpointError, match=rf"^{gguf}: cannot be loaded .*download or copy the GGUF file again"):
        build_model(recipe)
    assert not any((tmp_path / "cache").rglob("config.json"))  # no half conversion cached


def _one_line(run: subprocess.CompletedProcess, path: Path) -> None:
    detail = f"exit {run.returncode}\n{run.stderr[-3000:]}"
    assert run.returncode == 2 and "Traceback" not in run.stderr, detail
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {path}: "), detail


def test_evaluate_and_probe_commands(saved, tmp_path):
    folder = _damaged_copy(saved["merged"], tmp_path / "m", "model.safetensors")
    write_sts_task(tmp_path / "tasks")
    run = subprocess.run([sys.executable, "-m", "dsembed.cli.evaluate", str(folder), "--tasks-dir", str(tmp_path / "tasks"),
                          "--output", str(tmp_path / "out" / "r.json"), "--no-progress"],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    _one_line(run, folder / "model.safetensors")
    assert not (tmp_path / "out").exists()
    probe_folder = _damaged_copy(saved["merged"], tmp_path / "p", "tokenizer.json")
    run = subprocess.run([sys.executable, "-m", "dsembed.cli.probe_layers", str(probe_folder), "--tasks-dir",
                          str(tmp_path / "tasks"), "--output-dir", str(tmp_path / "probe")],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    _one_line(run, probe_folder / "tokenizer.json")
    assert not (tmp_path / "probe").exists()


def test_consolidate_with_a_damaged_base_model(saved, tmp_path):
    """A checkpoint trained from a local base folder, exported after that folder was damaged."""
    base = tmp_path / "base"
    shutil.copytree(saved["merged"], base)
    recipe = yaml.safe_load((REPO / "recipes" / "tiny-cpu.yaml").read_text())
    recipe["model"] = {"name_or_path": str(base), "max_length": 64}
    recipe["pooling"] = {"type": "last_token"}
    recipe["train"].update(output_dir=str(tmp_path / "run"), max_steps=1, save_steps=1)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    train = subprocess.run([sys.executable, "-m", "dsembed.train", str(tmp_path / "r.yaml"), "logging.progress_bar=false",
                            "deepspeed.zero_stage=2"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    _truncate(base / "model.safetensors")
    run = subprocess.run([sys.executable, "-m", "dsembed.cli.consolidate", str(tmp_path / "run"), str(tmp_path / "x" / "out")],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    _one_line(run, base / "model.safetensors")
    assert not (tmp_path / "x").exists()
