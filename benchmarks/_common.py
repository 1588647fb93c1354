"""Shared helpers of the benchmarks: arguments, threads, device, interleaved timing, peak
memory, method rows (adaptkit spec + PEFT config per method name), variants and timed modes,
tables, environment and JSON.

Timing: every variant (frozen base, adaptkit, PEFT) gets its own model and closure; after a
warmup, rounds call every closure once, in an order rotated each round, so machine noise and
cache / allocator state hit all variants alike. The reported figure is the median. On CUDA
every clock read waits for the queued kernels first (``torch.cuda.synchronize``), so a sample
is the GPU time of the call, not its launch time.

Peak memory, CPU: the profiler's allocator records (``profile_memory=True``) give every
allocation and free during one call; the running sum's maximum is the call's dynamic peak.
CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
allocated before the call. Where a benchmark reports a step's peak, it adds what is resident
before the call (parameters, buffers, optimizer state, inputs), so the figure is the step's
high-water mark of live tensor bytes on either device.
"""
from __future__ import annotations

import argparse
import copy
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
DEVICES = ("cpu", "cuda")
MiB = 2 ** 20


# ---- arguments, threads, device, optional oracle ---------------------------------------------
def base_parser(description: str, *, quick_help: str = "few repeats, smaller shapes: a smoke run",
                json_default: str = "runs/<bench>[_quick].json") -> argparse.ArgumentParser:
    """The options every benchmark has: --quick, --threads, --json."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--json", default=None, help=f"output JSON path (default {json_default})")
    return p


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where models and inputs live (default cpu); cuda: timings synchronise the "
                        "GPU, peak memory is torch.cuda.max_memory_allocated, env names the GPU")


def add_rounds(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warmup", type=int, default=None, help="override the warmup rounds")
    p.add_argument("--repeats", type=int, default=None, help="override the timed rounds")


def add_no_peft(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-peft", action="store_true", help="skip PEFT even when it is installed")


def parser(description: str) -> argparse.ArgumentParser:
    """The options of the adaptkit-vs-PEFT benchmarks (bench_layers, bench_model)."""
    p = base_parser(description, json_default="runs/<bench>_<dtype>[_quick].json")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--methods", default="all",
                   help="comma-separated method rows to run (default: every available one)")
    add_no_peft(p)
    p.add_argument("--modes", default="fwd,bwd,train",
                   help="comma-separated timed modes among fwd, bwd, train (default: all three)")
    add_rounds(p)
    add_device(p)
    return p


@dataclass
class Setup:
    """What the options of :func:`parser` come to once applied."""

    dtype: torch.dtype
    peft: Any  # the peft module, or None
    methods: list[MethodRow]
    modes: list[str]
    warmup: int
    repeats: int


def setup(args, quick_rounds: tuple[int, int], full_rounds: tuple[int, int]) -> Setup:
    """Apply :func:`parser`'s options: threads, device check, dtype, PEFT, method rows, modes,
    and (warmup, repeats) rounds (``--warmup`` / ``--repeats``, else the quick or full ones)."""
    start(args)
    peft = load_peft(args.no_peft)
    return Setup(DTYPES[args.dtype], peft, pick_methods(method_rows(peft), args.methods),
                 pick_modes(args.modes), *rounds(args, quick_rounds, full_rounds))


def start(args) -> None:
    """Threads, and a clear stop where ``--device cuda`` cannot run."""
    set_threads(args.threads)
    check_device(getattr(args, "device", "cpu"))


def rounds(args, quick: tuple[int, int], full: tuple[int, int]) -> tuple[int, int]:
    """(warmup, repeats): ``--warmup`` / ``--repeats`` where given, else the quick or full defaults."""
    warmup, repeats = quick if args.quick else full
    return (warmup if args.warmup is None else args.warmup, repeats if args.repeats is None else args.repeats)


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:  # only settable before any inter-op work; harmless to skip
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def check_device(device: str) -> None:
    """Stop with a clear message where --device cuda cannot run."""
    if is_cuda(device) and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch.cuda.is_available() is False (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda}); run with --device cpu or on a CUDA machine")


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


class Holder(nn.Module):
    """A root module holding the benchmarked layer at path ``proj`` (PEFT and adaptkit both
    need a model around the layer to target it by name)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


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


