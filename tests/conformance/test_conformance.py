"""The DESIGN.md invariants, for every registered method x base type x bias x dtype.

Adapter weights are randomised after injection (a zero B makes merge tests vacuous),
alpha != rank, and the bases reach every branch (grouped / dilated / padded convs,
transposed weights, embeddings).

ADAPTKIT_TEST_DEVICE=cuda runs the whole suite on a GPU (default: cpu)."""
import copy
import os

import pytest
import torch

import adaptkit as ak
from adaptkit.methods import METHODS
from adaptkit.layer import AdaptedLayer
from conformance.bases import BASES, Net
from conftest import randomise_adapters
from conformance.registry import CASES, TARGET

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEVICE = torch.device(os.environ.get("ADAPTKIT_TEST_DEVICE", "cpu"))
PARAMS = [(m, b, bias, dt) for m in CASES for b in BASES for bias in (True, False) for dt in DTYPES
          if BASES[b][0] in CASES[m][1] and not (b == "embedding" and bias)]


def test_every_registered_method_has_a_case():
    assert {k.split("/")[0] for k in CASES} == set(METHODS)  # "method/variant" keys: variants


def _quantize(method):
    """The registry's ``quantize`` for methods whose inject quantises the base (QLoRA), else None."""
    return CASES[method][3] if len(CASES[method]) > 3 else None


def _base_of(method, ref):
    """The base the adapter sits on: ``ref`` itself, or for a quantising method (QLoRA) a copy
    quantised as inject does. Invariants 1, 2 and 4 hold against it; the quantisation error
    itself is the method's documented change of the base."""
    quantize = _quantize(method)
    if quantize is None:
        return ref
    qref = copy.deepcopy(ref)
    quantize(qref)
    return qref


def _setup(method, base, bias, dt, randomise=True):
    make, _, tols = CASES[method][:3]
    kind, mk, mkx = BASES[base]
    torch.manual_seed(0)
    net = Net(mk(bias)).to(DEVICE, DTYPES[dt])
    ref = copy.deepcopy(net)
    x = mkx(DTYPES[dt]).to(DEVICE)
    ak.inject(net, make())
    layer = net.blocks[0]["proj"]
    if randomise:
        randomise_adapters(layer, 0.2, name="default")
    return net, ref, x, layer, tols[0] if dt == "fp32" else tols[1]


def _close(a, b, atol):
    scale = max(1.0, b.float().abs().max().item())
    torch.testing.assert_close(a.float(), b.float(), atol=atol * scale, rtol=atol)


@pytest.mark.parametrize("method,base,bias,dt", PARAMS)
def test_forward_equals_dense_reference(method, base, bias, dt):
    net, ref, x, layer, tol = _setup(method, base, bias, dt)
    net.eval()
    w = layer.dense_weight(["default"])  # fp32 W + delta_weight()
    xf = x if x.dtype == torch.long else x.float()
    want = layer.base_op(xf, w, None if layer.bias is None else layer.bias.float())
    _close(net(x), want, tol)
    if _quantize(method):  # the quantised base: exactly the dense op on the dequantised weight,
        with ak.disabled(net):  # and exactly the base that adaptkit.nf4.quantize makes
            got = net(x)
        w0 = layer.dense_weight().to(x.dtype)
        assert torch.equal(got, layer.base_op(x, w0, layer.bias))
        assert torch.equal(got, _base_of(method, ref)(x))


@pytest.mark.parametrize("method,base,bias,dt", PARAMS)
def test_fresh_inject_keeps_output(method, base, bias, dt):
    net, ref, x, _, tol = _setup(method, base, bias, dt, randomise=False)
    base_model = _base_of(method, ref)
    net.eval(), base_model.eval()
    _close(net(x), base_model(x), tol)


