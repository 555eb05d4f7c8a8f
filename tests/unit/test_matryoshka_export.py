"""Matryoshka sizes after training: the export records them, sentence-transformers' truncate_dim loads
one, and `dsembed-evaluate --truncate-dim D` scores it (as its own model: name, fingerprint, resume)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dsembed.errors import run_cli
from dsembed.evaluation.encoder import TruncatedModel

DIMS = [8, 16, 32]
TEXTS = ["the cat sat on the mat", "a dog", "stock markets fell sharply today", "x"]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    from dsembed.export.st_files import write_sentence_transformers_files
    from dsembed.modeling.model import build_model
    from tests.conftest import make_tiny_recipe

    recipe = make_tiny_recipe(pooling={"type": "mean"}, attention="causal", lora=False)  # hidden size 32
    recipe = dataclasses.replace(recipe, loss=dataclasses.replace(recipe.loss, matryoshka_dims=DIMS))
    torch.manual_seed(0)
    model = build_model(recipe).eval()
    folder = tmp_path_factory.mktemp("matryoshka") / "model"
    model.save(folder)
    assert write_sentence_transformers_files(folder, model) == "plain"
    return folder


def test_export_records_the_sizes_and_truncate_dim_loads_one(exported):
    from sentence_transformers import SentenceTransformer

    from dsembed.export.model_card import usage
    from dsembed.modeling.model import EmbeddingModel

    assert json.loads((exported / "dsembed.json").read_text())["matryoshka_dims"] == DIMS
    loaded = EmbeddingModel.load(exported)
    assert "truncate_dim=8" in usage("m", "plain", {"query": ""}, loaded.recipe)
    st = SentenceTransformer(str(exported), truncate_dim=8)
    got = st.encode(TEXTS)  # [N, 8]: sentence-transformers truncates after its Normalize, without re-normalising
    want = TruncatedModel(loaded, 8).encode(TEXTS)
    assert got.shape == want.shape == (4, 8)
    assert np.allclose(np.linalg.norm(want, axis=1), 1.0, atol=1e-6)
    assert _cos(got, want).min() >= 0.99999
    assert _cos(loaded.encode(TEXTS)[:, :8], want).min() >= 0.99999  # the first 8 coordinates, re-normalised


def _evaluate(model: Path, tasks: Path, output: Path, *extra: str) -> int:
    from dsembed.cli.evaluate import main

    return run_cli(main, [str(model), "--tasks-dir", str(tasks), "--tasks", "TinySTS", "TinyRetrieval",
                          "--output", str(output), "--no-progress", "--batch-size", "8", *extra])


def test_evaluate_truncate_dim_scores_a_size_as_its_own_model(exported, task_root, tmp_path, capsys):
    full, small = tmp_path / "full.json", tmp_path / "small.json"
    assert _evaluate(exported, task_root, full) == 0
    assert _evaluate(exported, task_root, small, "--truncate-dim", "8") == 0
    a, b = json.loads(full.read_text()), json.loads(small.read_text())
    assert (a["settings"]["truncate_dim"], b["settings"]["truncate_dim"]) == (None, 8)
    assert b["model"]["name"] == "model-d8" and b["model"]["fingerprint"].endswith(":truncate_dim=8")
    assert a["tasks"]["TinySTS"]["main_score"] != b["tasks"]["TinySTS"]["main_score"]
    # the results of one size are never taken for another: the full-size store in small's place is recomputed
    (tmp_path / "small.tasks").rename(tmp_path / "old.tasks")
    (tmp_path / "full.tasks").rename(tmp_path / "small.tasks")
    capsys.readouterr()
    assert _evaluate(exported, task_root, small, "--truncate-dim", "8") == 0
    assert "made for other weights or settings" in capsys.readouterr().err
    assert json.loads(small.read_text())["tasks"]["TinySTS"]["main_score"] == b["tasks"]["TinySTS"]["main_score"]
    assert _evaluate(exported, task_root, tmp_path / "bad.json", "--truncate-dim", "64") == 2
    assert "--truncate-dim 64" in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()


def test_several_sizes_in_one_run_embed_each_text_once_and_score_as_separate_runs(exported, task_root, tmp_path,
                                                                                    monkeypatch, capsys):
    from dsembed.modeling.model import EmbeddingModel

    embedded: list[int] = []
    encode = EmbeddingModel.encode

    def counting(self, texts, *args, **kwargs):
        embedded.append(len(texts))
        return encode(self, texts, *args, **kwargs)

    monkeypatch.setattr(EmbeddingModel, "encode", counting)
    assert _evaluate(exported, task_root, tmp_path / "both-d{dim}.json", "--truncate-dim", "8", "16") == 0
    together = sum(embedded)
    embedded.clear()
    for size in (8, 16):
        assert _evaluate(exported, task_root, tmp_path / f"alone-d{size}.json", "--truncate-dim", str(size)) == 0
    assert together > 0 and 2 * together == sum(embedded)  # each text embedded once for both sizes
    for size in (8, 16):
        both, alone = (json.loads((tmp_path / f"{run}-d{size}.json").read_text()) for run in ("both", "alone"))
        assert both["model"]["name"] == f"model-d{size}" and both["settings"]["truncate_dim"] == size
        assert both["model"]["fingerprint"] == alone["model"]["fingerprint"]
        for task in ("TinySTS", "TinyRetrieval"):
            assert both["tasks"][task]["main_score"] == alone["tasks"][task]["main_score"]
    capsys.readouterr()
    assert _evaluate(exported, task_root, tmp_path / "one.json", "--truncate-dim", "8", "16") == 2
    assert "put {dim} in --output" in capsys.readouterr().err
    assert _evaluate(exported, task_root, tmp_path / "bad-d{dim}.json", "--truncate-dim", "8", "64") == 2
    assert "--truncate-dim 64" in capsys.readouterr().err
    assert not list(tmp_path.glob("bad-*"))  # every size is checked before the first is scored


def test_evaluate_carries_the_training_summary_of_an_exported_model(exported, task_root, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(exported, model)
    summary = {"steps": 40, "window": 10, "first_accuracy": 0.2, "last_accuracy": 0.3, "last_loss": 2.1,
               "last_cosine_gap": 0.02, "max_grad_norm": 29.3, "max_grad_step": 6}
    (model / "training.json").write_text(json.dumps(summary))
    assert _evaluate(model, task_root, tmp_path / "r.json") == 0
    assert json.loads((tmp_path / "r.json").read_text())["model"]["training"] == summary
    assert _evaluate(exported, task_root, tmp_path / "plain.json") == 0  # a model without one: no key
    assert "training" not in json.loads((tmp_path / "plain.json").read_text())["model"]
