"""Blocks come from graph structure: same answer for the legacy and dynamo exporters' graphs."""
import json
import math
import os

import numpy as np
import pytest
from conftest import SAMPLES
from hypothesis import given, settings
from hypothesis import strategies as st

from packptq_onnx import blocks, layers, onnx_import, packing
from packptq_onnx.cli import main
from packptq_onnx.pipeline import Options, analyse, prepare

# (stem layers, [(kind, weighted layers) per block], head layers), by construction of tests/nets.py
EXPECTED = {
    "resnet": (1, [("residual", 2), ("residual", 3), ("residual", 2)], 1),
    # an inverted residual without a skip is a plain chain: its expand conv a one-layer block, its
    # depthwise and project convs a depthwise-separable block; only the classifier is the head
    "mobilenetv2": (1, [("residual", 3), ("layer", 1), ("separable", 2), ("residual", 3), ("layer", 1),
                        ("separable", 2)], 1),
    # a network with no join at all (LCNet-like): stem conv, depthwise-separable pairs, classifier
    "chain": (1, [("separable", 2)] * 3, 1),
    # each transformer layer: attention (qkv, q.k^T, attn.v, proj) and MLP (fc1, fc2), each with its residual
    "vit": (1, [("residual", 4), ("residual", 2)] * 2, 1),
}


@pytest.mark.parametrize("dynamo", [False, True])
@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_blocks_by_construction(exported, arch, dynamo):
    if dynamo:
        pytest.importorskip("onnxscript")
    imp = onnx_import.load(exported(arch, 18 if dynamo else 17, dynamo=dynamo))
    ls = layers.find_layers(imp.model)
    u = blocks.find_blocks(imp.model, ls)
    stem, want, head = EXPECTED[arch]
    assert len(u.stem) == stem and len(u.head) == head
    joins = {l.name for l in ls if layers.is_join(l)}
    assert [(b.kind, len(set(b.layers) - joins)) for b in u.blocks] == want
    # a CNN's residual Add is an integer join inside its block; a transformer's leads to LayerNorm
    # and stays float
    want_joins = [int(kind == "residual" and arch != "vit") for kind, _ in want]
    assert [len(set(b.layers) & joins) for b in u.blocks] == want_joins
    units = u.stem + [n for b in u.blocks for n in b.layers] + u.head
    assert units == [l.name for l in ls]  # every layer in exactly one unit, in graph order
    if not dynamo and arch == "resnet":  # legacy names show the modules: block i holds blocks.i exactly
        for i, b in enumerate(u.blocks):
            assert all(f"/blocks/blocks.{i}/" in n for n in b.layers)


def _running_min_rule(s):
    starts = [i for i in range(len(s)) if i == 0 or s[i] < min(s[:i])]
    return [list(range(a, b)) for a, b in zip(starts, starts[1:] + [len(s)])]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False) | st.integers(0, 3).map(float), min_size=1, max_size=40))
def test_packing_equals_reference_rule(s):
    assert packing.pack_ranges(s) == _running_min_rule(s)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=40), st.integers(1, 6))
def test_packing_cap(s, k):
    packs = packing.pack_ranges(s, k)
    assert [b for p in packs for b in p] == list(range(len(s)))
    assert all(1 <= len(p) <= k for p in packs)
    for p in packs:  # every pack still ends where the uncapped rule allows: its start is the argmin or forced
        assert p[0] == int(np.argmin(s[: p[-1] + 1])) or len(p) == k


def test_first_block_lowest_is_one_pack():
    assert packing.pack_ranges([0.1, 5, 3, 2]) == [[0, 1, 2, 3]]
    assert packing.pack_ranges([3, 2, 1]) == [[0], [1], [2]]


def _scores(wbits, abits, seed=0):
    opts = Options(wbits=wbits, abits=abits, seed=seed, calib_samples=128)
    p = prepare(os.path.join(SAMPLES, "digits_resnet.onnx"), os.path.join(SAMPLES, "calib.npz"), opts,
                log=lambda *_: None)
    return analyse(p, opts)


def test_scores_finite_deterministic_and_grow_with_fewer_bits():
    a, b = _scores(4, 4), _scores(4, 4)
    assert [s.score for s in a.scores] == [s.score for s in b.scores]
    assert all(math.isfinite(s.score) and math.isfinite(s.sensitivity) for s in a.scores)
    assert all(s.loss > 0 and s.second > 0 for s in a.scores)
    hi = _scores(8, 8)
    lo = _scores(2, 2)
    for h, m, low in zip(hi.scores, a.scores, lo.scores):
        assert h.loss < m.loss < low.loss  # quantizing a block harder costs more
        assert h.sensitivity < low.sensitivity


def test_inspect_json_packs(tmp_path, capsys):
    png = tmp_path / "p.png"
    model, calib = os.path.join(SAMPLES, "digits_resnet.onnx"), os.path.join(SAMPLES, "calib.npz")
    assert main(["inspect", model, "--calib", calib, "--json", "--plot", str(png), "--max-pack-blocks", "1"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [b["pack"] for b in d["blocks"]] == [0, 1, 2]  # a cap of 1 block per pack
    assert [p["blocks"] for p in d["packs"]] == [["block0"], ["block1"], ["block2"]]
    assert all(set(b) >= {"name", "layers", "score", "sensitivity", "pack"} for b in d["blocks"])
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("act,joins", [("relu", 1), ("silu", 0)])
def test_joins_only_between_quantized_layers(tmp_path, act, joins):
    """A residual Add whose inputs come from convs (through a ReLU) is an integer join; one fed by
    float work (SiLU = Sigmoid * x, as in YOLOv8) is not: the float op runs between DQ and Q
    either way, and quantizing the skip path only costs accuracy."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.c3 = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))
            self.f = nn.ReLU() if act == "relu" else nn.SiLU()

        def forward(self, x):
            x = self.f(self.c1(x))
            return self.c3(x + self.f(self.c2(x)))

    path = str(tmp_path / f"{act}.onnx")
    torch.onnx.export(Net().eval(), (torch.randn(1, 4, 8, 8),), path, opset_version=17, dynamo=False)
    ls = layers.find_layers(onnx_import.load(path).model)
    assert sum(layers.is_join(l) for l in ls) == joins and len(ls) == 3 + joins
