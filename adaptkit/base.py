"""Base kinds: what adaptkit knows about the frozen module under the adapters.

An adapted layer (``layer.AdaptedLayer``) holds one :class:`Base` object. The Base alone
knows how its kind of module computes and where its weight lives, so everything above it
(merge, unmerge, the dense reference, unload, the adapters' (out, in_flat) view) is written
once. Adapters see every base through the same 2-D view::

    W native shape                       to_2d(W): (out, in_flat)
    Linear            (out, in)          (out, in)
    GPT-2 Conv1D      (in, out)          W^T
    ConvNd            (out, in/g, *k)    (out, in/g * prod(k))
    Embedding         (vocab, dim)       W^T: (dim, vocab); "in" is the vocabulary
    NF4 Linear        packed uint8       (out, in), dequantised (adaptkit/nf4_linear.py)

A new base kind is one subclass here (or in its own file) and one :func:`register_base`
line; see docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F


class Base:
    """One kind of base module. Subclasses override :meth:`op` and, where the layout is not
    (out, ...), the 2-D view; a base whose weight is not a float Parameter (NF4) overrides
    the weight access too (:meth:`forward`, :meth:`read`, :meth:`write`, :meth:`restore`).
    ``module`` is the original module, kept out of the model tree and handed back by
    :meth:`unwrap` (its Parameters are the adapted layer's, so nothing is copied)."""

    kind: ClassVar[str] = ""

    def __init__(self, module: nn.Module):
        self.module = module

    @classmethod
    def accepts(cls, m: nn.Module) -> bool:
        raise NotImplementedError

    # ---- shapes ------------------------------------------------------------------------
    def features(self, layer) -> tuple[int, int]:
        """(out, in_flat) of the 2-D view."""
        w = layer.weight
        return w.shape[0], w[0].numel()

    def to_2d(self, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(w.shape[0], -1)  # (out, *rest) -> (out, in_flat)

    def from_2d(self, d: torch.Tensor, layer) -> torch.Tensor:
        return d.reshape(layer.weight.shape)  # (out, in_flat) -> native

    def lead(self, layer) -> tuple[int, ...]:
        """Leading batch dims of the adapters' view: () but for a 3-D parameter, (experts,)."""
        return ()

    def param_kw(self, layer) -> dict[str, Any]:
        """device and dtype for the adapters' parameters."""
        w = layer.weight
        return {"device": w.device, "dtype": w.dtype}

    # ---- compute -----------------------------------------------------------------------
    def op(self, layer, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The base computation with an arbitrary dense weight in the native shape."""
        raise NotImplementedError

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        """The base computation with its own weight. ``_parameters`` directly: Module
        attribute lookup is a measurable share of the per-layer overhead."""
        p = layer._parameters
        return self.op(layer, x, p["weight"], p.get("bias"))

    # ---- the weight --------------------------------------------------------------------
    def read(self, layer) -> torch.Tensor:
        """The dense weight in fp32 (or wider), native shape (what merges accumulate on)."""
        w = layer.weight.detach()
        return w.to(torch.promote_types(w.dtype, torch.float32))

    @torch.no_grad()
    def write(self, layer, w: torch.Tensor) -> None:
        """Store a merged / unmerged fp32 weight (cast to the weight's dtype)."""
        layer.weight.copy_(w)

    def restore(self, layer) -> bool:
        """Go back to the weight before any merge without arithmetic, if this base can
        (it kept it); False: the caller subtracts the updates instead."""
        return False

    def unwrap(self, layer) -> nn.Module:
        """The original module holding the layer's (possibly merged) parameters."""
        m = self.module
        for k in m._parameters:
            m._parameters[k] = layer._parameters[k]
        for k in m._buffers:
            m._buffers[k] = layer._buffers[k]
        return m.train(layer.training)

    def unload(self, layer, requantize: bool = False) -> nn.Module:
        """What ``ak.merge`` puts back in the model (a float base: :meth:`unwrap`)."""
        return self.unwrap(layer)

    @classmethod
    def stand_in(cls, shape: tuple[int, ...]) -> nn.Module:
        """A module of this kind with weight ``shape`` on the meta device."""
        raise NotImplementedError


class LinearBase(Base):
    kind = "linear"

    @classmethod
    def accepts(cls, m):
        return isinstance(m, nn.Linear)

    def op(self, layer, x, weight, bias):
        return F.linear(x, weight, bias)

    def forward(self, layer, x):  # the common case, one call shorter (per-layer overhead)
        p = layer._parameters
        return F.linear(x, p["weight"], p.get("bias"))

    @classmethod
    def stand_in(cls, shape):
        return nn.Linear(shape[1], shape[0], bias=False, device="meta")


class _Conv1D(nn.Module):
    """Stand-in for GPT-2's Conv1D, weight (in, out); recognised by its class name."""

    def __init__(self, nf: int, nx: int, device=None):
        super().__init__()
        self.nf, self.weight = nf, nn.Parameter(torch.empty(nx, nf, device=device))


_Conv1D.__name__ = "Conv1D"


class TransposedBase(Base):
    """A Linear with a transposed (in, out) weight: GPT-2's ``Conv1D``, known by duck typing
    (class name, ``nf``, weight shape) so that transformers is never imported."""

    kind = "conv1d_t"

    @classmethod
    def accepts(cls, m):
        w = getattr(m, "weight", None)
        return (
            type(m).__name__ == "Conv1D"
            and isinstance(getattr(m, "nf", None), int)
            and isinstance(w, torch.Tensor)
            and w.dim() == 2
            and w.shape[1] == m.nf
        )

    def features(self, layer):
        w = layer.weight
        return w.shape[1], w.shape[0]

    def to_2d(self, w):
        return w.t()  # (in, out) -> (out, in)

    def from_2d(self, d, layer):
        return d.t()  # (out, in) -> (in, out)

    def op(self, layer, x, weight, bias):
        y = x @ weight  # (..., in) @ (in, out) -> (..., out)
        return y + bias if bias is not None else y

    @classmethod
    def stand_in(cls, shape):
        return _Conv1D(shape[1], shape[0], device="meta")


class ConvBase(Base):
    kind = "conv"
    _CLS = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}

    @classmethod
    def accepts(cls, m):
        return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))

    def op(self, layer, x, weight, bias):
        return layer._conv_forward(x, weight, bias)  # the module's own stride / padding / ...

    @classmethod
    def stand_in(cls, shape):
        return cls._CLS[len(shape)](shape[1], shape[0], shape[2:], bias=False, device="meta")


class EmbeddingBase(Base):
    """An ``nn.Embedding``; its 2-D view is W^T, so "in" is the vocabulary and adapters'
    A has one column per token."""

    kind = "embedding"

    @classmethod
    def accepts(cls, m):
        return isinstance(m, nn.Embedding)

    features = TransposedBase.features
    to_2d = TransposedBase.to_2d
    from_2d = TransposedBase.from_2d

    def op(self, layer, x, weight, bias):
        return F.embedding(
            x, weight, layer.padding_idx, layer.max_norm, layer.norm_type, layer.scale_grad_by_freq, layer.sparse
        )

    @classmethod
    def stand_in(cls, shape):
        return nn.Embedding(shape[0], shape[1], device="meta")


# checked last-registered first, so a more specific kind (NF4 Linear) wins over its parent
BASES: list[type[Base]] = [LinearBase, TransposedBase, ConvBase, EmbeddingBase]
KINDS = ("linear", "conv1d_t", "conv", "embedding", "param")  # "param": adaptkit/param_base.py


def register_base(cls: type[Base]) -> type[Base]:
    """Class decorator: a new base kind (checked before the ones registered earlier)."""
    BASES.append(cls)
    return cls


def base_for(m: nn.Module) -> Base | None:
    """The Base of an adaptable module, or None."""
    for cls in reversed(BASES):
        if cls.accepts(m):
            return cls(m)
    return None
