"""QLoRA / QDoRA on an NF4 base: NF4Linear forward and gradients equal the dense layer built
from the dequantised weight (fp32 and bf16 compute, odd widths, blocksizes, with and without
double quantisation); LoRA / DoRA on the NF4 base equal ak.LoRA / ak.DoRA on that dense
weight; quantisation state survives dtype casts; state-dict layout; deterministic
re-quantisation on inject / load_state_dict / ak.load; adapter-only adapter files;
adaptkit.nf4.save / load (round trip, strictness, bitsandbytes layout and bytes); merge to a
dense Linear or, with requantize=True, back to NF4 with measured drift; error paths; and the
storage of the real MiniLM encoder quantised to NF4 (bits per parameter)."""
import copy
import json
import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adaptkit as ak
from adaptkit.errors import AdaptkitError
from adaptkit.nf4 import DYNAMIC_CODE, NF4_CODE, dequantize_nf4, quantize_nf4
from adaptkit.merge import unmerge
from adaptkit.nf4_linear import NF4Linear
from conftest import randomise_adapters

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
STATE = ("weight", "absmax", "nested_absmax", "offset")


class Net(nn.Module):
    """Two Linears (one with an odd in_features, 37, not a multiple of 64), a LayerNorm and
    an output head: ``a`` and ``b`` are the quantised / adapted layers."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(37, 24)
        self.norm = nn.LayerNorm(24)
        self.b = nn.Linear(24, 20)
        self.head = nn.Linear(20, 3)

    def forward(self, x):
        return self.head(torch.relu(self.b(self.norm(self.a(x)))))


class WithConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 6)
        self.conv = nn.Conv2d(2, 3, 3)


def _net(seed=0):
    torch.manual_seed(seed)
    return Net()


def _nf4_buffers(m: nn.Module) -> dict[str, torch.Tensor]:
    """Every NF4 buffer of the model, by state-dict-like name (adapters excluded)."""
    out = {}
    for p, mod in m.named_modules():
        if isinstance(mod, NF4Linear):
            for k in STATE:
                t = getattr(mod, k)
                if t is not None:
                    out[f"{p}.{k}"] = t.clone()
    return out


def _same_tensors(d1: dict, d2: dict) -> bool:
    return d1.keys() == d2.keys() and all(
        d1[k].dtype == d2[k].dtype and torch.equal(d1[k], d2[k]) for k in d1)


def _dense_copy(qmodel: nn.Module, float_model: nn.Module) -> nn.Module:
    """``float_model`` with every layer that is NF4 in ``qmodel`` set to its dequantised
    weight (fp32): the dense reference of QLoRA."""
    ref = copy.deepcopy(float_model)
    with torch.no_grad():
        for p, mod in qmodel.named_modules():
            if isinstance(mod, NF4Linear):
                ref.get_submodule(p).weight.copy_(mod.dequantize(torch.float32))
    return ref


def _copy_adapters(src: nn.Module, dst: nn.Module):
    sd = {k: v for k, v in src.state_dict().items() if ".adapters." in k}
    missing, unexpected = dst.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if ".adapters." in k]


# ------------------------------------------------------------------ NF4Linear vs dense
@pytest.mark.parametrize("shape", [(24, 37), (5, 64), (33, 129)])
@pytest.mark.parametrize("blocksize", [64, 32, 26, 256])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4linear_forward_equals_dequantised_dense(shape, blocksize, double_quant):
    out_f, in_f = shape
    lin = nn.Linear(in_f, out_f)
    x = torch.randn(2, 3, in_f)
    for cd in (None, torch.bfloat16):
        q = NF4Linear.from_linear(lin, blocksize=blocksize, double_quant=double_quant, compute_dtype=cd)
        assert q.bias is lin.bias and q.weight.dtype == torch.uint8
        assert q.packed().numel() == math.ceil(in_f * out_f / 2)
        assert q.weight.shape == (math.ceil(in_f * out_f / blocksize), blocksize // 2)  # a row per block
        assert q.absmax.numel() == math.ceil(in_f * out_f / blocksize)
        packed, st = quantize_nf4(lin.weight.detach(), blocksize, double_quant)
        assert torch.equal(q.packed(), packed) and torch.equal(q.absmax, st.absmax)
        c = cd or torch.float32
        w = q.dequantize()
        assert w.dtype == c and torch.equal(w, dequantize_nf4(packed, st, c))
        y = q(x)
        ref = F.linear(x.to(c), w, lin.bias.to(c)).float()
        assert y.dtype == torch.float32 and torch.equal(y, ref)
        with torch.no_grad():
            assert torch.equal(q(x), ref)  # the no-grad path too


def test_nf4linear_bf16_weight_computes_in_bf16():
    lin = nn.Linear(37, 10).to(torch.bfloat16)
    q = NF4Linear.from_linear(lin)
    assert q.weight_dtype == q.compute_dtype == torch.bfloat16
    x = torch.randn(4, 37, dtype=torch.bfloat16)
    w = q.dequantize()
    assert w.dtype == torch.bfloat16
    assert torch.equal(q(x), F.linear(x, w, lin.bias))
    # fp32 input: runs in the compute dtype, returns fp32
    x32 = torch.randn(4, 37)
    assert torch.equal(q(x32), F.linear(x32.bfloat16(), w, lin.bias).float())


@pytest.mark.parametrize("cd", [None, torch.bfloat16])
def test_nf4linear_input_and_bias_grads_equal_dense(cd):
    lin = nn.Linear(37, 20)
    q = NF4Linear.from_linear(lin, compute_dtype=cd)
    c = cd or torch.float32
    w = q.dequantize()
    x = torch.randn(2, 5, 37, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    b2 = lin.bias.detach().clone().requires_grad_()
    y = q(x)
    g = torch.randn_like(y)
    y.backward(g)
    y2 = F.linear(x2.to(c), w, b2.to(c)).float()
    y2.backward(g)
    assert torch.equal(y, y2)
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6 if cd is None else 1e-2, atol=1e-6)
    torch.testing.assert_close(lin.bias.grad, b2.grad, rtol=1e-6 if cd is None else 1e-2, atol=1e-6)
    if cd is None:  # fp32: the custom backward is the same product
        assert torch.equal(x.grad, x2.grad)
    # the frozen packed weight never receives a gradient and autograd keeps no dense copy
    assert not q.weight.requires_grad and q.weight.grad is None


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4linear_dtype_casts_keep_quant_state_exact(double_quant):
    lin = nn.Linear(37, 24)
    q = NF4Linear.from_linear(lin, double_quant=double_quant)
    before = {k: getattr(q, k).clone() for k in STATE if getattr(q, k) is not None}
    w = q.dequantize(torch.float32)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double(),
                 lambda m: m.float()):
        cast(q)
        for k in before:
            assert getattr(q, k).dtype == before[k].dtype and torch.equal(getattr(q, k), before[k]), k
        assert torch.equal(q.dequantize(torch.float32), w)
    q.to(torch.bfloat16)
    assert q.bias.dtype == torch.bfloat16


QUANT_SETTINGS = [(64, True), (32, False)]  # (blocksize, double_quant); 888 = 37 x 24: a partial block


@pytest.mark.parametrize("blocksize,double_quant", QUANT_SETTINGS)
def test_nf4linear_load_state_dict_packed_and_float(blocksize, double_quant):
    lin, other = nn.Linear(37, 24), nn.Linear(37, 24)
    kw = dict(blocksize=blocksize, double_quant=double_quant)
    q = NF4Linear.from_linear(lin, **kw)
    q2 = NF4Linear(37, 24, **kw)
    q2.load_state_dict(q.state_dict(), strict=True)
    assert _same_tensors(_nf4_buffers(q), _nf4_buffers(q2))
    q2.load_state_dict(other.state_dict(), strict=True)  # float weight: quantised on load
    assert _same_tensors(_nf4_buffers(q2), _nf4_buffers(NF4Linear.from_linear(other, **kw)))
    assert (q2.nested_absmax is not None) == double_quant and q2.absmax.numel() == -(-888 // blocksize)
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        q2.load_state_dict(nn.Linear(36, 24).state_dict())


# -------------------------------------------------------------- QLoRA / QDoRA vs dense
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("double_quant", [True, False])
def test_qlora_equals_lora_on_dequantised_dense(dora, double_quant):
    base = _net()
    q = copy.deepcopy(base)
    ak.inject(q, ak.QLoRA(rank=4, alpha=8, targets="a|b", use_dora=dora, double_quant=double_quant))
    ref = _dense_copy(q, base)
    spec = ak.DoRA if dora else ak.LoRA
    ak.inject(ref, spec(rank=4, alpha=8, targets="a|b"))
    for p in ("a", "b"):
        ad = q.get_submodule(p).adapters["default"]
        assert type(ad) is type(ref.get_submodule(p).adapters["default"])
        if dora:  # magnitude starts at the row norms of the dequantised weight
            assert torch.equal(ad.lora_magnitude, ref.get_submodule(p).adapters["default"].lora_magnitude)
    randomise_adapters(q, 0.3, add=True, seed=1)
    _copy_adapters(q, ref)
    assert [n for n, p in q.named_parameters() if p.requires_grad] == \
        [n for n, p in ref.named_parameters() if p.requires_grad]
    x = torch.randn(6, 37, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = q(x), ref(x2)
    # same math, other order: the dense DoRA fuses W A^T into its base GEMM ([x; A] W^T); QLoRA
    # pushes A's rows through the GEMM of its dequantised tile ([W; A], adaptkit/methods/lora_fused.py)
    torch.testing.assert_close(y, y2, rtol=1e-6, atol=1e-7)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    grads = {n: p.grad for n, p in q.named_parameters() if p.requires_grad}
    grads2 = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert grads and grads.keys() == grads2.keys()
    for n in grads:  # O(1) gradients; the orders differ by a few fp32 ulps of their largest entry
        torch.testing.assert_close(grads[n], grads2[n], rtol=1e-5, atol=1e-6, msg=n)
    # input gradient through the NF4 bases (custom autograd) equals the dense one
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)


def test_qlora_bf16_compute_adapters_and_train_step():
    q = _net()
    ak.inject(q, ak.QLoRA(rank=4, targets="a|b", compute_dtype="bfloat16"))
    ad = q.a.adapters["default"]
    assert q.a.compute_dtype == torch.bfloat16 and ad.lora_A.dtype == torch.bfloat16
    assert q.a.absmax.dtype == torch.uint8 and q.a.nested_absmax.dtype == torch.float32
    randomise_adapters(q, 0.3, add=True, seed=1)
    x = torch.randn(6, 37)
    y = q(x)
    assert y.dtype == torch.float32
    # base term: F.linear in bf16 on the dequantised bf16 weight, returned in fp32
    with ak.disabled(q):
        base_a = q.a(x)
    assert torch.equal(base_a, F.linear(x.bfloat16(), q.a.dequantize(), q.a.bias.bfloat16()).float())
    opt = torch.optim.SGD([p for p in q.parameters() if p.requires_grad], lr=0.1)
    buffers = _nf4_buffers(q)
    y.square().mean().backward()
    assert ad.lora_A.grad is not None and ad.lora_A.grad.dtype == torch.bfloat16
    opt.step()
    assert _same_tensors(buffers, _nf4_buffers(q))  # the base never moves


def test_injected_model_dtype_cast_keeps_quant_state():
    q = _net()
    ak.inject(q, ak.QLoRA(rank=4, targets="a|b", use_dora=True))
    buffers = _nf4_buffers(q)
    w = q.a.dequantize(torch.float32)
    q.to(torch.bfloat16)
    assert _same_tensors(buffers, _nf4_buffers(q))
    assert torch.equal(q.a.dequantize(torch.float32), w)
    assert q.a.adapters["default"].lora_A.dtype == torch.bfloat16 and q.a.bias.dtype == torch.bfloat16
    assert q(torch.randn(2, 37, dtype=torch.bfloat16)).dtype == torch.bfloat16


# --------------------------------------------------------------- keys and determinism
@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_layout(double_quant):
    q = _net()
    ak.inject(q, ak.QLoRA(rank=2, targets="a|b", double_quant=double_quant))
    sd = q.state_dict()
    n = 37 * 24
    assert sd["a.weight"].dtype == torch.uint8 and sd["a.weight"].shape == ((n + 1) // 2,)
    nb = math.ceil(n / 64)
    assert sd["a.absmax"].shape == (nb,)
    if double_quant:
        assert sd["a.absmax"].dtype == torch.uint8
        assert sd["a.nested_absmax"].dtype == torch.float32 and sd["a.nested_absmax"].shape == (1,)
        assert sd["a.offset"].dtype == torch.float32 and sd["a.offset"].shape == ()
    else:
        assert sd["a.absmax"].dtype == torch.float32
        assert "a.nested_absmax" not in sd and "a.offset" not in sd
    assert {k for k in sd if k.startswith("a.")} == {
        "a.weight", "a.bias", "a.absmax", "a.adapters.default.lora_A", "a.adapters.default.lora_B",
        *(("a.nested_absmax", "a.offset") if double_quant else ())}
    assert sd["head.weight"].dtype == torch.float32  # untargeted layers stay float


def test_inject_is_deterministic_and_matches_nf4_quantize():
    base = _net()
    q1, q2, q3 = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    ak.inject(q1, ak.QLoRA(rank=2, targets="a|b"))
    ak.inject(q2, ak.QLoRA(rank=2, targets="a|b"))
    assert ak.nf4.quantize(q3, targets="a|b") == ["a", "b"]
    assert _same_tensors(_nf4_buffers(q1), _nf4_buffers(q2))
    assert _same_tensors(_nf4_buffers(q1), _nf4_buffers(q3))
    # inject leaves the caller's float Linear alone (it builds an NF4 copy)
    assert type(base.a) is nn.Linear and base.a.weight.dtype == torch.float32


@pytest.mark.parametrize("blocksize,double_quant", QUANT_SETTINGS)
def test_float_checkpoint_loads_into_injected_model_requantised(blocksize, double_quant):
    """A float base checkpoint is requantised with the injected layers' own settings."""
    spec = lambda: ak.QLoRA(rank=2, targets="a|b", blocksize=blocksize, double_quant=double_quant)  # noqa: E731
    q = _net()
    ak.inject(q, spec())
    other = _net(seed=5)  # a different float base checkpoint
    missing, unexpected = q.load_state_dict(other.state_dict(), strict=False)
    assert not unexpected and all(".adapters." in k for k in missing)
    fresh = copy.deepcopy(other)
    ak.inject(fresh, spec())
    assert _same_tensors(_nf4_buffers(q), _nf4_buffers(fresh))
    assert [(m.blocksize, m.double_quant) for m in q.modules() if isinstance(m, NF4Linear)] == \
        [(blocksize, double_quant)] * 2
    assert torch.equal(q.a.bias, other.a.bias) and torch.equal(q.head.weight, other.head.weight)


