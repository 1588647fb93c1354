"""Merge adapters into the base weights and hand back the plain model.

Every merge accumulates in fp32 (PEFT pain #3: bf16 merged != unmerged) and is checked for
NaN/inf on every layer *before* any weight changes, so a bad adapter cannot leave a model
half-merged.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from .errors import AdaptkitError
from .inject import refresh, state
from .io import _is_sharded
from .layer import AdaptedLayer, adapted_layers

_EXPORT = (
    "call ak.save(model, path) on every rank, ak.load the file into an unsharded copy of the base model, and {} that"
)


def refuse_sharded(layers: list[tuple[str, AdaptedLayer]], what: str, fix: str = _EXPORT) -> None:
    """AdaptkitError if any adapted layer holds DTensor shards (FSDP2 ``fully_shard``, tensor
    parallel): folding or decomposing an update needs whole weights, which no rank has."""
    sharded = [p for p, layer in layers if any(_is_sharded(t) for t in layer.parameters())]
    if sharded:
        raise AdaptkitError(
            f"{what}: the model is sharded (DTensor parameters at {sharded[:3]}, e.g. FSDP2 "
            f"fully_shard) and this needs whole weights; nothing was changed. To do it, {fix.format(what)}"
        )


def _check_finite(model: nn.Module) -> None:
    bad = []
    for path, layer in adapted_layers(model):
        names = [n for n in layer._active_names if n in layer.adapters and not layer.adapters[n].merged]
        if not names:
            continue
        # computed again by the merge below: keeping every merged weight until all pass
        # would hold a dense copy of the whole model (a quantised one included)
        if not torch.isfinite(layer.dense_weight(names)).all():
            bad.append(f"'{path}' (adapters {names})")
    if bad:
        raise AdaptkitError(
            f"merge: non-finite (NaN/inf) merged weight at {', '.join(bad)}; "
            f"nothing was merged. Inspect or retrain those adapters"
        )


def merge(model: nn.Module, unload: bool = True, requantize: bool = False) -> nn.Module:
    """Fold the active adapters into the base weights.

    unload=True (default): drop every adapter (inactive ones are discarded) and restore the
    original module classes, state-dict keys and ``requires_grad`` flags; the returned model
    has no trace of adaptkit and loads a base checkpoint with ``strict=True``. A QLoRA
    layer comes back as a dense ``nn.Linear`` in its weight's pre-quantisation dtype
    (dequantised W + delta, summed in fp32): never silently re-quantised.
    unload=False: merge in place and keep the adapters, so ``unmerge(model)`` can undo it.
    requantize=True (with unload): QLoRA layers come back re-quantised to NF4 instead; each
    records the output drift this caused in ``.requant_drift`` and a warning reports the
    largest (see ``adaptkit.nf4.drift_report``).
    """
    st = state(model)
    layers = adapted_layers(model)
    refuse_sharded(layers, "merge")
    if requantize and not (unload and any(not l.weight.is_floating_point() for _, l in layers)):
        raise AdaptkitError(
            "merge: requantize=True needs unload=True and a model with quantised "
            "(QLoRA / NF4) adapted layers; nothing was merged"
        )
    _check_finite(model)
    drift = {}
    for path, layer in layers:  # each layer's active set is the model's (or its own: MoRALinear)
        layer.merge(check=False)
        if unload:
            new = layer.unload(requantize)
            if new is None:  # a parameter's layer (adaptkit/param_base.py) took itself out
                continue
            if not path:
                model = new  # the root itself was adapted (e.g. a lone ak.MoRALinear)
                continue
            model.set_submodule(path, new)
            if (rd := getattr(new, "requant_drift", None)) is not None:
                drift[path] = rd["max_rel_output"]
    if drift:
        worst = max(drift, key=lambda p: drift[p])
        warnings.warn(
            f"merge(requantize=True): re-quantising {len(drift)} merged layer(s) to NF4 "
            f"changed their outputs by up to {drift[worst]:.2%} (relative, at '{worst}'); "
            f"per layer: module.requant_drift or adaptkit.nf4.drift_report(model)",
            stacklevel=2,
        )
    if unload and "_adaptkit" in model.__dict__:  # nothing injected: leave requires_grad alone
        for n, p in model.named_parameters():
            p.requires_grad_(st.frozen_from.get(n, True))
        if st.input_hook is not None:  # the gradient-checkpointing hook of inject
            st.input_hook.remove()
        model.__dict__.pop("_adaptkit", None)
    else:
        refresh(model)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge(model, unload=False)`` on every layer."""
    layers = adapted_layers(model)
    merged = [(p, l) for p, l in layers if any(a.merged for a in l.adapters.values())]
    refuse_sharded(merged, "unmerge", "unmerge before fully_shard (or re-load the base and the adapter file)")
    for _, layer in layers:
        layer.unmerge()
    refresh(model)
    return model
