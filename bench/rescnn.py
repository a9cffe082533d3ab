"""The residual CNN of the latency issue: 4 stages of two residual blocks, width 4 (4, 8, 16, 32
channels), 128x128 RGB input, random weights with non-trivial BatchNorm statistics (folded).

    python bench/rescnn.py OUT_DIR   -> OUT_DIR/rescnn.onnx, OUT_DIR/rescnn_calib.npz (64 images)
Latency does not depend on trained weights; the calibration images are photos shipped with
scikit-image (bench/photos.py), so activation ranges are those of real pictures."""
import os
import sys

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "tests")]
from nets import ResBlock, _bn  # noqa: E402


class ResCNN(nn.Module):
    def __init__(self, width=4, stages=4, classes=10):
        super().__init__()
        chans = [width * 2 ** i for i in range(stages)]
        self.stem = nn.Sequential(nn.Conv2d(3, chans[0], 3, 1, 1, bias=False), _bn(chans[0]), nn.ReLU())
        blocks, cin = [], chans[0]
        for i, c in enumerate(chans):
            blocks += [ResBlock(cin, c, 1 if i == 0 else 2), ResBlock(c, c)]
            cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    net = ResCNN().eval()
    path = os.path.join(out, "rescnn.onnx")
    torch.onnx.export(net, (torch.randn(1, 3, 128, 128),), path, input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False, dynamic_axes={"x": {0: "batch"}})
    from photos import CALIB_PHOTOS, make_set  # bench/photos.py: 224x224 crops, scaled to 128
    x = torch.nn.functional.interpolate(torch.from_numpy(make_set(CALIB_PHOTOS, 64, 0)), size=128,
                                        mode="bilinear", antialias=True).numpy()
    np.savez(os.path.join(out, "rescnn_calib.npz"), x=x)
    print(path, x.shape)


if __name__ == "__main__":
    main()
