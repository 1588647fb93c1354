"""target_parameters: LoRA / DoRA on 2-D and 3-D nn.Parameters a module uses directly
(transformers 5.x MoE experts). Oracles: PEFT 0.21's LoraConfig(target_parameters=...) on tiny
MixtralForCausalLM / Qwen3MoeForCausalLM with the same weights (forward and merged weights
to 1e-5 in fp32, folders both ways), and a dense reference (the owner's forward run with
W + delta) on a plain module."""

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adaptkit as ak
from adaptkit.layer import adapted_layers
from adaptkit.merge import unmerge
from adaptkit.peft_compat import read_peft, write_peft
from adaptkit.spec import AdapterSpec
from conftest import randomise_adapters

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# PEFT 0.21 warns that rank / alpha_pattern keys of parameters "did not match any targeted
# module" but applies them (the r=2 tensors load into its r=2 wrappers; outputs agree)
pytestmark = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")

EXPERTS = r".*\.experts\.(gate_up|down)_proj"
ATTN = r".*\.(q|v)_proj"


def _mixtral():
    cfg = transformers.MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg).eval()


def _qwen3_moe():
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=12, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


MODELS = {"mixtral": _mixtral, "qwen3_moe": _qwen3_moe}
X = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def _layer(m, path):
    """The ParamLayer of a parameter path (attribute access finds the Parameter itself)."""
    return dict(m.named_modules())[path]


def _out(m):
    return m(X).logits


