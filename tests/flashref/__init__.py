"""Put the reference flash-attn (tests/flashref/flash_attn, plain PyTorch) under transformers for one test.

`install(monkeypatch)` does exactly this, all undone by pytest at the end of the test:
1. prepends tests/flashref to sys.path, so `import flash_attn` and `importlib.util.find_spec`
   (dsembed's own check in modeling/backbone.py) find the reference package;
2. patches transformers' `is_flash_attn_2_available` to True where transformers calls it for the
   flash_attention_2 path: in `transformers.modeling_flash_attention_utils` (its `_lazy_imports`
   picks `from flash_attn import ...` with it) and in `FLASH_ATTENTION_COMPATIBILITY_MATRIX[2]`
   (`PreTrainedModel._check_and_adjust_attn_implementation` and `_flash_attn_can_dispatch` read it).
   Why: transformers 5 answers False on a machine without CUDA/MLU/MUSA whatever is installed
   (`is_torch_cuda_available() and version >= 2.3.3`, utils/import_utils.py), and caches the answer;
3. forgets transformers' loaded flash functions (`_loaded_implementation` and the function globals
   of modeling_flash_attention_utils) so they are imported from the reference package now and
   forgotten again afterwards;
4. `uninstall()` removes `flash_attn*` from sys.modules at the end, so later tests see no flash-attn
   (the `flash_reference` fixture of tests/conftest.py calls both).
Nothing else of transformers is patched: its flash_attention_forward, the mask builder
(flash_attention_mask), the unpadding (_upad_input), the kwargs processing and the `causal`
argument (config.is_causal, passed down as a keyword) all run as they would on a GPU. float32 models are accepted by transformers'
checks (it only warns that flash-attn wants fp16/bf16), so comparisons are made in float32.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def install(monkeypatch: Any) -> Any:
    """Make transformers' flash_attention_2 run on the reference package; returns the flash_attn module."""
    import transformers.modeling_flash_attention_utils as fa_utils

    def available(*args: Any, **kwargs: Any) -> bool:
        return True

    monkeypatch.syspath_prepend(str(HERE))
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(fa_utils, "is_flash_attn_2_available", available)
    monkeypatch.setitem(fa_utils.FLASH_ATTENTION_COMPATIBILITY_MATRIX[2], "general_availability_check", available)
    for name in ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn", "_pad_fn",
                 "_unpad_fn", "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn"):
        monkeypatch.setattr(fa_utils, name, None)
    import flash_attn

    if not str(Path(flash_attn.__file__)).startswith(str(HERE)):
        raise RuntimeError(f"a real flash_attn is imported ({flash_attn.__file__}), not the reference")
    for key in flash_attn.CALLS:
        flash_attn.CALLS[key] = 0
    return flash_attn



def uninstall() -> None:
    """Drop the reference modules from sys.modules (call after the test; monkeypatch undoes the rest)."""
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        del sys.modules[name]
