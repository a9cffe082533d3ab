"""research/equalize_probe.py's scale equalization: exact, through squeeze-excite and pooling paths."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def probe():
    import equalize_probe  # pytest puts this file's folder (research/) on sys.path
    return equalize_probe


def se_net(seed=0):
    """x -> conv -> per-channel affine (ranges 0.05x..20x) -> [SE gate, depthwise conv, avg pool]
    -> 1x1 conv; the affine output has three readers through pooling and the gate Mul."""
    rng = np.random.default_rng(seed)
    c = 8
    w = {
        "w0": rng.normal(size=(c, 3, 3, 3)), "a": np.geomspace(0.05, 20, c).reshape(c, 1, 1),
        "b": rng.normal(size=(c, 1, 1)), "w1": rng.normal(size=(4, c, 1, 1)), "w2": rng.normal(size=(c, 4, 1, 1)),
        "wd": rng.normal(size=(c, 1, 3, 3)), "w3": rng.normal(size=(6, 2 * c, 1, 1)), "b3": rng.normal(size=6),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()]
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "w0"], ["y0"], name="c0", pads=[1, 1, 1, 1]),
        n("Mul", ["y0", "a"], ["m"], name="mul"), n("Add", ["m", "b"], ["t"], name="add"),
        n("GlobalAveragePool", ["t"], ["g0"], name="gap"), n("Conv", ["g0", "w1"], ["g1"], name="se1"),
        n("Relu", ["g1"], ["g2"], name="relu"), n("Conv", ["g2", "w2"], ["g3"], name="se2"),
        n("HardSigmoid", ["g3"], ["g4"], name="hs"), n("Mul", ["t", "g4"], ["gated"], name="gate"),
        n("Conv", ["gated", "wd"], ["d"], name="dw", group=c, pads=[1, 1, 1, 1]),
        n("AveragePool", ["t"], ["p"], name="pool", kernel_shape=[1, 1]),
        n("Concat", ["d", "p"], ["cat"], name="cat", axis=1), n("Conv", ["cat", "w3", "b3"], ["out"], name="c3"),
    ]
    g = helper.make_graph(nodes, "se", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 6, 6])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 6, 6, 6])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(m)


def run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_equalization_is_exact_and_evens_channel_ranges():
    eq = probe()
    model = se_net()
    x = np.random.default_rng(1).normal(size=(16, 3, 6, 6)).astype(np.float32)
    before = onnx.ModelProto()
    before.CopyFrom(model)
    sites = eq.equalize(model, {"x": x}, alpha=1.0)
    onnx.checker.check_model(model)
    by_tensor = {s.tensor: s for s in sites}
    # the affine output reaches the SE conv (through the pool), the depthwise conv (through the gate)
    # and the last conv (through AveragePool + Concat, at channel offset 8)
    assert sorted(by_tensor["t"].readers) == [("c3", 8), ("dw", 0), ("se1", 0)]
    assert "g1" in by_tensor  # the SE conv's output channels, through the Relu
    y0, y1 = run(before, x), run(model, x)
    assert np.abs(y1 - y0).max() <= 1e-4 * np.abs(y0).max()
    r0, r1 = eq.ranges(before, sites, {"x": x}), eq.ranges(model, sites, {"x": x})
    r0, r1 = ({t: eq.magnitude(v) for t, v in r.items()} for r in (r0, r1))
    # the last conv reads t itself in channels 8..15 (1x1 AveragePool); the gate varies per sample
    assert eq.spread(r0["cat"][8:]) > 10 and eq.spread(r1["cat"][8:]) < 1.01
    assert eq.spread(r1["gated"]) < eq.spread(r0["gated"]) / 5


def test_shift_goes_only_where_it_is_exact():
    """The depthwise conv's output reaches an unpadded 1x1 conv through a Concat: shifted to
    mid-range there. t reaches padded convs and the gate: scaled only."""
    eq = probe()
    model = se_net()
    x = np.random.default_rng(2).normal(size=(16, 3, 6, 6)).astype(np.float32)
    before = onnx.ModelProto()
    before.CopyFrom(model)
    sites = {s.tensor: s for s in eq.equalize(model, {"x": x}, alpha=1.0, shift=True)}
    assert sites["d"].shift is not None and sites["t"].shift is None and sites["g1"].shift is None
    y0, y1 = run(before, x), run(model, x)
    assert np.abs(y1 - y0).max() <= 1e-4 * np.abs(y0).max()
    lo0, hi0 = eq.ranges(before, list(sites.values()), {"x": x})["cat"]
    lo1, hi1 = eq.ranges(model, list(sites.values()), {"x": x})["cat"]
    half0, half1 = ((hi - lo) / 2 for lo, hi in ((lo0, hi0), (lo1, hi1)))
    assert (np.abs(lo0 + hi0) / half0)[:8].max() > 0.5  # channels off-centre before
    assert (np.abs(lo1 + hi1) / half1)[:8].max() < 1e-3  # centred after
    assert half1[:8].max() / half1[:8].min() < 1.001  # half-widths equal


def test_a_reader_that_cannot_take_the_factor_back_leaves_the_tensor_alone():
    eq = probe()
    model = se_net()
    sig = helper.make_node("Sigmoid", ["t"], ["s"], name="sig")  # a nonlinear reader of t
    model.graph.node.append(sig)
    model.graph.output.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, None))
    assert "t" not in {s.tensor for s in eq.find_sites(model)}
