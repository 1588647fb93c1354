"""Real transformers models: tiny *random* LlamaForCausalLM, GPT-2 (GPT2LMHeadModel, Conv1D
layers), BertForSequenceClassification and BertModel built from configs (no hub download),
each with every method that applies. Per model x method: output unchanged at init, a
training step moves only adapter parameters (every one gets a gradient), the loss falls over
a few steps, save / load into a fresh model is bit-exact, merge restores the original module
classes and state-dict keys with equal outputs, and generate() runs for the causal LMs.
Gradient checkpointing (reentrant and not) gives the same adapter gradients as a plain run,
with the input-embedding hook of ``ak.inject`` doing what ``enable_input_require_grads``
does in transformers."""
import copy
import warnings

import pytest
import torch

import adaptkit as ak
from adaptkit.layer import AdaptedLayer
from conftest import randomise_adapters

tf = pytest.importorskip("transformers")
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread")]

VOCAB, T = 64, 8


# ---- models ---------------------------------------------------------------------------------
def _llama():
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0))


def _gpt2():
    return tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0))


def _bert_config():
    return tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, num_labels=3, pad_token_id=0)


# name -> builder; every builder is seeded, so two calls give the same random base
MODELS = {
    "llama": _llama,
    "gpt2": _gpt2,
    "bert_cls": lambda: tf.BertForSequenceClassification(_bert_config()),
    "bert": lambda: tf.BertModel(_bert_config()),
}
CAUSAL = ("llama", "gpt2")


def build(model: str):
    torch.manual_seed(1234)
    m = MODELS[model]()
    m.train()
    return m


def batch(model: str) -> dict:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (2, T), generator=g)
    if model in CAUSAL:
        return {"input_ids": ids}
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, -3:] = 0  # padded second row: the attention mask reaches the adapted layers
    return {"input_ids": ids, "attention_mask": mask}


def output(m, model: str, b: dict) -> torch.Tensor:
    out = m(**b)
    return out.last_hidden_state if model == "bert" else out.logits


def loss(m, model: str, b: dict) -> torch.Tensor:
    if model in CAUSAL:
        return m(**b, labels=b["input_ids"]).loss
    if model == "bert_cls":
        return m(**b, labels=torch.tensor([0, 2])).loss
    target = torch.linspace(-1, 1, 32)  # BertModel: regress every token state to a vector
    return (output(m, model, b) - target).pow(2).mean()


# ---- methods ---------------------------------------------------------------------------------
# name -> (spec factory, init atol (None: exact), merged-vs-unmerged atol)
METHODS = {
    "lora": (lambda: ak.LoRA(rank=4, alpha=8, targets="all-linear"), None, 1e-5),
    "dora": (lambda: ak.DoRA(rank=4, alpha=8, targets="all-linear"), 1e-6, 1e-5),
    "lokr": (lambda: ak.LoKr(rank=4, alpha=8, targets="all-linear"), None, 1e-5),
    "mora": (lambda: ak.MoRA(rank=4, mora_type=6, targets="all-linear"), None, 1e-5),
    "geolora": (lambda: ak.GeoLoRA(rank=4, max_rank=8, targets="all-linear"), None, 1e-5),
    # residual (PiSSA-style) init: the output is equal up to the rounding of W - s ΔW
    "lorampo": (lambda: ak.LoRAMPO(rank=2, alpha=4, targets="all-linear"), 1e-5, 1e-5),
    # NF4 base: at init the output equals the same model disabled (the dequantised base);
    # merge builds a dense weight from the dequantised W + ΔW (measured diffs 1e-7..5e-7)
    "qlora": (lambda: ak.QLoRA(rank=4, alpha=8, targets="all-linear"), None, 1e-5),
}
# QLoRA vs the float model: bound on ||out - ref|| / ||ref|| at init. Measured (seeded
# models): llama 0.056, bert_cls 0.136 (tiny logits), bert 0.0028. A dropped double-quant
# offset gives 0.39 / 1.03 / 0.021, swapped nibbles 0.52 / 1.12 / 0.024, and each block
# scaled by its neighbour's absmax 0.111 / 0.173 / 0.0068.
QLORA_REL_ERR = {"llama": 0.08, "bert_cls": 0.16, "bert": 0.004}

