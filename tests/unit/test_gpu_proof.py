"""dsembed-bench gpu-proof: the flash part through transformers' flash path (reference flash-attn),
failures recorded part by part, and the peak table. The whole --dry-run: tests/e2e/test_gpu_proof_dry_run.py."""
from __future__ import annotations

import json

import pytest

from dsembed.bench import gpu_proof
from dsembed.bench.gpu import peak_flops
from dsembed.bench.proof_parts import part_flash


def test_flash_part_through_the_reference_flash_attn(flash_reference, tmp_path):
    """With a flash_attn importable the part really compares flash_attention_2 with sdpa (both
    paths called), not sdpa with itself, and says nothing is skipped."""
    record = part_flash(gpu_proof.settings(True, tmp_path, "cpu"))
    assert record["ok"] and "skipped" not in record and record["compared"] == "sdpa vs flash_attention_2"
    cases = [r for r in record["rows"] if "mode" in r]
    assert {(r["shape"], r["mode"], r["padding"]) for r in cases} == {
        (s, m, p) for s in ("tiny-qwen2", "tiny-mistral") for m in ("causal", "bidirectional") for p in ("left", "right")}
    for r in cases:
        assert r["padded_embedding_min_cosine"] > 0.999 and r["equal_state_min_cosine"] > 0.999
        if r["mode"] == "causal":
            assert r["padded_first_token_shift"] == 0.0 and r["equal_first_token_shift"] == 0.0
        else:
            assert r["padded_first_token_shift"] > 1e-3 and r["equal_first_token_shift"] > 1e-3
    calls = [r["calls"] for r in record["rows"] if "calls" in r]
    assert len(calls) == 2 and all(c["flash_attn_func"] > 0 and c["flash_attn_varlen_func"] > 0 for c in calls)
    assert flash_reference.CALLS["flash_attn_varlen_func"] > 0


def test_flash_part_fails_on_a_wrong_flash_attn(flash_reference, tmp_path, monkeypatch):
    attend = flash_reference.attend
    monkeypatch.setattr(flash_reference, "attend", lambda q, k, v, causal, *rest: attend(q, k, v, False, *rest))
    record = part_flash(gpu_proof.settings(True, tmp_path, "cpu"))
    assert not record["ok"]


def test_failed_parts_are_recorded_and_the_next_part_still_runs(tmp_path, monkeypatch):
    out = tmp_path / "proof.json"
    monkeypatch.setitem(gpu_proof.PART_LIMIT_S, "eval", 0.01)  # x3 in a dry run: still far too short
    payload = gpu_proof.run_proof(out, dry_run=True, workdir=tmp_path / "work", parts=("export", "eval"), log=lambda s: None)
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(payload)) and on_disk["finished"] and not on_disk["all_ok"]
    export, evaluation = on_disk["parts"]["export"], on_disk["parts"]["eval"]
    assert not export["ok"] and "train part did not finish" in export["error"] and export["seconds"] > 0
    assert not evaluation["ok"] and evaluation["error"].startswith("timed out")

    payload = gpu_proof.run_proof(out, dry_run=True, workdir=tmp_path / "work", budget_s=5, parts=("mfu",),
                                  log=lambda s: None)
    assert payload["parts"]["mfu"]["error"].startswith("not started")


def test_peak_table_matches_device_names():
    assert peak_flops("NVIDIA H200") == peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_flops("NVIDIA H100 PCIe") == 756.0e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312.0e12
    assert peak_flops("cpu") is None


def test_cli_has_the_subcommand():
    from dsembed.cli.bench import _parser

    args = _parser().parse_args(["gpu-proof", "--dry-run", "--output", "x.json", "--parts", "flash", "mfu"])
    assert args.dry_run and args.parts == ["flash", "mfu"]
    with pytest.raises(SystemExit):
        _parser().parse_args(["gpu-proof"])  # --output is required
