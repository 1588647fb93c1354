r"""``MoRALinear``: an ``nn.Linear`` drop-in carrying a MoRA update (Jiang et al., 2024,
arXiv 2405.12130), and ``apply_mora_linear`` to swap a model's nn.Linear layers for it.

    y = x Wᵀ + b + D(M·C(drop(x))),     W (out, in), M (r̂, r̂) zero-initialised, no alpha

C / D, r̂ and the types are those of ``mora.py`` (module docstring there); here the
default ``mora_type`` is 6 (the DESIGN signature). A MoRALinear is an adapted layer (adaptkit/layer.py) that owns one MoRA adapter: forward,
merge, unmerge and ``ak.merge`` are the shared ones; only the state-dict layout is its own
(``mora_M`` beside ``weight`` / ``bias``, so a plain nn.Linear checkpoint loads).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn as nn

from ..base import LinearBase
from ..errors import AdaptkitError
from ..layer import AdaptedLayer
from ..targets import matches
from .mora import MoRA, MoRAAdapter

OWN = "(mora)"  # the adapter's name: not a valid ak.inject name, so no adapter can clash


class MoRALinear(AdaptedLayer, nn.Linear):  # type: ignore[misc,override]  # AdaptedLayer derives in/out_features
    """``nn.Linear`` drop-in with a MoRA update: ``y = x Wᵀ + b + D(M·C(drop(x)))``.

    State-dict keys: ``weight``, ``bias`` (as nn.Linear) and ``mora_M`` (r̂, r̂); a plain
    nn.Linear checkpoint (no ``mora_M``) loads with ``strict=True`` and leaves M as it is.
    ``freeze_base`` (default) freezes weight and bias so only M trains. ``merge()`` /
    ``unmerge()`` fold the update into W in place; ``to_linear()`` returns the plain
    nn.Linear (same Parameter objects, requires_grad as before MoRA) and ``ak.merge(model)``
    does that for every MoRALinear. ``ak.inject`` never wraps a MoRALinear.
    """

    owns_adapters = True
    _base_cls = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        rank: int = 8,
        mora_type=6,
        r_hat: int | None = None,
        dropout: float = 0.0,
        merge_every: int | None = None,
        freeze_base: bool = True,
        device=None,
        dtype=None,
    ):
        self._setup(
            nn.Linear(in_features, out_features, bias, device=device, dtype=dtype),
            rank,
            mora_type,
            r_hat,
            dropout,
            merge_every,
            freeze_base,
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        rank: int = 8,
        mora_type=6,
        r_hat: int | None = None,
        dropout: float = 0.0,
        merge_every: int | None = None,
        freeze_base: bool = True,
    ) -> MoRALinear:
        """Wrap ``linear``: its weight / bias Parameters are reused (no copy, no re-init)."""
        if not isinstance(linear, nn.Linear):
            raise AdaptkitError(f"MoRALinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        m = cls.__new__(cls)
        m._setup(linear, rank, mora_type, r_hat, dropout, merge_every, freeze_base)
        return m

    def _setup(self, linear, rank, mora_type, r_hat, dropout, merge_every, freeze_base):
        spec = MoRA(
            rank=rank, r_hat=r_hat, mora_type=mora_type, dropout=dropout, merge_every=merge_every, targets=".*"
        )  # validates the arguments
        self._adopt(linear, LinearBase(linear))
        self.merge_every = merge_every
        self._base_grad = {k: p.requires_grad for k, p in linear._parameters.items() if p is not None}
        a = spec.build(self, "")
        # the adapter stays out of the module tree, its M is this module's own ``mora_M``:
        # the keys of a MoRALinear are those of nn.Linear plus mora_M
        del self._modules["adapters"]
        self.__dict__["adapters"] = {OWN: a}
        self.mora_M = a.mora_M
        for p in (self.weight, self.bias) if freeze_base else ():
            if p is not None:
                p.requires_grad_(False)
        self.set_active([OWN])

    def _sync(self) -> None:
        """Point the adapter at the current ``mora_M`` and training mode (``.to()``,
        ``load_state_dict(assign=True)`` and ``train()`` reach only the module tree)."""
        a = self._mora
        a._parameters["mora_M"] = self._parameters["mora_M"]
        a.training = self.training

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._sync()
        return out

    def train(self, mode: bool = True):
        super().train(mode)
        self._sync()
        return self

    # ---- the drop-in's own API, over the shared machinery -----------------------------
    @property
    def _mora(self) -> MoRAAdapter:
        return cast(MoRAAdapter, self.adapters[OWN])

    @property
    def merged(self) -> bool:
        return self._mora.merged

    @property
    def mora_type(self):
        return self._mora.mora_type

    @property
    def r_hat(self) -> int:
        return self._mora.r_hat

    def delta_weight(self) -> torch.Tensor:
        """ΔW (out, in) in fp32 (fp64 for a fp64 layer)."""
        return self._mora.delta_weight(self)

    def to_linear(self) -> nn.Linear:
        """Merge and return a plain nn.Linear holding this module's weight / bias."""
        return self.unload()

    def unload(self, requantize: bool = False) -> nn.Linear:
        self.merge()
        lin = cast(nn.Linear, self.unwrap())
        for k, p in lin._parameters.items():
            if p is not None:
                p.requires_grad_(self._base_grad.get(k, True))
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return AdaptedLayer.forward(self, x)

    def _load_from_state_dict(self, sd, prefix, *args):
        super()._load_from_state_dict(sd, prefix, *args)
        self._sync()
        missing = args[2]  # a plain nn.Linear checkpoint has no mora_M: keep M, no error
        if prefix + "mora_M" not in sd and prefix + "mora_M" in missing:
            missing.remove(prefix + "mora_M")

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, r_hat={self.r_hat}, mora_type={self.mora_type!r}"

    def __reduce_ex__(self, protocol):
        return nn.Module.__reduce_ex__(self, protocol)


def apply_mora_linear(model: nn.Module, targets=None, exclude=None, **kw) -> list[str]:
    """Swap every plain ``nn.Linear`` of ``model`` whose path fullmatches ``targets`` (regex
    or list; default all) and not ``exclude`` for ``MoRALinear.from_linear(m, **kw)``.
    Subclasses of nn.Linear are left alone (e.g. MultiheadAttention's out_proj, whose owner
    reads its weight directly, would silently lose the update). Returns the paths."""
    paths = [
        p
        for p, m in model.named_modules()
        if p and type(m) is nn.Linear and (targets is None or matches(targets, p)) and not matches(exclude, p)
    ]
    if not paths:
        raise AdaptkitError(
            f"apply_mora_linear: no nn.Linear matches targets={targets!r} "
            f"exclude={exclude!r} (the root module cannot be swapped in place; "
            f"use MoRALinear.from_linear for it)"
        )
    new = {p: MoRALinear.from_linear(cast(nn.Linear, model.get_submodule(p)), **kw) for p in paths}
    for p, m in new.items():
        model.set_submodule(p, m)
    return paths