# ------------------------------------------------------------------------ adapter files
@pytest.mark.parametrize("dora", [False, True])
def test_adapter_file_is_adapter_only_and_loads_bit_identically(tmp_path, dora):
    base = _net()
    q = copy.deepcopy(base)
    ak.inject(q, ak.QLoRA(rank=4, targets="a|b", use_dora=dora, compute_dtype="bfloat16"))
    randomise_adapters(q, 0.3, add=True, seed=1)
    path = tmp_path / "adapter.safetensors"
    ak.save(q, path)
    tensors = load_file(str(path))
    assert tensors and all(k.rpartition(".")[2].startswith("lora_") for k in tensors), sorted(tensors)
    assert all(t.is_floating_point() for t in tensors.values())  # no packed bytes or absmax
    adapter_numel = sum(p.numel() for n, p in q.named_parameters() if ".adapters." in n)
    assert sum(t.numel() for t in tensors.values()) == adapter_numel
    x = torch.randn(5, 37)
    with torch.no_grad():
        want = q(x)
    fresh = copy.deepcopy(base)  # float base: ak.load re-quantises it
    ak.load(fresh, path)
    pre = copy.deepcopy(base)  # base quantised beforehand (compute dtype given there)
    ak.nf4.quantize(pre, targets="a|b", compute_dtype="bfloat16")
    ak.load(pre, path)
    with torch.no_grad():
        for m in (fresh, pre):
            assert isinstance(m.a, NF4Linear)
            assert _same_tensors(_nf4_buffers(m), _nf4_buffers(q))
            assert torch.equal(m(x), want)


