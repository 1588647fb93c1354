"""torch.compile: every method's adapted layers trace into one graph (0 graph breaks, also
with ``fullgraph=True``), compiled forward and backward equal eager, and switching the active
adapter or toggling ``ak.disabled`` recompiles at most once each (a second visit to a state
reuses its graph), as does LoRA-MPO crossing its dense-route token threshold. Graph breaks and recompiles are decided by dynamo, whatever the backend,
so most tests use the fast "eager" / "aot_eager" backends; one LoRA test runs inductor."""
import pytest
import torch
import torch.nn as nn

import adaptkit as ak
from conftest import Conv1D, Counter, randomise_adapters


class Net(nn.Module):
    """Conv2d -> tokens -> Linear -> GELU -> GPT-2 Conv1D: every base kind the methods share."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8, 24)
        self.act = nn.GELU()
        self.out = Conv1D(16, 24)

    def forward(self, x):
        h = self.conv(x).flatten(2).transpose(1, 2)  # (N, 8, 4, 4) -> (N, 16, 8)
        return self.out(self.act(self.proj(h)))  # (N, 16, 16)


ALL = r"conv|proj|out"
SPECS = {
    "lora": lambda **kw: ak.LoRA(rank=3, alpha=5.0, targets=ALL, **kw),
    "dora": lambda **kw: ak.DoRA(rank=3, alpha=5.0, targets=ALL, **kw),
    "lokr": lambda **kw: ak.LoKr(rank=1, alpha=5.0, decompose_both=True, use_effective_conv2d=True,
                                 targets=ALL, **kw),
    "lokr_full": lambda **kw: ak.LoKr(rank=8, alpha=3.0, targets=ALL, **kw),
    "mora": lambda **kw: ak.MoRA(rank=3, mora_type=6, targets=r"proj|out", **kw),
    "mora1": lambda **kw: ak.MoRA(rank=3, mora_type=1, targets=r"proj|out", **kw),
    # Linear / Conv1D only (no Conv2d); LoRA-MPO's 32 tokens per call take its dense route
    "geolora": lambda **kw: ak.GeoLoRA(rank=3, max_rank=6, targets=r"proj|out", **kw),
    "lorampo": lambda **kw: ak.LoRAMPO(rank=2, alpha=5.0, targets=r"proj|out", **kw),
    # NF4 base: Linear only
    "qlora": lambda **kw: ak.QLoRA(rank=3, alpha=5.0, blocksize=8, targets="proj", **kw),
    "qdora": lambda **kw: ak.QLoRA(rank=3, alpha=5.0, blocksize=8, use_dora=True, targets="proj", **kw),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(method, names=("default",), **kw):
    """A Net with adapter(s) of ``method``, every adapter parameter made non-zero."""
    net = Net()
    for n in names:
        ak.inject(net, SPECS[method](**kw), name=n)
    randomise_adapters(net, 0.2, add=True)
    ak.set_active(net, names[0])
    return net


def _x():
    return torch.randn(2, 3, 4, 4)




@pytest.mark.parametrize("method", sorted(SPECS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_no_graph_breaks(method, mode):
    net = getattr(_model(method), mode)()
    x = _x()
    e = torch._dynamo.explain(net)(x)
    assert (e.graph_count, e.graph_break_count) == (1, 0), [b.reason for b in e.break_reasons]
    torch._dynamo.reset()
    y = torch.compile(net, backend="eager", fullgraph=True)(x)  # raises on any break
    torch.testing.assert_close(y, net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", sorted(SPECS))
def test_forward_backward_match_eager(method):
    """aot_eager traces the backward too (AOTAutograd): outputs, adapter gradients and the
    input gradient equal eager's."""
    net = _model(method).train()
    x = _x().requires_grad_()
    params = [p for p in net.parameters() if p.requires_grad]
    assert params

    def run(f):
        y = f(x)
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.shape[-1])).sum(), [x] + params)
        return y.detach(), grads

    ye, ge = run(net)
    yc, gc = run(torch.compile(net, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    net.eval()  # eval: DoRA's eager row-norm cache is not used under compile either
    torch.testing.assert_close(torch.compile(net, backend="aot_eager", fullgraph=True)(x),
                               net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", sorted(SPECS))
def test_switching_recompiles_at_most_once(method):
    """Graphs: first call 1; same state again +0; set_active("b") <= +1; back to "a" +0;
    disabled() <= +1; enabled again +0; disabled again +0. Every call equals eager."""
    net = _model(method, names=("a", "b")).train()
    cnt = Counter()
    f = torch.compile(net, backend=cnt, fullgraph=True)
    x = _x().requires_grad_()  # disabled(): only x needs a gradient
    seen = {}

    def call(tag):
        y = f(x)
        y.sum().backward()
        torch.testing.assert_close(y, net(x), rtol=1e-5, atol=1e-5)  # no stale graph
        seen[tag] = y.detach()
        return cnt.graphs

    assert call("a") == 1
    assert call("a2") == 1  # no cache filled on the first call forces a second graph
    ak.set_active(net, "b")
    g_b = call("b")
    assert g_b <= 2
    ak.set_active(net, "a")
    assert call("a3") == g_b
    ak.set_active(net, "b")
    assert call("b2") == g_b
    with ak.disabled(net):
        g_off = call("off")
    assert g_off <= g_b + 1
    assert call("on") == g_off
    with ak.disabled(net):
        assert call("off2") == g_off
    assert not torch.allclose(seen["a"], seen["b"]) and not torch.allclose(seen["a"], seen["off"])
    torch.testing.assert_close(seen["a"], seen["a3"])


@pytest.mark.parametrize("kw", [dict(module_dropout=0.5), dict(rank_dropout=0.3, rank_dropout_scale=True),
                                dict(module_dropout=0.5, rank_dropout=0.3)])
def test_lokr_dropouts_without_graph_breaks(kw):
    """module_dropout draws without a Python branch under compile (the update is multiplied
    by the draw), so with one kind of dropout compiled == eager for the same seed, whether a
    module is kept or skipped. With both, a skipped module still draws its rank mask under
    compile (eager, like PEFT, does not), so the later draws differ: only no breaks."""
    net = _model("lokr_full", **kw).train()
    x = _x()
    e = torch._dynamo.explain(net)(x)
    assert (e.graph_count, e.graph_break_count) == (1, 0), [b.reason for b in e.break_reasons]
    both = "module_dropout" in kw and "rank_dropout" in kw
    f = torch.compile(net, backend="aot_eager", fullgraph=True)
    outs = set()
    for seed in range(6):
        torch.manual_seed(seed)
        ye = net(x)
        torch.manual_seed(seed)
        yc = f(x)
        if not both:
            torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
        outs.add(round(yc.sum().item(), 4))
    assert len(outs) > 1  # the draws did change the output


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_dropout_train_compiles(method):
    net = _model(method, dropout=0.1).train()
    x = _x()
    e = torch._dynamo.explain(net)(x)
    assert (e.graph_count, e.graph_break_count) == (1, 0), [b.reason for b in e.break_reasons]


def test_lora_inductor_matches_eager():
    """The default backend (inductor, generated C++ on CPU) for one LoRA training step."""
    net = _model("lora").train()
    x = _x().requires_grad_()
    params = [p for p in net.parameters() if p.requires_grad]
    ye = net(x)
    ge = torch.autograd.grad(ye.square().sum(), [x] + params)
    yc = torch.compile(net, fullgraph=True)(x)
    gc = torch.autograd.grad(yc.square().sum(), [x] + params)
    torch.testing.assert_close(yc, ye, rtol=1e-4, atol=1e-5)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_mora_linear_drop_in_compiles():
    m = nn.Sequential(ak.MoRALinear(16, 12, rank=2), nn.GELU(), ak.MoRALinear(12, 16, rank=2, mora_type=1))
    with torch.no_grad():
        for layer in (m[0], m[2]):
            layer.mora_M.normal_()
    x = torch.randn(4, 16)
    e = torch._dynamo.explain(m)(x)
    assert (e.graph_count, e.graph_break_count) == (1, 0), [b.reason for b in e.break_reasons]
    cnt = Counter()
    f = torch.compile(m, backend=cnt, fullgraph=True)
    for _ in range(2):
        torch.testing.assert_close(f(x), m(x), rtol=1e-5, atol=1e-5)
    assert cnt.graphs == 1


def test_lorampo_dense_route_crossing_recompiles_at_most_once():
    """LoRA-MPO picks its route by the token count of the call (einsums below ``dense_from``,
    ΔW and one matmul from it): crossing the threshold costs at most one graph, later calls
    on either side reuse the graphs, and both sides equal eager."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 24), nn.GELU(), nn.Linear(24, 16))
    ak.inject(net, ak.LoRAMPO(rank=2, alpha=5.0, targets=r"0"))
    randomise_adapters(net, 0.2, add=True)
    dense_from = net[0].adapters["default"].dense_from
    below, above = [2, 3, 4], [8, 10, 12]
    assert max(below) < dense_from <= min(above)  # 5.0 for these shapes
    cnt = Counter()
    f = torch.compile(net, backend=cnt, fullgraph=True)

    def call(n):
        x = torch.randn(n, 8)
        torch.testing.assert_close(f(x), net(x), rtol=1e-5, atol=1e-5)
        return cnt.graphs

    g_below = [call(n) for n in below][-1]  # a static graph, then a dynamic one
    assert g_below <= 2
    assert [call(n) for n in above][-1] <= g_below + 1
    g = cnt.graphs
    assert [call(n) for n in (5, 3, 9, 11, 7)][-1] == g  # both sides again: no new graph
