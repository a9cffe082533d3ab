"""onnxruntime access: one place that imports it, picks providers and builds sessions."""
from __future__ import annotations

import sys
import time

import numpy as np

from .errors import UsageError


def ort():
    try:
        import onnxruntime
    except ImportError:
        raise UsageError("onnxruntime is not installed: pip install 'packptq-onnx[cpu]' "
                         "(or 'packptq-onnx[gpu]' on a CUDA machine; never both)") from None
    return onnxruntime


_warned = []


def providers(device: str = "cpu") -> list[str]:
    """CUDA execution provider for --device cuda when onnxruntime has it (onnxruntime-gpu), else the CPU
    one: torch still learns on the GPU, onnxruntime validates on the CPU (said once)."""
    avail = ort().get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" in avail:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if not _warned:
            _warned.append(True)
            print("note: onnxruntime has no CUDA execution provider (pip install onnxruntime-gpu); "
                  "onnxruntime runs on the CPU", file=sys.stderr)
    return ["CPUExecutionProvider"]


def with_outputs(model, tensors):
    """A copy of `model` that also returns the named inner tensors (those not outputs already), so one
    session run reads them beside the model's outputs."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors if t not in have)
    return m


def session(model, device: str = "cpu", threads: int = 0, optimize: bool = True):
    """An InferenceSession for a ModelProto or a path."""
    rt = ort()
    so = rt.SessionOptions()
    so.log_severity_level = 4  # failures surface as exceptions, turned into one-line messages
    if threads:
        so.intra_op_num_threads = threads
    if not optimize:
        so.graph_optimization_level = rt.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    kw = {}
    if not isinstance(model, (str, bytes)) and has_int2(model):
        # onnxruntime's QDQ fusion does not handle INT2 weights: run them unfused
        kw["disabled_optimizers"] = ["QDQSelectorActionTransformer"]
    try:
        return rt.InferenceSession(data, so, providers=providers(device), **kw)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0][:300]}") from None


def has_int2(model) -> bool:
    import onnx

    kinds = {getattr(onnx.TensorProto, "INT2", -1), getattr(onnx.TensorProto, "UINT2", -1)}
    return any(i.data_type in kinds for i in model.graph.initializer)


def run(sess, feeds: dict, batch_size: int = 64) -> list:
    """Run a session over feeds batch by batch; returns one array per output, batches joined on
    the output's sample axis. A graph that fixes its batch dim is run in batches of that size."""
    fixed = [d.shape[0] for d in sess.get_inputs() if d.shape and isinstance(d.shape[0], int) and d.shape[0] > 0]
    if fixed:
        batch_size = min(fixed)

    from .data import concat_samples, n_samples, rows, run_batch

    n = n_samples(feeds)
    if not fixed:
        batch_size = run_batch(feeds, batch_size)
    outs, counts = None, []
    for i in range(0, n, batch_size):
        res = sess.run(None, {k: rows(v, i, i + batch_size) for k, v in feeds.items()})
        counts.append(min(batch_size, n - i))
        outs = [[r] for r in res] if outs is None else [o + [r] for o, r in zip(outs, res)]
    return [concat_samples(o, counts) for o in outs]


def paired_latency(float_model: str, model: str | None, feeds: dict, runs: int) -> tuple[float, float]:
    """Median seconds per batch-1 run at 1 thread of the float model and of `model` (None: the float
    model itself), timed alternately run by run so that load changes on a shared machine hit both."""
    sf = session(float_model, threads=1)
    sq = sf if model is None else session(model, threads=1)
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
