"""The self-contained sentence-transformers module of an exported model with a trainable head.

`dsembed-consolidate` writes `dsembed_model.py` into the model folder (for latent_attention and
multi_layer_attention heads, and for query templates with text after `{query}`): one file that
imports only torch, transformers, safetensors (a transformers dependency) and sentence-transformers,
so `SentenceTransformer(folder, trust_remote_code=True)` works where dsembed is not installed.

One implementation of the heads: the file is GENERATED from dsembed's own source
(`inspect.getsource` of the pooling heads, the layer taps, the attention switch and the
tokenization routines, then `PortableEmbedding` below), never written by hand, so it cannot drift
from `dsembed.modeling`. `module_source()` returns its text; tests compile it and compare it with
dsembed's classes.

`PortableEmbedding` is written here against dsembed's modules (so that it is importable and tested
as part of dsembed) and copied into the file with the names it uses defined above it.
"""
from __future__ import annotations

import inspect
import json
import os
from typing import Any

import torch
from torch import nn

try:  # sentence-transformers >= 6
    from sentence_transformers.base.modules import InputModule
except ImportError:  # sentence-transformers 5.x
    from sentence_transformers.models import InputModule

from dsembed.modeling.attention import BIDIRECTIONAL_ARCHITECTURES, MODES, set_attention_mode
from dsembed.modeling.backbone import decoder_layers, final_norm, model_type, unwrap
from dsembed.modeling.layers import LayerTaps, masked_mean
from dsembed.modeling.pooling import (LastTokenPooler, LatentAttentionPooler, LatentCrossAttention, MeanPooler,
                                      MultiLayerAttentionPooler, Pooler)
from dsembed.modeling.tokenization import pad_id, pad_token_ids, token_ids

MODULE_FILE = "dsembed_model.py"
MODULE_TYPE = "dsembed_model.PortableEmbedding"
CONFIG_FILE = "dsembed_model.json"


def build_head(config: dict[str, Any], dtype: torch.dtype | None = None) -> Pooler:
    """The pooling head a `dsembed_model.json` "head" entry describes (weights loaded separately).

    Args:
        config: {"type", "hidden_size", and for trainable heads "sizes", "layers", "layer_weights"}.
        dtype: parameter dtype.
    """
    kind = config["type"]
    if kind == "last_token":
        return LastTokenPooler()
    if kind == "mean":
        return MeanPooler()
    if kind == "latent_attention":
        return LatentAttentionPooler(config["hidden_size"], config["sizes"], dtype=dtype)
    if kind == "multi_layer_attention":
        return MultiLayerAttentionPooler(config["hidden_size"], config["sizes"], config["layers"],
                                         config["layer_weights"], dtype=dtype)
    raise ValueError(f"{CONFIG_FILE}: unknown head type {kind!r}")


