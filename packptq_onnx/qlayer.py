"""The quantized torch simulation: each quantizable module of the fx graph wrapped in a QuantLayer.

The wrapper holds the weight in ONNX layout, so the integer tensor we export is exactly the one
we simulate. Bias is quantized to int32 at scale s_x * s_w (the QDQ convention that lets
onnxruntime fuse Conv/Gemm into QLinear kernels) whenever the input is quantized.

Bias correction (Nagel et al., "Data-Free Quantization", 2019): quantizing a weight shifts the
mean of its layer's output by E[(W_q - W) x]. Calibration keeps each biased layer's mean float
input; the simulation subtracts that shift from the bias whenever the weight is quantized, computed
from the current weight (so it follows AdaRound's rounding and any change of bits), and the export
stores the corrected bias.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .convert import module_name
from .layers import Layer, weight_array
from .quant import ActQuantizer, WeightQuantizer

CORRECTABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
               nn.Linear)


@dataclass
class Stats:
    """What calibration saw of one activation tensor: its float range and a random sample of its
    values (the range search runs on the sample)."""
    lo: float
    hi: float
    sample: torch.Tensor


@dataclass(eq=False)
class Links:
    """A layer's neighbours and output statistics, set by calibrate (plain references: a dataclass
    attribute of a module registers no submodule)."""
    fed_by: QuantLayer | None = None       # the layer whose output (or its Relu / Clip) this one reads
    fed_by2: QuantLayer | None = None      # the same for a join's second input
    readers: list = field(default_factory=list)  # quantized layers, the only readers of this output
    post_act: tuple | None = None          # (lo, hi, tensor) of a Relu / Clip right after the layer
    out_stats: Stats | None = None         # of the output, to rebuild it at other bits
    out_bits: int | None = None            # calibrated output bits


class QuantLayer(nn.Module):
    def __init__(self, inner: nn.Module, layer: Layer, w_onnx: np.ndarray):
        super().__init__()
        self.inner, self.layer = inner, layer
        self.weight = nn.Parameter(torch.from_numpy(np.array(w_onnx, dtype=np.float32)), requires_grad=False)
        self.param_path, self.transpose = _bind(inner, self.weight) if layer.has_weight else (None, False)
        # the quantizers and their switches: written by packptq_onnx.state only
        self.wq: WeightQuantizer | None = None
        self.aq: ActQuantizer | None = None
        self.aq2: ActQuantizer | None = None  # second input of an activation x activation MatMul
        self.oq: ActQuantizer | None = None  # output quantizer: lets onnxruntime fuse the layer
        self.quant_w = self.quant_a = False
        self.float_fallback = False  # weights and inputs left float for accuracy (state.fall_back)
        self.float_kernel = False  # b-bit weights, run by a float kernel: measured faster (kernels.apply)
        # calibration statistics, to rebuild the input quantizers at other bits
        self.act_stats: Stats | None = None
        self.act_stats2: Stats | None = None
        self.focus: tuple | None = None  # (probs, v) samples: the focus quantizer's input range (calibrate)
        self.reduce_range = True
        self.initial = {}  # ("w"|"a", bits) -> round-to-nearest parameters, computed once
        self.links = Links()
        self.register_buffer("in_mean", None)  # mean float input over the calibration batch axis

    @property
    def correctable(self) -> bool:
        """Bias correction applies: an own bias, and a module whose output is linear in its weight
        with batch axis 0 (Conv / ConvTranspose channels on axis 1, Linear on the last axis)."""
        return self.bias_path is not None and isinstance(self.inner, CORRECTABLE)

    @property
    def bias_path(self) -> str | None:
        if self.param_path is None or self.layer.bias is None:
            return None
        return self.param_path[: -len("weight")] + "bias"

    @property
    def float_bias(self) -> torch.Tensor:
        """The model's own bias parameter (bias_path must not be None)."""
        return self.inner.get_parameter(self.bias_path)

    def sim_weight(self) -> torch.Tensor:
        w = self.wq(self.weight) if (self.quant_w and self.wq is not None) else self.weight
        return w.T if self.transpose else w

    def bias_scale(self) -> torch.Tensor | None:
        """a_scale * w_scale per output channel. A grouped ConvTranspose keeps its weight as
        [C_in, C_out / groups, k...], so its per-channel scales (axis 1) number C_out / groups;
        output channel o uses weight column o mod (C_out / groups), hence the scales repeat per group
        (GTCRN's grouped deconvs, an unseen wheel model, stopped the export here)."""
        if not (self.quant_a and self.quant_w and self.aq is not None and self.wq is not None):
            return None
        s = self.aq.scale.detach() * self.wq.scale
        n = self.float_bias.numel() if self.bias_path is not None else s.numel()
        return s.repeat(n // s.numel()) if s.numel() not in (1, n) else s

    def forward(self, *args, **kwargs):
        args = list(args)
        if self.quant_a and self.aq is not None:
            args[0] = self.aq(args[0])
        if not self.layer.has_weight:
            if self.quant_a and self.aq2 is not None:
                args[1] = self.aq2(args[1])
            return self._output(self.inner(*args, **kwargs))
        w = self.sim_weight()
        if self.param_path is None:  # weight arrives as argument 1 (MatMul / Gemm)
            args[1] = w
            y = self.inner(*args, **kwargs)
        else:
            b = None
            if self.bias_path is not None:
                b, bs = self.corrected_bias(w), self.bias_scale()
                if bs is not None:  # int32 steps; the correction's gradient passes straight through
                    b = bias_integer(b, bs) * bs + (b - b.detach())
            y = self._call(w, b, args, kwargs)
        return self._output(y)

    def _call(self, w, b, args, kwargs):
        """The wrapped module with weight w (and bias b when the layer has one). Conv and Linear are
        called directly: torch.func.functional_call's parameter swap cost more than a small layer's
        own work in every reconstruction step (12% of an iteration on the direction classifier)."""
        plain = self.param_path == "weight" and self.bias_path in (None, "bias") and not kwargs and len(args) == 1
        if plain and type(self.inner) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            return self.inner._conv_forward(args[0], w, b if self.bias_path else self.inner.bias)
        if plain and type(self.inner) is nn.Linear:
            return F.linear(args[0], w, b if self.bias_path else self.inner.bias)
        params = {self.param_path: w}
        if self.bias_path is not None:
            params[self.bias_path] = b
        return torch.func.functional_call(self.inner, params, tuple(args), kwargs)

    def corrected_bias(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """The float bias less the mean output shift that the quantized weight causes on the
        calibration data (unchanged while the weight is float or without calibration means)."""
        b = self.float_bias
        if not (self.quant_w and self.wq is not None and self.in_mean is not None):
            return b
        w = self.sim_weight() if w is None else w
        dw = w - (self.weight.T if self.transpose else self.weight)
        y = self._call(dw, torch.zeros_like(b), (self.in_mean,), {})
        axis = y.dim() - 1 if isinstance(self.inner, nn.Linear) else 1
        return b - y.mean([d for d in range(y.dim()) if d != axis])

    def _output(self, y):
        if self.quant_a and self.oq is not None:
            y = self.oq(y)
        return y


def _bind(inner: nn.Module, w: torch.Tensor):
    """Where the ONNX weight lives in the converted module: (param path, transposed) or (None, False)."""
    for path, p in inner.named_parameters():
        if path.endswith("weight"):
            if p.shape == w.shape and torch.equal(p.detach(), w):
                return path, False
            if p.dim() == 2 and p.shape == w.T.shape and torch.equal(p.detach(), w.T):
                return path, True
    return None, False


def wrap(gm: torch.fx.GraphModule, model, layers: list[Layer]) -> list[QuantLayer]:
    """Replace each quantizable module of `gm` in place by a QuantLayer; returns them in graph order."""
    out = []
    for layer in layers:
        name = module_name(layer.index)
        w = weight_array(model, layer.weight) if layer.has_weight else np.zeros(0, np.float32)
        ql = QuantLayer(getattr(gm, name), layer, w)
        setattr(gm, name, ql)
        out.append(ql)
    return out


def is_depthwise(q: QuantLayer) -> bool:
    """onnxruntime's depthwise QLinearConv widens to 16 bits and accumulates in 32 (qdwconv), so
    full-range 8-bit weights are exact there; the 7-bit range matters for GEMM-based kernels only.
    On EfficientNet-Lite0 (9 weights per depthwise channel) the 7-bit range cost 2.6 points of top-1."""
    return q.layer.op == "Conv" and getattr(q.inner, "groups", 1) > 1 and q.weight.shape[1] == 1


BIAS_HEADROOM = 2.0 ** 24   # |bias / (a_scale * w_scale)| at most this: LSQ may shrink a_scale 128x
BIAS_LIMIT = 2.0 ** 31 - 256  # int32, exactly representable in float32


@torch.no_grad()
def fit_bias(q: QuantLayer) -> None:
    """Raise the weight scale of channels whose bias would not fit the int32 bias of the export.

    The bias is stored as int32 in steps of a_scale * w_scale. A channel whose weights are all
    (nearly) zero has a tiny w_scale, and its bias overflows int32: onnxruntime then adds garbage
    (EfficientNet-Lite0's stem has such channels). Those channels' weights quantize to zero anyway."""
    if q.wq is None or q.aq is None or q.bias_path is None:
        return
    b = q.float_bias.detach().abs().float()
    floor = (b / (float(q.aq.scale) * BIAS_HEADROOM)).to(q.wq.scale)
    if floor.numel() != q.wq.scale.numel():  # one weight scale for all channels (grouped MatMul weights)
        floor = floor.max().expand_as(q.wq.scale)
    q.wq.scale.copy_(torch.maximum(q.wq.scale, floor))


def bias_integer(b: torch.Tensor, bs: torch.Tensor) -> torch.Tensor:
    """The int32 bias as exported (clamped, so simulation and export agree even at the limit)."""
    return torch.clamp(torch.round(b / bs), -BIAS_LIMIT, BIAS_LIMIT)
