"""Exports load without dsembed: plain sentence-transformers modules for last_token / mean heads, the
generated dsembed_model.py for trainable heads (compared with dsembed's classes), bf16 runs merged in
float32, and the flash-attn -> sdpa fallback of CPU-side tools."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dsembed.modeling import EmbeddingModel, build_model

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["the cat sat on the mat", "a dog", "stock markets fell sharply today " * 3, "x"]
QUERIES = ["where is the cat", "markets"]
INSTRUCTION = "Find the passage"
LATENT = {"type": "latent_attention", "num_latents": 8, "num_heads": 4, "head_dim": 8}
MULTI = {"type": "multi_layer_attention", "layers": "all", "num_latents": 8, "num_heads": 4, "head_dim": 8}


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _export(model: EmbeddingModel, folder: Path) -> str:
    from dsembed.export.st_files import write_sentence_transformers_files

    model.save(folder)
    return write_sentence_transformers_files(folder, model)


def _with_instruction(recipe):
    import dataclasses

    return dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, instructions={"default": INSTRUCTION}))


def _perturbed(recipe) -> EmbeddingModel:
    torch.manual_seed(0)
    model = build_model(recipe).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "layer_weights" in name:
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)
    return model


def run_without_dsembed(folders: dict[str, Path], tmp: Path, texts: list[str], queries: list[str],
                        batch_size: int = 2) -> dict[str, dict[str, np.ndarray]]:
    """tests/no_dsembed.py in one fresh process whose sys.path lacks the repository and blocks dsembed."""
    jobs = [{"folder": str(folder), "out": str(tmp / f"{name}.npz")} for name, folder in folders.items()]
    spec = tmp / "no-dsembed.json"
    spec.write_text(json.dumps({"texts": texts, "queries": queries, "batch_size": batch_size, "jobs": jobs}), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "no_dsembed.py"), str(spec)],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: dict(np.load(tmp / f"{name}.npz")) for name in folders}


CASES = {  # name: (pooling, attention, padding side, sentence-transformers form)
    "last-bidirectional": ({"type": "last_token"}, "bidirectional", "left", "plain"),
    "mean-causal-right": ({"type": "mean"}, "causal", "right", "plain"),
    "multi-bidirectional": (MULTI, "bidirectional", "left", "portable"),
}


def test_export_loads_without_dsembed(tiny_recipe, tmp_path):
    folders, models = {}, {}
    for name, (pooling, attention, side, form) in CASES.items():
        recipe = _with_instruction(tiny_recipe("llama", pooling, attention, lora=True, padding_side=side))
        models[name] = _perturbed(recipe)
        folders[name] = tmp_path / name
        assert _export(models[name], folders[name]) == form
        assert (folders[name] / "dsembed_model.py").exists() == (form == "portable")
    results = run_without_dsembed(folders, tmp_path, TEXTS, QUERIES)
    for name, (pooling, attention, side, form) in CASES.items():
        got, loaded = results[name], EmbeddingModel.load(folders[name])
        want_docs, want_queries = loaded.encode(TEXTS), loaded.encode(QUERIES, instruction=INSTRUCTION)
        assert _cos(got["documents"], want_docs).min() >= 0.99999, name
        assert _cos(got["queries"], want_queries).min() >= 0.99999, name
        assert _cos(want_docs, models[name].encode(TEXTS)).min() >= 0.99999, name  # the export is the live model
        assert not np.allclose(got["queries"], models[name].encode(QUERIES))  # the query prompt was applied
        assert bool(got["bidirectional"]) == (attention == "bidirectional"), name  # a plain AutoModel load keeps it
        expected = ["Transformer", "Pooling", "Normalize"] if form == "plain" else ["PortableEmbedding", "Normalize"]
        assert list(got["modules"]) == expected, name


def test_generated_module_is_dsembed_source(tiny_recipe, tmp_path):
    """dsembed_model.py holds dsembed's classes verbatim and embeds like dsembed for both trainable heads."""
    import importlib.util
    import inspect

    from dsembed.export import portable
    from dsembed.modeling.pooling import LatentCrossAttention

    import ast

    source = portable.module_source()
    assert inspect.getsource(LatentCrossAttention) in source
    imported = set()
    for node in ast.walk(ast.parse(source)):  # top-level and function-level imports alike
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "json", "os", "contextlib", "typing", "torch", "transformers",
                        "safetensors", "sentence_transformers"}, imported
    for pooling in (LATENT, MULTI):
        model = _perturbed(tiny_recipe("qwen2", pooling, "bidirectional", lora=True, padding_side="right"))
        folder = tmp_path / pooling["type"]
        assert _export(model, folder) == "portable"
        spec = importlib.util.spec_from_file_location(f"gen_{pooling['type']}", folder / "dsembed_model.py")
        generated = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(generated)
        module = generated.PortableEmbedding.load(str(folder))
        assert type(module.pooler).__module__ == generated.__name__  # the file's own copy, not dsembed's
        features = module.preprocess(TEXTS)
        want = model.tokenize(TEXTS)
        assert torch.equal(features["input_ids"], want["input_ids"])
        with torch.no_grad():
            emb = module(features)["sentence_embedding"]
        emb = torch.nn.functional.normalize(emb, dim=-1).numpy()
        assert _cos(emb, model.encode(TEXTS)).min() >= 0.99999


