"""Bad input: each gets a clear AdaptkitError naming the field / path / key, and the model
is left exactly as it was (parameters, classes, requires_grad, adaptkit state)."""
import copy
import json
import os
import re

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import adaptkit as ak
from adaptkit.spec import AdapterSpec


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 6), nn.Linear(6, 4)])
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.layers[1](self.layers[0](x)))


def snapshot(model):
    return ([type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            copy.copy(model.__dict__.get("_adaptkit")))


def assert_unchanged(model, snap):
    now = snapshot(model)
    assert now[0] == snap[0] and now[2] == snap[2]
    assert now[1].keys() == snap[1].keys()
    for k in now[1]:
        torch.testing.assert_close(now[1][k], snap[1][k], atol=0, rtol=0, equal_nan=True)
    assert (now[3] is None) == (snap[3] is None)


def expect(model, fn, *words):
    snap = snapshot(model)
    with pytest.raises(ak.AdaptkitError) as e:
        fn()
    msg = str(e.value)
    for w in words:
        assert w in msg, msg
    assert_unchanged(model, snap)
    return msg


def test_no_match_shows_pattern_and_real_names():
    m = Tiny()
    expect(m, lambda: ak.inject(m, ak.LoRA(targets=r"q_proj")), "q_proj", "layers.0", "matched no module")


def test_unsupported_module_names_it():
    m = Tiny()
    expect(m, lambda: ak.inject(m, ak.LoRA(targets=r"norm|layers\.0")), "'norm'", "LayerNorm")


def test_rank_exceeds_min_dims():
    m = Tiny()
    expect(m, lambda: ak.inject(m, ak.LoRA(rank=5, targets=r"layers\.\d")),
           "rank=5", "min(in_features, out_features)=4", "layers.1", "use rank <= 4")


@pytest.mark.parametrize("kw,words", [
    (dict(alpha=-1.0), ["alpha=-1.0", "> 0"]),
    (dict(dropout=1.0), ["dropout=1.0", "[0, 1)"]),
    (dict(dropout=-0.1), ["dropout=-0.1"]),
    (dict(rank=0), ["rank=0", "positive int"]),
    (dict(bias="lora_only"), ["bias='lora_only'"]),
    (dict(targets=r"(unclosed"), ["targets", "valid regular expression"]),
    (dict(rank_pattern={r"x": -2}), ["rank_pattern['x']"]),
    (dict(init="loftq"), ["init='loftq'"]),
])
def test_spec_validation(kw, words):
    with pytest.raises(ak.AdaptkitError) as e:
        ak.LoRA(**kw)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_duplicate_adapter_name():
    m = Tiny()
    ak.inject(m, ak.LoRA(rank=2, targets=r"layers\.0"), name="a")
    expect(m, lambda: ak.inject(m, ak.LoRA(rank=2, targets=r"layers\.1"), name="a"), "'a'", "already exists")


def test_unknown_method_and_field():
    with pytest.raises(ak.AdaptkitError, match="unknown method 'vera'"):
        AdapterSpec.from_dict({"method": "vera", "rank": 4})
    with pytest.raises(ak.AdaptkitError, match=r"unknown field\(s\) \['r'\]"):
        AdapterSpec.from_dict({"method": "lora", "r": 4})


@pytest.fixture
def saved(tmp_path):
    m = Tiny()
    ak.inject(m, ak.LoRA(rank=2, alpha=3, targets=r"layers\.\d"))
    f = tmp_path / "a.safetensors"
    ak.save(m, f)
    return f


def test_truncated_file(saved, tmp_path):
    data = saved.read_bytes()
    bad = tmp_path / "t.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    m = Tiny()
    expect(m, lambda: ak.load(m, bad), "truncated", str(bad))


def test_pickle_is_refused(tmp_path):
    bad = tmp_path / "a.bin"
    torch.save({"layers.0.lora_A": torch.zeros(2, 8)}, bad)
    m = Tiny()
    expect(m, lambda: ak.load(m, bad), "pickle")


def _rewrite(src, dst, tensors=None, meta=None):
    from safetensors import safe_open
    with safe_open(str(src), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        md = f.metadata()
    t = tensors(t) if tensors else t
    md = meta(md) if meta else md
    save_file(t, str(dst), metadata=md)
    return dst


def test_wrong_format_version(saved, tmp_path):
    bad = _rewrite(saved, tmp_path / "v.safetensors", meta=lambda md: md | {"adaptkit.format": "2"})
    m = Tiny()
    expect(m, lambda: ak.load(m, bad), "adaptkit.format='2'", "expected '1'")
    plain = _rewrite(saved, tmp_path / "p.safetensors", meta=lambda md: {"format": "pt"})
    expect(m, lambda: ak.load(m, plain), "not an adaptkit file")


def test_missing_unexpected_misshaped_all_reported_at_once(saved, tmp_path):
    def edit(t):
        del t["layers.0.lora_A"]
        t["layers.1.lora_C"] = torch.zeros(1)
        t["layers.1.lora_B"] = torch.zeros(4, 3)
        return t
    bad = _rewrite(saved, tmp_path / "k.safetensors", tensors=edit)
    m = Tiny()
    msg = expect(m, lambda: ak.load(m, bad), "missing keys ['layers.0.lora_A']",
                 "unexpected keys ['layers.1.lora_C']", "layers.1.lora_B: file (4, 3) vs model (4, 2)")
    assert "Nothing was loaded" in msg


def test_file_for_another_model(saved):
    class Other(Tiny):
        def __init__(self):
            super().__init__()
            self.layers[1] = nn.Linear(6, 5)
    m = Other()
    expect(m, lambda: ak.load(m, saved), "'layers.1'", "[4, 6]", "[5, 6]")


def test_nan_in_merge_leaves_model_unmerged():
    m = Tiny()
    ak.inject(m, ak.LoRA(rank=2, targets=r"layers\.\d"))
    with torch.no_grad():
        m.layers[1].adapters["default"].lora_B.fill_(float("nan"))
    snap = snapshot(m)
    with pytest.raises(ak.AdaptkitError, match=r"non-finite .* 'layers.1'"):
        ak.merge(m)
    assert_unchanged(m, snap)
    assert not m.layers[0].adapters["default"].merged


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    m = Tiny()
    ak.inject(m, ak.LoRA(rank=2, targets=r"layers\.\d"))
    import adaptkit.io as io

    def boom(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(io, "save_file", boom)
    with pytest.raises(OSError):
        ak.save(m, tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []


def test_save_unknown_adapter_and_load_missing_file(tmp_path):
    m = Tiny()
    ak.inject(m, ak.LoRA(rank=2, targets=r"layers\.\d"))
    with pytest.raises(ak.AdaptkitError, match="no adapter named 'b'"):
        ak.save(m, tmp_path / "x.safetensors", name="b")
    expect(m, lambda: ak.load(m, tmp_path / "none.safetensors"), "no file")


def test_corrupt_spec_json(saved, tmp_path):
    bad = _rewrite(saved, tmp_path / "j.safetensors", meta=lambda md: md | {"adaptkit.spec": "{oops"})
    m = Tiny()
    expect(m, lambda: ak.load(m, bad), "corrupt JSON")
    bad2 = _rewrite(saved, tmp_path / "s.safetensors", meta=lambda md: md | {
        "adaptkit.spec": json.dumps(json.loads(md["adaptkit.spec"]) | {"rank": -3})})
    expect(m, lambda: ak.load(m, bad2), "rank=-3")


@pytest.mark.parametrize("call", [
    lambda x, f: ak.inject(x, ak.LoRA(targets=r"layers\.0")),
    lambda x, f: ak.load(x, f), lambda x, f: ak.save(x, f), lambda x, f: ak.merge(x),
    lambda x, f: ak.summary(x), lambda x, f: ak.set_active(x, ["default"]),
    lambda x, f: ak.delete(x, "default"), lambda x, f: ak.disabled(x).__enter__(),
    lambda x, f: ak.combine(x, {"default": 1.0}), lambda x, f: ak.nf4.quantize(x),
    lambda x, f: ak.nf4.save(x, f), lambda x, f: ak.nf4.drift_report(x),
], ids=["inject", "load", "save", "merge", "summary", "set_active", "delete", "disabled",
        "combine", "nf4.quantize", "nf4.save", "nf4.drift_report"])
@pytest.mark.parametrize("thing", ["not a module", {"layers.0.weight": torch.zeros(1)}, None])
def test_entry_points_refuse_a_non_module(call, thing, saved):
    """A path, a state dict or None as the model is an AdaptkitError saying so, not an
    AttributeError from deep inside."""
    with pytest.raises(ak.AdaptkitError, match=r"model argument must be a torch\.nn\.Module, got "
                       + type(thing).__name__):
        call(thing, saved)


def test_load_under_an_existing_name_is_loads_error(saved):
    m = Tiny()
    ak.load(m, saved)
    msg = expect(m, lambda: ak.load(m, saved), "load:", "'default' already exists",
                 "ak.delete(model, 'default') first", "name='default_2'")
    assert "inject" not in msg
    assert ak.load(m, saved, name="default_2")  # the fix it names works


@pytest.mark.parametrize("field, value, words", [
    ("adaptkit.layers", "[1, 2]", ["must be a JSON object", "JSON array"]),
    ("adaptkit.layers", '"layers"', ["JSON string"]),
    ("adaptkit.spec", "[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
    ("adaptkit.layers", '{"a": ' * 50_000 + "1" + "}" * 50_000, ["nested too deeply"]),
    ("adaptkit.spec", "1" * 5000, ["corrupt JSON"]),
    ("adaptkit.spec", '{"method": "lora", "targets": 5}', ["targets must be a regex string", "int 5"]),
    ("adaptkit.layers", '{"layers.0": 7}', ["'layers.0' is a JSON number, expected an object"]),
    ("adaptkit.layers", '{"layers.0": {"method": "lora", "kind": "linear", "shape": "6x8", "base": "Linear"}}',
     ["'layers.0' has shape='6x8'"]),
    ("adaptkit.layers", '{"layers.0": {"method": "dora"}}', ["method='dora'", "'trained'"]),
])
def test_malformed_metadata_names_file_and_field(saved, tmp_path, field, value, words):
    """Valid JSON of the wrong shape, or JSON nested past the recursion limit, used to escape
    as AttributeError / RecursionError / TypeError."""
    bad = _rewrite(saved, tmp_path / "m.safetensors", meta=lambda md: md | {field: value})
    m = Tiny()
    expect(m, lambda: ak.load(m, bad), str(bad), field, *words)


@pytest.mark.parametrize("value, words", [
    ("[1]", ["must be a JSON object"]), ('{"0": {"compute_dtype": ["x"]}}', ["malformed at ['0']"]),
    ("{" * 50_000, ["corrupt JSON"]), ("[" * 50_000 + "]" * 50_000, ["nested too deeply"]),
])
def test_malformed_nf4_metadata_names_file_and_field(tmp_path, value, words):
    q = nn.Sequential(nn.Linear(64, 32))
    ak.nf4.quantize(q, targets=r"0")
    f = tmp_path / "q.safetensors"
    ak.nf4.save(q, f)
    bad = _rewrite(f, tmp_path / "b.safetensors", meta=lambda md: md | {"adaptkit.nf4.layers": value})
    m = nn.Sequential(nn.Linear(64, 32))
    expect(m, lambda: ak.nf4.load(m, bad), str(bad), "adaptkit.nf4.layers", "adaptkit.nf4.save", *words)


def test_plan_errors_are_grouped_and_prefixed_once():
    """The same problem on many layers is one clause naming them (first three and a count),
    and the method prefix is not repeated per layer."""
    m = nn.Sequential(*[nn.Linear(8, 4) for _ in range(12)], nn.LayerNorm(4), nn.LayerNorm(4), nn.Linear(8, 3))
    msg = expect(m, lambda: ak.inject(m, ak.DoRA(rank=5, targets=r"\d+")),
                 "DoRA ('default'): rank=5 exceeds min(in_features, out_features)=4 at '0', '1', '2', "
                 "... (12 layers); use rank <= 4",
                 "; DoRA cannot adapt '12', '13' (LayerNorm)",
                 "; rank=5 exceeds min(in_features, out_features)=3 at '14'; use rank <= 3")
    assert msg.count("DoRA") == 2 and msg.count("rank=5") == 2 and "DoRA:" not in msg, msg


class _Llama(nn.Module):
    """The module tree of transformers' LlamaForCausalLM (model.layers.N.self_attn.q_proj, ...)."""

    def __init__(self, n=2, d=8):
        super().__init__()
        attn = lambda: nn.ModuleDict({k: nn.Linear(d, d) for k in ("q_proj", "k_proj", "v_proj", "o_proj")})  # noqa: E731
        mlp = lambda: nn.ModuleDict({k: nn.Linear(d, d) for k in ("gate_proj", "up_proj", "down_proj")})  # noqa: E731
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(16, d)
        self.model.layers = nn.ModuleList(nn.ModuleDict({"self_attn": attn(), "mlp": mlp(),
                                                         "input_layernorm": nn.LayerNorm(d)}) for _ in range(n))
        self.model.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, 16)


def _llamas():
    yield _Llama()
    try:
        import transformers as tf
    except ImportError:
        return
    yield tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2))


@pytest.mark.parametrize("targets, regex, leaf", [
    (["q_proj", "v_proj"], r'targets=r".*\.(q_proj|v_proj)"', "'model.layers.0.self_attn.v_proj'"),
    ("up_proj", r'targets=r".*\.up_proj"', "'model.layers.1.mlp.up_proj'")])
def test_peft_style_bare_names_suggest_the_leaf_regex(targets, regex, leaf):
    """PEFT matches bare names as path suffixes; adaptkit does not, so the error shows the
    adaptable modules those names meant and the regex for them, not the containers
    ('model', 'model.layers') that lead named_modules()."""
    for m in _llamas():
        msg = expect(m, lambda: ak.inject(m, ak.LoRA(targets=targets)), "matched no module", regex,
                     leaf, "no suffix matching")
        assert "'model'" not in msg and "'model.layers'" not in msg and "mlp'" not in msg, msg
        pattern = regex.split('"')[1]  # the suggestion selects exactly those leaves
        assert ak.inject(m, ak.LoRA(rank=2, targets=pattern)) == [
            p for p, _ in m.named_modules() if re.fullmatch(pattern, p)]


def test_no_match_after_exclude_says_what_removed_the_matches():
    m = _Llama()
    expect(m, lambda: ak.inject(m, ak.LoRA(targets=r".*\.q_proj", layers_to_transform=[5])),
           "matched 'model.layers.0.self_attn.q_proj', 'model.layers.1.self_attn.q_proj'",
           "layers_to_transform=(5,)", "removed all of them")
