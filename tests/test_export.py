"""QDQ export: onnxruntime output equals our torch simulation within one quantization step."""
import os

import nets
import numpy as np
import onnx
import pytest
from conftest import SAMPLES
from packptq_onnx.exporters import qdq

from packptq_onnx import convert, data, layers, onnx_import, qlayer, runtime, state, validate
from packptq_onnx.calibrate import calibrate
from packptq_onnx.records import export_records

MODEL, CALIB = os.path.join(SAMPLES, "digits_resnet.onnx"), os.path.join(SAMPLES, "calib.npz")


def quantize(path, wbits, abits, calib):
    imp = onnx_import.load(path)
    gm = convert.to_torch(imp)
    lays = layers.find_layers(imp.model)
    qls = qlayer.wrap(gm, imp.model, lays)
    calibrate(gm, qls, imp.model, data.batches(calib, ["x"], 8), wbits, abits, True, 0)
    return imp, gm, qls, qdq.write_qdq(imp.model, export_records(qls), {"test": True})


@pytest.mark.parametrize("wbits,abits", [(8, 8), (4, 8), (4, 4), (2, 3)])
@pytest.mark.parametrize("arch", ["resnet", "mobilenetv2", "vit"])
def test_ort_equals_simulation(exported, arch, wbits, abits):
    net = nets.build(arch)
    imp, gm, qls, out = quantize(exported(arch, 17), wbits, abits, nets.inputs(net, 32, seed=2))
    onnx.checker.check_model(out)
    feeds = nets.inputs(net, 32, seed=3)
    ort_q = runtime.run(runtime.session(out), feeds)
    sim = convert.torch_run(gm, feeds, ["x"])
    par = validate.sim_parity(["y"], ort_q, sim)[0]
    assert par.exact and par.max_abs_diff <= 2 * par.step, par
    # the quantization is real: on average the simulation is much farther from float than from ORT
    fl = runtime.run(runtime.session(imp.model), feeds)[0]
    assert np.abs(fl - sim[0]).mean() > 10 * np.abs(ort_q[0] - sim[0]).mean()


def test_qdq_structure_and_integer_ranges(exported):
    net = nets.build("resnet")
    imp, gm, qls, out = quantize(exported("resnet", 17), 3, 4, nets.inputs(net, 16))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    w_ints = [v for k, v in inits.items() if ".w_int3" in k]
    joins = [q for q in qls if layers.is_join(q.layer)]
    assert len(joins) == 3 and len(w_ints) == len(qls) - len(joins)
    for w in w_ints:
        assert w.dtype == np.int8 and w.min() >= -4 and w.max() <= 3
    ops = [n.op_type for n in out.graph.node]
    recs = export_records(qls)
    n_out = sum(q.oq is not None for q in qls)
    assert n_out == len(qls) - 1  # every layer but the one producing the graph output
    # a layer reading another's output at the same bits shares its quantizer: no Q/DQ of its own
    shared = [r for r in recs if r.input_from is not None] + [r for r in recs if r.input2_from is not None]
    n_act = sum(t is not None for q in qls for t in (q.layer.act_input, q.layer.act_input2)) - len(shared)
    assert shared and n_act > 0
    # both inputs of every join read their producers' 8-bit outputs as they are
    assert all(r.input_from and r.input2_from and r.abits == 8 for r in recs if layers.is_join(r.layer))
    # outputs read only by 4-bit inputs are quantized at 4 bits (Clip); those feeding an Add stay 8
    n_out4 = sum(r.o_bits == 4 for r in recs)
    n_in4 = sum(r.abits == 4 for r in recs if r.input_from is None and r.a_scale is not None)
    assert 0 < n_out4 < n_out and {r.o_bits for r in recs if r.o_scale is not None} == {4, 8}
    assert ops.count("QuantizeLinear") == n_act + n_out
    # a Clip per 4-bit quantizer, but where the tensor's range keeps it idle (test_bounds.py)
    assert ops.count("Clip") <= n_in4 + n_out4
    every_clip = [n.op_type for n in qdq.write_qdq(imp.model, recs, every_clip=True).graph.node]
    assert every_clip.count("Clip") == n_in4 + n_out4
    assert len(every_clip) - len(ops) == n_in4 + n_out4 - ops.count("Clip")  # nothing else changes
    n_bias = sum(1 for q, r in zip(qls, recs) if q.layer.bias is not None and q.layer.act_input is not None
                 and not r.float_kernel)  # a float kernel's bias is written dequantized
    # the stem reads the raw input and nothing quantizes the head's output: both run float, their
    # weights made float by Cast and Mul (no DQ)
    n_float = sum(r.float_kernel for r in recs)
    assert n_float == 2 and ops.count("Cast") == n_float
    n_w = len(qls) - len(joins) - n_float  # weights, inputs, biases, outputs
    assert ops.count("DequantizeLinear") == n_w + n_act + n_bias + n_out
    # the ReLU between a conv and the conv reading it is gone: the 4-bit grid is already >= 0
    assert ops.count("Relu") < sum(n.op_type == "Relu" for n in imp.model.graph.node)
    assert qdq.read_meta(out) == {"test": True}
    # the float model's weights are gone: only integer weights remain for quantized layers
    assert not any(q.layer.weight in inits for q in qls)


