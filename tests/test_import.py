import nets
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from packptq_onnx import convert, onnx_import, runtime
from packptq_onnx.errors import UsageError


@pytest.mark.parametrize("opset", [13, 17, 18])
@pytest.mark.parametrize("arch", ["resnet", "mobilenetv2", "vit"])
def test_conversion_is_faithful(exported, arch, opset):
    imp = onnx_import.load(exported(arch, opset))
    gm = convert.to_torch(imp)
    res = convert.prove_faithful(imp, gm, nets.inputs(nets.build(arch)))
    assert res[0].max_abs_diff < 1e-4 and res[0].cosine > 0.999999


def test_batchnorm_is_folded_and_faithful(exported):
    path = exported("mobilenetv2", 13, fold=False)
    assert any(n.op_type == "BatchNormalization" for n in onnx.load(path).graph.node)
    imp = onnx_import.load(path)
    assert not any(n.op_type == "BatchNormalization" for n in imp.model.graph.node)
    assert any("BatchNormalization folded" in n for n in imp.notes)
    res = convert.prove_faithful(imp, convert.to_torch(imp), nets.inputs(nets.build("mobilenetv2")))
    assert res[0].max_abs_diff < 1e-4


def test_dynamo_export_imports(exported):
    pytest.importorskip("onnxscript")
    imp = onnx_import.load(exported("resnet", 18, dynamo=True))
    res = convert.prove_faithful(imp, convert.to_torch(imp), nets.inputs(nets.build("resnet")))
    assert res[0].max_abs_diff < 1e-4


