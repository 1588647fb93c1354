"""LoRA-MPO beside LoRA on single ``nn.Linear`` layers: time, peak memory, parameters, init cost.

    python benchmarks/bench_lorampo.py [--quick] [--threads 1] [--rank 16] [--tokens 512]
                                       [--json PATH]

Variants per layer shape (every adapter at rank r, alpha = 2r, fp32):
  base          the frozen nn.Linear
  lora          ak.LoRA (default init)
  lorampo       ak.LoRAMPO mode "kron", its own route choice at this token count (einsum over
                x.view(..., i1, i2), or ΔW built from the cores and one dense matmul)
  lorampo-einsum  the same adapter held to the einsum route (dense_from = inf)
  lorampo-lora  ak.LoRAMPO mode "lora" (degenerate shapes, = PiSSA)
  kron-dense    the same "kron" adapter run through its dense delta, F.linear(x, W + s ΔW):
                what a forward that materialises the Kronecker sum would cost
Columns: ``fwd`` inference forward under no_grad; ``train`` zero_grad + forward + backward +
AdamW step (the input requires grad, as inside a network); ``peak MiB`` the train step's
high-water mark of live tensor bytes (parameters, optimizer state, input and everything the
step allocates, from the profiler's CPU allocator records); ``init ms`` ak.inject (the SVD /
Kronecker SVD of W; the header also gives it for ``init_niter=4``, the randomized SVD); ``err`` max |y - dense reference| of the adapted forward. Timings are
medians over rounds that call every variant once, in an order rotated each round.
Cost model printed per shape: the einsum path costs ``F = r*(in*o2 + out*i1)`` multiply-adds per
token (the cheaper contraction order), the dense route ``D = out*in`` per token plus building ΔW;
``dense_from`` is the adapter's own crossover, ``3 r D / (2 F - D)`` tokens (see
adaptkit/methods/lorampo.py), and ``route`` the one it takes at ``--tokens``.
Standalone: needs only torch and adaptkit; writes runs/bench_lorampo[_quick].json.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import _common as C
from _common import ak

SHAPES = [(768, 768), (3072, 768), (768, 3072), (4096, 4096)]  # (out, in)
QUICK_SHAPES = [(256, 256), (1024, 256)]


class DenseKron(nn.Module):
    """Runs an injected LoRA-MPO layer through its dense delta: F.linear(x, W + s ΔW, b)."""

    def __init__(self, model: C.Holder):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.model.proj
        ad = layer.adapters["default"]
        return F.linear(x, layer.weight + ad.delta_weight(layer), layer.bias)


def bench_shape(out: int, inp: int, rank: int, tokens: int, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    base = C.Holder(nn.Linear(inp, out)).requires_grad_(False)
    specs = {"lora": ak.LoRA(rank=rank, alpha=2 * rank, targets="proj"),
             "lorampo": ak.LoRAMPO(rank=rank, alpha=2 * rank, targets="proj"),
             "lorampo-lora": ak.LoRAMPO(rank=rank, alpha=2 * rank, mode="lora", targets="proj")}
    models: dict[str, nn.Module] = {"base": base}
    init_ms, params, err, shapes = {}, {}, {}, {}
    x_chk = torch.randn(4, inp)
    for name, spec in specs.items():
        m = copy.deepcopy(base)
        t = time.perf_counter()
        ak.inject(m, spec)
        init_ms[name] = (time.perf_counter() - t) * 1e3
        with torch.no_grad():  # non-zero factors everywhere (LoRA's B starts at 0)
            for p in m.proj.adapters.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        params[name] = ak.summary(m).trainable
        layer = m.proj
        with torch.no_grad():
            ref = F.linear(x_chk, layer.dense_weight(["default"]), layer.bias)
            err[name] = (m(x_chk) - ref).abs().max().item()
        ad = layer.adapters["default"]
        if name.startswith("lorampo"):
            (o1, o2), (i1, i2) = ad.out_shape, ad.in_shape
            per_token = rank * min(inp * o2 + out * i1, inp * o1 + out * i2)
            shapes[name] = {"out_shape": list(ad.out_shape), "in_shape": list(ad.in_shape),
                            "order": "B first" if ad.b_first else "A first",
                            # multiply-adds: the einsum path per token vs building s ΔW once
                            "einsum_macs_per_token": per_token,
                            "dense_delta_macs_per_call": rank * out * inp,
                            "dense_from": ad.dense_from,
                            "route": "dense" if tokens >= ad.dense_from else "einsum"}
        models[name] = m
    m = copy.deepcopy(base)  # the randomized Kronecker SVD init: timed only
    t = time.perf_counter()
    ak.inject(m, ak.LoRAMPO(rank=rank, alpha=2 * rank, init_niter=4, targets="proj"))
    shapes["lorampo"]["init_ms_init_niter_4"] = (time.perf_counter() - t) * 1e3
    models["lorampo-einsum"] = copy.deepcopy(models["lorampo"])
    models["lorampo-einsum"].proj.adapters["default"].dense_from = float("inf")
    params["lorampo-einsum"], init_ms["lorampo-einsum"] = params["lorampo"], None
    for name in ("lorampo", "lorampo-einsum"):  # each route at the timed token count
        layer = models[name].proj
        with torch.no_grad():
            x_all = torch.randn(tokens, inp)
            ref = F.linear(x_all, layer.dense_weight(["default"]), layer.bias)
            err[name] = (models[name](x_all) - ref).abs().max().item()
    models["kron-dense"] = DenseKron(models["lorampo"])
    params["kron-dense"], init_ms["kron-dense"], err["kron-dense"] = params["lorampo"], None, 0.0
    params["base"], init_ms["base"], err["base"] = 0, None, 0.0

    x = torch.randn(tokens, inp, requires_grad=True)
    g = torch.randn(tokens, out)
    opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            if any(p.requires_grad for p in m.parameters()) else None for n, m in models.items()}

    def fwd(m):
        def run():
            with torch.no_grad():
                m(x)
        return run

    def train(n, m):
        def run():
            if opts[n] is not None:
                opts[n].zero_grad(set_to_none=True)
            m(x).backward(g)
            x.grad = None
            if opts[n] is not None:
                opts[n].step()
        return run

    fwd_ms = C.median_ms({n: C.timed(fwd(m)) for n, m in models.items()}, warmup, repeats)
    train_ms = C.median_ms({n: C.timed(train(n, m)) for n, m in models.items()}, warmup, repeats)
    peak = {}
    for n, m in models.items():
        train(n, m)()  # optimizer state exists before the measured step
        peak[n] = (C.tensor_bytes(m, x, g, opts[n]) + C.dynamic_peak_bytes(train(n, m))) / C.MiB
    rows = {n: {"fwd_ms": fwd_ms[n], "train_ms": train_ms[n], "peak_mib": peak[n],
                "trainable_params": params[n], "init_ms": init_ms[n], "max_abs_err": err[n]}
            for n in models}
    return {"out": out, "in": inp, "rank": rank, "tokens": tokens, "lorampo_shapes": shapes,
            "rows": rows}


def main(argv=None) -> dict:
    p = C.base_parser(__doc__.split("\n")[0], quick_help="small shapes, few repeats: a smoke run",
                      json_default="runs/bench_lorampo[_quick].json")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--tokens", type=int, default=None, help="tokens per call (default 512, quick 64)")
    args = p.parse_args(argv)
    C.set_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    tokens = args.tokens or (64 if args.quick else 512)
    warmup, repeats = (1, 3) if args.quick else (2, 7)
    results = []
    for out, inp in shapes:
        res = bench_shape(out, inp, args.rank, tokens, warmup, repeats)
        results.append(res)
        lr = res["rows"]["lora"]
        sh = res["lorampo_shapes"]["lorampo"]
        print(f"\nLinear({inp} -> {out}), rank {args.rank}, {tokens} tokens; lorampo out_shape "
              f"{sh['out_shape']} in_shape {sh['in_shape']} ({sh['order']}); dense route from "
              f"{sh['dense_from']:.0f} tokens, taken here: {sh['route']}; "
              f"init with init_niter=4: {sh['init_ms_init_niter_4']:.1f} ms")
        print(f"{'variant':14s} {'fwd ms':>8s} {'train ms':>9s} {'x lora':>7s} {'peak MiB':>9s} "
              f"{'params':>9s} {'init ms':>8s} {'err':>8s}")
        for n, r in res["rows"].items():
            init = "-" if r["init_ms"] is None else f"{r['init_ms']:.1f}"
            print(f"{n:14s} {r['fwd_ms']:8.3f} {r['train_ms']:9.3f} {r['train_ms'] / lr['train_ms']:7.2f} "
                  f"{r['peak_mib']:9.2f} {r['trainable_params']:9,d} {init:>8s} {r['max_abs_err']:8.1e}")
    return C.write_json(C.json_path(args, "bench_lorampo"), {
        "bench": "lorampo", "env": C.env_info(dtype="fp32", quick=args.quick), "results": results})


if __name__ == "__main__":
    main()
