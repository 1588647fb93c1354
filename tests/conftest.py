"""Shared test fixtures: small bases of every kind, GPT-2-style Conv1D without transformers."""
import os
import sys
import time

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))


class Conv1D(nn.Module):
    """GPT-2's transposed-weight Linear (transformers.pytorch_utils.Conv1D), re-typed here so
    tests need no transformers: weight (in, out), y = x @ W + b."""

    def __init__(self, nf, nx, bias=True):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.randn(nf) * 0.02) if bias else None

    def forward(self, x):
        y = x.reshape(-1, x.shape[-1]) @ self.weight
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.nf)


def randomise_adapters(model: nn.Module, std: float, *, add: bool = False, seed: int | None = None,
                       name: str | None = None) -> None:
    """Make every adapter parameter non-zero (LoRA starts with B = 0, which makes merge, save
    and gradient checks vacuous): each parameter under ``.adapters.`` (only adapter ``name``'s
    if given) is set to (``add=False``) or shifted by (``add=True``) ``std * N(0, 1)`` noise,
    in ``named_parameters`` order. The noise comes from a generator seeded ``seed`` (drawn in
    fp32 on the CPU, then cast to the parameter), or from torch's global RNG (``randn_like``)
    when ``seed`` is None. ``model`` may be a whole model or one AdaptedLayer."""
    g = None if seed is None else torch.Generator().manual_seed(seed)
    key = ".adapters." if name is None else f".adapters.{name}."
    with torch.no_grad():
        for n, p in model.named_parameters():
            if key not in f".{n}":  # the leading dot: an AdaptedLayer's own "adapters.x.y"
                continue
            noise = torch.randn_like(p) * std if g is None else (torch.randn(p.shape, generator=g) * std).to(p)
            p.add_(noise) if add else p.copy_(noise)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """For modules of tiny tensors (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    extra OpenMP threads only add synchronisation (30x slower QR / SVD on a loaded 2-core
    machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Counter:
    """A dynamo backend counting the graphs it is handed (each compile and recompile)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def launch(worker, args, nprocs: int, deadline_s: float, what: str) -> None:
    """Run ``worker(rank, *args)`` in ``nprocs`` spawned processes; fail the test (killing
    them) if they are still running after ``deadline_s`` (a hung collective)."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{what} workers still running after {deadline_s} s (hang?)")


def read_safetensors(path) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def need_fsdp2() -> None:
    """Skip unless this torch has FSDP2 (``torch.distributed.fsdp.fully_shard``, torch >= 2.6;
    the CI pin has it, so these tests run there)."""
    fsdp = pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch >= 2.6")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) needs torch >= 2.6")


def quick_exit() -> None:
    """End a spawned gloo worker whose results are written and whose ranks have met at a final
    barrier, without C++ teardown: process-group destruction / interpreter exit after FSDP2
    aborted now and then ("terminate called without an active exception", SIGABRT: about 1
    run in 6 of the two gloo test files here), failing a test whose work had all succeeded."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
