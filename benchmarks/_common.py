"""Shared helpers of the benchmarks: arguments, threads, interleaved timing, CPU peak memory,
method rows (adaptkit spec + PEFT config per method name), tables and JSON.

Timing: every variant (frozen base, adaptkit, PEFT) gets its own model and closure; after a
warmup, rounds call every closure once, in an order rotated each round, so machine noise and
cache / allocator state hit all variants alike. The reported figure is the median.

Peak memory on CPU: the profiler's allocator records (``profile_memory=True``) give every
allocation and free during one call; the running sum's maximum is the call's dynamic peak.
The reported peak adds what is resident before the call (parameters, buffers, optimizer
state, inputs), so it is the step's high-water mark of live tensor bytes.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python benchmarks/x.py` from a clone without installing
    sys.path.insert(0, ROOT)

import adaptkit as ak  # noqa: E402
from adaptkit.layer import adapted_layers  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MiB = 2 ** 20


# ---- arguments, threads, optional oracle --------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="few repeats, smaller shapes: a smoke run")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--json", default=None, help="output JSON path (default runs/<bench>_<dtype>.json)")
    p.add_argument("--methods", default="all",
                   help="comma-separated method rows to run (default: every available one)")
    p.add_argument("--no-peft", action="store_true", help="skip PEFT even when it is installed")
    p.add_argument("--modes", default="fwd,bwd,train",
                   help="comma-separated timed modes among fwd, bwd, train (default: all three)")
    p.add_argument("--warmup", type=int, default=None, help="override the warmup rounds")
    p.add_argument("--repeats", type=int, default=None, help="override the timed rounds")
    return p


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:  # only settable before any inter-op work; harmless to skip
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass


def load_peft(disabled: bool = False):
    """The ``peft`` module, or None (with the reason printed) when it is missing or broken."""
    if disabled:
        return None
    if importlib.util.find_spec("peft") is None:
        print("peft is not installed: PEFT columns are skipped")
        return None
    try:
        import peft
    except Exception as e:  # a peft / transformers version clash must not stop the benchmark
        print(f"peft is installed but failed to import ({type(e).__name__}: {e}); PEFT skipped")
        return None
    return peft


# ---- method rows ---------------------------------------------------------------------------
@dataclass
class MethodRow:
    """One benchmarked method, addressed by name on the command line.

    ak_spec(targets, rank) -> adaptkit spec; peft_config(targets, rank) -> PEFT config or
    None where PEFT has no such method; sync(ak_model, peft_root) copies adaptkit's adapter
    weights into the PEFT model so both compute the same function (None: the two keep their
    own inits, which is fine for timing but skips the equality check).
    """

    name: str
    ak_spec: Callable[[Any, int], Any]
    peft_config: Callable[[Any, int], Any] | None = None
    sync: Callable[[nn.Module, nn.Module], None] | None = None


def sync_lora(ak_model: nn.Module, peft_root: nn.Module, name: str = "default") -> None:
    """Copy adaptkit LoRA A/B into PEFT's ``lora_A/lora_B`` Linear layers at the same paths
    (Linear bases: adaptkit A (r, in) == PEFT lora_A.weight (r, in), B (out, r) likewise)."""
    with torch.no_grad():
        for path, layer in adapted_layers(ak_model):
            ad, pl = layer.adapters[name], peft_root.get_submodule(path)
            pl.lora_A[name].weight.copy_(ad.lora_A)
            pl.lora_B[name].weight.copy_(ad.lora_B)


def method_rows(peft) -> dict[str, MethodRow]:
    """Every method row available in this checkout. Rows for methods other sessions add are
    guarded by ``hasattr(ak, ...)`` and use only the spec fields DESIGN.md makes common
    (rank, alpha, targets); alpha = 2 * rank throughout."""
    rows: dict[str, MethodRow] = {}

    def add(name, ak_spec, peft_config=None, sync=None):
        rows[name] = MethodRow(name, ak_spec, peft_config if peft is not None else None, sync)

    add("lora", lambda t, r: ak.LoRA(rank=r, alpha=2 * r, targets=t),
        lambda t, r: peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=t),
        sync_lora)
    if hasattr(ak, "DoRA"):
        add("dora", lambda t, r: ak.DoRA(rank=r, alpha=2 * r, targets=t),
            lambda t, r: peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                         target_modules=t, use_dora=True))
    if hasattr(ak, "LoKr"):
        add("lokr", lambda t, r: ak.LoKr(rank=r, alpha=2 * r, targets=t),
            lambda t, r: peft.LoKrConfig(r=r, alpha=2 * r, target_modules=t))
    if hasattr(ak, "MoRA"):
        add("mora", lambda t, r: ak.MoRA(rank=r, targets=t))
    if hasattr(ak, "LoRAMPO"):
        add("lorampo", lambda t, r: ak.LoRAMPO(rank=r, alpha=2 * r, targets=t))
    return rows


def pick_modes(arg: str) -> list[str]:
    modes = [m.strip() for m in arg.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("fwd", "bwd", "train")]
    if bad or not modes:
        raise SystemExit(f"--modes: unknown {bad}; use a comma-separated subset of fwd,bwd,train")
    return modes


def pick_methods(rows: dict[str, MethodRow], arg: str) -> list[MethodRow]:
    if arg == "all":
        return list(rows.values())
    names = [n.strip().lower() for n in arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in rows]
    if unknown:
        raise SystemExit(f"unknown method row(s) {unknown}; available here: {sorted(rows)}")
    return [rows[n] for n in names]


@torch.no_grad()
def nontrivial(model: nn.Module, std: float = 0.02, seed: int = 1) -> None:
    """Make every adapter change the output, so merge / equality checks test something:
    zero-initialised parameters (LoRA's B, ...) get N(0, std) noise and the others a 10%
    multiplicative jitter (residual inits such as PiSSA / LoRA-MPO start with a non-zero
    delta already folded out of W, so only moving their factors changes the output)."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in adapted_layers(model):
        for p in layer.adapters.parameters():
            if not p.is_floating_point():
                continue
            noise = torch.randn(p.shape, generator=g).to(p.dtype)
            if not p.any():
                p.copy_(noise * std)
            else:
                p.mul_(1 + 0.1 * noise)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ---- timing ----------------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> Callable[[], float]:
    """Wrap ``fn`` into a closure returning the seconds the whole call took."""
    def run() -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    return run


def interleaved(cases: dict[str, Callable[[], float]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Run ``cases`` (name -> closure returning its own elapsed seconds) round-robin: ``warmup``
    untimed rounds, then ``repeats`` timed rounds, each starting one case later than the last.
    The garbage collector is paused so it does not land on one case by chance."""
    names = list(cases)
    samples: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(warmup):
            for n in names:
                cases[n]()
        for r in range(repeats):
            for i in range(len(names)):
                n = names[(i + r) % len(names)]
                samples[n].append(cases[n]())
    finally:
        if was:
            gc.enable()
    return samples


def stats_ms(samples: list[float]) -> dict[str, Any]:
    ms = [s * 1e3 for s in samples]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "samples_ms": ms}


# ---- memory ------------------------------------------------------------------------------------
def tensor_bytes(*groups) -> int:
    """Bytes of distinct storages among the given tensors / modules / optimizers."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()

    for g in groups:
        if isinstance(g, nn.Module):
            for t in list(g.parameters()) + list(g.buffers()):
                add(t)
        elif isinstance(g, torch.optim.Optimizer):
            for st in g.state.values():
                for t in st.values():
                    add(t)
        elif isinstance(g, torch.Tensor):
            add(g)
        elif g is not None:
            for t in g:
                add(t)
    return total


def dynamic_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of (bytes allocated - bytes freed) during one call of ``fn``, from the profiler's
    CPU allocator records; what stays allocated after the call counts too."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def train_gflop(step: Callable[[], Any]) -> float:
    """GFLOP of one call as torch's FlopCounterMode counts them (matmuls, convs, attention;
    elementwise work and the optimizer are free to it): the ideal for the time ratios."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step()
    return fc.get_total_flops() / 1e9


# ---- output -----------------------------------------------------------------------------------
def env_info(args) -> dict[str, Any]:
    return {
        "torch": torch.__version__, "python": platform.python_version(),
        "adaptkit": ak.__version__, "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "dtype": args.dtype, "quick": args.quick,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def print_table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return "-" if v is None else str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def med(res_variant: dict, mode: str) -> float | None:
    """Median ms of a mode, None where the mode was not run."""
    return res_variant.get(mode, {}).get("median_ms")


def paired(res_a: dict, res_b: dict, mode: str) -> float | None:
    """Median over rounds of a_r / b_r: the two samples of a round ran back to back, so a load
    change on a shared machine cancels out of each ratio (steadier than a ratio of medians)."""
    sa, sb = res_a.get(mode, {}).get("samples_ms"), res_b.get(mode, {}).get("samples_ms")
    if not sa or not sb:
        return None
    return statistics.median(x / y for x, y in zip(sa, sb))


def ratios(res: dict, pairs) -> dict[str, dict[str, float | None]]:
    """Per pair label: time ratio (of medians) of each mode, the paired train ratio and the
    train-step peak-memory ratio."""
    return {lab: {k: ratio(med(res[a], k), med(res[b], k)) for k in ("fwd", "bwd", "train")}
            | {"train_paired": paired(res[a], res[b], "train"),
               "train_flops": ratio(res[a].get("train_gflop"), res[b].get("train_gflop")),
               "peak": ratio(res[a].get("train_peak_mib"), res[b].get("train_peak_mib"))}
            for lab, a, b in pairs}


def print_results(title: str, res: dict, rat: dict, ratio_title: str) -> None:
    names = list(res)
    print_table(title, ["variant", "fwd ms", "bwd ms", "train ms", "peak MiB", "train GFLOP", "trainable"],
                [[n, med(res[n], "fwd"), med(res[n], "bwd"), med(res[n], "train"),
                  res[n].get("train_peak_mib"), res[n].get("train_gflop"), res[n].get("trainable_params")]
                 for n in names])
    if rat:
        print_table(ratio_title, ["pair", "fwd", "bwd", "train", "train paired", "train FLOPs", "peak"],
                    [[lab, r["fwd"], r["bwd"], r["train"], r["train_paired"], r["train_flops"], r["peak"]]
                     for lab, r in rat.items()])


def pair_ratios(variants: list[str], methods: list[str]) -> list[tuple[str, str, str]]:
    """(label, numerator, denominator) for each method: adaptkit/base, peft/base, adaptkit/peft,
    keeping only pairs whose variants were run."""
    out = []
    for m in methods:
        a, p = f"{m}/adaptkit", f"{m}/peft"
        for lab, num, den in ((f"{m}: adaptkit/base", a, "base"), (f"{m}: peft/base", p, "base"),
                              (f"{m}: adaptkit/peft", a, p)):
            if num in variants and den in variants:
                out.append((lab, num, den))
    return out


def write_json(path: str, payload: dict[str, Any]) -> str:
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
    print(f"\nwrote {path}")
    return path


def default_json(bench: str, args) -> str:
    return args.json or os.path.join(ROOT, "runs", f"{bench}_{args.dtype}{'_quick' if args.quick else ''}.json")
