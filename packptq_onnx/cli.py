"""Command line: packptq quantize | validate | sweep | inspect."""
from __future__ import annotations

import argparse
import sys
import traceback

from . import targets
from .errors import UsageError
from .options import (
    DEFAULT_BATCH,
    DEVICES,
    FORMS,
    KERNELS,
    METHODS,
    SOFTMAX_QUANT,
    SOLVERS,
    STORAGES,
    TASKS,
    MixedOptions,
    Options,
    ReconOptions,
    check_bit_options,
)


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image folders")
    g.add_argument("--image-size", type=int, help="resize images to SIZE x SIZE (default: model's size)")
    g.add_argument("--mean", type=_floats, help="per-channel mean on [0,1] pixels, e.g. 0.485,0.456,0.406")
    g.add_argument("--std", type=_floats, help="per-channel std, e.g. 0.229,0.224,0.225")
    g.add_argument("--layout", choices=["NCHW", "NHWC"], default="NCHW")


def _task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=TASKS, help="task-level agreement to report (default: guessed from the "
                   "output shapes, and printed)")
    p.add_argument("--metric", metavar="MODULE:FUNCTION", help="your metric: called with the float and the "
                   "quantized outputs (lists of arrays), returns a number; MODULE may be a .py path")


def _shape_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:DIMS",
                   help="fix an input's dynamic dims, e.g. x:N,3,48,320 (N: batch, stays dynamic); repeat "
                        "for several inputs")
    p.add_argument("--batch-axis", action="append", default=[], metavar="NAME:AXIS",
                   help="the axis of an input that holds the samples where the graph does not tell, e.g. "
                        "state:1 (an RNN state [layers, N, hidden]); the data gives it in that layout")


def _axes(a) -> dict:
    out = {}
    for t in getattr(a, "batch_axis", []):
        name, _, k = t.rpartition(":")
        if not name or not k.lstrip("-").isdigit():
            raise UsageError(f"--batch-axis {t!r}: expected NAME:AXIS, e.g. state:1")
        out[name] = int(k)
    return out


def _shapes(a) -> dict:
    from .onnx_import import parse_input_shape

    return dict(parse_input_shape(t) for t in a.input_shape)


def _recon_args(p: argparse.ArgumentParser) -> None:
    d = ReconOptions()
    g = p.add_argument_group("reconstruction (adaround / block / pack)")
    g.add_argument("--iters", type=int, default=d.iters, help=f"iterations per unit (default {d.iters})")
    g.add_argument("--iters-total", type=int, help="compute budget: N / L iterations for every unit (L: layers "
                   "with weights), so every layer runs N / L passes in every mode (equal compute)")
    g.add_argument("--lr-round", type=float, default=d.lr_round, help="Adam step of AdaRound's V (default: "
                   "20 / iterations per unit, within 0.003-0.05, so V can reach hard rounding)")
    g.add_argument("--lr-scale", type=float, default=d.lr_scale)
    g.add_argument("--round-weight", type=float, default=d.round_weight,
                   help="AdaRound regulariser weight, per weight, against the reconstruction loss "
                   f"relative to round-to-nearest's (default {d.round_weight})")
    g.add_argument("--drop-prob", type=float, default=d.drop_prob, help="QDrop: chance of a quantized input")
    g.add_argument("--max-pack-blocks", type=int, default=Options.max_pack_blocks, metavar="K",
                   help=f"most blocks per pack (default {Options.max_pack_blocks}, measured in bench/PACK_CAP.md; 0: "
                   "no cap, the paper's rule, which can make the whole network one pack)")
    g.add_argument("--no-compile", action="store_true", help="eager fake-quant kernels only (default: compiled "
                   "with torch.compile where a C++ compiler works; same values, some 1.5x faster)")
    g.add_argument("--lowrank", type=_rank, help="low-rank compensation of MatMul/Gemm weights: a rank, or "
                   "'auto' (from each layer's shape); learned with the rounding, merged into the exported weights")
    g.add_argument("--lowrank-form", choices=FORMS, default=d.lowrank_form,
                   help="merged (default): B·A is rounded into the weights, no extra op; branch: B·A stays a "
                   "float side branch (two small MatMuls and an Add per layer, slower)")
    g.add_argument("--lr-lowrank", type=float, default=d.lr_lowrank, help="Adam step of the low-rank weights")
    g.add_argument("--resume", action="store_true", help="continue from OUT.onnx.ckpt after an interruption")


def _rank(text: str):
    from .lowrank import parse

    try:
        return parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive rank or 'auto', got {text!r}") from None


