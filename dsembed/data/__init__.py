"""Training data: rows (JSONL, Hugging Face datasets, pip-shipped demo sources), checks, the
contrastive order of a run and the collator.

    rows.py          Example, read_examples / load_examples, check_data_files, synthetic rows, negative filling
    batches.py       query_text (instructions), ContrastiveOrder (mixed or by_source), collate, text_keys
    demo_sources.py  the pip packages the offline demo reads (chatterbot-corpus, gensim's Lee corpora)
    demo.py          the demo's training rows and local MTEB tasks built from them
"""
