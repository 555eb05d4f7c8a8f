"""The pip packages the offline demo reads, and their texts: where they are, what they hold, their licences.

- chatterbot-corpus (BSD-3-Clause): English prompt/response pairs filed under categories; a fixed,
  hash-based share of the prompts is held out for evaluation (`chatterbot_split`).
- gensim's test data (LGPL-2.1 as shipped with gensim): the Lee corpus (50 judged news documents)
  and the Lee background corpus (300 other articles of the same source), read by `lee_documents`.
dsembed.data.demo turns these into training rows and local MTEB tasks.
"""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from dsembed.errors import DataError


HELD_OUT_FRACTION = 0.3  # share of chatterbot prompts kept for evaluation only
INSTALL_HINT = "pip install chatterbot-corpus gensim (or pip install -e .[demo])"

# name -> (pip package, licence, description); the README's attribution section is built from it.
DEMO_SOURCES: dict[str, tuple[str, str, str]] = {
    "chatterbot": (
        "chatterbot-corpus",
        "BSD-3-Clause",
        "ChatterBot English dialog corpus (Gunther Cox and contributors): prompt/response pairs "
        "in topic categories; training rows, retrieval/ChatterbotQA, "
        "classification/ChatterbotTopics, clustering/ChatterbotCategories",
    ),
    "lee": (
        "gensim",
        "LGPL-2.1 (gensim test data)",
        "Lee, Pincombe and Welsh (2005) news corpus: 50 documents with averaged human similarity "
        "judgements of all 1,225 pairs, shipped in gensim's test data; sts/LeeNews",
    ),
    "lee_background": (
        "gensim",
        "LGPL-2.1 (gensim test data)",
        "Lee background corpus: 300 news articles (none of them among the 50 judged ones), "
        "shipped in gensim's test data; training rows (article start -> continuation)",
    ),
}


def demo_attribution() -> str:
    """Markdown bullet lines crediting each demo data source, for the README.

    Returns:
        One line per entry of `DEMO_SOURCES`: name, package, licence, description.
    """
    return "\n".join(
        f"- `{name}` (pip package `{pkg}`, {lic}): {desc}." for name, (pkg, lic, desc) in DEMO_SOURCES.items()
    )


def package_dir(module: str) -> Path:
    """The installed folder of `module`, found without importing it (gensim's import is slow)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"demo data needs the Python package '{module}', which is not installed: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def text_key(text: str) -> str:
    """Comparison key: case- and whitespace-insensitive, so near-identical prompts split together."""
    return " ".join(text.casefold().split())


def unit_hash(text: str) -> float:
    """A stable number in [0, 1) for a text (sha1; independent of PYTHONHASHSEED)."""
    digest = hashlib.sha1(f"dsembed-demo|{text_key(text)}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# ---------------------------------------------------------------------------------------------
# chatterbot-corpus
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    prompt: str
    response: str
    category: str


def chatterbot_pairs() -> list[Pair]:
    """Unique (prompt, response) pairs of consecutive turns in the English YAML files, file order."""
    import yaml  # a dependency of dsembed itself (recipes)

    folder = package_dir("chatterbot_corpus") / "data" / "english"
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise DataError(f"{folder}: no English .yml files; reinstall the corpus: {INSTALL_HINT}")
    pairs: list[Pair] = []
    seen: set[tuple[str, str]] = set()
    for path in files:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
        names = doc.get("categories") or [path.stem]
        category = "_".join(str(names[0]).lower().split())
        for conversation in doc.get("conversations") or []:
            # A few entries are malformed (a bare string instead of a list of turns): skip them.
            if not isinstance(conversation, list):
                continue
            turns = [
                str(t).strip() if isinstance(t, (str, int, float)) and not isinstance(t, bool) else ""
                for t in conversation
            ]
            for prompt, response in zip(turns, turns[1:]):
                if not prompt or not response or (prompt, response) in seen:
                    continue
                seen.add((prompt, response))
                pairs.append(Pair(prompt, response, category))
    return pairs


@dataclass(frozen=True)
class ChatterbotSplit:
    pairs: list[Pair]  # every unique pair
    train: list[Pair]
    held_out: list[Pair]  # pairs whose prompt is held out (evaluation only)


def chatterbot_split() -> ChatterbotSplit:
    """Hold out a hash-chosen share of prompts; drop training pairs touching any held-out text.

    The split is by prompt key, so all responses of a held-out prompt are held out together; a
    training pair is dropped when its prompt or response equals (by `text_key`) any held-out prompt or
    response, which keeps every evaluation text unseen in training (multi-turn conversations
    chain texts as response then prompt).
    """
    pairs = chatterbot_pairs()
    held_out = [p for p in pairs if unit_hash(p.prompt) < HELD_OUT_FRACTION]
    held_keys = {text_key(p.prompt) for p in held_out} | {text_key(p.response) for p in held_out}
    train = [
        p for p in pairs
        if text_key(p.prompt) not in held_keys and text_key(p.response) not in held_keys
    ]
    return ChatterbotSplit(pairs=pairs, train=train, held_out=held_out)


def gensim_test_file(file_name: str) -> Path:
    """A file of gensim's shipped test data; DataError naming it when it is missing."""
    path = package_dir("gensim") / "test" / "test_data" / file_name
    if not path.is_file():
        raise DataError(f"{path}: gensim test data missing; reinstall gensim: {INSTALL_HINT}")
    return path


def lee_documents(file_name: str) -> list[str]:
    """One news document per non-empty line of a gensim test-data file."""
    # The files are Windows-1252 (a pound sign as byte 0xA3), not UTF-8.
    lines = gensim_test_file(file_name).read_bytes().decode("cp1252", errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip()]
