"""A small ViT trained on scikit-learn's digits (8x8 grey images), for quantizing end to end.

    python bench/vit_digits.py --out DIR [--epochs 100] [--seed 0]
writes into DIR:
- vit_digits.onnx   x: N x 1 x 8 x 8 (pixels / 16), logits N x 10; opset 17, dynamic batch.
                    2x2 patches (16 tokens) + learned positions, 3 pre-norm transformer layers
                    (dim 48, 4 heads, MLP 96, GELU), LayerNorm, mean over tokens, linear head.
- vit_calib.npz     x: 512 training images
- vit_eval.npz      x + labels: the 540 held-out images (the same split as samples/: the last 540)
Training is seeded and single-threaded (about a minute of CPU); it prints the float accuracy.

Then, for example:
    packptq quantize DIR/vit_digits.onnx --calib DIR/vit_calib.npz --eval DIR/vit_eval.npz \
        --wbits 4 --abits 4 -o DIR/vit_w4a4.onnx --report DIR/vit_w4a4.json
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from torch import nn

N_EVAL = 540


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.n1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.n2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.n1(x)).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) * (d // h) ** -0.5, dim=-1)
        x = x + self.proj((a @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.n2(x))


class DigitsViT(nn.Module):
    def __init__(self, dim: int = 48, depth: int = 3, heads: int = 4, mlp: int = 96, patch: int = 2):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (8 // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


def digits():
    """(train x, train y, eval x, eval y); x: N x 1 x 8 x 8 float32 in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    return x[:-N_EVAL], y[:-N_EVAL], x[-N_EVAL:], y[-N_EVAL:]


def train(epochs: int = 100, seed: int = 0, log=print) -> tuple[nn.Module, float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reproducible, and fast on a shared CPU
    try:
        torch.manual_seed(seed)
        xtr, ytr, xev, yev = digits()
        net = DigitsViT()
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.05)
        steps = epochs * -(-len(xtr) // 64)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
        gen = np.random.RandomState(seed)
        xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
        for _ in range(epochs):
            net.train()
            for idx in np.array_split(gen.permutation(len(xtr)), -(-len(xtr) // 64)):
                xb = xt[idx]
                shift = gen.randint(-1, 2, size=2)  # one-pixel translation: cheap augmentation
                xb = torch.roll(xb, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
                loss = nn.functional.cross_entropy(net(xb), yt[idx], label_smoothing=0.05)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        net.eval()
        with torch.no_grad():
            acc = float((net(torch.from_numpy(xev)).argmax(1).numpy() == yev).mean())
        log(f"trained {epochs} epochs: float accuracy {100 * acc:.2f}% on {len(xev)} held-out digits")
        return net, acc
    finally:
        torch.set_num_threads(threads)


def export(net: nn.Module, path: str, opset: int = 17) -> str:
    torch.onnx.export(net, (torch.zeros(1, 1, 8, 8),), path, dynamo=False, opset_version=opset,
                      input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return path


def write_data(out: str, n_calib: int = 512, seed: int = 0) -> dict:
    xtr, _, xev, yev = digits()
    idx = np.random.RandomState(seed).permutation(len(xtr))[:n_calib]
    paths = {"calib": os.path.join(out, "vit_calib.npz"), "eval": os.path.join(out, "vit_eval.npz")}
    np.savez(paths["calib"], x=xtr[idx])
    np.savez(paths["eval"], x=xev, labels=yev)
    return paths


def build(out: str, epochs: int = 100, seed: int = 0, log=print) -> dict:
    """Train, export and write data into `out`; returns {"model", "calib", "eval", "accuracy"}."""
    os.makedirs(out, exist_ok=True)
    net, acc = train(epochs, seed, log)
    model = export(net, os.path.join(out, "vit_digits.onnx"))
    return {"model": model, **write_data(out, seed=seed), "accuracy": acc}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t0 = time.time()
    res = build(a.out, a.epochs, a.seed)
    print(f"wrote {res['model']}, {res['calib']}, {res['eval']} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
