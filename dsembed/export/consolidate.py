"""Consolidate a DeepSpeed checkpoint into one folder that is a dsembed model and a sentence-transformers model.

Works on a CPU machine without the training processes: the ZeRO-2 / ZeRO-3 shards are merged by
DeepSpeed's zero_to_fp32 (through dsembed.training.engine, the only deepspeed importer), the model is rebuilt
from the recipe stored in the checkpoint, and the merged state dict is loaded into it.

Folder written (OUT_DIR):
    config.json, model*.safetensors, tokenizer files   the backbone as a plain transformers folder
                                        (LoRA merged; bf16/fp16 runs merged and written in float32;
                                        config.is_causal = the attention mode); the tokenizer appends
                                        the EOS itself, pads on the recipe's side, no chat template
    dsembed.json, recipe.yaml, pooler.safetensors   EmbeddingModel.save's files ([adapter/] with --keep-adapter)
    modules.json + module configs       sentence-transformers, in one of three forms (see
                                        write_sentence_transformers_files): plain Transformer/Pooling/
                                        Normalize, the generated dsembed_model.py, or dsembed_st.py
    config_sentence_transformers.json   prompts ("query" = the training instruction in the query
                                        template; per MTEB task / task type, as dsembed-evaluate uses)
    training.json                       the run's learning curve in a few numbers (dsembed.training.run_summary;
                                        absent when the run directory has no metrics.jsonl)
    README.md                           model card (dsembed/export/model_card.py): variant, base model, data,
                                        steps, loading without dsembed; results after dsembed-evaluate
It is written to OUT_DIR.tmp-<pid> and renamed at the end, so OUT_DIR is either complete or absent.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from dsembed.atomic import write_text_atomic
from dsembed.config import recipe_from_dict
from dsembed.errors import CheckpointError, UserError
from dsembed.export.model_card import model_card
from dsembed.export.st_files import sentence_transformers_prompts, write_sentence_transformers_files  # noqa: F401 - public here too
from dsembed.training.run_summary import SUMMARY_FILE, summarize_metrics

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class ExportSummary:
    """What `export_checkpoint` wrote: the folder, its files and the parameter counts."""

    out_dir: Path
    checkpoint: Path
    step: int | None
    files: list[str] = field(default_factory=list)
    backbone_parameters: int = 0
    adapter_parameters: int = 0
    head_parameters: int = 0
    dim: int = 0
    world_size: int | None = None
    lora: str = "none"  # "merged", "adapter" or "none"
    form: str = ""  # sentence-transformers form: "plain", "portable" or "dsembed"
    backbone_dtype: str = ""


# ----------------------------------------------------------------------------- finding the checkpoint


def resolve_checkpoint(source: str | Path, step: int | None = None) -> tuple[Path, str]:
    """The checkpoints folder and tag that `source` names.

    Args:
        source: a run directory (holding checkpoints/), a checkpoints folder, or one step-N folder.
        step: pick checkpoints/step-N instead of the one named in `latest`.

    Returns:
        (checkpoints folder, tag such as "step-30").

    Raises:
        CheckpointError: nothing there, an unfinished tmp-* save, no `latest`, or no such step.
    """
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory or checkpoint")
    if path.name.startswith("tmp-"):
        raise CheckpointError(f"{path}: an unfinished checkpoint save (tmp-*); export a complete step-N folder or the run directory")
    if _STEP_DIR.match(path.name) and path.is_dir():
        if step is not None and path.name != f"step-{step}":
            raise CheckpointError(f"{path}: --step {step} does not match this checkpoint folder (give the run directory instead)")
        return path.parent, path.name
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if step is not None:
        if not (folder / f"step-{step}").is_dir():
            have = sorted((int(m.group(1)) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name))), reverse=True)
            raise CheckpointError(f"{folder}: no checkpoint step-{step} (available steps: {have or 'none'})")
        return folder, f"step-{step}"
    latest = folder / "latest"
    if not latest.is_file():
        raise CheckpointError(f"{folder}: no `latest` file, so no complete checkpoint (train until a save finishes, or pass --step N)")
    tag = latest.read_text(encoding="utf-8").strip()
    if not (folder / tag).is_dir():
        raise CheckpointError(f"{latest}: names {tag!r}, which does not exist (pass --step N for another checkpoint)")
    return folder, tag


def check_checkpoint(folder: Path, tag: str) -> dict[str, Any]:
    """Verify that every rank's shards are present and whole (zip directory and CRC-32 of every
    member, dsembed.training.checkpoint_files); return the client state.

    Returns:
        The saved client state (step, world_size, recipe YAML, ...), read memory-mapped.

    Raises:
        CheckpointError: a missing, truncated or damaged shard (named), or no recipe in the checkpoint.
    """
    from dsembed.training.checkpoint_files import checkpoint_problems

    ckpt = folder / tag
    problems, state = checkpoint_problems(ckpt, rng=False)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise CheckpointError(f"{ckpt}: {problems[0]}{more}; nothing was written: restore the shard from a good copy, "
                              "or export another step with --step N")
    if not isinstance(state.get("recipe"), str):
        raise CheckpointError(f"{ckpt}: no recipe in the checkpoint's client state (not written by dsembed-train)")
    return {k: state[k] for k in ("step", "world_size", "recipe") if k in state}


# ----------------------------------------------------------------------------- rebuilding the model


def load_from_checkpoint(folder: Path, tag: str, client_state: dict[str, Any] | None = None,
                         base_dir: Path | None = None) -> Any:
    """The trained EmbeddingModel of a checkpoint, on CPU in eval mode (LoRA still separate).

    Raises:
        CheckpointError: an incomplete checkpoint, or one that does not fit its recipe's model.
    """
    from dsembed.training.engine import fp32_state_dict
    from dsembed.modeling import build_model

    state = client_state if client_state is not None else check_checkpoint(folder, tag)
    recipe = recipe_from_dict(yaml.safe_load(state["recipe"]), f"{folder / tag} (client state recipe)")
    model = build_model(recipe, base_dir, attn_fallback=True)  # a GPU (flash-attn) run exports on CPU
    log = io.StringIO()  # zero_to_fp32 prints progress bars and notes; the tool prints its own summary
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            weights = fp32_state_dict(folder, tag)
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged shard surfaces as many exception types
        raise CheckpointError(f"{folder / tag}: incomplete or unreadable DeepSpeed checkpoint ({type(err).__name__}: {err})") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder / tag}: does not fit the recipe's model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


# ----------------------------------------------------------------------------- the export


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> Path:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise UserError(f"{out_dir}: already exists and is not empty (choose another folder or pass --overwrite)")
    tmp = out_dir.parent / f"{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _publish(tmp: Path, out_dir: Path) -> None:
    """Replace out_dir by tmp; an old out_dir is moved aside first and deleted only after the rename."""
    old = None
    if out_dir.is_dir() and any(out_dir.iterdir()):
        old = out_dir.parent / f"{out_dir.name}.old-{os.getpid()}"
        os.rename(out_dir, old)
    elif out_dir.is_dir():
        out_dir.rmdir()
    elif out_dir.exists():
        out_dir.unlink()
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(source: str | Path, out_dir: str | Path, keep_adapter: bool = False, step: int | None = None,
                      overwrite: bool = False, base_dir: Path | None = None,
                      say: Callable[[str], None] = lambda s: None) -> ExportSummary:
    """Consolidate a checkpoint into a dsembed + sentence-transformers model folder.

    Args:
        source: run directory, checkpoints folder or step-N folder.
        out_dir: the folder to create (must be absent or empty unless `overwrite`).
        keep_adapter: write LoRA as a peft adapter (adapter/) instead of merging it.
        step: export checkpoints/step-N rather than `latest`.
        overwrite: replace a non-empty out_dir (only once the new folder is complete).
        base_dir: folder relative model paths of the recipe resolve against.
        say: progress messages.

    Returns:
        The summary (files and parameter counts).

    Raises:
        CheckpointError: a missing or incomplete checkpoint.
        UserError: out_dir not empty without overwrite.
    """
    out_dir = Path(out_dir)
    folder, tag = resolve_checkpoint(source, step)
    client_state = check_checkpoint(folder, tag)
    tmp = _prepare_out_dir(out_dir, overwrite)
    say(f"consolidating {folder / tag} (saved by {client_state.get('world_size', '?')} ranks)")
    model = load_from_checkpoint(folder, tag, client_state, base_dir)
    recipe = model.recipe
    is_peft = hasattr(model.backbone, "peft_config")
    summary = ExportSummary(out_dir=out_dir, checkpoint=folder / tag, step=client_state.get("step"),
                            world_size=client_state.get("world_size"),
                            lora=("adapter" if keep_adapter else "merged") if is_peft else "none")
    lora_params = sum(p.numel() for n, p in model.backbone.named_parameters() if "lora_" in n)
    summary.backbone_parameters = sum(p.numel() for p in model.backbone.parameters()) - lora_params
    summary.adapter_parameters = lora_params if summary.lora == "adapter" else 0
    summary.head_parameters = sum(p.numel() for p in model.pooler.parameters())
    summary.dim = model.dim
    if keep_adapter and not is_peft:
        say("note: --keep-adapter ignored: the recipe trained without LoRA (lora.enabled: false)")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)  # only once the model loaded: a failure writes nothing
        model.save(tmp, merge_lora=not keep_adapter)
        summary.form = write_sentence_transformers_files(tmp, model, keep_adapter and is_peft)
        # the run's learning curve in a few numbers: a collapsed run exports and evaluates like any other
        training = summarize_metrics(folder.parent / "metrics.jsonl", up_to_step=summary.step)
        if training is not None:
            write_text_atomic(tmp / SUMMARY_FILE, json.dumps(training, indent=1) + "\n")
        summary.backbone_dtype = json.loads((tmp / "dsembed.json").read_text(encoding="utf-8"))["backbone_dtype"]
        prompts = json.loads((tmp / "config_sentence_transformers.json").read_text(encoding="utf-8"))["prompts"]
        (tmp / "README.md").write_text(model_card(recipe, summary, prompts), encoding="utf-8")
        summary.files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary
