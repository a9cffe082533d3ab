"""Calibration / evaluation data: .npz (one array per input name), .npy, a folder of .npz files (samples
of several shapes, grouped by shape), or a folder of images."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .errors import UsageError
from .onnx_import import InputSpec

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
LABELS_KEY = "labels"


def load(path: str, inputs: list[InputSpec], image_size: int | None = None, mean=None, std=None,
         layout: str = "NCHW", log=None) -> tuple[dict, np.ndarray | None]:
    """Returns ({input name: array}, labels or None), checked against the model's inputs.
    `log` hears which array feeds which input when the names differ."""
    if not os.path.exists(path):
        raise UsageError(f"data not found: {path}")
    labels = None
    if os.path.isdir(path) and npz_files(path):
        groups = load_groups(path, inputs, log)
        return groups[0].feeds, groups[0].labels
    if os.path.isdir(path):
        if len(inputs) != 1:
            raise UsageError("an image folder can only feed a one-input model; use an .npz")
        arrays = {inputs[0].name: _images(path, inputs[0], image_size, mean, std, layout)}
    elif path.endswith(".npy"):
        if len(inputs) != 1:
            raise UsageError(f"an .npy file can only feed a one-input model; this one has inputs "
                             f"{[i.name for i in inputs]}: use an .npz with one array per input")
        arrays = {inputs[0].name: load_array(path)}
    else:
        arrays, labels = _npz(path, inputs, log)
    feeds = {i.name: check(arrays[i.name], i, path) for i in inputs}
    counts = {k: len(v) for k, v in feeds.items() if v.ndim}
    if len(set(counts.values())) != 1:
        raise UsageError(f"{path}: inputs have different sample counts {counts}")
    if labels is not None and len(labels) != next(iter(counts.values())):
        raise UsageError(f"{path}: {len(labels)} labels for {next(iter(counts.values()))} samples")
    return feeds, labels


def _npz(path: str, inputs: list[InputSpec], log=None) -> tuple[dict, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        raise UsageError(f"cannot read {path} as .npz: {str(exc).splitlines()[0][:200]}") from None
    names, labels = {i.name for i in inputs}, None
    if LABELS_KEY in arrays and LABELS_KEY not in names:
        labels = np.asarray(arrays.pop(LABELS_KEY))
    if len(inputs) == 1 and len(arrays) == 1 and inputs[0].name not in arrays:
        key = next(iter(arrays))
        if log is not None:
            log(f"note: {os.path.basename(path)}: array '{key}' feeds input '{inputs[0].name}' (names differ)")
        arrays = {inputs[0].name: arrays[key]}
    missing, extra = names - set(arrays), set(arrays) - names
    if missing or extra:
        raise UsageError(f"{path}: arrays {sorted(arrays)} do not match the model inputs {sorted(names)}"
                         + (f" (missing {sorted(missing)})" if missing else "")
                         + (f" (unexpected {sorted(extra)})" if extra else ""))
    return arrays, labels


def npz_files(path: str) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.endswith(".npz"))


@dataclass
class Group:
    """Samples of one shape from a folder of .npz files."""
    shape: str                 # e.g. "3x64x96" (per input, samples axis left out)
    files: list
    feeds: dict
    labels: np.ndarray | None = None

    @property
    def n(self) -> int:
        return n_samples(self.feeds)


def load_groups(path: str, inputs: list[InputSpec], log=None) -> list[Group]:
    """A folder of .npz files (each one shape) -> groups of equal shape, most samples first.
    A plain .npz or .npy is one group."""
    if not (os.path.isdir(path) and npz_files(path)):
        feeds, labels = load(path, inputs, log=log)
        return [Group(_shape_key(feeds), [os.path.basename(path)], feeds, labels)]
    groups: dict[str, Group] = {}
    for f in npz_files(path):
        arrays, labels = _npz(os.path.join(path, f), inputs, log)
        feeds = {i.name: check(arrays[i.name], i, os.path.join(path, f)) for i in inputs}
        key = _shape_key(feeds)
        g = groups.setdefault(key, Group(key, [], {k: [] for k in feeds}, None))
        g.files.append(f)
        for k, v in feeds.items():
            g.feeds[k].append(v)
        if labels is not None:
            g.labels = labels if g.labels is None else np.concatenate([g.labels, labels])
    for g in groups.values():
        g.feeds = {k: np.concatenate(v) for k, v in g.feeds.items()}
    out = sorted(groups.values(), key=lambda g: -g.n)
    if len(out) > 1 and log is not None:
        log(f"note: {os.path.basename(os.path.normpath(path))}: samples in {len(out)} shapes: "
            + ", ".join(f"{g.shape} ({g.n} samples, {len(g.files)} files)" for g in out))
    return out


def _shape_key(feeds: dict) -> str:
    return "; ".join("x".join(map(str, v.shape[1:])) for v in feeds.values())


def load_array(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise UsageError(f"file not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise UsageError(f"cannot read {path} as .npy: {str(exc).splitlines()[0][:200]}") from None


def check(a: np.ndarray, spec: InputSpec, path: str) -> np.ndarray:
    a = np.asarray(a)
    if spec.scalar:  # a scalar input (a sample rate): the same for every sample
        if a.ndim:
            raise UsageError(f"{path}: input '{spec.name}' is a scalar (rank 0) in the model; give one value "
                             f"for all samples, not shape {list(a.shape)}")
        return np.asarray(a, dtype=spec.dtype)
    if a.size == 0 or a.ndim == 0:
        raise UsageError(f"{path}: input '{spec.name}' is empty")
    k = spec.batch_axis
    if spec.shape and a.ndim != len(spec.shape):
        raise UsageError(f"{path}: input '{spec.name}' has shape {list(a.shape)}, the model expects "
                         f"rank {len(spec.shape)} {_fmt(spec.shape, k)} (samples on axis {k})")
    for axis, (got, want) in enumerate(zip(a.shape, spec.shape)):
        if axis != k and isinstance(want, int) and want > 0 and got != want:
            raise UsageError(f"{path}: input '{spec.name}' has shape {list(a.shape)}, the model expects "
                             f"{_fmt(spec.shape, k)} (axis {axis}: {got} != {want})")
    a = np.moveaxis(a, k, 0) if k else a  # inside, samples come first (packptq_onnx.layout)
    if np.issubdtype(spec.dtype, np.floating):
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise UsageError(f"{path}: input '{spec.name}' has dtype {a.dtype}, expected {spec.dtype}")
        a = a.astype(spec.dtype, copy=False)
        bad = ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
        if bad.any():
            raise UsageError(f"{path}: input '{spec.name}' sample {int(np.argmax(bad))} contains NaN or Inf")
    elif np.issubdtype(spec.dtype, np.integer) or spec.dtype == np.bool_:
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
            raise UsageError(f"{path}: input '{spec.name}' has dtype {a.dtype}, the model expects integers "
                             f"({spec.dtype})")
        a = a.astype(spec.dtype, copy=False)
    return np.ascontiguousarray(a)


def _fmt(shape, batch_axis: int = 0) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) and d > 0 else "N" if i == batch_axis else "?"
                           for i, d in enumerate(shape)) + "]"


def _images(path, spec, image_size, mean, std, layout) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise UsageError("reading an image folder needs Pillow: pip install pillow") from None
    files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXT))
    if not files:
        raise UsageError(f"no images ({', '.join(IMAGE_EXT)}) in {path}")
    shape = spec.shape
    chw = layout.upper() == "NCHW"
    c = shape[1] if chw else shape[-1]
    if image_size is None:
        hw = shape[2:4] if chw else shape[1:3]
        if all(isinstance(d, int) and d > 0 for d in hw):
            size = (hw[1], hw[0])
        else:  # dynamic in the model: the images' own size, when they share one
            size = _common_size(path, files)
    else:
        size = (image_size, image_size)
    mode = "L" if c == 1 else "RGB"
    out = []
    for f in files:
        try:
            img = Image.open(os.path.join(path, f)).convert(mode).resize(size, Image.BILINEAR)
        except Exception as exc:
            raise UsageError(f"cannot read image {f}: {exc}") from None
        a = np.asarray(img, np.float32).reshape(size[1], size[0], -1) / 255.0
        if mean is not None:
            a = a - np.asarray(mean, np.float32)
        if std is not None:
            a = a / np.asarray(std, np.float32)
        out.append(a.transpose(2, 0, 1) if chw else a)
    return np.stack(out)


def _common_size(path, files) -> tuple:
    from PIL import Image

    sizes = {}
    for f in files:
        try:
            with Image.open(os.path.join(path, f)) as img:
                sizes.setdefault(img.size, f)
        except Exception as exc:
            raise UsageError(f"cannot read image {f}: {exc}") from None
    if len(sizes) > 1:
        (a, fa), (b, fb) = list(sizes.items())[:2]
        raise UsageError(f"the model's image size is dynamic and the images differ in size ({fa} is "
                         f"{a[0]}x{a[1]}, {fb} is {b[0]}x{b[1]}): give --image-size")
    return next(iter(sizes))


def batches(feeds: dict, names: list[str], batch_size: int, device: str = "cpu"):
    import torch

    n = n_samples(feeds)
    for i in range(0, n, batch_size):
        yield tuple(torch.from_numpy(np.ascontiguousarray(rows(feeds[k], i, i + batch_size))).to(device)
                    for k in names)


# input elements per whole-model run: intermediate activations grow with the batch (PP-OCRv4's
# detector at 480x480 took 4 GB in onnxruntime per run of 64 images; at 4M elements, 5 images, 0.4 GB)
RUN_ELEMENTS = 1 << 22


def run_batch(feeds: dict, batch_size: int) -> int:
    """batch_size, made smaller for large samples (a graph with a fixed batch is not asked)."""
    per_sample = sum(int(np.prod(v.shape[1:])) for v in feeds.values() if np.ndim(v))
    return max(1, min(batch_size, RUN_ELEMENTS // max(per_sample, 1)))


def n_samples(feeds: dict) -> int:
    """Samples in a feed dict: the first axis of any input that is not a scalar."""
    return next((len(v) for v in feeds.values() if np.ndim(v)), 1)


def rows(a: np.ndarray, i: int, j: int) -> np.ndarray:
    """Samples i..j of one input; a scalar input is the same for all."""
    return a if np.ndim(a) == 0 else a[i:j]


def take(feeds: dict, n: int) -> dict:
    return {k: rows(v, 0, n) for k, v in feeds.items()}


def sample_axis(shapes: list[tuple], counts: list[int]) -> int:
    """The axis that holds the samples in per-batch outputs: the first axis whose size equals the
    batch's sample count in every batch (an RNN's [T, N, C] output has them on axis 1); 0 if none."""
    rank = len(shapes[0])
    for axis in range(rank):
        if all(len(s) == rank and s[axis] == c for s, c in zip(shapes, counts)):
            return axis
    return 0


def concat_samples(chunks: list, counts: list[int]):
    """Per-batch outputs joined along their sample axis (see sample_axis)."""
    if not chunks[0].ndim:
        return np.stack(chunks)
    return np.concatenate(chunks, axis=sample_axis([c.shape for c in chunks], counts))
