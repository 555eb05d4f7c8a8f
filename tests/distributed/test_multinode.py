"""Two "nodes" on one machine: two torchrun processes with --nnodes 2 --nproc_per_node 1.

Global ranks 0 and 1 live on different nodes, each with LOCAL_RANK 0 (its node-local device), so
every rank / local_rank / is_main use is exercised as on a real cluster: only global rank 0 writes
the shared files. The run stops at step 2, resumes as two nodes to step 4, and its weights and
losses equal a one-node 2-rank run's. A run directory the nodes do not share is refused (exit 2).
"""
from __future__ import annotations

from pathlib import Path

from dsembed.training.engine import fp32_state_dict

from launch import check, launch, launch_nodes, metrics

COMMON = ["train.max_steps=4", "train.save_steps=2", "lora.dropout=0.1"]


def test_two_nodes_train_resume_and_match_one_node(tmp_path: Path) -> None:
    one, two = tmp_path / "one-node", tmp_path / "two-nodes"
    check(launch([f"train.output_dir={one}", *COMMON], timeout=600))
    for node in launch_nodes([f"train.output_dir={two}", *COMMON, "train.stop_after=2"], timeout=600):
        check(node)
    assert (two / "checkpoints" / "latest").read_text().strip() == "step-2"
    assert sorted(p.name for p in (two / "checkpoints" / "step-2").glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    resumed = launch_nodes([f"train.output_dir={two}", *COMMON], timeout=600)
    for node in resumed:
        check(node)
    assert "resumed from" in resumed[0].stderr and "resumed from" not in resumed[1].stderr  # rank 0 speaks

    assert [r["step"] for r in metrics(two)] == list(range(1, 5))
    for a, b in zip(metrics(one), metrics(two)):
        assert abs(a["train/loss"] - b["train/loss"]) < 1e-5, (a["step"], a["train/loss"], b["train/loss"])
    expected = fp32_state_dict(one / "checkpoints", "step-4")
    got = fp32_state_dict(two / "checkpoints", "step-4")
    assert expected.keys() == got.keys() and any("lora_B" in k for k in got)
    diff = max((expected[k].float() - got[k].float()).abs().max().item() for k in expected)
    assert diff <= 1e-6, diff
    assert max(got[k].abs().max().item() for k in got if "lora_B" in k) > 1e-4  # trained, not zeros


def test_run_dir_not_shared_between_nodes_is_refused(tmp_path: Path) -> None:
    disks = [tmp_path / "node0", tmp_path / "node1"]
    for disk in disks:
        disk.mkdir()
    nodes = launch_nodes(["train.output_dir=run", "train.max_steps=2"], cwds=disks, timeout=600)  # relative: one per "disk"
    for rank, node in enumerate(nodes):
        errors = [line for line in node.stderr.splitlines() if line.startswith("error:")]
        assert node.returncode != 0 and len(errors) == 1, node.stderr[-3000:]
        assert "train.output_dir run is not shared between the nodes" in errors[0] and "rank 1 on" in errors[0]
        assert f"rank      : {rank} (local_rank: 0)" in node.stderr and "exitcode  : 2" in node.stderr  # torchrun's report
        assert "dsembed/" not in node.stderr.split(errors[0])[0]  # no traceback from dsembed before the line
    assert not (disks[0] / "run").exists() and not (disks[1] / "run").exists()  # nothing left behind
