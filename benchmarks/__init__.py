"""mlmfast benchmarks: the suite (`python -m benchmarks`, `mlmfast bench`), single-op scripts and dated results.

    suite.py        command line, defaults per device, output files
    inputs.py       real text -> tokenizer -> batches (real / full row lengths) -> one masked copy for every path
    train_suite.py  end-to-end training steps: hf-eager, hf-sdpa, hf-sdpa-compile, hf-accelerated,
                    mlmfast-reference, mlmfast-fast, mlmfast-fast-unpad, mlmfast-fast-compile,
                    mlmfast-fast-unpad-compile; model FLOPs
    profile_step.py device-busy share, kernel launches and top ops of training steps (host- or GPU-bound?)
    ops_suite.py    masking, gather, attention, linear + cross-entropy at the training shapes
    report.py       JSON, Markdown tables, PNG plot
    harness.py      environment record, timing, percentiles, GPU peak table, peak memory
    bench_masking.py, bench_attention.py   single-op scripts with their own command lines
    gpu_check.sh    one call on a GPU machine: install, GPU tests, benchmarks, step profile, short table
    results/        dated results: <date>-<device>.{json,md,png}

Not installed with the package: run it from a checkout (`pip install -e .` + the repository).
"""
