"""packptq sweep: a sweep file's jobs on a local Ray cluster (or processes) give the same reports as
separate quantize runs; a killed worker is retried; a rerun does no work; bad files fail first."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import SAMPLES
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from packptq_onnx import cli, engine

needs_ray = pytest.mark.skipif(not engine.have_ray(), reason="the [ray] extra is not installed")

# what a report holds that depends on the machine's load or on file names, not on the computation
SAME = ("layers", "weight_bytes", "parity", "parity_layers", "validation", "task", "packs", "file_bytes")


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, exported):
    """Two models (the bundled sample and a small chain net) x two configs (W8A8 rtn, W4A4 pack)."""
    import nets

    d = tmp_path_factory.mktemp("sweep")
    chain = exported("chain")
    net = nets.build("chain")
    np.savez(d / "chain_calib.npz", x=nets.inputs(net, 32, seed=1)["x"])
    np.savez(d / "chain_eval.npz", x=nets.inputs(net, 16, seed=2)["x"])
    (d / "sweep.toml").write_text(f"""
[sweep]
cpus = 1
retries = 2
latency_runs = 3

[options]
iters = 12
seed = 3

[[model]]
name = "digits"
model = "{SAMPLES}/digits_resnet.onnx"
calib = "{SAMPLES}/calib.npz"
eval = "{SAMPLES}/eval.npz"

[[model]]
name = "chain"
model = "{chain}"
calib = "chain_calib.npz"
eval = "chain_eval.npz"

[[job]]
model = "digits"
name = "digits-w8a8-rtn"
bits = "W8A8"
method = "rtn"

[[job]]
model = "digits"
name = "digits-w4a4-pack"
bits = "W4A4"
method = "pack"

[[job]]
model = "chain"
name = "chain-w8a8-rtn"
bits = "W8A8"
method = "rtn"

[[job]]
model = "chain"
name = "chain-w4a4-pack"
bits = "W4A4"
method = "pack"
""")
    return d


def _decoy(tmp_path, monkeypatch):
    """Run from a folder holding a packptq_onnx that cannot import, as a source checkout's does for a
    non-editable install (it lacks exporters/): workers must not import it from the working folder."""
    decoy = tmp_path / "cwd"
    (decoy / "packptq_onnx").mkdir(parents=True)
    (decoy / "packptq_onnx" / "__init__.py").write_text("raise ImportError('the working folder was imported')\n")
    monkeypatch.chdir(decoy)


def _separate(sweep_dir, out):
    """The four jobs as separate quantize runs in this process, at the workers' one thread."""
    from packptq_onnx.sweepfile import load

    sw = load(str(sweep_dir / "sweep.toml"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for j in sw.jobs:
            os.makedirs(out / j.id, exist_ok=True)
            argv = j.quantize_argv(str(out / j.id / "model.onnx"), str(out / j.id / "report.json"))
            assert cli.main(["quantize", *argv]) == 0
    finally:
        torch.set_num_threads(threads)
    return [j.id for j in sw.jobs]


def _same(a_dir, b_dir):
    with open(a_dir / "report.json") as f, open(b_dir / "report.json") as g:
        a, b = json.load(f), json.load(g)
    for k in SAME:
        assert a.get(k) == b.get(k), k
    wa = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(a_dir / "model.onnx")).graph.initializer}
    wb = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(b_dir / "model.onnx")).graph.initializer}
    assert wa.keys() == wb.keys()
    for n in wa:
        np.testing.assert_array_equal(wa[n], wb[n], err_msg=n)


@needs_ray
def test_ray_sweep_survives_a_killed_worker_equals_separate_runs_and_resumes(sweep_dir, tmp_path, monkeypatch,
                                                                           capsys):
    out = tmp_path / "out"
    monkeypatch.setenv(engine.CRASH_ONCE, str(tmp_path))  # the first job to start exits its worker process
    _decoy(tmp_path, monkeypatch)
    assert cli.main(["sweep", str(sweep_dir / "sweep.toml"), "-o", str(out), "--workers", "2"]) == 0
    assert (tmp_path / "crashed").exists()  # a worker did die, and the sweep still finished every job
    results = json.loads((out / "results.json").read_text())["jobs"]
    assert [r["status"] for r in results] == ["ok"] * 4
    assert len({r["worker_pid"] for r in results}) == 4  # a fresh worker process per job
    assert (out / "results.md").exists() and (out / "digits.png").exists() and (out / "chain.png").exists()
    md = (out / "results.md").read_text()
    assert "| digits-w4a4-pack | pack | W4A4 |" in md and "## chain" in md
    ids = _separate(sweep_dir, tmp_path / "alone")
    for jid in ids:
        _same(out / "jobs" / jid, tmp_path / "alone" / jid)
    # the same sweep again does no work: every result is the stored one
    capsys.readouterr()
    before = {p: os.path.getmtime(out / "jobs" / p / "model.onnx") for p in ids}
    assert cli.main(["sweep", str(sweep_dir / "sweep.toml"), "-o", str(out)]) == 0
    log = capsys.readouterr().out
    assert log.count("(cached)") == 4 and "Ray cluster" not in log
    assert before == {p: os.path.getmtime(out / "jobs" / p / "model.onnx") for p in ids}


