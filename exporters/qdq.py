"""QDQ ONNX writer.

Per quantized layer: the weight becomes an int8 initializer (values limited to the layer's bit
range) + DequantizeLinear(axis = output channel); the bias (when the input is quantized) an int32
initializer at scale s_x*s_w + DequantizeLinear; the activation input QuantizeLinear(uint8) ->
[Clip to 0..2^b-1 for b < 8, where the tensor's range needs it] -> DequantizeLinear (16-bit: uint16 through
onnxruntime's com.microsoft QuantizeLinear / DequantizeLinear, which every opset accepts).
onnxruntime fuses the 2-8 bit groups into its integer kernels; the arithmetic equals
packptq_onnx.quant's simulation.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
from onnx import helper, numpy_helper

from packptq_onnx.bounds import value_bounds
from packptq_onnx.folding import drop_unused_initializers, node_attr

META_KEY = "packptq"
MS_DOMAIN = "com.microsoft"
STORAGES = ("int8", "packed")
# packed storage: 3-4 bit weights as INT4 (opset 21), 2-bit as INT2 (opset 25); 5-8 bit stay int8
PACKED = {2: (onnx.TensorProto.INT2, 25, 11), 3: (onnx.TensorProto.INT4, 21, 10), 4: (onnx.TensorProto.INT4, 21, 10)}


class _Names:
    def __init__(self, model):
        g = model.graph
        self.used = {n for node in g.node for n in (*node.input, *node.output, node.name)}
        self.used |= {i.name for i in g.initializer} | {i.name for i in g.input}

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name


def write_qdq(model: onnx.ModelProto, quants: list, meta: dict | None = None,
              storage: str = "int8", every_clip: bool = False) -> onnx.ModelProto:
    """A new model: `model` (the normalised graph the simulation ran) with QDQ for `quants`.

    storage "int8": every weight in an int8 container (fused by onnxruntime, int8 speed);
    "packed": INT4/INT2 initializers for <= 4-bit weights (small files; the model's opset is
    upgraded to 21, or 25 when INT2 is used). every_clip: every sub-8-bit activation keeps its
    Clip, also where its range makes it idle (the same values; for comparisons, see _ClipPlan)."""
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}")
    m = copy.deepcopy(model)
    if storage == "packed":
        m = _upgrade_for_packed(m, quants)
    g = m.graph
    name = _Names(m)
    # by output tensor, not node index: the opset upgrade of packed storage may insert nodes
    # (ReduceMean 17 -> 18 turns its axes into a Constant input), which shifts every index after it
    by_output = {q.layer.output: q for q in quants}
    inits, nodes = [], []
    clips = _ClipPlan(m, quants, every_clip)

    def const(base, array):
        n = name(base)
        inits.append(numpy_helper.from_array(np.asarray(array), n))
        return n

    def weight_const(base, array, bits):
        n = name(base)
        if storage == "packed" and bits in PACKED:
            a = np.asarray(array)
            width = 2 if PACKED[bits][0] == onnx.TensorProto.INT2 else 4
            inits.append(helper.make_tensor(n, PACKED[bits][0], a.shape, pack_bits(a, width), raw=True))
        else:
            inits.append(numpy_helper.from_array(np.asarray(array).astype(np.int8), n))
        return n

    def dq_of(tensor):  # the DequantizeLinear written for this tensor
        return next(n for n in reversed(nodes) if n.op_type == "DequantizeLinear" and n.output[0] == tensor)

    for node in list(g.node):
        q = by_output.get(node.output[0]) if node.output else None
        if q is not None:
            float_form = q.float_kernel and not node_attr(node, "transA", 0)  # (a Gemm reading A transposed: rare)
            if float_form:
                nodes.extend(_float_kernel_nodes(node, q, const, weight_const, name, dq_of, clips))
            else:
                nodes.extend(_layer_nodes(node, q, const, weight_const, name, clips))
            tag = {"pack": q.pack, "wbits": q.wbits, "abits": q.abits}
            _tag(m, node, {**tag, "kernel": "float"} if float_form else tag)
        nodes.append(node)
        last = node
        if q is not None and q.branch is not None:
            extra = _branch_nodes(node, q, const, name)
            nodes.extend(extra)
            last = extra[-1]
        if q is not None and q.o_scale is not None:
            nodes.extend(_output_nodes(last, q, const, name, clips))
    del g.node[:]
    g.node.extend(_live(nodes, {o.name for o in g.output}))
    if any(n.domain == MS_DOMAIN for n in g.node) and all(o.domain != MS_DOMAIN for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    g.initializer.extend(inits)
    drop_unused_initializers(g)
    if meta is not None:
        _set_meta(m, META_KEY, json.dumps(meta, sort_keys=True))
    return m


def pack_bits(a: np.ndarray, width: int) -> bytes:
    """Signed integers as ONNX INT4 / INT2 raw data: 8 / width values per byte, the first in the
    lowest bits. (helper.make_tensor with a list writes one varint per byte instead: EfficientNet-
    Lite0's W4 weights took 3.30 MB for 2.30 MB of nibbles.)"""
    per = 8 // width
    v = (np.asarray(a, np.int64).ravel() & ((1 << width) - 1)).astype(np.uint8)
    v = np.concatenate([v, np.zeros(-len(v) % per, np.uint8)]).reshape(-1, per)
    shifts = (width * np.arange(per)).astype(np.uint8)
    return np.bitwise_or.reduce(v << shifts, axis=1).astype(np.uint8).tobytes()


def _live(nodes: list, outputs: set) -> list:
    """Drop nodes nothing reads any more (a Relu / Clip bypassed by a shared input quantizer)."""
    used = set(outputs)
    keep = []
    for node in reversed(nodes):
        if any(o in used for o in node.output):
            keep.append(node)
            used.update(node.input)
    return keep[::-1]


def _upgrade_for_packed(m: onnx.ModelProto, quants: list) -> onnx.ModelProto:
    need = [PACKED[q.wbits] for q in quants if q.wbits in PACKED]
    if not need:
        return m
    opset, ir = max(n[1] for n in need), max(n[2] for n in need)
    current = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 1)
    if current < opset:
        try:
            m = onnx.version_converter.convert_version(m, opset)
        except Exception as exc:
            from packptq_onnx.errors import UsageError
            raise UsageError(f"packed storage needs opset {opset} and this model cannot be upgraded "
                             f"({str(exc).splitlines()[0][:150]}): use --storage int8") from None
    m.ir_version = max(m.ir_version, ir)
    return m


