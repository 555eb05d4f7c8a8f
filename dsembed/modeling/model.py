"""EmbeddingModel = decoder backbone (+ LoRA) + pooling head (+ L2 normalisation); build, encode, save, load.

Saved folder (the root is a plain transformers model folder, so `AutoModel.from_pretrained(folder)`
and sentence-transformers' own Transformer module load the backbone without dsembed):
    recipe.yaml         the resolved recipe the model was built from
    dsembed.json        format version, pooling type, dim, base model, tapped layers, LoRA state, backbone
                        dtype, Matryoshka sizes, the SHA-256 of recipe.yaml (checked at load: a truncated
                        YAML still parses)
    config.json, model*.safetensors   transformers save_pretrained of the backbone (LoRA merged in,
                        unless merge_lora=False); config.is_causal records the attention mode
    tokenizer files     the tokenizer (at the root too)
    adapter/            peft adapter, only when saved with merge_lora=False
    pooler.safetensors  the head's parameters (absent tensors for parameter-free heads)
Folders written before this layout (backbone/ and tokenizer/ subfolders) still load.

Merging LoRA into bf16 / fp16 weights would round the delta away (a delta below a weight's bf16
resolution, ~0.4% of its magnitude, vanishes): a merged low-precision backbone is written in
float32 instead (`merged_dtype`), so the export computes what the live engine computes.

Shapes: B batch, T tokens, D hidden size.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from dsembed.config import MultiLayerAttentionPooling, Recipe, recipe_from_dict
from dsembed.recipe_rules import resolve_layers
from dsembed.errors import CheckpointError, RecipeError
from dsembed.instructions import format_query
from dsembed.modeling.attention import set_attention_mode
from dsembed.modeling.files import EXPORTED_FIX, check_exported_files, reading
from dsembed.modeling.backbone import DTYPES, available_attn_implementation, load_backbone, num_decoder_layers, unwrap
from dsembed.modeling.layers import LayerTaps
from dsembed.modeling.pooling import Pooler, build_pooler
from dsembed.modeling.precision import resolve_recipe, torch_dtype
from dsembed.modeling.tokenization import pad_id, pad_token_ids, token_ids, tokenize_texts
from dsembed.modeling.weights import DTYPE_NAMES, merged_dtype, plain_state_dict, quiet_peft, set_config_dtype

FORMAT_VERSION = 1


class EmbeddingModel(nn.Module):
    """A decoder backbone and a pooling head that map token ids to one embedding per text.

    Args:
        backbone: transformers base model (no LM head), possibly a peft `PeftModel`.
        pooler: the head; its `tapped_layers` are pooled by forward hooks during the backbone pass.
        tokenizer: the backbone's tokenizer.
        recipe: the recipe it was built from (tokenization, normalisation, query template).
    """

    def __init__(self, backbone: nn.Module, pooler: Pooler, tokenizer: Any, recipe: Recipe):
        super().__init__()
        self.backbone = backbone
        self.pooler = pooler
        self.tokenizer = tokenizer
        self.recipe = recipe

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dim(self) -> int:
        """Embedding width D (the backbone's hidden size)."""
        return int(unwrap(self.backbone).config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embed a tokenized batch.

        Args:
            input_ids: [B, T] token ids, left or right padded.
            attention_mask: [B, T], 1 for real tokens.

        Returns:
            [B, D] embeddings, L2-normalised when recipe.model.normalize.
        """
        last_hidden, layer_means = self.run_backbone(input_ids, attention_mask, self.pooler.tapped_layers)
        emb = self.pooler(last_hidden, attention_mask, layer_means)  # [B, D]
        if self.recipe.model.normalize:
            emb = F.normalize(emb.float(), dim=-1).to(emb.dtype)  # [B, D]
        return emb

    def run_backbone(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     layers: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One backbone forward with lazy taps on `layers` (1-based).

        Returns:
            (last_hidden [B, T, D] final-normed states, layer_means [B, K, D] or None without layers).
        """
        # positions count real tokens only, so a padded text sees exactly its unpadded positions
        position_ids = (attention_mask.long().cumsum(dim=-1) - 1).clamp_min(0)  # [B, T]
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        if not layers:
            return self.backbone(**kwargs).last_hidden_state, None
        taps = LayerTaps(self.backbone, list(layers))
        with taps.capture(attention_mask):
            out = self.backbone(**kwargs)
        return out.last_hidden_state, taps.stacked()  # [B, T, D], [B, K, D]

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenize as training does: EOS appended, truncation to max_length, recipe padding side."""
        m = self.recipe.model
        return tokenize_texts(self.tokenizer, texts, m.max_length, m.padding_side, m.append_eos)

    def format_query(self, text: str, instruction: str | None) -> str:
        """`text` inside recipe.data.query_template with `instruction`; unchanged without one."""
        return format_query(self.recipe.data.query_template, instruction, text)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], instruction: str | None = None, batch_size: int = 32,
               show_progress: bool = False) -> np.ndarray:
        """Embed texts in eval mode, returned in input order.

        All texts are tokenized once and batched in order of token count, longest first, so each
        batch holds texts of nearly equal length (the least padding a fixed batch size allows).

        Args:
            texts: the strings.
            instruction: a query instruction (formatted with recipe.data.query_template); None: none.
            batch_size: texts per forward.
            show_progress: a tqdm bar.

        Returns:
            float32 array [N, D].
        """
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for idx, input_ids, attention_mask in self.length_batches(texts, instruction, batch_size, show_progress):
            out[idx] = self(input_ids, attention_mask).float().cpu().numpy()  # [b, D]
        return out

    def batch_plan(self, texts: Sequence[str], instruction: str | None = None,
                   batch_size: int = 32) -> list[list[int]]:
        """The positions of `texts` in each batch `encode` makes: by token count, longest first.

        The sort is stable, so a list that is already in this order (the concatenation of some of
        the batches, as data-parallel evaluation deals them to a rank) is batched the same way again:
        every rank then runs exactly the batches a single process would.
        """
        return self._plan(self._token_ids(texts, instruction), batch_size)

    def _token_ids(self, texts: Sequence[str], instruction: str | None) -> list[list[int]]:
        m = self.recipe.model
        return token_ids(self.tokenizer, [self.format_query(t, instruction) for t in texts], m.max_length, m.append_eos)

    @staticmethod
    def _plan(ids: list[list[int]], batch_size: int) -> list[list[int]]:
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]

    def length_batches(self, texts: Sequence[str], instruction: str | None = None, batch_size: int = 32,
                       show_progress: bool = False) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """Tokenize once and yield padded batches in order of token count (`batch_plan`), in eval mode.

        Yields:
            (positions of the batch's texts in `texts`, input_ids [b, T], attention_mask [b, T]) on
            the model's device.
        """
        ids = self._token_ids(texts, instruction)
        pad = pad_id(self.tokenizer)
        plan = self._plan(ids, batch_size)
        was_training = self.training
        self.eval()
        device = self.device
        if show_progress:
            from tqdm.auto import tqdm
            plan = tqdm(plan, desc="encode", unit="batch")
        try:
            for idx in plan:
                batch = pad_token_ids([ids[i] for i in idx], pad, self.recipe.model.padding_side)
                yield idx, batch["input_ids"].to(device), batch["attention_mask"].to(device)
        finally:
            self.train(was_training)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters of the pooling head."""
        return (p for p in self.pooler.parameters() if p.requires_grad)

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters of the backbone (the LoRA weights when LoRA is on)."""
        return (p for p in self.backbone.parameters() if p.requires_grad)

    def backbone_parameters_named(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) for the trainable backbone parameters."""
        return ((n, p) for n, p in self.backbone.named_parameters() if p.requires_grad)

    # ------------------------------------------------------------------------- persistence

    def save(self, directory: str | Path, merge_lora: bool = True) -> Path:
        """Write the model folder (layout in the module docstring). Parameters must be whole (not ZeRO-3 shards).

        Args:
            directory: created if needed.
            merge_lora: fold LoRA into the backbone weights (out of place: this model keeps training
                unchanged; bf16 / fp16 backbones are merged and written in float32); False writes the
                base weights and the adapter separately.

        Returns:
            The folder.
        """
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        base = unwrap(self.backbone)
        is_peft = hasattr(self.backbone, "peft_config")
        lora_state = "none"
        saved_dtype = base.dtype
        if is_peft:
            lora_state = "merged" if merge_lora else "adapter"
            saved_dtype = merged_dtype(base.dtype) if merge_lora else base.dtype
            state = plain_state_dict(base, merge=merge_lora, dtype=saved_dtype)
            base.save_pretrained(out, state_dict=state)
            set_config_dtype(out / "config.json", saved_dtype)  # from_pretrained's dtype="auto" reads it
            if not merge_lora:
                self.backbone.save_pretrained(out / "adapter")
        else:
            base.save_pretrained(out)
        pooler_state = {k: v.detach().contiguous().cpu() for k, v in self.pooler.state_dict().items()}
        save_file(pooler_state, str(out / "pooler.safetensors"), metadata={"format": "pt"})
        self.tokenizer.save_pretrained(out)
        recipe_text = self.recipe.to_yaml()
        (out / "recipe.yaml").write_text(recipe_text, encoding="utf-8")
        meta = {
            "format_version": FORMAT_VERSION,
            "pooling": self.recipe.pooling.type,
            "dim": self.dim,
            "num_layers": num_decoder_layers(self.backbone),
            "tapped_layers": list(self.pooler.tapped_layers),
            "attention": self.recipe.attention.mode,
            "normalize": self.recipe.model.normalize,
            "base_model": self.recipe.model.name_or_path or "random_init",
            "lora": lora_state,
            "backbone_dtype": DTYPE_NAMES[saved_dtype],
            # the sizes trained with loss.matryoshka_dims: SentenceTransformer(folder, truncate_dim=d) loads one
            "matryoshka_dims": list(self.recipe.loss.matryoshka_dims),
            # a truncated recipe.yaml often still parses (missing sections would take defaults): load checks this
            "recipe_sha256": hashlib.sha256(recipe_text.encode("utf-8")).hexdigest(),
        }
        (out / "dsembed.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return out

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "EmbeddingModel":
        """Load a folder written by `save`, in eval mode on `device`.

        Raises:
            CheckpointError: a missing, incomplete or damaged folder (a truncated weights, tokenizer or
                config file is named), or an unknown format version.
        """
        from safetensors.torch import load_file
        from transformers import AutoModel

        src = Path(directory)
        meta_path = src / "dsembed.json"
        if not meta_path.is_file():
            raise CheckpointError(f"{src}: not a dsembed model folder (no dsembed.json; save with EmbeddingModel.save)")
        check_exported_files(src)  # a damaged JSON / safetensors file is named before any library reads it
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        version = meta.get("format_version") if isinstance(meta, dict) else None
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{meta_path}: format_version {version} is not {FORMAT_VERSION} (re-export with this dsembed)")
        nested = (src / "backbone").is_dir()  # the layout before the root became a transformers folder
        backbone_dir, tokenizer_dir = (src / "backbone", src / "tokenizer") if nested else (src, src)
        for part in (src / "recipe.yaml", backbone_dir / "config.json", tokenizer_dir, src / "pooler.safetensors"):
            if not part.exists():
                raise CheckpointError(f"{src}: {part.relative_to(src)} is missing (the folder is incomplete; save it again)")
        with reading(src / "recipe.yaml", EXPORTED_FIX):
            recipe_text = (src / "recipe.yaml").read_text(encoding="utf-8")
            if meta.get("recipe_sha256") not in (None, hashlib.sha256(recipe_text.encode("utf-8")).hexdigest()):
                raise CheckpointError(f"{src / 'recipe.yaml'}: does not match the checksum dsembed.json records "
                                      f"(damaged, truncated or edited); {EXPORTED_FIX}")
            recipe_data = yaml.safe_load(recipe_text)
        try:
            recipe = recipe_from_dict(recipe_data, str(src / "recipe.yaml"))
        except RecipeError as err:
            raise CheckpointError(f"{err} (a damaged recipe.yaml, or one from another dsembed version: copy the model "
                                  "folder again or re-export it with dsembed-consolidate)") from None
        dtype = exported_backbone_dtype(meta, recipe)
        impl = available_attn_implementation(recipe.model.attn_implementation, dtype, device)
        with reading(src, EXPORTED_FIX):  # what the checks above cannot see (a tensor body, tokenizer.model)
            backbone = AutoModel.from_pretrained(backbone_dir, dtype=dtype, attn_implementation=impl)
            if (src / "adapter").is_dir():
                from peft import PeftModel
                with quiet_peft():
                    # the adapter computes in the backbone's dtype, as it trained (_apply_lora); peft's
                    # default upcast to float32 is slower (SmolLM2-135M bf16, 384 texts, AMD EPYC:
                    # 15.9 s upcast, 11.1 s as trained; the float32 merge 16.9 s)
                    backbone = PeftModel.from_pretrained(backbone, src / "adapter", autocast_adapter_dtype=False)
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
            state = load_file(str(src / "pooler.safetensors"))
        set_attention_mode(backbone, recipe.attention.mode)
        hidden, depth = int(unwrap(backbone).config.hidden_size), num_decoder_layers(backbone)
        pooler = build_pooler(recipe.pooling, hidden, depth, dtype=torch_dtype(recipe.model.dtype))
        try:
            pooler.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"{src / 'pooler.safetensors'}: does not fit the recipe's head ({str(err).splitlines()[0]})") from None
        model = cls(backbone, pooler, tokenizer, recipe).to(device)
        return model.eval()


def exported_backbone_dtype(meta: dict[str, Any], recipe: Recipe) -> torch.dtype:
    """The dtype an exported model's backbone computes in: its dsembed.json's backbone_dtype (float32
    for a bf16 run's LoRA merge: the merge is written in float32), else the recipe's. One rule for
    loading and for what an evaluation records, which must answer without loading the model."""
    return DTYPES.get(meta.get("backbone_dtype", ""), torch_dtype(recipe.model.dtype))


def _apply_lora(backbone: nn.Module, recipe: Recipe) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = recipe.lora
    peft_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.target_modules), bias="none")
    try:
        with quiet_peft():
            # adapters in the backbone's dtype: peft would upcast bf16/fp16 adapters to fp32, and
            # DeepSpeed ZeRO-3 needs one dtype across trainable parameters (bf16 LoRA next to a bf16
            # head); its bf16 optimizer keeps fp32 master weights anyway.
            return get_peft_model(backbone, peft_cfg, autocast_adapter_dtype=False)
    except ValueError as err:
        where = recipe.source or "<recipe>"
        raise RecipeError(f"{where}: lora.target_modules = {list(cfg.target_modules)}: {str(err).splitlines()[0]} "
                          f"(name linear layers of the backbone, e.g. q_proj, v_proj)") from None


def build_model(recipe: Recipe, base_dir: Path | None = None, attn_fallback: bool = False) -> EmbeddingModel:
    """Backbone, attention mode, gradient checkpointing, LoRA and pooling head, as the recipe says.

    Safe to call under a live transformers HfDeepSpeedConfig (ZeRO-3): the backbone is loaded
    partitioned by transformers, no weight is read or re-initialised here, LoRA is applied after
    loading (outside zero.Init) and the head initialises itself in its constructor.

    Args:
        recipe: the resolved recipe; a `model.dtype: auto` the caller left is resolved here (one
            printed line), so the model's recipe always holds the concrete dtype.
        base_dir: folder relative model paths resolve against (default: the recipe's folder).
        attn_fallback: sdpa where flash-attn is not installed (CPU-side tools; see load_backbone).

    Returns:
        The model in train mode (as transformers leaves a freshly loaded model).

    Raises:
        RecipeError: bad source, architecture, layer selection or LoRA targets.
    """
    recipe = resolve_recipe(recipe)  # entry points resolve `auto` first; a raw recipe prints its line here
    where = recipe.source or "<recipe>"
    if base_dir is None and recipe.source:
        base_dir = Path(recipe.source).parent
    backbone, tokenizer = load_backbone(recipe.model, base_dir, attn_fallback=attn_fallback)
    set_attention_mode(backbone, recipe.attention.mode)
    depth = num_decoder_layers(backbone)
    if isinstance(recipe.pooling, MultiLayerAttentionPooling):
        resolve_layers(recipe.pooling.layers, depth, where)  # the real depth, with the recipe's name in errors
    if recipe.model.gradient_checkpointing:
        enable = getattr(backbone, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5.x; gradient_checkpointing_enable is its deprecated alias
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.lora.enabled:
        # non-reentrant checkpointing needs no enable_input_require_grads() for frozen embeddings
        backbone = _apply_lora(backbone, recipe)
    hidden = int(unwrap(backbone).config.hidden_size)
    pooler = build_pooler(recipe.pooling, hidden, depth, dtype=torch_dtype(recipe.model.dtype))
    return EmbeddingModel(backbone, pooler, tokenizer, recipe)


def replace_model(recipe: Recipe, **changes: Any) -> Recipe:
    """`recipe` with fields of its `model` section replaced (a small helper for tools and tests)."""
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, **changes))
