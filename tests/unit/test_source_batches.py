"""data.batching: by_source: every global contrastive batch from one source, sources drawn by size or
weight, the order a pure function of (step, accum, rank) as the mixed order is; recipe rules and the
source of rows (the `source` field, else the data.train entry)."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from dsembed.config import recipe_from_dict
from dsembed.data.batches import ContrastiveOrder
from dsembed.data.rows import load_examples
from dsembed.errors import DataError, RecipeError
from dsembed.recipe_rules import validate

# 3 sources of 40, 24 and 5 examples, interleaved in the example list
GROUPS = [name for i in range(40) for name in (["big"] + (["mid"] if i < 24 else []) + (["tiny"] if i < 5 else []))]


def _global(order, step, accum, world, micro):
    return [i for r in range(world) for i in order.indices(step, accum, r, world, micro)]


@pytest.mark.parametrize("world,micro", [(1, 8), (2, 4)])
def test_every_global_batch_comes_from_one_source_and_a_block_covers_each_once(world, micro):
    order = ContrastiveOrder(len(GROUPS), seed=5, groups=GROUPS)
    per_block = order.batches_per_epoch(world, micro)
    assert per_block == 40 // 8 + 24 // 8  # "tiny" (5 < 8) is left out; by size: 5 + 3 batches
    seen, sources = [], Counter()
    for step in range(per_block):
        batch = _global(order, step, 0, world, micro)
        assert len(batch) == world * micro
        assert len({GROUPS[i] for i in batch}) == 1
        assert order.source_of(step, 0, world, micro) == GROUPS[batch[0]]
        sources[GROUPS[batch[0]]] += 1
        seen += batch
    assert sources == {"big": 5, "mid": 3}  # in proportion to size
    assert len(seen) == len(set(seen)) == 64  # no example twice within a block
    next_block = [_global(order, step, 0, world, micro) for step in range(per_block, 2 * per_block)]
    assert next_block != [_global(order, step, 0, world, micro) for step in range(per_block)]  # reshuffled


def test_by_source_order_is_a_pure_function_so_resume_matches():
    world, micro, accum = 2, 2, 3
    run = ContrastiveOrder(len(GROUPS), seed=11, accumulation_steps=accum, groups=GROUPS)
    sequential = [[run.indices(s, a, r, world, micro) for r in range(world)] for s in range(12) for a in range(accum)]
    resumed = ContrastiveOrder(len(GROUPS), seed=11, accumulation_steps=accum, groups=GROUPS)  # after a restart
    again = [[resumed.indices(s, a, r, world, micro) for r in range(world)] for s in range(7, 12) for a in range(accum)]
    assert again == sequential[7 * accum:]
    other = ContrastiveOrder(len(GROUPS), seed=12, accumulation_steps=accum, groups=GROUPS)
    assert [[other.indices(s, a, r, world, micro) for r in range(world)] for s in range(2) for a in range(accum)] \
        != sequential[:2 * accum]


def test_weights_set_the_share_of_batches_and_sources_cycle_through_passes():
    weights = {"big": 1.0, "mid": 3.0, "tiny": 0.0}
    order = ContrastiveOrder(len(GROUPS), seed=1, groups=GROUPS, weights=weights)
    per_block = order.batches_per_epoch(1, 8)
    assert per_block == 8
    counts = Counter(order.source_of(k, 0, 1, 8) for k in range(4 * per_block))
    assert counts == {"big": 8, "mid": 24}  # 1:3, "tiny" at weight 0 never
    mid = [tuple(order.indices(k, 0, 0, 1, 8)) for k in range(4 * per_block) if order.source_of(k, 0, 1, 8) == "mid"]
    # "mid" has 3 batches per pass: each pass of 3 covers its 24 examples once
    for start in range(0, len(mid), 3):
        assert sorted(i for batch in mid[start:start + 3] for i in batch) == [i for i, g in enumerate(GROUPS) if g == "mid"]


@pytest.mark.parametrize("weights,match", [
    ({"big": 1.0, "mid": 1.0, "tiny": 1.0}, "fewer examples than one global"),
    ({"big": 1.0, "mdi": 1.0, "tiny": 0.0}, "did you mean 'mid'"),
    ({"big": 1.0}, "no weight for source"),
])
def test_bad_weights_and_sources_are_data_errors(weights, match):
    with pytest.raises(DataError, match=match):
        ContrastiveOrder(len(GROUPS), seed=0, groups=GROUPS, weights=weights).batches_per_epoch(1, 8)
    with pytest.raises(DataError, match="no source has 64 examples"):
        ContrastiveOrder(len(GROUPS), seed=0, groups=GROUPS).batches_per_epoch(8, 8)


def test_rows_without_a_source_are_grouped_by_their_data_train_entry(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"query": f"qa{i}", "positive": f"pa{i}"}) + "\n" for i in range(4)))
    b.write_text("".join(json.dumps({"query": f"qb{i}", "positive": f"pb{i}", "source": "nli" if i % 2 else None}) + "\n"
                         for i in range(4)))
    recipe = recipe_from_dict({"data": {"train": ["a.jsonl", str(b)], "batching": "by_source"}}, str(tmp_path / "r.yaml"))
    groups = [e.group for e in load_examples(recipe)]
    assert groups == ["a.jsonl"] * 4 + [str(b), "nli", str(b), "nli"]


@pytest.mark.parametrize("data,loss,match", [
    ({"source_weights": {"x": 1.0}}, {}, "applies to data.batching: by_source"),
    ({"batching": "by_source", "source_weights": {"x": -1.0}}, {}, "must not be negative"),
    ({"batching": "by_source", "source_weights": {"x": 0.0}}, {}, "all 0"),
    ({}, {"false_negative_margin": 1.5}, "within \\(0, 1\\]"),
    ({}, {"matryoshka_dims": [8, 8]}, "distinct positive sizes"),
    ({}, {"matryoshka_dims": [8, 128]}, "has 32 dimensions"),
    ({}, {"matryoshka_weights": [1.0]}, "needs loss.matryoshka_dims"),
    ({}, {"matryoshka_dims": [8, 16], "matryoshka_weights": [1.0]}, "one per loss.matryoshka_dims"),
])
def test_recipe_rules_for_batching_and_loss_keys(tiny_recipe, data, loss, match):
    import dataclasses

    recipe = tiny_recipe()  # hidden size 32
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, **data),
                                 loss=dataclasses.replace(recipe.loss, **loss))
    with pytest.raises(RecipeError, match=match):
        validate(recipe)


def test_valid_new_keys_pass_validation(tiny_recipe):
    import dataclasses

    recipe = tiny_recipe()
    recipe = dataclasses.replace(
        recipe, data=dataclasses.replace(recipe.data, batching="by_source", source_weights={"a": 1.0, "b": 0.0}),
        loss=dataclasses.replace(recipe.loss, false_negative_margin=0.95, matryoshka_dims=[8, 16, 32],
                                 matryoshka_weights=[1.0, 1.0, 2.0]))
    assert validate(recipe) is recipe