def sync_adapters(ak_model: nn.Module, peft_root: nn.Module, name: str = "default") -> None:
    """Copy every adaptkit adapter parameter into PEFT's at the same module path. adaptkit
    names its parameters after PEFT's: ``lora_A`` / ``lora_B`` -> ``lora_A[name].weight``
    (Linear, same (r, in) / (out, r) shapes), ``lora_magnitude`` -> the DoRA
    ``lora_magnitude_vector[name].weight`` ((out,) either way), ``lokr_*`` -> the LoKr
    ParameterDict entries; ``reshape`` covers a factor stored flat on one side."""
    with torch.no_grad():
        for path, layer in adapted_layers(ak_model):
            pl = peft_root.get_submodule(path)
            for pname, p in layer.adapters[name].named_parameters():
                if pname == "lora_magnitude":
                    q = pl.lora_magnitude_vector[name].weight
                elif pname.startswith("lora_"):
                    q = getattr(pl, pname)[name].weight
                else:
                    q = getattr(pl, pname)[name]
                q.copy_(p.reshape(q.shape))


def method_rows(peft) -> dict[str, MethodRow]:
    """Every method row available in this checkout. Rows for methods other sessions add are
    guarded by ``hasattr(ak, ...)`` and use only the spec fields DESIGN.md makes common
    (rank, alpha, targets); alpha = 2 * rank throughout."""
    rows: dict[str, MethodRow] = {}

    def add(name, ak_spec, peft_config=None, sync=None):
        rows[name] = MethodRow(name, ak_spec, peft_config if peft is not None else None, sync)

    add("lora", lambda t, r: ak.LoRA(rank=r, alpha=2 * r, targets=t),
        lambda t, r: peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=t),
        sync_adapters)
    if hasattr(ak, "DoRA"):
        add("dora", lambda t, r: ak.DoRA(rank=r, alpha=2 * r, targets=t),
            lambda t, r: peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                         target_modules=t, use_dora=True), sync_adapters)
    if hasattr(ak, "LoKr"):
        add("lokr", lambda t, r: ak.LoKr(rank=r, alpha=2 * r, targets=t),
            lambda t, r: peft.LoKrConfig(r=r, alpha=2 * r, target_modules=t), sync_adapters)
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
    delta already folded out of W, so only moving their factors changes the output).
    The noise is drawn on the CPU (same values on every device) and moved to the parameter."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in adapted_layers(model):
        for p in layer.adapters.parameters():
            if not p.is_floating_point():
                continue
            noise = torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype)
            if not p.any():
                p.copy_(noise * std)
            else:
                p.mul_(1 + 0.1 * noise)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_variants(base: nn.Module, targets, rank: int, methods: list[MethodRow], peft,
                   device: str = "cpu") -> tuple[dict[str, nn.Module], list[str]]:
    """name -> model on ``device``: ``base`` (frozen), and per method row ``<m>/adaptkit`` and,
    where PEFT has the method, ``<m>/peft``, each on its own deep copy of the base weights.
    Adapters are made non-trivial (:func:`nontrivial`) and, where the row has a ``sync``, PEFT
    gets the same adapter weights; the second value lists those methods (their two variants
    compute the same function). Like for like, PEFT's adapters take the base's dtype
    (``autocast_adapter_dtype=False``; by default PEFT keeps them fp32 on a bf16 base, as adaptkit
    does not), so a bf16 row times the same bf16 arithmetic on both sides."""
    base = base.to(device).requires_grad_(False)
    variants: dict[str, nn.Module] = {"base": base}
    synced: list[str] = []
    for row in methods:
        am = copy.deepcopy(base)
        ak.inject(am, row.ak_spec(targets, rank))
        am.to(device)  # adapters are built on the base's device already; this makes it certain
        nontrivial(am)
        variants[f"{row.name}/adaptkit"] = am
        if row.peft_config is not None:
            pm = peft.get_peft_model(copy.deepcopy(base), row.peft_config(targets, rank),
                                     autocast_adapter_dtype=False).to(device)
            if row.sync is not None:
                row.sync(am, pm.base_model.model)
                synced.append(row.name)
            variants[f"{row.name}/peft"] = pm
    return variants, synced


