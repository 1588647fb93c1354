"""NF4 storage on a real model: the MiniLM encoder (all-MiniLM-L6-v2) with its 36 Linear
weights quantised by ``adaptkit.nf4.quantize``, with and without double quantisation.

    python benchmarks/bench_nf4_model.py [--quick] [--json PATH] [--threads N]

(a few seconds: ``--quick`` runs the same measurement and only writes
runs/bench_nf4_model_quick.json instead of runs/bench_nf4_model.json; CPU only, as RSS is.)

Per variant (each in its own child process, so one variant's freed memory cannot hide
another's) it reports:
  * bits per quantised parameter: 8 * (packed bytes + absmax + nested_absmax + offset) /
    weights quantised. QLoRA (arXiv 2305.14314, §3) gives 4 + 32/64 = 4.5 without double
    quantisation and 4 + 8/64 + 32/(64*256) ≈ 4.127 with it (the per-layer fp32 offset adds
    32 bits per layer, ~2e-4 bits per weight here);
  * the model's tensor bytes (parameters + buffers) before / after;
  * the process's resident memory (RSS, psutil or /proc/self/statm) before loading, after
    loading plus one forward, and after quantising, each after ``gc.collect()`` and glibc
    ``malloc_trim(0)`` so that freed float weights are handed back to the OS before reading
    (a warm-up quantisation and the first forward run before the readings they would skew);
  * quantisation wall time, and the cosine similarity of sentence embeddings to the float
    encoder on a few sentences (a sanity check that the quantised encoder still works).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import _common as C

sys.path.insert(0, os.path.join(C.ROOT, "examples"))  # minibert.py: the pure-torch MiniLM loader

TARGETS = r".*\.(query|key|value|dense)"  # the 36 encoder Linears (minibert.py docstring)
SENTENCES = ["a gripping, beautifully shot film", "the plot goes nowhere and the jokes fall flat",
             "an ordinary afternoon at the museum", "I would watch it again tomorrow"]
MiB = C.MiB


def rss_bytes() -> int:
    """Resident set size of this process, after collecting garbage and trimming the heap."""
    gc.collect()
    try:  # glibc keeps freed heap pages unless asked; other libcs: no-op
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def nf4_storage(model: nn.Module) -> dict:
    """Bits of NF4 storage per quantised weight, split into its parts."""
    from adaptkit.nf4_linear import NF4Linear
    parts = {"packed": 0, "absmax": 0, "nested_absmax": 0, "offset": 0}
    params = layers = 0
    for m in model.modules():
        if isinstance(m, NF4Linear):
            layers += 1
            params += m.in_features * m.out_features
            for k, t in (("packed", m.weight), ("absmax", m.absmax),
                         ("nested_absmax", m.nested_absmax), ("offset", m.offset)):
                if t is not None:
                    parts[k] += 8 * t.numel() * t.element_size()
    return {"layers": layers, "quantised_params": params,
            "bits_per_param": sum(parts.values()) / params,
            "bits_per_param_parts": {k: v / params for k, v in parts.items()}}


def child(double_quant: bool) -> dict:
    """One variant, measured in this (fresh) process."""
    import adaptkit as ak
    from minibert import build_tokenizer, encode, load_minilm

    tok = build_tokenizer()
    ids, mask = encode(tok, SENTENCES)
    # warm-up: lazy imports and the quantiser's first-call tables are not the model's memory
    ak.nf4.quantize(nn.Sequential(nn.Linear(384, 384)), targets="0", double_quant=double_quant)
    rss0 = rss_bytes()
    model, _ = load_minilm()
    float_bytes = C.tensor_bytes(model)  # parameters + buffers: what the model keeps resident
    linear_params = sum(m.weight.numel() for m in model.modules() if type(m) is nn.Linear)
    with torch.no_grad():
        ref = model(ids, mask)  # (4, 384) mean-pooled embeddings
    # after the first forward: its kernels keep ~7 MiB of scratch that is no model memory
    rss_float = rss_bytes()
    t0 = time.perf_counter()
    paths = ak.nf4.quantize(model, targets=TARGETS, double_quant=double_quant)
    t_quant = time.perf_counter() - t0
    rss_nf4 = rss_bytes()  # the float Linear weights are gone: nothing else references them
    with torch.no_grad():
        cos = F.cosine_similarity(model(ids, mask), ref, dim=-1)  # (4,)
    return {
        "double_quant": double_quant, "paths": len(paths), "linear_params": linear_params,
        **nf4_storage(model),
        "model_bytes_before": float_bytes, "model_bytes_after": C.tensor_bytes(model),
        "rss_bytes_before_load": rss0, "rss_bytes_float": rss_float, "rss_bytes_nf4": rss_nf4,
        "quantize_s": t_quant, "embedding_cosine_min": float(cos.min()),
    }


def main(argv=None) -> int:
    ap = C.base_parser(__doc__.split("\n")[0], quick_help="the same (seconds-long) run, written to the _quick JSON",
                       json_default="runs/bench_nf4_model[_quick].json")
    ap.add_argument("--out", dest="json", help=argparse.SUPPRESS)  # deprecated alias of --json
    ap.add_argument("--child", choices=["dq", "plain"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    C.start(args)
    if args.child:
        print(json.dumps(child(args.child == "dq")))
        return 0
    rows = []
    for variant in ("dq", "plain"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    target = {True: 4 + 8 / 64 + 32 / (64 * 256), False: 4.5}
    print(f"MiniLM-L6 encoder: {rows[0]['paths']} Linear weights, {rows[0]['quantised_params']:,} "
          f"parameters quantised to NF4 (blocksize 64)")
    hdr = (f"{'double quant':>12} {'bits/param':>10} {'target':>7} {'model MiB':>17} "
           f"{'RSS MiB (float -> nf4)':>23} {'quantise s':>10} {'min cos':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        dq = r["double_quant"]
        print(f"{str(dq):>12} {r['bits_per_param']:>10.4f} {target[dq]:>7.3f} "
              f"{r['model_bytes_before'] / MiB:>7.1f} -> {r['model_bytes_after'] / MiB:>6.1f} "
              f"{r['rss_bytes_float'] / MiB:>11.1f} -> {r['rss_bytes_nf4'] / MiB:>7.1f} "
              f"{r['quantize_s']:>10.3f} {r['embedding_cosine_min']:>8.4f}")
    for r in rows:
        r["bits_target"] = target[r["double_quant"]]
        r["weights_bytes_fp32"] = 4 * r["quantised_params"]
        r["weights_bytes_nf4"] = r["bits_per_param"] * r["quantised_params"] / 8
        print(f"double_quant={r['double_quant']}: quantised weights {r['weights_bytes_fp32'] / MiB:.1f} MiB "
              f"fp32 -> {r['weights_bytes_nf4'] / MiB:.2f} MiB NF4 "
              f"({r['weights_bytes_fp32'] / r['weights_bytes_nf4']:.2f}x); process RSS before load "
              f"{r['rss_bytes_before_load'] / MiB:.1f} MiB, RSS drop "
              f"{(r['rss_bytes_float'] - r['rss_bytes_nf4']) / MiB:.1f} MiB vs tensor-byte drop "
              f"{(r['model_bytes_before'] - r['model_bytes_after']) / MiB:.1f} MiB")
    env = C.env_info(quick=args.quick)
    C.write_json(C.json_path(args, "bench_nf4_model"), {
        "bench": "bench_nf4_model", "model": "all-MiniLM-L6-v2 (examples/minibert.py)",
        "targets": TARGETS, "blocksize": 64, "torch": env["torch"], "python": env["python"],
        "threads": env["threads"], "cpu": env["cpu"], "env": env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