class _ClipPlan:
    """Where a b-bit activation (b < 8) needs no Clip after its uint8 QuantizeLinear: the tensor's
    range, known from the graph (bounds.py), never reaches the code the Clip would cut. Above
    2^b - 1: nothing to cut. Below 0: the zero point moves up by 255 - (2^b - 1), so uint8
    saturation at 255 cuts the top and the bottom is never reached; the DequantizeLinear takes the
    same zero point, so the values are the simulation's. Not after a Relu or Clip: onnxruntime folds
    those into the QuantizeLinear only when its range starts at the activation's lowest value."""
    MARGIN = 0.01  # codes: float rounding of the bounds never matters

    def __init__(self, model, quants, every_clip: bool = False):
        self.every_clip = every_clip
        self.codes = {}  # codes tensor -> its zero-point offset
        if every_clip:
            return
        grids = {q.layer.output: (q.o_scale, q.o_zero, 0, 2 ** min(q.o_bits, 16) - 1)
                 for q in quants if q.o_scale is not None}
        self.produced, self.read = value_bounds(model, grids, opaque={q.layer.output for q in quants})
        self.op = {o: n.op_type for n in model.graph.node for o in n.output}

    def offset(self, tensor, bits, scale, zero, produced=False) -> int | None:
        """0 or the offset when no Clip is needed, None when it is; produced: the tensor before
        its own output quantizer."""
        if bits >= 8:
            return 0
        if self.every_clip:
            return None
        lo, hi = (self.produced if produced else self.read).get(tensor, (-np.inf, np.inf))
        top = 2 ** bits - 1
        if hi / scale + zero <= top + 0.5 - self.MARGIN:
            return 0
        if lo / scale + zero >= -0.5 + self.MARGIN and self.op.get(tensor) not in ("Relu", "Clip"):
            return 255 - top
        return None


