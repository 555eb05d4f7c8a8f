"""Evaluation: local MTEB tasks, the mteb encoder adapter, paper presets, statistics and reports.

Public API (import from the submodules; this package imports nothing heavy on its own):
- tasks.load_local_tasks(root, names=None), tasks.local_task(dir, category), tasks.limit_task(task, n)
- encoder.MtebEncoder(model, instructions, name, batch_size, show_progress, cache_bytes, revision)
- ranks.ShardedEncoder(model), ranks.serve(model), ranks.launch_local(nproc, module, argv): data-parallel encoding
- resume.TaskStore(folder, model_fingerprint), resume.model_fingerprint, resume.save_mteb_result: per-task resume
- presets.PRESETS, presets.PAPER_TASKS, presets.E5_TASK_INSTRUCTIONS, presets.default_instruction
- run.named_tasks(names), run.prepare_tasks(tasks, limit), run.resolve_instructions(tasks, overrides),
  run.evaluate_tasks(model, tasks, ...) -> results dict, run.evaluate_task(encoder, task, ...),
  run.layer_weight_info(model)
- clustering_limit.limit_cluster_sets / labels_first: how --limit cuts clustering (labels first),
  clustering_measure.measure_random_v_measure(root, limits): the before/after table of its docstring
- chance.chance_level(task): a no-information model's score on a loaded, limited task;
  chance.chance_plan(tasks loaded and cut by run.prepare_tasks) ->
  {task: {"category", "chance", "problems"}}, chance.format_chance_plan(plan): the tasks that carry
  no information by construction, before anything is trained (a study's --plan)
- statistics.wilcoxon_test, statistics.paired_bootstrap, statistics.holm, statistics.item_score,
  statistics.score_interval (both bootstraps take one result's items or a list, one per seed),
  statistics.power_table / smallest_wilcoxon_p: what a study's datasets and Holm family can decide
- flags.flag_datasets: datasets of a comparison that carry no information (ties, or every row at chance)
- comparison.load_results (a variant's seeds grouped), comparison.compare (the comparison record)
- report.format_results_table, report.markdown, report.write_report
"""
