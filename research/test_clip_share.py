"""research/clip_share.py: quantizer ranges read from a QDQ graph, and the clipped share counted right."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def qdq_net():
    """x -> Q(uint8, 0.1, 3) -> Clip(0, 15) -> DQ -> Relu -> y1;  x -> Q(int8, 0.01, 0) -> DQ -> y2."""
    c = lambda v, name: numpy_helper.from_array(np.asarray(v), name)  # noqa: E731
    inits = [c(np.float32(0.1), "s1"), c(np.uint8(3), "z1"), c(np.uint8(0), "lo"), c(np.uint8(15), "hi"),
             c(np.float32(0.01), "s2"), c(np.int8(0), "z2")]
    n = helper.make_node
    nodes = [n("QuantizeLinear", ["x", "s1", "z1"], ["q1"]), n("Clip", ["q1", "lo", "hi"], ["c1"]),
             n("DequantizeLinear", ["c1", "s1", "z1"], ["d1"]), n("Relu", ["d1"], ["y1"]),
             n("QuantizeLinear", ["x", "s2", "z2"], ["q2"]), n("DequantizeLinear", ["q2", "s2", "z2"], ["y2"])]
    vi = helper.make_tensor_value_info
    g = helper.make_graph(nodes, "q", [vi("x", TensorProto.FLOAT, [None, 5])],
                          [vi("y1", TensorProto.FLOAT, [None, 5]), vi("y2", TensorProto.FLOAT, [None, 5])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_ranges_and_shares_match_a_direct_count():
    import clip_share  # pytest puts research/ on sys.path

    m = qdq_net()
    onnx.checker.check_model(m)
    qs = clip_share.quantizers(m)
    assert [(t, lv) for t, _, _, lv in qs] == [("x", 16), ("x", 256)]
    assert np.allclose(qs[0][1:3], (-0.3, 1.2)) and np.allclose(qs[1][1:3], (-1.28, 1.27))
    x = np.random.default_rng(0).normal(0, 1.5, size=(40, 5)).astype(np.float32)
    got = clip_share.shares(m, qs[:1], {"x": x}, batch=7)["x"]
    assert got == np.mean((x > np.float32(1.2)) | (x < np.float32(-0.3)))
    got = clip_share.shares(m, qs[1:], {"x": x}, batch=7)["x"]
    assert got == np.mean((x > np.float32(1.27)) | (x < np.float32(-1.28))) and 0 < got < 1
    # a range that starts at zero counts only what lies above it (its negatives are a folded Relu's)
    qs0 = [("x", 0.0, 1.2, 16)]
    assert clip_share.shares(m, qs0, {"x": x})["x"] == np.mean(x > 1.2)


def test_group_spec_takes_a_slice(tmp_path):
    import clip_share

    x = np.arange(60, dtype=np.float32).reshape(12, 5)
    np.savez(tmp_path / "d.npz", x=x)
    label, feeds = clip_share.load_group(f"odd={tmp_path / 'd.npz'}:1:9:2", qdq_net())
    assert label == "odd" and np.array_equal(feeds["x"], x[1:9:2])
