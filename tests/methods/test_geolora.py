"""GeoLoRA (methods.md section 2): the one-pass K/L/S gradients, the augmented coefficient
blocks for an explicit gradient, orthonormal bases after every step, the truncation rules on
hand-made spectra, the rank-recovery toy, the optimizer's schedule / state, and save / load
with per-layer ranks."""
import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

import adaptkit as ak
from adaptkit.methods.geolora import GeoLoRAAdapter, budget_ranks, threshold_rank
from conftest import Conv1D


class MLP(nn.Module):
    def __init__(self, dims=(12, 16, 10, 4)):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])])

    def forward(self, x):
        for i, m in enumerate(self.layers):
            x = m(x) if i == len(self.layers) - 1 else torch.tanh(m(x))
        return x


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest)


def _geo(model, name="default"):
    return [m.adapters[name] for m in model.modules() if hasattr(m, "adapters") and name in m.adapters]


def _set_factors(a: GeoLoRAAdapter, sigma):
    """Give the adapter S = P diag(sigma) Q^T for random orthogonal P, Q at rank len(sigma)."""
    r = len(sigma)
    P = torch.linalg.qr(torch.randn(r, r))[0]
    Q = torch.linalg.qr(torch.randn(r, r))[0]
    with torch.no_grad():
        a.rank = r
        a.S.zero_()
        a.S[:r, :r] = P @ torch.diag(torch.tensor(sigma)) @ Q.t()


def _ortho_err(a: GeoLoRAAdapter) -> float:
    U, _, V = a.factors()
    eye = torch.eye(a.rank)
    return max((U.t() @ U - eye).norm().item(), (V.t() @ V - eye).norm().item())


# ---- spec -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,field", [
    (dict(rank=8, max_rank=4), "max_rank"), (dict(tau=1.5), "tau"), (dict(truncation="svd"), "truncation"),
    (dict(truncation="global_budget"), "budget"), (dict(budget=10), "budget"), (dict(min_rank=0), "min_rank"),
])
def test_spec_validation_names_the_field(kw, field):
    with pytest.raises(ak.AdaptkitError, match=field):
        ak.GeoLoRA(**kw)


def test_spec_round_trip_and_build_limits():
    spec = ak.GeoLoRA(rank=4, max_rank=64, tau=0.2, truncation="global_budget", budget=12, targets=r"layers\.\d")
    assert ak.spec.AdapterSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    m = MLP()
    ak.inject(m, spec)
    assert [a.r_max for a in _geo(m)] == [12, 10, 4]  # min(in, out, max_rank)
    with pytest.raises(ak.AdaptkitError, match=r"rank=5 exceeds .*layers\.2"):
        ak.inject(MLP(), ak.GeoLoRA(rank=5, targets=r"layers\.\d"))


# ---- one backward pass: G_K, G_L, G_S ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv1d_t"])
def test_one_backward_gives_k_l_s_gradients(kind):
    base = nn.Linear(12, 10) if kind == "linear" else Conv1D(10, 12)
    m = nn.Sequential(base)
    ak.inject(m, ak.GeoLoRA(rank=3, max_rank=6, alpha=6.0, targets="0"))
    a = _geo(m)[0]
    _set_factors(a, [2.0, 1.0, 0.5])
    x = torch.randn(4, 5, 12, requires_grad=True)
    delta = torch.randn(4, 5, 10)
    (m(x) * delta).sum().backward()  # ∂L/∂y = delta
    U, S, V = (t.detach() for t in a.factors())
    G = a.scale * delta.reshape(-1, 10).t() @ x.detach().reshape(-1, 12)  # ∂L/∂(U S V^T): (10, 12)
    torch.testing.assert_close(a.U.grad[:, :3], G @ V)
    torch.testing.assert_close(a.V.grad[:, :3], G.t() @ U)
    torch.testing.assert_close(a.S.grad[:3, :3], U.t() @ G @ V)
    assert not a.U.grad[:, 3:].any() and not a.V.grad[:, 3:].any()  # nothing beyond rank 3
    assert not a.S.grad[3:].any() and not a.S.grad[:, 3:].any()
    # the input gradient and the S gradient equal plain autograd through the dense delta
    w = base.weight.detach() if kind == "linear" else base.weight.detach().t()
    Sx = S.clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y = x2 @ (w + a.scale * U @ Sx @ V.t()).t() + base.bias.detach()
    (y * delta).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(a.S.grad[:3, :3], Sx.grad)


