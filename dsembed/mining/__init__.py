"""Hard-negative mining for training data (`dsembed-mine`).

- select.select_negatives(queries, positive_scores, corpus, excluded, k, margin, skip_top): the
  positive-aware choice, as a function of embeddings;
- job.plan_mining / job.mine / job.write_output: one job's texts, its resumable shards
  (`<output stem>.shards/`), the training JSONL and its record (`<output stem>.mining.json`).
Ranks share the encoding through dsembed.evaluation.ranks (rank 0 selects and writes).
"""
