"""A sweep file (TOML) as a list of quantize jobs, every one checked before any runs.

    [sweep]                 # how jobs run: cpus / gpus per job, retries, latency_runs
    [options]               # quantize options every job gets (names as in `packptq quantize --help`)
    [[model]]               # name, model, calib, eval, labels, and options of this model's jobs
    [grid]                  # option -> list of values: one job per combination, for every model
    [[job]]                 # extra single jobs: model = NAME, name = ID, and options

Paths are relative to the sweep file. `bits = "W4A4"` sets wbits and abits. Each job's options go
through quantize's own parser and checks (cli.quantize_options), so a bad value is the same
one-line error as on the command line, with the job's name in front.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import os
import re
from dataclasses import dataclass, field

from .errors import UsageError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

SWEEP_KEYS = {"cpus": (int, float), "gpus": (int, float), "retries": int, "latency_runs": int, "timeout": (int, float)}
MODEL_KEYS = ("name", "model", "calib", "eval", "labels")
DATA_KEYS = ("calib", "eval", "labels")
SET_BY_SWEEP = ("output", "report", "resume", "plot", "debug")  # each job's files are the sweep's


@dataclass
class Settings:
    cpus: float = 1.0
    gpus: float | None = None   # None: 1 for jobs with device = "cuda", else 0
    retries: int = 1
    latency_runs: int = 20      # batch-1 onnxruntime latency of float and quantized model; 0: off
    timeout: float | None = None


@dataclass
class Job:
    id: str
    model_name: str
    model: str
    calib: str
    eval: str | None
    labels: str | None
    options: dict               # option name (dashes) -> value, as written in the file
    argv: list = field(default_factory=list)  # quantize's arguments without model, -o and --report

    @property
    def key(self) -> str:
        """What the job's result depends on: its inputs (path, size, mtime) and options."""
        stamp = [self.argv] + [[p, *_stat(p)] for p in (self.model, self.calib, self.eval, self.labels) if p]
        return hashlib.sha1(json.dumps(stamp).encode()).hexdigest()[:16]

    def quantize_argv(self, output: str, report: str) -> list:
        return [self.model, "--calib", self.calib, *(["--eval", self.eval] if self.eval else []),
                *(["--labels", self.labels] if self.labels else []), *self.argv, "-o", output, "--report", report]


@dataclass
class Sweep:
    path: str
    settings: Settings
    jobs: list


def _stat(p: str) -> list:
    try:
        st = os.stat(p)
    except OSError:
        return [None, None]
    return [st.st_size, int(st.st_mtime)] if os.path.isfile(p) else [None, None]


def _where(path: str, section: str) -> str:
    return f"{os.path.basename(path)} [{section}]"


def _quantize_parser() -> argparse.ArgumentParser:
    from .cli import parser

    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["quantize"]


def _actions(qp) -> dict:
    return {s[2:]: a for a in qp._actions for s in a.option_strings if s.startswith("--")}


def _norm(key: str) -> str:
    return key.replace("_", "-")


def _check_options(opts: dict, actions: dict, where: str) -> dict:
    out = {}
    for k, v in opts.items():
        k = _norm(k)
        if k in SET_BY_SWEEP:
            raise UsageError(f"{where}: '{k}' is set by the sweep (each job writes into the sweep's folder)")
        if k != "bits" and k not in actions and k not in DATA_KEYS:
            raise UsageError(f"{where}: unknown option '{k}' (see packptq quantize --help)")
        out[k] = v
    return out


def _argv(opts: dict, actions: dict, where: str) -> list:
    argv = []
    for k, v in opts.items():
        if k in DATA_KEYS:
            continue
        if k == "bits":
            m = re.fullmatch(r"W(\d+)A(\d+)", str(v))
            if not m:
                raise UsageError(f"{where}: bits must look like W4A8, got {v!r}")
            argv += ["--wbits", m[1], "--abits", m[2]]
            continue
        act = actions[k]
        if isinstance(act, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(v, bool):
                raise UsageError(f"{where}: '{k}' is a switch: true or false, got {v!r}")
            argv += [f"--{k}"] if v else []
        elif isinstance(act, argparse._AppendAction):
            for x in v if isinstance(v, list) else [v]:
                argv += [f"--{k}", str(x)]
        else:
            text = ",".join(str(x) for x in v) if isinstance(v, list) else str(v).lower() if isinstance(v, bool) \
                else str(v)
            argv += [f"--{k}", text]
    return argv


def _job_id(model: str, values: dict) -> str:
    parts = [model] + [str(v) if k in ("bits", "method") else f"{k}{v}" for k, v in values.items()]
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join(parts))


def _resolve(base: str, p):
    if p is None:
        return None
    if not isinstance(p, str):
        raise UsageError(f"expected a path, got {p!r}")
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))


