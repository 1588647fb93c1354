"""NF4 benchmark: adaptkit.nf4 and the NF4Linear layer vs bitsandbytes (CPU) and dense Linear.

    python benchmarks/bench_nf4.py [--quick] [--threads N] [--device cpu|cuda] [--json PATH]
                                   [--size N] [--reps N] [--no-layer]

On a --size x --size fp32 weight (4096; --quick: 2048 and fewer repetitions), timings are the
minimum over --reps rounds, the candidates of a table taking turns within each round, the
order rotated each round (``_common.interleaved``; on a shared CPU other processes only ever
add time, and turns expose all candidates to the same load, so ratios within one run are the
figures to compare). Results: tables and JSON (runs/bench_nf4[_quick].json).

* memory bandwidth: read (``sum`` of the fp32 weight), copy into a preallocated buffer (read +
  write) and ``clone`` (a fresh tensor: includes first-touch page faults);
* quantise / dequantise throughput in GB/s of fp32 weight (n*4 bytes / time), with and without
  double quantisation, adaptkit vs ``bitsandbytes.functional`` (CPU only), and ratios;
* the layer, at 1 and 64 tokens: ``adaptkit.nf4.NF4Linear`` (compute dtype fp32 and bf16;
  :mod:`adaptkit.nf4_matmul` underneath) vs fp32 / bf16 ``nn.Linear`` and
  ``bnb.nn.Linear4bit`` (NF4, double quantisation, bf16 compute):
    - inference: eval, ``torch.no_grad``. bitsandbytes' CPU inference (eval, no grad, AVX512-BF16)
      rearranges the weight into its packed kernel layout on the first call (timed apart as
      ``bnb_first_call``; its later ``dequantize_4bit`` of that weight is then wrong, and the
      rearrangement needs out_features % 32 == 0 and in_features even). adaptkit's first call
      compiles its kernels (``ak_first_call``, once per process and layout);
    - training: forward + backward w.r.t. the input (frozen weight, as under QLoRA), bnb in
      train mode (``matmul_4bit``: dequantise + matmul, dequantise again in backward);
    - ``limit_ms``: reading the packed weight once at the measured read bandwidth.
Targets (issue 4): quantise >= 4x bnb CPU; dequantise >= bnb CPU; NF4 layer inference at 1
token within 2x of bnb's packed kernel; training path no slower than bnb's.
``--device cuda`` runs the adaptkit and torch columns on the GPU (bnb columns are CPU only).
"""
import argparse
import copy
import logging
import os
import resource

import torch
import torch.nn as nn

import _common as C
from adaptkit.nf4 import NF4Linear, dequantize_nf4, quantize_nf4


def race(cands: dict, reps: int, dev: torch.device) -> dict:
    """Best time (ms) of each callable over ``reps`` rounds, taking turns within a round (each
    called once untimed first): :func:`_common.interleaved` reduced by ``min``."""
    clocks = {k: C.timed(fn, dev) for k, fn in cands.items()}
    return {k: 1e3 * v for k, v in C.interleaved(clocks, 1, reps, min).items()}


def once_ms(fn, dev) -> float:
    return 1e3 * C.timed(fn, dev)()


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def load_bnb(dev: torch.device):
    if dev.type != "cpu":
        return None
    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes as bnb
        return bnb
    except Exception as e:  # optional comparator
        print(f"bitsandbytes unavailable ({e}); adaptkit columns only")
        return None