# ---- augmentation ------------------------------------------------------------------------------
def test_augmented_coefficients_match_the_formulas():
    m = nn.Sequential(nn.Linear(20, 16))
    ak.inject(m, ak.GeoLoRA(rank=3, max_rank=8, targets="0"))
    a = _geo(m)[0]
    _set_factors(a, [3.0, 2.0, 1.0])
    x, delta = torch.randn(30, 20), torch.randn(30, 16)
    (m(x) * delta).sum().backward()
    U0, S0, V0 = (t.detach().clone() for t in a.factors())
    G = a.scale * delta.t() @ x  # the explicit gradient, (16, 20)
    GK, GL, GS = G @ V0, G.t() @ U0, U0.t() @ G @ V0
    lam = 0.1
    a.augment(lam)
    assert a.rank == 6
    U, S, V = (t.detach() for t in a.factors())
    Ub, Vb = U[:, 3:], V[:, 3:]
    torch.testing.assert_close(U[:, :3], U0)  # old bases kept
    torch.testing.assert_close(V[:, :3], V0)
    torch.testing.assert_close(S[:3, :3], S0 - lam * GS)
    torch.testing.assert_close(S[:3, 3:], -lam * GL.t() @ Vb)
    torch.testing.assert_close(S[3:, :3], -lam * Ub.t() @ GK)
    assert not S[3:, 3:].any()
    # Ū, V̄: orthonormal, orthogonal to U, V and inside span([U | G_K]), span([V | G_L])
    assert _ortho_err(a) < 1e-5
    for B, new, g in ((U0, Ub, GK), (V0, Vb, GL)):
        basis = torch.linalg.qr(torch.cat([B, g], 1))[0]
        torch.testing.assert_close(basis @ (basis.t() @ new), new, atol=1e-5, rtol=0)
    # as matrices: Û Ŝ V̂^T = U S V^T - λ (Û Û^T G V̂ V̂^T - Ū Ū^T G V̄ V̄^T)
    step = U @ U.t() @ G @ V @ V.t() - Ub @ Ub.t() @ G @ Vb @ Vb.t()
    torch.testing.assert_close(U @ S @ V.t(), U0 @ S0 @ V0.t() - lam * step, atol=1e-5, rtol=0)


@pytest.mark.parametrize("coeff_steps", [0, 3])
def test_zero_gradient_leaves_delta_unchanged(coeff_steps):
    m = nn.Sequential(nn.Linear(20, 16))
    ak.inject(m, ak.GeoLoRA(rank=3, max_rank=8, tau=0.1, targets="0"))
    a = _geo(m)[0]
    _set_factors(a, [3.0, 2.0, 1.0])
    d0 = a.delta_weight(m[0])
    opt = ak.GeoLoRAOptimizer(m, lr=0.5, coeff_steps=coeff_steps, weight_decay=0.0)
    x = torch.randn(5, 20)
    for _ in range(2 * (coeff_steps + 1)):
        (0.0 * m(x)).sum().backward()
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(a.delta_weight(m[0]), d0, atol=1e-5, rtol=0)
    assert a.rank == 3  # the zero-gradient directions are truncated again


def test_bases_stay_orthonormal_after_every_step():
    torch.manual_seed(1)
    m = MLP((12, 24, 20, 4))
    ak.inject(m, ak.GeoLoRA(rank=2, max_rank=10, tau=0.05, targets=r"layers\.[01]"))
    opt = ak.GeoLoRAOptimizer(m, lr=0.05, coeff_steps=2)
    x, y = torch.randn(64, 12), torch.randint(0, 4, (64,))
    ranks = set()
    for _ in range(30):
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        opt.zero_grad()
        for a in _geo(m):
            assert _ortho_err(a) < 1e-4
            ranks.add(a.rank)
    assert len(ranks) > 1  # the ranks moved


