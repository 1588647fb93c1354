"""Read and write PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``,
PEFT 0.21.2) without importing peft:

    paths = ak.peft_compat.read_peft(model, "peft_dir", name="default")   # alias load_peft
    ak.peft_compat.write_peft(model, "peft_dir", name="default")          # alias save_peft

Keys (under ``base_model.model.``) <-> adaptkit parameters of adapted path p, the same data:
    adapter  p.<PEFT name> <-> p.<adaptkit name>, renamed and reshaped as the method's PEFT
             form declares (``PeftForm.layout`` in its file: LoRA / DoRA in methods/lora.py,
             LoKr in methods/lokr.py; QLoRA writes a LoRA / DoRA folder)
    other    m.<param> (modules_to_save); p.base_layer.bias <-> p.bias (bias "lora_only"/"all")
Config semantics (PEFT's matching rules, the generic :class:`~adaptkit.peft_config.PeftForm`)
live in :mod:`adaptkit.peft_config`. What PEFT computes that adaptkit cannot reproduce exactly
is an AdaptkitError naming it. Reading checks every key and shape, then injects through
``ak.io.load_tensors``: on error the model is untouched.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open

from .errors import AdaptkitError
from .inject import check_name, delete, state
from .io import FORMAT, _version, adapter_tensors, atomic_write, load_tensors, write_safetensors
from .layer import AdaptedLayer, base_kind, stand_in
from .merge import merge
from .param_base import find
from .peft_config import (
    PeftForm,
    form_of,
    forms,
    pattern_value,
    peft_config,
    peft_param_key,
    peft_param_targets,
    peft_targets,
    saved_names,
    saved_paths,
    spec_fields,
)
from .spec import METHODS, AdapterSpec
from .targets import matches

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _err(msg: str) -> AdaptkitError:
    return AdaptkitError(f"peft_compat: {msg}")


# ---- what PEFT computes like adaptkit, and the key / shape map ---------------------------
def base_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``named_modules()`` without adaptkit's own adapter sub-modules."""
    out: dict[str, nn.Module] = {}
    skip: tuple[str, ...] = ()
    for n, m in model.named_modules():
        if n.startswith(skip):
            continue
        out[n] = m
        if isinstance(m, AdaptedLayer):
            skip += (f"{n}.adapters." if n else "adapters.",)
    return out


def form(method: str) -> PeftForm:
    """The PEFT form method ``method`` declares (its file, see peft_config.PeftForm)."""
    f = form_of(METHODS[method]) if method in METHODS else None
    if f is None:
        raise _err(f"method {method!r} has no PEFT form; PEFT interop covers {', '.join(sorted(forms()))}")
    return f


def tokens_form() -> Any:
    """TrainableTokens' PEFT form, which also splits / joins a LoRA folder's trainable tokens."""
    return form("trainable_tokens")


def check_layer(method: str, kind: str, shape, path: str, m: nn.Module | None = None) -> None:
    """Refuse a layer on which PEFT computes another update than ``method`` does (given the
    module ``m``: also from its geometry); each method's form says which."""
    form(method).check_layer(kind, shape, path, m)


# ---- file level: PEFT (config, tensors) <-> adaptkit (tensors, metadata) -----------------
def group_keys(method: str, tensors: dict, where: str = "PEFT adapter") -> tuple[dict, dict]:
    """PEFT keys -> ({adapted path: {key suffix: tensor}}, {other key without prefix: tensor})."""
    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        raise _err(f"{where}: keys {bad[:5]} lack the '{PREFIX}' prefix; not a PEFT adapter file")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    pre = form(method).prefix
    for key, t in tensors.items():
        segs = key[len(PREFIX) :].split(".")
        i = next((i for i, s in enumerate(segs) if s.startswith(pre)), None)
        if i is None:
            rest[".".join(segs)] = t
        else:
            groups.setdefault(".".join(segs[:i]), {})[".".join(segs[i:])] = t
    return groups, rest