def test_sim_matches_dequantized_integers(exported):
    net = nets.build("mobilenetv2")
    imp, gm, qls, out = quantize(exported("mobilenetv2", 13), 4, 8, nets.inputs(net, 16))
    for q, rec in zip(qls, export_records(qls)):
        if q.wq is None:  # a join
            continue
        w = q.wq(q.weight).detach().numpy()
        view = [1] * w.ndim
        view[q.layer.axis] = -1
        np.testing.assert_array_equal(w, rec.w_int.astype(np.float32) * rec.w_scale.reshape(view))
        assert rec.w_int.min() >= -8 and rec.w_int.max() <= 7


def test_eight_bit_weights_use_reduced_range_by_default(exported):
    net = nets.build("resnet")
    _, _, qls, _ = quantize(exported("resnet", 17), 8, 8, nets.inputs(net, 16))
    recs = [r for r in export_records(qls) if r.wbits]
    assert min(int(r.w_int.min()) for r in recs) >= -64
    assert max(int(r.w_int.max()) for r in recs) <= 63
    assert max(int(np.abs(r.w_int).max()) for r in recs) >= 60  # the range is used, not collapsed


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_depthwise_convs_use_full_range_and_chains_fuse(exported, tmp_path, bits):
    """MobileNetV2-like: at 8 bits depthwise convs get [-128, 127] (their kernel accumulates in 32
    bits), the rest [-64, 63]; at every width a layer reading another's (ReLU6-clipped) output shares
    its output quantizer (at the reader's bits), so onnxruntime runs every conv as QLinearConv with
    no float Clip between them (at 4 and 3 bits only integer Clips on uint8 remain)."""
    import onnxruntime as ort
    net = nets.build("mobilenetv2")
    imp, gm, qls, out = quantize(exported("mobilenetv2", 17), bits, bits, nets.inputs(net, 16))
    recs = export_records(qls)
    weighted = [(q, r) for q, r in zip(qls, recs) if r.wbits]
    if bits == 8:
        dw = [r for q, r in weighted if qlayer.is_depthwise(q)]
        other = [r for q, r in weighted if not qlayer.is_depthwise(q)]
        assert dw and other
        assert max(int(np.abs(r.w_int).max()) for r in dw) > 64
        assert all(r.w_int.min() >= -64 and r.w_int.max() <= 63 for r in other)
    assert any(r.o_bits == bits and r.o_scale is not None for r in recs)
    post = layers.post_activations(imp.model, [q.layer for q in qls])
    assert post and all(lo == 0.0 and hi == 6.0 for lo, hi, _ in post.values())
    tied = [q for q in qls if q.aq is not None and q.links.fed_by is not None]
    if bits != 8:  # only outputs read by nothing but quantized layers that agree on their bits move
        tied = [r for q in qls if len({x.aq.bits for x in q.links.readers}) == 1 for r in q.links.readers]
    assert tied and all(q.aq is q.links.fed_by.oq for q in tied)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(out.SerializeToString(), so, providers=["CPUExecutionProvider"])
    opt = onnx.load(so.optimized_model_filepath).graph.node
    ops = [n.op_type for n in opt]
    n_conv = sum(q.layer.op == "Conv" for q in qls)
    # the stem reads the float network input: it stays a float Conv, followed by its ReLU6
    assert ops.count("Conv") == 1 and ops.count("QLinearConv") == n_conv - 1, ops
    producer = {o: n.op_type for n in opt for o in n.output}
    float_clips = [n for n in opt if n.op_type == "Clip" and producer.get(n.input[0]) in ("DequantizeLinear", "Conv")]
    # ReLU6 stays float only after the stem (float Conv) and, below 8 bits, where its output also
    # feeds a residual Add (an 8-bit output quantizer then, the reader quantizes again to `bits`)
    only = layers.read_only_by_layers(imp.model, [q.layer for q in qls])
    shared_with_float = [t for _, _, t in post.values() if t not in only]
    assert len(float_clips) <= 1 + (len(shared_with_float) if bits < 8 else 0), \
        [(n.name, producer.get(n.input[0])) for n in float_clips]
    feeds = nets.inputs(net, 16, seed=3)
    par = validate.sim_parity(["y"], runtime.run(runtime.session(out), feeds), convert.torch_run(gm, feeds, ["x"]))[0]
    assert par.exact