def _act_qdq(tensor, bits, scale, zero, lname, tag, const, name, clips, channels: int = 0,
             produced: str | None = None) -> tuple[list, str]:
    """QuantizeLinear(uint8) -> [Clip to 0..2^b-1] -> DequantizeLinear on `tensor` (uint16 at 16 bits);
    the Clip only where the tensor's range needs it (_ClipPlan). produced: the tensor is this one's
    value as its node computes it (an output quantizer renames what it quantizes).
    channels > 0: the DequantizeLinear repeats the scale per channel (axis 1; see _float_kernel_nodes)."""
    out = []
    wide = {"domain": MS_DOMAIN} if bits == 16 else {}
    shift = clips.offset(produced or tensor, bits, scale, zero, produced is not None)
    zero = zero + (shift or 0)
    s = const(f"{lname}.{tag}_scale", np.array(scale, np.float32))
    z = const(f"{lname}.{tag}_zero", np.array(zero, np.uint16 if bits == 16 else np.uint8))
    xq = name(f"{lname}.{tag}_q")
    out.append(helper.make_node("QuantizeLinear", [tensor, s, z], [xq], name=name(f"{lname}.{tag}_Q"), **wide))
    if shift is None:
        lo = const(f"{lname}.{tag}_qmin", np.array(0, np.uint8))
        hi = const(f"{lname}.{tag}_qmax", np.array(2 ** bits - 1, np.uint8))
        xc = name(f"{lname}.{tag}_q{bits}")
        out.append(helper.make_node("Clip", [xq, lo, hi], [xc], name=name(f"{lname}.{tag}_Clip")))
        xq = xc
    clips.codes[xq] = shift or 0
    if channels:
        dq = _per_channel_dq(xq, scale, zero, channels, bits, lname, const, name)
        return out + [dq], dq.output[0]
    x_dq = name(f"{lname}.{tag}_dq")
    out.append(helper.make_node("DequantizeLinear", [xq, s, z], [x_dq], name=name(f"{lname}.{tag}_DQ"), **wide))
    return out, x_dq


def _per_channel_dq(codes, scale, zero, channels, bits, lname, const, name):
    """DequantizeLinear of `codes` with the one scale and zero point repeated per channel (axis 1):
    the same values as the per-tensor form, but onnxruntime fuses no integer kernel onto it and does
    not re-quantize a float weight behind it (its WeightBiasQuantization takes per-tensor inputs)."""
    wide = {"domain": MS_DOMAIN} if bits == 16 else {}
    s = const(f"{lname}.xc_scale", np.full(channels, scale, np.float32))
    z = const(f"{lname}.xc_zero", np.full(channels, zero, np.uint16 if bits == 16 else np.uint8))
    return helper.make_node("DequantizeLinear", [codes, s, z], [name(f"{lname}.xc_dq")],
                            name=name(f"{lname}.xc_DQ"), axis=1, **wide)


