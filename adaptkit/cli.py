"""``python -m adaptkit`` / ``adaptkit``: inspect, merge and convert adapter files without
model code.

    adaptkit inspect ADAPTER                      spec, layers, parameter count, size
    adaptkit merge BASE.safetensors ADAPTER -o OUT.safetensors [--prefix P]
    adaptkit convert SRC -o DST [--base BASE.safetensors] [--prefix P]
    adaptkit convert SRC --to-lora (--rank R | --energy E) -o DST [--base BASE.safetensors]

ADAPTER is an adaptkit ``.safetensors`` file or a PEFT adapter folder. ``merge`` works on
state dicts: for every adapted path it rebuilds the adapter on a stand-in layer of the
recorded kind holding the base weight ``<prefix><path>.weight``, adds ``merge_weight`` in
fp32 (exactly what ``ak.merge`` does to a model) and casts back; ``modules_to_save`` and
trained bias tensors replace the base's. The prefix (e.g. ``model.``) is found by itself
when unambiguous.

``convert`` works at file level (no model needed). adaptkit -> PEFT uses the file's layer
table. PEFT -> adaptkit needs each adapted base's kind and weight shape, which PEFT does
not store: they come from ``--base`` when given, otherwise from the adapter tensors as the
method's PEFT form reads them (``PeftForm.infer_layer``: GPT-2 Conv1D vs Linear from LoRA's
``fan_in_fan_out``; a LoKr conv with a low-rank w2 looks like a Linear, so give ``--base``
there). ``ak.load`` still checks every shape against the
model, so a wrong guess is an error there, never a silent mismatch. PEFT's target patterns
are not re-resolved without a model: the file's layers are taken as they are.

``convert --to-lora`` writes any adapter as a plain LoRA (PEFT folder, or adaptkit file for a
``.safetensors`` output): per layer a stand-in of the recorded kind and shape, the adapter
loaded onto it as ``ak.load`` does, and the truncated SVD of its update
(:mod:`adaptkit.lora_convert`). Updates that depend on the base weights (DoRA, QDoRA, residual
inits such as PiSSA or LoRA-MPO's) need ``--base``.

Errors print one line, ``adaptkit: error: ...``, and exit with status 1 (2 for usage).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import torch
from safetensors import safe_open

from . import __version__
from .errors import AdaptkitError
from .io import read, write_safetensors
from .layer import stand_in_adapter
from .lora_convert import file_to_lora
from .peft_compat import form, from_peft, group_keys, read_folder, spec_fields, to_peft, write_folder
from .spec import AdapterSpec


def _read_base(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    if not os.path.isfile(path):
        raise AdaptkitError(f"no base file at '{path}'")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise AdaptkitError(f"'{path}' is not a readable safetensors file ({type(e).__name__}: {e})") from None


def _wkey(p: str, layers: dict | None = None) -> str:
    """The base key of adapted path p's weight: ``p.weight``, or p itself for a parameter
    adapted through target_parameters (kind "param")."""
    return p if layers is not None and layers.get(p, {}).get("kind") == "param" else f"{p}.weight"


def _find_prefix(paths: list[str], keys, prefix: str | None, where: str, layers: dict | None = None) -> str:
    """The prefix P with ``P + path + '.weight'`` (a parameter: ``P + path``) in the base for
    every adapted path."""
    if not paths:
        raise AdaptkitError("the adapter has no adapted layers")
    if prefix is not None:
        miss = [p for p in paths if f"{prefix}{_wkey(p, layers)}" not in keys]
        if miss:
            raise AdaptkitError(
                f"{where} has no '{prefix}{_wkey(miss[0], layers)}' ({len(miss)} adapted weights missing); "
                f"check --prefix"
            )
        return prefix
    tail = _wkey(paths[0], layers)
    cands = {k[: -len(tail)] for k in keys if k == tail or k.endswith("." + tail)}
    ok = sorted(c for c in cands if all(f"{c}{_wkey(p, layers)}" in keys for p in paths))
    if len(ok) != 1:
        raise AdaptkitError(
            f"{where}: cannot tell where the adapted weights are (candidate key "
            f"prefixes {ok or 'none'} for '{tail}'); the base does not fit this "
            f"adapter, or pass --prefix"
        )
    return ok[0]


_NAMES = {"linear": "Linear", "conv1d_t": "Conv1D", "embedding": "Embedding"}


def _load_adapter(src: str, base: dict | None = None, prefix: str | None = None):
    """(adaptkit tensors, metadata) of an adaptkit file or a PEFT folder; with ``base``
    (a state dict), PEFT layers' kinds and shapes come from it."""
    if not os.path.exists(src):
        raise AdaptkitError(f"no adapter file or PEFT folder at '{src}'")
    if not os.path.isdir(src):
        return read(src)
    cfg, tensors = read_folder(src)
    method = spec_fields(cfg)[0]
    pre = None if base is None else _find_prefix(list(group_keys(method, tensors)[0]), base, prefix, "base file")

    def layer_of(p, t):
        kind, shape = form(method).infer_layer(t, cfg, p)  # the method's PEFT form reads its tensors
        if pre is not None:
            real = tuple(base[f"{pre}{p}.weight"].shape)
            if len(real) > 2:
                kind = "conv"
            elif kind in ("linear", "conv1d_t") and real[0] != real[1]:  # orientation tells
                kind = "linear" if real == (shape[::-1] if kind == "conv1d_t" else shape) else "conv1d_t"
            shape = real
        return kind, tuple(shape), _NAMES.get(kind) or f"Conv{len(shape) - 2}d"

    out, meta, _ = from_peft(cfg, tensors, layer_of, where=f"'{src}'")
    return out, meta


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def cmd_inspect(args) -> None:
    tensors, meta = _load_adapter(args.adapter)
    spec = json.loads(meta["adaptkit.spec"])
    layers = json.loads(meta["adaptkit.layers"])
    kind = (
        "PEFT adapter folder"
        if os.path.isdir(args.adapter)
        else f"adaptkit format {meta['adaptkit.format']} (written by adaptkit {meta['adaptkit.version']})"
    )
    disk = (
        sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(args.adapter) for f in fs)
        if os.path.isdir(args.adapter)
        else os.path.getsize(args.adapter)
    )
    print(f"{args.adapter}: {kind}")
    print(f"spec: {json.dumps(spec)}")
    rows = [("layer", "method", "base", "weight", "params")]
    for p, d in layers.items():
        n = sum(
            t.numel()
            for k, t in tensors.items()
            if k.rsplit(".", 1)[0] == p or d["method"] == "trained" and k.startswith(p + ".")
        )
        shape = "x".join(map(str, d.get("shape", []))) or "-"
        rows.append((p or "<root>", d["method"], d["base"], shape, f"{n:,d}"))
    # columns as wide as their content: a layer path is never cut (it is what --prefix and
    # rank_pattern are written against)
    w = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print(f"{r[0]:{w[0]}s} {r[1]:{w[1]}s} {r[2]:{w[2]}s} {r[3]:>{w[3]}s} {r[4]:>{w[4]}s}")
    total = sum(t.numel() for t in tensors.values())
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    print(
        f"{sum(d['method'] != 'trained' for d in layers.values())} adapted layers, "
        f"{len(tensors)} tensors, {total:,} parameters ({_size(nbytes)} as {'/'.join(dtypes)}), "
        f"{_size(disk)} on disk"
    )