# ---- truncation ---------------------------------------------------------------------------------
def test_threshold_rule_on_hand_made_spectra():
    s = torch.tensor([10.0, 5.0, 1.0, 0.5, 0.1])  # ||σ|| = 11.2370, tails 11.24, 5.12, 1.1225, 0.51, 0.1
    assert threshold_rank(s, 0.1) == 2  # 1.1225 < 1.1237: cut at 2 (just)
    assert threshold_rank(s, 0.099) == 3  # 1.1225 >= 1.1125: keep the third
    assert threshold_rank(s, 0.05) == 3
    assert threshold_rank(s, 0.01) == 4  # 0.1 < 0.1124
    assert threshold_rank(s, 0.008) == 5  # 0.1 >= 0.0899: keep all
    assert threshold_rank(s, 0.0) == 5
    assert threshold_rank(torch.tensor([3.0, 2.0, 0.0, 0.0]), 0.0) == 2  # exact zeros always go
    assert threshold_rank(torch.zeros(4), 0.1) == 0
    assert budget_ranks([torch.tensor([10.0, 1.0]), torch.tensor([5.0, 4.0, 0.5])], 3) == [1, 2]
    assert budget_ranks([torch.tensor([1.0]), torch.tensor([1.0])], 1) == [1, 0]  # ties: layer order


@pytest.mark.parametrize("truncation,want", [("local_threshold", [2, 3]), ("fixed_rank", [3, 3]),
                                             ("global_budget", [2, 2])])
def test_truncation_strategies_through_the_optimizer(truncation, want):
    m = MLP((12, 16, 10, 4))
    budget = 4 if truncation == "global_budget" else None
    ak.inject(m, ak.GeoLoRA(rank=3, max_rank=8, tau=0.1, truncation=truncation, budget=budget,
                            targets=r"layers\.[01]"))
    a0, a1 = _geo(m)
    _set_factors(a0, [10.0, 5.0, 1.0, 0.5, 0.1])  # local rule: 2
    _set_factors(a1, [6.0, 4.0, 3.0, 0.4, 0.1])   # local rule: 3; budget 4 of all (10, 6, 5, 4): 2 + 2
    dense = [a.delta_weight(l) for a, l in zip((a0, a1), m.layers)]
    opt = ak.GeoLoRAOptimizer(m, lr=0.1)  # c = 0: augment (zero gradient: zero blocks), truncate
    (0.0 * m(torch.randn(3, 12))).sum().backward()
    opt.step()
    assert [a0.rank, a1.rank] == want
    for a, l, d in zip((a0, a1), m.layers, dense):  # the best rank-k approximation (Eckart-Young)
        U, s, Vh = torch.linalg.svd(d)
        k = a.rank
        torch.testing.assert_close(a.delta_weight(l), U[:, :k] @ torch.diag(s[:k]) @ Vh[:k], atol=1e-5, rtol=0)
        assert torch.allclose(torch.diag(a.S[:k, :k]), s[:k] / a.scale, atol=1e-5)
        assert _ortho_err(a) < 1e-5


def test_rank_recovery_toy():
    """methods.md: least squares to a rank-5 target (60 x 50, λ = 0.05), τ = 0.1. With c = 0 a
    new direction is cut before it can grow and the rank stalls at 4; with c = 10 coefficient
    steps (plain gradient steps on S) rank 5 is recovered and the loss vanishes. (AdamW S
    steps at this lr move a coefficient by about 0.05 per step, far too little for target
    singular values of 40-80 within one 11-step cycle.)"""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(60, 5, generator=g) @ torch.randn(5, 50, generator=g)
    x = torch.eye(50)
    out = {}
    for c in (0, 10):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(50, 60, bias=False))
        nn.init.zeros_(m[0].weight)
        ak.inject(m, ak.GeoLoRA(rank=2, max_rank=20, tau=0.1, targets="0"))
        opt = ak.GeoLoRAOptimizer(m, lr=0.05, coeff_steps=c, coeff_optimizer="sgd")
        for _ in range(220):  # 20 cycles of c + 1 = 11: ends right after a truncation
            loss = 0.5 * (m(x) - target.t()).square().sum()
            loss.backward()
            opt.step()
            opt.zero_grad()
        out[c] = (opt.ranks()["0"], loss.item())
    assert out[10][0] == 5 and out[10][1] < 1e-3, out
    assert out[0][0] == 4 and out[0][1] > 100, out


