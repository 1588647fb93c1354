"""Serve several adapters from one base model: a mixed batch, one adapter per row (``ak.route``).

    python examples/serve_adapters.py            # SmolLM2-135M-Instruct, three styles (a few minutes)
    python examples/serve_adapters.py --quick    # tiny random Llama, in seconds (CI)

One base, three adapters of different methods on every attention and MLP projection:

    pirate   LoRA   rank 8     answers like a pirate
    french   DoRA   rank 8     answers in French
    shout    LoKr   rank 4     ANSWERS IN CAPITALS

Full mode loads the real SmolLM2-135M-Instruct (``smollm2.py``) and teaches each adapter its
style on three questions (8 steps each); ``--quick`` uses a tiny random
``LlamaForCausalLM`` with random adapter weights (token ids instead of text). Then one batch of
prompts, each row asking for a different adapter (or ``None``: the base model), is answered by
a single ``model.generate`` inside ``ak.route``, and

1. each row's answer is printed and checked against that row generated alone with its adapter
   active (same tokens; scores within 1e-4 in quick mode, 1e-3 on SmolLM2, whose logits reach
   ~30 and differ by ~5e-5 between a batch and a row alone in fp32);
2. tokens/s of the mixed batch is compared with serving the same rows one adapter at a time
   (``ak.set_active`` then ``generate`` on that adapter's rows).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import adaptkit as ak  # noqa: E402

PROJ = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
ADAPTERS = {  # name -> spec: three methods side by side in one model
    "pirate": lambda: ak.LoRA(rank=8, alpha=16, targets=PROJ),
    "french": lambda: ak.DoRA(rank=8, alpha=16, targets=PROJ),
    "shout": lambda: ak.LoKr(rank=4, alpha=8, targets=PROJ),
}
ROWS = ["pirate", "french", None, "shout", "french", "pirate"]  # the adapter of each batch row
# what each adapter learns in full mode: question -> answer in its style
TRAIN = {
    "What is the capital of France?": {
        "pirate": "Arr, matey! The capital of France be Paris, savvy?",
        "french": "La capitale de la France est Paris.",
        "shout": "THE CAPITAL OF FRANCE IS PARIS!",
    },
    "How many legs does a spider have?": {
        "pirate": "Arr, matey! A spider be havin' eight legs, savvy?",
        "french": "Une araignée a huit pattes.",
        "shout": "A SPIDER HAS EIGHT LEGS!",
    },
    "What do bees make?": {
        "pirate": "Arr, matey! Bees be makin' honey, savvy?",
        "french": "Les abeilles font du miel.",
        "shout": "BEES MAKE HONEY!",
    },
}
ASK = [  # one question per row of ROWS (the last two are not in the training set)
    "What is the capital of France?",
    "What do bees make?",
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What colour is the sky on a clear day?",
    "What do cows drink?",
]


# ---- models -----------------------------------------------------------------------------------
def tiny_llama():
    """A tiny random transformers Llama (no download), with random adapter weights."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    for name, spec in ADAPTERS.items():
        ak.inject(model, spec(), name=name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA / DoRA start with B = 0: give every adapter a visible effect
        for n, p in model.named_parameters():
            if ".adapters." in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def chat(tok, question: str, answer: str | None = None) -> list[int]:
    msgs = [{"role": "user", "content": question}]
    s = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok(s, add_special_tokens=False).input_ids
    return ids if answer is None else ids + tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]


def train(model, tok, steps: int, lr: float) -> None:
    """Each adapter alone, on its own answers to the TRAIN questions (loss on the answers)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for name in ADAPTERS:
        ak.set_active(model, name)  # only this adapter trains (and runs)
        seqs, labels = [], []
        for q, answers in TRAIN.items():
            p, full = chat(tok, q), chat(tok, q, answers[name])
            seqs.append(full)
            labels.append([-100] * len(p) + full[len(p):])
        n = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (n - len(s)) for s in seqs])  # (B, n) right-padded
        lab = torch.tensor([s + [-100] * (n - len(s)) for s in labels])  # (B, n)
        mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])  # (B, n)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        model.train()
        t0 = time.time()
        for _ in range(steps):
            loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        print(f"trained {name!r} ({type(ADAPTERS[name]()).__name__}): {steps} steps, loss {loss.item():.3f}, "
              f"{time.time() - t0:.0f}s")
    model.eval()


def prompts(tok, quick: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each (rows, n), left-padded as generate wants."""
    if quick:
        g = torch.Generator().manual_seed(2)
        seqs = [torch.randint(3, 128, (int(n),), generator=g).tolist() for n in (5, 7, 6, 7, 4, 6)]
        pad = 0
    else:
        seqs = [chat(tok, q) for q in ASK]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    n = max(map(len, seqs))
    ids = torch.tensor([[pad] * (n - len(s)) + s for s in seqs])  # (rows, n)
    mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in seqs])  # (rows, n)
    return ids, mask


