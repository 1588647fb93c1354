r"""Blockwise 4-bit NormalFloat (NF4) quantisation, bit-compatible with bitsandbytes.

NF4 is the data type of QLoRA (Dettmers, Pagnoni, Holtzman, Zettlemoyer, "QLoRA: Efficient
Finetuning of Quantized LLMs", NeurIPS 2023, §3): 16 quantiles of N(0, 1) rescaled to
[-1, 1], with an exact zero. A weight ``W`` (any shape, ``n`` elements) is flattened
row-major and cut into blocks of ``blocksize`` consecutive elements (the last one may be
partial); per block ``b``

    absmax_b = max_i |x_i|,     q_i = argmin_j |x_i / absmax_b - c_j|,     x_i ≈ c_{q_i} · absmax_b

with the codebook ``c = NF4_CODE`` (16 fp32 values). Two 4-bit indices share a byte, the
first element in the HIGH nibble: ``byte_k = q_{2k} << 4 | q_{2k+1}`` (odd ``n`` pads a 0).

Double quantisation (QLoRA §3, "Double Quantization") stores the fp32 ``absmax`` vector as
8-bit codes: ``offset = mean(absmax)``, then ``absmax - offset`` is quantised blockwise
(``nested_blocksize`` = 256) with bitsandbytes' signed dynamic map (``DYNAMIC_CODE``, 256
values) and an fp32 ``nested_absmax`` per nested block; ``absmax ≈ DYNAMIC_CODE[q8] ·
nested_absmax + offset``. Storage: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight.

Bit-compatibility with bitsandbytes 0.50.2 on CPU (``quantize_4bit`` / ``dequantize_4bit``,
``quant_type="nf4"``): full blocks scale by the fp32 reciprocal ``x · (1/max(absmax, 1e-38))``,
the partial tail block divides ``x / max(absmax, 1e-38)``; the index is the number of fp32
midpoints ``(c_j + c_{j+1})/2`` strictly below the scaled value (ties go to the lower code);
dequantisation is ``code · absmax`` in fp32, then one cast. The 8-bit absmax codes use the
exact nearest code (bitsandbytes' pure-torch rule); its CPU C library uses an approximate
search that can differ by one code on a few values.

Implementation notes. Everything is vectorised torch (no loop over elements or blocks). Work
runs in chunks of whole blocks (~256 Ki elements) through preallocated buffers: temporaries
stay cache-resident and bounded (far below one extra fp32 copy of the weight), and no large
tensor is allocated per step, since first-touch page faults on fresh multi-MB tensors cost
more than the arithmetic. For the same reason large CPU outputs are allocated through numpy,
which asks for transparent huge pages. The 16-way nearest-code search is a uniform look-up
table plus one comparison (``_build_lut``), exact and ~6x faster than ``torch.bucketize``.
The 8-bit dynamic map and its search live in :mod:`adaptkit.nf4_nested`; matmuls against an
NF4 weight that never hold the dense weight live in :mod:`adaptkit.nf4_matmul`.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import AdaptkitError
from .nf4_nested import DYN_MID, DYNAMIC_CODE, blockwise_index
from .nf4_state import NF4_CODE, NF4State, _check_blocksize, _on

__all__ = ["NF4_CODE", "DYNAMIC_CODE", "NF4State", "quantize_nf4", "dequantize_nf4"]

# Decision midpoints in fp32, exactly as bnb computes them: an index is #{midpoints < x}.
_NF4_MID = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2


def _build_lut(steps: int = 11):
    """Uniform look-up table that replaces a 15-way binary search by 2 gathers + 1 compare.

    The scaled value ``s`` in [-1, 1] lands in bin ``k = trunc(steps·s + steps)`` of width
    ``1/steps``. With ``steps = 11`` every bin holds at most one NF4 midpoint and no midpoint
    lies within 0.005 of a bin edge, far above the ~1e-6 rounding of ``k``. So
    ``#{mid < s} = base[k] + (s > thr[k])``, where ``base[k]`` counts midpoints below the
    bin and ``thr[k]`` is the bin's midpoint (2.0 when it has none): exact, ties included,
    even for values rounded into a neighbouring bin (no midpoint lies between them and it).
    """
    nbins = 2 * steps + 2  # s can exceed 1 by an ulp: one spare bin past +1
    edges = -1 + torch.arange(nbins + 1, dtype=torch.float64) / steps
    mid = _NF4_MID.double()
    inside = (mid[None, :] >= edges[:-1, None]) & (mid[None, :] < edges[1:, None])  # [bins, 15]
    assert int(inside.sum(1).max()) <= 1
    pos = mid[None, :] - edges[:-1, None]
    margin = torch.minimum(pos, edges[1:, None] - mid[None, :])[inside].min()
    assert float(margin) > 1e-3, "LUT bins too close to a midpoint"
    base = (mid[None, :] < edges[:-1, None]).sum(1).to(torch.uint8)  # [bins]
    thr = torch.where(inside.any(1), (inside.double() * mid[None, :]).sum(1), 2.0)
    return float(steps), base, thr.float()  # thr holds the exact fp32 midpoints


_LUT_STEPS, _LUT_BASE, _LUT_THR = _build_lut()
_CHUNK = 1 << 18  # elements per chunk: 1 MiB of fp32; fewer, larger ops measured best (2^16..2^20)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_HUGE = 4 << 20  # bytes from which CPU outputs are allocated through numpy
_NP = {torch.float32: np.float32, torch.float16: np.uint16, torch.bfloat16: np.uint16, torch.uint8: np.uint8}


def _alloc(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised [n] tensor. Large CPU outputs come from numpy, which madvises
    MADV_HUGEPAGE: first-touch page faults on 4 KiB pages otherwise cost more than the
    whole dequantisation (measured 1.5 vs 11 GB/s for fill on a fresh 64 MiB tensor)."""
    if device.type != "cpu" or n * dtype.itemsize < _HUGE:
        return torch.empty(n, dtype=dtype, device=device)
    return torch.from_numpy(np.empty(n, dtype=_NP[dtype])).view(dtype)  # [n] (16-bit: bit view)


