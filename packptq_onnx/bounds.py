"""Value ranges that a float graph guarantees by its structure (interval arithmetic, no data).

The QDQ writer uses them to drop the Clip that limits a sub-8-bit activation to its b-bit codes
(docs/METHOD.md, step 5): where a tensor can never go below the quantizer's lowest code (a
hard-swish output is at least -0.375, a sigmoid gate at least 0, a dequantized tensor at least its
grid's lowest value), uint8 saturation can do the Clip's work.
An op not listed here gives (-inf, inf), which always keeps the Clip.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

from .folding import node_attr

INF = math.inf
Bound = tuple[float, float]
ANY: Bound = (-INF, INF)

# ops whose every output value is one of their (first) input's values, or a mean of some of them
SAME = {"Identity", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "GlobalMaxPool",
        "GlobalAveragePool", "ReduceMean", "ReduceMax", "ReduceMin", "Slice", "Gather", "GatherElements",
        "Split", "Expand", "Tile", "DepthToSpace", "SpaceToDepth", "Dropout"}
FIXED = {"Sigmoid": (0.0, 1.0), "HardSigmoid": (0.0, 1.0), "Softmax": (0.0, 1.0), "Tanh": (-1.0, 1.0)}
HARD_SWISH_MIN = -0.375  # x * relu6(x + 3) / 6 is smallest at x = -1.5


def _mul(a: float, b: float) -> float:
    return 0.0 if a == 0 or b == 0 else a * b  # a zero bound times an infinite one: the values are finite


def _product(a: Bound, b: Bound) -> Bound:
    corners = [_mul(x, y) for x in a for y in b]
    return min(corners), max(corners)


def _union(bounds: list[Bound]) -> Bound:
    return min(b[0] for b in bounds), max(b[1] for b in bounds)


def _const(init) -> Bound:
    a = numpy_helper.to_array(init)
    if a.size == 0 or not np.issubdtype(a.dtype, np.number):
        return ANY
    return float(a.min()), float(a.max())


def _clip_limits(node, values: dict) -> Bound:
    if len(node.input) > 1:  # opset >= 11: min and max are (optional) inputs
        lo = values.get(node.input[1], ANY)[0] if node.input[1] else -INF
        hi = values.get(node.input[2], ANY)[1] if len(node.input) > 2 and node.input[2] else INF
        return lo, hi
    return node_attr(node, "min", -INF), node_attr(node, "max", INF)


def _node(node, b: list[Bound], values: dict) -> Bound:
    op = node.op_type
    if op in SAME:
        return b[0]
    if op in ("Resize", "Upsample"):  # nearest or linear: input values or their convex combinations
        crop = node_attr(node, "coordinate_transformation_mode", b"") == b"tf_crop_and_resize"
        return ANY if crop or node_attr(node, "mode", b"nearest") == b"cubic" else b[0]
    if op == "AveragePool":  # padded zeros may be averaged in
        return min(b[0][0], 0.0), max(b[0][1], 0.0)
    if op in FIXED:
        return FIXED[op]
    if op == "Relu":
        return max(b[0][0], 0.0), max(b[0][1], 0.0)
    if op == "Clip":
        lo, hi = _clip_limits(node, values)
        return min(max(b[0][0], lo), hi), max(min(b[0][1], hi), lo)
    if op == "HardSwish":
        return HARD_SWISH_MIN, max(b[0][1], 0.0)
    if op == "LeakyRelu":
        alpha = node_attr(node, "alpha", 0.01)
        if 0 <= alpha <= 1:  # x for x >= 0, alpha * x below
            lo, hi = b[0]
            return (_mul(alpha, lo) if lo < 0 else lo), (hi if hi > 0 else _mul(alpha, hi))
        return ANY
    if op in ("Exp", "Abs", "Sqrt"):
        return 0.0, INF
    if op == "Neg":
        return -b[0][1], -b[0][0]
    if op == "Add":
        return b[0][0] + b[1][0], b[0][1] + b[1][1]
    if op == "Sub":
        return b[0][0] - b[1][1], b[0][1] - b[1][0]
    if op == "Mul":
        return _product(b[0], b[1])
    if op in ("Concat", "Where"):
        return _union(b[1:] if op == "Where" else b)
    if op == "Max":
        return max(x[0] for x in b), max(x[1] for x in b)
    if op == "Min":
        return min(x[0] for x in b), min(x[1] for x in b)
    if op == "Pad":
        mode = node_attr(node, "mode", b"constant")
        if mode != b"constant":
            return b[0]
        value = b[2] if len(b) > 2 and node.input[2] else (node_attr(node, "value", 0.0),) * 2
        return _union([b[0], value])
    return ANY


TIE = 1e-3  # codes: onnxruntime divides in float32, so a value near a rounding tie may go either way


def quantized(b: Bound, scale: float, zero: int, qmin: int, qmax: int) -> Bound:
    """Where a tensor in `b` lands after quantize-dequantize (monotone, so its ends map to the ends);
    near a rounding tie the lower end takes the lower code and the upper end the upper one."""
    def deq(x, code):
        q = qmin if x == -INF else qmax if x == INF else min(max(code(x / scale) + zero, qmin), qmax)
        return scale * (q - zero)
    return (deq(b[0], lambda v: math.floor(v + 0.5 - TIE)), deq(b[1], lambda v: math.ceil(v - 0.5 + TIE)))


def value_bounds(model: onnx.ModelProto, grids: dict[str, tuple] | None = None,
                 opaque: set = frozenset()) -> tuple[dict, dict]:
    """(produced, read): tensor name -> (lo, hi) that every value lies in, for any input, as its node
    computes it and as its consumers read it. They differ for the tensors in `grids`, which every
    consumer reads quantize-dequantized, given as (scale, zero, qmin, qmax). `opaque`: outputs whose
    node computes something else than the float graph says (a quantized layer): no bound."""
    g = model.graph
    grids = grids or {}
    produced: dict[str, Bound] = {}
    read: dict[str, Bound] = {i.name: _const(i) for i in g.initializer}
    for t in (i.name for i in g.input if i.name not in read):
        produced[t] = ANY
        read[t] = quantized(ANY, *grids[t]) if t in grids else ANY
    for node in g.node:
        if node.domain not in ("", "ai.onnx") or any(t in opaque for t in node.output):
            out = ANY
        else:
            out = _node(node, [read.get(t, ANY) if t else ANY for t in node.input] or [ANY], read)
        if any(math.isnan(float(v)) for v in out):  # inf - inf
            out = ANY
        for i, t in enumerate(node.output):
            b = (float(out[0]), float(out[1])) if i == 0 or node.op_type == "Split" else ANY
            produced[t] = b
            read[t] = quantized(b, *grids[t]) if t in grids else b
    return produced, read