def merge_layer(spec: AdapterSpec, path: str, d: dict, weight: torch.Tensor, tensors: dict):
    """(fp32 merged weight, the adapter's tensor keys) of one layer, exactly as ``ak.load``
    then ``ak.merge`` compute it: build, layer state, attach (residual inits), tensors,
    ``merge_weight`` in fp32 on a stand-in layer holding a copy of the base weight (for
    QLoRA its NF4 quantisation: the merge adds the delta to the dequantised weight)."""
    layer, a, names = stand_in_adapter(spec, d, path, weight.clone(), tensors)
    with torch.no_grad():
        a.attach(layer)
        try:
            a.load_state_dict({k: tensors[q] for k, q in names.items()}, strict=True)
        except RuntimeError as e:  # torch's size-mismatch report
            raise AdaptkitError(
                f"'{path}': the adapter's tensors do not fit its spec ({' '.join(str(e).split())[:300]})"
            ) from None
        merged = a.merge_weight(layer, layer.dense_weight())
    if not torch.isfinite(merged).all():
        raise AdaptkitError(f"non-finite merged weight at '{path}'; nothing was written")
    return merged, set(names.values())


def _fit_base(meta: dict, base: dict, prefix, base_name: str, adapter_name: str):
    """(layer table, adapted paths, key prefix) of an adapter file against a base state dict,
    every adapted weight's shape checked."""
    layers = json.loads(meta["adaptkit.layers"])
    method = json.loads(meta["adaptkit.spec"])["method"]
    paths = [p for p, d in layers.items() if d["method"] == method]
    pre = _find_prefix(paths, base, prefix, f"'{base_name}'", layers)
    bad = [
        f"'{pre}{_wkey(p, layers)}' is {list(base[pre + _wkey(p, layers)].shape)}, the adapter was made for "
        f"{layers[p]['shape']}"
        for p in paths
        if list(base[pre + _wkey(p, layers)].shape) != layers[p]["shape"]
    ]
    if bad:
        raise AdaptkitError(f"'{base_name}' does not fit '{adapter_name}': {'; '.join(bad)}")
    return layers, paths, pre


