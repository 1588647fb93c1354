"""Device behaviour of every method: moving an adapted model with ``.to()``, training a step
under autocast, and files that cross devices.

Runs on the CPU in CI; ``ADAPTKIT_TEST_DEVICE=cuda pytest tests/test_device.py`` runs the
same assertions on a GPU (the model is built on the CPU, moved, trained there, saved, and
loaded back into a CPU model)."""
import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import adaptkit as ak
from conftest import randomise_adapters
from adaptkit.nf4 import dequantize_nf4, quantize_nf4

DEVICE = torch.device(os.environ.get("ADAPTKIT_TEST_DEVICE", "cpu"))
T = r"\d\.(q|v)"
SPECS = {
    "lora": lambda: ak.LoRA(rank=4, alpha=6, targets=T),
    "dora": lambda: ak.DoRA(rank=4, alpha=6, targets=T),
    "qlora": lambda: ak.QLoRA(rank=4, alpha=6, targets=T, compute_dtype="float32"),
    "qdora": lambda: ak.QLoRA(rank=4, alpha=6, targets=T, use_dora=True, compute_dtype="float32"),
    "lokr": lambda: ak.LoKr(rank=4, alpha=6, targets=T),
    "mora": lambda: ak.MoRA(rank=8, mora_type=6, targets=T),
    "geolora": lambda: ak.GeoLoRA(rank=4, max_rank=8, targets=T),
    "lorampo": lambda: ak.LoRAMPO(rank=2, alpha=6, targets=T),
}


class Block(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.q, self.v, self.o = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d)

    def forward(self, x):
        return self.o(torch.tanh(self.q(x)) * self.v(x))


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block(), nn.Linear(32, 3))


@pytest.mark.parametrize("method", list(SPECS))
def test_move_train_save_and_load_across_devices(method, tmp_path):
    cpu = make_model()
    ak.inject(cpu, SPECS[method]())
    randomise_adapters(cpu, 0.1, seed=1)  # moves, saves and merges carry something
    x = torch.randn(4, 5, 32)
    cpu.eval()
    want = cpu(x)

    model = copy.deepcopy(cpu).to(DEVICE)  # every adapter tensor and quantisation buffer moves
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {DEVICE.type}
    model.eval()
    torch.testing.assert_close(model(x.to(DEVICE)).cpu(), want, atol=2e-4, rtol=2e-4)

    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = F.cross_entropy(model(x.to(DEVICE)).mean(1), torch.tensor([0, 1, 2, 0], device=DEVICE))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.device.type == DEVICE.type and torch.isfinite(g).all()
                         for g in grads)
    opt.step()

    f = tmp_path / "a.safetensors"
    ak.save(model, f)  # written from the device, loaded into a fresh CPU model
    fresh = make_model()
    ak.load(fresh, f)
    model.eval(), fresh.eval()
    for k, v in fresh.state_dict().items():  # bit-exact, quantised bases included
        assert torch.equal(v, model.state_dict()[k].cpu()), k
    torch.testing.assert_close(fresh(x), model(x.to(DEVICE)).cpu(), atol=2e-4, rtol=2e-4)

    merged = ak.merge(model)
    assert not any(isinstance(m, ak.layer.AdaptedLayer) for m in merged.modules())
    torch.testing.assert_close(merged(x.to(DEVICE)).cpu(), fresh(x), atol=5e-4, rtol=5e-4)


