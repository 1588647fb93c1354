"""GeoLoRA: rank-adaptive low-rank training by geometric integration (Schotthöfer, Zangrando,
Ceruti, Tudisco, Kusch; ICLR 2025, arXiv 2410.18720, Alg. 1).

    y = W0 x + b + s * U S V^T drop(x),      s = alpha / rank_init (constant, 1 by default)

on the (out, in) view of the weight, with U (out, r) and V (in, r) orthonormal and S (r, r)
(diagonal right after a truncation). U, S, V are preallocated to
``r_max = min(in, out, max_rank)`` columns; only the first ``rank`` (the active rank, which
changes during training) take part:

    U: (out, r_max)    S: (r_max, r_max)    V: (in, r_max)
    delta_weight = s * U[:, :r] @ S[:r, :r] @ V[:, :r]^T, in the base's native shape.

One backward pass gives the three gradients the integrator needs, without inverting S (a
custom autograd function, :class:`GeoLoRAFunction`). With ``a = V^T x``, the upstream
gradient ``δ = ∂L/∂y_Δ`` and ``G = ∂L/∂(U S V^T) = s Σ δ x^T``:

    U.grad[:, :r] = G_K = G V   = s Σ δ a^T          (the K-step gradient, K = U S)
    V.grad[:, :r] = G_L = G^T U = s Σ x (U^T δ)^T    (the L-step gradient, L = V S^T)
    S.grad[:r,:r] = G_S = U^T G V = U^T G_K          (the true ∂L/∂S)

so ``U.grad`` / ``V.grad`` are *not* ∂L/∂U, ∂L/∂V: they are what :class:`GeoLoRAOptimizer`
(``adaptkit/methods/geolora_optim.py``) consumes to augment the bases, update the
coefficients and truncate. Train GeoLoRA with that optimizer, not a plain torch optimizer.

Storage: the state dict (and so the adapter file) holds the *active* slices
``U[:, :r]``, ``S[:r, :r]``, ``V[:, :r]``; the rank is also written in the file's per-layer
state and restored before the tensors load. Loading a slice of rank r pads it back into the
preallocated buffers (zeros beyond r) and sets the active rank to r, so a plain
``load_state_dict`` round-trips the rank too. Factors are kept in fp32 on low-precision
bases: QR / SVD and orthonormality to 1e-4 need it (the update is cast to the base dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import AdaptkitError
from ..layer import AdaptedLayer, Adapter
from ..spec import AdapterSpec, register_method

TRUNCATIONS = ("local_threshold", "fixed_rank", "global_budget")


@register_method
@dataclass(frozen=True)
class GeoLoRA(AdapterSpec):
    """GeoLoRA spec. ``rank`` is the initial rank; ``max_rank`` the preallocated capacity
    (None: 2 * rank, the GLUE reference's 8 -> 16), clipped to min(in, out) per layer;
    ``tau`` the relative truncation tolerance; ``truncation`` in {"local_threshold",
    "fixed_rank", "global_budget"} (``budget`` = total rank over all layers for the last);
    ``min_rank`` the floor truncation never goes below (reference: 2); ``dropout`` on the
    adapter input. ``alpha`` (None: rank) gives the constant scale alpha / rank."""

    method = "geolora"
    max_rank: int | None = None
    tau: float = 0.15
    truncation: str = "local_threshold"
    budget: int | None = None
    min_rank: int = 2
    dropout: float = 0.0

    def validate(self) -> None:
        name = type(self).__name__
        if self.max_rank is not None:
            self._check_rank(name, "max_rank", self.max_rank)
            worst = max([self.rank, *self.rank_pattern.values()])
            if self.max_rank < worst:
                raise AdaptkitError(
                    f"{name}: max_rank={self.max_rank} is below the initial rank "
                    f"{worst}; use max_rank >= {worst} (it is the rank capacity)"
                )
        self._check_rank(name, "min_rank", self.min_rank)
        self._check_prob(name, "dropout", self.dropout)
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0 <= self.tau < 1:
            raise AdaptkitError(
                f"{name}: tau={self.tau!r} must be in [0, 1) (truncation keeps the "
                f"singular values whose tail norm is >= tau * total norm); use e.g. 0.15"
            )
        if self.truncation not in TRUNCATIONS:
            raise AdaptkitError(f"{name}: truncation={self.truncation!r} is not one of {TRUNCATIONS}")
        if self.truncation == "global_budget":
            if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
                raise AdaptkitError(
                    f"{name}: truncation='global_budget' needs budget=<total rank over "
                    f"all adapted layers> as a positive int, got budget={self.budget!r}"
                )
        elif self.budget is not None:
            raise AdaptkitError(
                f"{name}: budget={self.budget!r} applies to truncation='global_budget' "
                f"only (got truncation={self.truncation!r}); drop budget or switch"
            )

    def build(self, layer: AdaptedLayer, path: str) -> GeoLoRAAdapter:
        r = self.rank_for(path)
        limit = min(layer.in_features, layer.out_features)
        if r > limit:
            raise AdaptkitError(
                f"{type(self).__name__}: rank={r} exceeds min(in_features, "
                f"out_features)={limit} at '{path}'; use rank <= {limit} (rank_pattern "
                f"can set it per layer)"
            )
        r_max = min(limit, self.max_rank if self.max_rank is not None else 2 * r)
        return GeoLoRAAdapter(
            layer,
            r,
            r_max,
            self.alpha_for(path) / r,
            self.tau,
            self.truncation,
            self.budget,
            self.min_rank,
            self.dropout,
        )


class GeoLoRAFunction(torch.autograd.Function):
    """y_Δ = s * ((x V_r) S_r^T) U_r^T with the GeoLoRA gradients of the module docstring.

    x: (..., in); U: (out, r_max); S: (r_max, r_max); V: (in, r_max); only the first r
    columns are used and the returned factor gradients are zero beyond r."""

    @staticmethod
    def forward(ctx, x, U, S, V, r: int, s: float):
        a = x @ V[:, :r]  # (..., in) @ (in, r) -> (..., r)
        y = (a @ S[:r, :r].t()) @ U[:, :r].t()  # (..., r) -> (..., out)
        ctx.save_for_backward(x, a, U, S, V)
        ctx.r, ctx.s = r, s
        return y * s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, a, U, S, V = ctx.saved_tensors
        r, s = ctx.r, ctx.s
        Ur, Sr, Vr = U[:, :r], S[:r, :r], V[:, :r]
        g2 = g.reshape(-1, g.shape[-1])  # (..., out) -> (tokens, out)
        gu = g2 @ Ur  # U^T δ per token: (tokens, r)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = (s * (gu @ Sr) @ Vr.t()).view(x.shape)  # (tokens, in) -> (..., in)
        gk = s * (g2.t() @ a.reshape(-1, r))  # G_K = G V: (out, tokens) @ (tokens, r)
        gl = s * (x.reshape(-1, x.shape[-1]).t() @ gu)  # G_L = G^T U: (in, tokens) @ (tokens, r)
        gs = Ur.t() @ gk  # G_S = U^T G V: (r, r)
        dU, dS, dV = torch.zeros_like(U), torch.zeros_like(S), torch.zeros_like(V)
        dU[:, :r], dS[:r, :r], dV[:, :r] = gk, gs, gl
        return dx, dU, dS, dV, None, None


def threshold_rank(sigma: torch.Tensor, tau: float) -> int:
    """The local truncation rule (GeoLoRA Alg. 1): the first j with ``||σ[j:]||_2 < tau *
    ||σ||_2`` (σ descending), or len(σ) if there is none. An all-zero σ gives 0 (an exactly
    zero tail is always dropped; with tau * ||σ|| = 0 the strict rule would keep it). The
    caller clamps to [min_rank, current rank]."""
    sigma = sigma.double()
    tails = sigma.flip(0).square().cumsum(0).flip(0).sqrt()  # tails[j] = ||σ[j:]||, (n,)
    theta = tau * tails[0] if len(sigma) else 0.0
    drop = (tails < theta) | (tails == 0)
    return int(drop.nonzero()[0, 0]) if drop.any() else len(sigma)


def budget_ranks(sigmas: list[torch.Tensor], budget: int) -> list[int]:
    """Global budget allocation: the ``budget`` largest singular values over all layers, each
    counted for its own layer (reference ``compute_lr_budget``). Returns per-layer counts;
    the caller clamps them to [min_rank, current rank]. Ties break by layer order."""
    flat = [(float(v), -i) for i, s in enumerate(sigmas) for v in s.tolist()]
    counts = [0] * len(sigmas)
    for _, neg_i in sorted(flat, reverse=True)[:budget]:
        counts[-neg_i] += 1
    return counts


class GeoLoRAAdapter(Adapter):
    """The GeoLoRA factors on one layer and the per-layer integrator steps (augment,
    truncate) that :class:`GeoLoRAOptimizer` drives; see the module docstring."""

    def __init__(
        self,
        layer: AdaptedLayer,
        rank: int,
        r_max: int,
        scale: float,
        tau: float,
        truncation: str,
        budget: int | None,
        min_rank: int,
        dropout: float,
    ):
        super().__init__()
        w = layer.weight
        # QR / SVD / orthonormality need >= fp32; a fp64 base keeps fp64
        dt = torch.promote_types(w.dtype, torch.float32)
        kw: dict[str, Any] = dict(device=w.device, dtype=dt)
        self.rank, self.r_max, self.init_rank = int(rank), int(r_max), int(rank)
        self.r_min = min(int(min_rank), self.r_max)
        self.scale, self.tau, self.truncation, self.budget = float(scale), float(tau), truncation, budget
        self.p = float(dropout)
        # U, V = Q of a Gaussian (reduced QR); S = 0 so a fresh adapter changes nothing
        self.U = nn.Parameter(torch.linalg.qr(torch.randn(layer.out_features, self.r_max, **kw))[0])
        self.S = nn.Parameter(torch.zeros(self.r_max, self.r_max, **kw))
        self.V = nn.Parameter(torch.linalg.qr(torch.randn(layer.in_features, self.r_max, **kw))[0])
        self.register_state_dict_post_hook(_slice_state)
        self.register_load_state_dict_pre_hook(_pad_state)

    # ---- forward / dense reference -----------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The active (U_r, S_r, V_r): (out, r), (r, r), (in, r)."""
        r = self.rank
        return self.U[:, :r], self.S[:r, :r], self.V[:, :r]

    def delta_weight(self, layer: AdaptedLayer) -> torch.Tensor:
        U, S, V = (t.float() for t in self.factors())
        return layer.from_2d(self.scale * (U @ S @ V.t()))  # (out, in) -> native shape

    def update(self, x: torch.Tensor, y: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        if self.p and self.training:
            x = F.dropout(x, self.p, True)
        d = GeoLoRAFunction.apply(x.to(self.U.dtype), self.U, self.S, self.V, self.rank, self.scale)
        return y + d.to(y.dtype)

    def num_params(self) -> int:
        """Trainable parameters at the active rank, as the reference counts them:
        r * (in + out) + r^2 (the preallocated buffers hold r_max columns)."""
        r = self.rank
        return r * (self.U.shape[0] + self.V.shape[0]) + r * r

    # ---- per-layer state -----------------------------------------------------------------
    def layer_state(self) -> dict[str, Any]:
        return {"rank": self.rank, "max_rank": self.r_max}

    def load_layer_state(self, state: dict[str, Any], path: str) -> None:
        r = state.get("rank", self.rank)
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= self.r_max:
            raise AdaptkitError(
                f"GeoLoRA: the file's rank={r!r} at '{path}' does not fit this "
                f"layer's max_rank={self.r_max}; expected 1 <= rank <= {self.r_max} "
                f"(was the file written with a larger max_rank?)"
            )
        self.rank = r

    # ---- the integrator steps (called by GeoLoRAOptimizer) ------------------------------
    def grads(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(G_K, G_L, G_S) at the active rank in fp32, or None when no backward reached it."""
        U, S, V, r = self.U, self.S, self.V, self.rank
        if U.grad is None or S.grad is None or V.grad is None:
            return None
        return U.grad[:, :r].float(), V.grad[:, :r].float(), S.grad[:r, :r].float()

    @torch.no_grad()
    def augment(self, lr: float) -> None:
        """Basis augmentation and coefficient update (Alg. 1, steps 2-3), one SGD step of size
        ``lr``. With r_a = min(2r, r_max) - r, Ū = columns r..r+r_a-1 of Q(qr([U | G_K])),
        V̄ likewise from [V | G_L], and

            Ŝ = [[S - lr G_S,  -lr G_L^T V̄],
                 [-lr Ū^T G_K,  0         ]]      ((r + r_a) x (r + r_a)).

        U, V gain the new columns, S becomes Ŝ and the active rank r + r_a."""
        g = self.grads()
        if g is None:
            return
        gk, gl, gs = g
        r = self.rank
        ra = min(2 * r, self.r_max) - r
        U, S, V = self.U.float(), self.S.float(), self.V.float()
        s_hat = torch.zeros(r + ra, r + ra, dtype=U.dtype, device=U.device)
        s_hat[:r, :r] = S[:r, :r] - lr * gs
        if ra:
            ub = torch.linalg.qr(torch.cat([U[:, :r], gk], 1))[0][:, r : r + ra]  # (out, r_a)
            vb = torch.linalg.qr(torch.cat([V[:, :r], gl], 1))[0][:, r : r + ra]  # (in, r_a)
            s_hat[:r, r:] = -lr * (gl.t() @ vb)
            s_hat[r:, :r] = -lr * (ub.t() @ gk)
            self.U[:, r : r + ra] = ub
            self.V[:, r : r + ra] = vb
        self.S[: r + ra, : r + ra] = s_hat
        self.rank = r + ra

    @torch.no_grad()
    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """P, σ (descending), Q with S_r = P diag(σ) Q^T, in fp32."""
        P, sig, Qh = torch.linalg.svd(self.S[: self.rank, : self.rank].float())
        return P, sig, Qh.t()

    def clamp_rank(self, r_new: int) -> int:
        """Clamp a proposed rank to [min_rank, current rank] (the current rank when it is
        below min_rank already)."""
        return max(min(int(r_new), self.rank), min(self.r_min, self.rank))

    @torch.no_grad()
    def truncate(self, r_new: int, P: torch.Tensor, sig: torch.Tensor, Q: torch.Tensor) -> None:
        """Alg. 1 step 5: U <- Û P[:, :r_new], V <- V̂ Q[:, :r_new], S <- diag(σ[:r_new])."""
        r = self.rank
        u = self.U[:, :r].float() @ P[:, :r_new]  # (out, r) @ (r, r_new)
        v = self.V[:, :r].float() @ Q[:, :r_new]  # (in, r) @ (r, r_new)
        self.U[:, :r_new] = u
        self.V[:, :r_new] = v
        self.S.zero_()
        self.S[:r_new, :r_new] = torch.diag(sig[:r_new])
        self.rank = int(r_new)


# ---- state dict at the active rank ----------------------------------------------------------
def _slice_state(module: GeoLoRAAdapter, sd: dict, prefix: str, _meta) -> None:
    """State-dict post-hook: keep only the active slices (the file stores rank r tensors)."""
    r = module.rank
    for k, sl in (
        ("U", (slice(None), slice(0, r))),
        ("S", (slice(0, r), slice(0, r))),
        ("V", (slice(None), slice(0, r))),
    ):
        if prefix + k in sd:
            sd[prefix + k] = sd[prefix + k][sl]


def _pad_state(module: GeoLoRAAdapter, sd: dict, prefix: str, *_args) -> None:
    """Load-state-dict pre-hook: a rank-r slice set (S (r, r), U (out, r), V (in, r), r <=
    r_max) is padded into the preallocated buffers and sets the active rank to r. Anything
    else is left as is for torch's own shape check to report."""
    keys = [prefix + k for k in ("U", "S", "V")]
    if not all(k in sd for k in keys):
        return
    U, S, V = (sd[k] for k in keys)
    r = S.shape[0] if S.dim() == 2 else -1
    want = ((module.U.shape[0], r), (r, r), (module.V.shape[0], r))
    if (
        not 1 <= r <= module.r_max
        or tuple(U.shape) != want[0]
        or tuple(S.shape) != want[1]
        or tuple(V.shape) != want[2]
    ):
        return
    for k, t, p in zip(keys, (U, S, V), (module.U, module.S, module.V)):
        full = torch.zeros(p.shape, dtype=t.dtype, device=t.device)
        full[tuple(slice(0, n) for n in t.shape)] = t  # (.., r) -> (.., r_max), zeros beyond r
        sd[k] = full
    module.rank = r
