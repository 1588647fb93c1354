"""Hypothesis properties: shapes and ranks, merge/unmerge inverse, save/load round trip,
the matcher equals re.fullmatch over named_modules(), malformed files fail cleanly."""
import copy
import os
import re
import tempfile

import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adaptkit as ak
from adaptkit.layer import base_kind
from adaptkit.targets import select

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _model(din, dh, dout):
    return nn.Sequential(nn.Linear(din, dh), nn.Tanh(), nn.Linear(dh, dout))


@SETTINGS
@given(din=st.integers(1, 24), dh=st.integers(1, 24), dout=st.integers(1, 24),
       rank=st.integers(1, 24), alpha=st.floats(0.1, 64), rs=st.booleans(), batch=st.integers(1, 4))
def test_shapes_ranks_merge_unmerge_inverse(din, dh, dout, rank, alpha, rs, batch):
    torch.manual_seed(0)
    m = _model(din, dh, dout)
    limit = min(din, dh, dout)
    if rank > limit:
        try:
            ak.inject(m, ak.LoRA(rank=rank, alpha=alpha, use_rslora=rs, targets=r"0|2"))
        except ak.AdaptkitError as e:
            assert f"rank={rank}" in str(e)
            assert all(type(x) in (nn.Sequential, nn.Linear, nn.Tanh) for x in m.modules())
            return
        raise AssertionError("rank above min(in, out) was accepted")
    ak.inject(m, ak.LoRA(rank=rank, alpha=alpha, use_rslora=rs, targets=r"0|2"))
    for i in (0, 2):
        a = m[i].adapters["default"]
        assert a.lora_A.shape == (rank, m[i].in_features) and a.lora_B.shape == (m[i].out_features, rank)
        torch.nn.init.normal_(a.lora_B, std=0.3)
        assert torch.linalg.matrix_rank(a.delta_weight(m[i]).detach(), rtol=1e-4) <= rank
    x = torch.randn(batch, din)
    y = m(x)
    w0 = [m[i].weight.detach().clone() for i in (0, 2)]
    for i in (0, 2):
        m[i].merge(["default"])
    torch.testing.assert_close(m(x), y, atol=1e-4, rtol=1e-4)
    for i in (0, 2):
        m[i].unmerge()
    for i, w in zip((0, 2), w0):
        torch.testing.assert_close(m[i].weight, w, atol=1e-5, rtol=1e-5)


