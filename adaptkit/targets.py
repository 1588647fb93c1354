"""The one target matcher: ``re.fullmatch`` of regexes against ``named_modules()`` paths.

It serves ``targets``, ``exclude``, ``rank_pattern``, ``alpha_pattern`` and
``modules_to_save`` alike. No suffix mode and no substring mode (PEFT has three matching
rules across those fields, the root of several user issues: #2964, #3610, #1111).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any

import torch.nn as nn

from .errors import AdaptkitError
from .layer import AdaptedLayer, base_kind

ALL_LINEAR = "all-linear"


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def matches(patterns: Iterable[str] | str | None, path: str) -> bool:
    """True when any regex fullmatches ``path``."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        patterns = (patterns,)
    return any(_compiled(p).fullmatch(path) for p in patterns)


def first_match(table: dict[str, Any], path: str, default: Any) -> Any:
    """Value of the first key (in insertion order) that fullmatches ``path``."""
    for k, v in table.items():
        if _compiled(k).fullmatch(path):
            return v
    return default


def layer_index(path: str, layers_pattern: tuple[str, ...] | None) -> int | None:
    """The layer index of ``path``: the integer segment whose prefix (the path before it,
    "" for a root ModuleList) fullmatches ``layers_pattern``; without a pattern, the first
    integer segment."""
    parts = path.split(".")
    for i, seg in enumerate(parts):
        if seg.isdigit():
            prefix = ".".join(parts[:i])
            if (
                layers_pattern is None
                or matches(layers_pattern, prefix)
                or matches(layers_pattern, parts[i - 1] if i else "")
            ):
                return int(seg)
    return None


def output_head(model: nn.Module) -> str | None:
    """Path of the output head excluded by "all-linear": ``get_output_embeddings()`` when
    the model has one, otherwise the last Linear-like module in ``named_modules()`` order."""
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # noqa: BLE001 - a user model's method; fall back to order
            head = None
        if head is not None:
            for name, m in model.named_modules():
                if m is head:
                    return name
    last = None
    for name, m in model.named_modules():
        if base_kind(m) in ("linear", "conv1d_t"):
            last = name
    return last


def read_by_parent(model: nn.Module, path: str) -> bool:
    """True for a module whose parent reads its weight directly instead of calling it
    (``nn.MultiheadAttention.out_proj``): a wrapper there would be silently bypassed."""
    parent = path.rpartition(".")[0]
    return isinstance(model.get_submodule(parent) if parent else None, nn.MultiheadAttention)


def select(model: nn.Module, spec) -> list[str]:
    """Paths of the modules ``spec`` adapts, in ``named_modules()`` order (no side effects).

    Wrapped layers match by their original path, so a second adapter can join a layer.
    ``target_parameters`` adds parameter paths (adaptkit/param_base.py)."""
    from .param_base import select_params

    out = []
    if spec.targets:
        out = select_paths(
            model, spec.targets, spec.exclude, spec.layers_to_transform, spec.layers_pattern, type(spec).__name__
        )
    return out + (select_params(model, spec) if spec.target_parameters else [])


def select_paths(
    model: nn.Module,
    targets: tuple[str, ...] | None,
    exclude: tuple[str, ...] | None = None,
    layers: tuple[int, ...] | None = None,
    layers_pattern: tuple[str, ...] | None = None,
    owner: str = "targets",
) -> list[str]:
    """:func:`select` on explicit patterns (``owner`` names the caller in errors)."""
    all_linear = targets == (ALL_LINEAR,)
    head = output_head(model) if all_linear else None
    out = []
    for path, m in model.named_modules():
        if not path or _inside_wrapper(path, model) or base_kind(m) == "param":
            continue
        if all_linear:
            if base_kind(m) not in ("linear", "conv1d_t") or path == head or read_by_parent(model, path):
                continue
        elif not matches(targets, path):
            continue
        if matches(exclude, path):
            continue
        if layers is not None:
            idx = layer_index(path, layers_pattern)
            if idx is None or idx not in layers:
                continue
        out.append(path)
    if not out:
        raise AdaptkitError(_no_match(model, owner, targets, exclude, layers, layers_pattern, all_linear))
    return out


