"""Per-layer probe: how well the mean-pooled states of each layer embed, task by task.

The paper's figure 2 as a tool. One backbone forward per batch, with the lazy taps on every layer,
gives a masked mean per layer ([B, L, D]); each layer's means (L2-normalised) are then scored on
every task through the same mteb path as `dsembed-evaluate` (`run.evaluate_tasks`), so a layer's
score is directly comparable to an evaluated model's. Run before training, it shows which layers
carry signal, the evidence for a `pooling.layers: top-K` choice.

Shapes: N texts, L layers, D hidden size.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from mteb.abstasks import AbsTask

from dsembed.atomic import write_text_atomic
from dsembed.evaluation.presets import CATEGORIES
from dsembed.evaluation.report import save_figure
from dsembed.evaluation.run import category_of, evaluate_tasks
from dsembed.modeling.backbone import num_decoder_layers

PROBE_FORMAT = "dsembed-probe/1"


class AllLayerEmbeddings:
    """Masked-mean embeddings of every layer, computed once per distinct (text, instruction).

    Args:
        model: an EmbeddingModel (its backbone, tokenizer and query template are used; its head is not).
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.layers = list(range(1, num_decoder_layers(model.backbone) + 1))
        self._cache: dict[tuple[str, str | None], np.ndarray] = {}  # -> [L, D]
        self.norm_sum = np.zeros(len(self.layers))  # sum over embedded texts of ||layer mean|| per layer
        self.count = 0

    def clear(self) -> None:
        """Forget the cached embeddings (between tasks: memory stays one task's texts)."""
        self._cache = {}

    @torch.no_grad()
    def embed(self, texts: Sequence[str], instruction: str | None, batch_size: int) -> np.ndarray:
        """[N, L, D] float32 per-layer embeddings, L2-normalised per layer."""
        missing = list(dict.fromkeys(t for t in texts if (t, instruction) not in self._cache))
        batches = self.model.length_batches(missing, instruction, batch_size) if missing else ()
        for idx, input_ids, attention_mask in batches:
            _, means = self.model.run_backbone(input_ids, attention_mask, self.layers)  # [b, L, D]
            # the scale a layer-weight row (norm ~sqrt(D) at N(0, 1) init) is added to
            self.norm_sum += means.float().norm(dim=-1).sum(dim=0).cpu().numpy()  # [L]
            self.count += means.shape[0]
            means = torch.nn.functional.normalize(means.float(), dim=-1).cpu().numpy()
            for row, i in enumerate(idx):
                self._cache[(missing[i], instruction)] = means[row]
        return np.stack([self._cache[(t, instruction)] for t in texts])  # [N, L, D]


class LayerView:
    """The TextEncoder for one layer: what `evaluate_tasks` calls `encode` on."""

    def __init__(self, source: AllLayerEmbeddings, layer: int) -> None:
        self.source, self.position = source, source.layers.index(layer)

    def encode(self, texts: list[str], instruction: str | None = None, batch_size: int = 32) -> np.ndarray:
        return self.source.embed(texts, instruction, batch_size)[:, self.position]  # [N, D]


def probe_layers(model: Any, tasks: list[AbsTask], instructions: dict[str, str], batch_size: int = 32,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Score the mean-pooled states of every layer on every task.

    Args:
        model: EmbeddingModel (trained or untrained).
        tasks: loaded (and possibly limited) mteb tasks.
        instructions: task name -> query instruction, as dsembed-evaluate resolves them.
        batch_size: texts per forward.
        log: progress lines.

    Returns:
        {"format", "layers": [1..L], "tasks": {task: {"category", "scores": {layer: score}}},
         "categories": {category: {layer: mean score}}, "best": {category: {"layer", "score"}},
         "mean_norms": {layer: mean L2 norm of the layer's masked mean over every text embedded}}.
    """
    source = AllLayerEmbeddings(model)
    quiet: Callable[[str], None] = lambda line: None  # noqa: E731
    per_task: dict[str, dict[str, Any]] = {}
    for number, task in enumerate(tasks, start=1):
        name = task.metadata.name
        log(f"[{number}/{len(tasks)}] {name} ({category_of(task)}): {len(source.layers)} layers")
        scores = {}
        for layer in source.layers:  # the first layer embeds the task's texts; the others reuse them
            result = evaluate_tasks(LayerView(source, layer), [task], model_name=f"layer-{layer}",
                                    instructions=instructions, batch_size=batch_size, log=quiet)
            scores[layer] = result["tasks"][name]["main_score"]
        source.clear()
        best = max(scores, key=scores.get)
        log(f"    best layer {best}: {scores[best]:.4f} (last layer {scores[source.layers[-1]]:.4f})")
        per_task[name] = {"category": category_of(task), "scores": scores}
    categories: dict[str, dict[int, float]] = {}
    for category in CATEGORIES:
        names = [n for n, t in per_task.items() if t["category"] == category]
        if names:
            categories[category] = {layer: float(np.mean([per_task[n]["scores"][layer] for n in names]))
                                    for layer in source.layers}
    best = {c: {"layer": max(s, key=s.get), "score": max(s.values())} for c, s in categories.items()}
    norms = source.norm_sum / max(source.count, 1)  # [L]
    return {"format": PROBE_FORMAT, "layers": source.layers, "tasks": per_task, "categories": categories,
            "best": best, "mean_norms": {layer: float(n) for layer, n in zip(source.layers, norms)}}


def write_probe(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """OUT/layers.json (written atomically) and OUT/layers.png; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 5))
    colours = {c: f"C{i}" for i, c in enumerate(CATEGORIES)}
    layers = result["layers"]
    for task in result["tasks"].values():
        ax.plot(layers, [100 * task["scores"][l] for l in layers], color=colours[task["category"]],
                linewidth=0.8, alpha=0.45)
    for category, means in result["categories"].items():
        ax.plot(layers, [100 * means[l] for l in layers], color=colours[category], linewidth=2.8,
                label=f"{category} (mean of {sum(t['category'] == category for t in result['tasks'].values())})")
    ax.set_xlabel("layer (mean-pooled output of decoder layer i; the last is final-normed)")
    ax.set_ylabel("main score x100")
    ax.set_title("Per-layer probe: thin lines are tasks, bold lines category means")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    png = save_figure(fig, out_dir / "layers.png")
    path = out_dir / "layers.json"
    write_text_atomic(path, json.dumps(result, indent=1))  # last: dsembed-study treats layers.json as a finished probe
    return [path, png]
