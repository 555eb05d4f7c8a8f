"""Where the mined hard negatives come from, per source: the data's own negative, another row's
positive (a likely false negative in paraphrase data), or another row's negative.

    python docs/results/data/features-smollm2/mined_overlap.py runs/mined/paper-model1-s0.jsonl \
        ../shared/data/train/nli_triplets.jsonl ../shared/data/train/paraphrase_pairs.jsonl \
        ../shared/data/train/trecqa_triplets.jsonl

Reads the mined file and the data it was mined from (rows matched by query and positive); counts
only, no model. A candidate can be both a positive and a negative of other rows (SNLI reuses texts).
"""
from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict

from dsembed.data.rows import Example, parse_row


def examples(path: str) -> list[Example]:
    """The file's rows as dsembed reads them (`negative` or `negatives`, `source`)."""
    with open(path, encoding="utf-8") as f:
        return [parse_row(json.loads(line)) for line in f if line.strip()]


def main(mined_path: str, data_paths: list[str]) -> None:
    data = [e for p in data_paths for e in examples(p)]
    by_pair = {(e.query, e.positive): e for e in data}
    positives, negatives = defaultdict(set), defaultdict(set)
    for e in data:
        positives[e.source].add(e.positive)
        negatives[e.source].update(e.negatives)
    counts: dict[str | None, Counter] = defaultdict(Counter)
    for m in examples(mined_path):
        own = by_pair.get((m.query, m.positive))
        c = counts[m.source]
        c["rows"] += 1
        if own is None:
            c["unmatched"] += 1
            continue
        for n in m.negatives:
            c["mined"] += 1
            c["the data's own negative"] += n in own.negatives
            c["another row's positive"] += n in positives[m.source]
            c["another row's negative"] += n in negatives[m.source]
    columns = ["rows", "mined", "the data's own negative", "another row's positive", "another row's negative", "unmatched"]
    print("| source | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for source in sorted(counts, key=str):
        print(f"| {source} | " + " | ".join(str(counts[source][k]) for k in columns) + " |")
    total = Counter()
    for c in counts.values():
        total.update(c)
    print("| all | " + " | ".join(str(total[k]) for k in columns) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python mined_overlap.py MINED.jsonl DATA.jsonl [DATA.jsonl ...]")
    main(sys.argv[1], sys.argv[2:])
