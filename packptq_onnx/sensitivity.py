"""Hessian-guided importance of each block (docs/METHOD.md, step 1).

For block t: quantize only block t, run the calibration set.
  L_t    = mean over samples of KL(p_fp || p_q,t) (classifier outputs) or MSE (other outputs)
  delta  = z - z_q at the block output; g = dL/dz on the float forward (teacher: quantized prediction)
  first  = sum(g * delta) / numel;  second = sum(delta^2 / 2) / numel
  S_t    = (L_t - first) / max(second, 1e-12);   Omega_t = S_t * mean|delta|
Cost: one quantized forward and one float forward/backward per block and batch; nothing is stored
across batches but running sums.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import state
from .convert import module_name


@dataclass
class BlockScore:
    block: int
    loss: float
    first: float
    second: float
    score: float          # S_t
    sensitivity: float    # Omega_t
    mean_abs_delta: float


def is_classifier(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.shape[1] > 1 and t.is_floating_point()


def batch_size(args) -> int:
    """Samples in a batch of model inputs (axis 0 of the first input that is not a scalar)."""
    return next((int(a.shape[0]) for a in args if torch.is_tensor(a) and a.dim()), 1)


def loss_sum(fp: list, q: list, n: int) -> torch.Tensor:
    """Sum over the n samples of a batch of KL(p_fp || p_q) (classifier outputs) or MSE (any other
    output, any rank), summed over outputs. Rows of a classifier output and the elements of any
    other output are averaged, then counted n times, so the samples' axis does not matter."""
    total = 0
    for a, b in zip(fp, q):
        if is_classifier(a):
            la, lb = F.log_softmax(a.float(), 1), F.log_softmax(b.float(), 1)
            total = total + (la.exp() * (la - lb)).sum(1).mean() * n
        elif a.is_floating_point():
            total = total + (a.float() - b.float()).pow(2).mean() * n
    return total


def _outputs(res) -> list:
    return list(res) if isinstance(res, (list, tuple)) else [res]


def _producer(model, tensor: str) -> tuple[int, int]:
    for i, node in enumerate(model.graph.node):
        if tensor in node.output:
            return i, list(node.output).index(tensor)
    raise KeyError(tensor)


def score_blocks(gm, qls, units, model, batches, n_samples: int, progress=None, log=None) -> list[BlockScore]:
    """batches: a callable returning a fresh iterable of input tuples (on the model's device).
    A block whose output gets no gradient is scored without the first-order term (and logged)."""
    no_grad: set = set()
    by_name = {q.layer.name: q for q in qls}
    out = []
    blocks = progress(units.blocks) if progress else units.blocks
    for block in blocks:
        idx, pos = _producer(model, block.output)
        mod = getattr(gm, module_name(idx))
        own = [by_name[n] for n in block.layers]
        store = {}

        def hook(_m, _inp, res, pos=pos, store=store):
            z = res[pos] if isinstance(res, (tuple, list)) else res
            if store.get("inject"):
                if not z.is_floating_point():  # an integer block output (ArgMax, a Cast): no gradient
                    store["leaf"] = z.detach()
                    return None
                leaf = z.detach().requires_grad_(True)
                store["leaf"] = leaf
                if isinstance(res, (tuple, list)):
                    return type(res)(leaf if i == pos else r for i, r in enumerate(res))
                return leaf
            store["z"] = z.detach()
            return None

        sums = dict(loss=0.0, first=0.0, second=0.0, absd=0.0, numel=0)
        with state.capture(post=[(mod, hook)]):
            for args in batches():
                store["inject"] = False
                with torch.no_grad(), state.quantized(qls, only=own):
                    yq = [t.detach() for t in _outputs(gm(*args))]
                zq = store.get("z")
                if zq is None:  # the block's output is not computed by the model (dead code)
                    break
                store["inject"] = True
                with torch.enable_grad(), state.quantized(qls, only=[]):
                    loss = loss_sum(_outputs(gm(*args)), yq, batch_size(args)) / n_samples
                    if torch.is_tensor(loss) and loss.requires_grad:
                        loss.backward()
                leaf = store["leaf"]
                delta = leaf.detach().float() - zq.float()
                sums["loss"] += float(loss.detach()) if torch.is_tensor(loss) else float(loss)
                if leaf.grad is None:  # no gradient reaches the block output (an op in onnxruntime)
                    no_grad.add(block.id)
                else:
                    sums["first"] += float((leaf.grad * delta).sum())
                sums["second"] += float(0.5 * delta.pow(2).sum())
                sums["absd"] += float(delta.abs().sum())
                sums["numel"] += delta.numel()
        n = max(sums["numel"], 1)
        first, second = sums["first"] / n, sums["second"] / n
        s = (sums["loss"] - first) / max(second, 1e-12)
        out.append(BlockScore(block.id, sums["loss"], first, second, s, s * sums["absd"] / n, sums["absd"] / n))
    if no_grad and log:
        log(f"warning: no gradient reaches block(s) {sorted(no_grad)} (an op runs in onnxruntime after "
            "them); scored without the first-order term")
    return out
