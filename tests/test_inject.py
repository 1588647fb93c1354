"""Targets, inject, the active set, disabled(), delete, summary, merge variants, combine."""
import copy

import pytest
import torch
import torch.nn as nn

import adaptkit as ak
from adaptkit.layer import AdaptedLayer
from adaptkit.targets import layer_index, select
from conftest import randomise_adapters


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, x):
        return self.mlp(self.q_proj(x) + self.v_proj(x))


class LM(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([Block() for _ in range(n)])
        self.lm_head = nn.Linear(8, 5)

    def forward(self, x):
        for b in self.model.layers:
            x = b(x)
        return self.lm_head(x)


def test_fullmatch_not_substring_or_suffix():
    m = LM()
    assert select(m, ak.LoRA(targets=r".*q_proj")) == [f"model.layers.{i}.q_proj" for i in range(3)]
    with pytest.raises(ak.AdaptkitError):
        select(m, ak.LoRA(targets="q_proj"))  # no suffix mode
    got = select(m, ak.LoRA(targets=[r".*\.q_proj", r".*\.v_proj"], exclude=r".*\.1\..*"))
    assert got == ["model.layers.0.q_proj", "model.layers.0.v_proj", "model.layers.2.q_proj",
                   "model.layers.2.v_proj"]


def test_all_linear_excludes_output_head():
    got = select(LM(), ak.LoRA())
    assert "lm_head" not in got and len(got) == 12


def test_layers_to_transform_with_pattern_and_root_modulelist():
    m = LM()
    got = select(m, ak.LoRA(targets=r".*_proj", layers_to_transform=[0, 2], layers_pattern=r"model\.layers"))
    assert got == ["model.layers.0.q_proj", "model.layers.0.v_proj", "model.layers.2.q_proj",
                   "model.layers.2.v_proj"]
    root = nn.ModuleList([nn.Linear(4, 4) for _ in range(4)])
    assert select(root, ak.LoRA(rank=2, targets=r"\d", layers_to_transform=[1, 3])) == ["1", "3"]
    assert layer_index("3.mlp.0", None) == 3
    assert layer_index("model.layers.2.mlp.0", ("layers",)) == 2
    assert layer_index("model.layers.2.mlp.0", (r"model\.layers\.\d\.mlp",)) == 0


def test_rank_and_alpha_pattern_first_match_wins():
    m = LM()
    ak.inject(m, ak.LoRA(rank=4, alpha=8, targets=r".*_proj",
                         rank_pattern={r".*\.0\..*": 2, r".*q_proj": 3}, alpha_pattern={r".*v_proj": 1.0}))
    L = m.model.layers
    assert L[0].q_proj.adapters["default"].rank == 2 and L[1].q_proj.adapters["default"].rank == 3
    assert L[1].v_proj.adapters["default"].scale == 1.0 / 4
    assert L[1].q_proj.adapters["default"].scale == 8 / 3


def test_multiple_adapters_sum_and_active_set():
    torch.manual_seed(0)
    m = LM()
    x = torch.randn(2, 8)
    y0 = m(x)
    ak.inject(m, ak.LoRA(rank=2, targets=r".*q_proj"), name="a")
    ak.inject(m, ak.LoRA(rank=3, alpha=5, targets=r".*_proj"), name="b")
    randomise_adapters(m, 0.2, name="a"), randomise_adapters(m, 0.2, name="b")
    ya_b = m(x)
    ak.set_active(m, "a")
    ya = m(x)
    assert all(not p.requires_grad for n, p in m.named_parameters() if ".adapters.b." in n)
    assert all(p.requires_grad for n, p in m.named_parameters() if ".adapters.a." in n)
    ak.set_active(m, ["b"])
    yb = m(x)
    # the layers are linear up to the GELU, so compare the first block's q_proj directly
    q = m.model.layers[0].q_proj
    xin = torch.randn(3, 8)
    ak.set_active(m, ["a", "b"])
    d = q.dense_weight(["a", "b"])
    torch.testing.assert_close(q(xin), q.base_op(xin, d, q.bias))
    assert not torch.allclose(ya, yb) and not torch.allclose(ya_b, ya)
    with ak.disabled(m):
        torch.testing.assert_close(m(x), y0)
    torch.testing.assert_close(m(x), ya_b)
    with pytest.raises(ak.AdaptkitError, match="unknown adapter"):
        ak.set_active(m, ["c"])


def test_disabled_with_merged_adapters_and_unmerge():
    torch.manual_seed(0)
    m = LM()
    x = torch.randn(2, 8)
    y0 = m(x)
    ak.inject(m, ak.LoRA(rank=2, alpha=3, targets=r".*_proj"))
    randomise_adapters(m, 0.2, name="default")
    y = m(x)
    ak.merge(m, unload=False)
    assert all(l.adapters["default"].merged for l in m.modules() if isinstance(l, AdaptedLayer))
    torch.testing.assert_close(m(x), y, atol=1e-6, rtol=1e-5)
    with ak.disabled(m):
        torch.testing.assert_close(m(x), y0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(m(x), y, atol=1e-6, rtol=1e-5)
    from adaptkit.merge import unmerge
    unmerge(m)
    torch.testing.assert_close(m(x), y, atol=1e-6, rtol=1e-5)


def test_delete_restores_plain_modules():
    m = LM()
    ref = copy.deepcopy(m)
    ak.inject(m, ak.LoRA(rank=2, targets=r".*q_proj"), name="a")
    ak.inject(m, ak.LoRA(rank=2, targets=r".*0\.v_proj"), name="b")
    ak.delete(m, "a")
    assert isinstance(m.model.layers[0].v_proj, AdaptedLayer)
    assert type(m.model.layers[1].q_proj) is nn.Linear
    ak.delete(m, "b")
    assert [type(x) for x in m.modules()] == [type(x) for x in ref.modules()]
    assert list(m.state_dict()) == list(ref.state_dict())


def test_merge_restores_requires_grad_and_strict_roundtrip():
    m = LM()
    m.lm_head.weight.requires_grad_(False)
    ref = copy.deepcopy(m)
    ak.inject(m, ak.LoRA(rank=2, alpha=4, targets=r".*_proj"))
    assert not any(p.requires_grad for n, p in m.named_parameters() if ".adapters." not in n)
    randomise_adapters(m, 0.2, name="default")
    x = torch.randn(2, 8)
    y = m(x)
    merged = ak.merge(m)
    assert {n: p.requires_grad for n, p in merged.named_parameters()} == \
        {n: p.requires_grad for n, p in ref.named_parameters()}
    ref.load_state_dict(merged.state_dict(), strict=True)
    torch.testing.assert_close(ref(x), y, atol=1e-6, rtol=1e-5)
    assert "_adaptkit" not in merged.__dict__


def test_modules_to_save_trained_saved_and_loaded(tmp_path):
    torch.manual_seed(0)
    m = LM()
    fresh = copy.deepcopy(m)
    ak.inject(m, ak.LoRA(rank=2, targets=r".*q_proj", modules_to_save=r"lm_head"))
    assert m.lm_head.weight.requires_grad and not m.model.layers[0].q_proj.weight.requires_grad
    with torch.no_grad():
        m.lm_head.weight.add_(1.0)
    randomise_adapters(m, 0.2, name="default")
    ak.save(m, tmp_path / "a.safetensors")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"lm_head.weight", "lm_head.bias", "model.layers.0.q_proj.lora_A"} <= keys
    assert not any(k.endswith("q_proj.weight") for k in keys)  # never base weights
    ak.load(fresh, tmp_path / "a.safetensors")
    x = torch.randn(2, 8)
    torch.testing.assert_close(fresh(x), m(x))


def test_summary_counts():
    m = LM()
    ak.inject(m, ak.LoRA(rank=2, targets=r".*q_proj"))
    s = ak.summary(m)
    assert s.trainable == 3 * 2 * (8 + 8)
    assert s.total == sum(p.numel() for p in m.parameters())
    assert s.per_adapter["default"]["layers"] == 3
    assert "trainable 96" in str(s)


def test_summary_shows_merged_adapters():
    """After merge(unload=False) the summary says which adapters are folded into the weights."""
    m = LM()
    ak.inject(m, ak.LoRA(rank=2, targets=r".*q_proj"), name="a")
    ak.inject(m, ak.LoRA(rank=2, targets=r".*v_proj"), name="b")
    ak.set_active(m, ["a"])
    s = ak.summary(m)
    assert not s.per_adapter["a"]["merged"] and "adapter 'a': lora, 3 layers, 96 params (active)\n" in str(s)
    ak.merge(m, unload=False)
    s = ak.summary(m)
    assert s.per_adapter["a"]["merged"] and s.per_adapter["a"]["merged_layers"] == 3
    assert not s.per_adapter["b"]["merged"] and s.per_adapter["b"]["active"] is False
    assert "adapter 'a': lora, 3 layers, 96 params (active, merged)" in str(s), str(s)
    assert "adapter 'b': lora, 3 layers, 96 params\n" in str(s), str(s)
    path = next(p for p, _, _, _ in s.per_layer if p.endswith("q_proj"))
    path_layer = m.get_submodule(path)
    path_layer.unmerge()
    assert "(active, merged in 2/3 layers)" in str(ak.summary(m))
    assert set(s.per_adapter["a"]) >= {"method", "layers", "params", "active"}  # fields kept


def test_summary_counts_quantised_weights_as_parameters():
    m = LM()
    total = sum(p.numel() for p in m.parameters())
    ak.inject(m, ak.QLoRA(rank=2, targets=r".*q_proj"))  # q_proj weights become packed bytes
    s = ak.summary(m)
    assert s.trainable == 3 * 2 * (8 + 8)
    assert s.total == total + s.trainable


def test_combine_cat_is_exact_and_svd_truncates():
    torch.manual_seed(0)
    m = LM()
    ak.inject(m, ak.LoRA(rank=2, alpha=3, targets=r".*_proj"), name="a")
    ak.inject(m, ak.LoRA(rank=3, alpha=2, use_rslora=True, targets=r".*q_proj"), name="b")
    randomise_adapters(m, 0.2, name="a"), randomise_adapters(m, 0.2, name="b")
    q = m.model.layers[1].q_proj
    want = 0.7 * q.adapters["a"].delta_weight(q) + 0.3 * q.adapters["b"].delta_weight(q)
    ak.combine(m, {"a": 0.7, "b": 0.3}, name="mix")
    torch.testing.assert_close(q.adapters["mix"].delta_weight(q), want, atol=1e-6, rtol=1e-5)
    assert q.adapters["mix"].rank == 5 and m.model.layers[1].v_proj.adapters["mix"].rank == 2
    ak.combine(m, {"a": 0.7, "b": 0.3}, name="low", method="svd", rank=1)
    U, S, Vh = torch.linalg.svd(want)
    torch.testing.assert_close(q.adapters["low"].delta_weight(q), S[0] * torch.outer(U[:, 0], Vh[0]),
                               atol=1e-5, rtol=1e-4)


def test_combine_refuses_what_it_cannot_do_exactly():
    m = LM()
    ak.inject(m, ak.LoRA(rank=2, targets=r".*q_proj", bias="adapter_only"), name="a")
    ak.inject(m, ak.LoRA(rank=2, targets=r".*v_proj"), name="b")
    with pytest.raises(ak.AdaptkitError, match="bias / modules_to_save"):
        ak.combine(m, {"a": 1.0, "b": 1.0})
    with pytest.raises(ak.AdaptkitError, match="finite number"):
        ak.combine(m, {"b": float("nan")})
    with pytest.raises(ak.AdaptkitError, match="unknown adapter 'zz'"):
        ak.combine(m, {"zz": 1.0})
    with pytest.raises(ak.AdaptkitError, match="method='ties'"):
        ak.combine(m, {"b": 1.0}, method="ties")


@pytest.mark.parametrize("spec", [ak.LoRA(rank=2, alpha=3, targets=r".*_proj"),
                                  ak.DoRA(rank=2, targets=r".*q_proj"),
                                  ak.QLoRA(rank=2, use_dora=True, targets=r".*v_proj")])
def test_torch_save_of_a_whole_injected_model(spec, tmp_path, monkeypatch):
    """torch.save(model) pickles the run-time wrapper classes through their base class, so a
    fresh process (here: an emptied class cache) unpickles them."""
    torch.manual_seed(0)
    m = LM()
    ak.inject(m, spec)
    randomise_adapters(m, 0.2, name="default")
    torch.save(m, tmp_path / "m.pt")
    monkeypatch.setattr(ak.layer, "_WRAPPERS", {})
    m2 = torch.load(tmp_path / "m.pt", weights_only=False)
    x = torch.randn(2, 8)
    torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)
    with ak.disabled(m2), ak.disabled(m):
        torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)
    ak.save(m2, tmp_path / "a.safetensors")  # the adaptkit state came along
    assert isinstance(ak.merge(m2), LM)


