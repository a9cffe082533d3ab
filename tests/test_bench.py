"""Smoke test of the benchmark harness (bench/run.py) on the bundled sample, tiny config."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from packptq_onnx.parity import FAR_FROM_SIMULATION

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "bench", "run.py")
ROWS = ["float", "ort-minmax-u8-W8A8", "rtn-W4A4", "pack-W4A4"]


def float_accuracy() -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(os.path.join(ROOT, "samples", "digits_resnet.onnx"),
                                providers=["CPUExecutionProvider"])
    with np.load(os.path.join(ROOT, "samples", "eval.npz")) as z:
        x, labels = z["image"], z["labels"]
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return float((logits.argmax(1) == labels).mean())


def parse_table(md: str, section: str) -> dict:
    """{row name: {column: cell}} of the first markdown table after the '## section' heading."""
    lines = md[md.index(f"## {section}"):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| row |"))
    head = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(head, cells))
    return rows


def num(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("x"))


def harness(tmp_path, *extra):
    cmd = [sys.executable, RUN, "--out", str(tmp_path / "out"), "--results", str(tmp_path), "--models", "sample",
           "--rows", ",".join(ROWS), "--calib-samples", "16", "--iters-total", "16", "--latency-runs", "3", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    p = harness(tmp)
    assert p.returncode == 0, p.stdout + p.stderr
    return tmp, p


def test_results_table(bench_run):
    tmp, _ = bench_run
    md = (tmp / "RESULTS.md").read_text()
    assert "Command: `python" in md and "onnxruntime" in md and "torch" in md
    rows = parse_table(md, "sample")
    assert list(rows) == ROWS
    for name, r in rows.items():
        assert "failed" not in r["accuracy"], (name, r)
    # float accuracy is the sample's, computed here independently
    assert num(rows["float"]["accuracy"]) == pytest.approx(float_accuracy(), abs=1e-4)
    assert num(rows["float"]["top1_agreement"]) == 1.0 and num(rows["float"]["speed-up"]) == 1.0
    for name in ROWS[1:]:
        acc, agree = num(rows[name]["accuracy"]), num(rows[name]["top1_agreement"])
        assert 0.8 <= acc <= 1.0 and 0.8 <= agree <= 1.0, (name, acc, agree)
        assert 0.9 <= num(rows[name]["cosine to float"]) <= 1.0 + 1e-6
        assert num(rows[name]["quantize s"]) > 0 and num(rows[name]["peak RSS MB"]) > 50
        assert num(rows[name]["latency ms"]) > 0
    # weight bytes: float 4 B/weight, W8 1 B, W4 half a byte, over the same layers
    wb = {n: num(r["weight bytes"]) for n, r in rows.items()}
    assert wb["float"] == 4 * wb["ort-minmax-u8-W8A8"] == 8 * wb["rtn-W4A4"] == 8 * wb["pack-W4A4"]
    assert rows["rtn-W4A4"]["parity"].startswith("ok")
    # pack: every layer within one code of onnxruntime when fed onnxruntime's own input (the proof); on the
    # whole output a flip at a rounding tie may grow (validate.Parity). Measured at round weight 300: a
    # float32 near-tie flip in /4/conv1/Conv (onnxruntime there equals an exact float64 reference on all
    # 276480 values) left 1.25% of the logits two codes apart; 0 at round weight 100
    pack = json.loads(next((tmp / "out" / "sample").glob("full-*/pack-W4A4.json")).read_text())
    assert pack["parity_layers"] <= 1 and pack["parity_over_one"] < FAR_FROM_SIMULATION, pack
    assert (tmp / "bench_sample.png").stat().st_size > 1000


def test_rows_cached_as_json_and_rerun_skips(bench_run):
    tmp, _ = bench_run
    tag_dirs = [d for d in (tmp / "out" / "sample").iterdir() if d.is_dir() and d.name.startswith("full-")]
    assert len(tag_dirs) == 1
    res = json.loads((tag_dirs[0] / "pack-W4A4.json").read_text())
    assert res["status"] == "ok" and res["recon_iters"] >= 4  # 16 iterations split over the units (>= 1 each)
    assert res["config"]["iters_total"] == 16 and res["config"]["calib_samples"] == 16
    p = harness(tmp)  # same command: every row comes from the cache
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("cached (ok)") == len(ROWS) and "running" not in p.stdout


def test_failed_row_is_recorded(tmp_path):
    """A row whose worker fails is recorded with a one-line error and the run's config, and the run goes on."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import run
    finally:
        sys.path.pop(0)
    from packptq_onnx.engine import Engine

    a = type("A", (), {"cpus_per_row": 1.0, "device": "cpu"})()
    result = tmp_path / "r.json"
    c = run.call("row", "float", {"task": "sample", "row": "float", "out": str(tmp_path / "missing"), "cfg": {}},
                 str(result), str(tmp_path / "r.log"), a)
    with Engine("process") as engine:
        res = run.spawn(engine, c, cfg={"tag": "t"})
    assert res["status"] == "failed" and res["error"].startswith("FileNotFoundError")
    assert "\n" not in res["error"] and res["config"] == {"tag": "t"} and res["wall_seconds"] > 0
    assert json.loads(result.read_text())["status"] == "failed"
    assert "Traceback" in (tmp_path / "r.log").read_text()  # the whole story is in the row's log


