import itertools
import os

import pytest
from conftest import SAMPLES
from hypothesis import given, settings
from hypothesis import strategies as st
from packptq_onnx.exporters import qdq
from packptq_onnx.solvers import ilp

from packptq_onnx import mixed
from packptq_onnx.cli import main
from packptq_onnx.mixed import MixedOptions
from packptq_onnx.pipeline import Options, quantize

MODEL, CALIB = os.path.join(SAMPLES, "digits_resnet.onnx"), os.path.join(SAMPLES, "calib.npz")


@st.composite
def instances(draw):
    groups, opts = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    cost = [[draw(st.floats(0, 100)) for _ in range(opts)] for _ in range(groups)]
    size = [[float(draw(st.integers(1, 50))) for _ in range(opts)] for _ in range(groups)]
    lo, hi = ilp.min_size(size), sum(max(s) for s in size)
    budget = draw(st.floats(lo, hi)) if hi > lo else lo
    return cost, size, budget


def brute(cost, size, budget):
    best = None
    for choice in itertools.product(*[range(len(c)) for c in cost]):
        if sum(size[p][k] for p, k in enumerate(choice)) <= budget + 1e-9:
            obj = sum(cost[p][k] for p, k in enumerate(choice))
            best = obj if best is None else min(best, obj)
    return best


@settings(max_examples=150, deadline=None)
@given(instances())
def test_ilp_equals_brute_force_and_respects_budget(inst):
    cost, size, budget = inst
    a = ilp.solve(cost, size, budget)
    assert a.size <= budget + 1e-6
    assert a.objective == pytest.approx(brute(cost, size, budget), rel=1e-6, abs=1e-6)


@settings(max_examples=20, deadline=None)
@given(instances())
def test_solvers_agree(inst):
    pytest.importorskip("highspy")
    cost, size, budget = inst
    assert ilp.solve(cost, size, budget, solver="highs").objective == pytest.approx(
        ilp.solve(cost, size, budget, solver="cbc").objective, rel=1e-6, abs=1e-6)


