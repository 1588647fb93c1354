"""Model benchmark: a small Llama-style decoder with random weights (hidden 512, 4 layers,
8 heads, MLP 1376, vocab 32000 or ``--vocab``; batch 4, seq 256, causal LM loss), rank-16
adapters on all seven projections, adaptkit side by side with PEFT (same weights) and the
frozen base.

    python benchmarks/bench_model.py [--quick] [--threads 1] [--dtype fp32|bf16] [--json PATH]
                                     [--methods lora,qlora,...] [--no-peft] [--batch B] [--seq S]
                                     [--vocab V] [--modes fwd,bwd,train] [--torch-model]
                                     [--warmup N] [--repeats N] [--device cpu|cuda]

QLoRA (``--methods qlora``): adaptkit's ak.QLoRA (NF4, double quantisation, blocksize 64,
compute in the run's dtype) beside PEFT's LoRA on bitsandbytes ``Linear4bit`` layers holding
the same NF4 bytes (quantised from the same weights), when bitsandbytes is installed; also
``nf4-base``, the frozen model with adaptkit's NF4 projections and no adapter (the ``qlora:
adaptkit/nf4-base`` ratio isolates the adapters' cost from the base's dequantisation).

The model is ``transformers.LlamaForCausalLM`` built from a ``LlamaConfig`` (SDPA attention)
when transformers is installed, else (or with ``--torch-model``) :class:`TinyLlama` below, with
the same module paths and math.

The frozen-base reference. With every base weight frozen and no input needing a gradient, the
base's backward would be empty, which is no reference for an adapted model whose backward runs
through every layer. So in all variants a forward hook makes the token embeddings' output
require grad (what ``enable_input_require_grads`` does for gradient checkpointing): the frozen
base step is the full forward plus the backward through all activations down to the embeddings
(input gradients of every matmul, no weight gradients), and an adapter's step adds exactly its
own work: the adapter forward, its input gradient and its weight gradients, and the AdamW step.
That is the accounting behind the issue's extra-FLOPs figure (1.053x for LoRA rank 16); the
``train FLOPs`` column is torch's FlopCounterMode count of matmul / attention FLOPs for the
exact shapes run (1.032x with the 32000-way head included), the floor for the time ratio.

Modes: fwd (eval forward with the loss, under no_grad), bwd (loss.backward() alone), train
(zero_grad + forward + backward + AdamW step); peak MiB is the train step's high-water mark of
live tensor bytes (``--device cuda``: from ``torch.cuda.max_memory_allocated``; timings
synchronise the GPU). PEFT runs with its defaults (``get_peft_model``; under a bf16 base its
``autocast_adapter_dtype=True`` keeps the adapter weights in fp32). Also: merged vs unmerged
logits (fp32, ``ak.merge``), and adaptkit vs PEFT logits with the same adapter weights.
Targets (train step): LoRA adaptkit/base <= 1.07 (fp32, 1 thread) / <= 1.10 (bf16, 2 threads),
QLoRA adaptkit/base <= 1.12, adaptkit/peft <= 0.95 for both; merged vs unmerged max |diff| < 1e-5.
"""
from __future__ import annotations

import copy
import importlib.util
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import _common as C
from _common import ak

RANK = 16
TARGETS = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
CONFIG = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=8, vocab_size=32000)
TARGET_RATIO = {"fp32": 1.07, "bf16": 1.10}  # LoRA train step / frozen base
QLORA_TARGET = 1.12  # QLoRA train step / frozen (float) base
PEFT_TARGET = 0.95  # adaptkit / PEFT train step: at least 5% faster


# ---- fallback model (no transformers) -------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)  # (..., d/2) each
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2)  # (b, t, d) -> (b, heads, t, d/heads)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, heads, t, d/heads)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, d))  # -> (b, t, heads, d/h) -> (b, t, d)


class MLP(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, d: int, f: int, heads: int):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(d), RMSNorm(d)
        self.self_attn, self.mlp = Attention(d, heads), MLP(d, f)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        d = c["hidden_size"]
        self.embed_tokens = nn.Embedding(c["vocab_size"], d)
        self.layers = nn.ModuleList(Block(d, c["intermediate_size"], c["num_attention_heads"])
                                    for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(d)
        hd = d // c["num_attention_heads"]
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd), persistent=False)


class TinyLlama(nn.Module):
    """Llama decoder in plain torch with transformers' module paths (RMSNorm, RoPE, SDPA
    causal attention, SiLU-gated MLP, untied head); ``forward(input_ids, labels)`` returns
    ``.loss`` (next-token cross entropy) and ``.logits`` like ``LlamaForCausalLM``."""

    def __init__(self, c: dict):
        super().__init__()
        self.model = Decoder(c)
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        for m in self.modules():  # Llama init: N(0, 0.02)
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids, labels=None):
        m = self.model
        x = m.embed_tokens(input_ids)  # (b, t, d)
        t = input_ids.shape[1]
        ang = torch.outer(torch.arange(t, dtype=torch.float32, device=input_ids.device), m.inv_freq)  # (t, hd/2)
        ang = torch.cat((ang, ang), dim=-1)  # (t, hd)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        for layer in m.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(m.norm(x))  # (b, t, vocab)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten())  # (b*(t-1), vocab)
        return SimpleNamespace(loss=loss, logits=logits)


