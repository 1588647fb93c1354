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

import torch
import torch.nn as nn

from ..errors import AdaptkitError
from ..layer import AdaptedLayer, Adapter
from .lora import LoRAAdapter


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

    def _fold(self, w: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        """w + s B A on the (*lead, out, in) view, in one (batched) GEMM, in w's dtype."""
        p = self._parameters
        A, B = p["lora_A"], p["lora_B"]
        if A.dtype != w.dtype:
            A, B = A.to(w.dtype), B.to(w.dtype)
        v = layer.base.to_2d(w)  # (*lead, out, in), a view
        out = (torch.baddbmm if v.dim() == 3 else torch.addmm)(v, B, A, alpha=self.scale)
        return layer.base.from_2d(out, layer)

    def update_weight(self, w: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        return self._fold(w, layer)


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
