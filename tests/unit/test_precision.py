"""`model.dtype: auto`: bf16 where the device computes it natively, float32 elsewhere, one printed line;
explicit dtypes keep their meaning; a bf16 encode of the tiny model equals float32 to cosine >= 0.999."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from dsembed.config import load_recipe, recipe_from_dict
from dsembed.errors import RecipeError
from dsembed.modeling import build_model
from dsembed.modeling import precision
from dsembed.modeling.precision import native_bf16, resolve_dtype, resolve_recipe

TEXTS = ["the cat sat on the mat", "a dog", "stock markets fell sharply today after the report",
         "cats sit on mats", "x", "record 17: a blue bicycle with a basket " * 3]


@pytest.fixture(autouse=True)
def _fresh_cache():
    precision._resolve.cache_clear()
    yield
    precision._resolve.cache_clear()


def _cpu(monkeypatch, amx: bool, avx512_bf16: bool, machine: str = "x86_64", onednn: bool = True,
         name: str = "Test CPU") -> None:
    monkeypatch.setattr(precision.platform, "machine", lambda: machine)
    monkeypatch.setattr(precision, "cpu_model", lambda: name)
    flags = {"avx512f"} | ({"amx_bf16", "amx_tile"} if amx else set()) | ({"avx512_bf16"} if avx512_bf16 else set())
    monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn, raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)


@pytest.mark.parametrize("amx,avx", [(True, True), (True, False), (False, True)])
def test_auto_picks_bf16_on_a_cpu_with_bf16_units(monkeypatch, amx, avx):
    _cpu(monkeypatch, amx, avx, name="Intel(R) Xeon(R) Platinum 8480+")
    choice = resolve_dtype("auto", "cpu")
    assert choice.dtype == "bfloat16" and choice.torch_dtype == torch.bfloat16
    line = choice.line()
    assert line.startswith("dtype: auto -> bfloat16 (Intel(R) Xeon(R) Platinum 8480+ has ")
    assert ("AMX-BF16" in line) == amx and ("AVX512-BF16" in line) == avx


@pytest.mark.parametrize("machine,onednn,cap,why", [
    ("x86_64", True, None, "neither AMX-BF16 nor AVX512-BF16"),
    ("aarch64", True, None, "x86 CPUs only"),
])
def test_auto_picks_float32_elsewhere(monkeypatch, machine, onednn, cap, why):
    _cpu(monkeypatch, amx=False, avx512_bf16=False, machine=machine, onednn=onednn, name="AMD EPYC 7B13")
    choice = resolve_dtype("auto", "cpu")
    assert choice.dtype == "float32" and why in choice.reason and "AMD EPYC 7B13" in choice.reason


def test_onednn_capped_below_bf16_or_missing_means_float32(monkeypatch):
    _cpu(monkeypatch, amx=True, avx512_bf16=True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert resolve_dtype("auto", "cpu").dtype == "float32"
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in resolve_dtype("auto", "cpu").reason
    precision._resolve.cache_clear()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert resolve_dtype("auto", "cpu").dtype == "bfloat16"
    precision._resolve.cache_clear()
    _cpu(monkeypatch, amx=True, avx512_bf16=True, onednn=False)
    assert resolve_dtype("auto", "cpu").dtype == "float32"


def test_explicit_dtypes_keep_their_meaning(monkeypatch):
    _cpu(monkeypatch, amx=False, avx512_bf16=False)
    for name in ("float32", "bfloat16", "float16"):
        choice = resolve_dtype(name, "cpu")
        assert choice.dtype == name and choice.reason == "as the recipe says"
    with pytest.raises(ValueError, match="one of auto"):
        resolve_dtype("fp8")


def test_this_machine_agrees_with_torch():
    """No mocks: the answer here follows what torch reports for this CPU."""
    native, why = native_bf16("cpu")
    choice = resolve_dtype("auto", "cpu")
    assert choice.dtype == ("bfloat16" if native else "float32") and choice.reason == why
    if not torch.cuda.is_available():
        assert native_bf16("cuda") == (False, "CUDA is not available")


def test_resolve_recipe_prints_one_line_and_records_the_concrete_dtype(monkeypatch, tiny_recipe):
    _cpu(monkeypatch, amx=True, avx512_bf16=True)
    lines: list[str] = []
    recipe = tiny_recipe("llama", dtype="auto")
    assert recipe.model.dtype == "auto"
    resolved = resolve_recipe(recipe, "cpu", say=lines.append)
    assert resolved.model.dtype == "bfloat16" and len(lines) == 1 and lines[0].startswith("dtype: auto -> bfloat16")
    assert "dtype: bfloat16" in resolved.to_yaml() and "dtype: auto" not in resolved.to_yaml()
    assert resolve_recipe(resolved, "cpu", say=lines.append) is resolved and len(lines) == 1  # concrete: silent
    explicit = tiny_recipe("llama", dtype="float32")
    assert resolve_recipe(explicit, "cpu", say=lines.append) is explicit and len(lines) == 1


def test_the_schema_accepts_auto_and_still_rejects_unknown_dtypes(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name_or_path: x, dtype: auto}\n")
    assert load_recipe(path).model.dtype == "auto"
    with pytest.raises(RecipeError, match="model.dtype"):
        load_recipe(path, ["model.dtype=fp8"])


def test_cpu_recipes_use_auto_and_gpu_recipes_stay_bf16():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "recipes"
    cpu = sorted([*root.glob("demo/*.yaml"), *root.glob("paper/smollm2-135m/*.yaml"), *root.glob("ablations/smollm2-135m/*.yaml")])
    assert len(cpu) == 15
    assert {load_recipe(p).model.dtype for p in cpu} == {"auto"}
    gpu = sorted([*root.glob("paper/mistral-7b/*.yaml"), *root.glob("paper/qwen2-0.5b/*.yaml")])
    assert {load_recipe(p).model.dtype for p in gpu} == {"bfloat16"}


def test_build_model_resolves_auto_once(monkeypatch, tiny_recipe, capsys):
    _cpu(monkeypatch, amx=False, avx512_bf16=False)
    model = build_model(tiny_recipe("llama", dtype="auto"))
    assert model.recipe.model.dtype == "float32"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert capsys.readouterr().err.count("dtype: auto -> float32") == 1


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("pooling,attention", [
    ({"type": "last_token"}, "causal"),
    ({"type": "mean"}, "bidirectional"),
    ({"type": "multi_layer_attention", "layers": "all", "num_latents": 8, "num_heads": 4}, "bidirectional"),
    ({"type": "latent_attention", "num_latents": 8, "num_heads": 4}, "causal"),
])
def test_bf16_encode_equals_float32(tiny_recipe, pooling, attention):
    """The same weights encoded in bf16 (as `auto` does on an AMX CPU) and in float32: cosine >= 0.999."""
    torch.manual_seed(0)
    recipe = tiny_recipe("llama", pooling, attention, layers=4, hidden=64, dtype="float32")
    model32 = build_model(recipe)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    model16.recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, dtype="bfloat16"))
    assert {p.dtype for p in model16.parameters()} == {torch.bfloat16}
    a, b = model32.encode(TEXTS), model16.encode(TEXTS)
    assert b.dtype == np.float32 and np.isfinite(b).all()
    assert _cosines(a, b).min() >= 0.999, _cosines(a, b)


def test_bf16_model_from_a_recipe_encodes_in_bf16(tiny_recipe):
    torch.manual_seed(0)
    model = build_model(tiny_recipe("llama", {"type": "mean"}, lora=True, dtype="bfloat16"))
    seen = []
    hook = model.backbone.register_forward_hook(lambda m, args, out: seen.append(out.last_hidden_state.dtype))
    model.encode(TEXTS[:2])
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}


def test_a_bf16_adapter_export_loads_and_computes_as_it_trained(tiny_recipe, tmp_path):
    """A kept adapter stays in the backbone's dtype on load (peft would upcast it to float32): the
    loaded model encodes exactly as the live bf16 model (studies evaluate their runs this way)."""
    from dsembed.modeling.model import EmbeddingModel

    torch.manual_seed(0)
    model = build_model(tiny_recipe("llama", {"type": "mean"}, lora=True, dtype="bfloat16"))
    for name, param in model.backbone.named_parameters():
        if "lora_B" in name:  # lora_B starts at zero: give the adapter something to compute
            torch.nn.init.normal_(param, std=0.05)
    model.save(tmp_path / "m", merge_lora=False)
    loaded = EmbeddingModel.load(tmp_path / "m")
    adapters = {p.dtype for n, p in loaded.backbone.named_parameters() if "lora_" in n}
    assert adapters == {torch.bfloat16}
    np.testing.assert_array_equal(loaded.encode(TEXTS), model.encode(TEXTS))


def test_recipe_from_dict_auto_round_trips():
    recipe = recipe_from_dict({"model": {"name_or_path": "x", "dtype": "auto"}})
    assert recipe_from_dict(recipe.to_dict()).model.dtype == "auto"


def test_a_resumed_run_keeps_the_dtype_it_trained_in(monkeypatch, tiny_recipe, tmp_path, capsys):
    """run_dtype: `auto` adopts the run directory's recorded dtype; another explicit dtype is refused."""
    from dsembed.training.run_dir import run_dtype

    _cpu(monkeypatch, amx=False, avx512_bf16=False)  # this "machine" would pick float32 for a new run
    out = tmp_path / "run"
    out.mkdir()

    def recipe(dtype):
        r = tiny_recipe("llama", dtype=dtype)
        return dataclasses.replace(r, train=dataclasses.replace(r.train, output_dir=str(out)))

    (out / "recipe.yaml").write_text(recipe("bfloat16").to_yaml())
    resumed = run_dtype(recipe("auto"), "step-2")
    assert resumed.model.dtype == "bfloat16"
    assert f"dtype: auto -> bfloat16 (resuming {out}, which trained in bfloat16)" in capsys.readouterr().err
    assert run_dtype(recipe("bfloat16"), "step-2").model.dtype == "bfloat16"
    with pytest.raises(RecipeError, match="model.dtype = float32 but the run .* trained in bfloat16"):
        run_dtype(recipe("float32"), "step-2")
    fresh = run_dtype(recipe("auto"), None)  # no checkpoint to resume: resolved for this machine
    assert fresh.model.dtype == "float32" and "dtype: auto -> float32" in capsys.readouterr().err


