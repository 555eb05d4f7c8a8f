"""dsembed-consolidate end to end: five paper variants (+ one ZeRO-2 run) trained tiny on 2 CPU ranks.

One torchrun launch trains every variant for 2 steps (tests/e2e/train_variants.py); the trainer's
DSEMBED_DUMP_EMBEDDINGS hook embeds a probe list with the LIVE engine (ZeRO-3 partitioned weights)
after the last step. The exports must give the same embeddings through `EmbeddingModel.load` and
`SentenceTransformer(dir, trust_remote_code=True)` (queries with prompt_name="query"), also in a
process where dsembed cannot be imported (tests/no_dsembed.py), mteb must evaluate the folder
directly (and dsembed-evaluate writes the scores into its card), a run whose recipe asks for
flash-attn must export without it, and damaged checkpoints must be refused in one line with exit 2.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "distributed"))
from launch import EXTENSIONS, TINY, check, env  # noqa: E402

INSTRUCTION = "Retrieve the matching record"  # the tiny recipe's data.instructions.default
PROBE = {
    "texts": ["hello world", "The quick brown fox jumps over the lazy dog.", "x",
              "caf\u00e9 na\u00efve \u2014 r\u00e9sum\u00e9", "record 17: a blue bicycle with a basket " * 2],
    "queries": ["where is the fox", "hello", "a bicycle"],
    "instruction": INSTRUCTION,
}
LATENT = "pooling={type: latent_attention, num_latents: 8, num_heads: 4, head_dim: 16}"
VARIANTS = {  # ZeRO-2 first: see train_variants.py
    "model1-zero2": ["pooling={type: last_token}", "attention.mode=causal", "deepspeed.zero_stage=2"],
    "model1": ["pooling={type: last_token}", "attention.mode=causal"],
    "model2": [LATENT, "attention.mode=causal"],
    "model3": ["attention.mode=causal"],  # the tiny recipe's multi_layer_attention head
    "model4": [LATENT],  # bidirectional is the tiny recipe's mode
    "model5": [],
    # bf16 at the paper's lr: each LoRA delta is far below the bf16 resolution of its weight
    "model1-bf16": ["pooling={type: last_token}", "attention.mode=causal", "model.dtype=bfloat16", "optim.lr=1.0e-5"],
    # full fine-tuning in bf16: nothing to merge, the backbone is written (and computes) in bf16 as trained
    "model5-full-bf16": ["model.dtype=bfloat16", "lora.enabled=false", "optim.lr=1.0e-4"],
}
EXPECTED = {"model1-zero2": ("causal", "last_token"), "model1": ("causal", "last_token"),
            "model2": ("causal", "latent_attention"), "model3": ("causal", "multi_layer_attention"),
            "model4": ("bidirectional", "latent_attention"), "model5": ("bidirectional", "multi_layer_attention"),
            "model1-bf16": ("causal", "last_token"), "model5-full-bf16": ("bidirectional", "multi_layer_attention")}
COSINE = 0.99999
# the live bf16 engine computes in bf16, the float32 export does not: they agree up to bf16 arithmetic noise
COSINE_BF16 = 0.9999


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _consolidate(*args: str) -> tuple[int, str, str]:
    """The CLI in-process (deepspeed is imported once for the whole file)."""
    import contextlib
    import io

    from dsembed.errors import run_cli
    from dsembed.cli.consolidate import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(main, list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("variants")
    spec = {"recipe": str(TINY), "runs": []}
    for name, overrides in VARIANTS.items():
        dump = root / name / "dump"
        dump.mkdir(parents=True)
        (dump / "probe.json").write_text(json.dumps(PROBE), encoding="utf-8")
        spec["runs"].append({"overrides": [f"train.output_dir={root / name / 'run'}", "train.max_steps=2",
                                           "train.save_steps=1", "train.save_total_limit=2", *overrides],
                             "dump": str(dump)})
    (root / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "e2e" / "train_variants.py"), str(root / "spec.json")]
    check(subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=400))
    assert EXTENSIONS.is_dir()
    return root


@pytest.fixture(scope="module")
def exported(runs: Path) -> dict[str, Path]:
    out = {}
    for name in VARIANTS:
        code, stdout, stderr = _consolidate(str(runs / name / "run"), str(runs / name / "model"))
        assert code == 0, stderr
        assert "step-2" in stdout and "head parameters:" in stdout and "backbone parameters:" in stdout
        out[name] = runs / name / "model"
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_matches_live_engine_and_sentence_transformers(runs: Path, exported: dict[str, Path], name: str) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    from dsembed import EmbeddingModel

    folder = exported[name]
    attention, pooling = EXPECTED[name]
    live = np.load(runs / name / "dump" / "embeddings.npz")
    model = EmbeddingModel.load(folder)
    docs = model.encode(PROBE["texts"])
    queries = model.encode(PROBE["queries"], instruction=INSTRUCTION)
    cosine = COSINE_BF16 if name.endswith("bf16") else COSINE
    assert _cosines(docs, live["documents"]).min() >= cosine
    assert _cosines(queries, live["queries"]).min() >= cosine
    assert not np.allclose(queries, model.encode(PROBE["queries"]))  # the instruction matters

    st = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    assert st.prompts["query"] == f"Instruct: {INSTRUCTION}\nQuery: " and st.prompts["document"] == ""
    plain = pooling == "last_token"  # sentence-transformers' own modules; trainable heads: dsembed_model.py
    expected = ["Transformer", "Pooling", "Normalize"] if plain else ["PortableEmbedding", "Normalize"]
    assert st.default_prompt_name is None and [type(m).__name__ for m in st] == expected
    st_queries = st.encode(PROBE["queries"], prompt_name="query", batch_size=2)
    st_docs = st.encode(PROBE["texts"], batch_size=2)  # other batching and padding than encode's
    assert _cosines(st_queries, live["queries"]).min() >= cosine
    assert _cosines(st_docs, live["documents"]).min() >= cosine
    np.testing.assert_allclose(np.linalg.norm(st_docs, axis=1), 1.0, atol=1e-5)  # normalised once

    meta = json.loads((folder / "dsembed.json").read_text())
    assert (meta["attention"], meta["pooling"], meta["lora"]) == (attention, pooling, "none" if "full" in name else "merged")
    assert meta["backbone_dtype"] == ("bfloat16" if "full-bf16" in name else "float32")
    assert {p.dtype for p in model.pooler.parameters()} <= {torch.bfloat16 if name.endswith("bf16") else torch.float32}
    card = (folder / "README.md").read_text()
    assert f"| attention | {attention} |" in card and f"| pooling | {pooling} |" in card and "| steps | 2 " in card
    assert "synthetic:512" in card
    # the run's learning curve travels with the model (read by dsembed-evaluate into its results)
    training = json.loads((folder / "training.json").read_text())
    assert training["steps"] == 2 and 0.0 <= training["last_accuracy"] <= 1.0 and training["max_grad_step"] in (1, 2)
    assert not (folder / "adapter").exists() and not list(folder.parent.glob("model.tmp-*"))
    if pooling == "multi_layer_attention":  # W is consolidated from its ZeRO partitions, as the live engine had it
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(runs / name / "run" / "tensorboard"), size_guidance={"scalars": 0})
        acc.Reload()
        rows = model.pooler.layer_weights.detach().float().norm(dim=-1)  # [K] (a bf16 W: its norm in float32, as logged)
        assert len(rows) == 4 and rows.min() > 1.0  # the paper's N(0, 1) init (row norm ~ sqrt(64)), not zeros
        for index, norm in zip(model.pooler.tapped_layers, rows.tolist()):
            logged = acc.Scalars(f"layer_weights/norm/layer_{index}")[-1]
            assert logged.step == 2 and norm == pytest.approx(logged.value, rel=1e-5)


def test_exports_load_without_dsembed(runs: Path, exported: dict[str, Path], tmp_path: Path) -> None:
    """All five designs and the ZeRO-2 run, in ONE process where `import dsembed` fails."""
    from tests.unit.test_portable import run_without_dsembed

    got = run_without_dsembed(exported, tmp_path, PROBE["texts"], PROBE["queries"])
    for name in VARIANTS:
        live = np.load(runs / name / "dump" / "embeddings.npz")
        bound = COSINE_BF16 if name.endswith("bf16") else COSINE
        assert _cosines(got[name]["documents"], live["documents"]).min() >= bound, name
        assert _cosines(got[name]["queries"], live["queries"]).min() >= bound, name
        # a plain AutoModel.from_pretrained of the folder attends as the design says
        assert bool(got[name]["bidirectional"]) == (EXPECTED[name][0] == "bidirectional"), name


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_bf16_run_keeps_its_lora_delta(runs: Path, exported: dict[str, Path]) -> None:
    """A tiny bf16 run at lr 1e-5: merged in bf16 its delta would vanish; the float32 export keeps it."""
    import copy

    import torch

    from dsembed import EmbeddingModel
    from dsembed.export.consolidate import load_from_checkpoint, resolve_checkpoint
    from dsembed.modeling.backbone import unwrap
    from dsembed.modeling.weights import plain_state_dict

    folder = exported["model1-bf16"]
    assert json.loads((folder / "dsembed.json").read_text())["backbone_dtype"] == "float32"
    live_model = load_from_checkpoint(*resolve_checkpoint(runs / "model1-bf16" / "run"))  # bf16, LoRA unmerged
    base = unwrap(live_model.backbone)
    rounded = plain_state_dict(base, merge=True)  # what the export did before: merged in bf16
    unmerged = plain_state_dict(base, merge=False)
    exported_model = EmbeddingModel.load(folder)
    weights = exported_model.backbone.state_dict()
    moved = lost = 0
    for key, weight in weights.items():
        if key.endswith("proj.weight"):
            changed = weight != unmerged[key].float()  # the float32 export kept the delta here
            moved += int(changed.sum())
            lost += int((rounded[key][changed] == unmerged[key][changed]).sum())
    assert moved > 0 and lost / moved > 0.5  # the bf16 merge would drop most of it
    # the export computes the live model's own weights in float32; the live bf16 engine adds bf16 noise
    live32 = copy.deepcopy(live_model).float().encode(PROBE["texts"])
    np.testing.assert_allclose(exported_model.encode(PROBE["texts"]), live32, atol=1e-5)
    live = np.load(runs / "model1-bf16" / "dump" / "embeddings.npz")
    assert _cosines(exported_model.encode(PROBE["texts"]), live["documents"]).min() >= COSINE_BF16
    assert torch.isfinite(torch.from_numpy(live32)).all()


def test_flash_attention_run_exports_on_a_machine_without_flash_attn(runs: Path, tmp_path: Path) -> None:
    """A GPU run's checkpoint (recipe: flash_attention_2) consolidates on CPU with sdpa, one printed line."""
    import importlib.util
    import shutil

    import torch
    import yaml

    from dsembed import EmbeddingModel

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed: nothing to fall back from")
    from dsembed.modeling import backbone

    run = tmp_path / "gpu-run"
    shutil.copytree(runs / "model1" / "run" / "checkpoints" / "step-2", run / "checkpoints" / "step-2")
    (run / "checkpoints" / "latest").write_text("step-2")
    for shard in (run / "checkpoints" / "step-2").glob("*model_states.pt"):  # as the GPU run would have saved it
        state = torch.load(shard, map_location="cpu", weights_only=False)
        recipe = yaml.safe_load(state["recipe"])
        recipe["model"]["attn_implementation"] = "flash_attention_2"
        state["recipe"] = yaml.safe_dump(recipe)
        torch.save(state, shard)
    backbone._FALLBACK_NOTED.clear()
    code, _, err = _consolidate(str(run), str(tmp_path / "out"))
    assert code == 0, err
    assert err.count("flash-attn is not installed") == 1 and "using sdpa" in err
    live = np.load(runs / "model1" / "dump" / "embeddings.npz")
    docs = EmbeddingModel.load(tmp_path / "out").encode(PROBE["texts"])
    assert _cosines(docs, live["documents"]).min() >= COSINE


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_keep_adapter_round_trip(runs: Path, exported: dict[str, Path]) -> None:
    from peft import PeftModel
    from transformers import AutoModel

    from dsembed import EmbeddingModel

    out = runs / "model5" / "adapter-model"
    code, stdout, _ = _consolidate(str(runs / "model5" / "run" / "checkpoints"), str(out), "--keep-adapter", "--step", "2")
    assert code == 0 and "adapter parameters:" in stdout
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "dsembed.json").read_text())["lora"] == "adapter"
    peft = PeftModel.from_pretrained(AutoModel.from_pretrained(out), out / "adapter")
    assert any("lora_A" in n for n, _ in peft.named_parameters())
    live = np.load(runs / "model5" / "dump" / "embeddings.npz")
    kept = EmbeddingModel.load(out)
    assert _cosines(kept.encode(PROBE["texts"]), live["documents"]).min() >= COSINE
    merged = EmbeddingModel.load(exported["model5"])
    np.testing.assert_allclose(kept.encode(PROBE["texts"]), merged.encode(PROBE["texts"]), atol=1e-5)