def from_peft(
    cfg: dict, tensors: dict, layer_of, saved=None, where: str = "PEFT adapter", order=(), params=None
) -> tuple[dict, dict, list[str]]:
    """PEFT config + tensors -> (adaptkit tensors, adaptkit metadata, adapted paths).
    ``layer_of(path, peft_tensors) -> (kind, weight shape, base class name)``; ``saved``: the
    modules_to_save paths (default: key prefixes ending with an item); ``order``: module names;
    ``params``: {PEFT key path: parameter path} of ``target_parameters`` (from the model)."""
    method, kw = spec_fields(cfg)
    fm = form(method)
    groups, rest = group_keys(method, tensors, where)
    groups = fm.read_groups(groups, cfg)
    if cfg.get("target_parameters"):
        if params is None:
            raise _err(
                f"{where}: target_parameters adapters are keyed by module, not by parameter; "
                f"naming the parameters needs the base model: use ak.peft_compat.read_peft(model, ...)"
            )
        groups = {params.get(p, p): g for p, g in groups.items()}
        order = [q for o in order for q in [o, *(v for v in params.values() if v.rpartition(".")[0] == o)]]
    params = set((params or {}).values())
    pos = {n: i for i, n in enumerate(order)}
    paths = sorted(groups, key=lambda p: pos.get(p, len(pos)))
    if not paths:
        raise _err(f"{where}: no {method} tensors in the file")
    if saved is None:  # no model: candidates are the module prefixes of the other keys
        segs = [k.split(".") for k in rest]
        saved = saved_paths(saved_names(cfg), dict.fromkeys(".".join(s[:j]) for s in segs for j in range(1, len(s))))
    bias, out, unexpected = kw.get("bias", "none"), {}, []
    for k, t in rest.items():
        m = next((s for s in saved if k.startswith(s + ".")), None)
        if m is not None:  # with bias="all" PEFT also stores the wrapper's inner copies: drop
            if not k.startswith((m + ".original_module.", m + ".modules_to_save.")):
                out[k] = t
        elif k.endswith(".base_layer.bias") and k[:-16] in groups and bias != "none":
            out[k[:-16] + ".bias"] = t
        elif k.rsplit(".", 1)[-1] == "bias" and bias == "all":
            out[k] = t
        else:
            unexpected.append(PREFIX + k)
    esc = {p: re.escape(p) for p in paths}
    pats: dict[str, Any] = {
        f: {esc[p]: v for p in paths if (v := pattern_value(cfg.get(f) or {}, p, kw[d])) != kw[d]}
        for f, d in (("rank_pattern", "rank"), ("alpha_pattern", "alpha"))
    }
    try:
        spec = METHODS[method](
            **kw,
            **pats,
            targets=[esc[p] for p in paths if p not in params],
            target_parameters=[esc[p] for p in paths if p in params] or None,
            modules_to_save=[re.escape(s) for s in saved] or None,
        )
    except (TypeError, AdaptkitError) as e:
        raise _err(f"{where}: the config does not map to an adaptkit spec: {e}") from None
    layers, problems = {}, [f"unexpected keys {unexpected}"] * bool(unexpected)
    for p in paths:
        got = groups[p]
        try:
            kind, shape, base = layer_of(p, got)
            fm.check_layer(kind, shape, p)
            if not spec.supports(kind):
                raise _err(
                    f"{type(spec).__name__} cannot adapt '{p}' ({base}): PEFT's form has no adaptkit counterpart"
                )
            a = spec.build(stand_in(kind, shape), p)
        except AdaptkitError as e:
            problems.append(str(e).removeprefix("peft_compat: "))
            continue
        want = {fm.layout(kind, shape, k, v.shape): (k, v.shape) for k, v in a.state_dict().items()}
        miss = sorted(pk for pk, _ in want if pk not in got)
        extra = sorted(set(got) - {pk for pk, _ in want})
        if miss:
            problems.append(f"'{p}': missing {miss}")
        if extra:
            problems.append(f"'{p}': unexpected {extra}")
        for (pk, ps), (k, ashape) in want.items():
            if pk in got and tuple(got[pk].shape) != ps:
                problems.append(f"'{p}.{pk}': file {tuple(got[pk].shape)} vs config {ps} at r={spec.rank_for(p)}")
            elif pk in got:
                out[f"{p}.{k}"] = fm.from_peft(kind, shape, k, got[pk], ashape)  # PEFT layout -> adaptkit's
        layers[p] = {"method": method, "base": base, "kind": kind, "shape": list(shape), "state": a.layer_state()}
    if problems:
        raise _err(f"{where}: " + "; ".join(problems) + ". Nothing was loaded")
    for k in list(out):
        layers.setdefault(k.rsplit(".", 1)[0], {"method": "trained", "base": "unknown"})
    meta = {
        "adaptkit.format": FORMAT,
        "adaptkit.version": _version(),
        "adaptkit.spec": json.dumps(spec.to_dict()),
        "adaptkit.layers": json.dumps(layers),
    }
    return out, meta, paths