# ------------------------------------------------------------------ adaptkit.nf4 files
def _quantised(seed=0, **kw):
    m = _net(seed)
    ak.nf4.quantize(m, targets="a|b", **kw)
    return m


def _snapshot(m: nn.Module):
    return {k: v.clone() for k, v in m.state_dict().items()}, \
        {p: type(mod) for p, mod in m.named_modules()}


@pytest.mark.parametrize("kw", [{}, {"double_quant": False, "compute_dtype": "bfloat16"}])
def test_nf4_save_load_round_trip(tmp_path, kw):
    q = _quantised(**kw)
    path = tmp_path / "base.safetensors"
    ak.nf4.save(q, path)
    x = torch.randn(4, 37)
    with torch.no_grad():
        want = q(x)
    for target in (_net(seed=3), _quantised(seed=4, **kw)):  # float model, quantised model
        assert ak.nf4.load(target, path) == ["a", "b"]
        assert isinstance(target.a, NF4Linear) and target.a.compute_dtype == q.a.compute_dtype
        assert target.a.double_quant == q.a.double_quant
        assert _same_tensors(target.state_dict(), q.state_dict())
        with torch.no_grad():
            assert torch.equal(target(x), want)
    # and QLoRA adopts the loaded base as it is
    ak.inject(target, ak.QLoRA(rank=2, targets="a|b", **kw))
    assert _same_tensors(_nf4_buffers(target), _nf4_buffers(q))


