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

Forward runs by reshapes and sums (no dense delta); ``delta_weight`` builds the exact dense
ΔW = D·M·C (out, in) by index arithmetic, independently of the forward code: type 6 is
ΔW_P[i r̂+a, (i r̂+b) mod in] += (M R_i)[a, b], ΔW[o] = ΔW_P[o mod P], which also covers
in <= r̂ (where the reference merge crashes). rank(ΔW) <= r̂ for types 1-4 and "truncate";
up to min(in, out) for 6 / "decouple". Cost: types 1-4 r̂² MACs/token, 6 n_c·r̂² ≈ in·r̂.

MoRA has no alpha: a spec with ``alpha`` or ``alpha_pattern`` is rejected. ``mora_type``
defaults to 1 in the spec (the reference's default; its README recommends 6 for small r,
1 for large) and to 6 in ``MoRALinear`` (the DESIGN signature). Adapts Linear and GPT-2
Conv1D (transposed view). ``ReMoRA`` merges M into W every ``merge_every`` steps, zeroes
M, cycles the type {1→2→1} (cycle=2) or {1→2→3→4→1} (cycle=4) and resets the adapter's
optimizer state (reference ``train.py::ResetReloraCallback``); the LR warmup restart of the
reference is left to the user's scheduler.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import AdaptkitError
from ..layer import Adapter, AdaptedLayer, adapted_layers, tracing
from ..spec import AdapterSpec, register_method

MORA_TYPES = (1, 2, 3, 4, 6, "truncate", "decouple")
CHUNKED = (6, "decouple")
CYCLES = {1: {}, 2: {1: 2, 2: 1}, 4: {1: 2, 2: 3, 3: 4, 4: 1}}  # ReMoRA type maps
RESETS = ("adapter", "all", "none")