def test_parity_counts_values_more_than_one_code_apart():
    rng = np.random.RandomState(0)
    sim = rng.rand(100, 100).astype(np.float32)
    step = np.ptp(sim.astype(np.float64)) / 255
    one = sim.copy()
    one[3, 4] += 40 * step  # an isolated flip grown through later layers
    many = sim + np.where(rng.rand(100, 100) < 0.02, 5 * step, 0).astype(np.float32)
    close = sim + 0.4 * step
    p_one, p_many, p_close = validate.sim_parity(["y"] * 3, [one, many, close], [sim] * 3)
    assert p_one.max_code_diff == 40 and p_one.over_one == 1e-4 and p_one.ok and not p_one.exact
    assert 0.01 < p_many.over_one < 0.03 and not p_many.ok
    assert p_close.exact and p_close.ok and p_close.max_code_diff <= 1


def test_parity_of_a_nearly_constant_output_ignores_float_rounding():
    """A model whose weights are constant fills (the onnx wheel's light_densenet121) gives an output
    that barely varies; 15 float32 ulps of difference read as 800000 steps of its range."""
    sim = (0.46 + 1e-6 * np.random.RandomState(0).rand(4, 1000)).astype(np.float32)
    ulps = sim + (15 * np.spacing(sim)).astype(np.float32)
    par = validate.sim_parity(["y"], [ulps], [sim])[0]
    assert par.exact and par.max_code_diff == 0
    # a real difference on that output still shows: 1e-4 of its magnitude is ten steps
    far = validate.sim_parity(["y"], [sim + np.float32(0.46e-4)], [sim])[0]
    assert far.max_code_diff >= 9 and not far.ok


def test_layer_parity_finds_a_wrong_layer(tmp_path):
    """Each layer fed with onnxruntime's own input must match; a corrupted weight must show."""
    from packptq_onnx.parity import layer_parity
    from packptq_onnx.pipeline import Options, prepare

    p = prepare(MODEL, CALIB, Options(wbits=4, abits=4, method="rtn", calib_samples=64), log=lambda *a: None)
    out = qdq.write_qdq(p.imp.model, export_records(p.qls))
    feeds = data.take(p.calib, 8)
    good = layer_parity(out, p.gm, p.qls, feeds, p.names)
    assert good.exact and good.layers == len(p.qls)
    victim = [q for q in p.qls if q.wq is not None][3].layer.name
    w = next(i for i in out.graph.initializer if i.name == victim + ".w_int4")  # int8 container named for its bits
    a = onnx.numpy_helper.to_array(w).copy()
    a.flat[:: 7] = np.clip(a.flat[:: 7] + 3, -8, 7)
    w.CopyFrom(onnx.numpy_helper.from_array(a, w.name))
    bad = layer_parity(out, p.gm, p.qls, feeds, p.names)
    assert not bad.exact and bad.worst == victim and bad.max_code_diff > 1


