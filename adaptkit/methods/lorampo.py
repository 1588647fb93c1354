r"""LoRA-MPO: a low-rank update made of the top Kronecker (2-core MPO) components of W.

References: MPO compression of weights (Gao et al., Phys. Rev. Research 2, 023300, 2020);
MPOP (Liu et al., "Enabling Lightweight Fine-tuning for Pre-trained Language Model Compression
based on Matrix Product Operators", ACL 2021); MPOE (Gao et al., COLING 2022); the PEFT
LoRA-MPO PR #2868 (closed; its ``lorampo_init`` is not ported);
Kronecker SVD (Van Loan & Pitsianis, 1993); PiSSA residual init (Meng et al., 2024,
arXiv 2404.02948).

On the (out, in) view of the weight, with ``out = o1*o2`` and ``in = i1*i2``::

    y = W_res x + b + s * ΔW drop(x),        s = alpha / r   (rsLoRA: alpha / sqrt(r))
    ΔW[a*o2 + b, c*i2 + d] = sum_k A[a, c, k] * B[k, b, d]   i.e.  ΔW = sum_k kron(A_k, B_k)

Parameters are the two cores of a 2-core MPO whose bond is truncated to r (outer bonds of
size 1 squeezed): ``mpo_A: (o1, i1, r)`` (core 0) and ``mpo_B: (r, o2, i2)`` (core 1); their
count is ``r * (o1*i1 + o2*i2)``, the rank limit ``r <= min(o1*i1, o2*i2)``.

Init (mode "kron"): the top-r terms of the Kronecker SVD of W (``adaptkit.mpo.kron_decompose``:
``W ~ sum_k σ_k kron(a_k, b_k)``, the Eckart-Young optimum over sums of r Kronecker products,
equal to the 2-core MPO truncated at bond r), split evenly as PiSSA does,
``A[..., k] = sqrt(σ_k/s) a_k``, ``B[k] = sqrt(σ_k/s) b_k``; the residual
``W_res = W - s ΔW_init`` is computed directly from W when the adapter is attached (not from
the MPO tails), so a fresh adapter leaves the output unchanged to float rounding.
The exact Kronecker SVD costs a full SVD of the (o1*i1, o2*i2) rearrangement (about a minute
for a 4096 x 4096 layer on one CPU thread); ``init_niter=k`` takes the top-r terms from a
randomized SVD instead (Halko, Martinsson & Tropp 2011, Alg. 4.4: r + 10 Gaussian probes from a
fixed seed, k power iterations; PEFT's ``pissa_niter_k`` does the same for PiSSA). It is
approximate, but the residual still makes the initial output exact, and it is deterministic.

Mode "lora": the degenerate shapes ``out_shape = (out, 1)``, ``in_shape = (1, in)`` turn the
Kronecker SVD into the plain SVD of W and ``kron(A_k, B_k)`` into the outer product ``u_k v_k^T``,
so LoRA-MPO becomes PiSSA: ``mpo_A[:, 0, :]`` is LoRA's ``lora_B`` (out, r) and ``mpo_B[:, 0, :]``
is ``lora_A`` (r, in). The init is taken from ``adaptkit.methods.lora`` (PiSSA) so the factors
and the residual equal LoRA's bit for bit (the Kronecker SVD gives the same up to the sign of
each component).

Forward: the cheaper of two exact routes for the call's token count N.
Factored (never materialises ΔW): ``ΔW = sum_k kron(A_k, B_k)`` is two Kronecker factors with
the rank folded into one side, applied one at a time to ``x.view(N, i1, i2)`` by
``adaptkit.kron.kron_apply``, in the cheaper order: ``B`` first (``kron(I_i1, B (r*o2, i2))``,
then ``kron(A (o1, i1*r), I_o2)``) costs ``F = r*(in*o2 + out*i1)`` multiply-adds per token,
``A`` first ``r*(in*o1 + out*i2)`` (the degenerate "lora" shapes come out as two plain
matmuls, ``r*(in + out)``, as LoRA); the largest temporary is ``(N, i1, r, o2)`` or
``(N, o1, r, i2)``. Dense: build ``ΔW`` (out, in) from the
cores (``r*out*in``) and run one ``F.linear`` (``D = out*in`` per token). For a square d x d layer
with balanced factors ``F = 2 r d^1.5`` against ``D = d^2``. The choice uses a cost model fitted
on CPU (fwd + bwd, 7 layer shapes, ranks 4-16, 1-256 tokens, the folded dense route below) when
the factored route was two einsums: a factored multiply-add cost about twice a GEMM's (the
temporary was permuted and re-read), the dense
route ~0.8 D per token over the base, building ΔW with its backward ~3 r D; so the dense route
runs from ``dense_from = 3 r D / (2 F - 0.8 D)`` tokens when ``2 F > 0.8 D`` (measured crossover
in brackets: 31 tokens for 768 x 768 at rank 16 (~25), 56 for 3072 x 768 (~55), 240 for
4096 x 4096 (~240); never at rank 4 (768 x 768: even at 256 tokens). The matmul form permutes
only the small cores and is as fast or faster (768 x 768, rank 16, 16 tokens: 5.3 -> 3.9 ms),
so the crossover is now on the early side. The fit is CPU's; on other
devices it is a reasonable default, not a measurement.
On the dense route, when this adapter is first in the active set, W is fp32 and no dropout
applies, ΔW is folded into the base matmul, ``y = x (W + s ΔW)^T + b`` (core hook
``Adapter.fuses_base``): one GEMM forward and one for the input gradient instead of two each.
``delta_weight`` builds the dense fp32 ``s ΔW``; merge / unmerge add / subtract it (the Adapter
defaults). Kinds: ``nn.Linear`` and GPT-2's transposed ``Conv1D``.

Save / load: the file holds only the trained cores; ``ak.load`` builds the adapter on the base
model (recomputing the init deterministically from W), attaches it (``W <- W - s ΔW_init``) and
then loads the trained cores, so the base must carry the same pre-adaptation weights (a reload
on the same device and torch build is bit-exact).

Shapes: automatic from ``adaptkit.mpo.balanced_factors(dim, 2)`` (largest divisor
``d <= sqrt(dim)``, as the PR's shape calculator and LoKr's ``factorization``), or explicit
``out_shape`` / ``in_shape`` pairs, validated per layer. The per-layer file state records the
shapes; a load with different shapes is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import AdaptkitError
from ..kron import kron_apply, kron_sum
from ..layer import AdaptedLayer, Adapter
from ..mpo import balanced_factors, interleaved_unfolding, kron_decompose
from ..spec import AdapterSpec, register_method
from .lora import LoRAAdapter, check_rank, lora_scale

__all__ = ["LoRAMPO", "LoRAMPOAdapter", "num_params", "MODES"]

MODES = ("kron", "lora")


def _pair(owner: str, fld: str, value: Any) -> tuple[int, int] | None:
    """None, or a (f1, f2) pair of positive ints (JSON lists become tuples)."""
    if value is None:
        return None
    try:
        t = tuple(value)
    except TypeError:
        t = None
    if t is None or len(t) != 2 or any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in t):
        raise AdaptkitError(
            f"{owner}: {fld}={value!r} must be None (automatic) or a pair of positive "
            f"ints (f1, f2) whose product is the layer's dimension; e.g. {fld}=(24, 32) "
            f"for 768, or adaptkit.mpo.balanced_factors(dim, 2)"
        )
    return t  # type: ignore[return-value]


@register_method
@dataclass(frozen=True)
class LoRAMPO(AdapterSpec):
    """LoRA-MPO spec (see the module docstring for the math).

    mode:      "kron" (top-r Kronecker components of the 2-core MPO of W, residual kept) or
               "lora" (degenerate shapes (out, 1) / (1, in): equals LoRA with init="pissa").
    out_shape, in_shape: the factor pairs (o1, o2) / (i1, i2) of out_features / in_features in
               mode "kron"; None (default) picks the balanced pair of each layer. Explicit pairs
               apply to every matched layer (use separate adapters for layers of other sizes).
    dropout:   on the adapter's input; use_rslora: scale alpha / sqrt(r) instead of alpha / r.
    init_niter: None (exact Kronecker SVD) or k >= 0: randomized SVD with k power iterations
               (mode "kron" only; "lora" mode is LoRA's exact PiSSA).
    """

    method = "lorampo"
    mode: str = "kron"
    out_shape: tuple[int, int] | None = None
    in_shape: tuple[int, int] | None = None
    dropout: float = 0.0
    use_rslora: bool = False
    init_niter: int | None = None

    def validate(self) -> None:
        name = type(self).__name__
        if self.mode not in MODES:
            raise AdaptkitError(f"{name}: mode={self.mode!r} is not one of {MODES}")
        self._check_prob(name, "dropout", self.dropout)
        if not isinstance(self.use_rslora, bool):
            raise AdaptkitError(f"{name}: use_rslora must be a bool, got {self.use_rslora!r}")
        n = self.init_niter
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise AdaptkitError(
                f"{name}: init_niter={n!r} must be None (exact SVD) or an int >= 0 "
                f"(power iterations of the randomized SVD); use e.g. init_niter=4"
            )
        if n is not None and self.mode == "lora":
            raise AdaptkitError(
                f"{name}: init_niter={n} is not available with mode='lora', which "
                f"is LoRA's exact PiSSA init; drop init_niter or use mode='kron'"
            )
        for fld in ("out_shape", "in_shape"):
            object.__setattr__(self, fld, _pair(name, fld, getattr(self, fld)))
            if self.mode == "lora" and getattr(self, fld) is not None:
                fixed = "(out_features, 1)" if fld == "out_shape" else "(1, in_features)"
                raise AdaptkitError(
                    f"{name}: {fld}={getattr(self, fld)} is not allowed with "
                    f"mode='lora', whose shapes are fixed to {fixed}; drop {fld} "
                    f"or use mode='kron'"
                )

    # supports(): the AdapterSpec default, "linear" and "conv1d_t"

    def shapes_for(self, layer: AdaptedLayer, path: str) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((o1, o2), (i1, i2))`` for ``layer`` at ``path``, checked against its dims."""
        out, inp = layer.out_features, layer.in_features
        if self.mode == "lora":
            return (out, 1), (1, inp)
        shapes = []
        given: tuple[int, ...] | None
        for fld, given, dim, what in (
            ("out_shape", self.out_shape, out, "out_features"),
            ("in_shape", self.in_shape, inp, "in_features"),
        ):
            if given is None:
                given = balanced_factors(dim, 2)
            elif given[0] * given[1] != dim:
                raise AdaptkitError(
                    f"{type(self).__name__}: {fld}={given} has product {given[0] * given[1]} but "
                    f"'{path}' has {what}={dim}; give two factors multiplying to {dim} (automatic: "
                    f"{balanced_factors(dim, 2)}) or leave {fld}=None"
                )
            shapes.append(tuple(given))
        return shapes[0], shapes[1]  # type: ignore[return-value]

    def build(self, layer: AdaptedLayer, path: str) -> LoRAMPOAdapter:
        name = type(self).__name__
        r = self.rank_for(path)
        (o1, o2), (i1, i2) = self.shapes_for(layer, path)
        if self.mode == "lora":
            check_rank(name, r, layer, path)
        else:
            limit = min(o1 * i1, o2 * i2)
            if r > limit:
                raise AdaptkitError(
                    f"{name}: rank={r} exceeds min(o1*i1, o2*i2)={limit} for out_shape={(o1, o2)}, "
                    f"in_shape={(i1, i2)} at '{path}' (a sum of Kronecker products of these shapes "
                    f"has at most {limit} independent terms); use rank <= {limit}, other shapes, or "
                    f"mode='lora'"
                )
        if not bool(torch.isfinite(layer.weight).all()):
            raise AdaptkitError(
                f"{name}: the weight of '{path}' contains NaN or Inf; the "
                f"decomposition that initialises LoRA-MPO needs finite weights"
            )
        s = lora_scale(self.alpha_for(path), r, self.use_rslora)
        return LoRAMPOAdapter(layer, self.mode, (o1, o2), (i1, i2), r, s, self.dropout, self.init_niter)


def _randomized_kron(
    w: torch.Tensor, out_shape: tuple[int, int], in_shape: tuple[int, int], rank: int, niter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` Kronecker terms of ``w (out, in)`` like ``kron_decompose``, from a randomized
    SVD of the rearrangement (Halko et al. 2011, Alg. 4.4; probes from a fixed seed, so the same
    W gives the same factors). Returns a (r, o1, i1), b (r, o2, i2), s (r,)."""
    (o1, o2), (i1, i2) = out_shape, in_shape
    m = interleaved_unfolding(w, out_shape, in_shape, 1)  # (o1*i1, o2*i2): R[(a, c), (b, d)]
    gen = torch.Generator(device=w.device).manual_seed(0)
    g = torch.randn(m.shape[1], rank + 10, generator=gen, device=w.device, dtype=w.dtype)  # (o2*i2, q)
    q = torch.linalg.qr(m @ g).Q  # (o1*i1, q): range of R
    for _ in range(niter):  # power iterations sharpen the spectrum
        q = torch.linalg.qr(m @ torch.linalg.qr(m.T @ q).Q).Q
    u, s, vh = torch.linalg.svd(q.T @ m, full_matrices=False)  # (q, q), (q,), (q, o2*i2)
    u = q @ u[:, :rank]  # (o1*i1, r)
    idx = u.abs().argmax(dim=0)  # (r,): kron_decompose's sign convention
    sign = torch.sign(u.gather(0, idx[None, :]))  # (1, r)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    a = (u * sign).T.reshape(rank, o1, i1)  # (r, o1*i1) -> (r, o1, i1)
    b = (vh[:rank] * sign.T).reshape(rank, o2, i2)  # (r, o2*i2) -> (r, o2, i2)
    return a, b, s[:rank]


class LoRAMPOAdapter(Adapter):
    """The LoRA-MPO update on one layer; see the module docstring for the math and shapes."""

    def __init__(
        self,
        layer: AdaptedLayer,
        mode: str,
        out_shape: tuple[int, int],
        in_shape: tuple[int, int],
        rank: int,
        scale: float,
        dropout: float,
        init_niter: int | None = None,
    ):
        super().__init__()
        w = layer.weight
        kw: dict[str, Any] = dict(device=w.device, dtype=w.dtype)
        (o1, o2), (i1, i2) = out_shape, in_shape
        self.mode, self.rank, self.scale, self.p = mode, rank, float(scale), float(dropout)
        self.out_shape, self.in_shape, self.init_niter = (o1, o2), (i1, i2), init_niter
        self.mpo_A = nn.Parameter(torch.empty(o1, i1, rank, **kw))  # core 0: (o1, i1, r)
        self.mpo_B = nn.Parameter(torch.empty(rank, o2, i2, **kw))  # core 1: (r, o2, i2)
        out, inp = o1 * o2, i1 * i2
        # contraction order of the forward: multiply-adds per token per rank (module docstring)
        self.b_first = inp * o2 + out * i1 <= inp * o1 + out * i2
        f, d = rank * min(inp * o2 + out * i1, inp * o1 + out * i2), out * inp  # MACs per token
        # tokens per call from which building ΔW and one dense matmul is faster (docstring)
        gain = 2 * f - 0.8 * d  # what the dense route saves per token (fitted units)
        self.dense_from = 3 * rank * d / gain if gain > 0 and mode == "kron" else float("inf")
        self.reset(layer)

    @torch.no_grad()
    def reset(self, layer: AdaptedLayer) -> None:
        """Fill the cores from the current base weight (deterministic: the same W gives the
        same factors, which is what makes a saved residual adapter reload exactly)."""
        (o1, o2), (i1, i2), r = self.out_shape, self.in_shape, self.rank
        if self.mode == "lora":
            # PiSSA from lora.py itself (built, never attached: W is not touched here)
            pissa = LoRAAdapter(layer, r, self.scale, 0.0, "pissa")
            self.mpo_A.copy_(pissa.lora_B.view(o1, 1, r))  # (out, r) -> (out, i1=1, r)
            self.mpo_B.copy_(pissa.lora_A.view(r, 1, i2))  # (r, in) -> (r, o2=1, in)
            return
        w = layer.to_2d(layer.weight.detach().float())  # (out, in)
        # the exact Kronecker SVD, also when r + 10 probes would span the smaller side anyway
        if self.init_niter is None or r + 10 >= min(o1 * i1, o2 * i2):
            a, b, sv = kron_decompose(w, (o1, o2), (i1, i2), r)  # (r, o1, i1), (r, o2, i2), (r,)
        else:
            a, b, sv = _randomized_kron(w, (o1, o2), (i1, i2), r, self.init_niter)
        root = (sv / self.scale).sqrt()  # (r,): PiSSA's even split of σ_k / s
        self.mpo_A.copy_((a * root[:, None, None]).permute(1, 2, 0))  # (r, o1, i1) -> (o1, i1, r)
        self.mpo_B.copy_(b * root[:, None, None])  # (r, o2, i2)

    def attach(self, layer: AdaptedLayer) -> None:
        with torch.no_grad():  # W <- W - s ΔW_init: the residual keeps the output unchanged
            layer.weight.copy_(layer.weight.float() - self.delta_weight(layer))

    @property
    def loraplus_b(self) -> tuple[str, ...]:
        """LoRA+'s B-like factor (adaptkit.optim): core 0 in "lora" mode (it is lora_B)."""
        return ("mpo_A",) if self.mode == "lora" else ()

    @staticmethod
    def _kron_sum(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``sum_k kron(A[..., k], B[k])`` (out, in): one GEMM of the rearranged cores
        (``adaptkit.kron.kron_sum``; the "lora" shapes give exactly ``B @ A``)."""
        return kron_sum(A.permute(2, 0, 1), B)  # core 0 (o1, i1, r) -> (r, o1, i1), a view

    def delta_weight(self, layer: AdaptedLayer) -> torch.Tensor:
        """``s * sum_k kron(A[..., k], B[k])`` in fp32, native shape."""
        return layer.from_2d(self.scale * self._kron_sum(self.mpo_A.float(), self.mpo_B.float()))

    fuses_base = True  # first in the active set: ΔW may ride in the base matmul (_folds)

    def _folds(self, x: torch.Tensor, layer: AdaptedLayer) -> bool:
        """Whether this call computes ``x (W + s ΔW)^T`` in one matmul: the dense route, and
        nothing the sum would change (an fp32 W keeps the delta's precision; dropout would
        see another input than the base)."""
        return (
            layer.weight.dtype == torch.float32
            and not (self.p and self.training)
            and x.numel() // layer.in_features >= self.dense_from
        )

    def base_forward(self, x: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        w, b = layer.weight, layer.bias
        if not self._folds(x, layer):
            return layer.base_op(x, w, b)
        k = self._kron_sum(self.mpo_A, self.mpo_B).to(w.dtype)  # (out, in)
        return layer.base_op(x, w + self.scale * layer.from_2d(k), b)

    def update(self, x: torch.Tensor, y: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        if layer._active[0] is self and self._folds(x, layer):
            return y  # ΔW x is in y (base_forward)
        A, B = self.mpo_A, self.mpo_B
        (o1, o2), (i1, i2) = self.out_shape, self.in_shape
        if self.p and self.training:
            x = F.dropout(x, self.p, True)
        x = x.to(A.dtype)
        n = x.numel() // (i1 * i2)  # tokens in this call
        if n >= self.dense_from:  # one GEMM beats two factors here
            z = F.linear(x, self._kron_sum(A, B))  # (..., in) @ ΔW^T -> (..., out)
            return y.add(z.to(y.dtype), alpha=self.scale)
        # ΔW = sum_k kron(A_k, B_k) as two Kronecker factors with the rank folded into one
        # side (adaptkit.kron.kron_apply); "lora" shapes: two plain matmuls, as LoRA
        r = self.rank
        if self.b_first:  # kron(I_i1, B (r*o2, i2)), then kron(A (o1, i1*r), I_o2)
            h = kron_apply(x, (i1, i2), right=B.reshape(r * o2, i2))  # (..., i1*r*o2)
            z = kron_apply(h, (i1 * r, o2), left=A.reshape(o1, i1 * r))  # (..., o1*o2)
        else:  # kron(A (o1*r, i1), I_i2), then kron(I_o1, B (o2, r*i2))
            h = kron_apply(x, (i1, i2), left=A.permute(0, 2, 1).reshape(o1 * r, i1))  # (..., o1*r*i2)
            z = kron_apply(h, (o1, r * i2), right=B.permute(1, 0, 2).reshape(o2, r * i2))  # (..., o1*o2)
        return y.add(z.to(y.dtype), alpha=self.scale)  # y + s ΔW x, one kernel

    def layer_state(self) -> dict[str, Any]:
        return {"mode": self.mode, "out_shape": list(self.out_shape), "in_shape": list(self.in_shape)}

    def load_layer_state(self, state: dict[str, Any], path: str) -> None:
        """Refuse a file whose factor shapes differ from those this spec gives the layer (the
        residual init depends on them, so its tensors would not fit)."""
        for k, mine in (("mode", self.mode), ("out_shape", list(self.out_shape)), ("in_shape", list(self.in_shape))):
            if k in state and state[k] != mine:
                raise AdaptkitError(
                    f"LoRAMPO: '{path}' was saved with {k}={state[k]!r} but the file's spec gives "
                    f"{mine!r} here; load it with the adaptkit version that wrote it, or re-save "
                    f"it with explicit out_shape / in_shape"
                )

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode}, out_shape={self.out_shape}, in_shape={self.in_shape}, "
            f"rank={self.rank}, scale={self.scale:g}"
            + ("" if self.init_niter is None else f", init_niter={self.init_niter}")
        )


def num_params(out_shape: tuple[int, int], in_shape: tuple[int, int], rank: int) -> int:
    """Trainable parameters of one LoRA-MPO layer: ``r * (o1*i1 + o2*i2)``."""
    return rank * (out_shape[0] * in_shape[0] + out_shape[1] * in_shape[1])
