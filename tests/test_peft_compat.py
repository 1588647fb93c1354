"""ak.peft_compat against real PEFT 0.21.2: folders saved by PEFT load into adaptkit with the
same outputs, and folders adaptkit writes load in PEFT with the same outputs (LoRA on
Linear / Conv2d / Embedding / GPT-2 Conv1D, rsLoRA, PEFT's pattern rules, modules_to_save,
biases; DoRA; LoKr; QLoRA / QDoRA written as LoRA / DoRA), plus an error for everything PEFT does that adaptkit cannot express. Each method declares its
own PEFT form: a toy method round-trips with nothing but its declaration."""
import copy
import json
import os
import re

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import adaptkit as ak
from conftest import randomise_adapters
from adaptkit.layer import adapted_layers
from adaptkit.peft_compat import read_peft, write_peft

peft = pytest.importorskip("peft")
Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Net(nn.Module):
    """Every PEFT-supported base kind; PEFT-style names (blocks.N.q / .v, a root-level head)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 12, padding_idx=0)
        self.blocks = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(12, 12), "v": nn.Linear(12, 12)})
                                    for _ in range(3))
        self.c_fc = Conv1D(16, 12)  # GPT-2 style: weight (in, out)
        self.proj = nn.Linear(16, 12)
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.head = nn.Linear(12, 4)
        for p in self.parameters():  # non-trivial biases and weights
            nn.init.normal_(p, std=0.2)

    def forward(self, ids, img):
        h = self.emb(ids)
        for b in self.blocks:
            h = h + b["q"](h) * torch.tanh(b["v"](h))
        h = self.proj(torch.relu(self.c_fc(h)))
        return self.head(h).flatten(1), self.conv(img).flatten(1)


INPUTS = (torch.randint(0, 30, (2, 5)), torch.randn(2, 3, 8, 8))


def _out(m):
    m.eval()
    with torch.no_grad():
        return torch.cat(m(*INPUTS), 1)


def _assert_close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _peft_folder(tmp_path, base, cfg):
    """Save ``get_peft_model(base, cfg)`` (non-zero adapter and modules_to_save weights)."""
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for p in pm.parameters():  # DoRA magnitudes too: they must load, not be recomputed
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(tmp_path / "peft")
    return pm, tmp_path / "peft"


LORA_CASES = {
    "linear": dict(target_modules=["q", "v"]),
    "conv2d": dict(target_modules=["conv"]),
    "embedding": dict(target_modules=["emb"]),
    "gpt2_conv1d": dict(target_modules=["c_fc"]),
    "rslora_patterns": dict(  # PEFT's suffix / re.match rules differ from adaptkit's fullmatch
        target_modules=["q", "v", "proj", "c_fc"], use_rslora=True, lora_alpha=6,
        rank_pattern={"q": 2, "blocks.2.v": 3}, alpha_pattern={r"\d\.v": 5}),
    "regex_layers_saved_bias": dict(target_modules=r"blocks\.[02]\.q|proj", bias="lora_only",
                                    modules_to_save=["head"]),
    "layers_to_transform_bias_all": dict(target_modules=["q"], layers_to_transform=[1, 2],
                                         layers_pattern="blocks", bias="all"),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_folder_from_peft_loads_with_same_outputs(tmp_path, case):
    base = Net()
    kw = dict(r=4, lora_alpha=8, init_lora_weights=False) | LORA_CASES[case]
    pm, folder = _peft_folder(tmp_path, base, peft.LoraConfig(**kw))
    model = copy.deepcopy(base)
    paths = read_peft(model, folder)
    pmods = {n for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert set(paths) == pmods
    _assert_close(_out(model), _out(pm))
    # and back: adaptkit's PEFT export loads in PEFT to the same outputs
    write_peft(model, tmp_path / "back")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back")
    _assert_close(_out(back), _out(pm))


ADAPTKIT_SPECS = {
    "lora_all_kinds": ak.LoRA(rank=3, alpha=5, targets=r"emb|blocks\.\d\.(q|v)|c_fc|conv",
                              rank_pattern={r"blocks\.1\..*": 2}, alpha_pattern={"conv": 2.5}),
    "lora_rslora_saved_bias": ak.LoRA(rank=4, alpha=None, use_rslora=True, targets=r".*\.q",
                                      modules_to_save="head", bias="all"),
    "dora": ak.DoRA(rank=3, alpha=6, targets=r"blocks\.\d\.v|c_fc|conv|proj", bias="adapter_only"),
    "lokr": ak.LoKr(rank=2, alpha=3, targets=r"blocks\.\d\.q|proj|conv", init="random"),
    "lokr_decomposed": ak.LoKr(rank=1, alpha=2, targets=r"proj|conv", decompose_both=True,
                               use_effective_conv2d=True, decompose_factor=2, init="random"),
}


@pytest.mark.parametrize("case", list(ADAPTKIT_SPECS))
def test_adaptkit_adapter_exports_to_peft_with_same_outputs(tmp_path, case):
    base = Net()
    model = copy.deepcopy(base)
    ak.inject(model, ADAPTKIT_SPECS[case])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    write_peft(model, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == ("LOKR" if case.startswith("lokr") else "LORA")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p")
    _assert_close(_out(pm), _out(model))
    again = copy.deepcopy(base)  # and it reads back bit-exactly
    read_peft(again, tmp_path / "p")
    assert torch.equal(_out(again), _out(model))


@pytest.mark.parametrize("kw", [
    dict(use_dora=True, target_modules=["q", "c_fc", "conv"]),
    dict(use_dora=True, use_rslora=True, target_modules=r"blocks\.\d\.v|proj"),
], ids=["dora", "dora_rslora"])
def test_dora_folder_from_peft(tmp_path, kw):
    base = Net()
    pm, folder = _peft_folder(tmp_path, base, peft.LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, **kw))
    model = copy.deepcopy(base)
    read_peft(model, folder)
    assert ak.summary(model).per_adapter["default"]["method"] == "dora"
    _assert_close(_out(model), _out(pm))


@pytest.mark.parametrize("kw", [
    dict(target_modules=["q", "v", "proj", "conv"]),
    dict(target_modules=["proj", "conv"], decompose_both=True, r=1, use_effective_conv2d=True),
    dict(target_modules=["q", "proj"], decompose_factor=4, rank_pattern={"proj": 2}, alpha_pattern={"q": 2}),
], ids=["full", "decomposed_tucker", "factor_patterns"])
def test_lokr_folder_from_peft(tmp_path, kw):
    base = Net()
    kw = dict(r=4, alpha=6, init_weights=False) | kw
    pm, folder = _peft_folder(tmp_path, base, peft.LoKrConfig(**kw))
    model = copy.deepcopy(base)
    read_peft(model, folder, name="lk")
    _assert_close(_out(model), _out(pm))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_init_adapters_rebuild_the_residual_as_peft_does(tmp_path, init):
    base = Net()
    pm, folder = _peft_folder(tmp_path, base, peft.LoraConfig(r=2, target_modules=["q"], init_lora_weights=init))
    model = copy.deepcopy(base)
    read_peft(model, folder)
    _assert_close(_out(model), _out(peft.PeftModel.from_pretrained(copy.deepcopy(base), folder)))


def _edit(folder, **changes):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, needle", [
    (dict(lora_bias=True), "lora_bias"),
    (dict(layer_replication=[[0, 2]]), "layer_replication"),
    (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4}), "loftq"),
    (dict(init_lora_weights="pissa_niter_4"), "pissa_niter_4"),
    (dict(trainable_token_indices=[1, 2]), "trainable_token_indices"),
    (dict(some_future_option={"x": 1}), "some_future_option"),
    (dict(peft_type="LOHA"), "LOHA"),
    (dict(use_dora=True), "DoRA cannot adapt 'emb'"),
    (dict(target_modules=["q", "v"]), "target_modules select ["),  # config selects more than the file
    (dict(rank_pattern={"q": 2}), "file (4, 12) vs config (2, 12) at r=2"),
], ids=["lora_bias", "layer_replication", "loftq", "pissa_niter", "trainable_tokens",
        "unknown_option", "other_method", "dora_embedding", "targets_vs_file", "rank"])
def test_inexpressible_or_inconsistent_config_is_an_error_and_changes_nothing(tmp_path, changes, needle):
    base = Net()
    _, folder = _peft_folder(tmp_path, base, peft.LoraConfig(r=4, target_modules=["q", "emb"],
                                                             init_lora_weights=False))
    _edit(folder, **changes)
    model = copy.deepcopy(base)
    with pytest.raises(ak.AdaptkitError, match=re.escape(needle)):
        read_peft(model, folder)
    assert "_adaptkit" not in model.__dict__
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    assert torch.equal(_out(model), _out(base))


def test_folder_errors(tmp_path):
    model = Net()
    with pytest.raises(ak.AdaptkitError, match="not a folder"):
        read_peft(model, tmp_path / "nope")
    _, folder = _peft_folder(tmp_path, model, peft.LoraConfig(r=2, target_modules=["q"]))
    os.rename(folder / "adapter_model.safetensors", folder / "adapter_model.bin")
    with pytest.raises(ak.AdaptkitError, match="pickle"):
        read_peft(model, folder)
    (folder / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ak.AdaptkitError, match="not a readable safetensors"):
        read_peft(model, folder)
    sub = tmp_path / "multi" / "other"
    sub.mkdir(parents=True)
    (sub / "adapter_config.json").write_text("{}")
    with pytest.raises(ak.AdaptkitError, match=r"sub-folders: \['other'\]"):
        read_peft(model, tmp_path / "multi")
    assert "_adaptkit" not in model.__dict__


@pytest.mark.parametrize("make, spec, needle", [
    (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), ak.LoRA(rank=2, targets="0"), "groups=2"),
    (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, dilation=2)), ak.LoRA(rank=2, targets="0"), "dilation"),
    (lambda: nn.Sequential(nn.Conv1d(4, 4, 3)), ak.LoKr(rank=2, targets="0"), "Conv1d kron differs"),
    (lambda: nn.Sequential(nn.Linear(4, 4)), ak.LoKr(rank=2, targets="0", scale_mode="lycoris"), "scale_mode"),
    (lambda: nn.Sequential(nn.Linear(4, 4)), ak.LoRA(rank=2, targets="0"), None),
], ids=["grouped_conv", "dilated_conv", "lokr_conv1d", "lokr_lycoris_scale", "ok"])
def test_write_refuses_what_peft_computes_differently(tmp_path, make, spec, needle):
    model = make()
    ak.inject(model, spec)
    if needle is None:
        write_peft(model, tmp_path / "ok")
        assert (tmp_path / "ok" / "adapter_model.safetensors").exists()
        return
    with pytest.raises(ak.AdaptkitError, match=needle):
        write_peft(model, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_write_refuses_modules_to_save_that_peft_would_match_twice(tmp_path):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.head, self.lm_head = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(4, 2)

    model = Two()
    ak.inject(model, ak.LoRA(rank=2, targets="q", modules_to_save="head"))
    with pytest.raises(ak.AdaptkitError, match=r"modules_to_save 'head' would also select \['lm_head'\]"):
        write_peft(model, tmp_path / "p")
    with pytest.raises(ak.AdaptkitError, match="no adapter named 'x'"):
        write_peft(model, tmp_path / "p", name="x")


# ---- interop is declared per method (methods/*.py), generic over the registry ---------------
def test_methods_declare_their_peft_forms(tmp_path):
    from adaptkit.peft_config import forms
    assert {m: f.peft_type for m, f in forms().items()} == {
        "lora": "LORA", "dora": "LORA", "lokr": "LOKR", "qlora": "LORA", "trainable_tokens": "TRAINABLE_TOKENS"}
    model = Net()
    ak.inject(model, ak.MoRA(rank=2, targets=r"blocks\.0\.q"))
    with pytest.raises(ak.AdaptkitError, match=r"'mora' has no PEFT form; PEFT interop covers dora, lokr, lora, qlora, trainable_tokens"):
        write_peft(model, tmp_path / "p")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("dora", [False, True], ids=["qlora", "qdora"])
def test_qlora_writes_the_lora_folder_it_carries(tmp_path, dora):
    """PEFT's QLoRA is a LoraConfig on a 4-bit base: PEFT on the dequantised NF4 weights gives
    adaptkit's outputs. Reading it back gives LoRA / DoRA (the config does not say 4-bit)."""
    from conftest import randomise_adapters
    base = Net()
    model = copy.deepcopy(base)
    ak.inject(model, ak.QLoRA(rank=4, alpha=6, targets=r"blocks\.\d\.(q|v)|proj", use_dora=dora,
                              bias="adapter_only"))
    randomise_adapters(model, 0.1, seed=0)
    write_peft(model, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is dora
    deq = copy.deepcopy(base)
    with torch.no_grad():
        for p, layer in adapted_layers(model):
            deq.get_submodule(p).weight.copy_(layer.dense_weight())
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(deq), tmp_path / "p")
    _assert_close(_out(pm), _out(model))
    again = copy.deepcopy(deq)
    read_peft(again, tmp_path / "p")
    assert ak.summary(again).per_adapter["default"]["method"] == ("dora" if dora else "lora")
    _assert_close(_out(again), _out(model))


