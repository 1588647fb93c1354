"""MoRA: forward == x·ΔWᵀ for every type and shape (in < r̂ included), the dense ΔW (built from
the operator) == the paper's index formula (an independent oracle kept here), the r̂ table,
rank of ΔW, the compression / decompression formulas of specs/methods.md §1 on explicit cases, ReMoRA
(function continuous across merge-and-reset, optimizer state reset, type cycling, resume),
and MoRALinear as an nn.Linear drop-in that trains and merges back to plain nn.Linear."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import adaptkit as ak
import adaptkit.methods.mora as mora_mod
from adaptkit.methods.mora import MORA_TYPES, mora_delta, mora_update, r_hat_for, rope_tables
from adaptkit.methods.mora_linear import apply_mora_linear
from adaptkit.methods.mora_remora import ReMoRA, merge_and_reset_mora_linear, update_model_mora_linear
from conftest import Conv1D

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest)


SHAPES = [(64, 64), (64, 96), (96, 64), (100, 70), (16, 64)]  # the last: in < r̂


class Net(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.proj = base

    def forward(self, x):
        return self.proj(x)


def _injected(base, t, rank=8, seed=0, **kw):
    net = Net(base)
    ak.inject(net, ak.MoRA(rank=rank, mora_type=t, targets="proj", **kw))
    a = net.proj.adapters["default"]
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        a.mora_M.copy_(torch.randn(a.mora_M.shape, generator=g) * 0.1)
    return net, a


@pytest.mark.parametrize("t", MORA_TYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_equals_x_delta(t, shape):
    i, o = shape
    net, a = _injected(nn.Linear(i, o), t)
    if shape == (16, 64):
        assert a.r_hat > i
    x = torch.randn(4, 3, i)
    with ak.disabled(net):
        base = net(x)
    dw = a.delta_weight(net.proj)
    assert dw.shape == (o, i) and dw.dtype == torch.float32
    torch.testing.assert_close(net(x) - base, x @ dw.t(), atol=1e-5, rtol=0)


def _groups(n, r):
    """Group index (n,) of the contiguous grouping of n items into r groups."""
    q, m = divmod(n, r)
    return torch.repeat_interleave(torch.arange(r), torch.tensor([q + 1] * m + [q] * (r - m)))


def _delta_by_indices(M, n, o, t):
    """The oracle: ΔW = D·M·C by index maps (specs/methods.md §1 merge), written apart from
    the forward. Type 1: ΔW[o, k] = Σ_{i<P, i≡k (mod in)} M[o mod r̂, i mod r̂]; type 6:
    ΔW_P[i r̂+a, (i r̂+b) mod in] += (M R_i)[a, b], ΔW[o] = ΔW_P[o mod P]."""
    r = M.shape[0]
    n_c = -(-n // r)
    i = torch.arange(n_c * r)
    if t in (6, "decouple"):
        B = M.expand(n_c, r, r)  # block i = M R_i, (n_c, r̂, r̂)
        if t == 6:  # column-wise M R_i = M ⊙ cos_i + [M[:, h:], -M[:, :h]] ⊙ sin_i
            cos, sin = rope_tables(n_c, r, dtype=M.dtype)
            B = M * cos[:, None] + torch.cat([M[:, r // 2:], -M[:, :r // 2]], -1) * sin[:, None]
        cols = (i % n).view(n_c, 1, r).expand(n_c, r, r)  # block i column b -> (i r̂ + b) mod in
        dP = M.new_zeros(n_c, r, n).scatter_add_(2, cols, B.contiguous())  # ΔW_P (n_c, r̂, in)
        return dP.reshape(n_c * r, n)[torch.arange(o) % (n_c * r)]  # (P, in), rows o mod P
    if t in (1, 4):  # column k of M·C sums the M columns of the padded slots i ≡ k (mod in)
        MC = M.new_zeros(r, n).index_add_(1, i % n, M[:, i % r])
    elif t in (2, 3):
        MC = M[:, _groups(n, r)]
    else:
        MC = F.pad(M[:, :min(n, r)], (0, n - min(n, r)))
    if t in (1, 3):
        return MC[torch.arange(o) % r]
    if t in (2, 4):
        return MC[_groups(o, r)]
    return F.pad(MC[:min(o, r)], (0, 0, 0, o - min(o, r)))


@pytest.mark.parametrize("t", MORA_TYPES)
@pytest.mark.parametrize("shape", SHAPES + [(10, 29), (5, 3)])
def test_dense_delta_equals_the_index_formula(t, shape, monkeypatch):
    """ΔW from the operator on the identity == the index formula, fp64, in < r̂ and out < r̂
    included; identity blocks of 7 rows (not a divisor of in) take the chunked path."""
    i, o = shape
    for r in ({r_hat_for(i, o, 8, t), 4} if t in (6, "decouple") else {r_hat_for(i, o, 8, t), 3}):
        M = torch.randn(r, r, generator=torch.Generator().manual_seed(r), dtype=torch.float64)
        want = _delta_by_indices(M, i, o, t)
        torch.testing.assert_close(mora_delta(M, i, o, t), want, atol=1e-12, rtol=0)
        monkeypatch.setattr(mora_mod, "_PROBE", 7 * max(-(-i // r) * r, o))
        torch.testing.assert_close(mora_delta(M, i, o, t), want, atol=1e-12, rtol=0)
        monkeypatch.undo()


@pytest.mark.parametrize("t", MORA_TYPES)
def test_gpt2_conv1d_transposed_view(t):
    net, a = _injected(Conv1D(20, 24), t, rank=3)
    x = torch.randn(2, 5, 24)
    w = net.proj.dense_weight(["default"])  # native (in, out)
    torch.testing.assert_close(net(x), x @ w + net.proj.bias, atol=1e-5, rtol=0)


def test_r_hat_table():
    assert r_hat_for(4096, 4096, 8) == 256
    assert r_hat_for(4096, 11008, 8) == 348 == r_hat_for(4096, 11008, 8, 6)  # floor: 347 / 346
    assert r_hat_for(768, 768, 8) == 111 and r_hat_for(768, 768, 8, 6) == 110
    assert r_hat_for(4096, 4096, 256) == 1448
    assert r_hat_for(1, 1, 1, 6) == 2  # chunked types never reach 0
    # the spec builds it per layer (rank_pattern) or takes r_hat directly
    net = nn.Sequential(nn.Linear(100, 70), nn.Linear(70, 70))
    ak.inject(net, ak.MoRA(rank=8, targets=r"\d", rank_pattern={"1": 2}))
    assert [net[k].adapters["default"].r_hat for k in (0, 1)] == [37, r_hat_for(70, 70, 2)]
    net = nn.Sequential(nn.Linear(100, 70))
    ak.inject(net, ak.MoRA(r_hat=12, mora_type=6, targets="0"))
    assert net[0].adapters["default"].mora_M.shape == (12, 12)


@pytest.mark.parametrize("shape", SHAPES[:4])
def test_rank_of_delta(shape):
    i, o = shape
    for t in MORA_TYPES:
        r = r_hat_for(i, o, 8, t)
        M = torch.randn(r, r, dtype=torch.float64)
        rank = torch.linalg.matrix_rank(mora_delta(M, i, o, t)).item()
        if t in (6, "decouple"):
            assert rank == min(i, o), t
        else:
            assert rank <= r, t


def test_compression_formulas_on_explicit_cases():
    x = torch.arange(1.0, 6.0, dtype=torch.float64)  # in = 5
    eye = lambda r: torch.eye(r, dtype=torch.float64)  # noqa: E731 - M = I, out = r: y_Δ = C(x)
    # type 1, r̂ = 12: P = 12, padding 7 > in = 5 -> c_j = x_{j mod 5}
    torch.testing.assert_close(mora_update(x, eye(12), 12, 1), x[torch.arange(12) % 5])
    # type 1, r̂ = 2: P = 6, c_0 = x0 + x2 + x4, c_1 = x1 + x3 + x0 (circular)
    torch.testing.assert_close(mora_update(x, eye(2), 2, 1),
                               torch.tensor([9.0, 7.0], dtype=torch.float64))
    # type 2 on in = 10, r̂ = 4: group sizes 3, 3, 2, 2
    x10 = torch.arange(10.0, dtype=torch.float64)
    torch.testing.assert_close(mora_update(x10, eye(4), 4, 2),
                               torch.tensor([3.0, 12.0, 13.0, 17.0], dtype=torch.float64))
    # decompression: type 1 tiles z[o mod r̂], type 2 repeats contiguous groups (3, 2, 2 of 7)
    z = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    sel = lambda t, o: mora_update(z, eye(3), o, t)  # noqa: E731 - type 3: input groups of 1
    torch.testing.assert_close(sel(3, 7), z[torch.arange(7) % 3])
    assert sel(2, 7).tolist() == [1, 1, 1, 2, 2, 3, 3]
    # truncation: c = x[:r̂] (zero-filled when in < r̂), y = [z; 0]
    assert mora_update(x, eye(3), 6, "truncate").tolist() == [1, 2, 3, 0, 0, 0]
    assert mora_update(x[:2], eye(3), 3, "truncate").tolist() == [1, 2, 0]


def test_type6_against_explicit_rotation_matrices():
    """Paper Eq. 9 with dense R_i: chunk i of the padded input is rotated by R_i, multiplied
    by M, the chunks concatenated and tiled / truncated to out (in = 10 < P = 12, out = 29)."""
    i_, o_, r = 10, 29, 4
    g = torch.Generator().manual_seed(3)
    M = torch.randn(r, r, generator=g, dtype=torch.float64)
    x = torch.randn(i_, generator=g, dtype=torch.float64)
    xbar = x[torch.arange(12) % i_]
    v = []
    for c in range(3):
        R = torch.zeros(r, r, dtype=torch.float64)
        for j in range(r // 2):
            phi = c * 10000 ** (-2 * j / r)
            R[j, j] = R[j + 2, j + 2] = torch.cos(torch.tensor(phi, dtype=torch.float64))
            R[j, j + 2] = -torch.sin(torch.tensor(phi, dtype=torch.float64))
            R[j + 2, j] = -R[j, j + 2]
        v.append(M @ R @ xbar[c * r:(c + 1) * r])
    want = torch.cat(v)[torch.arange(o_) % 12]
    got = mora_update(x, M, o_, 6, rope_tables(3, r, dtype=torch.float64))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(mora_delta(M, i_, o_, 6) @ x, want)
    # "decouple" is the same with R_i = I
    want_i = torch.cat([M @ xbar[c * r:(c + 1) * r] for c in range(3)])[torch.arange(o_) % 12]
    torch.testing.assert_close(mora_update(x, M, o_, "decouple"), want_i)


def test_spec_validation_and_round_trip():
    with pytest.raises(ak.AdaptkitError, match="no alpha"):
        ak.MoRA(alpha=16)
    with pytest.raises(ak.AdaptkitError, match="no alpha"):
        ak.MoRA(alpha_pattern={"q": 2.0})
    for bad in (5, 7, True, "rope", 1.0):
        with pytest.raises(ak.AdaptkitError, match="mora_type"):
            ak.MoRA(mora_type=bad)
    with pytest.raises(ak.AdaptkitError, match="even r_hat"):
        ak.MoRA(r_hat=15, mora_type=6)
    with pytest.raises(ak.AdaptkitError, match="merge_every"):
        ak.MoRA(merge_every=0)
    s = ak.MoRA(rank=4, mora_type="truncate", merge_every=10, dropout=0.1)
    assert ak.MoRA.from_dict(s.to_dict()) == s
    net = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ak.AdaptkitError, match="cannot adapt '0' .Conv2d"):
        ak.inject(net, ak.MoRA(targets="0"))


def test_fresh_inject_is_identity_and_dropout_applies_to_input():
    base = nn.Linear(24, 20)
    net = Net(copy.deepcopy(base))
    ak.inject(net, ak.MoRA(rank=2, mora_type=6, dropout=0.5, targets="proj"))
    x = torch.randn(3, 24)
    assert torch.equal(net(x), base(x))
    a = net.proj.adapters["default"]
    with torch.no_grad():
        a.mora_M.normal_()
    net.train()
    torch.manual_seed(1)
    y1 = net(x)
    torch.manual_seed(1)
    drop = nn.functional.dropout(x, 0.5, True)
    torch.testing.assert_close(y1, base(x) + drop @ a.delta_weight(net.proj).t(), atol=1e-5, rtol=0)


def test_save_load_keeps_the_cycled_type(tmp_path):
    net, a = _injected(nn.Linear(30, 20), 1, rank=2)
    merge_and_reset_mora_linear(net, cycle=2)
    assert a.mora_type == 2
    with torch.no_grad():
        a.mora_M.normal_()
    ak.save(net, tmp_path / "m.safetensors")
    other = Net(nn.Linear(30, 20))
    other.load_state_dict({k: v for k, v in net.state_dict().items() if ".adapters." not in k})
    ak.load(other, tmp_path / "m.safetensors")
    assert other.proj.adapters["default"].mora_type == 2
    x = torch.randn(4, 30)
    assert torch.equal(other(x), net(x))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 4))


def test_remora_continuity_cycle_and_optimizer_reset():
    model = _mlp()
    ak.inject(model, ak.MoRA(rank=2, mora_type=1, merge_every=3, targets=r"[024]"))
    head = nn.Parameter(torch.zeros(4))  # a non-adapter parameter whose optimizer state must stay
    adapters = [model[k].adapters["default"] for k in (0, 2, 4)]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad] + [head], lr=1e-2)
    remora = ReMoRA(model, opt, cycle=4)  # merge_every from the spec
    assert remora.merge_every == 3
    x, tgt = torch.randn(16, 12), torch.randn(16, 4)
    w0 = model[0].weight.detach().clone()
    for step in range(1, 4):
        opt.zero_grad()
        ((model(x) + head - tgt) ** 2).mean().backward()
        opt.step()
        if step == 3:
            before = model(x).detach()
            assert all(opt.state[a.mora_M] for a in adapters)
        assert remora.step() == (step == 3)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)  # the function is continuous
    assert not torch.equal(model[0].weight, w0)  # ... because the update moved into W
    for a in adapters:
        assert not a.mora_M.any() and a.mora_type == 2 and a.mora_M not in opt.state
        assert not a.merged
    assert opt.state[head]  # reset_optimizer="adapter" leaves other state alone
    types = []
    for _ in range(9):  # keeps training; 1 -> 2 -> 3 -> 4 -> 1
        opt.zero_grad()
        ((model(x) + head - tgt) ** 2).mean().backward()
        opt.step()
        remora.step()
        types.append(adapters[0].mora_type)
    assert types == [2, 2, 3, 3, 3, 4, 4, 4, 1]
    sd = remora.state_dict()
    assert sd["steps"] == 12 and set(sd["types"].values()) == {1}
    again = ReMoRA(model, opt, merge_every=3, cycle=4)
    again.load_state_dict({"steps": 5, "types": {k: 3 for k in sd["types"]}})
    assert again.steps == 5 and adapters[2].mora_type == 3


def test_remora_errors_and_helpers():
    model = _mlp()
    ak.inject(model, ak.MoRA(rank=2, mora_type=6, targets="0"))
    with pytest.raises(ak.AdaptkitError, match="cycle=1"):
        ReMoRA(model, None, merge_every=5, cycle=2)
    with pytest.raises(ak.AdaptkitError, match="merge_every"):
        ReMoRA(model, None, cycle=1)
    with pytest.raises(ak.AdaptkitError, match="no MoRALinear"):
        ReMoRA(_mlp(), None, merge_every=2)
    a = model[0].adapters["default"]
    with torch.no_grad():
        a.mora_M.normal_()
    ak.merge(model, unload=False)  # an already merged adapter keeps its update in W
    x = torch.randn(3, 12)
    y = model(x)
    assert not update_model_mora_linear(model, None, step=3, merge_every=2, cycle=1)
    assert update_model_mora_linear(model, None, step=4, merge_every=2, cycle=1)
    assert not a.merged and not a.mora_M.any() and a.mora_type == 6
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=0)


def test_moralinear_mlp_trains_and_merges_back_to_plain_linear():
    model = _mlp()
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    x, tgt = torch.randn(64, 12), torch.randn(64, 4)
    paths = apply_mora_linear(model, rank=4, mora_type=6, merge_every=10)
    assert paths == ["0", "2", "4"]
    assert all(isinstance(model[int(p)], nn.Linear) and isinstance(model[int(p)], ak.MoRALinear)
               for p in paths)
    assert list(model.state_dict()) == [k for p in paths for k in
                                        (f"{p}.weight", f"{p}.bias", f"{p}.mora_M")]
    torch.testing.assert_close(model(x), ref(x))  # zero M: unchanged function
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{p}.mora_M" for p in paths]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    remora = ReMoRA(model, opt, cycle=1)  # merge_every=10 from the layers
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = ((model(x) - tgt) ** 2).mean()
        loss.backward()
        opt.step()
        remora.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    y = model(x)
    merged = ak.merge(model)
    assert [type(m) for m in merged.modules()] == [type(m) for m in ref.modules()]
    assert list(merged.state_dict()) == keys
    assert all(p.requires_grad for p in merged.parameters())  # as the original nn.Linear
    torch.testing.assert_close(merged(x), y, atol=1e-5, rtol=0)
    ref.load_state_dict(merged.state_dict(), strict=True)


def test_moralinear_constructor_checkpoint_and_merge_unmerge():
    m = ak.MoRALinear(40, 24, bias=False, rank=2, mora_type=2, dtype=torch.float64)
    assert m.r_hat == r_hat_for(40, 24, 2) and m.bias is None and m.weight.dtype == torch.float64
    plain = nn.Linear(40, 24, bias=False, dtype=torch.float64)
    m.load_state_dict(plain.state_dict(), strict=True)  # a plain Linear checkpoint loads
    with torch.no_grad():
        m.mora_M.normal_()
    x = torch.randn(5, 40, dtype=torch.float64)
    y = m(x)
    torch.testing.assert_close(y, x @ (plain.weight + m.delta_weight()).t())
    w0 = m.weight.detach().clone()
    m.merge()
    torch.testing.assert_close(m(x), y)
    m.merge()
    m.unmerge()
    torch.testing.assert_close(m.weight, w0)
    root = ak.merge(m)  # the root module itself is a drop-in
    assert type(root) is nn.Linear and list(root.state_dict()) == ["weight"]
    torch.testing.assert_close(root(x), y)
    with pytest.raises(ak.AdaptkitError, match="mora_type"):
        ak.MoRALinear(8, 8, mora_type=9)
    with pytest.raises(ak.AdaptkitError, match="cannot adapt"):  # never wrapped by inject
        ak.inject(Net(ak.MoRALinear(8, 8)), ak.LoRA(rank=2, targets="proj"))


def test_moralinear_merge_unload_false_and_unmerge():
    model = _mlp()
    apply_mora_linear(model, targets=["0", "4"], rank=2, mora_type=3)
    assert type(model[2]) is nn.Linear
    for k in (0, 4):
        with torch.no_grad():
            model[k].mora_M.normal_()
    x = torch.randn(3, 12)
    y = model(x)
    from adaptkit.merge import unmerge
    ak.merge(model, unload=False)
    assert model[0].merged and isinstance(model[0], ak.MoRALinear)
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=0)
    unmerge(model)
    assert not model[0].merged
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=0)
