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
from torch import nn

from . import memory, quant
from .convert import module_name
from .layers import Layer, weight_array

SAMPLE_PER_BATCH = 1 << 14  # activation values kept per batch for the range search
SAMPLE_TOTAL = 1 << 16      # and in all: 80 Lp candidates over 65k values, ~0.1 s per quantizer


ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid stretch
CORRECTABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
               nn.Linear)


@dataclass(eq=False)
class Links:
    """A layer's neighbours and output statistics, set by calibrate (plain references: a dataclass
    attribute of a module registers no submodule)."""
    fed_by: QuantLayer | None = None       # the layer whose output (or its Relu / Clip) this one reads
    readers: list = field(default_factory=list)  # quantized layers, the only readers of this output
    post_act: tuple | None = None          # (lo, hi, tensor) of a Relu / Clip right after the layer
    out_stats: tuple | None = None         # (lo, hi, sample) of the output, to rebuild at other bits
    out_bits: int | None = None            # calibrated output bits


class WeightQuantizer(nn.Module):
    """Per-channel symmetric weight quantizer; round to nearest, or AdaRound (soft while learning,
    hard = floor(w/s) + (V >= 0) once learned: the hard integers are what is exported)."""

    def __init__(self, w: torch.Tensor, axis: int, bits: int, reduce_range: bool, scale=None):
        super().__init__()
        self.axis, self.bits = axis, bits
        self.qmin, self.qmax = quant.weight_qrange(bits, reduce_range)
        if scale is None:
            scale = quant.search_weight_scale(w, axis, self.qmin, self.qmax).float()
        self.register_buffer("scale", scale.clone())
        self.alpha: nn.Parameter | None = None
        self.soft = False

    def s(self, ndim: int) -> torch.Tensor:
        return quant.channel_view(self.scale, self.axis, ndim)

    def init_adaround(self, w: torch.Tensor) -> None:
        """V such that h(V) equals the fractional part of w/s."""
        x = w.detach() / self.s(w.dim())
        rest = (x - torch.floor(x)).clamp(1e-4, 1 - 1e-4)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.soft = True

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def integer(self, w: torch.Tensor) -> torch.Tensor:
        """Integer weight exactly as exported."""
        x = w / self.s(w.dim())
        if self.alpha is None:
            return torch.clamp(torch.round(x), self.qmin, self.qmax)
        up = self.h() if self.soft else (self.alpha >= 0).to(x.dtype)
        return torch.clamp(torch.floor(x.detach()) + up, self.qmin, self.qmax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.integer(w) * self.s(w.dim())


class ActQuantizer(nn.Module):
    def __init__(self, bits: int, scale: float, zero: float):
        super().__init__()
        self.bits = bits
        self.qmin, self.qmax = quant.act_qrange(bits)
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("zero", torch.tensor(zero, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant.fake_quant(x, self.scale, self.zero, self.qmin, self.qmax)


class QuantLayer(nn.Module):
    def __init__(self, inner: nn.Module, layer: Layer, w_onnx: np.ndarray):
        super().__init__()
        self.inner, self.layer = inner, layer
        self.weight = nn.Parameter(torch.from_numpy(np.array(w_onnx, dtype=np.float32)), requires_grad=False)
        self.param_path, self.transpose = _bind(inner, self.weight) if layer.has_weight else (None, False)
        self.aq2: ActQuantizer | None = None  # second input of an activation x activation MatMul
        self.observer2 = None
        self.act_stats2 = None
        self.wq: WeightQuantizer | None = None
        self.aq: ActQuantizer | None = None
        self.oq: ActQuantizer | None = None  # output quantizer: lets onnxruntime fuse the layer
        self.out_observer = None
        self.quant_w = self.quant_a = False
        self.observer = None  # callable(x) during calibration
        self.act_stats = None  # (lo, hi, sample) from calibration, to rebuild at other bits
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
        if not (self.quant_a and self.quant_w and self.aq is not None and self.wq is not None):
            return None
        return self.aq.scale.detach() * self.wq.scale

    def forward(self, *args, **kwargs):
        args = list(args)
        if self.observer is not None:
            self.observer(args[0])
        if self.quant_a and self.aq is not None:
            args[0] = self.aq(args[0])
        if not self.layer.has_weight:
            if self.observer2 is not None:
                self.observer2(args[1])
            if self.quant_a and self.aq2 is not None:
                args[1] = self.aq2(args[1])
            return self._output(self.inner(*args, **kwargs))
        w = self.sim_weight()
        if self.param_path is None:  # weight arrives as argument 1 (MatMul / Gemm)
            args[1] = w
            y = self.inner(*args, **kwargs)
        else:
            params = {self.param_path: w}
            if self.bias_path is not None:
                b, bs = self.corrected_bias(w), self.bias_scale()
                if bs is not None:  # int32 steps; the correction's gradient passes straight through
                    b = bias_integer(b, bs) * bs + (b - b.detach())
                params[self.bias_path] = b
            y = torch.func.functional_call(self.inner, params, tuple(args), kwargs)
        return self._output(y)

    def corrected_bias(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """The float bias less the mean output shift that the quantized weight causes on the
        calibration data (unchanged while the weight is float or without calibration means)."""
        b = self.float_bias
        if not (self.quant_w and self.wq is not None and self.in_mean is not None):
            return b
        w = self.sim_weight() if w is None else w
        dw = w - (self.weight.T if self.transpose else self.weight)
        y = torch.func.functional_call(self.inner, {self.param_path: dw, self.bias_path: torch.zeros_like(b)},
                                       (self.in_mean,))
        axis = y.dim() - 1 if isinstance(self.inner, nn.Linear) else 1
        return b - y.mean([d for d in range(y.dim()) if d != axis])

    def _output(self, y):
        if self.out_observer is not None:
            self.out_observer(y)
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


def set_quant(qls, weights: bool, acts: bool) -> None:
    for q in qls:
        q.quant_w, q.quant_a = weights, acts


@torch.no_grad()
def calibrate(gm, qls: list[QuantLayer], batches, wbits, abits, reduce_range: bool, seed: int,
              progress=None, output_bits: int | None = 8, float_outputs=(), post_act=None,
              layer_only=(), bias_correction: bool = True) -> None:
    """RTN initialisation: weight scales by Lp search, activation ranges from float calibration data.

    wbits / abits: an int for all layers or a dict layer-name -> bits. output_bits: an output
    quantizer on every layer whose output is not in `float_outputs` (graph outputs, and tensors that
    feed LayerNorm / Softmax / GELU first); None: no output quantizers. post_act: layer name ->
    (lo, hi, tensor) of a Relu / Clip right after the layer (layers.post_activations): its output
    quantizer is calibrated on the clipped values, and a layer reading that tensor (or the output
    itself) at the same bits shares the quantizer (see tie_inputs). layer_only: tensors read by
    quantized layers only (layers.read_only_by_layers): an output quantizer writing one of them takes
    its readers' bits when they agree, so a W4A4 chain is quantized once per tensor, at 4 bits.
    bias_correction: keep each correctable layer's mean input (see QuantLayer.corrected_bias)."""
    post_act = post_act or {}
    def bits(b, name):
        return b[name] if isinstance(b, dict) else b

    gen = torch.Generator().manual_seed(seed)
    stats = {}

    rate: dict = {}

    def observer(q, key):
        def obs(x):
            x = x.detach().float()
            lo, hi, samples = stats.get(key, (float("inf"), float("-inf"), []))
            per = rate.get(key, SAMPLE_PER_BATCH)
            flat = x.reshape(-1)
            if flat.numel() > per:
                flat = flat[torch.randint(flat.numel(), (per,), generator=gen)]
            samples.append(flat.cpu())
            if sum(len(s) for s in samples) > 2 * SAMPLE_TOTAL:  # many small batches: halve every
                samples[:] = [s[torch.randperm(len(s), generator=gen)[:len(s) // 2]] for s in samples]
                rate[key] = max(per // 2, 1)  # batch's share, so each still weighs the same
            stats[key] = (min(lo, float(x.min())), max(hi, float(x.max())), samples)
        return obs

    sums = {}

    def mean_input(q, obs):
        def f(x):
            if obs is not None:
                obs(x)
            s, n = sums.get(q.layer.name, (0.0, 0))
            if torch.is_tensor(s) and s.shape[1:] != x.shape[1:]:
                return  # calibration samples of another shape: the mean input is taken at the first
            sums[q.layer.name] = (s + x.detach().float().sum(0, keepdim=True), n + x.shape[0])
        return f

    set_quant(qls, False, False)
    for q in qls:
        q.reduce_range, q.initial = reduce_range and not is_depthwise(q), {}
        set_bits(q, bits(wbits, q.layer.name), None)
        q.in_mean = None
        if q.layer.act_input is not None:
            q.observer = observer(q, q.layer.name)
        if bias_correction and q.correctable:
            q.observer = mean_input(q, q.observer)
        if q.layer.act_input2 is not None:
            q.observer2 = observer(q, ("in2", q.layer.name))
        q.oq = None
        if output_bits is not None and q.layer.output not in float_outputs:
            obs = observer(q, ("out", q.layer.name))
            if q.layer.name in post_act:
                lo, hi, _ = post_act[q.layer.name]
                obs = (lambda o, a, b: lambda y: o(torch.clamp(y, a, b)))(obs, lo, hi)
            q.out_observer = obs
    try:
        for args in (progress(batches) if progress else batches):
            gm(*args)
            memory.trim()
    finally:
        for q in qls:
            q.observer = q.out_observer = q.observer2 = None

    def summary(key):
        lo, hi, samples = stats[key]
        sample = torch.cat(samples)
        if sample.numel() > SAMPLE_TOTAL:
            sample = sample[torch.randint(sample.numel(), (SAMPLE_TOTAL,), generator=gen)]
        return lo, hi, sample

    for q in qls:
        if q.layer.name in sums:
            q.in_mean = sums[q.layer.name][0] / sums[q.layer.name][1]
        if q.layer.name in stats:
            q.act_stats = summary(q.layer.name)
        if ("in2", q.layer.name) in stats:
            q.act_stats2 = summary(("in2", q.layer.name))
        set_bits(q, None, bits(abits, q.layer.name))
        q.links = Links()
        if ("out", q.layer.name) in stats:
            q.links.out_stats, q.links.out_bits = summary(("out", q.layer.name)), output_bits
            set_output_bits(q, output_bits)
    producers = {}
    for q in qls:
        q.links.post_act = post_act.get(q.layer.name)
        if q.oq is not None:
            producers[q.layer.output] = q
            if q.layer.name in post_act:
                producers[post_act[q.layer.name][2]] = q
    for q in qls:
        p = producers.get(q.layer.act_input)
        q.links.fed_by = p
        if p is not None and q.layer.act_input in layer_only:
            p.links.readers.append(q)
    tie_inputs(qls)
    set_quant(qls, True, True)


def tie_inputs(qls: list[QuantLayer]) -> None:
    """A layer whose input is another layer's output (directly or through its Relu / Clip) uses that
    layer's output quantizer when the bits agree: one quantizer per tensor, so onnxruntime removes
    the second Q/DQ pair and the Clip and runs the chain as fused integer kernels. First, an output
    quantizer whose tensor only quantized layers read takes their bits when they agree."""
    match_output_bits(qls)
    for q in qls:
        p = q.links.fed_by
        if p is not None and p.oq is not None and q.aq is not None and q.aq.bits == p.oq.bits:
            q.aq = p.oq
            fit_bias(q)  # the bias steps follow the input scale, which just changed


def match_output_bits(qls: list[QuantLayer]) -> None:
    """An output quantizer read by quantized layers only takes their input bits when they all agree,
    else the calibrated output bits (8 by default)."""
    for p in qls:
        readers = p.links.readers
        if p.oq is None or not readers:
            continue
        bits = {r.aq.bits if r.aq is not None else None for r in readers}
        want = bits.pop() if len(bits) == 1 and None not in bits else p.links.out_bits
        if p.oq.bits != want:
            set_output_bits(p, want)


def set_output_bits(q: QuantLayer, bits: int) -> None:
    """(Re)build the output quantizer at `bits`, round to nearest, from its calibration statistics."""
    key = ("o", bits)
    if key not in q.initial:
        lo, hi, sample = q.links.out_stats
        q.initial[key] = quant.search_act_params(sample, lo, hi, *quant.act_qrange(bits))
    q.oq = ActQuantizer(bits, *q.initial[key]).to(q.weight.device)


def set_bits(q: QuantLayer, wbits: int | None, abits: int | None) -> None:
    """Re-initialise (round to nearest) the weight and/or input quantizer of a layer at new bits."""
    if wbits is not None and q.layer.has_weight:
        key = ("w", wbits)
        q.wq = WeightQuantizer(q.weight, q.layer.axis, wbits, q.reduce_range, q.initial.get(key)).to(q.weight.device)
        q.initial[key] = q.wq.scale.detach().clone()
    for attr, stats, tag in (("aq", q.act_stats, "a"), ("aq2", q.act_stats2, "a2")):
        if abits is None or stats is None:
            continue
        key = (tag, abits)
        if key not in q.initial:
            lo, hi, sample = stats
            q.initial[key] = quant.search_act_params(sample, lo, hi, *quant.act_qrange(abits))
        setattr(q, attr, ActQuantizer(abits, *q.initial[key]).to(q.weight.device))
    fit_bias(q)


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


@torch.no_grad()
def export_records(qls: list[QuantLayer], packs: dict | None = None):
    """The exact integers and scales the simulation uses, per layer, for the QDQ writer."""
    from .layers import LayerQuant

    out = []
    for q in qls:
        if q.wq is None:  # activation x activation MatMul: no weight
            rec = LayerQuant(q.layer, 0, np.zeros(0, np.int8), np.zeros(0, np.float32),
                             pack=(packs or {}).get(q.layer.name))
            if q.aq2 is not None:
                rec.a2_scale, rec.a2_zero = float(q.aq2.scale), int(q.aq2.zero)
        else:
            assert not q.wq.soft, "export needs hard rounding"
            w_int = q.wq.integer(q.weight).to(torch.int8).cpu().numpy()
            rec = LayerQuant(q.layer, q.wq.bits, w_int, q.wq.scale.float().cpu().numpy().copy(),
                             pack=(packs or {}).get(q.layer.name))
        if q.oq is not None:
            rec.o_scale, rec.o_zero, rec.o_bits = float(q.oq.scale), int(q.oq.zero), q.oq.bits
        bs = q.bias_scale()
        if q.aq is not None:
            rec.abits, rec.a_scale, rec.a_zero = q.aq.bits, float(q.aq.scale), int(q.aq.zero)
            rec.input_from = shared_input(q)
        if q.bias_path is not None and q.wq is not None:
            b = q.corrected_bias()
            if bs is not None:
                rec.bias_int = bias_integer(b, bs).to(torch.int32).numpy()
                rec.bias_scale = bs.float().numpy().copy()
            elif q.in_mean is not None:  # float bias (input not quantized), corrected
                rec.bias_float = b.detach().float().numpy().copy()
        out.append(rec)
    return out


def shared_input(q: QuantLayer) -> str | None:
    """The producer's output tensor when `q` can read it as it is: q's input quantizer is the
    producer's output quantizer and the Relu / Clip between them (if any) cannot change a value of
    that quantizer's grid. Then the writer drops q's own Q/DQ and the Relu / Clip, and the chain
    runs as integer kernels in onnxruntime at any bit width."""
    p = q.links.fed_by
    if p is None or p.oq is None or q.aq is not p.oq:
        return None
    act = p.links.post_act
    if act is not None and q.layer.act_input == act[2]:
        s, z = np.float32(float(p.oq.scale)), float(p.oq.zero)
        lo_g, hi_g = s * np.float32(p.oq.qmin - z), s * np.float32(p.oq.qmax - z)
        if not (act[0] <= lo_g and hi_g <= act[1]):
            return None
    elif q.layer.act_input != p.layer.output:
        return None
    return p.layer.output