def test_cbc_preprocessing_case():
    cost = [[1.0, 0.0, 0.0], [2.0, 3.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    size = [[1.0, 3.0, 29.0], [1.0, 1.0, 27.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    assert ilp.solve(cost, size, 31.0, solver="cbc").objective == 1.0


def test_infeasible_budget_states_smallest_size():
    with pytest.raises(ilp.Infeasible, match="smallest possible size is 7") as exc:
        ilp.solve([[1, 2], [1, 2]], [[4, 3], [5, 4]], 6)
    assert exc.value.smallest == 7 and exc.value.limit == 6 and exc.value.what == "budget"


def test_extra_constraint_is_respected():
    cost, size = [[0, 10], [0, 10]], [[1, 1], [1, 1]]
    bops = [[100, 1], [100, 1]]
    a = ilp.solve(cost, size, 10, [(bops, 101, "BOPs")])
    assert sorted(a.choice) == [0, 1] and a.objective == 10


@pytest.mark.parametrize("text,value", [("1.2MB", 1.2e6), ("300kB", 3e5), ("5000", 5000), ("2 KiB", 2048)])
def test_parse_budget(text, value):
    assert ilp.parse_budget(text) == value


def test_mixed_precision_on_sample(tmp_path, monkeypatch):
    cache = str(tmp_path / "sens.json")
    o = Options(abits=4, method="rtn", mixed=MixedOptions(avg_wbits=4.5, cache=cache))
    r = quantize(MODEL, CALIB, str(tmp_path / "a.onnx"), o, log=lambda *_: None).to_dict()
    m = r["mixed_precision"]
    assert m["predicted_bytes"] <= m["budget_bytes"]
    assert m["counted_bytes"] == pytest.approx(m["predicted_bytes"])  # the file holds what was planned
    chosen = [m["options"][k] for k in m["choice"]]
    assert len(chosen) == len(r["packs"]) >= 1 and all(a == 4 for _, a in chosen)
    assert [p["omega_measured"] for p in r["packs"]] == [m["sensitivity"][i][k] for i, k in enumerate(m["choice"])]
    # sensitivities: more bits never cost more than fewer bits (same activation bits) for each pack
    opts = [tuple(x) for x in m["options"]]
    for row in m["sensitivity"]:
        for (w1, a1), v1 in zip(opts, row):
            for (w2, a2), v2 in zip(opts, row):
                if a1 == a2 and w1 < w2:
                    assert v1 >= v2 * 0.999
    # the annotations in the model carry the chosen bits per pack
    import onnx
    meta = qdq.read_meta(onnx.load(str(tmp_path / "a.onnx")))
    assert [p["wbits"] for p in meta["packs"]] == [[w] for w, _ in chosen]
    # re-solving at another budget reuses the measured sensitivities
    monkeypatch.setattr(mixed, "measure", lambda *a, **k: pytest.fail("measured again"))
    o2 = Options(abits=4, method="rtn", mixed=MixedOptions(avg_wbits=3.5, cache=cache))
    r2 = quantize(MODEL, CALIB, str(tmp_path / "b.onnx"), o2, log=lambda *_: None).to_dict()
    assert r2["mixed_precision"]["counted_bytes"] < m["counted_bytes"]
    # other stem/head bits change what Omega measures: the cached table is not reused
    class Measured(Exception):
        pass

    def measured(*a, **k):
        raise Measured

    monkeypatch.setattr(mixed, "measure", measured)
    o3 = Options(abits=4, method="rtn", mixed=MixedOptions(avg_wbits=4.5, fixed_bits=4, cache=cache))
    with pytest.raises(Measured):
        quantize(MODEL, CALIB, str(tmp_path / "c.onnx"), o3, log=lambda *_: None)


def test_cli_infeasible_budget(tmp_path, capsys, monkeypatch):
    from packptq_onnx import mixed
    monkeypatch.setattr(mixed, "measure", lambda *a, **k: pytest.fail("sensitivities measured before the budget check"))
    code = main(["quantize", MODEL, "--calib", CALIB, "-o", str(tmp_path / "o.onnx"), "--method", "rtn",
                 "--budget", "1kB"])
    err = capsys.readouterr().err
    assert code == 2 and "--budget is infeasible: the smallest possible is" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_cli_budget_and_avg_bits_exclusive(tmp_path, capsys):
    assert main(["quantize", MODEL, "--calib", CALIB, "-o", str(tmp_path / "o.onnx"), "--budget", "10kB",
                 "--avg-wbits", "3"]) == 2
    assert "either --budget or --avg-wbits" in capsys.readouterr().err


def test_fixed_bits_in_uniform_precision(tmp_path, capsys):
    """--fixed-bits without a mixed limit: stem and head at 8 bits (the papers' first and last layers),
    the rest at --wbits / --abits, the export still equal to the simulation."""
    def run(name, *extra):
        rep = tmp_path / f"{name}.json"
        assert main(["quantize", MODEL, "--calib", CALIB, "-o", str(tmp_path / f"{name}.onnx"), "--method", "rtn",
                     "--wbits", "4", "--abits", "4", "--report", str(rep), *extra]) == 0
        import json
        return json.loads(rep.read_text())

    plain, fixed = run("plain"), run("fixed", "--fixed-bits", "8")
    bits = {l["node"]: (l["wbits"], l["abits"]) for l in fixed["layers"]}
    # stem conv (reads the input) and classifier; the guard may leave an 8-bit input float
    assert bits["/0/Conv"][0] == bits["/8/Gemm"][0] == 8 and bits["/8/Gemm"][1] in (8, None)
    inner = [b for n, b in bits.items() if n not in ("/0/Conv", "/8/Gemm") and b[0]]
    assert inner and all(b == (4, 4) for b in inner)
    assert all(l["wbits"] in (0, 4) for l in plain["layers"])
    assert fixed["weight_bytes"]["quantized"] > plain["weight_bytes"]["quantized"]
    assert fixed["parity_layers"]["max_code_diff"] <= 1
    capsys.readouterr()
    assert main(["quantize", MODEL, "--calib", CALIB, "-o", str(tmp_path / "bad.onnx"), "--fixed-bits", "9"]) == 2
    err = capsys.readouterr().err
    assert "between 2 and 8" in err and len(err.strip().splitlines()) == 1
