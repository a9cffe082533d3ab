"""Kernel choice (packptq_onnx.kernels): float-kernel convs export as float convs that onnxruntime
neither fuses nor re-quantizes, still equal to the simulation; the choice never predicts a slower
model; quantizers vanish only inside float regions."""
import itertools

import nets
import numpy as np
import onnx
import pytest
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
    removed = kernels.apply(qls, chosen)
    assert removed > 0
    for q in qls:  # a quantizer is left only where some integer kernel needs it
        for attr in ("aq", "aq2", "oq"):
            z = getattr(q, attr)
            if z is not None:
                holders = [r for r in qls if z in (r.aq, r.aq2, r.oq)]
                assert any(r.layer.name not in chosen and not kernels.runs_float(r) for r in holders)
    out = qdq.write_qdq(imp.model, export_records(qls))
    path = str(tmp_path / "q.onnx")
    onnx.save(out, path)
    opt = ortview.optimized(path)
    ops = [n.op_type for n in opt.graph.node]
    assert ops.count("QLinearConv") == len(convs) - len(chosen)  # neither fused nor re-quantized
    view = ortview.summary(path)  # inspect --runtime names them as chosen
    assert view["float_kernel_convs"] == len(chosen) and "run float by choice" in ortview.table(view)
    assert ops.count("Conv") + ops.count("FusedConv") >= len(chosen)
    feeds = nets.inputs(net, 32, seed=3)
    par = validate.sim_parity(["y"], runtime.run(runtime.session(out), feeds), convert.torch_run(gm, feeds, ["x"]))
    assert par[0].max_abs_diff <= 4 * par[0].step, par  # float accumulation order: a tie may flip
    lp = parity.layer_parity(out, gm, qls, nets.inputs(net, 8, seed=4), ["x"])
    assert lp.exact and lp.max_code_diff <= 1, lp
    # weights keep their b-bit values (dequantized), counted at their bits
    assert qdq.weight_bytes(out) == pytest.approx(sum(r.w_int.size * r.wbits / 8 for r in export_records(qls)))


def test_choice_never_predicts_slower_and_matches_brute_force(exported):
    net = nets.build("resnet")
    imp, gm, qls, _ = quantize(exported("resnet", 17), 8, 8, nets.inputs(net, 32, seed=2))
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
    # integer kernels far faster: nothing moves; far slower: every conv runs float
    assert kernels.choose(qls, _costs(qls, lambda r: (1.0, 50.0), rng)) == set()
    slow = kernels.choose(qls, _costs(qls, lambda r: (500.0, 10.0), rng))
    assert {q.layer.name for q in kernels.candidates(qls)} <= slow
