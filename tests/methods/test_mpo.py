"""adaptkit.mpo: shape calculator, MPO decomposition / reconstruction / spectra, Kronecker
split, and a cross-check against matrix2mpo_plus (the MPOP / MPOE reference code); the
Kronecker kernels of adaptkit.kron (dense product and matrix-vector form) against torch.kron."""
from __future__ import annotations

import importlib
import itertools
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from adaptkit.errors import AdaptkitError
from adaptkit.kron import kron_apply, kron_sum
from adaptkit.mpo import (
    balanced_factors, interleaved_unfolding, kron_decompose, kron_reconstruct, mpo_bond_dims,
    mpo_bond_spectra, mpo_decompose, mpo_num_params, mpo_reconstruct, mpo_shapes,
)

F64 = torch.float64


def _rand(out, inp, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g, dtype=dtype)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------- shape calculator
SPEC_TABLE = {  # specs/methods.md section 3
    768: [(24, 32), (8, 8, 12), (4, 4, 6, 8), (3, 4, 4, 4, 4)],
    4096: [(64, 64), (16, 16, 16), (8, 8, 8, 8), (4, 4, 4, 8, 8)],
    11008: [(86, 128), (16, 16, 43), (4, 8, 8, 43), (4, 4, 4, 4, 43)],
    3072: [(48, 64), (12, 16, 16), (6, 8, 8, 8), (4, 4, 4, 6, 8)],
}


@pytest.mark.parametrize("dim", sorted(SPEC_TABLE))
def test_shape_calculator_matches_spec_table(dim):
    assert [balanced_factors(dim, n) for n in (2, 3, 4, 5)] == SPEC_TABLE[dim]


def test_shape_calculator_edge_cases():
    assert balanced_factors(768, 1) == (768,)
    assert balanced_factors(1, 3) == (1, 1, 1)
    assert balanced_factors(127, 2) == (1, 127)        # prime degrades to (1, N)
    assert balanced_factors(127, 3) == (1, 1, 127)
    assert mpo_shapes(768, 3072, 3) == ((8, 8, 12), (12, 16, 16))


