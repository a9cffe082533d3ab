"""onnxruntime latency of float vs exported models, and file sizes of both storage modes.

    python bench/latency.py [--model M.onnx --calib C.npz] [--runs 50] [--out bench/out]
Variants: uniform W8A8, W4A4, W3A3 (RTN; latency does not depend on the rounding method) and
mixed precision at 3.5 average weight bits (2/3/4/8 per pack, A4 or A8; stem and head W4A4), with the
product's default kernel choice (packptq_onnx.kernels); "W8A8 integer" and "W3A3 integer" are the same
exports with `kernels="integer"` (every conv on onnxruntime's integer kernel), for the same-run comparison;
"all Clips": every sub-8-bit activation keeps its Clip (the export before the writer left out those that the
tensor's range makes idle: write_qdq's every_clip).
Prints a markdown table; speed-ups are ratios measured in the same run.
"""
import argparse
import contextlib
import functools
import os
import time

import numpy as np

from packptq_onnx import data, runtime
from packptq_onnx.errors import UsageError
from packptq_onnx.mixed import MixedOptions
from packptq_onnx.onnx_import import load
from packptq_onnx.pipeline import Options, quantize

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLES = os.path.join(os.path.dirname(HERE), "samples")
ORT = "onnxruntime W8A8"
REWRITTEN = "float, hard-swish fused"
VARIANTS = {"W8A8": dict(wbits=8, abits=8), "W4A8": dict(wbits=4, abits=8), "W4A4": dict(wbits=4, abits=4),
            "W3A3": dict(wbits=3, abits=3),
            "mixed 3.5b A4-8": dict(wbits=4, abits=8, mixed=MixedOptions(avg_wbits=3.5, fixed_bits=4)),
            "W8A8 guard 0": dict(wbits=8, abits=8, guard=0.0),
            "W8A8 integer": dict(wbits=8, abits=8, kernels="integer"),
            "W3A3 integer": dict(wbits=3, abits=3, kernels="integer"),
            "W4A4 all Clips": dict(wbits=4, abits=4, clips=True), "W3A3 all Clips": dict(wbits=3, abits=3, clips=True)}


