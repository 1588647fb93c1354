"""The fused LoRA Linear (adaptkit/methods/lora_fused.py): the same output and gradients as the
plain path (base op, then ``LoRAAdapter.update``) and as a float64 reference, fp32 and bf16,
with and without bias, 2-D and 3-D input; QLoRA's NF4 base; and the cases that must keep
the plain path (dropout in training, a trainable W, autocast, not first in the active set)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import adaptkit as ak
from adaptkit.methods.lora import LoRAAdapter

TOL = {torch.float32: dict(rtol=2e-6, atol=2e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
CD = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def _model(dtype, bias, qlora=False, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(64, 48, bias=bias)).to(dtype)
    if qlora:
        spec = ak.QLoRA(rank=4, alpha=12, targets="0", compute_dtype=CD[dtype], dropout=dropout)
    else:
        spec = ak.LoRA(rank=4, alpha=12, targets="0", dropout=dropout, bias="all" if bias else "none")
    ak.inject(m, spec)
    with torch.no_grad():
        m[0].adapters["default"].lora_B.normal_(0, 0.5)  # non-zero B: the update counts
    return m


def _run(m, x, fused: bool, monkeypatch=None):
    """(output, grads of x and of every trainable parameter, name of y's grad_fn)."""
    mp = monkeypatch
    mp.setattr(LoRAAdapter, "fuses_base", fused)
    for p in m.parameters():
        p.grad = None
    xx = x.detach().clone().requires_grad_(True)
    y = m(xx)
    w = torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)  # a non-uniform output gradient
    (y * w).sum().backward()
    grads = [xx.grad] + [p.grad for p in m.parameters() if p.requires_grad]
    return y.detach(), grads, type(y.grad_fn).__name__


def _reference(m, x):
    """float64 y = x W^T + b + s (x A^T) B^T and its gradients, from the layer's tensors."""
    layer = m[0]
    a = layer.adapters["default"]
    W = layer.dense_weight().double()  # (out, in): the dequantised NF4 weight for QLoRA
    b = layer.bias
    xx = x.detach().double().requires_grad_(True)
    A = a.lora_A.detach().double().requires_grad_(True)
    B = a.lora_B.detach().double().requires_grad_(True)
    bb = None if b is None else b.detach().double().requires_grad_(True)
    y = xx @ W.t() + a.scale * (xx @ A.t()) @ B.t()
    if bb is not None:
        y = y + bb
    (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum().backward()
    grads = {"x": xx.grad, "A": A.grad, "B": B.grad}
    if bb is not None and b.requires_grad:
        grads["bias"] = bb.grad
    return y.detach(), grads


@pytest.mark.parametrize("qlora", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(9, 64), (2, 5, 64)])
def test_fused_equals_plain_path_and_reference(monkeypatch, qlora, dtype, bias, shape):
    m = _model(dtype, bias, qlora)
    x = torch.randn(*shape).to(dtype)
    y, g, fn = _run(m, x, True, monkeypatch)
    y0, g0, fn0 = _run(m, x, False, monkeypatch)
    assert fn == "_LoRALinearBackward" and fn0 != fn  # the two paths really differ
    assert y.shape == y0.shape == (*shape[:-1], 48) and y.is_contiguous()
    assert len(g) == len(g0) == (4 if bias and not qlora else 3)
    for a, b in zip([y, *g], [y0, *g0]):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, **TOL[dtype])
    # and both against float64 (not just against each other)
    yr, gr = _reference(m, x)
    scale = yr.abs().max()
    assert (y.double() - yr).abs().max() <= (1e-5 if dtype == torch.float32 else 2e-2) * scale
    a = m[0].adapters["default"]
    named = {"x": g[0], "A": a.lora_A.grad, "B": a.lora_B.grad}
    if "bias" in gr:
        named["bias"] = m[0].bias.grad
    for k, ref in gr.items():
        err = (named[k].double() - ref).abs().max() / ref.abs().max()
        assert err <= (1e-5 if dtype == torch.float32 else 2e-2), (k, float(err))


