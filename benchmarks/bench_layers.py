"""Layer benchmark: one 4096x4096 ``nn.Linear`` (16 and 512 tokens) and the Python overhead of
64 tiny adapted layers, adaptkit side by side with PEFT (same weights) and the frozen base.

    python benchmarks/bench_layers.py [--quick] [--threads 1] [--dtype fp32|bf16] [--json PATH]
                                      [--methods lora,...] [--no-peft] [--modes fwd,bwd,train]

Modes, per variant (frozen base, <method>/adaptkit, <method>/peft):
  fwd    inference forward under ``torch.no_grad()``
  bwd    backward alone (the forward runs untimed before it), ``y.backward(g)`` with a fixed
         upstream gradient g
  train  one optimiser step: zero_grad + forward + backward + AdamW step on the trainable
         parameters (the frozen base has none, so its step is forward + backward)
The input requires grad in every variant, so every backward computes the input gradient as a
layer inside a network would; the frozen base's backward is exactly that (no weight grads).
``peak MiB`` is the train step's high-water mark of live tensor bytes (parameters, optimizer
state, input and everything the step allocates), from the profiler's allocator records.

Overhead: 64 ``Linear(16, 16)`` in a ``Sequential``, batch 1, eval forward under no_grad;
(adapted - base) / 64 is the Python cost each adapted layer adds (PEFT ~22 us, target <= 10 us).

Rows are method names (see ``_common.method_rows``); another method becomes a row by adding
its spec / PEFT-config factory there.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn as nn

import _common as C
from _common import ak

RANK = 16
FEATURES = 4096
TOKENS = (16, 512)
TINY_LAYERS, TINY_FEATURES = 64, 16


class Holder(nn.Module):
    """A root module holding the benchmarked layer at path ``proj`` (PEFT and adaptkit both
    need a model around the layer to target it by name)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build_variants(base: nn.Module, targets: str, methods, peft, check_x: torch.Tensor):
    """name -> model: the frozen base, and per method an adaptkit and (where PEFT has it) a
    PEFT model on copies of the same base weights; equal adapter weights where a sync exists."""
    base = base.requires_grad_(False)
    variants: dict[str, nn.Module] = {"base": base}
    checks: dict[str, float] = {}
    for row in methods:
        am = copy.deepcopy(base)
        ak.inject(am, row.ak_spec(targets, RANK))
        C.nontrivial(am)
        variants[f"{row.name}/adaptkit"] = am
        if row.peft_config is not None:
            pm = peft.get_peft_model(copy.deepcopy(base), row.peft_config(targets, RANK))
            if row.sync is not None:
                row.sync(am, pm.base_model.model)
                with torch.no_grad():
                    checks[row.name] = (am(check_x).float() - pm(check_x).float()).abs().max().item()
            variants[f"{row.name}/peft"] = pm
    return variants, checks


def layer_cases(variants, x: torch.Tensor, g: torch.Tensor):
    """Per mode, name -> closure returning its timed seconds; plus the optimisers."""
    opts = {n: (torch.optim.AdamW(C.trainable(m), lr=1e-4) if C.trainable(m) else None)
            for n, m in variants.items()}

    def fwd(m):
        def run():
            with torch.no_grad():
                m(x)
        return C.timed(run)

    def bwd(m):
        def run():
            x.grad = None
            m.zero_grad(set_to_none=True)
            y = m(x)
            t = time.perf_counter()
            y.backward(g)
            return time.perf_counter() - t
        return run

    def train(m, opt):
        def step():
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            y = m(x)
            y.backward(g)
            if opt is not None:
                opt.step()

        def run():
            x.grad = None  # the input's gradient is the network's business, not the step's
            return C.timed(step)()
        return run, step

    modes = {"fwd": {n: fwd(m) for n, m in variants.items()},
             "bwd": {n: bwd(m) for n, m in variants.items()}}
    trains = {n: train(m, opts[n]) for n, m in variants.items()}
    modes["train"] = {n: r for n, (r, _) in trains.items()}
    steps = {n: s for n, (_, s) in trains.items()}
    return modes, opts, steps


