r"""PEFT's ``adapter_config.json`` semantics for ``ak.peft_compat`` (PEFT 0.21.2, no peft
import): its three name-matching rules, the options adaptkit can and cannot reproduce, and
the translation between a config and an adaptkit spec.

PEFT matches names three ways: ``target_modules`` / ``exclude_modules`` as a str are
``re.fullmatch``-ed and as a list match a name equal to an item or ending in ``.item``
(``layers_to_transform`` then filters by the first ``.<layers_pattern>.<N>.`` index);
``rank_pattern`` / ``alpha_pattern`` keys k match by ``re.match(rf"(.*\.)?({k})$", name)``,
first key wins; ``modules_to_save`` items match by ``name.endswith(item)``, and PEFT never
adapts a module matching ``(^|.*\.)item($|\..*)``. adaptkit has one rule (fullmatch), so
reading resolves PEFT's on the model into escaped full paths, and writing emits patterns that
select exactly the adapted paths.
"""
from __future__ import annotations

import re

import torch.nn as nn

from .errors import AdaptkitError
from .layer import base_kind
from .spec import AdapterSpec

_COMMON = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
           "revision", "inference_mode", "r", "target_modules", "exclude_modules",
           "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "modules_to_save"}
# LoRA options acting only at init time, on other hardware, or per base type (PEFT forces
# fan_in_fan_out from the layer class): the stored weights mean the same whatever they say
_LORA_KEYS = _COMMON | {"lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights", "use_dora",
                        "bias", "runtime_config", "megatron_core", "fan_in_fan_out", "qalora_group_size",
                        "eva_config", "corda_config", "lora_ga_config", "ensure_weight_tying"}
_LOKR_OPTS = ("rank_dropout", "module_dropout", "use_effective_conv2d", "decompose_both",
              "decompose_factor", "rank_dropout_scale")
_LOKR_KEYS = _COMMON | {"alpha", "init_weights", *_LOKR_OPTS}
# weights come from the file; pissa / olora re-run on load in PEFT as in adaptkit
# (W <- W - s B0 A0 from the same SVD / QR), so they stay exact
_LORA_INITS = {True: "default", False: "default", "gaussian": "gaussian", "eva": "default",
               "orthogonal": "default", "pissa": "pissa", "olora": "olora"}
_BIAS = {"none": "none", "all": "all", "lora_only": "adapter_only"}
_TASK_SAVED = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
               "QUESTION_ANS": ["qa_outputs"]}  # PeftModelFor<Task> adds these on load


def _err(msg: str) -> AdaptkitError:
    return AdaptkitError(f"peft_compat: {msg}")


def _num(v):
    return int(v) if float(v).is_integer() else float(v)  # JSON-tidy alphas


# ---- PEFT's name-matching rules (peft/tuners/tuners_utils.py, peft/utils/other.py) --------
def _in_list(items, key: str) -> bool:
    return key in items or any(key.endswith("." + t) for t in items)


def pattern_value(table: dict, key: str, default):
    """``get_pattern_key``: the value of the first k with ``re.match(rf"(.*\\.)?({k})$", key)``."""
    return next((v for k, v in table.items() if re.match(rf"(.*\.)?({k})$", key)), table.get(key, default))


def _layer_ok(cfg: dict, key: str) -> bool:
    """layers_to_transform: the first index after a ``.<layers_pattern>.`` segment."""
    idx, pat = cfg.get("layers_to_transform"), cfg.get("layers_pattern")
    if idx is None or idx == []:
        return True
    regs = [r".*?\.[^.]*\.(?P<i>\d+)\."] if not pat else [
        rf"(?:^|.*?\.){p}\.(?P<i>\d+)\." for p in ([pat] if isinstance(pat, str) else pat)]
    m = next((m for r in regs if (m := re.match(r, key))), None)
    return m is not None and int(m["i"]) in ([idx] if isinstance(idx, int) else idx)


def saved_names(cfg: dict) -> list[str]:
    """modules_to_save items, with those PeftModelFor<task_type> adds on load."""
    return list(cfg.get("modules_to_save") or []) + _TASK_SAVED.get(cfg.get("task_type"), [])


def peft_targets(cfg: dict, modules: dict[str, nn.Module]) -> list[str]:
    """The module names PEFT adapts for ``cfg`` (``check_target_module_exists``)."""
    tm, ex, saved = cfg.get("target_modules"), cfg.get("exclude_modules"), saved_names(cfg)
    if tm is None:
        raise _err("target_modules is None (PEFT picks a per-model-type default); write the "
                   "module names into adapter_config.json")
    if isinstance(tm, str) and tm.lower() == "all-linear":  # PEFT skips a PreTrainedModel's head
        root = modules[""]
        head = root.get_output_embeddings() if any(
            c.__name__ == "PreTrainedModel" for c in type(root).__mro__) else None
        tm = [n for n, m in modules.items() if n and base_kind(m) in ("linear", "conv1d_t") and m is not head]
    out = []
    for key in modules:
        if not key:
            continue
        if ex and (re.fullmatch(ex, key) if isinstance(ex, str) else _in_list(ex, key)):
            continue
        if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in saved):
            continue  # PEFT never adapts a module that modules_to_save matches
        if isinstance(tm, str):
            hit = re.fullmatch(tm, key) is not None
        else:  # a name listed exactly skips the layers_to_transform filter, as in PEFT
            hit = key in tm or (_in_list(tm, key) and _layer_ok(cfg, key))
        if hit:
            out.append(key)
    return out


