"""Stage fingerprints (what a finished study stage was made from) and multi-node study launch settings."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsembed.config import load_recipe
from dsembed.errors import RecipeError
from dsembed.study.config import load_study
from dsembed.study.runner import _train_command
from dsembed.study.stages import StageLedger, changes, model_identity, recipe_fingerprint

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "tiny-cpu.yaml"


def test_recipe_fingerprint_sees_model_keys_and_ignores_logging_and_resume_keys():
    base = recipe_fingerprint(load_recipe(TINY))
    same = recipe_fingerprint(load_recipe(TINY, ["logging.progress_bar=false", "train.stop_after=3",
                                                 "train.output_dir=/elsewhere", "train.resume=never"]))
    assert same == base
    changed = recipe_fingerprint(load_recipe(TINY, ["optim.lr=1e-3", "pooling.layers=top-2"]))
    assert changes(base, changed) == ["optim.lr 0.002 -> 0.001", "pooling.layers 'all' -> 'top-2'"]


def test_auto_dtype_is_fingerprinted_as_what_it_resolves_to_here(monkeypatch):
    """A study reused on a CPU without bf16 trains in float32: not the runs a bf16 machine recorded."""
    from dsembed.modeling import precision

    def machine(dtype):
        monkeypatch.setattr(precision, "resolve_dtype", lambda requested, device=None: precision.Precision("auto", dtype, "test"))
        return recipe_fingerprint(load_recipe(TINY, ["model.dtype=auto"]))

    bf16, fp32 = machine("bfloat16"), machine("float32")
    assert bf16["recipe"]["model.dtype_resolved"] == "bfloat16"
    assert changes(bf16, fp32) == ["model.dtype_resolved 'bfloat16' -> 'float32'"]
    before_the_key = {**bf16, "recipe": {k: v for k, v in bf16["recipe"].items() if k != "model.dtype_resolved"}}
    assert changes(before_the_key, fp32) == []  # an older ledger cannot say: not a change
    assert "model.dtype_resolved" not in recipe_fingerprint(load_recipe(TINY, ["model.dtype=float32"]))["recipe"]


def test_local_input_model_identity_follows_its_files(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"x" * 10)
    recipe = load_recipe(TINY, ["model.random_init=null", f"model.name_or_path={model}"])
    before = model_identity(recipe)
    assert before is not None and before == model_identity(recipe)
    (model / "model.safetensors").write_bytes(b"y" * 11)  # a replaced checkpoint
    after = model_identity(recipe)
    assert after != before
    old, new = recipe_fingerprint(recipe), recipe_fingerprint(recipe)
    old["model"] = before
    assert changes(old, new) == ["the input model"]
    assert model_identity(load_recipe(TINY)) is None  # random_init: the recipe is the whole identity


def test_ledger_names_what_changed_and_survives_a_reload(tmp_path):
    ledger = StageLedger(tmp_path)
    fingerprint = recipe_fingerprint(load_recipe(TINY))
    assert ledger.stale("train a", fingerprint) is None  # nothing recorded yet: taken as current
    ledger.record("train a", fingerprint)
    again = StageLedger(tmp_path)
    assert again.stale("train a", fingerprint) is None
    assert again.stale("train a", recipe_fingerprint(load_recipe(TINY, ["loss.temperature=0.1"]))) == \
        ["loss.temperature 0.05 -> 0.1"]
    newer = {**fingerprint, "recipe": {**fingerprint["recipe"], "pooling.new_option": 1}}
    assert again.stale("train a", newer) is None  # a key a dsembed upgrade added is not a change
    assert again.stale("evaluate a", {"train": fingerprint}) is None
    again.record("evaluate a", {"train": fingerprint})
    retrained = {"train": recipe_fingerprint(load_recipe(TINY, ["loss.temperature=0.1"]))}
    assert again.stale("evaluate a", retrained) == ["its training stage changed"]
    again.forget("evaluate a")
    assert "evaluate a" not in StageLedger(tmp_path).entries


def _study(tmp_path, text):
    (tmp_path / "r.yaml").write_text(TINY.read_text())
    path = tmp_path / "s.yaml"
    path.write_text("name: x\noutput_dir: o\nvariants: {a: r.yaml}\ntasks_dir: t\n" + text)
    return path


def test_multi_node_deepspeed_command_takes_hostfile_and_nodes(tmp_path):
    (tmp_path / "hosts").write_text("node1 slots=8\nnode2 slots=8\n")
    study, root = load_study(_study(tmp_path, "launcher: deepspeed\nnproc: 8\nnnodes: 2\nhostfile: hosts\n"
                                              "launcher_args: [--master_port, '29600']\n"
                                              "overrides: [train.global_batch_size=128]\n"))
    command = _train_command(study, root / "r.yaml", ["x=1"], root)
    assert command[:10] == ["deepspeed", "--hostfile", str(root / "hosts"), "--num_nodes", "2", "--num_gpus", "8",
                            "--master_port", "29600", "--no_local_rank"]
    # the batch arithmetic is checked for all 16 ranks: 8 x 1 x 16 = 128
    with pytest.raises(RecipeError, match=re.escape("8 x 1 x 8 = 64")):
        load_study(_study(tmp_path, "launcher: deepspeed\nnproc: 8\noverrides: [train.global_batch_size=128]\n"))
    # the command line wins over the study file
    study, _ = load_study(_study(tmp_path, "launcher: deepspeed\nnproc: 8\n"),
                          {"nnodes": 2, "hostfile": str(tmp_path / "hosts"), "launcher_args": []})
    assert study.nnodes == 2 and study.hostfile == str(tmp_path / "hosts")


@pytest.mark.parametrize("text, message", [
    ("launcher: torchrun\nnproc: 2\nnnodes: 2\n", "needs launcher: deepspeed"),
    ("launcher: deepspeed\nnnodes: 2\n", "needs a hostfile"),
    ("launcher: deepspeed\nhostfile: missing-hosts\n", "hostfile missing-hosts not found"),
    ("launcher: torchrun\nnproc: 2\nhostfile: hosts\n", "read by launcher: deepspeed only"),
    ("nnodes: 0\n", "nnodes = 0 must be at least 1"),
    ("overrides: ['data.train=[no-such.jsonl]']\n", "no-such.jsonl: data file not found"),
])
def test_bad_launch_settings_are_one_line_errors(tmp_path, text, message):
    (tmp_path / "hosts").write_text("node1 slots=2\n")
    with pytest.raises(Exception, match=re.escape(message)):
        load_study(_study(tmp_path, text))


def test_study_cli_hostfile_and_nodes_flags(tmp_path):
    path = _study(tmp_path, "launcher: torchrun\nnproc: 2\n")
    result = subprocess.run([sys.executable, "-m", "tools.study", str(path), "--nnodes", "2"], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "nnodes = 2 needs launcher: deepspeed" in result.stderr and str(path) in result.stderr


def _fake_stages(monkeypatch, commands: dict[str, list[str]]) -> None:
    """Replace StudyRunner._run: record each stage's command (by stage label) and leave the files the
    runner recognises a finished stage by."""
    from dsembed.study.runner import StudyRunner

    def fake_run(self, label, command, key=None):
        commands[key or label] = command
        name = key.split()[1] if key else ""
        if key and key.startswith("train "):
            (self.out / "runs" / name).mkdir(parents=True)
        if key and key.startswith("export "):
            (self.out / "models" / name).mkdir(parents=True)
            (self.out / "models" / name / "dsembed.json").write_text("{}")
        if key and key.startswith("evaluate "):
            (self.out / "results").mkdir(exist_ok=True)
            (self.out / "results" / f"{name}.json").write_text("{}")

    monkeypatch.setattr(StudyRunner, "_run", fake_run)


def test_a_run_evaluated_already_is_not_retrained_unless_its_model_is_asked_for(tmp_path, monkeypatch):
    """A new machine reusing saved evaluations must not spend minutes retraining models no stage
    needs; --model RUN still trains one (for mining with it, say)."""
    from dsembed.errors import UserError
    from dsembed.study.runner import StudyRunner
    from dsembed.study.stages import StageLedger

    study, root = load_study(_study(tmp_path, "variants: {a: r.yaml, b: r.yaml}\ninclude_base: false\n"))
    commands: dict[str, list[str]] = {}
    _fake_stages(monkeypatch, commands)
    runner = StudyRunner(study, root, tmp_path / "out")
    stages = runner._stages()
    (runner.out / "results").mkdir(parents=True)
    (runner.out / "results" / "a.json").write_text("{}")  # a's evaluation came from --reuse
    StageLedger(runner.out).record("evaluate a", stages["evaluate a"]["fingerprint"])
    assert runner.not_needed(stages) == {"train a", "export a"}
    runner.run()
    assert list(commands) == ["train b", "export b", "evaluate b", "compare"]
    assert not (runner.out / "runs" / "a").exists()

    commands.clear()
    shutil.rmtree(runner.out / "runs" / "b")
    shutil.rmtree(runner.out / "models" / "b")
    StudyRunner(study, root, tmp_path / "out", models=["a"]).run()
    assert list(commands) == ["train a", "export a", "compare"]  # b: evaluated, model not asked for
    with pytest.raises(UserError, match="--model c is not a run of the study; name one of: a, b"):
        StudyRunner(study, root, tmp_path / "out", models=["c"])


def test_stage_runs_only_the_named_stages_and_checks_their_inputs(tmp_path, monkeypatch):
    """--stage 'evaluate base' (on another machine, or at the end of a session) runs that stage and
    nothing else; a stage whose input has not run is refused in one line; two runs on one folder
    keep each other's ledger entries."""
    from dsembed.errors import UserError
    from dsembed.study.runner import StudyRunner
    from dsembed.study.stages import StageLedger

    study, root = load_study(_study(tmp_path, "variants: {a: r.yaml, b: r.yaml}\n"))
    ran: list[str] = []

    def fake_run(self, label, command, key=None):
        ran.append(key or label)
        (self.out / "results" / "base.json").write_text("{}")

    monkeypatch.setattr(StudyRunner, "_run", fake_run)
    out = tmp_path / "out"
    StudyRunner(study, root, out, only=["evaluate base"]).run()
    assert ran == ["evaluate base"] and not (out / "runs" / "a").exists() and not (out / "report").exists()
    assert "evaluate base" in StageLedger(out).entries
    with pytest.raises(UserError, match="--stage 'evaluate b' needs 'export b', which has not run here; add --stage 'export b'"):
        StudyRunner(study, root, out, only=["evaluate b"]).run()
    with pytest.raises(UserError, match="--stage 'evaluate c' is not a stage of the study"):
        StudyRunner(study, root, out, only=["evaluate c"]).run()
    assert ran == ["evaluate base"]  # the refused runs ran nothing

    first, second = StageLedger(out), StageLedger(out)  # e.g. the main run and a --stage run beside it
    second.record("evaluate a", {"x": 1})
    first.record("train b", {"y": 2})
    assert {"evaluate base", "evaluate a", "train b"} <= set(StageLedger(out).entries)


