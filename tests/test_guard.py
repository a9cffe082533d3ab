"""The 8-bit activation guard: each quantizer's cost measured alone (and the first-order estimate
the range choice uses, checked against that), and the quantizers it leaves float on a net built to
need it."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from packptq_onnx import convert, data, guard, state
from packptq_onnx.cli import main
from packptq_onnx.pipeline import Options, prepare


class OutlierNet(nn.Module):
    """A 1x1 conv whose channel 0 is 300x the others feeds a depthwise conv that scales each channel
    back to one size (as a BN-folded MobileNet / PicoDet block does): per tensor, 8 bits leave the
    small channels a few steps."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 16, 3, 1, 1)
        self.pw = nn.Conv2d(16, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16)
        self.head = nn.Conv2d(16, 4, 1)
        with torch.no_grad():
            self.pw.weight[0] *= 300.0
            self.pw.bias[0] *= 300.0
            self.dw.weight[0] /= 300.0

    def forward(self, x):
        return self.head(torch.relu(self.dw(torch.relu(self.pw(torch.relu(self.a(x)))))))


def _model(tmp_path):
    path = str(tmp_path / "outlier.onnx")
    torch.onnx.export(OutlierNet(), torch.randn(1, 3, 16, 16), path, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)
    g = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=g.standard_normal((32, 3, 16, 16)).astype(np.float32))
    np.savez(tmp_path / "eval.npz", x=g.standard_normal((16, 3, 16, 16)).astype(np.float32))
    return path


def test_first_order_estimate_ranks_like_measuring_each_quantizer_alone(tmp_path):
    path = _model(tmp_path)
    p = prepare(path, str(tmp_path / "calib.npz"), Options(method="rtn", calib_samples=32, guard=0.0),
                log=lambda *_: None)
    feeds = data.take(p.calib, 8)
    est = guard.estimate(p.gm, p.qls, data.batches(feeds, p.names, 8))
    def run(site):  # weights float; only `site` quantized (None: nothing)
        with state.snapshot(p.qls), torch.no_grad():
            for q in p.qls:
                state.isolate(q, site[1] if site is not None and site[0] == q.layer.name else "weight")
            state.set_quant(p.qls, False, site is not None)
            return convert.torch_run(p.gm, feeds, p.names)[0].astype(np.float64)

    ref = run(None)
    exact = {k: float(((run(k) - ref) ** 2).sum() / (ref ** 2).sum()) for k in est}
    worst = max(exact, key=exact.get)
    # the outlier tensor: the pointwise conv's output quantizer, shared through the ReLU with the
    # depthwise conv's input
    assert max(est, key=est.get) == worst and worst[0].startswith(("/pw", "/dw"))
    ranked = sorted(est, key=est.get)
    assert [k for k in sorted(exact, key=exact.get)][-2:] == ranked[-2:]
    # the guard's own measurement (one forward pass per site, the outputs weighed per channel)
    # finds the same worst sites as the exact one
    got = guard.measure(p.gm, p.qls, list(data.batches(feeds, p.names, 8)), list(est))
    assert sorted(got, key=got.get)[-2:] == ranked[-2:]
    assert got[worst] > 0.01 > got[ranked[0]]


def test_choose_takes_the_worst_measured_up_to_a_quarter():
    measured = {("a", "input"): 0.001, ("b", "output"): 0.02, ("c", "input"): 0.0, ("d", "output"): 0.3}
    measured.update({(f"z{i}", "input"): 0.0 for i in range(8)})
    assert guard.choose(measured, 0.002) == [("d", "output"), ("b", "output")]
    measured.update({(f"y{i}", "input"): 1.0 for i in range(20)})  # 32 quantizers: at most 8 stay float
    assert len(guard.choose(measured, 0.002)) == 8


def test_guard_leaves_the_outlier_tensor_float(tmp_path, capsys):
    path = _model(tmp_path)
    cos = {}
    for g in ("0", "0.002"):
        rep = tmp_path / f"r{g}.json"
        assert main(["quantize", path, "--calib", str(tmp_path / "calib.npz"), "-o", str(tmp_path / f"q{g}.onnx"),
                     "--method", "rtn", "--guard", g, "--eval", str(tmp_path / "eval.npz"), "--report", str(rep)]) == 0
        r = json.loads(rep.read_text())
        cos[g] = r["validation"][0]["cosine"]
        kept = r["output_quantizers"]["kept_float"]
        assert (kept == []) == (g == "0")
    assert any(k["layer"].startswith(("/pw", "/dw")) for k in kept)
    assert "8-bit activation quantizers stay float" in capsys.readouterr().out
    assert cos["0.002"] > 0.999 > cos["0"]


