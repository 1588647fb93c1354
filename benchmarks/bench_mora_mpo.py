"""MoRA (and LoRA-MPO) beside LoRA at the same parameter budget: time and memory.

    python benchmarks/bench_mora_mpo.py [--quick] [--threads 1] [--rows lora,mora] [--json PATH]

Model: ``LAYERS`` stacked ``nn.Linear(D, D)`` (+ tanh), all adapted; input ``(TOKENS, D)`` in fp32
(--quick: smaller D, fewer tokens and repeats; a smoke run). Every row gets its own copy of the
same base weights; rows run interleaved (each timed round starts one row later) and the median
of the rounds is reported, so machine noise hits every row alike.

Columns:
  params       trainable parameters (MoRA's r̂² ≈ r(in+out) matches LoRA's r(in+out))
  state MiB    trainable parameters + their AdamW state (2 moments), in MiB
  saved MiB    bytes autograd keeps for backward in one training forward (distinct storages,
               from ``saved_tensors_hooks``): the activation memory the method adds
  peak MiB     high-water mark of tensor bytes allocated during one training step, from the
               profiler's allocator records (None where that profiler API is unavailable)
  train ms     zero_grad + forward + backward + AdamW step (the input requires grad, so the
               frozen base also runs a backward)
  fwd ms       inference forward under no_grad, unmerged
  merged ms    the same after ``ak.merge`` (the plain model: every row should match the base)
  merge ms     one ``ak.merge(model, unload=False)`` + ``unmerge`` of the adapted model
  |Δ| merge    max |merged - unmerged| output (adapter weights are made non-zero first)

A row is one entry of ``ROWS``: ``Row(name, adapt)`` where ``adapt(model, rank)`` adapts the
model in place (``ak.inject`` a spec, or swap modules). LoRA-MPO rows are added by appending
entries; nothing else changes.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

import _common as C
from _common import ak
from adaptkit.merge import unmerge
from adaptkit.methods.mora_linear import apply_mora_linear

TARGETS = r"layers\.\d+"


@dataclass
class Row:
    name: str
    adapt: Callable[[nn.Module, int], None]  # (model, rank) -> None, in place


def _inject(make_spec):
    return lambda model, r: ak.inject(model, make_spec(r))


ROWS = [
    Row("base (frozen)", lambda model, r: None),
    Row("lora", _inject(lambda r: ak.LoRA(rank=r, alpha=2 * r, targets=TARGETS))),
    Row("mora type 1", _inject(lambda r: ak.MoRA(rank=r, mora_type=1, targets=TARGETS))),
    Row("mora type 2", _inject(lambda r: ak.MoRA(rank=r, mora_type=2, targets=TARGETS))),
    Row("mora type 6", _inject(lambda r: ak.MoRA(rank=r, mora_type=6, targets=TARGETS))),
    Row("MoRALinear type 6", lambda model, r: apply_mora_linear(model, targets=TARGETS, rank=r,
                                                                 mora_type=6)),
    # LoRA-MPO rows go here, e.g. Row("lorampo", _inject(lambda r: ak.LoRAMPO(...))),
]


class Stack(nn.Module):
    def __init__(self, d: int, n: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d, d) for _ in range(n)])

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


@torch.no_grad()
def _nontrivial(model: nn.Module) -> None:
    """Zero-initialised adapter parameters (LoRA's B, MoRA's M) get small noise, so the merge
    check and the timings see a real update."""
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        if p.requires_grad and not p.any():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        s = t.untyped_storage()
        if s.data_ptr() not in seen and not isinstance(t, nn.Parameter):
            seen.add(s.data_ptr())
            total += s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return total


def _peak_bytes(fn) -> int | None:
    try:
        return C.dynamic_peak_bytes(fn)
    except Exception:  # noqa: BLE001 - private profiler API; the column is optional
        return None


def main(argv=None) -> dict:
    ap = C.base_parser(__doc__.split("\n")[0], quick_help="small shapes, few repeats (smoke run)",
                       json_default="runs/bench_mora_mpo[_quick].json")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rows", default="all", help="comma-separated substrings of row names")
    args = ap.parse_args(argv)
    C.set_threads(args.threads)
    d, layers, tokens, warmup, repeats = (256, 2, 64, 2, 5) if args.quick else (1024, 4, 256, 3, 15)
    rows = ROWS if args.rows == "all" else [r for r in ROWS if any(
        k.strip().lower() in r.name.lower() for k in args.rows.split(","))]
    torch.manual_seed(0)
    base = Stack(d, layers).requires_grad_(False)
    x = torch.randn(tokens, d)
    models, opts, results = {}, {}, {}
    for row in rows:
        m = copy.deepcopy(base)
        row.adapt(m, args.rank)
        _nontrivial(m)
        train = [p for p in m.parameters() if p.requires_grad]
        models[row.name] = m
        opts[row.name] = torch.optim.AdamW(train, lr=1e-4) if train else None
        results[row.name] = {"params": sum(p.numel() for p in train)}

    def step(name):
        m, opt, xi = models[name], opts[name], x.clone().requires_grad_(True)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        m(xi).pow(2).mean().backward()
        if opt is not None:
            opt.step()

    def infer(name):
        with torch.no_grad():
            models[name](x)

    for name in models:  # one step first, so AdamW state exists for the memory columns
        step(name)
        r, m, opt = results[name], models[name], opts[name]
        state = [p for p in m.parameters() if p.requires_grad]
        state += [t for s in (opt.state.values() if opt else []) for t in s.values()
                  if isinstance(t, torch.Tensor)]
        r["state_mib"] = sum(t.numel() * t.element_size() for t in state) / C.MiB
        r["saved_mib"] = _saved_bytes(m, x.clone().requires_grad_(True)) / C.MiB
        pk = _peak_bytes(lambda: step(name))
        r["peak_mib"] = None if pk is None else pk / C.MiB
    for col, fn in (("train_ms", step), ("fwd_ms", infer)):
        cases = {n: C.timed(lambda n=n, fn=fn: fn(n)) for n in models}
        for n, v in C.median_ms(cases, warmup, repeats).items():
            results[n][col] = v
    for name, m in models.items():
        with torch.no_grad():
            y = m(x)
        if name != "base (frozen)":
            t = time.perf_counter()
            ak.merge(m, unload=False)
            unmerge(m)
            results[name]["merge_ms"] = (time.perf_counter() - t) * 1e3
            models[name] = m = ak.merge(m)
        with torch.no_grad():
            results[name]["merge_err"] = (m(x) - y).abs().max().item()
    cases = {n: C.timed(lambda n=n: infer(n)) for n in models}
    for n, v in C.median_ms(cases, warmup, repeats).items():
        results[n]["merged_fwd_ms"] = v

    cols = [("params", "params"), ("state_mib", "state MiB"), ("saved_mib", "saved MiB"),
            ("peak_mib", "peak MiB"), ("train_ms", "train ms"), ("fwd_ms", "fwd ms"),
            ("merged_fwd_ms", "merged ms"), ("merge_ms", "merge ms"), ("merge_err", "|Δ| merge")]
    lora = results.get("lora", {})
    C.print_table(f"{layers} x Linear({d}, {d}), {tokens} tokens, rank {args.rank}, fp32, "
                  f"{args.threads} thread(s), median of {repeats}",
                  ["row"] + [c[1] for c in cols] + ["train/lora"],
                  [[n] + [r.get(k) for k, _ in cols] + [r["train_ms"] / lora["train_ms"] if lora else None]
                   for n, r in results.items()], "{:.3g}")
    return C.write_json(C.json_path(args, "bench_mora_mpo"), {
        "bench": "bench_mora_mpo", "shape": {"d": d, "layers": layers, "tokens": tokens},
        "rank": args.rank, "repeats": repeats, "env": C.env_info(quick=args.quick), "rows": results})


if __name__ == "__main__":
    main()
