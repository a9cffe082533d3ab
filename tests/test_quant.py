import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from packptq_onnx import quant

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(1, 200), elements=finite), st.integers(2, 8),
       st.floats(0.0009765625, 8.0, width=32), st.integers(0, 255))
def test_act_fake_quant_round_trip(x, bits, scale, zero):
    qmin, qmax = quant.act_qrange(bits)
    zero = min(zero, qmax)
    s = torch.tensor(scale, dtype=torch.float32)
    y = quant.fake_quant(torch.from_numpy(x), s, float(zero), qmin, qmax).numpy()
    lo, hi = (qmin - zero) * scale, (qmax - zero) * scale
    assert np.all(y >= lo - 1e-3 * scale) and np.all(y <= hi + 1e-3 * scale)  # clamped to the grid
    inside = (x >= lo) & (x <= hi)
    assert np.all(np.abs(y - x)[inside] <= scale / 2 * (1 + 1e-4) + 1e-6)  # within half a step
    codes = y / scale + zero
    assert np.allclose(codes, np.round(codes), atol=1e-3)  # on the integer grid


def _autograd_fake_quant(x, scale, zero, qmin, qmax):
    """The formula autograd differentiates: round passes its gradient straight through."""
    t = x / scale
    q = torch.clamp((torch.round(t) - t).detach() + t + zero, qmin, qmax)
    return (q - zero) * scale


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(1, 300), elements=finite), st.integers(2, 8),
       st.floats(0.0009765625, 8.0, width=32), st.integers(0, 255), st.booleans())
def test_fused_fake_quant_equals_autograd(x, bits, scale, zero, on_grid):
    """Same values, the same input gradient and the same LSQ scale gradient (to float rounding) as the autograd formula,
    also for inputs exactly on the grid's half steps and ends (where rounding and clamping switch)."""
    _check_against_autograd(x, bits, scale, zero, on_grid)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.integers(1, 300), elements=finite), st.integers(2, 8),
       st.floats(0.0009765625, 8.0, width=32), st.integers(0, 255), st.booleans())
def test_compiled_fake_quant_equals_autograd(x, bits, scale, zero, on_grid):
    """The torch.compile kernels (reconstruction's --compile) give the same as the autograd formula."""
    assert quant._Fused.broken is None, quant._Fused.broken
    with _compiled_for_all_sizes():  # the scale gradient sums in another order: float32 rounding of its terms
        _check_against_autograd(x, bits, scale, zero, on_grid, sum_rounding=1e-6)
    assert quant._Fused.fwd is not None and quant._Fused.broken is None, quant._Fused.broken


class _compiled_for_all_sizes(quant.compiled):
    def __enter__(self):
        self.min_elements, quant._Fused.MIN_ELEMENTS = quant._Fused.MIN_ELEMENTS, 1
        return super().__enter__()

    def __exit__(self, *exc):
        quant._Fused.MIN_ELEMENTS = self.min_elements
        return super().__exit__(*exc)


def test_compiler_failure_falls_back_to_eager():
    """A compiler that fails (no C++ toolchain) leaves the eager kernels computing the same thing."""
    x = torch.linspace(-2, 9, 1000)
    s, z = torch.tensor(0.1, requires_grad=True), torch.tensor(3.0)
    want = quant.fake_quant(x, s, z, 0, 15)

    def fail(*_):
        raise RuntimeError("no compiler\nsecond line")

    saved = quant._Fused.fwd, quant._Fused.bwd, quant._Fused.broken
    quant._Fused.fwd, quant._Fused.bwd, quant._Fused.broken = fail, fail, None
    try:
        with _compiled_for_all_sizes():
            got = quant.fake_quant(x, s, z, 0, 15)
            assert quant._Fused.broken == "RuntimeError: no compiler"
    finally:
        quant._Fused.fwd, quant._Fused.bwd, quant._Fused.broken = saved
    assert torch.equal(got, want)