# QLoRA quantises nn.Linear only: GPT-2's transposed Conv1D stays float (and is refused, below)
CASES = [(m, k) for m in MODELS for k in METHODS if (m, k) != ("gpt2", "qlora")]


def optimizer(m, method: str, lr: float = 1e-2):
    if method == "geolora":  # augment, 2 coefficient steps (the last one truncates), repeat
        return ak.GeoLoRAOptimizer(m, lr=3 * lr, coeff_steps=2)
    return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)


def adapter_params(m) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in m.named_parameters() if ".adapters." in n}


def train(m, model, method, steps, b=None):
    b = b or batch(model)
    opt, losses = optimizer(m, method), []
    for _ in range(steps):
        lo = loss(m, model, b)
        lo.backward()
        opt.step()
        opt.zero_grad()
        losses.append(lo.item())
    return losses


def inject(model, method):
    m = build(model)
    return m, ak.inject(m, METHODS[method][0]())


# ---- per model x method ------------------------------------------------------------------------
@pytest.mark.parametrize("model,method", CASES)
def test_init_train_step_and_loss(model, method):
    b = batch(model)
    m = build(model)
    with torch.no_grad():
        ref = output(m, model, b)
    paths = ak.inject(m, METHODS[method][0]())
    kinds = {m.get_submodule(p).kind for p in paths}
    assert kinds == ({"conv1d_t"} if model == "gpt2" else {"linear"})
    head = {"llama": "lm_head", "gpt2": "lm_head", "bert_cls": "classifier", "bert": "pooler.dense"}
    assert head[model] not in paths  # "all-linear" leaves the output head alone
    with torch.no_grad():
        out = output(m, model, b)
    tol = METHODS[method][1]
    if method == "qlora":  # the base is NF4 now: the reference is the same model, disabled
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel < QLORA_REL_ERR[model], f"NF4 model vs float: relative error {rel:.4f}"
        with torch.no_grad(), ak.disabled(m):
            ref = output(m, model, b)
    if tol is None:
        assert torch.equal(out, ref), f"{method} changed the output at init"
    else:
        torch.testing.assert_close(out, ref, atol=tol, rtol=0)

    base = {n: p.detach().clone() for n, p in m.named_parameters() if ".adapters." not in n}
    ad = adapter_params(m)
    assert ad and all(p.requires_grad for p in ad.values())
    assert not any(p.requires_grad for n, p in m.named_parameters() if n in base)
    before = {n: p.detach().clone() for n, p in ad.items()}
    lo = loss(m, model, b)
    lo.backward()
    missing = [n for n, p in ad.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no / non-finite gradient for {missing[:4]}"
    assert all(m.get_parameter(n).grad is None for n in base)
    opt = optimizer(m, method)
    opt.step()
    opt.zero_grad()
    for n, p in m.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"base parameter {n} changed"
    assert any(not torch.equal(p, before[n]) for n, p in adapter_params(m).items())

    losses = [lo.item()] + train(m, model, method, 5, b)
    assert losses[-1] < losses[0] - 1e-3, f"{method} on {model}: loss {losses}"


@pytest.mark.parametrize("model,method", CASES)
def test_save_load_bit_exact(model, method, tmp_path):
    b = batch(model)
    m, paths = inject(model, method)
    train(m, model, method, 2, b)
    ak.save(m, tmp_path / "a.safetensors")
    fresh = build(model)
    assert ak.load(fresh, tmp_path / "a.safetensors") == paths
    # state dicts: GeoLoRA's holds the active-rank slices of its preallocated factors
    got, want = (({k: v for k, v in x.state_dict().items() if ".adapters." in k}) for x in (fresh, m))
    assert got.keys() == want.keys() and got
    for n in want:
        assert torch.equal(got[n], want[n]), n
    m.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(output(fresh, model, b), output(m, model, b))


@pytest.mark.parametrize("model,method", CASES)
def test_merge_restores_plain_model(model, method):
    b = batch(model)
    plain = build(model)
    classes = [(n, type(x)) for n, x in plain.named_modules()]
    keys = list(plain.state_dict())
    m, _ = inject(model, method)
    train(m, model, method, 2, b)
    m.eval()
    with torch.no_grad():
        adapted = output(m, model, b)
    merged = ak.merge(m)
    assert [(n, type(x)) for n, x in merged.named_modules()] == classes
    assert list(merged.state_dict()) == keys
    assert not any(isinstance(x, AdaptedLayer) for x in merged.modules())
    assert all(p.requires_grad for p in merged.parameters())  # the original flags are back
    with torch.no_grad():
        out = output(merged, model, b)
    torch.testing.assert_close(out, adapted, atol=METHODS[method][2], rtol=1e-5)
    plain.load_state_dict(merged.state_dict(), strict=True)  # a plain checkpoint again


@pytest.mark.parametrize("model,method", [c for c in CASES if c[0] in CAUSAL])
def test_generate(model, method):
    """Greedy generation through the KV cache equals the argmax of one full forward over the
    generated sequence (the adapted layers see the cached, incremental inputs correctly)."""
    m, _ = inject(model, method)
    train(m, model, method, 1)
    m.eval()
    ids = batch(model)["input_ids"]
    with torch.no_grad():
        seq = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                         do_sample=False, pad_token_id=0)
        assert seq.shape == (2, T + 5) and torch.equal(seq[:, :T], ids)
        full = m(seq).logits  # (2, T + 5, vocab)
    assert torch.equal(full[:, T - 1:-1].argmax(-1), seq[:, T:])