def main(argv=None) -> dict:
    ap = C.base_parser(__doc__.splitlines()[0], quick_help="2048^2 weight, fewer repetitions",
                       json_default="runs/bench_nf4[_quick].json")
    ap.add_argument("--size", type=int, default=None, help="weight is size x size (default 4096)")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 9; quick 3)")
    ap.add_argument("--no-layer", action="store_true", help="skip the layer part")
    ap.add_argument("--out", dest="json", help=argparse.SUPPRESS)  # deprecated alias of --json
    C.add_device(ap)  # bnb columns: CPU only
    args = ap.parse_args(argv)
    C.start(args)
    dev = torch.device(args.device)
    size = args.size or (2048 if args.quick else 4096)
    reps = args.reps or (3 if args.quick else 9)
    torch.manual_seed(0)
    bnb = load_bnb(dev)
    gb = size * size * 4 / 1e9  # GB of fp32 weight
    res = {"env": C.env_info(dev, bitsandbytes=getattr(bnb, "__version__", None), quick=args.quick,
                             loadavg_start=os.getloadavg()[0], size=size, reps=reps)}

    w = torch.randn(size, size, device=dev)
    if dev.type == "cpu":  # memory first, before anything else raises the process's peak RSS
        rss0 = maxrss_mb()
        quantize_nf4(w, double_quant=True)
        res["memory"] = {"weight_MB": gb * 1e3, "adaptkit_quantize_peak_extra_MB": maxrss_mb() - rss0}
        if bnb is not None:
            rss1 = maxrss_mb()
            bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
            res["memory"]["bnb_quantize_peak_extra_MB_at_least"] = maxrss_mb() - rss1

    dst = torch.empty_like(w)
    t = race({"read": lambda: w.sum(), "copy": lambda: dst.copy_(w), "clone": lambda: w.clone()}, reps, dev)
    res["bandwidth_GBps"] = {"read": gb / t["read"] * 1e3, "copy_preallocated_rw": 2 * gb / t["copy"] * 1e3,
                             "clone_fresh_rw": 2 * gb / t["clone"] * 1e3}

    rows = []
    for dq in (False, True):
        packed, st = quantize_nf4(w, double_quant=dq)
        c = {"ak_quant": lambda: quantize_nf4(w, double_quant=dq),
             "ak_dequant_fp32": lambda: dequantize_nf4(packed, st),
             "ak_dequant_bf16": lambda: dequantize_nf4(packed, st, torch.bfloat16)}
        if bnb is not None:
            bf = bnb.functional
            pb, sb = bf.quantize_4bit(w, quant_type="nf4", compress_statistics=dq)
            assert torch.equal(pb.reshape(-1), packed), "packed bytes differ from bitsandbytes"
            c["bnb_quant"] = lambda: bf.quantize_4bit(w, quant_type="nf4", compress_statistics=dq)
            c["bnb_dequant_fp32"] = lambda: bf.dequantize_4bit(pb, sb)
        row = {"double_quant": dq, **{k: gb / v * 1e3 for k, v in race(c, reps, dev).items()}}
        if bnb is not None:
            row["quant_ratio"] = row["ak_quant"] / row["bnb_quant"]
            row["dequant_ratio"] = row["ak_dequant_fp32"] / row["bnb_dequant_fp32"]
        rows.append(row)
    res["throughput_GBps_of_fp32"] = rows

    if not args.no_layer:
        res["layer_ms"] = bench_layer(w, bnb, reps, dev, res["bandwidth_GBps"]["read"])
    res["targets"] = targets(res)
    res["env"]["loadavg_end"] = os.getloadavg()[0]
    report(res)
    return C.write_json(C.json_path(args, "bench_nf4"), res)


def bench_layer(w: torch.Tensor, bnb, reps: int, dev: torch.device, read_gbps: float) -> list:
    """NF4Linear vs nn.Linear vs bnb Linear4bit, inference and training, at 1 and 64 tokens."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=dev)
    with torch.no_grad():
        lin.weight.copy_(w)
    lin.requires_grad_(False)
    lin16 = copy.deepcopy(lin).to(torch.bfloat16)
    ak32 = NF4Linear.from_linear(lin).eval()  # double quantisation, as QLoRA
    ak16 = NF4Linear.from_linear(lin, compute_dtype=torch.bfloat16).eval()
    b_inf = b_train = None
    if bnb is not None:
        def make():
            q = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=torch.bfloat16,
                                  quant_type="nf4", compress_statistics=True)
            q.load_state_dict(lin.state_dict())
            return q.to(dev)  # quantises
        b_inf, b_train = make().eval(), make().train()
        b_train.weight.requires_grad_(False)
        assert torch.equal(b_inf.weight.data.reshape(-1), ak16.weight), "bytes differ from bnb"
    limit = w.numel() / 2 / (read_gbps * 1e9) * 1e3  # ms to read the packed bytes once
    rows = []
    for tokens in (1, 64):
        x = torch.randn(tokens, w.shape[1], device=dev)
        x16 = x.to(torch.bfloat16)
        row = {"tokens": tokens, "limit_ms": limit}
        with torch.no_grad():
            ref16 = nn.functional.linear(x16, ak16.dequantize())
            row["ak_first_call"] = once_ms(lambda: ak16(x16), dev)  # compiles on first use
            row["ak_bf16_vs_dense_max_rel"] = float((ak16(x16).float() - ref16.float()).abs().max()
                                                    / ref16.float().abs().max())
            c = {"fp32_linear": lambda: lin(x), "bf16_linear": lambda: lin16(x16),
                 "ak_nf4_fp32": lambda: ak32(x), "ak_nf4_bf16": lambda: ak16(x16)}
            if b_inf is not None:
                if tokens == 1:
                    row["bnb_first_call"] = once_ms(lambda: b_inf(x16), dev)  # rearranges the weight
                row["bnb_packed"] = bool(getattr(b_inf.weight.quant_state, "packing_format_for_cpu", False))
                row["bnb_vs_ak_max_rel"] = float((b_inf(x16).float() - ref16.float()).abs().max()
                                                 / ref16.float().abs().max())
                c["bnb_nf4_bf16"] = lambda: b_inf(x16)
            row.update({f"inf_{k}": v for k, v in race(c, reps, dev).items()})

        def train(m, xx):
            def step():
                xi = xx.detach().requires_grad_()
                m(xi).sum().backward()
            return step
        c = {"fp32_linear": train(lin, x), "bf16_linear": train(lin16, x16),
             "ak_nf4_fp32": train(ak32.train(), x), "ak_nf4_bf16": train(ak16.train(), x16)}
        if b_train is not None:
            c["bnb_nf4_bf16"] = train(b_train, x16)
        row.update({f"train_{k}": v for k, v in race(c, max(2, reps // 2), dev).items()})
        ak32.eval(), ak16.eval()
        if b_inf is not None:
            row["inf_ak_bf16_over_bnb"] = row["inf_ak_nf4_bf16"] / row["inf_bnb_nf4_bf16"]
            row["train_ak_bf16_over_bnb"] = row["train_ak_nf4_bf16"] / row["train_bnb_nf4_bf16"]
        rows.append(row)
    return rows


def targets(res: dict) -> dict:
    """The issue's targets, each with the measured value and whether it is met."""
    out = {}
    dq = res["throughput_GBps_of_fp32"][1]
    if "quant_ratio" in dq:
        out["quantise >= 4x bnb"] = {"ratio": dq["quant_ratio"], "met": dq["quant_ratio"] >= 4}
        out["dequantise >= bnb"] = {"ratio": dq["dequant_ratio"], "met": dq["dequant_ratio"] >= 1}
    for r in res.get("layer_ms", []):
        if "inf_ak_bf16_over_bnb" in r and r["tokens"] == 1:
            out["inference 1 token <= 2x bnb packed"] = {"ratio": r["inf_ak_bf16_over_bnb"],
                                                         "met": r["inf_ak_bf16_over_bnb"] <= 2}
        if "train_ak_bf16_over_bnb" in r:
            out[f"training {r['tokens']} tokens <= bnb"] = {"ratio": r["train_ak_bf16_over_bnb"],
                                                          "met": r["train_ak_bf16_over_bnb"] <= 1}
    return out