def _listed(paths: list[str], n: int = 4) -> str:
    shown = ", ".join(f"'{p}'" for p in paths[:n])
    return shown + (f", ... ({len(paths)} modules)" if len(paths) > n else "")


def _no_match(model: nn.Module, cls: str, targets, exclude, layers, layers_pattern, all_linear: bool) -> str:
    """The zero-match message. A user coming from PEFT writes bare names (``["q_proj",
    "v_proj"]``), which PEFT matches as path suffixes; the hint shows the adaptable (leaf)
    modules those names would have meant and the regex that selects them, rather than the
    first few paths of the tree, which are containers."""
    owner = f"{cls}: targets={list(targets)} matched no module"
    mods = {p: m for p, m in model.named_modules() if p and not _inside_wrapper(p, model) and base_kind(m) != "param"}
    paths = list(mods)
    leaves = [p for p in paths if base_kind(mods[p]) is not None]
    if all_linear:
        return (
            f"{owner}: the model has no Linear-like module besides its output head; "
            f"adaptable modules: [{_listed(leaves) or 'none'}]; name them with a regex instead"
        )
    hit = [p for p in paths if matches(targets, p)]
    if hit:  # exclude / layers_to_transform removed every match
        return (
            f"{cls}: matched no module left to adapt: targets={list(targets)} matched "
            f"{_listed(hit)}, but exclude={exclude} / layers_to_transform="
            f"{layers} (layers_pattern={layers_pattern}) removed all "
            f"of them; loosen those"
        )
    rule = "patterns are re.fullmatch-ed against full module paths (no suffix matching, unlike PEFT)"
    asked = [t for t in targets if any(re.fullmatch(rf"(?:.*\.)?(?:{t})", p) for p in leaves)]
    if asked:
        meant = [p for p in leaves if any(re.fullmatch(rf"(?:.*\.)?(?:{t})", p) for t in asked)]
        suffix = asked[0] if len(asked) == 1 and re.fullmatch(r"\w+", asked[0]) else f"({'|'.join(asked)})"
        return f'{owner}: {rule}. Adaptable modules ending with {asked}: {_listed(meant)}. Use targets=r".*\\.{suffix}"'
    names = list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in leaves))
    if not names:
        return (
            f"{owner}: the model has no adaptable module (Linear, Conv, Embedding, GPT-2 "
            f"Conv1D); some paths: [{_listed(paths, 8)}]"
        )
    linear = [p.rsplit(".", 1)[-1] for p in leaves if base_kind(mods[p]) in ("linear", "conv1d_t")]
    pick = list(dict.fromkeys(linear or names))[:2]
    example = pick[0] if len(pick) == 1 else f"({'|'.join(pick)})"
    return (
        f"{owner}: {rule}. Adaptable modules: {_listed(leaves)}; their names: {names[:12]}. "
        f'Use e.g. targets=r".*\\.{example}"'
    )


def _inside_wrapper(path: str, model: nn.Module) -> bool:
    """Paths below an AdaptedLayer (its adapter modules) are never targets."""
    from .param_base import module_at  # a hosted parameter's path resolves to the Parameter in get_submodule

    parent = path.rsplit(".", 1)[0] if "." in path else ""
    while parent:
        if isinstance(module_at(model, parent), AdaptedLayer):
            return True
        parent = parent.rsplit(".", 1)[0] if "." in parent else ""
    return False


def saved_modules(model: nn.Module, patterns: tuple[str, ...] | None) -> list[str]:
    """Paths of the modules matching ``modules_to_save`` (outermost matches only)."""
    if not patterns:
        return []
    out: list[str] = []
    for path, _ in model.named_modules():
        if path and matches(patterns, path) and not any(path.startswith(p + ".") for p in out):
            out.append(path)
    if not out:
        raise AdaptkitError(
            f"modules_to_save={list(patterns)} matched no module; patterns are "
            f"re.fullmatch-ed against full paths such as "
            f"{[n for n, _ in model.named_modules() if n][:8]}"
        )
    return out