@pytest.mark.parametrize("method,base,bias,dt", PARAMS)
def test_keys_classes_and_merge(method, base, bias, dt):
    net, ref, x, layer, tol = _setup(method, base, bias, dt)
    net.eval()
    base_keys = list(ref.state_dict())
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    assert all(k in sd for k in base_keys)
    # the one documented exception to unchanged base keys: a quantising method (QLoRA) keeps
    # the weight key for the packed bytes and adds its quantisation state, exactly the keys
    # of the quantised reference; a float checkpoint still loads (it is re-quantised)
    extra = [k for k in sd if k not in base_keys and ".adapters." not in k]
    assert extra == [k for k in _base_of(method, ref).state_dict() if k not in base_keys]
    assert bool(extra) == bool(_quantize(method)) == (not layer.weight.is_floating_point())
    missing, unexpected = net.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and all(".adapters." in k for k in missing)
    if _quantize(method):  # the float checkpoint was re-quantised to the very same bytes
        assert all(torch.equal(v, sd[k]) for k, v in net.state_dict().items())
    w0 = layer.dense_weight().clone()           # (a quantised base: the dequantised weight)
    y = net(x)
    layer.merge(["default"])
    assert layer.adapters["default"].merged
    _close(net(x), y, tol)                      # merged output == unmerged output
    w1 = layer.dense_weight().clone()
    layer.merge(["default"])                    # merging twice is a no-op
    assert torch.equal(layer.dense_weight(), w1)
    layer.unmerge()
    _close(layer.dense_weight(), w0, tol)       # unmerge restores the base weight
    if dt == "fp32":
        assert not torch.equal(w1, w0)          # the merge did something
    merged = ak.merge(net)
    assert [type(m) for m in merged.modules()] == [type(m) for m in ref.modules()]
    assert list(merged.state_dict()) == base_keys
    _close(merged(x), y, tol)
    ref.load_state_dict(merged.state_dict(), strict=True)


@pytest.mark.parametrize("method,base,bias,dt", PARAMS)
def test_gradients_reach_adapters_only(method, base, bias, dt):
    net, _, x, layer, _ = _setup(method, base, bias, dt)
    net.train()
    out = net(x)
    (out.float() ** 2).mean().backward()
    for n, p in net.named_parameters():
        if ".adapters." in n:
            assert p.requires_grad and p.grad is not None and torch.isfinite(p.grad).all(), n
        else:
            assert not p.requires_grad and p.grad is None, n
    assert isinstance(layer, AdaptedLayer)


@pytest.mark.parametrize("method,base,bias,dt", PARAMS)
def test_save_load_bit_exact(method, base, bias, dt, tmp_path):
    net, ref, x, layer, _ = _setup(method, base, bias, dt)
    net.eval()
    f = tmp_path / "a.safetensors"
    ak.save(net, f)
    other = copy.deepcopy(ref)
    ak.load(other, f)
    other.eval()
    for (k, a), (k2, b) in zip(sorted(net.state_dict().items()), sorted(other.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k
    assert torch.equal(net(x), other(x))


@pytest.mark.parametrize("method", [m for m in CASES if "linear" in CASES[m][1]])  # an Embedding has no bias
def test_bias_modes_train_and_save_biases(method, tmp_path):
    make, kinds, _ = CASES[method][:3]
    net = Net(torch.nn.Linear(24, 20)).to(DEVICE)
    base_sd = copy.deepcopy(net.state_dict())  # the base checkpoint, before inject
    ak.inject(net, make(bias="adapter_only"))
    assert net.blocks[0]["proj"].bias.requires_grad
    assert not net.blocks[0]["proj"].weight.requires_grad
    with torch.no_grad():
        net.blocks[0]["proj"].bias.add_(1.0)
    ak.save(net, tmp_path / "b.safetensors")
    fresh = Net(torch.nn.Linear(24, 20)).to(DEVICE)
    fresh.load_state_dict(base_sd | {"blocks.0.proj.bias": torch.zeros(20, device=DEVICE)})
    ak.load(fresh, tmp_path / "b.safetensors")
    assert torch.equal(fresh.blocks[0]["proj"].bias, net.blocks[0]["proj"].bias)
