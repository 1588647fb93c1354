"""Model-level NF4, reached as ``adaptkit.nf4.quantize / save / load / drift_report``:
quantise a model's Linear weights without adapters, and save / load a quantised model so
it need not be re-quantised at every start.

File (one safetensors, written atomically): every state-dict tensor of the model except
adapters; each NF4 layer in bitsandbytes' serialisation (``<path>.weight`` uint8
[ceil(n/2), 1], ``<path>.weight.absmax``, ``.quant_map``, ``.nested_absmax``,
``.nested_quant_map``, ``.quant_state.bitsandbytes__nf4``; see adaptkit.nf4.NF4State).
Metadata: ``adaptkit.nf4.format`` = "1", ``adaptkit.version``, ``adaptkit.nf4.layers``
(JSON: path -> compute dtype). Loading validates every key and shape before it touches
the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, cast

import torch
import torch.nn as nn

from .errors import AdaptkitError
from .inject import check_model, state
from .io import _full, _is_sharded, json_object, key_problems, read_safetensors, write_safetensors
from .layer import adapted_layers, base_kind
from .nf4 import NF4State
from .nf4_linear import DTYPE_NAMES, DTYPES, NF4Linear, check_settings, packed_bytes
from .spec import _as_tuple
from .targets import select_paths

FORMAT = "1"
_OWN = ("weight", "absmax", "nested_absmax", "offset")  # an NF4 layer's own tensor names


def _no_adapters(model: nn.Module, what: str) -> None:
    if state(model).specs or adapted_layers(model):
        raise AdaptkitError(
            f"{what}: the model carries adapters {sorted(state(model).specs)}; work on "
            f"the base before ak.inject (ak.QLoRA quantises its targets itself)"
        )


def quantize(
    model: nn.Module,
    targets="all-linear",
    *,
    exclude=None,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: str | None = None,
) -> list[str]:
    """Replace every nn.Linear matching ``targets`` (regexes, ``re.fullmatch``; default
    "all-linear": every Linear but the output head) by an :class:`NF4Linear`, in place.

    Deterministic (same bytes as ak.QLoRA's inject with the same settings). Returns the
    quantised paths; Linears that already are NF4 are skipped. Everything is checked and
    quantised before the first module is swapped."""
    owner = "adaptkit.nf4.quantize"
    check_model(model, owner)
    check_settings(owner, blocksize, double_quant, compute_dtype)
    _no_adapters(model, owner)
    paths = select_paths(model, _as_tuple(owner, "targets", targets), _as_tuple(owner, "exclude", exclude), owner=owner)
    paths = [p for p in paths if not isinstance(model.get_submodule(p), NF4Linear)]
    bad = [
        f"'{p}' ({type(model.get_submodule(p)).__name__})"
        for p in paths
        if base_kind(model.get_submodule(p)) != "linear"
    ]
    if bad:
        raise AdaptkitError(
            f"{owner}: quantises nn.Linear only, but targets matched {', '.join(bad)}; exclude them or narrow targets"
        )
    cd = DTYPES[compute_dtype] if compute_dtype else None  # checked by check_settings
    kw: dict[str, Any] = dict(blocksize=blocksize, double_quant=double_quant, compute_dtype=cd)
    new = {p: NF4Linear.from_linear(cast(nn.Linear, model.get_submodule(p)), **kw) for p in paths}
    for p, q in new.items():
        model.set_submodule(p, q)
    return paths


def _nf4_modules(model: nn.Module) -> dict[str, NF4Linear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, NF4Linear)}


def _key(path: str, leaf: str) -> str:
    return f"{path}.{leaf}" if path else leaf


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's weights with its NF4 layers packed (module docstring), atomically.
    Adapters are not included (``ak.save`` writes those). Under FSDP2 call it on every rank:
    the shards are gathered (collectives) and rank 0 writes the single-process file."""
    check_model(model, "adaptkit.nf4.save")
    nf4 = _nf4_modules(model)
    if not nf4:
        raise AdaptkitError(
            "adaptkit.nf4.save: the model has no NF4 layer; quantise it first "
            "(adaptkit.nf4.quantize) or save it with safetensors directly"
        )
    merged = [p for p, l in adapted_layers(model) if any(a.merged for a in l.adapters.values())]
    if merged:
        raise AdaptkitError(
            f"adaptkit.nf4.save: adapters are merged in place at {merged[:3]}; "
            f"ak.unmerge(model) first, so the base weights are saved"
        )
    tensors, layers = {}, {}
    skip = tuple(_key(p, "adapters.") for p, _ in adapted_layers(model))  # ak.save writes those
    for k, t in model.state_dict().items():
        mod, _, leaf = k.rpartition(".")
        if (skip and k.startswith(skip)) or (mod in nf4 and leaf in _OWN):
            continue
        tensors[k] = _full(t)
    for p, m in nf4.items():
        flat = packed_bytes(_full(m.weight), m.in_features * m.out_features)  # [ceil(n/2)]
        tensors[_key(p, "weight")] = flat.view(-1, 1)  # bitsandbytes: [ceil(n/2), 1]
        st = dataclasses.replace(m.state(), absmax=_full(m.absmax))
        tensors.update(st.to_tensors(prefix=_key(p, "weight")))
        layers[p] = {"compute_dtype": DTYPE_NAMES[m.compute_dtype]}
    if any(_is_sharded(t) for t in model.parameters()) and torch.distributed.get_rank() != 0:
        return  # FSDP2: every rank took part in the gathers above; rank 0 alone writes
    from . import __version__

    meta = {"adaptkit.nf4.format": FORMAT, "adaptkit.version": __version__, "adaptkit.nf4.layers": json.dumps(layers)}
    write_safetensors(tensors, path, meta)


def load(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a file from :func:`save` into ``model``: the float model it was made from (its
    Linears at the file's NF4 paths become NF4Linear) or an already quantised one. Returns
    the NF4 paths. Missing / unexpected / mis-shaped keys are reported together and leave
    the model untouched."""
    check_model(model, "adaptkit.nf4.load")
    tensors, meta = read_safetensors(path)
    where = f"adaptkit.nf4.load '{os.fspath(path)}'"
    if meta.get("adaptkit.nf4.format") != FORMAT:
        hint = "an adapter file: use ak.load" if "adaptkit.format" in meta else "not an adaptkit.nf4.save file"
        raise AdaptkitError(
            f"{where}: adaptkit.nf4.format={meta.get('adaptkit.nf4.format')!r}, expected {FORMAT!r} ({hint})"
        )
    _no_adapters(model, where)
    layers = json_object(meta, "adaptkit.nf4.layers", where, "adaptkit.nf4.save")
    bad = [
        p
        for p, d in layers.items()
        if not (isinstance(d, dict) and isinstance(d.get("compute_dtype"), str) and d["compute_dtype"] in DTYPES)
    ]
    if bad:
        raise AdaptkitError(
            f"{where}: metadata field 'adaptkit.nf4.layers' is malformed at {bad[:3]}: "
            f'each entry must be {{"compute_dtype": one of {list(DTYPES)}}}; the file is '
            f"corrupt or was edited: re-save it with adaptkit.nf4.save"
        )
    problems, built = [], {}
    for p, d in layers.items():
        try:
            m: Any = model.get_submodule(p) if p else None  # a Linear (the root cannot be swapped)
        except AttributeError:
            m = None
        if m is None:
            problems.append(f"NF4 layer '{p}' is not in the model")
            continue
        try:
            st = NF4State.from_tensors(tensors, prefix=_key(p, "weight"))
            packed = tensors[_key(p, "weight")].reshape(-1)  # [ceil(n/2), 1] -> [ceil(n/2)]
            if base_kind(m) != "linear" or [m.out_features, m.in_features] != list(st.shape):
                raise AdaptkitError(
                    f"'{p}': file has an NF4 weight {list(st.shape)}, the model a "
                    f"{type(m).__name__}{' weight ' + str(list(m.weight.shape)) if hasattr(m, 'weight') else ''}"
                )
            if (m.bias is None) != (_key(p, "bias") not in tensors):
                raise AdaptkitError(f"'{p}': bias {'missing in the file' if m.bias is not None else 'unexpected'}")
            if packed.dtype != torch.uint8 or packed.numel() != (st.numel + 1) // 2:
                raise AdaptkitError(
                    f"'{p}': packed weight is {packed.dtype}[{packed.numel()}], expected uint8[{(st.numel + 1) // 2}]"
                )
        except AdaptkitError as e:
            problems.append(str(e))
            continue
        dev = m.weight.device
        q = NF4Linear(
            st.shape[1],
            st.shape[0],
            bias=False,
            blocksize=st.blocksize,
            double_quant=st.double_quant,
            nested_blocksize=st.nested_blocksize,
            dtype=st.dtype,
            compute_dtype=DTYPES[d["compute_dtype"]],
            device="meta",
        )
        q.register_parameter("bias", m.bias)  # the model's Parameter, loaded below
        built[p] = q.set_packed(packed, st).to(dev).train(m.training)
    # every other tensor: exactly the model's remaining state-dict keys, with their shapes
    own = {_key(p, k) for p in layers for k in _OWN}
    model_sd = {k: v for k, v in model.state_dict().items() if k not in own}
    rest = {
        k: v
        for k, v in tensors.items()
        if not any(k == _key(p, "weight") or k.startswith(_key(p, "weight.")) for p in layers)
    }
    problems += key_problems({k: v.shape for k, v in model_sd.items()}, rest)
    if problems:
        raise AdaptkitError(f"{where}: " + "; ".join(problems) + ". Nothing was loaded")
    # every name of every tensor (tied weights have several), looked up before any swap; the
    # NF4 layers keep the model's bias Parameters, so these stay the tensors to fill
    targets = {
        **dict(model.named_parameters(remove_duplicate=False)),
        **dict(model.named_buffers(remove_duplicate=False)),
    }
    dest = [(targets[k], v) for k, v in rest.items()]
    for p, q in built.items():
        model.set_submodule(p, q)
    with torch.no_grad():
        for t, v in dest:
            t.copy_(v)
    return list(layers)


def drift_report(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per path, the ``requant_drift`` that ``ak.merge(model, requantize=True)`` recorded."""
    check_model(model, "adaptkit.nf4.drift_report")
    return {p: m.requant_drift for p, m in model.named_modules() if isinstance(getattr(m, "requant_drift", None), dict)}