def test_a_new_method_brings_its_own_peft_form(tmp_path, monkeypatch):
    """A method's PEFT interop is its own declaration: a toy method registered here, with its
    peft_type, config field, tensor names and layer inference, round-trips through write_peft /
    read_peft and the command line without any change to peft_compat, peft_config or cli."""
    import dataclasses
    from adaptkit.cli import main
    from adaptkit.peft_config import PeftForm
    from adaptkit.spec import METHODS

    @dataclasses.dataclass(frozen=True)
    class Toy(ak.LoRA):
        method = "toy"

    class ToyPeft(PeftForm):
        peft_type, prefix, options = "TOY", "toy_", frozenset({"toy_alpha"})
        names = {"lora_A": "toy_down", "lora_B": "toy_up"}

        def spec_kwargs(self, cfg):
            return dict(rank=cfg["r"], alpha=cfg["toy_alpha"])

        def config(self, spec, layers):
            return {"toy_alpha": self.alpha0(spec)}

        def layout(self, kind, wshape, key, shape):
            return self.names[key], tuple(shape)

        def infer_layer(self, tensors, cfg, path):
            return "linear", (tensors["toy_up"].shape[0], tensors["toy_down"].shape[1])

    Toy.peft_form = ToyPeft()
    monkeypatch.setitem(METHODS, "toy", Toy)
    base = Net()
    model = copy.deepcopy(base)
    ak.inject(model, Toy(rank=3, alpha=5, targets=r"blocks\.\d\.q|proj", rank_pattern={"proj": 2}))
    randomise_adapters(model, 0.1, add=True)
    write_peft(model, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "TOY" and cfg["toy_alpha"] == 5 and cfg["rank_pattern"] == {"proj": 2}
    keys = set(load_file(str(tmp_path / "p" / "adapter_model.safetensors")))
    assert "base_model.model.proj.toy_up" in keys and not any("lora" in k for k in keys)
    again = copy.deepcopy(base)
    read_peft(again, tmp_path / "p")
    assert ak.summary(again).per_adapter["default"]["method"] == "toy"
    assert torch.equal(_out(again), _out(model))
    assert main(["convert", str(tmp_path / "p"), "-o", str(tmp_path / "t.safetensors")]) == 0
    fresh = copy.deepcopy(base)
    ak.load(fresh, tmp_path / "t.safetensors")
    assert torch.equal(_out(fresh), _out(model))
