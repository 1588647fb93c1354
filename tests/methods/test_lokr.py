"""LoKr: the factorisation rule (vs PEFT's and LyCORIS's functions), parameter shapes,
forward and merged weights == PEFT 0.21.2 LoKr in every shape case (full / low-rank w1 and
w2, decompose_both, positive factor, conv, Tucker), forward == LyCORIS 4.1.3 with
scale_mode="lycoris", the kron-free Linear path == the dense delta, rank / module dropout."""
import copy

import pytest
import torch
import torch.nn as nn

import adaptkit as ak
from adaptkit.methods.lokr import factorization
from conftest import Conv1D


def test_factorization_table():
    table = {(127, -1): (1, 127), (128, -1): (8, 16), (360, -1): (18, 20), (11008, -1): (86, 128),
             (4096, -1): (64, 64), (128, 4): (4, 32), (250, 4): (2, 125), (4096, 8): (8, 512)}
    for (dim, f), want in table.items():
        assert factorization(dim, f) == want, (dim, f)
    assert factorization(128, 64) == (64, 2) and factorization(128, 64, sort=True) == (2, 64)


def test_factorization_matches_peft_and_lycoris():
    peft_fact = pytest.importorskip("peft.tuners.lokr.layer").factorization
    lycoris = pytest.importorskip("lycoris.functional.general")
    for dim in list(range(1, 200)) + [768, 1376, 3072, 4096, 11008]:
        for f in (-1, 1, 2, 3, 4, 8, 16, 64):
            assert factorization(dim, f) == peft_fact(dim, f), (dim, f)
            assert factorization(dim, f, sort=True) == lycoris.factorization(dim, f), (dim, f)


def _net(base):
    net = nn.Sequential()
    net.add_module("l", base)
    return net


def _shapes(base, **kw):
    net = _net(base)
    ak.inject(net, ak.LoKr(targets="l", **kw))
    return {n: tuple(p.shape) for n, p in net.l.adapters["default"].named_parameters()}


def test_shapes_of_the_specs():
    lin = lambda: nn.Linear(48, 40)  # noqa: E731 - out 40 = (5, 8), in 48 = (6, 8)
    assert _shapes(lin(), rank=4) == {"lokr_w1": (5, 6), "lokr_w2": (8, 8)}
    assert _shapes(lin(), rank=2, decompose_both=True) == {
        "lokr_w1_a": (5, 2), "lokr_w1_b": (2, 6), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}
    assert _shapes(lin(), rank=4, decompose_factor=4) == {
        "lokr_w1": (4, 4), "lokr_w2_a": (10, 4), "lokr_w2_b": (4, 12)}
    conv = lambda: nn.Conv2d(64, 64, 3)  # noqa: E731 - (8, 8) both sides
    assert _shapes(conv(), rank=2, use_effective_conv2d=True) == {
        "lokr_w1": (8, 8), "lokr_t2": (2, 2, 3, 3), "lokr_w2_a": (2, 8), "lokr_w2_b": (2, 8)}
    assert _shapes(conv(), rank=2) == {"lokr_w1": (8, 8), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 72)}
    assert _shapes(nn.Conv2d(64, 64, 1), rank=2, use_effective_conv2d=True) == {  # 1x1: no Tucker
        "lokr_w1": (8, 8), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}
    net = _net(nn.Linear(4096, 4096, device="meta"))
    ak.inject(net, ak.LoKr(rank=8, targets="l"))
    assert sum(p.numel() for p in net.l.adapters.parameters()) == 4096 + 1024


