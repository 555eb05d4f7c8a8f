"""The training loop: contrastive batches, accumulation or cached steps, metrics, checkpoints, resume.

Run directory (`train.output_dir`):
    recipe.yaml                the resolved recipe
    metrics.jsonl              one JSON object per logged step (rank 0)
    tensorboard/               scalars, layer-weight histograms/images, the recipe text
    checkpoints/step-N/        complete DeepSpeed checkpoints (+ rng_rank<r>.pt per rank)
    checkpoints/latest         the tag of the newest complete checkpoint
A checkpoint is written to checkpoints/tmp-step-N, renamed to step-N once every rank has finished,
and only then named in `latest` (written to a temporary file and os.replace'd), so a crash at any
moment leaves `latest` pointing at a complete checkpoint. Leftover tmp-step-* folders are deleted
when a run starts or resumes.

Reliability rules (tests/reliability):
- Nothing in the run directory is created or changed before every input check has passed (recipe,
  data, model build): a user mistake exits with code 2 and leaves no run directory behind.
- A resume checks every shard of the checkpoint it loads first (run_dir.verify_resume): a damaged or
  missing one sets that checkpoint aside (damaged-step-N) and the newest complete earlier one is
  loaded; with none left the run stops with exit code 2, naming the checkpoint and the shard.
- An existing run is resumed (train.resume: auto), refused (train.resume: never, exit 2) or, with
  train.overwrite: true, replaced: its checkpoints/, tensorboard/ and metrics.jsonl are deleted up
  front, once the new run has passed its input checks (not deferred to its first checkpoint).
- A non-finite loss (checked before its backward) or gradient norm (after the step; DeepSpeed
  skips such a step) stops the run on every rank with a `TrainingError` naming the step (exit code
  3); the failed step is never checkpointed, so `latest` names the last good checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsembed import distributed as dist
from dsembed.distributed import rng_states, set_rng_states
from dsembed.config import Recipe
from dsembed.errors import CheckpointError, RecipeError, TrainingError, UserError
from dsembed.testhooks import TestHooks
from dsembed.training.gradcache import BatchStats, cached_backward, plain_backward
from dsembed.training.loss import LossOptions
from dsembed.training.run_dir import (STEP_DIR, check_run_dir, checkpoint_dir, drop_logs_after, latest_tag,
                                      prepare_run_dir, run_dtype, steps_to_prune, verify_resume)


def _periodic_eval(recipe: Recipe) -> Any:
    """The recipe's evaluation during training (None when off); task errors name the recipe."""
    if recipe.eval.every_steps is None:
        return None
    from dsembed.training.periodic_eval import PeriodicEval

    try:
        return PeriodicEval(recipe)
    except UserError as err:
        raise type(err)(f"{recipe.source or '<recipe>'}: eval: {err}") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """Runs one recipe to `train.max_steps` (or `train.stop_after`), resuming when asked.

    Args:
        recipe: validated recipe.
        base_dir: folder that relative model paths resolve against.
    """

    def __init__(self, recipe: Recipe, base_dir: Path | None = None) -> None:
        from dsembed.data.batches import ContrastiveOrder
        from dsembed.data.rows import load_examples
        from dsembed.training.engine import Engine, init_distributed
        from dsembed.modeling import build_model

        self.resume_tag = check_run_dir(recipe)
        # model.dtype: auto becomes the concrete dtype here, once: the run directory, checkpoints and
        # exports record it, and a resumed run keeps the one it trained in
        self.recipe = recipe = run_dtype(recipe, self.resume_tag)
        train = recipe.train
        self.examples = load_examples(recipe)
        self.rank, self.world = dist.rank(), dist.world_size()
        by_source = recipe.data.batching == "by_source"
        self.order = ContrastiveOrder(len(self.examples), train.seed, train.gradient_accumulation_steps,
                                      groups=[e.group for e in self.examples] if by_source else None,
                                      weights=recipe.data.source_weights or None)
        self.order.batches_per_epoch(self.world, train.micro_batch_size)  # DataError now, not at step 1
        self.evaluator = _periodic_eval(recipe)  # None unless eval.every_steps: tasks load before any write
        init_distributed()  # the resume check is collective
        self.resume_tag, damaged = verify_resume(recipe, self.resume_tag)  # read-only; set aside below
        seed_everything(train.seed)  # identical initial weights on every rank
        try:
            self.engine = Engine.create(recipe, lambda: build_model(recipe, base_dir))
        except UserError as err:  # modeling errors name the key; add the recipe file
            if recipe.source and recipe.source not in str(err):
                raise type(err)(f"{recipe.source}: {err}") from None
            raise
        self.model = self.engine.module
        self.tokenizer = self.model.tokenizer
        self.loss_options = LossOptions.of(recipe.loss)
        dims = recipe.loss.matryoshka_dims
        if dims and max(dims) > self.model.dim:  # before the run directory is touched
            raise RecipeError(f"{recipe.source or '<recipe>'}: loss.matryoshka_dims = {dims} but the model's "
                              f"embeddings have {self.model.dim} dimensions (list sizes up to {self.model.dim})")
        seed_everything(train.seed + self.rank)  # then per-rank dropout streams
        self.step = 0
        # W at step 0, for its change in TensorBoard and metrics.jsonl; checkpoints carry it, so a
        # resumed run measures from the same start (None: no layer weights, or an older checkpoint)
        self.layer_weights_init = self._gather_layer_weights() if self.resume_tag is None else None
        prepare_run_dir(recipe, fresh=self.resume_tag is None, damaged=damaged, resume_tag=self.resume_tag)
        if self.resume_tag is not None:
            self._resume(self.resume_tag)

    # -- checkpoints ------------------------------------------------------------------------------

    def _resume(self, tag: str) -> None:
        folder = checkpoint_dir(self.recipe)
        state = self.engine.load_checkpoint(folder, tag)
        if state.get("world_size") not in (None, self.world):
            raise CheckpointError(f"{folder / tag}: saved with {state['world_size']} ranks, resumed with {self.world} (use the same number of ranks)")
        self.step = int(state["step"])
        self.layer_weights_init = state.get("layer_weights_init")
        rng = folder / tag / f"rng_rank{self.rank}.pt"
        if rng.is_file():
            set_rng_states(torch.load(rng, weights_only=False))
        if dist.is_main():
            drop_logs_after(Path(self.recipe.train.output_dir), self.step)
        if self.evaluator is not None:
            self.evaluator.resume(Path(self.recipe.train.output_dir), self.step)

    def save(self) -> None:
        """Atomic checkpoint of the current step (collective: every rank calls it)."""
        folder, step = checkpoint_dir(self.recipe), self.step
        tmp, final = folder / f"tmp-step-{step}", folder / f"step-{step}"
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        client_state = {"step": step, "data_position": {"step": step, "accum_index": 0},
                        "world_size": self.world, "recipe": self.recipe.to_yaml()}
        if self.layer_weights_init is not None:
            client_state["layer_weights_init"] = self.layer_weights_init
        self.engine.save_checkpoint(folder, tmp.name, client_state)
        torch.save(rng_states(), tmp / f"rng_rank{self.rank}.pt")
        TestHooks.crash("save-shards", step)
        dist.barrier()  # every rank's shards are on disk
        if dist.is_main():
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
            TestHooks.crash("save-renamed", step)
            pointer = folder / "latest.tmp"
            pointer.write_text(final.name, encoding="utf-8")
            os.replace(pointer, folder / "latest")
            TestHooks.crash("save-latest", step)
            self._prune(folder)
        dist.barrier()

    def _prune(self, folder: Path) -> None:
        steps = sorted(int(m.group(1)) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)))
        best = self.evaluator.best_step if self.evaluator is not None else None
        for step in steps_to_prune(steps, self.recipe.train.save_total_limit, best):
            shutil.rmtree(folder / f"step-{step}", ignore_errors=True)

    # -- one optimizer step -----------------------------------------------------------------------

    def _batch(self, accum_index: int) -> dict[str, dict[str, torch.Tensor]]:
        from dsembed.data.batches import collate

        t = self.recipe.train
        idx = self.order.indices(self.step, accum_index, self.rank, self.world, t.micro_batch_size)
        return collate([self.examples[i] for i in idx], self.tokenizer, self.recipe)

    def _last_good(self) -> str:
        tag = latest_tag(checkpoint_dir(self.recipe))
        return f"last good checkpoint: {checkpoint_dir(self.recipe) / tag}" if tag else "no checkpoint was saved"

    def _guard_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Stop before a non-finite loss is backpropagated (collective: every rank decides alike)."""
        step = self.step + 1
        loss = TestHooks.corrupt_loss(loss, step)
        finite = torch.tensor([1.0 if bool(torch.isfinite(loss.detach()).all()) else 0.0], device=loss.device)
        if torch.distributed.is_initialized() and self.world > 1:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if finite.item() < 1:
            raise TrainingError(f"step {step}: the loss is not finite (nan or inf); training stopped before its backward, "
                                f"{self._last_good()} (lower optim.lr, raise optim.warmup_steps or check the data)")
        return loss

    def train_step(self) -> list[BatchStats]:
        """One optimizer step: every contrastive batch's backward, then engine.step().

        Raises:
            TrainingError: a non-finite loss or gradient norm (the weights are left as they were).
        """
        t, loss_cfg = self.recipe.train, self.recipe.loss
        stats = []
        for a in range(t.gradient_accumulation_steps):
            batch = self._batch(a)
            last = a == t.gradient_accumulation_steps - 1
            if t.cache_chunk_size is not None:
                stats.append(cached_backward(self.engine, batch, loss_cfg.temperature, loss_cfg.gather_across_ranks,
                                             t.cache_chunk_size, boundary=last, loss_guard=self._guard_loss,
                                             options=self.loss_options))
            else:
                stats.append(plain_backward(self.engine, batch, loss_cfg.temperature, loss_cfg.gather_across_ranks,
                                            boundary=last, loss_guard=self._guard_loss, options=self.loss_options))
        TestHooks.dump_grads(self.engine, self.step + 1)
        self.step_lrs = self.engine.lr()  # the rates this step used (the schedule advances in step())
        self.engine.step()
        norm = self.engine.grad_norm()  # global (identical on every rank); DeepSpeed skipped a non-finite step
        if norm is not None and not math.isfinite(norm):
            raise TrainingError(f"step {self.step + 1}: the gradient norm is not finite ({norm}); the step was not applied, "
                                f"training stopped, {self._last_good()} (lower optim.lr or check the data)")
        self.step += 1
        TestHooks.crash("step", self.step)
        return stats

    # -- metrics ----------------------------------------------------------------------------------

    def _metrics(self, stats: list[BatchStats], seconds: float) -> dict[str, float]:
        n = len(stats)
        local = torch.tensor([sum(s.loss for s in stats) / n, sum(s.accuracy for s in stats) / n,
                              sum(s.positive_cosine for s in stats) / n, sum(s.negative_cosine for s in stats) / n,
                              sum(s.masked for s in stats) / n,
                              float(sum(s.tokens for s in stats))], dtype=torch.float64, device=self.engine.device)
        if torch.distributed.is_initialized() and self.world > 1:
            torch.distributed.all_reduce(local)
        loss, acc, pos, neg, masked, tokens = (local / torch.tensor([self.world] * 5 + [1], dtype=torch.float64,
                                                                     device=local.device)).tolist()
        t = self.recipe.train
        lrs = self.step_lrs
        metrics = {"train/loss": loss, "train/accuracy": acc, "train/positive_cosine": pos,
                   "train/negative_cosine": neg, "train/masked_per_query": masked, "train/lr": lrs[0],
                   "train/grad_norm": self.engine.grad_norm() or 0.0,
                   "perf/tokens_per_s": tokens / seconds,
                   "perf/samples_per_s": t.micro_batch_size * t.gradient_accumulation_steps * self.world / seconds,
                   "perf/step_time_s": seconds, "perf/peak_memory_mib": _peak_memory_mib()}
        if len(set(lrs)) > 1:
            metrics["train/lr_head"] = max(lrs, key=lambda lr: abs(lr - lrs[0]))
        return metrics

    def _gather_layer_weights(self) -> torch.Tensor | None:
        """The head's layer weights W [K, D] as a whole CPU float32 copy (collective under ZeRO-3:
        every rank calls it), or None when the head has none."""
        weights = getattr(getattr(self.model, "pooler", None), "layer_weights", None)
        if not isinstance(weights, torch.nn.Parameter):
            return None
        with self.engine.gathered([weights]):
            return weights.detach().float().cpu().clone()  # [K, D]

    def _log_layer_weights(self, monitor: Any) -> float | None:
        """Log W (and its change from step 0) to TensorBoard; returns ||W - W0|| / ||W0|| or None."""
        from dsembed.training.monitor import relative_change

        full = self._gather_layer_weights()  # [K, D]
        if full is None:
            return None
        rows, whole = None, None  # an older checkpoint's run has no W0 to measure from
        if self.layer_weights_init is not None:
            rows, whole = relative_change(full, self.layer_weights_init)  # [K], float | None
        monitor.log_layer_weights(self.step, full, self.model.pooler.tapped_layers, change=rows)
        return whole

    def _report_skipped(self, monitor: Any) -> None:
        """data.skip_malformed: the count of skipped rows on the console and in TensorBoard."""
        skipped = getattr(self.examples, "skipped", 0)
        if not skipped:
            return
        first = self.examples.problems[0] if self.examples.problems else ""
        message = f"data: skipped {skipped} malformed row(s), trained on {len(self.examples)} (first: {first})"
        monitor.write(message)
        monitor.log_text("data/skipped_rows", message, self.step)
        if monitor.writer is not None:
            monitor.writer.add_scalar("data/skipped_rows", skipped, self.step)

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> int:
        """Train to max_steps (or stop_after); returns the last completed step."""
        from dsembed.training.monitor import Monitor

        t, log = self.recipe.train, self.recipe.logging
        last = min(t.max_steps, t.stop_after or t.max_steps)
        out = Path(t.output_dir)
        monitor = Monitor(out, self.recipe, total_steps=t.max_steps, start_step=self.step)
        metrics_file = open(out / "metrics.jsonl", "a", encoding="utf-8") if dist.is_main() else None
        try:
            if self.step == 0:
                monitor.log_recipe(self.recipe.to_yaml())
            elif dist.is_main():
                monitor.write(f"resumed from {checkpoint_dir(self.recipe) / f'step-{self.step}'}")
            self._report_skipped(monitor)
            self.engine.train()
            while self.step < last:
                start = time.perf_counter()
                stats = self.train_step()
                metrics = self._metrics(stats, time.perf_counter() - start)
                if self.step % log.histogram_steps == 0 or self.step == last:
                    change = self._log_layer_weights(monitor)
                    if change is not None:
                        metrics["layer_weights/change"] = change  # into metrics.jsonl and the run summary
                new_best = False
                if self.evaluator is not None and self.evaluator.due(self.step):
                    scores, new_best = self.evaluator.evaluate(self.model, self.step)
                    metrics.update(scores)
                    if new_best:
                        self.evaluator.write_best(out)
                if self.step % t.log_steps == 0 or self.step == last or "eval/mean" in metrics:
                    monitor.log_scalars(self.step, metrics)
                    if metrics_file is not None:
                        metrics_file.write(json.dumps({"step": self.step, **metrics}) + "\n")
                        metrics_file.flush()
                else:
                    monitor.update(self.step)
                if self.step % t.save_steps == 0 or self.step == last or new_best:
                    self.save()  # a new best is checkpointed, so that best.json always names a checkpoint
            TestHooks.dump_embeddings(self.model)
        finally:
            monitor.close()
            if metrics_file is not None:
                metrics_file.close()
        return self.step


def _peak_memory_mib() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train(recipe: Recipe, base_dir: Path | None = None) -> int:
    """Train a validated recipe; returns the last completed step. Distributed is shut down after."""
    from dsembed.training.engine import shutdown_distributed

    # Backward passes on CPU produce denormal floats (tiny gradients deep in the network), which x86
    # CPUs compute 10-20x slower: SmolLM2-135M LoRA forward+backward of 48 short texts took 25-48 s
    # instead of 2.4 s. Flushing them to zero changes no result measurably; a no-op on GPUs.
    torch.set_flush_denormal(True)
    try:
        step = Trainer(recipe, base_dir).run()
        # every rank is done before the group goes, as the evaluation ranks do (a gloo group torn
        # down while a peer still reads from it can abort that peer). Not on the error path, where a
        # peer may be gone. A 2-rank CPU run on an overloaded machine still aborted once at exit after
        # finishing ("terminate called without an active exception"): open, see the stop note.
        dist.barrier()
        return step
    finally:
        shutdown_distributed()
