"""Benchmark harness: every model x every method, one command, resumable.

    python bench/run.py --out bench/out [--models sample,cls,rec,effnet,minilm] [--rows PATTERNS] [--quick]

For each model (a *task* in TASKS below) it builds the model and its calibration / evaluation
data once, then runs each row (float, onnxruntime's quantize_static variants, our rtn / adaround /
block / pack at W8A8 .. W3A3, pack + mixed precision) in its own subprocess. A row's result is
cached as JSON under OUT/<task>/<config>/<row>.json, so a rerun skips finished rows (failed rows
too, unless --retry-failed). At the end it writes RESULTS.md and one PNG per model (metric vs
weight bytes per method) into --results (default: bench/).

Per row: the task's metrics on the evaluation data (disjoint from the calibration data), cosine
and argmax agreement to the float model's outputs, weight bytes of the quantizable layers (Conv /
ConvTranspose / Gemm / MatMul weights) at their stored bit width, quantization wall time, peak RSS
of the row's process at the end of quantization, onnxruntime latency (batch 1, 1 thread, median
of --latency-runs) and the speed-up over the float model measured in the same process.

--rows takes names or shell patterns, e.g. --rows 'float,ort-minmax-u8-W8A8,pack-*'.
--list prints the rows. --quick uses fewer calibration samples and reconstruction iterations.
Reconstruction rows (adaround, block, pack) get the same total number of iterations
(ReconOptions.iters_total), spread over their units by weight count, so they do equal work.
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import importlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SAMPLES = os.path.join(ROOT, "samples")
if HERE not in sys.path:
    sys.path.insert(0, HERE)

BITS = ((8, 8), (4, 8), (4, 4), (3, 3))
OURS = ("rtn", "adaround", "block", "pack")


# ---- rows --------------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    kind: str                  # float | ort | ours
    method: str                # plot series: float, ort-minmax-u8, rtn, pack, pack-mixed, ...
    wbits: int = 32
    abits: int = 32
    calibrate: str = "MinMax"  # ort: MinMax | Percentile | Entropy
    act: str = "u8"            # ort: u8 | s8
    reduce_range: bool = False  # ort
    mixed: bool = False        # ours: pack + mixed precision at the weight bytes of uniform W{wbits}

    @property
    def bits(self) -> str:
        if self.kind == "float":
            return "fp32"
        return f"≤W{self.wbits} budget, A≤{self.abits}" if self.mixed else f"W{self.wbits}A{self.abits}"


def all_rows() -> list[Row]:
    rows = [Row("float", "float", "float")]
    for cal, act, rr in (("MinMax", "u8", False), ("MinMax", "s8", False), ("MinMax", "u8", True),
                         ("Percentile", "u8", False), ("Entropy", "u8", False)):
        m = f"ort-{cal.lower()}-{act}" + ("-rr" if rr else "")
        rows.append(Row(f"{m}-W8A8", "ort", m, 8, 8, cal, act, rr))
    for w, a in ((4, 8), (4, 4)):
        rows.append(Row(f"ort-minmax-u8-W{w}A{a}", "ort", "ort-minmax-u8", w, a, "MinMax", "u8"))
    for m in OURS:
        for w, a in BITS:
            rows.append(Row(f"{m}-W{w}A{a}", "ours", m, w, a))
    for w in (4, 3):
        rows.append(Row(f"pack-mixed-W{w}", "ours", "pack-mixed", w, w, mixed=True))
    return rows


ROWS = {r.name: r for r in all_rows()}


def select_rows(patterns: str | None, allowed) -> list[Row]:
    names = [n for n in ROWS if allowed is None or n in allowed]
    if not patterns:
        return [ROWS[n] for n in names]
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    for p in pats:
        if not any(fnmatch.fnmatchcase(n, p) for n in ROWS):
            raise SystemExit(f"--rows: {p!r} matches no row (see --list)")
    return [ROWS[n] for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]


# ---- tasks -------------------------------------------------------------------------------------
@dataclass
class Task:
    """One model: how to build it and its data, how to score outputs, which rows apply.

    build(work_dir, models_dir, cfg) -> dict with 'model', 'calib', 'eval' (paths to .onnx / .npz)
    and optionally 'labels' (path to a labels file; otherwise 'labels' inside eval.npz) and any
    JSON-able extras. score(outputs, float_outputs, labels, info) -> {metric: value}.
    module: the bench module it needs (None: none); a task whose module is missing is 'not built yet'.
    """
    name: str
    title: str
    build: callable
    score: callable
    metrics: tuple              # metrics plotted against weight bytes (first score key if none present)
    calib_samples: tuple        # (full, quick)
    iters_total: tuple          # (full, quick): total reconstruction iterations per model
    eval_samples: tuple = (None, None)  # (full, quick): evaluate on the first N samples (None: all)
    module: str | None = None
    needs: tuple = ()           # functions the module must define
    rows: tuple | None = None   # row names that apply (None: all)
    batch_size: int = 32        # quantize / reconstruction batch size
    needs_models: tuple = ()    # functions bench/models.py must define
    argmax: bool = True         # outputs are scores: report argmax agreement with float
    ort_op_types: tuple | None = None  # op_types_to_quantize for onnxruntime (None: its default, all)
    notes: str = ""

    def missing(self) -> str | None:
        if self.module is None:
            return None
        try:
            mod = importlib.import_module(self.module)
        except ImportError as exc:
            return f"bench/{self.module}.py is not available yet ({exc})"
        absent = [f"bench/{self.module}.py: {f}" for f in self.needs if not hasattr(mod, f)]
        if self.needs_models:
            import models
            absent += [f"bench/models.py: {f}" for f in self.needs_models if not hasattr(models, f)]
        return f"missing {', '.join(absent)}" if absent else None


def softmax(x, axis=-1):
    x = x.astype(np.float64)
    x = x - x.max(axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis, keepdims=True)


def classifier_scores(logits, float_logits, labels) -> dict:
    p, q = softmax(float_logits), softmax(logits)
    kl = float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), -1)))
    out = {}
    if labels is not None:
        out["accuracy"] = float((logits.argmax(-1) == np.asarray(labels)).mean())
    out["top1_agreement"] = float((logits.argmax(-1) == float_logits.argmax(-1)).mean())
    out["kl"] = kl
    return out


# sample ------------------------------------------------------------------------------------------
def build_sample(work, models_dir, cfg) -> dict:
    return {"model": os.path.join(SAMPLES, "digits_resnet.onnx"), "calib": os.path.join(SAMPLES, "calib.npz"),
            "eval": os.path.join(SAMPLES, "eval.npz")}


def score_sample(outputs, float_outputs, labels, info) -> dict:
    return classifier_scores(outputs[0], float_outputs[0], labels)


# text lines (bench/text_lines.py) ------------------------------------------------------------------
def build_cls(work, models_dir, cfg) -> dict:
    import models
    import text_lines
    models.build_ocr(models_dir)
    d = dict(text_lines.make_cls(work, n_calib=cfg["n_calib"], n_eval=cfg["n_eval"], seed=cfg["seed"]))
    d.setdefault("model", os.path.join(models_dir, models.OCR_MODELS[0]))
    return d


def score_cls(outputs, float_outputs, labels, info) -> dict:
    import text_lines
    out = dict(text_lines.cls_metrics(outputs[0], labels))
    out.update({k: v for k, v in classifier_scores(outputs[0], float_outputs[0], None).items() if k not in out})
    return out


def build_rec(work, models_dir, cfg) -> dict:
    import models
    import text_lines
    models.build_ocr(models_dir)
    d = dict(text_lines.make_rec(work, n_calib=cfg["n_calib"], n_eval=cfg["n_eval"], seed=cfg["seed"]))
    d.setdefault("model", os.path.join(models_dir, models.OCR_MODELS[1]))
    d["keys"] = os.path.join(models_dir, models.REC_KEYS)
    return d


def score_rec(outputs, float_outputs, labels, info) -> dict:
    import text_lines
    out = dict(text_lines.rec_metrics(outputs[0], labels, info["keys"]))
    q, f = text_lines.ctc_greedy(outputs[0], info["keys"]), text_lines.ctc_greedy(float_outputs[0], info["keys"])
    out["line_agree"] = float(np.mean([a == b for a, b in zip(q, f)]))  # decoded line equals the float one
    return out


# EfficientNet-Lite0 (bench/photos.py) -------------------------------------------------------------
def build_effnet(work, models_dir, cfg) -> dict:
    import models
    import photos
    models.build_efficientnet_lite0(models_dir)
    d = dict(photos.make_effnet(work, n_calib=cfg["n_calib"], n_eval=cfg["n_eval"], seed=cfg["seed"]))
    d.setdefault("model", os.path.join(models_dir, models.EFFNET))
    return d


def score_effnet(outputs, float_outputs, labels, info) -> dict:
    import photos
    return dict(photos.effnet_metrics(outputs[0], float_outputs[0]))


# MiniLM (bench/minilm.py) -------------------------------------------------------------------------
def build_minilm(work, models_dir, cfg) -> dict:
    import minilm
    import models
    model = models.build_minilm(models_dir)
    d = minilm.make_data(work, n_calib=cfg["n_calib"])
    pairs = os.path.join(work, "pairs.npz")
    np.savez(pairs, **{f"{k}_{i}": a for k, v in d["pairs"].items() for i, a in enumerate(v)})
    return {"model": model, "calib": d["calib"], "eval": d["eval"], "pairs": pairs,
            "benchmarks": sorted(d["pairs"])}


def score_minilm(outputs, float_outputs, labels, info) -> dict:
    import minilm
    with np.load(info["pairs"]) as z:
        pairs = {k: tuple(z[f"{k}_{i}"] for i in range(3)) for k in info["benchmarks"]}
    res = minilm.score(outputs[0], pairs, reference=float_outputs[0])
    return {k: v for k, v in res.items() if v is not None and k != "cosine_to_float"}  # = the harness's cosine


TASKS = {t.name: t for t in [
    Task("sample", "digits ResNet (samples/digits_resnet.onnx, 540 held-out scikit-learn digits)",
         build_sample, score_sample, ("accuracy",), (512, 128), (4000, 800)),
    Task("cls", "rapidocr direction classifier (rendered text lines, every other one rotated 180°)",
         build_cls, score_cls, ("acc",), (256, 128), (8000, 1000), module="text_lines",
         needs=("make_cls", "cls_metrics")),
    Task("rec", "rapidocr PP-OCRv4 recognizer (rendered text lines; exact line match, CER)", build_rec, score_rec,
         ("line_acc", "cer"), (256, 128), (8000, 1000), module="text_lines",
         needs=("make_rec", "rec_metrics", "ctc_greedy"), batch_size=16),
    Task("effnet", "EfficientNet-Lite0 (random crops of bundled photos; agreement with float)", build_effnet,
         score_effnet, ("top1_agree", "top1_agree_confident"), (256, 128), (8000, 1000), module="photos",
         needs=("make_effnet", "effnet_metrics"), batch_size=16),
    Task("minilm", "all-MiniLM-L6-v2 sentence embedder (SimLex-999 / WordSim-353 Spearman)", build_minilm,
         score_minilm, ("simlex", "wordsim"), (512, 128), (8000, 1000), module="minilm",
         needs=("make_data", "score"), needs_models=("build_minilm",), argmax=False, batch_size=16,
         ort_op_types=("MatMul", "Gemm"),
         notes="onnxruntime rows quantize MatMul/Gemm only: with every op type quantize_static also quantizes "
               "the attention-mask Add (-3.4e38 on padding) and the model collapses (bench/minilm.py)."),
]}
DATA_SIZES = {"sample": None, "cls": (256, 500), "rec": (256, 500), "effnet": (256, 500), "minilm": (512, None)}


# ---- configuration -----------------------------------------------------------------------------
def row_config(task: Task, a) -> dict:
    q = 1 if a.quick else 0
    return {"quick": bool(a.quick), "seed": a.seed,
            "calib_samples": a.calib_samples or task.calib_samples[q],
            "iters_total": a.iters_total if a.iters_total is not None else task.iters_total[q],
            "eval_samples": a.eval_samples or task.eval_samples[q],
            "latency_runs": a.latency_runs or (20 if a.quick else 50),
            "batch_size": task.batch_size}


def config_tag(task: Task, a) -> str:
    cfg = row_config(task, a)
    base = dict(cfg, calib_samples=task.calib_samples[int(a.quick)], iters_total=task.iters_total[int(a.quick)],
                eval_samples=task.eval_samples[int(a.quick)], latency_runs=20 if a.quick else 50, seed=0)
    name = "quick" if a.quick else "full"
    if cfg == base:
        return name
    return f"{name}-" + hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]


# ---- data ----------------------------------------------------------------------------------------
def model_inputs(path: str) -> list:
    import onnx
    m = onnx.load(path, load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    out = []
    for i in m.graph.input:
        if i.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
        out.append((i.name, dims))
    return out


def load_feeds(path: str, model_path: str, n: int | None = None) -> tuple[dict, np.ndarray | None]:
    """{input name: array} and the 'labels' array if the .npz has one."""
    names = [n_ for n_, _ in model_inputs(model_path)]
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    labels = arrays.pop("labels", None) if "labels" not in names else None
    if len(names) == 1 and len(arrays) == 1 and names[0] not in arrays:
        arrays = {names[0]: next(iter(arrays.values()))}
    feeds = {k: arrays[k] for k in names}
    if n is not None:
        feeds = {k: v[:n] for k, v in feeds.items()}
        labels = None if labels is None else labels[:n]
    return feeds, labels


def load_labels(info: dict, n: int | None):
    path = info.get("labels")
    if not path:
        return None
    if path.endswith(".npy"):
        lab = np.load(path, allow_pickle=False)
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            lab = json.load(f)
    else:
        with open(path, encoding="utf-8") as f:
            lab = f.read().split("\n")
            if lab and lab[-1] == "":
                lab = lab[:-1]
    return lab if n is None else lab[:n]


def overlap(calib: str, eval_: str, model: str) -> int:
    """Evaluation samples identical to a calibration sample (must be 0: the sets are disjoint)."""
    c, _ = load_feeds(calib, model)
    e, _ = load_feeds(eval_, model)

    def keys(feeds):
        n = len(next(iter(feeds.values())))
        return {hashlib.sha1(b"".join(np.ascontiguousarray(v[i]).tobytes() for v in feeds.values())).hexdigest()
                for i in range(n)}
    return len(keys(c) & keys(e))


# ---- weights -------------------------------------------------------------------------------------
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def stored_weight_bytes(path: str) -> float:
    """Bytes of the constant weights of Conv/ConvTranspose/Gemm/MatMul at their stored element width
    (float32 initializers at 4 bytes, int8 at 1, int4 at 0.5), following DequantizeLinear."""
    import onnx
    from onnx import TensorProto as T
    width = {T.FLOAT: 32, T.FLOAT16: 16, T.INT8: 8, T.UINT8: 8, T.INT16: 16, T.UINT16: 16, T.INT32: 32}
    for nm, b in (("INT4", 4), ("UINT4", 4), ("INT2", 2), ("UINT2", 2)):
        if hasattr(T, nm):
            width[getattr(T, nm)] = b
    m = onnx.load(path, load_external_data=False)
    inits = {i.name: i for i in m.graph.initializer}
    for n in m.graph.node:  # weights held in Constant nodes (e.g. Paddle exports)
        if n.op_type == "Constant":
            val = next((a.t for a in n.attribute if a.name == "value"), None)
            if val is not None:
                inits[n.output[0]] = val
    producer = {o: n for n in m.graph.node for o in n.output if n.op_type != "Constant"}
    total, seen = 0.0, set()
    for node in m.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        name = node.input[1]
        while name not in inits and name in producer and producer[name].op_type in (
                "DequantizeLinear", "Transpose", "Reshape", "Identity", "Cast"):
            name = producer[name].input[0]
        if name in inits and name not in seen:
            seen.add(name)
            w = inits[name]
            total += int(np.prod(w.dims)) * width.get(w.data_type, 32) / 8
    return total


# ---- one row (runs in a subprocess) ------------------------------------------------------------
def peak_rss_mb() -> float:
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class _Reader:
    def __init__(self, feeds: dict, batch: int):
        self.feeds, self.batch, self.i = feeds, batch, 0
        self.n = len(next(iter(feeds.values())))

    def get_next(self):
        if self.i >= self.n:
            return None
        d = {k: v[self.i:self.i + self.batch] for k, v in self.feeds.items()}
        self.i += self.batch
        return d

    def rewind(self):
        self.i = 0


def ort_quantize(row: Row, info: dict, cfg: dict, out_path: str, work: str, op_types=None) -> dict:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    notes = []
    src = info["model"]
    pre = out_path + ".pre.onnx"  # onnxruntime's recommended pre-processing, timed as part of the row
    try:
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        model = onnx.load(pre)
        os.unlink(pre)
    except Exception as exc:  # keep going on the raw model
        notes.append(f"quant_pre_process failed ({one_line(exc)[:120]}); raw model used")
        model = onnx.load(src)
    extra = {"ActivationSymmetric": False, "WeightSymmetric": True}
    # per-channel DequantizeLinear (axis) needs opset 13; QInt4 / QUInt4 Q/DQ need opset 21
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    want = 21 if row.wbits == 4 or row.abits == 4 else 13
    if opset < want:
        from onnx import version_converter
        try:
            model = version_converter.convert_version(model, want)
            notes.append(f"opset {opset} -> {want}")
        except Exception as exc:
            notes.append(f"opset {want} conversion failed ({type(exc).__name__})"
                         + ("; com.microsoft Q/DQ used" if want == 21 else ""))
            if want == 21:
                extra["UseQDQContribOps"] = True
    if row.wbits == 4:
        # int4 per-channel weights through TensorQuantOverrides
        inits = {i.name: i for i in model.graph.initializer}
        over = {}
        for node in model.graph.node:
            if node.op_type in WEIGHT_OPS and len(node.input) > 1 and node.input[1] in inits:
                dims = inits[node.input[1]].dims
                if node.op_type == "Gemm":
                    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                    axis = 0 if trans_b else 1
                elif node.op_type == "MatMul":
                    axis = len(dims) - 1
                elif node.op_type == "ConvTranspose":
                    axis = 1
                else:
                    axis = 0
                over[node.input[1]] = [{"quant_type": QuantType.QInt4, "axis": axis, "symmetric": True}]
        extra["TensorQuantOverrides"] = over
    act = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}[row.act]
    if row.abits == 4:
        act = QuantType.QUInt4 if row.act == "u8" else QuantType.QInt4
    feeds, _ = load_feeds(info["calib"], info["model"], cfg["calib_samples"])
    dims = model_inputs(info["model"])[0][1]
    batch = 1 if dims and isinstance(dims[0], int) and dims[0] > 0 else 8
    method = getattr(CalibrationMethod, row.calibrate)
    if row.calibrate == "Percentile":
        extra["CalibPercentile"] = 99.999
    blob = model.SerializeToString()  # quantize_static modifies the ModelProto it is given

    def run(types):
        quantize_static(onnx.load_from_string(blob), out_path, _Reader(feeds, batch), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=row.reduce_range, activation_type=act,
                        weight_type=QuantType.QInt8, calibrate_method=method, extra_options=extra,
                        op_types_to_quantize=None if types is None else list(types))
        import onnxruntime
        onnxruntime.InferenceSession(out_path, providers=["CPUExecutionProvider"])  # loads?

    try:
        run(op_types)
    except Exception as exc:
        if op_types is not None:
            raise
        # e.g. uint4 activations through MaxPool are rejected by onnxruntime's type check
        notes.append(f"default op types failed ({one_line(exc)[:160]}); retried with {'/'.join(WEIGHT_OPS)} only")
        run(WEIGHT_OPS)
    return {"notes": notes}


def ours_quantize(row: Row, info: dict, cfg: dict, out_path: str) -> dict:
    from packptq_onnx.mixed import MixedOptions
    from packptq_onnx.pipeline import Options, quantize
    from packptq_onnx.reconstruct import ReconOptions

    method = "pack" if row.mixed else row.method
    o = Options(wbits=row.wbits, abits=row.abits, method=method, seed=cfg["seed"],
                calib_samples=cfg["calib_samples"], batch_size=min(cfg["batch_size"], cfg["calib_samples"]),
                recon=ReconOptions(iters_total=cfg["iters_total"],
                                   batch_size=min(cfg["batch_size"], cfg["calib_samples"])),
                resume=True)  # a row killed mid-reconstruction continues from OUT.onnx.ckpt when rerun
    shapes = {}
    calib, _ = load_feeds(info["calib"], info["model"], 1)
    for name, dims in model_inputs(info["model"]):
        if any(not (isinstance(d, int) and d > 0) for d in dims[1:]):  # dynamic non-batch dims: fix from the data
            shapes[name] = [None] + list(calib[name].shape[1:])
    if shapes:
        o.input_shapes = shapes
    if row.mixed:
        ab = tuple(sorted({row.abits, 8}))
        o.mixed = MixedOptions(avg_wbits=float(row.wbits), wbits=(2, 3, 4, 8), abits=ab,
                               cache=out_path + ".sensitivity.json")
    rep = quantize(info["model"], info["calib"], out_path, o, log=lambda *_: None)
    parity = rep.get("parity", [])
    res = {"weight_bytes": rep["weight_bytes"]["quantized"], "report_seconds": rep["seconds"],
           "parity_ok": all(p["ok"] for p in parity), "parity_max_code_diff": max((p["max_code_diff"] for p in parity),
                                                                                default=None),
           "parity_max_abs_diff": max((p["max_abs_diff"] for p in parity), default=None)}
    if "reconstruction" in rep:
        res["recon_iters"] = sum(u["iters"] for u in rep["reconstruction"]["units"])
        res["recon_units"] = len(rep["reconstruction"]["units"])
    if "mixed_precision" in rep:
        mp = rep["mixed_precision"]
        res["mixed"] = {"budget_bytes": mp["budget_bytes"], "counted_bytes": mp.get("counted_bytes"),
                        "packs": [(p["wbits"], p["abits"]) for p in mp["packs"]]}
    return res


def float_outputs(info: dict, cfg: dict, work: str, feeds: dict) -> list:
    from packptq_onnx import runtime

    path = os.path.join(work, f"float_outputs_{cfg['eval_samples'] or 'all'}.npz")
    if os.path.exists(path):
        with np.load(path) as z:
            return [z[f"o{i}"] for i in range(len(z.files))]
    outs = runtime.run(runtime.session(info["model"]), feeds, 32)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **{f"o{i}": o for i, o in enumerate(outs)})
    os.replace(tmp, path)
    return outs


def run_row(task_name: str, row_name: str, out_dir: str, cfg: dict, result_path: str) -> None:
    """Quantize (ORT or ours), then evaluate and time; writes the result JSON. Runs in a child process."""
    os.environ.setdefault("PACKPTQ_QUIET", "1")
    task, row = TASKS[task_name], ROWS[row_name]
    work = os.path.join(out_dir, task_name)
    with open(os.path.join(work, "data.json")) as f:
        info = json.load(f)
    mdir = os.path.join(work, f"models-{cfg['tag']}")
    os.makedirs(mdir, exist_ok=True)
    res = {"task": task_name, "row": row_name, "method": row.method, "bits": row.bits, "config": cfg}
    t0 = time.time()
    if row.kind == "float":
        qpath = info["model"]
        res["weight_bytes"] = stored_weight_bytes(qpath)
    else:
        qpath = os.path.join(mdir, f"{row_name}.onnx")
        if row.kind == "ort":
            res.update(ort_quantize(row, info, cfg, qpath, work, task.ort_op_types))
            res["weight_bytes"] = stored_weight_bytes(qpath)
        else:
            res.update(ours_quantize(row, info, cfg, qpath))
        res["quantize_seconds"] = round(time.time() - t0, 2)
        res["peak_rss_mb"] = peak_rss_mb()
    res["file_bytes"] = os.path.getsize(qpath)
    from packptq_onnx import runtime
    from packptq_onnx.validate import cosine

    feeds, labels = load_feeds(info["eval"], info["model"], cfg["eval_samples"])
    if info.get("labels"):
        labels = load_labels(info, cfg["eval_samples"])
    ref = float_outputs(info, cfg, work, feeds)
    outs = ref if row.kind == "float" else runtime.run(runtime.session(qpath), feeds, 32)
    scores = task.score(outs, ref, labels, info)
    res["scores"] = {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v)
                     for k, v in scores.items()}
    res["cosine"] = float(np.mean([cosine(a, b) for a, b in zip(outs, ref)]))
    if task.argmax and ref[0].ndim >= 2 and ref[0].shape[-1] > 1:
        res["argmax_agreement"] = float((outs[0].argmax(-1) == ref[0].argmax(-1)).mean())
    # latency: batch 1, 1 thread, median; float and row timed alternately in this process for the speed-up
    one = {k: v[:1] for k, v in feeds.items()}
    lat_f, lat_q = paired_latency(info["model"], None if row.kind == "float" else qpath, one, cfg["latency_runs"])
    res["latency_ms"] = round(lat_q * 1e3, 4)
    res["float_latency_ms"] = round(lat_f * 1e3, 4)
    res["speedup"] = round(lat_f / lat_q, 3)
    res["status"] = "ok"
    res["row_seconds"] = round(time.time() - t0, 2)
    save_json(res, result_path)


def paired_latency(float_model: str, model: str | None, feeds: dict, runs: int) -> tuple[float, float]:
    """Median seconds per batch-1 run at 1 thread of the float model and of `model` (None: the float
    model itself), timed alternately run by run so that load changes on a shared machine hit both."""
    from packptq_onnx import runtime

    sf = runtime.session(float_model, threads=1)
    sq = sf if model is None else runtime.session(model, threads=1)
    for _ in range(3):
        sf.run(None, feeds)
        sq.run(None, feeds)
    tf, tq = [], []
    for _ in range(runs):
        for sess, times in ((sf, tf), (sq, tq)):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times.append(time.perf_counter() - t0)
    if model is None:
        tf = tq = sorted(tf + tq)
    return float(np.median(tf)), float(np.median(tq))


def save_json(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=lambda x: x.item() if hasattr(x, "item") else str(x))
    os.replace(tmp, path)


def one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:300] if msg else ''}".rstrip(": ")


def child_main(argv) -> int:
    kind, payload = argv[0], json.loads(argv[1])
    try:
        if kind == "--_row":
            run_row(payload["task"], payload["row"], payload["out"], payload["cfg"], payload["result"])
        else:
            build_task(payload["task"], payload["out"], payload["models_dir"], payload["cfg"], payload["result"])
    except BaseException as exc:  # recorded as failed with its one-line error
        traceback.print_exc()
        save_json({"status": "failed", "error": one_line(exc)}, payload["result"])
        return 1
    return 0


def build_task(task_name: str, out_dir: str, models_dir: str, cfg: dict, result_path: str) -> None:
    task = TASKS[task_name]
    work = os.path.join(out_dir, task_name)
    os.makedirs(work, exist_ok=True)
    os.makedirs(models_dir, exist_ok=True)
    t0 = time.time()
    info = {k: (os.path.abspath(v) if k in ("model", "calib", "eval", "labels") and isinstance(v, str) else v)
            for k, v in task.build(work, models_dir, cfg).items()}
    for k in ("model", "calib", "eval"):
        if not info.get(k) or not os.path.exists(info[k]):
            raise RuntimeError(f"build did not produce '{k}' ({info.get(k)})")
    info["overlap"] = overlap(info["calib"], info["eval"], info["model"])
    if info["overlap"]:
        raise RuntimeError(f"{info['overlap']} evaluation samples also appear in the calibration data")
    info["n_calib"] = len(next(iter(load_feeds(info["calib"], info["model"])[0].values())))
    info["n_eval"] = len(next(iter(load_feeds(info["eval"], info["model"])[0].values())))
    info["build_seconds"] = round(time.time() - t0, 2)
    info["status"] = "ok"
    save_json(info, os.path.join(work, "data.json"))
    save_json(info, result_path)


# ---- parent: run children, cache, report ---------------------------------------------------------
def spawn(kind: str, payload: dict, log_path: str, timeout: float | None) -> dict:
    """Run one child; returns its result JSON, or a failure record if it died without writing one."""
    result = payload["result"]
    if os.path.exists(result):
        os.unlink(result)
    cmd = [sys.executable, os.path.abspath(__file__), kind, json.dumps(payload)]
    env = dict(os.environ, PACKPTQ_QUIET="1", PYTHONUNBUFFERED="1")
    t0 = time.time()
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        rusage, status = None, None
        try:
            deadline = None if not timeout else t0 + timeout
            while True:
                pid, st, ru = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    rusage, status = ru, st
                    break
                if deadline and time.time() > deadline:
                    p.kill()
                    _, st, ru = os.wait4(p.pid, 0)
                    rusage, status = ru, None
                    break
                time.sleep(0.2)
        except BaseException:
            p.kill()
            os.wait4(p.pid, 0)
            raise
        p.returncode = 0  # reaped by wait4 above
    wall = round(time.time() - t0, 2)
    if os.path.exists(result):
        with open(result) as f:
            res = json.load(f)
    elif status is None:
        res = {"status": "failed", "error": f"timed out after {timeout:.0f} s"}
    else:
        code = os.waitstatus_to_exitcode(status)
        tail = _last_line(log_path)
        why = f"killed by signal {-code}" + (" (out of memory?)" if code == -9 else "") if code < 0 else f"exit {code}"
        res = {"status": "failed", "error": f"{why}: {tail}" if tail else why}
    res["wall_seconds"] = wall
    res["process_peak_rss_mb"] = round(rusage.ru_maxrss / 1024, 1) if rusage else None
    save_json(res, result)
    return res


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [x.strip() for x in f if x.strip()]
        return lines[-1][:300] if lines else ""
    except OSError:
        return ""


def run_task(task: Task, rows: list[Row], a, log=print) -> dict:
    """Build (cached), then every row (cached). Returns {'info', 'rows': {name: result}, 'skipped'}."""
    why = task.missing()
    if why:
        log(f"[{task.name}] not built yet: {why}")
        return {"info": None, "rows": {}, "missing": why}
    cfg = row_config(task, a)
    tag = config_tag(task, a)
    cfg["tag"] = tag
    work = os.path.join(a.out, task.name)
    rdir = os.path.join(work, tag)
    os.makedirs(rdir, exist_ok=True)
    data_json = os.path.join(work, "data.json")
    build_res = os.path.join(work, "build.json")
    info = None
    if os.path.exists(data_json):
        with open(data_json) as f:
            info = json.load(f)
    elif os.path.exists(build_res) and not a.retry_failed:
        with open(build_res) as f:
            b = json.load(f)
        return {"info": None, "rows": {}, "missing": f"data build failed: {b.get('error')}"}
    if info is None:
        sizes = DATA_SIZES.get(task.name) or (None, None)
        bcfg = {"seed": a.seed, "n_calib": sizes[0], "n_eval": sizes[1]}
        log(f"[{task.name}] building model and data ...")
        r = spawn("--_build", {"task": task.name, "out": os.path.abspath(a.out), "models_dir": a.models_dir,
                               "cfg": bcfg, "result": build_res}, os.path.join(work, "build.log"), a.row_timeout)
        if r.get("status") != "ok":
            log(f"[{task.name}] data build failed: {r.get('error')}")
            return {"info": None, "rows": {}, "missing": f"data build failed: {r.get('error')}"}
        with open(data_json) as f:
            info = json.load(f)
    results = {}
    for row in rows:
        path = os.path.join(rdir, f"{row.name}.json")
        if os.path.exists(path):
            with open(path) as f:
                res = json.load(f)
            if res.get("status") == "ok" or (res.get("status") == "failed" and not a.retry_failed):
                results[row.name] = res
                log(f"[{task.name}] {row.name:<26} cached ({res.get('status')})")
                continue
        log(f"[{task.name}] {row.name:<26} running ...")
        res = spawn("--_row", {"task": task.name, "row": row.name, "out": os.path.abspath(a.out), "cfg": cfg,
                               "result": path}, os.path.join(rdir, f"{row.name}.log"), a.row_timeout)
        results[row.name] = res
        if res.get("status") == "ok":
            log(f"[{task.name}] {row.name:<26} done in {res['wall_seconds']:.0f} s: "
                + ", ".join(f"{k} {_fmt(v)}" for k, v in list(res.get("scores", {}).items())[:3]))
        else:
            log(f"[{task.name}] {row.name:<26} FAILED: {res.get('error')}")
    return {"info": info, "rows": results, "missing": None, "tag": tag, "cfg": cfg}


# ---- RESULTS.md and plots ------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, (int, np.integer)):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _secs(v) -> str:
    return "–" if v is None else f"{v:.2f}" if v < 10 else f"{v:,.1f}" if v < 1000 else f"{v:,.0f}"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "onnx", "onnxruntime", "numpy", "packptq_onnx"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = "not installed"
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical cores visible)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(task: Task, res: dict) -> list[str]:
    rows = res["rows"]
    score_keys = []
    for r in rows.values():
        for k, v in r.get("scores", {}).items():
            if k not in score_keys and isinstance(v, (int, float)):
                score_keys.append(k)
    show_argmax = task.argmax and not any(k.startswith("top1_agree") for k in score_keys)  # not twice
    head = (["row", "bits"] + score_keys + ["cosine to float"] + (["argmax agree"] if show_argmax else [])
            + ["weight bytes", "quantize s", "peak RSS MB", "latency ms", "speed-up", "recon units / iters", "parity"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        row = ROWS[name]
        if r.get("status") != "ok":
            err = (r.get("error") or "?").replace("|", "\\|")
            lines.append(f"| {name} | {row.bits} | failed: {err} |" + " |" * (len(head) - 3))
            continue
        sc = r.get("scores", {})
        par = None if row.kind != "ours" else (f"ok ({r.get('parity_max_code_diff')} code)" if r.get("parity_ok")
                                                else f"NO ({r.get('parity_max_code_diff')} codes)")
        cells = ([name, row.bits] + [_fmt(sc.get(k)) for k in score_keys]
                 + [_fmt(r.get("cosine"))] + ([_fmt(r.get("argmax_agreement"))] if show_argmax else [])
                 + [_fmt(int(round(r["weight_bytes"]))),
                    _secs(r.get("quantize_seconds")), _fmt(r.get("peak_rss_mb")), _fmt(r.get("latency_ms")),
                    f"{r['speedup']:.2f}x",
                    f"{r['recon_units']} / {r['recon_iters']:,}" if r.get("recon_units") else "–", par or "–"])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


COLORS = {"float": "black", "rtn": "tab:gray", "adaround": "tab:blue", "block": "tab:orange", "pack": "tab:red",
          "pack-mixed": "tab:purple"}


def plot_metrics(task: Task, res: dict) -> list[str]:
    present = [k for r in res["rows"].values() for k, v in r.get("scores", {}).items() if isinstance(v, (int, float))]
    chosen = [m for m in task.metrics if m in present]
    return chosen or present[:1]


def plot(task: Task, res: dict, path: str) -> str | None:
    metrics = plot_metrics(task, res)
    if not metrics:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.6), squeeze=False)
    drawn = False
    for ax, metric in zip(axes[0], metrics):
        series = {}
        for name, r in res["rows"].items():
            v = r.get("scores", {}).get(metric) if r.get("status") == "ok" else None
            if isinstance(v, (int, float)) and math.isfinite(v):
                series.setdefault(ROWS[name].method, []).append((r["weight_bytes"], v, ROWS[name]))
        markers = "os^vD<>pP*hX"
        for i, (m, pts) in enumerate(sorted(series.items())):
            if m == "float":
                ax.axhline(pts[0][1], color="black", linestyle=":", linewidth=1)
                ax.plot([pts[0][0]], [pts[0][1]], marker="*", color="black", linestyle="none", label="float")
                drawn = True
                continue
            # the line joins WbAb rows (and mixed); WbA8 rows with b < 8 are hollow markers
            line = sorted(p for p in pts if p[2].wbits == p[2].abits or p[2].mixed)
            side = [p for p in pts if p not in line]
            mk, col = markers[i % len(markers)], COLORS.get(m)
            h = ax.plot([p[0] for p in line], [p[1] for p in line], marker=mk, color=col, label=m,
                        linestyle="-" if len(line) > 1 else "none", alpha=0.85)[0] if line else None
            if side:
                ax.plot([p[0] for p in side], [p[1] for p in side], marker=mk, linestyle="none", alpha=0.85,
                        markerfacecolor="none", color=h.get_color() if h else col,
                        label=None if h else m)
            drawn = True
        ax.set_xscale("log")
        ax.set_xlabel("weight bytes (Conv/Gemm/MatMul weights, log scale)")
        ax.set_ylabel(metric)
        ax.set_title(f"{task.name}: {metric} vs weight bytes (hollow: W4A8)")
        ax.grid(True, alpha=0.3)
        if series:
            ax.legend(fontsize=8, ncol=2)
    if not drawn:
        plt.close(fig)
        return None
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(all_res: dict, a, command: str) -> str:
    os.makedirs(a.results, exist_ok=True)
    v = versions()
    lines = ["# Benchmark results", "",
             f"Command: `{command}`", "",
             f"Date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  ",
             "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + "  ",
             f"CPU: {cpu_name()}  ",
             f"Mode: {'quick' if a.quick else 'full'}, seed {a.seed}"
             + "".join(f", {k} {v}" for k, v in (("--calib-samples", a.calib_samples), ("--iters-total", a.iters_total),
                                                  ("--eval-samples", a.eval_samples),
                                                  ("--latency-runs", a.latency_runs)) if v is not None), "",
             "Columns: the model's task metrics on the evaluation data (disjoint from the calibration data); "
             "cosine of all outputs to the float model's and argmax agreement along the last axis; weight bytes "
             "of the Conv/ConvTranspose/Gemm/MatMul weights at their bit width (ours: as quantized, W4 in int8 "
             "containers counts 4 bits; onnxruntime: the stored type); quantize wall time and peak RSS of the "
             "row's process at the end of quantization (includes interpreter and library imports); onnxruntime "
             "latency at batch 1, 1 thread, median, and the float / row latency ratio with both timed alternately "
             "in the same process; parity: our onnxruntime output vs our torch simulation (max code difference at "
             "one 8-bit step of the output range); recon units / iters: reconstruction units (layers, blocks or packs, "
             "with stem and head layers) and the iterations they got in total.", "",
             "Rows: `ort-*` are onnxruntime `quantize_static` QDQ, per-channel int8 weights (symmetric), "
             "activations u8/s8 per tensor, calibrated with MinMax / Percentile (99.999) / Entropy, `-rr` = "
             "reduce_range, W4 rows via TensorQuantOverrides (per-channel QInt4 weights, opset 21, QUInt4 "
             "activations for A4). Ours: `rtn`, `adaround`, `block`, `pack` (equal total reconstruction iterations "
             "for the last three; 8-bit weights in the 7-bit range, the pipeline's default), "
             "`pack-mixed-W4/W3`: pack + mixed precision (weights 2/3/4/8 bits, activations "
             "A{4|3}/8 capped at uniform A4/A3 memory) under the weight bytes of uniform W4 / W3.", ""]
    for name, res in all_res.items():
        task = TASKS[name]
        lines += [f"## {name}: {task.title}", ""]
        if res.get("missing"):
            lines += [f"Not built yet: {res['missing']}.", ""]
            continue
        info, cfg = res["info"], res["cfg"]
        n_eval = info["n_eval"] if not cfg["eval_samples"] else min(info["n_eval"], cfg["eval_samples"])
        lines += [f"Model `{os.path.basename(info['model'])}`; calibration {min(info['n_calib'], cfg['calib_samples'])}"
                  f" samples, evaluation {n_eval}"
                  f" samples (overlap {info['overlap']}); reconstruction iterations in total: {cfg['iters_total']}; "
                  f"latency median of {cfg['latency_runs']} runs.", ""]
        if task.notes:
            lines += [task.notes, ""]
        if not res["rows"]:
            lines += ["No rows selected.", ""]
            continue
        lines += table(task, res)
        notes = [f"- {n}: {'; '.join(r['notes'])}" for n, r in res["rows"].items() if r.get("notes")]
        mixed = [f"- {n}: budget {r['mixed']['budget_bytes']:,.0f} B, (wbits, abits) per pack "
                 f"{_fmt(r['mixed']['packs'])}" for n, r in res["rows"].items() if r.get("mixed")]
        if notes or mixed:
            lines += [""] + notes + mixed
        png = plot(task, res, os.path.join(a.results, f"bench_{name}.png"))
        if png:
            lines += ["", f"![{name}]({os.path.relpath(png, a.results)})"]
        lines.append("")
    path = os.path.join(a.results, "RESULTS.md")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    os.replace(path + ".tmp", path)
    return path


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("--_row", "--_build"):
        return child_main(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "out"), help="work folder: data, models, cached rows")
    ap.add_argument("--models", default=",".join(TASKS), help=f"comma list of {', '.join(TASKS)}")
    ap.add_argument("--rows", default=None, help="comma list of row names or shell patterns (default: all)")
    ap.add_argument("--quick", action="store_true", help="fewer calibration samples and iterations")
    ap.add_argument("--results", default=HERE, help="folder for RESULTS.md and the PNG plots (default bench/)")
    ap.add_argument("--models-dir", default=None, help="folder of the real ONNX models (default OUT/models)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-samples", type=int, default=None, help="override the task's calibration samples")
    ap.add_argument("--iters-total", type=int, default=None, help="override the total reconstruction iterations")
    ap.add_argument("--eval-samples", type=int, default=None, help="evaluate on the first N samples only")
    ap.add_argument("--latency-runs", type=int, default=None, help="latency: median of N runs (50; quick 20)")
    ap.add_argument("--row-timeout", type=float, default=None, help="seconds before a row is killed and failed")
    ap.add_argument("--retry-failed", action="store_true", help="rerun rows cached as failed")
    ap.add_argument("--list", action="store_true", help="print the rows and tasks, then exit")
    a = ap.parse_args(argv)
    if a.list:
        for t in TASKS.values():
            print(f"task {t.name:<8} {t.title}" + (f"  [{t.missing()}]" if t.missing() else ""))
        for r in ROWS.values():
            print(f"row  {r.name:<26} {r.kind:<6} {r.bits}")
        return 0
    a.out = os.path.abspath(a.out)
    import signal
    signal.signal(signal.SIGTERM, _terminate)  # like Ctrl-C: the running row's process is killed too
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started with & from a script
        signal.signal(signal.SIGINT, _terminate)
    a.results = os.path.abspath(a.results)
    a.models_dir = os.path.abspath(a.models_dir or os.path.join(a.out, "models"))
    names = [m.strip() for m in a.models.split(",") if m.strip()]
    for n in names:
        if n not in TASKS:
            raise SystemExit(f"--models: unknown model {n!r} (available: {', '.join(TASKS)})")
    os.makedirs(a.out, exist_ok=True)
    command = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(os.path.abspath(__file__), os.getcwd())]
                                   + list(argv))
    all_res = {}
    for n in names:
        task = TASKS[n]
        all_res[n] = run_task(task, select_rows(a.rows, task.rows), a)
    path = write_results(all_res, a, command)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