def fmt(v) -> str:
    return f"{v:8.2f}" if isinstance(v, float) else f"{str(v):>8s}"


def report(res: dict) -> None:
    e = res["env"]
    print(f"torch {e['torch']}, bitsandbytes {e['bitsandbytes']}, {e['device']}, {e['threads']} threads, "
          f"{e['cpu_capability']}, load avg {e['loadavg_start']:.1f} -> {e['loadavg_end']:.1f}, "
          f"weight {e['size']}x{e['size']} fp32")
    print("memory bandwidth GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in res["bandwidth_GBps"].items()))
    if "memory" in res:
        print("quantise peak extra RSS (MB): " + ", ".join(f"{k} {v:.1f}" for k, v in res["memory"].items()))
    cols = ["ak_quant", "bnb_quant", "quant_ratio", "ak_dequant_fp32", "bnb_dequant_fp32",
            "dequant_ratio", "ak_dequant_bf16"]
    print("\nGB/s of fp32 weight   " + " ".join(f"{c[:15]:>16s}" for c in cols))
    for r in res["throughput_GBps_of_fp32"]:
        print(f"double_quant={str(r['double_quant']):5s}    " + " ".join(f"{fmt(r.get(c, '-')):>16s}" for c in cols))
    for mode in ("inf", "train"):
        if "layer_ms" not in res:
            break
        cols = ["fp32_linear", "bf16_linear", "ak_nf4_fp32", "ak_nf4_bf16", "bnb_nf4_bf16"]
        title = "inference (no_grad)" if mode == "inf" else "training (fwd + bwd to x)"
        print(f"\n{title:26s} ms " + " ".join(f"{c:>13s}" for c in cols) + "   ak16/bnb  limit")
        for r in res["layer_ms"]:
            ratio = r.get(f"{mode}_ak_bf16_over_bnb", "-")
            print(f"tokens={r['tokens']:<4d}{'':21s}" + " ".join(f"{fmt(r.get(f'{mode}_{c}', '-')):>13s}" for c in cols)
                  + f" {fmt(ratio)} {fmt(r['limit_ms'])}")
    for r in res.get("layer_ms", []):
        extra = {k: r[k] for k in r if k.endswith("first_call") or k.endswith("max_rel") or k == "bnb_packed"}
        print(f"tokens={r['tokens']}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in extra.items()))
    print("\ntargets: " + "; ".join(f"{k}: {v['ratio']:.2f} ({'met' if v['met'] else 'MISSED'})"
                                    for k, v in res["targets"].items()))


if __name__ == "__main__":
    main()
