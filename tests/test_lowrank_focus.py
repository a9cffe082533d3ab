"""Issue 27's two transformer components: low-rank compensation merged into the rounded weights
(quant.WeightQuantizer, lowrank.py) and the focus quantizer for post-Softmax probabilities
(quant.search_focus, calibrate): unit properties, then the tiny ViT end to end through onnxruntime."""
import nets
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from test_transformers import _check_export

from packptq_onnx import convert, data, lowrank, onnx_import, qlayer, state
from packptq_onnx.calibrate import calibrate
from packptq_onnx.cli import main
from packptq_onnx.layers import after_softmax, find_layers
from packptq_onnx.pipeline import Options, quantize
from packptq_onnx.quant import FOCUS_CANDIDATES, WeightQuantizer, act_params, fake_quant, search_focus
from packptq_onnx.reconstruct import ReconOptions


def _wq(seed=0, shape=(12, 20), bits=4):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return w, WeightQuantizer(w, 0, bits, False)


def test_lowrank_starts_where_round_to_nearest_is_and_learns_through_the_rounding():
    w, wq = _wq()
    rtn = wq.integer(w).clone()
    wq.init_adaround(w)
    wq.init_lowrank(w, 3, torch.Generator().manual_seed(1))
    assert wq.rank == 3 and wq.lr_a.shape == (3, 20) and wq.lr_b.shape == (12, 3)
    assert torch.equal(wq.integer(w), rtn)  # B = 0: the learning phase rounds to nearest
    g = torch.randn(12, 20, generator=torch.Generator().manual_seed(2))
    (wq(w) * g).sum().backward()
    assert wq.lr_b.grad.abs().sum() > 0  # straight through the rounding to B (A gets none while B = 0)
    assert wq.lr_a.grad.abs().sum() == 0
    assert wq.alpha.grad is None  # AdaRound waits for the second half of the curriculum


