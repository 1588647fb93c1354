"""ak.param_groups (LoRA+, arXiv 2402.12354): every trainable parameter in exactly one group,
B-like parameters at lr * ratio (lora_B; mpo_A of LoRAMPO mode "lora"), the rest at lr,
vectors without weight decay, frozen / inactive parameters left out, errors for bad values
and for methods LoRA+ does not apply to; cross-checked against PEFT's
create_loraplus_optimizer."""
import math

import pytest
import torch
import torch.nn as nn

import adaptkit as ak
from conftest import Conv1D


class Net(nn.Module):
    def __init__(self, conv1d=Conv1D):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.q = nn.Linear(12, 12)
        self.v = nn.Linear(12, 12)
        self.c_fc = conv1d(16, 12)  # GPT-2 style: weight (in, out)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, ids):
        h = self.emb(ids)
        h = self.q(h) + torch.tanh(self.v(h))
        return self.head(self.norm(torch.relu(self.c_fc(h)))).mean(1)


IDS = torch.randint(0, 20, (4, 5))


def _by_name(model, groups):
    """{param name: (group name, lr, weight_decay)}; asserts each param appears once."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            assert n not in out, f"{n} in two groups"
            out[n] = (g["name"], g["lr"], g["weight_decay"])
    return out


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_groups_cover_trainable_params_once_with_ratios():
    m = Net()
    ak.inject(m, ak.LoRA(rank=2, targets=["q", "v", "c_fc", "emb"], bias="all",
                         modules_to_save="norm"))
    groups = ak.param_groups(m, lr=1e-3, ratio=16, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["A", "B", "no_decay"]
    got = _by_name(m, groups)
    assert set(got) == _trainable(m)  # every trainable parameter, no frozen one
    for n, (g, lr, wd) in got.items():
        if n.endswith("lora_B"):
            assert (g, lr, wd) == ("B", 1e-3 * 16, 0.1), n
        elif n.endswith("lora_A"):
            assert (g, lr, wd) == ("A", 1e-3, 0.1), n
        else:  # biases and the LayerNorm of modules_to_save: vectors, no decay
            assert m.get_parameter(n).dim() == 1 and (g, lr, wd) == ("no_decay", 1e-3, 0.0), n
    assert sum(n.endswith("lora_B") for n in got) == 4
    assert not any(n in got for n in ("q.weight", "head.weight", "emb.weight"))


def test_sgd_step_scales_b_by_ratio():
    """With plain SGD a step moves B by lr * ratio * grad and A by lr * grad."""
    m = Net()
    ak.inject(m, ak.LoRA(rank=2, targets=["q", "v"]))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_()
    opt = torch.optim.SGD(ak.param_groups(m, lr=0.01, ratio=8))
    m(IDS).pow(2).sum().backward()
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in m.named_parameters() if p.requires_grad}
    opt.step()
    for n, p in m.named_parameters():
        if n in before:
            w, g = before[n]
            lr = 0.08 if n.endswith("lora_B") else 0.01
            torch.testing.assert_close(p.detach(), w - lr * g, atol=1e-7, rtol=0)


def test_inactive_and_frozen_excluded():
    m = Net()
    ak.inject(m, ak.LoRA(rank=2, targets=["q"]), name="a")
    ak.inject(m, ak.LoRA(rank=2, targets=["v"]), name="b")
    ak.set_active(m, ["b"])
    got = _by_name(m, ak.param_groups(m, lr=1e-3))
    assert set(got) == {"v.adapters.b.lora_A", "v.adapters.b.lora_B"}


def test_dora_magnitude_and_mixed_methods():
    m = Net()
    ak.inject(m, ak.DoRA(rank=2, targets=["q"]), name="d")
    ak.inject(m, ak.LoKr(rank=2, targets=["v"]), name="k")
    ak.inject(m, ak.MoRA(rank=2, targets=["c_fc"]), name="m")
    got = _by_name(m, ak.param_groups(m, lr=1e-3, ratio=4, weight_decay=0.01))
    assert set(got) == _trainable(m)
    assert got["q.adapters.d.lora_B"] == ("B", 4e-3, 0.01)
    assert got["q.adapters.d.lora_magnitude"] == ("no_decay", 1e-3, 0.0)
    assert {g for n, g in got.items() if ".k." in n or ".m." in n} == {("A", 1e-3, 0.01)}


def test_lorampo_lora_mode_is_lora_shaped():
    m = Net()
    ak.inject(m, ak.LoRAMPO(rank=2, mode="lora", targets=["q"]))
    got = _by_name(m, ak.param_groups(m, lr=1e-3, ratio=16))
    assert got["q.adapters.default.mpo_A"][:2] == ("B", 16e-3)  # (out, 1, r): LoRA's B
    assert got["q.adapters.default.mpo_B"][:2] == ("A", 1e-3)


@pytest.mark.parametrize("spec", [ak.LoKr(rank=2, targets=["q"]), ak.MoRA(rank=2, targets=["q"]),
                                  ak.LoRAMPO(rank=2, targets=["q"])])
def test_methods_without_b_are_refused(spec):
    m = Net()
    ak.inject(m, spec)
    with pytest.raises(ak.AdaptkitError, match=f"no trainable LoRA\\+ 'B'.*{spec.method}"):
        ak.param_groups(m, lr=1e-3)


def test_geolora_is_refused_unless_inactive():
    m = Net()
    ak.inject(m, ak.GeoLoRA(rank=2, targets=["q"]), name="g")
    with pytest.raises(ak.AdaptkitError, match=r"GeoLoRA.*'q'.*GeoLoRAOptimizer"):
        ak.param_groups(m, lr=1e-3)
    ak.inject(m, ak.LoRA(rank=2, targets=["v"]), name="l")
    ak.set_active(m, ["l"])
    assert set(_by_name(m, ak.param_groups(m, lr=1e-3))) == {"v.adapters.l.lora_A", "v.adapters.l.lora_B"}


def test_embedding_lr():
    m = Net()
    ak.inject(m, ak.LoRA(rank=2, targets=["emb", "q"]))
    got = _by_name(m, ak.param_groups(m, lr=1e-3, embedding_lr=1e-6))
    assert got["emb.adapters.default.lora_A"][:2] == got["emb.adapters.default.lora_B"][:2] == ("embedding", 1e-6)
    assert got["q.adapters.default.lora_B"][:2] == ("B", 16e-3)
    got = _by_name(m, ak.param_groups(m, lr=1e-3))  # default: the embedding's B is a B
    assert got["emb.adapters.default.lora_B"][:2] == ("B", 16e-3)


@pytest.mark.parametrize("kw,field", [
    (dict(lr=0), "lr"), (dict(lr=-1e-3), "lr"), (dict(lr=math.nan), "lr"), (dict(lr=True), "lr"),
    (dict(lr="1e-3"), "lr"), (dict(lr=1e-3, ratio=0.5), "ratio"), (dict(lr=1e-3, ratio=math.inf), "ratio"),
    (dict(lr=1e-3, ratio=-16), "ratio"), (dict(lr=1e-3, weight_decay=-0.1), "weight_decay"),
    (dict(lr=1e-3, embedding_lr=0.0), "embedding_lr"),
])
def test_bad_values(kw, field):
    m = Net()
    ak.inject(m, ak.LoRA(rank=2, targets=["q"]))
    with pytest.raises(ak.AdaptkitError, match=f"param_groups: {field}="):
        ak.param_groups(m, **kw)


def test_nothing_trainable_and_not_a_model():
    m = Net()
    for p in m.parameters():
        p.requires_grad_(False)
    with pytest.raises(ak.AdaptkitError, match="no trainable parameter"):
        ak.param_groups(m, lr=1e-3)
    with pytest.raises(ak.AdaptkitError, match="not model.parameters"):
        ak.param_groups(m.parameters(), lr=1e-3)


def test_trains_a_tiny_llama():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2))
    ak.inject(m, ak.LoRA(rank=4, alpha=8, targets="all-linear"))
    opt = torch.optim.AdamW(ak.param_groups(m, lr=2e-3, ratio=16))
    ids = torch.randint(0, 64, (2, 8))
    losses = []
    for _ in range(5):
        lo = m(input_ids=ids, labels=ids).loss
        lo.backward()
        opt.step()
        opt.zero_grad()
        losses.append(lo.item())
    assert losses[-1] < losses[0]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_matches_peft_loraplus(method):
    """The same model in PEFT and adaptkit: every LoRA A / B (Linear, GPT-2 Conv1D) gets the
    same lr and weight decay; embedding adapters agree with embedding_lr=PEFT's default
    1e-6. Documented difference: PEFT puts 1-D parameters (DoRA's magnitude) at lr * ratio."""
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D  # PEFT wants the real one
    torch.manual_seed(0)
    base = Net(conv1d)
    targets = ["q", "v", "c_fc", "emb"]
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, use_dora=method == "dora")
    pm = peft.get_peft_model(Net(conv1d), cfg)
    if method == "dora":
        targets = targets[:3]  # adaptkit's DoRA does not adapt Embedding (PEFT's does)
    ak.inject(base, (ak.DoRA if method == "dora" else ak.LoRA)(rank=2, alpha=4, targets=targets))
    opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                    loraplus_weight_decay=0.05)
    names = {id(p): n for n, p in pm.named_parameters()}
    peft_lr = {}
    for g in opt.param_groups:
        for p in g["params"]:
            n = names[id(p)].removeprefix("base_model.model.")
            # PEFT: q.lora_A.default.weight / emb.lora_embedding_A.default /
            # q.lora_magnitude_vector.default.weight -> adaptkit: q.adapters.default.lora_A ...
            path, rest = n.split(".", 1)
            key = rest.split(".")[0].replace("lora_embedding_", "lora_").replace("_vector", "")
            peft_lr[f"{path}.adapters.default.{key}"] = (g["lr"], g["weight_decay"])
    ours = {n: (lr, wd) for n, (_, lr, wd) in
            _by_name(base, ak.param_groups(base, lr=1e-3, ratio=16, weight_decay=0.05,
                                           embedding_lr=1e-6)).items()}
    assert set(ours) <= set(peft_lr)
    for n, v in ours.items():
        if n.endswith("lora_magnitude"):
            assert peft_lr[n] == (16e-3, 0.05) and v == (1e-3, 0.0), n
        else:
            assert v == peft_lr[n], n
    assert sum(n.endswith("lora_B") for n in ours) == len(targets)
