"""Which files a complete DeepSpeed checkpoint folder holds, and whether each one is readable.

Checkpoints are written atomically (dsembed.training.trainer), so a damaged one means the disk or a
copy went wrong afterwards: a quota hit, a node lost during an rsync, a half-synced shared
filesystem. Two checks find that before DeepSpeed reads a shard:
- every shard a checkpoint of its world size and ZeRO stage needs is present (the world size and
  stage come from the client state of a model-state file);
- every shard is a whole torch file: a torch file is a zip archive whose directory sits at the end
  (a truncated copy has none) and whose members carry CRC-32 checksums, so reading each member
  once finds a cut-short or overwritten byte range. The reading can be split over ranks
  (`part`): each rank reads about 1/world of the checkpoint, which it reads anyway to resume.

Used by the trainer's resume (dsembed.training.run_dir) and by dsembed-consolidate; no deepspeed
import.
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import torch

MODEL_STATES = re.compile(r"^(zero_pp_rank_(\d+)_)?mp_rank_00_model_states\.pt$")
OPTIM_STATES = re.compile(r"^(bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
RNG_STATES = re.compile(r"^rng_rank(\d+)\.pt$")


def damaged_file(path: Path) -> str | None:
    """Why the torch file `path` cannot be used, or None when its zip directory and every CRC-32 agree."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except OSError as err:
        return f"unreadable ({err})"
    except Exception as err:  # noqa: BLE001 - BadZipFile, zlib.error, EOFError, NotImplementedError...: a bad archive
        return f"truncated or corrupt ({err})"
    return None if bad is None else f"damaged ({bad} fails its CRC-32 check)"


def _client_state(ckpt: Path, models: list[str]) -> dict[str, Any] | None:
    """The client state of the first model-state file whose zip directory is intact (memory-mapped)."""
    for name in models:
        if not zipfile.is_zipfile(ckpt / name):
            continue
        try:
            state = torch.load(ckpt / name, map_location="cpu", weights_only=False, mmap=True)
        except Exception:  # noqa: BLE001 - an unpicklable file is reported as damaged by its CRC check
            continue
        if isinstance(state, dict):
            return state
    return None


def _missing(ckpt: Path, names: list[str], state: dict[str, Any], rng: bool) -> list[str]:
    world = int(state.get("world_size") or state.get("dp_world_size") or 1)
    stage3_names = any(MODEL_STATES.match(n) and n.startswith("zero_pp_rank_") for n in names)
    stage = int(((state.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 3 if stage3_names else 2))
    problems = []
    models = {int(m.group(2)) for n in names if (m := MODEL_STATES.match(n)) and m.group(2) is not None}
    optims = {int(m.group(2)) for n in names if (m := OPTIM_STATES.match(n))}
    rngs = {int(m.group(1)) for n in names if (m := RNG_STATES.match(n))}
    wanted = [("model-state", models, "zero_pp_rank_{r}_mp_rank_00_model_states.pt")] if stage == 3 else []
    if stage >= 1:
        wanted.append(("optimizer-state", optims, "[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
    if rng:
        wanted.append(("RNG-state", rngs, "rng_rank{r}.pt"))
    for what, present, pattern in wanted:
        for r in range(world):
            if r not in present:
                problems.append(f"{pattern.format(r=r)} is missing ({len(present & set(range(world)))} of {world} "
                                f"{what} shards present; saved by {world} ranks)")
    return problems


def checkpoint_problems(ckpt: Path, part: tuple[int, int] = (0, 1), rng: bool = True) -> tuple[list[str], dict[str, Any]]:
    """What makes the checkpoint folder `ckpt` unusable; an empty list when it is complete.

    Args:
        ckpt: a checkpoints/step-N folder.
        part: (index, count): read and CRC-check only the shard files i with i % count == index
            (one rank's share; the presence checks are always complete).
        rng: require dsembed's rng_rank<r>.pt files (to resume; an export does not need them).

    Returns:
        (problems, client state): each problem starts with the shard's file name; the client state
        (step, world_size, recipe, ...) of a readable model-state file, {} when there is none.
    """
    names = sorted(p.name for p in ckpt.iterdir()) if ckpt.is_dir() else []
    models = [n for n in names if MODEL_STATES.match(n)]
    shards = [n for n in names if MODEL_STATES.match(n) or OPTIM_STATES.match(n) or (rng and RNG_STATES.match(n))]
    index, count = part
    problems = [f"{name} is {why}" for i, name in enumerate(shards)
                if i % count == index and (why := damaged_file(ckpt / name)) is not None]
    state = _client_state(ckpt, models)
    if not models:
        problems.append("*model_states.pt is missing (no model-state file: not a DeepSpeed checkpoint, or an incomplete copy)")
    elif state is None:
        problems.append(f"{models[0]} cannot be read (no model-state file with a readable client state)")
    else:
        problems += _missing(ckpt, names, state, rng)
    return problems, state or {}