# name -> (base factory, input shape, LoKr kwargs); every shape case of the specs
PEFT_CASES = {
    "full_w1_full_w2": (lambda: nn.Linear(48, 40), (3, 5, 48), dict(rank=4, alpha=3)),
    "full_w1_lowrank_w2": (lambda: nn.Linear(64, 96), (4, 64), dict(rank=2, alpha=5)),
    "decompose_both": (lambda: nn.Linear(48, 40), (3, 48), dict(rank=2, alpha=6, decompose_both=True)),
    "factor_4": (lambda: nn.Linear(48, 40), (3, 48), dict(rank=4, alpha=2, decompose_factor=4)),
    "factor_unsorted": (lambda: nn.Linear(128, 64), (3, 128), dict(rank=2, alpha=3, decompose_factor=32)),
    "conv2d_lowrank": (lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1), (2, 8, 9, 9), dict(rank=1, alpha=2)),
    "conv2d_full": (lambda: nn.Conv2d(8, 12, 3, dilation=2), (2, 8, 9, 9), dict(rank=8, alpha=2)),
    "conv2d_tucker": (lambda: nn.Conv2d(8, 12, 3, padding=1), (2, 8, 7, 7),
                      dict(rank=1, alpha=2, use_effective_conv2d=True, decompose_both=True)),
    "conv2d_1x1_effective": (lambda: nn.Conv2d(8, 12, 1), (2, 8, 5, 5),
                             dict(rank=1, alpha=2, use_effective_conv2d=True)),
    "conv2d_grouped": (lambda: nn.Conv2d(8, 12, 3, groups=2), (2, 8, 7, 7),
                       dict(rank=1, alpha=2, use_effective_conv2d=True)),
    # PEFT's Conv1d is right only for the flattened low-rank w2 (its full-w2 kron mixes axes,
    # its Tucker kron crashes); Conv1d full / Tucker are checked against LyCORIS below
    "conv1d_lowrank": (lambda: nn.Conv1d(8, 12, 3), (2, 8, 9), dict(rank=1, alpha=2)),
}


def _peft_config(peft, kw, **extra):
    return peft.LoKrConfig(r=kw["rank"], alpha=kw["alpha"], target_modules=["l"], init_weights=False,
                           decompose_both=kw.get("decompose_both", False),
                           decompose_factor=kw.get("decompose_factor", -1),
                           use_effective_conv2d=kw.get("use_effective_conv2d", False), **extra)