# ---- the optimizer --------------------------------------------------------------------------------
def test_optimizer_refuses_models_without_geolora():
    with pytest.raises(ak.AdaptkitError, match="no trainable GeoLoRA layer.*ak.inject"):
        ak.GeoLoRAOptimizer(MLP())
    m = MLP()
    ak.inject(m, ak.LoRA(rank=2, targets=r"layers\.0"))
    with pytest.raises(ak.AdaptkitError, match="GeoLoRA"):
        ak.GeoLoRAOptimizer(m)
    m = MLP()
    ak.inject(m, ak.GeoLoRA(rank=2, targets=r"layers\.0"), name="g")
    ak.inject(m, ak.LoRA(rank=2, targets=r"layers\.1"), name="l")
    ak.set_active(m, ["l"])
    with pytest.raises(ak.AdaptkitError, match=r"\['g'\] are inactive"):
        ak.GeoLoRAOptimizer(m)
    with pytest.raises(ak.AdaptkitError, match="model itself"):
        ak.GeoLoRAOptimizer(m.parameters())
    with pytest.raises(ak.AdaptkitError, match="truncate_at"):
        ak.GeoLoRAOptimizer(m, coeff_steps=2, truncate_at=3)


def test_schedule_other_params_scheduler_and_checkpoint():
    torch.manual_seed(0)
    m = MLP()
    ak.inject(m, ak.GeoLoRA(rank=2, max_rank=8, tau=0.05, targets=r"layers\.[01]",
                            modules_to_save=r"layers\.2"))
    head0 = m.layers[2].weight.detach().clone()
    opt = ak.GeoLoRAOptimizer(m, lr=0.05, coeff_steps=3, rotate_moments=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    assert opt.param_groups[1]["params"][0] is m.layers[2].weight  # the wrapped AdamW's group
    x, y = torch.randn(32, 12), torch.randint(0, 4, (32,))
    seen = []
    for t in range(8):
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        seen.append([a.rank for a in _geo(m)])
    assert seen[0] == seen[1] == seen[2] == [4, 4]  # augmented at t = 0, kept through the S steps
    assert all(a <= b for a, b in zip(seen[3], seen[2]))  # truncated at t = 3
    assert seen[4] == [min(2 * r, 8) for r in seen[3]] == seen[5]  # augmented again at t = 4
    assert not torch.equal(m.layers[2].weight, head0)  # the head trained through the inner AdamW
    assert opt.param_groups[0]["lr"] == opt.param_groups[1]["lr"] == 0.05 * 0.5 ** 8
    a = _geo(m)[0]
    st = opt.state[a.S]
    r = a.rank
    assert not st["exp_avg_sq"].any() and st["step_sq"] == 0  # reset at the last truncation
    assert not st["exp_avg"][r:].any() and not st["exp_avg"][:, r:].any()  # rotated into the r x r block
    sd = opt.state_dict()
    opt2 = ak.GeoLoRAOptimizer(m, lr=1.0, coeff_steps=3)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] and opt2._t == 8
    assert torch.equal(opt2.state[a.S]["exp_avg"], st["exp_avg"])
    assert opt2.inner.state_dict()["state"].keys() == opt.inner.state_dict()["state"].keys()


def test_coefficient_steps_are_torch_adamw_on_s():
    """Between augmentations S is trained by AdamW exactly as torch.optim.AdamW would (the
    reference hands S to the model's AdamW), with the bases frozen."""
    torch.manual_seed(0)
    m = MLP()
    ak.inject(m, ak.GeoLoRA(rank=2, max_rank=6, targets=r"layers\.0"))
    a = _geo(m)[0]
    opt = ak.GeoLoRAOptimizer(m, lr=0.01, coeff_steps=5, weight_decay=0.1, betas=(0.8, 0.99))
    x, y = torch.randn(16, 12), torch.randint(0, 4, (16,))
    ref = ref_opt = None
    for t in range(5):  # t = 0 augments, t = 1..4 are S-only steps
        nn.functional.cross_entropy(m(x), y).backward()
        if t == 1:
            ref = nn.Parameter(a.S.detach().clone())
            ref_opt = torch.optim.AdamW([ref], lr=0.01, weight_decay=0.1, betas=(0.8, 0.99))
        if ref is not None:
            ref.grad = a.S.grad.clone()
            ref_opt.step()
        U0, V0 = a.U.detach().clone(), a.V.detach().clone()
        opt.step()
        opt.zero_grad()
        if ref is not None:
            torch.testing.assert_close(a.S.detach(), ref.detach(), atol=1e-6, rtol=1e-5)
            assert torch.equal(a.U, U0) and torch.equal(a.V, V0) and a.rank == 4


