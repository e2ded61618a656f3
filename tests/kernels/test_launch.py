"""``kernels/launch.py``: the direct launch of a compiled Triton kernel after its first call.

On the CPU: the signature separates every call Triton would compile apart, and the launcher's
bookkeeping (one Triton call per signature, then the compiled launcher with the arguments in the
kernel's order, the grid of the chosen config, the descriptors' block shapes) against a stand-in
kernel. On a GPU (``cuda``): the products through the cache equal Triton's own launch bit for bit
and the oracle, for odd row counts, misaligned inputs and inside a CUDA-graph capture."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from sparsetrain.kernels import launch
from sparsetrain.kernels.blocks import BlockLayout, pack_blocks
from sparsetrain.kernels.reference import (
    block_sparse_linear_grad_input,
    block_sparse_linear_grad_weight,
    block_sparse_linear_reference,
)
from tests.helpers import rel_err


def _desc(t: torch.Tensor, block=(1, 1)):
    return SimpleNamespace(base=t, shape=list(t.shape), strides=list(t.stride()), block_shape=list(block),
                           padding="zero")


def test_signature_separates_what_triton_specialises_on():
    a = torch.zeros(64, dtype=torch.float32)
    same = launch.signature([a, 16, 7], {"BR": 128})
    assert same == launch.signature([torch.ones(64), 16, 7], {"BR": 128})
    assert same != launch.signature([a[1:], 16, 7], {"BR": 128})  # 4 bytes off: not 16-aligned
    assert same != launch.signature([a.half(), 16, 7], {"BR": 128})
    assert same != launch.signature([a, 17, 7], {"BR": 128})
    assert same != launch.signature([a, 16, 1], {"BR": 128})
    assert same != launch.signature([a, 16, 7], {"BR": 64})
    t = torch.zeros(32, 64)
    d = launch.signature([_desc(t)], {})
    assert d == launch.signature([_desc(torch.ones(32, 64), block=(16, 16))], {})  # block shape: the config's
    assert d != launch.signature([_desc(torch.zeros(64, 32))], {})
    assert d != launch.signature([_desc(t.bfloat16())], {})
    assert d != launch.signature([_desc(torch.zeros(32 * 64 + 1)[1:].view(32, 64))], {})
    assert len({launch.signature([v], {}) for v in (1, True, 1.0)}) == 3  # equal in Python, not to Triton


def test_signature_refuses_an_argument_it_cannot_key():
    with pytest.raises(TypeError, match="no launch signature for an argument of type list"):
        launch.signature([[1, 2]], {})


class _StandIn:
    """What ``Launcher`` uses of an autotuned Triton kernel: ``fn.arg_names``, ``[grid](...)``
    returning the compiled kernel (``run``, ``function``, ``packed_metadata``), ``best_config``;
    its pre_hook sets the descriptor's block shape as the real kernels' hook does."""

    def __init__(self):
        self.fn = SimpleNamespace(arg_names=["a", "out", "M", "BR", "BM"])
        self.calls, self.launches = [], []
        self.best_config = SimpleNamespace(all_kwargs=lambda: {"BM": 64, "num_warps": 4})
        self.compiled = SimpleNamespace(run=self._run, function="fn", packed_metadata="meta")

    def _run(self, *args):
        self.launches.append(args)

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            args[0].block_shape = [64, kwargs["BR"]]
            return self.compiled

        return call


def test_launcher_calls_triton_once_per_signature_then_the_compiled_launcher(monkeypatch):
    monkeypatch.setattr(launch, "_direct_ok", lambda: True)
    monkeypatch.setattr(launch, "_device_and_stream", lambda: (0, 1234))
    kernel = _StandIn()
    run = launch.Launcher(kernel)
    grid = lambda meta: (-(-meta["M"] // meta["BM"]) * 3,)  # noqa: E731
    x, out = torch.zeros(100, 32), torch.zeros(100, 32)
    run(grid, (_desc(x), out, 100), {"BR": 32})
    assert len(kernel.calls) == 1 and kernel.launches == []
    fresh = _desc(torch.ones(100, 32))
    run(grid, (fresh, out, 100), {"BR": 32})
    assert len(kernel.calls) == 1  # the second call skipped Triton's path
    (g0, g1, g2, stream, fn, meta, lm, enter, leave, *args), = kernel.launches
    assert (g0, g1, g2, stream, fn, meta, lm, enter, leave) == (6, 1, 1, 1234, "fn", "meta", None, None, None)
    assert args == [fresh, out, 100, 32, 64]  # every parameter in the kernel's order, constexprs too
    assert fresh.block_shape == [64, 32]  # the chosen config's block shape, as its pre_hook set it
    run(grid, (_desc(x), out, 101), {"BR": 32})  # another row count: Triton again
    assert len(kernel.calls) == 2


def test_a_launch_hook_counts_only_when_one_is_set():
    assert not launch._hooked(None)
    assert not launch._hooked(SimpleNamespace(calls=[]))  # Triton 3.6's default: an empty chain
    assert launch._hooked(SimpleNamespace(calls=[print]))
    assert launch._hooked(print)  # older Tritons: the hook itself


class _RacingKernel:
    """Triton's autotuned kernel as the launcher sees it, in Triton 3.6's order: ``run`` sets
    ``best_config`` (the config for this call's M), then the JIT compiles (GIL released for
    seconds: ptxas) and launches. ``hold`` makes one call's compilation wait for another thread."""

    def __init__(self):
        self.fn = SimpleNamespace(arg_names=["a", "M", "BM"])
        self.best_config = None
        self.hold: dict[int, tuple[threading.Event, threading.Event]] = {}
        self.compiled = SimpleNamespace(run=lambda *a: None, function="fn", packed_metadata="meta")

    def __getitem__(self, grid):
        def call(a, m):
            bm = 64 if m >= 64 else 16
            self.best_config = SimpleNamespace(all_kwargs=lambda: {"BM": bm, "num_warps": 4})
            if m in self.hold:  # compiling: another thread runs meanwhile
                started, resume = self.hold[m]
                started.set()
                resume.wait(5)
            return self.compiled

        return call


