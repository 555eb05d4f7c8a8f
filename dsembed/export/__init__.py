"""Export: ZeRO shards to one model folder, LoRA merged, with the files that let it load elsewhere.

    consolidate.py   checkpoint -> EmbeddingModel folder (dsembed-consolidate)
    st_files.py      sentence-transformers files (modules.json, prompts, the three export forms)
    portable.py      the self-contained module written into exports of trainable heads
    st_module.py     the sentence-transformers module of --keep-adapter exports (imports dsembed)
    model_card.py    the export's README.md with model-index metadata
"""