USE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def build_model(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if USE_TRANSFORMERS:
        from transformers import LlamaConfig, LlamaForCausalLM
        model = LlamaForCausalLM(LlamaConfig(**CONFIG, attn_implementation="sdpa"))
    else:
        model = TinyLlama(CONFIG)
    return model.to(dtype)


def require_input_grads(model: nn.Module) -> None:
    """The frozen-base reference (module docstring): embeddings' output requires grad."""
    model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))


# ---- QLoRA rows ---------------------------------------------------------------------------------
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def bnb_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def qlora_row(dtype: torch.dtype) -> C.MethodRow:
    """ak.QLoRA computing in ``dtype``; its PEFT side is added by :func:`build_all`."""
    return C.MethodRow("qlora", lambda t, r: ak.QLoRA(rank=r, alpha=2 * r, targets=t,
                                                      compute_dtype=DTYPE_NAMES[dtype]))


def bnb_quantize(model: nn.Module, dtype: torch.dtype, device: str) -> nn.Module:
    """The target Linears of ``model`` replaced, in place, by bitsandbytes NF4 ``Linear4bit``
    (double quantisation, blocksize 64: the bytes ak.QLoRA makes from the same weights)."""
    import logging
    import re

    import bitsandbytes as bnb
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for path, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and re.fullmatch(TARGETS, path):
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                  compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False, quant_type="nf4",
                                         blocksize=64, compress_statistics=True)
            if mod.bias is not None:
                q.bias = mod.bias
            # its eval path would repack the weight for AVX512-BF16 kernels, which needs
            # in_features % 64 == 0 (1376 is not) and leaves the layer in another layout
            q.support_avx512bf16_for_cpu = False
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, q.to(device))
    return model


def build_all(base: nn.Module, methods, peft, device: str, dtype: torch.dtype):
    """C.build_variants, plus for a qlora row: PEFT's LoRA on bitsandbytes NF4 layers with the
    adapter weights of adaptkit's QLoRA, and ``nf4-base`` (the frozen NF4 model)."""
    variants, synced = C.build_variants(base, TARGETS, RANK, methods, peft, device)
    if any(m.name == "qlora" for m in methods):
        nb = copy.deepcopy(variants["base"])
        ak.nf4.quantize(nb, TARGETS, compute_dtype=DTYPE_NAMES[dtype])
        variants["nf4-base"] = nb.to(device).requires_grad_(False)
        if peft is not None and bnb_available():
            cfg = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=TARGETS)
            pm = peft.get_peft_model(bnb_quantize(copy.deepcopy(variants["base"]), dtype, device), cfg,
                                     autocast_adapter_dtype=False).to(device)
            C.sync_adapters(variants["qlora/adaptkit"], pm.base_model.model)
            variants["qlora/peft"] = pm
            synced.append("qlora")
    return variants, synced


