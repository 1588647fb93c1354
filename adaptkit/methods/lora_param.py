"""LoRA and DoRA on a "param" base: a 2-D or 3-D ``nn.Parameter`` its module uses directly
(``target_parameters``; adaptkit/param_base.py), e.g. transformers' MoE expert stacks.

One adapter per expert, on the (out, in) view of each expert's matrix:

    lora_A: (*lead, r, in),  lora_B: (*lead, out, r),  lead = () (2-D) or (E,) (3-D)
    delta[e] = s * B[e] @ A[e]                               (LoRA, as PEFT's ParamWrapper)
    W'[e]    = (m[e] / n[e])[:, None] * (W[e] + delta[e]),   n[e] = ||W[e] + delta[e]||_row
                                                             (DoRA; m: (*lead, out), n detached)

The module's forward sees ``update_weight(W)``: for LoRA one ``baddbmm(W, B, A, alpha=s)``
over all experts (``addmm`` for 2-D), which writes the adapted weight once; its backward is
two batched matmuls against the dense weight gradient. Dropout is refused: it acts on the
input, which a weight update never sees (PEFT refuses it too). Inits "default" (A
kaiming-uniform with fan-in ``in`` per expert, B = 0, PEFT's) and "gaussian"; PiSSA / OLoRA
are not defined per expert here and are refused.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import AdaptkitError
from ..layer import AdaptedLayer, Adapter, tracing
from .lora import LoRAAdapter

# ops that read only metadata: answered from W, which has W''s shape, dtype, device, strides
_META: set[Any] = {
    torch.Tensor.size, torch.Tensor.dim, torch.Tensor.stride, torch.Tensor.data_ptr, torch.Tensor.is_contiguous,
    torch.Tensor.is_floating_point, torch.Tensor.element_size, torch.Tensor.numel, torch.Tensor.storage_offset,
    *(vars(torch._C.TensorBase)[k].__get__ for k in ("shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad")),
}  # fmt: skip
_GROUPED = ("_grouped_mm", "grouped_mm", "grouped_mm_fallback")


class LowRankWeight(torch.Tensor):
    """``W + s B A`` kept factored (the eager LoRA fast path of :meth:`ParamLoRAAdapter.update_weight`).

    The owner's forward gets this in place of the adapted weight. The ops MoE experts apply to
    it run low rank: ``transpose`` of the last two dims and indexing one expert give another
    LowRankWeight; ``F.linear(x, W'[e])`` = ``F.linear(x, W[e]) + s (x A^T) B^T``; a grouped
    GEMM (torch's ``grouped_mm``, transformers' fallback op) on ``W'^T`` = ``grouped_mm(x, W^T)
    + s grouped_mm(grouped_mm(x, A^T), B^T)``. The frozen W then gets no weight gradient at
    all (only A and B, through thin GEMMs), which is what makes a train step cost about the
    frozen base's. Any other op gets the dense ``W + s B A`` (one baddbmm), so results never
    depend on which ops are recognised. ``t``: the tensor is the transpose of the last two
    dims (it holds ``W^T + s A^T B^T``)."""

    _w: torch.Tensor
    _B: torch.Tensor
    _A: torch.Tensor
    _s: float
    _t: bool

    @staticmethod
    def __new__(cls, w, B, A, s, t):
        r = torch.Tensor._make_subclass(cls, w.detach())
        r._w, r._B, r._A, r._s, r._t = w, B, A, s, t
        return r

    def dense(self) -> torch.Tensor:
        w = self._w.transpose(-1, -2) if self._t else self._w  # (*lead, out, in)
        v = (torch.baddbmm if w.dim() == 3 else torch.addmm)(w, self._B, self._A, alpha=self._s)
        return v.transpose(-1, -2) if self._t else v

    def _like(self, w, B, A, t):
        return LowRankWeight(w, B, A, self._s, t)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _META:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        fast = _fast(func, args, kwargs)
        if fast is not None:
            return fast
        args, kwargs = torch.utils._pytree.tree_map(lambda a: a.dense() if isinstance(a, cls) else a, (args, kwargs))
        return func(*args, **kwargs)


def _last_two(w, d0, d1) -> bool:
    return {d0 % w.dim(), d1 % w.dim()} == {w.dim() - 2, w.dim() - 1}


def _fast(func, args, kwargs):
    """The low-rank form of ``func(*args)`` when it has one, else None."""
    name = getattr(func, "__name__", "") or str(func)
    w = args[0] if args else None
    if func in (torch.Tensor.transpose, torch.transpose) and isinstance(w, LowRankWeight) and len(args) == 3:
        if _last_two(w, args[1], args[2]):
            return w._like(w._w.transpose(-1, -2), w._B, w._A, not w._t)
    elif func is torch.Tensor.__getitem__ and isinstance(w, LowRankWeight) and w.dim() == 3 and not kwargs:
        i = args[1]
        if isinstance(i, int) or isinstance(i, torch.Tensor) and i.dim() == 0 and not i.is_floating_point():
            return w._like(w._w[i], w._B[i], w._A[i], w._t)
    elif func is F.linear and len(args) >= 2 and isinstance(args[1], LowRankWeight):
        x, lw, b = args[0], args[1], args[2] if len(args) > 2 else kwargs.get("bias")
        if lw.dim() == 2 and not lw._t and not isinstance(x, LowRankWeight):
            h = F.linear(x, lw._A)  # (..., r)
            # in place on a fresh output: linear's backward saves its inputs, not its output
            return F.linear(x, lw._w, b).add_(F.linear(h, lw._B), alpha=lw._s)
    elif name.split(".")[-1] in _GROUPED or any(g + "." in name for g in _GROUPED):
        x = args[0]
        lw = args[1] if len(args) > 1 else kwargs.get("weight", kwargs.get("mat_b"))
        if isinstance(lw, LowRankWeight) and lw._t and lw.dim() == 3 and not isinstance(x, LowRankWeight):
            rest, kw = args[2:], {k: v for k, v in kwargs.items() if k not in ("weight", "mat_b")}
            base = func(x, lw._w, *rest, **kw)  # (S, out)
            # the factors in the caller's own layout for W^T (transposes of row-major stacks),
            # r zero-padded (exact) so that every stride is a multiple of 16 bytes, as grouped
            # GEMM kernels require
            pad = -lw._A.shape[-2] % max(1, 16 // lw._A.element_size())
            At = F.pad(lw._A, (0, 0, 0, pad)).transpose(-1, -2)  # (E, r + pad, in) -> (E, in, r + pad)
            Bt = F.pad(lw._B, (0, pad)).transpose(-1, -2)  # (E, out, r + pad) -> (E, r + pad, out)
            return base.add_(func(func(x, At, *rest, **kw), Bt, *rest, **kw), alpha=lw._s)
    return None


def check_param_spec(spec, path: str) -> None:
    """What a parameter adapter cannot do, named with the parameter path."""
    owner = type(spec).__name__
    if spec.dropout:
        raise AdaptkitError(
            f"{owner}: dropout={spec.dropout} cannot apply to the parameter '{path}' (the update is folded "
            f"into the weight, so it never sees the input); use dropout=0 or a separate spec for it"
        )
    if spec.init not in ("default", "gaussian"):
        raise AdaptkitError(
            f"{owner}: init={spec.init!r} is not defined for the parameter '{path}'; use init='default' or 'gaussian'"
        )


class ParamLoRAAdapter(LoRAAdapter):
    """LoRA on a parameter base; see the module docstring for the math and shapes."""

    def __init__(self, layer: AdaptedLayer, rank: int, scale: float, init: str):
        Adapter.__init__(self)
        kw, lead = layer.param_kw, layer.base.lead(layer)
        self.rank, self.scale, self.p, self.init, self.dense_conv = rank, float(scale), 0.0, init, False
        self.lora_A = nn.Parameter(torch.empty(*lead, rank, layer.in_features, **kw))  # (*lead, r, in)
        self.lora_B = nn.Parameter(torch.empty(*lead, layer.out_features, rank, **kw))  # (*lead, out, r)
        self.reset(layer)

    @torch.no_grad()
    def reset(self, layer: AdaptedLayer) -> None:
        A = self.lora_A.view(-1, self.lora_A.shape[-1])  # (lead*r, in): fan-in = in, as PEFT's Linear(in, r*E)
        if self.init == "gaussian":
            nn.init.normal_(A, std=1 / self.rank)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def attach(self, layer: AdaptedLayer) -> None:
        pass

    def update(self, x, y, layer):
        raise AdaptkitError("a parameter adapter has no per-input update; its module's forward uses update_weight")

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        p = self._parameters  # not Module attribute lookup: this runs on every forward
        return cast(torch.Tensor, p["lora_A"]), cast(torch.Tensor, p["lora_B"])

    def _fold(self, w: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        """w + s B A on the (*lead, out, in) view, in one (batched) GEMM, in w's dtype."""
        A, B = self._factors()
        if A.dtype != w.dtype:
            A, B = A.to(w.dtype), B.to(w.dtype)
        v = layer.base.to_2d(w)  # (*lead, out, in), a view
        out = (torch.baddbmm if v.dim() == 3 else torch.addmm)(v, B, A, alpha=self.scale)
        return layer.base.from_2d(out, layer)

    def update_weight(self, w: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        if tracing() or w is not layer.weight:  # compiled, or after another adapter: dense
            return self._fold(w, layer)
        A, B = self._factors()
        if A.dtype != w.dtype:
            A, B = A.to(w.dtype), B.to(w.dtype)
        return LowRankWeight(w, B, A, self.scale, cast(Any, layer.base).transposed)  # a ParamBase


class ParamDoRAAdapter(ParamLoRAAdapter):
    """DoRA on a parameter base: the LoRA factors plus ``lora_magnitude`` (*lead, out)."""

    def __init__(self, layer: AdaptedLayer, rank: int, scale: float, init: str):
        super().__init__(layer, rank, scale, init)
        self.lora_magnitude = nn.Parameter(torch.ones(*layer.base.lead(layer), layer.out_features, **layer.param_kw))
        self._merge_norm: torch.Tensor | None = None

    def attach(self, layer: AdaptedLayer) -> None:
        with torch.no_grad():  # m = ||W + s B A||_row: the output is unchanged
            self.lora_magnitude.copy_(self.row_norm(layer))

    @torch.no_grad()
    def row_norm(self, layer: AdaptedLayer) -> torch.Tensor:
        """n = ||W + s B A||_row of the stored (unmerged) weight, fp32, (*lead, out)."""
        v = layer.base.to_2d(layer.base.read(layer)) + layer.base.to_2d(self.delta_weight(layer))  # (*lead, out, in)
        return v.norm(dim=-1)

    def _gain(self, n: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (self.lora_magnitude.float() / n).to(like.dtype).unsqueeze(-1)  # (*lead, out, 1)

    def update_weight(self, w: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        v = layer.base.to_2d(self._fold(w, layer))  # (*lead, out, in)
        # n of the stored weight (as merge_weight); when w is it, from v itself (one pass)
        n = v.detach().float().norm(dim=-1) if w is layer.weight else self.row_norm(layer)
        return layer.base.from_2d(v * self._gain(n, v), layer)

    def merge_weight(self, layer: AdaptedLayer, w32: torch.Tensor) -> torch.Tensor:
        n = self.row_norm(layer)
        if not self.merged:
            self._merge_norm = n
        v = layer.base.to_2d(w32) + layer.base.to_2d(self.delta_weight(layer))
        return layer.base.from_2d(self._gain(n, v).detach() * v, layer)

    def unmerge_weight(self, layer: AdaptedLayer, w32: torch.Tensor) -> torch.Tensor:
        if self._merge_norm is None:
            raise AdaptkitError(
                "DoRA unmerge: this adapter has no recorded merge norm (it was not "
                "merged by this layer's merge()); reload the base weights instead"
            )
        g = self._gain(self._merge_norm.to(w32.device), w32).detach()
        self._merge_norm = None
        v = layer.base.to_2d(w32) / g - layer.base.to_2d(self.delta_weight(layer))
        return layer.base.from_2d(v, layer)
