"""Module swapping, freezing, named adapters and the active set.

``inject`` is plan -> build -> attach: matching and building never touch the model, so a
failed inject (bad rank, unsupported module, ...) leaves it exactly as it was. Active
adapters are the trainable ones; an inactive adapter is frozen and skipped in forward.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn as nn

from .errors import AdaptkitError
from .layer import AdaptedLayer, adapted_layers, base_kind, wrap
from .param_base import ParamLayer, find, module_at
from .spec import AdapterSpec
from .targets import read_by_parent, saved_modules, select

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


@dataclass
class State:
    """adaptkit's bookkeeping, kept in ``model.__dict__`` (outside the state dict)."""

    specs: dict[str, AdapterSpec] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    # adapter name -> qualified names of non-adapter parameters it trains and saves
    extras: dict[str, list[str]] = field(default_factory=dict)
    # requires_grad of every parameter before the first inject, restored by merge
    frozen_from: dict[str, bool] = field(default_factory=dict)
    # handle of the _InputGrads hook on the input embeddings (see sync_input_grads)
    input_hook: Any = None


def check_model(model: Any, where: str = "adaptkit") -> None:
    """Refuse anything but a module as the model argument of a public entry point; a path,
    a state dict or ``model.parameters()`` would otherwise fail deep inside with an
    AttributeError that names no argument."""
    if not isinstance(model, nn.Module):
        raise AdaptkitError(
            f"{where}: the model argument must be a torch.nn.Module, got {type(model).__name__} "
            f"{_short(model)}; pass the model object itself (not a path, its state_dict() or "
            f"its parameters())"
        )


def _short(x: Any) -> str:
    try:
        r = repr(x)
    except Exception:  # noqa: BLE001 - any object's __repr__ (or a deeply nested one)
        return "<unprintable>"
    return r if len(r) <= 60 else r[:57] + "..."


def state(model: nn.Module) -> State:
    """The model's adaptkit state; an empty, unattached one if nothing was injected (so a
    failed inject leaves no trace on the model). Checks that ``model`` is a module, so every
    entry point that starts here refuses a wrong argument clearly."""
    check_model(model)
    return model.__dict__.get("_adaptkit") or State()