def _swapped(args, what: str) -> AdaptkitError:
    """The error for ``merge ADAPTER BASE``: the arguments in the other order."""
    call = " ".join(shlex.quote(a) for a in ("adaptkit", "merge", args.adapter, args.base, "-o", args.output))
    return AdaptkitError(
        f"'{args.base}' is {what}, not a base checkpoint: merge takes the base "
        f"weights first, then the adapter (adaptkit merge BASE ADAPTER -o OUT). "
        f"Swap the two: {call}"
    )


def cmd_merge(args) -> None:
    if os.path.isfile(os.path.join(args.base, "adapter_config.json")):
        raise _swapped(args, "a PEFT adapter folder")
    base, base_meta = _read_base(args.base)
    if "adaptkit.format" in base_meta:
        raise _swapped(args, "an adaptkit adapter file")
    tensors, meta = _load_adapter(args.adapter, base, args.prefix)
    spec = AdapterSpec.from_dict(json.loads(meta["adaptkit.spec"]))
    layers, paths, pre = _fit_base(meta, base, args.prefix, args.base, args.adapter)
    own, merged = set(), {}
    for i, p in enumerate(paths):
        if not args.quiet:
            done = (i + 1) * 30 // len(paths)
            print(
                f"\rmerging [{'#' * done}{'.' * (30 - done)}] {i + 1}/{len(paths)} {p[:40]:40s}",
                end="\n" if i + 1 == len(paths) else "",
                file=sys.stderr,
                flush=True,
            )
        key = f"{pre}{_wkey(p, layers)}"
        try:
            merged[key], keys = merge_layer(spec, p, layers[p], base[key], tensors)
        except BaseException:
            if not args.quiet and i + 1 < len(paths):
                print(file=sys.stderr)  # end the progress line: the error stays one line
            raise
        own.update(keys)
    extras = sorted(set(tensors) - own)  # modules_to_save / trained biases replace the base's
    bad = [
        f"'{pre}{q}' "
        + (
            "is missing"
            if pre + q not in base
            else f"is {list(base[pre + q].shape)} vs {list(tensors[q].shape)} in the adapter"
        )
        for q in extras
        if pre + q not in base or base[pre + q].shape != tensors[q].shape
    ]
    if bad:
        raise AdaptkitError(f"'{args.base}' does not fit '{args.adapter}': {'; '.join(bad)}")
    for key, w in merged.items():
        base[key] = w.to(base[key].dtype)
    for q in extras:
        base[pre + q] = tensors[q].to(base[pre + q].dtype)
    write_safetensors(base, args.output, base_meta)
    print(f"wrote {args.output}: {len(paths)} merged layers, {len(extras)} replaced tensors")


