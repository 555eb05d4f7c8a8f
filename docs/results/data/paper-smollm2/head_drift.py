"""How far each trained pooling head moved from its initialisation (paper-smollm2 run 2).

The trainer seeds torch with `train.seed` and then builds the model, so the same seed and recipe
rebuild the exact initial head; the exported `pooler.safetensors` holds the trained one. Prints, per
run and parameter group, ||trained - init|| / ||init|| (relative change) as a markdown table.

    python docs/results/data/paper-smollm2/head_drift.py ~/dsembed-studies/paper-smollm2 [--output FILE.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from dsembed.config import load_recipe
from dsembed.modeling import build_model
from dsembed.training.trainer import seed_everything

GROUPS = ("layer_weights", "latents", "to_q", "to_kv", "to_out", "ffn", "norm")  # by name, first match


def group_of(name: str) -> str:
    for g in GROUPS:
        if g in name:
            return g
    return "other"


def drift(run_dir: Path, model_dir: Path) -> dict[str, float]:
    recipe = load_recipe(run_dir / "recipe.yaml")
    seed_everything(recipe.train.seed)  # as Trainer.__init__ does right before build_model
    initial = {k: v.float() for k, v in build_model(recipe).pooler.state_dict().items()}
    trained = {k: v.float() for k, v in load_file(str(model_dir / "pooler.safetensors")).items()}
    if initial.keys() != trained.keys():
        raise SystemExit(f"{model_dir}: head parameters {sorted(trained)} differ from the recipe's {sorted(initial)}")
    moved: dict[str, list[float]] = {}
    for k in initial:  # sums of squares per group, then the ratio of norms
        d = moved.setdefault(group_of(k), [0.0, 0.0])
        d[0] += float((trained[k] - initial[k]).pow(2).sum())
        d[1] += float(initial[k].pow(2).sum())
    return {g: (a ** 0.5) / (b ** 0.5) if b > 0 else float("nan") for g, (a, b) in sorted(moved.items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study_dir", type=Path)
    p.add_argument("--output", type=Path)
    args = p.parse_args()
    rows = {}
    for model_dir in sorted((args.study_dir / "models").iterdir()):
        if (model_dir / "pooler.safetensors").is_file() and (args.study_dir / "runs" / model_dir.name).is_dir():
            moved = drift(args.study_dir / "runs" / model_dir.name, model_dir)
            if moved:  # EOS pooling has no parameters
                rows[model_dir.name] = moved
    groups = sorted({g for r in rows.values() for g in r})
    print("| run | " + " | ".join(groups) + " |")
    print("|---|" + "---:|" * len(groups))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[g]:.4f}" if g in r else "-" for g in groups) + " |")
    if args.output:
        args.output.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
