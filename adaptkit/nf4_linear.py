r"""The NF4 Linear (QLoRA's frozen 4-bit NormalFloat base: Dettmers, Pagnoni, Holtzman,
Zettlemoyer, "QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023, arXiv 2305.14314)
and its :class:`NF4Base`, the base kind through which adapters see it.

    y = deq(W_nf4) x + b + s B A drop(x)           QDoRA: y = g ⊙ (deq(W_nf4) x + s B A x) + b

The base W (out, in) is held in NF4 (:mod:`adaptkit.nf4`, bit-identical to bitsandbytes) by
:class:`NF4Linear` as frozen Parameters (``weight``, ``absmax``: FSDP2 shards and gathers
them; docs/ARCHITECTURE.md, "Sharded NF4") and two buffers:

    weight         uint8 [nb, blocksize/2]   two 4-bit codes per byte, first in the high nibble;
                                             a row per block (FSDP2 shards whole blocks), the
                                             last row zero-padded; packed() = the ceil(out*in/2)
                                             bytes in bitsandbytes' order, what state_dict holds
    absmax         fp32 [nb], nb = ceil(out*in/blocksize); with double quantisation uint8 codes
    nested_absmax  fp32 [ceil(nb/256)]       (double quantisation only)
    offset         fp32 []                   (double quantisation only)

i.e. 4 + 8/64 + 32/(64*256) ≈ 4.127 bits per weight with double quantisation, 4.5 without.
Adapters (compute dtype): LoRA's lora_A (r, in), lora_B (out, r); DoRA's lora_magnitude (out,).

Forward dequantises W to ``compute_dtype`` (default: the dtype W had when quantised; the
QLoRA paper uses bfloat16), runs F.linear there and returns the input's dtype. In training
the dense W is not kept for backward but dequantised again (QLoRA's memory: autograd holds
no dense copy of a frozen weight). The dense reference of invariant 1 is the dequantised W.

Keys (DESIGN invariant 3, the documented exception): injecting QLoRA replaces the float
``<path>.weight`` by the packed bytes under the same key plus ``<path>.absmax`` /
``nested_absmax`` / ``offset``. A float base checkpoint still loads (``load_state_dict``
quantises a float ``weight`` as inject does: same bytes every time); ``ak.merge`` gives
back ``nn.Linear`` with the original keys.

Merge: in place, the bytes stay and a dense merged weight (a non-persistent buffer) serves
forward, so unmerge is exact. ``ak.merge(model)`` returns a dense ``nn.Linear`` in W's original
dtype (deq(W) + delta summed in fp32), never a silently re-quantised one (PEFT's moves outputs
~10%); ``requantize=True`` re-quantises and records the drift (``requant_drift``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import nf4_matmul
from .base import LinearBase, register_base
from .errors import AdaptkitError
from .nf4 import NF4State, dequantize_nf4, quantize_nf4
from .nf4_state import QuantParam

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_STATE = ("absmax", "nested_absmax", "offset")


def check_settings(owner: str, blocksize, double_quant, compute_dtype) -> None:
    """The NF4 settings shared by ak.QLoRA and adaptkit.nf4.quantize."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 2 or blocksize % 2:
        raise AdaptkitError(
            f"{owner}: blocksize={blocksize!r} must be a positive even int; QLoRA and bitsandbytes use blocksize=64"
        )
    if not isinstance(double_quant, bool):
        raise AdaptkitError(f"{owner}: double_quant must be a bool, got {double_quant!r}")
    if compute_dtype is not None and compute_dtype not in DTYPES:
        raise AdaptkitError(
            f"{owner}: compute_dtype={compute_dtype!r} is not one of "
            f"{[None, *DTYPES]}; None keeps the weight's dtype, QLoRA uses 'bfloat16'"
        )