def _peft_twin(base, m, spec_kw):
    """PEFT's model over a copy of ``base`` holding ``m``'s adapter weights, mapped by hand
    (PEFT: A (E*r, in) rows e*r + k, B (out, r*E) columns k*E + e; nested wrappers, the
    first registered parameter innermost under ``base_layer``)."""
    cfg = peft.LoraConfig(
        r=spec_kw["rank"], lora_alpha=spec_kw["alpha"], target_modules=["q_proj", "v_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        rank_pattern={"layers.1.mlp.experts.down_proj": 2},
    )
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    sd = pm.state_dict()
    with torch.no_grad():
        for path, layer in adapted_layers(m):
            a = layer.adapters["default"]
            owner, _, name = path.rpartition(".")
            key = "base_model.model." + (path if layer.kind != "param" else owner + ".base_layer" * (name == "gate_up_proj"))
            A, B = a.lora_A, a.lora_B
            if layer.kind == "param":
                A, B = A.reshape(-1, A.shape[-1]), B.permute(1, 2, 0).reshape(B.shape[1], -1)
            sd[key + ".lora_A.default.weight"].copy_(A)
            sd[key + ".lora_B.default.weight"].copy_(B)
    return pm


@pytest.mark.parametrize("arch", MODELS)
def test_forward_and_merge_equal_peft(arch):
    base = MODELS[arch]()
    m = copy.deepcopy(base)
    kw = dict(rank=4, alpha=6)
    paths = ak.inject(m, ak.LoRA(**kw, targets=ATTN, target_parameters=EXPERTS,
                                 rank_pattern={r".*layers\.1\.mlp\.experts\.down_proj": 2}))
    assert "model.layers.0.mlp.experts.gate_up_proj" in paths and "model.layers.1.self_attn.q_proj" in paths
    e = _layer(m, "model.layers.0.mlp.experts.gate_up_proj").adapters["default"]
    n_exp, out, inp = base.model.layers[0].mlp.experts.gate_up_proj.shape
    assert e.lora_A.shape == (n_exp, 4, inp) and e.lora_B.shape == (n_exp, out, 4)
    assert _layer(m, "model.layers.1.mlp.experts.down_proj").adapters["default"].lora_A.shape[1] == 2
    randomise_adapters(m, 0.1, seed=0)
    y = _out(m)
    assert (y - _out(base)).abs().max() > 1e-3
    pm = _peft_twin(base, m, kw)
    torch.testing.assert_close(_out(pm), y, atol=1e-5, rtol=0)
    merged = ak.merge(m)
    ref = pm.merge_and_unload()
    assert type(merged.model.layers[0].mlp.experts) is type(base.model.layers[0].mlp.experts)
    assert list(merged.state_dict()) == list(base.state_dict())
    for (k, a), b in zip(merged.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=k)
    torch.testing.assert_close(_out(merged), y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", MODELS)
def test_peft_folders_both_ways(tmp_path, arch):
    base = MODELS[arch]()
    m = copy.deepcopy(base)
    ak.inject(m, ak.LoRA(rank=4, alpha=6, targets=None, target_parameters=EXPERTS,
                         alpha_pattern={r".*layers\.0\.mlp\.experts\.down_proj": 3}))
    randomise_adapters(m, 0.1, seed=1)
    y = _out(m)
    write_peft(m, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == [] and len(cfg["target_parameters"]) == 4
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(_out(pm), y, atol=1e-5, rtol=0)
    pm.save_pretrained(tmp_path / "theirs")
    m2 = copy.deepcopy(base)
    read_peft(m2, tmp_path / "theirs")
    torch.testing.assert_close(_out(m2), y, atol=1e-5, rtol=0)
    with pytest.raises(ak.AdaptkitError, match="needs the base model"):
        ak.peft_compat.from_peft(cfg, load_file(tmp_path / "theirs" / "adapter_model.safetensors"), None)


def test_dora_per_expert_rows_and_no_peft_export(tmp_path):
    base = _mixtral()
    m = copy.deepcopy(base)
    ak.inject(m, ak.DoRA(rank=4, alpha=6, targets=None, target_parameters=EXPERTS))
    torch.testing.assert_close(_out(m), _out(base), atol=1e-6, rtol=0)  # a fresh DoRA changes nothing
    layer = _layer(m, "model.layers.0.mlp.experts.down_proj")
    a = layer.adapters["default"]
    assert a.lora_magnitude.shape == layer.weight.shape[:2]  # (E, out)
    randomise_adapters(m, 0.1, seed=2, add=True)
    # dense reference on one expert: W' = m / ||W + sBA||_row * (W + sBA)
    v = layer.weight + a.scale * a.lora_B @ a.lora_A
    want = a.lora_magnitude[..., None] * v / v.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(layer.present(), want, atol=1e-6, rtol=1e-5)
    y = _out(m)
    ak.merge(m, unload=False)
    torch.testing.assert_close(_out(m), y, atol=1e-5, rtol=0)
    unmerge(m)
    torch.testing.assert_close(layer.weight, base.model.layers[0].mlp.experts.down_proj, atol=1e-6, rtol=0)
    with pytest.raises(ak.AdaptkitError, match="ParamWrapper.*DoRA"):
        write_peft(m, tmp_path / "dora")


def test_named_adapters_disabled_grads_and_delete():
    base = _mixtral()
    m = copy.deepcopy(base)
    ak.inject(m, ak.LoRA(rank=2, alpha=3, targets=ATTN, target_parameters=EXPERTS), name="a")
    ak.inject(m, ak.LoRA(rank=3, alpha=5, targets=None, target_parameters=r".*\.experts\.down_proj"), name="b")
    randomise_adapters(m, 0.1, seed=3)
    y0 = _out(base)
    with ak.disabled(m):
        torch.testing.assert_close(_out(m), y0, atol=0, rtol=0)
    y_ab = _out(m)
    ak.set_active(m, ["a"])
    y_a = _out(m)
    assert (y_ab - y_a).abs().max() > 1e-4
    m.train()
    ak.set_active(m, ["a", "b"])
    _out(m).pow(2).mean().backward()
    for n, p in m.named_parameters():
        assert (p.grad is not None) == (".adapters." in n), n
    m.eval()
    ak.delete(m, "b")
    torch.testing.assert_close(_out(m), y_a, atol=1e-6, rtol=0)
    ak.delete(m, "a")
    assert type(m.model.layers[0].mlp.experts) is type(base.model.layers[0].mlp.experts)
    assert list(m.state_dict()) == list(base.state_dict())
    torch.testing.assert_close(_out(m), y0, atol=0, rtol=0)


def test_save_load_exact_and_failed_load_changes_nothing(tmp_path):
    base = _mixtral()
    m = copy.deepcopy(base)
    spec = ak.LoRA(rank=4, alpha=6, targets=ATTN, target_parameters=EXPERTS)
    ak.inject(m, spec)
    randomise_adapters(m, 0.1, seed=4)
    ak.save(m, tmp_path / "a.safetensors")
    t = load_file(tmp_path / "a.safetensors")
    assert t["model.layers.0.mlp.experts.gate_up_proj.lora_A"].shape == (4, 4, 16)
    m2 = copy.deepcopy(base)
    ak.load(m2, tmp_path / "a.safetensors")
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    assert AdapterSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    # a mis-shaped expert tensor: one error, nothing injected
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        meta = f.metadata()
    t["model.layers.1.mlp.experts.down_proj.lora_B"] = torch.zeros(4, 16, 3)
    save_file(t, tmp_path / "bad.safetensors", metadata=meta)
    m3 = copy.deepcopy(base)
    with pytest.raises(ak.AdaptkitError, match=r"experts\.down_proj\.lora_B"):
        ak.load(m3, tmp_path / "bad.safetensors")
    assert type(m3.model.layers[1].mlp.experts) is type(base.model.layers[1].mlp.experts)
    assert list(m3.state_dict()) == list(base.state_dict()) and "_adaptkit" not in m3.__dict__


class Mix(nn.Module):
    """A module using its own 2-D and (transposed) 3-D parameters directly."""

    def __init__(self, transposed: bool):
        super().__init__()
        self.is_transposed = transposed
        g = torch.Generator().manual_seed(5)
        self.w = nn.Parameter(torch.randn(6, 5, generator=g))  # (out, in)
        self.stack = nn.Parameter(torch.randn(3, 6, 4, generator=g) if transposed else torch.randn(3, 4, 6, generator=g))

    def forward(self, x):  # x (3, T, 5): one row of tokens per expert
        h = F.linear(x, self.w)  # (3, T, 6)
        s = self.stack if self.is_transposed else self.stack.transpose(-1, -2)  # (3, 6, 4)
        return torch.bmm(h, s)


class Net(nn.Module):
    def __init__(self, transposed: bool):
        super().__init__()
        self.mix = Mix(transposed)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_dense_reference_2d_and_3d(transposed, method):
    net = Net(transposed)
    x = torch.randn(3, 7, 5)
    cls = ak.LoRA if method == "lora" else ak.DoRA
    ak.inject(net, cls(rank=2, alpha=3, targets=None, target_parameters=r"mix\.(w|stack)"))
    randomise_adapters(net, 0.2, seed=6, add=True)
    ref = copy.deepcopy(net.mix)
    ws = {n: l.dense_weight(["default"]) for n, l in adapted_layers(net)}
    ref.__class__ = Mix
    with torch.no_grad():
        ref.w.copy_(ws["mix.w"])
        ref.stack.copy_(ws["mix.stack"])
    torch.testing.assert_close(net.mix(x), ref(x), atol=1e-5, rtol=1e-5)
    a = _layer(net, "mix.stack").adapters["default"]
    assert a.lora_A.shape == (3, 2, 6) and a.lora_B.shape == (3, 4, 2)  # (E, r, in), (E, out, r)


@pytest.mark.parametrize("cls", [ak.LoRA, ak.DoRA])
def test_compile_no_graph_break(cls):
    m = _mixtral()
    ak.inject(m, cls(rank=4, alpha=6, targets=ATTN, target_parameters=EXPERTS))
    randomise_adapters(m, 0.1, seed=7)
    y = _out(m)
    assert torch._dynamo.explain(m)(X).graph_break_count == 0
    torch._dynamo.reset()
    c = torch.compile(m, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(c(X).logits, y, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (lambda: ak.LoRA(targets=None, target_parameters=EXPERTS, dropout=0.1), r"dropout.*experts\.(gate_up|down)_proj"),
        (lambda: ak.LoKr(targets=None, target_parameters=EXPERTS), r"cannot adapt.*experts\.(gate_up|down)_proj.*3-D parameter of MixtralExperts"),
        (lambda: ak.LoRA(targets=None, target_parameters=r".*\.nope"), "matched no parameter"),
        (lambda: ak.LoRA(targets=None, target_parameters=r".*norm\.weight"), "1-D"),
        (lambda: ak.LoRA(targets=None, target_parameters=r".*q_proj\.weight"), "select it with targets"),
        (lambda: ak.LoRA(targets=None, target_parameters=EXPERTS, rank=40), "rank=40 exceeds"),
    ],
)
def test_refusals_name_the_parameter_and_change_nothing(spec, match):
    m = _mixtral()
    keys = list(m.state_dict())
    with pytest.raises(ak.AdaptkitError, match=match):
        ak.inject(m, spec())
    assert list(m.state_dict()) == keys and "_adaptkit" not in m.__dict__
    assert type(m.model.layers[0].mlp.experts).__name__ == "MixtralExperts"


def test_empty_targets_refused():
    with pytest.raises(ak.AdaptkitError, match="both empty"):
        ak.LoRA(targets=None)


@pytest.mark.parametrize("impl", ["grouped_mm", "eager", "batched_mm"])
def test_low_rank_fast_path_equals_dense(impl, monkeypatch):
    """Eager LoRA hands the experts a LowRankWeight (grouped GEMMs / per-expert linear run low
    rank, anything else gets the dense W + sBA); forward and gradients equal the dense path."""
    from adaptkit.methods import lora_param

    m = _mixtral()
    m.config._experts_implementation = impl
    ak.inject(m, ak.LoRA(rank=4, alpha=6, targets=None, target_parameters=EXPERTS))
    randomise_adapters(m, 0.1, seed=8)
    dense = []
    real = lora_param.LowRankWeight.dense
    monkeypatch.setattr(lora_param.LowRankWeight, "dense", lambda self: dense.append(1) or real(self))

    def run():
        m.zero_grad()
        y = _out(m)
        y.pow(2).mean().backward()
        return y.detach(), [p.grad.clone() for p in m.parameters() if p.requires_grad]

    y, g = run()
    assert (len(dense) > 0) == (impl == "batched_mm")  # batched_mm indexes per token: dense
    monkeypatch.setattr(lora_param.ParamLoRAAdapter, "update_weight", lora_param.ParamLoRAAdapter._fold)
    y2, g2 = run()
    torch.testing.assert_close(y, y2, atol=1e-5, rtol=0)
    for a, b in zip(g, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_combine_per_expert_and_to_lora_refused(method):
    m = _mixtral()
    ak.inject(m, ak.LoRA(rank=2, alpha=3, targets=ATTN, target_parameters=EXPERTS), name="a")
    ak.inject(m, ak.LoRA(rank=3, alpha=5, targets=None, target_parameters=EXPERTS), name="b")
    randomise_adapters(m, 0.1, seed=9)
    y_ab = _out(m)
    ak.combine(m, {"a": 1.0, "b": 1.0}, name="mix", method=method, **({"rank": 5} if method == "svd" else {}))
    torch.testing.assert_close(_out(m), y_ab, atol=1e-5, rtol=0)  # rank 5 = r_a + r_b: exact
    assert _layer(m, "model.layers.0.mlp.experts.down_proj").adapters["mix"].lora_A.shape[:2] == (4, 5)
    with pytest.raises(ak.AdaptkitError, match="target_parameters"):
        ak.to_lora(m, name="a", rank=2)


@pytest.mark.parametrize("bias", ["all", "adapter_only"])
def test_bias_modes_with_parameters(bias):
    m = _qwen3_moe()
    ak.inject(m, ak.LoRA(rank=2, targets=None, target_parameters=r".*\.experts\.down_proj"), name="a")
    ak.inject(m, ak.LoRA(rank=2, targets=ATTN, target_parameters=EXPERTS, bias=bias), name="b")
    assert ak.summary(m).per_adapter["b"]["layers"] == 8


@pytest.mark.parametrize("cls", [ak.LoKr, ak.MoRA, ak.GeoLoRA, ak.LoRAMPO, ak.QLoRA])
def test_other_methods_refuse_parameters(cls):
    m = _mixtral()
    with pytest.raises(ak.AdaptkitError, match=r"'model\.layers\.0\.mlp\.experts\.down_proj'.* \(a 3-D parameter of MixtralExperts\)"):
        ak.inject(m, cls(rank=2, targets=None, target_parameters=r".*experts\.down_proj"))
    assert "_adaptkit" not in m.__dict__


def test_cli_merge_and_convert_to_peft(tmp_path, capsys):
    from adaptkit.cli import main

    base = _mixtral()
    m = copy.deepcopy(base)
    ak.inject(m, ak.LoRA(rank=4, alpha=6, targets=ATTN, target_parameters=EXPERTS))
    randomise_adapters(m, 0.1, seed=10)
    ak.save(m, tmp_path / "a.safetensors")
    save_file(base.state_dict(), tmp_path / "b.safetensors")  # expert stacks keyed by the parameter path
    out = str(tmp_path / "o.safetensors")
    assert main(["merge", str(tmp_path / "b.safetensors"), str(tmp_path / "a.safetensors"), "-o", out, "-q"]) == 0
    got, ref = load_file(tmp_path / "o.safetensors"), ak.merge(copy.deepcopy(m)).state_dict()
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0, msg=k)
    assert main(["convert", str(tmp_path / "a.safetensors"), "-o", str(tmp_path / "peft")]) == 0
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(_out(pm), _out(m), atol=1e-5, rtol=0)
