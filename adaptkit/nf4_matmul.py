r"""Matmuls against an NF4 weight that never hold the dense weight in memory.

For a frozen NF4 weight ``W`` (out, in) (:mod:`adaptkit.nf4`; QLoRA, Dettmers et al. 2023) and
``dtype`` the compute dtype, with ``Ŵ = deq(W)`` rounded to ``dtype`` exactly as
:func:`~adaptkit.nf4.dequantize_nf4` does:

    linear(x, ...)      = x Ŵ^T + b     x (N, in)  -> (N, out)      (forward)
    grad_input(g, ...)  = g Ŵ           g (N, out) -> (N, in)       (backward w.r.t. x)

The plain way (dequantise all of W, then one matmul) writes and re-reads a dense copy of W
per call (64 MiB for 4096x4096 in fp32), and on CPU a fresh tensor that size costs more in
first-touch page faults than the arithmetic. Here, on CPU and for weights of more than one
chunk (``_CHUNK`` elements), W is never whole in memory:

* forward, N <= ``GEMV_TOKENS`` (decoding), fp32 / bf16: a fused GEMV ``y_o = Σ_i Ŵ_oi x_i`` compiled by
  ``torch.compile`` (inductor's C++/OpenMP backend): the packed bytes are dequantised and
  multiplied-added in registers, the double-quantised absmax decoded in the same kernel.
* forward, N <= ``MAX_TOKENS``: row chunks Ŵ_rows (R, in) of ~``_CHUNK`` elements decoded by
  :func:`~adaptkit.nf4.decode_blocks` into one reused, cache-resident buffer, ``y[:, rows] =
  x Ŵ_rows^T + b_rows`` (each output is one full-length dot product, as in the dense op).
* backward, N <= ``GRAD_ROW_TOKENS``: the same row chunks, ``gx += g[:, rows] Ŵ_rows`` in
  fp32 (Ŵ's bf16 / fp16 values and their products are exact in fp32). More rows: the matmul
  dominates (and bf16 chunks would add a rounding per chunk), so the dense op runs.

Exactness: every path multiplies the same ``Ŵ`` (the decoder is bit-identical to
``dequantize_nf4``; the GEMV rounds Ŵ to ``dtype`` bit-exactly, multiplies exactly in fp32
and sums in fp32, as CPU bf16 / fp16 GEMMs do). Results equal the dense reference up to
float summation order. Small weights, other devices, N > ``MAX_TOKENS``, ``in`` not a
multiple of the blocksize, CPU autocast, and calls made while ``torch.compile`` traces the
caller take the plain dense path (bit-identical to the reference).

The GEMV compiles on first use per (in_features, blocksize, dtype, double quantisation);
out_features is a dynamic dimension. It is off with ``ADAPTKIT_NF4_COMPILE=0`` or
:func:`use_compile(False) <use_compile>` (row chunks instead), and if compiling fails (no
C++ compiler, ...) a warning is issued once and the row chunks run. Inductor does not
vectorise table gathers, so the 16-entry NF4 look-up is a select tree on the 4 index bits
(15 vector blends per 16 values): about one instruction per weight, which bounds the GEMV at
~2.5 ms for 4096x4096 on 2 cores (bitsandbytes' hand-written kernel does the look-up with
one AVX-512 permute per 16 values: ~0.4 ms).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from .nf4 import DYNAMIC_CODE, NF4_CODE, NF4State, _pair_table, decode_blocks, dequantize_nf4

__all__ = ["linear", "grad_input", "use_compile", "GEMV_TOKENS", "GRAD_ROW_TOKENS", "MAX_TOKENS"]

GEMV_TOKENS = 2  # rows of x up to which the fused GEMV runs (one pass over W per row)
GRAD_ROW_TOKENS = 4  # rows of g up to which the backward accumulates row chunks in fp32
MAX_TOKENS = 1024  # above this the matmul dominates and the plain dense path is as fast
_CHUNK = 1 << 20  # elements of W decoded per chunk (4 MiB fp32): cache-resident, few calls
_MAX_KEYS = 6  # compiled layouts, below dynamo's recompile limit (8)

_COMPILE = [os.environ.get("ADAPTKIT_NF4_COMPILE", "1") != "0"]  # [enabled]
_KERNEL: list = []  # [the compiled GEMV], made on first use
_KEYS: set = set()  # layouts compiled so far
_CODE: list = [float(c) for c in NF4_CODE]
_DYN = DYNAMIC_CODE.clone()  # (256,) fp32, a constant of the compiled kernel


def use_compile(enabled: bool) -> None:
    """Turn the torch.compile'd GEMV on or off (the eager row-chunk path otherwise)."""
    _COMPILE[0] = bool(enabled)


# ---------------------------------------------------------------- the compiled GEMV (inductor)


