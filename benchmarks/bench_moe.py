"""MoE benchmark: LoRA on attention and on the expert stacks (``target_parameters``), adaptkit
side by side with PEFT 0.21's ``LoraConfig(target_parameters=...)`` and the frozen base.

    python benchmarks/bench_moe.py [--quick] [--threads 1] [--json PATH] [--no-peft]
                                   [--batch 4] [--seq 256] [--experts-impl grouped_mm]
                                   [--warmup N] [--repeats N]

Model: ``transformers.MixtralForCausalLM`` with random weights (hidden 512, 8 experts, top-2,
4 layers, intermediate 1024, 8 heads, vocab 1024), fp32, batch 4 x seq 256, causal LM loss.
Experts are transformers 5.x 3-D Parameters (``experts.gate_up_proj`` (8, 2048, 512),
``experts.down_proj`` (8, 512, 1024)) run by the model's default experts implementation
("grouped_mm"). Adapters: rank 16, alpha 32, on q/k/v/o_proj and on both expert stacks; PEFT
gets the same weights.

As in bench_model.py, a forward hook makes the embeddings' output require grad in every
variant, so the frozen base's train step is its forward plus the backward through all
activations (input gradients only): the reference an adapter's step is measured against.
All variants run interleaved (rotated order each round); medians. ``train`` = zero_grad +
forward + backward + AdamW; peak MiB = the train step's high-water mark of live tensor bytes
(resident + dynamic, see _common.py). Also printed: the train GFLOP (FlopCounterMode) and
adaptkit vs PEFT logits with the same weights.

Targets (fp32, 1 thread): train adaptkit/base <= 1.15, adaptkit/peft < 1.0, peak memory
adaptkit <= PEFT.
"""

from __future__ import annotations

import copy
import importlib.util
import tempfile

import torch

import _common as C


def build(args):
    import transformers

    cfg = transformers.MixtralConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
    )  # fmt: skip
    if args.experts_impl:
        cfg._experts_implementation = args.experts_impl
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).train()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def require_input_grads(model) -> None:
    def hook(_m, _a, out):
        out.requires_grad_(True)

    model.get_input_embeddings().register_forward_hook(hook)


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0], json_default="runs/bench_moe[_quick].json")
    C.add_rounds(p)
    C.add_no_peft(p)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--experts-impl", default=None, help="transformers experts implementation (default: the model's)")
    args = p.parse_args()
    C.start(args)
    if importlib.util.find_spec("transformers") is None:
        raise SystemExit("bench_moe needs transformers (5.x: experts as 3-D Parameters)")
    peft = C.load_peft(args.no_peft)
    warmup, repeats = C.rounds(args, (1, 3), (2, 7))
    batch, seq = (2, 64) if args.quick else (args.batch, args.seq)

    base = build(args)
    ours = copy.deepcopy(base)
    ak = C.ak
    ak.inject(
        ours,
        ak.LoRA(rank=16, alpha=32, targets=r".*\.(q|k|v|o)_proj", target_parameters=r".*\.experts\.(gate_up|down)_proj"),
    )
    C.nontrivial(ours)  # non-zero B: the same work as a trained adapter
    variants = {"base": base, "adaptkit": ours}
    if peft is not None:
        with tempfile.TemporaryDirectory() as folder:
            ak.peft_compat.write_peft(ours, folder)  # the same weights, PEFT's layout
            pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder, is_trainable=True).train()
        variants["peft"] = pm
    for m in variants.values():
        require_input_grads(m)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1024, (batch, seq), generator=g)

    def forward(m):
        return m(input_ids=ids, labels=ids).loss

    modes, opts, steps = C.mode_cases(variants, forward, lambda loss: loss.backward())
    print(
        f"Mixtral-style MoE (hidden 512, 8 experts top-2, 4 layers), batch {batch} x seq {seq}, fp32, "
        f"{torch.get_num_threads()} thread(s), experts '{base.config._experts_implementation}', "
        f"warmup {warmup}, repeats {repeats} (interleaved)"
    )
    res = C.time_modes(modes, ["fwd", "train"], warmup, repeats)
    costs = C.step_costs(variants, opts, steps, ())
    check = {}
    if "peft" in variants:
        with torch.no_grad():
            a, b = ours(input_ids=ids).logits, variants["peft"](input_ids=ids).logits
        check["adaptkit_vs_peft_max_abs"] = (a - b).abs().max().item()
    rows = [
        [n, r["fwd"]["median_ms"], r["train"]["median_ms"], costs[n]["train_peak_mib"], costs[n]["train_gflop"],
         costs[n]["trainable_params"]]
        for n, r in res.items()
    ]  # fmt: skip
    C.print_table(
        "median ms; peak MiB of a train step",
        ["variant", "fwd ms", "train ms", "peak MiB", "train GFLOP", "trainable"],
        rows,
    )
    ratios = {
        "train adaptkit/base": C.ratio(C.med(res["adaptkit"], "train"), C.med(res["base"], "train")),
        "train GFLOP adaptkit/base": costs["adaptkit"]["train_gflop"] / costs["base"]["train_gflop"],
    }
    if "peft" in variants:
        ratios |= {
            "train peft/base": C.ratio(C.med(res["peft"], "train"), C.med(res["base"], "train")),
            "train adaptkit/peft": C.ratio(C.med(res["adaptkit"], "train"), C.med(res["peft"], "train")),
            "peak MiB adaptkit/peft": costs["adaptkit"]["train_peak_mib"] / costs["peft"]["train_peak_mib"],
        }
    for k, v in ratios.items():
        print(f"{k:28s} {v:.3f}")
    for k, v in check.items():
        print(f"{k:28s} {v:.2e}")
    path = C.json_path(args, "bench_moe")
    C.write_json(path, {"env": C.env_info(batch=batch, seq=seq), "results": res, "costs": costs,
                        "ratios": ratios, "checks": check})  # fmt: skip


if __name__ == "__main__":
    main()