def test_checks_read_off_the_rows():
    """RESULTS.md's 'Read off the rows' lines: the method ordering per bit width, mixed vs uniform and
    ours vs onnxruntime, with CER counted lower-is-better."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        from report import checks
        from tasks import TASKS
    finally:
        sys.path.pop(0)

    def row(line_acc, cer, cosine=0.9):
        return {"status": "ok", "scores": {"line_acc": line_acc, "cer": cer}, "cosine": cosine}

    rows = {"ort-minmax-u8-W4A4": row(0.30, 0.20), "rtn-W4A4": row(0.10, 0.50, 0.5),
            "adaround-W4A4": row(0.20, 0.40, 0.6), "block-W4A4": row(0.40, 0.30, 0.7),
            "pack-W4A4": row(0.40, 0.25, 0.8), "pack-mixed-W4": row(0.45, 0.30),
            "rtn-W4A8": row(0.5, 0.1), "adaround-W4A8": row(0.5, 0.1), "block-W4A8": row(0.6, 0.1),
            "pack-W4A8": {"status": "failed", "error": "x"}}
    lines = checks(TASKS["rec"], {"rows": rows})
    text = "\n".join(lines)
    assert "- W4A4, line_acc: rtn 0.1000, adaround 0.2000, block 0.4000, pack 0.4000: " \
           "pack ≥ block > adaround > rtn holds" in text
    assert "- W4A4, cer: rtn 0.5000, adaround 0.4000, block 0.3000, pack 0.2500: " \
           "pack ≥ block > adaround > rtn holds" in text
    assert "- W4A4, cosine: " in text
    assert not any(x.startswith("- W4A8") and "pack ≥" in x for x in lines)  # pack-W4A8 failed: no ordering
    assert "- pack-mixed-W4 beats pack-W4A4 on line_acc: 0.4500 vs 0.4000" in text
    assert "- pack-mixed-W4 loses to pack-W4A4 on cer: 0.3000 vs 0.2500" in text
    assert "best of ours (block-W4A4 0.4000) is ahead of the best onnxruntime row (ort-minmax-u8-W4A4 0.3000)" in text
    assert "- W4A4, cer: best of ours (pack-W4A4 0.2500) is behind" in text
    rows["adaround-W4A4"] = row(0.05, 0.6)  # below rtn now
    text = "\n".join(checks(TASKS["rec"], {"rows": rows}))
    assert "pack 0.4000: pack ≥ block > adaround > rtn does not hold" in text


def test_convergence_table_from_cached_rows(tmp_path):
    """bench/converge.py runs bench/run.py rows at two budgets and tables each cached row's metric."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", "converge.py"), "--out", str(tmp_path / "out"),
           "--results", str(tmp_path), "--models", "sample", "--iters", "8,24", "--samples", "16",
           "--bits", "W4A4", "--methods", "rtn,pack"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = {}
    for d, _, files in os.walk(tmp_path / "out" / "sample"):
        for f in files:
            if f.endswith(".json") and f.startswith(("pack-", "rtn-")):
                r = json.loads(open(os.path.join(d, f)).read())
                rows[(r["method"], r["config"]["iters_total"])] = r["scores"]["accuracy"]
    assert set(rows) == {("rtn", 8), ("pack", 8), ("pack", 24)}
    md = (tmp_path / "CONVERGENCE.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| pack | 16 |"))
    cells = [c.strip().split(" ")[0] for c in line.strip("|").split("|")[2:]]
    assert [float(c) for c in cells] == [round(rows[("pack", 8)], 4), round(rows[("pack", 24)], 4)]
    assert (tmp_path / "converge_sample.png").stat().st_size > 0


