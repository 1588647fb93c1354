"""ak.to_lora per method on the model benchmark's Llama shape (hidden 512, 4 layers, MLP 1376;
bench_model.TinyLlama, random N(0, 0.02) weights), rank-16 adapters (alpha 32) on all seven
projections, adapter weights made non-trivial as the other benchmarks do (``C.nontrivial``:
zero-initialised factors get N(0, 0.02), the rest a 10% jitter). A stand-in for a trained
adapter, not one: how well a real adapter compresses depends on its training.

Per method: the relative error ||ΔW - B A||_F / ||ΔW||_F of the rank-16 LoRA (mean and max
over layers, and per projection), the logits' change when the LoRA replaces the adapter
relative to the adapter's own change of the logits (||z_lora - z_src|| / ||z_src - z_base||,
one batch of 2 x 32 tokens), the mean rank that keeps 99% of the update's energy, and the
conversion time (1 thread by default).

    python benchmarks/bench_to_lora.py [--quick] [--threads 1] [--rank 16] [--json PATH]
"""
from __future__ import annotations

import copy
import re
import statistics
import time
import warnings

import torch

import _common as C
from _common import ak
from bench_model import CONFIG, TARGETS, TinyLlama

SPECS = {
    "lora": lambda r: ak.LoRA(rank=r, alpha=2 * r, targets=TARGETS),
    "dora": lambda r: ak.DoRA(rank=r, alpha=2 * r, targets=TARGETS),
    "lokr": lambda r: ak.LoKr(rank=r, alpha=2 * r, targets=TARGETS),
    "mora": lambda r: ak.MoRA(rank=r, targets=TARGETS),
    "geolora": lambda r: ak.GeoLoRA(rank=r, alpha=2 * r, targets=TARGETS),
    "lorampo": lambda r: ak.LoRAMPO(rank=r, alpha=2 * r, targets=TARGETS),
    "qlora": lambda r: ak.QLoRA(rank=r, alpha=2 * r, targets=TARGETS),
    "qdora": lambda r: ak.QLoRA(rank=r, alpha=2 * r, targets=TARGETS, use_dora=True),
}


def main() -> None:
    p = C.base_parser(__doc__.split("\n")[0], quick_help="2 layers, 3 methods: a smoke run")
    p.add_argument("--rank", type=int, default=16, help="adapter and LoRA rank (default 16)")
    args = p.parse_args()
    C.set_threads(args.threads)
    cfg = dict(CONFIG, num_hidden_layers=2 if args.quick else CONFIG["num_hidden_layers"])
    methods = ["lora", "dora", "lokr"] if args.quick else list(SPECS)
    torch.manual_seed(0)
    base = TinyLlama(cfg).eval()
    ids = torch.randint(0, cfg["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z_base = base(ids).logits
    rows, out = [], {}
    for name in methods:
        model = copy.deepcopy(base)
        ak.inject(model, SPECS[name](args.rank))
        C.nontrivial(model)
        with torch.no_grad():
            z_src = model(ids).logits
        with warnings.catch_warnings():  # LoRA-MPO's residual-W note: expected here
            warnings.simplefilter("ignore", UserWarning)
            t = time.perf_counter()
            res = ak.to_lora(model, "default", rank=args.rank)
            secs = time.perf_counter() - t
            energy = ak.to_lora(model, "default", energy=0.99, new_name="e99")
        ak.set_active(model, [res.name])
        with torch.no_grad():
            z_lora = model(ids).logits
        errs = list(res.errors.values())
        per_proj = {}
        for path, e in res.errors.items():
            per_proj.setdefault(re.sub(r".*\.", "", path), []).append(e)
        out[name] = {"mean_rel_error": statistics.fmean(errs), "max_rel_error": max(errs),
                     "per_projection_mean": {k: statistics.fmean(v) for k, v in per_proj.items()},
                     "logits_change_vs_adapter": float((z_lora - z_src).norm() / (z_src - z_base).norm()),
                     "mean_rank_energy_0.99": statistics.fmean(energy.ranks.values()),
                     "seconds": secs, "layers": len(errs)}
        o = out[name]
        rows.append([name, o["mean_rel_error"], o["max_rel_error"],
                     *(o["per_projection_mean"].get(k) for k in ("q_proj", "o_proj", "up_proj", "down_proj")),
                     o["logits_change_vs_adapter"], o["mean_rank_energy_0.99"], secs])
    C.print_table(f"to_lora at rank {args.rank}: relative error ||dW - BA||_F / ||dW||_F "
                  f"({cfg['num_hidden_layers']} layers x 7 projections, {args.threads} thread(s))",
                  ["method", "mean", "max", "q_proj", "o_proj", "up_proj", "down_proj", "logits", "rank@0.99", "s"],
                  rows, floatfmt="{:.3g}")
    C.write_json(C.json_path(args, "bench_to_lora"),
                 {"env": C.env_info(rank=args.rank, config=cfg), "results": out})


if __name__ == "__main__":
    main()
