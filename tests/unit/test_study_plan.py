"""Seeds, Holm families and the power part of `dsembed-study --plan` (no training)."""
from __future__ import annotations

import re

import pytest

from dsembed.errors import RecipeError
from dsembed.evaluation.statistics import power_table, smallest_wilcoxon_p
from dsembed.study.config import holm_family, load_study, training_runs
from dsembed.study.runner import StudyRunner

from tests.unit.test_study_files import write

BASE = "name: x\noutput_dir: o\nvariants: {a: r.yaml, b: r.yaml}\ntasks_dir: t\n"
# a random two-layer model with a byte tokenizer: --plan times it in seconds
RANDOM_TINY = ("model:\n  random_init: {model_type: llama, num_hidden_layers: 2, hidden_size: 32, "
               "intermediate_size: 64, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 300}\n"
               "  tokenizer: bytes\n  max_length: 32\ndata:\n  train: ['synthetic:16']\n"
               "train:\n  micro_batch_size: 4\n  max_steps: 10\n")


def test_seeds_give_one_run_per_variant_and_seed_and_one_base(tmp_path):
    study, root = load_study(write(tmp_path, BASE + "seeds: [0, 7]\n"))
    runs = training_runs(study)
    assert [(r.variant, r.seed, r.key) for r in runs] == [("a", 0, "a-s0"), ("a", 7, "a-s7"), ("b", 0, "b-s0"), ("b", 7, "b-s7")]
    stages = StudyRunner(study, root, tmp_path / "out")._stages()
    assert [s for s in stages if s.startswith("train")] == ["train a-s0", "train a-s7", "train b-s0", "train b-s7"]
    assert [s for s in stages if s.startswith("evaluate")] == ["evaluate a-s0", "evaluate a-s7", "evaluate b-s0",
                                                                 "evaluate b-s7", "evaluate base"]
    seeds = {label: stages[label]["fingerprint"]["recipe"]["train.seed"] for label in stages if label.startswith("train")}
    assert seeds == {"train a-s0": 0, "train a-s7": 7, "train b-s0": 0, "train b-s7": 7}
    assert stages["evaluate a-s7"]["output"] == tmp_path / "out" / "results" / "a-s7.json"


def test_without_seeds_the_stages_keep_their_names(tmp_path):
    study, root = load_study(write(tmp_path, BASE))
    assert [r.key for r in training_runs(study)] == ["a", "b"] and training_runs(study)[0].seed is None
    assert "train a" in StudyRunner(study, root, tmp_path / "out")._stages()


def test_evaluate_command_names_the_variant_and_writes_the_seed_file(tmp_path):
    study, root = load_study(write(tmp_path, BASE + "seeds: [3]\n"))
    command = StudyRunner(study, root, tmp_path / "out")._evaluate_command(["m"], "a", ["--tasks-dir", "T"],
                                                                           results_name="a-s3")
    assert command[command.index("--name") + 1] == "a"  # compare groups a variant's seeds by name
    assert command[command.index("--output") + 1].endswith("a-s3.json")


@pytest.mark.parametrize("text, message", [
    ("seeds: []\n", "seeds = [] should list distinct seeds"),
    ("seeds: [1, 1]\n", "seeds = [1, 1] should list distinct seeds"),
    ("holm: some\n", "holm = 'some' should be"),
])
def test_bad_seeds_and_holm(tmp_path, text, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_study(write(tmp_path, BASE + text))


@pytest.mark.parametrize("value, family", [("true", "all"), ("false", "none"), ("all", "all"),
                                           ("per_variant", "per_variant"), ("none", "none")])
def test_holm_family(tmp_path, value, family):
    study, _ = load_study(write(tmp_path, BASE + f"holm: {value}\n"))
    assert holm_family(study) == family


def test_smallest_wilcoxon_p_is_what_scipy_gives_when_every_sign_agrees():
    from scipy.stats import wilcoxon

    for n in (3, 6, 7, 8):
        differences = [0.01 * (i + 1) for i in range(n)]
        assert smallest_wilcoxon_p(n) == pytest.approx(wilcoxon(differences).pvalue)


def test_power_table_best_case_holm():
    counts = {"sts": 7, "retrieval": 8, "classification": 7, "clustering": 8}
    per_variant = {r["category"]: r for r in power_table(counts, "per_variant", n_tested=4)}
    assert per_variant["sts"]["min_p"] == pytest.approx(2 / 2 ** 7)
    # step-down: with retrieval and clustering at 1/128, STS at 1/64 passes 2 x 1/64 < 0.05
    assert all(r["reachable"] for r in per_variant.values())
    every = power_table(counts, "all", n_tested=4)  # 16 tests: 16 / 128 = 0.125 at best
    assert not any(r["reachable"] for r in every) and every[0]["family_size"] == 16
    small = {r["category"]: r for r in power_table({"sts": 6, "retrieval": 3}, "none", n_tested=5)}
    assert small["sts"]["reachable"] and not small["retrieval"]["reachable"]  # n = 3: p >= 0.25


def test_plan_times_each_recipe_and_prints_stages_power_and_chance_without_running_anything(tmp_path, task_root, capsys):
    from dsembed.cli.study import main

    path = write(tmp_path, f"name: x\noutput_dir: {tmp_path / 'out'}\nvariants: {{a: r.yaml}}\n"
                           f"tasks_dir: {task_root}\nseeds: [0, 1]\nholm: per_variant\n")
    (tmp_path / "r.yaml").write_text(RANDOM_TINY)
    assert main([str(path), "--plan"]) == 0
    out = capsys.readouterr().out
    for stage in ("train a-s0", "train a-s1", "export a-s1", "evaluate a-s0", "evaluate base"):
        assert re.search(rf"^  {stage} +\d", out, re.M), stage
    assert "Power: Wilcoxon" in out and "n = 1" in out and "CANNOT reach p < 0.05" in out
    assert "TinyClustering" in out and "carry no information" in out  # the chance plan of every task
    assert not (tmp_path / "out").exists()  # nothing trained, evaluated or written


@pytest.mark.parametrize("merged, dtypes", [(True, ["bfloat16"] * 2 + ["float32"] * 2), (False, ["bfloat16"] * 2)])
def test_plan_times_a_merged_bf16_lora_evaluation_in_float32(tiny_recipe, monkeypatch, merged, dtypes):
    """`lora_export: merged` evaluates a bf16 LoRA run's float32 merge: the plan times that encode in
    float32 (the untrained base keeps the recipe's bf16 rate); with adapter exports, bf16 throughout."""
    import dataclasses

    import torch

    from dsembed.modeling.model import EmbeddingModel
    from dsembed.study.plan import time_recipe

    seen: list[str] = []
    encode = EmbeddingModel.encode

    def spy(self, *args, **kwargs):
        seen.append(str(next(self.parameters()).dtype).removeprefix("torch."))
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(EmbeddingModel, "encode", spy)
    torch.manual_seed(0)
    recipe = tiny_recipe("llama", {"type": "mean"}, lora=True, dtype="bfloat16")
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, train=["synthetic:8"]),
                                 train=dataclasses.replace(recipe.train, micro_batch_size=4))
    timing = time_recipe(recipe, ["a text", "another"], merged=merged)
    assert seen == dtypes
    assert (timing.exported_tokens_per_s == timing.tokens_per_s) is not merged


