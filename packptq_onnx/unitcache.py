"""What a reconstruction unit learns from: its input and target tensors over the calibration set.

Samples do not always sit on axis 0 of an intermediate tensor: an LSTM's output is [T, D, N, H],
its state [D, N, H], and a Reshape can merge samples with time steps ([N*T, C]). The sample axis
of each tensor is found by running the graph on 1 and then 2 samples of the first batch: the one
axis that doubles (k entries per sample when it holds k at one sample). A tensor whose shape
does not change and whose value is the same in every batch (a scalar input, a computed
constant) is stored once. When some tensor fits neither (a graph whose batch is fixed, a value
that mixes the samples of a batch), the unit learns from whole calibration batches as they ran.
Stored: in memory, or memory-mapped on disk above a byte bound; on a GPU, in its memory when
they fit (no copy per iteration).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx


@dataclass
class Layout:
    axis: int | None   # sample axis; None: the same value for every batch (stored once)
    k: int = 1         # entries per sample along that axis


class _Capture(fx.Interpreter):
    def __init__(self, gm, wanted):
        super().__init__(gm)
        self.wanted, self.got = set(wanted), {}

    def run_node(self, n):
        res = super().run_node(n)
        if n in self.wanted:
            self.got[n] = res.detach()
            if len(self.got) == len(self.wanted):
                raise StopIteration
        return res


def _run(gm, args, wanted) -> dict:
    c = _Capture(gm, wanted)
    try:
        c.run(*args)
    except StopIteration:
        pass
    return c.got


@torch.no_grad()
def layouts(gm, args, wanted: list) -> list[Layout] | None:
    """Layout of each wanted node, from runs on 1 and 2 samples of `args`; None if any has none."""
    b = next((int(a.shape[0]) for a in args if torch.is_tensor(a) and a.dim()), 0)
    if b < 2:
        return None

    def cut(m):
        return tuple(a[:m] if torch.is_tensor(a) and a.dim() and a.shape[0] == b else a for a in args)

    try:
        one, two = _run(gm, cut(1), wanted), _run(gm, cut(2), wanted)
    except Exception:  # the graph does not run on fewer samples (batch fixed inside)
        return None
    out = []
    for n in wanted:
        s1, s2 = tuple(one[n].shape), tuple(two[n].shape)
        diff = [i for i, (x, y) in enumerate(zip(s1, s2)) if x != y]
        if len(s1) == len(s2) and len(diff) == 1 and s2[diff[0]] == 2 * s1[diff[0]]:
            out.append(Layout(diff[0], s1[diff[0]]))
        elif s1 == s2 and torch.equal(one[n], two[n]):
            out.append(Layout(None))
        else:
            return None
    return out


def _to_front(a: np.ndarray, lay: Layout) -> np.ndarray:
    """[..., N*k, ...] -> [N, ..., k, ...]"""
    s = a.shape
    return np.moveaxis(a.reshape(s[:lay.axis] + (-1, lay.k) + s[lay.axis + 1:]), lay.axis, 0)


def _from_front(t: torch.Tensor, lay: Layout) -> torch.Tensor:
    t = torch.movedim(t, 0, lay.axis)
    s = t.shape
    return t.reshape(s[:lay.axis] + (-1,) + s[lay.axis + 2:])


@torch.no_grad()
def capture(gm, batches, wanted: list, lays: list[Layout] | None):
    """Values of `wanted` fx nodes over all calibration batches: per node one array with samples
    first (lays given) or a list of arrays, one per batch (lays None)."""
    chunks = {n: [] for n in wanted}
    for args in batches:
        got = _run(gm, args, wanted)
        for n in wanted:
            chunks[n].append(got[n].cpu().numpy())
    if lays is None:
        return [chunks[n] for n in wanted]
    out = []
    for n, lay in zip(wanted, lays):
        if lay.axis is None:
            if any(not np.array_equal(c, chunks[n][0]) for c in chunks[n][1:]):
                return None
            out.append(chunks[n][0])
        else:
            out.append(np.concatenate([_to_front(c, lay) for c in chunks[n]]))
    return out


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """A 4-D float tensor in channels_last (NHWC in memory), anything else as it is. Convolutions and
    their backward pass run faster so on CPU (oneDNN), depthwise ones most, and elementwise work keeps
    the layout: EfficientNet-Lite0's reconstruction iterations 3.4 -> 2.1 s over all units, same runs
    (bench/RECON_SPEED.md)."""
    if t.dim() == 4 and t.is_floating_point():
        return t.contiguous(memory_format=torch.channels_last)
    return t


class Cache:
    """Inputs and targets of one unit. Items are samples (layouts known) or calibration batches."""

    def __init__(self, arrays: list, lays: list[Layout] | None, bound: int | None, directory: str | None,
                 device: str = "cpu", channels_last: bool = False):
        self.lays = lays
        # channels_last: 4-D float tensors come out channels_last; those with samples first are kept
        # as [N, 1, H, W, C], so a batch needs no copy per step
        self.channels_last = channels_last and not str(device).startswith("cuda")
        self.rowmajor = False
        self.bufs: dict = {}
        self.nhwc = [bool(self.channels_last and lay.axis == 0 and a.ndim == 5 and a.shape[1] == 1
                          and np.issubdtype(a.dtype, np.floating)) for a, lay in zip(arrays, lays or [])]
        for i, t in enumerate(self.nhwc):  # in place, one at a time: the row-major copy is freed as we go
            if t:
                arrays[i] = np.ascontiguousarray(arrays[i].transpose(0, 1, 3, 4, 2))
        flat = [c for a in arrays for c in (a if lays is None else [a])]
        total = sum(c.nbytes for c in flat)
        self.on_disk = bound is not None and total > bound
        self.tmp = None
        if self.on_disk:
            self.tmp = tempfile.TemporaryDirectory(prefix="packptq-cache-", dir=directory)
            mm = []
            for i, c in enumerate(flat):
                m = np.lib.format.open_memmap(os.path.join(self.tmp.name, f"{i}.npy"), "w+", c.dtype, c.shape)
                m[:] = c
                mm.append(m)
            flat = mm
        self.resident = None  # on a GPU, held in its memory when they take under half of what is free
        if str(device).startswith("cuda") and not self.on_disk and total < torch.cuda.mem_get_info()[0] // 2:
            self.resident = [torch.from_numpy(np.ascontiguousarray(c)).to(device) for c in flat]
        if lays is None:
            per = len(arrays[0])
            self.arrays = [flat[i * per:(i + 1) * per] for i in range(len(arrays))]
            self.n_items = per
        else:
            self.arrays = flat
            sized = [a for a, lay in zip(flat, lays) if lay.axis is not None]
            self.n_items = len(sized[0]) if sized else 1
        self.bytes = total

    def _layout(self, t: torch.Tensor) -> torch.Tensor:
        """A 4-D float tensor of a whole calibration batch in channels_last (a copy per call) while
        the cache hands out channels_last."""
        return channels_last(t) if self.channels_last and not self.rowmajor else t

    def row_major(self) -> None:
        """Batches row-major from now on (for a unit with an op that cannot take channels_last)."""
        self.rowmajor = True

    @property
    def per_batch(self) -> bool:
        return self.lays is None

    def batch(self, idx: np.ndarray, device) -> list[torch.Tensor]:
        """The items idx (sorted) of every tensor. On CPU they share memory with buffers that the next
        call of the same size overwrites: use them before asking for another batch."""
        if self.per_batch:  # one calibration batch
            i = int(idx[0])
            if self.resident is not None:
                per = len(self.arrays[0])
                return [self.resident[j * per + i] for j in range(len(self.arrays))]
            return [self._layout(torch.from_numpy(np.ascontiguousarray(a[i])).to(device)) for a in self.arrays]
        out = []
        for j, (a, lay) in enumerate(zip(self.arrays, self.lays)):
            if self.resident is not None:
                t = self.resident[j] if lay.axis is None else self.resident[j].index_select(
                    0, torch.from_numpy(idx).to(device))
            elif lay.axis is None:
                t = torch.from_numpy(np.ascontiguousarray(a)).to(device)
            else:  # gathered into a buffer kept for the next call of this size: a fresh array per step
                # cost EfficientNet-Lite0's first pack 0.18 s of its 1.0 s steps, in page faults
                shape = (len(idx),) + a.shape[1:]
                buf = self.bufs.get((j, shape))
                if buf is None:
                    buf = self.bufs[(j, shape)] = np.empty(shape, a.dtype)
                np.take(a, idx, axis=0, out=buf)
                t = torch.from_numpy(buf).to(device)
            if self.nhwc[j]:  # [n, 1, H, W, C] -> [n, C, H, W] channels_last (row-major after row_major())
                t = t.reshape(t.shape[0], *t.shape[2:]).permute(0, 3, 1, 2)
                out.append(t.contiguous() if self.rowmajor else t)
                continue
            out.append(t if lay.axis is None else _from_front(t, lay))
        return out

    def close(self):
        self.resident, self.bufs = None, {}
        if self.tmp is not None:
            self.tmp.cleanup()
