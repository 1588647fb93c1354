r"""LoRA+ learning rates: optimizer parameter groups with a larger step for the B matrices.

LoRA+ (Hayou, Ghosh, Yu; "LoRA+: Efficient Low Rank Adaptation of Large Models", ICML 2024,
arXiv 2402.12354) shows that with ``ΔW = B A`` (A: (r, n) on the width-n input, B: (n, r) on
the rank-r bottleneck) one learning rate for both is inefficient as the width n grows:
feature learning needs ``η_B / η_A = Θ(n)``. In practice a fixed ratio ``λ = η_B / η_A``
(the paper's default 2^4 = 16) speeds up fine-tuning and often improves it.

    opt = torch.optim.AdamW(ak.param_groups(model, lr=2e-4, ratio=16))

Which parameters count as "B" (the output-side factor of a rank bottleneck), per method:

======================  =================================================================
LoRA, DoRA (and any     ``lora_B`` (out, r); ``lora_A`` stays at ``lr``. DoRA's magnitude
adapter with lora_B)    ``lora_magnitude`` (out,) is not B and stays at ``lr``.
LoRA-MPO, mode "lora"   ``mpo_A`` (out, 1, r): it *is* LoRA's ``lora_B`` (see lorampo.py).
LoRA-MPO, mode "kron"   none: ``ΔW = Σ_k kron(A_k, B_k)`` has no width-n -> r bottleneck.
LoKr, MoRA              none: a Kronecker product / one square matrix; the paper's analysis
                        does not cover them, so every parameter keeps ``lr``.
GeoLoRA                 refused: it trains with ``ak.GeoLoRAOptimizer`` (U, V are kept
                        orthonormal by the integrator, not stepped by a plain optimizer).
======================  =================================================================

An adapter class may set ``loraplus_b = ("name", ...)`` to declare its own B parameters.

Groups (empty ones are left out), in this order; each dict carries a ``"name"``:

* ``"A"``:        every other trainable matrix (ndim >= 2): ``lr``, ``weight_decay``;
* ``"B"``:        the B parameters: ``lr * ratio``, ``weight_decay``;
* ``"no_decay"``: trainable vectors (biases, norm weights of ``modules_to_save``, DoRA
  magnitudes): ``lr``, weight decay 0 (the usual transformers rule; decaying a DoRA
  magnitude would shrink the row norms of W itself);
* ``"embedding"`` (only with ``embedding_lr``): every parameter of adapters on
  ``nn.Embedding`` layers at ``embedding_lr``.

Differences from PEFT's ``peft.optimizers.create_loraplus_optimizer`` (which follows the
authors' reference code): PEFT puts *every* trainable 1-D parameter (biases, norm weights,
DoRA magnitudes) in the ``lr * ratio`` group, with weight decay unless it is a bias or a
norm weight; adaptkit keeps them at ``lr`` without decay, as the paper scales only B. PEFT
always puts embedding adapters at ``loraplus_lr_embedding`` (default 1e-6); adaptkit does so
only when ``embedding_lr`` is given, and otherwise treats their ``lora_B`` (embedding_dim, r)
like any other B. For LoRA's A and B on Linear / Conv / Conv1D layers the two agree
(tests/test_transformers_models.py cross-checks the groups).
"""

from __future__ import annotations

import math
from typing import Any

import torch.nn as nn

from .errors import AdaptkitError
from .layer import adapted_layers
from .methods.geolora import GeoLoRAAdapter


def _b_names(adapter: nn.Module) -> tuple[str, ...]:
    """Names (as in ``adapter.named_parameters()``) of the adapter's B-like parameters."""
    own = getattr(adapter, "loraplus_b", None)
    if own is not None:
        return tuple(own)
    return ("lora_B",)


def _check(fld: str, v: Any, lo: float, strict: bool, hint: str) -> float:
    ok = (
        not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and (v > lo if strict else v >= lo)
    )
    if not ok:
        raise AdaptkitError(
            f"param_groups: {fld}={v!r} must be a finite number {'>' if strict else '>='} {lo:g}; {hint}"
        )
    return float(v)