@pytest.mark.parametrize("model", ["llama", "bert_cls"])
def test_lora_attention_and_embedding_targets(model, tmp_path):
    """Regex targets on the attention projections plus the input embedding (LoRA adapts
    nn.Embedding): train, save / load, merge."""
    targets = {"llama": [r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj", r"model\.embed_tokens"],
               "bert_cls": [r".*attention\.self\.(query|key|value)", r".*word_embeddings"]}[model]
    b = batch(model)
    m = build(model)
    paths = ak.inject(m, ak.LoRA(rank=4, alpha=8, targets=targets))
    assert len(paths) == 2 * (4 if model == "llama" else 3) + 1
    train(m, model, "lora", 3, b)
    ak.save(m, tmp_path / "a.safetensors")
    fresh = build(model)
    ak.load(fresh, tmp_path / "a.safetensors")
    m.eval(), fresh.eval()
    with torch.no_grad():
        adapted = output(m, model, b)
        assert torch.equal(output(fresh, model, b), adapted)
        torch.testing.assert_close(output(ak.merge(m), model, b), adapted, atol=1e-5, rtol=1e-5)


# ---- gradient checkpointing ------------------------------------------------------------------
def _checkpointing(m, reentrant: bool, hf_hook: bool) -> None:
    with warnings.catch_warnings():  # transformers 5 renamed it activation_checkpointing_enable
        warnings.simplefilter("ignore", FutureWarning)
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if not hf_hook:
        # transformers >= 5 adds its own enable_input_require_grads hook here; transformers 4
        # did so only for its PEFT integration. Drop it: adaptkit's hook must do the job.
        m.disable_input_require_grads()


def _grads(model, method, gc=None, hf_hook=False, before_inject=False):
    m = build(model)
    if gc is not None and before_inject:
        _checkpointing(m, gc, hf_hook)
    ak.inject(m, METHODS[method][0]())
    torch.manual_seed(0)  # non-zero adapters: every factor's gradient is non-trivial
    randomise_adapters(m, 0.1, add=True)
    if gc is not None and not before_inject:
        _checkpointing(m, gc, hf_hook)
    loss(m, model, batch(model)).backward()
    return m, {n: p.grad for n, p in adapter_params(m).items()}


GC_METHODS = list(METHODS)


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("model", ["llama", "bert_cls"])
@pytest.mark.parametrize("method", GC_METHODS)
def test_gradient_checkpointing_same_adapter_grads(model, method, reentrant):
    _, ref = _grads(model, method)
    m, got = _grads(model, method, gc=reentrant, before_inject=method == "lora")
    assert any(getattr(x, "gradient_checkpointing", False) is True for x in m.modules())
    assert got.keys() == ref.keys()
    for n in ref:
        assert got[n] is not None, f"{n}: no gradient under checkpointing"
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("model", ["llama", "bert_cls"])
def test_gradient_checkpointing_with_transformers_hook_too(model):
    _, ref = _grads(model, "lora")
    _, got = _grads(model, "lora", gc=True, hf_hook=True)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=1e-5)