def test_pack_cap_table_from_cached_rows(tmp_path):
    """bench/pack_cap.py runs block, pack-cap{2,4,8}, pack-nocap and pack (the default cap) at one
    budget and tables them: packs of a capped row hold at most K blocks, and every cell is its cached
    row's figure."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", "pack_cap.py"), "--out", str(tmp_path / "out"),
           "--results", str(tmp_path), "--models", "sample", "--iters-total", "8", "--samples", "16",
           "--bits", "W4A4"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = {}
    for d, _, files in os.walk(tmp_path / "out" / "sample"):
        for f in files:
            if f.endswith("-W4A4.json"):
                r = json.loads(open(os.path.join(d, f)).read())
                rows[r["method"]] = r
    assert set(rows) == {"block", "pack-cap2", "pack-cap4", "pack-cap8", "pack-nocap", "pack"}
    for k in (2, 4, 8):
        assert max(rows[f"pack-cap{k}"]["pack_blocks"]) <= k
    assert rows["pack"]["pack_blocks"] == rows["pack-cap4"]["pack_blocks"]  # the default: at most 4 blocks
    assert sum(rows["pack-nocap"]["pack_blocks"]) == sum(rows["pack-cap2"]["pack_blocks"])  # the same blocks
    md = (tmp_path / "PACK_CAP.md").read_text()
    for m, r in rows.items():
        line = next(x for x in md.splitlines() if x.startswith(f"| {m} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[3]) == round(r["scores"]["accuracy"], 4)
        assert float(cells[7]) == round(max(r["recon_cache_mb"]))


def test_transformer_table_bootstrap_against_brute_force():
    """bench/transformer_table.py: the paired bootstrap's Spearman differences equal scipy's on each
    resample, a row compared with itself differs by exactly 0, and a clearly better row's interval
    lies above 0."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import transformer_table as tb
    finally:
        sys.path.pop(0)
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    human = rng.normal(size=300)
    good, bad = human + 0.3 * rng.normal(size=300), human + 2.0 * rng.normal(size=300)
    idx = rng.integers(300, size=(5, 300))
    d = tb.spearman_boot(good, bad, human, idx)
    want = [spearmanr(good[i], human[i])[0] - spearmanr(bad[i], human[i])[0] for i in idx]
    assert np.allclose(d, want)
    items = {"_human": {"b": human}, "pack-W4A4": {"b": bad}, "pack-focus-W4A4": {"b": good}}
    va, vb, diff, lo, hi = tb.compare(items, "pack-W4A4", "pack-focus-W4A4")["b"]
    assert va == spearmanr(good, human)[0] and vb == spearmanr(bad, human)[0] and 0 < lo <= diff <= hi
    assert tb.compare(items, "pack-W4A4", "pack-W4A4")["b"][2:] == (0.0, 0.0, 0.0)
    acc = {"pack-W3A3": {"accuracy": (rng.random(500) < 0.6).astype(float)},
           "pack-lrauto-W3A3": {"accuracy": (rng.random(500) < 0.9).astype(float)}}
    va, vb, diff, lo, hi = tb.compare(acc, "pack-W3A3", "pack-lrauto-W3A3")["accuracy"]
    assert va == acc["pack-lrauto-W3A3"]["accuracy"].mean() and 0.1 < lo <= diff <= hi < 0.5
