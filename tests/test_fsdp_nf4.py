"""Sharded QLoRA: FSDP2 (``torch.distributed.fsdp.fully_shard``) over an NF4 base, two gloo
processes on the CPU. The packed NF4 bytes and their absmax are frozen Parameters, so FSDP2
shards them along dim 0 (uneven sizes here: 13 and 8 absmax blocks, 400 and 225 bytes) and
gathers them for each forward / backward.

Checked: each rank holds about half of the base's NF4 bytes (printed with ``-s``); AdamW on
a batch split across the ranks gives every rank the adapters single-process training on the
full batch gives (1e-5); gathering the sharded state gives back the single-process NF4 bytes
exactly; ``ak.save`` and ``ak.nf4.save`` called on every rank make rank 0 alone write (the
adapter file; the NF4 base file, equal to the single-process one), and the files load into
a fresh single-process model with equal outputs. One spawn runs QLoRA with double
quantisation and QDoRA without it (uint8 / fp32 absmax; fp32 bias and adapters in the same
FSDP group), then a bf16 ``MixedPrecisionPolicy`` forward / backward (the uint8 state is not
cast). A deadline kills the workers so a hang fails instead of blocking CI."""
import copy
import datetime
import os
import pickle

import pytest
import torch
import torch.nn as nn

import adaptkit as ak
from adaptkit.nf4_linear import NF4Linear
from adaptkit.nf4_state import QuantParam
from conftest import launch, need_fsdp2, quick_exit, randomise_adapters, read_safetensors

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch built without distributed / gloo", allow_module_level=True)

WORLD, STEPS, LR, DEADLINE_S = 2, 4, 5e-2, 150
SPECS = {
    "qlora": lambda: ak.QLoRA(rank=4, alpha=6.0, targets=r"0|2"),
    "qdora_nodq": lambda: ak.QLoRA(rank=4, alpha=6.0, targets=r"0|2", double_quant=False, use_dora=True),
}
NF4_KEYS = ("weight", "absmax", "nested_absmax", "offset")


def _base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 50), nn.GELU(), nn.Linear(50, 9))


def _model(name):
    """Same init (hence the same NF4 bytes) on every process; 16*50 weights = 12.5 blocks of
    64 -> 13 absmax, 50*9 = 450 -> 225 bytes: neither splits evenly over 2 ranks."""
    net = _base()
    ak.inject(net, SPECS[name]())
    randomise_adapters(net, 0.1, add=True)
    return net


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 16, generator=g), torch.randn(8, 9, generator=g)  # 8 rows: 4 per rank


def _train(net, x, y):
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        (net(x) - y).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _nf4_bytes(net):
    """Bytes of NF4 base state (packed weight, absmax, nested absmax, offset) held here."""
    return sum(
        _local(t).numel() * t.element_size()
        for m in net.modules()
        if isinstance(m, NF4Linear)
        for k in NF4_KEYS
        if (t := getattr(m, k)) is not None
    )