def bench_tokens(variants, tokens: int, dtype, warmup: int, repeats: int, run_modes):
    g0 = torch.Generator().manual_seed(tokens)
    x = torch.randn(1, tokens, FEATURES, generator=g0).to(dtype).requires_grad_(True)  # (batch, tokens, in)
    g = torch.randn(1, tokens, FEATURES, generator=g0).to(dtype)  # upstream grad, (batch, tokens, out)
    modes, opts, steps = layer_cases(variants, x, g)
    res: dict[str, dict] = {n: {} for n in variants}
    for mode, cases in modes.items():
        if mode not in run_modes:
            continue
        for n, s in C.interleaved(cases, warmup, repeats).items():
            res[n][mode] = C.stats_ms(s)
    for n, m in variants.items():  # after timing: AdamW state exists, as in a running loop
        x.grad = None
        m.zero_grad(set_to_none=True)  # grads are the step's own allocations
        resident = C.tensor_bytes(m, opts[n], x, g)
        dyn = C.dynamic_peak_bytes(steps[n])
        res[n]["train_peak_mib"] = (resident + dyn) / C.MiB
        res[n]["train_dynamic_mib"] = dyn / C.MiB
        res[n]["train_gflop"] = C.train_gflop(steps[n])
        res[n]["trainable_params"] = sum(p.numel() for p in C.trainable(m))
    return res


def bench_overhead(methods, peft, dtype, calls: int, repeats: int):
    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(TINY_FEATURES, TINY_FEATURES) for _ in range(TINY_LAYERS)]).to(dtype)
    x = torch.randn(1, TINY_FEATURES, dtype=dtype)  # batch 1
    variants, _ = build_variants(base, r"\d+", methods, peft, x)
    for m in variants.values():
        m.eval()

    def case(m):
        def run():
            with torch.no_grad():
                t = time.perf_counter()
                for _ in range(calls):
                    m(x)
                return (time.perf_counter() - t) / calls
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
    C.set_threads(args.threads)
    dtype = C.DTYPES[args.dtype]
    peft = C.load_peft(args.no_peft)
    methods = C.pick_methods(C.method_rows(peft), args.methods)
    run_modes = C.pick_modes(args.modes)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 11)
    calls, oh_repeats = (50, 5) if args.quick else (200, 21)
    print(f"bench_layers: {FEATURES}x{FEATURES} Linear, rank {RANK}, {args.dtype}, "
          f"{torch.get_num_threads()} thread(s), methods {[m.name for m in methods]}, "
          f"PEFT {'on' if peft else 'off'}, warmup {warmup}, repeats {repeats} (interleaved)")

    torch.manual_seed(0)
    base = Holder(nn.Linear(FEATURES, FEATURES)).to(dtype)
    check_x = torch.randn(1, 16, FEATURES, dtype=dtype)  # (batch, tokens, in)
    variants, checks = build_variants(base, "proj", methods, peft, check_x)
    for name, d in checks.items():
        print(f"same weights, {name}: max |adaptkit - peft| output = {d:.3g}")
    names = list(variants)
    pairs = C.pair_ratios(names, [m.name for m in methods])
    out = {"env": C.env_info(args), "config": {
        "features": FEATURES, "rank": RANK, "alpha": 2 * RANK, "tokens": list(TOKENS),
        "bias": True, "warmup": warmup, "repeats": repeats, "modes": run_modes,
        "methods": [m.name for m in methods], "peft": bool(peft)},
        "adaptkit_vs_peft_max_abs_diff": checks, "layer": {}, "ratios": {}}

    for tokens in TOKENS:
        res = bench_tokens(variants, tokens, dtype, warmup, repeats, run_modes)
        out["layer"][str(tokens)] = res
        rat = C.ratios(res, pairs)
        out["ratios"][str(tokens)] = rat
        C.print_results(f"{FEATURES}x{FEATURES} Linear, {tokens} tokens, {args.dtype} "
                        f"(median ms; peak MiB of a train step)", res, rat, f"ratios, {tokens} tokens")

    oh = bench_overhead(methods, peft, dtype, calls, oh_repeats)
    out["overhead"] = {"layers": TINY_LAYERS, "features": TINY_FEATURES, "batch": 1,
                       "calls_per_sample": calls, "repeats": oh_repeats, "target_us": 10.0,
                       "peft_reference_us": 22.0, "variants": oh}
    C.print_table(f"Python overhead: {TINY_LAYERS} x Linear({TINY_FEATURES},{TINY_FEATURES}), batch 1, eval "
                  f"(target <= 10 us per adapted layer)", ["variant", "call us", "per-layer overhead us"],
                  [[n, v["call_us"], v["per_layer_overhead_us"]] for n, v in oh.items()])
    C.write_json(C.default_json("bench_layers", args), out)


if __name__ == "__main__":
    main()
