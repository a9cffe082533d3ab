"""Input shapes: taken from the data, batch freed where exact, the file's dynamic axes kept on export.

Calibration, reconstruction and parity run at one definite shape per input (packs, unit caches and
the fixed-shape torch graph need it). Where the model declares a dim dynamic and the calibration
data makes it definite (a detector exported with dynamic height and width, calibrated on 640x640
crops), that size is used with no flag; `--input-shape` stays an override. The exported model
gets back the graph inputs and outputs the file declared (same symbolic names), so it runs at
every size the float model runs at. docs/METHOD.md, "Shapes".

A graph whose batch dim is fixed (1 is common in detector exports) is freed to a dynamic batch
when that is exact: onnxruntime runs the freed graph on several samples at once and must give what
the file gives on them one at a time. Otherwise every run goes in batches of the fixed size.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import onnx

from .onnx_import import InputSpec, _shape

SECOND_SIZE = 0.75  # validation at a second size: dynamic spatial / sequence dims scaled by this


@dataclass
class ShapePlan:
    """How the model's input shapes were settled (written into the report)."""
    from_data: dict = field(default_factory=dict)  # input -> dims taken from the calibration data
    fixed_batch: int | None = None                 # batch dim the file fixes (None: dynamic)
    batch_freed: bool = False                      # fixed batch made dynamic (checked exact)
    run_batch: int | None = None                   # every run goes in batches of this size

    def describe(self) -> str:
        parts = []
        for name, dims in self.from_data.items():
            parts.append(f"input '{name}' shape {_fmt(dims)} taken from the calibration data")
        if self.fixed_batch is not None:
            parts.append(f"batch fixed at {self.fixed_batch} in the graph: "
                         + ("freed (onnxruntime gives the same outputs on batched samples)" if self.batch_freed
                            else f"not free (outputs change when batched): every run in batches of "
                                 f"{self.run_batch}"))
        return "; ".join(parts)


def _fmt(dims) -> str:
    return "x".join("N" if d is None else str(d) for d in dims)


def specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs as the file declares them (dynamic dims as names or None)."""
    inits = {i.name for i in model.graph.initializer}
    return [InputSpec(i.name, _shape(i), onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type),
                      i.type.tensor_type.HasField("shape") and not i.type.tensor_type.shape.dim)
            for i in model.graph.input if i.name not in inits]


def _static(d) -> bool:
    return isinstance(d, int) and d > 0


def from_data(inputs: list[InputSpec], feeds: dict) -> dict:
    """name -> dims for --input-shape semantics (None = dynamic batch) where the data settles a
    dynamic non-batch dim (or a shape the graph does not give at all)."""
    out = {}
    for spec in inputs:
        a = feeds[spec.name]
        if spec.shape and all(_static(d) for d in spec.shape[1:]):
            continue
        if a.ndim < 1:
            continue
        batch = spec.shape[0] if spec.shape and _static(spec.shape[0]) else None
        out[spec.name] = [batch] + list(a.shape[1:])
    return out


def fixed_batch(inputs: list[InputSpec]) -> int | None:
    dims = {s.shape[0] for s in inputs if s.shape and _static(s.shape[0])}
    return min(dims) if dims else None


def free_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy whose graph inputs and outputs have a dynamic first dim where it was `batch`."""
    m = copy.deepcopy(model)
    for vi in list(m.graph.input) + list(m.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value == batch:
            dims[0].Clear()
            dims[0].dim_param = "N"
    del m.graph.value_info[:]
    return m


def batch_is_free(model: onnx.ModelProto, batch: int, feeds: dict, session) -> bool:
    """onnxruntime on the freed graph with 2-4 batches at once equals the file one batch at a time."""
    from .data import n_samples, rows

    n = n_samples(feeds)
    k = min(n // batch, 4) * batch
    if k < 2 * batch:
        return False
    probe = {name: rows(v, 0, k) for name, v in feeds.items()}
    try:
        ref_sess = session(model)
        runs = [ref_sess.run(None, {nm: rows(v, i, i + batch) for nm, v in probe.items()}) for i in range(0, k, batch)]
        ref = [np.concatenate(r) for r in zip(*runs)]
        got = session(free_batch(model, batch)).run(None, probe)
    except Exception:
        return False
    for a, b in zip(ref, got):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return False
        if np.issubdtype(a.dtype, np.floating):
            tol = 1e-5 + 1e-4 * float(np.abs(a).max(initial=0.0))
            if not np.allclose(a, b, rtol=1e-4, atol=tol):
                return False
        elif not np.array_equal(a, b):
            return False
    return True


def restore_io(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Give the exported graph the inputs' and outputs' types the file declared (in place)."""
    declared = {vi.name: vi for vi in list(original.graph.input) + list(original.graph.output)}
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name in declared:
            vi.type.CopyFrom(declared[vi.name].type)
    del model.graph.value_info[:]


def second_size(declared: list[InputSpec], feeds: dict) -> dict | None:
    """The eval feeds at another size where the file leaves spatial or sequence dims dynamic:
    images (float, rank 4) resized bilinearly, other inputs cropped; None when nothing is dynamic.
    Dims sharing one symbolic name get the same new size."""
    new = {}
    for spec in declared:
        for axis, d in enumerate(spec.shape[1:], start=1):
            if not _static(d):
                key = d if isinstance(d, str) else (spec.name, axis)
                new.setdefault(key, _smaller(feeds[spec.name], axis))
    if not new:
        return None
    out = {}
    for spec in declared:
        a = feeds[spec.name]
        sizes = list(a.shape)
        for axis, d in enumerate(spec.shape[1:], start=1):
            if not _static(d):
                sizes[axis] = new[d if isinstance(d, str) else (spec.name, axis)]
        out[spec.name] = _resize(a, sizes)
    return out


def _smaller(a: np.ndarray, axis: int) -> int:
    """3/4 of the size; image height / width on the largest stride (<= 32) the size is a multiple of."""
    size = a.shape[axis]
    if not (a.ndim == 4 and axis >= 2 and np.issubdtype(a.dtype, np.floating)):
        return max(1, int(size * SECOND_SIZE))
    step = next((m for m in (32, 16, 8, 4, 2) if size % m == 0), 1)
    target = int(size * SECOND_SIZE // step) * step
    return target if 0 < target < size else size + step


def _resize(a: np.ndarray, sizes: list) -> np.ndarray:
    if list(a.shape) == sizes:
        return a
    if a.ndim == 4 and np.issubdtype(a.dtype, np.floating) and list(a.shape[:2]) == sizes[:2]:
        import torch

        t = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(a, np.float32)),
                                            size=tuple(sizes[2:]), mode="bilinear", align_corners=False)
        return np.ascontiguousarray(t.numpy().astype(a.dtype))
    out = a
    for axis, s in enumerate(sizes):
        if s < out.shape[axis]:
            out = np.take(out, np.arange(s), axis=axis)
        elif s > out.shape[axis]:
            reps = -(-s // out.shape[axis])
            out = np.take(np.concatenate([out] * reps, axis=axis), np.arange(s), axis=axis)
    return np.ascontiguousarray(out)