def load(path: str) -> Sweep:
    """Read and check the sweep file; every job's options are checked here, before any job runs."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"sweep file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid TOML: {str(exc).splitlines()[0]}") from None
    base = os.path.dirname(os.path.abspath(path))
    for k in doc:
        if k not in ("sweep", "options", "model", "grid", "job"):
            raise UsageError(f"{os.path.basename(path)}: unknown section or key '{k}' (sections: [sweep], "
                             "[options], [[model]], [grid], [[job]])")
    settings = _settings(doc.get("sweep", {}), path)
    qp = _quantize_parser()
    actions = _actions(qp)
    common = _check_options(_table(doc, "options", path), actions, _where(path, "options"))
    models = _models(doc, path, base, actions)
    grid = _check_options(_table(doc, "grid", path), actions, _where(path, "grid"))
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise UsageError(f"{_where(path, 'grid')}: '{k}' must be a non-empty list of values")
    combos = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())] if grid else []
    jobs = []
    for name, m in models.items():
        for values in combos or ([] if doc.get("job") else [{}]):
            jobs.append(_job(_job_id(name, values), m, {**common, **m["options"], **values}, base, path, actions, qp))
    for i, j in enumerate(doc.get("job", [])):
        where = _where(path, f"job {i + 1}")
        if not isinstance(j, dict) or j.get("model") not in models:
            raise UsageError(f"{where}: model must name a [[model]] ({', '.join(models)})")
        j = dict(j)
        m = models[j.pop("model")]
        name = j.pop("name", None)
        opts = _check_options(j, actions, where)
        jid = re.sub(r"[^A-Za-z0-9._=+-]", "_", name) if name else _job_id(m["name"], opts)
        jobs.append(_job(jid, m, {**common, **m["options"], **opts}, base, path, actions, qp))
    seen = set()
    for j in jobs:
        if j.id in seen:
            raise UsageError(f"{os.path.basename(path)}: two jobs are both called '{j.id}' (give [[job]] a name)")
        seen.add(j.id)
    if not jobs:
        raise UsageError(f"{os.path.basename(path)}: no jobs (give at least one [[model]])")
    return Sweep(os.path.abspath(path), settings, jobs)


def _table(doc: dict, key: str, path: str) -> dict:
    t = doc.get(key, {})
    if not isinstance(t, dict):
        raise UsageError(f"{os.path.basename(path)}: '{key}' must be a table [{key}]")
    return t


def _settings(t, path: str) -> Settings:
    if not isinstance(t, dict):
        raise UsageError(f"{os.path.basename(path)}: 'sweep' must be a table [sweep]")
    for k, v in t.items():
        if k not in SWEEP_KEYS:
            raise UsageError(f"{_where(path, 'sweep')}: unknown key '{k}' (known: {', '.join(SWEEP_KEYS)})")
        if not isinstance(v, SWEEP_KEYS[k]) or isinstance(v, bool) or v < 0:
            raise UsageError(f"{_where(path, 'sweep')}: '{k}' must be a non-negative number, got {v!r}")
    s = Settings(**t)
    if s.cpus <= 0:
        raise UsageError(f"{_where(path, 'sweep')}: 'cpus' must be positive")
    return s


def _models(doc: dict, path: str, base: str, actions: dict) -> dict:
    models = {}
    entries = doc.get("model", [])
    if not isinstance(entries, list):
        raise UsageError(f"{os.path.basename(path)}: models are [[model]] entries (a list of tables)")
    for i, m in enumerate(entries):
        where = _where(path, f"model {i + 1}")
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or "model" not in m or "calib" not in m:
            raise UsageError(f"{where}: needs name, model and calib")
        opts = _check_options({k: v for k, v in m.items() if k not in MODEL_KEYS}, actions, where)
        files = {k: _resolve(base, m.get(k)) for k in ("model", "calib", "eval", "labels")}
        for k, p in files.items():
            if p is not None and not os.path.exists(p):
                raise UsageError(f"{where}: {k} not found: {p}")
        if m["name"] in models:
            raise UsageError(f"{where}: a second model called '{m['name']}'")
        models[m["name"]] = {"name": m["name"], **files, "options": opts}
    if not models:
        raise UsageError(f"{os.path.basename(path)}: no [[model]] entries")
    return models


def _paths(opts: dict, base: str) -> dict:
    """Files named by options, relative to the sweep file (jobs run in a scratch folder)."""
    out = dict(opts)
    if isinstance(out.get("sensitivity-cache"), str):
        out["sensitivity-cache"] = _resolve(base, out["sensitivity-cache"])
    metric = out.get("metric")
    if isinstance(metric, str) and ".py:" in metric:
        file, _, fn = metric.rpartition(":")
        out["metric"] = f"{_resolve(base, file)}:{fn}"
    return out


def _job(jid: str, m: dict, opts: dict, base: str, path: str, actions: dict, qp) -> Job:
    """One job, its options checked by quantize's own parser and option checks."""
    from .cli import quantize_options
    from .options import check_eval

    where = f"{os.path.basename(path)}: job {jid}"
    opts = _paths(opts, base)
    data = {k: _resolve(base, opts[k]) if k in opts else m[k] for k in DATA_KEYS}
    for k in DATA_KEYS:
        if k in opts and not os.path.exists(data[k]):
            raise UsageError(f"{where}: {k} not found: {data[k]}")
    argv = _argv(opts, actions, where)
    job = Job(jid, m["name"], m["model"], data["calib"], data["eval"], data["labels"], opts, argv)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            a = qp.parse_args(job.quantize_argv("out.onnx", "out.json"))
    except SystemExit:
        msg = err.getvalue().strip().splitlines()
        raise UsageError(f"{where}: {msg[-1].split('error: ', 1)[-1] if msg else 'invalid options'}") from None
    try:
        check_eval(quantize_options(a), job.eval)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None
    return job