def _copy_from(ad, tensors):
    with torch.no_grad():
        for n, p in ad.named_parameters():
            p.copy_(tensors[n].reshape(p.shape))


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_forward_and_merge_equal_peft(case):
    peft = pytest.importorskip("peft")
    make, shape, kw = PEFT_CASES[case]
    torch.manual_seed(0)
    net, x = _net(make()), torch.randn(shape)
    ref = copy.deepcopy(net)
    pm = peft.get_peft_model(copy.deepcopy(net), _peft_config(peft, kw))
    ak.inject(net, ak.LoKr(targets="l", **kw))
    pl, ad = pm.base_model.model.l, net.l.adapters["default"]
    _copy_from(ad, {n: getattr(pl, n)["default"] for n, _ in ad.named_parameters()})
    assert ad.scale == pytest.approx(pl.scaling["default"])
    net.eval(), pm.eval()
    y = net(x)
    assert (y - ref(x)).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(y, pm(x), atol=2e-5, rtol=1e-5)
    merged, pmerged = ak.merge(net), pm.merge_and_unload()
    for (k, a), (k2, b) in zip(merged.state_dict().items(), pmerged.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# use_effective_conv2d on Conv2d(16, 24, 3): out 24 = (a, b) = (4, 6), in 16 = (c, d) = (4, 4);
# decompose_factor 2: (2, 12) x (2, 8); 8: (8, 3) x (8, 2). name -> (kwargs, the parameters,
# i.e. which branch each factor takes: w1 full / low-rank, w2 full / Tucker)
TUCKER_CASES = {
    # r = 2 >= max(a, c) / 2: w1 full; Tucker w2 from a non-contiguous einsum (crashed in
    # delta_weight's kron before)
    "w1_full_tucker": (dict(rank=2, decompose_both=True), {"lokr_w1", "lokr_t2", "lokr_w2_a", "lokr_w2_b"}),
    "w1_lowrank_tucker": (dict(rank=1, decompose_both=True),
                          {"lokr_w1_a", "lokr_w1_b", "lokr_t2", "lokr_w2_a", "lokr_w2_b"}),
    "w2_full_no_core": (dict(rank=3), {"lokr_w1", "lokr_w2"}),  # r >= max(b, d) / 2 = 3
    "factor_2_tucker": (dict(rank=4, decompose_factor=2, decompose_both=True),
                        {"lokr_w1", "lokr_t2", "lokr_w2_a", "lokr_w2_b"}),
    "factor_8_w1_lowrank_w2_full": (dict(rank=2, decompose_factor=8, decompose_both=True),
                                    {"lokr_w1_a", "lokr_w1_b", "lokr_w2"}),
    "factor_8_both_factored": (dict(rank=1, decompose_factor=8, decompose_both=True),
                               {"lokr_w1_a", "lokr_w1_b", "lokr_t2", "lokr_w2_a", "lokr_w2_b"}),
}


@pytest.mark.parametrize("geometry", [dict(), dict(stride=2, padding=1)])
@pytest.mark.parametrize("case", list(TUCKER_CASES))
def test_effective_conv2d_equals_peft(case, geometry):
    """The Tucker (effective conv2d) form on Conv2d(16, 24, 3) in every factor branch: the
    forward equals PEFT's LoKr with the same weights (fp32, 1e-5), and so does the merge."""
    peft = pytest.importorskip("peft")
    kw, params = TUCKER_CASES[case]
    kw = dict(kw, alpha=3, use_effective_conv2d=True)
    torch.manual_seed(0)
    net, x = _net(nn.Conv2d(16, 24, 3, **geometry)), torch.randn(2, 16, 9, 9)
    pm = peft.get_peft_model(copy.deepcopy(net), _peft_config(peft, kw))
    ak.inject(net, ak.LoKr(targets="l", **kw))
    pl, ad = pm.base_model.model.l, net.l.adapters["default"]
    assert {n for n, _ in ad.named_parameters()} == params
    _copy_from(ad, {n: getattr(pl, n)["default"] for n in params})
    net.eval(), pm.eval()
    with torch.no_grad():
        y, want = net(x), pm(x)
        assert (y - pm.get_base_model().l.base_layer(x)).abs().max() > 1e-2  # the adapter acts
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
        w = net.l.dense_weight(["default"])  # == the kron-based delta PEFT merges
        torch.testing.assert_close(w, pm.merge_and_unload().l.weight, atol=1e-6, rtol=1e-5)


# name -> (base, input shape, kwargs): LyCORIS's forward with scale_mode="lycoris"
LYCORIS_CASES = {
    "full_full_scale_1": (lambda: nn.Linear(64, 64), (3, 64), dict(rank=4, alpha=1)),
    "decompose_both": (lambda: nn.Linear(64, 64), (3, 64), dict(rank=2, alpha=1, decompose_both=True)),
    "factor_sorted": (lambda: nn.Linear(128, 64), (3, 128), dict(rank=2, alpha=3, decompose_factor=64)),
    "conv1d_full": (lambda: nn.Conv1d(8, 12, 3), (2, 8, 9), dict(rank=8, alpha=2)),
    "conv1d_tucker": (lambda: nn.Conv1d(8, 12, 3, padding=1), (2, 8, 9),
                      dict(rank=1, alpha=2, use_effective_conv2d=True)),
    "conv2d_tucker": (lambda: nn.Conv2d(8, 12, 3), (2, 8, 9, 9), dict(rank=1, alpha=2, use_effective_conv2d=True)),
    "conv2d_tucker_rank_2": (lambda: nn.Conv2d(16, 24, 3), (2, 16, 9, 9),
                             dict(rank=2, alpha=2, use_effective_conv2d=True, decompose_both=True)),
    "conv2d_lowrank": (lambda: nn.Conv2d(8, 12, 3), (2, 8, 9, 9), dict(rank=1, alpha=2)),
}


@pytest.mark.parametrize("case", list(LYCORIS_CASES))
def test_forward_equals_lycoris(case):
    lokr = pytest.importorskip("lycoris.modules.lokr")
    make, shape, kw = LYCORIS_CASES[case]
    torch.manual_seed(0)
    base, x = make(), torch.randn(shape)
    net = _net(copy.deepcopy(base))
    ly = lokr.LokrModule("l", base, multiplier=1.0, lora_dim=kw["rank"], alpha=kw["alpha"],
                         decompose_both=kw.get("decompose_both", False), factor=kw.get("decompose_factor", -1),
                         use_tucker=kw.get("use_effective_conv2d", False))
    ak.inject(net, ak.LoKr(targets="l", scale_mode="lycoris", **kw))
    ad = net.l.adapters["default"]
    with torch.no_grad():
        for p in ly.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    _copy_from(ad, {n: getattr(ly, n) for n, _ in ad.named_parameters()})
    assert ad.scale == pytest.approx(ly.scale)
    net.eval(), ly.eval()
    with torch.no_grad():
        want = ly(x)
        assert (want - base(x)).abs().max() > 1e-2
        torch.testing.assert_close(net(x), want, atol=2e-5, rtol=1e-5)


def test_scale_modes():
    lin = lambda: _net(nn.Linear(64, 64))  # noqa: E731 - (8, 8) x (8, 8)
    for kw, peft_s, ly_s in ((dict(rank=4, alpha=1), 0.25, 1.0),  # both factors full
                             (dict(rank=2, alpha=1), 0.5, 0.5)):  # w2 low-rank
        for mode, want in (("peft", peft_s), ("lycoris", ly_s)):
            net = lin()
            ak.inject(net, ak.LoKr(targets="l", scale_mode=mode, **kw))
            assert net.l.adapters["default"].scale == want


@pytest.mark.parametrize("kw", [dict(rank=6), dict(rank=2), dict(rank=2, decompose_both=True),
                                dict(rank=64, decompose_factor=4)])
@pytest.mark.parametrize("base", ["linear", "gpt2_conv1d"])
def test_kron_free_path_equals_dense(kw, base):
    """x kron(w1, w2)^T via (T, c, d) reshapes == the dense delta, both w1-first and w2-first
    orders (full w2), low-rank w2, and the transposed-weight Linear-like."""
    torch.manual_seed(0)
    net = _net(nn.Linear(96, 40) if base == "linear" else Conv1D(40, 96))
    ak.inject(net, ak.LoKr(targets="l", alpha=3, init="random", **kw))
    layer = net.l
    x = torch.randn(2, 3, 96, requires_grad=True)
    w = layer.dense_weight(["default"])
    torch.testing.assert_close(net(x), layer.base_op(x, w, layer.bias), atol=1e-5, rtol=1e-5)


def test_inits():
    for init, zero in (("default", "lokr_w1"), ("lycoris", "lokr_w2_b"), ("random", None)):
        net = _net(nn.Linear(64, 64))
        ak.inject(net, ak.LoKr(rank=2, targets="l", init=init))
        for n, p in net.l.adapters["default"].named_parameters():
            assert (not p.any()) == (n == zero), (init, n)


def test_rank_and_module_dropout_equal_peft_in_training():
    """Same seed, same draws: rank dropout masks delta rows (scaled by 1/mean), module
    dropout skips the adapter; outputs equal PEFT's in training mode, eval is unaffected."""
    peft = pytest.importorskip("peft")
    kw = dict(rank=2, alpha=3, decompose_both=True)
    for make, mkx in ((lambda: nn.Linear(48, 40), lambda: torch.randn(6, 48)),
                      (lambda: nn.Conv2d(8, 12, 3), lambda: torch.randn(2, 8, 6, 6))):
        torch.manual_seed(0)
        net, x = _net(make()), mkx()
        extra = dict(rank_dropout=0.4, module_dropout=0.3, rank_dropout_scale=True)
        pm = peft.get_peft_model(copy.deepcopy(net), _peft_config(peft, kw, **extra))
        ak.inject(net, ak.LoKr(targets="l", **kw, **extra))
        pl, ad = pm.base_model.model.l, net.l.adapters["default"]
        _copy_from(ad, {n: getattr(pl, n)["default"] for n, _ in ad.named_parameters()})
        net.train(), pm.train()
        outs = set()
        for seed in range(8):
            torch.manual_seed(seed)
            y = net(x)
            torch.manual_seed(seed)
            torch.testing.assert_close(y, pm(x), atol=2e-5, rtol=1e-5)
            outs.add(round(y.sum().item(), 3))
        assert len(outs) > 2  # different masks / skips across seeds
        net.eval(), pm.eval()
        torch.testing.assert_close(net(x), pm(x), atol=2e-5, rtol=1e-5)


def test_rank_dropout_all_dropped_is_zero_not_nan():
    net = _net(nn.Linear(16, 16))
    ak.inject(net, ak.LoKr(rank=2, targets="l", rank_dropout=0.999, rank_dropout_scale=True, init="random"))
    net.train()
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    with ak.disabled(net):
        base = net(x)
    assert torch.equal(net(x), base)  # every row dropped (p = 0.999 over 16 rows)


def test_bad_fields_name_the_field():
    for kw, field in ((dict(decompose_factor=-2), "decompose_factor"),
                      (dict(decompose_factor=0), "decompose_factor"),
                      (dict(init="gaussian"), "init"), (dict(scale_mode="kohya"), "scale_mode"),
                      (dict(rank_dropout=1.0), "rank_dropout"), (dict(module_dropout=-0.1), "module_dropout"),
                      (dict(decompose_both=1), "decompose_both")):
        with pytest.raises(ak.AdaptkitError, match=field):
            ak.LoKr(**kw)
    net = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(ak.AdaptkitError, match="'0'"):
        ak.inject(net, ak.LoKr(targets="0"))
    spec = ak.LoKr(rank=4, alpha=2, decompose_both=True, scale_mode="lycoris", rank_pattern={"a": 2})
    assert ak.LoKr.from_dict(spec.to_dict()) == spec
