"""Task-level agreement between the float model's outputs and the quantized model's outputs.

A tensor error says how far the numbers moved; these say whether the answer a user reads off the
model moved. Float outputs are the reference (no labels needed); output 0 is scored, key
"task_agreement" is the headline:
- classify     [N, C] (or [..., C]): share of samples with the same top-1 class (argmax, last
               axis); also "top5_agreement" (float top-1 within the quantized top-5).
- detect-yolo  decoded head: [N, A, 5+nc] YOLOv5 (cx, cy, w, h in pixels, objectness, classes;
               score = obj * cls) or [N, 4+nc, A] YOLOv8 (no objectness; transposed when dim1 < dim2).
- detect-yolox raw head [N, A, 5+nc], A = sum over strides s = 8, 16, 32 of (h/s)*(w/s) for input
               (h, w) (square if input_hw is None): cx = (p0 + gx)*s, cy = (p1 + gy)*s,
               w = exp(p2)*s, h = exp(p3)*s, score = obj * cls.
               Both: float scores outside [0, 1] are logits, so both sides get a sigmoid (decided on
               the float side, so quantization noise at 1.0001 cannot flip it); keep score >= 0.25;
               class-agnostic NMS drops IoU > 0.45, best 300 per image (YOLO's max_det); quantized
               detections match float ones of the same class at IoU >= 0.5, best IoU first, 1:1.
               recall = matched / float, precision = matched / quant, over all images;
               task_agreement = their F1 (1.0 when both are empty).
- segment      [N, C, H, W] ([N, H, W] is C = 1). C = 1: probability map (sigmoid first if the float
               map leaves [0, 1]) binarised at > 0.3, mask IoU over all pixels. C > 1: argmax over
               channels, mean per-class IoU over the classes present in the float map.
- ocr-ctc      [N, T, C] (batch_axis=1: [T, N, C]): greedy CTC decode (argmax, collapse repeats, drop
               blank 0); share of samples decoded identically; "cer" = edits / float length, in total.
- embed        rank >= 2: cosine per sample (flattened); mean, and "min_cosine".
- binary       one score per sample ([N], [N, 1]): a probability (voice activity, wake word) read as a
               decision at 0.5, or a logit (the float side leaves [0, 1]) at 0; share of samples with
               the same decision; "max_abs_diff" of the scores.

guess() looks at output 0 and answers None rather than guess wildly:
  one value per sample [N, 1], [N, 1, 1] (or [N] with values in [0, 1]): binary.
  rank 2 [N, C>1]: classify; embed if values show L2-normalised rows with negative entries.
  rank 3 [N, T, C>=10] with values whose last axis sums to 1 (softmax): ocr-ctc.
  rank 3 [N, A, K], A >= 1000 > K >= 6: detect-yolox if the centres are raw offsets (|cx|, |cy| < 8,
      the smallest stride) or, shapes only, A is the YOLOX grid count for input_hw; else detect-yolo.
  rank 3 [N, K, A], A >= 1000 > K >= 5, A = 21 * h/32 * w/32 for input_hw (else A % 21 == 0): detect-yolo.
  rank 3 [N, T, C>=10] otherwise: ocr-ctc from shapes alone; embed given values (hidden states).
  rank 4 [N, C<=256, H>=16, W>=16]: segment.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import numpy as np

from .errors import UsageError

TASKS = ("classify", "detect-yolo", "detect-yolox", "segment", "ocr-ctc", "embed", "binary")
STRIDES = (8, 16, 32)
SCORE_THR, NMS_IOU, MAX_DET, MATCH_IOU, SEG_THR = 0.25, 0.45, 300, 0.5, 0.3


def _yolox_count(hw) -> int:
    return sum(-(-hw[0] // s) * -(-hw[1] // s) for s in STRIDES)


def guess(outputs, input_hw=None) -> str | None:
    """Task from the float outputs (arrays, or shape tuples when no values are at hand)."""
    if not outputs:
        return None
    first, given = outputs[0], not isinstance(outputs[0], (tuple, list))
    shape = np.shape(first) if given else tuple(first)
    vals = np.asarray(first, np.float64) if given and np.size(first) else None
    if 2 <= len(shape) <= 3 and all(d == 1 for d in shape[1:]):
        return "binary"
    if len(shape) == 1 and vals is not None and vals.min() >= 0 and vals.max() <= 1:  # [N] probabilities
        return "binary"
    if len(shape) == 2 and shape[1] > 1:
        unit = vals is not None and vals.min() < 0 and np.allclose(np.linalg.norm(vals, axis=1), 1, atol=1e-3)
        return "embed" if unit else "classify"
    if len(shape) == 3:
        _, a, k = shape
        if k >= 10 and vals is not None and vals.min() >= 0 and np.allclose(vals.sum(-1), 1, atol=1e-2):
            return "ocr-ctc"
        if a >= 1000 > k >= 6:
            if vals is not None:
                return "detect-yolox" if np.abs(vals[..., :2]).max() < STRIDES[0] else "detect-yolo"
            return "detect-yolox" if input_hw and a == _yolox_count(input_hw) else "detect-yolo"
        if k >= 1000 > a >= 5 and (k == _yolox_count(input_hw) if input_hw else k % 21 == 0):
            return "detect-yolo"
        if k >= 10:
            return "ocr-ctc" if vals is None else "embed"
    if len(shape) == 4 and shape[1] <= 256 and min(shape[2:]) >= 16:
        return "segment"
    return None


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


LOGIT_TOL = 1e-3  # float32 Sigmoid writes 1.0000001: a probability map, not logits


def _is_logit(x) -> bool:
    return bool(x.size) and (x.min() < -LOGIT_TOL or x.max() > 1 + LOGIT_TOL)


def _bad_shape(task, want, arr):
    return UsageError(f"task '{task}' wants output 0 of shape {want}; got {tuple(arr.shape)}")


def _area(b):
    return np.prod(np.clip(b[..., 2:] - b[..., :2], 0, None), axis=-1)


def _iou_one(box, boxes):
    """IoU of one xyxy box against an [M, 4] array."""
    inter = _area(np.concatenate([np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])], 1))
    union = _area(box) + _area(boxes) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes, scores, iou=NMS_IOU) -> np.ndarray:
    """Greedy NMS: indices kept, highest score first; drops boxes with IoU > iou to a kept one."""
    keep, order = [], np.argsort(-scores, kind="stable")
    while order.size:
        keep.append(order[0])
        order = order[1:][_iou_one(boxes[order[0]], boxes[order[1:]]) <= iou]
    return np.asarray(keep, dtype=np.int64)


def yolox_decode(raw, input_hw=None) -> np.ndarray:
    """Raw YOLOX head [N, A, 5+nc] -> [N, A, 5+nc] with cx, cy, w, h in pixels."""
    a = raw.shape[1]
    input_hw = input_hw or (round(float(np.sqrt(a * 1024 / 21))),) * 2
    if _yolox_count(input_hw) != a:
        raise UsageError(f"task 'detect-yolox': {a} anchors do not fit input {tuple(input_hw)}; pass input_hw")
    grids, strides = [], []
    for s in STRIDES:
        gy, gx = np.meshgrid(np.arange(-(-input_hw[0] // s)), np.arange(-(-input_hw[1] // s)), indexing="ij")
        grids.append(np.stack([gx.ravel(), gy.ravel()], 1))
        strides.append(np.full((gx.size, 1), s))
    grid, stride, out = np.concatenate(grids), np.concatenate(strides), np.array(raw, np.float64)
    out[..., :2] = (raw[..., :2] + grid) * stride
    out[..., 2:4] = np.exp(np.clip(raw[..., 2:4], -30, 30)) * stride
    return out


def _to_rows(task, out, input_hw):
    """Output 0 -> ([N, A, 4] xyxy boxes, [N, A, 1] objectness or None, [N, A, nc] class scores)."""
    if out.ndim != 3 or min(out.shape[1:]) < 5:
        raise _bad_shape(task, "[N, A, 5+nc] or [N, 4+nc, A]", out)
    has_obj = task == "detect-yolox" or out.shape[1] >= out.shape[2]
    out = yolox_decode(out, input_hw) if task == "detect-yolox" else out.astype(np.float64)
    out = out if has_obj else out.transpose(0, 2, 1)
    c, wh = out[..., :2], out[..., 2:4]
    boxes = np.concatenate([c - wh / 2, c + wh / 2], -1)
    return (boxes, out[..., 4:5], out[..., 5:]) if has_obj else (boxes, None, out[..., 4:])


def detections(task, out, input_hw=None, logits=None):
    """Per image: list of (boxes [k, 4] xyxy, classes [k]) after threshold and NMS."""
    boxes, obj, cls = _to_rows(task, np.asarray(out), input_hw)
    if logits is None:
        logits = _is_logit(cls) or (obj is not None and _is_logit(obj))
    if logits:
        cls, obj = _sigmoid(cls), (None if obj is None else _sigmoid(obj))
    scores = cls if obj is None else obj * cls
    return [_image_dets(*x) for x in zip(boxes, scores.max(-1), scores.argmax(-1))], logits


def _image_dets(boxes, best, label):
    m = best >= SCORE_THR
    keep = nms(boxes[m], best[m])[:MAX_DET]
    return boxes[m][keep], label[m][keep]


def match(ref, test, thr=MATCH_IOU) -> int:
    """Pairs (same class, IoU >= thr) between two (boxes, classes) sets, best IoU first, 1:1."""
    (rb, rc), (tb, tc) = ref, test
    if not len(rb) or not len(tb):
        return 0
    iou = np.stack([_iou_one(b, tb) for b in rb]) * (rc[:, None] == tc[None, :])
    pairs = np.argwhere(iou >= thr)
    pairs = pairs[np.argsort(-iou[pairs[:, 0], pairs[:, 1]], kind="stable")]
    used_r, used_t = set(), set()
    for i, j in pairs:
        if i not in used_r and j not in used_t:
            used_r.add(i)
            used_t.add(j)
    return len(used_r)


def _score_detect(task, f, q, input_hw):
    fd, logits = detections(task, f, input_hw)
    qd, _ = detections(task, q, input_hw, logits=logits)
    nf, nq = sum(len(d[0]) for d in fd), sum(len(d[0]) for d in qd)
    m = sum(match(a, b) for a, b in zip(fd, qd))
    empty = float(nf == 0 and nq == 0)            # nothing to find and nothing found: agree
    recall, precision = (m / nf if nf else empty), (m / nq if nq else empty)
    f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
    return {"task_agreement": f1, "recall": recall, "precision": precision, "detections_kept": recall,
            "float_detections": float(nf), "quant_detections": float(nq)}


def _score_classify(f, q):
    if f.ndim < 2:
        raise _bad_shape("classify", "[N, C] (rank >= 2)", f)
    f, q = f.reshape(-1, f.shape[-1]), q.reshape(-1, q.shape[-1])
    ftop = f.argmax(-1)
    res = {"task_agreement": float(np.mean(ftop == q.argmax(-1)))}
    if f.shape[-1] >= 5:
        top5 = np.argsort(-q, axis=-1, kind="stable")[:, :5]
        res["top5_agreement"] = float(np.mean((top5 == ftop[:, None]).any(-1)))
    return res


def _score_binary(f, q):
    f, q = f.reshape(len(f), -1).astype(np.float64), q.reshape(len(q), -1).astype(np.float64)
    if f.shape[1] != 1:
        raise _bad_shape("binary", "one score per sample ([N] or [N, 1])", f)
    thr = 0.0 if _is_logit(f) else 0.5
    return {"task_agreement": float(np.mean((f > thr) == (q > thr))),
            "max_abs_diff": float(np.abs(f - q).max()) if f.size else 0.0}


def _iou(a, b):
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _score_segment(f, q):
    f, q = (f[:, None], q[:, None]) if f.ndim == 3 else (f, q)
    if f.ndim != 4:
        raise _bad_shape("segment", "[N, C, H, W]", f)
    if f.shape[1] == 1:
        f, q = (_sigmoid(f), _sigmoid(q)) if _is_logit(f) else (f, q)
        return {"task_agreement": _iou(f > SEG_THR, q > SEG_THR)}
    fl, ql = f.argmax(1), q.argmax(1)
    ious = [_iou(fl == c, ql == c) for c in np.unique(fl)]
    return {"task_agreement": float(np.mean(ious)), "pixel_agreement": float(np.mean(fl == ql))}


def ctc_greedy(probs) -> list[list[int]]:
    """[N, T, C] -> per sample the label sequence: argmax, collapse repeats, drop blank 0."""
    best = np.asarray(probs).argmax(-1)
    return [[int(c) for c, p in zip(row, np.r_[-1, row[:-1]]) if c != p and c != 0] for row in best]


def edit_distance(a, b) -> int:
    """Levenshtein distance between two sequences (one row of the table at a time)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def _score_ctc(f, q, batch_axis):
    if f.ndim != 3:
        raise _bad_shape("ocr-ctc", "[N, T, C]", f)
    fs, qs = (ctc_greedy(x.transpose(1, 0, 2) if batch_axis == 1 else x) for x in (f, q))
    edits = sum(edit_distance(a, b) for a, b in zip(fs, qs))
    return {"task_agreement": float(np.mean([a == b for a, b in zip(fs, qs)])),
            "cer": edits / max(sum(len(a) for a in fs), 1)}


