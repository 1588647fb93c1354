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
frozen base op without bias, so any base that only offers its op (e.g. NF4) works. When
DoRA is first in the active set of a Linear-like, A's rows ride along the tokens in the
base GEMM itself (``[x; A] W^T``; core hook ``Adapter.fuses_base``): at few tokens that GEMM
is bound by reading W, so the norm costs almost nothing. In eval mode ``n`` is cached
until A, B or W change.

Memory: ``out = g * t + b (1 - g)`` with ``t = y + s B A x`` (one fused addmm) is one
autograd node, written in place, that keeps only the output (which the next op usually
saves anyway), not a (tokens, out) intermediate: ``dL/dm = sum dL/dout * (out - b) / m``.
If the output is changed in place before backward (``ReLU(inplace=True)``) the node sees
the version change and recomputes ``W x + s B A x`` from the saved input instead. An entry
with ``m == 0`` exactly gets a zero gradient on the fast path (its direction cannot be read
back from the output; PEFT's init gives m = 0 only for a zero row, where it gives NaN).

Every path takes n from ``row_norm`` and g from ``_gain``: the fast and fused forwards, the
dense (grouped conv, dropout, compiled) ones, QDoRA (the NF4 base pushes A's rows through its
own op) and the merge, which uses the norm of the unmerged weight and caches it, so unmerge
``W = W' / g - s B A`` is exact up to fp32 rounding and merged == unmerged output.

Under ``torch.compile`` (``layer.tracing()``) the eager-only machinery is skipped so the
layer traces with no graph break: no caches (their keys are data pointers), no fused base
GEMM (``W A^T`` is its own small GEMM), and ``out = g * t + b (1 - g)`` in plain ops, whose
backward AOTAutograd plans (and which gives ``m == 0`` its exact gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import AdaptkitError
from ..layer import AdaptedLayer, tracing
from ..spec import register_method
from .lora import LoRA, LoRAAdapter, LoRAPeft, check_rank, lora_scale

_CHUNK = 1 << 22  # elements of W converted to fp32 at a time for the cached row norms


@register_method
@dataclass(frozen=True)
class DoRA(LoRA):
    """DoRA spec: the LoRA fields (``rank``, ``alpha``, ``dropout``, ``use_rslora``, ``init``)
    plus a trainable magnitude per output row. Adapts Linear, GPT-2 Conv1D and Conv1d/2d/3d
    (grouped convs included); not Embedding."""

    method = "dora"

    def supports(self, kind: str) -> bool:
        return kind in ("linear", "conv1d_t", "conv", "param")

    def build(self, layer: AdaptedLayer, path: str) -> DoRAAdapter:
        r = self.rank_for(path)
        check_rank(type(self).__name__, r, layer, path)
        s = lora_scale(self.alpha_for(path), r, self.use_rslora)
        if layer.kind == "param":  # target_parameters: magnitude per expert row (methods/lora_param.py)
            from .lora_param import ParamDoRAAdapter, check_param_spec

            check_param_spec(self, path)
            return ParamDoRAAdapter(layer, r, s, self.init)  # type: ignore[return-value]  # same protocol
        return DoRAAdapter(layer, r, s, self.dropout, self.init)


def _autocast(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def _weight_key(w: torch.Tensor) -> tuple:
    return (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))


def _gain(m: torch.Tensor, n: torch.Tensor, like: torch.Tensor, cd: int) -> torch.Tensor:
    """The rescale g = m / n (the paper's ``m / ||W0 + BA||_c``) for every path: divided in fp32
    (m (out,), n (out,) fp32), cast once to ``like``'s dtype and shaped to broadcast over its
    channel dim ``cd``: (out,) for a token-major output, (out, 1, .., 1) for a conv map or the
    (out, in_flat) weight of a merge."""
    return (m.float() / n).to(like.dtype).view((-1,) + (1,) * (like.dim() - 1 - cd))


class _DoRAScale(torch.autograd.Function):
    """out = g * t + b * (1 - g), g = m / n broadcast over the channel dim ``cd``, where
    ``t = y + s B A x`` is a fresh tensor.

    ``recompute`` None (DoRA is not first in the active set): out is a new tensor and t is
    saved. Otherwise out is written into t in place and only a detached alias of out is
    kept, so nothing of size (tokens, out) is saved beyond the output the next op usually
    keeps anyway: ``dL/dm = sum(go * (out - b)) / m``. If an in-place op downstream changed
    the output before backward (``ReLU(inplace=True)``), or on a second backward, the
    version check sends it to ``recompute(x) = W x + s B A x`` instead (x is saved by the
    LoRA branch anyway). An entry with m == 0 then gets a zero gradient (its row of the
    output is b whatever the direction)."""

    @staticmethod
    def forward(ctx, t, m, n, bias, x, cd, recompute):
        g = _gain(m, n, t, cd)  # (out,) or (out, 1, .., 1) for conv maps
        bb = None if bias is None else bias.view(g.shape)
        ctx.cd, ctx.recompute, ctx.out = cd, recompute, None
        if recompute is None:
            out = t * g if bb is None else torch.addcmul(bb * (1 - g), g, t)
            ctx.save_for_backward(t if m.requires_grad else None, None, g, m, n, bias)
        else:
            out = t.mul_(g) if bb is None else torch.addcmul(bb * (1 - g), t, g, out=t)  # one pass
            ctx.mark_dirty(t)
            ctx.save_for_backward(None, x if m.requires_grad else None, g, m, n, bias)
            if m.requires_grad:
                ctx.out = out.detach()  # an alias; its version is recorded by the caller
        return out

    @staticmethod
    def backward(ctx, go):
        t, x, g, m, n, bias = ctx.saved_tensors
        dims = [d for d in range(go.dim()) if d != ctx.cd]
        f32 = torch.float32
        b = None if bias is None else bias.float()
        gsum = go.sum(dims, dtype=f32) if bias is not None else None  # (out,)
        gm = gb = None
        if ctx.needs_input_grad[1]:  # sums over tokens accumulate in fp32; (out,) results
            out, ctx.out = ctx.out, None  # released after the first backward
            if t is not None:
                s = (go * t).sum(dims, dtype=f32) - (0 if b is None else b * gsum)  # sum go (t - b)
                gm = s / n
            elif out is not None and out._version == getattr(ctx, "version", None):
                s = (go * out).sum(dims, dtype=f32) - (0 if b is None else b * gsum)  # sum go g (t - b)
                mf = m.float()
                gm = torch.where(mf != 0, s / torch.where(mf != 0, mf, 1.0), 0.0)
            else:
                gm = (go * ctx.recompute(x).reshape(go.shape)).sum(dims, dtype=f32) / n
            gm = gm.to(m.dtype)
        if ctx.needs_input_grad[3]:  # the direct b (1 - g) term; t carries the other g b
            gb = ((1 - g.float()).view(-1) * gsum).to(bias.dtype)
        return go * g, gm, None, gb, None, None, None


class _FusedBase(torch.autograd.Function):
    """One GEMM for the tokens and A's rows: [x; A] -> [x W^T + b; A W^T] (Linear; GPT-2
    Conv1D uses x @ W), returned whole (the caller slices: a view of a Function output is
    an ordinary view). Backward: the tokens' input gradient only (W frozen)."""

    @staticmethod
    def forward(ctx, x2, A, w, bias, transposed):
        T = x2.shape[0]
        xa = torch.cat([x2, A])  # (T + r, in)
        out = xa @ w if transposed else F.linear(xa, w)  # (T + r, out)
        if bias is not None:
            out[:T] += bias  # the A rows stay bias-free
        ctx.T, ctx.transposed = T, transposed
        ctx.save_for_backward(w if ctx.needs_input_grad[0] else None)
        return out

    @staticmethod
    def backward(ctx, gout):
        (w,) = ctx.saved_tensors
        gy = gout[: ctx.T]  # the A rows carry no gradient (their result is used detached)
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
        self.lora_magnitude = nn.Parameter(torch.ones(layer.out_features, **layer.param_kw))
        # plain attributes (not state): caches of ||W_o||^2, of n in eval mode, and the norm
        # of the unmerged weight recorded at merge time (needed for an exact unmerge)
        self._wsq: tuple | None = None
        self._ncache: tuple | None = None
        self._merge_norm: torch.Tensor | None = None
        self._wat: tuple | None = None  # (key, W A^T) from base_forward, used by the next update

    def attach(self, layer: AdaptedLayer) -> None:
        super().attach(layer)  # residual inits (pissa / olora) change W first
        with torch.no_grad():  # m = ||W + s B A||_row: the output is unchanged
            self.lora_magnitude.copy_(self.row_norm(layer))

    # ---- norms ------------------------------------------------------------------------
    @torch.no_grad()
    def _weight_sq(self, layer: AdaptedLayer) -> torch.Tensor:
        """Cached ``||W_o||^2`` (out,) in fp32, recomputed when W changes."""
        w = layer.weight
        if tracing():  # torch.compile: no data-pointer cache; one fused pass over W in the graph
            return (
                layer.to_2d(w.detach()).float().pow(2).sum(1)
                if w.is_floating_point()
                else layer.to_2d(layer.dense_weight()).pow(2).sum(1)
            )  # (out,)
        key = _weight_key(w)
        if self._wsq is not None and self._wsq[0] == key:
            return self._wsq[1]
        if w.is_floating_point():
            w2 = layer.to_2d(w.detach())  # (out, in_flat), a view
            step = max(1, _CHUNK // max(1, w2.shape[1]))
            sq = torch.cat([w2[i : i + step].float().pow(2).sum(1) for i in range(0, w2.shape[0], step)])
        else:  # a packed (quantised) base: once, from the layer's dense fp32 view
            sq = layer.to_2d(layer.dense_weight()).pow(2).sum(1)
        self._wsq = (key, sq)
        return sq

    def _w_at(self, layer: AdaptedLayer) -> torch.Tensor:
        """``W A^T`` (out, r) in fp32, by pushing A's rows through the base op without bias
        (conv: a matmul on the (out, in_flat) view; conv weights are small)."""
        w, A = layer.weight, self.lora_A.detach()
        if layer.kind == "conv":
            return (layer.to_2d(w) @ A.to(w.dtype).t()).float()  # (out, in_flat) @ (in_flat, r)
        dt = w.dtype if w.is_floating_point() else A.dtype  # a packed base computes in A's dtype
        return layer.base_op(A.to(dt), w, None).float().t()  # (r, out) -> (out, r)

    def _key(self, layer: AdaptedLayer) -> tuple:
        A, B = self.lora_A, self.lora_B
        return (_weight_key(layer.weight), A._version, A.data_ptr(), B._version, B.data_ptr(), self.scale)

    @torch.no_grad()
    def row_norm(self, layer: AdaptedLayer) -> torch.Tensor:
        """n = ||W + s B A||_row (out,), fp32, detached, via the low-rank identity above."""
        A, B = self.lora_A, self.lora_B
        if tracing():  # torch.compile: no caches (their keys are data pointers), W A^T in the graph
            key, wat = None, self._w_at(layer)  # (out, r)
        else:
            key = self._key(layer)
            if not self.training and self._ncache is not None and self._ncache[0] == key:
                return self._ncache[1]
            held, self._wat = self._wat, None
            wat = held[1].float().t() if held is not None and held[0] == key else self._w_at(layer)  # (out, r)
        s, Bf, Af = self.scale, B.float(), A.float()
        n2 = (
            self._weight_sq(layer) + (2 * s) * (Bf * wat).sum(1) + (s * s) * ((Bf @ (Af @ Af.t())) * Bf).sum(1)
        )  # (out,) from (out, r) terms
        n = n2.clamp_min_(0).sqrt_()
        if key is not None:
            self._ncache = (key, n) if not self.training else None
        return n

    # ---- forward ----------------------------------------------------------------------
    def base_forward(self, x: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        """The base output; for Linear-likes with W A^T still to compute, in one GEMM with it
        (at few tokens the GEMM is bound by reading W, so the r extra rows are nearly free)."""
        w, b = layer.weight, layer.bias
        if tracing():  # torch.compile: the plain base op (row_norm computes W A^T itself)
            return layer.base_op(x, w, b)
        cached = not self.training and self._ncache is not None and self._ncache[0] == self._key(layer)
        if (
            layer.kind == "conv"
            or w.requires_grad
            or not w.is_floating_point()
            or x.dtype != w.dtype
            or x.shape[-1] != layer.in_features
            or cached
            or _autocast(x.device.type)
        ):
            return layer.base_op(x, w, b)
        x2 = x.reshape(-1, x.shape[-1])  # (..., in) -> (T, in)
        out = _FusedBase.apply(x2, self.lora_A.detach().to(w.dtype), w, b, layer.kind == "conv1d_t")
        T = x2.shape[0]
        self._wat = (self._key(layer), out[T:].detach())  # (r, out) = (W A^T)^T
        return out[:T].view(*x.shape[:-1], out.shape[-1])  # (T, out) -> (..., out)

    def _update(self, x: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        """u = s B A x (the plain LoRA update, not yet added to anything)."""
        A, B = self.lora_A, self.lora_B
        if layer.kind != "conv":
            return F.linear(F.linear(x, A), B * self.scale)  # (..., r) -> (..., out)
        return self._conv_update(x, layer)  # LoRA's: factored convs, dense when grouped

    def update(self, x: torch.Tensor, y: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        n = self.row_norm(layer)
        m = self.lora_magnitude
        cd = y.dim() - (layer.weight.dim() - 1) if layer.kind == "conv" else y.dim() - 1
        ac = _autocast(y.device.type)
        if ac and y.dtype != m.dtype:
            # autocast: scale in the magnitude's precision, as PEFT does (its fp32 m promotes the
            # output). Rescaling a bf16 output in bf16 rounds g and the output again and puts
            # the token sums of dL/dm ~10x further from the fp32 gradient
            y = y.to(torch.promote_types(y.dtype, m.dtype))
        if self.p and self.training:  # PEFT: W x~ recomputed on the dropped-out input
            xd = F.dropout(x, self.p, True).to(self.lora_A.dtype)
            wx = layer.base_op(xd, layer.weight, None)
            g = _gain(m, n, y, cd)
            return y + (g - 1) * wx + g * self._update(xd, layer).to(y.dtype)
        A, B = self.lora_A, self.lora_B
        x = x.to(A.dtype)
        if tracing():  # torch.compile: plain ops; AOTAutograd decides what backward keeps
            t = y + self._update(x, layer).to(y.dtype)
            g = _gain(m, n, t, cd)  # (out, 1..)
            b = layer.bias
            return g * t if b is None else torch.addcmul(b.view(g.shape) * (1 - g), g, t)
        first = layer._active[:1] == (self,)  # then y - b = W x: recomputable from x
        z = partial(self._z, layer) if first else None
        if layer.kind != "conv" and y.dim() > 1 and y.dtype == A.dtype and not ac:
            h = F.linear(x, A)  # (..., r)
            # t = y + s h B^T in one fused kernel on the flattened tokens: (T, out)
            t = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, self.rank), B.t(), alpha=self.scale)
            out = _DoRAScale.apply(t, m, n, layer.bias, x, 1, z)
        else:
            t = y + self._update(x, layer).to(y.dtype)
            out = _DoRAScale.apply(t, m, n, layer.bias, x, cd, z)
        if isinstance(out.grad_fn, _DoRAScale._backward_cls):
            out.grad_fn.version = out._version  # backward compares: was out changed in place?
        # (T, out) -> (..., out) on the fused path; no view when the shapes agree (FSDP2 warns
        # about a module output that is a view: in-place ops on it would skip its hooks)
        return out if out.shape == y.shape else out.view(y.shape)

    @torch.no_grad()
    def _z(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
        """t - b = W x + s B A x, recomputed for the magnitude gradient (rare path)."""
        return layer.base_op(x, layer.weight, None) + self._update(x, layer)

    # ---- merge ------------------------------------------------------------------------
    def merge_weight(self, layer: AdaptedLayer, w32: torch.Tensor) -> torch.Tensor:
        """W' = g (w32 + dW) with the forward's n (``row_norm``: of the *unmerged* stored
        weight), cached for an exact unmerge."""
        d = layer.to_2d(self.delta_weight(layer))  # (out, in_flat) fp32
        w2 = layer.to_2d(w32)  # (out, in_flat)
        n = self.row_norm(layer)  # (out,)
        if not self.merged:
            self._merge_norm = n
        return layer.from_2d(_gain(self.lora_magnitude.detach(), n, w2, 0) * (w2 + d))

    def unmerge_weight(self, layer: AdaptedLayer, w32: torch.Tensor) -> torch.Tensor:
        if self._merge_norm is None:
            raise AdaptkitError(
                "DoRA unmerge: this adapter has no recorded merge norm (it was not "
                "merged by this layer's merge()); reload the base weights instead"
            )
        d, w2 = layer.to_2d(self.delta_weight(layer)), layer.to_2d(w32)  # (out, in_flat) both
        g = _gain(self.lora_magnitude.detach(), self._merge_norm.to(w32.device), w2, 0)  # (out, 1)
        self._merge_norm = None
        return layer.from_2d(w2 / g - d)


class DoRAPeft(LoRAPeft):
    """PEFT's ``LoraConfig(use_dora=True)`` <-> :class:`DoRA`: LoRA's fields and tensors plus
    ``lora_magnitude_vector`` (see :class:`adaptkit.methods.lora.LoRAPeft`)."""

    use_dora = True


DoRA.peft_form = DoRAPeft()  # PEFT interop (ak.peft_compat, the command line)
