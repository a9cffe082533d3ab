"""The main job, one way through: import -> calibrate -> export -> validate."""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from . import __version__, convert, data, layout, qlayer, runtime, shapes, state, targets, validate
from .calibrate import calibrate
from .errors import UsageError
from .exporters import files, qdq
from .layers import RULES, decode_layers, find_layers, output_rules, per_output_rules
from .mixed import MixedOptions
from .onnx_import import ImportedModel, check_float, check_static, load, reshaped
from .parity import layer_parity
from .progress import bar
from .reconstruct import ReconOptions
from .records import export_records

PARITY_SAMPLES = 64
LAYER_PARITY_SAMPLES = 8
FAITHFUL_SAMPLES = 32


@dataclass
class Options:
    wbits: int = 8
    abits: int = 8
    method: str = "pack"
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 32
    calib_samples: int = 1024
    reduce_range: bool = True   # 7-bit range for 8-bit weights: exact on AVX2 CPUs without VNNI
    target: str = "any"        # --target the range was chosen for (packptq_onnx.targets)
    image: dict = field(default_factory=dict)  # image_size, mean, std, layout for image folders
    recon: ReconOptions = field(default_factory=ReconOptions)
    max_pack_blocks: int | None = None
    resume: bool = False
    storage: str = "int8"      # "packed": INT4/INT2 weight initializers
    output_bits: int | None = 8  # output quantizer per layer so onnxruntime fuses it; None: off
    strict: bool = False       # an op with no torch converter is an error instead of staying float
    mixed: MixedOptions = field(default_factory=MixedOptions)
    input_shapes: dict = field(default_factory=dict)  # name -> dims (None = dynamic), --input-shape
    batch_axes: dict = field(default_factory=dict)    # name -> sample axis, --batch-axis (packptq_onnx.layout)
    bias_correction: bool = True  # subtract the mean output shift of quantized weights (qlayer)
    task: str | None = None    # task metric for --eval (packptq_onnx.tasks); None: guessed
    guard: float = 0.002       # 8-bit activation quantizers predicted to cost more output NSR stay float
    metric: str | None = None  # --metric module:function, called with float and quantized outputs


METHODS = ("rtn", "adaround", "block", "pack")
FAR_FROM_SIMULATION = 0.05  # share of an output's values > 1 step from the simulation: it no longer predicts it


def check_options(o: Options) -> None:
    for what, b in (("--wbits", o.wbits), ("--abits", o.abits)):
        if not 2 <= b <= 8:
            raise UsageError(f"{what} must be between 2 and 8, got {b}")
    if o.method not in METHODS:
        raise UsageError(f"unknown --method {o.method!r} (available: {', '.join(METHODS)})")
    r = o.recon
    if r.iters < 0 or (r.iters_total is not None and r.iters_total < 0):
        raise UsageError("--iters and --iters-total must not be negative")
    if not 0.0 <= r.drop_prob <= 1.0:
        raise UsageError("--drop-prob must be between 0 and 1")
    if o.max_pack_blocks is not None and o.max_pack_blocks < 1:
        raise UsageError("--max-pack-blocks must be at least 1")
    if o.storage not in qdq.STORAGES:
        raise UsageError(f"--storage must be one of {', '.join(qdq.STORAGES)}")
    if o.batch_size < 1 or o.calib_samples < 1:
        raise UsageError("--batch-size and --calib-samples must be positive")
    if o.task is not None:
        from .tasks import TASKS
        if o.task not in TASKS:
            raise UsageError(f"unknown --task {o.task!r} (available: {', '.join(TASKS)})")
    if o.metric is not None:
        from .tasks import load_metric
        load_metric(o.metric)
    if o.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA GPU (install a CUDA build of torch)")


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def check_memory(imp: ImportedModel, calib: dict, opts: Options) -> None:
    """Refuse before starting when the model, its copies and the calibration data cannot fit."""
    weights = sum(int(np.prod(i.dims)) * 4 for i in imp.model.graph.initializer)
    need = 6 * weights + sum(v.nbytes for v in calib.values())  # float + torch + quantizers + Adam state
    have = available_memory()
    if need > have:
        raise UsageError(f"not enough memory: about {need / 2**30:.1f} GiB needed (model {weights / 2**30:.1f} "
                         f"GiB), {have / 2**30:.1f} GiB available; use fewer --calib-samples or a larger machine")


