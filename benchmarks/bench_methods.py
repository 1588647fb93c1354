"""DoRA / LoKr / LoRA on one large Linear, adaptkit side by side with PEFT, in one run.

    python benchmarks/bench_methods.py [--quick] [--size 4096] [--tokens 16,512] [--rank 16]
                                       [--dtypes fp32,bf16] [--threads 1] [--input-grad]
                                       [--device cpu|cuda] [--json PATH] [--no-peft]
                                       [--warmup N] [--repeats N]

Per dtype and token count, every variant (frozen base; lora / dora / lokr from adaptkit and
from PEFT, with the same adapter weights) runs forward + backward of ``(y * g).sum()`` with a
fixed upstream gradient; variants are interleaved round-robin (rotated each round) and the
median is reported. The input does not require grad unless ``--input-grad`` (PEFT's reference
numbers, LoRA 8.7 ms vs DoRA 160 ms, were taken that way). ``peak MiB`` is the high-water mark
of bytes allocated during one forward + backward beyond what was resident before (CPU: the
profiler's allocator records; ``--device cuda``: ``torch.cuda.max_memory_allocated``, and every
timing synchronises the GPU). The device is cpu unless ``--device cuda`` is given.

Targets (issue 3, 16 tokens): adaptkit DoRA <= 2x adaptkit LoRA; PEFT DoRA / adaptkit DoRA
>= 5; PEFT LoKr / adaptkit LoKr >= 3. Results: a table and JSON (runs/bench_methods.json).
"""
from __future__ import annotations

import statistics

import torch
import torch.nn as nn

import _common as C

METHODS = "lora,dora,lokr"


def build(args, dt, peft):
    """name -> module (Sequential-like, attribute ``lin``); every variant on its own copy of the
    same base weights, on ``args.device``. adaptkit and PEFT get the same (non-zero) adapter
    weights; PEFT's adapters are cast to the base dtype too (PEFT keeps them in fp32 by default
    under a bf16 base), so both sides compute in ``dt``."""
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(args.size, args.size))
    rows = C.pick_methods(C.method_rows(peft), METHODS)
    out, _ = C.build_variants(base.to(dtype=dt), "lin", args.rank, rows, peft, args.device)
    return out


def step_fn(model, x, g):
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        for p in params:
            p.grad = None
        if x.grad is not None:
            x.grad = None
        y = model(x)
        if y.requires_grad:
            y.backward(g)
    return run


