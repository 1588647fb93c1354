"""The main job: LoRA fine-tune of the real all-MiniLM-L6-v2 encoder on Rotten Tomatoes.

    bash scripts/demo.sh            # full run (about 4 min on 2 CPU cores)
    bash scripts/demo.sh --quick    # CI-sized run (< 1 min)
    bash scripts/demo.sh --qlora    # same, with the encoder's Linear weights in NF4

The adapter is written to runs/sentiment_<method>.safetensors (lora / qlora), so the two
runs keep their own files; --out overrides it.

Steps: frozen-encoder linear probe (the baseline) -> LoRA (rank 8 on query / key / value /
attention-output / FFN, classifier head trained in full via modules_to_save and started
from the probe) -> save the adapter -> load it into a freshly built model -> check the
outputs are equal -> merge -> check the merged plain model gives the same logits.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import random
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import adaptkit as ak  # noqa: E402
from minibert import build_tokenizer, embed_texts, encode, load_minilm  # noqa: E402
from rt_data import load_rotten_tomatoes  # noqa: E402

TARGETS = r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"


class Classifier(nn.Module):
    """MiniLM sentence embedding (mean pooled, 384) -> linear head (2 classes)."""

    def __init__(self, encoder: nn.Module, hidden: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, 2)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(ids, mask))  # (B, 2)


def train_probe(xtr, ytr, epochs=300, lr=0.05, wd=1e-4) -> nn.Linear:
    """Logistic regression on frozen embeddings (full-batch AdamW on standardised features
    folded back into the layer)."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    lin = nn.Linear(xtr.shape[1], 2)
    opt = torch.optim.AdamW(lin.parameters(), lr=lr, weight_decay=wd)
    z, y = (xtr - mu) / sd, torch.tensor(ytr)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(lin(z), y).backward()
        opt.step()
    out = nn.Linear(xtr.shape[1], 2)
    with torch.no_grad():  # w ((x - mu) / sd) + b == (w / sd) x + (b - w mu / sd)
        out.weight.copy_(lin.weight / sd)
        out.bias.copy_(lin.bias - (lin.weight * mu / sd).sum(1))
    return out


@torch.no_grad()
def evaluate(model, tok, texts, labels, bs=128, desc="evaluate") -> tuple[float, torch.Tensor]:
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    logits = torch.empty(len(texts), 2)
    for s in tqdm(range(0, len(order), bs), desc=desc, unit="batch"):
        idx = order[s:s + bs]
        ids, mask = encode(tok, [texts[i] for i in idx])
        logits[idx] = model(ids, mask).float()
    return (logits.argmax(1) == torch.tensor(labels)).float().mean().item(), logits


def batches(texts, labels, bs, seed):
    """Length-bucketed shuffled batches: similar lengths share a batch, so padding is small."""
    rng = random.Random(seed)
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), rng.random()))
    chunks = [order[i:i + bs] for i in range(0, len(order), bs)]
    rng.shuffle(chunks)
    return chunks


