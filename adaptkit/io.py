"""Save / load adapters: one strict, versioned safetensors file (format 1; docs/ARCHITECTURE.md).

Tensors: ``<module path>.<param>`` (adapter parameters, plus trained biases and
``modules_to_save`` weights; never frozen base weights; no adapter name in keys).
Metadata (strings): ``adaptkit.format`` = "1", ``adaptkit.version``, ``adaptkit.spec``
(spec JSON), ``adaptkit.layers`` (JSON: path -> method, base type, shape, per-layer state).

Loading validates everything (format, spec, every path, type, shape and key) and reports
every problem in one error before the model is touched. Writes are atomic.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, cast

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import AdaptkitError
from .inject import attach, check_model, check_name, plan, state
from .layer import KINDS, adapted_layers, base_kind, weight_shape
from .param_base import find
from .spec import AdapterSpec

FORMAT = "1"


def _version() -> str:
    from . import __version__

    return __version__


def _is_sharded(t: torch.Tensor) -> bool:
    """A DTensor (FSDP2 ``fully_shard``, tensor parallel), recognised without importing
    torch.distributed."""
    return hasattr(t, "full_tensor") and hasattr(t, "placements")


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor is gathered from its mesh (a collective, so every rank
    must get here); any other tensor is returned as it is."""
    return cast(Any, t).full_tensor() if _is_sharded(t) else t


