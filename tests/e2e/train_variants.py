"""Train several tiny variants in ONE torchrun launch (each launch costs ~40 s of start-up on 2 cores).

    torchrun --standalone --nproc_per_node 2 tests/e2e/train_variants.py SPEC.json

SPEC.json: {"recipe": PATH, "runs": [{"overrides": [...], "dump": FOLDER}]}. Each run trains
`recipe` + overrides; with `dump` set, the trainer's DSEMBED_DUMP_EMBEDDINGS hook writes the live
engine's embeddings of FOLDER/probe.json to FOLDER/embeddings.npz. ZeRO-2 runs must come before
ZeRO-3 runs: transformers' ZeRO-3 flag is a weak global that a finished ZeRO-3 run may leave set.
"""
from __future__ import annotations

import gc
import json
import os
import sys

from dsembed.config import load_recipe
from dsembed.recipe_rules import validate
from dsembed.distributed import world_size
from dsembed.training.engine import shutdown_distributed
from dsembed.testhooks import DUMP_EMBEDDINGS_ENV
from dsembed.training.trainer import Trainer


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path, encoding="utf-8").read())
    try:
        for run in spec["runs"]:
            recipe = load_recipe(spec["recipe"], ["logging.progress_bar=false", *run["overrides"]])
            validate(recipe, world_size=world_size())
            os.environ[DUMP_EMBEDDINGS_ENV] = run.get("dump") or ""
            trainer = Trainer(recipe)
            trainer.run()
            del trainer
            gc.collect()
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
