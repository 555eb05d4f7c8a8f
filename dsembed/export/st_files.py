"""The sentence-transformers files of an exported model folder (see dsembed/export/consolidate.py for the layout).

Exports must load where dsembed is not installed: last_token / mean heads become sentence-transformers'
own modules over the root transformers folder, trainable heads the generated `dsembed_model.py`
(dsembed/export/portable.py). The tokenizer is rewritten to append the EOS itself, so that plain
transformers and sentence-transformers tokenize exactly as dsembed does.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from dsembed.config import Recipe
from dsembed.instructions import format_query

ST_MODULE_FILE = "dsembed_st.py"
ST_MODULE_TYPE = "dsembed_st.DsembedEmbedding"
# mteb task types (TaskMetadata.type) for dsembed's evaluation categories
_MTEB_TYPES = {"sts": "STS", "retrieval": "Retrieval", "classification": "Classification", "clustering": "Clustering"}


def _st_classes() -> tuple[Any, Any, Any]:
    """sentence-transformers' Transformer, Pooling and Normalize (6.x module paths, else 5.x)."""
    try:
        from sentence_transformers.base.modules import Normalize, Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:
        from sentence_transformers.models import Normalize, Pooling, Transformer
    return Transformer, Pooling, Normalize


def _type_name(cls: type) -> str:
    # what sentence-transformers itself writes into modules.json
    return f"{cls.__module__}.{cls.__name__}"


def _template_parts(recipe: Recipe, instruction: str) -> tuple[str, str]:
    """(prefix, suffix) around the text in recipe.data.query_template for `instruction`."""
    marker = "\0QUERY\0"
    full = format_query(recipe.data.query_template, instruction, marker)
    prefix, _, suffix = full.partition(marker)
    return prefix, suffix


def sentence_transformers_prompts(recipe: Recipe) -> tuple[dict[str, str], dict[str, str]]:
    """The prompts of config_sentence_transformers.json and the suffixes the module appends.

    "query" carries the training default instruction (none: ""), "document" is "". For mteb, the
    instruction dsembed-evaluate uses for each paper task and each task type (+ recipe
    eval.instructions) is a prompt named by task / type, with "<name>-document" = "", so that
    `mteb.evaluate(SentenceTransformer(dir))` instructs queries and symmetric texts but not
    documents, as dsembed's own mteb adapter does.

    Returns:
        (prompts, prompt text -> suffix for templates with text after {query}).
    """
    from dsembed.evaluation.presets import DEFAULT_INSTRUCTIONS, PAPER_TASKS, default_instruction
    from dsembed.instructions import query_instructions

    # Only names mteb knows: it drops (with a warning) prompt keys that are not registered tasks, so
    # local tasks fall back to their type's prompt, which is dsembed-evaluate's default for them too.
    by_name = {_MTEB_TYPES[category]: text for category, text in DEFAULT_INSTRUCTIONS.items()}
    for category, names in PAPER_TASKS.items():
        by_name.update({name: default_instruction(name, category) for name in names})
    by_name.update(recipe.eval.instructions)
    default = query_instructions(recipe.data).get("default")
    prompts: dict[str, str] = {"query": "", "document": ""}
    suffixes: dict[str, str] = {}

    def add(name: str, instruction: str | None) -> None:
        if not instruction:
            prompts[name] = ""
            return
        prefix, suffix = _template_parts(recipe, instruction)
        if suffixes.get(prefix, suffix) != suffix:
            return  # a template with {instruction} after {query}: only the first prompt per prefix is exact
        prompts[name] = prefix
        if suffix:
            suffixes[prefix] = suffix

    add("query", default)
    for name, text in by_name.items():
        add(name, text)
        prompts[f"{name}-document"] = ""
    return prompts, suffixes


# sentence-transformers' own pooling modes for dsembed's parameter-free heads
PLAIN_POOLING = {"last_token": "lasttoken", "mean": "mean"}
_TOKENIZER_PROBES = ("hello world", "The quick brown fox jumps over the lazy dog.", "x",
                     "caf\u00e9 na\u00efve \u2014 r\u00e9sum\u00e9", "a long text " * 600)


