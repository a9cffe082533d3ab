"""Torch modules for ONNX ops (or opset versions) that onnx2torch 1.5.15 lacks; packptq_onnx.o2t
registers their converters, and tests/test_converters.py holds each against onnxruntime."""
from __future__ import annotations

import math

import torch
from torch import nn


class Reduce18(nn.Module):
    """ReduceX from opset 18 on: axes is an optional input."""

    def __init__(self, op: str, keepdims: bool, noop_with_empty_axes: bool):
        super().__init__()
        self.op, self.keepdims, self.noop = op, keepdims, noop_with_empty_axes

    def forward(self, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        if axes is None or axes.numel() == 0:
            if self.noop:
                return x
            dims = list(range(x.dim()))
        else:
            dims = sorted(int(a) % x.dim() for a in axes.tolist())
        k, op = self.keepdims, self.op
        if op == "ReduceMean":
            return x.mean(dim=dims, keepdim=k)
        if op == "ReduceSum":
            return x.sum(dim=dims, keepdim=k)
        if op == "ReduceMax":
            return x.amax(dim=dims, keepdim=k)
        if op == "ReduceMin":
            return x.amin(dim=dims, keepdim=k)
        if op == "ReduceProd":
            for d in sorted(dims, reverse=True):
                x = x.prod(dim=d, keepdim=k)
            return x
        if op == "ReduceL1":
            return x.abs().sum(dim=dims, keepdim=k)
        if op == "ReduceL2":
            return x.square().sum(dim=dims, keepdim=k).sqrt()
        if op == "ReduceSumSquare":
            return x.square().sum(dim=dims, keepdim=k)
        if op == "ReduceLogSum":
            return x.sum(dim=dims, keepdim=k).log()
        if op == "ReduceLogSumExp":
            return torch.logsumexp(x, dim=dims, keepdim=k)
        raise NotImplementedError(op)


class Split18(nn.Module):
    """Split of any opset: sizes from the input (13+), the attribute (< 13) or equal parts (the last
    smaller, as opset 18 says). One output is a tensor, not a 1-tuple: onnx2torch hands a node's
    only output to its readers as is (TF's unstack exports Split to one output, then Squeeze)."""

    def __init__(self, axis: int, num_outputs: int, sizes: list | None = None):
        super().__init__()
        self.axis, self.num_outputs, self.sizes = axis, num_outputs, sizes

    def forward(self, x: torch.Tensor, split: torch.Tensor | None = None):
        if split is not None:
            parts = torch.split(x, split.tolist(), dim=self.axis)
        elif self.sizes:
            parts = torch.split(x, self.sizes, dim=self.axis)
        else:
            parts = torch.split(x, math.ceil(x.shape[self.axis] / self.num_outputs), dim=self.axis)
        return parts[0] if self.num_outputs == 1 else parts


class GlobalMaxPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


class GlobalAveragePool(nn.Module):
    """Mean over every axis after the channels, of the tensor it gets. onnx2torch's takes the axes from
    the input's value_info, and a value_info with a type but no shape reads as rank 0: no axes, so
    torch.mean reduced everything (an unseen wheel model, g2p-id's BERT, whose LayerNorm means are
    GlobalAveragePools on [N, T, C]: (1, 1, 1) instead of (N, T, 1), cosine 0.938)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


class AveragePoolPadded(nn.Module):
    """AveragePool whose pads differ at the two ends of an axis (Caffe-era exports: the onnx wheel's
    light_inception_v1 ends in a 7x7 pool with pads [0, 0, 1, 1]; SAME padding with an even kernel).
    torch pads both ends alike, and onnx2torch refused the node, so the model's float part cut the
    gradient to every block before it. Zero-pad explicitly, sum each window, divide by the number of
    input elements in it (count_include_pad=0, the default) or by the kernel size."""

    def __init__(self, kernel: list, stride: list, pads: list, count_include_pad: bool):
        super().__init__()
        n = len(kernel)
        self.kernel, self.stride, self.include = list(kernel), list(stride), count_include_pad
        self.pad = [p for i in reversed(range(n)) for p in (pads[i], pads[n + i])]  # torch: last axis first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s, one = self.kernel, self.stride, len(self.kernel) == 1
        if one:  # a 1-D pool as a 2-D one of height 1
            x, k, s = x.unsqueeze(-2), [1] + k, [1] + s
        pool = torch.nn.functional.avg_pool2d if len(k) == 2 else torch.nn.functional.avg_pool3d
        pad = self.pad + ([0, 0] if one else [])
        y = pool(torch.nn.functional.pad(x, pad), k, s, divisor_override=1)  # window sums
        if self.include:
            y = y / math.prod(k)
        else:
            ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
            y = y / pool(torch.nn.functional.pad(ones, pad), k, s, divisor_override=1)
        return y.squeeze(-2) if one else y


class ReshapeAllowZero(nn.Module):
    def forward(self, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        return torch.reshape(x, [int(s) for s in shape.tolist()])


class Clamp(nn.Module):
    def __init__(self, lo: float | None, hi: float | None):
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.lo, self.hi)


class Flatten(nn.Module):
    """ONNX Flatten: 2-D (prod(dims[:axis]), prod(dims[axis:])) for any axis in [-r, r]."""

    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.axis % x.dim() if self.axis < 0 else self.axis
        return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


class DropoutInference(nn.Module):
    """Dropout at inference: the input as it is, and (a second ONNX output) an all-true mask.
    onnx2torch returns the tensor alone, so a Dropout with its mask output had its first output
    read as `tensor[0]`: one sample instead of the batch (the onnx wheel's light_squeezenet gave
    (1000, 13, 1) for (1, 1000, 1, 1))."""

    def __init__(self, with_mask: bool):
        super().__init__()
        self.with_mask = with_mask

    def forward(self, x: torch.Tensor, *_ignored):
        return (x, torch.ones_like(x, dtype=torch.bool)) if self.with_mask else x


class BatchNormAnyRank(nn.Module):
    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x, scale, bias, mean, var):
        shape = [1, -1] + [1] * (x.dim() - 2)
        inv = scale / torch.sqrt(var + self.eps)
        return (x - mean.view(shape)) * inv.view(shape) + bias.view(shape)


class CumSum(nn.Module):
    def __init__(self, exclusive: bool, reverse: bool):
        super().__init__()
        self.exclusive, self.reverse = exclusive, reverse

    def forward(self, x: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
        d = int(axis.item()) % x.dim()
        if self.reverse:
            x = torch.flip(x, dims=(d,))
        y = torch.cumsum(x, dim=d)
        if self.exclusive:
            y = y - x
        if self.reverse:
            y = torch.flip(y, dims=(d,))
        return y
