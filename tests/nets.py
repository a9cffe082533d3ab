"""Small networks the tests build and export themselves: ResNet-like, MobileNetV2-like, tiny ViT."""
import numpy as np
import torch
from torch import nn


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():  # non-trivial statistics, so folding is really exercised
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return bn


class ResBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _bn(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), _bn(cout)
        self.short = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))

    def forward(self, x):
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return torch.relu(y + (x if self.short is None else self.short(x)))


class ResNetLike(nn.Module):
    input_shape = (3, 16, 16)
    n_blocks = 3

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), _bn(8), nn.ReLU())
        self.blocks = nn.Sequential(ResBlock(8, 8), ResBlock(8, 16, 2), ResBlock(16, 16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), _bn(mid), nn.ReLU6(),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), _bn(mid), nn.ReLU6(),
            nn.Conv2d(mid, cout, 1, bias=False), _bn(cout))

    def forward(self, x):
        return x + self.body(x) if self.use_res else self.body(x)


class MobileNetV2Like(nn.Module):
    input_shape = (3, 16, 16)
    n_blocks = 4

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), _bn(8), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(8, 8, 1, 1), InvertedResidual(8, 12, 2, 4),
                                    InvertedResidual(12, 12, 1, 4), InvertedResidual(12, 16, 1, 4))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, t, d))


class ViTBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.n1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.n2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class TinyViT(nn.Module):
    input_shape = (3, 16, 16)
    n_blocks = 2

    def __init__(self, dim=32):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.1)
        self.blocks = nn.Sequential(ViTBlock(dim, 4), ViTBlock(dim, 4))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


class ChainNet(nn.Module):
    """LCNet-like plain chain: a stem conv, depthwise-separable pairs with hard-swish, no residual."""
    input_shape = (3, 16, 16)

    def __init__(self):
        super().__init__()
        layers, c = [nn.Conv2d(3, 8, 3, 2, 1, bias=False), _bn(8), nn.Hardswish()], 8
        for cout, stride in ((16, 1), (16, 2), (24, 1)):
            layers += [nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False), _bn(c), nn.Hardswish(),
                       nn.Conv2d(c, cout, 1, bias=False), _bn(cout), nn.Hardswish()]
            c = cout
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        bs = x.shape[0]  # read at the start, used at the end (as EfficientNet-PyTorch does): Shape -> Reshape
        return self.head(self.body(x).mean((2, 3)).reshape(bs, -1))


ARCHS = {"resnet": ResNetLike, "mobilenetv2": MobileNetV2Like, "vit": TinyViT, "chain": ChainNet}


def build(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ARCHS[arch]().eval()


def export(net, path, opset=17, dynamo=False, fold=True) -> str:
    x = torch.randn(1, *net.input_shape)
    kw = dict(input_names=["x"], output_names=["y"], opset_version=opset, dynamo=dynamo)
    if dynamo:
        kw["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=1024)},)
    else:
        kw.update(dynamic_axes={"x": {0: "batch"}}, do_constant_folding=fold)
        if not fold:
            kw["training"] = torch.onnx.TrainingMode.PRESERVE
    torch.onnx.export(net, (x,), str(path), **kw)
    return str(path)


def inputs(net, n=16, seed=1):
    return {"x": np.random.RandomState(seed).randn(n, *net.input_shape).astype(np.float32)}