def test_a_new_learning_rate_retrains_the_variants_but_keeps_the_base(tmp_path):
    """The untrained base is evaluated the same whatever the training settings say: a new lr or
    data mix must not cost a base re-evaluation; its model, pooling or attention must."""
    from dsembed.study.runner import StudyRunner
    from dsembed.study.stages import base_fingerprint

    def stages(extra: str) -> dict:
        study, root = load_study(_study(tmp_path, f"variants: {{a: r.yaml}}\ninclude_base: true\n{extra}"))
        return StudyRunner(study, root, tmp_path / "out")._stages()

    before = stages("")
    ledger = StageLedger(tmp_path / "ledger")
    for label in ("train a-s0" if "train a-s0" in before else "train a", "evaluate base"):
        ledger.record(label, before[label]["fingerprint"])
    train = next(label for label in before if label.startswith("train "))
    after = stages("overrides: [optim.lr=1.0e-5, train.max_steps=7, loss.temperature=0.1]\n")
    assert ledger.stale(train, after[train]["fingerprint"])  # the variant is retrained
    assert ledger.stale("evaluate base", after["evaluate base"]["fingerprint"]) is None
    other = stages("overrides: [attention.mode=causal]\n")
    assert ledger.stale("evaluate base", other["evaluate base"]["fingerprint"]) == ["attention.mode 'bidirectional' -> 'causal'"]
    # a ledger written before base fingerprints left out the training keys stays current
    old = StageLedger(tmp_path / "old")
    old.record("evaluate base", {**before["evaluate base"]["fingerprint"],
                                 "base": recipe_fingerprint(load_recipe(tmp_path / "r.yaml"))})
    assert set(old.entries["evaluate base"]["base"]["recipe"]) > set(base_fingerprint(load_recipe(tmp_path / "r.yaml"))["recipe"])
    assert old.stale("evaluate base", after["evaluate base"]["fingerprint"]) is None


