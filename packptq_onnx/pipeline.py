"""The main job as a visible sequence of steps (docs/METHOD.md): prepare (import, shapes, torch
conversion, faithfulness, RTN calibration, guard) -> analyse (blocks, scores, packs) -> allocate
(mixed precision) -> reconstruct -> export -> parity -> evaluate. Each step is a plain function
of the Prepared bundle and the Options; `quantize` runs them in order and returns the report."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from . import (
    __version__,
    controlflow,
    convert,
    data,
    guard,
    kernels,
    layout,
    parity,
    qlayer,
    runtime,
    shapes,
    state,
    targets,
    validate,
)
from .calibrate import calibrate
from .errors import UsageError
from .exporters import files, qdq
from .inputs import load_inputs, other_shapes
from .layers import (
    RULES,
    decode_layers,
    find_layers,
    is_join,
    layer_count,
    output_rules,
    per_output_rules,
    useful_joins,
)
from .memory import peak_rss_mb
from .mixed import MixedResult
from .onnx_import import ImportedModel
from .options import (  # noqa: F401  (pipeline.Options and friends: the names users import)
    DEFAULT_BATCH,
    METHODS,
    MixedOptions,
    Options,
    ReconOptions,
    check_job,
    check_memory,
    check_options,
)
from .progress import bar
from .reconstruct import Reconstruction
from .records import export_records
from .report import QuantizeReport, pack_infos

PARITY_SAMPLES = 64
LAYER_PARITY_SAMPLES = 8
FAITHFUL_SAMPLES = 32


@dataclass
class Prepared:
    """A model imported, converted, proven faithful and RTN-calibrated: the bundle every step takes."""
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
    shape_groups: list = field(default_factory=list)  # calibration samples of other shapes (inputs.other_shapes)
    kept_float: list = field(default_factory=list)  # activation quantizers the guard removed
    min_max: list = field(default_factory=list)  # activation quantizers that took their min-max range
    kernels: list = field(default_factory=list)  # per conv: integer and float kernel times, the choice
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
    inp = load_inputs(model_path, calib_path, opts, log)
    imp, calib, plan = inp.imp, inp.calib, inp.plan
    names = [i.name for i in imp.inputs]
    if opts.batch_size is None:  # not given: the default, or every sample when there are fewer
        opts.batch_size = min(DEFAULT_BATCH, data.n_samples(calib))
        if opts.batch_size < DEFAULT_BATCH:
            log(f"note: {data.n_samples(calib)} calibration samples, so batches of {opts.batch_size}")
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
    layers = find_layers(imp.model, joins=opts.joins and opts.output_bits is not None)  # needs output quantizers
    decode = decode_layers(imp.model, layers)
    layers = useful_joins(imp.model, [l for l in layers if l.name not in decode])
    inside = controlflow.layers_in_control_flow(imp.model)
    if all(is_join(l) for l in layers):
        raise UsageError("the model has no quantizable layer (Conv, ConvTranspose, Gemm, or MatMul "
                         "with a constant weight)" + (f"; {inside} sit inside If/Loop/Scan branches whose "
                                                      "condition depends on input values" if inside else ""))
    if inside:
        log(f"note: {inside} layer(s) inside If/Loop/Scan branches stay float (the condition depends on "
            "input values, so no branch can be inlined)")
    log(f"{os.path.basename(model_path)}: {len(imp.model.graph.node)} nodes, {layer_count(layers)}, "
        f"opset {imp.opset}" + (f" ({'; '.join(imp.notes)})" if imp.notes else ""))
    for name, why in decode.items():
        log(f"note: layer {name} stays float ({why})")
    qls = qlayer.wrap(gm, imp.model, layers)
    if opts.device == "cuda":  # full fp32 on the GPU: TF32 would round what the exported model computes exactly
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    gm.to(opts.device)
    p = Prepared(imp, calib, names, gm, qls, faithful, 0.0, plan, decode=decode, file_model=inp.file_model,
                 declared=inp.declared, axes=inp.axes)
    p.shape_groups = other_shapes(imp, gm, inp.groups[1:], opts, plan.run_batch or 2, log)
    p.output_rules = output_rules(imp.model, layers, opts.output_bits)
    calibrate(gm, qls, imp.model, p.calib_batches(opts), opts.wbits, opts.abits, opts.reduce_range, opts.seed,
              progress=lambda it: bar(it, "calibrate", -(-p.n_samples // opts.batch_size)),
              output_bits=opts.output_bits, bias_correction=opts.bias_correction, softmax_quant=opts.softmax_quant)
    if opts.stem_head and not opts.mixed.enabled:
        fix_stem_head(p, opts.stem_head, log)
    if opts.guard:
        p.min_max, p.kept_float = guard.apply(p, opts, log)
    if opts.kernels == "auto":
        p.kernels = kernels.decide(p, opts, log)
    p.seconds = time.time() - t0
    return p


def fix_stem_head(p: Prepared, bits: tuple, log=print) -> None:
    """Uniform precision with --fixed-bits: the stem and head layers (blocks.find_blocks) at their own
    bits, as BRECQ and QDrop keep the first and last layers at 8 bits; before the guard and
    the kernel choice, which then see the bits the export will have (docs/METHOD.md, step 3). Measured:
    no gain on the direction classifier W4A4 or EfficientNet-Lite0 W4A8 (bench/CONVERGENCE.md)."""
    units = find_units(p)
    names = set(units.stem) | set(units.head)
    for q in p.qls:
        if q.layer.name in names:
            state.set_bits(q, *bits)
    state.tie_inputs(p.qls)
    log(f"stem and head at W{bits[0]}A{bits[1]}: {', '.join(sorted(names)) or 'none found'}")


@dataclass
class Analysis:
    units: object   # blocks.Units: blocks from the graph, stem and head layers
    scores: list    # sensitivity.BlockScore per block
    packs: list     # packing.Pack
    seconds: float


def find_units(p: Prepared):
    from . import blocks

    return blocks.find_blocks(p.imp.model, [q.layer for q in p.qls])


def analyse(p: Prepared, opts: Options, max_pack_blocks: int | None = None, log=print, units=None) -> Analysis:
    """Blocks (found here unless given), their Hessian-guided scores at the calibrated bits, and packs."""
    from . import packing, sensitivity

    t0 = time.time()
    units = units or find_units(p)
    if not units.blocks:
        raise UsageError("no blocks found: the model has no quantizable layer between stem and head")
    scores = sensitivity.score_blocks(p.gm, p.qls, units, p.imp.model, lambda: p.batches(opts), p.n_samples,
                                      progress=lambda it: bar(it, "score blocks", len(units.blocks)), log=log)
    packs = packing.make_packs([s.score for s in scores], [s.sensitivity for s in scores], max_pack_blocks)
    return Analysis(units, scores, packs, time.time() - t0)


def allocate(p: Prepared, opts: Options, analysis: Analysis, model_path: str, calib_path: str,
             log=print, es=None, out_path: str | None = None) -> MixedResult:
    """Bits per pack under the user's limits, or the cheapest that meets the accuracy target (es:
    accuracy.EvalSet); the target's Pareto front is written beside out_path."""
    from . import mixed

    mo = opts.mixed
    fp = (f"{os.path.abspath(model_path)}:{os.path.getsize(model_path)}:{os.path.abspath(calib_path)}:"
          f"{p.n_samples}:{opts.seed}:W{opts.wbits}A{opts.abits}:{opts.max_pack_blocks}:{opts.output_bits}:"
          f"{opts.bias_correction}")
    batches = lambda: p.batches(opts)  # noqa: E731
    plan = mixed.prepare(p.gm, p.qls, analysis.packs, analysis.units, batches, mo, opts.abits, fp, log)
    if mo.target is None:
        alloc = mixed.solve(plan.table, plan.costs, plan.limits, mo)
        mixed.apply(p.qls, plan, alloc.choice)
        mixed.log_choice(plan, alloc.choice, log)
        return mixed.result(plan, alloc, mo, mixed.describe_limits(mo))
    return _search(p, opts, plan, es, out_path, log)


