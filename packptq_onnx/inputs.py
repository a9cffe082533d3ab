"""The model and its calibration data brought together before anything is converted: where each
input holds its samples (packptq_onnx.layout), If nodes the data decides (packptq_onnx.controlflow),
dynamic dims the data makes definite and fixed batches (packptq_onnx.shapes), and calibration
samples in other shapes."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import numpy as np

from . import convert, data, layout, runtime, shapes, validate
from .errors import UsageError
from .onnx_import import ImportedModel, check_float, check_static, load, reshaped
from .options import Options


@dataclass
class Inputs:
    imp: ImportedModel           # samples first, shapes settled, Ifs inlined
    calib: dict                  # the main shape's calibration samples
    groups: list                 # every shape group of the calibration data (the first is `calib`'s)
    plan: shapes.ShapePlan
    file_model: object           # the graph as the file gives it (declared inputs and outputs)
    declared: list               # its inputs, with where the data holds the samples
    axes: dict = field(default_factory=dict)  # inputs whose samples are not on axis 0


def load_inputs(model_path: str, calib_path: str, opts: Options, log=print) -> Inputs:
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
    return Inputs(imp, calib, groups, plan, file_model, declared, axes)


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