_B = torch.arange(256)
_PAIRS = torch.stack([NF4_CODE[_B >> 4], NF4_CODE[_B & 15]], 1).view(torch.int64).reshape(256)


def _pair_table(device: torch.device) -> torch.Tensor:
    """[256] int64: byte -> (code[hi], code[lo]) as one 8-byte word, for one gather per byte."""
    return _on("pairs", _PAIRS, device)  # [256, 2] fp32 viewed as [256] int64


def _nf4_index(
    s: torch.Tensor, lut, k: torch.Tensor, kf: torch.Tensor, thr: torch.Tensor, gt: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """NF4 indices ``#{midpoints < s}`` of scaled values ``s`` into uint8 ``out`` via the
    look-up table ``lut = (steps, base, thr)`` (already on s.device); k / kf / thr / gt are
    scratch buffers with s's numel."""
    steps, lut_base, lut_thr = lut
    torch.add(steps, s, alpha=_LUT_STEPS, out=kf)  # steps + steps·s, in [-1e-6, 2·steps]
    k.copy_(kf).clamp_(0, len(lut_base) - 1)  # fp32 -> int32 truncates (= floor here);
    # the clamp only matters for inf/NaN input, which is rejected after the loop
    torch.index_select(lut_base, 0, k, out=out)
    torch.index_select(lut_thr, 0, k, out=thr)
    torch.gt(s, thr, out=gt)
    return out.add_(gt)


def quantize_nf4(
    w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256
) -> tuple[torch.Tensor, NF4State]:
    """Quantise ``w`` (fp32 / fp16 / bf16, any shape, ``n`` elements) to NF4.

    Returns ``packed`` uint8 ``[ceil(n/2)]`` (first element in the high nibble) and an
    :class:`NF4State`. Bit-identical to ``bitsandbytes.functional.quantize_4bit(w,
    blocksize, compress_statistics=double_quant, quant_type="nf4")`` on CPU (packed bytes and
    fp32 absmax; nested codes are exact-nearest, see the module docstring).
    """
    if not isinstance(w, torch.Tensor) or w.dtype not in _FLOAT_DTYPES:
        got = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise AdaptkitError(
            f"NF4: cannot quantise a {got} tensor; expected float32, float16 or bfloat16 (cast with .float() first)"
        )
    _check_blocksize(blocksize, "blocksize")
    if double_quant:
        _check_blocksize(nested_blocksize, "nested_blocksize")
    n = w.numel()
    if n == 0:
        raise AdaptkitError(f"NF4: cannot quantise an empty tensor of shape {tuple(w.shape)}")
    flat = w.detach().reshape(-1)  # [n]; copies only if w is not contiguous
    dev, bs = w.device, blocksize
    nfull = n // bs  # full blocks; a partial tail block follows if n % bs
    packed = _alloc((n + 1) // 2, torch.uint8, dev)
    absmax = torch.empty(-(-n // bs), dtype=torch.float32, device=dev)

    per = max(1, _CHUNK // bs)  # whole blocks per chunk
    c = min(per, nfull) * bs  # buffer numel (even: bs is even)
    if nfull:
        f32 = lambda: torch.empty(c, dtype=torch.float32, device=dev)  # noqa: E731
        xbuf = f32() if flat.dtype != torch.float32 else None
        s, kf, thr = f32(), f32(), f32()
        k = torch.empty(c, dtype=torch.int32, device=dev)
        gt = torch.empty(c, dtype=torch.bool, device=dev)
        idx = torch.empty(c, dtype=torch.uint8, device=dev)
        lut = (torch.tensor(_LUT_STEPS, device=dev), _LUT_BASE.to(dev), _LUT_THR.to(dev))
        for b0 in range(0, nfull, per):  # loop over chunks of `per` blocks, not elements
            b1 = min(b0 + per, nfull)
            m = (b1 - b0) * bs
            x = flat[b0 * bs : b1 * bs]
            if xbuf is not None:  # fp16/bf16 -> fp32 is exact
                x = xbuf[:m].copy_(x)
            xb = x.view(-1, bs)  # [blocks, bs]
            # |x| goes into the scratch that will hold the scaled values (aminmax is ~10x slower)
            am = torch.amax(torch.abs(xb, out=s[:m].view(-1, bs)), 1, out=absmax[b0:b1])  # [blocks]
            # bnb multiplies by the fp32 reciprocal (not a division): matters for ties
            recip = 1.0 / am.clamp(min=1e-38)
            sv = torch.mul(xb, recip[:, None], out=s[:m].view(-1, bs)).view(-1)  # [m]
            q = _nf4_index(sv, lut, k[:m], kf[:m], thr[:m], gt[:m], idx[:m]).view(-1, 2)  # [m/2, 2]
            torch.add(q[:, 1], q[:, 0], alpha=16, out=packed[b0 * bs // 2 : b1 * bs // 2])
    if nfull * bs < n:  # partial tail block: bnb divides here; pad an odd count with 0 (-> 7)
        tail = flat[nfull * bs :].float()
        q, am = blockwise_index(tail, _NF4_MID, bs)  # all tail: division rule
        absmax[-1] = am[0]
        q = torch.cat([q, q.new_full((len(q) % 2,), 7)]).view(-1, 2)  # [ceil(r/2), 2]
        packed[nfull * bs // 2 :] = (q[:, 0] * 16 + q[:, 1]).to(torch.uint8)
    if not torch.isfinite(absmax).all():
        raise AdaptkitError(
            f"NF4: the tensor of shape {tuple(w.shape)} holds inf or NaN; "
            f"NF4 scales by the block absmax and needs finite values"
        )
    state = NF4State(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=bs)
    if double_quant:
        # fp32 scalar, as bnb (same torch reduction), always on the CPU: CUDA sums in another
        # order, and a last-bit change would make a GPU-quantised base differ from the CPU's
        offset = absmax.cpu().mean().to(absmax.device)
        q8, nested = blockwise_index(absmax - offset, DYN_MID, nested_blocksize)
        state.absmax, state.nested_absmax = q8.to(torch.uint8), nested
        state.offset, state.nested_blocksize = offset, nested_blocksize
    return packed, state


def decode_blocks(
    p: torch.Tensor, a: torch.Tensor, out: torch.Tensor, pairs: torch.Tensor, k: torch.Tensor, buf: torch.Tensor | None
) -> torch.Tensor:
    """Dequantise whole blocks, row by row: bytes ``p`` uint8 ``[R, m/2]`` (rows may be
    strided, e.g. a column slice of a ``[out, in/2]`` view), block absmax ``a`` fp32
    ``[R, m/blocksize]``, into contiguous ``out`` ``[R, m]`` (fp32 / fp16 / bf16). ``k``: int32
    scratch of ``R·m/2`` or more; ``buf``: fp32 scratch of ``R·m`` or more, None when ``out``
    is fp32. Exactly :func:`dequantize_nf4`'s arithmetic (fp32 product, then one cast)."""
    r, h = p.shape
    kk = k[: r * h].view(r, h).copy_(p)  # [R, m/2] bytes -> int32 indices
    dst = out if buf is None else buf[: 2 * r * h].view(r, 2 * h)  # [R, m] fp32
    # one 8-byte gather per packed byte writes both fp32 codes in element order
    torch.index_select(pairs, 0, kk.view(-1), out=dst.view(-1).view(torch.int64))  # [R·m/2] int64
    dst.view(r, a.shape[1], -1).mul_(a[:, :, None])  # [R, blocks, bs] * [R, blocks, 1]
    if buf is not None:
        out.copy_(dst)  # one rounding fp32 -> dtype
    return out


def dequantize_nf4(
    packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of :func:`quantize_nf4`: ``NF4_CODE[nibble] · absmax`` in fp32, then one cast.

    ``packed``: uint8 with ``ceil(n/2)`` elements (any shape, e.g. bnb's ``[ceil(n/2), 1]``).
    Returns a tensor of ``state.shape`` in ``dtype`` (default ``state.dtype``), bit-identical
    to ``bitsandbytes.functional.dequantize_4bit`` for the same state; written into ``out``
    (contiguous, ``n`` elements of ``dtype``, e.g. rows of a larger tile) when given.
    """
    dtype = state.dtype if dtype is None else dtype
    if dtype not in _FLOAT_DTYPES:
        raise AdaptkitError(f"NF4: cannot dequantise to {dtype}; use float32, float16 or bfloat16")
    state.validate()
    n, bs = state.numel, state.blocksize
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise AdaptkitError(
            f"NF4: packed weight is {packed.dtype}[{packed.numel()}], expected "
            f"uint8[{(n + 1) // 2}] for shape {tuple(state.shape)}"
        )
    dev = packed.device
    pb = packed.reshape(-1)  # [ceil(n/2)]
    absmax = state.block_absmax().to(dev)  # [nblocks] fp32
    pairs = _pair_table(dev)
    if out is not None and (not out.is_contiguous() or out.numel() != n or out.dtype != dtype):
        raise AdaptkitError(
            f"NF4: out= must be a contiguous {dtype} tensor of {n} elements, got {out.dtype}{list(out.shape)}"
        )
    res = out
    out = _alloc(n, dtype, dev) if out is None else out.view(-1)  # [n]
    nfull = n // bs
    per = max(1, _CHUNK // bs)
    c = min(per, nfull) * bs
    if nfull:
        k = torch.empty(c // 2, dtype=torch.int32, device=dev)
        buf = None if dtype == torch.float32 else torch.empty(c, dtype=torch.float32, device=dev)
        for b0 in range(0, nfull, per):  # loop over chunks of `per` blocks
            b1 = min(b0 + per, nfull)
            # [1, m/2] bytes, [1, blocks] absmax -> [1, m] of out
            decode_blocks(
                pb[b0 * bs // 2 : b1 * bs // 2].view(1, -1),
                absmax[b0:b1].view(1, -1),
                out[b0 * bs : b1 * bs].view(1, -1),
                pairs,
                k,
                buf,
            )
    if nfull * bs < n:  # partial tail block
        # [ceil(r/2)] int64 -> [2·ceil(r/2)] fp32 codes -> the first r
        tail = pairs[pb[nfull * bs // 2 :].long()].view(torch.float32)[: n - nfull * bs]
        out[nfull * bs :] = tail * absmax[-1]
    return out.view(state.shape) if res is None else res  # [n] -> original shape


# The model-level NF4 API (adaptkit.nf4.NF4Linear / quantize / save / load / drift_report)
# lives in nf4_linear.py and nf4_io.py, which import this kernel module: loaded lazily.
_MODEL_API = {
    "NF4Linear": "nf4_linear",
    "quantize": "nf4_io",
    "save": "nf4_io",
    "load": "nf4_io",
    "drift_report": "nf4_io",
}


def __getattr__(name: str):
    if name in _MODEL_API:
        import importlib

        return getattr(importlib.import_module(f"adaptkit.{_MODEL_API[name]}"), name)
    raise AttributeError(f"module 'adaptkit.nf4' has no attribute {name!r}")