def check_output(model_path: str, out_path: str) -> None:
    if os.path.abspath(out_path) == os.path.abspath(model_path):
        raise UsageError("the output path equals the input model; choose another -o")
    directory = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(directory):
        raise UsageError(f"output directory does not exist: {directory}")
    try:  # really try: permission bits say nothing for root or on read-only mounts
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".packptq-probe-"):
            pass
    except OSError as exc:
        raise UsageError(f"output directory is not writable: {directory} ({exc.strerror})") from None


def weight_bytes(records) -> dict:
    n = sum(r.w_int.size for r in records)
    q = sum(r.w_int.size * r.wbits for r in records) / 8
    return {"float32": 4 * n, "quantized": int(np.ceil(q)), "elements": int(n)}


@dataclass
class Prepared:
    """A model imported, converted, proven faithful and RTN-calibrated, ready for the next step."""
    imp: ImportedModel
    calib: dict
    names: list
    gm: torch.nn.Module
    qls: list
    faithful: list
    seconds: float
    plan: shapes.ShapePlan = field(default_factory=shapes.ShapePlan)
    output_rules: dict = field(default_factory=dict)  # layer output left float -> the rule why
    decode: dict = field(default_factory=dict)  # layer left float entirely -> why (layers.decode_layers)
    shape_groups: list = field(default_factory=list)  # calibration samples of other shapes (other_shapes)
    kept_float: list = field(default_factory=list)  # activation quantizers the guard removed
    file_model: object = None  # the graph as the file gives it (declared inputs and outputs)
    declared: list = field(default_factory=list)  # its inputs, with where the data holds the samples
    axes: dict = field(default_factory=dict)  # inputs whose samples are not on axis 0 (layout)

    @property
    def run_batch(self) -> int:
        """Batch size for whole-model runs (torch and onnxruntime): the graph's fixed batch if any."""
        return self.plan.run_batch or 64

    @property
    def n_samples(self) -> int:
        return data.n_samples(self.calib)

    def batches(self, opts: Options):
        return data.batches(self.calib, self.names, opts.batch_size, opts.device)

    def calib_batches(self, opts: Options):
        """Batches for the activation statistics: the main shape, then every other shape the torch
        graph runs faithfully (a batch holds one shape)."""
        yield from self.batches(opts)
        for g in self.shape_groups:
            if g["calibrated"]:
                yield from data.batches(g["feeds"], self.names, opts.batch_size, opts.device)