def test_process_backend_retries_a_dead_process_and_keeps_failures(sweep_dir, tmp_path, monkeypatch, capsys):
    """Without Ray (--no-ray, or Ray not installed): one process per job, the same retry rule; a job
    that fails is recorded and the sweep goes on (exit 1); the failure is kept on a rerun."""
    text = (sweep_dir / "sweep.toml").read_text().replace('bits = "W4A4"\nmethod = "pack"',
                                                          'bits = "W4A4"\nmethod = "pack"\nbatch_size = 4096')
    (tmp_path / "s.toml").write_text(text.replace('calib = "chain_calib.npz"', f'calib = "{sweep_dir}/chain_calib.npz"')
                                     .replace('eval = "chain_eval.npz"', f'eval = "{sweep_dir}/chain_eval.npz"'))
    monkeypatch.setenv(engine.CRASH_ONCE, str(tmp_path))
    _decoy(tmp_path, monkeypatch)
    out = tmp_path / "out"
    assert cli.main(["sweep", str(tmp_path / "s.toml"), "-o", str(out), "--no-ray"]) == 1
    assert (tmp_path / "crashed").exists()
    res = {r["id"]: r for r in json.loads((out / "results.json").read_text())["jobs"]}
    assert res["digits-w8a8-rtn"]["status"] == res["chain-w8a8-rtn"]["status"] == "ok"
    for jid in ("digits-w4a4-pack", "chain-w4a4-pack"):  # fewer calibration samples than one batch
        assert res[jid]["status"] == "failed" and res[jid]["exit_code"] == 2
        assert "UsageError" in res[jid]["error"] and "--batch-size" in res[jid]["error"]
    assert "failed: UsageError" in (out / "results.md").read_text()
    capsys.readouterr()
    monkeypatch.setattr(engine, "have_ray", lambda: False)  # as without the [ray] extra
    assert cli.main(["sweep", str(tmp_path / "s.toml"), "-o", str(out)]) == 1
    log = capsys.readouterr().out
    assert log.count("(cached)") == 4 and "Ray is not installed" in log and "pip install" in log
    assert cli.main(["sweep", str(tmp_path / "s.toml"), "-o", str(out), "--address", "auto"]) == 2
    assert "Ray is not installed" in capsys.readouterr().err


