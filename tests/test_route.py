"""ak.route: an adapter per batch row. Each row equals that row run alone with its adapter
active (every method, every base kind the methods share, with and without gradients, under
torch.compile, through transformers' generate with a KV cache); PEFT's ``adapter_names`` is
the oracle for LoRA; bad input is refused before anything changes and leaving the context
restores the active set exactly."""
import importlib

import pytest
import torch
import torch.nn as nn

import adaptkit as ak
from adaptkit.inject import state
from adaptkit.layer import adapted_layers
from adaptkit.merge import merge, unmerge
from adaptkit.methods.dora import DoRAAdapter
from adaptkit.methods.geolora import GeoLoRAAdapter
from adaptkit.methods.lora import LoRAAdapter
from conftest import Conv1D, randomise_adapters

route_mod = importlib.import_module("adaptkit.route")  # ak.route is the function
pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """Embedding -> Linear -> GELU -> GPT-2 Conv1D -> Linear: ids (N, T) -> (N, T, 6)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.fc2 = Conv1D(12, 16)
        self.out = nn.Linear(12, 6)

    def forward(self, ids):
        return self.out(self.fc2(self.act(self.fc1(self.emb(ids)))))


LIN = r"fc1|fc2|out"
# name -> spec; all injected into one model (several methods on the same layers)
SPECS = {
    "lora": ak.LoRA(rank=3, alpha=5.0, targets=r"emb|fc1|fc2|out"),
    "lora4": ak.LoRA(rank=4, alpha=3.0, targets=r"fc1|out"),  # another rank, fewer layers
    "dora": ak.DoRA(rank=2, alpha=3.0, targets=LIN),
    "lokr": ak.LoKr(rank=2, alpha=3.0, targets=LIN),
    "mora": ak.MoRA(rank=3, targets=LIN),
    "geolora": ak.GeoLoRA(rank=2, max_rank=4, targets=LIN),
    "lorampo": ak.LoRAMPO(rank=2, alpha=5.0, targets=LIN),
}
ROWS = ["lora", "dora", None, "lokr", "lora4", "mora", "geolora", "lorampo", "lora", None]


def _net(specs=SPECS):
    torch.manual_seed(0)
    m = Net()
    for name, spec in specs.items():
        ak.inject(m, spec, name=name)
    randomise_adapters(m, 0.3, seed=1)
    return m.eval()


def _alone(model, names, x):
    """Each row run alone with its adapter active (None: the base), stacked."""
    before = list(state(model).active)
    outs = []
    for i, n in enumerate(names):
        if n is None:
            with ak.disabled(model):
                outs.append(model(x[i : i + 1]))
        else:
            ak.set_active(model, n)
            outs.append(model(x[i : i + 1]))
    ak.set_active(model, before)
    return torch.cat(outs)


def _ids(n, t=5):
    return torch.randint(0, 20, (n, t), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_every_method_row_equals_row_alone(grad):
    m, x = _net(), _ids(len(ROWS))
    ak.set_active(m, list(SPECS))  # everything active before: route must switch it all
    with torch.set_grad_enabled(grad):
        ref = _alone(m, ROWS, x)
        ak.set_active(m, list(SPECS))
        with ak.route(m, ROWS):
            got = m(x)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the rows do differ: a broken route would not pass by accident
        assert (ref[0] - ref[2]).abs().max() > 1e-3 and (ref[0] - ref[1]).abs().max() > 1e-3


@pytest.mark.parametrize("bias", [True, False])
def test_fast_form_skips_the_per_adapter_update(monkeypatch, bias):
    """Under no_grad the LoRAs, DoRAs and GeoLoRAs of Linear-like layers run batched (their
    own update is only called for the Embedding, which takes the generic form)."""
    m = _net({k: SPECS[k] for k in ("lora", "lora4", "dora", "lokr", "geolora")})
    if not bias:
        m.fc1.bias = None
    x, names = _ids(6), ["lora", "lora4", None, "dora", "lokr", "geolora"]
    with torch.no_grad():
        ref = _alone(m, names, x)
        kinds = []
        for cls in (LoRAAdapter, DoRAAdapter, GeoLoRAAdapter):
            real = cls.update
            monkeypatch.setattr(cls, "update", lambda s, x, y, layer, real=real: kinds.append(layer.kind) or real(s, x, y, layer))
        with ak.route(m, names):
            got = m(x)
    assert kinds == ["embedding"]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_large_batch_gathers_per_call(monkeypatch):
    monkeypatch.setattr(route_mod, "CACHE_ROWS", 2)
    m, x = _net({k: SPECS[k] for k in ("lora", "lora4", "dora")}), _ids(5)
    names = ["lora4", "dora", None, "lora", "lora4"]
    with torch.no_grad():
        ref = _alone(m, names, x)
        with ak.route(m, names):
            r = m.fc1.adapters and m.fc1._active[0]
            assert r.low_rank.stack is not None
            got = m(x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_training_under_route_gives_each_rows_gradient():
    """The loss summed over rows under route has the gradient of the per-row losses run
    alone (dropout off, so the two are comparable)."""
    specs = {k: SPECS[k] for k in ("lora", "dora", "lokr")}
    m, x = _net(specs), _ids(4)
    names = ["lora", "dora", "lokr", None]
    m.train()
    for n in names:
        if n is not None:
            ak.set_active(m, n)
            m(x[names.index(n) : names.index(n) + 1]).square().sum().backward()
    ref = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    ak.set_active(m, list(specs))  # every adapter trainable
    with ak.route(m, names):
        m(x).square().sum().backward()
    got = {k: p.grad for k, p in m.named_parameters() if p.grad is not None}
    assert set(got) == set(ref) and len(ref) > 6
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4)


def test_qlora_and_qdora_rows():
    torch.manual_seed(0)
    m = Net()
    ak.inject(m, ak.QLoRA(rank=3, alpha=5.0, targets=r"fc1|out"), name="q")
    ak.inject(m, ak.QLoRA(rank=2, alpha=3.0, use_dora=True, targets=r"fc1|out"), name="qd")
    ak.inject(m, ak.LoRA(rank=2, alpha=3.0, targets=r"fc2"), name="l")
    randomise_adapters(m, 0.3, seed=2)
    m.eval()
    x, names = _ids(4), ["qd", "q", None, "l"]
    with torch.no_grad():
        ref = _alone(m, names, x)
        with ak.route(m, names):
            got = m(x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_leaving_restores_the_active_set_also_on_exceptions():
    m = _net()
    ak.set_active(m, ["lora", "dora"])
    before = {p: (l._active, list(l._active_names)) for p, l in adapted_layers(m)}
    with pytest.raises(RuntimeError, match="boom"):
        with ak.route(m, ["lokr", None, "lora"]):
            assert isinstance(m.fc1._active[0], route_mod._Router)
            raise RuntimeError("boom")
    with ak.route(m, ["lokr", None, "lora"]):
        ak.set_active(m, "mora")  # switching inside: put back on leaving
    after = {p: (l._active, list(l._active_names)) for p, l in adapted_layers(m)}
    assert after == before
    assert state(m).active == ["lora", "dora"]
    assert all(p.requires_grad == (".lora." in k or ".dora." in k) for k, p in m.named_parameters()
               if ".adapters." in k)


def _unchanged(m):
    return {p: l._active for p, l in adapted_layers(m)}


@pytest.mark.parametrize("names, match", [
    (["lora", "nope"], r"unknown adapter name\(s\) 'nope'"),
    ("lora", "must be a list"),
    ([], "names is empty"),
    ([3, None], r"unknown adapter name\(s\) 3"),
])
def test_bad_names_refused_before_anything_changes(names, match):
    m = _net()
    before = _unchanged(m)
    with pytest.raises(ak.AdaptkitError, match=match):
        with ak.route(m, names):
            pass
    assert _unchanged(m) == before


def test_merged_adapters_and_nesting_refused():
    m = _net({"lora": SPECS["lora"]})
    merge(m, unload=False)
    before = _unchanged(m)
    with pytest.raises(ak.AdaptkitError, match=r"merged .*'fc1'.*unmerge"):
        with ak.route(m, ["lora"]):
            pass
    assert _unchanged(m) == before
    unmerge(m)
    with ak.route(m, ["lora", None]):
        with pytest.raises(ak.AdaptkitError, match="do not nest"):
            with ak.route(m, [None, "lora"]):
                pass
        assert isinstance(m.fc1._active[0], route_mod._Router)  # the outer route is intact


def test_input_without_the_batch_in_dim0_is_refused():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):  # b sees the tokens of every row flattened: (N*T, 4)
            return self.b(self.a(x).reshape(-1, 4))

    m = Flat()
    ak.inject(m, ak.LoRA(rank=2, targets="a|b"), name="x")
    with ak.route(m, ["x", None]), torch.no_grad():
        with pytest.raises(ak.AdaptkitError, match=r"'b' has shape \[6, 4\].*batch of 2 rows"):
            m(torch.randn(2, 3, 4))


def test_torch_compile_equals_eager_across_route_contexts():
    """One compiled model, entered under several routings (same structure, rows permuted;
    a revisit): every call reads the current context's factors, none is stale."""
    specs = {k: SPECS[k] for k in ("lora", "lora4", "dora", "lokr")}
    m, x = _net(specs), _ids(4)
    routings = [["lora", "dora", None, "lokr"], ["dora", "lora", "lokr", None], ["lora4", "lora", "lora", "lora4"]]
    c = torch.compile(m, backend="aot_eager")
    with torch.no_grad():
        for names in routings + routings[:1]:
            ref = _alone(m, names, x)
            with ak.route(m, names):
                got = c(x)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# ---- transformers: generate with a KV cache; PEFT's adapter_names as the oracle ------------
