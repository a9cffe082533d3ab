"""Accuracy targets, honest limits, 16-bit activations and the ranked sensitivity report (issue 25)."""
import json
import os

import numpy as np
import onnx
import pytest
from conftest import SAMPLES
from hypothesis import given, settings
from hypothesis import strategies as st
from packptq_onnx.exporters import qdq
from packptq_onnx.solvers import ilp

from packptq_onnx import accuracy, mixed, runtime
from packptq_onnx.cli import main
from packptq_onnx.errors import UsageError
from packptq_onnx.mixed import MixedOptions
from packptq_onnx.pipeline import Options, quantize

MODEL, CALIB = os.path.join(SAMPLES, "digits_resnet.onnx"), os.path.join(SAMPLES, "calib.npz")
EVAL = os.path.join(SAMPLES, "eval.npz")


def _agreement(path):
    d = np.load(EVAL)
    f = runtime.run(runtime.session(MODEL), {"image": d["image"]})[0]
    q = runtime.run(runtime.session(path), {"image": d["image"]})[0]
    return float((f.argmax(1) == q.argmax(1)).mean())


def _pack_abits(meta) -> list:
    """Per pack, the one activation width of its layers (joins keep their fixed 8 bits)."""
    op = {x["node"]: (x["op"], x["abits"]) for x in meta["layers"]}
    out = []
    for p in meta["packs"]:
        bits = {op[n][1] for n in p["nodes"] if op[n][0] != "Add"}
        assert len(bits) == 1, bits
        out.append(bits.pop())
    return out


def test_target_takes_the_cheapest_checked_allocation_that_meets_it(tmp_path):
    out = str(tmp_path / "t.onnx")
    goal = accuracy.parse("agreement>=0.99")
    o = Options(method="rtn", mixed=MixedOptions(target=goal))
    r = quantize(MODEL, CALIB, out, o, EVAL, log=lambda *_: None).to_dict()
    s = r["mixed_precision"]["search"]
    assert s["met"] and s["final"]["met"]
    pts, chosen = s["points"], s["points"][s["chosen"]]
    assert chosen["passed"] and chosen["metric"] >= 0.99
    # no checked point that passes is cheaper in bit-operations
    assert all(p["bops"] >= chosen["bops"] for p in pts if p["passed"])
    # uniform allocations within the limits were checked as references, and a mixed point
    # stays on the front only by beating every uniform one at no more bit-operations
    uni = [p for p in pts if p["uniform"]]
    assert uni and any(p["bops"] < max(q["bops"] for q in pts if not q["uniform"]) for p in uni)
    for p in pts:
        if p["front"] and not p["uniform"]:
            assert all(p["metric"] > u["metric"] for u in uni if u["bops"] <= p["bops"])
    # the written file really meets the target in onnxruntime, measured here independently
    assert _agreement(out) >= 0.99
    # and it is cheaper than the most accurate candidate (all 8-bit weights, 16-bit activations)
    assert chosen["bops"] < max(p["bops"] for p in pts)
    meta = qdq.read_meta(onnx.load(out))
    assert meta["allocation"]["chosen_for"] == "target agreement>=0.99"
    m = r["mixed_precision"]
    assert _pack_abits(meta) == [m["options"][k][1] for k in m["choice"]]
    front = json.load(open(str(tmp_path / "t.front.json")))
    assert front["chosen"] == s["chosen"] and (tmp_path / "t.front.md").exists()
    # every layer alone at its chosen bits, costliest first
    rank = r["mixed_precision"]["ranking"]
    assert len(rank) == len(r["layers"]) and rank == sorted(rank, key=lambda d: -d["omega"])


def test_unreachable_target_exits_3_and_writes_no_model(tmp_path, capsys):
    out = tmp_path / "t.onnx"
    out.write_bytes(b"keep")
    code = main(["quantize", MODEL, "--calib", CALIB, "--eval", EVAL, "-o", str(out), "--method", "rtn",
                 "--target", "agreement>=1.01"])
    err = capsys.readouterr().err
    assert code == 3 and "not reached" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == b"keep"
    front = json.load(open(str(tmp_path / "t.front.json")))
    # the last resorts were tried: 16-bit activations on the stem and head, then every layer float
    assert not front["met"] and any(p["stem_head_abits"] == 16 for p in front["points"])
    assert max(p["float_layers"] for p in front["points"]) == 12  # 9 quantizable layers and 3 joins