# ---- measurements ------------------------------------------------------------------------------
@torch.no_grad()
def logits_checks(methods, peft, ids, device: str) -> dict[str, dict[str, float]]:
    """fp32, per method: max |merged - unmerged| logits (ak.merge), max |adapted - base| (the
    adapter is not a no-op), and max |adaptkit - peft| with the same adapter weights."""
    out = {}
    base = build_model(torch.float32).to(device).eval()
    ref = base(input_ids=ids).logits
    for row in methods:  # one method at a time: a few model copies alive, not all of them
        if row.name == "qlora":  # the run's row computes in the run's dtype; these checks are fp32
            row = qlora_row(torch.float32)
        variants, synced = build_all(base, [row], peft, device, torch.float32)
        am = variants[f"{row.name}/adaptkit"].eval()
        res = {}
        unmerged = am(input_ids=ids).logits
        res["adapted_vs_base"] = (unmerged - ref).abs().max().item()
        if row.name in synced:
            pm = variants[f"{row.name}/peft"].eval()
            res["adaptkit_vs_peft"] = (unmerged - pm(input_ids=ids).logits).abs().max().item()
        merged = ak.merge(am)
        res["merged_vs_unmerged"] = (merged(input_ids=ids).logits - unmerged).abs().max().item()
        out[row.name] = res
    return out


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="default 4 (quick: 2)")
    p.add_argument("--seq", type=int, default=None, help="default 256 (quick: 128)")
    p.add_argument("--torch-model", action="store_true",
                   help="use the plain-torch TinyLlama even when transformers is installed")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 32000)")
    args = p.parse_args()
    global USE_TRANSFORMERS
    USE_TRANSFORMERS = USE_TRANSFORMERS and not args.torch_model
    if args.vocab:
        CONFIG["vocab_size"] = args.vocab
    C.start(args)
    dtype, peft = C.DTYPES[args.dtype], C.load_peft(args.no_peft)
    rows = C.method_rows(peft)
    rows["qlora"] = qlora_row(dtype)
    methods = C.pick_methods(rows, args.methods)
    run_modes = C.pick_modes(args.modes)
    warmup, repeats = C.rounds(args, (1, 3), (2, 7))
    batch = args.batch or (2 if args.quick else 4)
    seq = args.seq or (128 if args.quick else 256)
    impl = "transformers.LlamaForCausalLM" if USE_TRANSFORMERS else "TinyLlama (torch)"
    print(f"bench_model: {impl} {CONFIG}, batch {batch}, seq {seq}, rank {RANK} on q,k,v,o,gate,up,down, "
          f"{args.dtype}, {args.device}, {torch.get_num_threads()} thread(s), methods {[m.name for m in methods]}, "
          f"PEFT {'on' if peft else 'off'}, warmup {warmup}, repeats {repeats} (interleaved)")

    ids = torch.randint(0, CONFIG["vocab_size"], (batch, seq),
                        generator=torch.Generator().manual_seed(0)).to(args.device)  # (batch, seq) token ids
    checks = logits_checks(methods, peft, ids, args.device)
    for name, r in checks.items():
        print(f"fp32 logits, {name}: " + ", ".join(f"max |{k.replace('_vs_', ' - ')}| = {v:.3g}" for k, v in r.items()))

    base = build_model(dtype)
    require_input_grads(base)  # copied along by deepcopy, so every variant has it
    variants, _ = build_all(base, methods, peft, args.device, dtype)
    names = list(variants)
    modes, opts, steps = C.mode_cases(variants, lambda m: m(input_ids=ids, labels=ids).loss,
                                      lambda loss: loss.backward(), args.device)
    res = C.time_modes(modes, run_modes, warmup, repeats)
    for n, costs in C.step_costs(variants, opts, steps, (ids,), args.device).items():
        res[n].update(costs)

    pairs = C.pair_ratios(names, [m.name for m in methods])
    if "nf4-base" in names:
        pairs.append(("qlora: adaptkit/nf4-base", "qlora/adaptkit", "nf4-base"))
    rat = C.ratios(res, pairs)
    C.print_results(f"Llama-style model, batch {batch} x seq {seq}, {args.dtype} (median ms; peak MiB of a "
                    f"train step)", res, rat, f"ratios (train: LoRA adaptkit/base <= {TARGET_RATIO[args.dtype]}, "
                    f"QLoRA adaptkit/base <= {QLORA_TARGET}, adaptkit/peft <= {PEFT_TARGET})")

    def steady(pair):  # the paired ratio (_common.paired) when measured, else medians'
        r = rat.get(pair, {})
        return r.get("train_paired") or r.get("train")

    def target(value, goal, strict=False):
        return None if value is None else {"value": value, "target": goal,
                                           "met": value < goal if strict else value <= goal}

    def pair_target(pair, goal):  # with the spread of the per-round ratios behind the median
        t = target(steady(pair), goal)
        return t if t is None else t | {"paired_iqr": rat.get(pair, {}).get("train_paired_iqr")}
    merged = checks.get("lora", {}).get("merged_vs_unmerged")
    verdict = {
        "lora_train_vs_base": pair_target("lora: adaptkit/base", TARGET_RATIO[args.dtype]),
        "lora_train_vs_peft": pair_target("lora: adaptkit/peft", PEFT_TARGET),
        "qlora_train_vs_base": pair_target("qlora: adaptkit/base", QLORA_TARGET),
        "qlora_train_vs_peft": pair_target("qlora: adaptkit/peft", PEFT_TARGET),
        "merged_vs_unmerged": target(merged, 1e-5, strict=True),
    }
    verdict = {k: v for k, v in verdict.items() if v is not None}
    if verdict:
        print("\nTargets (train step, paired ratios): " + "; ".join(
            f"{k} {v['value']:.3g} ({'met' if v['met'] else 'MISSED'}, target {v['target']:g}"
            + (", rounds {:.3f}-{:.3f})".format(*v["paired_iqr"]) if v.get("paired_iqr") else ")")
            for k, v in verdict.items()))
    C.write_json(C.json_path(args, f"bench_model_{args.dtype}"), {
        "env": C.env_info(args.device, dtype=args.dtype, quick=args.quick),
        "config": {"model": impl, **CONFIG, "batch": batch, "seq": seq, "rank": RANK, "alpha": 2 * RANK,
                   "targets": TARGETS, "warmup": warmup, "repeats": repeats, "modes": run_modes,
                   "methods": [m.name for m in methods], "peft": bool(peft),
                   "frozen_base": "all base weights frozen; embedding output requires grad, so the "
                                  "backward runs through every activation (input grads, no weight grads)"},
        "logits_checks_fp32": checks, "results": res, "ratios": rat, "lora_targets": verdict})


if __name__ == "__main__":
    main()