def main(argv=None):
    p = C.base_parser(__doc__.split("\n")[0], quick_help="2048 wide, 16/128 tokens, few rounds: a smoke run",
                      json_default="runs/bench_methods[_quick].json")
    p.add_argument("--size", type=int, default=None, help="layer width (default 4096; quick 2048)")
    p.add_argument("--tokens", default=None, help="comma-separated token counts (default 16,512)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--input-grad", action="store_true", help="the input requires grad (inner layer)")
    C.add_device(p)
    C.add_rounds(p)
    C.add_no_peft(p)
    args = p.parse_args(argv)
    args.size = args.size or (2048 if args.quick else 4096)
    tokens = [int(t) for t in (args.tokens or ("16,128" if args.quick else "16,512")).split(",")]
    warmup, repeats = C.rounds(args, quick=(1, 3), full=(3, 11))
    C.start(args)
    peft = C.load_peft(args.no_peft)
    results = []
    for dname in args.dtypes.split(","):
        dt = C.DTYPES[dname]
        models = build(args, dt, peft)
        for T in tokens:
            gen = torch.Generator().manual_seed(T)
            x = torch.randn(T, args.size, generator=gen).to(device=args.device, dtype=dt)
            x.requires_grad_(args.input_grad)
            g = torch.randn(T, args.size, generator=gen).to(device=args.device, dtype=dt)
            fns = {n: step_fn(m, x, g) for n, m in models.items()}
            samples = C.interleaved({n: C.timed(f, args.device) for n, f in fns.items()}, warmup, repeats)
            with torch.no_grad():  # adaptkit vs PEFT, same weights: the outputs agree
                ref = {n: m(x).float() for n, m in models.items()}
            for n in models:
                med = statistics.median(samples[n]) * 1e3
                m, _, impl = n.partition("/")
                twin = f"{m}/{'peft' if impl == 'adaptkit' else 'adaptkit'}"
                diff = (ref[n] - ref[twin]).abs().max().item() if impl and twin in ref else None
                results.append({"dtype": dname, "tokens": T, "variant": n, "median_ms": med,
                                "min_ms": min(samples[n]) * 1e3,
                                "peak_mib": C.dynamic_peak_bytes(fns[n], args.device) / C.MiB,
                                "max_abs_diff_vs_twin": diff})
    # ---- ratios and targets ---------------------------------------------------------------
    def get(dname, T, n, key="median_ms"):
        for r in results:
            if (r["dtype"], r["tokens"], r["variant"]) == (dname, T, n):
                return r[key]
        return None

    ratios, checks = [], []
    for dname in args.dtypes.split(","):
        for T in tokens:
            lora = get(dname, T, "lora/adaptkit")
            row = {"dtype": dname, "tokens": T}
            for m in ("dora", "lokr"):
                row[f"{m}_vs_lora_time"] = C.ratio(get(dname, T, f"{m}/adaptkit"), lora)
                row[f"{m}_vs_lora_peak"] = C.ratio(get(dname, T, f"{m}/adaptkit", "peak_mib"),
                                                   get(dname, T, "lora/adaptkit", "peak_mib"))
            for m in ("lora", "dora", "lokr"):
                row[f"peft_over_ak_{m}"] = C.ratio(get(dname, T, f"{m}/peft"), get(dname, T, f"{m}/adaptkit"))
            ratios.append(row)
            if T == 16:
                checks += [(f"{dname} T=16 DoRA/LoRA <= 2", row["dora_vs_lora_time"], lambda v: v <= 2),
                           (f"{dname} T=16 PEFT DoRA / DoRA >= 5", row["peft_over_ak_dora"], lambda v: v >= 5),
                           (f"{dname} T=16 PEFT LoKr / LoKr >= 3", row["peft_over_ak_lokr"], lambda v: v >= 3)]
    for dname in args.dtypes.split(","):
        for T in tokens:
            rows = [[r["variant"], r["median_ms"], r["min_ms"], r["peak_mib"], r["max_abs_diff_vs_twin"]]
                    for r in results if (r["dtype"], r["tokens"]) == (dname, T)]
            C.print_table(f"{dname}, {args.size}x{args.size}, {T} tokens, rank {args.rank}, fwd+bwd",
                          ["variant", "median ms", "min ms", "peak MiB", "max|ak-peft|"], rows, "{:.2f}")
    keys = [k for k in ratios[0] if k not in ("dtype", "tokens")]
    C.print_table("ratios (time: median; peak: dynamic MiB)", ["dtype/T"] + keys,
                  [[f"{r['dtype']}/{r['tokens']}"] + [r[k] for k in keys] for r in ratios], "{:.2f}")
    target_rows = [{"target": name, "value": v, "met": None if v is None else bool(ok(v))}
                   for name, v, ok in checks]
    C.print_table("targets (issue 3)", ["target", "value", "met"],
                  [[t["target"], t["value"], t["met"]] for t in target_rows], "{:.2f}")
    env = C.env_info(args.device, peft=getattr(peft, "__version__", None), size=args.size, rank=args.rank,
                     input_grad=args.input_grad, quick=args.quick, warmup=warmup, repeats=repeats)
    return C.write_json(C.json_path(args, "bench_methods"),
                        {"env": env, "results": results, "ratios": ratios, "targets": target_rows})


if __name__ == "__main__":
    main()