class _NF4LinearFn(torch.autograd.Function):
    """y = x W^T + b, W = deq(layer) in the compute dtype, via :mod:`adaptkit.nf4_matmul`;
    backward dequantises W again rather than keeping it (as bitsandbytes' MatMul4Bit)."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.layer = layer
        return nf4_matmul.linear(x, layer.packed(), layer.state(), layer.compute_dtype, bias)

    @staticmethod
    def backward(ctx, g):
        layer, gx = ctx.layer, None  # autocast may have run the forward in g's dtype:
        if ctx.needs_input_grad[0]:  # g (..., out) @ W (out, in), W cast as autocast did
            gx = (
                nf4_matmul.grad_input(g, layer.packed(), layer.state(), g.dtype)
                if g.dtype == layer.compute_dtype
                else g @ layer.dequantize().to(g.dtype)
            )
        gb = g.reshape(-1, g.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None  # (out,)
        return gx, gb, None


def nf4_forward(layer: NF4Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The NF4 base op: x W^T + b in the compute dtype, returned in x's dtype (inference on
    CPU: chunked, or for 1-2 rows of x a compiled fused GEMV; :mod:`adaptkit.nf4_matmul`)."""
    cd = layer.compute_dtype
    xc = x.to(cd)
    b = None if bias is None else bias.to(cd)
    if torch.is_grad_enabled() and (xc.requires_grad or (b is not None and b.requires_grad)):
        y = _NF4LinearFn.apply(xc, b, layer)
    else:
        y = nf4_matmul.linear(xc, layer.packed(), layer.state(), cd, b)
    return y.to(x.dtype)