def _worker(rank, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        X, Y = _data()
        x, y = X.chunk(WORLD)[rank], Y.chunk(WORLD)[rank]  # (4, 16), (4, 9) per rank
        mesh = init_device_mesh("cpu", (WORLD,))
        for name in SPECS:
            net = _model(name)
            for layer in (net[0], net[2]):  # one FSDP group per adapted NF4 layer, then the root
                fully_shard(layer, mesh=mesh)
            fully_shard(net, mesh=mesh)
            assert type(net[0].weight).__name__ == "DTensor" and net[0].weight.dtype == torch.uint8
            held = _nf4_bytes(net)
            # (packed rows, absmax entries) held here per NF4 layer: the same blocks
            blocks = [(_local(m.weight).shape[0], _local(m.absmax).shape[0]) for m in net.modules()
                      if isinstance(m, NF4Linear)]
            _train(net, x, y)
            state = {n: p.detach().full_tensor() for n, p in net.named_parameters() if p.requires_grad}
            nf4 = {k: v.full_tensor() if hasattr(v, "full_tensor") else v.clone()  # gathered
                   for k, v in net.state_dict().items() if k.rpartition(".")[2] in NF4_KEYS}
            path = os.path.join(out, f"{name}.safetensors")
            ak.save(net, path if rank == 0 else f"{path}.rank{rank}")  # every rank; rank 0 writes
            base = os.path.join(out, f"{name}_base.safetensors")
            ak.nf4.save(net, base if rank == 0 else f"{base}.rank{rank}")  # likewise
            torch.save({"state": state, "nf4": nf4, "held": held, "blocks": blocks},
                       os.path.join(out, f"{name}_rank{rank}.pt"))
            dist.barrier()
        # bf16 mixed precision casts floating Parameters only: the uint8 bytes and absmax
        # codes are gathered as they are (cast to bf16, the layer would take them for a
        # dense weight and fail), the adapters and the activations run in bf16
        net = _model("qlora")
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for m in (net[0], net[2], net):
            fully_shard(m, mesh=mesh, mp_policy=mp_policy)
        y_mp = net(x)
        y_mp.float().pow(2).mean().backward()
        torch.save(y_mp.detach(), os.path.join(out, f"mp_rank{rank}.pt"))
        dist.barrier()  # both ranks past their last collective (the backward's reduce-scatter)
        quick_exit()
    finally:
        dist.destroy_process_group()


def _launch(tmp_path):
    launch(_worker, (str(tmp_path / "store"), str(tmp_path)), WORLD, DEADLINE_S, "FSDP2")


def test_fsdp2_shards_the_nf4_base_and_trains_like_one_process(tmp_path):
    need_fsdp2()
    _launch(tmp_path)
    X, Y = _data()
    for name in SPECS:
        ref = _model(name)
        full = _nf4_bytes(ref)
        ranks = [torch.load(tmp_path / f"{name}_rank{r}.pt") for r in range(WORLD)]
        held = [r["held"] for r in ranks]
        print(f"\n{name}: NF4 base bytes per rank {held}, one process {full}")
        # weight + absmax split (FSDP2 pads uneven shards but does not count the padding);
        # the nested absmax and offset (a few bytes) are replicated
        small = sum(t.numel() * t.element_size() for m in ref.modules() if isinstance(m, NF4Linear)
                    for t in (m.nested_absmax, m.offset) if t is not None)
        assert sum(held) == full + (WORLD - 1) * small
        assert all(h <= full / WORLD + 64 for h in held), held  # about 1/2 each
        # whole blocks per shard: each rank's packed rows are the blocks of its absmax entries
        # (13 and 8 blocks: 7 + 6 and 4 + 4), and the ranks together hold every block once
        for layer, q in enumerate(m for m in ref.modules() if isinstance(m, NF4Linear)):
            rows = [r["blocks"][layer] for r in ranks]
            assert all(a == b for a, b in rows) and sum(a for a, _ in rows) == q.absmax.numel(), rows
        nf4_ref = {k: v for k, v in ref.state_dict().items() if k in ranks[0]["nf4"]}
        assert len(nf4_ref) == len(ranks[0]["nf4"]) == 4 + 4 * ("nodq" not in name)
        for r in ranks:  # gathered shards == the single-process bytes and state, exactly
            for k, v in nf4_ref.items():
                got = r["nf4"][k]
                if k.endswith(".weight"):  # gathered block rows; the state dict holds the packed bytes
                    assert not got.reshape(-1)[v.numel():].any()
                    got = got.reshape(-1)[: v.numel()]
                assert got.dtype == v.dtype and torch.equal(got, v), (name, k)
        before = {n: p.detach().clone() for n, p in ref.named_parameters() if p.requires_grad}
        _train(ref, X, Y)  # one process, the full batch
        want = {n: p.detach() for n, p in ref.named_parameters() if p.requires_grad}
        assert set(ranks[0]["state"]) == set(want) and len(want) == 4 + 2 * ("dora" in name)
        worst = 0.0
        for n in want:
            assert not torch.equal(want[n], before[n])  # it did train
            for r in ranks:
                torch.testing.assert_close(r["state"][n], want[n], rtol=1e-5, atol=1e-5, msg=f"{name} {n}")
                worst = max(worst, (r["state"][n] - want[n]).abs().max().item())
        print(f"{name}: max |adapter FSDP2 - one process| = {worst:.2e}")
        assert not list(tmp_path.glob(f"{name}*.rank*"))  # rank 0 alone wrote
        ak.nf4.save(ref, tmp_path / "single_base.safetensors")
        got, want_base = read_safetensors(tmp_path / f"{name}_base.safetensors"), read_safetensors(tmp_path / "single_base.safetensors")
        assert got[1] == want_base[1] and got[0].keys() == want_base[0].keys()
        for k, v in want_base[0].items():  # the gathered NF4 file is the single-process one
            assert got[0][k].dtype == v.dtype and torch.equal(got[0][k], v), (name, k)
        fresh = _base()  # the float model: ak.load quantises it as inject did
        ak.load(fresh, tmp_path / f"{name}.safetensors")
        torch.testing.assert_close(fresh(X), ref(X), rtol=1e-5, atol=1e-5)
        fresh = _base()  # the NF4 base from the sharded model's file, then the adapter
        ak.nf4.load(fresh, tmp_path / f"{name}_base.safetensors")
        ak.load(fresh, tmp_path / f"{name}.safetensors")
        torch.testing.assert_close(fresh(X), ref(X), rtol=1e-5, atol=1e-5)


    for r in range(WORLD):  # the bf16 run: its rank's rows of the fp32 single-process output
        y_mp = torch.load(tmp_path / f"mp_rank{r}.pt")
        assert y_mp.dtype == torch.bfloat16
        torch.testing.assert_close(y_mp.float(), _model("qlora")(X.chunk(WORLD)[r]), rtol=3e-2, atol=3e-2)


def test_nf4_state_is_frozen_parameters():
    """What FSDP2 relies on, single-process: the packed bytes and absmax are Parameters that
    never require grad (model.requires_grad_() leaves them frozen), state-dict keys and
    shapes are the buffers' ones, and the forward is unchanged by the move."""
    net = _model("qlora")
    q = net[0]
    assert isinstance(q.weight, QuantParam) and isinstance(q.absmax, QuantParam)
    assert q.weight.shape == (13, 32) and q.absmax.shape == (13,) and q.nested_absmax.shape == (1,)  # block rows
    assert net.state_dict()["0.weight"].shape == (400,)  # the state dict keeps the packed bytes
    assert torch.equal(q.packed(), q.weight.reshape(-1)[:400]) and not q.weight.reshape(-1)[400:].any()
    assert dict(net.named_buffers()).keys() == {"0.nested_absmax", "0.offset", "2.nested_absmax", "2.offset"}
    net.requires_grad_(True)
    assert not q.weight.requires_grad and not q.absmax.requires_grad and q.bias.requires_grad
    for twin in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):  # stays a QuantParam
        assert isinstance(twin[0].weight, QuantParam) and torch.equal(twin[0].weight, q.weight)
        assert isinstance(twin[2].absmax, QuantParam) and not twin[2].absmax.requires_grad
    x = torch.randn(3, 16)
    dense = nn.functional.linear(x, q.dequantize(torch.float32), q.bias)
    with ak.disabled(net):
        torch.testing.assert_close(q(x), dense, rtol=1e-6, atol=1e-6)
