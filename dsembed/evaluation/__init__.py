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
- statistics.wilcoxon_test, statistics.paired_bootstrap, statistics.holm, statistics.item_score
- report.format_results_table, report.load_results, report.compare, report.write_report
"""
