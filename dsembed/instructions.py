"""Query instructions for training data, E5 style ("Instruct: {task}\\nQuery: {query}").

The paper follows E5-Mistral: every training query carries a one-sentence task description chosen by
the row's source dataset; documents carry none. The `e5` preset holds E5-Mistral's task descriptions
for the public retrieval / similarity sources that make up mixtures such as `yixuantt/ir_data`.
A recipe's own `data.instructions` entries override the preset, key by key.
"""
from __future__ import annotations

import re

from dsembed.config import DataConfig

_PLACEHOLDER = re.compile(r"\{(instruction|query)\}")


def format_query(template: str, instruction: str | None, query: str) -> str:
    """`template` (data.query_template) with {instruction} and {query} filled in; the raw query
    when there is no instruction. The one place a query template is filled: training, `encode`
    and the sentence-transformers prompts all call it, so they agree.

    Substitution is a single pass over the template, so braces inside the instruction or the query,
    and any other braces in the template, are kept literally.
    """
    if not instruction:
        return query
    values = {"instruction": instruction, "query": query}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)

WEB_SEARCH = "Given a web search query, retrieve relevant passages that answer the query"

E5_INSTRUCTIONS: dict[str, str] = {
    "default": WEB_SEARCH,
    "msmarco": WEB_SEARCH,
    "msmarco_passage": WEB_SEARCH,
    "msmarco_document": "Given a web search query, retrieve relevant documents that answer the query",
    "nq": "Given a question, retrieve Wikipedia passages that answer the question",
    "natural_questions": "Given a question, retrieve Wikipedia passages that answer the question",
    "triviaqa": "Retrieve Wikipedia passages that answer the question",
    "trivia": "Retrieve Wikipedia passages that answer the question",
    "squad": "Retrieve Wikipedia passages that answer the question",
    "hotpotqa": "Given a multi-hop question, retrieve documents that can help answer the question",
    "fever": "Given a claim, retrieve documents that support or refute the claim",
    "eli5": "Provided a user question, retrieve the highest voted answers on Reddit ELI5 forum",
    "fiqa": "Given a financial question, retrieve user replies that best answer the question",
    "quora": "Given a question, retrieve questions that are semantically equivalent to the given question",
    "quora_duplicates": "Given a question, retrieve questions that are semantically equivalent to the given question",
    "stackexchange": "Retrieve duplicate questions from StackOverflow forum",
    "nli": "Given a premise, retrieve a hypothesis that is entailed by the premise",
    "snli": "Given a premise, retrieve a hypothesis that is entailed by the premise",
    "mnli": "Given a premise, retrieve a hypothesis that is entailed by the premise",
    "sick": "Given a premise, retrieve a hypothesis that is entailed by the premise",
    "sts": "Retrieve semantically similar text",
    "stsb": "Retrieve semantically similar text",
    "paraphrase": "Retrieve semantically similar text",
    "mrpc": "Retrieve semantically similar text",
    "trecqa": "Given a question, retrieve sentences that answer the question",
    "scifact": "Given a scientific claim, retrieve documents that support or refute the claim",
}

PRESETS: dict[str, dict[str, str]] = {"e5": E5_INSTRUCTIONS}


def has_instruction(template: str, query: str) -> bool:
    """Whether `query` is already `template` filled in (e.g. "Instruct: ...\nQuery: ...").

    Mixtures such as the paper's `yixuantt/ir_data` may ship queries with their E5 instruction in
    place; the template's literal parts must then all be there, in order, around a non-empty
    instruction.
    """
    parts = _PLACEHOLDER.split(template)  # literal, name, literal, name, literal
    pattern = "".join(re.escape(p) if i % 2 == 0 else ("(.+?)" if p == "instruction" else "(.*)")
                      for i, p in enumerate(parts))
    return re.fullmatch(pattern, query, flags=re.DOTALL) is not None


def query_instructions(data: DataConfig) -> dict[str, str]:
    """Source name -> task description: the preset (if any) overlaid by the recipe's own entries."""
    merged = dict(PRESETS[data.instruction_preset]) if data.instruction_preset else {}
    merged.update(data.instructions)
    return merged


def instruction_for(source: str | None, instructions: dict[str, str]) -> str | None:
    """The description for a row's source: exact name, lower-cased, the lower-cased name up to its
    first "-" (so "snli-dev" and "trecqa-wang-train" find "snli" and "trecqa"), then "default", else None."""
    if source is not None:
        for key in (source, source.lower(), source.lower().split("-", 1)[0]):
            if key in instructions:
                return instructions[key]
    return instructions.get("default")
