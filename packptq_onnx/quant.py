"""Uniform quantizers (torch) with the exact arithmetic of ONNX QuantizeLinear/DequantizeLinear.

q = clamp(round_half_even(x / s) + z, qmin, qmax);  x~ = (q - z) * s.
Weights: symmetric (z = 0), per output channel, signed b-bit range in an int8 container.
Activations: asymmetric uint8 container, clamped to [0, 2^b - 1], per tensor; 16-bit activations
(the last resort of mixed precision and accuracy targets) use a uint16 container.
Ranges start from an Lp (p = 2.4) search over 80 shrinking candidates (docs/METHOD.md, "Quantizers").
WeightQuantizer and ActQuantizer are the modules the simulated layers hold; which of them a layer
holds, and whether it is on, is packptq_onnx.state's business alone.
"""
from __future__ import annotations

import torch
from torch import nn

P_NORM = 2.4
N_CANDIDATES = 80
MIN_SCALE = 1e-8
ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid stretch


def weight_qrange(bits: int, reduce_range: bool = False) -> tuple[int, int]:
    if not 2 <= bits <= 8:
        raise ValueError(f"weight bits must be 2..8, got {bits}")
    if bits == 8 and reduce_range:
        return -64, 63
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


ACT_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


def act_qrange(bits: int) -> tuple[int, int]:
    if bits not in ACT_BITS:
        raise ValueError(f"activation bits must be 2..8 or 16, got {bits}")
    return 0, 2 ** bits - 1


class _Fused:
    """Compiled (torch.compile) forms of the fake-quant kernels: one pass over x forward, one pass with
    the scale's reduction backward, where eager runs four and six; on EfficientNet-Lite0 a whole
    reconstruction iteration costs 1.8x its float forward + backward instead of 2.5x
    (bench/RECON_SPEED.md). They compute the same values as the eager code (tests/test_quant.py);
    the scale gradient's sum may round differently. Used for float32 activations of at least
    MIN_ELEMENTS with one scale while `compiled(True)` is in force. The first call compiles, once per
    process (some 20 s on 2 cores; torch's disk cache shortens it later); a compiler that fails (no
    C++ toolchain, an unsupported device) turns them off for the process and the eager kernels take
    over."""
    MIN_ELEMENTS = 1 << 12  # smaller tensors: a compiled call costs about what the eager kernels do
    on = False
    broken: str | None = None
    fwd = bwd = None
    soft_fwd = soft_bwd = reg_fwd = reg_bwd = None  # AdaRound's soft weight and regulariser (_AdaRound)

    @classmethod
    def ready(cls, x: torch.Tensor, scale: torch.Tensor) -> bool:
        if (not cls.on or cls.broken or x.numel() < cls.MIN_ELEMENTS or x.dtype != torch.float32
                or scale.numel() != 1):  # one scale per tensor: the backward sums over everything
            return False
        if cls.fwd is None:
            cls.fwd, cls.bwd = torch.compile(_fq_fwd, dynamic=True), torch.compile(_fq_bwd, dynamic=True)
        return True

    @classmethod
    def ready_weight(cls, alpha: torch.Tensor) -> bool:
        """The compiled AdaRound kernels for this V (float32, contiguous, large enough)?"""
        if (not cls.on or cls.broken or alpha.numel() < cls.MIN_ELEMENTS or alpha.dtype != torch.float32
                or not alpha.is_contiguous()):
            return False
        if cls.soft_fwd is None:
            cls.soft_fwd, cls.soft_bwd, cls.reg_fwd, cls.reg_bwd = (
                torch.compile(f, dynamic=True) for f in (_soft_fwd, _soft_bwd, _reg_fwd, _reg_bwd))
        return True

    @classmethod
    def call(cls, fn, *args):
        """fn's compiled form on args; None when compiling fails (then never again in this process)."""
        try:
            return getattr(cls, fn)(*args)
        except Exception as e:  # noqa: BLE001  (any compiler failure: keep the eager kernels)
            msg = str(e).strip().splitlines()
            cls.broken = f"{type(e).__name__}: {msg[0][:200] if msg else ''}"
            return None


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x itself when its elements fill its storage span without gaps (row-major or channels_last:
    reconstruction runs 4-D units in channels_last, docs/METHOD.md "Step 4"), else a row-major copy."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


def _flat(x: torch.Tensor) -> torch.Tensor:
    """x's storage as one contiguous vector without autograd history (x dense, see _dense): the
    compiled kernels then see one kind of input whatever the rank, layout or size-1 axes, so they
    compile once, not once per variant (a text recognizer's [N, C, 1, W] and transposed [N, W, C]
    tensors hit torch.compile's limit of 8)."""
    x = x.detach()
    # a fresh tensor on x's memory, not a view: dynamo guards a view's base too (its sizes and strides)
    return x.new_empty(0).set_(x.untyped_storage(), x.storage_offset(), (x.numel(),), (1,))