def test_nf4_base_file_plus_adapter_file_restore_a_qlora_model(tmp_path):
    """The start-up path without re-quantising: the base from adaptkit.nf4.save of the trained
    QLoRA model (adapters left out), the adapter from ak.save."""
    base = _net()
    q = copy.deepcopy(base)
    ak.inject(q, ak.QLoRA(rank=4, targets="a|b", use_dora=True))
    randomise_adapters(q, 0.3, add=True, seed=1)
    ak.nf4.save(q, tmp_path / "base.safetensors")
    ak.save(q, tmp_path / "adapter.safetensors")
    assert not [k for k in load_file(str(tmp_path / "base.safetensors")) if "lora" in k]
    fresh = _net(seed=7)
    ak.nf4.load(fresh, tmp_path / "base.safetensors")
    ak.load(fresh, tmp_path / "adapter.safetensors")
    x = torch.randn(4, 37)
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))
    assert _same_tensors(fresh.state_dict(), q.state_dict())
    ak.merge(q, unload=False)
    with pytest.raises(AdaptkitError, match="merged in place"):
        ak.nf4.save(q, tmp_path / "x.safetensors")


def test_nf4_file_layout_is_bitsandbytes():
    """The file: bnb's Linear4bit serialisation for NF4 layers, plain tensors elsewhere."""
    import tempfile
    q = _quantised()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "base.safetensors")
        ak.nf4.save(q, path)
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            meta = f.metadata()
    assert meta["adaptkit.nf4.format"] == "1"
    assert json.loads(meta["adaptkit.nf4.layers"]) == {"a": {"compute_dtype": "float32"},
                                                        "b": {"compute_dtype": "float32"}}
    n = 37 * 24
    assert tensors["a.weight"].dtype == torch.uint8 and tensors["a.weight"].shape == ((n + 1) // 2, 1)
    assert torch.equal(tensors["a.weight"].reshape(-1), q.a.packed())
    assert torch.equal(tensors["a.weight.absmax"], q.a.absmax)
    assert torch.equal(tensors["a.weight.nested_absmax"], q.a.nested_absmax)
    assert torch.equal(tensors["a.weight.quant_map"], NF4_CODE)
    assert torch.equal(tensors["a.weight.nested_quant_map"], DYNAMIC_CODE)
    js = json.loads(bytes(tensors["a.weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert js["quant_type"] == "nf4" and js["blocksize"] == 64 and js["shape"] == [24, 37]
    assert js["dtype"] == "float32" and js["nested_offset"] == float(q.a.offset)
    assert {k for k in tensors if not k.startswith(("a.weight", "b.weight"))} == \
        {"a.bias", "b.bias", "norm.weight", "norm.bias", "head.weight", "head.bias"}


def _rewrite(src, dst, edit):
    tensors = load_file(str(src))
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    edit(tensors)
    save_file(tensors, str(dst), metadata=meta)


@pytest.mark.parametrize("edit, key", [
    (lambda t: t.pop("norm.weight"), "norm.weight"),
    (lambda t: t.update({"extra.weight": torch.zeros(3)}), "extra.weight"),
    (lambda t: t.update({"head.bias": torch.zeros(4)}), "head.bias"),
    (lambda t: t.pop("a.weight.absmax"), "a.weight.absmax"),
    (lambda t: t.pop("b.bias"), "'b'"),
    (lambda t: t.update({"a.weight": t["a.weight"][:-1]}), "'a'"),
])
def test_nf4_load_is_strict_and_atomic(tmp_path, edit, key):
    good = tmp_path / "good.safetensors"
    ak.nf4.save(_quantised(), good)
    bad = tmp_path / "bad.safetensors"
    _rewrite(good, bad, edit)
    for target in (_net(seed=3), _quantised(seed=4)):
        sd, types = _snapshot(target)
        with pytest.raises(AdaptkitError, match="Nothing was loaded") as e:
            ak.nf4.load(target, bad)
        assert key in str(e.value), str(e.value)
        sd2, types2 = _snapshot(target)
        assert types2 == types and _same_tensors(sd, sd2)


def test_nf4_save_load_refusals(tmp_path):
    with pytest.raises(AdaptkitError, match="no NF4 layer"):
        ak.nf4.save(_net(), tmp_path / "x.safetensors")
    q = _net()
    ak.inject(q, ak.QLoRA(rank=2, targets="a"))
    ak.save(q, tmp_path / "adapter.safetensors")
    with pytest.raises(AdaptkitError, match="adapter file: use ak.load"):
        ak.nf4.load(_net(), tmp_path / "adapter.safetensors")
    ak.nf4.save(_quantised(), tmp_path / "base.safetensors")
    with pytest.raises(AdaptkitError, match="carries adapters"):
        ak.nf4.load(q, tmp_path / "base.safetensors")  # a base file onto an adapted model
    with pytest.raises(AdaptkitError, match="carries adapters"):
        ak.nf4.quantize(q, targets="b")
    with pytest.raises(AdaptkitError, match=r"'norm' \(LayerNorm\)"):
        ak.nf4.quantize(_net(), targets="a|norm")


def test_nf4_file_matches_bitsandbytes_linear4bit(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    import logging
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for dq in (True, False):
        q = _quantised(double_quant=dq)
        ak.nf4.save(q, tmp_path / "base.safetensors")
        ours = load_file(str(tmp_path / "base.safetensors"))
        float_a = _net().a  # the weight q.a was quantised from
        lin = bnb.nn.Linear4bit(37, 24, bias=True, compute_dtype=torch.float32,
                                compress_statistics=dq, quant_type="nf4")
        lin.weight = bnb.nn.Params4bit(float_a.weight.detach().clone(), requires_grad=False,
                                       quant_type="nf4", compress_statistics=dq, blocksize=64)
        lin.bias = nn.Parameter(float_a.bias.detach().clone())
        lin = lin.to("cpu")  # Params4bit quantises on its first .to(device)
        theirs = {f"a.{k}": v for k, v in lin.state_dict().items()}
        assert set(theirs) == {k for k in ours if k.startswith("a.")}
        for k, t in theirs.items():
            assert ours[k].dtype == t.dtype and ours[k].shape == t.shape, k
        assert torch.equal(ours["a.weight"], theirs["a.weight"])  # packed bytes
        assert torch.equal(ours["a.bias"], theirs["a.bias"])
        js = {k: json.loads(bytes(d["a.weight.quant_state.bitsandbytes__nf4"].tolist())) for k, d in
              (("ours", ours), ("bnb", theirs))}
        assert js["ours"] == js["bnb"]
        if dq:  # 8-bit absmax codes: exact nearest here, bnb's CPU search may be one code off
            assert (ours["a.weight.absmax"].int() - theirs["a.weight.absmax"].int()).abs().max() <= 1
            assert torch.equal(ours["a.weight.nested_absmax"], theirs["a.weight.nested_absmax"])
        else:
            assert torch.equal(ours["a.weight.absmax"], theirs["a.weight.absmax"])
        # the same packed bytes + quantisation state give bnb's own functional quantisation
        pb, sb = bnb.functional.quantize_4bit(float_a.weight.detach(), blocksize=64,
                                              compress_statistics=dq, quant_type="nf4")
        assert torch.equal(ours["a.weight"], pb)


# ------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("cd", [None, "bfloat16"])
@pytest.mark.parametrize("dora", [False, True])
def test_merge_returns_dense_linear_with_original_keys(cd, dora):
    base = _net()
    q = copy.deepcopy(base)
    ak.inject(q, ak.QLoRA(rank=4, targets="a|b", use_dora=dora, compute_dtype=cd))
    randomise_adapters(q, 0.3, add=True, seed=1)
    want_w = q.a.dense_weight(["default"])  # fp32: dequantised W + delta (DoRA: g-scaled)
    x = torch.randn(5, 37)
    with torch.no_grad():
        want = q(x)
    merged = ak.merge(q)
    assert type(merged.a) is nn.Linear and type(merged.b) is nn.Linear
    # the weight's pre-quantisation dtype (fp32 here), also with bf16 compute: the merged
    # model runs on the inputs the adapted one took
    assert merged.a.weight.dtype == torch.float32 and merged.a.bias.dtype == torch.float32
    assert torch.equal(merged.a.weight, want_w)
    assert list(merged.state_dict()) == list(base.state_dict())
    fresh = _net(seed=9)
    fresh.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), merged(x))
        if cd is None:
            torch.testing.assert_close(merged(x), want, rtol=1e-5, atol=1e-6)
        else:  # the adapted model computed in bf16: its rounding is the difference
            torch.testing.assert_close(merged(x), want, rtol=0.05, atol=0.05)


def test_inplace_merge_unmerge_is_exact():
    q = _net()
    ak.inject(q, ak.QLoRA(rank=4, targets="a|b", use_dora=True))
    randomise_adapters(q, 0.3, add=True, seed=1)
    buffers = _nf4_buffers(q)
    x = torch.randn(5, 37)
    with torch.no_grad():
        want = q(x)
        ak.merge(q, unload=False)
        torch.testing.assert_close(q(x), want, rtol=1e-5, atol=1e-6)
        assert "merged_weight" not in q.state_dict() and not any("merged" in k for k in q.state_dict())
        unmerge(q)
        assert torch.equal(q(x), want)
    assert _same_tensors(buffers, _nf4_buffers(q))


@pytest.mark.parametrize("double_quant", [True, False])
def test_merge_requantize_records_drift(double_quant):
    q = _net()
    ak.inject(q, ak.QLoRA(rank=4, targets="a|b", double_quant=double_quant))
    randomise_adapters(q, 0.3, add=True, seed=1)
    merged_w = {p: q.get_submodule(p).dense_weight(["default"]).detach() for p in ("a", "b")}
    w0 = {p: q.get_submodule(p).dequantize(torch.float32) for p in ("a", "b")}
    with pytest.warns(UserWarning, match=r"re-quantising 2 merged layer\(s\) to NF4"):
        out = ak.merge(q, requantize=True)
    report = ak.nf4.drift_report(out)
    assert set(report) == {"a", "b"}
    for p in ("a", "b"):
        m = out.get_submodule(p)
        assert type(m) is NF4Linear and m.double_quant == double_quant
        assert report[p] is m.requant_drift
        d = m.requant_drift
        assert math.isfinite(d["vs_update"]) and d["vs_update"] > 0
        assert 0 < d["max_rel_output"] < 0.5
        # re-quantised from the fp32 merged weight, deterministically
        ref = NF4Linear.from_weight(merged_w[p], double_quant=double_quant)
        assert _same_tensors(_nf4_buffers(m), _nf4_buffers(ref))
        # the recorded figures are what they say: probe the layer ourselves
        wq = m.dequantize(torch.float32)
        xp = torch.randn(64, wq.shape[1], generator=torch.Generator().manual_seed(0))
        err = xp @ (wq - merged_w[p]).t()
        rel = (err.norm(dim=1) / (xp @ merged_w[p].t()).norm(dim=1)).max()
        assert d["max_rel_output"] == pytest.approx(float(rel), rel=1e-4)
        upd = (xp @ (merged_w[p] - w0[p]).t()).norm()
        assert d["vs_update"] == pytest.approx(float(err.norm() / upd), rel=1e-4)
    assert list(out.state_dict()) == list(_quantised(double_quant=double_quant).state_dict())


def test_merge_requantize_refusals():
    m = _net()
    ak.inject(m, ak.LoRA(rank=2, targets="a|b"))
    with pytest.raises(AdaptkitError, match="requantize=True needs"):
        ak.merge(m, requantize=True)
    assert isinstance(m.a.adapters["default"], nn.Module)  # nothing merged or unloaded
    q = _net()
    ak.inject(q, ak.QLoRA(rank=2, targets="a|b"))
    with pytest.raises(AdaptkitError, match="requantize=True needs unload=True"):
        ak.merge(q, unload=False, requantize=True)
    assert not q.a.adapters["default"].merged


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kw, msg", [
    ({"init": "pissa"}, "init='pissa'"),
    ({"blocksize": 3}, "blocksize=3"),
    ({"blocksize": 0}, "blocksize=0"),
    ({"blocksize": True}, "blocksize=True"),
    ({"blocksize": "64"}, "blocksize='64'"),
    ({"compute_dtype": "int8"}, "compute_dtype='int8'"),
    ({"compute_dtype": torch.bfloat16}, "compute_dtype="),
    ({"double_quant": 1}, "double_quant"),
    ({"use_dora": "yes"}, "use_dora"),
])
def test_spec_validation(kw, msg):
    with pytest.raises(AdaptkitError, match=msg.replace("(", r"\(")):
        ak.QLoRA(rank=2, targets="a", **kw)


@pytest.mark.parametrize("kw, msg", [
    ({"blocksize": 3}, "blocksize=3"),
    ({"blocksize": -64}, "blocksize=-64"),
    ({"compute_dtype": "fp8"}, "compute_dtype='fp8'"),
    ({"double_quant": None}, "double_quant"),
])
def test_quantize_validation_leaves_model_unchanged(kw, msg):
    m = _net()
    sd, types = _snapshot(m)
    with pytest.raises(AdaptkitError, match=msg):
        ak.nf4.quantize(m, targets="a|b", **kw)
    assert _snapshot(m)[1] == types and _same_tensors(sd, _snapshot(m)[0])
    if "blocksize" in kw:
        with pytest.raises(AdaptkitError, match=msg):
            NF4Linear(8, 4, **kw)


def test_inject_refusals_leave_model_unchanged():
    m = WithConv()
    sd, types = _snapshot(m)
    with pytest.raises(AdaptkitError, match=r"cannot adapt 'conv' \(Conv2d\)"):
        ak.inject(m, ak.QLoRA(rank=2, targets="a|conv"))
    assert _snapshot(m)[1] == types and _same_tensors(sd, _snapshot(m)[0])
    assert type(m.a) is nn.Linear and "_adaptkit" not in m.__dict__
    # LoRA on an NF4 base: refused (its adapters would be built on uint8 bytes)
    q = _quantised()
    sd, types = _snapshot(q)
    with pytest.raises(AdaptkitError, match="use ak.QLoRA"):
        ak.inject(q, ak.LoRA(rank=2, targets="a|b"))
    with pytest.raises(AdaptkitError, match="use ak.QLoRA"):
        ak.inject(q, ak.DoRA(rank=2, targets="a"))
    assert _snapshot(q)[1] == types and _same_tensors(sd, _snapshot(q)[0])
    # QLoRA settings that disagree with a pre-quantised base; the float layer 'a' it also
    # targets must not be quantised either
    mixed = _net()
    ak.nf4.quantize(mixed, targets="b", blocksize=32)
    sd, types = _snapshot(mixed)
    for spec in (ak.QLoRA(rank=2, targets="a|b"), ak.QLoRA(rank=2, targets="a|b", blocksize=32,
                                                           double_quant=False),
                 ak.QLoRA(rank=2, targets="a|b", blocksize=32, compute_dtype="bfloat16")):
        with pytest.raises(AdaptkitError, match="'b' is already NF4 with blocksize=32"):
            ak.inject(mixed, spec)
        assert _snapshot(mixed)[1] == types and _same_tensors(sd, _snapshot(mixed)[0])
    ak.inject(mixed, ak.QLoRA(rank=2, targets="a|b", blocksize=32))  # matching: adopted
    assert mixed.a.blocksize == 32 and torch.equal(mixed.b.packed(), sd["b.weight"])
    # a float layer that already carries adapters is not quantised under them
    lm = _net()
    ak.inject(lm, ak.LoRA(rank=2, targets="a"))
    sd, types = _snapshot(lm)
    with pytest.raises(AdaptkitError, match="already carries adapters"):
        ak.inject(lm, ak.QLoRA(rank=2, targets="a"), name="q")
    assert _snapshot(lm)[1] == types and _same_tensors(sd, _snapshot(lm)[0])


def test_rank_too_large_refused_on_nf4_base():
    with pytest.raises(AdaptkitError, match="rank"):
        ak.inject(_net(), ak.QLoRA(rank=30, targets="b"))


# ----------------------------------------------------------------- storage of MiniLM
def _storage_bits(model: nn.Module) -> tuple[int, int]:
    """(bits of NF4 storage, quantised parameters) over the model's NF4 layers: packed bytes,
    absmax (uint8 codes or fp32), nested absmax and offset."""
    bits = params = 0
    for m in model.modules():
        if isinstance(m, NF4Linear):
            params += m.in_features * m.out_features
            bits += 8 * sum(t.numel() * t.element_size() for t in
                            (m.weight, m.absmax, m.nested_absmax, m.offset) if t is not None)
    return bits, params


@pytest.fixture(scope="module")
def minilm():
    sys.path.insert(0, EXAMPLES)
    from minibert import load_minilm
    model, _ = load_minilm()
    return model


def test_minilm_bits_per_parameter(minilm):
    targets = r".*\.(query|key|value|dense)"
    linear = {p: m.weight.numel() for p, m in minilm.named_modules() if type(m) is nn.Linear}
    ids = torch.randint(0, 1000, (2, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = minilm(ids, mask)
    def layer_bits(n: int, dq: bool) -> int:
        """Storage of one n-weight layer, from the layout: 2 weights per byte; per block of
        64 an uint8 absmax code (dq) or fp32 absmax; per 256 blocks an fp32 nested absmax
        and one fp32 offset per layer (dq)."""
        nb = -(-n // 64)
        return 8 * -(-n // 2) + (8 * nb + 32 * -(-nb // 256) + 32 if dq else 32 * nb)

    for dq in (True, False):
        m = copy.deepcopy(minilm)
        paths = ak.nf4.quantize(m, targets=targets, double_quant=dq)
        assert len(paths) == 36 and set(paths) <= set(linear)
        bits, params = _storage_bits(m)
        assert params == sum(linear[p] for p in paths)
        assert bits == sum(layer_bits(linear[p], dq) for p in paths)  # exact, bit for bit
        if not dq:  # every MiniLM layer is whole blocks
            assert bits / params == 4.5
        with torch.no_grad():  # the quantised encoder still embeds like the float one
            cos = F.cosine_similarity(m(ids, mask), ref, dim=-1)
        assert bool((cos > 0.95).all()), cos


class _Tied(nn.Module):
    """An embedding tied to the output head, and a user module named ``adapters``."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(10, 64), nn.Linear(64, 64)
        self.adapters = nn.ModuleList([nn.Linear(64, 64)])
        self.head = nn.Linear(64, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, i):
        return self.head(self.adapters[0](self.fc(self.emb(i))))


def test_nf4_save_load_keeps_tied_weights_and_user_modules_named_adapters(tmp_path):
    model = _Tied()
    ak.nf4.quantize(model, targets=["fc"])
    ak.nf4.save(model, tmp_path / "q.safetensors")
    with safe_open(str(tmp_path / "q.safetensors"), "pt") as f:
        assert {"adapters.0.weight", "adapters.0.bias"} <= set(f.keys())
    fresh = _Tied()
    ak.nf4.load(fresh, tmp_path / "q.safetensors")
    assert isinstance(fresh.fc, NF4Linear) and fresh.head.weight is fresh.emb.weight
    i = torch.tensor([[1, 2, 3]])
    assert torch.equal(fresh(i), model(i))


def test_load_shape_error_names_the_dense_shape_of_an_nf4_layer(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32))
    ak.inject(model, ak.LoRA(rank=2, targets="0"))
    ak.save(model, tmp_path / "a.safetensors")
    other = nn.Sequential(nn.Linear(64, 48))
    ak.nf4.quantize(other, targets=["0"])
    with pytest.raises(AdaptkitError, match=r"model has NF4Linear weight \[48, 64\]"):
        ak.load(other, tmp_path / "a.safetensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drift_report_vs_update_only_when_there_is_an_update(dtype):
    """Right after inject the adapters' update is zero (or, in bf16, only the rounding of the
    merged weight), so vs_update would be inf or a meaningless ratio: it is None then, and a
    finite number once the adapters have trained."""
    for trained in (False, True):
        q = _net().to(dtype)
        ak.inject(q, ak.QLoRA(rank=4, targets="a|b"))
        if trained:
            randomise_adapters(q, 0.3, add=True, seed=1)
        with pytest.warns(UserWarning, match="re-quantising"):
            report = ak.nf4.drift_report(ak.merge(q, requantize=True))
        for p, d in report.items():
            assert d["max_rel_output"] > 0, (p, d)
            assert (d["vs_update"] is None) != trained, (p, d)
            if trained:
                assert math.isfinite(d["vs_update"]) and d["vs_update"] > 0, (p, d)