def test_eval_and_no_grad_use_the_same_kernels(monkeypatch):
    m = _model(torch.float32, True, dropout=0.3)
    x = torch.randn(3, 7, 64)
    m.eval()  # dropout off: the fused forward applies
    with torch.no_grad():
        y = m(x)
        monkeypatch.setattr(LoRAAdapter, "fuses_base", False)
        y0 = m(x)
    assert y.grad_fn is None
    torch.testing.assert_close(y, y0, rtol=1e-6, atol=1e-6)


def test_dropout_in_training_keeps_the_plain_path():
    m = _model(torch.float32, False, dropout=0.5)
    x = torch.randn(6, 64, requires_grad=True)
    torch.manual_seed(3)
    y = m(x)
    assert type(y.grad_fn).__name__ != "_LoRALinearBackward"
    layer, a = m[0], m[0].adapters["default"]
    torch.manual_seed(3)  # the same mask: dropout acts on the adapter's input only
    xd = torch.nn.functional.dropout(x, 0.5, True)
    ref = x @ layer.weight.t() + a.scale * (xd @ a.lora_A.t()) @ a.lora_B.t()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_trainable_base_weight_keeps_the_plain_path():
    m = _model(torch.float32, True)
    m[0].weight.requires_grad_(True)
    y = m(torch.randn(4, 64))
    assert type(y.grad_fn).__name__ != "_LoRALinearBackward"
    y.sum().backward()
    assert m[0].weight.grad is not None and m[0].weight.grad.abs().sum() > 0


def test_autocast_keeps_the_plain_path():
    m = _model(torch.float32, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(torch.randn(4, 64, requires_grad=True))
    assert y.dtype == torch.bfloat16 and type(y.grad_fn).__name__ != "_LoRALinearBackward"


def test_two_adapters_first_fuses_second_adds(monkeypatch):
    m = _model(torch.float32, True)
    ak.inject(m, ak.LoRA(rank=2, alpha=5, targets="0"), name="b")
    ak.set_active(m, ["default", "b"])
    with torch.no_grad():
        m[0].adapters["b"].lora_B.normal_(0, 0.5)
    x = torch.randn(5, 64)
    y, g, _ = _run(m, x, True, monkeypatch)
    y0, g0, _ = _run(m, x, False, monkeypatch)
    for a, b in zip([y, *g], [y0, *g0]):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
    dense = m[0].base_op(x, m[0].dense_weight(["default", "b"]), m[0].bias)
    torch.testing.assert_close(y, dense, rtol=1e-5, atol=1e-5)


def test_inputs_without_grad_and_double_backward(monkeypatch):
    m = _model(torch.float32, False)
    a = m[0].adapters["default"]
    x = torch.randn(6, 64)  # no input gradient: only A and B get one
    y = m(x)
    assert type(y.grad_fn).__name__ == "_LoRALinearBackward"
    y.pow(2).sum().backward()
    assert a.lora_A.grad is not None and a.lora_B.grad is not None

    def grad_penalty(fused, model=m, xin=x):  # d/dA of ||dL/dx||^2: second order through the node
        monkeypatch.setattr(LoRAAdapter, "fuses_base", fused)
        ad = model[0].adapters["default"]
        xx = xin.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(model(xx).pow(2).sum(), xx, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), [ad.lora_A, ad.lora_B])

    # both fp32 paths against the float64 plain path: the fused one sums in another order
    # (values ~1e3 here), so it must be as close to the truth as the plain one, not equal to it
    m64 = copy.deepcopy(m).double()
    truth = grad_penalty(False, m64, x.double())
    for u, v, t in zip(grad_penalty(True), grad_penalty(False), truth):
        err_fused, err_plain = (u.double() - t).abs().max(), (v.double() - t).abs().max()
        assert err_fused <= 4 * err_plain + 1e-6 * t.abs().max(), (err_fused, err_plain)
        torch.testing.assert_close(u, v, rtol=5e-5, atol=1e-5)
