"""Training: the DeepSpeed engine (the only module that imports deepspeed), the loop, losses.

    engine.py        every DeepSpeed call: init, the engine, steps, checkpoints
    ds_config.py     the DeepSpeed JSON config built from a template and the recipe (no deepspeed import)
    trainer.py       the loop: contrastive batches, accumulation or cached steps, metrics, resume
    run_dir.py       the run directory: checkpoint tags, resume decision, pruning
    checkpoint_files.py  which shards a complete checkpoint holds, and whether each is whole (no deepspeed import)
    gradcache.py     cached (GradCache) and plain backward passes
    loss.py          InfoNCE as a function of embeddings: false-negative masks, Matryoshka sizes
    monitor.py       TensorBoard and metrics.jsonl
    periodic_eval.py evaluation during training
"""