@pytest.mark.parametrize("lora_export", ["merged", "adapter"])
def test_plan_estimates_trained_evaluations_at_the_exported_rate_and_the_base_at_the_recipe_rate(
        tmp_path, task_root, monkeypatch, lora_export):
    from dsembed.study import plan as plan_module

    asked: list[bool] = []

    def fake_timing(recipe, texts, repeats=2, merged=False):
        asked.append(merged)
        return plan_module.Timing(build_s=1.0, step_s=1.0, tokens_per_s=100.0, exported_tokens_per_s=50.0)

    monkeypatch.setattr(plan_module, "time_recipe", fake_timing)
    path = write(tmp_path, f"name: x\noutput_dir: {tmp_path / 'out'}\nvariants: {{a: r.yaml}}\n"
                           f"tasks_dir: {task_root}\nlora_export: {lora_export}\n")
    (tmp_path / "r.yaml").write_text(RANDOM_TINY)
    study, root = load_study(path)
    result = plan_module.plan(study, root, log=lambda line: None)
    assert asked == [lora_export == "merged"]
    estimate = {row["stage"]: row["estimate_s"] for row in result["stages"]}
    tokens = sum(task["tokens"] for task in result["tasks"].values())
    assert tokens > 0
    assert estimate["evaluate a"] == pytest.approx(1.0 + tokens / 50.0)  # the fake's exported rate
    assert estimate["evaluate base"] == pytest.approx(1.0 + tokens / 100.0)  # untrained: the recipe's rate


@pytest.mark.parametrize("device, step_factor, eval_ranks", [("cpu", 2, 1), ("cuda", 1, 2)])
def test_plan_scales_by_ranks_as_the_device_runs_them_and_lists_the_comparisons(
        tmp_path, task_root, monkeypatch, device, step_factor, eval_ranks):
    """nproc 2: GPU ranks each step their own micro-batch and split the evaluation; CPU ranks share
    the cores (a step takes twice as long, the evaluation as long). compare stages are listed."""
    from dsembed.study import plan as plan_module

    monkeypatch.setattr(plan_module, "time_recipe", lambda recipe, texts, repeats=2, merged=False: plan_module.Timing(
        build_s=1.0, step_s=1.0, tokens_per_s=100.0, exported_tokens_per_s=100.0, device=device))
    path = write(tmp_path, f"name: x\noutput_dir: {tmp_path / 'out'}\nvariants: {{a: r.yaml, b: r.yaml}}\n"
                           f"tasks_dir: {task_root}\nlauncher: torchrun\nnproc: 2\ncontrasts: {{b-vs-a: [b, a]}}\n")
    (tmp_path / "r.yaml").write_text(RANDOM_TINY)
    study, root = load_study(path)
    result = plan_module.plan(study, root, log=lambda line: None)
    estimate = {row["stage"]: row["estimate_s"] for row in result["stages"]}
    tokens = sum(task["tokens"] for task in result["tasks"].values())
    assert estimate["train a"] == pytest.approx(1.0 + 10 * step_factor)  # max_steps 10 of RANDOM_TINY
    assert estimate["evaluate b"] == pytest.approx(1.0 + tokens / 100.0 / eval_ranks)
    assert estimate["compare"] is None and estimate["compare b-vs-a"] is None
    assert result["total_s"] == pytest.approx(sum(v for v in estimate.values() if v is not None))