def _search(p: Prepared, opts: Options, plan, es, out_path: str, log=print) -> MixedResult:
    """The accuracy target's search (accuracy.search) on this model; the front written beside
    out_path; TargetNotMet (exit 3) when nothing reaches it."""
    from . import accuracy, mixed, state
    from .ranking import float_gains

    mo = opts.mixed
    batches = lambda: p.batches(opts)  # noqa: E731

    def stem_abits(bits):
        for q in plan.fixed:
            state.set_bits(q, mo.fixed_bits, bits)
        c = plan.costs
        return mixed.costs(p.qls, plan.pack_layers, plan.fixed, plan.options, mo.fixed_bits, bits, c.acts, c.macs)

    hooks = accuracy.Hooks(lambda ch: mixed.apply(p.qls, plan, ch), lambda: candidate(p, opts), stem_abits,
                           lambda: [r["layer"] for r in float_gains(p.gm, p.qls, batches,
                                                                     score=accuracy.proxy(mo.target, es, opts))],
                           _fall_back(p, plan.costs), lambda: state.snapshot(p.qls))
    alloc, points, chosen, floated = accuracy.search(plan, mo, mo.target, es, opts, hooks, log)
    search = accuracy.as_dict(points, mo.target, chosen, alloc is not None, es.float_value)
    prefix = os.path.splitext(out_path)[0] + ".front"
    accuracy.write_front(prefix, search, points, mo.target, chosen, log)
    if alloc is None:
        raise accuracy.TargetNotMet(
            f"target {mo.target.text()} not reached: the best allocation checked scores {mo.target.metric} "
            f"{chosen.metric:.5f} ({chosen.weight_bytes / 1e3:.1f} kB, A{chosen.avg_abits:.2f}); nothing written "
            f"but the front, {prefix}.md")
    mixed.log_choice(plan, alloc.choice, log)
    log(f"chosen: the cheapest checked allocation that meets {mo.target.text()} ({mo.target.metric} "
        f"{chosen.metric:.5f}, {chosen.bops / 1e9:.4g} GBOPs)")
    res = mixed.result(plan, alloc, mo, f"target {mo.target.text()}")
    res.search, res.float_layers = search, floated
    res.predicted = {k: getattr(chosen, k) for k in ("weight_bytes", "avg_wbits", "avg_abits", "bops")}
    res.predicted_bytes = chosen.weight_bytes  # the fallbacks' float weights included
    if floated:
        log(f"  {len(floated)} layer(s) compute in float: {', '.join(floated[:8])}"
            + (" ..." if len(floated) > 8 else ""))
    return res