def pack_cap(k: int | None) -> int | None:
    """--max-pack-blocks: 0 means no cap (None); negative is an error."""
    if k is not None and k < 0:
        raise UsageError(f"--max-pack-blocks must be 0 (no cap) or more, got {k}")
    return k or None


def _ints(text: str) -> tuple:
    try:
        return tuple(sorted({int(v) for v in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _mixed_args(p: argparse.ArgumentParser) -> None:
    d = MixedOptions()
    g = p.add_argument_group("mixed precision (per pack, exact integer program)")
    g.add_argument("--budget", help="weight bytes of the quantized layers, e.g. 1.2MB, 300kB, 50000")
    g.add_argument("--avg-wbits", type=float, help="budget as average weight bits, e.g. 3.5")
    g.add_argument("--wbits-options", type=_ints, default=d.wbits, help="weight bits per pack (default 2,3,4,8)")
    g.add_argument("--abits-options", type=_ints, default=d.abits,
                   help="activation bits per pack, 2..8 or 16 (default: --abits alone; 4,8,16 with a --target)")
    g.add_argument("--avg-abits", type=float, help="limit: average activation bits, weighted by the elements "
                   "each quantized layer reads per sample, e.g. 6")
    g.add_argument("--bops", help="limit: bit-operations per sample (sum of MACs x wbits x abits), e.g. 40G")
    g.add_argument("--max-drop", type=float, help="accuracy target: the metric may drop this much below the "
                   "float model's (accuracy with labels, else --metric, else the task's agreement)")
    g.add_argument("--fixed-bits", type=int, help=f"stem and head bits (mixed precision: default {d.fixed_bits}; "
                   "uniform: default --wbits / --abits, 8 is the papers' 8-bit first and last layers)")
    g.add_argument("--fixed-abits", type=int, help="stem and head activation bits (default: --fixed-bits)")
    g.add_argument("--solver", choices=SOLVERS, default=d.solver)
    g.add_argument("--solver-time", type=float, default=d.time_limit, help="solver time limit, seconds")
    g.add_argument("--sensitivity-cache", help="JSON file: reuse measured sensitivities at another budget")
    g.add_argument("--plot", help="PNG of the chosen bits and sensitivity per pack")
    _spread_args(g)


def _spread_args(g) -> None:
    g.add_argument("--workers", type=int, help="measure the sensitivity items as Ray tasks on a local cluster of "
                   "N CPUs (needs the [ray] extra; the numbers a 1-thread run gives)")
    g.add_argument("--address", help="measure the sensitivity items on the Ray cluster at auto or HOST:PORT")


def spread_of(a):
    """--workers / --address as a spread.Spread (None when neither is given)."""
    from .spread import Spread

    if a.workers is None and a.address is None:
        return None
    if a.workers is not None and a.workers < 1:
        raise UsageError("--workers must be at least 1")
    from .engine import RAY_HINT, have_ray

    if not have_ray():
        raise UsageError(f"--workers and --address measure on Ray, which is not installed: {RAY_HINT}")
    return Spread(a.workers, a.address)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="packptq", description="Post-training quantization of ONNX models "
                                 "to QDQ ONNX, validated in onnxruntime.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize MODEL.onnx with calibration data")
    q.add_argument("model")
    q.add_argument("--calib", required=True, help=".npz (one array per input), .npy, or image folder")
    q.add_argument("-o", "--output", required=True)
    q.add_argument("--wbits", type=int, default=8, help="weight bits, 2..8 (default 8)")
    q.add_argument("--abits", type=int, default=8, help="activation bits, 2..8 or 16 (default 8)")
    q.add_argument("--method", default="pack", choices=METHODS,
                   help="rtn: round to nearest; adaround: layer-wise; block: BRECQ/QDrop blocks; "
                   "pack: Pack-PTQ packs (default)")
    q.add_argument("--eval", help="evaluation data; prints the validation table (labels from the "
                   "npz key 'labels' or --labels)")
    q.add_argument("--labels", help=".npy of integer class labels for --eval")
    q.add_argument("--report", help="write the JSON report here")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", choices=DEVICES, default="cpu")
    q.add_argument("--batch-size", type=int, help="samples per batch (default 32, or all when fewer)")
    q.add_argument("--calib-samples", type=int, default=1024, help="use at most this many samples")
    q.add_argument("--storage", choices=STORAGES, default="int8",
                   help="int8: weights in int8 containers (fast, fused by onnxruntime); packed: INT4/INT2 "
                   "initializers for <=4-bit weights (small files, opset 21/25, runs unfused)")
    q.add_argument("--strict", action="store_true",
                   help="an op with no torch converter is an error (default: it runs in onnxruntime, float)")
    q.add_argument("--no-output-quant", action="store_true",
                   help="quantize layer inputs only (no 8-bit output quantizers; onnxruntime then cannot "
                   "fuse layers into integer kernels)")
    q.add_argument("--no-joins", action="store_true",
                   help="keep residual Adds float (default: an Add between quantized layers runs as "
                   "QLinearAdd with 8-bit inputs; see docs/METHOD.md, 'Integer joins')")
    q.add_argument("--no-bias-correction", action="store_true",
                   help="keep the float bias (default: subtract the mean output shift that quantizing "
                   "each weight causes on the calibration data)")
    q.add_argument("--target", action="append", default=[],
                   help="where the model will run, which sets the 8-bit weight range its integer kernels compute "
                   "exactly: any / x86-avx2 (default: [-64,63]), x86-vnni / arm64 / gpu ([-128,127]), or 'this' "
                   "(the CPU running packptq); or an accuracy to reach on --eval, e.g. agreement>=0.99, "
                   "cosine>=0.995, accuracy>=0.95, task>=0.9, metric>=X (both may be given)")
    q.add_argument("--guard", type=float, default=0.002, metavar="NSR",
                   help="an 8-bit activation quantizer that on its own costs the outputs more than this share "
                   "of their energy stays float (each measured alone, one forward pass each); a first-order "
                   "estimate picks each one's range (searched or min-max) (default 0.002; 0: both off; a float "
                   "input runs its conv float: trade speed for accuracy here)")
    q.add_argument("--softmax-quant", choices=SOFTMAX_QUANT, default="uniform",
                   help="range of the probabilities entering attention's probs @ v: uniform (Lp search on the "
                   "probabilities, default) or focus (the interval that minimises the error of probs @ v)")
    q.add_argument("--kernels", choices=KERNELS, default="auto",
                   help="auto (default): a conv whose onnxruntime float kernel is measured faster on this machine "
                   "than its integer one runs float, on its b-bit weights; integer: every conv runs onnxruntime's "
                   "integer kernel, the same export on every machine (see docs/METHOD.md, 'Kernel choice')")
    q.add_argument("--full-range-weights", action="store_true",
                   help="8-bit weights in [-128,127] whatever the target (not exact on AVX2 CPUs without VNNI)")
    _task_args(q)
    _recon_args(q)
    _mixed_args(q)
    _data_args(q)
    _shape_arg(q)

    v = sub.add_parser("validate", help="compare a float and a quantized model in onnxruntime")
    v.add_argument("float_model")
    v.add_argument("quant_model")
    v.add_argument("--data", required=True)
    v.add_argument("--labels")
    v.add_argument("--batch-axis", action="append", default=[], metavar="NAME:AXIS",
                   help="the axis of an input that holds the samples, e.g. state:1")
    v.add_argument("--report")
    v.add_argument("--device", choices=DEVICES, default="cpu")
    _task_args(v)
    _data_args(v)

    s = sub.add_parser("sweep", help="run many quantize jobs from a TOML file (Ray when installed), then a "
                       "results table and plots")
    s.add_argument("sweep_file", metavar="SWEEP.toml")
    s.add_argument("-o", "--output", required=True, help="folder: one subfolder per job, results.md/.json, plots")
    s.add_argument("--address", help="join an existing Ray cluster: auto, or HOST:PORT (default: a local "
                   "cluster started here with this machine's cores)")
    s.add_argument("--workers", type=int, help="CPUs of the local Ray cluster (default: all cores)")
    s.add_argument("--no-ray", action="store_true", help="run jobs one after another in processes")
    s.add_argument("--retry-failed", action="store_true", help="run jobs that failed last time again "
                   "(default: their error is kept; finished jobs are never rerun)")

    i = sub.add_parser("inspect", help="describe a model (and its packptq annotations)")
    i.add_argument("model")
    i.add_argument("--json", action="store_true", help="print a JSON object instead of tables")
    i.add_argument("--calib", help="with calibration data: blocks, Hessian-guided scores and packs")
    i.add_argument("--runtime", action="store_true", help="what onnxruntime runs after its graph optimisation: "
                   "integer and float nodes per op, and the float nodes left between Dequantize- and QuantizeLinear")
    i.add_argument("--wbits", type=int, default=4, help="bits at which blocks are scored (default 4)")
    i.add_argument("--abits", type=int, default=4, help="activation bits for scoring (default 4)")
    i.add_argument("--max-pack-blocks", type=int, default=Options.max_pack_blocks, metavar="K",
                   help=f"most blocks per pack (default {Options.max_pack_blocks}; 0: no cap)")
    i.add_argument("--plot", help="write a PNG of scores per block with pack boundaries (with --sensitivity: "
                   "Omega per pack and option, and the costliest layers)")
    i.add_argument("--sensitivity", action="store_true", help="with --calib: each pack, and each layer alone, "
                   "quantized at every bit option; Omega and output cosine, layers ranked (docs/METHOD.md)")
    i.add_argument("--wbits-options", type=_ints, default=(2, 3, 4, 8), help="for --sensitivity (default 2,3,4,8)")
    i.add_argument("--abits-options", type=_ints, default=(4, 8, 16), help="for --sensitivity (default 4,8,16)")
    i.add_argument("--sensitivity-cache", help="JSON file: reuse the measured table when nothing changed")
    _spread_args(i)
    i.add_argument("--batch-size", type=int, help="samples per batch (default 32, or all when fewer)")
    i.add_argument("--calib-samples", type=int, default=256)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--device", choices=DEVICES, default="cpu")
    _data_args(i)
    _shape_arg(i)
    return ap


def _image_opts(a) -> dict:
    return {"image_size": a.image_size, "mean": a.mean, "std": a.std, "layout": a.layout}


def _targets(a) -> tuple[str, object]:
    """--target values: one hardware name (default any) and at most one accuracy target."""
    from . import accuracy

    hw = [t for t in a.target if not accuracy.is_target(t)]
    acc = [t for t in a.target if accuracy.is_target(t)]
    if len(hw) > 1 or len(acc) > 1 or (acc and a.max_drop is not None):
        raise UsageError("give at most one hardware --target and one accuracy target (--target METRIC>=X "
                         "or --max-drop)")
    goal = accuracy.parse(acc[0]) if acc else None
    if a.max_drop is not None:
        goal = accuracy.from_drop(a.max_drop)
    return (hw[0] if hw else "any"), goal


def _mixed_opts(a, goal=None) -> MixedOptions:
    from .solvers.ilp import parse_budget, parse_count

    if a.budget and a.avg_wbits:
        raise UsageError("give either --budget or --avg-wbits, not both")
    check_bit_options((*a.wbits_options, *([a.fixed_bits] if a.fixed_bits is not None else [])),
                      (*(a.abits_options or ()), *([a.fixed_abits] if a.fixed_abits is not None else [])))
    if a.avg_wbits is not None and not 2 <= a.avg_wbits <= 8:
        raise UsageError(f"--avg-wbits must be between 2 and 8, got {a.avg_wbits}")
    if a.avg_abits is not None and not 2 <= a.avg_abits <= 16:
        raise UsageError(f"--avg-abits must be between 2 and 16, got {a.avg_abits}")
    return MixedOptions(budget=parse_budget(a.budget) if a.budget else None, avg_wbits=a.avg_wbits,
                        avg_abits=a.avg_abits, bops=parse_count(a.bops, "--bops") if a.bops else None,
                        wbits=a.wbits_options, abits=a.abits_options,
                        fixed_bits=MixedOptions.fixed_bits if a.fixed_bits is None else a.fixed_bits,
                        fixed_abits=a.fixed_abits,
                        solver=a.solver, time_limit=a.solver_time, cache=a.sensitivity_cache, target=goal,
                        spread=spread_of(a))


def quantize_options(a):
    """quantize's parsed arguments as pipeline Options, every check that needs no file made (the
    sweep checks each job with this before any job starts)."""
    from .options import check_options

    hw, goal = _targets(a)
    recon = ReconOptions(iters=a.iters, iters_total=a.iters_total, batch_size=a.batch_size or DEFAULT_BATCH,
                         lr_round=a.lr_round, lr_scale=a.lr_scale, round_weight=a.round_weight,
                         drop_prob=a.drop_prob, compile=not a.no_compile, lowrank=a.lowrank,
                         lowrank_form=a.lowrank_form, lr_lowrank=a.lr_lowrank)
    opts = Options(wbits=a.wbits, abits=a.abits, method=a.method, seed=a.seed, device=a.device,
                   batch_size=a.batch_size, calib_samples=a.calib_samples,
                   reduce_range=targets.reduce_range(hw) and not a.full_range_weights,
                   target=targets.this_machine() if hw == "this" else hw, image=_image_opts(a), recon=recon,
                   max_pack_blocks=pack_cap(a.max_pack_blocks), resume=a.resume, mixed=_mixed_opts(a, goal),
                   storage=a.storage, output_bits=None if a.no_output_quant else 8, strict=a.strict,
                   joins=not a.no_joins, input_shapes=_shapes(a), batch_axes=_axes(a),
                   bias_correction=not a.no_bias_correction, task=a.task,
                   metric=a.metric, guard=a.guard, softmax_quant=a.softmax_quant, kernels=a.kernels)
    if not opts.mixed.enabled and (a.fixed_bits is not None or a.fixed_abits is not None):
        opts.stem_head = (a.fixed_bits or a.wbits, a.fixed_abits or a.fixed_bits or a.abits)
    if (a.plot or opts.mixed.spread) and not opts.mixed.enabled:
        what = "--plot shows the mixed-precision choice" if a.plot else \
            "--workers / --address spread the mixed-precision sensitivity measurement"
        raise UsageError(f"{what}: give a limit (--budget, --avg-wbits, --avg-abits, --bops) or an accuracy --target")
    check_options(opts)
    return opts


def cmd_quantize(a) -> int:
    from .exporters.files import save_json
    from .pipeline import quantize

    opts = quantize_options(a)
    report = quantize(a.model, a.calib, a.output, opts, a.eval, a.labels, log=print)
    if a.plot:
        from .exporters.plots import plot_bits
        plot_bits(a.plot, [(pk.id, *report.mixed_precision.chosen(pk.id)) for pk in report.packs])
    if a.report:
        save_json(report.to_dict(), a.report)
    wb = report.weight_bytes
    worst = max(p["max_code_diff"] for p in report.parity)
    over = max(p["over_one"] for p in report.parity)
    branch = f" + {wb['lowrank_branch'] / 1e3:.1f} kB float low-rank branches" if wb.get("lowrank_branch") else ""
    print(f"wrote {a.output}: weights {wb['float32'] / 1e3:.1f} kB -> {wb['quantized'] / 1e3:.1f} kB{branch}; "
          f"onnxruntime vs simulation: max {worst} output code(s) apart"
          + (f" ({100 * over:.3f}% of values more than one)" if worst > 1 else "")
          + f", layer by layer max {report.parity_layers['max_code_diff']}"
          + f"; {report.seconds['total']:.1f} s")
    err = report.evaluation_error
    if err:
        print(f"packptq: {'error' if err['usage'] else 'internal error'} in --eval (the model"
              f"{' and the report are' if a.report else ' is'} written): {err['message']}", file=sys.stderr)
        return 2 if err["usage"] else 1
    return 0


def cmd_validate(a) -> int:
    from . import data, validate
    from .exporters.files import save_json
    from .onnx_import import load
    from .shapes import specs
    from .tasks import load_metric

    metric = load_metric(a.metric) if a.metric else None
    from dataclasses import replace

    from .layout import batch_axes, samples_first

    f, q = load(a.float_model), load(a.quant_model)
    axes = batch_axes(specs(f.original), _axes(a))
    feeds, labels = data.load(a.data, [replace(s, batch_axis=axes.get(s.name, 0)) for s in specs(f.original)],
                              log=print, **_image_opts(a))
    if a.labels:
        labels = data.load_array(a.labels)
    names, ref, got = validate.run_both(samples_first(f.original, axes), samples_first(q.original, axes),
                                        feeds, a.device)
    metrics = validate.compare_outputs(names, ref, got, labels)
    print(validate.table(metrics))
    scores = validate.task_scores(a.task, metric, ref, got, feeds)
    print(validate.task_line(scores))
    if a.report:
        save_json({"float": a.float_model, "quantized": a.quant_model, "data": a.data,
                   "validation": validate.as_dicts(metrics), "task": scores}, a.report)
    return 0


def cmd_sweep(a) -> int:
    from .sweep import sweep

    if a.no_ray and a.address:
        raise UsageError("--no-ray runs on this machine: leave out --address")
    res = sweep(a.sweep_file, a.output, address=a.address, workers=a.workers,
                backend="process" if a.no_ray else "ray" if a.address else "auto", retry_failed=a.retry_failed)
    return 1 if res["failed"] else 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    a = parser().parse_args([x for x in argv if x != "--debug"])
    a.debug = debug
    try:
        if a.cmd == "inspect":
            from .describe import cmd_inspect
            return cmd_inspect(a)
        return {"quantize": cmd_quantize, "validate": cmd_validate, "sweep": cmd_sweep}[a.cmd](a)
    except UsageError as exc:
        if a.debug:
            traceback.print_exc()
        print(f"packptq: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("packptq: interrupted; finished units are checkpointed: rerun with --resume", file=sys.stderr)
        return 130
    except Exception as exc:  # internal failure: one line unless --debug
        if a.debug:
            traceback.print_exc()
        msg = str(exc).splitlines()[0][:300] if str(exc) else ""
        print(f"packptq: internal error: {type(exc).__name__}: {msg} (rerun with --debug for the "
              "traceback and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
