"""Small ONNX graphs of the shapes real recurrent and detector models have, built from parts.

Each case: a body (convolutions on images or a MatMul on sequences), an optional recurrent op
(LSTM, GRU, bidirectional LSTM) with the samples on axis 1 of its output, an output of rank 0-4
with the samples on axis 0 or 1, and optionally an op with no torch converter, or a second
output of a multi-output op, among the graph outputs.
"""
from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _G:
    def __init__(self, seed):
        self.r = np.random.RandomState(seed)
        self.nodes, self.inits, self.k = [], [], 0

    def name(self, p):
        self.k += 1
        return f"{p}{self.k}"

    def const(self, a, p="w"):
        n = self.name(p)
        self.inits.append(numpy_helper.from_array(np.asarray(a), n))
        return n

    def op(self, op, ins, n_out=1, **attrs):
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, ins, outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def weight(self, *shape):
        return self.const((self.r.randn(*shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32))


def build(body: str, rnn: str | None, out_rank: int, out_axis: int, extra: str | None, seed: int = 0):
    """-> (onnx.ModelProto, input name, input shape without the batch)"""
    g = _G(seed)
    if body == "conv":
        in_shape = [3, 8, 8]
        x = g.op("Relu", [g.op("Conv", ["x", g.weight(8, 3, 3, 3), g.const(np.zeros(8, np.float32))], pads=[1] * 4)])
        x = g.op("Relu", [g.op("Conv", [x, g.weight(8, 8, 3, 3), g.const(np.zeros(8, np.float32))], pads=[1] * 4)])
        seq = g.op("Transpose", [g.op("ReduceMean", [x], axes=[2], keepdims=0)], perm=[2, 0, 1])  # [W, N, 8]
        feat = 8
    else:
        in_shape = [6, 5]
        h = g.op("Relu", [g.op("MatMul", ["x", g.weight(5, 12)])])                 # [N, T, 12]
        seq = g.op("Transpose", [h], perm=[1, 0, 2])                                # [T, N, 12]
        feat = 12
    extra_out = None
    if rnn is not None:
        op, d, H = ("GRU", 1, 6) if rnn == "gru" else ("LSTM", 2 if rnn == "bilstm" else 1, 6)
        G = 3 if op == "GRU" else 4
        ins = [seq, g.weight(d, G * H, feat), g.weight(d, G * H, H), g.const(np.zeros((d, 2 * G * H), np.float32))]
        y, yh = g.op(op, ins, 2, hidden_size=H, direction="bidirectional" if d == 2 else "forward")[:2]
        extra_out = yh if extra == "state" else None                                # [D, N, H]: samples on axis 1
        y = g.op("Transpose", [y], perm=[0, 2, 1, 3])                               # [T, N, D, H]
        seq = g.op("Reshape", [y, g.const(np.array([0, 0, d * H], np.int64), "s")])  # [T, N, D*H]
        feat = d * H
    z = g.op("MatMul", [seq, g.weight(feat, 7)])                                    # [T, N, 7]: samples on axis 1
    if out_rank == 3:
        out = z if out_axis == 1 else g.op("Transpose", [z], perm=[1, 0, 2])
    elif out_rank == 4:
        out = g.op("Unsqueeze", [g.op("Transpose", [z], perm=[1, 2, 0]), g.const(np.array([2], np.int64), "a")])
    else:
        pooled = g.op("ReduceMean", [z], axes=[0], keepdims=0)                      # [N, 7]
        out = {2: pooled, 1: g.op("ReduceMax", [pooled], axes=[1], keepdims=0),
               0: g.op("ReduceMean", [pooled], keepdims=0)}[out_rank]
    outputs = [out]
    if extra == "fallback":
        outputs.append(g.op("Hardmax", [out if out_rank >= 2 else z], axis=-1))      # no torch converter
    elif extra_out is not None:
        outputs.append(extra_out)
    graph = helper.make_graph(g.nodes, "fuzz",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"] + in_shape)],
                              [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outputs],
                              initializer=g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    m = onnx.shape_inference.infer_shapes(m)
    onnx.checker.check_model(m)
    return m, "x", in_shape


def cases() -> list[tuple]:
    """(body, rnn, out_rank, out_axis, extra): 32 combinations covering every part at least twice."""
    out = []
    for i, (body, rnn, rank) in enumerate(itertools.product(["conv", "seq"], [None, "lstm", "gru", "bilstm"],
                                                            [0, 1, 2, 3, 4])):
        if rank in (1, 4) and i % 2:  # every rank and extra still meets every body and rnn
            continue
        extra = [None, "fallback", "state"][i % 3] if rnn else ["fallback", None][i % 2]
        if extra == "state" and rnn is None:
            extra = None
        out.append((body, rnn, rank, i % 2 if rank == 3 else 0, extra))
    return out


def build_if(decided_by: str, seed: int = 0):
    """x [N, 6] -> MatMul -> If(cond) {then: MatMul+Relu+MatMul, else: MatMul} -> [N, 3].
    decided_by "scalar": cond = (sr == 16000), sr a rank-0 int64 input; "shape": cond = (N*6 > 0);
    "values": cond = (sum(x) > 0), which differs between samples."""
    g = _G(seed)
    h = g.op("Relu", [g.op("MatMul", ["x", g.weight(6, 8)])])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])]
    if decided_by == "scalar":
        inputs.append(helper.make_tensor_value_info("sr", TensorProto.INT64, []))
        cond = g.op("Equal", ["sr", g.const(np.array(16000, np.int64), "c")])
    elif decided_by == "shape":
        cond = g.op("Greater", [g.op("Size", ["x"]), g.const(np.array(0, np.int64), "c")])
    else:
        cond = g.op("Greater", [g.op("ReduceSum", [h], keepdims=0), g.const(np.array(0, np.float32), "c")])

    def branch(layers):
        b = _G(seed + layers)
        b.k = 100 * layers  # names unique across the graph and both branches
        y = h
        for k in range(layers):
            y = b.op("MatMul", [y, b.weight(8, 8 if k < layers - 1 else 3)])
            if k < layers - 1:
                y = b.op("Relu", [y])
        return helper.make_graph(b.nodes, f"b{layers}", [],
                                 [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", 3])],
                                 initializer=b.inits)

    out = g.op("If", [cond], then_branch=branch(2), else_branch=branch(1))
    graph = helper.make_graph(g.nodes, "if", inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 3])],
                              initializer=g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def build_state(direction: str = "forward", seed: int = 0):
    """x [N, 6, 5] and a state h0 [D, N, 6] (samples on axis 1, as RNN states are) -> LSTM ->
    y [N, 7] and the new state [D, N, 6]."""
    g = _G(seed)
    d, H = (2 if direction == "bidirectional" else 1), 6
    seq = g.op("Transpose", [g.op("Relu", [g.op("MatMul", ["x", g.weight(5, 12)])])], perm=[1, 0, 2])
    ins = [seq, g.weight(d, 4 * H, 12), g.weight(d, 4 * H, H), g.const(np.zeros((d, 8 * H), np.float32)), "", "h0"]
    y, yh = g.op("LSTM", ins, 2, hidden_size=H, direction=direction)
    last = g.op("Reshape", [g.op("Transpose", [yh], perm=[1, 0, 2]), g.const(np.array([0, -1], np.int64), "s")])
    out = g.op("MatMul", [last, g.weight(d * H, 7)])
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6, 5]),
           helper.make_tensor_value_info("h0", TensorProto.FLOAT, [d, "batch", H])]
    outs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", 7]),
            helper.make_tensor_value_info(yh, TensorProto.FLOAT, [d, "batch", H])]
    graph = helper.make_graph(g.nodes, "state", ins, outs, initializer=g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m
