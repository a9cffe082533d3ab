"""ONNX LSTM, GRU and RNN as torch modules, so gradients reach the layers before them.

onnx2torch has no converter for them; without one the node ran in onnxruntime and no gradient
crossed it (pack scoring and reconstruction of everything upstream had nothing to learn from).
The step equations follow the ONNX operator definitions exactly, including `direction`
(forward, reverse, bidirectional), `layout`, `clip`, `sequence_lens` (steps past a sequence's
length leave its state alone and write zeros to Y), initial states, peepholes (LSTM) and
`linear_before_reset` (GRU). Activations other than the defaults (and Relu), activation
parameters and LSTM's `input_forget` raise NotImplementedError: the node then falls back to
onnxruntime as any unconverted op does. A parity test holds each attribute against onnxruntime.
The weights stay float in the export: onnxruntime has no QDQ kernel for these ops.
"""
from __future__ import annotations

import torch
from torch import nn

_ACT = {"Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Relu": torch.relu}
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_DEFAULT_ACTS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}


class Recurrent(nn.Module):
    def __init__(self, op: str, hidden: int, direction: str, layout: int, clip: float | None,
                 acts: list[str], linear_before_reset: bool, n_out: int):
        super().__init__()
        self.n_out = n_out
        self.op, self.hidden, self.layout, self.clip = op, hidden, layout, clip
        self.dirs = ["forward", "reverse"] if direction == "bidirectional" else [direction]
        per = len(_DEFAULT_ACTS[op])
        self.acts = [acts[i * per:(i + 1) * per] for i in range(len(self.dirs))]
        self.lbr = linear_before_reset

    def _cell(self, d: int, pre_x, h, c, r, rb, p):
        """One step of direction d. pre_x = X_t W^T + Wb (all gates)."""
        f = [_ACT[a] for a in self.acts[d]]
        clip = (lambda v: v.clamp(-self.clip, self.clip)) if self.clip is not None else (lambda v: v)
        H = self.hidden
        if self.op == "RNN":
            return f[0](clip(pre_x + h @ r.T + rb)), None
        if self.op == "GRU":
            xz, xr, xh = pre_x.split(H, -1)
            rz, rr, rh = r.split(H, 0)
            bz, br, bh = rb.split(H, 0)
            z = f[0](clip(xz + h @ rz.T + bz))
            rt = f[0](clip(xr + h @ rr.T + br))
            if self.lbr:
                ht = f[1](clip(xh + rt * (h @ rh.T + bh)))
            else:
                ht = f[1](clip(xh + (rt * h) @ rh.T + bh))
            return (1 - z) * ht + z * h, None
        g = pre_x + h @ r.T + rb
        gi, go, gf, gc = g.split(H, -1)
        pi, po, pf = (p[:H], p[H:2 * H], p[2 * H:]) if p is not None else (0, 0, 0)
        i = f[0](clip(gi + pi * c))
        fg = f[0](clip(gf + pf * c))
        c_new = fg * c + i * f[1](clip(gc))
        o = f[0](clip(go + po * c_new))
        return o * f[2](c_new), c_new

    def forward(self, x, w, r, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None):
        if self.layout == 1:
            x = x.transpose(0, 1)
        T, N, _ = x.shape
        H, G = self.hidden, _GATES[self.op]
        if initial_h is not None and self.layout == 1:
            initial_h = initial_h.transpose(0, 1)
        if initial_c is not None and self.layout == 1:
            initial_c = initial_c.transpose(0, 1)
        ys, hs, cs = [], [], []
        for d, name in enumerate(self.dirs):
            wb = b[d, :G * H] if b is not None else 0
            rb = b[d, G * H:] if b is not None else torch.zeros(G * H, dtype=x.dtype, device=x.device)
            pre = x @ w[d].T + wb                                   # [T, N, G*H]
            h = initial_h[d] if initial_h is not None else x.new_zeros(N, H)
            c = initial_c[d] if initial_c is not None else x.new_zeros(N, H)
            pd = p[d] if p is not None else None
            out = [None] * T
            steps = range(T - 1, -1, -1) if name == "reverse" else range(T)
            for t in steps:
                h_new, c_new = self._cell(d, pre[t], h, c, r[d], rb, pd)
                if sequence_lens is not None:
                    valid = (t < sequence_lens.to(x.device)).unsqueeze(1)
                    h_new = torch.where(valid, h_new, h)
                    if c_new is not None:
                        c_new = torch.where(valid, c_new, c)
                    out[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
                else:
                    out[t] = h_new
                h = h_new
                c = c_new if c_new is not None else c
            ys.append(torch.stack(out))                              # [T, N, H]
            hs.append(h)
            cs.append(c)
        y, yh, yc = torch.stack(ys, 1), torch.stack(hs), torch.stack(cs)  # [T, D, N, H], [D, N, H]
        if self.layout == 1:
            y, yh, yc = y.permute(2, 0, 1, 3), yh.transpose(0, 1), yc.transpose(0, 1)
        res = (y, yh, yc)[:self.n_out]
        return res[0] if self.n_out == 1 else res


def module_for(node, hidden: int | None) -> Recurrent:
    """The module for an onnx2torch node of op LSTM, GRU or RNN; NotImplementedError if unsupported.
    hidden: from R's shape when the attribute is absent."""
    op, a = node.operation_type, node.attributes
    hidden = a.get("hidden_size", hidden)
    if hidden is None:
        raise NotImplementedError(f"{op} without hidden_size and with a computed R is not supported")
    dirs = 2 if a.get("direction", "forward") == "bidirectional" else 1
    acts = list(a.get("activations", _DEFAULT_ACTS[op] * dirs))
    if any(x not in _ACT for x in acts) or len(acts) != len(_DEFAULT_ACTS[op]) * dirs:
        raise NotImplementedError(f"{op} activations {acts} are not supported")
    if a.get("activation_alpha") or a.get("activation_beta"):
        raise NotImplementedError(f"{op} activation_alpha/beta are not supported")
    if a.get("input_forget", 0):
        raise NotImplementedError("LSTM input_forget is not supported")
    clip = a.get("clip")
    return Recurrent(op, int(hidden), a.get("direction", "forward"), int(a.get("layout", 0)),
                     None if clip is None else float(clip), acts, bool(a.get("linear_before_reset", 0)),
                     len(node.output_values))