@pytest.mark.parametrize("method", ["lora", "dora", "qlora", "lokr"])
def test_autocast_bf16_training_step(method):
    """Mixed precision as users run it: fp32 adapter weights, bf16 matmuls under autocast;
    gradients stay fp32 and close to the fp32 step's (measured on CPU: 1.3-1.5% relative
    error per parameter), and autocast did change them (bf16 matmuls really ran)."""
    model = make_model().to(DEVICE)
    ak.inject(model, SPECS[method]())
    randomise_adapters(model, 0.1, seed=1)
    x = torch.randn(4, 5, 32, device=DEVICE)
    y = torch.tensor([0, 1, 2, 0], device=DEVICE)

    def grads(autocast):
        model.zero_grad()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x).mean(1).float(), y)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref, got = grads(False), grads(True)
    assert set(got) == set(ref) and any(".adapters." in n for n in got)
    assert any(not torch.equal(got[n], ref[n]) for n in got), "autocast changed nothing"
    for n, g in got.items():
        assert g.dtype == torch.float32, n
        assert torch.isfinite(g).all(), n
        assert (g - ref[n]).norm() <= 0.03 * ref[n].norm() + 1e-6, n


VECTORS = Path(__file__).parent / "data" / "nf4_vectors.safetensors"  # bitsandbytes 0.50.2 CPU


@pytest.fixture(scope="module")
def vec():
    from safetensors.torch import load_file
    return load_file(str(VECTORS))


@pytest.mark.parametrize("p", ["a", "e", "o", "b"])
def test_nf4_single_quant_on_device_matches_bitsandbytes_vectors(vec, p):
    """Quantised on DEVICE, the bytes, absmax and dequantised values are bnb's golden CPU
    vectors (a: random, e: midpoint ties and a zero block, o: 67 elements = partial tail,
    b: bf16), so adapters trained on a GPU load onto a CPU base and back."""
    x = (vec["b_input_bf16"] if p == "b" else vec[f"{p}_input"]).to(DEVICE)
    want = vec["b_dequant_bf16"] if p == "b" else vec[f"{p}_dequant"]
    packed, st = quantize_nf4(x, double_quant=False)
    assert packed.device.type == st.absmax.device.type == DEVICE.type
    assert torch.equal(packed.cpu(), vec[f"{p}_packed"])
    assert torch.equal(st.absmax.cpu(), vec[f"{p}_absmax"])
    out = dequantize_nf4(packed, st)
    assert out.device.type == DEVICE.type and out.dtype == x.dtype
    assert torch.equal(out.cpu(), want)


def test_nf4_double_quant_on_device_matches_bitsandbytes_vectors(vec):
    """Double quantisation on DEVICE: bytes, the uint8 absmax codes (exact nearest), the
    nested fp32 absmax, the fp32 offset (reduced on the CPU, so a GPU sum order cannot move
    its last bit) and the dequantised weight equal the golden vectors."""
    packed, st = quantize_nf4(vec["d_input"].to(DEVICE))
    assert torch.equal(packed.cpu(), vec["d_packed"])
    assert torch.equal(st.absmax.cpu(), vec["d_qabsmax_exact"])
    assert st.offset.shape == () and st.offset.device.type == DEVICE.type
    assert torch.equal(st.offset.cpu(), vec["d_offset"])
    assert torch.equal(st.nested_absmax.cpu(), vec["d_absmax2"])
    deq = dequantize_nf4(packed, st)
    assert deq.device.type == DEVICE.type
    assert torch.equal(deq.cpu(), vec["d_dequant_exact"])


def test_nf4_fp16_on_device_equals_fp32_quantisation():
    """fp16 -> fp32 is exact, so an fp16 weight on DEVICE quantises to the bytes and state of
    its fp32 copy (whose quantiser the vectors above pin) and dequantises to their fp16 cast."""
    w = torch.randn(96, 70).half()  # 70: rows cross block boundaries; 6720 = 105 blocks
    p16, s16 = quantize_nf4(w.to(DEVICE))
    p32, s32 = quantize_nf4(w.float())
    assert torch.equal(p16.cpu(), p32)
    for f in ("absmax", "nested_absmax", "offset"):
        assert torch.equal(getattr(s16, f).cpu(), getattr(s32, f)), f
    assert torch.equal(dequantize_nf4(p16, s16).cpu(), dequantize_nf4(p32, s32).half())