def _like(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The flat result of a compiled kernel seen with dense x's shape and strides."""
    return flat.as_strided(x.shape, x.stride())


def _fq_fwd(x, scale, lo, hi):
    return torch.clamp(torch.round(x / scale), lo, hi) * scale


def _fq_bwd(g, x, scale, lo, hi):
    t = x / scale
    r = torch.round(t)
    c = torch.clamp(r, lo, hi)
    gx = torch.where(c == r, g, 0.0)
    return gx, (g * c - gx * t).sum()


def _h(alpha):
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _dh(alpha):
    """h(V) and dh/dV (0 where the rectifying clamp cuts)."""
    sig = torch.sigmoid(alpha)
    u = sig * (ZETA - GAMMA) + GAMMA
    return torch.clamp(u, 0, 1), torch.where((u >= 0) & (u <= 1), (ZETA - GAMMA) * sig * (1 - sig), 0.0)


def _soft_fwd(alpha, floor_x, s, lo, hi):
    """AdaRound's soft weight clamp(floor(w/s) + h(V), qmin, qmax) * s, flat tensors (s per element)."""
    return torch.clamp(floor_x + _h(alpha), lo, hi) * s


def _soft_bwd(g, alpha, floor_x, s, lo, hi):
    h, dh = _dh(alpha)
    v = floor_x + h
    return torch.where((v >= lo) & (v <= hi), g * s * dh, 0.0)


def _reg_fwd(alpha, beta):
    """AdaRound's rounding regulariser sum(1 - |2 h(V) - 1|^beta)."""
    return (1 - (2 * _h(alpha) - 1).abs().pow(beta)).sum()


def _reg_bwd(g, alpha, beta):
    h, dh = _dh(alpha)
    d = 2 * h - 1
    return g * (-2 * beta) * d.abs().pow(beta - 1) * torch.sign(d) * dh


class _AdaRound(torch.autograd.Function):
    """The soft weight (what="soft": alpha, floor_x, s_full, lo, hi) or the regulariser (what="reg":
    alpha, beta) through the compiled kernels, with their gradient for V written out: one pass each
    way, where eager autograd runs some nine elementwise kernels per weight and step (MiniLM holds
    10.6 M AdaRound variables in one pack). The same values as the eager formulas (tests/test_quant.py)."""

    @staticmethod
    def forward(ctx, what, alpha, *rest):
        ctx.what = what
        ctx.save_for_backward(alpha, *rest)
        args = [_flat(alpha)] + [_flat(t) if t.dim() else t for t in rest]
        out = _Fused.call(what + "_fwd", *args)
        if out is None:  # the compiler failed: the same formula, eager
            out = (_soft_fwd if what == "soft" else _reg_fwd)(*args)
        return out.reshape(alpha.shape) if what == "soft" else out

    @staticmethod
    def backward(ctx, g):
        alpha, *rest = ctx.saved_tensors
        g = g.contiguous() if ctx.what == "soft" else g
        args = [_flat(g) if ctx.what == "soft" else g, _flat(alpha)] + [_flat(t) if t.dim() else t for t in rest]
        ga = _Fused.call(ctx.what + "_bwd", *args)
        if ga is None:
            ga = (_soft_bwd if ctx.what == "soft" else _reg_bwd)(*args)
        return (None, ga.reshape(alpha.shape)) + (None,) * len(rest)


class compiled:
    """Context: the compiled fake-quant kernels on (for reconstruction's learning loop)."""

    def __init__(self, on: bool = True):
        self.want = on

    def __enter__(self):
        self.prev, _Fused.on = _Fused.on, self.want
        return self

    def __exit__(self, *exc):
        _Fused.on = self.prev


def compile_failure() -> str | None:
    """Why the compiled kernels are off in this process (None: they are not)."""
    return _Fused.broken


class _FakeQuant(torch.autograd.Function):
    """Quantize-dequantize in two allocations, with the gradients written out (LSQ, Esser et al. 2020):

        d out / d x = 1 inside the range, 0 outside (the rounding passes straight through);
        d out / d s = round(x/s) - x/s inside, clamp(round(x/s) + z) - z outside.

    This is what autograd derives for (clamp(round_ste(x / s) + z, qmin, qmax) - z) * s, value for value
    (tests/test_quant.py compares both), but autograd kept eight activation-sized tensors and ran some
    twenty elementwise kernels per quantizer and step: 70% of a reconstruction iteration on
    EfficientNet-Lite0's 112x112 units (bench/RECON_SPEED.md). Only x / s is kept for backward."""

    @staticmethod
    def forward(ctx, x, scale, zero, qmin, qmax):
        # clamp(r + z, qmin, qmax) - z = clamp(r, qmin - z, qmax - z) exactly: r and z are integers, and
        # an r too large for float32 integers is clamped either way
        lo, hi = qmin - zero, qmax - zero
        ctx.fused = False
        if _Fused.ready(x, scale):  # keeps x, not x / s: x is often kept by its producer's backward already
            lo_t, hi_t = torch.as_tensor(lo, device=x.device), torch.as_tensor(hi, device=x.device)
            x = _dense(x)
            out = _Fused.call("fwd", _flat(x), scale.detach(), lo_t, hi_t)
            if out is not None:
                ctx.fused = True
                ctx.save_for_backward(x, scale, lo_t, hi_t)
                return _like(out, x)
        t = x / scale
        out = torch.round(t).clamp_(lo, hi).mul_(scale)
        ctx.save_for_backward(t, scale, torch.as_tensor(lo), torch.as_tensor(hi))
        return out

    @staticmethod
    def backward(ctx, g):
        if ctx.fused:
            x, scale, lo, hi = ctx.saved_tensors
            if g.stride() != x.stride():  # the kernel pairs g and x element by element in memory
                g = torch.empty_like(x).copy_(g)
            res = _Fused.call("bwd", _flat(g), _flat(x), scale.detach(), lo, hi)
            if res is not None:
                gx, gs = _like(res[0], x), res[1]
                gs = gs.reshape(scale.shape).to(scale.dtype) if ctx.needs_input_grad[1] else None
                return (gx if ctx.needs_input_grad[0] else None), gs, None, None, None
            t = x / scale  # the compiler failed: the eager backward below
        else:
            t, scale, lo, hi = ctx.saved_tensors
        r = torch.round(t)
        c = r.clamp(lo, hi)  # the integer code less z
        gx = torch.where(c == r, g, 0.0)  # d out / d x: 1 inside the range
        gs = None
        if ctx.needs_input_grad[1]:  # sum g * d out/ds = sum g * (c - z) - sum g * t inside the range
            gs = _dot(g, c) - _dot(gx, t)
            gs = gs.reshape(scale.shape).to(scale.dtype)
        return (gx if ctx.needs_input_grad[0] else None), gs, None, None, None


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) in one pass, without a product tensor."""
    a, b = torch.broadcast_tensors(a, b)
    a, b = a.reshape(-1), b.reshape(-1)
    if a.dtype != b.dtype:
        a, b = a.float(), b.float()
    return torch.dot(a, b)


def fake_quant(x, scale, zero, qmin: int, qmax: int):
    """Quantize-dequantize with a straight-through round (LSQ gradients flow to `scale`):
    (clamp(round_half_even(x / s) + z, qmin, qmax) - z) * s."""
    return _FakeQuant.apply(x, scale, zero, qmin, qmax)


def channel_view(t: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


@torch.no_grad()
def search_weight_scale(w: torch.Tensor, axis: int, qmin: int, qmax: int) -> torch.Tensor:
    """Per-channel symmetric scale minimising sum |w - q(w)|^p over shrunk max|w| candidates."""
    wc = w.detach().float().movedim(axis, 0).reshape(w.shape[axis], -1)
    amax = wc.abs().amax(dim=1)
    best_err = torch.full_like(amax, float("inf"))
    best = torch.clamp(amax * 2 / (qmax - qmin), min=MIN_SCALE)
    for i in range(N_CANDIDATES):
        s = torch.clamp(amax * (1 - 0.01 * i) * 2 / (qmax - qmin), min=MIN_SCALE)
        q = torch.clamp(torch.round(wc / s[:, None]), qmin, qmax) * s[:, None]
        err = (wc - q).abs().pow(P_NORM).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best


def act_params(lo: float, hi: float, qmin: int, qmax: int) -> tuple[float, float]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = max((hi - lo) / (qmax - qmin), MIN_SCALE)
    z = float(min(max(round(qmin - lo / s), qmin), qmax))
    return s, z


@torch.no_grad()
def search_act_params(sample: torch.Tensor, lo: float, hi: float, qmin: int, qmax: int):
    """Per-tensor asymmetric (scale, zero point) minimising Lp error on a sample of the tensor."""
    x = sample.float().ravel()
    best, best_err = act_params(lo, hi, qmin, qmax), float("inf")
    for i in range(N_CANDIDATES):
        f = 1 - 0.01 * i
        s, z = act_params(lo * f, hi * f, qmin, qmax)
        s32 = torch.tensor(s, dtype=torch.float32)
        err = float((x - fake_quant(x, s32, z, qmin, qmax)).abs().pow(P_NORM).sum())
        if err < best_err:
            best, best_err = (s, z), err
    return best


FOCUS_CANDIDATES = 64  # upper ends max * 2^(-k/8), k < 64: down to max / 256


@torch.no_grad()
def search_focus(probs: torch.Tensor, v: torch.Tensor, hi: float, qmin: int, qmax: int, extra=()):
    """(scale, zero point) of a post-Softmax probability quantizer that minimises the squared error
    of the attention output probs @ v, not of the probabilities (docs/METHOD.md, "Focus quantizer").

    A uniform QDQ grid on non-negative values always starts at 0 (the zero point is a code), so
    the interval to choose is [0, c]: probabilities above c saturate at c. A small c gives the many
    small probabilities their own levels, a large one keeps the few large ones; the attention
    output's error weighs both by the values they multiply. `extra`: more (scale, zero point)
    candidates, e.g. the Lp search's choice, so the result is never worse than it on this error."""
    probs, v = probs.float(), v.float()
    ref = probs @ v
    best, best_err = act_params(0.0, hi, qmin, qmax), float("inf")
    cands = [act_params(0.0, hi * 2.0 ** (-k / 8), qmin, qmax) for k in range(FOCUS_CANDIDATES)] + list(extra)
    for s, z in cands:
        q = fake_quant(probs, torch.tensor(s, dtype=torch.float32), z, qmin, qmax)
        err = float((q @ v - ref).pow(2).sum())
        if err < best_err:
            best, best_err = (s, z), err
    return best