def to_peft(tensors: dict, meta: dict, names: list[str] | None = None) -> tuple[dict, dict]:
    """adaptkit tensors + metadata -> (PEFT config, PEFT tensors). ``names`` (the base model's
    module names) lets modules_to_save be checked against PEFT's suffix matching."""
    spec = AdapterSpec.from_dict(json.loads(meta["adaptkit.spec"]))
    layers = {p: d for p, d in json.loads(meta["adaptkit.layers"]).items() if d.get("method") == spec.method}
    src = form(spec.method)
    spec = src.written(spec)  # QLoRA: the LoRA / DoRA it carries
    fm = form(spec.method)
    out, used, problems = {}, set(), []
    for p, d in layers.items():
        for f in (src, fm) if fm is not src else (fm,):
            f.check_layer(d["kind"], d["shape"], p)
        if d.get("state"):
            problems.append(f"'{p}' carries per-layer state {d['state']} PEFT cannot store")
            continue
        for k, v in spec.build(stand_in(d["kind"], d["shape"]), p).state_dict().items():
            t = tensors.get(f"{p}.{k}")
            used.add(f"{p}.{k}")
            if t is None or t.shape != v.shape:
                problems.append(f"'{p}.{k}': {None if t is None else list(t.shape)} vs spec {list(v.shape)}")
                continue
            pk = fm.layout(d["kind"], d["shape"], k, v.shape)[0]
            out[f"{PREFIX}{peft_param_key(p, layers)}.{pk}"] = fm.to_peft(d["kind"], d["shape"], k, t)
    if problems:
        raise _err("the adapter's tensors do not fit its spec: " + "; ".join(problems))
    out = fm.write_tensors(out, layers)
    saved: list[str] = []
    for q in sorted(set(tensors) - used):
        s = q.split(".")
        m = next((".".join(s[:j]) for j in range(1, len(s)) if matches(spec.modules_to_save, ".".join(s[:j]))), None)
        if m is None and q.endswith(".bias") and spec.bias != "none":
            out[PREFIX + (q[:-5] + ".base_layer.bias" if q[:-5] in layers else q)] = tensors[q]
            continue
        if m is None:
            raise _err(f"tensor '{q}' is neither an adapter parameter, a trained bias nor in modules_to_save")
        saved += [m] * (m not in saved)
        out[PREFIX + q] = tensors[q]
    for s in saved:
        other = [n for n in (names if names is not None else list(layers) + saved) if n.endswith(s) and n != s]
        if other or any(re.match(rf"(^|.*\.){s}($|\..*)", p) for p in layers):
            raise _err(
                f"modules_to_save '{s}' would also select {other or 'adapted layers'} in "
                f"PEFT (it matches by suffix); rename the module or drop it from modules_to_save"
            )
    return peft_config(spec, layers, saved), out


