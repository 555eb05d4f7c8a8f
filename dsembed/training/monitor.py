"""Training monitor: TensorBoard scalars, layer-weight histograms and images, the recipe, and a
console progress bar with ETA. Only rank 0 writes; on other ranks every method is a no-op.

TensorBoard files go to <output_dir>/tensorboard (`tensorboard --logdir <output_dir>/tensorboard`).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from dsembed.config import Recipe
from dsembed.distributed import is_main

_HEATMAP_MAX_COLUMNS = 256  # wide W matrices (D = 4096) are averaged down to this many columns
_HEATMAP_ROW_PIXELS = 4


def _to_float(value: Any) -> float:
    return float(value.detach().float().item()) if isinstance(value, torch.Tensor) else float(value)


def relative_change(weights: torch.Tensor, initial: torch.Tensor) -> tuple[torch.Tensor, float | None]:
    """||W - W0|| / ||W0|| per row ([K]; NaN where the row started at zero) and of the whole matrix
    (None when W0 is all zeros: `layer_weights_init: zeros`, where W's own norm is the change).

    Shapes:
        weights, initial: [K, D].
    """
    w, w0 = weights.detach().float().cpu(), initial.detach().float().cpu()
    delta, start = (w - w0).norm(dim=1), w0.norm(dim=1)  # [K], [K]
    rows = torch.where(start > 0, delta / start.clamp_min(1e-30), torch.full_like(start, float("nan")))  # [K]
    total = float(w0.norm())
    return rows, (float((w - w0).norm()) / total if total > 0 else None)


def drop_events_after(log_dir: str | Path, step: int) -> int:
    """Rewrite the TensorBoard event files under `log_dir` without the events of steps after `step`.

    A run killed after its last checkpoint logged steps that the resumed run logs again; without
    this, TensorBoard (and any reader of the event files) would hold those steps twice. Each file is
    rewritten to a temporary name and os.replace'd, so a kill during the rewrite loses nothing.

    Returns:
        The number of events dropped.
    """
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    dropped = 0
    for leftover in Path(log_dir).glob(".rewrite-*"):  # a rewrite killed before its os.replace
        leftover.unlink()
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        records = list(RawEventFileLoader(str(path)).Load())
        kept = [raw for raw in records if Event.FromString(raw).step <= step]
        if len(kept) == len(records):
            continue
        dropped += len(records) - len(kept)
        partial = path.with_name(f".rewrite-{os.getpid()}")  # TensorBoard reads any name holding "tfevents"
        with open(partial, "wb") as handle:
            writer = RecordWriter(handle)
            for raw in kept:
                writer.write(raw)
            writer.flush()
        os.replace(partial, path)
    return dropped


class Monitor:
    """Writes training metrics on the main rank.

    Args:
        output_dir: the run directory; TensorBoard events go to <output_dir>/tensorboard.
        recipe: logging.tensorboard and logging.progress_bar switch the two outputs.
        total_steps: optimizer steps of the whole run (the progress bar's total).
        enabled: None means `is_main()`; False makes every method a no-op.
        start_step: the step training resumes from, so the ETA counts only this run's speed.
    """

    def __init__(self, output_dir: str | Path, recipe: Recipe, total_steps: int,
                 enabled: bool | None = None, start_step: int = 0):
        self.enabled = is_main() if enabled is None else enabled
        self.total_steps = total_steps
        self.writer = None
        self.bar = None
        if not self.enabled:
            return
        self.log_dir = Path(output_dir) / "tensorboard"
        if recipe.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.log_dir))
        if recipe.logging.progress_bar:
            from tqdm import tqdm

            interactive = sys.stderr.isatty()
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", file=sys.stderr,
                            dynamic_ncols=True, mininterval=0.2 if interactive else 30.0,
                            desc="train", leave=True)

    # ------------------------------------------------------------------ scalars and progress

    def update(self, step: int, scalars: Mapping[str, Any] | None = None) -> None:
        """Move the progress bar to `step` (completed optimizer steps), showing loss/lr if given."""
        if self.bar is None:
            return
        if step > self.bar.n:
            self.bar.update(step - self.bar.n)
        if scalars:
            shown = {k.split("/")[-1]: f"{_to_float(v):.4g}" for k, v in scalars.items()
                     if k.split("/")[-1] in ("loss", "lr", "accuracy")}
            if shown:
                self.bar.set_postfix(shown, refresh=False)

    def log_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Write each value (float or 0-d tensor) under its tag and advance the progress bar.

        Args:
            step: the global optimizer step (x axis).
            scalars: tag -> value, e.g. {"train/loss": 0.7, "train/lr": 1e-5}.
        """
        if not self.enabled:
            return
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, _to_float(value), step)
        self.update(step, scalars)

    # ------------------------------------------------------------------ layer weights

    def log_layer_weights(self, step: int, weights: torch.Tensor, layer_indices: Sequence[int],
                          change: torch.Tensor | None = None) -> None:
        """The multi-layer head's per-layer weights: histogram, per-layer norms, images, and how far
        they moved from their initialisation.

        Shapes:
            weights: [K, D] (the matrix W, one row per selected layer) or [K] (per-layer norms).
            change: [K], each row's relative change from step 0 (`relative_change`), or None.

        Writes `layer_weights/values` (histogram), `layer_weights/norm/layer_<i>` (scalars),
        `layer_weights/norms` (bar chart image; a one-row heatmap without matplotlib) and, for
        [K, D], `layer_weights/heatmap` (|W| with each row scaled to 0..1, columns averaged to <=256).
        With `change`: `layer_weights/change/layer_<i>`, the relative change ||W - W0|| / ||W0|| of
        each row (the trainer logs the whole matrix's as the metric `layer_weights/change`). Why: a
        normal-initialised W has row norms near sqrt(D) whether or not it learned anything, so its
        norms alone cannot tell a learned W from its random start.

        Args:
            step: the global optimizer step.
            weights: the tensor (any device, any float dtype; gathered already under ZeRO-3).
            layer_indices: the K 1-based decoder-layer indices the rows belong to.
            change: computed once by the caller, which also needs the whole matrix's; NaN rows
                (started at zero) are not logged.

        Raises:
            ValueError: the number of rows (of weights or change) differs from len(layer_indices).
        """
        if not self.enabled or self.writer is None:
            return
        w = weights.detach().float().cpu()
        if w.dim() not in (1, 2) or w.shape[0] != len(layer_indices):
            raise ValueError(f"weights {tuple(w.shape)} should be [K] or [K, D] with K = {len(layer_indices)}")
        if change is not None and tuple(change.shape) != (len(layer_indices),):
            raise ValueError(f"change {tuple(change.shape)} should be [K] with K = {len(layer_indices)}")
        norms = w.norm(dim=1) if w.dim() == 2 else w  # [K]
        self.writer.add_histogram("layer_weights/values", w.flatten(), step)
        for index, norm in zip(layer_indices, norms.tolist()):
            self.writer.add_scalar(f"layer_weights/norm/layer_{index}", norm, step)
        if not self._add_norms_figure(step, norms, layer_indices):
            self.writer.add_image("layer_weights/norms", self._heatmap(norms[None, :]), step, dataformats="HW")
        if w.dim() == 2:
            pooled = torch.nn.functional.adaptive_avg_pool1d(w.abs()[None], min(w.shape[1], _HEATMAP_MAX_COLUMNS))[0]  # [K, <=256]
            self.writer.add_image("layer_weights/heatmap", self._heatmap(pooled, per_row=True), step, dataformats="HW")
        if change is not None:
            for index, row_change in zip(layer_indices, change.tolist()):
                if row_change == row_change:  # not NaN: the row did not start at zero
                    self.writer.add_scalar(f"layer_weights/change/layer_{index}", row_change, step)

    @staticmethod
    def _heatmap(values: torch.Tensor, per_row: bool = False) -> torch.Tensor:
        """[R, C] -> [R * 4, C] grey image in 0..1 (scaled per row, or over the whole matrix)."""
        low = values.amin(dim=1, keepdim=True) if per_row else values.min()
        high = values.amax(dim=1, keepdim=True) if per_row else values.max()
        scaled = (values - low) / (high - low).clamp_min(1e-12)  # [R, C]
        return scaled.repeat_interleave(_HEATMAP_ROW_PIXELS, dim=0)  # [R*4, C]

    def _add_norms_figure(self, step: int, norms: torch.Tensor, layer_indices: Sequence[int]) -> bool:
        try:
            from matplotlib.figure import Figure
        except ImportError:
            return False
        figure = Figure(figsize=(max(4.0, 0.25 * len(layer_indices)), 2.5), dpi=80)
        axes = figure.add_subplot()
        axes.bar([str(i) for i in layer_indices], norms.tolist(), color="tab:blue")
        axes.set_xlabel("decoder layer")
        axes.set_ylabel("||W_k||")
        axes.tick_params(axis="x", labelsize=6)
        figure.tight_layout()
        self.writer.add_figure("layer_weights/norms", figure, step, close=True)
        return True

    # ------------------------------------------------------------------ text and lifetime

    def log_recipe(self, text: str, step: int = 0) -> None:
        """The resolved recipe YAML as TensorBoard text (tag `recipe`), shown as a code block."""
        if not self.enabled or self.writer is None:
            return
        block = "\n".join("    " + line for line in text.splitlines())  # markdown code block
        self.writer.add_text("recipe", block, step)

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        """Free text (notes, final results) under `tag`."""
        if self.enabled and self.writer is not None:
            self.writer.add_text(tag, text, step)

    def write(self, message: str) -> None:
        """A console line that does not break the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush and close TensorBoard and the progress bar (safe to call twice)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