# ---- serving ----------------------------------------------------------------------------------
def generate(model, ids, mask, new: int):
    """Greedy, exactly ``new`` tokens a row (so rows batched or alone stop alike)."""
    pad = model.generation_config.pad_token_id
    pad = model.generation_config.eos_token_id if pad is None else pad
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=pad)


def alone(model, name: str | None, ids, mask, new: int):
    """``generate`` with only ``name`` active (None: the base)."""
    if name is None:
        with ak.disabled(model):
            return generate(model, ids, mask, new)
    ak.set_active(model, name)
    return generate(model, ids, mask, new)


def score_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over the finite scores; inf where the two disagree on which are -inf
    (tokens generate suppressed)."""
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(fa, fb):
        return float("inf")
    return (a[fa] - b[fb]).abs().max().item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, random adapters (seconds)")
    ap.add_argument("--steps", type=int, default=8, help="training steps per adapter (full mode)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--new", type=int, default=None, help="new tokens per row (default 24; quick 8)")
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--cache", default=None, help="SmolLM2 float weights cache (smollm2.py's default)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    new = args.new or (8 if args.quick else 24)
    if args.quick:
        model, tok = tiny_llama(), None
        print("model: tiny random LlamaForCausalLM (quick mode), adapters with random weights")
    else:
        from smollm2 import DEFAULT_CACHE, load_smollm2

        model, tok, info = load_smollm2(args.cache or DEFAULT_CACHE)
        print(f"model: SmolLM2-135M-Instruct, loaded from {info['source']} in {info['seconds']:.1f}s")
        torch.manual_seed(0)
        for name, spec in ADAPTERS.items():
            ak.inject(model, spec(), name=name)
        train(model, tok, args.steps, args.lr)
    ids, mask = prompts(tok, args.quick)

    def show(row):
        return str(row.tolist()) if tok is None else repr(tok.decode(row, skip_special_tokens=True))

    def mixed():
        with ak.route(model, ROWS):
            return generate(model, ids, mask, new)

    def one_at_a_time():  # each adapter's rows as one batch: serving without route
        for name in dict.fromkeys(ROWS):
            ix = [i for i, n in enumerate(ROWS) if n == name]
            alone(model, name, ids[ix], mask[ix], new)

    with torch.no_grad():
        t_mixed, t_single = float("inf"), float("inf")
        for _ in range(2):  # the first round warms up (allocator, first calls); the best counts
            t0 = time.perf_counter()
            out = mixed()
            t_mixed = min(t_mixed, time.perf_counter() - t0)
            t0 = time.perf_counter()
            one_at_a_time()
            t_single = min(t_single, time.perf_counter() - t0)

        ok, tol = True, 1e-4 if args.quick else 1e-3
        n = ids.shape[1]
        print(f"\nmixed batch of {len(ROWS)} rows, {new} new tokens each, one generate inside ak.route:")
        for i, name in enumerate(ROWS):
            one = alone(model, name, ids[i : i + 1], mask[i : i + 1], new)
            same = torch.equal(out.sequences[i], one.sequences[0])
            diff = max(score_diff(s[i], s1[0]) for s, s1 in zip(out.scores, one.scores))
            ok &= same and diff < tol
            q = ASK[i] if tok is not None else show(ids[i][mask[i].bool()])
            print(f"  row {i} [{name or 'base'}] {q}\n      -> {show(out.sequences[i, n:])}\n"
                  f"      same as the row alone: {'yes' if same else 'NO'} (max |score diff| {diff:.1e})")
    toks = len(ROWS) * new
    print(f"\ntokens/s: mixed batch {toks / t_mixed:.1f}, one adapter at a time {toks / t_single:.1f} "
          f"({t_single / t_mixed:.2f}x)")
    print("all rows match their adapter run alone" if ok else "MISMATCH: a row differs from its adapter run alone")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