@SETTINGS
@given(rank=st.integers(1, 6), alpha=st.floats(0.5, 16), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       bias=st.sampled_from(["none", "all", "adapter_only"]))
def test_save_load_round_trip_bit_exact(rank, alpha, dtype, bias):
    torch.manual_seed(1)
    m = _model(8, 8, 6).to(dtype)
    fresh = copy.deepcopy(m)
    ak.inject(m, ak.LoRA(rank=rank, alpha=alpha, targets=r"0|2", bias=bias))
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "a.safetensors")
        ak.save(m, f)
        ak.load(fresh, f)
    for (k, a), (k2, b) in zip(m.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k


NAMES = st.text(alphabet="abcqkv_", min_size=1, max_size=4)


@st.composite
def trees(draw):
    """A random module tree of Linear / ReLU / ModuleList / ModuleDict nodes."""
    def node(depth):
        kind = draw(st.sampled_from(["linear", "relu", "list", "dict"] if depth < 3 else ["linear", "relu"]))
        if kind == "linear":
            return nn.Linear(4, 4)
        if kind == "relu":
            return nn.ReLU()
        if kind == "list":
            return nn.ModuleList([node(depth + 1) for _ in range(draw(st.integers(1, 3)))])
        keys = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
        return nn.ModuleDict({k: node(depth + 1) for k in keys})
    return nn.ModuleDict({"root": node(0), "head": nn.Linear(4, 4)})


@SETTINGS
@given(tree=trees(), pattern=st.sampled_from([r".*q.*", r"root\.\d+", r".*\.[ab]_?", r".*(k|v)", r"root.*\d"]))
def test_matcher_equals_fullmatch_over_named_modules(tree, pattern):
    want = [n for n, mod in tree.named_modules() if n and re.fullmatch(pattern, n)]
    try:
        got = select(tree, ak.LoRA(rank=1, targets=pattern))
    except ak.AdaptkitError as e:
        assert not want and "matched no module" in str(e)
        return
    assert got == want
    if all(base_kind(tree.get_submodule(p)) for p in want):
        assert ak.inject(tree, ak.LoRA(rank=1, targets=pattern)) == want


def _saved_lora(folder: str):
    """(a fresh copy of the base model, the path of a LoRA adapter of it saved in ``folder``)."""
    m = _model(8, 8, 6)
    fresh = copy.deepcopy(m)
    ak.inject(m, ak.LoRA(rank=2, targets=r"0|2"))
    f = os.path.join(folder, "a.safetensors")
    ak.save(m, f)
    return fresh, f


def _load_fails_cleanly(model, f: str) -> None:
    """ak.load(model, f) succeeds, or raises AdaptkitError leaving the model exactly as it was."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        ak.load(model, f)
    except ak.AdaptkitError:
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert "_adaptkit" not in model.__dict__


@settings(max_examples=30, deadline=None)
@given(pos=st.floats(0, 1), byte=st.integers(0, 255), cut=st.booleans())
def test_malformed_files_fail_with_adaptkit_error(pos, byte, cut):
    with tempfile.TemporaryDirectory() as d:
        fresh, f = _saved_lora(d)
        data = bytearray(open(f, "rb").read())
        i = min(int(pos * len(data)), len(data) - 1)
        if cut:
            data = data[:i]
        else:
            data[i] = byte
        open(f, "wb").write(bytes(data))
        _load_fails_cleanly(fresh, f)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=12)
_FIELDS = ("adaptkit.format", "adaptkit.version", "adaptkit.spec", "adaptkit.layers")


@st.composite
def metadata_edits(draw, meta):
    """One metadata field of a valid file replaced: random JSON of any shape, text that may not
    be JSON, JSON nested past the recursion limit, or the valid object with one entry (or one
    key of one layer entry) given a random value."""
    import json
    field = draw(st.sampled_from(_FIELDS))
    how = draw(st.sampled_from(["json", "text", "deep", "entry"]))
    if how == "json":
        value = json.dumps(draw(JSON))
    elif how == "text":
        value = draw(st.text(max_size=40))
    elif how == "deep":
        n = draw(st.integers(500, 50_000))
        value = draw(st.sampled_from(["[" * n + "]" * n, '{"a": ' * n + "1" + "}" * n]))
    else:
        obj = json.loads(meta[field]) if field in ("adaptkit.spec", "adaptkit.layers") else {}
        key = draw(st.sampled_from(sorted(obj) or ["x"]))
        if field == "adaptkit.layers" and isinstance(obj.get(key), dict) and draw(st.booleans()):
            obj[key][draw(st.sampled_from(sorted(obj[key]) + ["state"]))] = draw(JSON)
        else:
            obj[key] = draw(JSON)
        value = json.dumps(obj)
    return {**meta, field: value}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_malformed_metadata_fails_with_adaptkit_error_only(data):
    """Whatever a metadata string holds, ak.load and the command line's reader raise nothing but
    AdaptkitError, and a failed load leaves the model untouched."""
    import contextlib
    import io as _io
    from safetensors import safe_open
    from safetensors.torch import save_file
    from adaptkit.cli import main
    with tempfile.TemporaryDirectory() as d:
        fresh, f = _saved_lora(d)
        with safe_open(f, "pt") as g:
            tensors, meta = {k: g.get_tensor(k) for k in g.keys()}, g.metadata()
        save_file(tensors, f, metadata=data.draw(metadata_edits(meta)))
        _load_fails_cleanly(fresh, f)
        with contextlib.redirect_stdout(_io.StringIO()), contextlib.redirect_stderr(_io.StringIO()):
            assert main(["inspect", f]) in (0, 1)  # 1: a one-line AdaptkitError