def ort_w8a8(model_path: str, calib: dict, out: str) -> str:
    """onnxruntime's own quantize_static W8A8 (QDQ, MinMax, uint8 activations, per-channel int8
    weights, after quant_pre_process), the export users compare us with."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from quantizers import _Reader  # bench/quantizers.py: the benchmark's calibration batches

    pre = out + ".pre.onnx"
    try:
        quant_pre_process(model_path, pre, skip_symbolic_shape=True)
        sources = [pre, model_path]
    except Exception:
        sources = [model_path]
    error = None
    for src in sources:  # its output after quant_pre_process may not load (the direction classifier's)
        try:
            quantize_static(onnx.load(src), out, _Reader(calib, 8), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
            error = None
            break
        except Exception as exc:
            error = exc
    if os.path.exists(pre):
        os.unlink(pre)
    if error is not None:
        raise error
    return out


@contextlib.contextmanager
def every_clip(on: bool):
    """quantize's writer keeps every sub-8-bit Clip (write_qdq's every_clip; for the same-run
    comparison with its default)."""
    from packptq_onnx.exporters import qdq
    saved = qdq.write_qdq
    if on:
        qdq.write_qdq = functools.partial(saved, every_clip=True)
    try:
        yield
    finally:
        qdq.write_qdq = saved


def latencies(models: dict, feeds, threads: int, runs: int) -> dict:
    """Median latency per model, the models timed in turn within each round: drift of a shared
    machine (other tenants, frequency) hits all of them alike, so the ratios stay comparable."""
    sessions = {k: runtime.session(m, threads=threads) for k, m in models.items()}
    for sess in sessions.values():
        for _ in range(3):
            sess.run(None, feeds)
    times = {k: [] for k in sessions}
    for _ in range(runs):
        for k, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(SAMPLES, "digits_resnet.onnx"))
    ap.add_argument("--calib", default=os.path.join(SAMPLES, "calib.npz"))
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    ap.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    ap.add_argument("--no-ort", action="store_true", help="leave out onnxruntime's quantize_static W8A8")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    os.environ.setdefault("PACKPTQ_QUIET", "1")
    imp = load(a.model)
    calib, _ = data.load(a.calib, imp.inputs)
    name = os.path.splitext(os.path.basename(a.model))[0]
    models = {"float": (imp.original, os.path.getsize(a.model), os.path.getsize(a.model))}
    if any(n.op_type == "HardSwish" for n in imp.model.graph.node) and not any(
            n.op_type == "HardSwish" for n in imp.original.graph.node):
        # the import's graph rewrites (hard-swish chains fused) speed up the float model too: timed apart,
        # so the gain of quantization itself shows
        size = len(imp.model.SerializeToString())
        models[REWRITTEN] = (imp.model, size, size)
    skipped = []
    for label in a.variants.split(","):
        kw = dict(VARIANTS[label])
        all_clips = kw.pop("clips", False)
        sizes = {}
        for storage in ("int8", "packed"):
            path = os.path.join(a.out, f"{name}_{label.replace(' ', '_')}_{storage}.onnx")
            o = Options(method="rtn", calib_samples=a.calib_samples, storage=storage, **kw)
            try:
                with every_clip(all_clips):
                    quantize(a.model, a.calib, path, o, log=lambda *_: None)
            except UsageError as exc:  # e.g. a mixed budget below what 8-bit stem and head alone need
                skipped.append(f"{label}: {exc}")
                break
            sizes[storage] = os.path.getsize(path)
            if storage == "int8":
                import onnx
                int8_model = onnx.load(path)
        if len(sizes) == 2:
            models[label] = (int8_model, sizes["int8"], sizes["packed"])
    if not a.no_ort:
        import onnx
        path = os.path.join(a.out, f"{name}_ort_W8A8.onnx")
        try:
            ort_w8a8(a.model, {k: v[:a.calib_samples] for k, v in calib.items()}, path)
            models[ORT] = (onnx.load(path), os.path.getsize(path), os.path.getsize(path))
        except Exception as exc:  # onnxruntime's quantizer refuses some models
            skipped.append(f"{ORT}: {str(exc).splitlines()[0][:200]}")
    rows = []
    batches = [int(b) for b in a.batches.split(",")]
    for b in batches:
        feeds = {k: np.repeat(v[:1], b, 0) if len(v) < b else v[:b] for k, v in calib.items()}
        for t in (1, 2):
            runs = a.runs if b == 1 else max(5, a.runs // b)
            lat = latencies({k: m for k, (m, _, _) in models.items()}, feeds, t, runs)
            for label, (_, s8, sp) in models.items():
                rows.append((label, b, t, lat[label] * 1e3, lat["float"] / lat[label], s8, sp))
    print(f"model {name}; median of {a.runs} runs at batch 1, max(5, {a.runs} // batch) at larger batches, the "
          "models timed in turn each round; speed-up = float latency / model latency, same run\n")
    print("| model | batch | threads | latency ms | speed-up vs float | file bytes (int8) | file bytes (packed) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.3f} | {r[4]:.2f}x | {r[5]:,} | {r[6]:,} |")
    print("\nPacked files, bytes by content: weights (at storage width: 3 bits take INT4), per-channel "
          "weight scales + int32 biases + bias scales, everything else (activation Q/DQ parameters, "
          "graph, metadata); budget = weight bits the pipeline counts\n")
    print("| model | file | weights | per-channel | rest | counted weight bytes | file / counted |")
    print("|---|---|---|---|---|---|---|")
    for label in models:
        if label in ("float", ORT, REWRITTEN):
            continue
        import onnx
        from packptq_onnx.exporters import qdq
        path = os.path.join(a.out, f"{name}_{label.replace(' ', '_')}_packed.onnx")
        m = onnx.load(path)
        part = {"w": 0, "c": 0}
        for t in m.graph.initializer:
            constants = any(x in t.name for x in (".w_scale", ".b_int32", ".b_scale"))
            key = "w" if ".w_int" in t.name else ("c" if constants else None)
            if key:
                part[key] += t.ByteSize()
        size, counted = os.path.getsize(path), qdq.weight_bytes(m)
        print(f"| {label} | {size:,} | {part['w']:,} | {part['c']:,} | {size - part['w'] - part['c']:,} | "
              f"{counted:,.0f} | {size / counted:.2f} |")
    from packptq_onnx import ortview
    print("\nWhat onnxruntime runs after its optimisation (packptq inspect OUT --runtime): nodes by kind, and "
          "the float nodes left between a DequantizeLinear and a QuantizeLinear\n")
    print("| model | integer | (de)quantize | float | float between DQ and Q |")
    print("|---|---|---|---|---|")
    for label, (m, _, _) in models.items():
        import onnx
        path = os.path.join(a.out, f"{name}_runtime_view.onnx")
        onnx.save(m, path)
        sm = ortview.summary(path)
        k, fb = sm["by_kind"], sm["float_between_qdq"]
        ops = ", ".join(f"{op} {c}" for op, c in sorted(fb["by_op"].items(), key=lambda x: -x[1]))
        left = f"{fb['count']} ({ops})" if ops else "0"
        print(f"| {label} | {k['integer']} | {k['conversion']} | {k['float']} | {left} |")
    for line in skipped:
        print(f"\nskipped {line}")


if __name__ == "__main__":
    main()
