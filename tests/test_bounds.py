"""Value ranges from graph structure (packptq_onnx.bounds) and the Clip-free sub-8-bit activations
they allow in the QDQ export: every value onnxruntime computes lies inside the bound, and an export
without the Clip gives the same numbers as the one with it."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from packptq_onnx.exporters import qdq
from test_export import quantize
from torch import nn

from packptq_onnx import bounds, convert, runtime, validate
from packptq_onnx.records import export_records

UNARY = ["Relu", "HardSwish", "Sigmoid", "HardSigmoid", "Tanh", "Neg", "Abs", "GlobalAveragePool",
         "MaxPool", "AveragePool", "LeakyRelu", "Clip", "Pad"]
BINARY = ["Add", "Sub", "Mul", "Max", "Min", "Concat"]


def _random_graph(rng, n_nodes: int) -> onnx.ModelProto:
    """A random chain of the ops bounds.py knows, on Nx2x4x4 tensors, every tensor a graph output."""
    inits = [numpy_helper.from_array(np.array(rng.uniform(-3, 0), np.float32), "lo"),
             numpy_helper.from_array(np.array(rng.uniform(0, 3), np.float32), "hi"),
             numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
             numpy_helper.from_array(rng.uniform(-2, 2, (1, 2, 1, 1)).astype(np.float32), "c")]
    tensors, nodes = ["x"], []
    for i in range(n_nodes):
        out = f"t{i}"
        if rng.random() < 0.5:
            op = UNARY[rng.integers(len(UNARY))]
            a = tensors[rng.integers(len(tensors))]
            ins, kw = [a], {}
            if op == "Clip":
                ins = [a, "lo", "hi"]
            elif op == "Pad":
                ins = [a, "pads"]
            elif op in ("MaxPool", "AveragePool"):
                kw = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
            elif op == "LeakyRelu":
                kw = dict(alpha=0.2)
            if op == "Pad":  # keep shapes equal for the binary ops: pad, then cut back
                mid = f"p{i}"
                nodes.append(helper.make_node("Pad", ins, [mid]))
                nodes.append(helper.make_node("MaxPool", [mid], [out], kernel_shape=[3, 3]))
            elif op == "GlobalAveragePool":
                mid = f"g{i}"
                nodes.append(helper.make_node(op, ins, [mid]))
                nodes.append(helper.make_node("Add", [mid, tensors[0]], [out]))
            else:
                nodes.append(helper.make_node(op, ins, [out], **kw))
        else:
            op = BINARY[rng.integers(len(BINARY))]
            a, b = (tensors[j] for j in rng.integers(len(tensors), size=2))
            if op == "Concat":
                mid = f"k{i}"
                nodes.append(helper.make_node("Concat", [a, b], [mid], axis=2))  # 8 rows; every other kept
                nodes.append(helper.make_node("MaxPool", [mid], [out], kernel_shape=[1, 1], strides=[2, 1]))
            else:  # sometimes with a constant (per channel) as the second operand
                nodes.append(helper.make_node(op, [a, "c" if rng.random() < 0.3 else b], [out]))
        tensors.append(out)
    shape = ["N", 2, 4, 4]
    outs = [helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors[1:]]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)], outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_every_computed_value_lies_inside_its_bound():
    finite = tight = 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        m = _random_graph(rng, 10)
        produced, read = bounds.value_bounds(m)
        assert produced == {k: v for k, v in read.items() if k in produced}
        x = (rng.standard_normal((64, 2, 4, 4)) * rng.choice([0.3, 3, 30], (64, 1, 1, 1))).astype(np.float32)
        sess = runtime.session(m)
        for t, v in zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})):
            lo, hi = produced[t]
            assert lo <= hi
            assert v.min() >= lo - 1e-5 * (1 + abs(lo)) and v.max() <= hi + 1e-5 * (1 + abs(hi)), (seed, t, lo, hi)
            finite += np.isfinite(lo) + np.isfinite(hi)
            tight += np.isclose(v.min(), lo, atol=1e-3) + np.isclose(v.max(), hi, atol=1e-3)
    assert finite > 100 and tight > 30, (finite, tight)  # bounds that say something, often reached


def test_quantized_tensors_read_their_grid():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("HardSwish", ["r"], ["y"])],
                          "g", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    produced, read = bounds.value_bounds(m, {"r": (0.5, 2, 0, 15)})
    assert produced["r"] == (0.0, bounds.INF)
    assert read["r"] == (0.0, 6.5)  # codes 2..15 at step 0.5, minus the zero point
    assert read["y"] == (bounds.HARD_SWISH_MIN, 6.5)
    assert bounds.quantized((-0.2, 0.7), 0.5, 2, 0, 15) == (0.0, 0.5)
    # a tie may round either way in float32: each end takes the code farther out
    assert bounds.quantized((-0.25, 0.75), 0.5, 2, 0, 15) == (-0.5, 1.0)


class GatedNet(nn.Module):
    """Conv -> Relu -> squeeze-excite gate (sigmoid) -> conv -> sigmoid -> conv: every conv reads a
    tensor bounded below by 0 that no Relu produces (a mean, a gated product, a sigmoid)."""
    input_shape = (3, 8, 8)

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.gate, self.c = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        g = torch.sigmoid(self.gate(h.mean((2, 3), keepdim=True)))
        return self.c(torch.sigmoid(self.b(h * g)))


@pytest.mark.parametrize("abits", [3, 4])
def test_bounded_activations_export_without_clip_and_same_numbers(tmp_path, abits):
    torch.manual_seed(0)
    net = GatedNet().eval()
    path = str(tmp_path / "gated.onnx")
    torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), path, input_names=["x"], output_names=["y"],
                      opset_version=17, dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    rng = np.random.default_rng(0)
    calib = {"x": rng.standard_normal((32, 3, 8, 8)).astype(np.float32)}
    imp, gm, qls, out = quantize(path, 4, abits, calib)
    recs = export_records(qls)
    n_low = (sum(r.a_scale is not None and r.input_from is None and r.abits < 8 for r in recs)
             + sum(r.o_scale is not None and r.o_bits < 8 for r in recs))  # sub-8-bit quantizers (no joins here)
    with_clips = qdq.write_qdq(imp.model, recs, every_clip=True)
    assert sum(n.op_type == "Clip" for n in with_clips.graph.node) == n_low
    low = {n.input[0] for n in with_clips.graph.node if n.op_type == "Clip"}
    low = {n.name for n in with_clips.graph.node if n.op_type == "QuantizeLinear" and n.output[0] in low}
    top = 2 ** abits - 1
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    qs = [n for n in out.graph.node if n.op_type == "QuantizeLinear" and n.name in low]
    assert len(qs) == n_low  # the same quantizers in both exports
    shifted = [n for n in qs if inits[n.input[2]] > top]
    clips = [n for n in out.graph.node if n.op_type == "Clip"]
    assert shifted and len(clips) + len(shifted) <= len(qs)
    for n in shifted:  # the DequantizeLinear reading those codes takes the same zero point
        readers = [r for r in out.graph.node if n.output[0] in r.input]
        assert readers and all(r.op_type == "DequantizeLinear" for r in readers)
        assert all(inits[r.input[2]].ravel()[0] == inits[n.input[2]] for r in readers)
    feeds = {"x": (rng.standard_normal((64, 3, 8, 8)) * 3).astype(np.float32)}
    ort_q = runtime.run(runtime.session(out), feeds)
    assert np.array_equal(ort_q[0], runtime.run(runtime.session(with_clips), feeds)[0])
    sim = convert.torch_run(gm, feeds, ["x"])
    assert validate.sim_parity(["y"], ort_q, sim)[0].exact
