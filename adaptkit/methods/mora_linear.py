r"""``MoRALinear``: an ``nn.Linear`` drop-in carrying a MoRA update (Jiang et al., 2024,
arXiv 2405.12130), and ``apply_mora_linear`` to swap a model's nn.Linear layers for it.

    y = x Wᵀ + b + D(M·C(drop(x))),     W (out, in), M (r̂, r̂) zero-initialised, no alpha

C / D, r̂ and the types are those of ``mora.py`` (module docstring there); here the
default ``mora_type`` is 6 (the DESIGN signature). The update runs by reshapes and sums
(``_MoRAState.delta_forward``); ``merge`` folds the exact dense ΔW = D·M·C (out, in) into W.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import AdaptkitError
from ..targets import matches
from .mora import MoRA, _MoRAState, r_hat_for


class MoRALinear(nn.Linear, _MoRAState):
    """``nn.Linear`` drop-in with a MoRA update: ``y = x Wᵀ + b + D(M·C(drop(x)))``.

    State-dict keys: ``weight``, ``bias`` (as nn.Linear) and ``mora_M`` (r̂, r̂); a plain
    nn.Linear checkpoint (no ``mora_M``) loads with ``strict=True`` and leaves M as it is.
    ``freeze_base`` (default) freezes weight and bias so only M trains. ``merge()`` /
    ``unmerge()`` fold the update into W in place; ``to_linear()`` returns the plain
    nn.Linear (same Parameter objects, requires_grad as before MoRA) and ``ak.merge(model)``
    does that for every MoRALinear. ``ak.inject`` never wraps a MoRALinear.
    """

    adaptkit_drop_in = True  # the hook merge.py and layer.base_kind look for

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int = 8,
                 mora_type=6, r_hat: int | None = None, dropout: float = 0.0,
                 merge_every: int | None = None, freeze_base: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup({k: True for k in self._parameters}, rank, mora_type, r_hat, dropout,
                    merge_every, freeze_base)

    def _setup(self, base_grad, rank, mora_type, r_hat, dropout, merge_every, freeze_base):
        MoRA(rank=rank, r_hat=r_hat, mora_type=mora_type, dropout=dropout, merge_every=merge_every)
        w = self.weight
        self.r_hat = r_hat or r_hat_for(self.in_features, self.out_features, rank, mora_type)
        self.mora_type, self.p, self.merge_every = mora_type, float(dropout), merge_every
        self.merged, self._tables, self._base_grad = False, {}, base_grad  # flags to restore
        self.mora_M = nn.Parameter(torch.zeros(self.r_hat, self.r_hat, device=w.device,
                                               dtype=w.dtype))
        for p in (w, self.bias) if freeze_base else ():
            if p is not None:
                p.requires_grad_(False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rank: int = 8, mora_type=6, r_hat: int | None = None,
                    dropout: float = 0.0, merge_every: int | None = None,
                    freeze_base: bool = True) -> "MoRALinear":
        """Wrap ``linear``: its weight / bias Parameters are reused (no copy, no re-init)."""
        if not isinstance(linear, nn.Linear):
            raise AdaptkitError(f"MoRALinear.from_linear: expected an nn.Linear, got "
                                f"{type(linear).__name__}")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.register_parameter("weight", linear.weight)
        m.register_parameter("bias", linear.bias)
        grads = {k: p.requires_grad for k, p in linear._parameters.items() if p is not None}
        m._setup(grads, rank, mora_type, r_hat, dropout, merge_every, freeze_base)
        return m.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y if self.merged else y + self.delta_forward(x).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW (out, in) in fp32 (fp64 for a fp64 layer)."""
        return self.dense_delta(torch.promote_types(self.weight.dtype, torch.float32))

    def dense_weight(self) -> torch.Tensor:
        """W + ΔW (W alone once merged), accumulated in fp32 or wider."""
        w = self.weight.detach()
        w = w.to(torch.promote_types(w.dtype, torch.float32))
        return w if self.merged else w + self.delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        w = self.dense_weight()
        if not torch.isfinite(w).all():
            raise AdaptkitError("MoRALinear.merge: W + ΔW is not finite; nothing was merged. "
                                "Check mora_M for NaN/inf")
        self.weight.copy_(w)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            d = self.delta_weight()
            self.weight.copy_(self.weight.to(d.dtype) - d)
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """Merge and return a plain nn.Linear holding this module's weight / bias."""
        self.merge()
        lin = nn.Linear.__new__(nn.Linear)  # no init: the parameters are this module's
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        for k in ("weight", "bias"):
            p = self._parameters[k]
            if p is not None:
                p.requires_grad_(self._base_grad.get(k, True))
            lin.register_parameter(k, p)
        return lin.train(self.training)

    def adaptkit_merge(self, unload: bool) -> nn.Module:
        """ak.merge hook: the plain nn.Linear (unload) or self, merged in place."""
        if unload:
            return self.to_linear()
        self.merge()
        return self

    def _load_from_state_dict(self, sd, prefix, *args):
        super()._load_from_state_dict(sd, prefix, *args)
        missing = args[2]  # a plain nn.Linear checkpoint has no mora_M: keep M, no error
        if prefix + "mora_M" not in sd and prefix + "mora_M" in missing:
            missing.remove(prefix + "mora_M")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_hat={self.r_hat}, mora_type={self.mora_type!r}"



def apply_mora_linear(model: nn.Module, targets=None, exclude=None, **kw) -> list[str]:
    """Swap every plain ``nn.Linear`` of ``model`` whose path fullmatches ``targets`` (regex
    or list; default all) and not ``exclude`` for ``MoRALinear.from_linear(m, **kw)``.
    Subclasses of nn.Linear are left alone (e.g. MultiheadAttention's out_proj, whose owner
    reads its weight directly, would silently lose the update). Returns the paths."""
    paths = [p for p, m in model.named_modules() if p and type(m) is nn.Linear
             and (targets is None or matches(targets, p)) and not matches(exclude, p)]
    if not paths:
        raise AdaptkitError(f"apply_mora_linear: no nn.Linear matches targets={targets!r} "
                            f"exclude={exclude!r} (the root module cannot be swapped in place; "
                            f"use MoRALinear.from_linear for it)")
    new = {p: MoRALinear.from_linear(model.get_submodule(p), **kw) for p in paths}
    for p, m in new.items():
        model.set_submodule(p, m)
    return paths