BAD = {
    "unknown section": ("[sweeps]\ncpus = 1\n", "unknown section or key 'sweeps'"),
    "unknown sweep key": ("[sweep]\nworkers = 2\n", "unknown key 'workers'"),
    "unknown option": ("[options]\nwbit = 4\n", "unknown option 'wbit'"),
    "option set by the sweep": ("[options]\noutput = 'x.onnx'\n", "'output' is set by the sweep"),
    "bad bits": ("[grid]\nbits = ['W4']\n", "bits must look like W4A8"),
    "bad value": ("[grid]\nwbits = [4, 9]\n", "job digits-wbits9: --wbits must be between 2 and 8, got 9"),
    "bad choice": ("[options]\nmethod = 'brecq'\n", "argument --method: invalid choice: 'brecq'"),
    "bad type": ("[options]\niters = 'many'\n", "argument --iters: invalid int value: 'many'"),
    "grid not a list": ("[grid]\nmethod = 'rtn'\n", "'method' must be a non-empty list"),
    "target without eval": ("[options]\nmax_drop = 0.01\n", "measured on held-out data"),
    "not toml": ("[options\n", "not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sweep_file_is_one_line_exit_2_before_any_job(tmp_path, capsys, case):
    extra, msg = BAD[case]
    model = "" if case == "target without eval" else "eval = 'eval.npz'\n"
    shutil.copy(os.path.join(SAMPLES, "digits_resnet.onnx"), tmp_path)
    shutil.copy(os.path.join(SAMPLES, "calib.npz"), tmp_path)
    shutil.copy(os.path.join(SAMPLES, "eval.npz"), tmp_path)
    head = "" if case == "not toml" else \
        f"[[model]]\nname = 'digits'\nmodel = 'digits_resnet.onnx'\ncalib = 'calib.npz'\n{model}\n"
    (tmp_path / "s.toml").write_text(head + extra)
    assert cli.main(["sweep", str(tmp_path / "s.toml"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err, err
    assert not (tmp_path / "out").exists()


def test_missing_model_and_data_are_named(tmp_path, capsys):
    (tmp_path / "s.toml").write_text("[[model]]\nname = 'm'\nmodel = 'nope.onnx'\ncalib = 'c.npz'\n")
    assert cli.main(["sweep", str(tmp_path / "s.toml"), "-o", str(tmp_path / "out")]) == 2
    assert "model not found: " in capsys.readouterr().err
    assert cli.main(["sweep", str(tmp_path / "none.toml"), "-o", str(tmp_path / "out")]) == 2
    assert "sweep file not found" in capsys.readouterr().err


@needs_ray
@pytest.mark.skipif(shutil.which("ray") is None, reason="the ray command is not on PATH")
def test_two_node_cluster_on_one_machine(sweep_dir, tmp_path):
    """A head node and a second node joined with `ray start --address`, both on 127.0.0.1, as on a
    real cluster; `packptq sweep --address` sends jobs to both (two 1-CPU nodes, jobs of 1 CPU)."""
    port = "6391"
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    start = [["ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", port, "--num-cpus", "1",
              "--include-dashboard", "false", "--disable-usage-stats"],
             ["ray", "start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
              "--disable-usage-stats"]]
    try:
        for cmd in start:
            subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
        out = tmp_path / "out"
        p = subprocess.run([sys.executable, "-m", "packptq_onnx.cli", "sweep", str(sweep_dir / "sweep.toml"), "-o",
                            str(out), "--address", f"127.0.0.1:{port}"], env=env, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        assert "2 CPUs on 2 node(s)" in p.stdout
        results = json.loads((out / "results.json").read_text())["jobs"]
        assert [r["status"] for r in results] == ["ok"] * 4
        assert len({r["worker_node"] for r in results}) == 2
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


@needs_ray
def test_sensitivity_on_ray_workers_equals_the_sequential_table(tmp_path, capsys):
    """quantize --workers 2: the mixed-precision table measured as Ray tasks (contiguous chunks of
    packs) is the sequential one, number for number, and so is the allocation."""
    args = [os.path.join(SAMPLES, "digits_resnet.onnx"), "--calib", os.path.join(SAMPLES, "calib.npz"),
            "--method", "rtn", "--avg-wbits", "4.5", "--max-pack-blocks", "1", "--abits", "8"]
    assert cli.main(["quantize", *args, "-o", str(tmp_path / "a.onnx"), "--report", str(tmp_path / "a.json")]) == 0
    assert cli.main(["quantize", *args, "-o", str(tmp_path / "b.onnx"), "--report", str(tmp_path / "b.json"),
                     "--workers", "2"]) == 0
    assert "in 2 Ray tasks" in capsys.readouterr().err  # progress on stderr: stdout stays the output
    a, b = (json.loads((tmp_path / f"{x}.json").read_text())["mixed_precision"] for x in "ab")
    assert len(a["sensitivity"]) >= 3 and a["sensitivity"] == b["sensitivity"] and a["choice"] == b["choice"]


def test_workers_without_ray_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(engine, "have_ray", lambda: False)
    argv = ["quantize", os.path.join(SAMPLES, "digits_resnet.onnx"), "--calib", os.path.join(SAMPLES, "calib.npz"),
            "--avg-wbits", "4", "-o", str(tmp_path / "x.onnx"), "--workers", "2"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "which is not installed" in err
    assert not (tmp_path / "x.onnx").exists()


def test_workers_without_a_sensitivity_measurement_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """--workers only spreads the sensitivity items: without a limit, a target or --sensitivity it
    would do nothing, so it is refused before any work."""
    monkeypatch.setattr(engine, "have_ray", lambda: True)
    model, calib = os.path.join(SAMPLES, "digits_resnet.onnx"), os.path.join(SAMPLES, "calib.npz")
    assert cli.main(["quantize", model, "--calib", calib, "-o", str(tmp_path / "x.onnx"), "--workers", "2"]) == 2
    assert "spread the mixed-precision sensitivity measurement" in capsys.readouterr().err
    assert cli.main(["inspect", model, "--calib", calib, "--workers", "2"]) == 2
    assert "give --sensitivity" in capsys.readouterr().err


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(0, 6)), min_size=1, max_size=12))
def test_front_is_monotone_and_dominates_the_rest(points):
    """The results table's front: along rising weight bytes the metric strictly rises (jobs with equal
    figures are on it together), and every job off it has one on it with no more bytes and no lower
    metric."""
    from packptq_onnx.exporters.sweep_table import front

    rows = [{"status": "ok", "weight_bytes": b, "metric": m / 6} for b, m in points]
    on = sorted(front(rows), key=lambda r: r["weight_bytes"])
    pts = sorted({(r["weight_bytes"], r["metric"]) for r in on})  # equal jobs are on it together
    assert pts and all(a[0] < b[0] and a[1] < b[1] for a, b in zip(pts, pts[1:]))
    for r in rows:
        assert any(f["weight_bytes"] <= r["weight_bytes"] and f["metric"] >= r["metric"] for f in on)