def test_mteb_evaluates_the_exported_folder(runs: Path, exported: dict[str, Path], tmp_path: Path) -> None:
    import mteb
    from sentence_transformers import SentenceTransformer

    from dsembed import EmbeddingModel
    from dsembed.evaluation.run import evaluate_tasks
    from dsembed.evaluation.tasks import load_local_tasks

    task_dir = tmp_path / "tasks" / "sts" / "TinySTS"
    task_dir.mkdir(parents=True)
    words = ["red", "blue", "green", "bicycle", "car", "fox", "dog", "record", "house", "tree"]
    rng = np.random.default_rng(0)
    rows = [{"sentence1": " ".join(rng.choice(words, 4)), "sentence2": " ".join(rng.choice(words, 4)),
             "score": float(rng.integers(0, 6))} for _ in range(24)]
    (task_dir / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    folder = exported["model5"]

    ours = evaluate_tasks(EmbeddingModel.load(folder), load_local_tasks(tmp_path / "tasks"), model_name="model5",
                          log=lambda s: None)["tasks"]["TinySTS"]
    st = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    outcome = mteb.evaluate(st, load_local_tasks(tmp_path / "tasks"), cache=None, overwrite_strategy="always",
                            co2_tracker=False, show_progress_bar=False, raise_error=True)
    score = outcome.task_results[0].get_score()
    assert np.isfinite(score) and -1.0 <= score <= 1.0
    # the STS type prompt gives mteb the instruction dsembed-evaluate uses: the same score
    assert score == pytest.approx(ours["main_score"], abs=1e-6)

    # dsembed-evaluate on the folder puts the score into its model card (hub model-index + table)
    import contextlib
    import io

    import yaml

    from dsembed.cli.evaluate import main as evaluate_main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert evaluate_main([str(folder), "--tasks-dir", str(tmp_path / "tasks"), "--no-progress",
                              "--output", str(tmp_path / "r.json")]) == 0
    card = (folder / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    entry = meta["model-index"][0]["results"][0]
    assert entry["dataset"]["type"] == "TinySTS" and entry["task"]["type"] == "STS"
    assert entry["metrics"][0] == {"type": "cos_sim_spearman", "value": round(100 * ours["main_score"], 2)}
    assert f"| TinySTS | sts | cosine_spearman | {100 * ours['main_score']:.2f} |" in card
    assert card.count("## Evaluation") == 1 and "trust_remote_code=True" in card  # the portable module's usage

    # a bf16 run's export computes in float32 (its LoRA merge is kept in float32): the results say so
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert evaluate_main([str(exported["model1-bf16"]), "--tasks-dir", str(tmp_path / "tasks"), "--no-progress",
                              "--output", str(tmp_path / "bf16.json")]) == 0
    recorded = json.loads((tmp_path / "bf16.json").read_text())["model"]
    assert (recorded["dtype"], recorded["trained_dtype"]) == ("float32", "bfloat16")
    assert json.loads((tmp_path / "r.json").read_text())["model"]["dtype"] == "float32"


def test_damaged_or_unfinished_checkpoints_are_refused(runs: Path, tmp_path: Path) -> None:
    import shutil

    src = runs / "model1" / "run"
    # no `latest`: a one-line error from the real console entry point, exit 2, no traceback
    bare = tmp_path / "bare"
    shutil.copytree(src / "checkpoints" / "step-2", bare / "checkpoints" / "step-2")
    run = subprocess.run([sys.executable, "-m", "dsembed.cli.consolidate", str(bare), str(tmp_path / "out1")],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1 and "latest" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "out1").exists()

    # a truncated shard
    trunc = tmp_path / "trunc"
    shutil.copytree(src, trunc)
    shard = next((trunc / "checkpoints" / "step-2").glob("zero_pp_rank_1_*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    run = subprocess.run([sys.executable, "-m", "dsembed.cli.consolidate", str(trunc), str(tmp_path / "out2")],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "truncated" in run.stderr and run.stderr.count("\n") == 1, run.stderr
    assert not (tmp_path / "out2").exists() and not list(tmp_path.glob("out2.tmp-*"))

    # a missing shard, an unfinished tmp-* save, a missing step, an occupied OUT_DIR
    shard.unlink()
    code, _, err = _consolidate(str(trunc), str(tmp_path / "out3"))
    assert code == 2 and "1 of 2 optimizer-state shards" in err and not (tmp_path / "out3").exists()
    tmp_save = tmp_path / "ck" / "tmp-step-3"
    tmp_save.mkdir(parents=True)
    code, _, err = _consolidate(str(tmp_save), str(tmp_path / "out4"))
    assert code == 2 and "unfinished" in err
    code, _, err = _consolidate(str(src), str(tmp_path / "out5"), "--step", "7")
    assert code == 2 and "step-7" in err and "available steps: [2, 1]" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    code, _, err = _consolidate(str(src), str(busy))
    assert code == 2 and "--overwrite" in err and (busy / "keep.txt").read_text() == "mine"
    code, _, err = _consolidate(str(src), str(busy), "--overwrite", "--step", "1")
    assert code == 0, err
    assert (busy / "dsembed.json").is_file() and not (busy / "keep.txt").exists()


def test_prompts_for_a_template_with_text_after_the_query(tiny_recipe) -> None:
    import dataclasses

    import torch

    from dsembed.export.consolidate import sentence_transformers_prompts
    from dsembed.modeling import build_model
    from dsembed.export.st_module import DsembedEmbedding

    recipe = tiny_recipe(pooling={"type": "mean"})
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(
        recipe.data, query_template="Query: {query}\nTask: {instruction}", instructions={"default": "find it"}))
    prompts, suffixes = sentence_transformers_prompts(recipe)
    assert prompts["query"] == "Query: " and suffixes == {"Query: ": "\nTask: find it"}
    assert prompts["document"] == "" and prompts["STS-document"] == ""
    model = build_model(recipe)
    module = DsembedEmbedding(model, suffixes)
    got = module.preprocess(["abc", "de"], prompt=prompts["query"])
    want = model.tokenize([model.format_query(t, "find it") for t in ("abc", "de")])
    assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["attention_mask"], want["attention_mask"])
    # the portable module (used for such templates even with a mean head) appends the suffix too
    from dsembed.export.portable import PortableEmbedding
    from dsembed.export.st_files import head_config

    m = recipe.model
    portable = PortableEmbedding(model.backbone, model.tokenizer, model.pooler, head_config(model), m.max_length,
                                 m.padding_side, m.append_eos, suffixes)
    got = portable.preprocess(["abc", "de"], prompt=prompts["query"])
    assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["attention_mask"], want["attention_mask"])
