r"""MoRA: high-rank updating with one square matrix (Jiang et al., 2024, arXiv 2405.12130),
with the ReMoRA merge-and-reset schedule and the ``nn.Linear`` drop-in ``MoRALinear``.

    y = W x + b + D(M · C(drop(x))),     M ∈ R^{r̂×r̂}, zero-initialised, no alpha (s = 1)

``r̂`` comes from the LoRA-equivalent budget ``rank`` = r: ``r̂ = int(sqrt((in+out)·r) + 0.5)``
(the reference code rounds; the paper writes floor), so ``r̂² ≈ r·(in+out)`` parameters; the
chunked types (6, "decouple") need an even r̂: ``r̂ ← max(2, 2⌊r̂/2⌋)``. ``r_hat`` sets it
directly. E.g. (in, out, r) = (4096, 4096, 8) → 256; (4096, 11008, 8) → 348 (floor would give 347);
(768, 768, 8) → 111 (110 for type 6); (4096, 4096, 256) → 1448.

With P = ⌈in/r̂⌉·r̂, n_c = P/r̂ and the circular padding x̄_i = x_{i mod in} (i < P; also when
P - in > in, where the reference's ``x[..., :pad]`` fails), compression C: R^in → R^r̂ and
decompression D: R^r̂ → R^out are (``mora_type``; "contiguous groups" of n items: the first
n mod r̂ groups take ⌊n/r̂⌋+1 consecutive items, the others ⌊n/r̂⌋):

  1  c_j = Σ_t x̄_{t·r̂+j} (cyclic sums)         y_Δ[o] = z[o mod r̂]       (tile)
  2  c_g = Σ_{i∈g} x_i (contiguous groups)       y_Δ[o] = z[group(o)]      (repeat)
  3  input as 2, output as 1          4  input as 1, output as 2
  6  paper Eq. 9: u_i = M·R_i·x̄[i r̂:(i+1) r̂] per chunk i, v = concat_i u_i ∈ R^P,
     y_Δ[o] = v[o mod P]; R_i rotates pairs (j, j+h), h = r̂/2, by φ_j = i·10000^{-2j/r̂}
     (RoPE; chunk 0 is not rotated; cos/sin computed in fp32, cached per dtype/device;
     under torch.compile computed in the graph instead, so no cache fill recompiles)
  "decouple"  type 6 with R_i = I (paper's plain decoupling)
  "truncate"  c = x[:r̂] (zero-filled when in < r̂), y_Δ = [z; 0] (paper's truncation)

Forward runs by reshapes and sums (no dense delta). ``delta_weight`` applies that same
operator to the identity (column k of ΔW = D·M·C is y_Δ(e_k)), so there is one definition of
every type and the merge is exact wherever the forward is, in <= r̂ included (where the
reference merge crashes); the tests check it against an independent index formula, for
type 6 ΔW_P[i r̂+a, (i r̂+b) mod in] += (M R_i)[a, b], ΔW[o] = ΔW_P[o mod P].
rank(ΔW) <= r̂ for types 1-4 and "truncate"; up to min(in, out) for 6 / "decouple".
Cost: types 1-4 r̂² MACs/token, 6 n_c·r̂² ≈ in·r̂ (the dense delta: ``in`` such tokens).

MoRA has no alpha: a spec with ``alpha`` or ``alpha_pattern`` is rejected. ``mora_type``
defaults to 1 in the spec (the reference's default; its README recommends 6 for small r,
1 for large) and to 6 in ``MoRALinear`` (the DESIGN signature). Adapts Linear and GPT-2
Conv1D (transposed view). ``ReMoRA`` merges M into W every ``merge_every`` steps, zeroes
M, cycles the type {1→2→1} (cycle=2) or {1→2→3→4→1} (cycle=4) and resets the adapter's
optimizer state (reference ``train.py::ResetReloraCallback``); the LR warmup restart of the
reference is left to the user's scheduler.

Files: this one holds the math, the ``MoRA`` spec and its adapter; ``mora_linear.py`` the
drop-in ``MoRALinear`` and ``apply_mora_linear``; ``mora_remora.py`` ReMoRA. Their public
names are re-exported here lazily (``from adaptkit.methods.mora import ReMoRA`` works).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import AdaptkitError
from ..layer import AdaptedLayer, Adapter, tracing
from ..spec import AdapterSpec, register_method

MORA_TYPES = (1, 2, 3, 4, 6, "truncate", "decouple")
CHUNKED = (6, "decouple")
_PROBE = 1 << 23  # elements of mora_delta's widest temporary per identity block (32 MiB fp32)


def r_hat_for(in_features: int, out_features: int, rank: int, mora_type=1) -> int:
    """Square size r̂ of the LoRA-equivalent budget ``rank`` (module docstring)."""
    r = int(math.sqrt((in_features + out_features) * rank) + 0.5)
    return max(2, 2 * (r // 2)) if mora_type in CHUNKED else r


def check_type(owner: str, t, r_hat: int | None = None, where: str = "") -> None:
    if isinstance(t, bool) or type(t) not in (int, str) or t not in MORA_TYPES:
        raise AdaptkitError(
            f"{owner}: mora_type={t!r}{where} is not one of {MORA_TYPES}; use 6 for small rank, 1 for large"
        )
    if r_hat is not None and t in CHUNKED and r_hat % 2:
        raise AdaptkitError(
            f"{owner}: mora_type={t!r} rotates pairs and needs an even r_hat, "
            f"got r_hat={r_hat}{where}; use r_hat={r_hat - 1 or 2}"
        )


# ---- the math: the operator by reshapes and sums; the dense delta is that operator -------
def _pad(x: torch.Tensor, P: int) -> torch.Tensor:
    """Circular padding x̄_i = x_{i mod in}: (..., in) -> (..., P), any P >= in."""
    reps, rest = divmod(P, x.shape[-1])
    return x if P == x.shape[-1] else torch.cat([x] * reps + [x[..., :rest]], -1)


def _tile(v: torch.Tensor, n: int) -> torch.Tensor:
    """y[o] = v[o mod k]: (..., k) -> (..., n)."""
    k = v.shape[-1]
    return v[..., :n] if n <= k else torch.cat([v] * -(-n // k), -1)[..., :n]


def _sum_groups(x: torch.Tensor, r: int) -> torch.Tensor:
    """Contiguous group sums: (..., n) -> (..., r) (empty groups when n < r sum to 0)."""
    b, (q, m) = x.shape[:-1], divmod(x.shape[-1], r)
    k = m * (q + 1)
    head = x[..., :k].reshape(*b, m, q + 1).sum(-1)  # (..., m(q+1)) -> (..., m, q+1) -> (..., m)
    tail = x[..., k:].reshape(*b, r - m, q).sum(-1)  # (..., (r-m)q) -> (..., r-m, q) -> (..., r-m)
    return torch.cat([head, tail], -1)  # (..., r)


def _repeat_groups(z: torch.Tensor, n: int) -> torch.Tensor:
    """Contiguous repeat, group g's items get z[g]: (..., r) -> (..., n)."""
    b, r = z.shape[:-1], z.shape[-1]
    q, m = divmod(n, r)
    # (..., m) -> (..., m, q+1) -> (..., m(q+1)) and (..., r-m) -> (..., r-m, q) -> (..., (r-m)q)
    head = z[..., :m, None].expand(*b, m, q + 1).reshape(*b, m * (q + 1))
    tail = z[..., m:, None].expand(*b, r - m, q).reshape(*b, (r - m) * q)
    return torch.cat([head, tail], -1)  # (..., n)


