"""Reusing another study's finished stages (`dsembed-study --reuse`) and keeping finished
evaluations for another machine (`--save-finished`): what is copied, what is not."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsembed.errors import UserError
from dsembed.study.stages import LEDGER, TIMES, StageLedger, record_time, reuse_finished, save_finished

FINGERPRINT = {"train": {"recipe": {"optim.lr": 0.001}, "model": "pkg==1"}, "evaluation": {"limit": 256}}


def _study_output(root: Path, names: dict[str, dict]) -> Path:
    """An output folder whose evaluations `names` finished with the given fingerprints."""
    ledger = StageLedger(root)
    for name, fingerprint in names.items():
        (root / "results").mkdir(parents=True, exist_ok=True)
        (root / "results" / f"{name}.json").write_text(json.dumps({"model": {"name": name}}))
        (root / "results" / f"{name}.tasks").mkdir()
        (root / "results" / f"{name}.tasks" / "STS12.json").write_text("{}")
        ledger.record(f"evaluate {name}", fingerprint)
        record_time(root, f"evaluate {name}", 12.5, threads="2")
    return root


def _stages(out: Path, names: dict[str, dict]) -> dict[str, dict]:
    return {f"evaluate {n}": {"output": out / "results" / f"{n}.json", "fingerprint": fp,
                              "remove": [out / "results" / f"{n}.json"]} for n, fp in names.items()}


def test_only_stages_made_from_the_same_inputs_are_copied(tmp_path: Path) -> None:
    other = {**FINGERPRINT, "evaluation": {"limit": 96}}
    source = _study_output(tmp_path / "source", {"a": FINGERPRINT, "b": other, "c": FINGERPRINT})
    out = tmp_path / "out"
    (out / "results" / "c.tasks").mkdir(parents=True)  # c was begun here: its own tasks, not the source's
    lines: list[str] = []
    ledger = StageLedger(out)
    reused = reuse_finished(_stages(out, {"a": FINGERPRINT, "b": FINGERPRINT, "c": FINGERPRINT, "d": FINGERPRINT}),
                            out, ledger, [source], lines.append)
    assert reused == ["evaluate a"] and lines == [f"evaluate a: reused from {source} (made from the same recipe, inputs and settings)"]
    assert (out / "results" / "a.json").read_bytes() == (source / "results" / "a.json").read_bytes()
    assert (out / "results" / "a.tasks" / "STS12.json").is_file()  # the per-task store comes along
    assert not (out / "results" / "b.json").exists()  # other limit: not the same evaluation
    assert not (out / "results" / "c.json").exists() and not (out / "results" / "d.json").exists()
    assert json.loads((out / LEDGER).read_text())["evaluate a"] == json.loads((source / LEDGER).read_text())["evaluate a"]
    times = json.loads((out / TIMES).read_text())
    assert times["evaluate a"]["seconds"] == 12.5 and times["evaluate a"]["reused_from"] == str(source)
    assert not list(out.rglob(".*.reusing"))


def test_a_folder_without_a_ledger_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no stages.json"):
        reuse_finished({}, tmp_path / "out", StageLedger(tmp_path / "out"), [tmp_path], print)


def test_saved_evaluations_are_what_reuse_takes(tmp_path: Path) -> None:
    source = _study_output(tmp_path / "source", {"a": FINGERPRINT, "b": FINGERPRINT})
    StageLedger(source).record("evaluate e", FINGERPRINT)  # begun, not finished: no results file
    StageLedger(source).record("train a", FINGERPRINT["train"])
    dest = tmp_path / "saved"
    assert save_finished(source, dest) == ["evaluate a", "evaluate b"]
    assert sorted(json.loads((dest / LEDGER).read_text())) == ["evaluate a", "evaluate b"]
    assert sorted(p.name for p in (dest / "results").iterdir()) == ["a.json", "b.json"]  # not the task stores
    out = tmp_path / "out"
    assert reuse_finished(_stages(out, {"a": FINGERPRINT, "e": FINGERPRINT}), out, StageLedger(out), [dest], print) == ["evaluate a"]
    with pytest.raises(UserError, match="--save-finished"):
        save_finished(tmp_path / "nothing", dest)


def test_saving_from_a_new_machine_keeps_what_the_first_one_recorded(tmp_path: Path) -> None:
    """A new machine's output holds only the stages it reused or ran: saving it must not drop the
    training times and evaluations the first machine saved."""
    first = _study_output(tmp_path / "first", {"a": FINGERPRINT, "b": FINGERPRINT})
    record_time(first, "train a", 300.0, threads="2")
    dest = tmp_path / "saved"
    save_finished(first, dest)
    # the new machine reuses a, has not reached b, and runs its comparison again
    out = tmp_path / "new"
    assert reuse_finished(_stages(out, {"a": FINGERPRINT}), out, StageLedger(out), [dest], print) == ["evaluate a"]
    record_time(out, "compare", 80.0, threads="2")
    assert save_finished(out, dest) == ["evaluate a"]
    times = json.loads((dest / TIMES).read_text())
    assert times["train a"]["seconds"] == 300.0  # the first machine's training time stays
    assert "reused_from" not in times["evaluate a"] and times["evaluate a"]["seconds"] == 12.5
    assert times["compare"]["seconds"] == 80.0
    assert sorted(json.loads((dest / LEDGER).read_text())) == ["evaluate a", "evaluate b"]
    # a stage run again here replaces the saved time
    record_time(out, "evaluate a", 20.0, threads="2")
    save_finished(out, dest)
    assert json.loads((dest / TIMES).read_text())["evaluate a"]["seconds"] == 20.0


def test_the_layer_probe_is_saved_and_reused(tmp_path: Path) -> None:
    source = _study_output(tmp_path / "source", {"base": FINGERPRINT})
    probe_fingerprint = {"base": FINGERPRINT["train"], "evaluation": {"limit": 256}}
    StageLedger(source).record("probe base", probe_fingerprint)
    dest = tmp_path / "saved"
    assert save_finished(source, dest) == ["evaluate base"]  # recorded, not finished: no layers.json yet
    (source / "probe").mkdir()
    (source / "probe" / "layers.json").write_text('{"layers": {}}')
    (source / "probe" / "layers.png").write_bytes(b"png")
    assert save_finished(source, dest) == ["evaluate base", "probe base"]
    (source / "probe" / "layers.json").write_text('{"layers": {"1": {}}}')  # probed again: the saved copy follows
    save_finished(source, dest)
    assert sorted(p.name for p in (dest / "probe").iterdir()) == ["layers.json", "layers.png"]
    assert (dest / "probe" / "layers.json").read_text() == '{"layers": {"1": {}}}'
    out = tmp_path / "out"
    stages = {"probe base": {"output": out / "probe" / "layers.json", "fingerprint": probe_fingerprint,
                             "remove": [out / "probe"]}}
    assert reuse_finished(stages, out, StageLedger(out), [dest], print) == ["probe base"]
    assert (out / "probe" / "layers.png").read_bytes() == b"png"
