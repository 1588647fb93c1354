"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., ICML 2024, arXiv 2402.09353).

The adapted weight is split into a magnitude ``m`` (one entry per output row) and a
direction, the LoRA-updated weight normalised row-wise:

    W' = (m / n)[:, None] * (W + s B A),      n = ||W + s B A||_row  (detached, paper §4.3)
    y  = W' x + b = g * (W x + s B A x) + b,   g = m / n

Shapes on the (out, in_flat) view of the weight (see :mod:`adaptkit.methods.lora`):
    lora_A: (r, in_flat),  lora_B: (out, r),  lora_magnitude: (out,)
and ``m`` is initialised to ``n`` (so a fresh adapter leaves the output unchanged). The bias
is never scaled. With dropout in training the PEFT semantics hold:
``y = W x + b + (g - 1) W x~ + g s B A x~`` with ``x~ = dropout(x)`` (one extra base GEMM).

Row norm without the dense ``W + sBA`` (never an out x in temporary; fp32, O(out * r)):

    n_o^2 = ||W_o||^2 + 2 s sum_k B[o,k] (W A^T)[o,k] + s^2 sum_kl B[o,k] (A A^T)[k,l] B[o,l]

``||W_o||^2`` is cached (keyed on the weight's storage and version, so a merge of another
adapter, a load or a device move invalidates it); ``W A^T`` pushes A's r rows through the
frozen base op without bias, so any base that only offers its op (e.g. NF4) works. In eval
mode the whole ``n`` is cached until A, B or W change.

Memory: the output scaling ``out = g * (y + u) + b (1 - g)`` (``u = s B A x``) is one
autograd node that saves the *output* (which the next op usually keeps anyway) instead of
a (tokens, out) intermediate; ``dL/dm = sum dL/dout * (out - b) / m``. Consequence: an
in-place op modifying the layer output (``ReLU(inplace=True)`` right after it) makes
backward raise PyTorch's in-place error; and an entry with ``m == 0`` exactly gets a zero
gradient (its direction cannot be read back from the output).

Merge uses the dense norm of the unmerged weight and caches it, so unmerge
``W = W' / g - s B A`` is exact up to fp32 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import AdaptkitError
from ..layer import AdaptedLayer
from ..spec import register_method
from .lora import LoRA, LoRAAdapter, check_rank, lora_scale

_CHUNK = 1 << 22  # elements of W converted to fp32 at a time for the cached row norms


@register_method
@dataclass(frozen=True)
class DoRA(LoRA):
    """DoRA spec: the LoRA fields (``rank``, ``alpha``, ``dropout``, ``use_rslora``, ``init``)
    plus a trainable magnitude per output row. Adapts Linear, GPT-2 Conv1D and Conv1d/2d/3d
    (grouped convs included); not Embedding."""

    method = "dora"

    def supports(self, kind: str) -> bool:
        return kind in ("linear", "conv1d_t", "conv")

    def build(self, layer: AdaptedLayer, path: str) -> "DoRAAdapter":
        r = self.rank_for(path)
        check_rank(type(self).__name__, r, layer, path)
        s = lora_scale(self.alpha_for(path), r, self.use_rslora)
        return DoRAAdapter(layer, r, s, self.dropout, self.init)


def _weight_key(w: torch.Tensor) -> tuple:
    return (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))


class _DoRAScale(torch.autograd.Function):
    """out = g * (y + u) + b * (1 - g) with g = m / n broadcast over the channel dim ``cd``.

    Saves the output rather than ``y + u``: ``dL/dm = sum(go * (out - b)) / m``."""

    @staticmethod
    def forward(ctx, y, u, m, n, bias, cd):
        shape = (-1,) + (1,) * (y.dim() - 1 - cd)  # (out,) or (out, 1, .., 1) for conv maps
        g = (m.float() / n).to(y.dtype).view(shape)
        t = y + u
        if bias is None:
            out = t.mul_(g)
        else:
            out = torch.addcmul(bias.view(shape) * (1 - g), g, t)
        ctx.cd, ctx.shape = cd, shape
        keep_b = bias is not None and (m.requires_grad or bias.requires_grad)
        ctx.save_for_backward(out if m.requires_grad else None, g,
                              m if m.requires_grad else None, bias if keep_b else None)
        return out

    @staticmethod
    def backward(ctx, go):
        out, g, m, bias = ctx.saved_tensors
        gt = go * g  # d out / d y = d out / d u = g
        dims = [d for d in range(go.dim()) if d != ctx.cd]
        gm = gb = None
        if ctx.needs_input_grad[2]:
            z = out.float() if bias is None else out.float() - bias.float().view(ctx.shape)
            s = (go.float() * z).sum(dims)  # (out,): sum over tokens of go * g * (y + u - b)
            mf = m.float()
            gm = torch.where(mf != 0, s / torch.where(mf != 0, mf, 1.0), 0.0).to(m.dtype)
        if ctx.needs_input_grad[4]:  # the direct b (1 - g) term; y carries the other g b
            gb = (go * (1 - g)).sum(dims).to(bias.dtype)
        return gt, gt, gm, None, gb, None