def test_dead_channel_bias_fits_int32(tmp_path):
    """A channel whose weights are all zero keeps its bias: its weight scale is raised so the bias
    fits the int32 export (EfficientNet-Lite0's stem has such channels; overflow made onnxruntime
    add garbage there)."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.RandomState(0)
    w1 = rng.randn(4, 3, 3, 3).astype(np.float32) * 0.3
    w2 = rng.randn(4, 4, 3, 3).astype(np.float32) * 0.3
    w2[2] = 1e-12  # dead channel
    b2 = np.array([0.1, -0.2, 5.0, 0.3], np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="c2", pads=[1, 1, 1, 1])],
        "dead", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(b2, "b2")])
    path = str(tmp_path / "dead.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    calib = {"x": rng.randn(32, 3, 8, 8).astype(np.float32)}
    imp, gm, qls, out = quantize(path, 8, 8, calib)
    rec = next(r for r in export_records(qls) if r.layer.name == "c2")
    assert np.abs(rec.bias_int.astype(np.int64)).max() <= 2 ** 24
    assert (rec.w_int[2] == 0).all()
    ort_q = runtime.run(runtime.session(out), calib)[0]
    np.testing.assert_allclose(ort_q[:, 2], 5.0, atol=1e-3)
    sim = convert.torch_run(gm, calib, ["x"])
    assert validate.sim_parity(["y"], [ort_q], sim)[0].exact


def test_output_quantizer_follows_its_readers_bits(exported):
    """W4A4: an output read only by quantized layers is quantized once, at 4 bits, shared with its
    reader. When mixed precision moves the reader to A8 the output quantizer goes back to 8 bits and
    is shared again; onnxruntime still equals the simulation."""
    net = nets.build("mobilenetv2")
    imp, gm, qls, _ = quantize(exported("mobilenetv2", 17), 4, 4, nets.inputs(net, 16))
    p = next(q for q in qls if q.links.readers and not any(layers.is_join(r.layer) for r in q.links.readers))
    r = p.links.readers[0]
    assert p.oq.bits == 4 and r.aq is p.oq
    state.set_bits(r, 4, 8)
    state.tie_inputs(qls)
    assert p.oq.bits == 8 and r.aq is p.oq
    out = qdq.write_qdq(imp.model, export_records(qls))
    feeds = nets.inputs(net, 16, seed=3)
    par = validate.sim_parity(["y"], runtime.run(runtime.session(out), feeds), convert.torch_run(gm, feeds, ["x"]))[0]
    assert par.exact, par


def test_layer_parity_with_constant_nodes_and_bypassed_relu(tmp_path):
    """x -> Conv -> Relu -> Conv -> Add(Constant node) -> y at W4A4: the Relu is bypassed in the
    export (the second conv reads the first one's 4-bit output) and a Constant node has no input;
    the layer-by-layer check still feeds each layer onnxruntime's own input and agrees."""
    from onnx import TensorProto, helper, numpy_helper

    from packptq_onnx.parity import layer_parity
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 3, 3)).astype(np.float32), "w2")]
    c = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.full((1, 4, 1, 1), 0.5, np.float32)))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["z"], pads=[1, 1, 1, 1]), c,
             helper.make_node("Add", ["z", "c"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 8, 8])], inits)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    feeds = {"x": rng.normal(0, 1, (16, 3, 8, 8)).astype(np.float32)}
    imp, gm, qls, out = quantize(str(path), 4, 4, feeds)
    recs = export_records(qls)
    assert recs[1].input_from == recs[0].layer.output and recs[0].o_bits == 4
    assert "Relu" not in [n.op_type for n in out.graph.node]
    if not any(n.op_type == "Constant" for n in out.graph.node):  # import may fold it: put one back
        zero = numpy_helper.from_array(np.zeros(1, np.float32))
        out.graph.node.insert(0, helper.make_node("Constant", [], ["c_extra"], value=zero))
    res = layer_parity(out, gm, qls, feeds, ["x"])
    assert res.layers == 2 and res.exact, res


