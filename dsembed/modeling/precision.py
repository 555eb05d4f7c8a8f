"""The floating-point type a model computes in: `model.dtype: auto` resolved once, from the hardware.

`auto` means bfloat16 where the device computes it natively and float32 elsewhere:
- CUDA: `torch.cuda.is_bf16_supported(including_emulation=False)` (Ampere and newer);
- x86 CPUs: AMX-BF16 or AVX512-BF16, as torch reports them (`torch.cpu._is_amx_tile_supported`,
  `torch.cpu._is_avx512_bf16_supported`; the `amx_bf16` / `avx512_bf16` flags of /proc/cpuinfo when
  torch lacks these functions), with oneDNN's bf16 path available (`torch.ops.mkldnn.
  _is_mkldnn_bf16_supported()`) and not capped below bf16 by ONEDNN_MAX_CPU_ISA. On such a CPU a
  bf16 matmul of SmolLM2's shapes ran 5.5x faster than float32 (README, Benchmarks);
- every other CPU (x86 without those units, where torch emulates bf16 and runs it slower than
  float32; other architectures, not measured here): float32.
Explicit `float32`, `bfloat16` and `float16` keep their meaning. `resolve_recipe` is called once by
each entry point (training, evaluation of a recipe, the probe, benchmarks); it prints one line
naming the choice and the reason and returns the recipe with the concrete dtype, which is what run
directories, checkpoints and exports record. Lower layers that still meet `auto` (a library user
building a model from a raw recipe) resolve it silently to the same answer (`torch_dtype`).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dsembed.config import Recipe

AUTO = "auto"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that still include bf16 instructions
_BF16_ISAS = ("ALL", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16")


@dataclass(frozen=True)
class Precision:
    """A resolved `model.dtype`: the concrete name and why it was chosen."""

    requested: str  # as the recipe says: auto, float32, bfloat16 or float16
    dtype: str  # float32, bfloat16 or float16
    reason: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def line(self) -> str:
        """The one printed line: `dtype: auto -> bfloat16 (<why>)`."""
        head = f"dtype: {self.requested} -> {self.dtype}" if self.requested == AUTO else f"dtype: {self.dtype}"
        return f"{head} ({self.reason})"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _torch_says(name: str, flag: str, flags: set[str]) -> bool:
    probe = getattr(torch.cpu, name, None)
    if probe is not None:
        try:
            return bool(probe())
        except RuntimeError:  # pragma: no cover - torch built without cpuinfo
            pass
    return flag in flags


def cpu_bf16_units() -> dict[str, bool]:
    """Which bf16 units this CPU has, as torch (or /proc/cpuinfo) reports them.

    Returns:
        {"amx_bf16": bool, "avx512_bf16": bool}; False on non-x86 machines.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        return {"amx_bf16": False, "avx512_bf16": False}
    flags = _cpu_flags()
    # torch's AMX probe checks amx_tile (and asks the kernel for the tile state); bf16 tiles need amx_bf16 too
    amx = _torch_says("_is_amx_tile_supported", "amx_tile", flags) and ("amx_bf16" in flags or not flags)
    return {"amx_bf16": amx, "avx512_bf16": _torch_says("_is_avx512_bf16_supported", "avx512_bf16", flags)}


def native_bf16(device: str | torch.device | None = None) -> tuple[bool, str]:
    """Whether `device` computes bf16 natively, and why (a short phrase for the printed line).

    Args:
        device: "cpu", "cuda", "cuda:1", ...; None: cuda when available, else cpu.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        name = torch.cuda.get_device_name(dev)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} computes bf16 natively"
        return False, f"{name} has no native bf16"
    if dev.type != "cpu":
        return False, f"device {dev.type}: native bf16 not known to dsembed"
    cpu = cpu_model()
    units = cpu_bf16_units()
    have = [label for key, label in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if units[key]]
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"{cpu} ({platform.machine()}): native bf16 is detected on x86 CPUs only (AMX / AVX512-BF16)"
    if not have:
        return False, f"{cpu} has neither AMX-BF16 nor AVX512-BF16: bf16 would be emulated, slower than float32"
    try:
        onednn = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    if not onednn:
        return False, f"{cpu} has {' and '.join(have)} but this torch has no oneDNN bf16 path"
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if cap and cap not in _BF16_ISAS and "AMX" not in cap and "AVX10" not in cap:
        return False, f"{cpu} has {' and '.join(have)} but ONEDNN_MAX_CPU_ISA={cap} keeps oneDNN from using them"
    return True, f"{cpu} has {' and '.join(have)}: bf16 matmuls run natively"


@functools.lru_cache(maxsize=None)
def _resolve(requested: str, device_type: str) -> Precision:
    if requested != AUTO:
        return Precision(requested, requested, "as the recipe says")
    native, why = native_bf16(device_type)
    return Precision(AUTO, "bfloat16" if native else "float32", why)


def resolve_dtype(requested: str, device: str | torch.device | None = None) -> Precision:
    """`model.dtype` as a concrete dtype, with the reason; the hardware is probed once per process.

    Args:
        requested: auto, float32, bfloat16 or float16.
        device: where the model will compute (None: cuda when available, else cpu).

    Raises:
        ValueError: an unknown dtype name.
    """
    if requested != AUTO and requested not in DTYPES:
        raise ValueError(f"model.dtype = {requested!r}: one of auto, {', '.join(DTYPES)}")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return _resolve(requested, dev.type)


def torch_dtype(requested: str, device: str | torch.device | None = None) -> torch.dtype:
    """The torch dtype of a `model.dtype` value; `auto` resolved silently (see resolve_dtype)."""
    return resolve_dtype(requested, device).torch_dtype


def resolve_recipe(recipe: Recipe, device: str | torch.device | None = None,
                   say: Callable[[str], None] | None = None) -> Recipe:
    """The recipe with `model.dtype` concrete; with `auto`, `say` gets the one line naming the choice.

    Args:
        recipe: any recipe (a concrete dtype passes through unchanged, nothing printed).
        device: where the model will compute (None: cuda when available, else cpu).
        say: where the line goes (default: stderr); pass a no-op on ranks other than 0.
    """
    if recipe.model.dtype != AUTO:
        return recipe
    choice = resolve_dtype(AUTO, device)
    (say or _stderr)(choice.line())
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, dtype=choice.dtype))


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
