"""dsembed-consolidate: merge a training run's DeepSpeed checkpoint into one exported model folder.

    dsembed-consolidate RUN_DIR_OR_CHECKPOINT OUT_DIR [--keep-adapter] [--step N] [--overwrite]

RUN_DIR_OR_CHECKPOINT is a run directory (train.output_dir), its checkpoints/ folder or one
checkpoints/step-N folder; without --step the checkpoint named in `latest` is exported. Works on a
CPU machine from ZeRO-2 and ZeRO-3 checkpoints, without the training processes. OUT_DIR is both a
dsembed model (`EmbeddingModel.load(OUT_DIR)`), a transformers model and a sentence-transformers model
(`SentenceTransformer(OUT_DIR, trust_remote_code=True)`, with prompt_name="query" for queries);
the layout is in dsembed/export/consolidate.py. It is written next to OUT_DIR and renamed when complete.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsembed.errors import run_cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsembed-consolidate", description=__doc__.split("\n")[0])
    p.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT", help="run directory, checkpoints/ or checkpoints/step-N")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the model folder to write (absent or empty)")
    p.add_argument("--keep-adapter", action="store_true", help="keep LoRA as a peft adapter (adapter/) instead of merging it")
    p.add_argument("--step", type=int, default=None, metavar="N", help="export checkpoints/step-N instead of `latest`")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR (once the new one is complete)")
    p.add_argument("--base-dir", default=None, metavar="DIR", help="folder the recipe's relative model paths resolve against")
    return p


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Export, then print what was written and the parameter counts.

    Raises:
        CheckpointError: a missing or incomplete checkpoint.
        UserError: OUT_DIR exists and is not empty (without --overwrite).
    """
    args = _parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    from dsembed.export.consolidate import export_checkpoint

    hf_logging.disable_progress_bar()  # save_pretrained's one-shard bar; this tool prints its own summary

    summary = export_checkpoint(args.source, args.out_dir, keep_adapter=args.keep_adapter, step=args.step,
                                overwrite=args.overwrite, base_dir=Path(args.base_dir) if args.base_dir else None,
                                say=_say)
    print(f"exported {summary.checkpoint} (step {summary.step}) to {summary.out_dir}")
    for name in summary.files:
        print(f"  {name}")
    print(f"backbone parameters: {summary.backbone_parameters:,} (LoRA {summary.lora})")
    if summary.lora == "adapter":
        print(f"adapter parameters: {summary.adapter_parameters:,}")
    print(f"head parameters: {summary.head_parameters:,}")
    how = {"plain": "sentence-transformers' own modules, no dsembed needed",
           "portable": "dsembed_model.py (trust_remote_code=True), no dsembed needed",
           "dsembed": "dsembed_st.py: needs dsembed and peft (--keep-adapter)"}[summary.form]
    print(f"sentence-transformers: {how}; backbone {summary.backbone_dtype}")
    return 0


def cli() -> None:
    """Console script `dsembed-consolidate`."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