def test_lora_export_adapter_keeps_the_adapter_and_makes_older_merged_exports_stale(tmp_path, monkeypatch):
    """`lora_export: adapter` evaluates a LoRA run as it trained (a bf16 backbone stays bf16): the
    export keeps the adapter, and the export form is in the export and evaluation fingerprints, so an
    export merged earlier is stale (exported and evaluated again); merged (the default) and runs
    without LoRA keep the fingerprints older ledgers recorded."""
    from dsembed.study.runner import StudyRunner

    commands: dict[str, list[str]] = {}
    _fake_stages(monkeypatch, commands)
    study, root = load_study(_study(tmp_path, "include_base: false\nlora_export: adapter\n"))
    runner = StudyRunner(study, root, tmp_path / "out")
    stages = runner._stages()
    assert stages["export a"]["fingerprint"]["export"] == {"lora": "adapter"}
    assert stages["evaluate a"]["fingerprint"]["export"] == {"lora": "adapter"}
    runner.run()
    assert commands["export a"][-1] == "--keep-adapter"

    ledger = StageLedger(runner.out)  # as a merged export recorded them: no export key
    for label in ("export a", "evaluate a"):
        ledger.record(label, {k: v for k, v in stages[label]["fingerprint"].items() if k != "export"})
    for label in ("export a", "evaluate a"):
        assert StageLedger(runner.out).stale(label, stages[label]["fingerprint"]) == ["the export settings"]
        ledger.record(label, stages[label]["fingerprint"])  # and back: an adapter export is stale for a merge
        merged = {k: v for k, v in stages[label]["fingerprint"].items() if k != "export"}
        assert StageLedger(runner.out).stale(label, merged) == ["the export settings"]

    for n, text in enumerate(["", "lora_export: adapter\noverrides: [lora.enabled=false]\n"]):
        other, _ = load_study(_study(tmp_path, "include_base: false\n" + text))
        merged = StudyRunner(other, root, tmp_path / f"other{n}")
        assert "export" not in merged._stages()["export a"]["fingerprint"]
        merged.run()
        assert "--keep-adapter" not in commands["export a"]
    with pytest.raises(RecipeError, match="lora_export"):
        load_study(_study(tmp_path, "lora_export: kept\n"))