class WeightQuantizer(nn.Module):
    """Per-channel symmetric weight quantizer; round to nearest, or AdaRound (soft while learning,
    hard = floor(w/s) + (V >= 0) once learned: the hard integers are what is exported).

    Low-rank compensation (AIQViT's idea, merged form; docs/METHOD.md "Low-rank compensation"): a
    learnable B·A, in units of the weight's steps, is added to w/s, so a whole low-rank direction can
    move by more than AdaRound's one step up or down. It learns first, through round-to-nearest with
    a straight-through gradient; then `fix_lowrank` freezes it as a shift and AdaRound rounds
    w/s + shift. This order is a curriculum: learning both at once, floor(w/s + B·A) jumped a whole
    step whenever B·A carried an element across an integer while V still held its old fraction. The
    exported integers hold the shift: no extra op.

    Side-branch form (`branch=True`): B·A stays float beside the rounded weight, learned jointly
    with V from the start (it never moves the rounding): the layer computes x·(Ŵ + s·B·A), and the
    writer adds (x·first)·second to the layer's output (`branch_factors`)."""

    def __init__(self, w: torch.Tensor, axis: int, bits: int, reduce_range: bool, scale=None):
        super().__init__()
        self.axis, self.bits = axis, bits
        self.qmin, self.qmax = weight_qrange(bits, reduce_range)
        if scale is None:
            scale = search_weight_scale(w, axis, self.qmin, self.qmax).float()
        self.register_buffer("scale", scale.clone())
        self.alpha: nn.Parameter | None = None
        self.soft = False
        self.lr_a: nn.Parameter | None = None  # low-rank compensation B·A while it learns (2-D weights only)
        self.lr_b: nn.Parameter | None = None
        self.shift: torch.Tensor | None = None  # B·A once fixed, in steps: what AdaRound then rounds
        self.rank = 0
        self.branch = False  # B·A is a float side branch, not rounded
        self.floor_x: torch.Tensor | None = None  # floor(w/s + shift) while V learns: constant then
        self.s_full: torch.Tensor | None = None  # the scale per weight element, for the compiled kernels

    def s(self, ndim: int) -> torch.Tensor:
        return channel_view(self.scale, self.axis, ndim)

    def base(self, w: torch.Tensor) -> torch.Tensor:
        """w / s plus the low-rank compensation (learning or fixed), in steps."""
        x = w / self.s(w.dim())
        if self.lr_a is not None and not self.branch:
            return x + self.lr_b @ self.lr_a
        return x if self.shift is None else x + self.shift

    def init_adaround(self, w: torch.Tensor) -> None:
        """V such that h(V) equals the fractional part of w/s (+ shift)."""
        x = self.base(w.detach()).detach()
        rest = (x - torch.floor(x)).clamp(1e-4, 1 - 1e-4)
        v = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
        if self.alpha is None:
            self.alpha = nn.Parameter(v)
        else:  # the same parameter object: an optimiser may hold it
            self.alpha.data.copy_(v)
        self.soft = True
        self.floor_x = torch.floor(x).contiguous()
        self.s_full = None  # made on the first compiled call

    def init_lowrank(self, w: torch.Tensor, rank: int, gen: torch.Generator, branch: bool = False) -> None:
        """B·A of rank `rank` for a 2-D weight; B = 0, so nothing changes until it learns (A random
        with unit-variance entries of B·A per unit of B: LoRA's start, in steps)."""
        d0, d1 = w.shape
        r = max(1, min(rank, d0, d1))
        a = torch.randn(r, d1, generator=gen, device=gen.device) / r ** 0.5
        self.lr_a = nn.Parameter(a.to(w.device))
        self.lr_b = nn.Parameter(torch.zeros(d0, r, device=w.device))
        self.rank, self.branch = r, branch

    def fix_lowrank(self, w: torch.Tensor) -> None:
        """B·A stops learning and becomes a fixed shift of w/s; AdaRound's V (if any) starts again
        from the fractional part of w/s + shift, so the soft weight is w + s·shift."""
        self.shift = (self.lr_b @ self.lr_a).detach()
        self.lr_a = self.lr_b = None
        if self.alpha is not None:
            self.init_adaround(w)

    def harden(self) -> None:
        """Learning is over: round by the sign of V from now on (what is exported)."""
        self.soft, self.floor_x, self.s_full = False, None, None

    def round_to_nearest(self) -> None:
        """Forget what AdaRound and the low-rank compensation learned: plain rounding again."""
        self.alpha, self.soft, self.floor_x, self.s_full = None, False, None, None
        self.lr_a = self.lr_b = self.shift = None
        self.rank, self.branch = 0, False

    def h(self) -> torch.Tensor:
        return _h(self.alpha)

    def _fused(self) -> bool:
        """While V learns (soft, B·A not learning inside the rounding), under `compiled(True)`: the
        compiled kernels."""
        return (self.soft and self.floor_x is not None and (self.lr_a is None or self.branch)
                and self.floor_x.shape == self.alpha.shape and _Fused.ready_weight(self.alpha)
                and self.alpha.requires_grad)

    def round_reg(self, beta: float) -> torch.Tensor:
        """AdaRound's rounding regulariser sum(1 - |2 h(V) - 1|^beta)."""
        if self._fused():
            return _AdaRound.apply("reg", self.alpha, torch.tensor(float(beta), device=self.alpha.device))
        return _reg_fwd(self.alpha, beta)

    def integer(self, w: torch.Tensor) -> torch.Tensor:
        """Integer weight exactly as exported."""
        x = self.base(w)
        if self.lr_a is not None and not self.branch:  # B·A learning: round to nearest, straight through
            return torch.clamp(x + (torch.round(x) - x).detach(), self.qmin, self.qmax)
        if self.alpha is None:
            return torch.clamp(torch.round(x), self.qmin, self.qmax)
        up = self.h() if self.soft else (self.alpha >= 0).to(x.dtype)
        return torch.clamp(torch.floor(x.detach()) + up, self.qmin, self.qmax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self._fused():  # one pass forward and one backward where eager runs some nine each
            dev = self.alpha.device
            if self.s_full is None:
                self.s_full = self.s(self.alpha.dim()).expand(self.alpha.shape).contiguous()
            lo, hi = torch.tensor(float(self.qmin), device=dev), torch.tensor(float(self.qmax), device=dev)
            out = _AdaRound.apply("soft", self.alpha, self.floor_x, self.s_full, lo, hi)
        else:
            out = self.integer(w) * self.s(w.dim())
        if self.branch:  # the float side branch, in weight units
            out = out + (self.lr_b @ self.lr_a) * self.s(w.dim())
        return out

    @torch.no_grad()
    def branch_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(first, second) with x @ first @ second = the branch's part of the layer output, for a
        2-D ONNX weight read as x @ W (axis 1: MatMul, Gemm transB=0) or x @ W^T (axis 0)."""
        b, a = self.lr_b.detach(), self.lr_a.detach()
        if self.axis == 1:  # W [K, N], B·A * s over columns
            return b, a * self.scale[None, :]
        return a.T, (b * self.scale[:, None]).T  # W [N, K]: x @ (s * B·A)^T


class ActQuantizer(nn.Module):
    def __init__(self, bits: int, scale: float, zero: float):
        super().__init__()
        self.bits = bits
        self.qmin, self.qmax = act_qrange(bits)
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("zero", torch.tensor(zero, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x, self.scale, self.zero, self.qmin, self.qmax)
