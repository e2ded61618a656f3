"""How the weight-gradient kernel splits the token axis M: a cost model small enough to test
without a GPU (``block_sparse`` imports Triton).

The kernel runs one program per (live block, slice of M). Few live blocks leave SMs idle unless M
is sliced; slices cost a pass that sums the partial blocks, and each program a fixed start-up
cost, so the count that wins depends on the live-block count: one slice from about as many live
blocks as SMs, several below. The constants were fitted to the slice sweep of
``benchmarks/kernel_configs.py`` (128x128 blocks; figures in BENCHMARKS.md).
"""

from __future__ import annotations

# The weight-gradient cost model's constants, in rows of M one program reduces in the same time
# (H200, 128x128 blocks, fitted to the slice sweep of benchmarks/kernel_configs.py): a program's
# fixed cost (pipeline fill, tile store), the partial-sum pass
# per (slice, live block) (one fp32 block written and read back), and that pass's launch.
_PROGRAM_ROWS, _PARTIAL_ROWS, _SUM_LAUNCH_ROWS = 1024, 5, 460


def wgrad_slices(m: int, nnz: int, sms: int) -> int:
    """How many slices of M the weight gradient splits into. ``nnz`` live blocks times ``S``
    slices run in ``ceil(S * nnz / sms)`` waves of programs, each reducing ``m / S`` rows plus a
    fixed cost; more than one slice adds a pass that sums the partial blocks. Takes the ``S`` with
    the least modelled time, slices at least 1024 rows. Few live blocks on many SMs take many
    slices; about as many live blocks as SMs or more take one."""
    nnz = max(nnz, 1)
    best, best_cost = 1, float("inf")
    for s in range(1, max(1, m // 1024) + 1):
        cost = -(-s * nnz // sms) * (m / s + _PROGRAM_ROWS)
        if s > 1:
            cost += s * nnz * _PARTIAL_ROWS + _SUM_LAUNCH_ROWS
        if cost < best_cost:
            best, best_cost = s, cost
    return best
