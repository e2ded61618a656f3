#!/usr/bin/env bash
# Re-run the GPU figures and GPU tests of BENCHMARKS.md, one stage at a time (each stage takes a
# few minutes on an H200, so that one stage fits a short machine lease).
#
#   bash benchmarks/gpu_checks.sh STAGE [OUT_DIR]      # OUT_DIR defaults to ./gpu_results
#
# Stages:
#   tests       every `cuda` test on one GPU (the 2-GPU file skips itself with one device)
#   tests2      the 2-GPU tests (tests/test_distributed_gpu.py; needs 2 devices)
#   gpt2        GPT-2 small: reference, dense and 75% unstructured, one process
#   gpt2-block  GPT-2 small: dense and 75% block sparse (128x128) on the kernels, CUDA graphs
#   xl          GPT-3 XL shape: dense and 75% unstructured
#   xl-block    GPT-3 XL shape: dense and 75% block sparse on the kernels, CUDA graphs
#   cli         the CLI run of gpt2-small, then the bench's dense step with the same gradient
#               clipping, one after the other on the same GPU (their tokens/s should agree)
#   layer       one layer: block-sparse kernels against cuBLAS, torch BSR and cuSPARSELt
#   scaling     GPT-2 medium, 30% sparse, tokens/s on 1 and 2 GPUs (needs 2 devices)
#   configs     every launch configuration of the block kernels and the weight-gradient slice counts
#   variants    experimental forward/input-gradient kernels against the product kernels: index loads
#               and pipeline depth, the output store, warp specialisation (benchmarks/kernel_variants.py)
#   profile     where the GPT-2 small block-sparse and dense steps spend GPU time (torch.profiler),
#               and Nsight Compute on the forward kernel at 75% (8192x2048) beside cuBLAS
#
# Runs from a checkout without installing (PYTHONPATH=src). Raw outputs land in OUT_DIR.
set -euo pipefail
stage=${1:?usage: gpu_checks.sh STAGE [OUT_DIR]}
out=${2:-gpu_results}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$root"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
st() { python3 -c 'import sys; from sparsetrain.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }
day=$(date -u +%F)

case "$stage" in
  tests)
    python3 -m pytest -v -m cuda tests -p no:cacheprovider --durations=10 | tee "$out/$day-pytest-cuda.txt" ;;
  tests2)
    python3 -m pytest -v tests/test_distributed_gpu.py -p no:cacheprovider --durations=10 | tee "$out/$day-pytest-2gpu.txt" ;;
  gpt2)
    st bench train --preset gpt2-small --batch_size 16 --seq_len 1024 --sparsity 0.75 --steps 25 --warmup 10 \
      --json > "$out/$day-bench-gpt2small-unstructured75.json" ;;
  gpt2-block)
    st bench train --preset gpt2-small --structure block --sparsity 0.75 --no_reference \
      --set runconfig.compile_mode=reduce-overhead --json > "$out/$day-bench-gpt2small-block75.json" ;;
  xl)
    st bench train --preset gpt3-xl --batch_size 8 --seq_len 2048 --sparsity 0.75 --steps 12 --warmup 6 \
      --no_reference --json > "$out/$day-bench-gpt3xl-unstructured75.json" ;;
  xl-block)
    st bench train --preset gpt3-xl --batch_size 8 --seq_len 2048 --structure block --sparsity 0.75 \
      --steps 12 --warmup 6 --no_reference --set runconfig.compile_mode=reduce-overhead \
      --json > "$out/$day-bench-gpt3xl-block75.json" ;;
  cli)
    rm -rf /tmp/sparsetrain-cli-check
    python3 run.py --mode train --params configs/gpt2_small.yaml --model_dir /tmp/sparsetrain-cli-check \
      --set train_input.tokenizer=byte --set model.vocab_size=50304 --set runconfig.max_steps=60 \
      --set runconfig.log_steps=10 --set runconfig.eval_steps=2 --set runconfig.checkpoint_steps=0 \
      2> "$out/$day-cli-gpt2small.log"
    cp /tmp/sparsetrain-cli-check/metrics.jsonl "$out/$day-cli-gpt2small-metrics.jsonl"
    # gpt2_small.yaml clips gradients at 1.0; the bench's default does not: give it the same.
    st bench train --preset gpt2-small --sparsity 0.75 --no_reference --steps 20 --warmup 10 \
      --set optimizer.max_gradient_norm=1.0 > "$out/$day-bench-gpt2small-clip.txt"
    grep "tokens/s" "$out/$day-cli-gpt2small.log" | tail -5
    cat "$out/$day-bench-gpt2small-clip.txt" ;;
  layer)
    st bench layer --shapes 8192x2048,2048x8192,3072x768 --sparsity 0,0.75,0.9 \
      --json "$out/$day-bench-layer.json" | tee "$out/$day-bench-layer.txt" ;;
  scaling)
    python3 benchmarks/scaling.py --set model.preset=gpt2-medium --nproc 1,2 --steps 60 --log_steps 10 \
      --json "$out/$day-scaling-gpt2medium.json" | tee "$out/$day-scaling-gpt2medium.txt" ;;
  configs)
    python3 benchmarks/kernel_configs.py --shapes 8192x2048,3072x768 --sparsity 0.75,0.9 \
      --json "$out/$day-kernel-configs.json" | tee "$out/$day-kernel-configs.txt" ;;
  variants)
    for set in stages stores ws; do
      python3 benchmarks/kernel_variants.py --set $set --shapes 8192x2048,2048x8192,3072x768 --sparsity 0.75,0.9 \
        --json "$out/$day-kernel-variants-$set.json" | tee "$out/$day-kernel-variants-$set.txt"
    done ;;
  profile)
    python3 benchmarks/profile_step.py --preset gpt2-small --structure block --sparsity 0.75 \
      --json "$out/$day-profile-gpt2small-block75.json" | tee "$out/$day-profile-gpt2small-block75.txt"
    python3 benchmarks/profile_step.py --preset gpt2-small --sparsity 0 \
      --json "$out/$day-profile-gpt2small-dense.json" | tee "$out/$day-profile-gpt2small-dense.txt"
    ncu --profile-from-start off --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
      --section WarpStateStats --section SchedulerStats --section LaunchStats \
      python3 benchmarks/one_product.py --product fwd --shape 8192x2048 --sparsity 0.75 --repeat 1 \
      > "$out/$day-ncu-fwd75.txt" 2>&1
    grep -E "^  [a-z_]|Duration|Throughput|Achieved Occupancy|Theoretical Occupancy|Stall|Registers|Shared Memory" \
      "$out/$day-ncu-fwd75.txt" | head -80 ;;
  *)
    echo "gpu_checks.sh: unknown stage '$stage' (see the list at the top of this file)" >&2; exit 2 ;;
esac
