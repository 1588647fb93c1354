r"""Any adapter as a plain LoRA: per layer, the truncated SVD of the adapter's full update.

    ΔW = W' - W   (fp32, on the (out, in_flat) view; W' = the weight with the adapter merged)
    ΔW ≈ U_k S_k V_kᵀ = B A,   B = U_k √S_k  (out, k),   A = √S_k V_kᵀ  (k, in_flat)
    the new LoRA has alpha = rank at every layer, so s = 1 and delta = B A

For additive methods (LoRA, LoKr, MoRA, GeoLoRA, LoRA-MPO, QLoRA) ΔW is the adapter's
``delta_weight``; for DoRA / QDoRA, whose merge rescales the rows of W, it is the whole
``dense_weight([name]) - dense_weight()``. By Eckart-Young the rank-k truncation is the best
rank-k approximation in Frobenius norm, so a LoRA of rank <= k converts exactly (to fp32
rounding). The rank is fixed (``rank``, capped at min(out, in_flat) per layer) or chosen per
layer (``energy``): the smallest k with Σ_{i<k} S_i² >= energy · Σ S_i² (within 1e-6 for
fp32 rounding), recorded in the new spec's ``rank_pattern``. The report gives per layer
||ΔW - B A||_F / ||ΔW||_F, with A and B rounded to the dtype the adapter holds.

Small layers use the exact ``torch.linalg.svd`` (in fp64: fp32 LAPACK would leave ~1e-6 on
an exactly low-rank update, fp64 ~1e-7); large ones (>= 2^20 entries, rank + 10 at most a
quarter of min(out, in_flat)) a seeded randomised SVD (Halko, Martinsson, Tropp 2011, arXiv
0909.4061: fp32 Gaussian sketch with 10 extra columns, 4 power iterations re-orthonormalised
by QR, the small projected SVD in fp64), which is exact on an update of rank <= the sketch. For ``energy`` the sketch doubles
until it holds the asked energy of the exact ||ΔW||_F², then falls back to the exact SVD.

NF4 bases: the result of a QLoRA / QDoRA adapter is a QLoRA adapter with the same NF4 settings
(blocksize, double_quant, compute_dtype) on the same quantised layers, which a file loads onto
the same bytes. The new spec keeps the source's ``bias`` and ``modules_to_save`` (their
tensors are copied), and its ``dropout`` where it has one.

Residual inits (LoRA / DoRA init "pissa" / "olora", LoRA-MPO) rewrite W to W - ΔW_init when
attached; in a model the original W is gone, so there the LoRA is of the update on the model's
current (residual) W and is exact for this model. The command line, given the original base
(``--base``), rebuilds the residual as loading does and converts the update against the
original W, which is what a PEFT export needs.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from .errors import AdaptkitError
from .inject import check_name, set_active, state
from .io import FORMAT, _version, adapter_tensors, load_tensors
from .layer import Adapter, adapted_layers, stand_in_adapter
from .merge import refuse_sharded
from .methods.lora import LoRA
from .methods.qlora_nf4 import QLoRA
from .spec import AdapterSpec

_ENERGY_TOL = 1e-6  # fp32 singular values: energy=1.0 keeps the numerical rank, not every value
_OVERSAMPLE, _POWER_ITERS = 10, 4


class LoRAConversion(NamedTuple):
    """What :func:`to_lora` did: ``name`` of the new LoRA adapter, per adapted path the kept
    ``ranks`` and the relative ``errors`` ||ΔW - B A||_F / ||ΔW||_F (0 for a zero update)."""

    name: str
    errors: dict[str, float]
    ranks: dict[str, int]

    def __str__(self) -> str:
        w = max([len("layer"), *map(len, self.errors)])  # full paths, as ak.summary / inspect
        rows = [f"{'layer':{w}s} {'rank':>5s} {'rel. error':>11s}"]
        rows += [f"{p:{w}s} {self.ranks[p]:5d} {e:11.3e}" for p, e in self.errors.items()]
        worst = max(self.errors.values(), default=0.0)
        rows.append(
            f"LoRA {self.name!r}: {len(self.errors)} layers, ranks "
            f"{min(self.ranks.values(), default=0)}..{max(self.ranks.values(), default=0)}, "
            f"max relative error {worst:.3e}"
        )
        return "\n".join(rows)


def check_args(rank, energy, owner: str = "to_lora") -> None:
    """Exactly one of ``rank`` (int >= 1) and ``energy`` (0 < energy <= 1)."""
    if (rank is None) == (energy is None):
        raise AdaptkitError(
            f"{owner}: give exactly one of rank (a fixed rank, e.g. rank=16) and "
            f"energy (ranks per layer keeping that share of ΔW's squared singular "
            f"values, e.g. energy=0.99); got rank={rank!r}, energy={energy!r}"
        )
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise AdaptkitError(f"{owner}: rank={rank!r} must be an int >= 1; use e.g. rank=16")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1):
        raise AdaptkitError(
            f"{owner}: energy={energy!r} must be a number in (0, 1]; use e.g. "
            f"energy=0.99 (1.0 keeps the numerical rank)"
        )


# ---- the update and its truncation ---------------------------------------------------------
def is_additive(a: Adapter) -> bool:
    """Whether merging adds ``delta_weight`` (W' = W + ΔW); DoRA's merge rescales rows."""
    return type(a).merge_weight is Adapter.merge_weight


def effective_delta(layer, name: str) -> torch.Tensor:
    """fp32 ΔW of adapter ``name`` on ``layer`` in the native weight shape: ``delta_weight``
    when additive (no cancellation against W), else ``W' - W``."""
    a = layer.adapters[name]
    if is_additive(a):
        return a.delta_weight(layer).float()
    return layer.dense_weight([name]) - layer.dense_weight()


def _rsvd(d: torch.Tensor, q: int, gen: torch.Generator):
    """Top-q SVD of d (m, n) by a randomised range finder (sketch of q columns)."""
    Q = torch.linalg.qr(d @ torch.randn(d.shape[1], q, generator=gen, device=d.device)).Q  # (m, q)
    for _ in range(_POWER_ITERS):  # power iterations sharpen a slowly decaying spectrum
        Q = torch.linalg.qr(d @ torch.linalg.qr(d.t() @ Q).Q).Q
    # the small (q, n) projection and its SVD in fp64: an update of rank <= q comes back to
    # ~1e-7 (fp32 LAPACK alone leaves ~1e-6)
    Ub, S, Vh = torch.linalg.svd(Q.double().t() @ d.double(), full_matrices=False)
    return Q.double() @ Ub, S, Vh


def _exact(m: int, n: int, q: int) -> bool:
    return m * n < (1 << 20) or 4 * (q + _OVERSAMPLE) > min(m, n)


def low_rank(
    d: torch.Tensor,
    rank: int | None = None,
    energy: float | None = None,
    dtype: torch.dtype = torch.float32,
    measure: bool = True,
    where: str = "",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B (m, k), A (k, n), relative error) for a fp32 (m, n) update ``d``: the truncated SVD
    at ``rank`` (capped at min(m, n)) or at the smallest rank holding ``energy``. B and A are
    in ``dtype``; the error is measured with them (NaN unless ``measure``)."""
    d = d.float()
    if not torch.isfinite(d).all():
        raise AdaptkitError(
            f"to_lora: the update{where} has NaN/inf entries; nothing was converted. Check the adapter weights"
        )
    m, n = d.shape
    full = min(m, n)
    total = float(d.pow(2).sum(dtype=torch.float64))
    gen = torch.Generator(device=d.device).manual_seed(0)
    if rank is not None:
        k = min(rank, full)
        U, S, Vh = (
            torch.linalg.svd(d.double(), full_matrices=False) if _exact(m, n, k) else _rsvd(d, k + _OVERSAMPLE, gen)
        )
    else:
        assert energy is not None  # check_args: exactly one of rank / energy
        q = 32
        while True:
            exact = _exact(m, n, q)
            U, S, Vh = torch.linalg.svd(d.double(), full_matrices=False) if exact else _rsvd(d, q + _OVERSAMPLE, gen)
            s2 = S.double().pow(2)
            ref = float(s2.sum()) if exact else total  # the sketch's own sum can't reach ||d||^2
            cum = torch.cumsum(s2, 0) / ref if ref > 0 else torch.ones_like(s2)
            hit = cum >= energy - _ENERGY_TOL
            if exact or bool(hit.any()):
                k = int(hit.nonzero()[0, 0]) + 1 if bool(hit.any()) else len(S)
                break
            q *= 2
    k = max(1, min(k, len(S)))
    root = S[:k].sqrt()
    B = (U[:, :k] * root).to(dtype)  # (m, k)
    A = (root[:, None] * Vh[:k]).to(dtype)  # (k, n)
    if not measure:
        return B, A, math.nan
    if total == 0:
        return B, A, 0.0
    err = float((d - B.float() @ A.float()).pow(2).sum(dtype=torch.float64))
    return B, A, math.sqrt(err / total)


# ---- the new spec and file metadata --------------------------------------------------------
def lora_spec(src: AdapterSpec, ranks: dict[str, int]) -> LoRA:
    """A LoRA (QLoRA with the source's NF4 settings for a QLoRA source) at exactly the paths
    of ``ranks``, scale 1 everywhere (alpha None: alpha = rank), the source's bias mode,
    modules_to_save and dropout (if it has one)."""
    top = max(ranks.values())
    kw: dict[str, Any] = dict(
        rank=top,
        alpha=None,
        targets=[re.escape(p) for p in ranks],
        rank_pattern={re.escape(p): r for p, r in ranks.items() if r != top},
        bias=src.bias,
        modules_to_save=src.modules_to_save,
        dropout=float(getattr(src, "dropout", 0.0)),
    )
    if isinstance(src, QLoRA):
        return QLoRA(**kw, blocksize=src.blocksize, double_quant=src.double_quant, compute_dtype=src.compute_dtype)
    return LoRA(**kw)


def lora_file(
    src: AdapterSpec, factors: dict[str, tuple], layers: dict[str, dict], extras: dict[str, torch.Tensor]
) -> tuple[dict, dict]:
    """(tensors, metadata) of the converted adapter in the adaptkit file layout: ``factors``
    path -> (B, A); ``layers`` the source's layer table; ``extras`` trained biases /
    modules_to_save tensors, copied as they are."""
    spec = lora_spec(src, {p: A.shape[0] for p, (_, A) in factors.items()})
    tensors = dict(extras)
    table = {}
    for p, (B, A) in factors.items():
        tensors[f"{p}.lora_A"], tensors[f"{p}.lora_B"] = A.contiguous(), B.contiguous()
        d = layers[p]
        table[p] = {"method": spec.method, "base": d["base"], "kind": d["kind"], "shape": d["shape"], "state": {}}
    for q in extras:
        mod = q.rsplit(".", 1)[0] if "." in q else ""
        if mod not in table:
            table[mod] = layers.get(mod, {"method": "trained", "base": "unknown"})
    meta = {
        "adaptkit.format": FORMAT,
        "adaptkit.version": _version(),
        "adaptkit.spec": json.dumps(spec.to_dict()),
        "adaptkit.layers": json.dumps(table),
    }
    return tensors, meta


# ---- in a model --------------------------------------------------------------------------
def to_lora(
    model: nn.Module, name: str, rank: int | None = None, energy: float | None = None, new_name: str | None = None
) -> LoRAConversion:
    """Add adapter ``new_name`` (default ``f"{name}_lora"``): a plain LoRA approximating adapter
    ``name`` by a truncated SVD of its update at every layer it adapts (see the module
    docstring). Give ``rank`` (fixed) or ``energy`` (per-layer ranks). The active set is kept
    as it was (the new adapter is inactive; ``ak.set_active(model, [new])`` to use it); the
    source adapter stays. Any problem raises before the model changes.

    Returns a :class:`LoRAConversion` (``name, errors, ranks``; ``print`` it for a table)."""
    st = state(model)
    if name not in st.specs:
        raise AdaptkitError(f"to_lora: no adapter named {name!r}; this model has {sorted(st.specs)}")
    check_args(rank, energy)
    new_name = f"{name}_lora" if new_name is None else new_name
    check_name(model, new_name)
    src = st.specs[name]
    layers = [(p, layer) for p, layer in adapted_layers(model) if name in layer.adapters]
    refuse_sharded(layers, "to_lora")
    params = [p for p, layer in layers if layer.kind == "param"]
    if params:
        raise AdaptkitError(
            f"to_lora: adapter {name!r} adapts parameters {params[:3]} (target_parameters), which "
            f"to_lora does not convert yet; it already is a LoRA / DoRA there (ak.merge or save it as is)"
        )
    merged = [p for p, layer in layers if layer.adapters[name].merged]
    if merged:
        raise AdaptkitError(
            f"to_lora: adapter {name!r} is merged at {merged[:3]}; its update is "
            f"inside W there. Unmerge first (layer.unmerge(), or merge later)"
        )
    tied = [p for p, layer in layers if getattr(layer.adapters[name], "owner", None) is not None]
    if tied:  # TrainableTokens on a tied lm_head: one weight, which two LoRAs would both merge into
        raise AdaptkitError(
            f"to_lora: adapter {name!r} reaches {tied} through a weight tied to another adapted "
            f"layer; a LoRA on each would be merged twice into the one shared weight. Untie the "
            f"weights first (or convert the adapter on a model without tied embeddings)"
        )
    tensors, table = adapter_tensors(model, name)
    own = {f"{p}.{k}" for p, layer in layers for k in layer.adapters[name].state_dict()}
    extras = {q: t for q, t in tensors.items() if q not in own}
    factors = {}
    with torch.no_grad():
        for p, layer in layers:
            B, A, _ = low_rank(
                layer.to_2d(effective_delta(layer, name)), rank, energy, measure=False, where=f" at '{p}'"
            )
            factors[p] = (B, A)
    if layers and _rewrites_base(src, {p: table[p] for p, _ in layers}):
        warnings.warn(
            f"to_lora: adapter {name!r} ({src.method}) rewrote W when attached (a residual "
            f"init), so the LoRA is of its update on this model's residual W, not on the "
            f"original checkpoint; for a LoRA of the original base convert the adapter "
            f"file: python -m adaptkit convert FILE --to-lora --base BASE.safetensors",
            stacklevel=2,
        )
    out, meta = lora_file(src, factors, table, extras)
    active = list(st.active)
    with torch.random.fork_rng(devices=[]):  # building draws LoRA's init; the caller's RNG stays
        load_tensors(model, out, meta, new_name, "to_lora")
    set_active(model, active)
    errors = {}
    with torch.no_grad():  # measured on the adapter as injected (its dtype's rounding included)
        for p, layer in layers:
            d = effective_delta(layer, name)
            ref = float(d.pow(2).sum(dtype=torch.float64))
            res = float((d - layer.adapters[new_name].delta_weight(layer).float()).pow(2).sum(dtype=torch.float64))
            errors[p] = math.sqrt(res / ref) if ref > 0 else math.sqrt(res)
    return LoRAConversion(new_name, errors, {p: A.shape[0] for p, (_, A) in factors.items()})


def _rewrites_base(spec: AdapterSpec, table: dict[str, dict]) -> bool:
    """Whether ``spec``'s adapter writes W when attached (residual inits): built and attached
    on a stand-in (the weight's version counter records a write), with a meta weight (no data)
    or, where building needs data (NF4 quantisation, LoRA-MPO's init), a zero weight of the
    smallest adapted layer."""
    p, d = min(table.items(), key=lambda kv: math.prod(kv[1]["shape"]))
    for w in (None, torch.zeros(d["shape"])):
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                layer, a, _ = stand_in_adapter(spec, d, p, w, None)
                v = layer.weight._version
                a.attach(layer)
                return layer.weight._version != v
        except (RuntimeError, NotImplementedError):  # meta tensors have no data to read
            continue
    return False


# ---- from a file (the command line) --------------------------------------------------------
def file_to_lora(
    tensors: dict,
    meta: dict,
    rank: int | None = None,
    energy: float | None = None,
    weight_of: Callable[[str], torch.Tensor] | None = None,
    where: str = "adapter",
):
    """Convert an adaptkit file's adapter (tensors, metadata) without model code: per adapted
    path a stand-in layer of the recorded kind and shape is rebuilt, the adapter loaded as
    ``ak.load`` does (layer state, attach, tensors), and its update truncated. ``weight_of(path)``
    gives the base weight, needed where the update depends on it (DoRA / QDoRA; residual inits,
    whose update is then taken against this original W). Returns (tensors, metadata, report)."""
    check_args(rank, energy, "convert --to-lora")
    src = AdapterSpec.from_dict(json.loads(meta["adaptkit.spec"]))
    layers = json.loads(meta["adaptkit.layers"])
    paths = [p for p, d in layers.items() if d.get("method") == src.method]
    if not paths:
        raise AdaptkitError(f"{where}: no {src.method} layers to convert")
    if any(layers[p].get("kind") == "param" for p in paths):
        raise AdaptkitError(f"{where}: adapters on parameters (target_parameters) are not converted yet")
    factors, errors, own = {}, {}, set()
    for p in paths:
        d = layers[p]
        w = weight_of(p) if weight_of is not None else None
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            weight = torch.zeros(d["shape"]) if w is None else w.clone()
            layer, a, keys = stand_in_adapter(src, d, p, weight, tensors, f"{where}: ")
            w0, v = layer.dense_weight().clone(), layer.weight._version  # W may be a view of the weight
            a.attach(layer)
            needs_base = layer.weight._version != v or not is_additive(a)
            if needs_base and w is None:
                why = "rescales W's rows" if not is_additive(a) else "rewrites W when attached (a residual init)"
                raise AdaptkitError(
                    f"{where}: {type(src).__name__} {why}, so its update at '{p}' "
                    f"depends on the base weights; give them: --base BASE.safetensors"
                )
            try:
                a.load_state_dict({k: tensors[q] for k, q in keys.items()}, strict=True)
            except RuntimeError as e:  # torch's size-mismatch report
                raise AdaptkitError(
                    f"{where}: '{p}': the adapter's tensors do not fit its spec ({' '.join(str(e).split())[:300]})"
                ) from None
            delta = a.merge_weight(layer, layer.dense_weight()) - w0 if needs_base else a.delta_weight(layer)
            # the file's dtype: B and A are written in it
            dt = next((tensors[q].dtype for q in keys.values() if tensors[q].is_floating_point()), torch.float32)
            B, A, errors[p] = low_rank(layer.to_2d(delta.float()), rank, energy, dt, where=f" at '{p}'")
        factors[p] = (B, A)
        own.update(keys.values())
    extras = {q: t for q, t in tensors.items() if q not in own}
    out, new_meta = lora_file(src, factors, layers, extras)
    return out, new_meta, LoRAConversion("", errors, {p: A.shape[0] for p, (_, A) in factors.items()})