def r_hat_for(in_features: int, out_features: int, rank: int, mora_type=1) -> int:
    """Square size r̂ of the LoRA-equivalent budget ``rank`` (module docstring)."""
    r = int(math.sqrt((in_features + out_features) * rank) + 0.5)
    return max(2, 2 * (r // 2)) if mora_type in CHUNKED else r


def check_type(owner: str, t, r_hat: int | None = None, where: str = "") -> None:
    if isinstance(t, bool) or type(t) not in (int, str) or t not in MORA_TYPES:
        raise AdaptkitError(f"{owner}: mora_type={t!r}{where} is not one of {MORA_TYPES}; "
                            f"use 6 for small rank, 1 for large")
    if r_hat is not None and t in CHUNKED and r_hat % 2:
        raise AdaptkitError(f"{owner}: mora_type={t!r} rotates pairs and needs an even r_hat, "
                            f"got r_hat={r_hat}{where}; use r_hat={r_hat - 1 or 2}")


# ---- the math: forward by reshapes and sums, exact dense delta by indices -----------------
def _groups(n: int, r: int, device) -> torch.Tensor:
    """Group index (n,) of the contiguous grouping of n items into r groups."""
    q, m = divmod(n, r)
    sizes = torch.tensor([q + 1] * m + [q] * (r - m), device=device)
    return torch.repeat_interleave(torch.arange(r, device=device), sizes)


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
            xc = xc * cos + torch.cat([-xc[..., r // 2:], xc[..., :r // 2]], -1) * sin
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
    """Exact dense ΔW = D·M·C, (out, in) in M's dtype, built from index maps."""
    r, dev, t, n, o = M.shape[0], M.device, mora_type, in_features, out_features
    n_c = -(-n // r)
    i = torch.arange(n_c * r, device=dev)
    if t in CHUNKED:
        B = M.expand(n_c, r, r)  # block i = M R_i, (n_c, r̂, r̂)
        if t == 6:  # column-wise M R_i = M ⊙ cos_i + [M[:, h:], -M[:, :h]] ⊙ sin_i
            cos, sin = rope_tables(n_c, r, dev, M.dtype)
            B = M * cos[:, None] + torch.cat([M[:, r // 2:], -M[:, :r // 2]], -1) * sin[:, None]
        cols = (i % n).view(n_c, 1, r).expand(n_c, r, r)  # block i column b -> (i r̂ + b) mod in
        dP = M.new_zeros(n_c, r, n).scatter_add_(2, cols, B.contiguous())  # ΔW_P (n_c, r̂, in)
        dP = dP.reshape(n_c * r, n)  # (n_c, r̂, in) -> (P, in)
        return dP[torch.arange(o, device=dev) % (n_c * r)]  # rows o mod P: (out, in)
    if t in (1, 4):  # column k of M·C sums the M columns of the padded slots i ≡ k (mod in)
        MC = M.new_zeros(r, n).index_add_(1, i % n, M[:, i % r])
    elif t in (2, 3):
        MC = M[:, _groups(n, r, dev)]
    else:
        MC = F.pad(M[:, :min(n, r)], (0, n - min(n, r)))
    if t in (1, 3):
        return MC[torch.arange(o, device=dev) % r]
    if t in (2, 4):
        return MC[_groups(o, r, dev)]
    return F.pad(MC[:min(o, r)], (0, 0, 0, o - min(o, r)))


class _MoRAState:
    """What MoRAAdapter and MoRALinear share: attributes ``mora_M`` (r̂, r̂), ``mora_type``,
    ``r_hat``, ``p`` (dropout), ``in_features``, ``out_features``, ``_tables``."""

    def update(self, x: torch.Tensor) -> torch.Tensor:
        M = self.mora_M
        if self.p and self.training:
            x = F.dropout(x, self.p, True)
        x, tables = x.to(M.dtype), None
        if self.mora_type == 6 and tracing():  # torch.compile: filling the dict would recompile
            tables = rope_tables(-(-self.in_features // self.r_hat), self.r_hat, x.device, x.dtype)
        elif self.mora_type == 6:
            key = (x.dtype, x.device)
            if key not in self._tables:  # fp32 tables cast to the activation dtype, per dtype
                self._tables[key] = rope_tables(-(-self.in_features // self.r_hat), self.r_hat,
                                                x.device, x.dtype)
            tables = self._tables[key]
        return mora_update(x, M, self.out_features, self.mora_type, tables)

    def dense_delta(self, dtype=torch.float32) -> torch.Tensor:
        """ΔW on the (out, in) view, in ``dtype`` (fp32 by default)."""
        return mora_delta(self.mora_M.detach().to(dtype), self.in_features, self.out_features,
                          self.mora_type)

    @torch.no_grad()
    def reset(self, new_type=None) -> None:
        """Zero M (the update restarts from 0) and switch to ``new_type`` if given."""
        if new_type is not None:
            check_type(type(self).__name__, new_type, self.r_hat)
            self.mora_type = new_type
        self.mora_M.zero_()


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
            raise AdaptkitError(f"{n}: got alpha={self.alpha!r}, alpha_pattern="
                                f"{self.alpha_pattern!r} but MoRA has no alpha (its scale is 1); "
                                f"leave both unset")
        for fld in ("r_hat", "merge_every"):
            if getattr(self, fld) is not None:
                self._check_rank(n, fld, getattr(self, fld))
        check_type(n, self.mora_type, self.r_hat)
        self._check_prob(n, "dropout", self.dropout)

    def supports(self, kind: str) -> bool:
        return kind in ("linear", "conv1d_t")

    def build(self, layer: AdaptedLayer, path: str) -> "MoRAAdapter":
        r = self.r_hat or r_hat_for(layer.in_features, layer.out_features, self.rank_for(path),
                                    self.mora_type)
        return MoRAAdapter(layer, r, self.mora_type, self.dropout)


class MoRAAdapter(_MoRAState, Adapter):
    """The MoRA update on one wrapped layer (module docstring); parameter ``mora_M``."""

    def __init__(self, layer: AdaptedLayer, r_hat: int, mora_type, dropout: float):
        super().__init__()
        w = layer.weight
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.r_hat, self.mora_type, self.p, self._tables = r_hat, mora_type, float(dropout), {}
        self.mora_M = nn.Parameter(torch.zeros(r_hat, r_hat, device=w.device, dtype=w.dtype))

    def apply(self, x: torch.Tensor, y: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        return y + self.update(x).to(y.dtype)

    def delta_weight(self, layer: AdaptedLayer) -> torch.Tensor:
        return layer.from_2d(self.dense_delta())

    def layer_state(self) -> dict:
        return {"mora_type": self.mora_type, "r_hat": self.r_hat}  # ReMoRA changes the type

    def load_layer_state(self, state: dict, path: str) -> None:
        t = state.get("mora_type", self.mora_type)
        check_type("MoRA", t, self.r_hat, f" in the file's state of '{path}'")
        if state.get("r_hat", self.r_hat) != self.r_hat:
            raise AdaptkitError(f"MoRA: the file has r_hat={state['r_hat']} at '{path}', the spec "
                                f"gives {self.r_hat}; the file is corrupt or was edited")
        self.mora_type = t


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
        return y if self.merged else y + self.update(x).to(y.dtype)

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


# ---- ReMoRA ------------------------------------------------------------------------------
def mora_modules(model: nn.Module, names=None) -> list[tuple[str, AdaptedLayer | None, nn.Module]]:
    """(path, wrapper or None, MoRA module) of every MoRALinear and every MoRA adapter of
    ``names`` (default: the active adapters) in ``model``."""
    out = [(p, None, m) for p, m in model.named_modules() if isinstance(m, MoRALinear)]
    for p, layer in adapted_layers(model):
        for n in (layer._active_names if names is None else names):
            a = layer.adapters[n] if n in layer.adapters else None
            if isinstance(a, MoRAAdapter):
                out.append((f"{p}[{n}]", layer, a))
    return out


@torch.no_grad()
def merge_and_reset_mora_linear(model: nn.Module, cycle: int = 1, optimizer=None,
                                reset_optimizer: str = "adapter", names=None) -> list[str]:
    """One ReMoRA step on every MoRA module: W += ΔW (fp32, cast back to W's dtype; an
    already-merged adapter just keeps its update), M = 0, type ← CYCLES[cycle][type], and
    the optimizer state of M ("adapter") or all state ("all") dropped. Returns the paths."""
    mods = _targets(model, cycle, reset_optimizer, names)
    bad = [p for p, _, m in mods if not torch.isfinite(m.mora_M).all()]
    if bad:
        raise AdaptkitError(f"ReMoRA: non-finite mora_M at {bad}; nothing was merged")
    for p, layer, m in mods:
        if layer is None:
            m.merge()
            m.merged = False  # the base keeps the update; M restarts from 0
        elif m.merged:
            m.merged = False
            layer.set_active(layer._active_names)
        else:
            layer.weight.copy_(m.merge_weight(layer, layer.weight.float()))
        m.reset(CYCLES[cycle].get(m.mora_type))
        if optimizer is not None and reset_optimizer == "adapter":
            optimizer.state.pop(m.mora_M, None)
    if optimizer is not None and reset_optimizer == "all":
        optimizer.state.clear()
    return [p for p, _, _ in mods]


def _targets(model, cycle, reset_optimizer, names):
    if cycle not in CYCLES:
        raise AdaptkitError(f"ReMoRA: cycle={cycle!r} is not one of {sorted(CYCLES)} (1: keep the "
                            f"type, 2: 1<->2, 4: 1->2->3->4->1)")
    if reset_optimizer not in RESETS:
        raise AdaptkitError(f"ReMoRA: reset_optimizer={reset_optimizer!r} is not one of {RESETS}")
    mods = mora_modules(model, names)
    if not mods:
        raise AdaptkitError("ReMoRA: the model has no MoRALinear and no active MoRA adapter; "
                            "use ak.inject(model, ak.MoRA(...)) or apply_mora_linear(model) first")
    off = [f"{p} (type {m.mora_type!r})" for p, _, m in mods
           if cycle != 1 and m.mora_type not in CYCLES[cycle]]
    if off:
        raise AdaptkitError(f"ReMoRA: cycle={cycle} maps types {sorted(CYCLES[cycle])} only, but "
                            f"{off[:4]} use another type; use cycle=1 (keep the type)")
    return mods


def update_model_mora_linear(model: nn.Module, optimizer, step: int, merge_every: int,
                             cycle: int = 2, reset_optimizer: str = "adapter") -> bool:
    """Stateless ReMoRA: merge-and-reset when ``step`` (> 0) is a multiple of ``merge_every``."""
    if step > 0 and step % merge_every == 0:
        merge_and_reset_mora_linear(model, cycle, optimizer, reset_optimizer)
        return True
    return False


class ReMoRA:
    """Periodic merge-and-reset, called once per optimizer step::

        remora = ReMoRA(model, opt, merge_every=2000, cycle=2)
        for batch in data: loss(model, batch).backward(); opt.step(); opt.zero_grad(); remora.step()

    ``merge_every`` defaults to the MoRA spec's (or the MoRALinear's) ``merge_every``.
    ``state_dict()`` / ``load_state_dict()`` keep the step count and current types so a
    resumed run interprets the saved M with the right type."""

    def __init__(self, model: nn.Module, optimizer=None, merge_every: int | None = None,
                 cycle: int = 2, reset_optimizer: str = "adapter", names=None):
        self.model, self.optimizer, self.cycle, self.names = model, optimizer, cycle, names
        self.reset_optimizer, self.steps = reset_optimizer, 0
        mods = _targets(model, cycle, reset_optimizer, names)
        if merge_every is None:
            specs = getattr(model.__dict__.get("_adaptkit"), "specs", {})
            found = {s.merge_every for s in specs.values() if isinstance(s, MoRA)}
            found |= {m.merge_every for _, l, m in mods if l is None}
            found.discard(None)
            merge_every = found.pop() if len(found) == 1 else merge_every
        if isinstance(merge_every, bool) or not isinstance(merge_every, int) or merge_every < 1:
            raise AdaptkitError(f"ReMoRA: merge_every={merge_every!r} must be a positive int (the "
                                f"specs give none or several); pass e.g. merge_every=2000")
        self.merge_every = merge_every

    def step(self) -> bool:
        """Count one step; merge-and-reset every ``merge_every`` steps (returns True then)."""
        self.steps += 1
        return update_model_mora_linear(self.model, self.optimizer, self.steps, self.merge_every,
                                        self.cycle, self.reset_optimizer)

    def state_dict(self) -> dict:
        return {"steps": self.steps,
                "types": {p: m.mora_type for p, _, m in mora_modules(self.model, self.names)}}

    def load_state_dict(self, sd: dict) -> None:
        mods = {p: m for p, _, m in mora_modules(self.model, self.names)}
        if set(sd.get("types", {})) != set(mods):
            raise AdaptkitError(f"ReMoRA.load_state_dict: paths {sorted(sd.get('types', {}))} do "
                                f"not match the model's MoRA modules {sorted(mods)}")
        for p, t in sd["types"].items():
            check_type("ReMoRA", t, mods[p].r_hat, f" at '{p}'")
            mods[p].mora_type = t
        self.steps = int(sd["steps"])


def apply_mora_linear(model: nn.Module, targets=None, exclude=None, **kw) -> list[str]:
    """Swap every plain ``nn.Linear`` of ``model`` whose path fullmatches ``targets`` (regex
    or list; default all) and not ``exclude`` for ``MoRALinear.from_linear(m, **kw)``.
    Subclasses of nn.Linear are left alone (e.g. MultiheadAttention's out_proj, whose owner
    reads its weight directly, would silently lose the update). Returns the paths."""
    def hit(pats, p):
        pats = [pats] if isinstance(pats, str) else pats
        return any(re.fullmatch(q, p) for q in pats)
    paths = [p for p, m in model.named_modules() if p and type(m) is nn.Linear
             and (targets is None or hit(targets, p)) and not (exclude and hit(exclude, p))]
    if not paths:
        raise AdaptkitError(f"apply_mora_linear: no nn.Linear matches targets={targets!r} "
                            f"exclude={exclude!r} (the root module cannot be swapped in place; "
                            f"use MoRALinear.from_linear for it)")
    new = {p: MoRALinear.from_linear(model.get_submodule(p), **kw) for p in paths}
    for p, m in new.items():
        model.set_submodule(p, m)
    return paths