def _check_against_autograd(x, bits, scale, zero, on_grid, sum_rounding=0.0):
    qmin, qmax = quant.act_qrange(bits)
    zero = float(min(zero, qmax))
    if on_grid:  # codes k + 0.5 and the range ends, where round and clamp change branch
        k = np.random.RandomState(len(x)).randint(qmin - 3, qmax + 3, size=x.shape)
        x = ((k + 0.5 * (np.arange(x.size) % 2) - zero) * np.float32(scale)).astype(np.float32)
    g = torch.from_numpy(np.random.RandomState(1).randn(*x.shape).astype(np.float32))
    res = []
    for fn in (quant.fake_quant, _autograd_fake_quant):
        xt = torch.from_numpy(x.copy()).requires_grad_()
        s = torch.tensor(scale, dtype=torch.float32, requires_grad=True)
        y = fn(xt, s, torch.tensor(zero), qmin, qmax)
        y.backward(g)
        res.append((y.detach(), xt.grad, s.grad))
    (y1, gx1, gs1), (y2, gx2, gs2) = res
    assert torch.equal(y1, y2)
    assert torch.equal(gx1 == 0, gx2 == 0)  # the same entries pass; autograd's g * s / s is off by an ulp
    assert torch.allclose(gx1, gx2, rtol=1e-6, atol=0)
    terms = float((g.abs() * (torch.from_numpy(x).abs() / scale + 1)).sum())  # sum |g| (|x / s| + 1)
    # each term g (c - t) carries t = x / s's own rounding (2 ulp of |t|): on the grid, c - t is that alone
    # (x = [0.], found by hypothesis: 0 against -2.4e-7)
    assert torch.allclose(gs1, gs2, rtol=1e-4,
                          atol=1e-4 * float(g.abs().sum()) * 1e-3 + (sum_rounding + 2.5e-7) * terms)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 8), st.integers(1, 6), st.integers(1, 50), st.integers(0, 2**31 - 1))
def test_weight_scale_search_never_worse_than_max(bits, channels, size, seed):
    w = torch.from_numpy(np.random.RandomState(seed).randn(channels, size).astype(np.float32))
    qmin, qmax = quant.weight_qrange(bits)
    s = quant.search_weight_scale(w, 0, qmin, qmax)
    s_max = torch.clamp(w.abs().amax(1) * 2 / (qmax - qmin), min=quant.MIN_SCALE)

    def err(sc):
        q = torch.clamp(torch.round(w / sc[:, None]), qmin, qmax) * sc[:, None]
        return (w - q).abs().pow(quant.P_NORM).sum(1)

    assert torch.all(err(s) <= err(s_max) + 1e-6)
    assert torch.all(s > 0)


def test_act_search_prefers_clipping_outliers():
    x = torch.cat([torch.randn(100000).abs(), torch.tensor([80.0])])
    s, z = quant.search_act_params(x, 0.0, 80.0, *quant.act_qrange(4))
    assert z == 0 and s < 80.0 / 15 * 0.5  # the outlier is clipped, most of the range kept for the bulk


def test_ranges():
    assert quant.weight_qrange(8) == (-128, 127)
    assert quant.weight_qrange(8, reduce_range=True) == (-64, 63)
    assert quant.weight_qrange(2) == (-2, 1)
    assert quant.act_qrange(3) == (0, 7)