def test_a_study_sees_a_begun_auto_run_as_current(tmp_path, monkeypatch):
    """The run directory records what `auto` resolved to; dsembed-study must not call that stale on
    a machine where auto resolves alike, and must on one where it does not."""
    from pathlib import Path

    from dsembed.modeling import precision
    from dsembed.study.config import load_study
    from dsembed.study.runner import StudyRunner
    from dsembed.study.stages import changes

    tiny = Path(__file__).resolve().parents[2] / "recipes" / "tiny-cpu.yaml"
    (tmp_path / "r.yaml").write_text(tiny.read_text().replace("dtype: float32", "dtype: auto"))
    (tmp_path / "s.yaml").write_text("name: x\noutput_dir: o\nvariants: {a: r.yaml}\ntasks_dir: t\n")
    study, root = load_study(tmp_path / "s.yaml")
    runner = StudyRunner(study, root, tmp_path / "o")
    run_dir = tmp_path / "o" / "runs" / "a"
    run_dir.mkdir(parents=True)
    begun = load_recipe(tmp_path / "r.yaml", ["model.dtype=bfloat16"])
    (run_dir / "recipe.yaml").write_text(begun.to_yaml())  # as the trainer writes it, resolved
    here = {"dtype": "bfloat16"}
    monkeypatch.setattr(precision, "resolve_dtype", lambda requested, device=None: precision.Precision("auto", here["dtype"], "test"))
    entry = runner._stages()["train a"]
    assert entry["partial"] is not None and changes(entry["partial"], entry["fingerprint"]) == []
    here["dtype"] = "float32"  # a CPU without bf16 would resume it in float32: another run
    entry = runner._stages()["train a"]
    assert changes(entry["partial"], entry["fingerprint"]) == ["model.dtype_resolved 'bfloat16' -> 'float32'"]
    (tmp_path / "r.yaml").write_text(tiny.read_text())  # the study now asks for float32 explicitly
    entry = runner._stages()["train a"]
    assert any("model.dtype" in c for c in changes(entry["partial"], entry["fingerprint"]))
