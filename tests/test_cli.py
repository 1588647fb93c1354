"""The command line through a subprocess (``python -m adaptkit``): each command, --help, and bad
input (missing file, wrong format, mismatched shapes) giving a non-zero exit and one line."""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import adaptkit as ak
from adaptkit.cli import main
from conftest import randomise_adapters


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "adaptkit", *map(str, args)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc):
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


class Net(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.emb = nn.Embedding(20, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(3))
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.head = nn.Linear(width, 2)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """base.safetensors (keys prefixed 'model.'), an adapter with modules_to_save and trained
    biases, and the state dict ak.merge gives."""
    tmp = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    base = Net()
    model = copy.deepcopy(base)
    ak.inject(model, ak.LoRA(rank=2, alpha=3, targets=r"emb|layers\.\d|conv", modules_to_save="head",
                             bias="adapter_only"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ak.save(model, tmp / "ad.safetensors")
    save_file({f"model.{k}": v for k, v in base.state_dict().items()}, tmp / "base.safetensors")
    save_file(Net(width=6).state_dict(), tmp / "other.safetensors")
    ref = {f"model.{k}": v for k, v in ak.merge(model).state_dict().items()}
    return tmp, ref


CALLS = {  # every subprocess starts at once (each pays a torch import), tests collect them
    "help": ("--help",),
    "inspect": ("inspect", "{tmp}/ad.safetensors"),
    "merge": ("merge", "{tmp}/base.safetensors", "{tmp}/ad.safetensors", "-o", "{tmp}/out.safetensors"),
    "convert": ("convert", "{tmp}/ad.safetensors", "-o", "{tmp}/peft"),
    "missing_file": ("inspect", "{tmp}/missing.safetensors"),
    "wrong_format": ("inspect", "{tmp}/base.safetensors"),
    "mismatched_shapes": ("merge", "{tmp}/other.safetensors", "{tmp}/ad.safetensors", "-o", "{tmp}/x.safetensors"),
}


@pytest.fixture(scope="module")
def runs(files):
    tmp, _ = files
    procs = {k: start(*(a.format(tmp=tmp) for a in v)) for k, v in CALLS.items()}
    return {k: finish(p) for k, p in procs.items()}


def test_help_and_usage(runs, capsys):
    rc, out, _ = runs["help"]
    assert rc == 0 and all(c in out for c in ("inspect", "merge", "convert"))
    with pytest.raises(SystemExit) as e:  # in-process from here on: each call costs a torch import
        main([])
    assert e.value.code == 2 and "usage: adaptkit" in capsys.readouterr().err


def test_inspect(runs):
    rc, out, err = runs["inspect"]
    assert rc == 0, err
    assert '"method": "lora"' in out and "adaptkit format 1" in out
    assert "layers.2" in out and "Conv2d" in out and "4x2x3x3" in out and "trained" in out
    assert "5 adapted layers" in out and "parameters" in out and "on disk" in out


def test_merge_equals_ak_merge(files, runs):
    tmp, ref = files
    rc, out, err = runs["merge"]
    assert rc == 0, err
    assert "5/5" in err and "5 merged layers" in out  # the progress bar on stderr
    got = load_file(tmp / "out.safetensors")
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert torch.equal(got[k], v), k


def test_convert_both_ways_and_merge_a_peft_folder(files, runs, capsys):
    tmp, ref = files
    rc, out, err = runs["convert"]
    assert rc == 0 and "PEFT folder" in out, err
    assert (tmp / "peft" / "adapter_config.json").exists()
    assert main(["convert", str(tmp / "peft"), "-o", str(tmp / "back.safetensors"),
                 "--base", str(tmp / "base.safetensors")]) == 0
    a, b = load_file(tmp / "ad.safetensors"), load_file(tmp / "back.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    model = Net()  # the converted file loads into a model (ak.load checks kinds and shapes)
    ak.load(model, tmp / "back.safetensors")
    capsys.readouterr()
    assert main(["merge", str(tmp / "base.safetensors"), str(tmp / "peft"), "-o", str(tmp / "out2.safetensors"), "-q"]) == 0
    assert capsys.readouterr().err == ""
    got = load_file(tmp / "out2.safetensors")
    assert all(torch.equal(got[k], v) for k, v in ref.items())


@pytest.mark.parametrize("call, needle", [
    ("missing_file", "no adapter file or PEFT folder at"), ("wrong_format", "not an adaptkit file"),
    ("mismatched_shapes", "does not fit"),
])
def test_bad_input_is_one_line_and_non_zero(files, runs, call, needle):
    tmp, _ = files
    rc, out, err = runs[call]
    assert rc == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("adaptkit: error: ") and needle in err, err
    assert not (tmp / "x.safetensors").exists()


@pytest.mark.parametrize("spec, dtype", [
    (ak.DoRA(rank=2, alpha=3, targets=r"layers\.\d|conv", init="pissa"), torch.float32),
    (ak.LoKr(rank=2, alpha=3, targets=r"layers\.\d|conv", decompose_both=True, init="random"), torch.float32),
    (ak.LoRA(rank=2, alpha=3, targets=r"emb|layers\.\d", modules_to_save="head"), torch.bfloat16),
], ids=["dora_pissa", "lokr", "lora_bf16"])
def test_merge_matches_ak_merge_for_other_methods_and_dtypes(tmp_path, spec, dtype, capsys):
    base = Net().to(dtype)
    model = copy.deepcopy(base)
    ak.inject(model, spec)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ak.save(model, tmp_path / "a.safetensors")
    save_file(base.state_dict(), tmp_path / "b.safetensors")
    assert main(["merge", str(tmp_path / "b.safetensors"), str(tmp_path / "a.safetensors"),
                 "-o", str(tmp_path / "o.safetensors")]) == 0
    got, ref = load_file(tmp_path / "o.safetensors"), ak.merge(model).state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], v) for k, v in ref.items())


def test_merge_of_a_qlora_adapter_equals_ak_merge(tmp_path):
    """The command line merges a QLoRA adapter onto the dequantised NF4 weight, as ak.merge."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "base.safetensors"))
    ak.inject(model, ak.QLoRA(rank=4, alpha=6, targets=r"0|2"))
    randomise_adapters(model, 0.1)
    ak.save(model, tmp_path / "ad.safetensors")
    want = ak.merge(model).state_dict()
    assert main(["merge", str(tmp_path / "base.safetensors"), str(tmp_path / "ad.safetensors"),
                 "-o", str(tmp_path / "out.safetensors"), "-q"]) == 0
    got = load_file(str(tmp_path / "out.safetensors"))
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_inspect_shows_full_layer_paths(tmp_path, capsys):
    """Paths are never cut (the table used to stop at 40 characters); columns fit the content."""
    deep = nn.Module()
    deep.model = nn.ModuleDict({"decoder_layers_with_a_long_name": nn.ModuleList(
        nn.ModuleDict({"self_attention": nn.ModuleDict({"query_projection": nn.Linear(4, 4)})}) for _ in range(2))})
    ak.inject(deep, ak.LoRA(rank=2, targets=r".*query_projection"))
    ak.save(deep, tmp_path / "a.safetensors")
    assert main(["inspect", str(tmp_path / "a.safetensors")]) == 0
    out = capsys.readouterr().out.splitlines()
    path = "model.decoder_layers_with_a_long_name.1.self_attention.query_projection"
    row = next(r for r in out if r.startswith(path))
    assert row.split() == [path, "lora", "Linear", "4x4", "16"]
    header = next(r for r in out if r.startswith("layer"))
    assert header.index("method") == row.index("lora") == len(path) + 1


def test_merge_with_the_files_swapped_says_so(files, capsys):
    tmp, _ = files
    for adapter in (tmp / "ad.safetensors", tmp / "peft"):
        if adapter.name == "peft" and not adapter.exists():
            assert main(["convert", str(tmp / "ad.safetensors"), "-o", str(adapter)]) == 0
        capsys.readouterr()
        assert main(["merge", str(adapter), str(tmp / "base.safetensors"), "-o", str(tmp / "y.safetensors")]) == 1
        err = capsys.readouterr().err
        assert f"'{adapter}' is a" in err and "adapter" in err and "not a base checkpoint" in err, err
        assert f"adaptkit merge {tmp / 'base.safetensors'} {adapter} -o {tmp / 'y.safetensors'}" in err, err
        assert not (tmp / "y.safetensors").exists()
