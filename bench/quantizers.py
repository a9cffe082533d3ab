"""Quantizing one benchmark row: onnxruntime's quantize_static or ours; weight bytes of a model."""
from __future__ import annotations

import os

import numpy as np
from feeds import load_feeds, model_inputs, sample_axes
from records import one_line
from rows import Row

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


class _Reader:
    """Calibration batches for onnxruntime, cut along each input's sample axis (an RNN state holds
    its samples on axis 1; a scalar input is passed whole), so both tools see the same samples."""

    def __init__(self, feeds: dict, batch: int, axes: dict | None = None):
        self.feeds, self.batch, self.i, self.axes = feeds, batch, 0, axes or {}
        self.n = next(v.shape[self.axes.get(k, 0)] for k, v in feeds.items() if np.ndim(v))

    def get_next(self):
        if self.i >= self.n:
            return None
        idx = np.arange(self.i, min(self.i + self.batch, self.n))
        d = {k: v if np.ndim(v) == 0 else np.take(v, idx, axis=self.axes.get(k, 0)) for k, v in self.feeds.items()}
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
        reader = _Reader(feeds, batch, sample_axes(info["model"]))
        quantize_static(onnx.load_from_string(blob), out_path, reader, quant_format=QuantFormat.QDQ,
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

    method = "pack" if row.mixed else row.method.split("-")[0]  # pack-fine, pack-cap4, rtn-fullrange, ...
    o = Options(reduce_range=not row.full_range, wbits=row.wbits, abits=row.abits, method=method, seed=cfg["seed"],
                calib_samples=cfg["calib_samples"], batch_size=min(cfg["batch_size"], cfg["calib_samples"]),
                recon=ReconOptions(iters_total=cfg["iters_total"], lowrank=row.lowrank, lowrank_form=row.lowrank_form,
                                   batch_size=min(cfg["batch_size"], cfg["calib_samples"])),
                softmax_quant=row.softmax_quant,
                # a row killed mid-reconstruction continues from OUT.onnx.ckpt when rerun
                resume=True, device=cfg.get("device", "cpu"))
    shapes = {}
    calib, _ = load_feeds(info["calib"], info["model"], 1)
    for name, dims in model_inputs(info["model"]):
        if any(not (isinstance(d, int) and d > 0) for d in dims[1:]):  # dynamic non-batch dims: fix from the data
            shapes[name] = [None] + list(calib[name].shape[1:])
    if shapes:
        o.input_shapes = shapes
    if row.fixed_bits:
        o.stem_head = (row.fixed_bits, row.fixed_bits)
    if row.max_pack_blocks is not None:  # else the product's default cap; 0: no cap (the paper's rule)
        o.max_pack_blocks = row.max_pack_blocks or None
    if row.mixed:
        ab = tuple(sorted({row.abits, 8}))
        # stem and head at the uniform row's weight bits: the same budget and treatment as pack-W{w}A4
        # activation bits traded between packs at the uniform row's average (--avg-abits)
        o.mixed = MixedOptions(avg_wbits=float(row.wbits), avg_abits=float(row.abits), wbits=(2, 3, 4, 8), abits=ab,
                               fixed_bits=row.wbits, fixed_abits=row.abits,
                               cache=out_path + ".sensitivity.json")
    rep = quantize(info["model"], info["calib"], out_path, o, log=lambda *_: None)
    parity = rep.parity
    res = {"weight_bytes": rep.weight_bytes["quantized"], "report_seconds": rep.seconds,
           "parity_ok": all(p["ok"] for p in parity), "parity_max_code_diff": max((p["max_code_diff"] for p in parity),
                                                                                default=None),
           "parity_max_abs_diff": max((p["max_abs_diff"] for p in parity), default=None),
           "parity_over_one": max((p["over_one"] for p in parity), default=None),
           "parity_layers": rep.parity_layers.get("max_code_diff")}
    if rep.reconstruction is not None:
        units = rep.reconstruction.units
        res["recon_iters"] = sum(u.iters for u in units)
        res["recon_units"] = len(units)
        res["recon_losses"] = [(u.name, u.loss_before, u.loss_after, u.loss_learned) for u in units]
        res["recon_seconds"] = rep.reconstruction.seconds
        res["recon_unit_seconds"] = [u.seconds for u in units]
        res["recon_cache_mb"] = [u.cache_mb for u in units]
        res["recon_peak_rss_mb"] = [u.peak_rss_mb for u in units]
    if rep.packs:
        res["pack_blocks"] = [len(pk.blocks) for pk in rep.packs]
    if rep.mixed_precision is not None:
        mp = rep.mixed_precision
        res["mixed"] = {"budget_bytes": mp.budget_bytes, "counted_bytes": mp.counted_bytes,
                        "packs": [mp.chosen(pk.id)[:2] for pk in rep.packs]}
    return res
