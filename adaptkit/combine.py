"""Weighted combination of LoRA adapters into a new adapter.

    delta_mix = sum_i w_i * delta_i        (per layer; delta_i = s_i B_i A_i)

"cat" is exact: A = [A_1; A_2; ...] (sum r_i, in), B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]
(out, sum r_i), scale 1. "svd" truncates the exact sum of the adapters' ``delta_weight``s
to ``rank`` by SVD (the best rank-r approximation, Eckart-Young). Unlike PEFT's add_weighted_adapter, inputs it cannot
combine as promised (DoRA or other non-linear methods, merged adapters, trained biases or
modules_to_save) are refused instead of silently approximated (PEFT #3761, #3737).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn

from .errors import AdaptkitError
from .inject import attach, plan, refresh, state
from .layer import adapted_layers
from .methods.lora import LoRA


def combine(
    model: nn.Module, weights: dict[str, float], name: str = "combined", method: str = "cat", rank: int | None = None
) -> list[str]:
    """Add adapter ``name`` = sum of ``weights[a] * adapter a`` and make it the only active
    one. ``method``: "cat" (exact) or "svd" (truncated to ``rank``, default the largest
    input rank). Returns the adapted paths."""
    st = state(model)
    if not isinstance(weights, dict) or not weights:
        raise AdaptkitError("combine: weights must be a non-empty dict {adapter name: weight}")
    for a, w in weights.items():
        if a not in st.specs:
            raise AdaptkitError(f"combine: unknown adapter {a!r}; this model has {sorted(st.specs)}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise AdaptkitError(f"combine: weight for {a!r} must be a finite number, got {w!r}")
        if type(st.specs[a]) is not LoRA:
            raise AdaptkitError(
                f"combine: adapter {a!r} is {st.specs[a].method}; only plain LoRA "
                f"adapters combine exactly (their deltas are linear in the weights)"
            )
        if st.extras.get(a):
            raise AdaptkitError(
                f"combine: adapter {a!r} also trains {st.extras[a][:3]}... (bias / "
                f"modules_to_save), which a weighted sum of deltas cannot express"
            )
    if method not in ("cat", "svd"):
        raise AdaptkitError(f"combine: method={method!r}; use 'cat' (exact) or 'svd' (truncated)")
    if rank is not None and method == "cat":
        raise AdaptkitError("combine: rank applies to method='svd' only; 'cat' keeps sum of ranks")
    parts: dict[str, list] = {}
    for path, layer in adapted_layers(model):
        for a, w in weights.items():
            if a in layer.adapters:
                ad = layer.adapters[a]
                if ad.merged:
                    raise AdaptkitError(f"combine: adapter {a!r} is merged at '{path}'; unmerge first")
                parts.setdefault(path, []).append((w, ad, layer))
    ranks = {}
    for p, items in parts.items():
        r = sum(ad.rank for _, ad, _ in items) if method == "cat" else (rank or max(ad.rank for _, ad, _ in items))
        ranks[p] = min(r, min(items[0][2].in_features, items[0][2].out_features)) if method == "svd" else r
    spec = LoRA(
        rank=max(ranks.values()),
        targets=[re.escape(p) for p in parts if parts[p][0][2].kind != "param"],
        target_parameters=[re.escape(p) for p in parts if parts[p][0][2].kind == "param"] or None,
        rank_pattern={re.escape(p): ranks[p] for p in parts},
        alpha_pattern={re.escape(p): float(ranks[p]) for p in parts},
    )  # scale 1
    built, extras = plan(model, spec, name, paths=list(parts))
    with torch.no_grad():
        for p, _, new in built:
            A, B = _combined(parts[p], method, ranks[p])
            new.lora_A.copy_(A)
            new.lora_B.copy_(B)
    paths = attach(model, spec, name, built, extras)
    st.active = [name]
    refresh(model)
    return paths


def _combined(items, method: str, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r', in_flat), B (out, r')) of the new adapter at scale 1 from (w_i, adapter_i,
    layer) items: "cat" stacks the factors (exact, r' = sum r_i); "svd" keeps the top r
    terms of sum_i w_i delta_i, each delta_i the adapter's own ``delta_weight``."""
    if method == "cat":
        # rank dims -2 / -1: a 3-D parameter's factors are (E, r, in) / (E, out, r), per expert
        A = torch.cat([ad.lora_A.float() for _, ad, _ in items], -2)  # (*lead, sum r_i, in_flat)
        B = torch.cat([w * ad.scale * ad.lora_B.float() for w, ad, _ in items], -1)  # (*lead, out, sum r_i)
        return A, B
    delta = sum(w * layer.to_2d(ad.delta_weight(layer)) for w, ad, layer in items)  # (*lead, out, in_flat)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)  # (*lead, out, q), (*lead, q), (*lead, q, in_flat)
    return Vh[..., :r, :], U[..., :r] * S[..., None, :r]
