"""Kernel choice (packptq_onnx.kernels): float-kernel convs export as float convs that onnxruntime
neither fuses nor re-quantizes, still equal to the simulation; the choice never predicts a slower
model; quantizers of 8 bits or more vanish only inside float regions, narrower ones never."""
import itertools

import nets
import numpy as np
import onnx
import pytest
import torch
from packptq_onnx.exporters import qdq
from test_export import quantize

from packptq_onnx import convert, kernels, layers, ortview, parity, runtime, validate
from packptq_onnx.records import export_records


def _costs(qls, conv_us, rng):
    """Random but plausible costs: each conv (integer, float) time, Q/DQ time per tensor size."""
    convs = {q.layer.name: kernels.Timing(q.layer.name, *conv_us(rng)) for q in kernels.candidates(qls)}
    size = {q.layer.name: (int(rng.integers(100, 5000)), int(rng.integers(100, 5000))) for q in qls}
    sizes = {v for pair in size.values() for v in pair}
    return kernels.Costs(convs, {n: n * 2e-3 for n in sizes}, {n: n * 2e-3 for n in sizes}, size)


@pytest.mark.parametrize("wbits,abits", [(8, 8), (4, 4)])
def test_float_kernel_export_runs_float_and_equals_simulation(exported, tmp_path, wbits, abits):
    net = nets.build("resnet")
    imp, gm, qls, _ = quantize(exported("resnet", 17), wbits, abits, nets.inputs(net, 32, seed=2))
    convs = [q for q in kernels.candidates(qls)]
    chosen = {q.layer.name for q in convs[: len(convs) // 2]}
    narrow = {id(z): z for q in qls for z in (q.aq, q.aq2, q.oq) if z is not None and z.bits < 8}
    removed = kernels.apply(qls, chosen)
    assert removed > 0 or abits < 8
    inside = 0
    for q in qls:
        for attr in ("aq", "aq2", "oq"):
            z = getattr(q, attr)
            if z is not None:
                holders = [r for r in qls if z in (r.aq, r.aq2, r.oq)]
                needed = any(r.layer.name not in chosen and not kernels.runs_float(r) for r in holders)
                # 8 bits or more: left only where some integer kernel needs it; fewer: the precision
                # asked for, which float kernels read through QuantizeLinear -> DequantizeLinear
                assert needed or z.bits < 8
                inside += not needed
    assert (inside > 0) == (abits < 8)
    assert bool(narrow) == (abits < 8)
    assert all(any(z in (q.aq, q.aq2, q.oq) for q in qls) for z in narrow.values())  # none dropped
    out = qdq.write_qdq(imp.model, export_records(qls))
    path = str(tmp_path / "q.onnx")
    onnx.save(out, path)
    opt = ortview.optimized(path)
    ops = [n.op_type for n in opt.graph.node]
    assert ops.count("QLinearConv") == len(convs) - len(chosen)  # neither fused nor re-quantized
    view = ortview.summary(path)  # inspect --runtime names them as chosen
    forced = {q.layer.name for q in qls if q.layer.op == "Conv" and q.wq is not None and kernels.runs_float(q)}
    assert forced - chosen  # the stem reads the raw input: float too, written the same way
    assert view["float_kernel_convs"] == len(chosen | forced) and "run float by choice" in ortview.table(view)
    assert ops.count("Conv") + ops.count("FusedConv") >= len(chosen)
    feeds = nets.inputs(net, 32, seed=3)
    par = validate.sim_parity(["y"], runtime.run(runtime.session(out), feeds), convert.torch_run(gm, feeds, ["x"]))
    assert par[0].max_abs_diff <= 4 * par[0].step, par  # float accumulation order: a tie may flip
    lp = parity.layer_parity(out, gm, qls, nets.inputs(net, 8, seed=4), ["x"])
    assert lp.exact and lp.max_code_diff <= 1, lp
    # weights keep their b-bit values (dequantized), counted at their bits
    assert qdq.weight_bytes(out) == pytest.approx(sum(r.w_int.size * r.wbits / 8 for r in export_records(qls)))


@pytest.mark.parametrize("bits", [8, 4])  # 4: quantizers in float regions stay and cost their Q/DQ pair
def test_choice_never_predicts_slower_and_matches_brute_force(exported, bits):
    net = nets.build("resnet")
    imp, gm, qls, _ = quantize(exported("resnet", 17), bits, bits, nets.inputs(net, 32, seed=2))
    names = [q.layer.name for q in kernels.candidates(qls)] + [q.layer.name for q in qls if layers.is_join(q.layer)]
    assert len(names) <= 12  # brute force over every subset
    rng = np.random.default_rng(0)
    gaps, gains = [], []
    for _ in range(20):
        costs = _costs(qls, lambda r: (float(r.uniform(5, 100)), float(r.uniform(5, 100))), rng)
        chosen = kernels.choose(qls, costs)
        t, all_int = kernels.total_us(qls, costs, chosen), kernels.total_us(qls, costs, set())
        assert t <= all_int
        best = min(kernels.total_us(qls, costs, set(s)) for k in range(len(names) + 1)
                   for s in itertools.combinations(names, k))
        # it stops where no move saves its margin
        assert t - best <= kernels.FLOOR_US + kernels.MARGIN * sum(c.integer_us for c in costs.convs.values())
        gaps.append(t - best)
        gains.append(all_int - best)
    assert np.mean(gaps) <= 0.1 * np.mean(gains)  # measured: 4.4 us against 120 us
    # integer kernels far faster: no conv moves (a join may: it has no time of its own, and with these
    # random tensor sizes running one float can save a conversion); far slower: every conv runs float
    fast = _costs(qls, lambda r: (1.0, 50.0), rng)
    assert not kernels.choose(qls, fast) & set(fast.convs)
    slow = kernels.choose(qls, _costs(qls, lambda r: (500.0, 10.0), rng))
    assert {q.layer.name for q in kernels.candidates(qls)} <= slow


class GeluNet(torch.nn.Module):
    """conv -> relu -> conv -> GELU -> conv: the middle conv's output is read by GELU only, so no
    QuantizeLinear follows it and onnxruntime has no integer kernel for it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = (torch.nn.Conv2d(3, 8, 3, 1, 1), torch.nn.Conv2d(8, 8, 3, 1, 1),
                                  torch.nn.Conv2d(8, 4, 1))

    def forward(self, x):
        return self.c(torch.nn.functional.gelu(self.b(torch.relu(self.a(x)))))


def test_a_conv_whose_output_nothing_quantizes_exports_with_a_folded_weight(tmp_path):
    path = str(tmp_path / "gelu.onnx")
    torch.onnx.export(GeluNet(), torch.randn(1, 3, 8, 8), path, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)
    rng = np.random.default_rng(0)
    imp, gm, qls, out = quantize(path, 8, 8, {"x": rng.standard_normal((16, 3, 8, 8)).astype(np.float32)})
    mid = next(q for q in qls if q.layer.name.startswith("/b/"))
    assert mid.aq is not None and mid.oq is None and kernels.runs_float(mid)
    # the first reads the raw input; the last writes the network output, which nothing quantizes
    assert kernels.candidates(qls) == [] and all(kernels.runs_float(q) for q in qls)
    opt = ortview.optimized(_save(out, tmp_path))
    inits = {i.name for i in opt.graph.initializer}
    convs = [n for n in opt.graph.node if n.op_type in ("Conv", "FusedConv")]
    assert len(convs) == 3 and all(n.input[1] in inits for n in convs)  # weights folded at load, no
    # DequantizeLinear on them at run time
    feeds = {"x": rng.standard_normal((8, 3, 8, 8)).astype(np.float32)}
    par = validate.sim_parity(["y"], runtime.run(runtime.session(out), feeds), convert.torch_run(gm, feeds, ["x"]))
    assert par[0].max_abs_diff <= 2 * par[0].step, par


def _save(model, tmp_path):
    path = str(tmp_path / "q.onnx")
    onnx.save(model, path)
    return path
