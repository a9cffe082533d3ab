"""Evaluation / calibration data of a benchmark task: model inputs, .npz feeds, labels, overlap."""
from __future__ import annotations

import hashlib
import json

import numpy as np


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
        axes = sample_axes(model_path)
        feeds = {k: v if np.ndim(v) == 0 else np.take(v, np.arange(min(n, v.shape[axes.get(k, 0)])),
                                                      axis=axes.get(k, 0)) for k, v in feeds.items()}
        labels = None if labels is None else labels[:n]
    return feeds, labels


def sample_axes(model_path: str) -> dict:
    """Inputs whose samples are not on axis 0, as packptq reads them from the graph."""
    import onnx

    from packptq_onnx.layout import batch_axes
    from packptq_onnx.shapes import specs

    return batch_axes(specs(onnx.load(model_path, load_external_data=False)))


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
