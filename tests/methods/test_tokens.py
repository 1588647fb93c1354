"""ak.TrainableTokens: rows of an embedding, a tied lm_head, the file, stacking with LoRA,
bad input and PEFT interop (a tiny transformers Llama with tied embeddings as the oracle)."""
import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

import adaptkit as ak
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