def test_compiled_kernels_compile_once_for_every_shape():
    """Ranks 2-5, transposed (non-contiguous) inputs, size-1 axes, inputs with and without gradient:
    one forward and one backward graph in all, and the eager values. A recognizer's [N, C, 1, W] and
    transposed tensors made 8+ variants and hit torch.compile's recompile limit before."""
    from torch._dynamo.utils import counters

    saved = quant._Fused.fwd, quant._Fused.bwd
    quant._Fused.fwd = quant._Fused.bwd = None  # fresh compiled functions
    before = counters["stats"]["unique_graphs"]
    try:
        for shape in [(8, 16, 32, 32), (8, 16, 1, 64), (8, 40, 96), (200, 33), (5, 7, 9, 11, 2)]:
            for transpose in (False, True):
                for grad in (False, True):
                    x = torch.randn(*shape)
                    x = (x.transpose(0, -1) if transpose else x).requires_grad_(grad)
                    got = []
                    for ctx in (quant.compiled(False), _compiled_for_all_sizes()):
                        with ctx:
                            xi = x.detach().clone().requires_grad_(grad)
                            s = torch.tensor(0.1, requires_grad=True)
                            y = quant.fake_quant(xi, s, torch.tensor(3.0), 0, 15)
                            y.backward(torch.ones_like(y))
                            got.append((y.detach(), xi.grad, s.grad))
                    (y1, gx1, gs1), (y2, gx2, gs2) = got
                    assert torch.equal(y1, y2) and y2.shape == x.shape
                    assert gx1 is None and gx2 is None or torch.equal(gx1, gx2)
                    assert torch.allclose(gs1, gs2, rtol=1e-4, atol=1e-3)
        assert counters["stats"]["unique_graphs"] - before <= 2  # fewer when an earlier test compiled them
        assert quant._Fused.broken is None
    finally:
        quant._Fused.fwd, quant._Fused.bwd = saved


def test_compiled_fake_quant_keeps_channels_last():
    """A channels_last input (reconstruction's layout for 4-D units) gives a channels_last output with
    the values and gradients of the row-major input, also when the incoming gradient is row-major."""
    x = torch.randn(4, 6, 5, 7) * 3
    for ctx in (quant.compiled(False), _compiled_for_all_sizes()):
        got = []
        for cl in (False, True):
            xi = (x.contiguous(memory_format=torch.channels_last) if cl else x.clone()).requires_grad_()
            s = torch.tensor(0.2, requires_grad=True)
            with ctx:
                y = quant.fake_quant(xi, s, torch.tensor(5.0), 0, 15)
                y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))  # a row-major gradient
            assert y.is_contiguous(memory_format=torch.channels_last) == cl
            got.append((y.detach(), xi.grad, s.grad))
        (y0, gx0, gs0), (y1, gx1, gs1) = got
        assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
        assert torch.allclose(gs0, gs1, rtol=1e-5, atol=1e-4)
    assert quant._Fused.broken is None, quant._Fused.broken


def test_compiled_adaround_equals_eager():
    """AdaRound's soft weight and rounding regulariser through the compiled kernels: the eager values
    and V's gradients, for every weight rank and channel axis, without a graph per shape."""
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    gen = torch.Generator().manual_seed(0)
    for shape, axis, bits in [((16, 8, 3, 3), 0, 4), ((64, 96), 1, 3), ((40, 24, 5), 0, 2), ((96, 64), 0, 8)]:
        w = torch.randn(*shape, generator=gen)
        got = []
        for ctx in (quant.compiled(False), _compiled_for_all_sizes()):
            wq = quant.WeightQuantizer(w, axis, bits, reduce_range=False)
            wq.init_adaround(w)
            with torch.no_grad():
                wq.alpha.add_(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
            with ctx:
                assert wq._fused() == isinstance(ctx, _compiled_for_all_sizes)
                out = wq(w)
                reg = wq.round_reg(7.5)
                g = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
                ((out * g).sum() + 0.01 * reg).backward()
            got.append((out.detach(), float(reg.detach()), wq.alpha.grad.clone()))
            wq.harden()
            assert wq.floor_x is None and not wq._fused()
        (o0, r0, g0), (o1, r1, g1) = got
        assert torch.equal(o0, o1)
        assert abs(r0 - r1) <= 1e-5 * abs(r0) + 1e-3
        assert torch.allclose(g0, g1, rtol=1e-5, atol=1e-7)
    assert quant._Fused.broken is None, quant._Fused.broken
    # four kernels (soft weight and regulariser, each way), one shape-free graph each; the regulariser's
    # reduction recompiles once above 4096 elements (an inductor size class), well under the limit of 8
    assert counters["stats"]["unique_graphs"] - before <= 6
