#!/usr/bin/env bash
# A/B the training step of two source trees on one GPU, in one run, interleaved (A B A B ...), so
# that a change's speed is a ratio measured side by side (these machines drift between runs).
#
#   bash benchmarks/ab_trees.sh OLD_SRC NEW_SRC [OUT_DIR] [ROUNDS]
#   git archive <commit> src | tar -x -C /tmp/old && bash benchmarks/ab_trees.sh /tmp/old/src src
#
# Each round runs, for each tree, `sparsetrain bench train` on GPT-2 small (context 1024, batch 16):
# dense + 75% unstructured, and dense + 75% block sparse (128x128, CUDA graphs). Every run's JSON
# goes to OUT_DIR/<tree>_<config>_<round>.json; the summary (tokens/s per tree, new / old) is
# printed at the end by benchmarks/ab_summary.py.
set -euo pipefail
old=$(cd "${1:?usage: ab_trees.sh OLD_SRC NEW_SRC [OUT_DIR] [ROUNDS]}" && pwd)
new=$(cd "${2:?usage: ab_trees.sh OLD_SRC NEW_SRC [OUT_DIR] [ROUNDS]}" && pwd)
out=${3:-ab_results}
rounds=${4:-2}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
bench() {  # tree config round
    local src=$1 cfg=$2 r=$3 name=$4 extra=()
    [ "$cfg" = block ] && extra=(--structure block --set runconfig.compile_mode=reduce-overhead)
    PYTHONPATH="$src" python3 -c 'import sys; from sparsetrain.cli import main; sys.exit(main(sys.argv[1:]))' \
        bench train --preset gpt2-small --batch_size 16 --seq_len 1024 --sparsity 0.75 --steps 20 --warmup 10 \
        --no_reference "${extra[@]}" --json > "$out/${name}_${cfg}_${r}.json"
}
for r in $(seq 1 "$rounds"); do
    for cfg in unstructured block; do
        bench "$old" "$cfg" "$r" old
        bench "$new" "$cfg" "$r" new
    done
done
python3 "$(dirname "$0")/ab_summary.py" "$out"