def _constant_weight_model(opset=11):
    """Conv whose weight comes from a Constant node (as PaddlePaddle exports), old opset, metadata."""
    w = np.random.RandomState(0).randn(4, 2, 3, 3).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
             helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, ["N", 2, 6, 6])],
                          [helper.make_tensor_value_info("y", 1, ["N", 4, 6, 6])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 7
    m.metadata_props.add(key="author", value="someone")
    return m


def test_constants_become_initializers_and_opset_upgraded(tmp_path):
    path = str(tmp_path / "c.onnx")
    onnx.save(_constant_weight_model(), path)
    imp = onnx_import.load(path)
    assert imp.opset == 13
    assert not any(n.op_type == "Constant" for n in imp.model.graph.node)
    assert "w" in {i.name for i in imp.model.graph.initializer}
    assert {p.key: p.value for p in imp.model.metadata_props}["author"] == "someone"
    x = {"x": np.random.RandomState(1).randn(3, 2, 6, 6).astype(np.float32)}
    assert convert.prove_faithful(imp, convert.to_torch(imp), x)[0].max_abs_diff < 1e-5


def test_bad_files_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        onnx_import.load(str(tmp_path / "missing.onnx"))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf at all \x00\xff" * 10)
    with pytest.raises(UsageError, match="not a readable ONNX model"):
        onnx_import.load(str(junk))


def test_identity_of_initializer_becomes_a_weight():
    """torch exports equal / tied parameters once, behind Identity nodes: they must still be weights."""
    from packptq_onnx.layers import find_layers

    w = np.random.RandomState(0).randn(4, 3).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["w_tied"]), helper.make_node("MatMul", ["x", "w_tied"], ["y"]),
         helper.make_node("MatMul", ["y", "w2"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(w[:3].T.copy(), "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    norm, inputs, outputs, notes = onnx_import.normalise(m)
    assert [n.op_type for n in norm.graph.node] == ["MatMul", "MatMul"]
    assert [(l.op, l.weight) for l in find_layers(norm)] == [("MatMul", "w_tied"), ("MatMul", "w2")]
    x = np.random.RandomState(1).randn(5, 4).astype(np.float32)
    np.testing.assert_allclose(runtime.run(runtime.session(norm), {"x": x})[0], x @ w @ w[:3].T, rtol=1e-5)


def test_computed_zero_pad_is_folded_into_the_conv(tmp_path):
    """TF-style "same" padding: pads computed from constants (Concat, Cast), then Pad -> Conv. The
    constants fold, the Pad moves into the Conv's pads, and the model computes the same."""
    rng = np.random.RandomState(0)
    w = rng.randn(4, 3, 3, 3).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Constant", [], ["c0"], value=numpy_helper.from_array(np.array([0, 0, 0, 1], np.int32))),
         helper.make_node("Concat", ["c0", "c1"], ["pc"], axis=0, name="cat"),
         helper.make_node("Cast", ["pc"], ["pads"], to=TensorProto.INT64, name="cast"),
         helper.make_node("Pad", ["x", "pads"], ["xp"], name="pad"),
         helper.make_node("Conv", ["xp", "w"], ["h"], name="conv", strides=[2, 2], pads=[1, 0, 0, 0]),
         helper.make_node("Relu", ["h"], ["y"], name="relu")],
        "pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 5, 4])],
        [numpy_helper.from_array(np.array([0, 0, 2, 0], np.int32), "c1"), numpy_helper.from_array(w, "w")])
    path = str(tmp_path / "pad.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    imp = onnx_import.load(path)
    ops = [n.op_type for n in imp.model.graph.node]
    assert ops == ["Conv", "Relu"], ops
    conv = imp.model.graph.node[0]
    assert conv.input[0] == "x"
    assert list(next(a for a in conv.attribute if a.name == "pads").ints) == [1, 1, 2, 0]
    x = {"x": rng.randn(2, 3, 9, 9).astype(np.float32)}
    ref = runtime.run(runtime.session(imp.original), x)[0]
    np.testing.assert_allclose(runtime.run(runtime.session(imp.model), x)[0], ref, atol=1e-5)
    gm = convert.to_torch(imp)
    np.testing.assert_allclose(convert.torch_run(gm, x, ["x"])[0], ref, atol=1e-4)


def test_folded_initializer_listed_as_input_is_no_longer_an_input(tmp_path):
    """Old files (IR version 3, as the onnx wheel's light_* zoo models) list every initializer as a
    graph input too, and may compute weights from them (ConstantOfShape of a shape). Once folding
    drops such an initializer, its input entry goes with it: the model takes x alone."""
    shape = numpy_helper.from_array(np.array([4, 3, 3, 3], np.int64), "w_shape")
    g = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["w_shape"], ["w"], name="fill",
                          value=numpy_helper.from_array(np.array([0.1], np.float32))),
         helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8]),
                helper.make_tensor_value_info("w_shape", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 6, 6])], [shape])
    path = str(tmp_path / "old.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=3), path)
    imp = onnx_import.load(path)
    assert [i.name for i in imp.model.graph.input] == ["x"]
    assert [n.op_type for n in imp.model.graph.node] == ["Conv"]
    x = {"x": np.random.RandomState(0).randn(2, 3, 8, 8).astype(np.float32)}
    ref = runtime.run(runtime.session(imp.original), x)[0]
    assert np.allclose(runtime.run(runtime.session(imp.model), x)[0], ref, atol=1e-5)


def test_conversion_with_another_output_shape_is_a_usage_error(exported, monkeypatch):
    """A converter that computes another output shape (seen on the onnx wheel's light_squeezenet:
    torch (2000, 13, 1) against onnxruntime's (32, 1000, 1, 1)) stops with the unfaithful-conversion
    message, not a numpy broadcasting traceback."""
    net = nets.build("chain")
    imp = onnx_import.load(exported("chain"))
    gm = convert.to_torch(imp)
    monkeypatch.setattr(convert, "torch_run", lambda *a, **k: [np.zeros((2, 5), np.float32)])
    with pytest.raises(UsageError, match=r"not faithful on output 'y': shape \(2, 5\) against onnxruntime's \(4, 10\)"):
        convert.prove_faithful(imp, gm, nets.inputs(net, 4))


def _swish_graph(tmp_path, opset, form, three=3.0, extra_reader=False):
    """Conv -> hard-swish in one of its exported forms -> output."""
    rng = np.random.RandomState(0)
    c = lambda name, v: numpy_helper.from_array(np.array(v, np.float32), name)  # noqa: E731
    inits = [numpy_helper.from_array(rng.randn(4, 3, 3, 3).astype(np.float32), "w"), c("three", three),
             c("zero", 0.0), c("six", 6.0), c("sixth", 1 / 6)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1])]
    if form == "hardsigmoid":
        nodes += [helper.make_node("HardSigmoid", ["h"], ["g"], alpha=1 / 6, beta=0.5),
                  helper.make_node("Mul", ["h", "g"], ["y"])]
    else:
        nodes += [helper.make_node("Add", ["h", "three"], ["a"]),
                  helper.make_node("Clip", ["a", "zero", "six"], ["g"]),
                  helper.make_node("Mul", ["g", "h"], ["m"]),
                  helper.make_node("Div", ["m", "six"], ["y"]) if form == "div"
                  else helper.make_node("Mul", ["sixth", "m"], ["y"])]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])]
    if extra_reader:
        outs.append(helper.make_tensor_value_info("g", TensorProto.FLOAT, ["N", 4, 8, 8]))
    g = helper.make_graph(nodes, "hs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          outs, inits)
    path = str(tmp_path / f"hs_{form}.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


@pytest.mark.parametrize("form,opset", [("div", 13), ("mul", 17), ("hardsigmoid", 11)])
def test_hard_swish_chains_become_one_op_and_compute_the_same(tmp_path, form, opset):
    imp = onnx_import.load(_swish_graph(tmp_path, opset, form))
    assert [n.op_type for n in imp.model.graph.node] == ["Conv", "HardSwish"]
    assert imp.opset >= 14
    x = {"x": (np.random.RandomState(1).randn(2, 3, 8, 8) * 3).astype(np.float32)}
    ref = runtime.run(runtime.session(imp.original), x)[0]
    np.testing.assert_allclose(runtime.run(runtime.session(imp.model), x)[0], ref, atol=1e-5)
    np.testing.assert_allclose(convert.torch_run(convert.to_torch(imp), x, ["x"])[0], ref, atol=1e-5)


@pytest.mark.parametrize("kw", [{"three": 2.0}, {"extra_reader": True}])
def test_near_hard_swish_stays_as_it_is(tmp_path, kw):  # another constant; the gate read elsewhere
    imp = onnx_import.load(_swish_graph(tmp_path, 17, "div", **kw))
    assert "HardSwish" not in [n.op_type for n in imp.model.graph.node]


def _bias_add_graph(tmp_path, const_shape, conv_bias=False, extra_reader=False):
    """Conv (bias-free, as paddle2onnx writes it, or with a bias) -> Add of a constant -> Relu."""
    rng = np.random.RandomState(0)
    inits = [numpy_helper.from_array(rng.randn(4, 3, 3, 3).astype(np.float32), "w"),
             numpy_helper.from_array(rng.randn(*const_shape).astype(np.float32), "k")]
    conv_in = ["x", "w"]
    if conv_bias:
        inits.append(numpy_helper.from_array(rng.randn(4).astype(np.float32), "b"))
        conv_in.append("b")
    nodes = [helper.make_node("Conv", conv_in, ["h"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["k", "h"], ["a"]), helper.make_node("Relu", ["a"], ["y"])]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])]
    if extra_reader:
        outs.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 4, 8, 8]))
    g = helper.make_graph(nodes, "ba", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          outs, inits)
    path = str(tmp_path / "ba.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("shape,conv_bias", [((1, 4, 1, 1), False), ((4, 1, 1), True), ((1,), False)])
def test_per_channel_add_folds_into_the_conv_bias(tmp_path, shape, conv_bias):
    imp = onnx_import.load(_bias_add_graph(tmp_path, shape, conv_bias))
    assert [n.op_type for n in imp.model.graph.node] == ["Conv", "Relu"]
    assert any("Adds folded into Conv bias" in n for n in imp.notes)
    x = {"x": np.random.RandomState(1).randn(2, 3, 8, 8).astype(np.float32)}
    ref = runtime.run(runtime.session(imp.original), x)[0]
    np.testing.assert_allclose(runtime.run(runtime.session(imp.model), x)[0], ref, atol=1e-5)


@pytest.mark.parametrize("kw", [{"const_shape": (1, 4, 8, 8)}, {"const_shape": (1, 4, 1, 1), "extra_reader": True}])
def test_other_adds_after_a_conv_stay(tmp_path, kw):  # a constant that varies in space; the conv read elsewhere
    imp = onnx_import.load(_bias_add_graph(tmp_path, **kw))
    assert "Add" in [n.op_type for n in imp.model.graph.node]
