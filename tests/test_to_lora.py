"""ak.to_lora and ``convert --to-lora``: any adapter as a plain LoRA by a truncated SVD of its
update. A LoRA converts exactly; every registered method (the conformance registry) converts
on every base kind it adapts, with the Eckart-Young optimal error at a given rank, no error at
full rank, and ranks chosen by energy; bad input changes nothing. PEFT 0.21 is the oracle for
the exported folders (tiny LlamaForCausalLM and a plain module), and the command line gives
what the in-model conversion gives."""
import copy
import json
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import adaptkit as ak
from adaptkit.cli import main
from adaptkit.inject import state
from adaptkit.layer import adapted_layers
from adaptkit.lora_convert import low_rank
from conformance.bases import BASES, Net
from conformance.registry import CASES
from conftest import randomise_adapters

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def _svd_error(d2, k):
    """The Eckart-Young optimum ||d - d_k||_F / ||d||_F, from d's singular values (fp64)."""
    s = torch.linalg.svdvals(d2.double())
    return math.sqrt(float(s[k:].pow(2).sum() / s.pow(2).sum()))


def _update(layer, name="default"):
    """The adapter's whole update, from the stable layer API: W' - W (fp32, (out, in_flat))."""
    return layer.to_2d(layer.dense_weight([name]) - layer.dense_weight()).detach()


# ---- LoRA converts exactly ----------------------------------------------------------------
@pytest.mark.parametrize("base", ["linear", "gpt2_conv1d", "conv2d", "conv2d_grouped", "embedding"])
def test_lora_converts_exactly(base):
    torch.manual_seed(0)
    net = Net(BASES[base][1](False))
    x = BASES[base][2](torch.float32)
    ak.inject(net, ak.LoRA(rank=3, alpha=5.0, targets=r"blocks\.0\.proj"), name="a")
    ak.inject(net, ak.LoRA(rank=2, targets=r"blocks\.0\.proj"), name="other")
    randomise_adapters(net, 0.3)
    ak.set_active(net, ["a"])
    with torch.no_grad():
        want = net(x)
    for rank in (3, 8):
        res = ak.to_lora(net, "a", rank=rank, new_name=f"r{rank}")
        assert res.name == f"r{rank}" and list(res.errors) == ["blocks.0.proj"]
        assert res.errors["blocks.0.proj"] < 1e-6
        assert state(net).active == ["a"]  # the active set is kept; the new adapter waits
        spec = state(net).specs[f"r{rank}"]
        assert type(spec) is ak.LoRA and spec.alpha is None and spec.init == "default"
        ak.set_active(net, [f"r{rank}"])
        with torch.no_grad():
            torch.testing.assert_close(net(x), want, atol=1e-5, rtol=1e-5)
        ak.set_active(net, ["a"])
    assert set(state(net).specs) == {"a", "other", "r3", "r8"}


