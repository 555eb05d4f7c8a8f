"""Embed texts with an exported folder in a process where `import dsembed` fails (what a user without dsembed has).

    python tests/no_dsembed.py SPEC.json

SPEC.json: {"texts": [...], "queries": [...], "batch_size": int, "jobs": [{"folder": DIR, "out": FILE.npz}]}.
For each job writes FILE.npz with "documents" (no prompt) and "queries" (prompt_name="query") from
SentenceTransformer(DIR, trust_remote_code=True), "modules" (the module class names), and
"bidirectional": whether a plain AutoModel.from_pretrained(DIR) lets the last token change token 0's
state. Run it with the repository NOT on sys.path (cwd elsewhere, no PYTHONPATH). One process for
all jobs: importing torch and sentence-transformers costs seconds.
"""
from __future__ import annotations

import importlib.abc
import json
import sys


class _NoDsembed(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "dsembed" or name.startswith("dsembed."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: this process has no dsembed)")
        return None


def main(spec_path: str) -> None:
    sys.meta_path.insert(0, _NoDsembed())
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    try:
        import dsembed  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("dsembed is importable: the check would prove nothing")
    spec = json.loads(open(spec_path, encoding="utf-8").read())
    for job in spec["jobs"]:
        folder = job["folder"]
        st = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
        docs = st.encode(spec["texts"], batch_size=spec.get("batch_size", 2))
        queries = st.encode(spec["queries"], prompt_name="query", batch_size=spec.get("batch_size", 2))
        model = AutoModel.from_pretrained(folder).eval()
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        with torch.no_grad():
            first = model(input_ids=ids).last_hidden_state[0, 0]
            ids[0, -1] = 10
            changed = model(input_ids=ids).last_hidden_state[0, 0]
        np.savez(job["out"], documents=docs, queries=queries, bidirectional=not torch.allclose(first, changed),
                 modules=np.array([type(m).__name__ for m in st]))
    assert "dsembed" not in sys.modules


if __name__ == "__main__":
    main(sys.argv[1])
