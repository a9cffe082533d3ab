"""Task-level agreement scores (packptq_onnx.tasks) on hand-made numbers with known answers."""
import numpy as np
import pytest

from packptq_onnx import tasks
from packptq_onnx.errors import UsageError

# ---------------------------------------------------------------- classify

@pytest.mark.parametrize("k", [0, 1, 7, 20])
def test_classify_flipped_argmaxes(k):
    rng = np.random.default_rng(k)
    f = rng.normal(size=(20, 10)).astype(np.float32)
    q = f.copy()
    for i in range(k):                       # move sample i's maximum to another class
        top = f[i].argmax()
        q[i, (top + 1) % 10] = f[i].max() + 1.0
    res = tasks.score("classify", [f], [q])
    assert res["task_agreement"] == pytest.approx(1 - k / 20)
    assert res["top5_agreement"] == 1.0      # the float top-1 is still second in quant


def test_classify_rank3_uses_last_axis():
    f = np.zeros((2, 3, 4))
    f[..., 1] = 1
    q = f.copy()
    q[0, 0, 3] = 2
    assert tasks.score("classify", [f], [q])["task_agreement"] == pytest.approx(5 / 6)


# ---------------------------------------------------------------- NMS

def _iou_ref(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _nms_ref(boxes, scores, thr):
    order = sorted(range(len(boxes)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        if all(_iou_ref(boxes[i], boxes[j]) <= thr for j in keep):
            keep.append(i)
    return keep


@pytest.mark.parametrize("seed", range(8))
def test_nms_matches_bruteforce(seed):
    rng = np.random.default_rng(seed)
    n = 60
    xy = rng.uniform(0, 100, size=(n, 2))
    wh = rng.uniform(5, 40, size=(n, 2))
    boxes = np.concatenate([xy, xy + wh], 1)
    scores = rng.permutation(n) / n + 0.01  # distinct scores, no tie order question
    for thr in (0.1, 0.45, 0.8):
        assert tasks.nms(boxes, scores, thr).tolist() == _nms_ref(boxes, scores, thr)


def test_nms_and_match_ties():
    boxes = np.array([[0, 0, 2, 1], [0, 0, 1, 1]], float)          # IoU exactly 0.5
    assert tasks.nms(boxes, np.array([0.9, 0.8]), 0.5).tolist() == [0, 1]   # drops only IoU > thr
    assert tasks.nms(boxes, np.array([0.9, 0.8]), 0.49).tolist() == [0]
    assert tasks.match((boxes[:1], np.array([0])), (boxes[1:], np.array([0]))) == 1   # IoU >= 0.5


def test_match_is_one_to_one():
    ref = (np.array([[0, 0, 10, 10], [4, 0, 14, 10]], float), np.array([0, 0]))   # IoU 0.43: both kept
    one = (np.array([[2, 0, 12, 10]], float), np.array([0]))                       # IoU 0.67 with each
    assert tasks.match(ref, one) == 1 and tasks.match(one, ref) == 1
    assert tasks.match(ref, (one[0], np.array([1]))) == 0                            # other class


def test_nms_empty():
    assert tasks.nms(np.zeros((0, 4)), np.zeros(0)).tolist() == []


# ---------------------------------------------------------------- detection

def _v5(boxes_cxcywh, classes, nc=3, anchors=1200, score=0.9):
    """Decoded YOLOv5 tensor [1, A, 5+nc]: the given boxes first, the rest below threshold."""
    out = np.zeros((1, anchors, 5 + nc), np.float32)
    for i, (b, c) in enumerate(zip(boxes_cxcywh, classes)):
        out[0, i, :4] = b
        out[0, i, 4] = 1.0
        out[0, i, 5 + c] = score
    out[0, len(boxes_cxcywh):, 2:4] = 1.0
    return out


BOXES = [(50, 50, 20, 20), (150, 50, 20, 20), (50, 150, 30, 10), (300, 300, 40, 40)]
CLASSES = [0, 1, 2, 0]


def test_detect_identical():
    f = _v5(BOXES, CLASSES)
    res = tasks.score("detect-yolo", [f], [f.copy()])
    assert res == {"task_agreement": 1.0, "recall": 1.0, "precision": 1.0, "detections_kept": 1.0,
                   "float_detections": 4.0, "quant_detections": 4.0}


def test_detect_one_box_moved_away():
    f = _v5(BOXES, CLASSES)
    moved = list(BOXES)
    moved[1] = (400, 400, 20, 20)                # no overlap with any float box
    res = tasks.score("detect-yolo", [f], [_v5(moved, CLASSES)])
    assert res["recall"] == pytest.approx(3 / 4)
    assert res["precision"] == pytest.approx(3 / 4)
    assert res["task_agreement"] == pytest.approx(3 / 4)


def test_detect_lost_and_wrong_class_and_extra():
    f = _v5(BOXES, CLASSES)
    q_boxes, q_cls = BOXES[:3] + [(500, 500, 10, 10), (600, 600, 10, 10)], [0, 2, 2, 1, 1]
    res = tasks.score("detect-yolo", [f], [_v5(q_boxes, q_cls)])
    # box 1 changed class, box 3 lost, two extras: 2 matched of 4 float, of 5 quant
    assert (res["float_detections"], res["quant_detections"]) == (4.0, 5.0)
    assert res["recall"] == pytest.approx(2 / 4)
    assert res["precision"] == pytest.approx(2 / 5)
    assert res["task_agreement"] == pytest.approx(2 * 0.5 * 0.4 / 0.9)


def test_detect_threshold_and_nms_in_score():
    f = _v5(BOXES, CLASSES)
    q = _v5(BOXES + [(51, 51, 20, 20)], CLASSES + [1])   # duplicate suppressed by agnostic NMS
    q[0, 0, 5] = 0.95
    q[0, 3, 5] = 0.2                                     # below 0.25: dropped
    res = tasks.score("detect-yolo", [f], [q])
    assert res["quant_detections"] == 3.0 and res["recall"] == pytest.approx(3 / 4)


def test_detect_capped_at_max_det():
    grid = [(10 + 20 * (i % 20), 10 + 20 * (i // 20), 10, 10) for i in range(400)]   # disjoint boxes
    f = _v5(grid, [0] * 400, anchors=1200)
    f[0, :400, 5] = np.linspace(0.9, 0.3, 400)
    dets, _ = tasks.detections("detect-yolo", f)
    assert len(dets[0][0]) == tasks.MAX_DET == 300
    np.testing.assert_allclose(dets[0][0][-1], [385, 285, 395, 295])   # box 299: centre (390, 290)


def test_detect_no_detections_anywhere():
    f = _v5([], [])
    assert tasks.score("detect-yolo", [f], [f])["task_agreement"] == 1.0
    assert tasks.score("detect-yolo", [f], [_v5(BOXES, CLASSES)])["task_agreement"] == 0.0


def test_yolov8_layout_equals_yolov5():
    rng = np.random.default_rng(0)
    v5f, v5q = _v5(BOXES, CLASSES), _v5(BOXES, CLASSES)
    v5q[0, :4, :4] += rng.normal(scale=3, size=(4, 4))
    v8 = lambda v5: np.concatenate([v5[..., :4], v5[..., 5:]], -1).transpose(0, 2, 1)
    assert v8(v5f).shape == (1, 7, 1200)
    r5 = tasks.score("detect-yolo", [v5f], [v5q])
    r8 = tasks.score("detect-yolo", [v8(v5f)], [v8(v5q)])
    assert r5 == r8


def _yolox_raw(hw, boxes, classes, nc=3):
    """Raw YOLOX head that decodes to the given pixel boxes (inverse of the decode)."""
    a = tasks._yolox_count(hw)
    raw = np.full((1, a, 5 + nc), -8.0)          # logits: sigmoid(-8) ~ 0.0003
    raw[0, :, :2], raw[0, :, 2:4] = 0.5, 0.0
    offsets, where = [], 0
    for s in tasks.STRIDES:
        gh, gw = hw[0] // s, hw[1] // s
        offsets.append((where, s, gw))
        where += gh * gw
    for (cx, cy, w, h), c, (start, s, gw) in zip(boxes, classes, offsets * 3):
        gx, gy = int(cx // s), int(cy // s)
        i = start + gy * gw + gx
        raw[0, i, :4] = [cx / s - gx, cy / s - gy, np.log(w / s), np.log(h / s)]
        raw[0, i, 4] = raw[0, i, 5 + c] = 6.0
    return raw


def test_yolox_decode_inverts():
    hw = (320, 256)
    boxes = [(37.0, 61.0, 20.0, 30.0), (200.0, 100.0, 64.0, 48.0), (128.0, 300.0, 150.0, 90.0)]
    raw = _yolox_raw(hw, boxes, [0, 1, 2])
    dets, logits = tasks.detections("detect-yolox", raw, hw)
    assert logits
    got = sorted(map(tuple, np.round(dets[0][0], 4)))
    want = sorted((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2) for cx, cy, w, h in boxes)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert sorted(dets[0][1].tolist()) == [0, 1, 2]
    assert tasks.score("detect-yolox", [raw], [raw], hw)["task_agreement"] == 1.0


def test_yolox_square_default_and_bad_size():
    raw = _yolox_raw((416, 416), [(100.0, 100.0, 30.0, 30.0)], [1])
    assert tasks.score("detect-yolox", [raw], [raw])["float_detections"] == 1.0
    with pytest.raises(UsageError, match="anchors do not fit"):
        tasks.score("detect-yolox", [raw], [raw], (640, 640))


# ---------------------------------------------------------------- segment, ctc, embed

def test_segment_binary_iou():
    f = np.zeros((2, 1, 16, 16))
    q = np.zeros_like(f)
    f[0, 0, :8, :8] = 0.9                       # 64 px
    q[0, 0, 4:12, :8] = 0.9                     # 64 px, 32 shared
    f[1, 0, 0, :4] = q[1, 0, 0, :4] = 0.5       # 4 px shared
    q[1, 0, 5, 5] = 0.2                         # below 0.3
    assert tasks.score("segment", [f], [q])["task_agreement"] == pytest.approx(36 / (64 + 64 - 32 + 4))
    logit = lambda p: np.log(np.clip(p, 1e-6, 1 - 1e-6) / (1 - np.clip(p, 1e-6, 1 - 1e-6)))
    assert tasks.score("segment", [logit(f)], [logit(q)])["task_agreement"] == pytest.approx(36 / 100)
    # float32 Sigmoid writes 1.0000001: still a probability map (a sigmoid on top made every pixel
    # 0.5 or more, so PP-OCRv4's detector scored mask IoU 1.0 against any quantized model)
    f[0, 0, 0, 0] = q[0, 0, 0, 0] = np.float32(1.0000001)
    assert tasks.score("segment", [f.astype(np.float32)], [q.astype(np.float32)])["task_agreement"] == \
        pytest.approx(37 / 100)  # (0, 0) now shared too


def test_segment_multiclass_iou():
    fl = np.zeros((1, 4, 4), int)
    fl[0, :2] = 1                               # class 1: 8 px, class 0: 8 px
    ql = fl.copy()
    ql[0, 2, :2] = 1                            # class 1 grows by 2, class 0 shrinks by 2
    onehot = lambda lab: np.eye(3)[lab].transpose(0, 3, 1, 2)
    res = tasks.score("segment", [onehot(fl)], [onehot(ql)])
    assert res["task_agreement"] == pytest.approx((6 / 8 + 8 / 10) / 2)
    assert res["pixel_agreement"] == pytest.approx(14 / 16)


def _ctc(labels, c=5):
    return np.eye(c)[np.asarray(labels)]


def test_ctc_greedy_decode():
    # "aab-b" with blanks: a a b blank b -> a b b ; leading/trailing blanks vanish
    assert tasks.ctc_greedy(_ctc([[0, 1, 1, 2, 0, 2, 0], [3, 3, 3, 0, 0, 0, 3]])) == [[1, 2, 2], [3, 3]]


def test_ctc_score_exact_and_cer():
    f = _ctc([[1, 1, 2, 0, 2, 3], [4, 0, 4, 0, 1, 0], [2, 2, 2, 2, 2, 2]])
    q = _ctc([[1, 1, 2, 0, 2, 3], [4, 4, 4, 0, 1, 0], [2, 2, 2, 2, 2, 2]])
    res = tasks.score("ocr-ctc", [f], [q])     # float: 1223 / 441 / 2 ; quant: 1223 / 41 / 2
    assert res["task_agreement"] == pytest.approx(2 / 3)
    assert res["cer"] == pytest.approx(1 / 8)
    tn = tasks.score("ocr-ctc", [f.transpose(1, 0, 2)], [q.transpose(1, 0, 2)], batch_axis=1)
    assert tn == res


@pytest.mark.parametrize("a,b,d", [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "abc", 0), ("ab", "ba", 2)])
def test_edit_distance(a, b, d):
    assert tasks.edit_distance(a, b) == d


def test_embed_cosine():
    f = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    q = np.array([[1.0, 1.0], [2.0, 2.0], [0.0, -1.0]])
    res = tasks.score("embed", [f], [q])
    assert res["task_agreement"] == pytest.approx((np.sqrt(0.5) + 1 - 1) / 3)
    assert res["min_cosine"] == pytest.approx(-1.0)
    z = np.zeros((1, 3, 2))
    assert tasks.score("embed", [z], [z])["task_agreement"] == 1.0


# ---------------------------------------------------------------- guess

def test_guess_shapes():
    assert tasks.guess([(1, 1000)]) == "classify"
    assert tasks.guess([(1, 25200, 85)]) == "detect-yolo"
    assert tasks.guess([(1, 84, 8400)]) == "detect-yolo"
    assert tasks.guess([(1, 8400, 85)], input_hw=(640, 640)) == "detect-yolox"
    assert tasks.guess([(1, 40, 6625)]) == "ocr-ctc"
    assert tasks.guess([(1, 84, 5040)]) == "detect-yolo"               # 384 x 640 input
    assert tasks.guess([(1, 84, 5040)], input_hw=(640, 640)) == "ocr-ctc"
    assert tasks.guess([(1, 1, 256, 256)]) == "segment"
    assert tasks.guess([(1, 21, 512, 512)]) == "segment"
    assert tasks.guess([(1, 2048, 7, 7)]) is None
    assert tasks.guess([(4,)]) is None
    assert tasks.guess([]) is None


def test_guess_values():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(3, 384))
    assert tasks.guess([emb / np.linalg.norm(emb, axis=1, keepdims=True)]) == "embed"
    assert tasks.guess([rng.normal(size=(3, 1000))]) == "classify"
    raw = _yolox_raw((640, 640), [(100.0, 100.0, 30.0, 30.0)], [1])
    assert tasks.guess([raw]) == "detect-yolox"
    assert tasks.guess([_v5(BOXES, CLASSES)]) == "detect-yolo"
    probs = rng.random((2, 30, 50))
    assert tasks.guess([probs / probs.sum(-1, keepdims=True)]) == "ocr-ctc"
    assert tasks.guess([rng.normal(size=(2, 30, 384))]) == "embed"


# ---------------------------------------------------------------- errors and user metrics

def test_unknown_task_and_bad_shapes():
    x = np.zeros((2, 10))
    with pytest.raises(UsageError, match="choose one of: classify, detect-yolo") as e:
        tasks.score("detect", [x], [x])
    assert "\n" not in str(e.value)
    for task in ("segment", "ocr-ctc", "detect-yolo", "detect-yolox"):
        with pytest.raises(UsageError, match=r"output 0 of shape .*got \(2, 10\)"):
            tasks.score(task, [x], [x])
    with pytest.raises(UsageError, match=r"output 0 is \(2, 10\) in float, \(2, 11\) quantized"):
        tasks.score("classify", [x], [np.zeros((2, 11))])


def test_load_metric_file_and_module(tmp_path):
    path = tmp_path / "my_metric.py"
    path.write_text("import numpy as np\n\ndef gap(f, q):\n    return np.abs(f[0] - q[0]).max()\n")
    fn = tasks.load_metric(f"{path}:gap")
    assert fn([np.array([1.0, 2.0])], [np.array([1.5, 2.0])]) == 0.5
    assert isinstance(fn([np.ones(2)], [np.ones(2)]), float)
    assert tasks.load_metric("math:hypot")(3, 4) == 5.0


def test_load_metric_bad_specs(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom\\nsecond line')\n")
    (tmp_path / "ok.py").write_text("def words(f, q):\n    return 'many'\n")
    bad = ["nocolon", "math:", ":fn", "no_such_module_xyz:fn", "math:no_such_fn",
           f"{tmp_path}/missing.py:fn", f"{tmp_path}/broken.py:fn", f"{tmp_path}/ok.py:nope"]
    for spec in bad:
        with pytest.raises(UsageError) as e:
            tasks.load_metric(spec)
        assert "\n" not in str(e.value), spec
    with pytest.raises(UsageError, match="not a number"):
        tasks.load_metric(f"{tmp_path}/ok.py:words")(None, None)


def test_binary_scores_decisions_of_probabilities_and_logits():
    f = np.array([[0.1], [0.49], [0.51], [0.9]])
    q = np.array([[0.2], [0.52], [0.5], [0.91]])
    r = tasks.score("binary", [f], [q])
    assert r["task_agreement"] == 0.5 and abs(r["max_abs_diff"] - 0.1) < 1e-12
    logits = np.array([-3.0, -0.1, 0.2, 4.0])          # leaves [0, 1]: decisions at 0
    assert tasks.score("binary", [logits], [np.array([-2.0, 0.1, 0.3, 5.0])])["task_agreement"] == 0.75
    assert tasks.guess([f]) == "binary" and tasks.guess([(8, 1)]) == "binary" and tasks.guess([(8, 2)]) == "classify"
    assert tasks.guess([f.ravel()]) == "binary" and tasks.guess([logits]) is None   # [N]: only probabilities