# ---- folders -----------------------------------------------------------------------------
def read_folder(folder) -> tuple[dict, dict]:
    """(config, tensors) of a PEFT adapter folder, with a clear error for anything else."""
    folder = os.fspath(folder)
    cfg_path, w_path = os.path.join(folder, CONFIG), os.path.join(folder, WEIGHTS)
    if not os.path.isdir(folder):
        raise _err(f"'{folder}' is not a folder (a PEFT adapter is a folder with {CONFIG})")
    if not os.path.isfile(cfg_path):
        subs = sorted(d for d in os.listdir(folder) if os.path.isfile(os.path.join(folder, d, CONFIG)))
        hint = f"; PEFT keeps named adapters in sub-folders: {subs}, pass one of them" if subs else ""
        raise _err(f"no {CONFIG} in '{folder}'{hint}")
    if not os.path.isfile(w_path):
        pickle = os.path.isfile(os.path.join(folder, "adapter_model.bin"))
        hint = (
            (
                "; adapter_model.bin is a pickle, which adaptkit never loads: re-save the adapter "
                "with PEFT's save_pretrained(..., safe_serialization=True)"
            )
            if pickle
            else ""
        )
        raise _err(f"no {WEIGHTS} in '{folder}'{hint}")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except ValueError as e:  # JSON and Unicode decoding errors
        raise _err(f"'{cfg_path}' is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise _err(f"'{cfg_path}' must hold a JSON object, got {type(cfg).__name__}")
    try:
        with safe_open(w_path, framework="pt") as f:
            return cfg, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise _err(f"'{w_path}' is not a readable safetensors file ({type(e).__name__}: {e})") from None


def write_folder(folder, cfg: dict, tensors: dict) -> None:
    """Write adapter_config.json and adapter_model.safetensors, each atomically."""
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise _err(f"'{folder}' exists and is not a folder")
    os.makedirs(folder, exist_ok=True)
    write_safetensors(tensors, os.path.join(folder, WEIGHTS), {"format": "pt"})

    def write_config(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)

    atomic_write(os.path.join(folder, CONFIG), write_config)


# ---- model level -------------------------------------------------------------------------
def _prepared(model: nn.Module, modules: dict, cfg: dict, tensors: dict, where: str) -> tuple[dict, dict]:
    """(adaptkit tensors, metadata) of one PEFT adapter, checked against ``model``: the
    config's targets (PEFT's rules, on ``model``) must be the file's layers."""
    method, targets = spec_fields(cfg)[0], peft_targets(cfg, modules)
    params = peft_param_targets(cfg["target_parameters"], modules) if cfg.get("target_parameters") else None
    targets += list((params or {}).values())

    def layer_of(p, _):
        m = modules.get(p) if p in modules else find(model, p)  # a parameter path: its ParamLayer
        if base_kind(m) is None:
            raise _err(f"'{p}' is in the file but {'not in the model' if m is None else type(m).__name__}")
        check_layer(method, base_kind(m), m.weight.shape, p, m)
        return base_kind(m), tuple(m.weight.shape), getattr(m, "_base_cls", type(m)).__name__

    out, meta, paths = from_peft(
        cfg, tensors, layer_of, saved_paths(saved_names(cfg), modules), where, order=list(modules), params=params
    )
    miss, extra = [p for p in targets if p not in paths], [p for p in paths if p not in targets]
    if miss or extra:
        parts = [f"select {miss}, which have no tensors in the file"] * bool(miss) + [
            f"do not select {extra}, which the file adapts"
        ] * bool(extra)
        raise _err(f"{where}: on this model target_modules {' and '.join(parts)}; wrong base model? Nothing was loaded")
    return out, meta


def _input_embeddings(modules: dict) -> str:
    """Path of ``get_input_embeddings()``, else "embed_tokens" (PEFT's rule)."""
    get = getattr(modules[""], "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except Exception:  # noqa: BLE001 - a user model's method (transformers may raise NotImplementedError)
        emb = None
    return next((n for n, m in modules.items() if n and m is emb), "embed_tokens")


def read_peft(model: nn.Module, folder, name: str = "default", tokens_name: str | None = None) -> list[str]:
    """Inject the PEFT adapter in ``folder`` into ``model`` as adapter ``name``; returns the
    adapted paths. The config's targets (PEFT's rules, on ``model``) must be the file's layers.
    A LoRA folder with ``trainable_token_indices`` becomes two adapters: the LoRA as ``name``
    and an ``ak.TrainableTokens`` as ``tokens_name`` (default ``f"{name}_tokens"``); both are
    checked before either is injected."""
    cfg, tensors = read_folder(folder)
    where, modules = f"'{os.fspath(folder)}'", base_modules(model)
    parts = [(name, cfg, tensors)]
    if cfg.get("trainable_token_indices") is not None:
        tname = tokens_name or f"{name}_tokens"
        lcfg, ltensors, tcfg, ttensors = tokens_form().split(cfg, tensors, _input_embeddings(modules))
        parts = [(name, lcfg, ltensors), (tname, tcfg, ttensors)]
        check_name(model, tname, "read_peft")
        if tname == name:
            raise _err(f"tokens_name={tname!r} is the LoRA's name; give the trainable tokens another name")
    ready = [(n, *_prepared(model, modules, c, t, where)) for n, c, t in parts]
    paths: list[str] = []
    for i, (n, out, meta) in enumerate(ready):
        try:
            paths += load_tensors(model, out, meta, n, where)
        except AdaptkitError:
            _rollback(model, [m for m, _, _ in ready[:i]])
            raise
    return paths


def _rollback(model: nn.Module, names: list[str]) -> None:
    """Remove the adapters a failed read_peft injected (restoring the model as it was)."""
    for n in names:
        delete(model, n)
    if names and not state(model).specs:
        merge(model)  # no adapter left: classes and requires_grad flags as before the first inject


def write_peft(model: nn.Module, folder, name: str = "default", tokens: str | None = None) -> None:
    """Write adapter ``name`` of ``model`` as a PEFT adapter folder that
    ``PeftModel.from_pretrained(base, folder)`` loads to the same outputs. ``tokens``: the name
    of an ``ak.TrainableTokens`` adapter written into the same (LoRA) folder as PEFT's
    ``trainable_token_indices``."""
    st = state(model)
    names = [n for n in (name, tokens) if n is not None]
    for n in names:
        if n not in st.specs:
            raise _err(f"no adapter named {n!r}; this model has {sorted(st.specs)}")
    if tokens is not None and st.specs[tokens].method != "trainable_tokens":
        raise _err(f"tokens={tokens!r} is a {st.specs[tokens].method} adapter, expected ak.TrainableTokens")
    mods = [n for n in base_modules(model) if n]
    done = []
    for n in names:
        tensors, layers = adapter_tensors(model, n)
        for p, d in layers.items():
            if d["method"] == st.specs[n].method:
                check_layer(d["method"], d["kind"], d["shape"], p, find(model, p))
        meta = {"adaptkit.spec": json.dumps(st.specs[n].to_dict()), "adaptkit.layers": json.dumps(layers)}
        done.append(to_peft(tensors, meta, mods))
    cfg, out = done[0] if tokens is None else tokens_form().join(*done[0], *done[1])
    write_folder(folder, cfg, out)


load_peft, save_peft = read_peft, write_peft