def _float_kernel_nodes(node, q, const, weight_const, name, dq_of, clips) -> list:
    """A conv run by onnxruntime's float kernel (measured faster than its integer one, or one no
    integer kernel can run: kernels.py), or a Gemm no integer kernel can run. Its b-bit weight is
    stored as integers (int8 container, or INT4 / INT2 in packed storage) and dequantized by Cast
    and Mul, which onnxruntime folds into a constant float weight when the session loads, INT4 and
    INT2 included (a DequantizeLinear it would keep, dequantizing on every call; a float conv would
    then also lose the blocked NCHWc kernel that makes it fast);
    the product is the one DequantizeLinear and the simulation compute. The int32 bias is written
    dequantized; a quantized input is read through a per-channel DequantizeLinear."""
    lname = q.layer.name
    shape = [1] * q.w_int.ndim
    shape[q.layer.axis] = -1
    w_int = weight_const(f"{lname}.w_int{q.wbits}", q.w_int, q.wbits)
    w_s = const(f"{lname}.w_scale", q.w_scale.astype(np.float32).reshape(shape))
    w_f, w = name(f"{lname}.w_float"), name(f"{lname}.w_dequantized")
    out = [helper.make_node("Cast", [w_int], [w_f], name=name(f"{lname}.w_Cast"), to=onnx.TensorProto.FLOAT),
           helper.make_node("Mul", [w_f, w_s], [w], name=name(f"{lname}.w_Mul"))]
    node.input[1] = w
    if q.bias_int is not None:
        node.input[2] = const(f"{lname}.b_dequantized", q.bias_int.astype(np.float32) * q.bias_scale.astype(np.float32))
    elif q.bias_float is not None:
        node.input[2] = const(f"{lname}.b_corrected", q.bias_float.astype(np.float32))
    if node.op_type == "Gemm":  # the input's features: B is [K, N], or [N, K] when transposed
        channels = q.w_int.shape[1] if node_attr(node, "transB", 0) else q.w_int.shape[0]
    else:
        channels = q.w_int.shape[1] * node_attr(node, "group", 1)
    if q.input_from is not None:
        codes = dq_of(q.input_from).input[0]
        dq = _per_channel_dq(codes, q.a_scale, q.a_zero + clips.codes.get(codes, 0), channels, q.abits, lname,
                             const, name)
        node.input[0] = dq.output[0]
        return out + [dq]
    if q.abits is not None:
        nodes, node.input[0] = _act_qdq(node.input[0], q.abits, q.a_scale, q.a_zero, lname, "x", const, name,
                                        clips, channels=channels)
        return out + nodes
    return out


def _layer_nodes(node, q, const, weight_const, name, clips) -> list:
    lname = q.layer.name
    if not q.layer.has_weight:  # activation x activation MatMul or join: both inputs quantized
        out = []
        for i, (s, z, tag, shared) in enumerate(((q.a_scale, q.a_zero, "x", q.input_from),
                                                 (q.a2_scale, q.a2_zero, "x2", q.input2_from))):
            if shared is not None:
                node.input[i] = shared
            elif s is not None:
                nodes, node.input[i] = _act_qdq(node.input[i], q.abits, s, z, lname, tag, const, name, clips)
                out += nodes
        return out
    out = []
    if q.wbits == 0:  # fallen back to float: the weight and bias stay as they are
        if q.abits is not None:
            nodes, node.input[0] = _act_qdq(node.input[0], q.abits, q.a_scale, q.a_zero, lname, "x", const, name, clips)
            out += nodes
        return out
    # weight: integer initializer (int8 container, or INT4/INT2 packed) -> DequantizeLinear(axis)
    w_q = weight_const(f"{lname}.w_int{q.wbits}", q.w_int, q.wbits)
    w_s = const(f"{lname}.w_scale", q.w_scale.astype(np.float32))
    w_dq = name(f"{lname}.w_dq")  # symmetric: no zero-point tensor (it defaults to 0)
    out.append(helper.make_node("DequantizeLinear", [w_q, w_s], [w_dq], name=name(f"{lname}.w_DQ"),
                                axis=q.layer.axis))
    node.input[1] = w_dq
    if q.bias_int is not None:
        b_q = const(f"{lname}.b_int32", q.bias_int.astype(np.int32))
        b_s = const(f"{lname}.b_scale", q.bias_scale.astype(np.float32))
        b_dq = name(f"{lname}.b_dq")
        out.append(helper.make_node("DequantizeLinear", [b_q, b_s], [b_dq], name=name(f"{lname}.b_DQ"),
                                    axis=0))
        node.input[2] = b_dq
    elif q.bias_float is not None:
        node.input[2] = const(f"{lname}.b_corrected", q.bias_float.astype(np.float32))
    if q.input_from is not None:  # input quantizer shared with the producer's output: read its DQ
        node.input[0] = q.input_from
    elif q.abits is not None:
        nodes, node.input[0] = _act_qdq(node.input[0], q.abits, q.a_scale, q.a_zero, lname, "x", const, name, clips)
        out += nodes
    return out


