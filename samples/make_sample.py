"""Build the bundled sample: a small residual CNN trained on scikit-learn's 8x8 digits.

Writes samples/digits_resnet.onnx, samples/calib.npz (512 training images) and samples/eval.npz
(held-out images with 'labels'). Deterministic for a fixed seed; about a minute on 2 CPU cores.
    python samples/make_sample.py
"""
import os

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.short is None else self.short(x)))


def model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        Block(16, 16), Block(16, 32, 2), Block(32, 32),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def main(seed: int = 0) -> None:
    torch.manual_seed(seed)
    x, y = load_digits(return_X_y=True)
    x = (x.astype(np.float32) / 16.0 - 0.5).reshape(-1, 1, 8, 8) / 0.5
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    net = model()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    epochs = 40
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * (-(-len(xt) // 64)))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            xb = xt[idx]
            shift = torch.randint(-1, 2, (2,), generator=gen).tolist()  # light augmentation
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = nn.functional.cross_entropy(net(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        acc = (net(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean()
    print(f"held-out accuracy {100 * acc:.2f}% on {len(yte)} images")
    path = os.path.join(HERE, "digits_resnet.onnx")
    torch.onnx.export(net, (torch.zeros(1, 1, 8, 8),), path, dynamo=False, opset_version=17,
                      input_names=["image"], output_names=["logits"], dynamic_axes={"image": {0: "batch"}})
    np.savez_compressed(os.path.join(HERE, "calib.npz"), image=xtr[:512])
    np.savez_compressed(os.path.join(HERE, "eval.npz"), image=xte, labels=yte.astype(np.int64))


if __name__ == "__main__":
    main()
