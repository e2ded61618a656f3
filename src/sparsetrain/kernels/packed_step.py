"""Triton kernels: one optimizer step (AdamW / Adam / SGD) over the kept entries of a masked weight.

Imported only when :func:`sparsetrain.kernels.has_triton` is true (this module imports Triton).
The optimizer state of a masked weight of ``n`` entries holds its kept entries only, in the flat
(row-major) order of the contiguous weight; the layout, built by
:class:`sparsetrain.optim.packed_state.PackedMask`, is

    bits     uint8 [tiles * BLOCK / 8]  bit j of byte i set = flat entry 8 i + j is kept
                                        (bits past n are 0)
    offsets  int32 [tiles]              kept entries before tile t (exclusive prefix count)
    state    [kept]                     exp_avg, exp_avg_sq or momentum_buffer, packed

One launch steps every masked parameter of a parameter group (one dtype, one step count): the
grid runs over all their tiles of ``BLOCK`` dense entries, and a table maps each tile to its
tensor; addresses come from int64 tables (weight, gradient, state: rebuilt on the host only when
an address changes; bitmask and offsets: fixed). One program handles one tile: it loads the tile's
mask bits, gives each kept entry its packed index ``offsets[tile] + (kept entries before it in
the tile)`` (a ``tl.cumsum``), loads the weight and gradient at dense indices and the state at
packed indices, applies the update in float32 and stores the weight (exactly 0 at every pruned
position) and the state. No host synchronisation, no ``nonzero``; per-step scalars (learning
rate, bias corrections) are computed on the host and passed by value.

Per entry (fp32, 75% sparsity) the step moves about 16 bytes (weight and gradient read, weight
written, 1/8 byte of mask, state for a quarter of the entries) against 28 for torch's dense fused
AdamW, and it replaces the post-step re-masking pass of the generic path (36 bytes). It runs well
under the chip's memory bandwidth: the per-tile chain (table loads, mask, block-wide scan,
dependent state gathers) leaves too few bytes in flight (BENCHMARKS.md, "Optimizer step alone").

The math follows torch's single-tensor AdamW / Adam / SGD step operation by operation (the
reference in ``optim.packed_state`` is the oracle), in float32 with correctly rounded division and
square root, so results agree to float rounding.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton
import triton.language as tl

MAX_NUMEL = 2**31 - 1  # int32 indices in the kernels


def _num_warps(block: int) -> int:
    """4 entries per thread: one 16-byte vector of fp32, 64 registers (ptxas, sm_90a, BLOCK 1024)."""
    return max(1, min(16, block // 128))


@triton.jit
def _tile(tile_param_ptr, tile_local_ptr, numel_ptr, mask_tab, ptr_tab, ref_ptr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tile. Returns: dense offsets, whether the tile is full, in-bounds and kept
    flags, packed indices, the weight's address, weight and gradient (loaded first, so that their
    loads are in flight with the mask's; 0 at pruned entries), and the two state addresses
    (columns 2 and 3 of ``ptr_tab``). Indices are int32: tensors have under 2**31 - 2 BLOCK
    entries (checked by ``Launch``). ``ALIGNED``: weight and gradient addresses are multiples of
    16 bytes (checked on the host), so full tiles move them in 16-byte vectors."""
    pid = tl.program_id(0)
    i = tl.load(tile_param_ptr + pid)
    tile = tl.load(tile_local_ptr + pid)
    n = tl.load(numel_ptr + i).to(tl.int32)
    ety = ref_ptr.dtype.element_ty
    p_ptr = tl.load(ptr_tab + 4 * i).to(tl.pointer_type(ety))
    g_ptr = tl.load(ptr_tab + 4 * i + 1).to(tl.pointer_type(ety))
    a_ptr = tl.load(ptr_tab + 4 * i + 2).to(tl.pointer_type(ety))
    b_ptr = tl.load(ptr_tab + 4 * i + 3).to(tl.pointer_type(ety))
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
    bits_ptr = tl.load(mask_tab + 2 * i).to(tl.pointer_type(tl.uint8))
    off_ptr = tl.load(mask_tab + 2 * i + 1).to(tl.pointer_type(tl.int32))
    start = tile * BLOCK
    offs = start + tl.arange(0, BLOCK)
    full = start + BLOCK <= n
    if full:
        inb = offs < start + BLOCK
        p = tl.load(p_ptr + offs).to(tl.float32)
        g = tl.load(g_ptr + offs).to(tl.float32)
    else:
        inb = offs < n
        p = tl.load(p_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    byte = tl.load(bits_ptr + (offs >> 3), mask=inb, other=0).to(tl.int32)
    base = tl.load(off_ptr + tile)
    bit = (byte >> (offs & 7)) & 1
    keep = (bit != 0) & inb
    rank = tl.cumsum(bit, 0) - bit  # kept entries before this one in the tile
    p = tl.where(keep, p, 0.0)
    g = tl.where(keep, g, 0.0)
    return offs, full, inb, keep, base + rank, p_ptr, p, g, a_ptr, b_ptr


@triton.jit
def _store_weight(p_ptr, offs, p, full, inb, keep):
    p = tl.where(keep, p, 0.0).to(p_ptr.dtype.element_ty)
    if full:
        tl.store(p_ptr + offs, p)
    else:
        tl.store(p_ptr + offs, p, mask=inb)


@triton.jit
def _adam_kernel(
    tile_param_ptr, tile_local_ptr, numel_ptr, mask_tab, ptr_tab, ref_ptr,
    weight_decay, decay_mul, lerp_w, lerp_c, beta2, one_minus_beta2, eps, neg_step_size, bc2_sqrt,
    HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, LERP_LOW: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs, full, inb, keep, pidx, p_ptr, p, g, m_ptr, v_ptr = _tile(
        tile_param_ptr, tile_local_ptr, numel_ptr, mask_tab, ptr_tab, ref_ptr, ALIGNED, BLOCK
    )
    m = tl.load(m_ptr + pidx, mask=keep, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + pidx, mask=keep, other=0.0).to(tl.float32)
    if HAS_WD:
        if DECOUPLED:
            p = p * decay_mul  # AdamW: param.mul_(1 - lr * weight_decay)
        else:
            g = g + weight_decay * p  # Adam: grad.add(param, alpha=weight_decay)
    # exp_avg.lerp_(grad, 1 - beta1), as torch's lerp computes it
    if LERP_LOW:
        m = m + lerp_w * (g - m)
    else:
        m = g - (g - m) * lerp_c
    # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    v = v * beta2
    v = v + one_minus_beta2 * g * g
    # denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps); param.addcdiv_(exp_avg, denom, value=-step_size)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + neg_step_size * tl.div_rn(m, denom)
    _store_weight(p_ptr, offs, p, full, inb, keep)
    tl.store(m_ptr + pidx, m.to(ref_ptr.dtype.element_ty), mask=keep)
    tl.store(v_ptr + pidx, v.to(ref_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _sgd_kernel(
    tile_param_ptr, tile_local_ptr, numel_ptr, mask_tab, ptr_tab, ref_ptr,
    neg_lr, momentum, one_minus_dampening, weight_decay,
    HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, full, inb, keep, pidx, p_ptr, p, g, b_ptr, _unused = _tile(
        tile_param_ptr, tile_local_ptr, numel_ptr, mask_tab, ptr_tab, ref_ptr, ALIGNED, BLOCK
    )
    if HAS_WD:
        g = g + weight_decay * p
    if HAS_MOMENTUM:
        if FIRST:
            b = g  # torch: buf = torch.clone(grad)
        else:
            b = tl.load(b_ptr + pidx, mask=keep, other=0.0).to(tl.float32)
            b = b * momentum
            b = b + one_minus_dampening * g
        tl.store(b_ptr + pidx, b.to(ref_ptr.dtype.element_ty), mask=keep)
        if NESTEROV:
            g = g + momentum * b
        else:
            g = b
    p = p + neg_lr * g
    _store_weight(p_ptr, offs, p, full, inb, keep)


class Launch:
    """The fixed tables of one launch over masked tensors of one dtype on one device.

    ``numels``, ``bits``, ``offsets``: per tensor, its number of entries and its mask layout
    (``bits`` uint8, ``offsets`` int32, tiles of ``block``). :meth:`pointers` gives the table of
    (weight, gradient, state, state) addresses for a step, re-uploaded only when one changed.
    """

    def __init__(self, numels: list[int], bits: list[torch.Tensor], offsets: list[torch.Tensor], block: int) -> None:
        if block % 8 or block & (block - 1):
            raise ValueError(f"packed step kernel: block {block} is not a power of two >= 8")
        if not numels:
            raise ValueError("packed step kernel: no tensors")
        device = bits[0].device
        tiles = [-(-n // block) for n in numels]
        for n, b, o, t in zip(numels, bits, offsets, tiles, strict=True):
            if o.dtype != torch.int32 or o.numel() != t or b.dtype != torch.uint8 or b.numel() < t * block // 8:
                raise ValueError("packed step kernel: mask layout does not match the tensor")
            if n > MAX_NUMEL - 2 * block or b.device != device or o.device != device:
                raise ValueError("packed step kernel: tensors of 2**31 - 2 block entries or more, or on several devices")
        first = [0]
        for t in tiles[:-1]:
            first.append(first[-1] + t)
        self.block = block
        self.device = device
        self.count = len(numels)
        self.tiles = sum(tiles)
        self._keep = (bits, offsets)  # the mask tables point into these
        counts = torch.tensor(tiles, dtype=torch.int64)
        tile_param = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
        self.tile_param = tile_param.to(device)
        first_of_tile = torch.tensor(first, dtype=torch.int32)[tile_param.long()]
        self.tile_local = (torch.arange(self.tiles, dtype=torch.int32) - first_of_tile).to(device)
        self.numels = torch.tensor(numels, dtype=torch.int64).to(device)
        addresses = [a for b, o in zip(bits, offsets, strict=True) for a in (b.data_ptr(), o.data_ptr())]
        self.mask_tab = torch.tensor(addresses, dtype=torch.int64).to(device)
        self._key: tuple[int, ...] | None = None
        self._ptr_tab: torch.Tensor | None = None
        self.aligned = False

    def pointers(self, rows: list[tuple[torch.Tensor | None, ...]]) -> torch.Tensor:
        """int64 [count, 4]: addresses of each row's (weight, gradient, state, state); None = 0."""
        if len(rows) != self.count:
            raise ValueError("packed step kernel: rows do not match the launch")
        key = tuple(0 if t is None else t.data_ptr() for row in rows for t in (*row, None, None, None, None)[:4])
        if key != self._key:
            # From pageable memory the copy is staged at once: no wait for the device, and the
            # host list can go.
            self._ptr_tab = torch.tensor(key, dtype=torch.int64).to(self.device, non_blocking=True)
            self._key = key
            self.aligned = all(a % 16 == 0 for j, a in enumerate(key) if j % 4 < 2)  # weights, gradients
        return self._ptr_tab


def _check_rows(launch: Launch, rows, dtype: torch.dtype) -> None:
    for row in rows:
        p, grad = row[0], row[1]
        if not (p.is_contiguous() and grad.is_contiguous() and grad.shape == p.shape):
            raise ValueError("packed step kernel: weight and gradient must be contiguous and of one shape")
        for t in row:
            if t is not None and (t.dtype != dtype or t.device != launch.device):
                raise ValueError("packed step kernel: all tensors of a launch share one dtype and device")


def _launch_device(device: torch.device):
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def adam_launch(
    launch: Launch,
    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    check: bool = True,
) -> None:
    """One AdamW (``decoupled``) / Adam (L2 decay) step of the kept entries of every
    (weight, gradient, exp_avg, exp_avg_sq) row, in place, in one launch. ``step`` is the step
    count after this step (1 on the first), the same for every row."""
    ref = rows[0][0]
    if check:
        _check_rows(launch, rows, ref.dtype)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    lerp_w = 1 - beta1
    lerp_c = float(np.float32(1) - np.float32(lerp_w))  # torch's lerp: (opmath 1 - weight)
    ptr_tab = launch.pointers(rows)
    with _launch_device(launch.device):
        _adam_kernel[(launch.tiles,)](
            launch.tile_param, launch.tile_local, launch.numels, launch.mask_tab, ptr_tab, ref,
            float(weight_decay), float(1 - lr * weight_decay), float(lerp_w), lerp_c,
            float(beta2), float(1 - beta2), float(eps), float(-step_size), float(bias_correction2**0.5),
            HAS_WD=weight_decay != 0, DECOUPLED=bool(decoupled), LERP_LOW=abs(lerp_w) < 0.5,
            ALIGNED=launch.aligned, BLOCK=launch.block,
            num_warps=_num_warps(launch.block),
        )


def sgd_launch(
    launch: Launch,
    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    first: bool,
    check: bool = True,
) -> None:
    """One SGD step of the kept entries of every (weight, gradient, momentum_buffer) row, in
    place, in one launch; ``first``: the buffers hold nothing yet and become the gradients."""
    ref = rows[0][0]
    has_momentum = momentum != 0
    if has_momentum and any(row[2] is None for row in rows):
        raise ValueError("packed SGD step: momentum needs a momentum buffer")
    if check:
        _check_rows(launch, rows, ref.dtype)
    ptr_tab = launch.pointers(rows)
    with _launch_device(launch.device):
        _sgd_kernel[(launch.tiles,)](
            launch.tile_param, launch.tile_local, launch.numels, launch.mask_tab, ptr_tab, ref,
            float(-lr), float(momentum), float(1 - dampening), float(weight_decay),
            HAS_WD=weight_decay != 0, HAS_MOMENTUM=has_momentum, FIRST=bool(first) and has_momentum,
            NESTEROV=bool(nesterov) and has_momentum, ALIGNED=launch.aligned, BLOCK=launch.block,
            num_warps=_num_warps(launch.block),
        )


def adam_step(p, grad, exp_avg, exp_avg_sq, bits, offsets, *, block: int, **options) -> None:
    """:func:`adam_launch` for one tensor (tests, one-off use)."""
    if p.numel():
        adam_launch(Launch([p.numel()], [bits], [offsets], block), [(p, grad, exp_avg, exp_avg_sq)], **options)


def sgd_step(p, grad, momentum_buffer, bits, offsets, *, block: int, **options) -> None:
    """:func:`sgd_launch` for one tensor (tests, one-off use)."""
    if p.numel():
        sgd_launch(Launch([p.numel()], [bits], [offsets], block), [(p, grad, momentum_buffer)], **options)