def test_fixed_lowrank_shift_moves_weights_by_whole_steps_and_adaround_rounds_around_it():
    w, wq = _wq()
    wq.init_adaround(w)
    wq.init_lowrank(w, 2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        wq.lr_a.zero_()
        wq.lr_a[0, 5] = 1.0
        wq.lr_b[:, 0] = 2.0  # column 5 of w / s moves up by exactly two steps
    before = torch.clamp(torch.round(w / wq.s(2)), wq.qmin, wq.qmax)
    wq.fix_lowrank(w)
    assert wq.lr_a is None and wq.rank == 2 and wq.shift.shape == w.shape
    soft = wq.integer(w)  # h(V) restarts at the fractional part of w/s + shift: soft weight = w + 2 s
    want = torch.clamp(w / wq.s(2) + wq.shift, wq.qmin, wq.qmax)
    inside = (w / wq.s(2) + wq.shift < wq.qmax - 1e-3)
    assert torch.allclose(soft[inside], want[inside], atol=1e-3)
    wq.harden()
    hard = wq.integer(w)
    moved = (hard - before)[:, 5]
    room = before[:, 5] <= wq.qmax - 3
    assert torch.all(moved[room] >= 1) and torch.all(moved[room] <= 3)  # two steps, +-1 of AdaRound's choice
    others = torch.cat([hard[:, :5] - before[:, :5], hard[:, 6:] - before[:, 6:]], 1)
    assert others.abs().max() <= 1
    wq.round_to_nearest()
    assert wq.shift is None and wq.rank == 0 and torch.equal(wq.integer(w), before)


def test_rank_rule_and_parsing():
    class Q:
        def __init__(self, op, shape):
            self.layer = type("L", (), {"op": op, "has_weight": True})()
            self.weight = torch.zeros(*shape)
            self.wq = object()

    assert lowrank.rank_for(Q("MatMul", (384, 384)), "auto") == 12
    assert lowrank.rank_for(Q("MatMul", (384, 1536)), "auto") == 12
    assert lowrank.rank_for(Q("MatMul", (48, 144)), "auto") == 4  # at least 4
    assert lowrank.rank_for(Q("MatMul", (4096, 4096)), "auto") == 64  # at most 64
    assert lowrank.rank_for(Q("Gemm", (10, 48)), 8) == 8
    assert lowrank.eligible(Q("Gemm", (10, 48))) and not lowrank.eligible(Q("Conv", (8, 3, 3, 3)))
    assert lowrank.parse("auto") == "auto" and lowrank.parse("16") == 16 and lowrank.parse("0") is None
    for bad in ("-2", "x"):
        with pytest.raises(ValueError):
            lowrank.parse(bad)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_focus_search_is_the_best_candidate_on_the_attention_output(bits, seed):
    """Brute force over the same candidates, and never worse than the full range or `extra`."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(4, 2, 10, 10, generator=gen), -1)
    v = torch.randn(4, 2, 10, 6, generator=gen)
    hi = float(probs.max())
    qmax = 2 ** bits - 1
    lp = act_params(0.0, 0.5 * hi, 0, qmax)

    def err(sz):
        q = fake_quant(probs, torch.tensor(sz[0], dtype=torch.float32), sz[1], 0, qmax)
        return float((q @ v - probs @ v).pow(2).sum())

    best = search_focus(probs, v, hi, 0, qmax, extra=[lp])
    assert best[1] == 0.0  # the grid starts at 0: probabilities are never negative
    cands = [act_params(0.0, hi * 2.0 ** (-k / 8), 0, qmax) for k in range(FOCUS_CANDIDATES)] + [lp]
    assert err(best) == min(err(c) for c in cands)
    assert err(best) <= err(act_params(0.0, hi, 0, qmax)) and err(best) <= err(lp)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    d = tmp_path_factory.mktemp("vit")
    net = nets.build("vit")
    src = nets.export(net, d / "vit.onnx")
    np.savez(d / "calib.npz", **nets.inputs(net, n=64))
    return src, str(d / "calib.npz"), d


def test_focus_calibration_picks_the_attention_inputs_and_lowers_their_output_error(vit):
    src, calib, _ = vit
    imp = onnx_import.load(src)
    layers = find_layers(imp.model)
    attn = after_softmax(imp.model, layers)
    assert attn == {"/blocks/blocks.0/attn/MatMul_1", "/blocks/blocks.1/attn/MatMul_1"}
    feeds = dict(np.load(calib))
    errs = {}
    for mode in ("uniform", "focus"):
        gm = convert.to_torch(imp)
        qls = qlayer.wrap(gm, imp.model, layers)
        calibrate(gm, qls, imp.model, data.batches(feeds, ["x"], 16), 8, 4, True, 0, softmax_quant=mode)
        by = {q.layer.name: q for q in qls}
        assert all((by[n].focus is not None) == (mode == "focus") for n in attn)
        assert all(q.focus is None for q in qls if q.layer.name not in attn)
        if mode == "focus":
            pairs = {n: by[n].focus for n in attn}
        errs[mode] = {n: by[n].aq for n in attn}
    for n in attn:  # on the samples it saw, focus's range gives attention outputs no worse than uniform's
        p, v = pairs[n]
        e = {m: float((errs[m][n](p) @ v - p @ v).pow(2).sum()) for m in errs}
        assert e["focus"] <= e["uniform"]


def _weights(path):
    m = onnx.load(path)
    return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer if i.data_type == onnx.TensorProto.INT8}


def test_vit_with_lowrank_and_focus_exports_plain_qdq_that_onnxruntime_matches(vit):
    src, calib, d = vit
    out = {}
    for tag, lr, sq in (("plain", None, "uniform"), ("both", 4, "focus")):
        out[tag] = str(d / f"{tag}.onnx")
        opts = Options(wbits=3, abits=4, method="pack", calib_samples=64, batch_size=16, softmax_quant=sq,
                       recon=ReconOptions(iters=40, lowrank=lr))
        report = quantize(src, calib, out[tag], opts, log=lambda *a: None).to_dict()
        _check_export(src, out[tag], report)  # plain QDQ: no op beyond those of the plain export
        if tag == "both":
            ops = sorted(n.op_type for n in onnx.load(out[tag]).graph.node)
            assert ops == sorted(n.op_type for n in onnx.load(out["plain"]).graph.node)
            units = report["reconstruction"]["units"]
            assert all(u["loss_after"] <= u["loss_before"] for u in units)
    a, b = _weights(out["plain"]), _weights(out["both"])
    assert a.keys() == b.keys()
    assert any(not np.array_equal(a[k], b[k]) for k in a)  # the compensation moved some integers


def test_vit_lowrank_side_branch_runs_in_onnxruntime_as_simulated(vit):
    """Branch form: two float MatMuls and an Add per MatMul / Gemm layer, the integers untouched by
    B·A, onnxruntime within one code of the simulation layer by layer."""
    src, calib, d = vit
    out = str(d / "branch.onnx")
    opts = Options(wbits=3, abits=4, method="pack", calib_samples=64, batch_size=16,
                   recon=ReconOptions(iters=40, lowrank=4, lowrank_form="branch"))
    report = quantize(src, calib, out, opts, log=lambda *a: None).to_dict()
    _check_export(src, out, report)
    m = onnx.load(out)
    branch_adds = [n for n in m.graph.node if n.op_type == "Add" and n.name.endswith("lowrank_Add")]
    eligible = [lay for lay in report["layers"] if lay["op"] in ("MatMul", "Gemm") and lay["wbits"]]
    assert len(branch_adds) == len(eligible) > 0
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    firsts = [v for k, v in inits.items() if "lowrank_first" in k]
    assert len(firsts) == len(eligible) and all(f.shape[1] == 4 for f in firsts)
    seconds = [v for k, v in inits.items() if "lowrank_second" in k]
    assert any(np.abs(v).max() > 0 for v in seconds)  # B learned away from its zero start
    assert report["weight_bytes"]["lowrank_branch"] == 4 * sum(f.size for f in firsts + seconds)


def test_lowrank_and_focus_cli_errors(vit, tmp_path, capsys):
    src, calib, _ = vit
    base = ["quantize", src, "--calib", calib, "-o", str(tmp_path / "o.onnx")]
    for extra, words in ((["--lowrank", "x"], "positive rank or 'auto'"),
                         (["--lowrank", "4", "--method", "rtn"], "learned during reconstruction"),
                         (["--softmax-quant", "log2"], "invalid choice"),
                         (["--lowrank", "4", "--lowrank-form", "side"], "invalid choice")):
        try:
            code = main(base + extra)
        except SystemExit as exc:  # argparse's own check of a choice or a type
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2, err
        assert words in err and "Traceback" not in err
        assert not (tmp_path / "o.onnx").exists()


def test_checkpoint_keeps_the_fixed_shift(vit):
    src, _, _ = vit
    imp = onnx_import.load(src)
    gm = convert.to_torch(imp)
    qls = qlayer.wrap(gm, imp.model, find_layers(imp.model))
    q = next(q for q in qls if lowrank.eligible(q) or (q.layer.has_weight and q.layer.op in ("MatMul", "Gemm")))
    q.wq = WeightQuantizer(q.weight, q.layer.axis, 4, False)
    q.wq.init_lowrank(q.weight, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        q.wq.lr_b.fill_(0.7)
    q.wq.fix_lowrank(q.weight)
    saved = state.learned(qls)
    want = q.wq.integer(q.weight).clone()
    q.wq.round_to_nearest()
    assert not torch.equal(q.wq.integer(q.weight), want)
    state.load_learned(qls, saved)
    assert torch.equal(q.wq.integer(q.weight), want) and q.wq.rank == 2


def test_focus_keeps_a_bounded_number_of_probabilities(vit, monkeypatch):
    """Long sequences: the (probs, v) samples kept per attention MatMul stop at FOCUS_ELEMENTS
    probabilities (at least one sample), so a 512-token BERT does not hold gigabytes of them."""
    from packptq_onnx import calibrate as cal

    src, calib, _ = vit
    imp = onnx_import.load(src)
    layers = find_layers(imp.model)
    per_sample = 4 * 16 * 16  # the tiny ViT: 4 heads, 16 tokens
    for cap, want in ((10 ** 9, cal.FOCUS_SAMPLES), (3 * per_sample, 3), (10, 1)):
        monkeypatch.setattr(cal, "FOCUS_ELEMENTS", cap)
        gm = convert.to_torch(imp)
        qls = qlayer.wrap(gm, imp.model, layers)
        calibrate(gm, qls, imp.model, data.batches(dict(np.load(calib)), ["x"], 16), 8, 4, True, 0,
                  softmax_quant="focus")
        kept = [q.focus for q in qls if q.focus is not None]
        assert len(kept) == 2 and all(p.shape[0] == v.shape[0] == want for p, v in kept)
        assert kept[0][0][0].numel() == per_sample