def rope_tables(n_c: int, r: int, device=None, dtype=torch.float32):
    """cos, sin (n_c, r) of φ_{i,j} = i·10000^{-2j/r}, j < r/2, repeated over both halves."""
    inv = 1.0 / 10000 ** (torch.arange(0, r, 2, dtype=torch.float32, device=device) / r)  # (h,)
    ph = torch.outer(torch.arange(n_c, dtype=torch.float32, device=device), inv)  # (n_c, h)
    ph = torch.cat([ph, ph], -1)  # (n_c, r)
    return ph.cos().to(dtype), ph.sin().to(dtype)


def mora_update(x: torch.Tensor, M: torch.Tensor, out_features: int, mora_type, tables=None):
    """y_Δ = D(M·C(x)) without a dense delta: x (..., in) -> (..., out); M (r̂, r̂);
    ``tables`` = rope_tables(n_c, r̂) in x's dtype (type 6 only)."""
    n, r, t = x.shape[-1], M.shape[0], mora_type
    n_c = -(-n // r)
    if t in CHUNKED:
        xc = _pad(x, n_c * r).unflatten(-1, (n_c, r))  # (..., P) -> (..., n_c, r̂)
        if t == 6:  # R_i x: (x_j cos - x_{j+h} sin, x_{j+h} cos + x_j sin)
            cos, sin = tables
            xc = xc * cos + torch.cat([-xc[..., r // 2 :], xc[..., : r // 2]], -1) * sin
        v = (xc @ M.t()).flatten(-2)  # u_i = M R_i x̄^(i): (..., n_c, r̂) -> v (..., P)
        return _tile(v, out_features)  # (..., out)
    if t in (1, 4):
        c = _pad(x, n_c * r).unflatten(-1, (n_c, r)).sum(-2)  # (..., n_c, r̂) summed -> (..., r̂)
    elif t in (2, 3):
        c = _sum_groups(x, r)
    else:  # truncate
        c = F.pad(x[..., :r], (0, max(0, r - n)))  # (..., r̂)
    z = c @ M.t()  # (..., r̂)
    if t in (1, 3):
        return _tile(z, out_features)
    if t in (2, 4):
        return _repeat_groups(z, out_features)
    return F.pad(z[..., :out_features], (0, max(0, out_features - r)))  # [z; 0]


def mora_delta(M: torch.Tensor, in_features: int, out_features: int, mora_type) -> torch.Tensor:
    """Exact dense ΔW = D·M·C (out, in) in M's dtype, from the operator itself: column k is
    y_Δ(e_k), so ΔW^T = mora_update(I_in), taken over row blocks of the identity so that no
    temporary exceeds ``_PROBE`` elements. One definition of every type, so the merge and
    the forward cannot disagree (in <= r̂ and type 6 included). Cost: the forward's on ``in``
    tokens, i.e. in·r̂² MACs for types 1-4 and "truncate", in·P·r̂ for 6 / "decouple", plus
    O(in·out) memory traffic (4096², r̂ = 256, type 6: ~0.7 s on one CPU thread)."""
    n, r, t = in_features, M.shape[0], mora_type
    tables = rope_tables(-(-n // r), r, M.device, M.dtype) if t == 6 else None
    step = max(1, _PROBE // max(-(-n // r) * r, out_features))  # identity rows per block
    dw = M.new_empty(out_features, n)
    for k in range(0, n, step):
        h = min(step, n - k)
        eye = M.new_zeros(h, n)
        eye.diagonal(k).fill_(1)  # rows e_k .. e_{k+h-1} of I_in: (h, in)
        dw[:, k : k + h] = mora_update(eye, M, out_features, t, tables).t()  # (h, out) -> (out, h)
    return dw


@register_method
@dataclass(frozen=True)
class MoRA(AdapterSpec):
    """MoRA spec. ``rank``: LoRA-equivalent budget giving r̂ (``rank_pattern`` works);
    ``r_hat``: the square size directly (overrides rank, every layer); ``mora_type`` in
    {1, 2, 3, 4, 6, "truncate", "decouple"}; ``merge_every``: ReMoRA period T (None: no
    ReMoRA unless ``ReMoRA(..., merge_every=T)``); ``dropout`` on x before compression.
    No alpha (s = 1): ``alpha`` / ``alpha_pattern`` are rejected."""

    method = "mora"
    r_hat: int | None = None
    mora_type: int | str = 1
    merge_every: int | None = None
    dropout: float = 0.0

    def validate(self) -> None:
        n = type(self).__name__
        if self.alpha is not None or self.alpha_pattern:
            raise AdaptkitError(
                f"{n}: got alpha={self.alpha!r}, alpha_pattern="
                f"{self.alpha_pattern!r} but MoRA has no alpha (its scale is 1); "
                f"leave both unset"
            )
        for fld in ("r_hat", "merge_every"):
            if getattr(self, fld) is not None:
                self._check_rank(n, fld, getattr(self, fld))
        check_type(n, self.mora_type, self.r_hat)
        self._check_prob(n, "dropout", self.dropout)

    def supports(self, kind: str) -> bool:
        return kind in ("linear", "conv1d_t")

    def build(self, layer: AdaptedLayer, path: str) -> MoRAAdapter:
        r = self.r_hat or r_hat_for(layer.in_features, layer.out_features, self.rank_for(path), self.mora_type)
        return MoRAAdapter(layer, r, self.mora_type, self.dropout)


class MoRAAdapter(Adapter):
    """The MoRA update on one wrapped layer (module docstring); parameter ``mora_M`` (r̂, r̂).
    ``ak.MoRALinear`` owns one of these; ReMoRA calls ``reset``."""

    mora_M: nn.Parameter
    _tables: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]]

    def __init__(self, layer: AdaptedLayer, r_hat: int, mora_type, dropout: float):
        super().__init__()
        w = layer.weight
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.r_hat, self.mora_type, self.p, self._tables = r_hat, mora_type, float(dropout), {}
        self.mora_M = nn.Parameter(torch.zeros(r_hat, r_hat, device=w.device, dtype=w.dtype))

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        M = self.mora_M
        if self.p and self.training:
            x = F.dropout(x, self.p, True)
        x, tables = x.to(M.dtype), None
        if self.mora_type == 6 and tracing():  # torch.compile: filling the dict would recompile
            tables = rope_tables(-(-self.in_features // self.r_hat), self.r_hat, x.device, x.dtype)
        elif self.mora_type == 6:
            key = (x.dtype, x.device)
            if key not in self._tables:  # fp32 tables cast to the activation dtype, per dtype
                self._tables[key] = rope_tables(-(-self.in_features // self.r_hat), self.r_hat, x.device, x.dtype)
            tables = self._tables[key]
        return mora_update(x, M, self.out_features, self.mora_type, tables)

    def dense_delta(self, dtype=torch.float32) -> torch.Tensor:
        """ΔW on the (out, in) view, in ``dtype`` (fp32 by default)."""
        return mora_delta(self.mora_M.detach().to(dtype), self.in_features, self.out_features, self.mora_type)

    @torch.no_grad()
    def reset(self, new_type=None) -> None:
        """Zero M (the update restarts from 0) and switch to ``new_type`` if given."""
        if new_type is not None:
            check_type(type(self).__name__, new_type, self.r_hat)
            self.mora_type = new_type
        self.mora_M.zero_()

    def update(self, x: torch.Tensor, y: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        return y + self.delta_forward(x).to(y.dtype)

    def delta_weight(self, layer: AdaptedLayer) -> torch.Tensor:
        return layer.from_2d(self.dense_delta(torch.promote_types(self.mora_M.dtype, torch.float32)))

    def layer_state(self) -> dict:
        return {"mora_type": self.mora_type, "r_hat": self.r_hat}  # ReMoRA changes the type

    def load_layer_state(self, state: dict, path: str) -> None:
        t = state.get("mora_type", self.mora_type)
        check_type("MoRA", t, self.r_hat, f" in the file's state of '{path}'")
        if state.get("r_hat", self.r_hat) != self.r_hat:
            raise AdaptkitError(
                f"MoRA: the file has r_hat={state['r_hat']} at '{path}', the spec "
                f"gives {self.r_hat}; the file is corrupt or was edited"
            )
        self.mora_type = t


# ---- lazy re-exports: the split modules import this one, so an eager import here would be
# circular (importing mora_linear first would find MoRALinear undefined); PEP 562 instead.
_MOVED = {
    "MoRALinear": "mora_linear",
    "apply_mora_linear": "mora_linear",
    **{
        k: "mora_remora"
        for k in (
            "ReMoRA",
            "CYCLES",
            "RESETS",
            "mora_modules",
            "merge_and_reset_mora_linear",
            "update_model_mora_linear",
        )
    },
}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f".{_MOVED[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MOVED))