def _code(q: torch.Tensor) -> torch.Tensor:
    """``NF4_CODE[q]`` for int32 ``q`` in [0, 16): a select tree on q's 4 bits, 16 -> 8 -> 4
    -> 2 -> 1 candidates (exact: every output is one of the 16 fp32 codes)."""
    vals = _CODE
    for bit in range(4):  # 4 levels, not a loop over data
        m = (q & (1 << bit)) != 0
        vals = [torch.where(m, vals[2 * j + 1], vals[2 * j]) for j in range(len(vals) // 2)]
    return vals[0]


def _round(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 ``w`` rounded to ``dtype`` and back, as one cast would. bf16: round to nearest
    even on the bits (w is finite), 2.5x faster in the fused kernel than the emulated cast."""
    if dtype == torch.float32:
        return w
    if dtype != torch.bfloat16:
        return w.to(dtype).float()
    b = w.view(torch.int32)  # fp32 bits; + 0x7FFF + lsb of the kept half, then truncate
    return ((b + (0x7FFF + ((b >> 16) & 1))) & -65536).view(torch.float32)


def _k_gemv(
    p3: torch.Tensor,
    am: torch.Tensor,
    nested: torch.Tensor | None,
    offset: torch.Tensor | None,
    nbs: int,
    xe: torch.Tensor,
    xo: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """fp32 (R,) = Ŵ x with Ŵ rounded to ``dtype``: ``p3`` uint8 (R, nb, bs/2); ``am`` the
    block absmax (R, nb), fp32, or uint8 codes with ``nested`` / ``offset`` / ``nbs`` (double
    quantisation, decoded here as NF4State.block_absmax does); ``xe`` / ``xo`` fp32 (H,) =
    x[0::2], x[1::2], H = nb·bs/2."""
    r, nb, hb = p3.shape
    a = am
    if nested is not None and offset is not None:  # DYNAMIC_CODE[q8] · nested_absmax[k // nbs] + offset, k = flat block
        k = torch.arange(r, device=p3.device)[:, None] * nb + torch.arange(nb, device=p3.device)
        a = _DYN.to(p3.device)[am.long()] * nested[k // nbs] + offset  # (R, nb)
    q = p3.int().reshape(r, nb * hb)  # (R, nb, bs/2) -> (R, H)
    a2 = a[:, :, None].expand(r, nb, hb).reshape(r, nb * hb)  # (R, nb) -> (R, H): absmax per byte
    hi = _round(_code(q >> 4) * a2, dtype)  # Ŵ[:, 0::2]: the high nibble is the even element
    lo = _round(_code(q & 15) * a2, dtype)  # Ŵ[:, 1::2]
    return (hi * xe + lo * xo).sum(-1)


def _gemv(p3, state: NF4State, x: torch.Tensor, dtype: torch.dtype):
    """fp32 Ŵ x for one row ``x`` (in,) via the compiled kernel; None when it is not
    available (compile off or failed, a layout past ``_MAX_KEYS``, torch.compile tracing the
    caller). A failure turns compilation off with one warning."""
    dq = state.double_quant
    key = (dtype, tuple(p3.shape[1:]), p3.shape[0] == 1, dq and state.nested_blocksize)  # dynamo's guards
    # fp16: the fused kernel's fp16 rounding of W rests on inductor's emulate_precision_casts,
    # which torch 2.11 drops (3% off the reference); the row chunks round with a real cast
    if (
        dtype == torch.float16
        or not _COMPILE[0]
        or torch.compiler.is_compiling()
        or (key not in _KEYS and len(_KEYS) >= _MAX_KEYS)
    ):
        return None
    _KEYS.add(key)
    if not _KERNEL:  # emulate_precision_casts: keep fp16 roundings inside the fused kernel
        _KERNEL.append(torch.compile(_k_gemv, dynamic=False, fullgraph=True, options={"emulate_precision_casts": True}))
    am = state.absmax.view(p3.shape[0], p3.shape[1])  # (nblocks,) -> (out, in/bs)
    for t in (p3, am):
        torch._dynamo.maybe_mark_dynamic(t, 0)  # one compile serves every out_features
    if dq:
        torch._dynamo.maybe_mark_dynamic(state.nested_absmax, 0)
    xf = x.float()
    try:
        with torch.no_grad():
            return _KERNEL[0](
                p3,
                am,
                state.nested_absmax,
                state.offset if dq else None,
                state.nested_blocksize,
                xf[0::2].contiguous(),
                xf[1::2].contiguous(),
                dtype,
            )
    except Exception as e:  # no C++ compiler, unsupported platform, ...: eager from now on
        _COMPILE[0] = False
        warnings.warn(
            f"adaptkit.nf4_matmul: torch.compile of the NF4 GEMV failed "
            f"({type(e).__name__}: {str(e)[:200]}); using the eager path",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


# ---------------------------------------------------------------- chunked paths


def _layout(packed: torch.Tensor, state: NF4State, tokens: int):
    """p3 (out, in/bs, bs/2) uint8 when the chunked paths apply, else None (dense path)."""
    out_f, in_f = state.shape if len(state.shape) == 2 else (0, 0)
    bs = state.blocksize
    if (
        packed.device.type != "cpu"
        or out_f * in_f <= _CHUNK
        or in_f % bs
        or tokens > MAX_TOKENS
        or torch.compiler.is_compiling()
        or torch.is_autocast_enabled("cpu")
    ):
        return None
    return packed.reshape(out_f, in_f // bs, bs // 2)  # (out, in/bs, bs/2): no block straddles rows


def _row_chunks(p3: torch.Tensor, state: NF4State, dtype: torch.dtype):
    """Yield (r0, Ŵ[r0:r0+R] (R, in) in ``dtype``): row chunks of ~``_CHUNK`` elements decoded
    into one reused buffer by :func:`~adaptkit.nf4.decode_blocks` (bit-identical to
    dequantize_nf4)."""
    out_f, nb, hb = p3.shape
    in_f = 2 * nb * hb
    a = state.block_absmax().view(out_f, nb)  # (nblocks,) -> (out, in/bs) fp32
    r = max(1, min(out_f, _CHUNK // in_f))
    dev = p3.device
    buf = torch.empty(r * in_f, dtype=dtype, device=dev)
    scratch = (
        _pair_table(dev),
        torch.empty(r * in_f // 2, dtype=torch.int32, device=dev),
        None if dtype == torch.float32 else torch.empty(r * in_f, device=dev),
    )
    for r0 in range(0, out_f, r):  # loop over chunks of rows, not elements
        n = min(r, out_f - r0)
        # (R, nb, bs/2) -> (R, in/2) bytes, decoded into (R, in)
        yield (
            r0,
            decode_blocks(p3[r0 : r0 + n].reshape(n, nb * hb), a[r0 : r0 + n], buf[: n * in_f].view(n, in_f), *scratch),
        )


def linear(
    x: torch.Tensor, packed: torch.Tensor, state: NF4State, dtype: torch.dtype, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x Ŵ^T + bias`` in ``dtype`` for ``x`` (..., in) in ``dtype`` (see the module doc)."""
    p3 = _layout(packed, state, x.numel() // max(1, x.shape[-1]))
    if p3 is None:
        return F.linear(x, dequantize_nf4(packed, state, dtype), bias)
    out_f, in_f = state.shape
    x2 = x.reshape(-1, in_f)  # (..., in) -> (N, in)
    n = x2.shape[0]
    if 0 < n <= GEMV_TOKENS:
        rows = [_gemv(p3, state, x2[t], dtype) for t in range(n)]  # one fused pass over W per row
        if all(y is not None for y in rows):
            y = torch.stack(rows)  # (N, out) fp32
            y = y if bias is None else y + bias.float()  # fp32 sum + bias, one rounding
            return y.to(dtype).view(*x.shape[:-1], out_f)  # (N, out) -> (..., out)
    y = x2.new_empty(n, out_f)
    for r0, w in _row_chunks(p3, state, dtype):  # y[:, rows] = x Ŵ_rows^T (+ b_rows)
        y[:, r0 : r0 + w.shape[0]] = F.linear(x2, w, None if bias is None else bias[r0 : r0 + w.shape[0]])
    return y.view(*x.shape[:-1], out_f)  # (N, out) -> (..., out)


def grad_input(g: torch.Tensor, packed: torch.Tensor, state: NF4State, dtype: torch.dtype) -> torch.Tensor:
    """``g Ŵ`` in ``dtype`` for ``g`` (..., out) in ``dtype``: the input gradient of
    :func:`linear`. Up to ``GRAD_ROW_TOKENS`` rows of g (memory-bound): row chunks,
    ``gx += g[:, rows] Ŵ_rows`` in fp32 (Ŵ's ``dtype`` values are exact in fp32, as are their
    products: the sum differs from the dense op's only in order); more rows: the dense op."""
    n = g.numel() // max(1, g.shape[-1])
    p3 = _layout(packed, state, n) if n <= GRAD_ROW_TOKENS else None
    if p3 is None:
        return g @ dequantize_nf4(packed, state, dtype)  # (..., out) @ (out, in)
    out_f, in_f = state.shape
    g2 = g.reshape(-1, out_f).float()  # (..., out) -> (N, out)
    gx = g2.new_zeros(n, in_f)
    w32 = None if dtype == torch.float32 else torch.empty(min(_CHUNK, out_f * in_f), device=g.device)
    for r0, w in _row_chunks(p3, state, dtype):
        if w32 is not None:  # Ŵ_rows in fp32, exactly
            w = w32[: w.numel()].view(w.shape).copy_(w)
        gx.addmm_(g2[:, r0 : r0 + w.shape[0]], w)  # (N, R) @ (R, in)
    return gx.to(dtype).view(*g.shape[:-1], in_f)  # (N, in) -> (..., in)
