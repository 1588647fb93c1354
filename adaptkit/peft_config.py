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

What is method-specific (peft_type, config fields both ways, tensor names and layouts, the
layers PEFT computes differently) is declared by each method as a :class:`PeftForm` in its
own file (methods/lora.py, dora.py, lokr.py, qlora_nf4.py); this module is generic over the
method registry.
"""

from __future__ import annotations

import re
from typing import Any

import torch.nn as nn

from .errors import AdaptkitError
from .layer import base_kind
from .spec import METHODS, AdapterSpec

_COMMON = {
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "r",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "target_parameters",
}
_TASK_SAVED = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}  # PeftModelFor<Task> adds these on load


def err(msg: str) -> AdaptkitError:
    """An AdaptkitError prefixed with where PEFT interop failed."""
    return AdaptkitError(f"peft_compat: {msg}")


def num(v):
    """A JSON-tidy number: 8 rather than 8.0 (alphas)."""
    return int(v) if float(v).is_integer() else float(v)


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
    regs = (
        [r".*?\.[^.]*\.(?P<i>\d+)\."]
        if not pat
        else [rf"(?:^|.*?\.){p}\.(?P<i>\d+)\." for p in ([pat] if isinstance(pat, str) else pat)]
    )
    m = next((m for r in regs if (m := re.match(r, key))), None)
    return m is not None and int(m["i"]) in ([idx] if isinstance(idx, int) else idx)


def saved_names(cfg: dict) -> list[str]:
    """modules_to_save items, with those PeftModelFor<task_type> adds on load."""
    return list(cfg.get("modules_to_save") or []) + _TASK_SAVED.get(str(cfg.get("task_type")), [])


def peft_targets(cfg: dict, modules: dict[str, nn.Module]) -> list[str]:
    """The module names PEFT adapts for ``cfg`` (``check_target_module_exists``)."""
    tm, ex, saved = cfg.get("target_modules"), cfg.get("exclude_modules"), saved_names(cfg)
    if tm is None:
        raise err(
            "target_modules is None (PEFT picks a per-model-type default); write the "
            "module names into adapter_config.json"
        )
    if isinstance(tm, str) and tm.lower() == "all-linear":  # PEFT skips a PreTrainedModel's head
        root: Any = modules[""]  # a transformers PreTrainedModel, if it is one
        head = (
            root.get_output_embeddings() if any(c.__name__ == "PreTrainedModel" for c in type(root).__mro__) else None
        )
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


def peft_param_targets(names: list[str], modules: dict[str, nn.Module]) -> dict[str, str]:
    """PEFT's ``target_parameters`` on a model: {PEFT key path: parameter path}. A parameter
    matches when its path equals an item or ends with ``.item``; PEFT nests one ParamWrapper
    per parameter of a module, the first registered innermost, so that parameter's tensors
    sit under ``<module>.base_layer.`` once per wrapper around it."""
    out = {}
    for mpath, m in modules.items():
        if not mpath or base_kind(m) == "param":
            continue
        hits = [n for n in m._parameters if _in_list(names, f"{mpath}.{n}")]
        for i, n in enumerate(hits):
            out[mpath + ".base_layer" * (len(hits) - 1 - i)] = f"{mpath}.{n}"
    return out


def peft_param_key(path: str, layers: dict[str, dict]) -> str:
    """The inverse for writing: the PEFT key path of adapted ``path`` (a parameter path goes
    under its module, with ``.base_layer`` for each adapted parameter registered after it;
    ``layers`` is in registration order, as inject adds them)."""
    if layers[path].get("kind") != "param":
        return path
    owner = path.rpartition(".")[0]
    sib = [q for q, d in layers.items() if d.get("kind") == "param" and q.rpartition(".")[0] == owner]
    return owner + ".base_layer" * (len(sib) - 1 - sib.index(path))


def saved_paths(names: list[str], candidates) -> list[str]:
    """modules_to_save: every path ending with an item (PEFT's raw ``key.endswith(item)``)."""
    hits = [p for p in candidates if p and p.endswith(tuple(names))]
    nested = [p for p in hits if any(p.startswith(q + ".") for q in hits)]
    if nested:
        raise err(
            f"modules_to_save={names} matches nested modules {nested}; PEFT wraps both, "
            f"which adaptkit cannot express. Name only the outer module"
        )
    return hits


# ---- what each method declares ------------------------------------------------------------
class PeftForm:
    """How one adaptkit method maps to a PEFT adapter type. A method that PEFT can express
    declares a subclass in its own file and sets it on its spec class (``LoRA.peft_form =
    LoRAPeft()``); ``ak.peft_compat`` and the command line only go through this interface,
    over the method registry. The declaration is not inherited: a spec subclass (DoRA,
    QLoRA) is another method and declares its own form, or has none.

    peft_type  PEFT's ``peft_type`` ("LORA", "LOKR").
    prefix     how PEFT's adapter tensor names start after the module path ("lora_"), which
               tells them from ``modules_to_save`` copies and biases.
    options    the PEFT config keys beyond the shared ones (``r``, targets, patterns,
               modules_to_save) that this form understands; any other key with a
               non-empty value is refused, as it would change the adapter silently.
    """

    peft_type: str = ""
    prefix: str = ""
    options: frozenset = frozenset()

    def reads(self, cfg: dict) -> bool:
        """Whether this method is the one a config of ``peft_type`` means (LoRA vs DoRA: the
        config's ``use_dora``). Exactly one registered method must claim a readable config."""
        return True

    def written(self, spec: Any) -> AdapterSpec:
        """The spec PEFT stores this adapter as (default: itself); its method's form writes
        it. QLoRA is written as the LoRA / DoRA it carries."""
        return spec

    def spec_kwargs(self, cfg: dict) -> dict:
        """Spec kwargs of a PEFT config (must hold ``rank`` and ``alpha``; targets, patterns
        and modules_to_save are resolved by the caller); refuses options adaptkit cannot
        reproduce."""
        raise NotImplementedError

    def config(self, spec: Any, layers: dict[str, dict]) -> dict:
        """The method's own adapter_config.json fields for ``spec`` over ``layers`` (path ->
        the file's layer table entry); refuses what PEFT cannot express."""
        raise NotImplementedError

    def layout(self, kind: str, wshape, key: str, shape) -> tuple[str, tuple]:
        """(PEFT key suffix, PEFT shape) of adaptkit parameter ``key`` (``shape``) of an adapter
        on a ``kind`` base with weight ``wshape``: the same data, renamed and reshaped."""
        return key, tuple(shape)

    def check_layer(self, kind: str, shape, path: str, module: nn.Module | None = None) -> None:
        """Refuse a layer on which PEFT computes another update than adaptkit (given the
        module: also from its geometry)."""

    def to_peft(self, kind: str, wshape, key: str, t):
        """Tensor ``t`` of adaptkit parameter ``key`` in PEFT's layout (default: the reshape
        :meth:`layout` declares)."""
        return t.reshape(self.layout(kind, wshape, key, t.shape)[1])

    def from_peft(self, kind: str, wshape, key: str, t, shape):
        """The inverse of :meth:`to_peft`: PEFT tensor ``t`` as adaptkit's ``shape``."""
        return t.reshape(shape)

    def infer_layer(self, tensors: dict, cfg: dict, path: str) -> tuple[str, tuple]:
        """(base kind, weight shape) of a PEFT-adapted path from its tensors (keys without
        the path) and the config alone: what the command line uses without a base file."""
        raise err(
            f"'{path}': the {self.peft_type} tensors do not tell the base's shape; give the base weights (--base)"
        )

    def full_config(self, common: dict, spec: AdapterSpec, layers: dict[str, dict]) -> dict:
        """The whole adapter_config.json from the shared fields ``common`` (default: those
        plus :meth:`config`); a config class without them (TrainableTokens) builds its own."""
        return common | self.config(spec, layers)

    def read_groups(self, groups: dict, cfg: dict) -> dict:
        """{adapted path: tensors} of a file to read (default: all; TrainableTokens drops the
        copies PEFT writes at tied modules)."""
        return groups

    def write_tensors(self, out: dict, layers: dict[str, dict]) -> dict:
        """The PEFT tensors to write (default: ``out``; TrainableTokens adds tied copies)."""
        return out

    @staticmethod
    def alpha0(spec: AdapterSpec):
        """The spec's default alpha as PEFT writes it (alpha None means alpha = rank)."""
        return num(spec.alpha if spec.alpha is not None else spec.rank)


def form_of(spec) -> PeftForm | None:
    """The PEFT form a spec (or spec class) declares itself, or None."""
    cls = spec if isinstance(spec, type) else type(spec)
    return vars(cls).get("peft_form")


def forms() -> dict[str, PeftForm]:
    """method name -> PEFT form, over the method registry."""
    return {m: f for m, cls in METHODS.items() if (f := form_of(cls)) is not None}


def read_form(cfg: dict) -> tuple[str, PeftForm]:
    """(adaptkit method, its form) of a PEFT config."""
    pt, known = cfg.get("peft_type"), forms()
    hits = [(m, f) for m, f in known.items() if f.peft_type == pt and f.reads(cfg)]
    if len(hits) != 1:
        types = sorted({f.peft_type for f in known.values()})
        raise err(
            f"peft_type={pt!r} is not supported; adaptkit reads {', '.join(types)}"
            if not hits
            else f"peft_type={pt!r} is claimed by methods {[m for m, _ in hits]}; fix their reads()"
        )
    return hits[0]


def write_form(spec: AdapterSpec) -> PeftForm:
    """The form ``spec``'s method declares; an error naming the methods that have one."""
    form = form_of(spec)
    if form is None:
        raise err(f"method {spec.method!r} has no PEFT form; PEFT interop covers {', '.join(sorted(forms()))}")
    return form


# ---- config <-> spec ---------------------------------------------------------------------
def spec_fields(cfg: dict) -> tuple[str, dict]:
    """(adaptkit method, spec kwargs but targets / patterns / modules_to_save) of a PEFT
    config, refusing every option adaptkit cannot reproduce."""
    method, form = read_form(cfg)
    bad = {k: v for k, v in cfg.items() if k not in _COMMON | form.options and v not in (None, False, {}, [], "")}
    if bad:
        raise err(
            f"PEFT option(s) {bad} change the adapter and have no adaptkit equivalent; "
            f"use this adapter with PEFT (or merge it there)"
        )
    if cfg.get("ensure_weight_tying") and saved_names(cfg):
        raise err("ensure_weight_tying=True ties modules_to_save copies, which adaptkit does not")
    return method, form.spec_kwargs(cfg)


def _pattern_keys(paths: list[str], values: dict, default) -> dict:
    """PEFT pattern keys giving ``values[p]`` exactly at the adapted paths: the escaped path,
    anchored with ``^`` when another adapted path ends with ``.p``."""
    return {
        ("^" if any(q.endswith("." + p) for q in paths) else "") + re.escape(p): num(values[p])
        for p in paths
        if values[p] != default
    }


def peft_config(spec: AdapterSpec, layers: dict[str, dict], saved: list[str]) -> dict:
    """The adapter_config.json selecting exactly ``layers`` (and ``saved``) with spec's values."""
    spec = write_form(spec).written(spec)
    form, paths = write_form(spec), list(layers)
    params = [p for p in paths if layers[p].get("kind") == "param"]  # target_parameters
    mods = [p for p in paths if p not in params]
    cfg = {
        "peft_type": form.peft_type,
        "task_type": None,
        "inference_mode": True,
        "r": spec.rank,
        "target_modules": "|".join(map(re.escape, mods)) if mods else [],
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": _pattern_keys(paths, {p: spec.rank_for(p) for p in paths}, spec.rank),
        "alpha_pattern": _pattern_keys(paths, {p: spec.alpha_for(p) for p in paths}, form.alpha0(spec)),
        "modules_to_save": saved or None,
    }
    if params:  # listed whole: PEFT matches an item by equality or as a ".item" suffix
        cfg["target_parameters"] = params
    return form.full_config(cfg, spec, layers)
