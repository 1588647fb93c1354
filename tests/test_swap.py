"""ak.swap: a saved adapter's weights into an existing slot, in place.

A compiled model runs three swaps (other ranks, alphas, rsLoRA) with no recompile (dynamo
decides recompiles whatever the backend, so a counting backend stands in for inductor) and
equals the eager model with each file loaded normally; every method swaps eagerly (pad and
fold where its rule allows), ``ak.save`` after a swap loads back to the same outputs, and
every refusal names the mismatch and leaves the model as it was."""
import pytest
import torch
import torch.nn as nn

import adaptkit as ak
from adaptkit.merge import unmerge
from conftest import Conv1D, Counter, randomise_adapters

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5


class Net(nn.Module):
    """Linear -> GELU -> Linear -> GPT-2 Conv1D, the same weights every time (seeded)."""

    def __init__(self, hidden=24):
        super().__init__()
        g = torch.random.fork_rng()
        with g:
            torch.manual_seed(123)
            self.fc1 = nn.Linear(16, hidden)
            self.act = nn.GELU()
            self.fc2 = nn.Linear(hidden, 16)
            self.out = Conv1D(12, 16)

    def forward(self, x):
        return self.out(self.fc2(self.act(self.fc1(x))))


X = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(7))
LIN = r"fc1|fc2"  # QLoRA: Linear only
ALL = r"fc1|fc2|out"


def saved(tmp_path, spec, seed, fname=None, model=None):
    """A file written by ak.save: ``spec`` on a fresh Net, every adapter parameter random."""
    m = Net() if model is None else model
    ak.inject(m, spec, name="src")
    randomise_adapters(m, 0.1, seed=seed, name="src")
    with torch.no_grad():  # trained biases / modules_to_save: differ from the base's
        for n, p in m.named_parameters():
            if p.requires_grad and ".adapters." not in n:
                p.add_(0.1)
    f = tmp_path / (fname or f"{spec.method}_{seed}.safetensors")
    ak.save(m, f, name="src")
    return f


def loaded(f):
    """The eager reference: the file loaded normally into a fresh Net."""
    m = Net()
    ak.load(m, f)
    return m