def build(spec_kind: str, head: nn.Linear | None, hidden: int):
    enc, _ = load_minilm()
    model = Classifier(enc, hidden)
    if head is not None:
        model.head.load_state_dict(head.state_dict())
    if spec_kind == "qlora":
        spec = ak.QLoRA(rank=8, alpha=16, targets=r"encoder\." + TARGETS, modules_to_save=r"head",
                        compute_dtype="float32")
    else:
        spec = ak.LoRA(rank=8, alpha=16, targets=r"encoder\." + TARGETS, modules_to_save=r"head")
    return model, spec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small subset for CI (< 1 min)")
    ap.add_argument("--qlora", action="store_true", help="NF4 base weights + LoRA (QLoRA)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--out", help="adapter file (default runs/sentiment_<lora|qlora>.safetensors)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    kind = "qlora" if args.qlora else "lora"
    out = args.out or f"runs/sentiment_{kind}.safetensors"

    tr_x, tr_y, te_x, te_y = load_rotten_tomatoes()
    if args.quick:
        rng = random.Random(0)
        tr = rng.sample(range(len(tr_x)), 640)
        te = rng.sample(range(len(te_x)), 320)
        tr_x, tr_y = [tr_x[i] for i in tr], [tr_y[i] for i in tr]
        te_x, te_y = [te_x[i] for i in te], [te_y[i] for i in te]
    print(f"data: {len(tr_x)} train / {len(te_x)} test reviews (split by movie)")
    tok = build_tokenizer(max_len=64)

    # 1. baseline: linear probe on the frozen encoder
    enc, _ = load_minilm()
    t0 = time.time()
    xtr = embed_texts(enc, tok, tr_x, batch_size=128, desc="probe: embed train")
    xte = embed_texts(enc, tok, te_x, batch_size=128, desc="probe: embed test")
    probe = train_probe(xtr, tr_y)
    probe_acc = (probe(xte).argmax(1) == torch.tensor(te_y)).float().mean().item()
    print(f"linear probe (frozen encoder): accuracy {probe_acc:.4f}  ({time.time() - t0:.0f}s)")
    hidden = xtr.shape[1]
    del enc

    # 2. LoRA fine-tune
    model, spec = build(kind, probe, hidden)
    ak.inject(model, spec)
    s = ak.summary(model)
    print(f"{kind}: {s.per_adapter['default']['layers']} adapted layers, trainable params "
          f"{s.trainable:,} of {s.total:,} ({100 * s.trainable / s.total:.2f}%)")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=0.01)
    chunks = batches(tr_x, tr_y, args.batch, seed=0)
    steps = max(1, int(math.ceil(len(chunks) * args.epochs)))
    plan = (chunks * math.ceil(args.epochs))[:steps]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / (0.06 * steps)) * max(0.0, (steps - i) / steps))
    model.train()
    t0 = time.time()
    for idx in tqdm(plan, desc=f"{kind} train", unit="step"):
        ids, mask = encode(tok, [tr_x[i] for i in idx])
        loss = F.cross_entropy(model(ids, mask), torch.tensor([tr_y[i] for i in idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    sec_step = (time.time() - t0) / steps
    acc, logits = evaluate(model, tok, te_x, te_y, desc=f"{kind} evaluate")
    print(f"{kind} fine-tune: accuracy {acc:.4f} (probe {probe_acc:.4f}, {100 * (acc - probe_acc):+.1f} "
          f"points), {sec_step:.3f} s/step, {steps} steps")

    # 3. save -> load into a fresh model -> equal outputs -> merge -> equal outputs
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    ak.save(model, out)
    print(f"saved adapter: {out} ({os.path.getsize(out) / 1e6:.2f} MB)")
    fresh, _ = build(kind, None, hidden)
    base_keys = list(copy.deepcopy(fresh).state_dict())
    ak.load(fresh, out)
    _, logits_loaded = evaluate(fresh, tok, te_x, te_y, desc="loaded evaluate")
    load_diff = (logits_loaded - logits).abs().max().item()
    merged = ak.merge(fresh)
    _, logits_merged = evaluate(merged, tok, te_x, te_y, desc="merged evaluate")
    merge_diff = (logits_merged - logits).abs().max().item()
    plain = all(not isinstance(m, ak.layer.AdaptedLayer) for m in merged.modules())
    same_keys = list(merged.state_dict()) == base_keys  # QLoRA too: a dense nn.Linear again
    print(f"loaded adapter vs trained model: max |logit diff| {load_diff:.2e}")
    print(f"merged plain model vs adapted model: max |logit diff| {merge_diff:.2e}; "
          f"plain modules: {plain}; original state-dict keys: {same_keys}")
    tol = 1e-4 if kind == "lora" else 5e-3
    ok = load_diff == 0.0 and merge_diff < tol and plain and same_keys
    if not args.quick and acc < probe_acc + 0.03:
        print("FAILED: fine-tune did not beat the linear probe by 3 points")
        ok = False
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
