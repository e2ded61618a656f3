#!/usr/bin/env bash
# Re-run the GPU figures and GPU tests of BENCHMARKS.md, one stage at a time (each stage takes a
# few minutes on an H200, so that one stage fits a short machine lease).
#
#   bash benchmarks/gpu_checks.sh STAGE [OUT_DIR]      # OUT_DIR defaults to ./gpu_results
#   LABEL=wgrad_slices bash benchmarks/gpu_checks.sh xl-block    # suffix for the recorded labels
#
# Stages:
#   tests       every `cuda` test on one GPU (the 2-GPU file skips itself with one device)
#   tests2      the 2-GPU tests (tests/e2e/test_distributed_gpu.py; needs 2 devices)
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
#   eager       the step without CUDA graphs (compiled, eager) against the graphed one, GPT-2 small and
#               the GPT-3 XL shape at 75% in blocks (benchmarks/eager_step.py), and one layer's host
#               cost (benchmarks/eager_overhead.py)
#   ncu90       Nsight Compute on the 90% forward of 8192x2048, Triton and Gluon kernels
#   profile     where the GPT-2 small block-sparse and dense steps spend GPU time (torch.profiler),
#               and Nsight Compute on the forward kernel at 75% (8192x2048) beside cuBLAS
#
# Runs from a checkout without installing (PYTHONPATH=src). Raw outputs land in OUT_DIR, named
# by date and stage. Each measured result is also appended, by benchmarks/record.py (date, machine,
# exact command, label), to OUT_DIR/results/<benchmark>.jsonl, the file of the same name as in
# benchmarks/results/; to keep a run, append its line there:
#   cat OUT_DIR/results/bench_train.jsonl >> benchmarks/results/bench_train.jsonl
# Transcripts are not recorded: the pytest output (stages tests, tests2; state the pass counts in
# BENCHMARKS.md) and the Nsight Compute report (stage profile; state the figures it supports).
set -euo pipefail
stage=${1:?usage: gpu_checks.sh STAGE [OUT_DIR]}
out=${2:-gpu_results}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out/results"
out=$(cd "$out" && pwd)
cd "$root"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
sparsetrain() { python3 -c 'import sys; from sparsetrain.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }
day=$(date -u +%F)

# record BENCH LABEL RESULT CMD... [-- record.py options]: append RESULT (a JSON file) to
# OUT_DIR/results/BENCH.jsonl as one run of the command CMD (words joined by spaces).
record() {
  local bench=$1 label=$2${LABEL:+_$LABEL} result=$3 cmd=() opts=()
  shift 3
  while (($#)) && [[ $1 != -- ]]; do cmd+=("$1"); shift; done
  (($#)) && shift && opts=("$@")
  python3 benchmarks/record.py "$result" --to "$out/results/$bench.jsonl" --label "$label" \
    --command "${cmd[*]}" ${opts[@]+"${opts[@]}"}
}
gpus() {  # "2x NVIDIA H200": the machine of a multi-GPU run (its result has no "gpu" entry)
  nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sort | uniq -c | awk '{n=$1; $1=""; print n "x" $0}' | head -1
}

case "$stage" in
  tests)
    python3 -m pytest -v -m cuda tests -p no:cacheprovider --durations=10 | tee "$out/$day-pytest-cuda.txt" ;;
  tests2)
    python3 -m pytest -v tests/e2e/test_distributed_gpu.py -p no:cacheprovider --durations=10 | tee "$out/$day-pytest-2gpu.txt" ;;
  gpt2)
    cmd=(sparsetrain bench train --preset gpt2-small --batch_size 16 --seq_len 1024 --sparsity 0.75 --steps 25 --warmup 10 --json)
    "${cmd[@]}" > "$out/$day-bench-gpt2small-unstructured75.json"
    record bench_train gpt2small_unstructured75 "$out/$day-bench-gpt2small-unstructured75.json" "${cmd[@]}" ;;
  gpt2-block)
    cmd=(sparsetrain bench train --preset gpt2-small --structure block --sparsity 0.75 --no_reference
         --set runconfig.compile_mode=reduce-overhead --json)
    "${cmd[@]}" > "$out/$day-bench-gpt2small-block75.json"
    record bench_train gpt2small_block75 "$out/$day-bench-gpt2small-block75.json" "${cmd[@]}" ;;
  xl)
    cmd=(sparsetrain bench train --preset gpt3-xl --batch_size 8 --seq_len 2048 --sparsity 0.75 --steps 12 --warmup 6
         --no_reference --json)
    "${cmd[@]}" > "$out/$day-bench-gpt3xl-unstructured75.json"
    record bench_train gpt3xl_unstructured75 "$out/$day-bench-gpt3xl-unstructured75.json" "${cmd[@]}" ;;
  xl-block)
    cmd=(sparsetrain bench train --preset gpt3-xl --batch_size 8 --seq_len 2048 --structure block --sparsity 0.75
         --steps 12 --warmup 6 --no_reference --set runconfig.compile_mode=reduce-overhead --json)
    "${cmd[@]}" > "$out/$day-bench-gpt3xl-block75.json"
    record bench_train gpt3xl_block75 "$out/$day-bench-gpt3xl-block75.json" "${cmd[@]}" ;;
  cli)
    rm -rf /tmp/sparsetrain-cli-check
    cmd=(python3 run.py --mode train --params configs/gpt2_small.yaml --model_dir /tmp/sparsetrain-cli-check
         --set train_input.tokenizer=byte --set model.vocab_size=50304 --set runconfig.max_steps=60
         --set runconfig.log_steps=10 --set runconfig.eval_steps=2 --set runconfig.checkpoint_steps=0)
    "${cmd[@]}" 2> "$out/$day-cli-gpt2small.log"
    cp /tmp/sparsetrain-cli-check/metrics.jsonl "$out/$day-cli-gpt2small-metrics.jsonl"
    record cli_train gpt2small "$out/$day-cli-gpt2small-metrics.jsonl" "${cmd[@]}" -- --lines --machine "$(gpus)"
    # gpt2_small.yaml clips gradients at 1.0; the bench's default does not: give it the same.
    cmd=(sparsetrain bench train --preset gpt2-small --sparsity 0.75 --no_reference --steps 20 --warmup 10
         --set optimizer.max_gradient_norm=1.0 --json)
    "${cmd[@]}" > "$out/$day-bench-gpt2small-clip.json"
    record bench_train gpt2small_clip "$out/$day-bench-gpt2small-clip.json" "${cmd[@]}"
    grep "tokens/s" "$out/$day-cli-gpt2small.log" | tail -5
    python3 -c 'import json, sys; from sparsetrain.bench.train import format_results as f; print(f(json.load(open(sys.argv[1]))))' \
      "$out/$day-bench-gpt2small-clip.json" ;;
  layer)
    cmd=(sparsetrain bench layer --shapes 8192x2048,2048x8192,3072x768 --sparsity 0,0.75,0.9 --json "$out/$day-bench-layer.json")
    "${cmd[@]}" | tee "$out/$day-bench-layer.txt"
    record bench_layer b128 "$out/$day-bench-layer.json" "${cmd[@]}" ;;
  scaling)
    cmd=(python3 benchmarks/scaling.py --set model.preset=gpt2-medium --nproc 1,2 --steps 60 --log_steps 10
         --json "$out/$day-scaling-gpt2medium.json")
    "${cmd[@]}" | tee "$out/$day-scaling-gpt2medium.txt"
    record scaling gpt2medium "$out/$day-scaling-gpt2medium.json" "${cmd[@]}" -- --machine "$(gpus)" ;;
  configs)
    cmd=(python3 benchmarks/kernel_configs.py --shapes 8192x2048,3072x768 --sparsity 0.75,0.9 --json "$out/$day-kernel-configs.json")
    "${cmd[@]}" | tee "$out/$day-kernel-configs.txt"
    record kernel_configs sweep "$out/$day-kernel-configs.json" "${cmd[@]}" ;;
  variants)
    for set in stages stores ws; do
      cmd=(python3 benchmarks/kernel_variants.py --set $set --shapes 8192x2048,2048x8192,3072x768 --sparsity 0.75,0.9
           --json "$out/$day-kernel-variants-$set.json")
      "${cmd[@]}" | tee "$out/$day-kernel-variants-$set.txt"
      record kernel_variants $set "$out/$day-kernel-variants-$set.json" "${cmd[@]}"
    done ;;
  eager)
    cmd=(python3 benchmarks/eager_step.py --preset gpt2-small --modes graphed,compiled,eager,dense
         --json "$out/$day-eager-step-gpt2small.json")
    "${cmd[@]}" | tee "$out/$day-eager-step-gpt2small.txt"
    record eager_step gpt2small "$out/$day-eager-step-gpt2small.json" "${cmd[@]}"
    cmd=(python3 benchmarks/eager_step.py --preset gpt3-xl --batch_size 8 --seq_len 2048 --steps 6 --warmup 4
         --modes graphed,compiled,eager,dense --json "$out/$day-eager-step-gpt3xl.json")
    "${cmd[@]}" | tee "$out/$day-eager-step-gpt3xl.txt"
    record eager_step gpt3xl "$out/$day-eager-step-gpt3xl.json" "${cmd[@]}"
    cmd=(python3 benchmarks/eager_overhead.py --shapes 8192x2048,3072x768 --sparsity 0.75 --json "$out/$day-eager-overhead.json")
    "${cmd[@]}" | tee "$out/$day-eager-overhead.txt"
    record eager_overhead direct_launch "$out/$day-eager-overhead.json" "${cmd[@]}" ;;
  ncu90)
    for kernel in triton gluon; do  # a transcript, kept in OUT_DIR only (not recorded)
      ncu --clock-control none --profile-from-start off --section SpeedOfLight --section WarpStateStats \
        --section MemoryWorkloadAnalysis --section Occupancy \
        python3 benchmarks/one_product.py --product fwd --shape 8192x2048 --sparsity 0.9 --repeat 1 --kernel $kernel \
        > "$out/$day-ncu-fwd90-$kernel.txt" 2>&1
      grep -E "^  [a-zA-Z_]|Duration|Throughput|Hit Rate|Occupancy|Warp Cycles Per Issued|stall" \
        "$out/$day-ncu-fwd90-$kernel.txt" | head -40
    done ;;
  profile)
    cmd=(python3 benchmarks/profile_step.py --preset gpt2-small --structure block --sparsity 0.75
         --json "$out/$day-profile-gpt2small-block75.json")
    "${cmd[@]}" | tee "$out/$day-profile-gpt2small-block75.txt"
    record profile_step gpt2small_block75 "$out/$day-profile-gpt2small-block75.json" "${cmd[@]}"
    cmd=(python3 benchmarks/profile_step.py --preset gpt2-small --sparsity 0 --json "$out/$day-profile-gpt2small-dense.json")
    "${cmd[@]}" | tee "$out/$day-profile-gpt2small-dense.txt"
    record profile_step gpt2small_dense "$out/$day-profile-gpt2small-dense.json" "${cmd[@]}"
    # a transcript, kept in OUT_DIR only (not recorded)
    ncu --profile-from-start off --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
      --section WarpStateStats --section SchedulerStats --section LaunchStats \
      python3 benchmarks/one_product.py --product fwd --shape 8192x2048 --sparsity 0.75 --repeat 1 \
      > "$out/$day-ncu-fwd75.txt" 2>&1
    grep -E "^  [a-z_]|Duration|Throughput|Achieved Occupancy|Theoretical Occupancy|Stall|Registers|Shared Memory" \
      "$out/$day-ncu-fwd75.txt" | head -80 ;;
  *)
    echo "gpu_checks.sh: unknown stage '$stage' (see the list at the top of this file)" >&2; exit 2 ;;
esac