def test_rotated_first_moment_is_the_same_tensor_in_new_coordinates():
    m = nn.Sequential(nn.Linear(12, 10))
    ak.inject(m, ak.GeoLoRA(rank=3, max_rank=6, tau=0.3, targets="0"))
    a = _geo(m)[0]
    _set_factors(a, [5.0, 3.0, 0.1])
    opt = ak.GeoLoRAOptimizer(m, lr=0.1, coeff_steps=1, rotate_moments=True)
    mom = torch.randn(6, 6)
    opt.state[a.S].update(step=3, step_sq=3, exp_avg=mom.clone(), exp_avg_sq=torch.rand(6, 6))
    U0, _, V0 = (t.detach().clone() for t in a.factors())
    opt.truncate()
    k = a.rank
    U, _, V = a.factors()
    # the moment, as a matrix on the (out, in) space, is preserved on the kept subspace
    before = U @ (U.t() @ U0 @ mom[:3, :3] @ V0.t() @ V) @ V.t()
    after = U @ opt.state[a.S]["exp_avg"][:k, :k] @ V.t()
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


# ---- save / load with ranks ------------------------------------------------------------------------
def test_save_load_round_trips_ranks_bit_exact(tmp_path):
    torch.manual_seed(0)
    m = MLP((12, 24, 20, 4))
    ak.inject(m, ak.GeoLoRA(rank=2, max_rank=12, tau=0.02, targets=r"layers\.\d"))
    opt = ak.GeoLoRAOptimizer(m, lr=0.1)
    x, y = torch.randn(64, 12), torch.randint(0, 4, (64,))
    for _ in range(5):
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        opt.zero_grad()
    ranks = [a.rank for a in _geo(m)]
    assert len(set(ranks)) > 1 and ranks != [2, 2, 2]
    f = tmp_path / "geo.safetensors"
    ak.save(m, f)
    with safe_open(f, "pt") as fh:
        layers = json.loads(fh.metadata()["adaptkit.layers"])
        assert [layers[f"layers.{i}"]["state"]["rank"] for i in range(3)] == ranks
        assert [tuple(fh.get_tensor(f"layers.{i}.S").shape) for i in range(3)] == [(r, r) for r in ranks]
        assert tuple(fh.get_tensor("layers.0.U").shape) == (24, ranks[0])  # active slice only
    torch.manual_seed(5)
    other = MLP((12, 24, 20, 4))
    other.load_state_dict({k: v for k, v in m.state_dict().items() if ".adapters." not in k})
    ak.load(other, f)
    assert [a.rank for a in _geo(other)] == ranks
    for (k, v), (k2, v2) in zip(sorted(m.state_dict().items()), sorted(other.state_dict().items())):
        assert k == k2 and torch.equal(v, v2), k
    m.eval(), other.eval()
    assert torch.equal(m(x), other(x))
    # a plain torch state dict carries the rank too
    third = MLP((12, 24, 20, 4))
    ak.inject(third, ak.GeoLoRA(rank=2, max_rank=12, tau=0.02, targets=r"layers\.\d"))
    third.load_state_dict(m.state_dict())
    assert [a.rank for a in _geo(third)] == ranks and torch.equal(third.eval()(x), m(x))


def test_load_refuses_a_rank_beyond_max_rank(tmp_path):
    m = MLP()
    ak.inject(m, ak.GeoLoRA(rank=2, max_rank=4, targets=r"layers\.0"))
    f = tmp_path / "g.safetensors"
    ak.save(m, f)
    from safetensors.torch import load_file, save_file
    with safe_open(f, "pt") as fh:
        meta = fh.metadata()
    layers = json.loads(meta["adaptkit.layers"])
    layers["layers.0"]["state"]["rank"] = 9
    save_file(load_file(f), f, metadata=meta | {"adaptkit.layers": json.dumps(layers)})
    fresh = MLP()
    with pytest.raises(ak.AdaptkitError, match=r"rank=9 at 'layers\.0'.*max_rank=4"):
        ak.load(fresh, f)
    assert not any(hasattr(mod, "adapters") for mod in fresh.modules())


def test_merge_folds_the_scaled_product():
    m = MLP()
    ak.inject(m, ak.GeoLoRA(rank=2, max_rank=4, alpha=3.0, targets=r"layers\.0"))
    a = _geo(m)[0]
    _set_factors(a, [2.0, 1.0])
    U, S, V = (t.detach() for t in a.factors())
    w = m.layers[0].weight.detach().clone() + 1.5 * U @ S @ V.t()
    x = torch.randn(3, 12)
    y = m(x)
    merged = ak.merge(m)
    torch.testing.assert_close(merged.layers[0].weight, w)
    torch.testing.assert_close(merged(x), y)