def param_groups(
    model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0, *, embedding_lr: float | None = None
) -> list[dict[str, Any]]:
    """LoRA+ parameter groups for any ``torch.optim`` optimizer (see the module docstring).

    model:        a model with injected, active adapters; only ``requires_grad`` parameters
                  are included (inactive adapters and the frozen base are left out), each
                  in exactly one group.
    lr:           η_A, the learning rate of every parameter that is not B.
    ratio:        λ = η_B / η_A >= 1 (paper default 16; 1 gives plain LoRA).
    weight_decay: for the matrices (groups "A", "B", "embedding"); vectors get 0.
    embedding_lr: None, or the learning rate of every adapter parameter on an Embedding
                  (PEFT's ``loraplus_lr_embedding``).
    """
    if not isinstance(model, nn.Module):
        raise AdaptkitError(
            f"param_groups: expected the model (an nn.Module), got "
            f"{type(model).__name__}; pass the model, not model.parameters()"
        )
    lr = _check("lr", lr, 0.0, True, "use e.g. lr=2e-4")
    ratio = _check(
        "ratio",
        ratio,
        1.0,
        False,
        "it is η_B / η_A (the paper uses 16; 1 is plain LoRA); pass ratio=16, not its inverse",
    )
    weight_decay = _check("weight_decay", weight_decay, 0.0, False, "use e.g. weight_decay=0.0")
    if embedding_lr is not None:
        embedding_lr = _check(
            "embedding_lr",
            embedding_lr,
            0.0,
            True,
            "use e.g. embedding_lr=1e-6 (PEFT's default) or None to treat embeddings like other layers",
        )
    role: dict[int, str] = {}  # id(param) -> "B" | "embedding" for adapter parameters
    geo, any_b = [], False
    for path, layer in adapted_layers(model):
        for name, a in layer.adapters.items():
            if isinstance(a, GeoLoRAAdapter):
                if any(p.requires_grad for p in a.parameters()):
                    geo.append(f"'{path}' ({name!r})")
                continue
            b = set(_b_names(a))
            for k, p in a.named_parameters():
                any_b = any_b or (k in b and p.requires_grad)
                if embedding_lr is not None and layer.kind == "embedding":
                    role[id(p)] = "embedding"
                elif k in b:
                    role[id(p)] = "B"
    if geo:
        raise AdaptkitError(
            f"param_groups: trainable GeoLoRA adapter(s) at {', '.join(geo[:4])}"
            f"{' ...' if len(geo) > 4 else ''}; GeoLoRA trains with "
            f"ak.GeoLoRAOptimizer(model, lr=...), to which LoRA+ does not apply. "
            f"Deactivate them (ak.set_active) or use GeoLoRAOptimizer"
        )
    spec = {
        "A": (lr, weight_decay),
        "B": (lr * ratio, weight_decay),
        "no_decay": (lr, 0.0),
        "embedding": (embedding_lr, weight_decay),
    }
    groups: dict[str, list] = {k: [] for k in spec}
    seen: set[int] = set()
    for _, p in model.named_parameters():  # named_parameters() yields a shared tensor once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        groups[role.get(id(p)) or ("A" if p.dim() >= 2 else "no_decay")].append(p)
    if not seen:
        raise AdaptkitError(
            "param_groups: the model has no trainable parameter; inject an adapter "
            "first (ak.inject(model, ak.LoRA(...))) or ak.set_active one"
        )
    if not any_b:
        methods = sorted({s.method for s in getattr(model.__dict__.get("_adaptkit"), "specs", {}).values()})
        raise AdaptkitError(
            f"param_groups: no trainable LoRA+ 'B' parameter in the model (its "
            f"adapter methods: {methods or 'none'}); LoRA+ applies to lora_B of "
            f"LoRA / DoRA and mpo_A of LoRAMPO(mode='lora'). For other methods "
            f"use a plain optimizer over the trainable parameters"
        )
    return [{"name": k, "params": v, "lr": spec[k][0], "weight_decay": spec[k][1]} for k, v in groups.items() if v]