def test_reentrant_checkpointing_needs_the_hook():
    """Control: without adaptkit's hook (and transformers'), reentrant checkpointing over a
    frozen embedding leaves the adapters without gradient: the hook is what fixes it."""
    m = build("llama")
    ak.inject(m, METHODS["lora"][0]())
    _checkpointing(m, True, hf_hook=False)
    m.__dict__["_adaptkit"].input_hook.remove()
    with pytest.raises(RuntimeError, match="does not require grad"):
        loss(m, "llama", batch("llama")).backward()


def _ours(m) -> list:
    from adaptkit.inject import _InputGrads
    return [h for h in m.get_input_embeddings()._forward_hooks.values() if isinstance(h, _InputGrads)]


def test_input_grad_hook_lifecycle():
    b = batch("llama")
    m = build("llama")
    emb = m.get_input_embeddings()
    ak.inject(m, ak.LoRA(rank=2, targets=r".*q_proj"), name="a")
    ak.inject(m, ak.LoRA(rank=2, targets=r".*v_proj"), name="b")
    assert len(_ours(m)) == 1  # one hook, however many adapters
    seen = []
    emb.register_forward_hook(lambda mod, i, o: seen.append(o.requires_grad))
    m(**b)
    assert seen[-1] is False  # checkpointing off: no extra input gradient
    _checkpointing(m, True, hf_hook=False)
    m(**b)
    assert seen[-1] is True
    with torch.no_grad():
        m(**b)
    m.eval()
    m(**b)
    assert seen[-2:] == [False, False]  # never under no_grad or in eval
    m.train()
    ak.delete(m, "a")
    assert len(_ours(m)) == 1
    ak.delete(m, "b")  # the last adapter: the hook goes with it
    assert _ours(m) == []
    ak.inject(m, ak.LoRA(rank=2, targets=r".*q_proj"))
    assert len(_ours(m)) == 1
    merged = ak.merge(m)
    assert _ours(merged) == []


def test_input_grad_hook_follows_an_adapted_embedding():
    """LoRA on the embedding itself: the hook sits on the wrapper while it exists, the
    embedding output then requires grad anyway, and delete / merge leave no hook behind."""
    m = build("llama")
    ak.inject(m, ak.LoRA(rank=2, targets=r".*q_proj"), name="a")
    ak.inject(m, ak.LoRA(rank=2, targets=r"model\.embed_tokens"), name="emb")
    assert isinstance(m.get_input_embeddings(), AdaptedLayer) and len(_ours(m)) == 1
    ak.delete(m, "emb")
    assert not isinstance(m.get_input_embeddings(), AdaptedLayer) and len(_ours(m)) == 1
    ak.inject(m, ak.LoRA(rank=2, targets=r"model\.embed_tokens"), name="emb")
    _checkpointing(m, True, hf_hook=False)
    loss(m, "llama", batch("llama")).backward()
    assert all(p.grad is not None for p in adapter_params(m).values())
    merged = ak.merge(m)
    assert _ours(merged) == [] and not merged.get_input_embeddings()._forward_hooks


def test_deepcopy_of_injected_model_keeps_its_own_hook():
    m = build("llama")
    ak.inject(m, METHODS["lora"][0]())
    c = copy.deepcopy(m)
    (h,) = _ours(c)
    assert all(any(f is x for x in c.modules()) for f in h.flags)  # the copy's flags, not m's
    _checkpointing(c, True, hf_hook=False)
    loss(c, "llama", batch("llama")).backward()
    assert all(p.grad is not None for p in adapter_params(c).values())


def test_qlora_refuses_gpt2_conv1d_and_changes_nothing():
    m = build("gpt2")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ak.AdaptkitError, match=r"QLoRA cannot adapt 'transformer\.h\.0\.attn\.c_attn', .* \(Conv1D\)"):
        ak.inject(m, ak.QLoRA(rank=4, targets="all-linear"))
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert not any(isinstance(x, ak.layer.AdaptedLayer) for x in m.modules())
