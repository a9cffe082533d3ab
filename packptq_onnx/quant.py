"""Uniform quantizers (torch) with the exact arithmetic of ONNX QuantizeLinear/DequantizeLinear.

q = clamp(round_half_even(x / s) + z, qmin, qmax);  x~ = (q - z) * s.
Weights: symmetric (z = 0), per output channel, signed b-bit range in an int8 container.
Activations: asymmetric uint8 container, clamped to [0, 2^b - 1], per tensor.
Ranges start from an Lp (p = 2.4) search over 80 shrinking candidates (docs/METHOD.md, "Quantizers").
"""
from __future__ import annotations

import torch

P_NORM = 2.4
N_CANDIDATES = 80
MIN_SCALE = 1e-8


def weight_qrange(bits: int, reduce_range: bool = False) -> tuple[int, int]:
    if not 2 <= bits <= 8:
        raise ValueError(f"weight bits must be 2..8, got {bits}")
    if bits == 8 and reduce_range:
        return -64, 63
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def act_qrange(bits: int) -> tuple[int, int]:
    if not 2 <= bits <= 8:
        raise ValueError(f"activation bits must be 2..8, got {bits}")
    return 0, 2 ** bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return (torch.round(x) - x).detach() + x


def fake_quant(x, scale, zero, qmin: int, qmax: int):
    """Quantize-dequantize with a straight-through round (LSQ gradients flow to `scale`)."""
    q = torch.clamp(round_ste(x / scale) + zero, qmin, qmax)
    return (q - zero) * scale


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
