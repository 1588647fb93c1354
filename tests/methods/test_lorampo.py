"""LoRA-MPO (adaptkit/methods/lorampo.py): "lora" mode equals LoRA's PiSSA init bit for bit,
"kron" mode starts at the top-r Kronecker SVD with an unchanged output, the einsum forward
equals the dense reference without building the (out, in) Kronecker sum, save / load, errors."""
import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

import adaptkit as ak
import adaptkit.methods.lorampo as lorampo_mod
from adaptkit.methods.lorampo import LoRAMPOAdapter, num_params
from adaptkit.mpo import balanced_factors, kron_decompose, kron_reconstruct
from conftest import Conv1D, randomise_adapters


class Net(nn.Module):
    def __init__(self, *layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for m in self.layers:
            x = torch.tanh(m(x))
        return x


def _linear(out, inp, bias=True):
    m = nn.Linear(inp, out, bias=bias)
    nn.init.normal_(m.weight, std=0.3)
    return m


# ------------------------------------------------------------------ "lora" mode == PiSSA
@pytest.mark.parametrize("kind", ["linear", "gpt2_conv1d"])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_mode_equals_pissa_exactly(kind, rslora):
    make = _linear if kind == "linear" else Conv1D
    base = Net(make(40, 48), make(40, 40))
    ref, mine = copy.deepcopy(base), copy.deepcopy(base)
    ak.inject(ref, ak.LoRA(rank=5, alpha=7.0, init="pissa", use_rslora=rslora, targets=r"layers\.\d"))
    ak.inject(mine, ak.LoRAMPO(rank=5, alpha=7.0, mode="lora", use_rslora=rslora, targets=r"layers\.\d"))
    for lr, lm in zip(ref.layers, mine.layers):
        a, b = lr.adapters["default"], lm.adapters["default"]
        n_in = lm.in_features
        assert b.out_shape == (40, 1) and b.in_shape == (1, n_in) and b.b_first
        assert torch.equal(b.mpo_A.view(40, 5), a.lora_B)      # (out, 1, r) -> (out, r)
        assert torch.equal(b.mpo_B.view(5, n_in), a.lora_A)    # (r, 1, in) -> (r, in)
        assert torch.equal(lm.weight, lr.weight)               # the residual W - s B A
        assert torch.equal(b.delta_weight(lm), a.delta_weight(lr))
    x = torch.randn(3, 48)
    torch.testing.assert_close(mine(x), ref(x), rtol=1e-6, atol=1e-6)


def test_kron_svd_with_lora_shapes_is_pissa_up_to_sign():
    """The MPO claim behind "lora" mode: the Kronecker SVD with shapes (out, 1) / (1, in) is the
    SVD, so the generic "kron" code path gives PiSSA's factors up to a sign per component."""
    base = Net(_linear(20, 24))
    lora, kron = copy.deepcopy(base), copy.deepcopy(base)
    ak.inject(lora, ak.LoRAMPO(rank=4, alpha=6.0, mode="lora", targets=r"layers\.0"))
    ak.inject(kron, ak.LoRAMPO(rank=4, alpha=6.0, out_shape=(20, 1), in_shape=(1, 24), targets=r"layers\.0"))
    a, b = lora.layers[0].adapters["default"], kron.layers[0].adapters["default"]
    sign = torch.sign((a.mpo_A * b.mpo_A).sum((0, 1)))        # (r,)
    assert sign.abs().eq(1).all()
    torch.testing.assert_close(b.mpo_A, a.mpo_A * sign, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.mpo_B, a.mpo_B * sign[:, None, None], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kron.layers[0].weight, lora.layers[0].weight, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ "kron" mode init
@pytest.mark.parametrize("out,inp,rank", [(20, 24, 3), (64, 48, 8), (36, 36, 36)])
def test_kron_init_is_top_r_kronecker_svd_and_keeps_W(out, inp, rank):
    base = Net(_linear(out, inp))
    w0 = base.layers[0].weight.detach().clone()
    model = copy.deepcopy(base)
    ak.inject(model, ak.LoRAMPO(rank=rank, alpha=2.5 * rank, targets=r"layers\.0"))
    layer = model.layers[0]
    ad = layer.adapters["default"]
    o, i = balanced_factors(out, 2), balanced_factors(inp, 2)
    assert ad.out_shape == o and ad.in_shape == i
    assert ad.mpo_A.shape == (o[0], i[0], rank) and ad.mpo_B.shape == (rank, o[1], i[1])
    assert ak.summary(model).trainable == num_params(o, i, rank) == rank * (o[0] * i[0] + o[1] * i[1])
    kd = kron_decompose(w0.double(), o, i, rank)
    want = kron_reconstruct(kd.a, kd.b, kd.s)                  # top-r Van Loan optimum
    delta = ad.delta_weight(layer)
    torch.testing.assert_close(delta.double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.weight.double() + delta.double(), w0.double(), rtol=0, atol=1e-5)
    full = kron_decompose(w0.double(), o, i)
    err = (w0.double() - delta.double()).norm()                # Eckart-Young: the tail energy
    torch.testing.assert_close(err, full.s[rank:].norm(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "gpt2_conv1d"])
@pytest.mark.parametrize("rslora", [False, True])
def test_fresh_kron_adapter_keeps_output(kind, rslora):
    make = _linear if kind == "linear" else Conv1D
    base = Net(make(30, 24), make(13, 30))                     # 13 is prime: shapes (1, 13)
    model = copy.deepcopy(base)
    ak.inject(model, ak.LoRAMPO(rank=4, alpha=11.0, use_rslora=rslora, targets=r"layers\.\d"))
    assert model.layers[1].adapters["default"].out_shape == (1, 13)
    assert not torch.equal(model.layers[0].weight, base.layers[0].weight)  # a residual was taken
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(model(x), base(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ forward == dense reference
def _kron_ref(ad):
    """s * sum_k torch.kron(A[..., k], B[k]), independent of delta_weight's rearrangement."""
    A, B = ad.mpo_A.double(), ad.mpo_B.double()
    return ad.scale * sum(torch.kron(A[:, :, k], B[k]) for k in range(ad.rank))


SHAPES = [  # (out, in, out_shape, in_shape, mode)
    (20, 24, None, None, "kron"),
    (20, 24, (4, 5), (6, 4), "kron"),          # A-first is the cheaper order here
    (24, 20, (2, 12), (5, 4), "kron"),
    (13, 30, None, None, "kron"),
    (16, 16, (1, 16), (16, 1), "kron"),
    (20, 24, None, None, "lora"),
]


@pytest.mark.parametrize("out,inp,oshape,ishape,mode", SHAPES)
@pytest.mark.parametrize("order", ["auto", "a_first", "b_first", "dense"])
def test_forward_equals_dense_reference(out, inp, oshape, ishape, mode, order):
    model = Net(_linear(out, inp))
    ak.inject(model, ak.LoRAMPO(rank=3, alpha=5.0, mode=mode, out_shape=oshape, in_shape=ishape,
                                targets=r"layers\.0"))
    randomise_adapters(model, 0.2)
    layer = model.layers[0]
    ad = layer.adapters["default"]
    if order != "auto":  # force one route: a factored order, or the dense ΔW matmul
        ad.b_first = order == "b_first"
        ad.dense_from = 0 if order == "dense" else float("inf")
    torch.testing.assert_close(ad.delta_weight(layer).double(), _kron_ref(ad), rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 3, inp)
    want = nn.functional.linear(x.double(), layer.weight.double() + _kron_ref(ad), layer.bias.double())
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)


def test_dense_route_from_the_token_count_where_it_is_cheaper():
    # (32, 32) -> (4, 8) x (4, 8): factored F = r*(32*8 + 32*4) = 384 r MACs per token, dense
    # D = 1024; the cost model's crossover 3 r D / (2 F - 0.8 D) at rank 8: 24576 / 5324.8 = 4.6
    model = Net(_linear(32, 32))
    ak.inject(model, ak.LoRAMPO(rank=8, alpha=3.0, targets=r"layers\.0"))
    randomise_adapters(model, 0.2)
    layer = model.layers[0]
    ad = layer.adapters["default"]
    assert ad.dense_from == pytest.approx(24576 / 5324.8)
    calls = []
    real = lorampo_mod.kron_apply  # the factored route's contraction
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lorampo_mod, "kron_apply", lambda *a, **k: calls.append(1) or real(*a, **k))
        for n, factored in ((4, True), (5, False), (64, False)):
            calls.clear()
            x = torch.randn(n, 32)
            want = nn.functional.linear(x.double(), layer.weight.double() + _kron_ref(ad),
                                        layer.bias.double())
            torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)
            assert bool(calls) == factored, n
    # a low rank never goes dense: 2 F <= 0.8 D
    m2 = Net(_linear(32, 32))
    ak.inject(m2, ak.LoRAMPO(rank=1, targets=r"layers\.0"))
    assert m2.layers[0].adapters["default"].dense_from == float("inf")


def test_dense_route_folds_into_the_base_matmul_only_when_exact():
    """First active, fp32 W, no dropout in training: ``x (W + s ΔW)^T`` in one matmul (the
    base op sees a weight other than W); otherwise ΔW x is added in apply. Same function."""
    def build(**kw):
        model = Net(_linear(32, 32))
        ak.inject(model, ak.LoRAMPO(rank=8, alpha=3.0, targets=r"layers\.0", **kw))
        randomise_adapters(model, 0.2)
        return model, model.layers[0]
    x = torch.randn(16, 32)                              # 16 >= dense_from (4.6)
    model, layer = build()
    ad = layer.adapters["default"]
    seen = []
    real_op, real_fwd = layer.base.op, layer.base.forward  # the Base runs every base computation:
    layer.base.op = lambda l_, x_, w, b: seen.append(w is layer.weight) or real_op(l_, x_, w, b)
    layer.base.forward = lambda l_, x_: seen.append(True) or real_fwd(l_, x_)  # its own W
    want = nn.functional.linear(x.double(), layer.weight.double() + _kron_ref(ad), layer.bias.double())
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)
    assert seen == [False]                               # folded: W + s ΔW went to the base op
    seen.clear()
    layer(x[:4])                                         # below dense_from: plain base, einsums
    assert seen == [True]
    # not first in the active set: the dense route runs in apply, after another adapter
    ak.inject(model, ak.LoRA(rank=2, alpha=2, targets=r"layers\.0"), name="first")
    layer.set_active(["first", "default"])
    randomise_adapters(model, 0.2)
    seen.clear()
    want = nn.functional.linear(x.double(), layer.dense_weight(["first", "default"]).double(),
                                layer.bias.double())
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)
    assert False not in seen  # W itself (LoRA's fused node computes it outside the Base), never W + s ΔW
    # dropout in training never folds (the base must see x, the adapter dropout(x))
    _, layer2 = build(dropout=0.5)
    ad2 = layer2.adapters["default"]
    assert not ad2._folds(x, layer2.train()) and ad2._folds(x, layer2.eval())


