"""ak.TrainableTokens: rows of an embedding, a tied lm_head, the file, stacking with LoRA,
bad input and PEFT interop (a tiny transformers Llama with tied embeddings as the oracle)."""
import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

import adaptkit as ak
from adaptkit.inject import state
from adaptkit.layer import AdaptedLayer

transformers = pytest.importorskip("transformers")

IDS = [60, 3, 7]  # 60 and 61 stand for tokens a chat template added
V, D = 64, 16


def llama(tied=True, vocab=V, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=D, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg).eval()


def tokens_in():
    x = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    x[0, 0], x[1, 3], x[1, 8] = 60, 3, 7  # every trained id is looked up
    return x


def randomise(model, name="default", seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".adapters.{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g))


def dense_reference(ref, values, ids=IDS):
    """The base model with rows ``ids`` of its (tied) embedding set to ``values``."""
    ref = copy.deepcopy(ref)
    with torch.no_grad():
        ref.model.embed_tokens.weight[ids] = values
    return ref


def logits(m, x):
    with torch.no_grad():
        return m(x).logits


def test_tied_head_sees_the_rows_gradients_only_reach_them_and_merge_stays_tied():
    m, x = llama(), tokens_in()
    ref = copy.deepcopy(m)
    paths = ak.inject(m, ak.TrainableTokens(token_ids=IDS, targets=r"model\.embed_tokens"))
    assert paths == ["model.embed_tokens", "lm_head"]  # the tied head follows the embedding
    assert torch.equal(logits(m, x), logits(ref, x))  # init="copy": output unchanged
    randomise(m)
    vals = m.model.embed_tokens.adapters["default"].token_values
    assert vals.shape == (3, D)
    want = logits(dense_reference(ref, vals.detach()), x)
    torch.testing.assert_close(logits(m, x), want, atol=1e-5, rtol=1e-5)
    # the lm_head's logits of the trained ids are h @ values^T
    h = m.model(x).last_hidden_state.detach()
    torch.testing.assert_close(m.lm_head(h)[..., IDS], h @ vals.detach().t(), atol=1e-5, rtol=1e-5)
    m.train()
    m(x).logits.square().mean().backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None}
    assert grads == {"model.embed_tokens.adapters.default.token_values"}
    assert vals.grad.abs().sum(-1).gt(0).all()  # every trained row, through embedding and head
    assert [n for n, p in m.named_parameters() if p.requires_grad] == list(grads)
    m.eval()
    merged = ak.merge(m)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight  # still one Parameter
    assert not any(isinstance(x, AdaptedLayer) for x in merged.modules())
    assert list(merged.state_dict()) == list(ref.state_dict())
    torch.testing.assert_close(logits(merged, x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged.model.embed_tokens.weight[IDS], vals.detach(), atol=1e-6, rtol=0)


def test_merge_unmerge_disabled_and_active_set():
    m, x = llama(), tokens_in()
    base = logits(m, x)
    w0 = m.model.embed_tokens.weight.detach().clone()
    ak.inject(m, ak.TrainableTokens(token_ids=IDS, targets=r"model\.embed_tokens"))
    randomise(m)
    y = logits(m, x)
    assert not torch.allclose(y, base)
    with ak.disabled(m):
        assert torch.equal(logits(m, x), base)
    ak.merge(m, unload=False)  # merges the embedding and its tied head: the delta once
    torch.testing.assert_close(logits(m, x), y, atol=1e-5, rtol=1e-5)
    with ak.disabled(m):
        torch.testing.assert_close(logits(m, x), base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(m, x), y, atol=1e-5, rtol=1e-5)
    ak.merge(m, unload=False)  # twice: a no-op
    torch.testing.assert_close(logits(m, x), y, atol=1e-5, rtol=1e-5)
    from adaptkit.merge import unmerge
    unmerge(m)
    torch.testing.assert_close(m.model.embed_tokens.weight.detach(), w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(m, x), y, atol=1e-5, rtol=1e-5)
    # merging only the head's layer merges the shared weight once; the embedding follows
    m.lm_head.merge()
    assert m.model.embed_tokens.adapters["default"].merged
    torch.testing.assert_close(logits(m, x), y, atol=1e-5, rtol=1e-5)
    m.model.embed_tokens.unmerge()
    torch.testing.assert_close(m.model.embed_tokens.weight.detach(), w0, atol=1e-6, rtol=0)
    ak.delete(m, "default")
    assert type(m.lm_head) is nn.Linear and m.lm_head.weight is m.model.embed_tokens.weight
    torch.testing.assert_close(logits(m, x), base, atol=1e-6, rtol=0)


def test_file_holds_only_the_rows_and_round_trips(tmp_path):
    m, x = llama(), tokens_in()
    ak.inject(m, ak.TrainableTokens(token_ids=IDS, targets=r"model\.embed_tokens"))
    randomise(m)
    f = tmp_path / "tok.safetensors"
    ak.save(m, f)
    with safe_open(f, "pt") as h:
        assert list(h.keys()) == ["model.embed_tokens.token_values"]
        assert h.get_tensor("model.embed_tokens.token_values").shape == (3, D)
        spec = json.loads(h.metadata()["adaptkit.spec"])
    assert spec["method"] == "trainable_tokens" and spec["token_ids"] == IDS
    other = llama()
    assert ak.load(other, f) == ["model.embed_tokens", "lm_head"]
    a, b = (n.model.embed_tokens.adapters["default"].token_values for n in (m, other))
    assert torch.equal(a, b)
    assert torch.equal(logits(other, x), logits(m, x))


def test_failed_load_leaves_the_model_unchanged(tmp_path):
    m = llama()
    ak.inject(m, ak.TrainableTokens(token_ids=IDS, targets=r"model\.embed_tokens"))
    randomise(m)
    ak.save(m, tmp_path / "tok.safetensors")
    for other, match in ((llama(vocab=32), r"'model\.embed_tokens': file has Embedding weight \[64, 16\], "
                                           r"model has Embedding weight \[32, 16\]"),
                         (llama(tied=False), r"'lm_head' \(Linear\), but only nn\.Embedding rows train")):
        before = copy.deepcopy(other.state_dict())
        with pytest.raises(ak.AdaptkitError, match=match):
            ak.load(other, tmp_path / "tok.safetensors")
        assert not any(isinstance(x, AdaptedLayer) for x in other.modules())
        assert "_adaptkit" not in other.__dict__
        assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_stacks_with_lora_save_load_merge(tmp_path):
    m, x = llama(), tokens_in()
    ref = copy.deepcopy(m)
    ak.inject(m, ak.LoRA(rank=2, alpha=5.0, targets=r".*\.(q|v)_proj"), name="default")
    ak.inject(m, ak.TrainableTokens(token_ids=IDS, targets=r"model\.embed_tokens"), name="tokens")
    randomise(m, "default", 3)
    randomise(m, "tokens", 4)
    y = logits(m, x)
    ak.set_active(m, ["tokens"])
    vals = m.model.embed_tokens.adapters["tokens"].token_values.detach()
    torch.testing.assert_close(logits(m, x), logits(dense_reference(ref, vals), x), atol=1e-5, rtol=1e-5)
    ak.set_active(m, ["default", "tokens"])
    ak.save(m, tmp_path / "lora.safetensors", name="default")
    ak.save(m, tmp_path / "tok.safetensors", name="tokens")
    other = llama()
    ak.load(other, tmp_path / "lora.safetensors", name="default")
    ak.load(other, tmp_path / "tok.safetensors", name="tokens")
    assert torch.equal(logits(other, x), y)
    merged = ak.merge(other)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    torch.testing.assert_close(logits(merged, x), y, atol=1e-5, rtol=1e-5)


def test_lora_and_tokens_on_the_same_embedding_add_up():
    """Both are additive deltas on one weight: forward == the base op on W + both deltas."""
    emb = nn.Sequential(nn.Embedding(20, 6))
    ak.inject(emb, ak.LoRA(rank=2, alpha=3.0, targets="0"), name="lora")
    ak.inject(emb, ak.TrainableTokens(token_ids=[4, 9], targets="0"), name="tok")
    randomise(emb, "lora")
    randomise(emb, "tok")
    x = torch.arange(20).view(4, 5)
    layer = emb[0]
    want = layer.base_op(x, layer.dense_weight(["lora", "tok"]), None)
    torch.testing.assert_close(emb(x), want, atol=1e-6, rtol=1e-6)
    ak.merge(emb, unload=False)
    torch.testing.assert_close(emb(x), want, atol=1e-6, rtol=1e-6)


def test_weight_shared_by_two_embeddings_and_a_head_is_merged_once():
    """T5 style: one Parameter behind a shared embedding, an encoder embedding and the head."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.enc, self.head = nn.Embedding(12, 4), nn.Embedding(12, 4), nn.Linear(4, 12, bias=False)
            self.enc.weight = self.head.weight = self.shared.weight

        def forward(self, x):
            return self.head(self.enc(x)) + self.head(self.shared(x))

    m, x = Shared(), torch.arange(12).view(3, 4)
    w0 = m.shared.weight.detach().clone()
    assert ak.inject(m, ak.TrainableTokens(token_ids=[2, 5], targets="shared")) == ["shared", "enc", "head"]
    randomise(m)
    assert [n for n, _ in m.named_parameters() if ".adapters." in n] == ["shared.adapters.default.token_values"]
    ref = Shared()
    with torch.no_grad():
        ref.shared.weight.copy_(w0)
        ref.shared.weight[[2, 5]] = m.shared.adapters["default"].token_values
    y = m(x)
    torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=1e-5)
    merged = ak.merge(m)
    assert merged.enc.weight is merged.shared.weight is merged.head.weight
    torch.testing.assert_close(merged.shared.weight, ref.shared.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(merged(x), y, atol=1e-5, rtol=1e-5)


def test_bf16_rows_come_out_exactly():
    emb = nn.Sequential(nn.Embedding(20, 6).to(torch.bfloat16))
    ak.inject(emb, ak.TrainableTokens(token_ids=[4, 9], targets="0"))
    randomise(emb)
    vals = emb[0].adapters["default"].token_values
    assert vals.dtype == torch.bfloat16
    out = emb(torch.tensor([[4, 9, 5]]))
    assert torch.equal(out[0, :2], vals.detach())


def test_random_init_changes_the_rows():
    emb = nn.Sequential(nn.Embedding(20, 6))
    w = emb[0].weight.detach().clone()
    ak.inject(emb, ak.TrainableTokens(token_ids=[4, 9], init="random", targets="0"))
    assert not torch.equal(emb(torch.tensor([4])), w[4:5])
    assert torch.equal(emb(torch.tensor([5])), w[5:6])


@pytest.mark.parametrize("kw,match", [
    (dict(token_ids=[]), r"token_ids is empty"),
    (dict(token_ids=[3, 7, 3]), r"token_ids lists \[3\] more than once"),
    (dict(token_ids=[-1]), r"token_ids \[-1\] are negative"),
    (dict(token_ids=[1.5]), r"token_ids must be a list of ints"),
    (dict(token_ids=[1], init="zeros"), r"init='zeros' is not one of"),
])
def test_bad_specs(kw, match):
    with pytest.raises(ak.AdaptkitError, match=match):
        ak.TrainableTokens(**kw)


def test_bad_targets_name_the_field_and_the_layer():
    m = llama(tied=False)
    cases = [
        (dict(token_ids=[64], targets=r"model\.embed_tokens"),
         r"token_ids \[64\] are out of range for 'model\.embed_tokens' \(Embedding with 64 rows\)"),
        (dict(token_ids=[1], targets="lm_head"), r"targets selects 'lm_head' \(Linear\)"),
        (dict(token_ids=[1], targets=r"model\.norm"), r"cannot adapt 'model\.norm' \(LlamaRMSNorm\)"),
    ]
    for kw, match in cases:
        with pytest.raises(ak.AdaptkitError, match=match):
            ak.inject(m, ak.TrainableTokens(**kw))
        assert not any(isinstance(x, AdaptedLayer) for x in m.modules())
    pad = nn.Sequential(nn.Embedding(10, 4, padding_idx=2))
    with pytest.raises(ak.AdaptkitError, match=r"token_ids holds 2, the padding_idx of '0'"):
        ak.inject(pad, ak.TrainableTokens(token_ids=[2, 5], targets="0"))


def test_spec_json_round_trip():
    s = ak.TrainableTokens(token_ids=[49152, 49153], targets=r"model\.embed_tokens")
    d = s.to_dict()
    assert d["token_ids"] == [49152, 49153]
    assert ak.TrainableTokens.from_dict(json.loads(json.dumps(d))) == s


# ---- PEFT interop: PEFT 0.21 as the oracle ------------------------------------------------------
def _peft_model(config, seed=5):
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(llama(), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "trainable_tokens_delta" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    return pm.eval()


def _peft_load(folder):
    peft = pytest.importorskip("peft")
    import warnings
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(llama(), folder).eval()
    assert not [w for w in seen if "missing" in str(w.message) or "nexpected" in str(w.message)]
    return pm


def _keys(folder):
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_peft_trainable_tokens_config_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    x = tokens_in()
    pm = _peft_model(peft.TrainableTokensConfig(token_indices=IDS, target_modules=["embed_tokens"]))
    want = logits(pm, x)
    pm.save_pretrained(tmp_path / "peft")
    m = llama()
    assert ak.peft_compat.read_peft(m, tmp_path / "peft") == ["model.embed_tokens", "lm_head"]
    assert ak.summary(m).per_adapter["default"]["method"] == "trainable_tokens"
    torch.testing.assert_close(logits(m, x), want, atol=1e-5, rtol=1e-5)
    ak.peft_compat.write_peft(m, tmp_path / "back")
    a, b = _keys(tmp_path / "peft"), _keys(tmp_path / "back")
    assert a.keys() == b.keys() == {"base_model.model.model.embed_tokens.trainable_tokens_delta",
                                    "base_model.model.lm_head.trainable_tokens_delta"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(logits(_peft_load(tmp_path / "back"), x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("indices", [IDS, {"embed_tokens": IDS}], ids=["list", "dict"])
def test_peft_lora_with_trainable_token_indices_both_ways(tmp_path, indices):
    peft = pytest.importorskip("peft")
    x = tokens_in()
    cfg = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj"], trainable_token_indices=indices)
    pm = _peft_model(cfg)
    want = logits(pm, x)
    pm.save_pretrained(tmp_path / "peft")
    m = llama()
    paths = ak.peft_compat.read_peft(m, tmp_path / "peft", name="default", tokens_name="tokens")
    assert paths[-2:] == ["model.embed_tokens", "lm_head"] and len(paths) == 6
    assert {n: s.method for n, s in state(m).specs.items()} == \
        {"default": "lora", "tokens": "trainable_tokens"}
    torch.testing.assert_close(logits(m, x), want, atol=1e-5, rtol=1e-5)
    ak.peft_compat.write_peft(m, tmp_path / "back", name="default", tokens="tokens")
    a, b = _keys(tmp_path / "peft"), _keys(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta" in b
    torch.testing.assert_close(logits(_peft_load(tmp_path / "back"), x), want, atol=1e-5, rtol=1e-5)
    merged = ak.merge(m)  # both merged; the head still shares the embedding's Parameter
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    torch.testing.assert_close(logits(merged, x), want, atol=1e-5, rtol=1e-5)


def test_adaptkit_tokens_export_to_peft_and_failed_import_is_clean(tmp_path):
    x = tokens_in()
    m = llama()
    ak.inject(m, ak.TrainableTokens(token_ids=IDS, targets=r"model\.embed_tokens"), name="tok")
    randomise(m, "tok")
    ak.peft_compat.write_peft(m, tmp_path / "tt", name="tok")
    torch.testing.assert_close(logits(_peft_load(tmp_path / "tt"), x), logits(m, x), atol=1e-5, rtol=1e-5)
    cfg = json.loads((tmp_path / "tt" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "TRAINABLE_TOKENS" and cfg["token_indices"] == IDS
    # a LoRA + tokens folder whose tokens do not fit: nothing stays injected
    pm = _peft_model(pytest.importorskip("peft").LoraConfig(r=2, target_modules=["q_proj"],
                                                            trainable_token_indices=IDS))
    pm.save_pretrained(tmp_path / "peft")
    small = llama(vocab=32)
    t = _keys(tmp_path / "peft")
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    assert key in t
    before = copy.deepcopy(small.state_dict())
    flags = {n: p.requires_grad for n, p in small.named_parameters()}
    with pytest.raises(ak.AdaptkitError, match=r"token_ids \[60\] are out of range"):
        ak.peft_compat.read_peft(small, tmp_path / "peft")
    assert not any(isinstance(x, AdaptedLayer) for x in small.modules())
    assert "_adaptkit" not in small.__dict__
    assert all(torch.equal(before[k], v) for k, v in small.state_dict().items())
    assert {n: p.requires_grad for n, p in small.named_parameters()} == flags


def test_swap_into_a_compiled_tied_model_does_not_recompile(tmp_path):
    from torch._dynamo.testing import CompileCounter

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(20, 8), nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(torch.tanh(self.emb(x)))

    base, x = Tied().eval(), torch.tensor([[3, 5, 1, 2]])
    m = copy.deepcopy(base)
    ak.inject(m, ak.TrainableTokens(token_ids=[3, 5], targets="emb"), name="a")
    cnt = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(m, backend=cnt, fullgraph=True)
    with torch.no_grad():
        compiled(x)
        for seed in (1, 2):
            other = copy.deepcopy(base)
            ak.inject(other, ak.TrainableTokens(token_ids=[3, 5], targets="emb"))
            randomise(other, seed=seed)
            ak.save(other, tmp_path / f"{seed}.safetensors")
            assert ak.swap(compiled, tmp_path / f"{seed}.safetensors", name="a") == ["emb", "head"]
            assert torch.equal(compiled(x), other(x))
    assert cnt.frame_count == 1
    torch._dynamo.reset()


def test_to_lora_refuses_a_tied_head():
    m = llama()
    ak.inject(m, ak.TrainableTokens(token_ids=IDS, targets=r"model\.embed_tokens"))
    with pytest.raises(ak.AdaptkitError, match=r"reaches \['lm_head'\] through a weight tied"):
        ak.to_lora(m, "default", rank=2)
    assert list(state(m).specs) == ["default"]
    untied = llama(tied=False)
    ak.inject(untied, ak.TrainableTokens(token_ids=IDS, targets=r"model\.embed_tokens"))
    randomise(untied)
    res = ak.to_lora(untied, "default", rank=3)  # the update has rank 3 (three rows): exact
    assert res.errors["model.embed_tokens"] < 1e-5