# ---- timing ----------------------------------------------------------------------------------
def now(device="cpu") -> float:
    """``time.perf_counter()`` once the device is idle: CUDA kernels run asynchronously, so the
    clock is read only after ``torch.cuda.synchronize()``."""
    if is_cuda(device):
        torch.cuda.synchronize()
    return time.perf_counter()


def timed(fn: Callable[[], Any], device="cpu") -> Callable[[], float]:
    """Wrap ``fn`` into a closure returning the seconds the whole call took."""
    def run() -> float:
        t = now(device)
        fn()
        return now(device) - t
    return run


def interleaved(cases: dict[str, Callable[[], float]], warmup: int, repeats: int,
                reduce: Callable[[list[float]], float] | None = None) -> dict[str, Any]:
    """Run ``cases`` (name -> closure returning its own elapsed seconds) round-robin: ``warmup``
    untimed rounds, then ``repeats`` timed rounds, each starting one case later than the last.
    The garbage collector is paused so it does not land on one case by chance. Returns name ->
    the samples (seconds), or name -> ``reduce(samples)`` where ``reduce`` is given (``min``:
    the best round, for a shared machine where other load only ever adds time)."""
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
    return samples if reduce is None else {n: reduce(s) for n, s in samples.items()}


def stats_ms(samples: list[float]) -> dict[str, Any]:
    ms = [s * 1e3 for s in samples]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "samples_ms": ms}


def median_ms(cases: dict[str, Callable[[], float]], warmup: int, repeats: int) -> dict[str, float]:
    """:func:`interleaved`, reduced to name -> median milliseconds."""
    return {n: s * 1e3 for n, s in interleaved(cases, warmup, repeats, statistics.median).items()}


def mode_cases(variants: dict[str, nn.Module], forward: Callable[[nn.Module], torch.Tensor],
               backward: Callable[[torch.Tensor], None], device="cpu",
               reset: Callable[[], None] = lambda: None):
    """The timed modes of every variant, plus its AdamW optimiser and its train step.

    ``forward(model)`` runs the model and returns what ``backward(out)`` differentiates;
    ``reset()`` clears state outside the model before a bwd / train sample (an input's grad).
      fwd    ``forward`` under ``torch.no_grad()``
      bwd    ``backward`` alone (the forward runs untimed before it)
      train  zero_grad + forward + backward + AdamW step on the trainable parameters (a frozen
             base has none, so its step is forward + backward)
    Returns (mode -> name -> closure returning its seconds, name -> optimiser or None,
    name -> untimed train step)."""
    opts = {n: (torch.optim.AdamW(trainable(m), lr=1e-4) if trainable(m) else None)
            for n, m in variants.items()}

    def fwd(m):
        def run():
            with torch.no_grad():
                forward(m)
        return timed(run, device)

    def bwd(m):
        def run():
            reset()
            m.zero_grad(set_to_none=True)
            out = forward(m)
            t = now(device)
            backward(out)
            return now(device) - t
        return run

    def train_step(m, opt):
        def step():
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            out = forward(m)  # alive until the step ends, as in a plain training loop
            backward(out)
            if opt is not None:
                opt.step()
        return step

    def train(step):
        clock = timed(step, device)

        def run():
            reset()  # outside the sample: not the step's business
            return clock()
        return run

    steps = {n: train_step(m, opts[n]) for n, m in variants.items()}
    modes = {"fwd": {n: fwd(m) for n, m in variants.items()},
             "bwd": {n: bwd(m) for n, m in variants.items()},
             "train": {n: train(s) for n, s in steps.items()}}
    return modes, opts, steps


