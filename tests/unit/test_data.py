"""Data loading, row checking, instructions, the contrastive order and the collator."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dsembed.data.demo
import dsembed.modeling.tokenization
from dsembed.config import recipe_from_dict
from dsembed.data.batches import ContrastiveOrder, collate, query_text
from dsembed.data.rows import Example, load_examples, synthetic_rows
from dsembed.instructions import format_query
from dsembed.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


def make_recipe(tmp_path: Path, **data) -> object:
    return recipe_from_dict({"data": data}, where=str(tmp_path / "recipe.yaml"))


def write_lines(path: Path, lines: list[bytes | str | dict]) -> Path:
    raw = b""
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line)
        raw += (line.encode() if isinstance(line, str) else line) + b"\n"
    path.write_bytes(raw)
    return path


GOOD = {"query": "q", "positive": "p", "negative": "n"}

MALFORMED = {
    "bad json": ('{"query": "q", "positive": ', "invalid JSON"),
    "not an object": ('["q", "p"]', "should be a JSON object"),
    "missing query": ({"positive": "p"}, "missing field 'query'"),
    "missing positive": ({"query": "q", "negative": "n"}, "missing field 'positive'"),
    "empty query": ({"query": "  ", "positive": "p"}, "field 'query' is empty"),
    "query wrong type": ({"query": 3, "positive": "p"}, "field 'query' should be a string, got int"),
    "negative wrong type": ({"query": "q", "positive": "p", "negative": ["x"]}, "field 'negative' should be a string"),
    "negatives not a list": ({"query": "q", "positive": "p", "negatives": "x"}, "field 'negatives' should be a list"),
    "negatives item": ({"query": "q", "positive": "p", "negatives": ["a", 5]}, "negatives[1] should be a non-empty string"),
    "both negatives": ({"query": "q", "positive": "p", "negative": "a", "negatives": ["b"]}, "both 'negative' and 'negatives'"),
    "source wrong type": ({"query": "q", "positive": "p", "source": 1}, "field 'source' should be a string"),
    "not utf-8": (b'{"query": "caf\xe9", "positive": "p"}', "not UTF-8 text (byte 0xe9 at column 15)"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_row_names_file_line_problem_and_fix(tmp_path, kind):
    bad, problem = MALFORMED[kind]
    path = write_lines(tmp_path / "train.jsonl", [GOOD, "", GOOD, bad, GOOD])  # blank line 2 is fine
    recipe = make_recipe(tmp_path, train=["train.jsonl"])
    with pytest.raises(DataError) as info:
        load_examples(recipe)
    message = str(info.value)
    assert message.startswith(f"{path}:4: ")
    assert problem in message
    assert message.rstrip().endswith(")") and "\n" not in message  # one line that ends with the fix


def test_skip_malformed_counts_and_keeps_good_rows(tmp_path):
    bads = [MALFORMED[k][0] for k in sorted(MALFORMED)]
    write_lines(tmp_path / "train.jsonl", [GOOD] + bads + [dict(GOOD, query="q2")])
    recipe = make_recipe(tmp_path, train=["train.jsonl"], skip_malformed=True)
    examples = load_examples(recipe)
    assert [e.query for e in examples] == ["q", "q2"]
    assert examples.skipped == len(MALFORMED)
    assert examples.problems[0].startswith(f"{tmp_path / 'train.jsonl'}:2: ")


def test_empty_and_missing_inputs_are_data_errors(tmp_path):
    write_lines(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError, match="empty.jsonl: no usable rows"):
        load_examples(make_recipe(tmp_path, train=["empty.jsonl"]))
    write_lines(tmp_path / "bad.jsonl", ["{"])
    with pytest.raises(DataError, match="no usable rows"):  # everything skipped is still empty
        load_examples(make_recipe(tmp_path, train=["bad.jsonl"], skip_malformed=True))
    with pytest.raises(DataError, match="data.train is empty"):
        load_examples(make_recipe(tmp_path, train=[]))
    with pytest.raises(DataError, match="nope.jsonl: data file not found"):
        load_examples(make_recipe(tmp_path, train=["nope.jsonl"]))
    with pytest.raises(DataError, match="synthetic:<N> needs a positive row count"):
        load_examples(make_recipe(tmp_path, train=["synthetic:zero"]))


def test_negatives_are_truncated_or_filled_deterministically(tmp_path):
    rows = [{"query": f"q{i}", "positive": f"p{i}", "negatives": [f"n{i}.{k}" for k in range(i % 4)], "source": "s"}
            for i in range(12)]
    rows.append({"query": "qnull", "positive": "pnull", "negative": None})
    write_lines(tmp_path / "train.jsonl", rows)
    recipe = make_recipe(tmp_path, train=["train.jsonl"], num_negatives=2, seed=7)
    first, second = load_examples(recipe), load_examples(recipe)
    assert [e.negatives for e in first] == [e.negatives for e in second]
    positives = {e.positive for e in first}
    for i, example in enumerate(first):
        assert len(example.negatives) == 2
        assert example.positive not in example.negatives
        own = [f"n{i}.{k}" for k in range(i % 4)][:2] if i < 12 else []
        assert example.negatives[:len(own)] == own  # own hard negatives come first
        assert all(n in positives for n in example.negatives[len(own):])  # fills are other rows' positives
    other_seed = load_examples(make_recipe(tmp_path, train=["train.jsonl"], num_negatives=2, seed=8))
    assert [e.negatives for e in other_seed] != [e.negatives for e in first]


def test_max_rows_and_multiple_entries(tmp_path):
    write_lines(tmp_path / "a.jsonl", [dict(GOOD, query=f"a{i}") for i in range(3)])
    recipe = make_recipe(tmp_path, train=["a.jsonl", "synthetic:10"], max_rows=5)
    examples = load_examples(recipe)
    assert [e.query for e in examples[:3]] == ["a0", "a1", "a2"]
    assert len(examples) == 5 and examples[3].source == "synthetic"


def test_synthetic_rows_are_deterministic_and_share_distinctive_tokens():
    rows = synthetic_rows(64)
    assert rows == synthetic_rows(64) and len(rows) == 64
    assert len({r["positive"] for r in rows}) == 64
    for i, row in enumerate(rows):
        key = " ".join(row["positive"].split()[:2])  # "<animal> <i>"
        assert key in row["query"] and key.endswith(f" {i}")
        assert key.split()[0] not in row["negative"]


def test_demo_entry_uses_demo_data_rows(tmp_path, monkeypatch):
    calls = []

    def fake(name):
        calls.append(name)
        return [{"query": "hi", "positive": "hello", "negative": "bye", "source": "greetings"}, {"query": "x"}]

    monkeypatch.setattr(dsembed.data.demo, "demo_training_rows", fake)
    with pytest.raises(DataError, match=r"^demo:chat:2: missing field 'positive'"):
        load_examples(make_recipe(tmp_path, train=["demo:chat"]))
    examples = load_examples(make_recipe(tmp_path, train=["demo:chat"], skip_malformed=True, num_negatives=0))
    assert calls == ["chat", "chat"] and examples[0].source == "greetings" and examples.skipped == 1


def test_hf_entry_offline_gives_one_line_with_the_fix():
    code = ("from dsembed.config import recipe_from_dict\nfrom dsembed.data.rows import load_examples\n"
            "from dsembed.errors import DataError\n"
            "try:\n    load_examples(recipe_from_dict({'data': {'train': ['hf:yixuantt/ir_data']}}))\n"
            "except DataError as err:\n    print('ERR', err)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in out.stdout.splitlines() if line.startswith("ERR")]
    assert len(lines) == 1, out.stdout + out.stderr
    assert "ERR hf:yixuantt/ir_data: cannot reach the Hugging Face hub" in lines[0]
    assert "local JSONL" in lines[0] and lines[0].endswith(")")


def test_query_instructions_by_source_default_and_none(tmp_path):
    template = "Instruct: {instruction}\nQuery: {query}"
    recipe = make_recipe(tmp_path, instructions={"nli": "Find entailment", "default": "Retrieve"})
    assert query_text(Example("a {b}", "p", [], "nli"), recipe) == "Instruct: Find entailment\nQuery: a {b}"
    assert query_text(Example("a", "p", [], "other"), recipe) == "Instruct: Retrieve\nQuery: a"
    assert query_text(Example("a", "p", [], None), recipe) == "Instruct: Retrieve\nQuery: a"
    bare = make_recipe(tmp_path, instructions={"nli": "Find entailment"})
    assert query_text(Example("a", "p", [], "other"), bare) == "a"  # no default: raw query
    custom = make_recipe(tmp_path, instructions={"default": "T {query}"}, query_template="<{instruction}> {query}")
    assert query_text(Example("Q", "p", [], None), custom) == "<T {query}> Q"  # single-pass substitution
    assert format_query(template, None, "raw") == "raw"


def test_source_names_with_a_split_suffix_find_their_preset_instruction(tmp_path):
    from dsembed.instructions import E5_INSTRUCTIONS

    recipe = make_recipe(tmp_path, instruction_preset="e5")
    for source, key in [("snli-dev", "snli"), ("trecqa-wang-train", "trecqa"), ("stsb-train>=4", "stsb"),
                        ("MRPC-train", "mrpc"), ("sick-train+trial", "sick")]:
        assert query_text(Example("q", "p", [], source), recipe) == f"Instruct: {E5_INSTRUCTIONS[key]}\nQuery: q"
    assert query_text(Example("q", "p", [], "unknown-src"), recipe).startswith(f"Instruct: {E5_INSTRUCTIONS['default']}")


def test_a_query_that_already_carries_an_instruction_gets_no_second_one(tmp_path, caplog):
    from dsembed.instructions import has_instruction

    template = "Instruct: {instruction}\nQuery: {query}"
    assert has_instruction(template, "Instruct: Given a claim, find evidence\nQuery: the moon is made of cheese")
    assert has_instruction(template, "Instruct: x\nQuery: ")  # an empty query is still the template's form
    assert not has_instruction(template, "Instruct: only a prefix")
    assert not has_instruction(template, "Query: no instruction\nInstruct: x")
    assert not has_instruction(template, "Instruct: \nQuery: q")  # an empty instruction is no instruction
    recipe = make_recipe(tmp_path, instruction_preset="e5")
    carried = "Instruct: Retrieve passages\nQuery: what is dsembed"
    assert query_text(Example(carried, "p", [], "msmarco"), recipe) == carried
    assert query_text(Example("what is dsembed", "p", [], "msmarco"), recipe).count("Instruct:") == 1
    rows = write_lines(tmp_path / "rows.jsonl", [{"query": carried, "positive": "a", "source": "msmarco"},
                                                 {"query": "plain", "positive": "b", "source": "msmarco"},
                                                 {"query": carried, "positive": "c", "source": "msmarco"}])
    with caplog.at_level("WARNING"):
        loaded = load_examples(make_recipe(tmp_path, train=[str(rows)], instruction_preset="e5", num_negatives=0))
    assert loaded.already_instructed == 2
    assert "2 of 3 queries already carry an instruction" in caplog.text
    # without any instruction to add, nothing is counted
    assert load_examples(make_recipe(tmp_path, train=[str(rows)], num_negatives=0)).already_instructed == 0


def test_collate_orders_documents_query_major(tmp_path, monkeypatch):
    seen = []

    def fake_tokenize(tokenizer, texts, max_length, padding_side, append_eos=True):
        seen.append((list(texts), max_length, padding_side, append_eos))
        return {"input_ids": len(texts)}

    monkeypatch.setattr(dsembed.modeling.tokenization, "tokenize_texts", fake_tokenize)
    recipe = recipe_from_dict({"data": {"num_negatives": 2, "instructions": {"default": "I"}},
                               "model": {"max_length": 17, "padding_side": "right"}})
    examples = [Example(f"q{i}", f"p{i}", [f"n{i}a", f"n{i}b"], None) for i in range(3)]
    batch = collate(examples, object(), recipe)
    assert seen[0] == (["Instruct: I\nQuery: q0", "Instruct: I\nQuery: q1", "Instruct: I\nQuery: q2"], 17, "right", True)
    assert seen[1][0] == ["p0", "p1", "p2", "n0a", "n0b", "n1a", "n1b", "n2a", "n2b"]
    assert batch["documents"]["input_ids"] == 9
    with pytest.raises(ValueError, match="expected 2"):
        collate([Example("q", "p", ["n"], None)], object(), recipe)


def test_collate_with_the_byte_tokenizer(tmp_path):
    tokenizer = dsembed.modeling.tokenization.byte_tokenizer()
    recipe = recipe_from_dict({"data": {"num_negatives": 1}, "model": {"max_length": 8, "padding_side": "left"}})
    batch = collate([Example("hello", "p", ["a much longer negative"], None)], tokenizer, recipe)
    docs = batch["documents"]
    assert tuple(docs["input_ids"].shape) == (2, 8)  # truncated to max_length
    assert docs["attention_mask"][0].tolist() == [0] * 6 + [1, 1]  # left padding, "p" + EOS
    assert docs["input_ids"][:, -1].tolist() == [tokenizer.eos_token_id] * 2
    assert batch["query"]["input_ids"].shape[0] == 1


# ----------------------------------------------------------------------------- ContrastiveOrder


@pytest.mark.parametrize("world,micro,n", [(1, 4, 24), (2, 3, 24), (4, 2, 26)])
def test_order_covers_each_example_once_per_epoch_across_ranks(world, micro, n):
    order = ContrastiveOrder(n, seed=3)
    per_epoch = order.batches_per_epoch(world, micro)
    assert per_epoch == n // (world * micro)
    epochs = []
    for epoch in range(2):
        seen = []
        for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            shards = [order.indices(step, 0, r, world, micro) for r in range(world)]
            assert all(len(s) == micro for s in shards)
            seen += [i for s in shards for i in s]
        assert len(seen) == len(set(seen)) == per_epoch * world * micro  # no repeats within an epoch
        if n % (world * micro) == 0:
            assert sorted(seen) == list(range(n))  # every example exactly once
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # reshuffled per epoch


def test_order_is_a_pure_function_so_resume_matches():
    world, micro, accum = 2, 2, 3
    run = ContrastiveOrder(20, seed=11, accumulation_steps=accum)
    sequential = [[run.indices(s, a, r, world, micro) for r in range(world)] for s in range(6) for a in range(accum)]
    resumed = ContrastiveOrder(20, seed=11, accumulation_steps=accum)  # a fresh process after a restart
    again = [[resumed.indices(s, a, r, world, micro) for r in range(world)] for s in range(4, 6) for a in range(accum)]
    assert again == sequential[4 * accum:]
    # batch k = step * accum + accum_index walks the epoch permutation in order
    perm = run.permutation(0).tolist()
    assert sequential[1] == [perm[4:6], perm[6:8]]
    # 20 // 4 = 5 batches per epoch: batch 4 = (1, 1) ends epoch 0, batch 5 = (1, 2) starts epoch 1
    assert (run.epoch(1, 1, world, micro), run.epoch(1, 2, world, micro)) == (0, 1)
    assert ContrastiveOrder(20, seed=12).permutation(0).tolist() != perm
    assert ContrastiveOrder(20, seed=11).permutation(0).tolist() == perm


def test_order_rejects_impossible_requests():
    with pytest.raises(DataError, match="lower train.micro_batch_size"):
        ContrastiveOrder(5, seed=0).indices(0, 0, 0, 2, 4)
    with pytest.raises(ValueError, match="accumulation_steps"):
        ContrastiveOrder(50, seed=0).indices(0, 1, 0, 2, 4)
    with pytest.raises(ValueError, match="rank 2"):
        ContrastiveOrder(50, seed=0).indices(0, 0, 2, 2, 4)


SHARED_TRAIN = ROOT.parent / "shared" / "data" / "train"


@pytest.mark.skipif(not SHARED_TRAIN.is_dir(), reason="../shared/data absent")
def test_shared_training_files_load_cleanly(tmp_path):
    files = [str(SHARED_TRAIN / name) for name in ("trecqa_triplets.jsonl", "paraphrase_pairs.jsonl")]
    examples = load_examples(make_recipe(tmp_path, train=files, num_negatives=1))
    assert examples.skipped == 0 and len(examples) == 547 + 4159
    assert all(len(e.negatives) == 1 and e.negatives[0] != e.positive for e in examples)
    assert examples[0].source == "trecqa-wang-train"


def test_one_query_template_rule_for_training_encode_and_exported_prompts():
    """Training rows, EmbeddingModel.encode and the sentence-transformers prompts fill the template
    with the same function: braces in the texts and the template are kept literally."""
    from dsembed.config import load_recipe
    from dsembed.data.rows import Example
    from dsembed.data.batches import query_text
    from dsembed.export.st_files import _template_parts
    from dsembed.instructions import format_query
    from dsembed.modeling.model import EmbeddingModel

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "tiny-cpu.yaml",
                         ['data.query_template="{{lit}} {instruction}: {query} /{x}"', "data.instructions={default: 'Find {it}'}"])
    query = "what is {this}?"
    expected = "{{lit}} Find {it}: what is {this}? /{x}"
    assert format_query(recipe.data.query_template, "Find {it}", query) == expected
    assert query_text(Example(query=query, positive="p"), recipe) == expected
    assert EmbeddingModel.format_query(type("M", (), {"recipe": recipe})(), query, "Find {it}") == expected
    prefix, suffix = _template_parts(recipe, "Find {it}")
    assert prefix + query + suffix == expected
    assert format_query(recipe.data.query_template, None, query) == query  # no instruction: the raw query
