"""GeoLoRA optimizer step time vs LoRA + AdamW on a small Llama-style model (standalone).

    python benchmarks/bench_geolora.py [--quick] [--threads 1] [--layers 2] [--hidden 512]
                                       [--tokens 1024] [--rank 8] [--json PATH]

Model: ``--layers`` Llama blocks of Linear layers only (RMSNorm, q/k/v/o projections with
causal softmax attention over 8 heads, SiLU-gated MLP gate/up/down with intermediate
``8/3 * hidden`` rounded to 64), hidden 512, a batch of ``--tokens`` tokens (sequences of 128)
and a squared-error loss. Adapters sit on all seven projections of every block.

Rows (each its own model on the same base weights):
  lora + AdamW         ak.LoRA(rank) trained by torch.optim.AdamW
  geolora c=0          ak.GeoLoRA(rank, max_rank=2*rank, truncation="fixed_rank"): augment to
                       2r, SGD coefficient update and truncate back to r every step (Alg. 1)
  geolora c=10         the reference schedule: one augmentation per 11 steps, AdamW S steps
                       between, one truncation (the per-step figure averages the cycle)
Fixed-rank truncation keeps GeoLoRA at LoRA's rank, so the rows compare equal work in the
forward / backward and differ in the optimizer. Columns: ``opt.step`` alone (after an
untimed forward + backward; median over steps, for c=10 the mean over whole cycles) and the
whole training step (zero_grad + forward + backward + step), interleaved round-robin.
Table on stdout, JSON to runs/bench_geolora[_quick].json.
"""
from __future__ import annotations

import gc
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import _common as C
from _common import ak

TARGETS = r"blocks\.\d+\.(attn\.(q|k|v|o)|mlp\.(gate|up|down))"


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Attention(nn.Module):
    def __init__(self, d, heads=8):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (m(x).view(b, t, self.h, d // self.h).transpose(1, 2) for m in (self.q, self.k, self.v))
        # (b, t, d) -> (b, t, h, d/h) -> (b, h, t, d/h)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))  # (b, h, t, d/h) -> (b, t, d)


class MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        inter = 64 * math.ceil(8 * d / 3 / 64)
        self.gate, self.up = nn.Linear(d, inter, bias=False), nn.Linear(d, inter, bias=False)
        self.down = nn.Linear(inter, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.n1, self.attn, self.n2, self.mlp = RMSNorm(d), Attention(d), RMSNorm(d), MLP(d)

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class Llama(nn.Module):
    def __init__(self, d, layers):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d) for _ in range(layers)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def build(args):
    torch.manual_seed(0)
    base = Llama(args.hidden, args.layers)
    for p in base.parameters():
        if p.dim() == 2:
            nn.init.normal_(p, std=0.02)
    variants = {}
    for name in ("lora + AdamW", "geolora c=0", "geolora c=10"):
        m = Llama(args.hidden, args.layers)
        m.load_state_dict(base.state_dict())
        if name.startswith("lora"):
            ak.inject(m, ak.LoRA(rank=args.rank, alpha=args.rank, targets=TARGETS))
            with torch.no_grad():  # a non-zero B: the AdamW state is dense as in training
                for n, p in m.named_parameters():
                    if n.endswith("lora_B"):
                        p.normal_(std=0.02)
            opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        else:
            ak.inject(m, ak.GeoLoRA(rank=args.rank, max_rank=2 * args.rank, truncation="fixed_rank",
                                    targets=TARGETS))
            opt = ak.GeoLoRAOptimizer(m, lr=1e-3, coeff_steps=0 if name.endswith("c=0") else 10)
        variants[name] = (m, opt)
    return variants


def main(argv=None):
    p = C.base_parser(__doc__.split("\n\n")[0], quick_help="1 block, <= 256 tokens, 1 timed cycle: a smoke run",
                      json_default="runs/bench_geolora[_quick].json")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--cycles", type=int, default=None, help="timed 11-step cycles (default 6, quick 1)")
    args = p.parse_args(argv)
    C.set_threads(args.threads)
    if args.quick:
        args.tokens, args.layers = min(args.tokens, 256), min(args.layers, 1)
    cycles = args.cycles or (1 if args.quick else 6)
    seq = min(128, args.tokens)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.tokens // seq, seq, args.hidden, generator=g)  # (batch, seq, hidden)
    target = torch.randn(x.shape, generator=g)
    variants = build(args)
    step_ms = {n: [] for n in variants}
    train_ms = {n: [] for n in variants}

    def loss_of(m):
        return (m(x) - target).pow(2).mean()

    # one untimed cycle (warmup: allocator, first-use kernels), then timed cycles; every step
    # of a cycle runs each variant once, in an order rotated per step
    gc.collect()
    gc.disable()
    try:
        for c in range(cycles + 1):
            for s in range(11):
                names = list(variants)
                k = (c * 11 + s) % len(names)
                for n in names[k:] + names[:k]:
                    m, opt = variants[n]
                    t0 = time.perf_counter()
                    opt.zero_grad()
                    loss_of(m).backward()
                    t1 = time.perf_counter()
                    opt.step()
                    t2 = time.perf_counter()
                    if c:
                        step_ms[n].append((t2 - t1) * 1e3)
                        train_ms[n].append((t2 - t0) * 1e3)
    finally:
        gc.enable()
    rows = []
    ref = statistics.median(step_ms["lora + AdamW"])
    ref_train = statistics.median(train_ms["lora + AdamW"])
    for n in variants:
        # c = 10 alternates a costly augmentation step with cheap S steps: average whole cycles
        agg = statistics.mean if n.endswith("c=10") else statistics.median
        st, tr = agg(step_ms[n]), agg(train_ms[n])
        m, opt = variants[n]
        ranks = sorted(set(opt.ranks().values())) if isinstance(opt, ak.GeoLoRAOptimizer) else [args.rank]
        rows.append({"variant": n, "opt_step_ms": st, "train_step_ms": tr, "opt_step_vs_lora": st / ref,
                     "train_step_vs_lora": tr / ref_train, "ranks": ranks,
                     "opt_step_samples_ms": step_ms[n], "train_step_samples_ms": train_ms[n]})
    print(f"\nGeoLoRA vs LoRA + AdamW: {args.layers} Llama block(s), hidden {args.hidden}, "
          f"{x.shape[0]}x{seq} tokens, rank {args.rank}, {torch.get_num_threads()} thread(s), "
          f"{cycles} timed cycle(s) of 11 steps")
    head = f"{'variant':14s} {'opt.step ms':>12s} {'x LoRA':>7s} {'train step ms':>14s} {'x LoRA':>7s}  ranks"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['variant']:14s} {r['opt_step_ms']:12.2f} {r['opt_step_vs_lora']:7.2f} "
              f"{r['train_step_ms']:14.1f} {r['train_step_vs_lora']:7.2f}  {r['ranks']}")
    return C.write_json(C.json_path(args, "bench_geolora"),
                        {"bench": "geolora", "args": vars(args), "rows": rows, "env": C.env_info()})


if __name__ == "__main__":
    main()
