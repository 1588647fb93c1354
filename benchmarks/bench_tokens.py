"""ak.TrainableTokens vs PEFT's TrainableTokensConfig on a SmolLM2-135M-shaped model with
tied embeddings (vocab 49152, hidden 576, 9 heads / 3 KV heads, MLP 1536; 1 decoder layer
by default so the embedding and the head dominate), training 2 new token rows.

Modes: fwd (no grad) and train (forward + backward of the mean logit square; not for the
frozen base, which has nothing to train). PEFT rebuilds
the whole (V, d) weight with ``index_copy`` at every call of the embedding and of the tied
head; adaptkit looks the trained rows up (a V-long index table) and adds n logit columns.
Variants are timed interleaved (benchmarks/_common.py); the table prints medians and the
ratios against the frozen base and against PEFT.

    python benchmarks/bench_tokens.py [--quick] [--threads 1] [--layers 1] [--json PATH]
"""
from __future__ import annotations

import copy

import torch

import _common as C
from _common import ak

IDS = [49150, 49151]


def model(layers: int):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg)


def main() -> None:
    p = C.base_parser(__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=1)
    C.add_rounds(p)
    C.add_no_peft(p)
    args = p.parse_args()
    C.start(args)
    warmup, repeats = C.rounds(args, (1, 3), (2, 9))
    peft = C.load_peft(args.no_peft)
    base = model(args.layers)
    variants = {"base": copy.deepcopy(base)}
    for prm in variants["base"].parameters():
        prm.requires_grad_(False)
    variants["adaptkit"] = copy.deepcopy(base)
    ak.inject(variants["adaptkit"], ak.TrainableTokens(token_ids=IDS, targets=r"model\.embed_tokens"))
    if peft is not None:
        variants["peft"] = peft.get_peft_model(copy.deepcopy(base), peft.TrainableTokensConfig(token_indices=IDS))
    batch = (2, 64) if args.quick else (4, 128)
    x = torch.randint(0, 49152, batch, generator=torch.Generator().manual_seed(1))
    x[:, :2] = torch.tensor(IDS)

    def fwd(m):
        with torch.no_grad():
            m(input_ids=x).logits

    def train(m):
        m(input_ids=x).logits.square().mean().backward()

    res = {}
    for mode, fn in (("fwd", fwd), ("train", train)):
        # the frozen base has nothing to train: train mode times the two adapters only
        cases = {n: C.timed(lambda m=m: fn(m)) for n, m in variants.items() if mode == "fwd" or n != "base"}
        res[mode] = C.median_ms(cases, warmup, repeats)
    rows = [[mode, *(f"{r[n]:.1f}" if n in r else "-" for n in variants),
             f"{r['adaptkit'] / r['base']:.2f}" if "base" in r else "-",
             f"{r['adaptkit'] / r['peft']:.2f}" if "peft" in r else "-"]
            for mode, r in res.items()]
    C.print_table(f"trainable tokens, batch {batch}, {args.layers} layer(s), median ms (noisy)",
                  ["mode", *variants, "adaptkit/base", "adaptkit/peft"], rows)
    C.write_json(C.json_path(args, "bench_tokens"), {"env": C.env_info(), "batch": list(batch), "median_ms": res})


if __name__ == "__main__":
    main()