@pytest.mark.parametrize("args,message", [
    (["--target", "cosine>=0.99"], "give --eval"),
    (["--eval", EVAL, "--target", "wer>=0.1"], "cannot read --target"),
    (["--eval", EVAL, "--target", "agreement<=0.9"], "use >="),
    (["--eval", CALIB, "--target", "accuracy>=0.9"], "needs labels"),
    (["--eval", EVAL, "--target", "metric>=0.9"], "needs --metric"),
    (["--eval", EVAL, "--max-drop", "0.01", "--target", "task>=0.9"], "at most one"),
    (["--avg-wbits", "3", "--abits-options", "4,32"], "or 16"),
    (["--avg-wbits", "3", "--bops", "lots"], "cannot read --bops"),
    (["--avg-wbits", "3", "--fixed-abits", "9"], "or 16"),
    (["--avg-wbits", "3", "--avg-abits", "2", "--abits-options", "4,8"], "--avg-abits is infeasible: the smallest"),
])
def test_target_and_limit_errors_are_one_line_before_measuring(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr(mixed, "measure", lambda *a, **k: pytest.fail("measured before the check"))
    code = main(["quantize", MODEL, "--calib", CALIB, "-o", str(tmp_path / "o.onnx"), "--method", "rtn", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.onnx").exists()


def test_activation_and_bops_limits_hold_in_the_written_model(tmp_path):
    o = Options(method="rtn", abits=8, mixed=MixedOptions(abits=(4, 8, 16), avg_abits=7.0))
    r = quantize(MODEL, CALIB, str(tmp_path / "a.onnx"), o, log=lambda *_: None).to_dict()
    m = r["mixed_precision"]
    assert m["predicted"]["avg_abits"] <= 7.0 + 1e-9
    chosen = [m["options"][k] for k in m["choice"]]
    assert any(a < 8 for _, a in chosen)  # the limit bites: some pack goes below A8
    # the written layers carry those bits
    assert _pack_abits(r) == [a for _, a in chosen]
    # a bit-operation limit halfway between the cheapest and the W8A8 cost is met
    c = m["predicted"]["bops"]
    o2 = Options(method="rtn", abits=8, mixed=MixedOptions(abits=(4, 8), bops=0.6 * c))
    r2 = quantize(MODEL, CALIB, str(tmp_path / "b.onnx"), o2, log=lambda *_: None).to_dict()
    assert r2["mixed_precision"]["predicted"]["bops"] <= 0.6 * c + 1e-6


def test_limits_that_cannot_hold_together_name_each_smallest_value():
    # two packs; option 0 is small in weights and large in activations, option 1 the reverse
    c = mixed.Costs([[10, 100], [10, 100]], [[400, 40], [400, 40]], [[1, 1], [1, 1]],
                    {"weight_bytes": 0, "act_bits": 0, "bops": 0}, 80, 100)
    lims = [mixed.Limit("weight_bytes", "--budget", 50, str), mixed.Limit("act_bits", "--avg-abits", 300, str)]
    with pytest.raises(UsageError) as exc:  # each alone is feasible, both together are not
        mixed.check_limits(c, lims)
    msg = str(exc.value)
    # brute force: act <= 300 leaves only (1, 1): 200 weight bytes; weights <= 50 only (0, 0): 800 act bits
    assert "--budget 200" in msg and "--avg-abits 800" in msg
    mixed.check_limits(c, [lims[0]])
    mixed.check_limits(c, [lims[1]])


def test_smallest_each_equals_brute_force():
    import itertools
    t1, t2 = [[3, 1, 2], [5, 2, 1]], [[1, 4, 2], [1, 3, 6]]
    rows = [(t1, 3.0, "a"), (t2, 4.0, "b")]
    best = ilp.smallest_each(rows)
    pairs = list(itertools.product(range(3), range(3)))
    tot = lambda t, ch: sum(t[p][k] for p, k in enumerate(ch))  # noqa: E731
    assert best["a"] == min(tot(t1, ch) for ch in pairs if tot(t2, ch) <= 4)
    assert best["b"] == min(tot(t2, ch) for ch in pairs if tot(t1, ch) <= 3)


def test_16_bit_activations_run_in_onnxruntime_and_beat_8_bit(tmp_path):
    cos = {}
    for a in (8, 16):
        out = str(tmp_path / f"a{a}.onnx")
        r = quantize(MODEL, CALIB, out, Options(method="rtn", wbits=8, abits=a), EVAL, log=lambda *_: None)
        assert r.parity_layers["max_code_diff"] <= 1 and all(p["ok"] for p in r.parity)
        cos[a] = r.to_dict()["validation"][0]["cosine"]
    m = onnx.load(str(tmp_path / "a16.onnx"))
    wide = [n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.domain == "com.microsoft"]
    assert wide and any(o.domain == "com.microsoft" for o in m.opset_import)
    zeros = {i.name: i.data_type for i in m.graph.initializer}
    assert all(zeros[n.input[2]] == onnx.TensorProto.UINT16 for n in wide)
    assert cos[16] > cos[8]


def test_inspect_sensitivity_ranks_layers_and_reuses_its_cache(tmp_path, capsys, monkeypatch):
    cache = str(tmp_path / "s.json")
    args = ["inspect", MODEL, "--calib", CALIB, "--calib-samples", "64", "--sensitivity", "--json",
            "--wbits-options", "2,8", "--abits-options", "4,16", "--sensitivity-cache", cache]
    assert main(args) == 0
    info = json.loads(capsys.readouterr().out)
    s = info["sensitivity"]
    assert [tuple(o) for o in s["options"]] == [(2, 4), (2, 16), (8, 4), (8, 16)]
    for it in s["packs"] + s["layers"]:  # 8-bit weights never cost more than 2-bit ones at equal A
        o = it["omega"]
        assert o[2] <= o[0] * 1.001 and o[3] <= o[1] * 1.001 and it["cosine"][3] >= it["cosine"][0]
    omega0 = {it["name"]: it["omega"][0] for it in s["layers"]}
    assert s["ranked"] == sorted(omega0, key=lambda n: -omega0[n]) and len(s["packs"]) == len(info["packs"])
    monkeypatch.setattr(mixed, "measure", lambda *a, **k: pytest.fail("measured again"))
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["sensitivity"] == s


@st.composite
def limited(draw):
    """Random packs x options with three cost tables, fixed stem/head costs and random limits."""
    groups, nopt = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    table = lambda lo, hi: [[float(draw(st.integers(lo, hi))) for _ in range(nopt)] for _ in range(groups)]  # noqa: E731
    cost = [[draw(st.floats(0, 10)) for _ in range(nopt)] for _ in range(groups)]
    c = mixed.Costs(table(1, 40), table(1, 40), table(0, 40),
                    {"weight_bytes": float(draw(st.integers(0, 9))), "act_bits": float(draw(st.integers(0, 9))),
                     "bops": float(draw(st.integers(0, 9)))}, 100, 100)
    keys = draw(st.lists(st.sampled_from(["weight_bytes", "act_bits", "bops"]), min_size=1, max_size=3, unique=True))
    lims = [mixed.Limit(k, f"--{k}", float(draw(st.integers(0, 170))), str) for k in keys]
    return cost, c, lims


@settings(max_examples=120, deadline=None)
@given(limited())
def test_limits_never_exceeded_and_allocation_optimal(inst):
    import itertools
    cost, c, lims = inst
    choices = list(itertools.product(*[range(len(r)) for r in cost]))
    ok = [ch for ch in choices if all(c.total(lim.key, ch) <= lim.total + 1e-9 for lim in lims)]
    try:
        a = mixed.solve(cost, c, lims, MixedOptions())
    except UsageError:
        assert not ok  # an error only when no choice fits
        return
    assert all(c.total(lim.key, a.choice) <= lim.total + 1e-6 for lim in lims)
    assert a.objective == pytest.approx(min(sum(cost[p][k] for p, k in enumerate(ch)) for ch in ok), abs=1e-6)


def test_front_is_monotone(tmp_path):
    goal = accuracy.parse("cosine>=0.999")
    r = quantize(MODEL, CALIB, str(tmp_path / "f.onnx"), Options(method="rtn", mixed=MixedOptions(target=goal)),
                 EVAL, log=lambda *_: None).to_dict()
    pts = r["mixed_precision"]["search"]["points"]
    front = sorted((p for p in pts if p["front"]), key=lambda p: p["bops"])
    assert len(pts) >= 3 and front
    assert all(a["metric"] < b["metric"] for a, b in zip(front, front[1:]))
    # every point off the front is dominated by a front point: no dearer-and-worse point is on it
    for p in pts:
        if not p["front"]:
            assert any(f["bops"] <= p["bops"] and f["metric"] >= p["metric"] for f in front)


def test_float_fallback_is_the_last_resort_and_exports_float_layers(tmp_path):
    out = str(tmp_path / "f.onnx")
    goal = accuracy.parse("cosine>=0.9999")  # W8A16 everywhere reaches 0.99988 on the sample
    r = quantize(MODEL, CALIB, out, Options(method="rtn", mixed=MixedOptions(target=goal)), EVAL,
                 log=lambda *_: None).to_dict()
    m = r["mixed_precision"]
    floated = m["float_layers"]
    assert floated and m["search"]["met"] and m["search"]["final"]["value"] >= 0.9999
    pts = m["search"]["points"]
    # tried in order: all 16-bit first, float layers only after every quantized candidate missed
    assert all(not p["passed"] for p in pts if p["float_layers"] == 0)
    model = onnx.load(out)
    init = {i.name: i for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.name in floated]
    assert len(nodes) == len(floated)
    for node in nodes:  # the weight is the float initializer itself, not a DequantizeLinear output
        assert node.input[1] in init and init[node.input[1]].data_type == onnx.TensorProto.FLOAT
    assert r["parity_layers"]["max_code_diff"] <= 1 and all(p["ok"] for p in r["parity"])
    assert r["weight_bytes"]["quantized"] > 37_800  # the float layer counts 4 bytes per weight


def test_float_gains_rank_by_the_target_metric_then_the_loss():
    import torch

    from packptq_onnx import data, state
    from packptq_onnx.pipeline import prepare
    from packptq_onnx.ranking import float_gains

    o = Options(method="rtn", wbits=2, abits=2, batch_size=32)
    p = prepare(MODEL, CALIB, o, log=lambda *_: None)
    score = lambda ref, got: float((ref[0].argmax(1) == got[0].argmax(1)).mean())  # noqa: E731
    rank = float_gains(p.gm, p.qls, lambda: p.batches(o), samples=64, score=score)
    keys = [(-r["score_gain"], -r["gain"]) for r in rank]
    assert keys == sorted(keys) and len(rank) == len(p.qls) and rank[0]["score_gain"] > 0
    # the top layer's gain, measured independently: agreement on the same 64 samples with it float
    x = torch.from_numpy(data.take(p.calib, 64)["image"])
    with torch.no_grad(), state.quantized(p.qls, only=[]):
        f = p.gm(x).numpy()
    with torch.no_grad(), state.snapshot(p.qls), state.quantized(p.qls):
        q0 = p.gm(x).numpy()
        state.fall_back(next(q for q in p.qls if q.layer.name == rank[0]["layer"]))
        q1 = p.gm(x).numpy()
    assert rank[0]["score_gain"] == pytest.approx(score([f], [q1]) - score([f], [q0]))
    assert accuracy.proxy(accuracy.parse("cosine>=0.9"), None, o) is None
