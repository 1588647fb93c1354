"""LoRA: Low-Rank Adaptation (Hu et al., 2021, arXiv 2106.09685), with rsLoRA
(Kalajdzievski, 2023, arXiv 2312.03732), PiSSA (Meng et al., 2024, arXiv 2404.02948) and
OLoRA (Büyükakyüz, 2024, arXiv 2406.01775) initialisations.

    y = W0 x + b + s * B A drop(x),      s = alpha / r   (rsLoRA: alpha / sqrt(r))

Shapes, for every base kind, on the (out, in_flat) view of the weight:
    lora_A: (r, in_flat)   in_flat = in (Linear, GPT-2 Conv1D), in/groups * prod(kernel)
                           (Conv), num_embeddings (Embedding)
    lora_B: (out, r)
    delta_weight = s * B @ A, reshaped to the base weight's native shape.

Conv with groups == 1 runs A as a conv with the base's full geometry (stride, padding,
dilation, padding_mode) then B as a 1x1 conv; grouped convs add the dense delta conv.
Embedding looks rows of A^T up and multiplies by B^T; dropout does not apply to it (the
input is indices), as in PEFT.

Inits: "default" (A kaiming-uniform a=sqrt(5), B = 0; Embedding A = 0, B ~ N(0, 1), as
PEFT), "gaussian" (A ~ N(0, 1/r), B = 0), "pissa" (top-r SVD of W), "olora" (QR of W).
The residual inits subtract s * B A from W when attached, so the output is unchanged.

Training on a Linear / NF4 Linear: base and update run as one fused autograd node when
LoRA is first in the active set (methods/lora_fused.py; docs/ARCHITECTURE.md, "Fused LoRA").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import AdaptkitError
from ..layer import AdaptedLayer, Adapter, tracing
from ..peft_config import PeftForm, err
from ..spec import AdapterSpec, register_method
from .lora_fused import autocast_on, lora_linear

INITS = ("default", "gaussian", "pissa", "olora")


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def check_rank(owner: str, rank: int, layer: AdaptedLayer, path: str) -> None:
    limit = min(layer.in_features, layer.out_features)
    if rank > limit:
        raise AdaptkitError(
            f"{owner}: rank={rank} exceeds min(in_features, out_features)={limit} "
            f"at '{path}'; use rank <= {limit} (rank_pattern can set it per layer)"
        )


@register_method
@dataclass(frozen=True)
class LoRA(AdapterSpec):
    """LoRA spec. ``dropout`` acts on the adapter's input; ``use_rslora`` scales by
    alpha/sqrt(r); ``init`` in {"default", "gaussian", "pissa", "olora"}."""

    method = "lora"
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "default"

    def validate(self) -> None:
        self._check_prob(type(self).__name__, "dropout", self.dropout)
        if self.init not in INITS:
            raise AdaptkitError(f"{type(self).__name__}: init={self.init!r} is not one of {INITS}")
        if not isinstance(self.use_rslora, bool):
            raise AdaptkitError(f"{type(self).__name__}: use_rslora must be a bool, got {self.use_rslora!r}")

    def supports(self, kind: str) -> bool:
        return True

    def build(self, layer: AdaptedLayer, path: str) -> LoRAAdapter:
        r = self.rank_for(path)
        check_rank(type(self).__name__, r, layer, path)
        if self.init in ("pissa", "olora") and layer.kind == "embedding":
            raise AdaptkitError(
                f"{type(self).__name__}: init={self.init!r} is not defined for "
                f"Embedding '{path}'; exclude it or use init='default'"
            )
        s = lora_scale(self.alpha_for(path), r, self.use_rslora)
        if layer.kind == "param":  # target_parameters: one adapter per expert (methods/lora_param.py)
            from .lora_param import ParamLoRAAdapter, check_param_spec

            check_param_spec(self, path)
            return ParamLoRAAdapter(layer, r, s, self.init)
        return LoRAAdapter(layer, r, s, self.dropout, self.init)


class LoRAAdapter(Adapter):
    """The LoRA update on one layer; see the module docstring for the math and shapes."""

    def __init__(self, layer: AdaptedLayer, rank: int, scale: float, dropout: float, init: str):
        super().__init__()
        kw = layer.param_kw  # device, dtype (an NF4 base: its compute dtype)
        self.rank, self.scale, self.p, self.init = rank, float(scale), float(dropout), init
        self.lora_A = nn.Parameter(torch.empty(rank, layer.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(layer.out_features, rank, **kw))
        self.reset(layer)
        # an instance attribute from the start: torch.compile guards on where it lives, so an
        # eager call setting it later would force a recompile
        self.__dict__["_fused"] = None
        # grouped conv cannot factor into an A-conv and a 1x1 B-conv
        self.dense_conv = layer.kind == "conv" and layer.groups != 1

    @torch.no_grad()
    def reset(self, layer: AdaptedLayer) -> None:
        A, B, r = self.lora_A, self.lora_B, self.rank
        if self.init in ("pissa", "olora"):
            w = layer.to_2d(layer.weight.detach().float())  # (out, in_flat)
            if self.init == "pissa":
                U, S, Vh = torch.linalg.svd(w, full_matrices=False)
                sr = (S[:r] / self.scale).sqrt()
                A.copy_(sr[:, None] * Vh[:r])
                B.copy_(U[:, :r] * sr[None, :])
            else:
                Q, R = torch.linalg.qr(w)
                A.copy_(R[:r])
                B.copy_(Q[:, :r])
        elif layer.kind == "embedding" and self.init == "default":
            nn.init.zeros_(A)
            nn.init.normal_(B)
        else:
            if self.init == "gaussian":
                nn.init.normal_(A, std=1 / r)
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)

    def attach(self, layer: AdaptedLayer) -> None:
        if self.init in ("pissa", "olora"):
            with torch.no_grad():  # W <- W - s B A: the residual keeps the output unchanged
                layer.weight.copy_(layer.weight.float() - self.delta_weight(layer))

    def delta_weight(self, layer: AdaptedLayer) -> torch.Tensor:
        d = self.scale * (self.lora_B.float() @ self.lora_A.float())  # (out, in_flat)
        return layer.from_2d(d)

    # first in the active set of a Linear / NF4 Linear: base and update in one fused node
    # (methods/lora_fused.py); ``_fused`` is that call's output, which ``update`` passes on
    fuses_base = True
    _fused: torch.Tensor | None = None

    def base_forward(self, x: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        p: dict[str, torch.Tensor] = self._parameters  # type: ignore[assignment]  # both set in __init__
        lp = layer._parameters
        A, B, w = p["lora_A"], p["lora_B"], lp.get("weight")
        if layer.kind != "linear" or (self.p and self.training) or x.dtype != A.dtype or B.dtype != A.dtype:
            return layer.base.forward(layer, x)
        if w is None:
            return layer.base.forward(layer, x)
        packed = not w.is_floating_point()  # NF4: fused only where W is dequantised whole
        if (not self._nf4_fusable(x, layer)) if packed else (w.requires_grad or w.dtype != x.dtype):
            return layer.base.forward(layer, x)
        if tracing() or autocast_on(x.device.type):
            return layer.base.forward(layer, x)
        y = lora_linear(x, None if packed else w, lp.get("bias"), A, B, self.scale, layer)
        self.__dict__["_fused"] = y
        return y

    @staticmethod
    def _nf4_fusable(x: torch.Tensor, layer: Any) -> bool:  # an adapted NF4Linear
        from .. import nf4_matmul  # the NF4 kernels load with the NF4 base

        if layer._buffers.get("merged_weight") is not None:
            return False
        if getattr(layer, "compute_dtype", None) != x.dtype or not hasattr(layer, "dequantize"):
            return False
        b = layer._parameters.get("bias")
        if b is not None and b.dtype != x.dtype:
            return False
        # the plain NF4 op keeps W out of memory (row chunks) where that is faster: leave it
        return nf4_matmul._layout(layer.packed(), layer.state(), x.numel() // x.shape[-1]) is None

    def update(self, x: torch.Tensor, y: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        if self._fused is not None:
            fused, self.__dict__["_fused"] = self._fused, None
            if fused is y:  # base_forward computed W x + b + s B A x already
                return y
        # _parameters directly: nn.Module.__getattr__ costs ~0.5 us a lookup, paid on every
        # adapted layer of every call (the per-layer overhead budget is 10 us)
        p: dict[str, torch.Tensor] = self._parameters  # type: ignore[assignment]  # both set in __init__
        A, B, kind = p["lora_A"], p["lora_B"], layer.kind
        if kind == "embedding":
            h = F.embedding(x, A.t(), layer.padding_idx)  # type: ignore[arg-type]  # (..., r)
            return y + (self.scale * (h @ B.t())).to(y.dtype)
        if self.p and self.training:
            x = F.dropout(x, self.p, True)
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        if kind != "conv":
            h = F.linear(x, A)  # (..., r)
            if y.dtype == B.dtype:
                if y.dim() == 2:  # y + s * h @ B^T in one kernel
                    return torch.addmm(y, h, B.t(), alpha=self.scale)
                if y.dim() > 2 and y.dtype != torch.float32:
                    # half precision: one fused kernel also rounds once, not twice
                    out = torch.addmm(
                        y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), B.t(), alpha=self.scale
                    )  # (tokens, out)
                    return out.view(y.shape)
                if y.dim() > 2:  # fp32: skipping the reshapes is cheaper than the fusion
                    return torch.add(y, F.linear(h, B), alpha=self.scale)
            return y + (self.scale * F.linear(h, B)).to(y.dtype)
        return y + self._conv_update(x, layer).to(y.dtype)

    def _conv_update(self, x: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        """s B A x on a conv base (N, out, *spatial): A as an r-channel conv with the base's
        geometry, then B as a 1x1 conv; a grouped conv runs the dense delta instead."""
        A, B, w = self.lora_A, self.lora_B, layer.weight
        if self.dense_conv:
            return layer._conv_forward(x, self.delta_weight(layer).to(A.dtype), None)  # type: ignore[operator]
        h = layer._conv_forward(x, A.view(self.rank, *w.shape[1:]), None)  # type: ignore[operator]  # (N, r, *spatial)
        nd = w.dim() - 2
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        return conv(h, (self.scale * B).view(*B.shape, *[1] * nd))  # B as (out, r, 1..)


# ---- PEFT interop (ak.peft_compat, the command line) ----------------------------------------
class LoRAPeft(PeftForm):
    """PEFT's ``LoraConfig`` (``use_dora`` False) <-> :class:`LoRA`. Tensors of adapted path p
    (PEFT layout <-> adaptkit's, the same data):
        p.lora_A.weight (r, in[, *k]) <-> lora_A (r, in*prod(k));  p.lora_B.weight (out, r[, 1..])
        <-> lora_B (out, r);  Embedding: p.lora_embedding_A (r, V) / _B (d, r) <-> the same;
        DoRA: p.lora_magnitude_vector (out,) [conv (1, out, 1..)] <-> lora_magnitude (out,).
    """

    peft_type, prefix, use_dora = "LORA", "lora_", False
    # options acting only at init time, on other hardware, or per base type (PEFT forces
    # fan_in_fan_out from the layer class): the stored weights mean the same whatever they say
    options = frozenset(
        {
            "lora_alpha",
            "lora_dropout",
            "use_rslora",
            "init_lora_weights",
            "use_dora",
            "bias",
            "runtime_config",
            "megatron_core",
            "fan_in_fan_out",
            "qalora_group_size",
            "eva_config",
            "corda_config",
            "lora_ga_config",
            "ensure_weight_tying",
        }
    )
    # weights come from the file; pissa / olora re-run on load in PEFT as in adaptkit
    # (W <- W - s B0 A0 from the same SVD / QR), so they stay exact
    INITS = {
        True: "default",
        False: "default",
        "gaussian": "gaussian",
        "eva": "default",
        "orthogonal": "default",
        "pissa": "pissa",
        "olora": "olora",
    }
    BIAS = {"none": "none", "all": "all", "lora_only": "adapter_only"}

    def reads(self, cfg: dict) -> bool:
        return bool(cfg.get("use_dora")) == self.use_dora

    def spec_kwargs(self, cfg: dict) -> dict:
        init, bias = cfg.get("init_lora_weights", True), cfg.get("bias", "none")
        if init not in self.INITS:
            raise err(
                f"init_lora_weights={init!r}: the adapter needs a base changed by that init "
                f"(or a random one) that adaptkit cannot rebuild; convert it in PEFT first "
                f"(path_initial_model_for_weight_conversion) or use True/'gaussian'/'pissa'/'olora'"
            )
        if bias not in self.BIAS:
            raise err(f"bias={bias!r} is not one of {sorted(self.BIAS)}")
        return dict(
            rank=cfg.get("r", 8),
            alpha=cfg.get("lora_alpha", 8),
            dropout=cfg.get("lora_dropout", 0.0),
            use_rslora=bool(cfg.get("use_rslora", False)),
            init=self.INITS[init],
            bias=self.BIAS[bias],
        )

    def config(self, spec: LoRA, layers: dict[str, dict]) -> dict:
        if spec.init not in INITS:
            raise err(f"init={spec.init!r} has no PEFT equivalent")
        return dict(
            lora_alpha=self.alpha0(spec),
            lora_dropout=spec.dropout,
            use_rslora=spec.use_rslora,
            use_dora=self.use_dora,
            lora_bias=False,
            bias={v: k for k, v in self.BIAS.items()}[spec.bias],
            init_lora_weights={"default": True}.get(spec.init, spec.init),
            fan_in_fan_out=all(d["kind"] == "conv1d_t" for d in layers.values()),
        )

    def layout(self, kind: str, wshape, key: str, shape) -> tuple[str, tuple]:
        if kind == "param" and len(shape) == 3:  # PEFT's ParamWrapper: A (E*r, in), B (out, r*E)
            e, a, b = shape
            return f"{key}.weight", (e * a, b) if key == "lora_A" else (a, b * e)
        ones = (1,) * (len(wshape) - 2) if kind == "conv" else ()
        if key == "lora_magnitude":
            return "lora_magnitude_vector", (1, *shape, *ones) if ones else tuple(shape)  # (1, out, 1..)
        if kind == "embedding":
            return key.replace("lora_", "lora_embedding_"), tuple(shape)
        if kind == "conv" and key == "lora_A":
            return "lora_A.weight", (shape[0], *wshape[1:])  # (r, in*prod(k)) -> (r, in, *k)
        return f"{key}.weight", (*shape, *ones)  # conv B: (out, r) -> (out, r, 1, ..)

    def to_peft(self, kind: str, wshape, key: str, t):
        if kind == "param" and key == "lora_B" and t.dim() == 3:  # (E, out, r) -> (out, r*E), column k*E + e
            return t.permute(1, 2, 0).reshape(t.shape[1], -1)
        return super().to_peft(kind, wshape, key, t)

    def from_peft(self, kind: str, wshape, key: str, t, shape):
        if kind == "param" and key == "lora_B" and len(shape) == 3:  # (out, r*E) -> (E, out, r)
            e, o, r = shape
            return t.reshape(o, r, e).permute(2, 0, 1).contiguous()
        return super().from_peft(kind, wshape, key, t, shape)

    def check_layer(self, kind: str, shape, path: str, module: nn.Module | None = None) -> None:
        """PEFT's A-conv keeps only stride and padding (ungrouped, undilated, zero-padded);
        its embedding LoRA applies max_norm / embed_scale; its ParamWrapper has no DoRA and
        no transposed expert stacks."""
        m: Any = module  # a Conv / Embedding / parameter layer, by kind
        if kind == "param" and (self.use_dora or getattr(getattr(m, "base", None), "transposed", False)):
            what = "DoRA" if self.use_dora else "an is_transposed expert stack"
            raise err(f"'{path}': PEFT's target_parameters (ParamWrapper) does not support {what}; exclude it")
        if (
            m is not None
            and kind == "conv"
            and (m.padding_mode != "zeros" or m.groups != 1 or any(d != 1 for d in m.dilation))
        ):
            raise err(
                f"'{path}': PEFT's {'DoRA' if self.use_dora else 'LoRA'} on a conv with groups={m.groups}, "
                f"dilation={m.dilation}, padding_mode={m.padding_mode!r} computes another update "
                f"(its conv is ungrouped, undilated, zero-padded); exclude this layer"
            )
        if m is not None and kind == "embedding" and (m.max_norm is not None or hasattr(m, "embed_scale")):
            raise err(
                f"'{path}': PEFT's embedding LoRA applies max_norm / embed_scale, adaptkit's "
                f"does not; exclude this layer"
            )

    def infer_layer(self, tensors: dict, cfg: dict, path: str) -> tuple[str, tuple]:
        t = tensors
        if "lora_embedding_A" in t and "lora_embedding_B" in t:
            return "embedding", (t["lora_embedding_A"].shape[1], t["lora_embedding_B"].shape[0])
        a, b = t.get("lora_A.weight"), t.get("lora_B.weight")
        if a is None or b is None:
            raise AdaptkitError(f"'{path}': lora_A.weight / lora_B.weight missing; it has {sorted(t)}")
        if a.dim() > 2:  # PEFT's grouped-conv B is (out, r / groups, 1..): shape checks refuse it
            return "conv", (b.shape[0], *a.shape[1:])
        if cfg.get("fan_in_fan_out"):  # GPT-2 Conv1D: weight (in, out)
            return "conv1d_t", (a.shape[1], b.shape[0])
        return "linear", (b.shape[0], a.shape[1])


LoRA.peft_form = LoRAPeft()