def saved_paths(names: list[str], candidates) -> list[str]:
    """modules_to_save: every path ending with an item (PEFT's raw ``key.endswith(item)``)."""
    hits = [p for p in candidates if p and p.endswith(tuple(names))]
    nested = [p for p in hits if any(p.startswith(q + ".") for q in hits)]
    if nested:
        raise _err(f"modules_to_save={names} matches nested modules {nested}; PEFT wraps both, "
                   f"which adaptkit cannot express. Name only the outer module")
    return hits


# ---- config <-> spec ---------------------------------------------------------------------
def spec_fields(cfg: dict) -> tuple[str, dict]:
    """(adaptkit method, spec kwargs but targets / patterns / modules_to_save) of a PEFT
    config, refusing every option adaptkit cannot reproduce."""
    pt = cfg.get("peft_type")
    if pt not in ("LORA", "LOKR"):
        raise _err(f"peft_type={pt!r} is not supported; adaptkit reads LORA (incl. DoRA) and LOKR")
    bad = {k: v for k, v in cfg.items() if k not in (_LORA_KEYS if pt == "LORA" else _LOKR_KEYS)
           and v not in (None, False, {}, [], "")}
    if bad:
        raise _err(f"PEFT option(s) {bad} change the adapter and have no adaptkit equivalent; "
                   f"use this adapter with PEFT (or merge it there)")
    if cfg.get("ensure_weight_tying") and saved_names(cfg):
        raise _err("ensure_weight_tying=True ties modules_to_save copies, which adaptkit does not")
    if pt == "LOKR":
        init = cfg.get("init_weights", True)
        if init not in (True, False, "lycoris"):
            raise _err(f"init_weights={init!r} is not one of True, False, 'lycoris'")
        return "lokr", dict(rank=cfg.get("r", 8), alpha=cfg.get("alpha", 8), scale_mode="peft",
                            init={True: "default", False: "random"}.get(init, init),
                            **{k: cfg[k] for k in _LOKR_OPTS if k in cfg})
    init, bias = cfg.get("init_lora_weights", True), cfg.get("bias", "none")
    if init not in _LORA_INITS:
        raise _err(f"init_lora_weights={init!r}: the adapter needs a base changed by that init "
                   f"(or a random one) that adaptkit cannot rebuild; convert it in PEFT first "
                   f"(path_initial_model_for_weight_conversion) or use True/'gaussian'/'pissa'/'olora'")
    if bias not in _BIAS:
        raise _err(f"bias={bias!r} is not one of {sorted(_BIAS)}")
    return ("dora" if cfg.get("use_dora") else "lora"), dict(
        rank=cfg.get("r", 8), alpha=cfg.get("lora_alpha", 8), dropout=cfg.get("lora_dropout", 0.0),
        use_rslora=bool(cfg.get("use_rslora", False)), init=_LORA_INITS[init], bias=_BIAS[bias])


def _pattern_keys(paths: list[str], values: dict, default) -> dict:
    """PEFT pattern keys giving ``values[p]`` exactly at the adapted paths: the escaped path,
    anchored with ``^`` when another adapted path ends with ``.p``."""
    return {("^" if any(q.endswith("." + p) for q in paths) else "") + re.escape(p): _num(values[p])
            for p in paths if values[p] != default}


def peft_config(spec: AdapterSpec, layers: dict[str, dict], saved: list[str]) -> dict:
    """The adapter_config.json selecting exactly ``layers`` (and ``saved``) with spec's values."""
    paths, a0 = list(layers), spec.alpha if spec.alpha is not None else spec.rank
    cfg = {"peft_type": "LOKR" if spec.method == "lokr" else "LORA", "task_type": None,
           "inference_mode": True, "r": spec.rank, "target_modules": "|".join(map(re.escape, paths)),
           "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
           "rank_pattern": _pattern_keys(paths, {p: spec.rank_for(p) for p in paths}, spec.rank),
           "alpha_pattern": _pattern_keys(paths, {p: spec.alpha_for(p) for p in paths}, a0),
           "modules_to_save": saved or None}
    if spec.method == "lokr":
        if spec.bias != "none" or spec.scale_mode != "peft":
            raise _err(f"LoKr bias={spec.bias!r}, scale_mode={spec.scale_mode!r}: PEFT's LoKr has "
                       f"no bias option and always scales by alpha/r (scale_mode='peft')")
        return cfg | dict(alpha=_num(a0), init_weights={"default": True, "random": False}.get(spec.init, spec.init),
                          **{k: getattr(spec, k) for k in _LOKR_OPTS})
    if spec.init not in ("default", "gaussian", "pissa", "olora"):
        raise _err(f"init={spec.init!r} has no PEFT equivalent")
    return cfg | dict(lora_alpha=_num(a0), lora_dropout=spec.dropout, use_rslora=spec.use_rslora,
                      use_dora=spec.method == "dora", lora_bias=False,
                      bias={v: k for k, v in _BIAS.items()}[spec.bias],
                      init_lora_weights={"default": True}.get(spec.init, spec.init),
                      fan_in_fan_out=all(d["kind"] == "conv1d_t" for d in layers.values()))


