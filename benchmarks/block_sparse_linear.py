"""One block-sparse linear layer against dense: the same as ``sparsetrain bench layer`` (see
``sparsetrain.bench_layer``), kept as a script for the commands quoted in BENCHMARKS.md.

    python benchmarks/block_sparse_linear.py --shapes 8192x2048,2048x8192 --sparsity 0,0.75,0.9
"""

import sys

from sparsetrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "layer", *sys.argv[1:]]))