class PortableEmbedding(InputModule):
    """Backbone (+ layer taps) + pooling head as one sentence-transformers input module.

    Tokenizes as dsembed does (EOS appended, truncation keeping it, the recipe's padding side and
    max length), runs the backbone with positions counted over real tokens and the layer taps of a
    multi-layer head, and returns the head's output as `sentence_embedding` [B, D] (float32, not
    normalised: a sentence-transformers Normalize module follows when the recipe normalises).

    Args:
        backbone: the transformers decoder (LoRA merged).
        tokenizer: its tokenizer.
        head: the pooling head.
        head_config: how to rebuild the head (see `build_head`).
        max_length, padding_side, append_eos: the recipe's tokenization.
        prompt_suffixes: prompt text -> text appended after the input when that prompt is used.
    """

    config_file_name = "dsembed_model.json"
    config_keys = ["head", "max_length", "padding_side", "append_eos", "prompt_suffixes"]
    save_in_root = True

    def __init__(self, backbone: nn.Module, tokenizer: Any, head: nn.Module, head_config: dict[str, Any],
                 max_length: int, padding_side: str = "left", append_eos: bool = True,
                 prompt_suffixes: dict[str, str] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooler = head
        self.head = dict(head_config)
        self.max_length = int(max_length)
        self.padding_side = padding_side
        self.append_eos = bool(append_eos)
        self.prompt_suffixes = dict(prompt_suffixes or {})

    @property
    def max_seq_length(self) -> int:
        return self.max_length

    def get_embedding_dimension(self) -> int:
        return int(unwrap(self.backbone).config.hidden_size)

    get_sentence_embedding_dimension = get_embedding_dimension  # sentence-transformers 5.x name

    def preprocess(self, inputs: Any, prompt: str | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Prompt + text (+ suffix), tokenized as dsembed training does."""
        texts = [text if isinstance(text, str) else " ".join(text) for text in inputs]
        if prompt:
            suffix = self.prompt_suffixes.get(prompt, "")
            texts = [prompt + text + suffix for text in texts]
        rows = token_ids(self.tokenizer, texts, self.max_length, self.append_eos)
        return pad_token_ids(rows, pad_id(self.tokenizer), self.padding_side)

    def tokenize(self, texts: list[str], **kwargs: Any) -> dict[str, torch.Tensor]:  # sentence-transformers 5.x
        return self.preprocess(texts, **kwargs)

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Adds `sentence_embedding` [B, D] (float32)."""
        input_ids, attention_mask = features["input_ids"], features["attention_mask"]  # [B, T] each
        # positions count real tokens only, so a padded text sees exactly its unpadded positions
        position_ids = (attention_mask.long().cumsum(dim=-1) - 1).clamp_min(0)  # [B, T]
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        layer_means = None
        if self.pooler.tapped_layers:
            taps = LayerTaps(self.backbone, self.pooler.tapped_layers)
            with taps.capture(attention_mask):
                out = self.backbone(**inputs)
            layer_means = taps.stacked()  # [B, K, D]
        else:
            out = self.backbone(**inputs)
        features["sentence_embedding"] = self.pooler(out.last_hidden_state, attention_mask, layer_means).float()  # [B, D]
        return features

    def save(self, output_path: str, *args: Any, **kwargs: Any) -> None:
        """Write the backbone, tokenizer, head weights and this module's config into `output_path`."""
        from safetensors.torch import save_file

        self.backbone.save_pretrained(output_path)
        self.tokenizer.save_pretrained(output_path)
        state = {k: v.detach().contiguous().cpu() for k, v in self.pooler.state_dict().items()}
        save_file(state, os.path.join(output_path, "pooler.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(output_path, self.config_file_name), "w", encoding="utf-8") as f:
            json.dump(self.get_config_dict(), f, indent=2)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: Any = None, cache_folder: str | None = None,
             revision: str | None = None, local_files_only: bool = False, **kwargs: Any) -> "PortableEmbedding":
        """Load the folder (a local path or a Hub repository) on CPU; sentence-transformers moves it."""
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        folder = cls.load_dir_path(model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder,
                                   revision=revision, local_files_only=local_files_only)
        with open(os.path.join(folder, cls.config_file_name), encoding="utf-8") as f:
            config = json.load(f)
        backbone = AutoModel.from_pretrained(folder, attn_implementation="sdpa")  # dtype: the saved config's
        # config.json's is_causal already makes the mask bidirectional; the attention modules' flags follow it
        set_attention_mode(backbone, "causal" if getattr(backbone.config, "is_causal", True) else "bidirectional")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        state = load_file(os.path.join(folder, "pooler.safetensors"))
        dtype = next(iter(state.values())).dtype if state else None
        head = build_head(config["head"], dtype=dtype)
        head.load_state_dict(state, strict=True)
        model = cls(backbone, tokenizer, head, config["head"], config["max_length"], config["padding_side"],
                    config["append_eos"], config.get("prompt_suffixes"))
        return model.eval()


# What the generated file holds, in order: every object PortableEmbedding needs, then itself.
_SOURCES: tuple[Any, ...] = (
    unwrap, model_type, decoder_layers, final_norm,
    set_attention_mode,
    masked_mean, LayerTaps,
    Pooler, LastTokenPooler, MeanPooler, LatentCrossAttention, LatentAttentionPooler, MultiLayerAttentionPooler,
    pad_id, token_ids, pad_token_ids,
    build_head, PortableEmbedding,
)

_HEADER = '''"""A dsembed embedding model as one sentence-transformers module; needs no dsembed.

GENERATED by dsembed-consolidate from dsembed's own source (dsembed/export/portable.py): the pooling heads,
layer taps, attention switch and tokenization are dsembed's, copied verbatim. Do not edit by hand.

    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(FOLDER, trust_remote_code=True)
    queries = model.encode(texts, prompt_name="query")
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

try:  # sentence-transformers >= 6
    from sentence_transformers.base.modules import InputModule
except ImportError:  # sentence-transformers 5.x
    from sentence_transformers.models import InputModule


class RecipeError(ValueError):
    """A model this module cannot handle (dsembed.errors.RecipeError outside dsembed)."""


'''


def _constants() -> str:
    from dsembed.modeling import backbone

    return "\n".join([
        f"_LAYER_PATHS = {backbone._LAYER_PATHS!r}",
        f"_NORM_PATHS = {backbone._NORM_PATHS!r}",
        f"BIDIRECTIONAL_ARCHITECTURES = {BIDIRECTIONAL_ARCHITECTURES!r}",
        f"MODES = {MODES!r}",
        f"CONFIG_FILE = {CONFIG_FILE!r}",
        "", "",
        inspect.getsource(backbone._find),
    ])


def module_source() -> str:
    """The text of `dsembed_model.py`: a header, constants, then the source of every piece, verbatim."""
    parts = [_HEADER, _constants()]
    parts += [inspect.getsource(obj) for obj in _SOURCES]
    return "\n\n".join(part.rstrip("\n") for part in parts) + "\n"


def write_module(folder: str | os.PathLike, head_config: dict[str, Any], max_length: int, padding_side: str,
                 append_eos: bool, prompt_suffixes: dict[str, str]) -> None:
    """Write `dsembed_model.py` and its config `dsembed_model.json` into `folder`."""
    with open(os.path.join(folder, MODULE_FILE), "w", encoding="utf-8") as f:
        f.write(module_source())
    config = {"head": head_config, "max_length": int(max_length), "padding_side": padding_side,
              "append_eos": bool(append_eos), "prompt_suffixes": prompt_suffixes}
    with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