def block_rows(packed: torch.Tensor, blocksize: int) -> torch.Tensor:
    """uint8 [ceil(n/2)] packed bytes -> (nblocks, blocksize/2), one row per quantisation block
    (a view; a copy zero-padding the last row where the last block is partial)."""
    half = blocksize // 2
    rows = -(-packed.numel() // half)
    if packed.numel() == rows * half:
        return packed.view(rows, half)  # [ceil(n/2)] -> (nblocks, blocksize/2)
    out = packed.new_zeros(rows * half)
    out[: packed.numel()] = packed
    return out.view(rows, half)  # [nblocks * blocksize/2] -> (nblocks, blocksize/2)


def packed_bytes(rows: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`block_rows` for ``n`` weights: the first ceil(n/2) bytes, a view."""
    return rows.reshape(-1)[: (n + 1) // 2]  # (nblocks, blocksize/2) -> [ceil(n/2)]


class NF4Linear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is stored in NF4 (bitsandbytes' Linear4bit layout);
    tensors and storage in the module docstring. ``dtype`` is the weight's dtype before
    quantisation; ``compute_dtype`` (default ``dtype``) is what forward dequantises to.

    ``.to(device)`` moves everything; ``.to(dtype)`` casts the bias only (the quantisation
    state stays exact fp32). ``load_state_dict`` takes packed tensors, or a float (out, in)
    ``weight``, which it quantises with this layer's settings.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        nested_blocksize: int = 256,
        dtype: torch.dtype = torch.float32,
        compute_dtype: torch.dtype | None = None,
        device=None,
    ):
        nn.Module.__init__(self)  # not nn.Linear.__init__: no dense weight is ever allocated
        check_settings("NF4Linear", blocksize, double_quant, None)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.blocksize, self.nested_blocksize = blocksize, nested_blocksize
        self.weight_dtype, self.compute_dtype = dtype, compute_dtype or dtype
        n = self.in_features * self.out_features
        nb = -(-n // blocksize)
        kw = dict(device=device)
        # (nblocks, blocksize/2): one row per block, so FSDP2's dim-0 shards (like absmax's)
        # hold whole blocks; the last row is zero-padded past the ceil(n/2) packed bytes
        self.weight = QuantParam(torch.zeros(nb, blocksize // 2, dtype=torch.uint8, **kw))
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_features, dtype=dtype, **kw)) if bias else None)
        self.absmax = QuantParam(torch.zeros(nb, dtype=torch.uint8 if double_quant else torch.float32, **kw))
        # tiny (1/16384 of the weights): buffers, replicated under FSDP2 (offset is 0-d)
        self.register_buffer("nested_absmax", torch.zeros(-(-nb // nested_blocksize), **kw) if double_quant else None)
        self.register_buffer("offset", torch.zeros((), **kw) if double_quant else None)

    @classmethod
    def from_weight(
        cls,
        w: torch.Tensor,
        bias: nn.Parameter | None = None,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        nested_blocksize: int = 256,
        compute_dtype: torch.dtype | None = None,
    ) -> NF4Linear:
        """Quantise a dense (out, in) weight (deterministic: same bytes every time); ``bias``
        is taken over as it is (same Parameter)."""
        packed, st = quantize_nf4(w.detach(), blocksize, double_quant, nested_blocksize)
        q = cls(
            w.shape[1],
            w.shape[0],
            bias=False,
            blocksize=blocksize,
            double_quant=double_quant,
            nested_blocksize=nested_blocksize,
            dtype=w.dtype,
            compute_dtype=compute_dtype,
            device="meta",
        )
        q.register_parameter("bias", bias)
        return q.set_packed(packed, st)

    @classmethod
    def from_linear(cls, lin: nn.Linear, **settings) -> NF4Linear:
        """An NF4 copy of ``lin`` (left untouched; the bias Parameter is shared)."""
        q = cls.from_weight(lin.weight, lin.bias, **settings)
        return q.train(lin.training)

    def set_packed(self, packed: torch.Tensor, st: NF4State) -> NF4Linear:
        """Take ``packed`` uint8 [ceil(n/2)] (as rows of whole blocks, copied only where the
        last block is partial) and ``st``'s absmax / nested state as this layer's tensors;
        ``st`` must match the layer's shape and settings."""
        self.weight, self.absmax = QuantParam(block_rows(packed, self.blocksize)), QuantParam(st.absmax)
        self.nested_absmax, self.offset = st.nested_absmax, st.offset
        return self

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def packed(self) -> torch.Tensor:
        """The packed bytes uint8 [ceil(n/2)] (bitsandbytes' order): a view of ``weight``."""
        return packed_bytes(self.weight, self.in_features * self.out_features)

    def state(self) -> NF4State:
        return NF4State(
            absmax=self.absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            nested_absmax=self.nested_absmax,
            offset=self.offset,
            nested_blocksize=self.nested_blocksize,
        )

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense (out, in) weight in ``dtype`` (default: the compute dtype); written into
        ``out`` (contiguous (out, in), e.g. rows of a larger tile) when given."""
        return dequantize_nf4(self.packed(), self.state(), dtype or self.compute_dtype, out=out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_forward(self, x, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, nf4 blocksize={self.blocksize}, "
            f"double_quant={self.double_quant}, compute_dtype={DTYPE_NAMES.get(self.compute_dtype)}"
        )

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() cast floating tensors; the fp32 quantisation state must stay
        # exact, so it takes only fn's device (a Parameter's object is kept, as FSDP2 needs)
        keep = {id(t) for k in _STATE if (t := getattr(self, k)) is not None and t.is_floating_point()}

        def move(t):
            r = fn(t)
            return t.to(r.device) if id(t) in keep and r.dtype != t.dtype else r

        return super()._apply(move if keep else fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        w = destination.get(prefix + "weight")
        if w is not None and not hasattr(w, "placements"):  # a DTensor shard keeps its block rows
            destination[prefix + "weight"] = self.packed()  # [ceil(n/2)], bitsandbytes' order

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        w = state_dict.get(prefix + "weight")
        n = self.in_features * self.out_features
        if isinstance(w, torch.Tensor) and w.dtype == torch.uint8 and w.dim() == 1 and w.numel() == (n + 1) // 2:
            # flat packed bytes (an older checkpoint, bitsandbytes' order): as block rows
            state_dict = {**state_dict, prefix + "weight": block_rows(w, self.blocksize)}
        elif isinstance(w, torch.Tensor) and w.is_floating_point():
            shape = (self.out_features, self.in_features)
            if tuple(w.shape) != shape:
                error_msgs.append(
                    f"size mismatch for {prefix}weight: float checkpoint weight {tuple(w.shape)}, NF4 layer is {shape}"
                )
                return
            # a float checkpoint of the base: quantise it exactly as inject does
            packed, st = quantize_nf4(
                w.to(self.weight.device), self.blocksize, self.double_quant, self.nested_blocksize
            )
            state_dict = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
            state_dict[prefix + "weight"] = block_rows(packed, self.blocksize)
            for k in _STATE:
                if getattr(st, k) is not None:
                    state_dict[prefix + k] = getattr(st, k)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


@register_base
class NF4Base(LinearBase):
    """An :class:`NF4Linear` under adapters. ``layer.weight`` stays the packed bytes; ``read``
    dequantises. An in-place merge keeps the bytes and stores the merged dense weight (W's
    original dtype) as the non-persistent buffer ``merged_weight``, which forward then
    uses; ``restore`` drops it, so unmerge is exact."""

    @classmethod
    def accepts(cls, m):
        return isinstance(m, NF4Linear)

    def features(self, layer):
        return layer.__dict__["out_features"], layer.__dict__["in_features"]

    def from_2d(self, d, layer):
        return d.reshape(self.features(layer))  # (out, in) already

    def param_kw(self, layer):
        return {"device": layer.weight.device, "dtype": layer.compute_dtype}

    def op(self, layer, x, weight, bias):
        if weight.is_floating_point():  # a dense weight from the caller (the dense reference)
            return F.linear(x, weight, bias)
        m = layer._buffers.get("merged_weight")
        if m is None:
            return nf4_forward(layer, x, bias)
        cd = layer.compute_dtype
        return F.linear(x.to(cd), m.to(cd), None if bias is None else bias.to(cd)).to(x.dtype)

    def forward(self, layer, x):
        return self.op(layer, x, layer._parameters["weight"], layer._parameters.get("bias"))

    def read(self, layer):
        m = layer._buffers.get("merged_weight")
        return m.float() if m is not None else layer.dequantize(torch.float32)

    def write(self, layer, w):
        layer.register_buffer("merged_weight", w.to(layer.weight_dtype), persistent=False)
        torch.autograd.graph.increment_version(layer.weight)  # DoRA's caches key on it

    def restore(self, layer):
        layer._buffers.pop("merged_weight", None)
        layer._non_persistent_buffers_set.discard("merged_weight")
        torch.autograd.graph.increment_version(layer.weight)
        return True

    def unwrap(self, layer):
        """The NF4Linear; the dense nn.Linear while adapters are merged into it."""
        if layer._buffers.get("merged_weight") is not None:
            return self._dense(layer)
        return super().unwrap(layer)

    def unload(self, layer, requantize=False):
        """``ak.merge``: a dense nn.Linear in W's pre-quantisation dtype (so an fp32 model with
        bf16 compute still runs on fp32 inputs), or, with ``requantize``, the merged weight
        re-quantised (``requant_drift`` measured); an unmerged layer keeps its bytes."""
        m = layer._buffers.get("merged_weight")
        if not requantize:
            return self._dense(layer)
        if m is None:
            return super().unwrap(layer)
        q = NF4Linear.from_weight(
            m,
            _bias(layer, layer.weight_dtype),
            blocksize=layer.blocksize,
            double_quant=layer.double_quant,
            compute_dtype=layer.compute_dtype,
            nested_blocksize=layer.nested_blocksize,
        ).train(layer.training)
        q.requant_drift = requant_drift(m, q.dequantize(torch.float32), layer.dequantize(torch.float32))
        return q

    def _dense(self, layer) -> nn.Linear:
        dt, m = layer.weight_dtype, layer._buffers.get("merged_weight")
        lin = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
        lin.weight = nn.Parameter(layer.dequantize(dt) if m is None else m, requires_grad=False)
        lin.register_parameter("bias", _bias(layer, dt))
        return lin.train(layer.training)


def _bias(layer, dt: torch.dtype) -> nn.Parameter | None:
    """The layer's bias in ``dt``: the same Parameter when it already is."""
    b = layer.bias
    return b if b is None or b.dtype == dt else nn.Parameter(b.detach().to(dt), b.requires_grad)


@torch.no_grad()
def requant_drift(w: torch.Tensor, wq: torch.Tensor, w0: torch.Tensor) -> dict[str, float | None]:
    """How re-quantising the merged weight ``w`` (out, in) to ``wq`` moves outputs, on 64
    seeded N(0, 1) probe inputs X (64, in); ``w0`` is the dequantised base before the merge.

    max_rel_output = max_i ||x_i (wq - w)^T|| / ||x_i w^T||   (per-input relative change)
    vs_update      = ||X (wq - w)^T||_F / ||X (w - w0)^T||_F   (the error over the adapters'
                     update: near or above 1 means re-quantisation undid the fine-tune);
                     None while the update is within the rounding of ``w``'s dtype (e.g.
                     untrained adapters), where the ratio would only measure rounding noise
    """
    tiny = torch.finfo(w.dtype).eps
    w = w.float()
    g = torch.Generator(device=w.device).manual_seed(0)
    x = torch.randn(64, w.shape[1], generator=g, device=w.device)
    y = x @ w.t()  # (64, out)
    err = x @ wq.t() - y
    upd = (y - x @ w0.t()).norm()
    rel = (err.norm(dim=1) / y.norm(dim=1).clamp_min(1e-30)).max()
    return {"max_rel_output": float(rel), "vs_update": float(err.norm() / upd) if upd > tiny * y.norm() else None}