def _lokr_factorization(dim):
    """LoKr / PEFT PR two-factor rule: largest divisor d <= sqrt(dim), as (d, dim/d)."""
    d = max(x for x in range(1, math.isqrt(dim) + 1) if dim % x == 0)
    return (d, dim // d)


def test_shape_calculator_brute_force():
    for dim in range(1, 241):
        assert balanced_factors(dim, 2) == _lokr_factorization(dim)
        divs = [d for d in range(1, dim + 1) if dim % d == 0]
        for n in (3, 4):
            target = math.log(dim) / n
            cands = [c for c in itertools.combinations_with_replacement(divs, n) if math.prod(c) == dim]
            scores = [sum((math.log(f) - target) ** 2 for f in c) for c in cands]
            best = min(scores)
            expect = min(c for c, s in zip(cands, scores) if s <= best + 1e-9)
            got = balanced_factors(dim, n)
            assert got == expect, (dim, n)
            assert math.prod(got) == dim and list(got) == sorted(got)


# ---------------------------------------------------------------- MPO decomposition
CASES = [(64, 48, 2), (64, 48, 3), (48, 96, 4), (64, 48, 5), (36, 24, 3)]


@pytest.mark.parametrize("out,inp,n", CASES)
def test_reconstruction_and_gauge(out, inp, n):
    w = _rand(out, inp, seed=n)
    o, i = mpo_shapes(out, inp, n)
    dec = mpo_decompose(w, o, i)
    assert len(dec.cores) == n and len(dec.spectra) == n - 1
    r = mpo_bond_dims(o, i)
    for k, c in enumerate(dec.cores):
        assert tuple(c.shape) == (r[k], o[k], i[k], r[k + 1]) and c.dtype == F64
    assert sum(c.numel() for c in dec.cores) == mpo_num_params(o, i)
    assert _rel(mpo_reconstruct(dec.cores), w) < 1e-5
    assert _rel(mpo_reconstruct(dec.cores), w) < 1e-12   # exact to fp64 rounding
    for c in dec.cores[:-1]:                              # left-orthonormal gauge
        m = c.reshape(-1, c.shape[-1])
        torch.testing.assert_close(m.T @ m, torch.eye(m.shape[1], dtype=F64), atol=1e-12, rtol=0)
    assert torch.equal(mpo_decompose(w, o, i).cores[0], dec.cores[0])  # deterministic signs


def _unfold_loop(w, o, i, k):
    """Interleaved unfolding at bond k built element by element (independent of adaptkit)."""
    wn = w.numpy()
    inter = [x for j in range(len(o)) for x in (o[j], i[j])]
    left = math.prod(inter[: 2 * k])
    m = np.zeros((left, wn.size // left))
    for oi in np.ndindex(*o):
        for ii in np.ndindex(*i):
            idx = [x for j in range(len(o)) for x in (oi[j], ii[j])]
            flat = np.ravel_multi_index(idx, inter)
            m[flat // m.shape[1], flat % m.shape[1]] = wn[np.ravel_multi_index(oi, o), np.ravel_multi_index(ii, i)]
    return m


@pytest.mark.parametrize("out,inp,n", [(24, 36, 2), (24, 36, 3), (16, 24, 4)])
def test_bond_spectra_equal_interleaved_unfolding(out, inp, n):
    w = _rand(out, inp, seed=7)
    o, i = mpo_shapes(out, inp, n)
    dec = mpo_decompose(w, o, i)
    direct = mpo_bond_spectra(w, o, i)
    for k in range(1, n):
        m = _unfold_loop(w, o, i, k)
        np.testing.assert_array_equal(interleaved_unfolding(w, o, i, k).numpy(), m)
        sv = np.linalg.svd(m, compute_uv=False)
        np.testing.assert_allclose(dec.spectra[k - 1].numpy(), sv, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(direct[k - 1].numpy(), sv, rtol=1e-10, atol=1e-12)


def test_truncation_params_and_error_monotone():
    w = _rand(48, 64, seed=3)
    o, i = (4, 3, 4), (4, 4, 4)
    full = max(mpo_bond_dims(o, i))
    params, errs = [], []
    for d in range(1, full + 1):
        dec = mpo_decompose(w, o, i, max_bond=d)
        assert max(c.shape[-1] for c in dec.cores) == d
        assert sum(c.numel() for c in dec.cores) == mpo_num_params(o, i, d)
        err = (mpo_reconstruct(dec.cores) - w).norm().item()
        # TT-SVD: the squared error is exactly the discarded energy of every sweep step
        discarded = sum((s[c.shape[-1]:] ** 2).sum().item() for s, c in zip(dec.spectra, dec.cores))
        assert err ** 2 == pytest.approx(discarded, rel=1e-9, abs=1e-18)
        params.append(mpo_num_params(o, i, d))
        errs.append(err)
    assert all(a < b for a, b in zip(params, params[1:]))
    assert all(a >= b - 1e-12 for a, b in zip(errs, errs[1:]))
    assert errs[0] > errs[-1] and errs[-1] < 1e-10
    assert params[-1] == mpo_num_params(o, i) and mpo_num_params(o, i, 1) < mpo_num_params(o, i)
    big = mpo_decompose(w, o, i, max_bond=10 ** 6)
    for a, b in zip(big.cores, mpo_decompose(w, o, i).cores):
        assert torch.equal(a, b)


def test_factor_one_shapes_give_svd_and_dtypes():
    w = _rand(12, 20, seed=5)
    dec = mpo_decompose(w, (12, 1), (1, 20))  # "LoRA mode": the MPO is the SVD of W
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(dec.spectra[0], s)
    assert _rel(mpo_reconstruct(dec.cores), w) < 1e-12
    w32 = w.float()
    dec32 = mpo_decompose(w32, (3, 4), (4, 5))
    assert dec32.cores[0].dtype == torch.float32 and _rel(mpo_reconstruct(dec32.cores), w32) < 1e-5
    dec16 = mpo_decompose(w.bfloat16(), (3, 4), (4, 5))
    assert all(c.dtype == torch.bfloat16 for c in dec16.cores)
    assert _rel(mpo_reconstruct(dec16.cores).double(), w) < 3e-2


def test_reconstruct_is_differentiable():
    dec = mpo_decompose(_rand(16, 16, seed=1), (4, 4), (4, 4))
    cores = [c.clone().requires_grad_(True) for c in dec.cores]
    mpo_reconstruct(cores).square().sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in cores)


# ---------------------------------------------------------------- Kronecker split
def _rearrange_loop(w, o1, o2, i1, i2):
    m = np.zeros((o1 * i1, o2 * i2))
    wn = w.numpy()
    for a, b, c, d in itertools.product(range(o1), range(o2), range(i1), range(i2)):
        m[a * i1 + c, b * i2 + d] = wn[a * o2 + b, c * i2 + d]
    return m


def test_kron_full_rank_exact_and_convention():
    w = _rand(24, 20, seed=11)
    (o1, o2), (i1, i2) = (4, 6), (4, 5)
    a, b, s = kron_decompose(w, (o1, o2), (i1, i2))
    assert a.shape == (16, o1, i1) and b.shape == (16, o2, i2) and s.shape == (16,)
    explicit = sum(s[k] * torch.kron(a[k], b[k]) for k in range(16))
    torch.testing.assert_close(kron_reconstruct(a, b, s), explicit, atol=1e-12, rtol=0)
    assert _rel(explicit, w) < 1e-12
    eye = torch.eye(16, dtype=F64)
    torch.testing.assert_close(a.reshape(16, -1) @ a.reshape(16, -1).T, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(b.reshape(16, -1) @ b.reshape(16, -1).T, eye, atol=1e-12, rtol=0)
    sv = np.linalg.svd(_rearrange_loop(w, o1, o2, i1, i2), compute_uv=False)
    np.testing.assert_allclose(s.numpy(), sv, rtol=1e-10)
    # the same as the 2-core MPO
    dec = mpo_decompose(w, (o1, o2), (i1, i2))
    torch.testing.assert_close(dec.cores[0], a.permute(1, 2, 0)[None])   # (1, o1, i1, r)
    torch.testing.assert_close(dec.cores[1], (s[:, None, None] * b)[..., None])
    torch.testing.assert_close(kron_reconstruct(a, b), torch.einsum("kac,kbd->abcd", a, b).reshape(24, 20))


@pytest.mark.parametrize("kernel", [(), (3,), (3, 2)])
def test_kron_sum_equals_torch_kron(kernel):
    """sum_k kron(A_k, B_k) with trailing kernel axes on B (a conv weight), also from
    non-contiguous factors (a permuted core, an einsum-built Tucker kernel)."""
    g = torch.Generator().manual_seed(5)
    A = torch.randn(3, 4, 5, generator=g, dtype=F64)
    B = torch.randn(3, 6, 2, *kernel, generator=g, dtype=F64)
    want = sum(torch.kron(A[k].reshape(4, 5, *[1] * len(kernel)), B[k]) for k in range(3))
    assert want.shape == (24, 10, *kernel)
    torch.testing.assert_close(kron_sum(A, B), want, atol=1e-12, rtol=0)
    At = A.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # same values, strides of a core
    Bt = B.movedim(1, -1).contiguous().movedim(-1, 1)
    assert not At.is_contiguous() and not Bt.is_contiguous()
    torch.testing.assert_close(kron_sum(At, Bt), want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shapes", [((4, 5), (6, 3)), ((7, 2), (3, 8)), ((1, 5), (6, 1)), ((3, 1), (1, 4))])
def test_kron_apply_equals_the_dense_product(shapes):
    """x kron(L, R)^T in both orders (the shapes pick each), with an identity factor on
    either side, and with d == 1 (the plain-GEMM case), against x @ torch.kron(L, R).T."""
    (a, c), (b, d) = shapes
    g = torch.Generator().manual_seed(7)
    L, R = torch.randn(a, c, generator=g, dtype=F64), torch.randn(b, d, generator=g, dtype=F64)
    x = torch.randn(2, 3, c * d, generator=g, dtype=F64)
    torch.testing.assert_close(kron_apply(x, (c, d), L, R), x @ torch.kron(L, R).T)
    torch.testing.assert_close(kron_apply(x, (c, d), left=L), x @ torch.kron(L, torch.eye(d, dtype=F64)).T)
    torch.testing.assert_close(kron_apply(x, (c, d), right=R), x @ torch.kron(torch.eye(c, dtype=F64), R).T)
    assert kron_apply(x, (c, d)) is x


def test_kron_top_r_is_eckart_young_optimal():
    w = _rand(16, 24, seed=13)
    shapes = ((4, 4), (4, 6))
    full = kron_decompose(w, *shapes)
    g = torch.Generator().manual_seed(0)
    for r in (1, 2, 5, 9, 16):
        a, b, s = kron_decompose(w, *shapes, rank=r)
        torch.testing.assert_close(s, full.s[:r])
        err = (kron_reconstruct(a, b, s) - w).norm().item()
        assert err == pytest.approx(full.s[r:].square().sum().sqrt().item(), rel=1e-9, abs=1e-12)
        # any other rank-r Kronecker sum does worse: other singular triples, or perturbations
        if r < 16:
            other = (kron_reconstruct(full.a[1:r + 1], full.b[1:r + 1], full.s[1:r + 1]) - w).norm().item()
            assert other > err
        for _ in range(3):
            pa = a + 1e-3 * torch.randn(a.shape, generator=g, dtype=F64)
            pb = b + 1e-3 * torch.randn(b.shape, generator=g, dtype=F64)
            assert (kron_reconstruct(pa, pb, s) - w).norm().item() > err


def test_kron_lora_mode_is_svd():
    w = _rand(10, 14, seed=17)
    a, b, s = kron_decompose(w, (10, 1), (1, 14), rank=3)
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(s, sv[:3])
    torch.testing.assert_close(kron_reconstruct(a, b, s), (u[:, :3] * sv[:3]) @ vh[:3])


# ---------------------------------------------------------------- matrix2mpo_plus cross-check
@pytest.fixture
def m2m(monkeypatch):
    np_state, py_state = np.random.get_state(), random.getstate()
    pytest.importorskip("matrix2mpo_plus")  # its import seeds numpy / random globally: undo that
    np.random.set_state(np_state)
    random.setstate(py_state)
    mod = importlib.import_module("matrix2mpo_plus.Matrix2MPO_plus")
    # the bundled Eigen svd_module is a cp310 build that fails on newer Pythons
    monkeypatch.setattr(mod, "svd_module",
                        SimpleNamespace(computeSVD=lambda a: np.linalg.svd(a, full_matrices=False)))
    return mod


def _left_block(cores, k):
    """Contract cores 0..k-1 to the (prod_{j<k} o_j i_j, r_k) left interface matrix."""
    t = cores[0].reshape(-1, cores[0].shape[-1])
    for c in cores[1:k]:
        t = (t @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[-1])
    return t


@pytest.mark.parametrize("out,inp,n", [(24, 20, 2), (32, 24, 3), (32, 48, 4)])
def test_cross_check_matrix2mpo_plus(m2m, out, inp, n):
    w = _rand(out, inp, seed=n) + 3 * torch.eye(out, inp, dtype=F64)  # well conditioned
    o, i = mpo_shapes(out, inp, n)
    ref = m2m.MPO(list(i), list(o), truncate_num=10 ** 9)   # it factors W^T: rows = in
    cores_np, _, lam = ref.matrix2mpo(w.T.numpy().copy())
    theirs = [torch.from_numpy(np.ascontiguousarray(c)) for c in cores_np]   # (r, i_k, o_k, r)
    ours = mpo_decompose(w, o, i)
    # reconstructions (theirs carries a 1e-6 regulariser)
    assert _rel(ref.mpo2matrix(theirs).T, w) < 1e-5
    assert _rel(mpo_reconstruct([c.permute(0, 2, 1, 3) for c in theirs]), mpo_reconstruct(ours.cores)) < 1e-5
    # shapes, parameter count, bond spectra
    assert [tuple(c.shape) for c in theirs] == [tuple(c.shape) for c in mpo_decompose(w.T, i, o).cores]
    assert ref.calculate_total_mpo_param() == mpo_num_params(o, i)
    for k in range(1, n):
        np.testing.assert_allclose(ours.spectra[k - 1].numpy(), lam[k], rtol=1e-8, atol=1e-10)
    # equal up to gauge: the left interface at every bond spans the same subspace
    for k in range(1, n):
        q_ours = _left_block(ours.cores, k)                                   # orthonormal already
        q_theirs, _ = torch.linalg.qr(_left_block([c.permute(0, 2, 1, 3) for c in theirs], k))
        torch.testing.assert_close(q_ours @ q_ours.T, q_theirs @ q_theirs.T, atol=1e-8, rtol=0)


def test_cross_check_matrix2mpo_plus_truncated_and_kron(m2m):
    w = _rand(16, 24, seed=21)
    (o1, o2), (i1, i2) = (4, 4), (4, 6)
    r = 5
    ref = m2m.MPO([i1, i2], [o1, o2], truncate_num=r)
    cores_np, _, _ = ref.matrix2mpo(w.T.numpy().copy())
    theirs = [torch.from_numpy(np.ascontiguousarray(c)) for c in cores_np]
    ours = mpo_decompose(w, (o1, o2), (i1, i2), max_bond=r)
    assert ref.calculate_total_mpo_param() == mpo_num_params((o1, o2), (i1, i2), r)
    assert _rel(ref.mpo2matrix(theirs).T, mpo_reconstruct(ours.cores)) < 1e-5   # Eckart-Young
    # W^T = sum_k core0[0,:,:,k] (x) core1[k,:,:,0]  ==  sum_k s_k A_k^T (x) B_k^T
    kt = sum(torch.kron(theirs[0][0, :, :, k], theirs[1][k, :, :, 0]) for k in range(r))
    a, b, s = kron_decompose(w, (o1, o2), (i1, i2), rank=r)
    assert _rel(kt, kron_reconstruct(a.transpose(1, 2), b.transpose(1, 2), s)) < 1e-5
    assert _rel(kron_reconstruct(a, b, s), mpo_reconstruct(ours.cores)) < 1e-12


# ---------------------------------------------------------------- errors
def test_bad_inputs_raise_adaptkit_error():
    w = _rand(12, 20)
    with pytest.raises(AdaptkitError, match=r"out_shape=\(3, 5\) has product 15 .* 12 rows"):
        mpo_decompose(w, (3, 5), (4, 5))
    with pytest.raises(AdaptkitError, match=r"in_shape=\(4, 4\) has product 16.*balanced_factors\(20, 2\) = \(4, 5\)"):
        mpo_decompose(w, (3, 4), (4, 4))
    with pytest.raises(AdaptkitError, match="same number"):
        mpo_decompose(w, (3, 4), (2, 2, 5))
    with pytest.raises(AdaptkitError, match="positive ints"):
        mpo_decompose(w, (3, 4.0), (4, 5))
    with pytest.raises(AdaptkitError, match="positive ints"):
        mpo_decompose(w, (), ())
    with pytest.raises(AdaptkitError, match="max_bond"):
        mpo_decompose(w, (3, 4), (4, 5), max_bond=0)
    with pytest.raises(AdaptkitError, match="2-D"):
        mpo_decompose(w[None], (3, 4), (4, 5))
    with pytest.raises(AdaptkitError, match="floating"):
        mpo_decompose(w.long(), (3, 4), (4, 5))
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(AdaptkitError, match="NaN"):
        mpo_decompose(bad, (3, 4), (4, 5))
    for args in ((0, 2), (768, 0), (768, True), (7.0, 2)):
        with pytest.raises(AdaptkitError, match="positive int"):
            balanced_factors(*args)
    with pytest.raises(AdaptkitError, match=r"rank=13 exceeds min\(o1\*i1, o2\*i2\)=12"):
        kron_decompose(w, (3, 4), (4, 5), rank=13)
    with pytest.raises(AdaptkitError, match="exactly 2 factors"):
        kron_decompose(w, (3, 2, 2), (1, 4, 5))
    with pytest.raises(AdaptkitError, match="bond=3"):
        interleaved_unfolding(w, (3, 4), (4, 5), 3)
    cores = mpo_decompose(w, (3, 4), (4, 5)).cores
    with pytest.raises(AdaptkitError, match="bond 1 mismatch"):
        mpo_reconstruct([cores[0][..., :2], cores[1]])
    with pytest.raises(AdaptkitError, match="outer bonds"):
        mpo_reconstruct(cores[1:])
    with pytest.raises(AdaptkitError, match="kron_reconstruct"):
        kron_reconstruct(torch.zeros(2, 3, 3), torch.zeros(3, 2, 2))
    assert issubclass(AdaptkitError, ValueError)