def _fall_back(p: Prepared, c):
    """The search's last resort: fall_back(names) leaves those layers float and returns what that
    adds to (weight bytes, activation bits, BOPs) per sample, from the plan's per-layer counts c
    (mixed.Costs)."""
    from . import state

    by = {q.layer.name: q for q in p.qls}

    def fall_back(names):
        extra = [0.0, 0.0, 0.0]
        for n in names:
            q = by[n]
            w = q.wq.bits if q.wq is not None else 32
            a = q.aq.bits if q.aq is not None else 32
            extra[1] += c.acts.get(n, 0) * (32 - a)
            if q.layer.has_weight:
                extra[0] += q.weight.numel() * (32 - w) / 8
                extra[2] += c.macs.get(n, 0) * (32 * 32 - w * a)
            state.fall_back(q)
        return tuple(extra)
    return fall_back


def candidate(p: Prepared, opts: Options):
    """The export of the simulation as it stands (no annotations), samples first, for a check in
    onnxruntime on the eval data."""
    from .records import export_records

    out = qdq.write_qdq(p.imp.model, export_records(p.qls), storage=opts.storage)
    layout.undo(out)
    shapes.restore_io(out, p.file_model)
    return layout.samples_first(out, p.axes)


def reconstruct_model(p: Prepared, opts: Options, ckpt: str, log=print, analysis: Analysis | None = None,
                      units=None) -> Reconstruction:
    """Layers, blocks or packs (opts.method) reconstructed in graph order; the block analysis is
    reused when given."""
    from .reconstruct import make_units, run

    layers = [q.layer for q in p.qls]
    packs, scoring = None, None
    if opts.method == "pack":
        analysis = analysis or analyse(p, opts, opts.max_pack_blocks, units=units)
        packs, scoring = analysis.packs, round(analysis.seconds, 3)
    if opts.method in ("block", "pack"):
        units = analysis.units if analysis is not None else (units or find_units(p))
    work = make_units(opts.method, units, packs, layers)
    t0 = time.time()
    log(f"reconstruction ({opts.method}): {len(work)} units")
    res = run(p.gm, p.imp.model, p.qls, work, lambda: p.batches(opts), p.n_samples, opts.recon, opts.seed,
              opts.device, ckpt, opts.resume, log)
    return Reconstruction(opts.method, res, round(time.time() - t0, 3), scoring)