def prepare(model_path: str, calib_path: str, opts: Options, log=print) -> Prepared:
    check_options(opts)
    t0 = time.time()
    torch.manual_seed(opts.seed)
    np.random.seed(opts.seed)
    imp = load(model_path, opts.input_shapes)
    check_float(imp.original)
    file_model = imp.original
    axes = layout.batch_axes(imp.inputs, opts.batch_axes)
    declared = [replace(s, batch_axis=axes.get(s.name, 0)) for s in imp.inputs]
    if os.path.isdir(calib_path) and data.npz_files(calib_path):
        groups = data.load_groups(calib_path, declared, log=log)
    else:
        groups = [data.Group("", [], data.load(calib_path, declared, log=log, **opts.image)[0])]
    calib = data.take(groups[0].feeds, opts.calib_samples)
    if axes:  # inside, every input has its samples first
        opts.input_shapes = {k: ([v[axes[k]]] + v[:axes[k]] + v[axes[k] + 1:] if k in axes else v)
                             for k, v in opts.input_shapes.items()}
        imp = reshaped(replace(imp, original=layout.samples_first(imp.original, axes)), opts.input_shapes)
        log("samples: " + ", ".join(f"input '{k}' on axis {v}" for k, v in axes.items()))
    if any(n.op_type == "If" for n in imp.original.graph.node):
        from .controlflow import inline_constant_ifs

        original, notes = inline_constant_ifs(imp.original, calib)
        if notes:
            imp = reshaped(replace(imp, original=original), opts.input_shapes)
            imp.notes += notes
            log(f"control flow: {len(notes)} If node(s) inlined (condition fixed by the calibration data; "
                "the exported model serves these branches only)")
    imp, plan = settle_shapes(imp, calib, opts)
    if plan.describe():
        log(f"shapes: {plan.describe()}")
    check_static(imp.inputs)
    names = [i.name for i in imp.inputs]
    if data.n_samples(calib) < opts.batch_size:
        raise UsageError(f"{calib_path} has {data.n_samples(calib)} samples, fewer than --batch-size "
                         f"{opts.batch_size}: give more calibration samples or a smaller --batch-size")
    check_memory(imp, calib, opts)
    probe = data.take(calib, FAITHFUL_SAMPLES)
    n_notes = len(imp.notes)
    gm = convert.to_torch_running(imp, probe, plan.run_batch or 2, strict=opts.strict)
    for note in imp.notes[n_notes:]:
        log(f"warning: {note}")
    faithful = convert.prove_faithful(imp, gm, probe, batch_size=plan.run_batch or 64, fixed=bool(plan.run_batch))
    layers = find_layers(imp.model)
    decode = decode_layers(imp.model, layers)
    layers = [l for l in layers if l.name not in decode]
    inside = layers_in_control_flow(imp.model)
    if not layers:
        raise UsageError("the model has no quantizable layer (Conv, ConvTranspose, Gemm, or MatMul "
                         "with a constant weight)" + (f"; {inside} sit inside If/Loop/Scan branches whose "
                                                      "condition depends on input values" if inside else ""))
    if inside:
        log(f"note: {inside} layer(s) inside If/Loop/Scan branches stay float (the condition depends on "
            "input values, so no branch can be inlined)")
    log(f"{os.path.basename(model_path)}: {len(imp.model.graph.node)} nodes, {len(layers)} quantizable "
        f"layers, opset {imp.opset}" + (f" ({'; '.join(imp.notes)})" if imp.notes else ""))
    for name, why in decode.items():
        log(f"note: layer {name} stays float ({why})")
    qls = qlayer.wrap(gm, imp.model, layers)
    if opts.device == "cuda":  # full fp32 on the GPU: TF32 would round what the exported model computes exactly
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    gm.to(opts.device)
    p = Prepared(imp, calib, names, gm, qls, faithful, 0.0, plan, decode=decode, file_model=file_model,
                 declared=declared, axes=axes)
    p.shape_groups = other_shapes(imp, gm, groups[1:], opts, plan.run_batch or 2, log)
    p.output_rules = output_rules(imp.model, layers, opts.output_bits)
    calibrate(gm, qls, imp.model, p.calib_batches(opts), opts.wbits, opts.abits, opts.reduce_range, opts.seed,
              progress=lambda it: bar(it, "calibrate", -(-p.n_samples // opts.batch_size)),
              output_bits=opts.output_bits, bias_correction=opts.bias_correction)
    if opts.guard:
        p.kept_float = guard_activations(p, opts, log)
    p.seconds = time.time() - t0
    return p


GUARD_SAMPLES = 2


def layers_in_control_flow(model) -> int:
    """Conv/ConvTranspose/Gemm/MatMul nodes inside subgraphs (If branches, Loop/Scan bodies)."""
    from onnx import AttributeProto, helper

    def count(graph, top):
        k = 0
        for n in graph.node:
            if not top and n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                k += 1
            for a in n.attribute:
                if a.type == AttributeProto.GRAPH:
                    k += count(helper.get_attribute_value(a), False)
        return k
    return count(model.graph, True)


def guard_activations(p: Prepared, opts: Options, log=print) -> list[dict]:
    """8-bit activation quantizers whose predicted output error alone exceeds opts.guard stay float
    (packptq_onnx.guard); returns what was left float, for the report."""
    from . import guard

    t0 = time.time()
    feeds = data.take(p.calib, GUARD_SAMPLES)
    est = guard.estimate(p.gm, p.qls, data.batches(feeds, p.names, p.plan.run_batch or 1, opts.device),
                         opts.seed)
    keys = guard.choose(est, opts.guard)
    state.keep_float(p.qls, keys)
    kept = [{"layer": n, "part": part, "predicted_nsr": round(est[(n, part)], 6)} for n, part in keys]
    if kept:
        names = ", ".join(f"{k['layer']} {k['part']}" for k in kept[:4]) + (", ..." if len(kept) > 4 else "")
        log(f"note: {len(kept)} of {len(est)} 8-bit activation quantizers stay float: alone each would cost "
            f"more than {opts.guard:g} of the outputs' energy ({names}; {time.time() - t0:.0f} s)")
    return kept


def other_shapes(imp: ImportedModel, gm, groups: list, opts: Options, run_batch: int, log=print) -> list[dict]:
    """Calibration samples in shapes other than the main one (a folder of .npz files). The float
    model must run them (else a one-line error); their batches join the activation statistics
    where the torch graph, converted at the main shape, runs them faithfully, else they are only
    checked in onnxruntime (the graph may have folded shape arithmetic)."""
    out = []
    for g in groups:
        feeds = data.take(g.feeds, opts.calib_samples)
        probe = data.take(feeds, run_batch)
        try:
            ref = runtime.run(runtime.session(imp.original), probe)
        except Exception as exc:
            raise UsageError(f"calibration samples of shape {g.shape} ({', '.join(g.files[:3])}): the model "
                             f"cannot take them ({str(exc).splitlines()[0][:160]})") from None
        try:
            got = convert.torch_run(gm, probe, [i.name for i in imp.inputs], batch_size=run_batch, device=opts.device,
                                    fixed=True)
            ok = all(a.shape == b.shape and validate.cosine(a.astype(np.float64), b.astype(np.float64)) > 0.9999
                     for a, b in zip(ref, got))
        except Exception:
            ok = False
        log(f"note: calibration shape {g.shape} ({data.n_samples(feeds)} samples): "
            + ("in the activation statistics" if ok else "runs in onnxruntime; not in the statistics (the "
               "converted graph is fixed at the main shape)"))
        out.append({"shape": g.shape, "files": g.files, "samples": data.n_samples(feeds),
                    "calibrated": ok, "feeds": feeds})
    return out


def settle_shapes(imp: ImportedModel, calib: dict, opts: Options):
    """Dynamic dims the calibration data makes definite are fixed at its size; a fixed batch is
    freed where onnxruntime shows that exact, else every run goes in batches of that size."""
    plan = shapes.ShapePlan()
    fixed = dict(opts.input_shapes)
    fixed.update(shapes.from_data(imp.inputs, calib))
    plan.from_data = {k: v for k, v in fixed.items() if k not in opts.input_shapes}
    source = None
    plan.fixed_batch = shapes.fixed_batch(imp.inputs)
    if plan.fixed_batch is not None:
        probe = data.take(calib, 4 * plan.fixed_batch)
        plan.batch_freed = shapes.batch_is_free(imp.model, plan.fixed_batch, probe, runtime.session)
        if plan.batch_freed:
            source = shapes.free_batch(imp.original, plan.fixed_batch)
            fixed = {k: [None] + list(v[1:]) for k, v in fixed.items()}
        else:
            plan.run_batch = plan.fixed_batch
            opts.batch_size = opts.recon.batch_size = plan.fixed_batch
    if fixed or source is not None:
        imp = reshaped(imp, fixed, source)
    return imp, plan


def quantize(model_path: str, calib_path: str, out_path: str, opts: Options,
             eval_path: str | None = None, labels_path: str | None = None, log=print) -> dict:
    check_options(opts)
    check_output(model_path, out_path)
    t0 = time.time()
    p = prepare(model_path, calib_path, opts, log)
    imp, gm, qls, calib, names = p.imp, p.gm, p.qls, p.calib, p.names
    ckpt = out_path + ".ckpt"
    analysis, mixed = None, None
    if opts.mixed.enabled or opts.method == "pack":
        analysis = analyse(p, opts, opts.max_pack_blocks, log)
        log(f"{len(analysis.units.blocks)} blocks in {len(analysis.packs)} packs: "
            + " ".join("[" + ",".join(str(b) for b in pk.blocks) + "]" for pk in analysis.packs))
    if opts.mixed.enabled:
        from .mixed import allocate
        fp = (f"{os.path.abspath(model_path)}:{os.path.getsize(model_path)}:{os.path.abspath(calib_path)}:"
              f"{p.n_samples}:{opts.seed}:W{opts.wbits}A{opts.abits}:{opts.max_pack_blocks}:{opts.output_bits}:"
              f"{opts.bias_correction}")
        mixed = allocate(gm, qls, analysis.packs, analysis.units, lambda: p.batches(opts), opts.mixed,
                         opts.abits, fp, log)
    recon = reconstruct_model(p, opts, ckpt, log, analysis) if opts.method != "rtn" else None
    gm.to("cpu")
    pack_of = {}
    if analysis is not None:
        pack_of = {n: pk.id for pk in analysis.packs for b in pk.blocks for n in analysis.units.blocks[b].layers}
    records = export_records(qls, pack_of)
    out = qdq.write_qdq(imp.model, records, storage=opts.storage)
    t2 = time.time()
    probe = data.take(calib, PARITY_SAMPLES)
    parity = validate.sim_parity(imp.outputs, runtime.run(runtime.session(out), probe),
                                 convert.torch_run(gm, probe, names, batch_size=p.run_batch,
                                                   fixed=bool(p.plan.run_batch)))
    per_layer = layer_parity(out, gm, qls, data.take(calib, p.plan.run_batch or LAYER_PARITY_SAMPLES), names)
    meta = {"version": __version__, "packs": pack_meta(analysis, records, mixed),
            "budget": None if mixed is None else mixed["budget_bytes"],
            "layers": [{"node": r.layer.name, "op": r.layer.op, "wbits": r.wbits, "abits": r.abits}
                       for r in records],
            "calibration": {"file": os.path.basename(calib_path), "samples": p.n_samples},
            "parity": {"outputs": {x.output: x.max_abs_diff for x in parity},
                       "layers_max_code_diff": per_layer.max_code_diff}}
    qdq.set_meta(out, meta)
    layout.undo(out)
    shapes.restore_io(out, p.file_model)  # the file's dynamic axes (and fixed batch) as declared
    files.save_model(out, out_path)
    if os.path.exists(ckpt):
        os.unlink(ckpt)
    report = {
        "tool": {"name": "packptq-onnx", "version": __version__},
        "input": model_path, "output": out_path, "options": asdict(opts),
        "file_bytes": os.path.getsize(out_path),
        "weight_range": targets.describe(opts.reduce_range, opts.target),
        "shapes": {**asdict(p.plan), "summary": p.plan.describe(),
                   "other_calibration_shapes": [{k: v for k, v in g.items() if k != "feeds"} for g in p.shape_groups]},
        "output_quantizers": {"rules": RULES,
                              "skipped": {q.layer.name: p.output_rules[q.layer.output][0] for q in qls
                                          if q.layer.output in p.output_rules},
                              "per_output": per_output_rules(imp.model, qls, p.output_rules),
                              "float_layers": p.decode,
                              "kept_float": p.kept_float},
        "import": {"notes": imp.notes, "faithful": [asdict(a) for a in p.faithful],
                   "float_nodes": list(gm.float_nodes)},
        "layers": meta["layers"], "weight_bytes": weight_bytes(records),
        "parity": validate.as_dicts(parity),
        "seconds": {"prepare": round(p.seconds, 3), "quantize": round(t2 - t0 - p.seconds, 3)},
        "peak_rss_mb": peak_rss_mb(),
    }
    if recon is not None:
        report["reconstruction"] = recon
    if mixed is not None:
        mixed["counted_bytes"] = qdq.weight_bytes(out)
        report["mixed_precision"] = mixed
    if analysis is not None:
        report["packs"] = meta["packs"]
    report["parity_layers"] = asdict(per_layer)
    for line in parity_notes(parity, per_layer):
        log(line)
    if eval_path:
        try:
            report.update(evaluate(imp, layout.samples_first(out, p.axes), eval_path, labels_path, opts, log,
                                   p.declared))
        except Exception as exc:  # the model is written: keep it, and the report, and say what failed
            msg = str(exc) if isinstance(exc, UsageError) else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            report["evaluation_error"] = {"message": msg, "usage": isinstance(exc, UsageError)}
    report["seconds"]["total"] = round(time.time() - t0, 3)
    report["peak_rss_mb"] = peak_rss_mb()  # over the whole run, evaluation included
    return report


def parity_notes(parity: list, per_layer) -> list[str]:
    """What the end-of-run parity means, naming every output that fails (docs/METHOD.md, step 5)."""
    bad = [x for x in parity if not x.ok]
    shares = ", ".join(f"{x.output} {100 * x.over_one:.2f}%" for x in bad)
    if not per_layer.exact:
        return [f"warning: the torch simulation that reconstruction optimises does not predict the exported "
                f"model: layer {per_layer.worst} differs by {per_layer.max_code_diff} steps fed with "
                f"onnxruntime's own input" + (f"; values more than one step apart: {shares}" if bad else "")]
    if not bad:
        return []
    line = (f"note: each layer matches onnxruntime within one step, but rounding-tie flips grow through the "
            f"network; values more than one step apart: {shares}")
    far = [x for x in bad if x.over_one > FAR_FROM_SIMULATION]
    if far:
        line += (f". On {', '.join(x.output for x in far)} the simulation no longer predicts the exported "
                 f"model (over {100 * FAR_FROM_SIMULATION:.0f}% of values)")
    return [line]


@dataclass
class Analysis:
    units: object
    scores: list
    packs: list
    seconds: float


def analyse(p: Prepared, opts: Options, max_pack_blocks: int | None = None, log=print) -> Analysis:
    """Blocks, their Hessian-guided scores at the calibrated bits, and packs."""
    from . import blocks, packing, sensitivity

    t0 = time.time()
    units = blocks.find_blocks(p.imp.model, [q.layer for q in p.qls])
    if not units.blocks:
        raise UsageError("no blocks found: the model has no quantizable layer between stem and head")
    scores = sensitivity.score_blocks(p.gm, p.qls, units, p.imp.model, lambda: p.batches(opts), p.n_samples,
                                      progress=lambda it: bar(it, "score blocks", len(units.blocks)), log=log)
    packs = packing.make_packs([s.score for s in scores], [s.sensitivity for s in scores], max_pack_blocks)
    return Analysis(units, scores, packs, time.time() - t0)


def pack_meta(analysis, records, mixed) -> list:
    """The per-pack annotation written into the model and the report."""
    if analysis is None:
        return []
    chosen = {r["id"]: r for r in mixed["packs"]} if mixed else {}
    by_pack = {}
    for r in records:
        by_pack.setdefault(r.pack, []).append(r)
    out = []
    for pk in analysis.packs:
        recs = by_pack.get(pk.id, [])
        out.append({"id": pk.id, "blocks": [analysis.units.blocks[b].name for b in pk.blocks],
                    "nodes": [r.layer.name for r in recs],
                    "wbits": sorted({r.wbits for r in recs if r.wbits}),
                    "abits": sorted({r.abits for r in recs if r.abits}),
                    "bytes": sum(r.w_int.size * r.wbits / 8 for r in recs),
                    "sensitivity": chosen.get(pk.id, {}).get("sensitivity", pk.score)})
    return out


def reconstruct_model(p: Prepared, opts: Options, ckpt: str, log=print, analysis=None) -> dict:
    from . import blocks
    from .reconstruct import make_units, run

    layers = [q.layer for q in p.qls]
    units_struct, packs, scoring = None, None, None
    if opts.method in ("block", "pack"):
        units_struct = blocks.find_blocks(p.imp.model, layers)
    if opts.method == "pack":
        a = analysis or analyse(p, opts, opts.max_pack_blocks)
        packs, scoring = a.packs, round(a.seconds, 3)
    units = make_units(opts.method, units_struct, packs, layers)
    t0 = time.time()
    log(f"reconstruction ({opts.method}): {len(units)} units")
    res = run(p.gm, p.imp.model, p.qls, units, lambda: p.batches(opts), p.n_samples, opts.recon, opts.seed,
              opts.device, ckpt, opts.resume, log)
    return {"method": opts.method, "units": [asdict(r) for r in res], "seconds": round(time.time() - t0, 3),
            "scoring_seconds": scoring,
            "packs": None if packs is None else [{"id": pk.id, "blocks": pk.blocks, "score": pk.score}
                                                 for pk in packs]}


def peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def evaluate(imp: ImportedModel, quant_model, eval_path, labels_path, opts: Options, log=print,
             given: list | None = None) -> dict:
    """Float vs quantized in onnxruntime on the eval data, and again at a second size where the file
    leaves spatial or sequence dims dynamic (the export must run wherever the float model runs).
    given: the inputs as the data gives them (sample axes); both models take samples first."""
    declared = shapes.specs(imp.original)
    given = given or declared
    groups = data.load_groups(eval_path, given, log=log) if os.path.isdir(eval_path) and \
        data.npz_files(eval_path) else []
    feeds, labels = (groups[0].feeds, groups[0].labels) if groups else \
        data.load(eval_path, given, log=log, **opts.image)
    if labels_path:
        labels = data.load_array(labels_path)
    from .tasks import load_metric

    metric = load_metric(opts.metric) if opts.metric else None
    names, ref, got = validate.run_both(imp.original, quant_model, feeds, opts.device)
    metrics = validate.compare_outputs(names, ref, got, labels)
    log(validate.table(metrics))
    res = {"validation": validate.as_dicts(metrics),
           "task": validate.task_scores(opts.task, metric, ref, got, feeds)}
    log(validate.task_line(res["task"]))
    if len(groups) > 1:
        res["validation_other_shapes"] = []
        for g in groups[1:]:
            _, ref, got = validate.run_both(imp.original, quant_model, g.feeds, opts.device)
            m = validate.compare_outputs(imp.outputs, ref, got, g.labels)
            t = validate.task_scores(res["task"]["task"] or None, metric, ref, got, g.feeds)
            res["validation_other_shapes"].append({"shape": g.shape, "files": g.files,
                                                   "metrics": validate.as_dicts(m), "task": t})
            log(f"eval samples of shape {g.shape}:\n" + validate.table(m) + "\n" + validate.task_line(t))
    other = shapes.second_size(declared, feeds)
    if other is not None:
        sizes = {k: list(v.shape[1:]) for k, v in other.items()}
        entry = {"inputs": sizes}
        try:
            ref = runtime.run(runtime.session(imp.original, opts.device), other)
        except Exception as exc:
            entry["skipped"] = f"the float model does not run at this size ({str(exc).splitlines()[0][:160]})"
        else:
            try:
                got = runtime.run(runtime.session(quant_model, opts.device), other)
            except Exception as exc:
                entry["error"] = f"the exported model fails at this size: {str(exc).splitlines()[0][:200]}"
                log(f"warning: {entry['error']}")
            else:
                m2 = validate.compare_outputs(imp.outputs, ref, got, labels)
                entry["metrics"] = validate.as_dicts(m2)
                entry["task"] = validate.task_scores(res["task"]["task"] or None, metric, ref, got, other)
                entry["task"]["guessed"] = res["task"]["guessed"]
                log(f"at a second size ({', '.join(f'{k} {v}' for k, v in sizes.items())}):\n"
                    + validate.table(m2) + "\n" + validate.task_line(entry["task"]))
        res["validation_second_size"] = entry
    return res