def test_energy_picks_the_smallest_rank_per_layer():
    """Squared singular values 16, 4, 1, 0.25 (total 21.25): the cumulative shares are
    0.753, 0.941, 0.988, 1, so energy 0.9 keeps 2, 0.95 keeps 3, 0.99 keeps 4; a second
    layer with a rank-1 update keeps 1 for every energy."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 9))
    ak.inject(net, ak.LoRA(rank=4, targets="0|1"))
    q1, _ = torch.linalg.qr(torch.randn(10, 4))
    q2, _ = torch.linalg.qr(torch.randn(12, 4))
    with torch.no_grad():
        a0 = net[0].adapters["default"]
        a0.lora_B.copy_(q1 * torch.tensor([4.0, 2, 1, 0.5]))
        a0.lora_A.copy_(q2.t())
        a1 = net[1].adapters["default"]
        a1.lora_B.zero_()
        a1.lora_B[:, 0] = torch.randn(9)
        a1.lora_A.normal_()
    for energy, k in ((0.5, 1), (0.9, 2), (0.95, 3), (0.99, 4), (1.0, 4)):
        res = ak.to_lora(net, "default", energy=energy, new_name=f"e{int(energy * 100)}")
        assert res.ranks == {"0": k, "1": 1}, energy
        assert res.errors["0"] == pytest.approx(_svd_error(_update(net[0]), k), abs=1e-6)
        spec = state(net).specs[res.name]
        assert spec.rank == k and spec.rank_for("1") == 1 and spec.alpha_for("1") == 1.0


# ---- every registered method, on every base kind it adapts ---------------------------------------
PAIRS = [(m, b) for m in CASES for b in BASES if BASES[b][0] in CASES[m][1]]


@pytest.mark.filterwarnings("ignore:to_lora.*residual:UserWarning")  # LoRA-MPO, expected
@pytest.mark.parametrize("method, base", PAIRS, ids=[f"{m}-{b}" for m, b in PAIRS])
def test_every_method_converts(method, base):
    make, quantize = CASES[method][0], (CASES[method][3] if len(CASES[method]) > 3 else None)
    torch.manual_seed(0)
    net = Net(BASES[base][1](True) if base != "embedding" else BASES[base][1](False))
    x = BASES[base][2](torch.float32)
    if quantize is not None:
        quantize(net)
    ak.inject(net, make())
    randomise_adapters(net, 0.2)
    layer = net.blocks[0]["proj"]
    with torch.no_grad():
        want = net(x)
        d2 = _update(layer)
    weight = layer.weight.clone()
    full = min(d2.shape)
    errs = [ak.to_lora(net, "default", rank=k, new_name=f"r{k}").errors["blocks.0.proj"] for k in (1, 2, full)]
    assert errs[0] >= errs[1] - 1e-6 >= errs[2] - 2e-6 and errs[2] < 1e-5
    # d2 = W' - W carries fp32 rounding of W: a floor of ~1e-7 ||W|| / ||d2|| under its errors
    floor = 1e-6 * (1 + float(layer.dense_weight().norm() / d2.norm()))
    for k, e in zip((1, 2), errs):  # the best rank-k approximation (Eckart-Young)
        assert e == pytest.approx(_svd_error(d2, k), rel=1e-4, abs=floor)
    assert torch.equal(layer.weight, weight)  # the base (NF4 bytes included) is untouched
    spec = state(net).specs[f"r{full}"]
    assert type(spec) is (ak.QLoRA if method.startswith("qlora") else ak.LoRA)
    if method.startswith("qlora"):  # the same NF4 settings, plain QLoRA
        src = state(net).specs["default"]
        assert (spec.blocksize, spec.double_quant, spec.compute_dtype, spec.use_dora) == \
            (src.blocksize, src.double_quant, src.compute_dtype, False)
    ak.set_active(net, [f"r{full}"])
    with torch.no_grad():
        torch.testing.assert_close(net(x), want, atol=2e-5, rtol=1e-5)


def test_low_rank_randomised_route_matches_the_exact_one():
    """A 1024 x 1536 update goes through the seeded randomised SVD: a rank-12 update is exact
    at rank 16, and a full-rank one is within 1% of the optimum; energy grows the sketch."""
    torch.manual_seed(0)
    u, v = torch.randn(1024, 12), torch.randn(12, 1536)
    B, A, err = low_rank(u @ v, rank=16)
    assert A.shape == (16, 1536) and err < 1e-6
    d = torch.randn(1024, 1536) @ torch.diag(torch.logspace(0, -3, 1536)) @ torch.linalg.qr(torch.randn(1536, 1536)).Q
    B, A, err = low_rank(d, rank=16)
    assert err == pytest.approx(_svd_error(d, 16), rel=1e-2)
    B, A, err = low_rank(d, energy=0.9)
    assert err <= math.sqrt(0.1) + 1e-4 and A.shape[0] > 32  # more than the first sketch
    assert torch.equal(low_rank(d, rank=16)[0], low_rank(d, rank=16)[0])  # seeded: deterministic


# ---- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, needle", [
    (dict(name="nope", rank=4), "no adapter named 'nope'"),
    (dict(name="a"), "exactly one of rank"),
    (dict(name="a", rank=4, energy=0.9), "exactly one of rank"),
    (dict(name="a", rank=0), "rank=0 must be an int >= 1"),
    (dict(name="a", rank=True), "rank=True"),
    (dict(name="a", rank=2.0), "rank=2.0"),
    (dict(name="a", energy=0.0), "energy=0.0 must be a number in (0, 1]"),
    (dict(name="a", energy=1.5), "energy=1.5"),
    (dict(name="a", energy=float("nan")), "energy=nan"),
    (dict(name="a", rank=4, new_name="a"), "already exists"),
    (dict(name="a", rank=4, new_name="bad.name"), "identifier-like"),
], ids=["unknown", "neither", "both", "rank0", "rank_bool", "rank_float", "energy0", "energy_big",
        "energy_nan", "name_taken", "bad_name"])
def test_bad_input_is_an_error_and_changes_nothing(kw, needle):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    ak.inject(net, ak.DoRA(rank=2, targets="0|1"), name="a")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    types = [type(m) for m in net.modules()]
    with pytest.raises(ak.AdaptkitError, match=__import__("re").escape(needle)):
        ak.to_lora(net, **kw)
    assert set(state(net).specs) == {"a"} and state(net).active == ["a"]
    assert [type(m) for m in net.modules()] == types
    after = net.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_merged_source_is_refused():
    net = nn.Sequential(nn.Linear(8, 8))
    ak.inject(net, ak.LoRA(rank=2, targets="0"))
    net[0].merge(["default"])
    with pytest.raises(ak.AdaptkitError, match="merged at"):
        ak.to_lora(net, "default", rank=2)
    assert set(state(net).specs) == {"default"}


def test_bias_and_modules_to_save_travel_with_the_lora(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    ak.inject(net, ak.LoKr(rank=2, targets="0", init="random", bias="adapter_only"), name="k")
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    res = ak.to_lora(net, "k", rank=8)
    spec = state(net).specs[res.name]
    assert spec.bias == "adapter_only"
    ak.save(net, tmp_path / "l.safetensors", name=res.name)
    assert "0.bias" in load_file(str(tmp_path / "l.safetensors"))


# ---- PEFT as the oracle ---------------------------------------------------------------------------
peft = pytest.importorskip("peft")
tf = pytest.importorskip("transformers")

LLAMA_TARGETS = r"model\.layers\.\d+\.(self_attn\.(q|v)_proj|mlp\.down_proj)"
LLAMA_SPECS = {
    "lora": ak.LoRA(rank=4, alpha=6, targets=LLAMA_TARGETS),
    "dora": ak.DoRA(rank=4, alpha=6, targets=LLAMA_TARGETS),
    "lokr": ak.LoKr(rank=2, alpha=3, targets=LLAMA_TARGETS, init="random"),
    "mora": ak.MoRA(rank=4, mora_type=6, targets=LLAMA_TARGETS),
    "geolora": ak.GeoLoRA(rank=3, max_rank=6, targets=LLAMA_TARGETS),
    "lorampo": ak.LoRAMPO(rank=3, targets=LLAMA_TARGETS),
    "qdora": ak.QLoRA(rank=4, alpha=6, targets=LLAMA_TARGETS, use_dora=True),
}


def _llama():
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()


def _own_base(model, base):
    """``base`` holding the model's own current base weights where it is adapted (an NF4
    layer's dequantised W, a residual init's W - ΔW_init): what the converted LoRA sits on."""
    out = copy.deepcopy(base)
    with torch.no_grad():
        for p, layer in adapted_layers(model):
            out.get_submodule(p).weight.copy_(layer.dense_weight())
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", list(LLAMA_SPECS))
def test_peft_loads_the_converted_lora_to_the_same_logits(tmp_path, method):
    base = _llama()
    model = copy.deepcopy(base)
    ak.inject(model, LLAMA_SPECS[method])
    randomise_adapters(model, 0.1, seed=1)
    res = ak.to_lora(model, "default", energy=0.95)
    ak.set_active(model, [res.name])
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    ak.peft_compat.save_peft(model, tmp_path / "p", name=res.name)
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and not cfg["use_dora"]
    assert len(set(res.ranks.values())) == 1 or cfg["rank_pattern"]  # energy: ranks per layer
    pm = peft.PeftModel.from_pretrained(_own_base(model, base), tmp_path / "p").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, want, atol=1e-5, rtol=1e-5)


# ---- the command line ----------------------------------------------------------------------------
class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(24, 32), nn.Linear(32, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def _trained(spec):
    torch.manual_seed(0)
    base = Small()
    model = copy.deepcopy(base)
    ak.inject(model, spec)
    randomise_adapters(model, 0.2, seed=3)
    return base, model


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("spec", [
    ak.DoRA(rank=3, alpha=5, targets="a|b", bias="adapter_only"),
    ak.LoKr(rank=2, alpha=3, targets="a|b", init="random", modules_to_save="head"),
    ak.QLoRA(rank=3, targets="a|b", use_dora=True),
], ids=["dora", "lokr_saved", "qdora"])
def test_cli_to_lora_equals_the_in_model_conversion(tmp_path, spec, capsys):
    base, model = _trained(spec)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    ak.save(model, tmp_path / "ad.safetensors")
    res = ak.to_lora(model, "default", rank=4)
    ak.save(model, tmp_path / "want.safetensors", name=res.name)
    ak.peft_compat.save_peft(model, tmp_path / "want_peft", name=res.name)
    args = ["convert", str(tmp_path / "ad.safetensors"), "--to-lora", "--rank", "4", "--base", str(tmp_path / "base.safetensors")]
    assert main(args + ["-o", str(tmp_path / "got.safetensors")]) == 0
    assert main(args + ["-o", str(tmp_path / "got_peft")]) == 0
    out = capsys.readouterr().out
    assert "relative error" in out and "wrote PEFT folder" in out
    for want, got in (("want.safetensors", "got.safetensors"), ("want_peft/adapter_model.safetensors",
                                                                "got_peft/adapter_model.safetensors")):
        w, g = load_file(str(tmp_path / want)), load_file(str(tmp_path / got))
        assert set(w) == set(g)
        for k in w:
            torch.testing.assert_close(g[k], w[k], atol=1e-6, rtol=1e-5)
    for f in ("want_peft", "got_peft"):
        assert json.loads((tmp_path / f / "adapter_config.json").read_text()) == \
            json.loads((tmp_path / "want_peft" / "adapter_config.json").read_text())


def test_cli_to_lora_of_a_residual_init_uses_the_original_base(tmp_path):
    """LoRA-MPO rewrites W when attached. From its file and the original base, the command
    line converts the update against the original W: at full rank PEFT on the original base
    reproduces the LoRA-MPO model. Without --base it is an error naming the fix."""
    base, model = _trained(ak.LoRAMPO(rank=3, targets="a|b"))
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    ak.save(model, tmp_path / "mpo.safetensors")
    assert main(["convert", str(tmp_path / "mpo.safetensors"), "--to-lora", "--rank", "24", "-o", str(tmp_path / "p"),
                 "--base", str(tmp_path / "base.safetensors")]) == 0
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p")
    x = torch.randn(5, 24)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), model(x), atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="residual"):  # in the model the original W is gone
        ak.to_lora(model, "default", rank=4)


@pytest.mark.parametrize("args, needle", [
    (["--to-lora", "--rank", "4"], "give them: --base BASE.safetensors"),
    (["--to-lora"], "exactly one of rank"),
    (["--to-lora", "--energy", "2"], "energy=2.0"),
    (["--rank", "4"], "add --to-lora"),
], ids=["dora_needs_base", "no_rank", "bad_energy", "rank_without_to_lora"])
def test_cli_to_lora_errors_are_one_line(tmp_path, capsys, args, needle):
    _, model = _trained(ak.DoRA(rank=3, targets="a|b"))
    ak.save(model, tmp_path / "d.safetensors")
    assert main(["convert", str(tmp_path / "d.safetensors"), "-o", str(tmp_path / "out"), *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "out").exists()


def test_cli_to_lora_energy_from_a_peft_folder(tmp_path, capsys):
    """The source may be a PEFT folder too; energy gives per-layer ranks in the written config."""
    _, model = _trained(ak.LoKr(rank=2, alpha=3, targets="a|b", init="random"))
    ak.peft_compat.save_peft(model, tmp_path / "lokr")
    assert main(["convert", str(tmp_path / "lokr"), "--to-lora", "--energy", "0.9", "-o", str(tmp_path / "l")]) == 0
    res = ak.to_lora(model, "default", energy=0.9)
    cfg = json.loads((tmp_path / "l" / "adapter_config.json").read_text())
    assert cfg["r"] == max(res.ranks.values())
    got = load_file(str(tmp_path / "l" / "adapter_model.safetensors"))
    assert {k: got[f"base_model.model.{k}.lora_A.weight"].shape[0] for k in res.ranks} == res.ranks
