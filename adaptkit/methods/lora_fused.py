r"""The fused LoRA Linear: base and LoRA update as one autograd node (LoRA: Hu et al., 2021,
arXiv 2106.09685; QLoRA's NF4 base: Dettmers et al., 2023, arXiv 2305.14314).

    y = x W^T + b + s (x A^T) B^T         x (N, in), W (out, in) frozen, A (r, in), B (out, r)

The plain path builds four autograd nodes per layer (base linear, x A^T, h B^T, the scaled
add); autograd then sums the two (N, in) input gradients and scales the (N, out) output
gradient by s in separate elementwise passes. Here (docs/ARCHITECTURE.md, "Fused LoRA"):

    forward   y = x W^T + b;  h = x A^T (N, r);  y += s h B^T   (addmm_ in place: the
              scale and the add ride in the GEMM's epilogue, no (N, out) temporary)
    backward  gh = g B           (N, r), unscaled: s rides in the alpha of the GEMMs below
              gx = g W + s gh A  one GEMM, then addmm_ accumulating in place (N, in)
              gA = s gh^T x      (r, in)
              gB = (s h^T g)^T   (out, r): h^T g, not g^T h, runs up to 2x faster on CPU BLAS
              gb = sum_N g       no gradient for W (frozen)

NF4 base (QLoRA): the forward dequantises W straight into the first ``out`` rows of an
(out + r, in) tile whose last r rows are A, so one GEMM gives [x W^T + b | x A^T]
(the tile is the dense W the plain path dequantises anyway; only A's r rows are added).
Backward dequantises W again, as the plain NF4 path does (no dense copy kept for backward).
The tile is for fp32 compute; bf16 / fp16 GEMMs on its (out + r)-row, strided result
measured slower on CPU, so there W is dequantised alone and the float-W path below runs.
A float W gets no tile: copying W into one each step (in the forward as [W; A], in the
backward as [W | B]) measured slower than the skinny GEMMs it saves, in fp32 and more so
in bf16 (Llama-shaped layers of benchmarks/bench_model.py).

Numerics: the same products as the plain path, summed in the GEMMs' own order; the results
agree to fp32 (bf16) rounding. Not used (the plain path runs) under torch.compile, autocast,
dropout in training, a trainable or merged W, mixed dtypes, and for bases other than Linear
and the NF4 Linear: see ``LoRAAdapter.base_forward``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nf4 import _alloc


def autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


_ZEROS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A cached 0-dim zero of ``like``'s dtype and device: addmm's ignored input at beta=0."""
    key = (like.dtype, like.device)
    z = _ZEROS.get(key)
    if z is None:
        z = _ZEROS[key] = torch.zeros((), dtype=like.dtype, device=like.device)
    return z


def _nf4_tile(layer, A: torch.Tensor) -> torch.Tensor:
    """[deq(W); A] (out + r, in) in the compute dtype: W dequantised in place into the rows."""
    out_f, (r, in_f) = layer.out_features, A.shape
    tile = _alloc((out_f + r) * in_f, A.dtype, A.device).view(out_f + r, in_f)  # huge pages when large
    layer.dequantize(A.dtype, out=tile[:out_f])  # (out, in) rows of the tile
    tile[out_f:] = A
    return tile


def _forward(x: torch.Tensor, w, bias, A: torch.Tensor, B: torch.Tensor, scale: float, layer):
    """(y (..., out), h (N, r)): the forward above without autograd. ``w`` None: NF4 ``layer``."""
    r = A.shape[0]
    if w is None and A.dtype != torch.float32:  # half-precision GEMMs of the tile measured slower
        w = layer.dequantize(A.dtype)  # (out, in)
    if w is not None:  # a float W: a tile would copy W; the skinny x A^T GEMM is cheaper
        y = F.linear(x, w, bias)  # (..., out), fresh and contiguous
        y2 = y.view(-1, y.shape[-1])  # (..., out) -> (N, out)
        h = F.linear(x.reshape(-1, x.shape[-1]), A)  # (..., in) -> (N, in) @ A^T -> (N, r)
        y2.addmm_(h, B.t(), alpha=scale)
        return y, h
    tile = _nf4_tile(layer, A)  # (out + r, in): the dense W the NF4 op makes anyway, plus A
    if bias is not None:  # A's rows stay bias-free
        bias = torch.cat([bias, bias.new_zeros(r)])  # (out + r,)
    o = F.linear(x.reshape(-1, x.shape[-1]), tile, bias)  # (N, in) -> (N, out + r)
    del tile
    out_f = o.shape[1] - r
    h = o[:, out_f:].clone()  # (N, r), contiguous: the (N, out + r) o is not kept for backward
    y = x.new_empty(*x.shape[:-1], out_f)
    torch.addmm(o[:, :out_f], h, B.t(), alpha=scale, out=y.view(-1, out_f))  # (N, out)
    return y, h


class _LoRALinear(torch.autograd.Function):
    """The fused node; ``w`` the dense frozen weight, or None with the NF4 ``layer``."""

    @staticmethod
    def forward(ctx, x, bias, A, B, w, scale, layer):
        y, h = _forward(x, w, bias, A, B, scale, layer)
        ctx.scale, ctx.layer, ctx.xshape = scale, layer, x.shape
        need = ctx.needs_input_grad
        ctx.save_for_backward(x if need[2] or need[3] else None, h, A, B, w)
        return y

    @staticmethod
    def backward(ctx, g):
        x, h, A, B, w = ctx.saved_tensors
        s, need = ctx.scale, ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])  # (..., out) -> (N, out)
        x2 = None if x is None else x.reshape(-1, x.shape[-1])  # (..., in) -> (N, in)
        if torch.is_grad_enabled() and x2 is not None:  # double backward: h as a function of x, A
            h = F.linear(x2, A)  # (N, r)
        gx = gb = gA = gB = None
        gh = g2 @ B if need[0] or need[2] else None  # (N, r), unscaled: s rides in the GEMMs below
        if need[0]:
            if w is None:  # NF4: dequantised again, as the plain NF4 backward does
                w = ctx.layer.dequantize(g2.dtype)
            gx = (g2 @ w).addmm_(gh, A, alpha=s).view(ctx.xshape)  # (N, in) -> (..., in)
        if need[1]:
            gb = g2.sum(0)  # (out,)
        z = _zero(g2) if need[2] or need[3] else None  # beta=0: addmm ignores it, applies s
        if need[2]:
            gA = torch.addmm(z, gh.t(), x2, beta=0, alpha=s)  # (r, N) @ (N, in)
        if need[3]:
            # (r, N) @ (N, out), transposed to B's (out, r): this operand order runs up to 2x
            # faster than (out, N) @ (N, r) on CPU BLAS / oneDNN (measured at out 512)
            gB = torch.addmm(z, h.t(), g2, beta=0, alpha=s).t()
        return gx, gb, gA, gB, None, None, None


def lora_linear(x: torch.Tensor, w, bias, A: torch.Tensor, B: torch.Tensor, scale: float, layer=None):
    """``x W^T + b + s (x A^T) B^T`` (..., out) for ``x`` (..., in); ``w`` the dense frozen
    weight, or None for an NF4 ``layer`` (compute dtype = x's). One autograd node when
    anything needs a gradient, else the same kernels without autograd."""
    if torch.is_grad_enabled() and (
        x.requires_grad or A.requires_grad or B.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return _LoRALinear.apply(x, bias, A, B, w, scale, layer)
    return _forward(x, w, bias, A, B, scale, layer)[0]