def test_bf16_lora_export_is_merged_in_float32(tiny_recipe, tmp_path):
    """A small LoRA delta survives the export of a bf16 model: merged and written in float32."""
    import copy

    from dsembed.modeling.weights import plain_state_dict
    from dsembed.modeling.backbone import unwrap

    model = _perturbed(tiny_recipe("llama", {"type": "mean"}, "causal", lora=True, dtype="bfloat16"))
    with torch.no_grad():  # a delta below bf16 resolution of the weights: rounding would drop it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.002)
    live = model.encode(TEXTS)
    # the live model's own weights (bf16 base + LoRA, unmerged) evaluated in float32: what the
    # export should compute; the bf16 engine adds bf16 arithmetic noise on top of it
    live32 = copy.deepcopy(model).float().encode(TEXTS)
    folder = tmp_path / "bf16"
    _export(model, folder)
    assert json.loads((folder / "dsembed.json").read_text())["backbone_dtype"] == "float32"
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"
    loaded = EmbeddingModel.load(folder)
    exported = loaded.encode(TEXTS)
    rounded = plain_state_dict(unwrap(model.backbone), merge=True)  # the old export: merged in bf16
    base = plain_state_dict(unwrap(model.backbone), merge=False)
    merged = {k: v for k, v in loaded.backbone.state_dict().items()}
    key = next(k for k in rounded if k.endswith("q_proj.weight"))
    changed = merged[key] != base[key].float()  # elements the float32 merge moved
    assert (rounded[key][changed] == base[key][changed]).float().mean() > 0.5  # bf16 drops most of them
    loaded.backbone.load_state_dict({k: v.float() for k, v in rounded.items()})
    old_export = loaded.encode(TEXTS)
    np.testing.assert_allclose(exported, live32, atol=2e-5)  # the float32 export is the trained function
    assert np.abs(old_export - live32).max() > 20 * np.abs(exported - live32).max()  # the bf16 merge is not
    assert _cos(exported, live).min() >= 0.999  # and the bf16 engine is that function up to bf16 noise


def test_flash_attention_recipes_fall_back_to_sdpa_on_cpu(tiny_recipe, capsys):
    import importlib.util

    from dsembed.errors import RecipeError
    from dsembed.modeling import backbone

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed: nothing to fall back from")
    recipe = tiny_recipe("llama", {"type": "last_token"}, "causal", attn_implementation="flash_attention_2")
    with pytest.raises(RecipeError, match="flash-attn"):
        build_model(recipe)  # training still refuses
    backbone._FALLBACK_NOTED.clear()
    model = build_model(recipe, attn_fallback=True)
    build_model(recipe, attn_fallback=True)
    assert unwrap_impl(model) == "sdpa"
    err = capsys.readouterr().err
    assert err.count("flash-attn is not installed") == 1 and err.count("\n") == 1


def unwrap_impl(model: EmbeddingModel) -> str:
    from dsembed.modeling.backbone import unwrap

    return unwrap(model.backbone).config._attn_implementation


def test_evaluate_falls_back_to_sdpa_for_flash_recipes(tiny_recipe, tmp_path, capsys):
    """dsembed-evaluate --base RECIPE and dsembed-evaluate MODEL_DIR of a flash-attn recipe run on CPU."""
    import importlib.util

    import yaml

    from dsembed.cli.evaluate import main as evaluate_main
    from dsembed.modeling import backbone

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed: nothing to fall back from")
    task = tmp_path / "tasks" / "sts" / "TinySTS"
    task.mkdir(parents=True)
    words = ["red", "blue", "car", "fox", "dog", "house", "tree", "bicycle"]
    rng = np.random.default_rng(0)
    task.joinpath("test.jsonl").write_text("".join(json.dumps({
        "sentence1": " ".join(rng.choice(words, 3)), "sentence2": " ".join(rng.choice(words, 3)),
        "score": float(rng.integers(0, 6))}) + "\n" for _ in range(12)), encoding="utf-8")
    recipe = tiny_recipe("llama", {"type": "mean"}, "bidirectional", attn_implementation="flash_attention_2")
    recipe_path = tmp_path / "flash.yaml"
    recipe_path.write_text(recipe.to_yaml(), encoding="utf-8")
    assert yaml.safe_load(recipe_path.read_text())["model"]["attn_implementation"] == "flash_attention_2"
    folder = build_model(recipe, attn_fallback=True).save(tmp_path / "model")  # recipe.yaml keeps flash
    capsys.readouterr()
    for target in (["--base", str(recipe_path)], [str(folder)]):
        backbone._FALLBACK_NOTED.clear()
        assert evaluate_main([*target, "--tasks-dir", str(tmp_path / "tasks"), "--no-progress",
                              "--output", str(tmp_path / "r.json")]) == 0
        err = capsys.readouterr().err
        assert err.count("flash-attn is not installed") == 1, err
        assert json.loads((tmp_path / "r.json").read_text())["tasks"]["TinySTS"]["main_score"] == pytest.approx(
            json.loads((tmp_path / "r.json").read_text())["tasks"]["TinySTS"]["items_score"], abs=1e-4)
