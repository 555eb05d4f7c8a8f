"""Every DeepSpeed call in dsembed: distributed init, the ds-config, the engine, steps, checkpoints.

This is the only module that imports deepspeed (DESIGN.md, boundaries). It treats the model as a
plain `nn.Module` built by a factory, so that under ZeRO-3 the factory runs after transformers'
`HfDeepSpeedConfig` exists and the backbone's weights load already partitioned.

Gradient-accumulation boundaries are owned by the caller (`set_boundary` before each backward,
one `step()` per optimizer step): a cached (GradCache) step runs several backwards per contrastive
batch, which DeepSpeed's own micro-step counter cannot know about.
"""
from __future__ import annotations

import contextlib
import math
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from dsembed.config import Recipe
from dsembed.errors import CheckpointError, RecipeError
from dsembed.training.ds_config import build_ds_config, finish_ds_config

# DeepSpeed's import prints accelerator detection at WARNING; keep the console for the user's output.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
import deepspeed  # noqa: E402
from deepspeed.utils import logger as _ds_logger  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402

# DeepSpeed 0.19 still calls collectives torch 2.13 renamed; the warning repeats every step.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
_NO_DECAY = ("bias", "norm", "latent", "layer_weights")


# ----------------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> None:
    """Start torch.distributed the DeepSpeed way; DeepSpeed picks the backend (gloo on CPU).

    Without a launcher (plain `python -m dsembed.train`) DeepSpeed would look for MPI, so a
    single-process world is described through the environment first.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    _ds_logger.setLevel("WARNING")
    deepspeed.init_distributed(verbose=False)


def shutdown_distributed() -> None:
    """Destroy the process group (gloo otherwise warns or hangs at interpreter exit)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _hidden_size(model: nn.Module) -> int:
    for module in (model, getattr(model, "backbone", None)):
        size = getattr(getattr(module, "config", None), "hidden_size", None)
        if isinstance(size, int):
            return size
    for module in model.modules():
        size = getattr(getattr(module, "config", None), "hidden_size", None)
        if isinstance(size, int):
            return size
    return 1024  # a model without a transformers config: DeepSpeed-sized defaults are fine


