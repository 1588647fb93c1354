"""Serving benchmark: one base, several adapters, a mixed batch (``ak.route``) vs one adapter at a
time vs the base, side by side with PEFT's ``adapter_names`` (same adapter weights), interleaved.

    python benchmarks/bench_serve.py [--quick] [--threads 1] [--batch 8] [--ctx 128]
                                     [--prefill 256] [--no-peft] [--warmup N] [--repeats N]
                                     [--json PATH]

Model: the model benchmark's Llama (benchmarks/bench_model.py: hidden 512, 4 layers, MLP 1376,
vocab 32000, fp32), 4 LoRA adapters of rank 16 on all seven projections (alpha 32), batch 8
with the rows spread over the 4 adapters (a0 a1 a2 a3 a0 a1 a2 a3). Timed calls:

  decode    one token per row on a KV cache of ``--ctx`` tokens (the cache is cropped back
            after each call, untimed), the logits of that token
  prefill   ``--prefill`` tokens per row, no cache, logits of the last position only
            (``logits_to_keep=1``, as ``generate`` asks for)

Variants: ``base`` (no adapter), ``ak single`` (adapter a0 active for every row), ``ak mixed``
(``ak.route`` entered once, before timing, as a server would for a whole generation),
``peft single`` / ``peft mixed`` (``adapter_names``), and mixed / single for 4 DoRA and 4 LoKr
adapters (PEFT has no mixed batch for those). Ratios are paired (median over rounds of the
per-round ratio, _common.paired), steadier on a shared machine than ratios of medians.
Targets: decode ak mixed <= 1.10x ak single and <= 1.25x base; prefill ak mixed <= 1.05x ak
single. PEFT, measured before adaptkit had ``route``: 1.33x single and 1.73x base at decode,
1.02x at prefill. Also printed: max |ak mixed - peft mixed| logits (fp32, same weights) and
the time to enter ``ak.route`` (the per-row factors built once).
"""
from __future__ import annotations

import contextlib
import copy
import statistics

import torch

import _common as C
from _common import ak
from bench_model import CONFIG, RANK, TARGETS, build_model

N_ADAPTERS = 4
TARGETS_MET = {"decode: ak mixed/single": 1.10, "decode: ak mixed/base": 1.25, "prefill: ak mixed/single": 1.05}


