"""What onnxruntime actually runs: the graph after its own optimisation, op by op, integer or float.

onnxruntime fuses DequantizeLinear -> op -> QuantizeLinear into integer kernels (QLinearConv,
QLinearMatMul, QLinearAdd, ...) where it has one; what it cannot fuse runs in float between a
DequantizeLinear and a QuantizeLinear, and pays for the conversions. `packptq inspect MODEL
--runtime` prints this, so a user (and the tests) can see why an export is slow.

A tensor is integer when a QuantizeLinear or an integer kernel makes it, or when an op that only
moves data (Transpose, Reshape, MaxPool, ...) makes it from integer tensors alone; a node is
integer when it makes integer tensors, a conversion when it is a (De)QuantizeLinear, else float.
"""
from __future__ import annotations

import os
import tempfile

import onnx

CONVERSIONS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
INTEGER_KERNELS = ("ConvInteger", "MatMulInteger", "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                   "QAttention", "QEmbedLayerNormalization", "NhwcQLinearConv")
INTEGER_TYPES = (onnx.TensorProto.UINT8, onnx.TensorProto.INT8, onnx.TensorProto.UINT16, onnx.TensorProto.INT16,
                 onnx.TensorProto.INT32, onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


def optimized(model_path: str, level: str = "all", threads: int = 1) -> onnx.ModelProto:
    """The model as onnxruntime's CPU provider runs it, after graph optimisation at `level`."""
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    fd, path = tempfile.mkstemp(suffix=".onnx", prefix="packptq-ort-")
    os.close(fd)
    try:
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[level]
        so.optimized_model_filepath = path
        so.intra_op_num_threads = so.inter_op_num_threads = threads
        so.log_severity_level = 3  # the saved graph is hardware-specific: known, and only read here
        ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
        return onnx.load(path)
    finally:
        for p in (path, path + ".data"):
            if os.path.exists(p):
                os.unlink(p)


def _integer_kernel(op: str) -> bool:
    return op.startswith("QLinear") or op in INTEGER_KERNELS


def kinds(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str]]:
    """(node, "integer" | "conversion" | "float") in graph order."""
    ints = {i.name for i in model.graph.initializer if i.data_type in INTEGER_TYPES}
    inputs = {i.name for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type in CONVERSIONS:
            kind = "conversion"
            if n.op_type != "DequantizeLinear":
                ints.update(n.output[:1])
        else:
            data = [x for x in n.input if x and x not in inputs]
            moves = bool(data) and all(x in ints for x in data)
            kind = "integer" if _integer_kernel(n.op_type) or moves else "float"
            if kind == "integer":
                ints.update(n.output)
        out.append((n, kind))
    return out


def float_between(model: onnx.ModelProto, node_kinds=None) -> list[onnx.NodeProto]:
    """Float nodes on a float path from a DequantizeLinear to a QuantizeLinear: the work onnxruntime
    did not fuse into an integer kernel."""
    node_kinds = node_kinds or kinds(model)
    fl = [n for n, k in node_kinds if k == "float"]
    from_dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    after = set()
    for n in fl:  # graph order: a float node reading a dequantized value (directly or via float nodes)
        if any(x in from_dq for x in n.input):
            after.add(n.name)
            from_dq.update(n.output)
    to_q = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    before = set()
    for n in reversed(fl):
        if any(x in to_q for x in n.output):
            before.add(n.name)
            to_q.update(x for x in n.input if x)
    return [n for n in fl if n.name in after and n.name in before]


def summary(model_path: str, level: str = "all", threads: int = 1) -> dict:
    """Per op type, how many nodes onnxruntime runs and in which kind; the float nodes it left
    between a DequantizeLinear and a QuantizeLinear."""
    m = optimized(model_path, level, threads)
    node_kinds = kinds(m)
    ops: dict = {}
    for n, k in node_kinds:
        key = (n.op_type, k)
        ops[key] = ops.get(key, 0) + 1
    between = float_between(m, node_kinds)
    from .exporters.qdq import node_tag
    chosen = sum(1 for n in onnx.load(model_path).graph.node
                 if n.op_type == "Conv" and (node_tag(n) or {}).get("kernel") == "float")
    counts: dict = {}
    for n in between:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return {"level": level, "nodes": len(m.graph.node),
            "ops": [{"op": op, "kind": k, "count": c} for (op, k), c in sorted(ops.items(), key=lambda x: -x[1])],
            "by_kind": {k: sum(c for (_, kk), c in ops.items() if kk == k) for k in ("integer", "conversion", "float")},
            "float_between_qdq": {"count": len(between), "by_op": counts, "nodes": [n.name for n in between]},
            "float_kernel_convs": chosen}


def table(s: dict) -> str:
    k = s["by_kind"]
    lines = [f"onnxruntime runs {s['nodes']} nodes after optimisation (level {s['level']}): {k['integer']} integer, "
             f"{k['conversion']} (de)quantize, {k['float']} float",
             f"  {'op':<28}{'kind':<12}{'count':>6}"]
    lines += [f"  {o['op']:<28}{o['kind']:<12}{o['count']:>6}" for o in s["ops"]]
    fb = s["float_between_qdq"]
    if fb["count"]:
        ops = ", ".join(f"{op} x{c}" for op, c in sorted(fb["by_op"].items(), key=lambda x: -x[1]))
        lines.append(f"left in float between DequantizeLinear and QuantizeLinear: {fb['count']} nodes ({ops})")
    else:
        lines.append("nothing left in float between DequantizeLinear and QuantizeLinear")
    if s.get("float_kernel_convs"):
        lines.append(f"of these, {s['float_kernel_convs']} convs run float by choice: measured faster on the machine "
                     "that quantized than onnxruntime's integer kernel (the report's output_quantizers.kernels), "
                     "or with no integer kernel possible (a float input, or nothing quantizes the output)")
    return "\n".join(lines)
