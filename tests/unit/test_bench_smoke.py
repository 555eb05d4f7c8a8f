"""dsembed-bench: every CPU subcommand runs on the tiny model with minimal sizes and writes its JSON fields.

No timing or memory assertions: those depend on the machine; the benchmarks report, they do not test.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("sentence_transformers")

from dsembed.cli.bench import main  # noqa: E402

COMMON = ["--threads", "1"]


def _run(tmp_path, *args: str) -> dict:
    out = tmp_path / "result.json"
    assert main([*args, *COMMON, "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == args[0]
    assert {"cpu", "cores", "torch", "load_average", "date"} <= set(data["machine"])
    assert data["threads"] == 1 and len(data["load_before"]) == 3
    return data


def test_train_and_encode(tmp_path):
    data = _run(tmp_path, "train", "--model", "tiny", "--batch-size", "2", "--repeats", "1", "--warmup", "0")
    run = data["runs"][0]
    assert set(run["results"]) == {"dsembed", "sentence-transformers"}
    for name in run["results"]:
        assert run["results"][name]["samples_per_s"] > 0 and run["results"][name]["tokens_per_s"] > 0
    assert run["ratio_samples_per_s"] > 0 and len(data["rows"]) == 2

    data = _run(tmp_path, "encode", "--model", "tiny", "--num-texts", "8", "--batch-size", "4", "--repeats", "1",
                "--warmup", "0")
    run = data["runs"][0]
    assert run["ratio_texts_per_s"] > 0 and run["results"]["dsembed"]["texts_per_s"] > 0
    assert -1.0 <= run["min_cosine_dsembed_vs_st"] <= 1.0 + 1e-5


def test_train_and_encode_side_by_side_in_two_dtypes(tmp_path, capsys):
    """--dtype float32,bfloat16: both dtypes and both implementations in one interleaved run."""
    data = _run(tmp_path, "train", "--model", "tiny", "--batch-size", "2", "--repeats", "1", "--warmup", "0",
                "--dtype", "float32,bfloat16")
    run = data["runs"][0]
    names = {f"{impl} {d}" for impl in ("dsembed", "sentence-transformers") for d in ("float32", "bfloat16")}
    assert set(run["results"]) == names and run["config"]["dtypes"] == ["float32", "bfloat16"]
    ratios = run["dtype_ratios"]
    assert set(ratios["vs_st"]) == {"float32", "bfloat16"} and set(ratios["vs_first_dtype"]) == {"bfloat16"}
    assert all(r["median"] > 0 for r in ratios["vs_first_dtype"]["bfloat16"].values())
    assert {r["dtype"] for r in data["rows"]} == {"float32", "bfloat16"} and "vs float32" in data["rows"][-1]
    assert all(len(run["results"][n]["losses"]) == 1 for n in names)
    assert "dsembed: bfloat16 / float32 = " in capsys.readouterr().out

    data = _run(tmp_path, "encode", "--model", "tiny", "--num-texts", "8", "--batch-size", "4", "--repeats", "1",
                "--warmup", "0", "--dtype", "float32,bfloat16")
    run = data["runs"][0]
    assert set(run["results"]) == names
    cos = run["min_cosine_to_first_dtype"]["bfloat16"]
    assert cos["dsembed"] >= 0.99 and cos["sentence-transformers"] >= 0.99  # the same weights, rounded to bf16
    assert data["machine"]["auto_dtype_cpu"].startswith("dtype: auto -> ")


def test_memory_and_cached(tmp_path):
    data = _run(tmp_path, "memory", "--model", "tiny", "--batch-size", "2")
    run = data["runs"][0]
    for mode in ("train", "inference"):
        assert set(run["results"][mode]) == {"last_token", "multi_layer_taps", "multi_layer_ohs", "head_only"}
        assert all(v > 0 for v in run["results"][mode].values())
        assert {"taps_vs_last_token", "ohs_vs_last_token", "taps_vs_ohs"} <= set(run["ratios"][mode])

    data = _run(tmp_path, "cached", "--model", "tiny", "--batch-sizes", "4,8", "--chunk-size", "2", "--repeats", "1")
    rows = data["runs"][0]["results"]
    assert [r["batch"] for r in rows] == [4, 8]
    for r in rows:
        assert r["plain_MiB"] > 0 and r["cached_MiB"] > 0 and r["plain_s"] > 0 and r["cached_s"] > 0
    assert data["runs"][0]["ratio_at_256"] is None  # 256 not measured here


def test_gpu_skips_without_cuda(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the gpu benchmark would run for minutes")
    data = _run(tmp_path, "gpu")
    assert "skipped" in data and data["rows"] == []
    assert "skipped" in capsys.readouterr().out