def adapted(base, spec_of, peft=None):
    """(adaptkit model with adapters a0..a3, PEFT model with the same weights or None)."""
    am = copy.deepcopy(base)
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    for i, n in enumerate(names):
        ak.inject(am, spec_of(TARGETS, RANK), name=n)
        C.nontrivial(am, seed=10 + i)  # already non-zero parameters get a jitter only
    pm = None
    if peft is not None:
        cfg = lambda: peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=TARGETS)  # noqa: E731
        pm = peft.get_peft_model(copy.deepcopy(base), cfg(), adapter_name=names[0], autocast_adapter_dtype=False)
        for n in names[1:]:
            pm.add_adapter(n, cfg())
        for n in names:
            C.sync_adapters(am, pm.base_model.model, n)
        pm.eval()
    return am.eval(), pm


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ctx", type=int, default=None, help="KV cache tokens at decode (default 128; quick 32)")
    p.add_argument("--prefill", type=int, default=None, help="prefill tokens per row (default 256; quick 32)")
    C.add_no_peft(p)
    C.add_rounds(p)
    args = p.parse_args()
    C.start(args)
    peft = C.load_peft(args.no_peft)
    warmup, repeats = C.rounds(args, (2, 5), (3, 15))
    ctx, pre, B = args.ctx or (32 if args.quick else 128), args.prefill or (32 if args.quick else 256), args.batch
    rows = [f"a{i % N_ADAPTERS}" for i in range(B)]
    print(f"bench_serve: Llama {CONFIG}, {N_ADAPTERS} adapters rank {RANK} on q,k,v,o,gate,up,down, batch {B} "
          f"(rows {rows}), decode on a {ctx}-token cache, prefill {pre} tokens, fp32, "
          f"{torch.get_num_threads()} thread(s), PEFT {'on' if peft else 'off'}, warmup {warmup}, repeats {repeats}")

    torch.set_grad_enabled(False)
    base = build_model(torch.float32).eval().requires_grad_(False)
    lora, peft_m = adapted(base, lambda t, r: ak.LoRA(rank=r, alpha=2 * r, targets=t), peft)
    others = {"dora": adapted(base, lambda t, r: ak.DoRA(rank=r, alpha=2 * r, targets=t))[0],
              "lokr": adapted(base, lambda t, r: ak.LoKr(rank=r, alpha=2 * r, targets=t))[0]}
    # a "single" variant is a copy whose active adapter is a0; a "mixed" one stays inside route
    models = {"base": base, "ak single": lora, "ak mixed": copy.deepcopy(lora)}
    ak.set_active(models["ak single"], "a0")
    for m, am in others.items():
        models[f"{m} single"], models[f"{m} mixed"] = am, copy.deepcopy(am)
        ak.set_active(am, "a0")
    mixed = [k for k in models if k.endswith("mixed")]
    kw = {k: {} for k in models}
    if peft_m is not None:
        models["peft single"], models["peft mixed"] = peft_m, peft_m
        kw["peft mixed"] = {"adapter_names": rows}  # single: set_adapter("a0"), its plain path
        peft_m.set_adapter("a0")

    g = torch.Generator().manual_seed(0)
    ids_ctx = torch.randint(0, CONFIG["vocab_size"], (B, ctx), generator=g)  # (B, ctx)
    ids_pre = torch.randint(0, CONFIG["vocab_size"], (B, pre), generator=g)  # (B, prefill)
    tok = torch.randint(0, CONFIG["vocab_size"], (B, 1), generator=g)  # (B, 1): the decoded token
    cache0 = base(input_ids=ids_ctx, use_cache=True).past_key_values

    with contextlib.ExitStack() as stack:
        entry = []
        for k in mixed:
            t = C.now()
            stack.enter_context(ak.route(models[k], rows))
            entry.append((k, (C.now() - t) * 1e3))

        def decode(k):
            cache = copy.deepcopy(cache0)

            def run():
                t = C.now()
                models[k](input_ids=tok, past_key_values=cache, use_cache=True, **kw.get(k, {}))
                dt = C.now() - t
                cache.crop(-1)  # drop the token just added: the same cache for the next call
                return dt
            return run

        def prefill(k):
            return C.timed(lambda: models[k](input_ids=ids_pre, logits_to_keep=1, **kw.get(k, {})))

        check = (models["ak mixed"](input_ids=ids_pre).logits - peft_m(input_ids=ids_pre, **kw["peft mixed"]).logits
                 ).abs().max().item() if peft_m is not None else None
        res = {"decode": C.interleaved({k: decode(k) for k in models}, warmup * 5, repeats * 5),
               "prefill": C.interleaved({k: prefill(k) for k in models}, warmup, repeats)}

    def paired(step, a, b):
        s = res[step]
        return statistics.median(x / y for x, y in zip(s[a], s[b])) if a in s and b in s else None

    C.print_table("median ms per call", ["variant", "decode", "prefill"],
                  [[k, statistics.median(res["decode"][k]) * 1e3, statistics.median(res["prefill"][k]) * 1e3]
                   for k in models])
    pairs = [("ak mixed/single", "ak mixed", "ak single"), ("ak mixed/base", "ak mixed", "base"),
             ("ak single/base", "ak single", "base"), ("peft mixed/single", "peft mixed", "peft single"),
             ("peft mixed/base", "peft mixed", "base"), ("ak mixed/peft mixed", "ak mixed", "peft mixed"),
             ("dora mixed/single", "dora mixed", "dora single"), ("dora mixed/base", "dora mixed", "base"),
             ("lokr mixed/single", "lokr mixed", "lokr single"), ("lokr mixed/base", "lokr mixed", "base")]
    rat = {lab: {s: paired(s, a, b) for s in ("decode", "prefill")} for lab, a, b in pairs}
    C.print_table("paired time ratios", ["pair", "decode", "prefill"],
                  [[lab, r["decode"], r["prefill"]] for lab, r in rat.items() if r["decode"] is not None])
    verdict = {}
    for key, target in TARGETS_MET.items():
        step, lab = key.split(": ")
        v = rat[lab][step]
        verdict[key] = {"value": v, "target": target, "met": v <= target}
    print("\ntargets: " + "; ".join(f"{k} {v['value']:.3f} ({'met' if v['met'] else 'MISSED'}, <= {v['target']})"
                                    for k, v in verdict.items()))
    print("route entry (per-row factors built once): " + ", ".join(f"{k} {ms:.1f} ms" for k, ms in entry))
    if check is not None:
        print(f"fp32 logits, max |ak mixed - peft mixed| = {check:.3g}")
    C.write_json(C.json_path(args, "bench_serve"), {
        "env": C.env_info("cpu", quick=args.quick),
        "config": {**CONFIG, "rank": RANK, "alpha": 2 * RANK, "targets": TARGETS, "batch": B, "rows": rows,
                   "ctx": ctx, "prefill": pre, "warmup": warmup, "repeats": repeats, "peft": bool(peft)},
        "samples_ms": {s: {k: [x * 1e3 for x in v] for k, v in r.items()} for s, r in res.items()},
        "ratios": rat, "targets": verdict, "route_entry_ms": dict(entry), "ak_vs_peft_mixed_max_abs": check})


if __name__ == "__main__":
    main()