# ----------------------------------------------------------------------------- optimizer


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """AdamW groups: backbone / head x decay / no decay (biases, norms, latents, layer weights).

    Shapes are read from `ds_shape` under ZeRO-3, where `param.shape` is an empty partition.
    """
    opt = recipe.optim
    head = {id(p) for p in getattr(model, "head_parameters", lambda: iter(()))()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        ndim = len(getattr(param, "ds_shape", param.shape))
        decay = ndim >= 2 and not any(tag in name.lower() for tag in _NO_DECAY)
        groups.setdefault((id(param) in head, decay), []).append(param)
    out = []
    for (is_head, decay), params in sorted(groups.items()):
        lr = opt.head_lr if (is_head and opt.head_lr is not None) else opt.lr
        out.append({"params": params, "lr": lr, "weight_decay": opt.weight_decay if decay else 0.0,
                    "name": f"{'head' if is_head else 'backbone'}{'' if decay else '_no_decay'}"})
    if not out:
        raise RecipeError(f"{recipe.source or '<recipe>'}: nothing to train (lora.enabled is false and no parameter requires grad)")
    return out


def _scheduler_factory(recipe: Recipe) -> Callable[[torch.optim.Optimizer], Any]:
    from transformers import get_scheduler

    opt = recipe.optim
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[opt.scheduler]
    return lambda optimizer: get_scheduler(name, optimizer, num_warmup_steps=opt.warmup_steps,
                                           num_training_steps=recipe.train.max_steps)


# ----------------------------------------------------------------------------- the engine


class Engine:
    """Owns the DeepSpeed engine for one training run.

    Build with `Engine.create`; `module` is the wrapped model (an `nn.Module` whose forward takes
    input_ids and attention_mask).
    """

    def __init__(self, ds_engine: Any, ds_config: dict[str, Any], hf_ds_config: Any) -> None:
        self.ds = ds_engine
        self.ds_config = ds_config
        # transformers reads the ZeRO-3 flag through a weak global reference; keep it alive.
        self._hf_ds_config = hf_ds_config

    @classmethod
    def create(cls, recipe: Recipe, model_factory: Callable[[], nn.Module]) -> "Engine":
        """Build the ds-config, the model (partitioned at load under ZeRO-3), AdamW and the schedule.

        Args:
            recipe: validated recipe.
            model_factory: builds the model; called after `HfDeepSpeedConfig` exists (LoRA is
                applied inside it, outside zero.Init, by dsembed.modeling.build_model).

        Returns:
            The engine, distributed already initialised.

        Raises:
            RecipeError: a bad template, an unfillable "auto", or nothing trainable.
        """
        init_distributed()
        ds_config = build_ds_config(recipe)
        hf_config = None
        if ds_config["zero_optimization"].get("stage", 0) == 3:
            from transformers.integrations import HfDeepSpeedConfig

            hf_config = HfDeepSpeedConfig(ds_config)
        model = model_factory()
        finish_ds_config(ds_config, _hidden_size(model))
        groups = param_groups(model, recipe)
        opt = recipe.optim
        if ds_config["zero_optimization"].get("offload_optimizer", {}).get("device", "none") == "cpu":
            # DeepSpeed refuses torch's AdamW with an offloaded optimizer: its CPU Adam (a JIT-built
            # op, AdamW mode) steps the fp32 partitions where they live.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                                         weight_decay=opt.weight_decay, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                                          weight_decay=opt.weight_decay)
        ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                                  lr_scheduler=_scheduler_factory(recipe),
                                                  dist_init_required=False)
        return cls(ds_engine, ds_config, hf_config)

    # -- forward / backward / step ------------------------------------------------------------

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    @property
    def device(self) -> torch.device:
        return self.ds.device

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config["zero_optimization"].get("stage", 0))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Always through DeepSpeed's forward: under ZeRO-3 it advances the micro-step counter that
        # decides whether the next backward accumulates into, or overwrites, the gradient buffer.
        return self.ds(*args, **kwargs)

    def set_boundary(self, is_boundary: bool) -> None:
        """Whether the next backward is the last one before `step()` (gradients reduced then)."""
        self.ds.set_gradient_accumulation_boundary(is_boundary)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        """Backward through DeepSpeed; with scale_wrt_gas the loss is divided by the accumulation."""
        self.ds.backward(loss, scale_wrt_gas=scale_wrt_gas)

    def step(self) -> None:
        """Optimizer step + schedule; call once per optimizer step, after a boundary backward.

        A non-finite gradient norm leaves the weights untouched: DeepSpeed's ZeRO optimizers skip
        such a step themselves (and report an infinite norm); without ZeRO it is skipped here.
        """
        self._own_norm = None
        if self.zero_stage == 0:  # DeepSpeed reports a norm only from its ZeRO/mixed-precision optimizers
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            self._own_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            if not math.isfinite(self._own_norm):
                return
        self.ds.set_gradient_accumulation_boundary(True)
        self.ds.step()

    def grad_norm(self) -> float | None:
        """Global gradient norm of the last optimizer step (before clipping)."""
        norm = self.ds.get_global_grad_norm()
        if norm is None:
            norm = getattr(self, "_own_norm", None)
        return None if norm is None else float(norm)

    def lr(self) -> list[float]:
        return [group["lr"] for group in self.ds.optimizer.param_groups]

    def train(self) -> None:
        self.ds.train()

    # -- parameters -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def gathered(self, params: Iterable[nn.Parameter]) -> Iterator[None]:
        """Full (un-partitioned) parameters inside the block; collective: every rank must enter."""
        params = list(params)
        if self.zero_stage == 3 and params:
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield
        else:
            yield

    def full_grads(self) -> dict[str, torch.Tensor]:
        """Reduced full gradients by parameter name, after the boundary backward and before `step()`.

        For tests and debugging. Under ZeRO-3 each rank holds a partition and DeepSpeed rebuilds
        the full tensor with an all_gather, so every rank must call this.
        """
        out = {}
        for name, param in self.module.named_parameters():
            if not param.requires_grad:
                continue
            grad = safe_get_full_grad(param)
            if grad is None:
                continue
            out[name] = grad.detach().float().cpu().clone()
        return out

    # -- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self, folder: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Write a complete DeepSpeed checkpoint to folder/tag on every rank (collective)."""
        self.ds.save_checkpoint(str(folder), tag=tag, client_state=client_state, save_latest=False)

    def load_checkpoint(self, folder: Path, tag: str) -> dict[str, Any]:
        """Restore module, optimizer and schedule from folder/tag; returns the client state.

        Raises:
            CheckpointError: the checkpoint is missing or unreadable.
        """
        path, client_state = self.ds.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"{folder / tag}: DeepSpeed could not load this checkpoint (delete it or set train.resume: never with train.overwrite: true)")
        return client_state or {}


def fp32_state_dict(folder: Path, tag: str) -> dict[str, torch.Tensor]:
    """Every parameter of a saved checkpoint as one fp32 state dict (ZeRO shards merged, on CPU).

    Raises:
        CheckpointError: folder/tag is not a complete DeepSpeed checkpoint.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not (Path(folder) / tag).is_dir():
        raise CheckpointError(f"{Path(folder) / tag}: no such checkpoint")
    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{Path(folder) / tag}: incomplete or unreadable DeepSpeed checkpoint ({err})") from None