tf = pytest.importorskip("transformers")


def _llama():
    torch.manual_seed(0)
    m = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    return m.eval()


PROJ = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def test_generate_with_kv_cache_rows_equal_rows_alone():
    m = _llama()
    ak.inject(m, ak.LoRA(rank=4, alpha=8.0, targets=PROJ), name="a")
    ak.inject(m, ak.DoRA(rank=2, alpha=3.0, targets=PROJ), name="b")
    ak.inject(m, ak.LoKr(rank=2, alpha=3.0, targets=PROJ), name="c")
    randomise_adapters(m, 0.2, seed=4)
    ids = torch.randint(3, 64, (4, 6), generator=torch.Generator().manual_seed(5))
    names = ["a", "b", None, "c"]
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        with ak.route(m, names):
            out = m.generate(ids, **kw)
        for i, n in enumerate(names):
            if n is None:
                with ak.disabled(m):
                    one = m.generate(ids[i : i + 1], **kw)
            else:
                ak.set_active(m, n)
                one = m.generate(ids[i : i + 1], **kw)
            assert torch.equal(out.sequences[i], one.sequences[0])
            for s, s1 in zip(out.scores, one.scores):
                torch.testing.assert_close(s[i], s1[0], atol=1e-5, rtol=1e-5)
    assert len({tuple(s.tolist()) for s in out.sequences}) > 1