def test_concurrent_first_calls_keep_each_calls_own_config(monkeypatch):
    """Two threads launching one kernel for the first time with different shapes (nn.DataParallel
    replicas with unequal chunks, the autograd engine's per-device threads): without the lock the
    first would read ``best_config`` after the other call had set its own, and cache BM=16's grid
    with the kernel compiled for BM=64 (output tiles never written) for every later call."""
    monkeypatch.setattr(launch, "_direct_ok", lambda: True)
    monkeypatch.setattr(launch, "_device_and_stream", lambda: (0, 0))
    kernel = _RacingKernel()
    started, resume = threading.Event(), threading.Event()
    kernel.hold[100] = (started, resume)
    run = launch.Launcher(kernel)
    grid = lambda meta: (-(-meta["M"] // meta["BM"]),)  # noqa: E731
    a = torch.zeros(4)
    first = threading.Thread(target=run, args=(grid, (a, 100), {}))
    first.start()
    assert started.wait(5)
    threading.Timer(0.2, resume.set).start()  # the first call's compilation ends a little later
    run(grid, (a, 7), {})  # the other thread's first call, while the first one compiles
    first.join(5)
    big = run.cache[(0, *launch.signature((a, 100), {}))]
    small = run.cache[(0, *launch.signature((a, 7), {}))]
    assert (big.tail, big.grid) == ((64,), (2, 1, 1)), "M=100 runs BM=64's kernel: 2 programs"
    assert (small.tail, small.grid) == ((16,), (1, 1, 1))


def test_launcher_leaves_everything_to_triton_when_told(monkeypatch):
    monkeypatch.setenv("SPARSETRAIN_TRITON_LAUNCH", "triton")
    kernel = _StandIn()
    run = launch.Launcher(kernel)
    for _ in range(3):
        run((4,), (_desc(torch.zeros(8, 8)), torch.zeros(8), 8), {"BR": 8})
    assert len(kernel.calls) == 3 and kernel.launches == [] and run.cache == {}


# -- on a GPU -------------------------------------------------------------------------------------


def _products(x, dy, wp, t, tma):
    from sparsetrain.kernels import block_sparse as bs

    return (bs.forward(x, wp, t, use_tma=tma), bs.dgrad(dy, wp, t, use_tma=tma),
            bs.wgrad(x, dy, t, out_dtype=torch.float32, use_tma=tma),
            bs.wgrad(x, dy, t, out_dtype=torch.float32, use_tma=tma, packed=True))


@pytest.mark.cuda
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("case", [(512, 256, (128, 128), 1000, 0.5), (256, 512, (64, 64), 4096, 0.3),
                                  (384, 256, (128, 64), 77, 0.6)], ids=str)
def test_cached_launch_equals_tritons_launch_and_the_oracle(case, tma, monkeypatch):
    from sparsetrain.kernels import block_sparse as bs

    if tma and not bs.tma_available(torch.device("cuda")):
        pytest.skip("TMA needs Hopper")
    n, k, block, m, density = case
    g = torch.Generator().manual_seed(n + m)
    layout = (torch.rand(n // block[0], k // block[1], generator=g) < density).cuda()
    t = BlockLayout.build(layout, block)
    w = torch.randn(n, k, device="cuda")
    wp = pack_blocks(w, t, torch.bfloat16)
    runs = []
    for mode in ("triton", "direct", "direct"):  # the second direct call goes through the cache
        if mode == "triton":
            monkeypatch.setenv("SPARSETRAIN_TRITON_LAUNCH", "triton")
        else:
            monkeypatch.delenv("SPARSETRAIN_TRITON_LAUNCH", raising=False)
        torch.manual_seed(1)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        runs.append(_products(x, dy, wp, t, tma))
    assert bs._launcher(bs._forward_kernel).cache, "the forward went through the launcher's cache"
    for got, want in zip(runs[2], runs[0], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same kernel and config
    wq = w.bfloat16().double()
    y, dx, dw, _ = runs[2]
    assert rel_err(y, block_sparse_linear_reference(x.double(), wq, layout, block)) < 1e-2
    assert rel_err(dx, block_sparse_linear_grad_input(dy.double(), wq, layout, block)) < 1e-2
    assert rel_err(dw, block_sparse_linear_grad_weight(x.double(), dy.double(), layout, block)) < 1e-2


@pytest.mark.cuda
def test_cached_launch_takes_misaligned_inputs_and_runs_inside_a_graph_capture():
    from sparsetrain.kernels import block_sparse as bs

    n, k, block, m = 256, 256, (64, 64), 300
    layout = (torch.rand(4, 4, generator=torch.Generator().manual_seed(5)) < 0.5).cuda()
    t = BlockLayout.build(layout, block)
    w = torch.randn(n, k, device="cuda")
    wp = pack_blocks(w, t, torch.bfloat16)
    buf = torch.randn(m * k + 1, device="cuda", dtype=torch.bfloat16)
    aligned, shifted = buf[:-1].view(m, k), buf[1:].view(m, k)  # the second 2 bytes off 16
    ref = lambda x: block_sparse_linear_reference(x.double(), w.bfloat16().double(), layout, block)  # noqa: E731
    for x in (aligned, shifted, aligned, shifted):
        assert rel_err(bs.forward(x, wp, t, use_tma=False), ref(x)) < 1e-2
    x = aligned.clone()
    bs.forward(x, wp, t, use_tma=bs.tma_available(x.device))  # first call outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = bs.forward(x, wp, t, use_tma=bs.tma_available(x.device))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(y, ref(x)) < 1e-2