def weight_bytes(records) -> dict:
    """Weight bytes of the quantized layers: float32, and as written (layers fallen back to float at
    4 bytes per weight; low-rank side branches are float: their bytes are counted apart)."""
    f = sum(r.float_weights for r in records)
    n = sum(r.w_int.size for r in records) + f
    q = sum(r.w_int.size * r.wbits for r in records) / 8 + 4 * f
    branch = sum(4 * (r.branch[0].size + r.branch[1].size) for r in records if r.branch is not None)
    return {"float32": 4 * n, "quantized": int(np.ceil(q)), "elements": int(n), "lowrank_branch": branch}


def quantize(model_path: str, calib_path: str, out_path: str, opts: Options,
             eval_path: str | None = None, labels_path: str | None = None, log=print) -> QuantizeReport:
    check_job(opts, model_path, out_path, eval_path)
    t0 = time.time()
    target = opts.mixed.target
    p = prepare(model_path, calib_path, opts, log)
    imp, gm, qls, calib, names = p.imp, p.gm, p.qls, p.calib, p.names
    es = None
    if target is not None:
        from . import accuracy
        es = accuracy.eval_set(imp, imp.original, target, eval_path, labels_path, opts, p.declared, log)
    ckpt = out_path + ".ckpt"
    units = find_units(p) if opts.method in ("block", "pack") or opts.mixed.enabled else None
    analysis = mixed = recon = None
    if opts.mixed.enabled or opts.method == "pack":
        analysis = analyse(p, opts, opts.max_pack_blocks, log, units)
        log(f"{len(analysis.units.blocks)} blocks in {len(analysis.packs)} packs: "
            + " ".join("[" + ",".join(str(b) for b in pk.blocks) + "]" for pk in analysis.packs))
    if opts.mixed.enabled:
        mixed = allocate(p, opts, analysis, model_path, calib_path, log, es, out_path)
        from .ranking import at_current_bits
        mixed.ranking = at_current_bits(gm, qls, lambda: p.batches(opts))
        log("costliest layers at their bits (alone, rest float): " + ", ".join(
            f"{r['layer']} W{r['wbits'] or '-'}A{r['abits'] or '-'} cos {r['cosine']:.4f}" for r in mixed.ranking[:3]))
    if opts.method != "rtn":
        recon = reconstruct_model(p, opts, ckpt, log, analysis, units)
    gm.to("cpu")
    pack_of = {}
    if analysis is not None:
        pack_of = {n: pk.id for pk in analysis.packs for b in pk.blocks for n in analysis.units.blocks[b].layers}
    records = export_records(qls, pack_of)
    out = qdq.write_qdq(imp.model, records, storage=opts.storage)
    t2 = time.time()
    probe = data.take(calib, PARITY_SAMPLES)
    sim = convert.torch_run(gm, probe, names, batch_size=p.run_batch, fixed=bool(p.plan.run_batch))
    par = validate.sim_parity(imp.outputs, runtime.run(runtime.session(out), probe), sim)
    # the same file with onnxruntime's graph optimizations off: each ONNX op as written, no fused kernel
    par_graph = validate.sim_parity(imp.outputs, runtime.run(runtime.session(out, optimize=False), probe), sim)
    per_layer = parity.layer_parity(out, gm, qls, data.take(calib, p.plan.run_batch or LAYER_PARITY_SAMPLES), names)
    packs = pack_infos(analysis, records, mixed)
    meta = {"version": __version__, "packs": [asdict(x) for x in packs],
            "budget": None if mixed is None else mixed.budget_bytes,
            "allocation": None if mixed is None else {"chosen_for": mixed.chosen_for, "limits": mixed.limits,
                                                      "predicted": mixed.predicted},
            "layers": [{"node": r.layer.name, "op": r.layer.op, "wbits": r.wbits, "abits": r.abits,
                        **({"float": True} if r.float_weights else {})} for r in records],
            "calibration": {"file": os.path.basename(calib_path), "samples": p.n_samples},
            "parity": {"outputs": {x.output: x.max_abs_diff for x in par},
                       "layers_max_code_diff": per_layer.max_code_diff}}
    qdq.set_meta(out, meta)
    layout.undo(out)
    shapes.restore_io(out, p.file_model)  # the file's dynamic axes (and fixed batch) as declared
    files.save_model(out, out_path)
    if os.path.exists(ckpt):
        os.unlink(ckpt)
    if mixed is not None:
        mixed = replace(mixed, counted_bytes=qdq.weight_bytes(out))
    report = QuantizeReport(
        input=model_path, output=out_path, options=asdict(opts), file_bytes=os.path.getsize(out_path),
        weight_range=targets.describe(opts.reduce_range, opts.target),
        shapes={**asdict(p.plan), "summary": p.plan.describe(),
                "other_calibration_shapes": [{k: v for k, v in g.items() if k != "feeds"} for g in p.shape_groups]},
        output_quantizers={"rules": RULES,
                           "skipped": {q.layer.name: p.output_rules[q.layer.output][0] for q in qls
                                       if q.layer.output in p.output_rules},
                           "per_output": per_output_rules(imp.model, qls, p.output_rules),
                           "float_layers": p.decode, "kept_float": p.kept_float, "min_max_ranges": p.min_max,
                           "kernels": p.kernels},
        imported={"notes": imp.notes, "faithful": [asdict(a) for a in p.faithful],
                  "float_nodes": list(gm.float_nodes)},
        layers=meta["layers"], weight_bytes=weight_bytes(records), parity=validate.as_dicts(par),
        parity_layers=asdict(per_layer), parity_graph=validate.as_dicts(par_graph),
        seconds={"prepare": round(p.seconds, 3), "quantize": round(t2 - t0 - p.seconds, 3)},
        peak_rss_mb=peak_rss_mb(), packs=packs, reconstruction=recon, mixed_precision=mixed)
    for line in parity.notes(par, per_layer, par_graph):
        log(line)
    if eval_path:
        try:
            report.evaluation = validate.evaluate(imp, layout.samples_first(out, p.axes), eval_path, labels_path,
                                                  opts, log, p.declared)
        except Exception as exc:  # the model is written: keep it, and the report, and say what failed
            msg = str(exc) if isinstance(exc, UsageError) else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            report.evaluation_error = {"message": msg, "usage": isinstance(exc, UsageError)}
    if es is not None:  # the written model against the target (candidates were checked before reconstruction)
        from .accuracy import check
        v, _ = check(es, target, layout.samples_first(out, p.axes), opts)
        mixed.search["final"] = {"value": v, "met": target.passes(v), "method": opts.method}
        log(f"written model: {target.metric} {v:.4f} on the eval data, "
            + ("meets the target" if target.passes(v) else f"misses the target {target.text()} after {opts.method} "
               "reconstruction (the candidate checked before it met it)"))
    report.seconds["total"] = round(time.time() - t0, 3)
    report.peak_rss_mb = peak_rss_mb()  # over the whole run, evaluation included
    return report
