"""Benchmarks behind `dsembed-bench` (dsembed/cli/bench.py): speed and memory against what users would pick instead.

Modules (level 5, like dsembed/cli/: nothing in dsembed imports them):
    common      machine description, quiet-machine wait, interleaved timing, peak-memory probe,
                the benchmark models (dsembed and the sentence-transformers equivalent), tables, JSON
    throughput  `train` (training step throughput) and `encode` (inference throughput)
    memory      `memory` (multi-layer head vs last-token vs output_hidden_states) and `cached` (GradCache)
    gpu         `gpu` (Mistral-7B / Qwen2-0.5B shapes, bf16, LoRA, ZeRO-3, checkpointing; CUDA only)
"""
