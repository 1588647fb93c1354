"""``ak.swap``: new weights into an existing adapter slot, in place (docs/ARCHITECTURE.md, "Swap").

    ak.inject(model, ak.LoRA(rank=16, alpha=32, targets=...), name="a")   # the slot
    f = torch.compile(model)
    ak.swap(model, "other.safetensors", name="a")     # f does not recompile

Nothing a compiled graph guards on may change: a swap copies tensors into the slot's
existing Parameters (``copy_`` under ``no_grad``: same objects, shapes, dtypes and devices)
and never touches a Python attribute (``scale``, ``rank``, flags). (Inductor's
``freezing`` option, which bakes parameters into the generated code, would not see a swap.) So:

* **Rank**: the slot's rank is its capacity. A file of rank r <= R (the slot's) is
  zero-padded: ``A[:r] = A_f, A[r:] = 0`` and ``B[:, :r] = B_f, B[:, r:] = 0``, so
  ``B A = B_f A_f`` exactly (LoRA, DoRA, QLoRA / QDoRA). Reserve a larger rank by injecting
  the slot with it (``ak.LoRA(rank=32, ...)``); a saved slot is then an ordinary rank-32 file.
* **Scale**: the slot keeps its scale s; the file's s_f enters as one factor on the
  parameter the update is linear in, ``B <- (s_f / s) B_f`` (LoRA-MPO: core 1, GeoLoRA: S,
  LoKr: w1 / w1_a), so ``s B = s_f B_f`` and any alpha / rsLoRA setting swaps in. ``ak.save``
  after a swap writes the slot's spec with these tensors: it loads back to the same outputs.
* **Everything else must match** (method, every spec field that changes the computation,
  the adapted layers and their shapes, the per-layer state): one error lists every
  mismatch, naming layer / key / field and the fix, and nothing is copied.

Per method: LoRA, DoRA, QLoRA pad and fold. LoKr, MoRA and GeoLoRA swap same-shape tensors
(LoKr's rank may differ when its factors are full; GeoLoRA's active rank and MoRA's r̂ and
type must equal the slot's). Residual inits (LoRA / DoRA ``init="pissa"`` / ``"olora"``,
LoRA-MPO always) wrote ``W - s B0 A0`` into the frozen base at inject, which depends on the
rank (and for OLoRA on s, too): they swap only at the slot's rank (and scale), same init.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn as nn

from .errors import AdaptkitError
from .inject import check_model, state
from .io import _is_sharded, parse_meta, read
from .layer import adapted_layers, weight_shape
from .methods.lora import lora_scale
from .spec import AdapterSpec

# spec fields a swap may change: the rank (zero-padded), alpha / rsLoRA (folded into one
# factor), how the layers were selected (the adapted layers themselves are compared), init
# (weights come from the file; residual inits are checked apart)
SWAPPABLE = frozenset(
    {"rank", "alpha", "rank_pattern", "alpha_pattern", "use_rslora", "init"}
    | {"targets", "exclude", "layers_to_transform", "layers_pattern"}
)


def _lora_scale(spec, path: str, adapter) -> float:
    return lora_scale(spec.alpha_for(path), spec.rank_for(path), spec.use_rslora)


def _lokr_scale(spec, path: str, adapter) -> float:
    # the same factor structure as the slot's (its parameter names are compared), so full1 /
    # full2 are the slot's
    if spec.scale_mode == "lycoris" and adapter.full1 and adapter.full2:
        return 1.0
    return spec.alpha_for(path) / spec.rank_for(path)


def _residual(spec) -> tuple[str, ...]:
    """What an init that rewrote the base weight fixes: the top-r part W - s B0 A0 depends on
    r (PiSSA's and the Kronecker SVD's s B0 A0 do not depend on s; OLoRA's Q_r R_r is scaled)."""
    init = getattr(spec, "init", "default")
    if spec.method == "lorampo" or init == "pissa":
        return ("rank",)
    return ("rank", "scale") if init == "olora" else ()


@dataclass(frozen=True)
class _Rule:
    fold: tuple[str, ...]  # parameter(s) the update is linear in; the first present takes s_f / s
    pad: dict[str, int]  # parameter -> its rank axis, zero-padded up to the slot's rank
    scale: Callable  # (spec, path, slot adapter) -> the scale a normal load gives the file's adapter


_LORA = _Rule(("lora_B",), {"lora_A": 0, "lora_B": 1}, _lora_scale)
RULES: dict[str, _Rule] = {
    "lora": _LORA,
    "dora": _LORA,
    "qlora": _LORA,
    "lorampo": _Rule(("mpo_B",), {}, _lora_scale),
    "lokr": _Rule(("lokr_w1", "lokr_w1_a"), {}, _lokr_scale),
    "geolora": _Rule(("S",), {}, lambda spec, path, a: spec.alpha_for(path) / spec.rank_for(path)),
    "mora": _Rule((), {}, lambda spec, path, a: 1.0),
    "trainable_tokens": _Rule((), {}, lambda spec, path, a: 1.0),  # the rows, copied as they are
}


def _unwrap(model):
    """The model under ``torch.compile``'s wrapper (OptimizedModule keeps it as ``_orig_mod``),
    so the compiled model itself may be passed."""
    if "_adaptkit" in getattr(model, "__dict__", {}):
        return model
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def _spec_problems(slot: AdapterSpec, spec: AdapterSpec) -> list[str]:
    """Fields that differ and change the computation (or the file's meaning)."""
    if spec.method != slot.method:
        return [
            f"method: file {spec.method!r}, slot {slot.method!r} (a swap keeps the slot's method; "
            f"ak.delete the slot and ak.load the file to change it)"
        ]
    out = []
    for f in fields(slot):
        a, b = getattr(spec, f.name), getattr(slot, f.name)
        if f.name not in SWAPPABLE and a != b:
            out.append(f"field {f.name}: file {a!r}, slot {b!r}")
    ia, ib = getattr(spec, "init", None), getattr(slot, "init", None)
    if (_residual(slot) or _residual(spec)) and ia != ib:
        out.append(
            f"field init: file {ia!r}, slot {ib!r} (a residual init changed the base "
            f"weight at inject, so the inits must be equal)"
        )
    if out:
        out[-1] += "; the slot compiles another computation: inject a slot with the file's settings"
    return out


def _wide(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # fp32, or fp64 for an fp64 file


def _layer_plan(path, layer, a, spec, entry, tensors, rule, residual, extras):
    """(problems, {param: slot-shaped tensor}) of one adapted layer; nothing is copied here.
    A problem is a template with ``\0`` where the layer goes: the same mismatch on many
    layers is reported once, naming them all (:func:`_grouped`)."""
    if entry.get("kind") != layer.kind or entry.get("shape") != weight_shape(layer):
        return [
            f"\0: file {entry.get('base')} weight {entry.get('shape')}, slot {layer._base_cls.__name__} weight "
            f"{weight_shape(layer)} (the file is for another model: swap it into the model it was saved from)"
        ], {}
    if json.loads(json.dumps(a.layer_state())) != entry.get("state", {}):
        return [
            f"\0: per-layer state: file {entry.get('state', {})}, slot {a.layer_state()} (an active rank, "
            f"r_hat, MoRA type or factor shape, compiled in: inject the slot with the file's settings)"
        ], {}
    sd = a.state_dict()
    # the file's keys of this adapter: directly under the layer's path (a trained bias of the
    # layer, ``<path>.bias``, is one of the slot's extras, compared with the others)
    n = len(path) + 1
    have = {k[n:] for k in tensors if k.startswith(path + ".") and "." not in k[n:] and k not in extras}
    missing, unexpected = sorted(set(sd) - have), sorted(have - set(sd))
    if missing or unexpected:
        parts = [f"the file lacks tensors {missing}"] * bool(missing)
        parts += [f"the file has tensors {unexpected} the slot lacks"] * bool(unexpected)
        return [
            f"\0: {' and '.join(parts)} (another factor structure, e.g. a LoKr rank crossing a full / "
            f"low-rank threshold, or a corrupt file: inject the slot with the file's rank)"
        ], {}
    s_slot, s_file = float(getattr(a, "scale", 1.0)), float(rule.scale(spec, path, a))
    if "scale" in residual and s_file != s_slot:
        return [
            f"\0: scale file {s_file:g}, slot {s_slot:g} (OLoRA's residual base depends on it: inject "
            f"the slot with the file's alpha)"
        ], {}
    fold, ratio = next((k for k in rule.fold if k in sd), None), s_file / s_slot
    if ratio != 1.0 and fold is None:
        return [f"\0: scale file {s_file:g}, slot {s_slot:g}, and {spec.method} has no factor to fold it into"], {}
    out = {}
    for k, want in sd.items():
        t, (got, shape) = tensors[f"{path}.{k}"], (tuple(tensors[f"{path}.{k}"].shape), tuple(want.shape))
        if got != shape:
            ax = rule.pad.get(k)
            pads = ax is not None and not residual and len(got) == len(shape)
            pads = pads and all(g == w for i, (g, w) in enumerate(zip(got, shape)) if i != ax)
            if not pads:
                why = "a residual init fixes the rank" if residual else f"{spec.method} swaps same shapes only"
                return [f"\0: {k} file {got} vs slot {shape} ({why}: inject the slot at the file's rank)"], {}
            if got[ax] > shape[ax]:
                return [
                    f"\0: {k} has rank {got[ax]} > the slot's rank {shape[ax]}; inject the slot with "
                    f"rank >= {got[ax]} (the slot's rank is its capacity)"
                ], {}
            if got[ax] != spec.rank_for(path):
                return [
                    f"\0: {k} has rank {got[ax]} but the file's spec gives rank {spec.rank_for(path)}; "
                    f"the file is corrupt or was edited: re-save it with ak.save"
                ], {}
            full = torch.zeros(shape, dtype=_wide(t))
            full[tuple(slice(0, d) for d in got)] = t  # zero-padded rank
            t = full
        if k == fold and ratio != 1.0:
            t = t.to(_wide(t)) * ratio  # s * (s_f / s) B_f = s_f B_f
        out[k] = t
    return [], out


def _grouped(per_layer: dict[str, list[str]]) -> list[str]:
    """One message per distinct template, naming its layers (at most 3, then a count)."""
    groups: dict[str, list[str]] = {}
    for path, msgs in per_layer.items():
        for m in msgs:
            groups.setdefault(m, []).append(path)
    out = []
    for m, paths in groups.items():
        shown = ", ".join(f"'{p}'" for p in paths[:3]) + (f", ... ({len(paths)} layers)" if len(paths) > 3 else "")
        out.append(m.replace("\0", f"layer{'s' * (len(paths) > 1)} {shown}"))
    return out


def swap(model: nn.Module, path: str | os.PathLike, name: str = "default") -> list[str]:
    """Copy the adapter saved at ``path`` (by ``ak.save``) into the model's adapter ``name``,
    in place, so that a compiled model runs it without recompiling. Returns the swapped
    layer paths.

    The file's rank may be below the slot's (zero-padded) and its alpha / rsLoRA anything
    (folded into one factor); everything else must match the slot (module docstring). Every
    problem is reported in one AdaptkitError before any tensor is copied."""
    check_model(model, "swap")
    model = _unwrap(model)
    st = state(model)
    if name not in st.specs:
        raise AdaptkitError(
            f"swap: no adapter named {name!r}; this model has {sorted(st.specs)}. A swap fills an "
            f"existing slot: ak.inject(model, spec, name={name!r}) or ak.load(model, file, name={name!r}) first"
        )
    where = f"swap '{os.fspath(path)}' into {name!r}"
    tensors, meta = read(path)
    spec, table = parse_meta(meta, os.fspath(path))
    slot = st.specs[name]
    problems = _spec_problems(slot, spec)
    if problems:
        raise AdaptkitError(f"{where}: " + "; ".join(problems) + ". Nothing was swapped")
    rule = RULES.get(slot.method)
    if rule is None:
        raise AdaptkitError(
            f"{where}: method {slot.method!r} has no swap rule; ak.delete the slot and ak.load the file"
        )
    layers = {p: l for p, l in adapted_layers(model) if name in l.adapters}
    files = {p: d for p, d in table.items() if d.get("method") == spec.method}
    if set(files) != set(layers):
        miss, extra = sorted(set(layers) - set(files)), sorted(set(files) - set(layers))
        parts = [f"the slot's {miss} are not in the file"] * bool(miss)
        parts += [f"the file's {extra} are not in the slot"] * bool(extra)
        problems.append(f"adapted layers differ: {', '.join(parts)}; inject a slot with the file's targets")
    merged = sorted(p for p, l in layers.items() if l.adapters[name].merged)
    if merged:
        problems.append(f"the slot is merged into {merged}; unmerge it first (adaptkit.merge.unmerge(model))")
    sharded = sorted(p for p, l in layers.items() if any(_is_sharded(t) for t in l.adapters[name].parameters()))
    if sharded:
        problems.append(f"the slot is sharded (DTensor) at {sharded[:3]}; swap before fully_shard")
    plans, residual = {}, _residual(slot)
    extras = st.extras.get(name, [])
    bad = {}
    for p in sorted(set(files) & set(layers)):
        a = layers[p].adapters[name]
        bad[p], plans[p] = _layer_plan(p, layers[p], a, spec, files[p], tensors, rule, residual, set(extras))
    problems += _grouped(bad)
    params = dict(model.named_parameters())
    if not problems:  # every adapter key is accounted for: the rest must be the slot's extras
        rest = set(tensors) - {f"{p}.{k}" for p in plans for k in plans[p]}
        if rest != set(extras):
            problems.append(
                f"trained modules / biases differ: the file has {sorted(rest - set(extras))} the slot "
                f"lacks and lacks {sorted(set(extras) - rest)}; inject the slot with the file's "
                f"modules_to_save / bias settings"
            )
    for q in extras if not problems else []:
        if tuple(tensors[q].shape) != tuple(params[q].shape):
            problems.append(f"{q}: file {tuple(tensors[q].shape)} vs model {tuple(params[q].shape)}")
    if problems:
        shown = "; ".join(problems[:12]) + (f"; ... ({len(problems)} problems)" if len(problems) > 12 else "")
        raise AdaptkitError(f"{where}: {shown}. Nothing was swapped")
    with torch.no_grad():  # in place: the same Parameters, so compiled graphs stay valid
        for p, sd in plans.items():
            layers[p].adapters[name].load_state_dict(sd, strict=True)
        for q in extras:
            params[q].copy_(tensors[q])
    return sorted(plans)
