"""DoRA / LoKr / LoRA on one large Linear, adaptkit side by side with PEFT, in one run.

    python benchmarks/bench_methods.py [--quick] [--size 4096] [--tokens 16,512] [--rank 16]
                                       [--dtypes fp32,bf16] [--threads 1] [--input-grad]
                                       [--device cpu|cuda] [--json PATH] [--no-peft]

Per dtype and token count, every variant (frozen base; lora / dora / lokr from adaptkit and
from PEFT, with the same adapter weights) runs forward + backward of ``(y * g).sum()`` with a
fixed upstream gradient; variants are interleaved round-robin (rotated each round) and the
median is reported. The input does not require grad unless ``--input-grad`` (PEFT's reference
numbers, LoRA 8.7 ms vs DoRA 160 ms, were taken that way). ``peak MiB`` is the high-water mark
of bytes allocated during one forward + backward beyond what was resident before (CPU: the
profiler's allocator records; CUDA: ``torch.cuda.max_memory_allocated``).

Targets (issue 3, 16 tokens): adaptkit DoRA <= 2x adaptkit LoRA; PEFT DoRA / adaptkit DoRA
>= 5; PEFT LoKr / adaptkit LoKr >= 3. Results: a table and JSON (runs/bench_methods.json).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a clone without installing
import adaptkit as ak  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def specs(rank: int) -> dict:
    """method -> (adaptkit spec, PEFT config factory); alpha = 2 * rank, no dropout."""
    return {
        "lora": (ak.LoRA(rank=rank, alpha=2 * rank, targets="lin"),
                 lambda p: p.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["lin"])),
        "dora": (ak.DoRA(rank=rank, alpha=2 * rank, targets="lin"),
                 lambda p: p.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["lin"], use_dora=True)),
        "lokr": (ak.LoKr(rank=rank, alpha=2 * rank, targets="lin"),
                 lambda p: p.LoKrConfig(r=rank, alpha=2 * rank, target_modules=["lin"])),
    }


@torch.no_grad()
def sync(method: str, model: nn.Module, pm: nn.Module) -> None:
    """Give the adaptkit adapter non-zero weights and copy them into the PEFT model."""
    g = torch.Generator().manual_seed(0)
    ad = model.lin.adapters["default"]
    for p in ad.parameters():
        if not p.any():  # zero-initialised factor (B, w1): small noise
            p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.01)
    pl = pm.base_model.model.lin
    for name, p in ad.named_parameters():
        if name == "lora_magnitude":
            q = pl.lora_magnitude_vector["default"].weight
        elif name.startswith("lora_"):
            q = getattr(pl, name)["default"].weight
        else:  # lokr_* ParameterDicts
            q = getattr(pl, name)["default"]
        q.copy_(p.reshape(q.shape))


def build(args, dt, peft):
    """name -> module (Sequential-like, attribute ``lin``); every variant on its own copy."""
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(args.size, args.size))
    base = base.to(device=args.device, dtype=dt)
    frozen = copy.deepcopy(base).requires_grad_(False)
    out = {"base": frozen}
    for m, (spec, cfg) in specs(args.rank).items():
        model = copy.deepcopy(base)
        ak.inject(model, spec)
        out[f"{m}/adaptkit"] = model
        if peft is not None:
            pm = peft.get_peft_model(copy.deepcopy(base), cfg(peft))
            pm.to(device=args.device, dtype=dt)
            sync(m, model, pm)
            out[f"{m}/peft"] = pm
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


def sync_device(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_all(fns: dict, warmup: int, repeats: int, device: str) -> dict:
    names, samples = list(fns), {n: [] for n in fns}
    gc.collect()
    gc.disable()
    try:
        for _ in range(warmup):
            for n in names:
                fns[n]()
        for r in range(repeats):
            for i in range(len(names)):
                n = names[(i + r) % len(names)]
                sync_device(device)
                t = time.perf_counter()
                fns[n]()
                sync_device(device)
                samples[n].append(time.perf_counter() - t)
    finally:
        gc.enable()
    return samples


def peak_bytes(fn, device: str) -> int:
    """Peak of bytes allocated minus freed during one call (what is resident before excluded)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def table(title, headers, rows):
    cells = [[(f"{v:.2f}" if isinstance(v, float) else "-" if v is None else str(v)) for v in r] for r in rows]
    w = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w[i]) if i == 0 else h.rjust(w[i]) for i, h in enumerate(headers)))
    for r in cells:
        print("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2048 wide, 16/128 tokens, few rounds: a smoke run")
    p.add_argument("--size", type=int, default=None, help="layer width (default 4096; quick 2048)")
    p.add_argument("--tokens", default=None, help="comma-separated token counts (default 16,512)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--input-grad", action="store_true", help="the input requires grad (inner layer)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--json", default=None, help="default runs/bench_methods[_quick].json")
    p.add_argument("--no-peft", action="store_true")
    args = p.parse_args(argv)
    args.size = args.size or (2048 if args.quick else 4096)
    tokens = [int(t) for t in (args.tokens or ("16,128" if args.quick else "16,512")).split(",")]
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 11)
    torch.set_num_threads(args.threads)
    peft = None
    if not args.no_peft:
        try:
            import peft
        except Exception as e:  # noqa: BLE001 - a missing / broken oracle must not stop the run
            print(f"peft unavailable ({type(e).__name__}: {e}); PEFT columns skipped")
    results = []
    for dname in args.dtypes.split(","):
        dt = DTYPES[dname]
        models = build(args, dt, peft)
        for T in tokens:
            gen = torch.Generator().manual_seed(T)
            x = torch.randn(T, args.size, generator=gen).to(device=args.device, dtype=dt)
            x.requires_grad_(args.input_grad)
            g = torch.randn(T, args.size, generator=gen).to(device=args.device, dtype=dt)
            fns = {n: step_fn(m, x, g) for n, m in models.items()}
            samples = time_all(fns, warmup, repeats, args.device)
            with torch.no_grad():  # adaptkit vs PEFT, same weights: the outputs agree
                ref = {n: m(x).float() for n, m in models.items()}
            for n in models:
                med = statistics.median(samples[n]) * 1e3
                m, _, impl = n.partition("/")
                twin = f"{m}/{'peft' if impl == 'adaptkit' else 'adaptkit'}"
                diff = (ref[n] - ref[twin]).abs().max().item() if impl and twin in ref else None
                results.append({"dtype": dname, "tokens": T, "variant": n, "median_ms": med,
                                "min_ms": min(samples[n]) * 1e3, "peak_mib": peak_bytes(fns[n], args.device) / 2**20,
                                "max_abs_diff_vs_twin": diff})
    # ---- ratios and targets ---------------------------------------------------------------
    def get(dname, T, n, key="median_ms"):
        for r in results:
            if (r["dtype"], r["tokens"], r["variant"]) == (dname, T, n):
                return r[key]
        return None

    def ratio(a, b):
        return None if a is None or b is None or not b else a / b

    ratios, checks = [], []
    for dname in args.dtypes.split(","):
        for T in tokens:
            lora = get(dname, T, "lora/adaptkit")
            row = {"dtype": dname, "tokens": T}
            for m in ("dora", "lokr"):
                row[f"{m}_vs_lora_time"] = ratio(get(dname, T, f"{m}/adaptkit"), lora)
                row[f"{m}_vs_lora_peak"] = ratio(get(dname, T, f"{m}/adaptkit", "peak_mib"),
                                                 get(dname, T, "lora/adaptkit", "peak_mib"))
            for m in ("lora", "dora", "lokr"):
                row[f"peft_over_ak_{m}"] = ratio(get(dname, T, f"{m}/peft"), get(dname, T, f"{m}/adaptkit"))
            ratios.append(row)
            if T == 16:
                checks += [(f"{dname} T=16 DoRA/LoRA <= 2", row["dora_vs_lora_time"], lambda v: v <= 2),
                           (f"{dname} T=16 PEFT DoRA / DoRA >= 5", row["peft_over_ak_dora"], lambda v: v >= 5),
                           (f"{dname} T=16 PEFT LoKr / LoKr >= 3", row["peft_over_ak_lokr"], lambda v: v >= 3)]
    for dname in args.dtypes.split(","):
        for T in tokens:
            rows = [[r["variant"], r["median_ms"], r["min_ms"], r["peak_mib"], r["max_abs_diff_vs_twin"]]
                    for r in results if (r["dtype"], r["tokens"]) == (dname, T)]
            table(f"{dname}, {args.size}x{args.size}, {T} tokens, rank {args.rank}, fwd+bwd",
                  ["variant", "median ms", "min ms", "peak MiB", "max|ak-peft|"], rows)
    keys = [k for k in ratios[0] if k not in ("dtype", "tokens")]
    table("ratios (time: median; peak: dynamic MiB)", ["dtype/T"] + keys,
          [[f"{r['dtype']}/{r['tokens']}"] + [r[k] for k in keys] for r in ratios])
    target_rows = [{"target": name, "value": v, "met": None if v is None else bool(ok(v))}
                   for name, v, ok in checks]
    table("targets (issue 3)", ["target", "value", "met"],
          [[t["target"], t["value"], t["met"]] for t in target_rows])
    payload = {"env": {"torch": torch.__version__, "python": platform.python_version(),
                       "adaptkit": ak.__version__, "peft": getattr(peft, "__version__", None),
                       "device": args.device, "threads": torch.get_num_threads(), "size": args.size,
                       "rank": args.rank, "input_grad": args.input_grad, "quick": args.quick,
                       "warmup": warmup, "repeats": repeats, "time": time.strftime("%Y-%m-%dT%H:%M:%S")},
               "results": results, "ratios": ratios, "targets": target_rows}
    path = args.json or os.path.join(ROOT, "runs", f"bench_methods{'_quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