def test_multihead_attention_out_proj_is_never_adapted():
    """nn.MultiheadAttention reads out_proj.weight without calling out_proj, so a wrapper there
    would be bypassed: "all-linear" leaves it out, naming it explicitly is refused."""
    m = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    paths = ak.inject(m, ak.LoRA(rank=2, alpha=3))
    assert "self_attn.out_proj" not in paths and "linear1" in paths
    x = torch.randn(2, 5, 16)
    m(x).sum().backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if p.requires_grad)
    m2 = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    before = copy.deepcopy(m2.state_dict())
    with pytest.raises(ak.AdaptkitError, match=r"'self_attn\.out_proj' is an nn\.MultiheadAttention"):
        ak.inject(m2, ak.LoRA(rank=2, targets=r"self_attn\.out_proj|linear1"))
    assert not any(isinstance(x, AdaptedLayer) for x in m2.modules())
    assert all(torch.equal(before[k], v) for k, v in m2.state_dict().items())


@pytest.mark.parametrize("method", sorted(ak.methods.METHODS))
def test_module_apply_works_after_inject(method):
    """nn.Module.apply(fn) (transformers' post_init, init helpers) reaches every module of an
    injected model: the adapter hook is ``update``, so it no longer shadows Module.apply."""
    m = LM()
    kw = dict(rank=2, targets=r".*\.q_proj")
    if method == "trainable_tokens":  # trains rows of an Embedding
        m.model.embed_tokens = nn.Embedding(5, 8)
        kw = dict(token_ids=[1], targets=r"model\.embed_tokens")
    ak.inject(m, ak.methods.METHODS[method](**kw))
    seen = []
    m.apply(lambda mod: seen.append(type(mod).__name__))
    assert len(seen) == len(list(m.modules())) and any(s.startswith("Adapted") for s in seen)


@pytest.mark.parametrize("spec", [ak.LoRA(rank=2, dropout=0.5, targets="0"), ak.DoRA(rank=2, dropout=0.5, targets="0")])
def test_inject_into_an_eval_model_adds_adapters_in_eval_mode(spec):
    """A new adapter module starts in training mode; injected (or loaded) into a model in eval
    mode it must follow the model, or its dropout runs at inference and outputs vary."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    ak.inject(model, spec)
    a = model[0].adapters["default"]
    assert not a.training
    nn.init.normal_(a.lora_B, 0, 0.5)  # a non-zero update: dropout would change the output
    x = torch.randn(4, 8)
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(model(x), nn.functional.linear(x, model[0].dense_weight(["default"]), model[0].bias))
    model.train()
    assert a.training