def check_name(model: nn.Module, name: str, where: str = "inject") -> None:
    """``where`` is the entry point the user called (inject, load), named in the error."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AdaptkitError(
            f"{where}: adapter name {name!r} must be an identifier-like string "
            f"(letters, digits, '_', '-'; no dots); use e.g. name='default'"
        )
    if name in state(model).specs:
        raise AdaptkitError(
            f"{where}: an adapter named {name!r} already exists on this model; "
            f"ak.delete(model, {name!r}) first, or {where} it under another name "
            f"(name='{name}_2')"
        )


def plan(
    model: nn.Module, spec: AdapterSpec, name: str, paths: list[str] | None = None, layer_states: dict | None = None
):
    """Build wrappers and adapters for ``paths`` (default: the spec's matches) without
    mutating the model. Every problem is collected and raised as one error."""
    if not isinstance(spec, AdapterSpec):
        raise AdaptkitError(f"inject: expected a spec such as ak.LoRA(...), got {type(spec).__name__}")
    check_name(model, name)
    paths = select(model, spec) if paths is None else paths
    paths = getattr(spec, "tied_paths", lambda _, p: p)(model, paths)  # TrainableTokens: + a tied lm_head
    errors, built = [], []
    for path in paths:
        try:
            m = find(model, path)  # a parameter path: its ParamLayer (adaptkit/param_base.py)
        except AdaptkitError as e:
            errors.append(str(e))
            continue
        if m is None:
            errors.append(f"no module at '{path}'")
            continue
        kind = base_kind(m)
        if kind == "param" and not spec.supports(kind):
            errors.append(
                f"{type(spec).__name__} cannot adapt '{path}' (a {cast(AdaptedLayer, m).weight.dim()}-D parameter of "
                f"{cast(AdaptedLayer, m)._base_cls.__name__}); narrow target_parameters (ak.LoRA and ak.DoRA adapt parameters)"
            )
            continue
        if kind is None or not spec.supports(kind):
            errors.append(
                f"{type(spec).__name__} cannot adapt '{path}' ({type(m).__name__}); exclude it or narrow targets"
            )
            continue
        if kind != "param" and read_by_parent(model, path):
            errors.append(
                f"'{path}' is an nn.MultiheadAttention's out_proj, whose weight the "
                f"attention reads without calling it, so an adapter there would be "
                f"ignored; exclude it (or build the attention from nn.Linear layers)"
            )
            continue
        try:
            layer = wrap(spec.prepare_base(m, path))  # QLoRA: an NF4 copy of a float Linear
            adapter = spec.build(layer, path)
            if layer_states and path in layer_states:
                adapter.load_layer_state(layer_states[path], path)
        except AdaptkitError as e:
            errors.append(str(e))
            continue
        built.append((path, layer, adapter))
    if hasattr(spec, "link") and not errors:  # TrainableTokens: tie the adapters sharing one weight
        errors += spec.link(built)
    extras: list[str] = []
    try:
        for p in saved_modules(model, cast(tuple, spec.modules_to_save)):  # a tuple after __post_init__
            if any(p == q or q.startswith(p + ".") or p.startswith(q + ".") for q in paths):
                errors.append(f"modules_to_save '{p}' overlaps adapted module(s); exclude it from targets")
            extras += [f"{p}.{k}" for k, _ in model.get_submodule(p).named_parameters()]
    except AdaptkitError as e:
        errors.append(str(e))
    if spec.bias != "none":
        scope = paths if spec.bias == "adapter_only" else [n for n, _ in model.named_modules()]
        for p in scope:
            owner = module_at(model, p)  # None at a parameter path: it has no bias of its own
            b = None if owner is None or isinstance(owner, ParamLayer) else owner._parameters.get("bias")
            if b is not None and f"{p}.bias".lstrip(".") not in extras:
                extras.append(f"{p}.bias".lstrip("."))
    if errors:
        raise AdaptkitError(plan_error(spec, name, errors, paths))
    return built, extras


_QUOTED = re.compile(r"'([^']*)'")


def plan_error(spec: AdapterSpec, name: str, errors: list[str], paths: list[str]) -> str:
    """One message for all of plan's problems. A wrong rank is usually wrong on every layer,
    so problems that differ only by the quoted layer path become one clause naming the
    layers, and the method name the per-layer checks start with is not repeated after the
    message's own prefix."""
    from .spec import METHODS

    own = type(spec).__name__
    prefixes = tuple(f"{n}: " for n in {own, *(c.__name__ for c in METHODS.values())})
    known = set(paths)
    groups: dict[str, list[str]] = {}
    for msg in errors:
        msg = next((msg[len(p) :] for p in prefixes if msg.startswith(p)), msg)
        hit = next((m for m in _QUOTED.finditer(msg) if m.group(1) in known), None)
        if hit is None:
            groups.setdefault(msg, [])
        else:
            groups.setdefault(msg[: hit.start()] + "\0" + msg[hit.end() :], []).append(hit.group(1))
    parts = []
    for template, where in groups.items():
        shown = ", ".join(f"'{p}'" for p in where[:3])
        if len(where) > 3:
            shown += f", ... ({len(where)} layers)"
        parts.append(template.replace("\0", shown) if where else template)
    return f"{own} ({name!r}): " + "; ".join(parts)


def attach(model: nn.Module, spec: AdapterSpec, name: str, built, extras: list[str]) -> list[str]:
    """Second half of inject: put the planned layers in the model (cannot fail)."""
    st = model.__dict__.setdefault("_adaptkit", State())
    if not st.specs:
        st.frozen_from = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
    for path, layer, adapter in built:
        if isinstance(layer, ParamLayer):
            layer.place()
        elif model.get_submodule(path) is not layer:
            model.set_submodule(path, layer)
        adapter.to(device=layer.weight.device)
        adapter.train(layer.training)  # a new module is in training mode: an eval model keeps no dropout
        layer.adapters[name] = adapter
        adapter.attach(layer)
    st.specs[name] = spec
    st.extras[name] = extras
    st.active.append(name)
    refresh(model)
    sync_input_grads(model)
    return [p for p, _, _ in built]


class _InputGrads:
    """Forward hook on the input embeddings: their output requires grad while the model is
    in training with grad enabled and any of ``flags`` (modules with a ``gradient_checkpointing``
    attribute, the transformers convention) has checkpointing on.

    Why: reentrant ``torch.utils.checkpoint`` runs each block under ``no_grad`` and builds a
    graph only if one of the block's tensor inputs requires grad. With the embedding frozen
    by inject none does, so the adapters inside the blocks would get no gradient (and
    ``backward`` fails). This is what transformers' ``enable_input_require_grads`` does for
    PEFT; the flag is read at every forward, so checkpointing may be switched on before or
    after inject. Non-reentrant checkpointing does not need it (it only costs the input
    gradient of the first block)."""

    def __init__(self, flags: tuple[nn.Module, ...]):
        self.flags = flags

    def __call__(self, module: nn.Module, args, output):
        if (
            isinstance(output, torch.Tensor)
            and not output.requires_grad
            and output.is_floating_point()
            and module.training
            and torch.is_grad_enabled()
            and any(getattr(m, "gradient_checkpointing", False) is True for m in self.flags)
        ):
            output.requires_grad_(True)


def sync_input_grads(model: nn.Module) -> None:
    """(Re)place the :class:`_InputGrads` hook on ``model.get_input_embeddings()`` while the
    model carries adapters, and remove it once none is left (delete of the last adapter,
    merge). Models without ``get_input_embeddings`` or without any ``gradient_checkpointing``
    flag get no hook: with a custom reentrant checkpoint, make the block inputs require grad
    yourself or use ``use_reentrant=False``."""
    st = model.__dict__.get("_adaptkit")
    if st is None:
        return
    if st.input_hook is not None:
        st.input_hook.remove()
        st.input_hook = None
    get = getattr(model, "get_input_embeddings", None)
    if not st.specs or not callable(get):
        return
    try:
        emb = get()
    except Exception:  # noqa: BLE001 - a user model's method (transformers may raise NotImplementedError)
        return
    flags = tuple(m for m in model.modules() if hasattr(m, "gradient_checkpointing"))
    if isinstance(emb, nn.Module) and flags:
        st.input_hook = emb.register_forward_hook(_InputGrads(flags))


def inject(model: nn.Module, spec: AdapterSpec, name: str = "default") -> list[str]:
    """Swap every module ``spec`` matches for an adapted layer carrying adapter ``name``.

    Freezes the base, makes the new adapter active and trainable (alongside those already
    active), and returns the adapted module paths. Nothing changes if anything fails.
    On a model with ``get_input_embeddings()`` (transformers), the embedding output is made to
    require grad while gradient checkpointing is on, so reentrant checkpointing trains the
    adapters (see :class:`_InputGrads`; removed with the last adapter)."""
    check_model(model, "inject")
    built, extras = plan(model, spec, name)
    return attach(model, spec, name, built, extras)


def refresh(model: nn.Module) -> None:
    """Re-derive per-layer active tuples and requires_grad from the active set."""
    st = state(model)
    params = dict(model.named_parameters())
    for name in st.specs:
        for q in st.extras.get(name, []):
            if q in params:
                params[q].requires_grad_(False)
    for _, layer in adapted_layers(model):
        if layer.owns_adapters:  # ak.MoRALinear: its adapter is not the model's to switch
            continue
        layer.set_active(st.active)
        for n, a in layer.adapters.items():
            a.requires_grad_(n in st.active)
    for name in st.active:
        for q in st.extras.get(name, []):
            if q in params:
                params[q].requires_grad_(True)


def _names(model: nn.Module, names) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    known = state(model).specs
    bad = [n for n in names if n not in known]
    if bad:
        raise AdaptkitError(f"unknown adapter name(s) {bad}; this model has {sorted(known)}")
    return names


def set_active(model: nn.Module, names) -> None:
    """Make exactly ``names`` active (summed in forward, trainable); the rest are frozen."""
    check_model(model, "set_active")
    state(model).active = _names(model, names)
    refresh(model)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: every adapter is skipped (merged ones are unmerged meanwhile)."""
    check_model(model, "disabled")
    layers = adapted_layers(model)
    merged = {p: [n for n, a in l.adapters.items() if a.merged] for p, l in layers}
    active = {p: l._active_names for p, l in layers}
    for _, layer in layers:
        layer.unmerge()
        layer.set_active([])
    try:
        yield model
    finally:
        for p, layer in layers:
            layer.merge(merged[p], check=False)
            layer.set_active(active[p])
        refresh(model)


def delete(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; layers left with no adapter become plain modules again."""
    check_model(model, "delete")
    _names(model, name)
    st = state(model)
    for path, layer in adapted_layers(model):
        if name not in layer.adapters:
            continue
        merged = [n for n, a in layer.adapters.items() if a.merged and n != name]
        layer.unmerge()
        del layer.adapters[name]
        layer.merge(merged, check=False)
        if not len(layer.adapters) and (plain := layer.unwrap()) is not None:  # None: a parameter's layer
            model.set_submodule(path, plain)
    del st.specs[name]
    st.extras.pop(name, None)
    st.active = [n for n in st.active if n != name]
    refresh(model)
    sync_input_grads(model)
