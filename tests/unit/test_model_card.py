"""dsembed-evaluate's scores go into an exported model's card: hub model-index metadata + a table, merged
over evaluations; folders without a dsembed card are left alone."""
from __future__ import annotations

import json

import yaml

from dsembed.export.model_card import EVAL_RESULTS_FILE, add_results


def _results(**tasks):
    return {"mteb_version": "2.x", "tasks": {name: {"category": cat, "type": typ, "main_metric": metric,
                                                    "main_score": score, "split": "test"}
                                             for name, (cat, typ, metric, score) in tasks.items()}}


def test_scores_merge_into_model_index_and_one_table(tmp_path):
    folder = tmp_path / "model5"
    folder.mkdir()
    (folder / "dsembed.json").write_text("{}")
    (folder / "README.md").write_text("---\nlibrary_name: sentence-transformers\n---\n# model5\n\nUsage text.\n")
    add_results(folder, _results(LeeNews=("sts", "STS", "cosine_spearman", 0.5727)))
    add_results(folder, _results(ChatterbotQA=("retrieval", "Retrieval", "ndcg_at_10", 0.2083),
                                 LeeNews=("sts", "STS", "cosine_spearman", 0.6)))  # a re-run replaces
    card = (folder / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "sentence-transformers"
    results = {r["dataset"]["type"]: r for r in meta["model-index"][0]["results"]}
    assert meta["model-index"][0]["name"] == "model5" and set(results) == {"LeeNews", "ChatterbotQA"}
    assert results["LeeNews"]["metrics"] == [{"type": "cos_sim_spearman", "value": 60.0}]
    assert results["ChatterbotQA"]["task"] == {"type": "Retrieval"}
    assert card.count("## Evaluation") == 1 and "| LeeNews | sts | cosine_spearman | 60.00 |" in card
    assert "| ChatterbotQA | retrieval | ndcg_at_10 | 20.83 |" in card and "Usage text." in card
    assert set(json.loads((folder / EVAL_RESULTS_FILE).read_text())["tasks"]) == {"LeeNews", "ChatterbotQA"}


def test_folders_without_a_dsembed_card_are_untouched(tmp_path):
    (tmp_path / "README.md").write_text("# someone else's model\n")
    assert add_results(tmp_path, _results(X=("sts", "STS", "cosine_spearman", 0.1))) is None
    assert (tmp_path / "README.md").read_text() == "# someone else's model\n"
    assert not (tmp_path / EVAL_RESULTS_FILE).exists()