def test_lora_equals_peft_adapter_names():
    peft = pytest.importorskip("peft")
    m = _llama()
    names = ("u", "v")
    for n, (r, alpha) in zip(names, ((4, 8.0), (2, 3.0))):
        ak.inject(m, ak.LoRA(rank=r, alpha=alpha, targets=PROJ), name=n)
    randomise_adapters(m, 0.2, seed=6)
    pm = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=PROJ), adapter_name="u")
    pm.add_adapter("v", peft.LoraConfig(r=2, lora_alpha=3.0, target_modules=PROJ))
    with torch.no_grad():
        for path, layer in adapted_layers(m):
            pl = pm.base_model.model.get_submodule(path)
            for n in names:
                pl.lora_A[n].weight.copy_(layer.adapters[n].lora_A)
                pl.lora_B[n].weight.copy_(layer.adapters[n].lora_B)
    pm.eval()
    ids = torch.randint(3, 64, (5, 7), generator=torch.Generator().manual_seed(7))
    rows = ["v", "u", None, "u", "v"]
    with torch.no_grad():
        ref = pm(input_ids=ids, adapter_names=["__base__" if n is None else n for n in rows]).logits
        with ak.route(m, rows):
            got = m(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (ref[0] - ref[1]).abs().max() > 1e-3


def test_route_on_moe_expert_parameters_equals_each_row_alone():
    """transformers Mixtral with LoRA on attention and on the 3-D expert weights
    (target_parameters), two adapters and the base mixed over rows: each row equals that row
    run alone with its adapter; the experts see the rows' tokens flattened (MoE dispatch)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    for name in ("a", "b"):
        spec = ak.LoRA(rank=2, alpha=3, targets=r".*\.(q|v)_proj", target_parameters=r".*\.experts\.(gate_up|down)_proj")
        ak.inject(model, spec, name=name)
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, 0, 0.3)  # every adapter non-zero, the two different
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(1))
    rows = ["a", None, "b"]
    with torch.no_grad():
        with ak.route(model, rows):
            mixed = model(ids).logits
        for i, n in enumerate(rows):
            if n is None:
                with ak.disabled(model):
                    alone = model(ids[i : i + 1]).logits
            else:
                ak.set_active(model, [n])
                alone = model(ids[i : i + 1]).logits
            torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)
        ak.set_active(model, ["a"])
        other = model(ids[2:3]).logits  # the experts' adapters do change the answer
        assert (other - mixed[2:3]).abs().max() > 1e-3
    assert all("_ak_route" not in m.__dict__ for m in model.modules())  # left the context clean
