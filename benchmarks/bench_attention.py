"""Benchmark of longreach.local_attention against PyTorch's attention paths and a GEMM roof.

Same as `python -m longreach bench`; the code lives in longreach/benchmark.py and
docs/benchmarking.md explains what is measured. Example:

    python benchmarks/bench_attention.py --lengths 2048,4096 --csv bench.csv --plot bench.png
"""

import sys

from longreach.benchmark import main

if __name__ == "__main__":
    sys.exit(main(prog="bench_attention.py"))