def test_packed_storage_survives_the_opset_upgrade(exported):
    """Packed INT4 weights need opset 21; upgrading the resnet's opset-17 ReduceMean inserts a
    Constant node in front of the head Gemm. The head must still get its own weight and parity hold
    (the records were once matched by node index, and the Gemm read a conv's DQ)."""
    net = nets.build("resnet")
    imp, gm, qls, _ = quantize(exported("resnet", 17), 4, 8, nets.inputs(net, 32, seed=2))
    out = qdq.write_qdq(imp.model, export_records(qls), storage="packed")
    assert any(n.op_type == "Constant" for n in out.graph.node)  # the upgrade really inserted nodes
    tagged = [n for n in out.graph.node if qdq.node_tag(n)]
    assert [n.op_type for n in tagged] == [q.layer.op for q in qls]
    feeds = nets.inputs(net, 32, seed=3)
    par = validate.sim_parity(["y"], runtime.run(runtime.session(out), feeds), convert.torch_run(gm, feeds, ["x"]))[0]
    assert par.exact, par


@pytest.mark.parametrize("wbits,abits", [(8, 8), (4, 4)])
@pytest.mark.parametrize("arch", ["resnet", "mobilenetv2", "chain", "vit"])
def test_nothing_quantizable_left_float_by_onnxruntime(exported, tmp_path, arch, wbits, abits):
    """After onnxruntime's own optimisation no Conv, Gemm, MatMul or Add of the test nets runs in
    float between a DequantizeLinear and a QuantizeLinear (each would cost two conversions and
    float work, the slow-export complaint). Exceptions by design: a layer reading the raw network
    input, which is not quantized, and the transformer's Adds (bias, position embedding, the
    residual stream into LayerNorm), which are no joins."""
    from packptq_onnx import ortview
    net = nets.build(arch)
    imp, gm, qls, out = quantize(exported(arch, 17), wbits, abits, nets.inputs(net, 16))
    path = str(tmp_path / "q.onnx")
    onnx.save(out, path)
    opt = ortview.optimized(path)
    graph_inputs = {i.name for i in opt.graph.input}
    watched = ("Conv", "Gemm", "MatMul") + (("Add",) if arch != "vit" else ())
    left = [n for n in ortview.float_between(opt) if n.op_type in watched and not graph_inputs & set(n.input)]
    assert not left, [(n.op_type, n.name) for n in left]
    ops = [n.op_type for n in opt.graph.node]
    n_joins = sum(layers.is_join(q.layer) for q in qls)
    assert ops.count("QLinearAdd") == n_joins and (n_joins > 0) == (arch in ("resnet", "mobilenetv2"))


def test_join_with_one_input_left_float_exports(exported):
    """The guard may leave float the quantizer a join's first input shares with its producer; the
    join then quantizes only its second input (this crashed the export of PP-OCRv3's detector)."""
    net = nets.build("resnet")
    imp, gm, qls, _ = quantize(exported("resnet", 17), 8, 8, nets.inputs(net, 32, seed=2))
    join = next(q for q in qls if layers.is_join(q.layer) and q.links.fed_by is not None and q.aq2 is not None)
    state.keep_float(qls, [(join.links.fed_by.layer.name, "output")])
    assert join.aq is None and join.aq2 is not None
    recs = export_records(qls)
    rec = next(r for r in recs if r.layer.name == join.layer.name)
    assert rec.abits == 8 and rec.a_scale is None and rec.a2_scale is not None
    out = qdq.write_qdq(imp.model, recs)
    feeds = nets.inputs(net, 32, seed=3)
    par = validate.sim_parity(["y"], runtime.run(runtime.session(out), feeds), convert.torch_run(gm, feeds, ["x"]))[0]
    assert par.exact, par