def adapter_tensors(model: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """File tensors and the ``adaptkit.layers`` table of adapter ``name``. Sharded (DTensor)
    parameters are gathered whole, a collective: every rank must call this together."""
    st = state(model)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for path, layer in adapted_layers(model):
        a = layer.adapters[name] if name in layer.adapters else None
        if a is None:
            continue
        for k, t in a.state_dict().items():
            tensors[f"{path}.{k}"] = _full(t)
        layers[path] = {
            "method": st.specs[name].method,
            "base": layer._base_cls.__name__,
            "kind": layer.kind,
            "shape": weight_shape(layer),
            "state": a.layer_state(),
        }
    params = dict(model.named_parameters())
    for q in st.extras.get(name, []):
        tensors[q] = _full(params[q].detach())
        mod = q.rsplit(".", 1)[0] if "." in q else ""
        layers.setdefault(mod, {"method": "trained", "base": type(model.get_submodule(mod)).__name__})
    return tensors, layers


def save(model: nn.Module, path: str | os.PathLike, name: str = "default") -> None:
    """Write adapter ``name`` of ``model`` to ``path`` atomically (temp file + rename).

    Distributed: with DDP pass the wrapped model (``ddp.module``) and call it on one rank.
    With FSDP2 (``fully_shard``: DTensor parameters) call it on every rank: the shards are
    gathered (a collective) and rank 0 writes the same file a single process would."""
    check_model(model, "save")
    st = state(model)
    if name not in st.specs:
        raise AdaptkitError(f"save: no adapter named {name!r}; this model has {sorted(st.specs)}")
    tensors, layers = adapter_tensors(model, name)
    if any(_is_sharded(p) for p in model.parameters()) and torch.distributed.get_rank() != 0:
        return  # every rank took part in the gather above; rank 0 alone writes
    meta = {
        "adaptkit.format": FORMAT,
        "adaptkit.version": _version(),
        "adaptkit.spec": json.dumps(st.specs[name].to_dict()),
        "adaptkit.layers": json.dumps(layers),
    }
    write_safetensors(tensors, path, meta)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``:
    readers see the old file or the new one, and a failure leaves no partial file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise AdaptkitError(f"cannot write '{path}': folder '{folder}' does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=".adaptkit-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Atomically write ``tensors`` (moved to CPU) with string ``metadata``. safetensors
    refuses non-contiguous tensors and tensors sharing storage (tied weights): those are
    copied, the rest are written as they are (a merged checkpoint is not held twice)."""
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen else t
        seen.add(ptr)
    tensors = out
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read an adaptkit file: (tensors, metadata); a clear error for anything else."""
    tensors, meta = read_safetensors(path)
    path = os.fspath(path)
    fmt = meta.get("adaptkit.format")
    if fmt != FORMAT:
        raise AdaptkitError(
            f"load: '{path}' has adaptkit.format={fmt!r}, expected {FORMAT!r}"
            + (
                "; it is not an adaptkit file (a PEFT folder? use ak.peft_compat)"
                if fmt is None
                else "; it was written by another adaptkit version: upgrade adaptkit"
            )
        )
    for k in ("adaptkit.spec", "adaptkit.layers"):
        if k not in meta:
            raise AdaptkitError(f"load: '{path}' lacks the metadata key {k!r}; re-save it with ak.save")
    parse_meta(meta, path)  # every reader of the file (load, the command line) gets checked fields
    return tensors, meta


def json_object(meta: dict[str, str], key: str, where: str, writer: str = "ak.save") -> dict:
    """The JSON object in metadata field ``key``; ``writer`` is the call that writes the file."""
    if not isinstance(meta.get(key), str):
        raise AdaptkitError(f"{where}: the metadata field {key!r} is missing; re-save it with {writer}")
    try:
        v = json.loads(meta[key])
    except RecursionError:
        raise AdaptkitError(
            f"{where}: metadata field {key!r} is JSON nested too deeply to be "
            f"adaptkit's; the file is corrupt or was edited: re-save it with {writer}"
        ) from None
    except ValueError as e:  # JSONDecodeError, and integers past Python's digit limit
        raise AdaptkitError(
            f"{where}: corrupt JSON in metadata field {key!r} ({e}); the file is "
            f"corrupt or was edited: re-save it with {writer}"
        ) from None
    if not isinstance(v, dict):
        raise AdaptkitError(
            f"{where}: metadata field {key!r} must be a JSON object, got a JSON "
            f"{_json_type(v)}; the file is corrupt or was edited: re-save it with {writer}"
        )
    return v


def _json_type(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(v), "number")


def _layer_problem(p: str, d, method: str) -> str | None:
    """What is wrong with one ``adaptkit.layers`` entry, or None."""
    if not isinstance(d, dict):
        return f"'{p}' is a JSON {_json_type(d)}, expected an object"
    m = d.get("method")
    if m == "trained":  # a modules_to_save module or a trained bias: only its tensors matter
        return (
            None if isinstance(d.get("base"), str) else f"'{p}' has base={d.get('base')!r:.80}, expected a class name"
        )
    if m != method:
        return f"'{p}' has method={m!r}, expected the spec's {method!r} or 'trained'"
    kind, shape = d.get("kind"), d.get("shape")
    if kind not in KINDS:
        return f"'{p}' has kind={kind!r}, expected one of {list(KINDS)}"
    dims = {"conv": (3, 4, 5), "linear": (2,), "conv1d_t": (2,), "embedding": (2,), "param": (2, 3)}.get(
        kind, range(2, 9)
    )
    if not (
        isinstance(shape, list)
        and len(shape) in dims
        and all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in shape)
    ):
        n = str(dims[0]) if len(dims) == 1 else f"{dims[0]}-{dims[-1]}"
        return f"'{p}' has shape={shape!r:.80}, expected a list of {n} positive ints"
    if not isinstance(d.get("base"), str):
        return f"'{p}' has base={d.get('base')!r:.80}, expected a class name"
    if not isinstance(d.get("state", {}), dict):
        return f"'{p}' has state={d.get('state')!r:.80}, expected an object"
    return None


def parse_meta(meta: dict[str, str], path: str) -> tuple[AdapterSpec, dict[str, dict]]:
    """The spec and the layer table of an adapter file's metadata, every field checked, so
    that a corrupt or hand-edited file fails here naming the file and the field instead of
    crashing whichever code reads the field first."""
    where = f"load: '{path}'"
    d = json_object(meta, "adaptkit.spec", where)
    try:
        spec = AdapterSpec.from_dict(d)
    except AdaptkitError as e:
        raise AdaptkitError(f"{where}: metadata field 'adaptkit.spec': {e}") from None
    except (TypeError, RecursionError) as e:  # a wrong-typed field some method's checks trip on
        raise AdaptkitError(
            f"{where}: metadata field 'adaptkit.spec' has a field of the wrong type "
            f"({type(e).__name__}: {str(e)[:200]}); the file is corrupt or was "
            f"edited: re-save it with ak.save"
        ) from None
    layers = json_object(meta, "adaptkit.layers", where)
    bad = [b for b in (_layer_problem(p, v, spec.method) for p, v in layers.items()) if b]
    if bad:
        more = f"; ... ({len(bad)} entries)" if len(bad) > 5 else ""
        raise AdaptkitError(
            f"{where}: metadata field 'adaptkit.layers' is malformed: "
            f"{'; '.join(bad[:5])}{more}; the file is corrupt or was edited: "
            f"re-save it with ak.save"
        )
    return spec, layers


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of any safetensors file; a clear error for a missing, truncated or
    pickle file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AdaptkitError(f"load: no file at '{path}'")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise AdaptkitError(
            f"load: '{path}' is not a readable safetensors file ({type(e).__name__}: {e}); it may "
            f"be truncated, or a pickle (.bin/.pt), which adaptkit never loads. Re-save it with "
            f"ak.save"
        ) from None
    return tensors, meta


def load(model: nn.Module, path: str | os.PathLike, name: str = "default") -> list[str]:
    """Inject the file's adapter into ``model`` as ``name`` and load its tensors.

    Everything is checked first (paths, base types and shapes, every key and tensor shape);
    on any problem one AdaptkitError lists all of them and the model is unchanged."""
    check_model(model, "load")
    tensors, meta = read(path)
    return load_tensors(model, tensors, meta, name, os.fspath(path))


def key_problems(expected: dict[str, tuple], tensors: dict[str, torch.Tensor], shape_hint: str = "") -> list[str]:
    """Every missing, unexpected and mis-shaped key of ``tensors`` against ``expected``
    (key -> shape), as message parts: a strict load reports them all at once."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shaped = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(tensors))
        if tuple(tensors[k].shape) != tuple(expected[k])
    ]
    return (
        [f"missing keys {missing}"] * bool(missing)
        + [f"unexpected keys {unexpected}"] * bool(unexpected)
        + [f"mis-shaped tensors [{'; '.join(shaped)}]{shape_hint}"] * bool(shaped)
    )


def load_tensors(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, str],
    name: str = "default",
    path: str = "<memory>",
) -> list[str]:
    """:func:`load` from tensors and metadata already in memory (format 1 layout; used by
    ``ak.peft_compat``); ``path`` only names the source in errors."""
    check_model(model, "load")
    check_name(model, name, "load")
    spec, layers = parse_meta(meta, path)
    problems = []
    adapted = {p: d for p, d in layers.items() if d.get("method") == spec.method}
    for p, d in adapted.items():
        try:
            m = find(model, p)  # a parameter path: its ParamLayer (adaptkit/param_base.py)
        except AdaptkitError as e:
            m, msg = None, str(e)
        else:
            msg = f"module '{p}' is in the file but not in the model"
        if m is None:
            problems.append(msg)
            continue
        if base_kind(m) != d.get("kind") or weight_shape(m) != d.get("shape"):
            shape = weight_shape(m) if base_kind(m) else "no"
            problems.append(
                f"'{p}': file has {d.get('base')} weight {d.get('shape')}, model has {type(m).__name__} weight {shape}"
            )
    if problems:
        raise AdaptkitError(f"load '{path}': " + "; ".join(problems) + ". Nothing was loaded")
    built, extras = plan(
        model, spec, name, paths=list(adapted), layer_states={p: d.get("state", {}) for p, d in adapted.items()}
    )
    expected: dict[str, tuple] = {}
    for p, _, a in built:
        for k, t in a.state_dict().items():
            expected[f"{p}.{k}"] = tuple(t.shape)
    params = dict(model.named_parameters())
    for q in extras:
        expected[q] = tuple(params[q].shape)
    parts = key_problems(expected, tensors, " (config vs checkpoint rank?)")
    if parts:
        raise AdaptkitError(
            f"load '{path}' ({spec.method}): "
            + "; ".join(parts)
            + ". Nothing was loaded; the file does not fit this model/spec"
        )
    paths = attach(model, spec, name, built, extras)
    with torch.no_grad():
        for p, _, a in built:
            sd = {k: tensors[f"{p}.{k}"] for k in a.state_dict()}
            a.load_state_dict(sd, strict=True)
        for q in extras:
            params[q].copy_(tensors[q])
    return paths
