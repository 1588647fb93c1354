"""LoRA: numerics equal PEFT 0.21.2 (oracle) for Linear, Conv2d, Embedding and GPT-2 Conv1D,
with rsLoRA and rank / alpha patterns; inits; dropout; the PEFT weight layout mapping."""
import copy
import math

import pytest
import torch
import torch.nn as nn

import adaptkit as ak

peft = pytest.importorskip("peft")


def _gpt2_conv1d(nf, nx):
    from transformers.pytorch_utils import Conv1D
    m = Conv1D(nf, nx)
    nn.init.normal_(m.weight, std=0.1)
    nn.init.normal_(m.bias, std=0.1)
    return m


class Stack(nn.Module):
    def __init__(self, make, n=3):
        super().__init__()
        self.layers = nn.ModuleList([make() for _ in range(n)])

    def forward(self, x):
        return torch.stack([m(x) for m in self.layers]).sum(0)


CASES = {
    "linear": (lambda: nn.Linear(12, 10), lambda: torch.randn(4, 7, 12)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), lambda: torch.randn(2, 4, 9, 9)),
    "embedding": (lambda: nn.Embedding(20, 10, padding_idx=1), lambda: torch.randint(0, 20, (3, 6))),
    "gpt2_conv1d": (lambda: _gpt2_conv1d(10, 12), lambda: torch.randn(4, 7, 12)),
}


def _to_adaptkit(layer, key, t):
    """PEFT tensor -> adaptkit parameter layout: conv A (r, in, kh, kw) -> (r, in*kh*kw),
    conv B (out, r, 1, 1) -> (out, r); embedding A (r, V), B (d, r) already match."""
    return t.reshape(t.shape[0], -1)


@pytest.mark.parametrize("base", list(CASES))
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_equals_peft(base, rslora):
    make, mkx = CASES[base]
    torch.manual_seed(0)
    model = Stack(make)
    x = mkx()
    ref = copy.deepcopy(model)
    cfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=r"layers\.\d", use_rslora=rslora,
                          rank_pattern={r"layers\.1": 2}, alpha_pattern={r"layers\.2": 3},
                          init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(model), cfg)
    spec = ak.LoRA(rank=4, alpha=6, targets=r"layers\.\d", use_rslora=rslora,
                   rank_pattern={r"layers\.1": 2}, alpha_pattern={r"layers\.2": 3})
    ak.inject(model, spec)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            pl = pm.base_model.model.layers[i]
            emb = base == "embedding"
            A = pl.lora_embedding_A["default"] if emb else pl.lora_A["default"].weight
            B = pl.lora_embedding_B["default"] if emb else pl.lora_B["default"].weight
            torch.nn.init.normal_(A, std=0.3)
            torch.nn.init.normal_(B, std=0.3)
            ad = layer.adapters["default"]
            ad.lora_A.copy_(A.reshape(A.shape[0], -1))
            ad.lora_B.copy_(B.reshape(B.shape[0], -1))
            r = (4, 2, 4)[i]
            alpha = (6, 6, 3)[i]
            assert math.isclose(ad.scale, alpha / (math.sqrt(r) if rslora else r))
            assert math.isclose(ad.scale, pl.scaling["default"])
    model.eval(), pm.eval()
    torch.testing.assert_close(model(x), pm(x), atol=1e-5, rtol=1e-5)
    merged = ak.merge(model)
    pmerged = pm.merge_and_unload()
    for (k, a), (k2, b) in zip(merged.state_dict().items(), pmerged.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert [type(m) for m in merged.modules()] == [type(m) for m in ref.modules()]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_inits_equal_peft_and_keep_output(init):
    torch.manual_seed(1)
    model = Stack(lambda: nn.Linear(16, 12), n=2)
    x = torch.randn(5, 16)
    y0 = model(x)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=r"layers\.\d", init_lora_weights=init))
    ak.inject(model, ak.LoRA(rank=4, alpha=8, targets=r"layers\.\d", init=init))
    torch.testing.assert_close(model(x), y0, atol=1e-5, rtol=1e-5)
    for i, layer in enumerate(model.layers):
        pl = pm.base_model.model.layers[i]
        a = layer.adapters["default"]
        # SVD / QR signs are deterministic for the same input on the same machine
        torch.testing.assert_close(a.lora_A, pl.lora_A["default"].weight, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.lora_B, pl.lora_B["default"].weight, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.weight, pl.base_layer.weight, atol=1e-5, rtol=1e-4)


def test_default_and_gaussian_init_statistics():
    lin = Stack(lambda: nn.Linear(400, 300), n=1)
    ak.inject(lin, ak.LoRA(rank=64, targets=r"layers\.0"))
    a = lin.layers[0].adapters["default"]
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=sqrt(5)) on (r, in)
    assert a.lora_A.abs().max() <= bound and a.lora_A.abs().max() > 0.95 * bound
    assert torch.count_nonzero(a.lora_B) == 0
    g = Stack(lambda: nn.Linear(400, 300), n=1)
    ak.inject(g, ak.LoRA(rank=64, targets=r"layers\.0", init="gaussian"))
    std = g.layers[0].adapters["default"].lora_A.std().item()
    assert abs(std - 1 / 64) < 0.1 / 64
    e = Stack(lambda: nn.Embedding(50, 8), n=1)
    ak.inject(e, ak.LoRA(rank=4, targets=r"layers\.0"))
    ea = e.layers[0].adapters["default"]
    assert torch.count_nonzero(ea.lora_A) == 0 and ea.lora_B.std() > 0.5


def test_dropout_acts_on_adapter_input_in_training_only():
    torch.manual_seed(0)
    m = Stack(lambda: nn.Linear(32, 32), n=1)
    ak.inject(m, ak.LoRA(rank=4, dropout=0.5, targets=r"layers\.0"))
    nn.init.normal_(m.layers[0].adapters["default"].lora_B)
    x = torch.randn(8, 32)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    assert not torch.equal(m(x), m(x))
    with ak.disabled(m):  # base path has no dropout
        assert torch.equal(m(x), m(x))


def test_conv_geometry_dilation_and_padding_mode_match_dense():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 3), padding_mode="replicate")
    m = Stack(lambda: copy.deepcopy(conv), n=1)
    ak.inject(m, ak.LoRA(rank=2, alpha=3, targets=r"layers\.0"))
    layer = m.layers[0]
    nn.init.normal_(layer.adapters["default"].lora_B)
    x = torch.randn(2, 3, 10, 11)
    want = layer.base_op(x, layer.dense_weight(["default"]), layer.bias)
    torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