def _score_embed(f, q):
    if f.ndim < 2:
        raise _bad_shape("embed", "[N, D] (rank >= 2)", f)
    f, q = f.reshape(len(f), -1).astype(np.float64), q.reshape(len(q), -1).astype(np.float64)
    nn = np.linalg.norm(f, axis=1) * np.linalg.norm(q, axis=1)
    zero = ~f.any(1) & ~q.any(1)                 # two zero vectors agree; one alone does not
    cos = np.where(nn > 0, (f * q).sum(1) / np.where(nn > 0, nn, 1), zero)
    return {"task_agreement": float(cos.mean()), "min_cosine": float(cos.min())}


def score(task, float_outs, quant_outs, input_hw=None, batch_axis=0) -> dict[str, float]:
    """Agreement of quant_outs with float_outs (the reference) for task; see the module notes."""
    if task not in TASKS:
        raise UsageError(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}")
    if not len(float_outs) or not len(quant_outs):
        raise UsageError(f"task '{task}': no outputs to compare")
    f, q = np.asarray(float_outs[0]), np.asarray(quant_outs[0])
    if f.shape != q.shape:
        raise UsageError(f"task '{task}': output 0 is {tuple(f.shape)} in float, {tuple(q.shape)} quantized")
    if batch_axis and f.ndim > batch_axis:  # samples first for every scorer
        f, q, batch_axis = np.moveaxis(f, batch_axis, 0), np.moveaxis(q, batch_axis, 0), 0
    if task.startswith("detect"):
        return _score_detect(task, f, q, input_hw)
    if task == "ocr-ctc":
        return _score_ctc(f, q, batch_axis)
    return {"classify": _score_classify, "segment": _score_segment, "embed": _score_embed,
            "binary": _score_binary}[task](f, q)


def load_metric(spec: str):
    """'module:function' or 'path/to/file.py:function' -> callable(float_outs, quant_outs) -> float."""
    where, _, name = str(spec).rpartition(":")
    is_file = where.endswith(".py") or os.sep in where or "/" in where
    if not where or not name.isidentifier():
        raise UsageError(f"metric '{spec}' is not 'module:function' or 'file.py:function'")
    if is_file and not os.path.isfile(where):
        raise UsageError(f"metric file '{where}' does not exist")
    try:
        if is_file:
            mspec = importlib.util.spec_from_file_location(f"packptq_metric_{abs(hash(where))}", where)
            module = importlib.util.module_from_spec(mspec)
            mspec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - a user's file may raise anything
        first = (str(e).splitlines() or [""])[0]
        raise UsageError(f"metric '{spec}': cannot import {where}: {type(e).__name__}: {first}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"metric '{spec}': {where} has no function '{name}'")

    @functools.wraps(fn)
    def metric(float_outs, quant_outs) -> float:
        value = fn(float_outs, quant_outs)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UsageError(f"metric '{spec}' returned {type(value).__name__}, not a number") from None

    return metric
