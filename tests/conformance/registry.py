"""One line per method: how the conformance suite builds its spec, which base kinds the
method adapts, and its fp32 / bf16 tolerances. A method missing here fails the suite."""
import adaptkit as ak

TARGET = r"blocks\.0\.proj"

# method -> (spec factory, supported kinds, (fp32 atol, bf16 atol)[, quantize]); ``quantize(model)``
# for methods whose inject quantises the base: it quantises a reference model the same way
CASES = {
    "dora": (lambda **kw: ak.DoRA(rank=3, alpha=5.0, targets=TARGET, **kw),
             {"linear", "conv1d_t", "conv"}, (2e-5, 3e-2)),
    "geolora": (lambda **kw: ak.GeoLoRA(rank=3, max_rank=7, alpha=5.0, targets=TARGET, **kw),
                {"linear", "conv1d_t"}, (2e-5, 3e-2)),
    "lokr": (lambda **kw: ak.LoKr(rank=1, alpha=5.0, decompose_both=True, use_effective_conv2d=True,
                                  targets=TARGET, **kw), {"linear", "conv1d_t", "conv"}, (2e-5, 3e-2)),
    "lora": (lambda **kw: ak.LoRA(rank=3, alpha=5.0, targets=TARGET, **kw),
             {"linear", "conv1d_t", "conv", "embedding"}, (2e-5, 3e-2)),
    "lorampo": (lambda **kw: ak.LoRAMPO(rank=3, alpha=5.0, targets=TARGET, **kw),
                {"linear", "conv1d_t"}, (2e-5, 3e-2)),
    "mora": (lambda **kw: ak.MoRA(rank=3, mora_type=6, targets=TARGET, **kw),
             {"linear", "conv1d_t"}, (2e-5, 3e-2)),
    "qlora": (lambda **kw: ak.QLoRA(rank=3, alpha=5.0, targets=TARGET, **kw), {"linear"}, (2e-5, 3e-2),
              lambda model: ak.nf4.quantize(model, targets=TARGET)),
    # ids 3 and 29 (the last row) appear in the inputs; 0 is the base's padding_idx
    "trainable_tokens": (lambda **kw: ak.TrainableTokens(token_ids=[29, 3, 11, 17], targets=TARGET, **kw),
                         {"embedding"}, (2e-5, 3e-2)),
    # variants ("method/variant": the same invariants for a non-default configuration)
    "qlora/qdora": (lambda **kw: ak.QLoRA(rank=3, alpha=5.0, targets=TARGET, use_dora=True, **kw),
                    {"linear"}, (2e-5, 3e-2), lambda model: ak.nf4.quantize(model, targets=TARGET)),
}
