"""LoKr: Low-rank Kronecker-product adaptation (LyCORIS; Yeh et al., "Navigating
Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation", ICLR 2024,
arXiv 2309.14859), numerically compatible with PEFT 0.21.2 ``LoKrConfig`` and LyCORIS 4.1.3.

    dW = s * kron(w1, w2),    out = a * b,  in = c * d  (in = in_channels / groups for conv)
    w1: (a, c)  full, or w1_a (a, r) @ w1_b (r, c)     when decompose_both and r < max(a, c) / 2
    w2: (b, d, *k) full when r >= max(b, d) / 2, else
        w2_a (b, r) @ w2_b (r, d * prod(k))           (Linear, and convs without Tucker)
        einsum(t2 (r, r, *k), w2_a (r, b), w2_b (r, d)) (``use_effective_conv2d``, kernel != 1)
    (a, b) = factorization(out, f), (c, d) = factorization(in, f)   (see :func:`factorization`)
    s = alpha / r ("peft"); "lycoris": 1 when both w1 and w2 are full, else alpha / r.

Linear forward never builds the (out, in) kron: with X = x.view(..., c, d) (row-major, so
x[i] = X[i // d, i % d]), ``x dW^T = s * vec(w1 X w2^T)``, i.e. one small matmul per
factor in the cheaper order (w2 low-rank: X w2_b^T first, then w1 and w2_a^T); both forms,
this one and the dense kron, come from ``adaptkit.kron``. Convs use the dense delta with
the base geometry. Training only: ``rank_dropout`` masks output rows of dW (divided by the
mask mean if ``rank_dropout_scale``), which is the same as masking output features of the
update; ``module_dropout`` skips the whole adapter with probability p (no rescale).
Both draw from torch's global CPU generator as PEFT does. Under ``torch.compile`` module
dropout multiplies the update by its draw instead of branching on it (no graph break); a
skipped module then still draws its rank-dropout mask, so with both dropouts the random
stream differs from eager's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import AdaptkitError
from ..kron import kron_apply, kron_sum
from ..layer import AdaptedLayer, Adapter, tracing
from ..peft_config import PeftForm, err
from ..spec import AdapterSpec, register_method

INITS = ("default", "lycoris", "random")
SCALE_MODES = ("peft", "lycoris")


def factorization(dim: int, factor: int = -1, sort: bool = False) -> tuple[int, int]:
    """Split ``dim`` into ``(m, n)`` with ``m * n == dim``.

    ``factor > 0`` dividing ``dim``: ``(factor, dim // factor)`` (PEFT keeps this order,
    LyCORIS sorts it: ``sort=True``). Otherwise the largest divisor ``m <= min(factor,
    sqrt(dim))`` (``factor == -1``: no cap), as ``(m, dim // m)``. Examples: 127 -> (1, 127),
    128 -> (8, 16), 360 -> (18, 20), 11008 -> (86, 128), (128, 4) -> (4, 32), (250, 4) -> (2, 125).
    """
    if factor > 0 and dim % factor == 0:
        m, n = factor, dim // factor
        return (min(m, n), max(m, n)) if sort else (m, n)
    cap = dim if factor < 0 else factor
    m, n = 1, dim
    while m < n:  # walk the divisors upwards while the pair gets more balanced
        nm = m + 1
        while dim % nm:
            nm += 1
        nn_ = dim // nm
        if nm + nn_ > m + n or nm > cap:
            break
        m, n = nm, nn_
    return (m, n) if m <= n else (n, m)


@register_method
@dataclass(frozen=True)
class LoKr(AdapterSpec):
    """LoKr spec; see the module docstring for shapes and scaling.

    rank_dropout, module_dropout: probabilities in [0, 1), training only.
    rank_dropout_scale: divide the rank-dropout mask by its mean.
    decompose_both:     also factor w1 as w1_a @ w1_b when r < max(a, c) / 2.
    decompose_factor:   -1 (balanced split near sqrt) or a positive factor.
    use_effective_conv2d: Tucker form of w2 for convs with a kernel other than 1.
    init: "default" (w1 = 0, PEFT), "lycoris" (w2 / w2_b = 0), "random" (all kaiming).
    scale_mode: "peft" (alpha / r) or "lycoris" (also 1 when both factors are full, and
                a positive factor split is sorted as LyCORIS does; its files then fit).
    """

    method = "lokr"
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    rank_dropout_scale: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    use_effective_conv2d: bool = False
    init: str = "default"
    scale_mode: str = "peft"

    def validate(self) -> None:
        name = type(self).__name__
        self._check_prob(name, "rank_dropout", self.rank_dropout)
        self._check_prob(name, "module_dropout", self.module_dropout)
        for f in ("rank_dropout_scale", "decompose_both", "use_effective_conv2d"):
            if not isinstance(getattr(self, f), bool):
                raise AdaptkitError(f"{name}: {f} must be a bool, got {getattr(self, f)!r}")
        k = self.decompose_factor
        if isinstance(k, bool) or not isinstance(k, int) or not (k == -1 or k > 0):
            raise AdaptkitError(
                f"{name}: decompose_factor={f!r} must be -1 (split near sqrt) or a "
                f"positive int; use e.g. decompose_factor=8"
            )
        if self.init not in INITS:
            raise AdaptkitError(f"{name}: init={self.init!r} is not one of {INITS}")
        if self.scale_mode not in SCALE_MODES:
            raise AdaptkitError(f"{name}: scale_mode={self.scale_mode!r} is not one of {SCALE_MODES}")

    def supports(self, kind: str) -> bool:
        return kind in ("linear", "conv1d_t", "conv")

    def build(self, layer: AdaptedLayer, path: str) -> LoKrAdapter:
        r, alpha = self.rank_for(path), self.alpha_for(path)
        w = layer.weight
        if layer.kind == "conv":
            out, inp, k = w.shape[0], w.shape[1], tuple(w.shape[2:])  # (out, in/groups, *k)
        else:
            out, inp, k = layer.out_features, layer.in_features, ()
        sort = self.scale_mode == "lycoris"
        a, b = factorization(out, self.decompose_factor, sort)
        c, d = factorization(inp, self.decompose_factor, sort)
        full1 = not (self.decompose_both and r < max(a, c) / 2)
        full2 = not r < max(b, d) / 2
        tucker = self.use_effective_conv2d and not full2 and any(i != 1 for i in k)
        s = 1.0 if self.scale_mode == "lycoris" and full1 and full2 else alpha / r
        return LoKrAdapter(layer, r, s, (a, b, c, d, k), full1, full2, tucker, self)


class LoKrAdapter(Adapter):
    """The LoKr update on one layer; parameter names and shapes follow PEFT / LyCORIS
    (``lokr_w1`` | ``lokr_w1_a``, ``lokr_w1_b``; ``lokr_w2`` | ``lokr_w2_a``, ``lokr_w2_b``
    [, ``lokr_t2``]); a Conv1d Tucker core is (r, r, k)."""

    def __init__(
        self,
        layer: AdaptedLayer,
        rank: int,
        scale: float,
        dims: tuple,
        full1: bool,
        full2: bool,
        tucker: bool,
        spec: LoKr,
    ):
        super().__init__()
        a, b, c, d, k = dims
        self.rank, self.scale, self.dims, self.tucker = rank, float(scale), dims, tucker
        self.full1, self.full2 = full1, full2
        self.rank_dropout, self.module_dropout = spec.rank_dropout, spec.module_dropout
        self.rank_dropout_scale = spec.rank_dropout_scale
        w = layer.weight
        P = lambda *shape: nn.Parameter(torch.empty(*shape, device=w.device, dtype=w.dtype))  # noqa: E731
        if full1:
            self.lokr_w1 = P(a, c)
        else:
            self.lokr_w1_a, self.lokr_w1_b = P(a, rank), P(rank, c)
        if full2:
            self.lokr_w2 = P(b, d, *k)
        elif tucker:
            self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b = P(rank, rank, *k), P(rank, b), P(rank, d)
        else:
            self.lokr_w2_a, self.lokr_w2_b = P(b, rank), P(rank, d * math.prod(k))
        self.reset(spec.init)

    @torch.no_grad()
    def reset(self, init: str) -> None:
        """PEFT inits: "default" zeroes w1 (or w1_a), "lycoris" zeroes w2 (or w2_b), the rest
        (and everything for "random") is kaiming-uniform(a=sqrt(5))."""
        zero = {
            "default": "lokr_w1" if self.full1 else "lokr_w1_a",
            "lycoris": "lokr_w2" if self.full2 else "lokr_w2_b",
            "random": None,
        }[init]
        for name, p in self.named_parameters():
            if name == zero:
                nn.init.zeros_(p)
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    # ---- factors ----------------------------------------------------------------------
    def _w1(self) -> torch.Tensor:  # (a, c)
        return self.lokr_w1 if self.full1 else self.lokr_w1_a @ self.lokr_w1_b

    def _w2(self) -> torch.Tensor:  # (b, d, *k)
        if self.full2:
            return self.lokr_w2
        b, d, k = self.dims[1], self.dims[3], self.dims[4]
        if self.tucker:  # core (r, r, *k) x mode-1 w2_a (r, b) x mode-2 w2_b (r, d)
            return torch.einsum("ij...,ip,jq->pq...", self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        return (self.lokr_w2_a @ self.lokr_w2_b).view(b, d, *k)  # (b, d*prod(k)) -> (b, d, *k)

    def delta_weight(self, layer: AdaptedLayer) -> torch.Tensor:
        # w1 (a, c) x w2 (b, d, *k) -> (a*b, c*d, *k): the kernel axes stay on w2's side
        dw = self.scale * kron_sum(self._w1().float()[None], self._w2().float()[None])
        return dw if layer.kind == "conv" else layer.from_2d(dw)

    # ---- forward ----------------------------------------------------------------------
    def _kron_apply(self, x: torch.Tensor) -> torch.Tensor:
        """s * x kron(w1, w2)^T without the kron (adaptkit.kron.kron_apply): (..., c*d) ->
        (..., a*b). A low-rank w2 = w2_a w2_b applies as kron(I_c, w2_b), then
        kron(s w1, w2_a); the scale rides on w1, the smallest factor."""
        _, _, c, d, _ = self.dims
        w1 = self._w1() * self.scale  # (a, c)
        if self.full2:
            return kron_apply(x, (c, d), w1, self.lokr_w2)
        u = kron_apply(x, (c, d), right=self.lokr_w2_b)  # (..., c*d) -> (..., c*r)
        return kron_apply(u, (c, self.rank), w1, self.lokr_w2_a)  # (..., c*r) -> (..., a*b)

    def update(self, x: torch.Tensor, y: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        mask = keep = None
        if self.training:
            if self.module_dropout:
                keep = torch.rand(1) > self.module_dropout  # (1,) on the CPU generator, as PEFT
                if not tracing() and not bool(keep):
                    return y  # module dropout: skip the whole adapter for this forward
                # torch.compile: no branch on the draw; the update is multiplied by it below
                # (same result; the rank-dropout draw then happens even for a skipped forward)
            if self.rank_dropout:
                mask = (
                    torch.rand(y.shape[-1] if layer.kind != "conv" else layer.weight.shape[0]) > self.rank_dropout
                ).float()  # (out,) rows of dW kept
                if self.rank_dropout_scale:
                    mask = mask / mask.mean().clamp_min(1e-12)  # all dropped: zeros, not NaN
        dt = self.lokr_w2_b.dtype if not self.full2 else self.lokr_w2.dtype
        x = x.to(dt)
        if layer.kind == "conv":
            u = layer._conv_forward(
                x,  # type: ignore[operator]  # a ConvNd base
                self.delta_weight(layer).to(dt),
                None,
            )  # (N, out, *spatial)
            if mask is not None:
                mask = mask.view(-1, *[1] * (layer.weight.dim() - 2))  # (out, 1, ..)
        else:
            u = self._kron_apply(x)
        if mask is not None:
            u = u * mask.to(device=u.device, dtype=u.dtype)
        if keep is not None and tracing():
            u = u * keep.to(device=u.device, dtype=u.dtype)
        return y + u.to(y.dtype)


# ---- PEFT interop (ak.peft_compat, the command line) ----------------------------------------
class LoKrPeft(PeftForm):
    """PEFT's ``LoKrConfig`` <-> :class:`LoKr` with ``scale_mode="peft"`` and no bias. The
    tensors have the same names and shapes in both (p.lokr_w1 | lokr_w1_a, _b; p.lokr_w2 |
    lokr_w2_a, _b [, lokr_t2]); PEFT stores no alpha tensor."""

    peft_type, prefix = "LOKR", "lokr_"
    OPTS = (
        "rank_dropout",
        "module_dropout",
        "use_effective_conv2d",
        "decompose_both",
        "decompose_factor",
        "rank_dropout_scale",
    )
    options = frozenset({"alpha", "init_weights", *OPTS})

    def spec_kwargs(self, cfg: dict) -> dict:
        init = cfg.get("init_weights", True)
        if init not in (True, False, "lycoris"):
            raise err(f"init_weights={init!r} is not one of True, False, 'lycoris'")
        return dict(
            rank=cfg.get("r", 8),
            alpha=cfg.get("alpha", 8),
            scale_mode="peft",
            init={True: "default", False: "random"}.get(init, init),
            **{k: cfg[k] for k in self.OPTS if k in cfg},
        )

    def config(self, spec: LoKr, layers: dict[str, dict]) -> dict:
        if spec.bias != "none" or spec.scale_mode != "peft":
            raise err(
                f"LoKr bias={spec.bias!r}, scale_mode={spec.scale_mode!r}: PEFT's LoKr has "
                f"no bias option and always scales by alpha/r (scale_mode='peft')"
            )
        return dict(
            alpha=self.alpha0(spec),
            init_weights={"default": True, "random": False}.get(spec.init, spec.init),
            **{k: getattr(spec, k) for k in self.OPTS},
        )

    def check_layer(self, kind: str, shape, path: str, module: nn.Module | None = None) -> None:
        """PEFT's LoKr adapts Linear and Conv2d only (its Conv1d kron puts no kernel axis on
        w1), and its conv is zero-padded."""
        if not (kind == "linear" or kind == "conv" and len(shape) == 4):
            raise err(
                f"'{path}': PEFT's LoKr on a {kind} base with weight {list(shape)} differs from "
                f"adaptkit's (PEFT: Linear and Conv2d only; its Conv1d kron differs); exclude it"
            )
        if module is not None and kind == "conv" and module.padding_mode != "zeros":
            raise err(
                f"'{path}': PEFT's LoKr on a conv with padding_mode={module.padding_mode!r} "
                f"computes another update (its conv is zero-padded); exclude this layer"
            )

    def infer_layer(self, tensors: dict, cfg: dict, path: str) -> tuple[str, tuple]:
        """out = a*b, in = c*d (* kernel); a low-rank w2_a @ w2_b hides a conv kernel, which
        then reads as a Linear (the command line's ``--base`` tells)."""
        t = tensors
        try:
            w1 = t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
            if "lokr_w2" in t:
                b, d, *k = t["lokr_w2"].shape
            elif "lokr_t2" in t:
                b, d, k = t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1], list(t["lokr_t2"].shape[2:])
            else:
                b, d, k = t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1], []
        except KeyError as e:
            raise AdaptkitError(f"'{path}': LoKr tensor lokr_{e.args[0][5:]} missing; it has {sorted(t)}") from None
        return ("conv" if k else "linear"), (w1[0] * b, w1[1] * d, *k)


LoKr.peft_form = LoKrPeft()