def write_portable_tokenizer(folder: Path, model: Any) -> bool:
    """Rewrite the folder's tokenizer so that plain transformers / sentence-transformers tokenize as dsembed.

    The tokenizer appends the EOS itself (a post-processor after its own), truncates to the recipe's
    max length keeping it, pads on the recipe's side, and has no chat template (sentence-transformers
    6 would wrap every text in it). dsembed's own tokenization gives the same ids with it.

    Returns:
        True when a reload of the written tokenizer gives exactly dsembed's token ids on probe texts
        (a long one included); False, with the original tokenizer written back, when it does not.
    """
    from transformers import AutoTokenizer

    from dsembed.modeling.tokenization import token_ids

    m = model.recipe.model
    want = token_ids(model.tokenizer, _TOKENIZER_PROBES, m.max_length, m.append_eos)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = None
    tokenizer.padding_side = m.padding_side
    tokenizer.model_max_length = m.max_length
    if m.append_eos:
        from tokenizers import processors

        eos = tokenizer.eos_token
        append = processors.TemplateProcessing(single=f"$A:0 {eos}:0", pair=f"$A:0 $B:1 {eos}:1",
                                               special_tokens=[(eos, tokenizer.eos_token_id)])
        backend = tokenizer.backend_tokenizer
        backend.post_processor = append if backend.post_processor is None else processors.Sequence([backend.post_processor, append])
    for leftover in folder.glob("chat_template.*"):
        leftover.unlink()
    tokenizer.save_pretrained(folder)
    # transformers 5 saves padding_side only when it was an init argument; from_pretrained reads it back
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["padding_side"] = m.padding_side
    _write_json(config_path, config)
    reloaded = AutoTokenizer.from_pretrained(folder)
    got = reloaded(list(_TOKENIZER_PROBES), truncation=True)["input_ids"]
    if [list(ids) for ids in got] == want and reloaded.padding_side == m.padding_side:
        return True
    model.tokenizer.save_pretrained(folder)
    return False


def head_config(model: Any) -> dict[str, Any]:
    """How the portable module rebuilds the head: type, width, resolved sizes, tapped layers, W on/off."""
    from dsembed.modeling.pooling import resolved_head_sizes

    pooling = model.recipe.pooling
    config: dict[str, Any] = {"type": pooling.type, "hidden_size": model.dim}
    if pooling.type in ("latent_attention", "multi_layer_attention"):
        config["sizes"] = resolved_head_sizes(pooling, model.dim)
    if pooling.type == "multi_layer_attention":
        config.update(layers=list(model.pooler.tapped_layers), layer_weights=bool(pooling.layer_weights))
    return config


def write_sentence_transformers_files(folder: Path, model: Any, keep_adapter: bool = False) -> str:
    """modules.json, the modules' configs and config_sentence_transformers.json.

    Three forms, the first that fits:
    - "plain": last_token / mean heads: sentence-transformers' own Transformer, Pooling (and
      Normalize) modules over the root folder; no custom code.
    - "portable": trainable heads (or a query template with text after {query}, or a tokenizer
      that cannot append the EOS itself): dsembed_model.py, generated from dsembed's source
      (dsembed.export.portable), loaded with trust_remote_code=True; needs no dsembed.
    - "dsembed": --keep-adapter exports: dsembed_st.py, which imports dsembed (and peft).

    Returns:
        The form written.
    """
    import sentence_transformers
    import transformers

    from dsembed.export import portable, st_module

    Transformer, Pooling, Normalize = _st_classes()
    recipe = model.recipe
    m = recipe.model
    prompts, suffixes = sentence_transformers_prompts(recipe)
    modules: list[dict[str, Any]] = []
    if keep_adapter and hasattr(model.backbone, "peft_config"):
        form = "dsembed"
        shutil.copyfile(st_module.__file__, folder / ST_MODULE_FILE)
        _write_json(folder / st_module.CONFIG_FILE, {"prompt_suffixes": suffixes})
        modules.append({"idx": 0, "name": "0", "path": "", "type": ST_MODULE_TYPE})
    else:
        eos_ok = write_portable_tokenizer(folder, model)
        if recipe.pooling.type in PLAIN_POOLING and not suffixes and eos_ok:
            form = "plain"
            _write_json(folder / "sentence_bert_config.json", {"max_seq_length": m.max_length, "do_lower_case": False})
            pooling_module = Pooling(model.dim, pooling_mode=PLAIN_POOLING[recipe.pooling.type])
            (folder / "1_Pooling").mkdir()
            pooling_module.save(str(folder / "1_Pooling"))
            modules += [{"idx": 0, "name": "0", "path": "", "type": _type_name(Transformer)},
                        {"idx": 1, "name": "1", "path": "1_Pooling", "type": _type_name(Pooling)}]
        else:
            form = "portable"
            portable.write_module(folder, head_config(model), m.max_length, m.padding_side, m.append_eos, suffixes)
            modules.append({"idx": 0, "name": "0", "path": "", "type": portable.MODULE_TYPE})
        if m.normalize:
            index = len(modules)
            (folder / f"{index}_Normalize").mkdir()
            Normalize().save(str(folder / f"{index}_Normalize"))
            modules.append({"idx": index, "name": str(index), "path": f"{index}_Normalize", "type": _type_name(Normalize)})
    _write_json(folder / "modules.json", modules)
    _write_json(folder / "config_sentence_transformers.json", {
        "__version__": {"sentence_transformers": sentence_transformers.__version__,
                        "transformers": transformers.__version__, "pytorch": torch.__version__},
        "model_type": "SentenceTransformer",
        "prompts": prompts,
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    })
    return form


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
