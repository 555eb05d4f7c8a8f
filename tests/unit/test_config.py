"""The recipe schema: strict loading, overrides, cross-section rules, and every shipped recipe."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dsembed.config import LatentAttentionPooling, MultiLayerAttentionPooling, Recipe, load_recipe, recipe_from_dict
from dsembed.recipe_rules import head_sizes, resolve_layers, validate
from dsembed.errors import RecipeError
from dsembed.instructions import instruction_for, query_instructions

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
TRAINING_RECIPES = [p for p in RECIPES if "studies" not in p.parts]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_defaults_round_trip_through_yaml(tmp_path):
    recipe = Recipe()
    again = load_recipe(write(tmp_path, recipe.to_yaml()))
    assert again.to_dict() == recipe.to_dict()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("trian:\n  max_steps: 3\n", "unknown key trian (did you mean 'train'?)"),
        ("train:\n  max_step: 3\n", "unknown key train.max_step (did you mean 'max_steps'?)"),
        ("train:\n  max_steps: ten\n", "train.max_steps = 'ten' should be int"),
        ("train:\n  max_steps: true\n", "train.max_steps = True should be int"),
        ("pooling:\n  type: multi_layer_atention\n", "pooling.type = 'multi_layer_atention' is not a pooling type (did you mean 'multi_layer_attention'?)"),
        ("attention:\n  mode: bidirectonal\n", "attention.mode = 'bidirectonal' is not one of 'causal' | 'bidirectional' (did you mean 'bidirectional'?)"),
        ("pooling:\n  type: mean\n  layers: all\n", "unknown key pooling.layers"),
        ("lora:\n  target_modules: q_proj\n", "lora.target_modules = 'q_proj' should be a list"),
        ("model: [1, 2]\n", "model should be a mapping"),
        ("train:\n  max_steps: 3\n   bad: indent\n", "r.yaml:3:"),
    ],
)
def test_bad_recipes_name_file_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert expected in message
    assert "\n" not in message


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_parse_yaml_scalars(tmp_path):
    path = write(tmp_path, "model:\n  random_init: {model_type: llama, num_hidden_layers: 6}\n")
    recipe = load_recipe(path, ["train.max_steps=7", "optim.lr=3e-4", "pooling.type=multi_layer_attention",
                                "pooling.layers=[2, 4]", "pooling.layer_weights=false", "attention.mode=bidirectional"])
    assert recipe.train.max_steps == 7
    assert recipe.optim.lr == pytest.approx(3e-4)
    assert isinstance(recipe.pooling, MultiLayerAttentionPooling)
    assert recipe.pooling.layers == [2, 4] and recipe.pooling.layer_weights is False
    assert recipe.attention.mode == "bidirectional"
    with pytest.raises(RecipeError, match="train.max_stesp"):
        load_recipe(path, ["train.max_stesp=7"])
    with pytest.raises(RecipeError, match="should look like section.key=value"):
        load_recipe(path, ["train.max_steps"])


def test_recipes_are_frozen():
    recipe = Recipe()
    with pytest.raises(Exception):
        recipe.train.max_steps = 3  # type: ignore[misc]


@pytest.mark.parametrize("spec, expected", [
    ("all", list(range(1, 33))), ("top-4", [29, 30, 31, 32]), ("top-8", list(range(25, 33))),
    ("top-16", list(range(17, 33))), ([3, 1], [1, 3]),
])
def test_resolve_layers(spec, expected):
    assert resolve_layers(spec, 32) == expected


@pytest.mark.parametrize("spec, message", [
    ("top-40", "has 32 layers"), ("top-0", "has 32 layers"), ([0, 5], "outside 1..32"),
    ([33], "outside 1..32"), ("first-4", "should be 'all', 'top-K'"), ([], "empty list"), ([2, 2], "twice"),
])
def test_resolve_layers_rejects(spec, message):
    with pytest.raises(RecipeError, match=message):
        resolve_layers(spec, 32)


def base(**sections):
    data = {"model": {"random_init": {"model_type": "llama", "num_hidden_layers": 4}}}
    data.update(sections)
    return recipe_from_dict(data, "x.yaml")


def test_validate_batch_arithmetic():
    recipe = base(train={"micro_batch_size": 2, "gradient_accumulation_steps": 4, "global_batch_size": 16})
    validate(recipe, world_size=2)
    with pytest.raises(RecipeError, match=r"2 x 4 x 4 = 32 \(change one of them\)"):
        validate(recipe, world_size=4)


@pytest.mark.parametrize("sections, message", [
    ({"pooling": {"type": "multi_layer_attention", "layers": "top-8"}}, "backbone has 4 layers"),
    ({"pooling": {"type": "multi_layer_attention", "layers": [5]}}, "outside 1..4"),
    ({"train": {"micro_batch_size": 4, "cache_chunk_size": 8}}, "train.cache_chunk_size"),
    ({"deepspeed": {"zero_stage": 2, "offload": True}}, "deepspeed.offload needs"),
    ({"pooling": {"type": "latent_attention", "preset": "paper", "num_heads": 4}}, "preset = 'paper' sets num_heads"),
    ({"loss": {"temperature": 0}}, "loss.temperature"),
    ({"data": {"query_template": "Instruct: {instruction}"}}, "query_template"),
    ({"train": {"max_steps": 0}}, "train.max_steps = 0"),
])
def test_validate_rejects(sections, message):
    with pytest.raises(RecipeError, match=message):
        validate(base(**sections))


def test_validate_needs_exactly_one_model_source():
    with pytest.raises(RecipeError, match="exactly one of model.name_or_path or model.random_init"):
        validate(recipe_from_dict({}, "x.yaml"))


def test_paper_preset_sizes():
    sizes = head_sizes(LatentAttentionPooling(preset="paper"))
    assert sizes["num_latents"] == 768 and sizes["num_heads"] == 32 and sizes["head_dim"] == 2048


def test_instruction_preset_and_overrides():
    recipe = base(data={"instruction_preset": "e5", "instructions": {"nq": "mine"}})
    table = query_instructions(recipe.data)
    assert instruction_for("nq", table) == "mine"
    assert instruction_for("FEVER", table).startswith("Given a claim")
    assert instruction_for("unknown-source", table) == table["default"]
    assert instruction_for("x", query_instructions(base().data)) is None


@pytest.mark.parametrize("path", TRAINING_RECIPES, ids=[str(p.relative_to(REPO)) for p in TRAINING_RECIPES])
def test_every_recipe_loads_validates_and_has_a_header(path):
    recipe = validate(load_recipe(path))
    text = path.read_text()
    assert text.startswith("# "), "recipes open with a header comment"
    head = text.split("\nmodel:")[0]
    for word in ("Purpose", "Launch", "Batch arithmetic"):
        assert word in head, f"{path.name} header lacks {word}"
    assert recipe.train.output_dir


def test_recipes_found():
    names = {str(p.relative_to(REPO / "recipes")) for p in RECIPES}
    for model in ("mistral-7b", "qwen2-0.5b"):
        for i in range(1, 6):
            assert f"paper/{model}/model{i}.yaml" in names
        for ablation in ("top4", "top8", "top16", "all", "no-layer-weights"):
            assert f"ablations/{model}/{ablation}.yaml" in names
    assert "tiny-cpu.yaml" in names


def test_paper_recipes_match_the_paper():
    expected_attention = {1: "causal", 2: "causal", 3: "causal", 4: "bidirectional", 5: "bidirectional"}
    expected_pooling = {1: "last_token", 2: "latent_attention", 3: "multi_layer_attention",
                        4: "latent_attention", 5: "multi_layer_attention"}
    hubs = {"mistral-7b": "mistralai/Mistral-7B-v0.1", "qwen2-0.5b": "Qwen/Qwen2-0.5B"}
    for model, hub in hubs.items():
        for i in range(1, 6):
            r = validate(load_recipe(REPO / "recipes" / "paper" / model / f"model{i}.yaml"), world_size=8)
            assert r.model.name_or_path == hub
            assert r.attention.mode == expected_attention[i] and r.pooling.type == expected_pooling[i]
            assert (r.lora.enabled, r.lora.r, r.lora.alpha, r.lora.dropout) == (True, 16, 32, 0.1)
            assert set(r.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
            assert (r.optim.lr, r.optim.scheduler, r.optim.warmup_steps, r.optim.weight_decay) == (1e-5, "linear", 100, 0.01)
            assert (r.model.dtype, r.model.max_length, r.train.max_steps) == ("bfloat16", 512, 1000)
            assert (r.train.micro_batch_size, r.train.gradient_accumulation_steps) == (1, 256)
            assert r.loss.temperature == 0.05 and r.model.append_eos and r.model.padding_side == "left"
            assert r.data.train == ["hf:yixuantt/ir_data"]
            if i in (2, 3, 4, 5):
                assert r.pooling.preset == "paper"


def test_ablations_differ_from_model5_in_one_line():
    for model in ("mistral-7b", "qwen2-0.5b"):
        model5 = load_recipe(REPO / "recipes" / "paper" / model / "model5.yaml").to_dict()
        for name, key, value in [("top4", "layers", "top-4"), ("top8", "layers", "top-8"), ("top16", "layers", "top-16"),
                                 ("all", "layers", "all"), ("no-layer-weights", "layer_weights", False)]:
            ablation = load_recipe(REPO / "recipes" / "ablations" / model / f"{name}.yaml").to_dict()
            assert ablation["pooling"][key] == value
            ablation["pooling"][key] = model5["pooling"][key]
            ablation["train"]["output_dir"] = model5["train"]["output_dir"]
            assert ablation == model5, f"{model}/{name} differs from model5 beyond pooling.{key}"


def test_config_imports_only_stdlib_and_yaml():
    code = "import sys, dsembed.config; bad = [m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"