def cmd_to_lora(args) -> None:
    """``convert --to-lora``: the adapter as a plain LoRA (truncated SVD of each layer's update,
    :mod:`adaptkit.lora_convert`), written as a PEFT folder, or as an adaptkit file when the
    output ends in ``.safetensors``. ``--base`` gives the weights the update depends on (DoRA,
    QDoRA, residual inits)."""
    base = _read_base(args.base)[0] if args.base else None
    tensors, meta = _load_adapter(args.src, base, args.prefix)
    weight_of = None
    if base is not None:
        pre = _fit_base(meta, base, args.prefix, args.base, args.src)[2]
        weight_of = lambda p: base[f"{pre}{p}.weight"]  # noqa: E731
    out, new_meta, report = file_to_lora(tensors, meta, args.rank, args.energy, weight_of, f"'{args.src}'")
    if args.output.endswith(".safetensors"):
        write_safetensors(out, args.output, new_meta)
        what = f"adaptkit file {args.output}"
    else:
        write_folder(args.output, *to_peft(out, new_meta))
        what = f"PEFT folder {args.output}"
    for p, e in report.errors.items():
        print(f"{p or '<root>':48.48s} rank {report.ranks[p]:5d}  relative error {e:.3e}")
    src = json.loads(meta["adaptkit.spec"])["method"]
    print(
        f"wrote {what}: {json.loads(new_meta['adaptkit.spec'])['method']} from {src}, {len(report.errors)} "
        f"layers, max relative error {max(report.errors.values()):.3e}"
    )


def cmd_convert(args) -> None:
    if args.to_lora:
        return cmd_to_lora(args)
    if args.rank is not None or args.energy is not None:
        raise AdaptkitError("--rank / --energy choose the LoRA rank of --to-lora; add --to-lora")
    if os.path.isdir(args.src):  # PEFT folder -> adaptkit file
        base = _read_base(args.base)[0] if args.base else None
        tensors, meta = _load_adapter(args.src, base, args.prefix)
        write_safetensors(tensors, args.output, meta)
        what = f"adaptkit file {args.output}"
    else:  # adaptkit file -> PEFT folder
        tensors, meta = _load_adapter(args.src)
        cfg, out = to_peft(tensors, meta)
        write_folder(args.output, cfg, out)
        what = f"PEFT folder {args.output}"
    n = sum(d["method"] != "trained" for d in json.loads(meta["adaptkit.layers"]).values())
    print(f"wrote {what}: {json.loads(meta['adaptkit.spec'])['method']}, {n} layers")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="adaptkit",
        description="Inspect, merge and convert adapter files (adaptkit .safetensors or PEFT adapter folders).",
    )
    ap.add_argument("--version", action="version", version=f"adaptkit {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    p = sub.add_parser("inspect", help="show spec, layers, parameter count and size")
    p.add_argument("adapter", help="adaptkit .safetensors file or PEFT adapter folder")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("merge", help="fold an adapter into a base state dict (no model code)")
    p.add_argument("base", help="base model weights (.safetensors)")
    p.add_argument("adapter", help="adaptkit .safetensors file or PEFT adapter folder")
    p.add_argument("-o", "--output", required=True, help="merged weights to write (.safetensors)")
    p.add_argument("--prefix", help="key prefix of the base (e.g. 'model.'); found by itself if unique")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_merge)
    p = sub.add_parser("convert", help="PEFT folder -> adaptkit file, or adaptkit file -> PEFT folder")
    p.add_argument("src", help="PEFT adapter folder or adaptkit .safetensors file")
    p.add_argument("-o", "--output", required=True, help="adaptkit file or PEFT folder to write")
    p.add_argument("--base", help="base weights (.safetensors) giving PEFT layers' kinds and shapes")
    p.add_argument("--prefix", help="key prefix of --base (e.g. 'model.')")
    p.add_argument(
        "--to-lora",
        action="store_true",
        help="write the adapter as a plain LoRA (truncated "
        "SVD of each layer's update): a PEFT folder, or an adaptkit file if -o ends in .safetensors",
    )
    p.add_argument("--rank", type=int, help="--to-lora: the LoRA rank (capped per layer at min(out, in))")
    p.add_argument(
        "--energy",
        type=float,
        help="--to-lora: per-layer ranks keeping this share of the "
        "squared singular values (0 < E <= 1), instead of --rank",
    )
    p.set_defaults(fn=cmd_convert)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.fn(args)
    except (AdaptkitError, OSError) as e:
        msg = " ".join(str(e).split())  # one line, whatever the message holds
        print(f"adaptkit: error: {msg}", file=sys.stderr)
        return 1
    return 0