def time_modes(modes: dict[str, dict[str, Callable[[], float]]], run_modes: list[str],
               warmup: int, repeats: int) -> dict[str, dict]:
    """name -> {mode: stats_ms} over the modes in ``run_modes`` (one interleaved run a mode)."""
    res: dict[str, dict] = {n: {} for n in next(iter(modes.values()))}
    for mode, cases in modes.items():
        if mode in run_modes:
            for n, s in interleaved(cases, warmup, repeats).items():
                res[n][mode] = stats_ms(s)
    return res


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


def dynamic_peak_bytes(fn: Callable[[], Any], device="cpu") -> int:
    """Peak of (bytes allocated - bytes freed) during one call of ``fn``; what stays allocated
    after the call counts too. CPU: from the profiler's allocator records. CUDA:
    ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus what was
    allocated before the call."""
    gc.collect()
    if is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

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


def step_costs(variants: dict[str, nn.Module], opts: dict, steps: dict, inputs: tuple, device="cpu"):
    """name -> train step's peak MiB (resident + dynamic), dynamic MiB, GFLOP and trainable
    parameter count. Run after timing, so AdamW state exists as in a running loop; grads are
    cleared first (they are the step's own allocations), the inputs' included."""
    out = {}
    for n, m in variants.items():
        for t in inputs:
            if t.requires_grad:
                t.grad = None
        m.zero_grad(set_to_none=True)
        resident = tensor_bytes(m, opts[n], *inputs)
        dyn = dynamic_peak_bytes(steps[n], device)
        out[n] = {"train_peak_mib": (resident + dyn) / MiB, "train_dynamic_mib": dyn / MiB,
                  "train_gflop": train_gflop(steps[n]),
                  "trainable_params": sum(p.numel() for p in trainable(m))}
    return out


# ---- output -----------------------------------------------------------------------------------
def env_info(device="cpu", **fields) -> dict[str, Any]:
    """Versions, CPU, threads, device (and on CUDA the GPU's name and CUDA version), then the
    caller's ``fields``, then the time."""
    env: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(),
        "adaptkit": ak.__version__, "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "device": str(device),
    }
    if is_cuda(device):
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    env.update(fields)
    env["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return env


def print_table(title: str, headers: list[str], rows: list[list[Any]], floatfmt: str | None = None) -> None:
    """A plain-text table; floats as ``floatfmt`` (default 3 decimals under 10, else 1), None as -."""
    def fmt(v):
        if isinstance(v, float):
            if floatfmt is not None:
                return floatfmt.format(v)
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


def paired_iqr(res_a: dict, res_b: dict, mode: str) -> list[float] | None:
    """[q1, q3] of the per-round ratios behind :func:`paired`: how far one round's ratio
    wanders on this machine (a target inside this band is met or missed by chance)."""
    sa, sb = res_a.get(mode, {}).get("samples_ms"), res_b.get(mode, {}).get("samples_ms")
    if not sa or not sb or len(sa) < 4:
        return None
    q = statistics.quantiles([x / y for x, y in zip(sa, sb)], n=4)
    return [q[0], q[2]]


def ratios(res: dict, pairs) -> dict[str, dict[str, float | None]]:
    """Per pair label: time ratio (of medians) of each mode, the paired train ratio and the
    train-step peak-memory ratio."""
    return {lab: {k: ratio(med(res[a], k), med(res[b], k)) for k in ("fwd", "bwd", "train")}
            | {"train_paired": paired(res[a], res[b], "train"),
               "train_paired_iqr": paired_iqr(res[a], res[b], "train"),
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
        print_table(ratio_title, ["pair", "fwd", "bwd", "train", "train paired", "paired IQR", "train FLOPs",
                                  "peak"],
                    [[lab, r["fwd"], r["bwd"], r["train"], r["train_paired"],
                      "-" if not r.get("train_paired_iqr") else "{:.3f}-{:.3f}".format(*r["train_paired_iqr"]),
                      r["train_flops"], r["peak"]]
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


def json_path(args, stem: str) -> str:
    """``--json`` if given, else runs/<stem>[_quick].json in the repository."""
    return args.json or os.path.join(ROOT, "runs", f"{stem}{'_quick' if args.quick else ''}.json")


def write_json(path: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Write ``payload`` atomically (temp file + rename), say where, and return it."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
    print(f"\nwrote {path}")
    return payload