class _FusedBase(torch.autograd.Function):
    """One GEMM for the tokens and A's rows: [x; A] -> ([x; A] W^T)[:T] + b and (A W^T)
    (Linear; GPT-2 Conv1D uses x @ W). Backward: the tokens' input gradient only (W frozen)."""

    @staticmethod
    def forward(ctx, x2, A, w, bias, transposed):
        T = x2.shape[0]
        xa = torch.cat([x2, A])  # (T + r, in)
        out = xa @ w if transposed else F.linear(xa, w)  # (T + r, out)
        y = out[:T] + bias if bias is not None else out[:T].clone()  # fresh tensors, not views
        wat = out[T:].clone()  # (r, out) = (W A^T)^T
        ctx.transposed = transposed
        ctx.save_for_backward(w if ctx.needs_input_grad[0] else None)
        ctx.mark_non_differentiable(wat)
        return y, wat

    @staticmethod
    def backward(ctx, gy, _):
        (w,) = ctx.saved_tensors
        gx = None
        if ctx.needs_input_grad[0]:
            gx = gy @ w.t() if ctx.transposed else gy @ w  # (T, out) -> (T, in)
        gb = gy.sum(0) if ctx.needs_input_grad[3] else None
        return gx, None, None, gb, None


class DoRAAdapter(LoRAAdapter):
    """LoRA factors plus ``lora_magnitude`` (out,); see the module docstring for the math."""

    fuses_base = True  # first in the active set: W A^T rides along the base GEMM

    def __init__(self, layer: AdaptedLayer, rank: int, scale: float, dropout: float, init: str):
        super().__init__(layer, rank, scale, dropout, init)
        w = layer.weight
        self.lora_magnitude = nn.Parameter(torch.ones(layer.out_features, device=w.device, dtype=w.dtype))
        # plain attributes (not state): caches of ||W_o||^2, of n in eval mode, and the norm
        # of the unmerged weight recorded at merge time (needed for an exact unmerge)
        self._wsq: tuple | None = None
        self._ncache: tuple | None = None
        self._merge_norm: torch.Tensor | None = None
        self._wat: tuple | None = None  # (key, W A^T) from base_forward, used by the next apply

    def attach(self, layer: AdaptedLayer) -> None:
        super().attach(layer)  # residual inits (pissa / olora) change W first
        with torch.no_grad():  # m = ||W + s B A||_row: the output is unchanged
            self.lora_magnitude.copy_(self.row_norm(layer))

    # ---- norms ------------------------------------------------------------------------
    @torch.no_grad()
    def _weight_sq(self, layer: AdaptedLayer) -> torch.Tensor:
        """Cached ``||W_o||^2`` (out,) in fp32, recomputed when W changes."""
        w = layer.weight
        key = _weight_key(w)
        if self._wsq is not None and self._wsq[0] == key:
            return self._wsq[1]
        if w.is_floating_point():
            w2 = layer.to_2d(w.detach())  # (out, in_flat), a view
            step = max(1, _CHUNK // max(1, w2.shape[1]))
            sq = torch.cat([w2[i:i + step].float().pow(2).sum(1) for i in range(0, w2.shape[0], step)])
        else:  # a base that only offers its op: columns of W^T are base_op(e_i)
            n_in, sq = layer.in_features, 0.0
            step = max(1, _CHUNK // max(1, layer.out_features))
            for i in range(0, n_in, step):
                eye = torch.eye(n_in, device=w.device)[i:i + step]  # (chunk, in)
                sq = sq + layer.base_op(eye, w, None).float().pow(2).sum(0)  # (out,)
        self._wsq = (key, sq)
        return sq

    def _w_at(self, layer: AdaptedLayer) -> torch.Tensor:
        """``W A^T`` (out, r) in fp32, by pushing A's rows through the base op without bias
        (conv: a matmul on the (out, in_flat) view; conv weights are small)."""
        w, A = layer.weight, self.lora_A.detach()
        if layer.kind == "conv":
            return (layer.to_2d(w) @ A.to(w.dtype).t()).float()  # (out, in_flat) @ (in_flat, r)
        return layer.base_op(A.to(w.dtype), w, None).float().t()  # (r, out) -> (out, r)

    def _key(self, layer: AdaptedLayer) -> tuple:
        A, B = self.lora_A, self.lora_B
        return (_weight_key(layer.weight), A._version, A.data_ptr(), B._version, B.data_ptr(), self.scale)

    @torch.no_grad()
    def row_norm(self, layer: AdaptedLayer) -> torch.Tensor:
        """n = ||W + s B A||_row (out,), fp32, detached, via the low-rank identity above."""
        A, B, key = self.lora_A, self.lora_B, self._key(layer)
        if not self.training and self._ncache is not None and self._ncache[0] == key:
            return self._ncache[1]
        wat, self._wat = self._wat, None
        wat = wat[1].float().t() if wat is not None and wat[0] == key else self._w_at(layer)  # (out, r)
        s, Bf, Af = self.scale, B.float(), A.float()
        n2 = (self._weight_sq(layer) + (2 * s) * (Bf * wat).sum(1)
              + (s * s) * ((Bf @ (Af @ Af.t())) * Bf).sum(1))  # (out,) from (out, r) terms
        n = n2.clamp_min_(0).sqrt_()
        self._ncache = (key, n) if not self.training else None
        return n

    # ---- forward ----------------------------------------------------------------------
    def base_forward(self, x: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        """The base output; for Linear-likes with W A^T still to compute, in one GEMM with it
        (at few tokens the GEMM is bound by reading W, so the r extra rows are nearly free)."""
        w, b = layer.weight, layer.bias
        if (layer.kind == "conv" or w.requires_grad or x.dtype != w.dtype or x.shape[-1] != layer.in_features
                or (not self.training and self._ncache is not None and self._ncache[0] == self._key(layer))):
            return layer.base_op(x, w, b)
        x2 = x.reshape(-1, x.shape[-1])  # (..., in) -> (T, in)
        y, wat = _FusedBase.apply(x2, self.lora_A.detach().to(w.dtype), w, b, layer.kind == "conv1d_t")
        self._wat = (self._key(layer), wat)
        return y.view(*x.shape[:-1], y.shape[-1])  # (T, out) -> (..., out)

    def _update(self, x: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        """u = s B A x (the plain LoRA update, not yet added to anything)."""
        A, B = self.lora_A, self.lora_B
        if layer.kind != "conv":
            return F.linear(F.linear(x, A), B * self.scale)  # (..., r) -> (..., out)
        if self.dense_conv:  # grouped conv: the dense delta, reshaped to the weight
            return layer._conv_forward(x, self.delta_weight(layer).to(A.dtype), None)
        w = layer.weight
        h = layer._conv_forward(x, A.view(self.rank, *w.shape[1:]), None)  # (N, r, *spatial)
        nd = w.dim() - 2
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        return conv(h, (self.scale * B).view(*B.shape, *[1] * nd))  # B as (out, r, 1..)

    def apply(self, x: torch.Tensor, y: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        n = self.row_norm(layer)
        m = self.lora_magnitude
        cd = y.dim() - (layer.weight.dim() - 1) if layer.kind == "conv" else y.dim() - 1
        if self.p and self.training:  # PEFT: W x~ recomputed on the dropped-out input
            xd = F.dropout(x, self.p, True).to(self.lora_A.dtype)
            wx = layer.base_op(xd, layer.weight, None)
            g = (m.float() / n).to(y.dtype).view((-1,) + (1,) * (y.dim() - 1 - cd))
            return y + (g - 1) * wx + g * self._update(xd, layer).to(y.dtype)
        u = self._update(x.to(self.lora_A.dtype), layer).to(y.dtype)
        return _DoRAScale.apply(y, u, m, n, layer.bias, cd)

    # ---- merge ------------------------------------------------------------------------
    def merge_weight(self, layer: AdaptedLayer, w32: torch.Tensor) -> torch.Tensor:
        """W' = g (w32 + dW), n from the dense *unmerged* stored weight (cached for unmerge)."""
        d = layer.to_2d(self.delta_weight(layer))  # (out, in_flat) fp32
        n = (layer.to_2d(layer.dense_weight()) + d).norm(dim=1)  # (out,)
        if not self.merged:
            self._merge_norm = n
        g = self.lora_magnitude.detach().float() / n
        return layer.from_2d(g[:, None] * (layer.to_2d(w32) + d))

    def unmerge_weight(self, layer: AdaptedLayer, w32: torch.Tensor) -> torch.Tensor:
        if self._merge_norm is None:
            raise AdaptkitError("DoRA unmerge: this adapter has no recorded merge norm (it was not "
                                "merged by this layer's merge()); reload the base weights instead")
        d = layer.to_2d(self.delta_weight(layer))
        g = self.lora_magnitude.detach().float() / self._merge_norm.to(w32.device)
        self._merge_norm = None
        return layer.from_2d(layer.to_2d(w32) / g[:, None] - d)
