"""research/ln_equalize.py: exact in float on a post-LN block, and the MatMul readers see even channels."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def post_ln_block(seed=0, d=8):
    """x -> LayerNorm (gamma spanning 0.05..20) -> two MatMul+bias readers and a residual Add."""
    rng = np.random.default_rng(seed)
    w = {"g": np.geomspace(0.05, 20, d), "b": rng.normal(size=d), "w1": rng.normal(size=(d, 5)),
         "b1": rng.normal(size=5), "w2": rng.normal(size=(d, d)), "b2": rng.normal(size=d)}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()]
    n = helper.make_node
    nodes = [n("LayerNormalization", ["x", "g", "b"], ["ln"], name="ln", axis=-1),
             n("MatMul", ["ln", "w1"], ["m1"], name="mm1"), n("Add", ["m1", "b1"], ["y1"], name="add1"),
             n("MatMul", ["ln", "w2"], ["m2"], name="mm2"), n("Add", ["m2", "b2"], ["r2"], name="add2"),
             n("Add", ["r2", "ln"], ["y2"], name="residual")]
    g = helper.make_graph(nodes, "postln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, d])],
                          [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [None, 4, 5]),
                           helper.make_tensor_value_info("y2", TensorProto.FLOAT, [None, 4, d])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def run(model, feeds, names=None):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(names, feeds)


def test_equalised_copy_is_exact_and_even():
    import ln_equalize  # pytest puts research/ on sys.path

    model = post_ln_block()
    x = np.random.default_rng(1).normal(size=(64, 4, 8)).astype(np.float32)
    ref = run(model, {"x": x})
    eq, n = ln_equalize.equalize(onnx.load_from_string(model.SerializeToString()), {"x": x[:32]}, alpha=1.0)
    onnx.checker.check_model(eq)
    assert n == 1
    got = run(eq, {"x": x})
    for a, b in zip(ref, got):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    # the residual keeps the original LayerNorm output; both MatMuls read the centred, even copy
    readers = {nd.name: nd.input[0] for nd in eq.graph.node}
    assert readers["mm1"] == readers["mm2"] == "ln_eq" and "ln" in eq.graph.node[-1].input
    lo, hi = ln_equalize.channel_ranges(model, {"ln": -1}, {"x": x[:32]})["ln"]
    elo, ehi = ln_equalize.channel_ranges(eq, {"ln_eq": -1}, {"x": x[:32]})["ln_eq"]
    assert (hi - lo).max() / (hi - lo).min() > 100
    np.testing.assert_allclose(ehi - elo, (ehi - elo).mean(), rtol=1e-4)
    np.testing.assert_allclose(ehi + elo, 0, atol=1e-4)
