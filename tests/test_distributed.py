"""Data-parallel training of injected models with two gloo processes on the CPU: DDP and
FSDP2 (``torch.distributed.fsdp.fully_shard``), LoRA and DoRA, AdamW on a fixed batch split
across the ranks. Every rank ends with the same adapter weights, and they equal
single-process training on the full batch; the file saved from rank 0 (DDP: rank 0 alone
calls ``ak.save``; FSDP2: every rank calls it, the shards are gathered and rank 0 writes)
holds the same tensors and metadata as the single-process file. ``ak.merge`` / ``ak.to_lora``
(and ``unmerge`` of a merged model) on a sharded model refuse by name and change nothing.

One spawn per parallelism runs both methods (process start-up dominates); a deadline kills
the workers so a hang fails the test instead of blocking CI."""
import datetime
import os

import pytest
import torch
import torch.nn as nn

import adaptkit as ak
from adaptkit.merge import unmerge
from conftest import launch, need_fsdp2, quick_exit, randomise_adapters, read_safetensors

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch built without distributed / gloo", allow_module_level=True)

WORLD, STEPS, LR, DEADLINE_S = 2, 4, 5e-2, 150
METHODS = {"lora": lambda: ak.LoRA(rank=4, alpha=6.0, targets=r"0|2"),
           "dora": lambda: ak.DoRA(rank=4, alpha=6.0, targets=r"0|2")}


def _model(method):
    """Same init on every process: a 2-layer MLP with both Linears adapted, adapter weights
    made non-zero (so the first step already moves every factor)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    ak.inject(net, METHODS[method]())
    randomise_adapters(net, 0.1, add=True)
    return net


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)  # 8 rows: 4 per rank


def _train(net, x, y):
    """AdamW steps on mean-squared error; DDP / FSDP2 average gradients over ranks, so the
    mean over each rank's equal share gives the full-batch gradient."""
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        (net(x) - y).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def _adapter_state(net, full=lambda t: t):
    return {n: full(p.detach()).clone() for n, p in net.named_parameters() if p.requires_grad}


def _worker(rank, kind, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        X, Y = _data()
        x, y = X.chunk(WORLD)[rank], Y.chunk(WORLD)[rank]  # (4, 16), (4, 8) per rank
        for method in METHODS:
            net = _model(method)
            path = os.path.join(out, f"{kind}_{method}.safetensors")
            if kind == "ddp":
                ddp = nn.parallel.DistributedDataParallel(net)
                _train(ddp, x, y)
                state = _adapter_state(net)
                if rank == 0:
                    ak.save(net, path)  # the wrapped model (ddp.module), from rank 0 only
            else:
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard
                mesh = init_device_mesh("cpu", (WORLD,))
                for layer in (net[0], net[2]):  # one FSDP group per adapted layer, then the root
                    fully_shard(layer, mesh=mesh)
                fully_shard(net, mesh=mesh)
                _train(net, x, y)
                assert type(net[0].adapters["default"].lora_A).__name__ == "DTensor"
                state = _adapter_state(net, lambda t: t.full_tensor())
                # every rank calls it (the gather is a collective); rank 0 alone writes
                ak.save(net, path if rank == 0 else f"{path}.rank{rank}")
                # merge / to_lora need whole weights: refused by name, nothing changed (unmerge
                # with nothing merged stays a no-op)
                assert unmerge(net) is net
                for what, call in (("merge", lambda: ak.merge(net)),
                                   ("to_lora", lambda: ak.to_lora(net, "default", rank=2))):
                    try:
                        call()
                    except ak.AdaptkitError as e:
                        assert f"{what}: the model is sharded" in str(e) and "'0'" in str(e), str(e)
                    else:
                        raise AssertionError(f"{what} on a sharded model did not refuse")
                after = _adapter_state(net, lambda t: t.full_tensor())
                assert all(torch.equal(after[k], state[k]) for k in state) and set(after) == set(state)
                assert type(net[0]).__name__ != "Linear" and "default_lora" not in net[0].adapters
            torch.save(state, os.path.join(out, f"{kind}_{method}_rank{rank}.pt"))
            dist.barrier()
        quick_exit()
    finally:
        dist.destroy_process_group()


def _launch(kind, tmp_path):
    launch(_worker, (kind, str(tmp_path / "store"), str(tmp_path)), WORLD, DEADLINE_S, kind)


def _check(kind, tmp_path):
    _launch(kind, tmp_path)
    X, Y = _data()
    for method in METHODS:
        ref = _model(method)
        _train(ref, X, Y)  # one process, the full batch
        ak.save(ref, tmp_path / f"single_{method}.safetensors")
        want = _adapter_state(ref)
        ranks = [torch.load(tmp_path / f"{kind}_{method}_rank{r}.pt") for r in range(WORLD)]
        assert set(ranks[0]) == set(want) and len(want) == 4 + 2 * (method == "dora")
        for n in want:
            for r in range(1, WORLD):
                assert torch.equal(ranks[r][n], ranks[0][n]), (method, n, r)
            torch.testing.assert_close(ranks[0][n], want[n], rtol=1e-6, atol=5e-7, msg=f"{method} {n}")
            assert not torch.equal(want[n], _adapter_state(_model(method))[n])  # it did train
        got, meta = read_safetensors(tmp_path / f"{kind}_{method}.safetensors")
        ref_t, ref_meta = read_safetensors(tmp_path / f"single_{method}.safetensors")
        assert meta == ref_meta and set(got) == set(ref_t)
        assert not list(tmp_path.glob(f"{kind}_{method}.safetensors.rank*"))  # only rank 0 wrote
        for k in ref_t:
            assert got[k].dtype == ref_t[k].dtype and got[k].shape == ref_t[k].shape
            torch.testing.assert_close(got[k], ref_t[k], rtol=1e-6, atol=5e-7, msg=f"{method} {k}")
        fresh = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
        fresh.load_state_dict({k: v for k, v in ref.state_dict().items() if ".adapters." not in k})
        ak.load(fresh, tmp_path / f"{kind}_{method}.safetensors")  # the rank-0 file loads
        torch.testing.assert_close(fresh(X), ref(X), rtol=1e-5, atol=1e-5)


def test_ddp_matches_single_process(tmp_path):
    _check("ddp", tmp_path)


def test_fsdp2_matches_single_process(tmp_path):
    need_fsdp2()
    _check("fsdp2", tmp_path)


def _merged_worker(rank, store):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        net = _model("lora")
        ak.merge(net, unload=False)  # merged in place, then sharded: unmerge would need whole W
        fully_shard(net, mesh=init_device_mesh("cpu", (1,)))
        try:
            unmerge(net)
        except ak.AdaptkitError as e:
            assert "unmerge: the model is sharded" in str(e) and "'0'" in str(e), str(e)
        else:
            raise AssertionError("unmerge of a merged, sharded model did not refuse")
        assert all(layer.adapters["default"].merged for layer in (net[0], net[2]))  # nothing undone
        quick_exit()
    finally:
        dist.destroy_process_group()


def test_fsdp2_unmerge_of_a_merged_sharded_model_is_refused(tmp_path):
    need_fsdp2()
    launch(_merged_worker, (str(tmp_path / "store"),), 1, DEADLINE_S, "unmerge")