def snapshot(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def assert_same(m, snap):
    sd = m.state_dict()
    assert sd.keys() == snap.keys()
    for k, v in snap.items():
        assert torch.equal(sd[k], v), k




SLOTS = {  # slot spec, then three files of other ranks / alphas it takes
    "lora": (
        lambda **kw: ak.LoRA(**{"rank": 8, "alpha": 16.0, "targets": ALL, **kw}),
        [dict(rank=2, alpha=3.0), dict(rank=8, alpha=5.0, use_rslora=True), dict(rank=5, alpha=40.0)],
    ),
    "dora": (
        lambda **kw: ak.DoRA(**{"rank": 8, "alpha": 16.0, "targets": ALL, **kw}),
        [dict(rank=3, alpha=7.0), dict(rank=8, alpha=2.0), dict(rank=1, alpha=9.0, use_rslora=True)],
    ),
    "qlora": (
        lambda **kw: ak.QLoRA(**{"rank": 6, "alpha": 12.0, "blocksize": 8, "targets": LIN, **kw}),
        [dict(rank=2, alpha=3.0), dict(rank=6, alpha=1.0), dict(rank=4, alpha=20.0, use_rslora=True)],
    ),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("method", sorted(SLOTS))
def test_compiled_model_swaps_without_recompiling(tmp_path, method):
    make, files = SLOTS[method]
    model = Net()
    ak.inject(model, make(), name="a")
    randomise_adapters(model, 0.1, seed=1)
    model.eval()
    cnt = Counter()
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    with torch.no_grad():
        compiled(X)
        assert cnt.graphs == 1
        worst = 0.0
        for i, kw in enumerate(files):
            f = saved(tmp_path, make(**kw), seed=10 + i)
            ak.swap(compiled, f, name="a")  # the compiled wrapper itself is accepted
            y, ref = compiled(X), loaded(f)(X)
            assert not torch.allclose(ref, Net()(X), atol=1e-3)  # the adapter does something
            diff = (y - ref).abs().max().item()
            worst = max(worst, diff)
            assert diff <= TOL, (kw, diff)
    assert cnt.graphs == 1  # three swaps, no recompile
    print(f"\n{method}: graphs={cnt.graphs} max|compiled - loaded|={worst:.2e}")


EAGER = {  # slot spec, file spec: every method, its pad / fold where allowed
    "lora_pad_fold": (ak.LoRA(rank=8, alpha=16.0, targets=ALL), ak.LoRA(rank=3, alpha=5.0, use_rslora=True, targets=ALL)),
    "lora_rank_pattern": (
        ak.LoRA(rank=8, alpha=4.0, targets=ALL),
        ak.LoRA(rank=2, alpha=3.0, rank_pattern={"fc2": 6}, alpha_pattern={"out": 11.0}, targets=ALL),
    ),
    "lora_other_regex_same_layers": (
        ak.LoRA(rank=4, alpha=8.0, targets=ALL),
        ak.LoRA(rank=4, alpha=2.0, targets=[r"fc\d", "out"], exclude="act"),
    ),
    "lora_bias_trained": (
        ak.LoRA(rank=4, alpha=8.0, bias="adapter_only", targets=ALL),
        ak.LoRA(rank=2, alpha=3.0, bias="adapter_only", targets=ALL),
    ),
    "lora_modules_to_save": (
        ak.LoRA(rank=4, targets=LIN, modules_to_save="out"),
        ak.LoRA(rank=3, alpha=6.0, targets=LIN, modules_to_save="out"),
    ),
    "lora_pissa_same_rank": (
        ak.LoRA(rank=4, alpha=8.0, init="pissa", targets=ALL),
        ak.LoRA(rank=4, alpha=3.0, init="pissa", targets=ALL),
    ),
    "dora_pad_fold": (ak.DoRA(rank=8, alpha=16.0, targets=ALL), ak.DoRA(rank=2, alpha=5.0, targets=ALL)),
    "qlora_pad_fold": (
        ak.QLoRA(rank=6, alpha=12.0, blocksize=8, targets=LIN),
        ak.QLoRA(rank=3, alpha=2.0, blocksize=8, targets=LIN),
    ),
    "qdora_pad_fold": (
        ak.QLoRA(rank=6, alpha=12.0, blocksize=8, use_dora=True, targets=LIN),
        ak.QLoRA(rank=3, alpha=2.0, blocksize=8, use_dora=True, targets=LIN),
    ),
    # full factors: the rank only enters the scale
    "lokr_full": (ak.LoKr(rank=8, alpha=3.0, targets=ALL), ak.LoKr(rank=9, alpha=7.0, targets=ALL)),
    "lokr_low_rank_same_shape": (
        ak.LoKr(rank=1, alpha=30.0, decompose_both=True, targets=ALL),
        ak.LoKr(rank=1, alpha=80.0, decompose_both=True, targets=ALL),
    ),
    "mora_same_rank": (ak.MoRA(rank=3, mora_type=6, targets=ALL), ak.MoRA(rank=3, mora_type=6, targets=ALL)),
    "geolora_same_rank": (
        ak.GeoLoRA(rank=3, max_rank=6, targets=ALL),
        ak.GeoLoRA(rank=3, alpha=5.0, max_rank=6, targets=ALL),
    ),
    "lorampo_same_rank": (ak.LoRAMPO(rank=2, alpha=4.0, targets=ALL), ak.LoRAMPO(rank=2, alpha=9.0, targets=ALL)),
}


@pytest.mark.parametrize("case", sorted(EAGER))
def test_eager_swap_equals_load_and_saves_back(tmp_path, case):
    slot, spec = EAGER[case]
    model = Net()
    ak.inject(model, slot, name="a")
    ak.inject(model, ak.LoRA(rank=2, targets="out"), name="other")  # untouched by the swap
    randomise_adapters(model, 0.1, seed=1)
    ak.set_active(model, "a")
    other = {k: v.clone() for k, v in model.out.adapters["other"].state_dict().items()}
    f = saved(tmp_path, spec, seed=5)
    model.eval()  # serving: DoRA caches its row norm here, which the swap must invalidate
    before = model(X)
    paths = ak.swap(model, f, name="a")
    assert paths == sorted(p for p, mod in model.named_modules() if "a" in getattr(mod, "adapters", {}))
    ref = loaded(f)(X)
    assert not torch.allclose(before, ref, atol=1e-3)
    torch.testing.assert_close(model(X), ref, atol=TOL, rtol=0)
    for k, v in model.out.adapters["other"].state_dict().items():
        assert torch.equal(v, other[k])
    back = tmp_path / "back.safetensors"
    ak.save(model, back, name="a")  # the slot's spec with the padded / folded tensors
    torch.testing.assert_close(loaded(back)(X), ref, atol=TOL, rtol=0)


def test_inactive_slot_swaps_and_stays_inactive(tmp_path):
    model = Net()
    ak.inject(model, ak.LoRA(rank=4, alpha=8.0, targets=ALL), name="a")
    ak.inject(model, ak.LoRA(rank=2, targets=ALL), name="b")
    ak.set_active(model, "b")
    f = saved(tmp_path, ak.LoRA(rank=3, alpha=2.0, targets=ALL), seed=3)
    ak.swap(model, f, name="a")
    assert ak.summary(model).per_adapter["a"]["active"] is False
    ak.set_active(model, "a")
    torch.testing.assert_close(model(X), loaded(f)(X), atol=TOL, rtol=0)


# ---- refusals: one error naming the mismatch and the fix, the model unchanged ---------------
def _slot(spec):
    model = Net()
    ak.inject(model, spec, name="a")
    randomise_adapters(model, 0.1, seed=1)
    return model


LORA8 = ak.LoRA(rank=8, alpha=16.0, targets=ALL)
ERRORS = {  # slot spec, file (spec, or a callable(tmp_path) -> path), message fragments
    "other_method": (LORA8, ak.DoRA(rank=4, targets=ALL), ["method: file 'dora', slot 'lora'", "ak.load"]),
    "rank_above_slot": (
        ak.LoRA(rank=4, targets=ALL),
        ak.LoRA(rank=6, targets=ALL),
        ["layers 'fc1', 'fc2', 'out': lora_A has rank 6 > the slot's rank 4", "inject the slot with rank >= 6"],
    ),
    "dropout": (LORA8, ak.LoRA(rank=4, dropout=0.1, targets=ALL), ["field dropout: file 0.1, slot 0.0"]),
    "bias_mode": (LORA8, ak.LoRA(rank=4, bias="all", targets=ALL), ["field bias: file 'all', slot 'none'"]),
    "other_targets": (LORA8, ak.LoRA(rank=4, targets=LIN), ["adapted layers differ: the slot's ['out'] are not in the file; inject a slot with the file's targets"]),
    "qlora_blocksize": (
        ak.QLoRA(rank=4, blocksize=8, targets=LIN),
        ak.QLoRA(rank=4, blocksize=16, targets=LIN),
        ["field blocksize: file 16, slot 8"],
    ),
    "qdora_vs_qlora": (
        ak.QLoRA(rank=4, blocksize=8, targets=LIN),
        ak.QLoRA(rank=4, blocksize=8, use_dora=True, targets=LIN),
        ["field use_dora: file True, slot False"],
    ),
    "pissa_other_rank": (
        ak.LoRA(rank=4, init="pissa", targets=ALL),
        ak.LoRA(rank=2, init="pissa", targets=ALL),
        ["layers 'fc1', 'out': lora_A file (2, 16) vs slot (4, 16) (a residual init fixes the rank: inject the slot at the file's rank)"],
    ),
    "pissa_vs_default": (
        ak.LoRA(rank=4, init="pissa", targets=ALL),
        ak.LoRA(rank=4, targets=ALL),
        ["field init: file 'default', slot 'pissa'"],
    ),
    "olora_other_scale": (
        ak.LoRA(rank=4, alpha=4.0, init="olora", targets=ALL),
        ak.LoRA(rank=4, alpha=8.0, init="olora", targets=ALL),
        ["layers 'fc1', 'fc2', 'out': scale file 2, slot 1 (OLoRA", "file's alpha"],
    ),
    "lorampo_other_rank": (
        ak.LoRAMPO(rank=2, targets=ALL),
        ak.LoRAMPO(rank=1, targets=ALL),
        ["layers 'fc1', 'fc2': mpo_A file (4, 4, 1) vs slot (4, 4, 2) (a residual init fixes the rank: inject the slot at the file's rank)"],
    ),
    "lokr_other_structure": (
        ak.LoKr(rank=8, targets=ALL),
        ak.LoKr(rank=1, targets=ALL),
        ["layers 'fc1', 'fc2', 'out': the file lacks tensors ['lokr_w2'] and the file has tensors ['lokr_w2_a', 'lokr_w2_b'] the slot lacks", "file's rank"],
    ),
    "geolora_other_rank": (
        ak.GeoLoRA(rank=3, max_rank=6, targets=ALL),
        ak.GeoLoRA(rank=2, max_rank=6, targets=ALL),
        ["layers 'fc1', 'fc2', 'out': per-layer state: file {'rank': 2, 'max_rank': 6}, slot {'rank': 3, 'max_rank': 6}"],
    ),
    "mora_other_type": (
        ak.MoRA(rank=3, mora_type=6, targets=ALL),
        ak.MoRA(rank=3, mora_type=1, targets=ALL),
        ["field mora_type: file 1, slot 6"],
    ),
    "other_shapes": (
        LORA8,
        lambda tmp: saved(tmp, ak.LoRA(rank=4, targets=ALL), 2, model=Net(hidden=20)),
        ["layer 'fc1': file Linear weight [20, 16], slot Linear weight [24, 16]", "model it was saved from"],
    ),
    "modules_to_save": (
        ak.LoRA(rank=4, targets=LIN),
        ak.LoRA(rank=4, targets=LIN, modules_to_save="out"),
        ["field modules_to_save: file ('out',), slot None"],
    ),
    "not_a_file": (LORA8, lambda tmp: tmp / "missing.safetensors", ["no file at"]),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_refusals_name_the_problem_and_change_nothing(tmp_path, case):
    slot, src, needles = ERRORS[case]
    model = _slot(slot)
    f = src(tmp_path) if callable(src) else saved(tmp_path, src, seed=4)
    snap, y = snapshot(model), model(X)
    with pytest.raises(ak.AdaptkitError) as e:
        ak.swap(model, f, name="a")
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    assert_same(model, snap)
    assert torch.equal(model(X), y)


def test_unknown_name_and_merged_slot_refused(tmp_path):
    model = _slot(LORA8)
    f = saved(tmp_path, ak.LoRA(rank=4, targets=ALL), seed=4)
    with pytest.raises(ak.AdaptkitError, match=r"no adapter named 'b'; this model has \['a'\].*ak.inject"):
        ak.swap(model, f, name="b")
    ak.merge(model, unload=False)
    snap, y = snapshot(model), model(X)
    with pytest.raises(ak.AdaptkitError, match=r"the slot is merged into \[.fc1., .fc2., .out.\]; unmerge it first"):
        ak.swap(model, f, name="a")
    assert_same(model, snap)
    assert torch.equal(model(X), y)
    unmerge(model)  # the fix the message gives
    ak.swap(model, f, name="a")
    torch.testing.assert_close(model(X), loaded(f)(X), atol=TOL, rtol=0)


def test_file_missing_a_tensor_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    model = _slot(LORA8)
    f = saved(tmp_path, ak.LoRA(rank=4, targets=ALL), seed=4)
    with safe_open(f, framework="pt") as h:
        meta = h.metadata()
    t = load_file(f)
    del t["fc2.lora_B"]
    g = tmp_path / "cut.safetensors"
    save_file(t, g, metadata=meta)
    snap = snapshot(model)
    with pytest.raises(ak.AdaptkitError, match=r"layer 'fc2': the file lacks tensors \['lora_B'\] \(another"):
        ak.swap(model, g, name="a")
    assert_same(model, snap)


@pytest.mark.parametrize("case", ["geolora_same_rank", "lokr_full", "lorampo_same_rank", "mora_same_rank"])
def test_same_shape_methods_swap_without_recompiling(tmp_path, case):
    slot, spec = EAGER[case]
    model = _slot(slot)
    cnt = Counter()
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    with torch.no_grad():
        compiled(X)
        f = saved(tmp_path, spec, seed=6)
        ak.swap(model, f, name="a")
        torch.testing.assert_close(compiled(X), loaded(f)(X), atol=TOL, rtol=0)
    assert cnt.graphs == 1


class Kinds(nn.Module):
    """Embedding -> Conv1d over the sequence -> Linear: the other base kinds LoRA pads on."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(321)
            self.emb = nn.Embedding(20, 12)
            self.conv = nn.Conv1d(12, 10, 3, padding=1)
            self.head = nn.Linear(10, 6)

    def forward(self, ids):
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)  # (N, T, 12) -> (N, 10, T) -> (N, T, 10)
        return self.head(h)


@pytest.mark.parametrize("cls", [ak.LoRA, ak.DoRA])
def test_embedding_and_conv_bases_pad_and_fold(tmp_path, cls):
    kinds = r"emb|conv|head" if cls is ak.LoRA else r"conv|head"  # DoRA: no Embedding
    ids = torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(3))
    src = Kinds()
    ak.inject(src, cls(rank=2, alpha=7.0, targets=kinds), name="src")
    randomise_adapters(src, 0.2, seed=9)
    f = tmp_path / "kinds.safetensors"
    ak.save(src, f, name="src")
    model = Kinds()
    ak.inject(model, cls(rank=5, alpha=3.0, targets=kinds), name="a")
    ak.swap(model, f, name="a")
    ref = Kinds()
    ak.load(ref, f)
    assert not torch.allclose(ref(ids), Kinds()(ids), atol=1e-3)
    torch.testing.assert_close(model(ids), ref(ids), atol=TOL, rtol=0)


def test_bf16_slot_takes_an_fp32_file(tmp_path):
    """Tensors are cast into the slot's dtype as ak.load casts them; the fold is done in fp32
    first, so the result is within bf16 rounding of the file loaded into a bf16 model."""
    f = saved(tmp_path, ak.LoRA(rank=3, alpha=9.0, targets=ALL), seed=8)
    model = Net().to(torch.bfloat16)
    ak.inject(model, ak.LoRA(rank=8, alpha=4.0, targets=ALL), name="a")
    params = {n: p for n, p in model.named_parameters()}
    ak.swap(model, f, name="a")
    assert all(p is params[n] and p.dtype == torch.bfloat16 for n, p in model.named_parameters())
    ref = Net().to(torch.bfloat16)
    ak.load(ref, f)
    xb = X.to(torch.bfloat16)
    assert not torch.allclose(ref(xb).float(), Net().to(torch.bfloat16)(xb).float(), atol=5e-2)
    torch.testing.assert_close(model(xb).float(), ref(xb).float(), atol=4e-3, rtol=0)  # bf16 eps 8e-3