def test_contraction_order_is_the_cheaper_one():
    def order(out, inp, o, i):
        m = Net(_linear(out, inp))
        ak.inject(m, ak.LoRAMPO(rank=2, out_shape=o, in_shape=i, targets=r"layers\.0"))
        return m.layers[0].adapters["default"].b_first
    assert order(20, 24, (4, 5), (4, 6))         # B first: 24*5 + 20*4 = 200 < 24*4 + 20*6 = 216
    assert not order(20, 24, (4, 5), (6, 4))     # A first: 24*4 + 20*4 = 176 < 24*5 + 20*6 = 240


class _Shapes(TorchDispatchMode):
    """Records the element count of every tensor an aten op produces."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numels.append((str(func), tuple(t.shape), t.numel()))
        return out


@pytest.mark.parametrize("mode", ["kron", "lora"])
def test_forward_never_builds_the_dense_delta(mode, monkeypatch):
    out, inp = 96, 128                                    # (8, 12) x (8, 16)
    model = Net(_linear(out, inp))
    ak.inject(model, ak.LoRAMPO(rank=2, alpha=3.0, mode=mode, targets=r"layers\.0"))
    randomise_adapters(model, 0.2)
    layer = model.layers[0]
    ad = layer.adapters["default"]
    x = torch.randn(2, inp, requires_grad=True)
    want = nn.functional.linear(x.detach(), layer.dense_weight(["default"]), layer.bias.detach())

    def boom(*a, **k):
        raise AssertionError("the forward called delta_weight / a dense Kronecker product")
    monkeypatch.setattr(LoRAMPOAdapter, "delta_weight", boom)
    monkeypatch.setattr(torch, "kron", boom)
    y0 = nn.functional.linear(x.detach(), layer.weight, layer.bias)  # base part, outside the record
    with _Shapes() as rec:
        y = ad.update(x, y0, layer)                        # the adapter's part of the forward
        y.sum().backward()                                # and its backward
    assert rec.numels, "nothing recorded"
    biggest = max(rec.numels, key=lambda r: r[2])
    assert biggest[2] < out * inp // 4, biggest           # far below a (96, 128) temporary
    torch.testing.assert_close(y.detach(), want, rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training():
    model = Net(_linear(20, 24))
    ak.inject(model, ak.LoRAMPO(rank=3, dropout=0.5, targets=r"layers\.0"))
    randomise_adapters(model, 0.2)
    x = torch.randn(4, 24)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.equal(a, model(x))


# ------------------------------------------------------------------ save / load
@pytest.mark.parametrize("kw", [dict(), dict(out_shape=(2, 15), in_shape=(6, 4)), dict(mode="lora"),
                                dict(init_niter=1)])
def test_save_load_round_trip(kw, tmp_path):
    base = Net(_linear(30, 24), Conv1D(30, 30))
    model = copy.deepcopy(base)
    spec = ak.LoRAMPO(rank=3, alpha=4.0, targets=r"layers\.0", **kw) if "out_shape" in kw else \
        ak.LoRAMPO(rank=3, alpha=4.0, targets=r"layers\.\d", **kw)
    ak.inject(model, spec)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):                                   # trained factors, not the init
        x = torch.randn(8, 24)
        (model(x) - 1).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    f = tmp_path / "a.safetensors"
    ak.save(model, f)
    with safe_open(str(f), "pt") as fh:
        meta = fh.metadata()
        keys = set(fh.keys())
    assert all(k.endswith((".mpo_A", ".mpo_B")) for k in keys)
    assert ak.LoRAMPO.from_dict(json.loads(meta["adaptkit.spec"])) == spec
    other = copy.deepcopy(base)
    ak.load(other, f)                                    # residual recomputed from W, factors loaded
    sd, sd2 = model.state_dict(), other.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    x = torch.randn(5, 24)
    assert torch.equal(model(x), other(x))
    torch.testing.assert_close(ak.merge(other)(x), model(x), rtol=1e-5, atol=1e-5)


def test_load_refuses_other_factor_shapes(tmp_path):
    base = Net(_linear(20, 24))
    model = copy.deepcopy(base)
    ak.inject(model, ak.LoRAMPO(rank=2, targets=r"layers\.0"))
    f = tmp_path / "a.safetensors"
    ak.save(model, f)
    with safe_open(str(f), "pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    layers = json.loads(meta["adaptkit.layers"])
    layers["layers.0"]["state"]["out_shape"] = [5, 4]    # as if a different calculator wrote it
    meta["adaptkit.layers"] = json.dumps(layers)
    save_file(tensors, str(f), metadata=meta)
    other = copy.deepcopy(base)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ak.AdaptkitError, match=r"layers\.0.*out_shape=\[5, 4\].*\[4, 5\]"):
        ak.load(other, f)
    assert type(other.layers[0]) is nn.Linear
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("kw,match", [
    (dict(mode="tt"), r"mode='tt' is not one of \('kron', 'lora'\)"),
    (dict(out_shape=(4, 5, 1)), r"out_shape=\(4, 5, 1\) must be None .* pair of positive ints"),
    (dict(in_shape=(0, 24)), r"in_shape=\(0, 24\) must be"),
    (dict(in_shape=(2.0, 12)), r"in_shape=\(2.0, 12\) must be"),
    (dict(mode="lora", out_shape=(20, 1)), r"out_shape=\(20, 1\) is not allowed with mode='lora'"),
    (dict(dropout=1.5), r"dropout=1.5 must be in \[0, 1\)"),
])
def test_spec_validation(kw, match):
    with pytest.raises(ak.AdaptkitError, match=match):
        ak.LoRAMPO(**kw)


def test_spec_json_round_trip():
    spec = ak.LoRAMPO(rank=4, out_shape=[4, 5], in_shape=(4, 6), targets=r"x")
    assert spec.out_shape == (4, 5)
    assert ak.LoRAMPO.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize("kw,match", [
    (dict(rank=2, out_shape=(4, 6)), r"out_shape=\(4, 6\) has product 24 but 'layers\.0' has "
                                      r"out_features=20; .*automatic: \(4, 5\)"),
    (dict(rank=2, in_shape=(5, 5)), r"in_shape=\(5, 5\) has product 25 but 'layers\.0' has in_features=24"),
    (dict(rank=17), r"rank=17 exceeds min\(o1\*i1, o2\*i2\)=16 .* at 'layers\.0'.*rank <= 16"),
    (dict(rank=21, mode="lora"), r"rank=21 exceeds min\(in_features, out_features\)=20 at 'layers\.0'"),
])
def test_build_errors_name_the_layer_and_leave_the_model(kw, match):
    model = Net(_linear(20, 24))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ak.AdaptkitError, match=match):
        ak.inject(model, ak.LoRAMPO(targets=r"layers\.0", **kw))
    assert type(model.layers[0]) is nn.Linear
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("mod", [nn.Conv2d(4, 6, 3), nn.Embedding(10, 8)])
def test_unsupported_kinds_are_named(mod):
    with pytest.raises(ak.AdaptkitError, match=r"LoRAMPO cannot adapt 'layers\.0' \((Conv2d|Embedding)\)"):
        ak.inject(Net(mod), ak.LoRAMPO(rank=2, targets=r"layers\.0"))


def test_non_finite_weight_is_refused():
    model = Net(_linear(20, 24))
    with torch.no_grad():
        model.layers[0].weight[0, 0] = float("nan")
    with pytest.raises(ak.AdaptkitError, match=r"weight of 'layers\.0' contains NaN or Inf"):
        ak.inject(model, ak.LoRAMPO(rank=2, targets=r"layers\.0"))


# ------------------------------------------------------------------ randomized init
def test_randomized_init_matches_exact_top_r_and_keeps_output():
    torch.manual_seed(3)
    o, i = (8, 12), (6, 16)                                # 96 x 96, rearrangement (48, 192)
    terms = [(torch.randn(*o[:1], *i[:1]), torch.randn(o[1], i[1])) for _ in range(6)]
    w = sum((0.5 ** k) * torch.kron(a, b) for k, (a, b) in enumerate(terms))  # decaying spectrum
    w = w + 1e-3 * torch.randn(96, 96)
    base = Net(_linear(96, 96))
    with torch.no_grad():
        base.layers[0].weight.copy_(w)
    exact, fast, fast2 = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    kw = dict(rank=4, alpha=8.0, out_shape=o, in_shape=i, targets=r"layers\.0")
    ak.inject(exact, ak.LoRAMPO(**kw))
    ak.inject(fast, ak.LoRAMPO(init_niter=2, **kw))
    ak.inject(fast2, ak.LoRAMPO(init_niter=2, **kw))
    d_exact = exact.layers[0].adapters["default"].delta_weight(exact.layers[0])
    d_fast = fast.layers[0].adapters["default"].delta_weight(fast.layers[0])
    assert ((d_fast - d_exact).norm() / d_exact.norm()).item() < 1e-4
    for p, q in zip(fast.parameters(), fast2.parameters()):  # deterministic: reloads exactly
        assert torch.equal(p, q)
    x = torch.randn(3, 96)
    torch.testing.assert_close(fast(x), base(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw,match", [
    (dict(init_niter=-1), r"init_niter=-1 must be None \(exact SVD\) or an int >= 0"),
    (dict(init_niter=2, mode="lora"), r"init_niter=2 is not available with mode='lora'"),
])
def test_init_niter_validation(kw, match):
    with pytest.raises(ak.AdaptkitError, match=match):
        ak.LoRAMPO(**kw)
