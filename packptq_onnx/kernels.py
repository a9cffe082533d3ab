"""Integer or float kernel per conv, chosen by timing both in onnxruntime on this machine.

onnxruntime's integer conv (QLinearConv) is not always the faster one. On a 2-core Xeon with
AVX-512 VNNI its float convs use blocked NCHWc kernels that stay efficient at few channels, and its
QLinearConv does not: a 3x3 conv at 4 channels on 128x128 takes 2.2x the float time, a 5x5
depthwise conv 4.6x, while wide 1x1 and 3x3 convs take 0.4-0.6x (bench/LATENCY.md). A model of
narrow convs therefore ran slower quantized than float with every export kind, onnxruntime's own
quantize_static included.

So each conv whose input is quantized is timed alone in onnxruntime, at batch 1 and one thread,
as an integer kernel (uint8 in, QLinearConv, uint8 out) and as a float conv, and a QuantizeLinear
and a DequantizeLinear on each tensor size. A model's predicted time is its convs at their
kernels' times plus the conversions the choice needs: a QuantizeLinear on every quantized tensor
no integer kernel writes, a DequantizeLinear on every one a float op reads. Moves that lower the
prediction by a margin are made, best first: one conv or join flipped, or a conv moved to float
with its neighbours (a float region pays off only once its inner edges are gone). An activation
quantizer that only float layers hold is removed (no integer kernel needs it), so a region runs
as the float model does; the quantizers on its edges stay, so simulation and export agree. The
weights of a float-kernel conv keep their b-bit integers (exporters/qdq.py, _float_kernel_nodes).

Timings differ between machines and between runs: the margin and floor keep borderline convs
integer, and `--kernels integer` gives every conv its integer kernel. docs/METHOD.md, "Kernel
choice".
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from . import runtime, state
from .layers import is_join

MARGIN = 0.1     # a change of kernels must save this share of the convs' integer time ...
FLOOR_US = 5.0   # ... plus this many microseconds at batch 1
ROUNDS = 9
FLOAT_FORM = ("Conv", "Gemm")  # ops the exporter can write as float kernels on b-bit weights
MIN_MODEL_US = 200.0  # below this predicted conv time at batch 1 every conv stays integer: the
# choice could save a few microseconds, and timing noise decides more than the kernels (the bundled
# sample, 59 us, flipped convs now and then on a busy machine)


@dataclass
class Timing:
    layer: str
    integer_us: float  # uint8 in, QLinearConv, uint8 out
    float_us: float    # float in, Conv, float out


def candidates(qls) -> list:
    """Convs with a quantized weight and a quantized input of at most 8 bits (onnxruntime's integer
    kernels): the ones whose kernel can be chosen."""
    return [q for q in qls if q.layer.op == "Conv" and q.wq is not None and q.aq is not None
            and q.aq.bits <= 8 and not runs_float(q)]


def input_shapes(gm, qls, feeds: dict, names: list) -> dict:
    """{layer name: (input shape, output shape)} at batch 1, from one float forward pass."""
    from . import data

    shapes = {}

    def hook(q):
        def fn(mod, args, out):
            shapes[q.layer.name] = (tuple(args[0].shape), tuple(out.shape))
        return fn
    one = next(data.batches(data.take(feeds, 1), names, 1))
    with torch.no_grad(), state.quantized(qls, only=[]), state.capture(post=[(q, hook(q)) for q in qls]):
        gm(*one)
    return shapes


def _conv_models(node, w_shape, x_shape, y_shape, opset: int) -> tuple:
    """The two forms of one conv as small models (random weights: time does not depend on them)."""
    rng = np.random.default_rng(0)
    cout = w_shape[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    w = rng.integers(-127, 128, w_shape).astype(np.int8)
    ws = np.full(cout, 0.01, np.float32)
    b = rng.integers(-1000, 1000, cout).astype(np.int32)
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
             numpy_helper.from_array(np.array(128, np.uint8), "xz"),
             numpy_helper.from_array(np.array(0.05, np.float32), "ys"),
             numpy_helper.from_array(np.array(128, np.uint8), "yz")]
    wf = numpy_helper.from_array(w.astype(np.float32) * 0.01, "wf")
    bf = numpy_helper.from_array(b.astype(np.float32) * 2e-4, "bf")
    u8 = lambda n, s: helper.make_tensor_value_info(n, TensorProto.UINT8, s)  # noqa: E731
    f32 = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731

    def model(nodes, inputs, outputs, init):
        g = helper.make_graph(nodes, "conv", inputs, outputs, init)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", max(opset, 13))])
    integer = model(
        [helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xd"]),
         helper.make_node("DequantizeLinear", ["wq", "wsc"], ["wd"], axis=0),
         helper.make_node("DequantizeLinear", ["bq", "bsc"], ["bd"], axis=0),
         helper.make_node("Conv", ["xd", "wd", "bd"], ["yf"], **attrs),
         helper.make_node("QuantizeLinear", ["yf", "ys", "yz"], ["y"])],
        [u8("x", x_shape)], [u8("y", y_shape)],
        inits + [numpy_helper.from_array(w, "wq"), numpy_helper.from_array(ws, "wsc"),
                 numpy_helper.from_array(b, "bq"), numpy_helper.from_array(ws * 0.02, "bsc")])
    plain = model([helper.make_node("Conv", ["x", "wf", "bf"], ["y"], **attrs)],
                  [f32("x", x_shape)], [f32("y", y_shape)], [wf, bf])
    return integer, plain


def _qdq_models(n: int) -> tuple:
    """QuantizeLinear and DequantizeLinear of n values, alone (what an edge of a float region costs)."""
    s = numpy_helper.from_array(np.array(0.02, np.float32), "s")
    z = numpy_helper.from_array(np.array(128, np.uint8), "z")
    out = []
    for op, a, b in (("QuantizeLinear", TensorProto.FLOAT, TensorProto.UINT8),
                     ("DequantizeLinear", TensorProto.UINT8, TensorProto.FLOAT)):
        g = helper.make_graph([helper.make_node(op, ["x", "s", "z"], ["y"])], op, [
            helper.make_tensor_value_info("x", a, [n])], [helper.make_tensor_value_info("y", b, [n])], [s, z])
        out.append(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    return tuple(out)


def _time(models: list, feeds: list) -> list:
    """Microseconds per run of each model: the least over ROUNDS rounds, the models timed in turn
    (the least is the steadiest figure on a shared machine)."""
    sessions = [runtime.session(m.SerializeToString(), threads=1) for m in models]
    for s, f in zip(sessions, feeds):
        s.run(None, f)
    t = time.perf_counter()
    sessions[0].run(None, feeds[0])
    reps = max(3, min(400, int(4e-3 / max(time.perf_counter() - t, 1e-6))))
    rounds = [[] for _ in models]
    for _ in range(ROUNDS):
        for k, (s, f) in enumerate(zip(sessions, feeds)):
            t = time.perf_counter()
            for _ in range(reps):
                s.run(None, f)
            rounds[k].append((time.perf_counter() - t) / reps * 1e6)
    return [float(min(r)) for r in rounds]


@dataclass
class Costs:
    convs: dict    # layer name -> Timing
    quantize: dict   # elements -> microseconds of a QuantizeLinear
    dequantize: dict  # elements -> microseconds of a DequantizeLinear
    size: dict     # layer name -> (input elements, output elements) at batch 1


def measure(model: onnx.ModelProto, qls, shapes: dict, opset: int) -> Costs:
    """Times of the candidate convs (convs of one shape and attributes timed once) and of a
    QuantizeLinear / DequantizeLinear on every tensor size the layers read or write."""
    by_output = {n.output[0]: n for n in model.graph.node if n.output}
    cache, convs = {}, {}
    for q in candidates(qls):
        if q.layer.name not in shapes:
            continue
        node = by_output[q.layer.output]
        x_shape, y_shape = shapes[q.layer.name]
        key = (tuple(q.weight.shape), x_shape, y_shape, tuple(sorted(
            (a.name, str(helper.get_attribute_value(a))) for a in node.attribute)))
        if key not in cache:
            ms = _conv_models(node, tuple(q.weight.shape), x_shape, y_shape, opset)
            xu = np.random.default_rng(1).integers(0, 256, x_shape).astype(np.uint8)
            xf = (xu.astype(np.float32) - 128) * 0.02
            cache[key] = _time(list(ms), [{"x": xu}, {"x": xf}])
        convs[q.layer.name] = Timing(q.layer.name, *cache[key])
    size = {n: (int(np.prod(x)), int(np.prod(y))) for n, (x, y) in shapes.items()}
    quantize, dequantize = {}, {}
    for n in sorted({v for pair in size.values() for v in pair}):
        x = np.random.default_rng(2).random(n, dtype=np.float32)
        quantize[n], dequantize[n] = _time(list(_qdq_models(n)), [{"x": x}, {"x": (x * 255).astype(np.uint8)}])
    return Costs(convs, quantize, dequantize, size)


def runs_float(q) -> bool:
    """A weighted layer that no integer kernel can run: its input is not quantized (it reads the raw
    network input, or the guard left its input float), it fell back to float, or it is a conv or
    Gemm whose output nothing quantizes (read only by float ops such as GELU, or a network output):
    onnxruntime's integer conv and Gemm need a QuantizeLinear after them, and without one they ran
    float behind a weight DequantizeLinear on every call (PP-OCRv6 tiny recognizer's convs,
    EfficientNet-Lite0's 1280 x 1000 classifier). A MatMul has an integer kernel with a float
    output (MatMulIntegerToFloat)."""
    return q.layer.has_weight and (q.float_fallback or q.aq is None
                                   or (q.layer.op in FLOAT_FORM and q.oq is None and not q.links.readers))


def _holders(qls) -> list:
    """Per activation quantizer object: the (layer, attribute) pairs that hold it."""
    by: dict = {}
    for q in qls:
        for attr in ("aq", "aq2", "oq"):
            if getattr(q, attr) is not None:
                by.setdefault(id(getattr(q, attr)), []).append((q, attr))
    return list(by.values())


def _dropped(sites, off) -> bool:
    """Whether the choice removes this quantizer: every layer holding it runs float (`off`) and it
    has 8 bits or more. A narrower one is a precision the user asked for (--abits 4, an
    allocation's A4): float layers read it through a QuantizeLinear -> DequantizeLinear pair.
    Dropping it gave a float tensor where the report says 4 bits (the direction classifier at W4A4
    lost 70 of its quantizers that way, and its 'W4A4' agreement read 0.962 with mostly float
    activations). An 8- or 16-bit one inside a float region only costs time and accuracy."""
    q, attr = sites[0]
    return getattr(q, attr).bits >= 8 and all(off(h) for h, _ in sites)


def total_us(qls, costs: Costs, floating: set, holders=None) -> float:
    """Predicted time at batch 1 with the layers in `floating` (names) on float kernels: each conv
    at its kernel's time, plus a QuantizeLinear on every quantized tensor that no integer kernel
    writes and a DequantizeLinear on every one that a float op reads. A quantizer of 8 bits or more
    held by float layers only is gone (_dropped); a narrower one costs its pair."""
    off = lambda q: q.layer.name in floating or runs_float(q)  # noqa: E731
    t = sum(c.float_us if n in floating else c.integer_us for n, c in costs.convs.items())
    for sites in holders if holders is not None else _holders(qls):
        if _dropped(sites, off):
            continue
        producer = next((q for q, a in sites if a == "oq"), None)
        held = {id(q) for q, _ in sites}
        if producer is not None:
            n = costs.size.get(producer.layer.name, (0, 0))[1]
            float_reader = not producer.links.readers or any(
                id(r) not in held or off(r) for r in producer.links.readers)
        else:
            q = sites[0][0]
            n = costs.size.get(q.layer.name, (0, 0))[0]
            float_reader = any(off(q) for q, _ in sites)
        if producer is None or off(producer):
            t += costs.quantize.get(n, 0.0)
        if float_reader:
            t += costs.dequantize.get(n, 0.0)
    return t


def choose(qls, costs: Costs) -> set:
    """Names of the layers to run float. Starting from every conv integer, the best of these moves
    is made while one lowers the predicted time (total_us) by more than FLOOR_US plus MARGIN of the
    integer time of the convs it moves: flip one conv or join (float <-> integer), or move one to
    float with its integer neighbours (a region grows as a whole: its inner edges vanish only
    then). Joins count no time of their own (QLinearAdd against Add), only their edges."""
    holders = _holders(qls)
    near: dict = {q.layer.name: set() for q in qls}
    for q in qls:
        for p in (q.links.fed_by, q.links.fed_by2):
            if p is not None:
                near[q.layer.name].add(p.layer.name)
                near[p.layer.name].add(q.layer.name)
    names = [n for n in costs.convs] + [q.layer.name for q in qls if is_join(q.layer)]
    floating: set = set()
    now = total_us(qls, costs, floating, holders)
    while True:
        best = None
        moves = [{n} for n in names] + [{n} | {m for m in near[n] if m in names} for n in names]
        for move in moves:
            trial = floating ^ move if len(move) == 1 else floating | move
            if trial == floating:
                continue
            t = total_us(qls, costs, trial, holders)
            need = FLOOR_US + MARGIN * sum(costs.convs[n].integer_us for n in move if n in costs.convs)
            if t < now - need and (best is None or t < best[0]):
                best = (t, trial)
        if best is None:
            return floating
        now, floating = best


def apply(qls, chosen: set) -> int:
    """Mark the chosen layers float-kernel and remove every activation quantizer of 8 bits or more
    that only layers running float hold (_dropped). Returns the number of quantizers removed."""
    for q in qls:
        q.float_kernel = q.layer.name in chosen and q.layer.has_weight
    off = lambda q: q.layer.name in chosen or runs_float(q)  # noqa: E731
    gone = [sites[0] for sites in _holders(qls) if _dropped(sites, off)]
    part = {attr: site for site, attr in state.SITE_ATTR.items()}
    state.keep_float(qls, [(q.layer.name, part[a]) for q, a in gone])
    return len(gone)


def decide(p, opts, log=print) -> list[dict]:
    """Time, choose and apply on a prepared model (pipeline.Prepared); the rows for the report."""
    if p.imp.opset < 13:  # a per-channel DequantizeLinear needs opset 13
        return []
    todo = candidates(p.qls)
    if not todo:
        return []
    t0 = time.time()
    shapes = input_shapes(p.gm, p.qls, p.calib, p.names)
    costs = measure(p.imp.model, todo, shapes, p.imp.opset)
    before = total_us(p.qls, costs, set())
    chosen = choose(p.qls, costs) if before >= MIN_MODEL_US else set()
    after = total_us(p.qls, costs, chosen)
    removed = apply(p.qls, chosen)
    convs = sorted(n for n in chosen if n in costs.convs)
    if convs:
        log(f"note: {len(convs)} of {len(costs.convs)} convs run onnxruntime's float kernel, faster here than "
            f"its integer one with the edges it needs (predicted {before:.0f} -> {after:.0f} us of conv and "
            f"(de)quantize time at batch 1; {removed} activation quantizers inside float regions removed; "
            f"{time.time() - t0:.0f} s; --kernels integer keeps every conv integer)")
    return [{"layer": n, "integer_us": round(t.integer_us, 1), "float_us": round(t.float_us, 1),
             "kernel": "float" if n in chosen else "integer"}
            for n, t in costs.convs.items()]