def _branch_nodes(node, q, const, name) -> list:
    """The low-rank side branch: output = layer(x) + (x @ first) @ second, float, on the layer's
    (dequantized) input; the Add comes last, so an output quantizer goes after it."""
    lname, y = q.layer.name, node.output[0]
    main = name(f"{lname}.y_main")
    node.output[0] = main
    first = const(f"{lname}.lowrank_first", q.branch[0].astype(np.float32))
    second = const(f"{lname}.lowrank_second", q.branch[1].astype(np.float32))
    h, d = name(f"{lname}.lowrank_h"), name(f"{lname}.lowrank_y")
    return [helper.make_node("MatMul", [node.input[0], first], [h], name=name(f"{lname}.lowrank_MatMul")),
            helper.make_node("MatMul", [h, second], [d], name=name(f"{lname}.lowrank_MatMul")),
            helper.make_node("Add", [main, d], [y], name=name(f"{lname}.lowrank_Add"))]


def _output_nodes(node, q, const, name, clips) -> list:
    """Q -> [Clip] -> DQ on the layer output (consumers keep reading the original tensor name)."""
    lname, y = q.layer.name, node.output[0]
    pre = name(f"{lname}.y_float")
    node.output[0] = pre
    nodes, _ = _act_qdq(pre, q.o_bits, q.o_scale, q.o_zero, lname, "y", const, name, clips, produced=y)
    nodes[-1].output[0] = y
    return nodes


def _tag(model, node, tag: dict) -> None:
    text = json.dumps(tag, sort_keys=True)
    if model.ir_version >= 10:
        _set_meta(node, META_KEY, text)
    else:
        node.doc_string = f"{META_KEY}:{text}"


def _set_meta(holder, key: str, value: str) -> None:
    for p in holder.metadata_props:
        if p.key == key:
            p.value = value
            return
    holder.metadata_props.add(key=key, value=value)


def set_meta(model: onnx.ModelProto, meta: dict) -> None:
    _set_meta(model, META_KEY, json.dumps(meta, sort_keys=True))


def read_meta(model: onnx.ModelProto) -> dict | None:
    for p in model.metadata_props:
        if p.key == META_KEY:
            return json.loads(p.value)
    return None


def weight_bytes(model: onnx.ModelProto) -> float:
    """Weight bytes of the quantized layers at their bit widths, counted from the file itself."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    total = 0.0
    for node in model.graph.node:
        tag = node_tag(node)
        if not tag or not tag["wbits"] or len(node.input) < 2 or node.input[1] not in producer:
            continue
        dq = producer[node.input[1]]
        if dq.op_type == "Mul":  # a float-kernel conv: Cast(integers) * scale
            dq = producer[dq.input[0]]
        w = inits[dq.input[0]]
        total += int(np.prod(w.dims)) * tag["wbits"] / 8
    return total


def node_tag(node) -> dict | None:
    for p in node.metadata_props:
        if p.key == META_KEY:
            return json.loads(p.value)
    if node.doc_string.startswith(META_KEY + ":"):
        return json.loads(node.doc_string[len(META_KEY) + 1:])
    return None
