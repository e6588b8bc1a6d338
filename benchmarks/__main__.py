"""`python -m benchmarks [ARGS]`: the benchmark suite (the same as `mlmfast bench [ARGS]`)."""
import sys

from benchmarks.suite import main

sys.exit(main(prog="python -m benchmarks"))