class TokenNet(nn.Module):
    """Integer tokens through an embedding: no gradient reaches the first quantized input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.a, self.b = nn.Embedding(50, 16), nn.Linear(16, 32), nn.Linear(32, 5)

    def forward(self, ids):
        return self.b(torch.relu(self.a(self.emb(ids)))).mean(1)


def test_guard_measures_models_with_integer_inputs(tmp_path):
    path = str(tmp_path / "tok.onnx")
    torch.onnx.export(TokenNet(), torch.zeros(1, 12, dtype=torch.long), path, input_names=["ids"],
                      output_names=["y"], dynamic_axes={"ids": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)
    np.savez(tmp_path / "calib.npz", ids=np.random.default_rng(0).integers(0, 50, (32, 12)))
    p = prepare(path, str(tmp_path / "calib.npz"), Options(method="rtn", calib_samples=32, guard=0.0),
                log=lambda *_: None)
    est = guard.estimate(p.gm, p.qls, data.batches(data.take(p.calib, 4), p.names, 4))
    assert {part for _, part in est} >= {"input"} and all(v > 0 for v in est.values())


class PeakNet(nn.Module):
    """A conv whose largest values are what the output reads (a global max pool, as a score map's
    peak is): the searched range clips exactly those tails, the min-max range keeps them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, 1, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.amax(torch.relu(self.a(x)), dim=(2, 3)))


def test_range_choice_keeps_the_tails_the_outputs_read(tmp_path):
    path = str(tmp_path / "peak.onnx")
    torch.onnx.export(PeakNet(), torch.randn(1, 3, 16, 16), path, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)
    g = np.random.default_rng(0)
    for name, n in (("calib", 32), ("eval", 64)):  # rare spikes: the range search clips the conv's peaks
        x = g.standard_normal((n, 3, 16, 16))
        np.savez(tmp_path / f"{name}.npz", x=(x + (g.random(x.shape) < 3e-4) * 60).astype(np.float32))
    cos, moved = {}, {}
    for gd in ("0", "1"):  # 0: no guard and no range choice; 1: range choice (the guard keeps nothing float)
        rep = tmp_path / f"r{gd}.json"
        assert main(["quantize", path, "--calib", str(tmp_path / "calib.npz"), "-o", str(tmp_path / f"q{gd}.onnx"),
                     "--method", "rtn", "--guard", gd, "--eval", str(tmp_path / "eval.npz"), "--report", str(rep)]) == 0
        r = json.loads(rep.read_text())
        cos[gd], moved[gd] = r["validation"][0]["cosine"], r["output_quantizers"]["min_max_ranges"]
        assert r["output_quantizers"]["kept_float"] == []
    assert moved["0"] == [] and {"layer": "/a/Conv", "part": "output"} in moved["1"]
    assert cos["1"] > cos["0"], cos


def test_a_chosen_range_survives_re_bitting(tmp_path):
    """Mixed precision and tie_inputs rebuild quantizers from their round-to-nearest start: a range
    the guard switched to min-max must come back as min-max, not as the clipped search."""
    path = str(tmp_path / "peak.onnx")
    torch.onnx.export(PeakNet(), torch.randn(1, 3, 16, 16), path, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)
    g = np.random.default_rng(0)
    x = g.standard_normal((32, 3, 16, 16))
    np.savez(tmp_path / "calib.npz", x=(x + (g.random(x.shape) < 3e-4) * 60).astype(np.float32))
    p = prepare(path, str(tmp_path / "calib.npz"), Options(method="rtn", guard=1.0), log=lambda *_: None)
    assert {"layer": "/a/Conv", "part": "output"} in p.min_max
    q = next(q for q in p.qls if q.layer.name == "/a/Conv")
    chosen = float(q.oq.scale)
    assert chosen == pytest.approx(q.links.out_stats.hi / 255, rel=1e-6)  # min-max, not clipped
    state.set_output_bits(q, 4)
    state.set_output_bits(q, 8)
    assert float(q.oq.scale) == chosen
