"""Layer benchmark: one 4096x4096 ``nn.Linear`` (16 and 512 tokens) and the Python overhead of
64 tiny adapted layers, adaptkit side by side with PEFT (same weights) and the frozen base.

    python benchmarks/bench_layers.py [--quick] [--threads 1] [--dtype fp32|bf16] [--json PATH]
                                      [--methods lora,...] [--no-peft] [--modes fwd,bwd,train]
                                      [--warmup N] [--repeats N] [--device cpu|cuda]

Modes, per variant (frozen base, <method>/adaptkit, <method>/peft):
  fwd    inference forward under ``torch.no_grad()``
  bwd    backward alone (the forward runs untimed before it), ``y.backward(g)`` with a fixed
         upstream gradient g
  train  one optimiser step: zero_grad + forward + backward + AdamW step on the trainable
         parameters (the frozen base has none, so its step is forward + backward)
The input requires grad in every variant, so every backward computes the input gradient as a
layer inside a network would; the frozen base's backward is exactly that (no weight grads).
``peak MiB`` is the train step's high-water mark of live tensor bytes (parameters, optimizer
state, input and everything the step allocates), from the profiler's allocator records
(``--device cuda``: from ``torch.cuda.max_memory_allocated``; timings synchronise the GPU).

Overhead: 64 ``Linear(16, 16)`` in a ``Sequential``, batch 1, eval forward under no_grad;
(adapted - base) / 64 is the Python cost each adapted layer adds (target <= 10 us; PEFT's is
measured in the same run when it is installed).

Rows are method names (see ``_common.method_rows``); another method becomes a row by adding
its spec / PEFT-config factory there.
"""
from __future__ import annotations

import statistics

import torch
import torch.nn as nn

import _common as C

RANK = 16
FEATURES = 4096
TOKENS = (16, 512)
TINY_LAYERS, TINY_FEATURES = 64, 16


def build_variants(base: nn.Module, targets: str, methods, peft, device: str, check_x: torch.Tensor):
    """name -> model (see ``_common.build_variants``), and per method whose PEFT twin has the
    same adapter weights, max |adaptkit - peft| output on ``check_x``."""
    variants, synced = C.build_variants(base, targets, RANK, methods, peft, device)
    with torch.no_grad():
        checks = {m: (variants[f"{m}/adaptkit"](check_x).float() - variants[f"{m}/peft"](check_x).float())
                  .abs().max().item() for m in synced}
    return variants, checks


def bench_tokens(variants, tokens: int, dtype, device: str, warmup: int, repeats: int, run_modes):
    g0 = torch.Generator().manual_seed(tokens)
    x = torch.randn(1, tokens, FEATURES, generator=g0).to(device, dtype).requires_grad_(True)  # (batch, tokens, in)
    g = torch.randn(1, tokens, FEATURES, generator=g0).to(device, dtype)  # upstream grad, (batch, tokens, out)

    def reset():
        x.grad = None  # the input's gradient is the network's business, not the step's

    modes, opts, steps = C.mode_cases(variants, lambda m: m(x), lambda y: y.backward(g), device, reset)
    res = C.time_modes(modes, run_modes, warmup, repeats)
    for n, costs in C.step_costs(variants, opts, steps, (x, g), device).items():
        res[n].update(costs)
    return res


def bench_overhead(methods, peft, dtype, device: str, calls: int, repeats: int):
    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(TINY_FEATURES, TINY_FEATURES) for _ in range(TINY_LAYERS)]).to(dtype)
    x = torch.randn(1, TINY_FEATURES, dtype=dtype).to(device)  # batch 1
    variants, _ = C.build_variants(base, r"\d+", RANK, methods, peft, device)
    for m in variants.values():
        m.eval()

    def case(m):
        def run():
            with torch.no_grad():
                t = C.now(device)
                for _ in range(calls):
                    m(x)
                return (C.now(device) - t) / calls
        return run

    samples = C.interleaved({n: case(m) for n, m in variants.items()}, 2, repeats)
    med = {n: statistics.median(s) for n, s in samples.items()}
    return {n: {"call_us": med[n] * 1e6,
                "per_layer_overhead_us": None if n == "base" else (med[n] - med["base"]) / TINY_LAYERS * 1e6,
                "samples_us": [v * 1e6 for v in s]}
            for n, s in samples.items()}


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    run = C.setup(args, quick_rounds=(1, 3), full_rounds=(3, 11))
    dtype, peft, methods, run_modes, warmup, repeats = (run.dtype, run.peft, run.methods, run.modes,
                                                         run.warmup, run.repeats)
    calls, oh_repeats = (50, 5) if args.quick else (200, 21)
    print(f"bench_layers: {FEATURES}x{FEATURES} Linear, rank {RANK}, {args.dtype}, "
          f"{args.device}, {torch.get_num_threads()} thread(s), methods {[m.name for m in methods]}, "
          f"PEFT {'on' if peft else 'off'}, warmup {warmup}, repeats {repeats} (interleaved)")

    torch.manual_seed(0)
    base = C.Holder(nn.Linear(FEATURES, FEATURES)).to(dtype)
    check_x = torch.randn(1, 16, FEATURES, dtype=dtype)  # (batch, tokens, in)
    variants, checks = build_variants(base, "proj", methods, peft, args.device, check_x.to(args.device))
    for name, d in checks.items():
        print(f"same weights, {name}: max |adaptkit - peft| output = {d:.3g}")
    names = list(variants)
    pairs = C.pair_ratios(names, [m.name for m in methods])
    out = {"env": C.env_info(args.device, dtype=args.dtype, quick=args.quick), "config": {
        "features": FEATURES, "rank": RANK, "alpha": 2 * RANK, "tokens": list(TOKENS),
        "bias": True, "warmup": warmup, "repeats": repeats, "modes": run_modes,
        "methods": [m.name for m in methods], "peft": bool(peft)},
        "adaptkit_vs_peft_max_abs_diff": checks, "layer": {}, "ratios": {}}

    for tokens in TOKENS:
        res = bench_tokens(variants, tokens, dtype, args.device, warmup, repeats, run_modes)
        out["layer"][str(tokens)] = res
        rat = C.ratios(res, pairs)
        out["ratios"][str(tokens)] = rat
        C.print_results(f"{FEATURES}x{FEATURES} Linear, {tokens} tokens, {args.dtype} "
                        f"(median ms; peak MiB of a train step)", res, rat, f"ratios, {tokens} tokens")

    oh = bench_overhead(methods, peft, dtype, args.device, calls, oh_repeats)
    out["overhead"] = {"layers": TINY_LAYERS, "features": TINY_FEATURES, "batch": 1,
                       "calls_per_sample": calls, "repeats": oh_repeats, "target_us": 10.0,
                       "variants": oh}
    C.print_table(f"Python overhead: {TINY_LAYERS} x Linear({TINY_FEATURES},{TINY_FEATURES}), batch 1, eval "
                  f"(target <= 10 us per adapted layer)", ["variant", "call us", "per-layer overhead us"],
                  [[n, v["call_us"], v["per_layer_overhead_us"]] for n, v in oh.items()])
    C.write_json(C.json_path(args, f"bench_layers_{args.dtype}"), out)


if __name__ == "__main__":
    main()
