"""NF4 throughput: adaptkit.nf4 vs bitsandbytes (CPU), plus an NF4 Linear forward.

    python benchmarks/bench_nf4.py [--quick] [--threads N] [--out runs/bench_nf4.json]

Measures (best of --reps runs after a warm-up, on a --size x --size fp32 weight):
  * memory bandwidth: a large tensor copy into a preallocated buffer (read + write bytes)
    and into a fresh one (``clone``: includes first-touch page faults);
  * quantise / dequantise throughput in GB/s of fp32 weight (n * 4 bytes / time), with and
    without double quantisation, adaptkit vs ``bitsandbytes.functional`` on CPU, and ratios;
  * an NF4 Linear forward (dequantise, then ``F.linear``) at 1 and 64 tokens vs fp32 / bf16
    ``nn.Linear`` and ``bnb.matmul_4bit`` where it runs.
Targets from the issue: quantise >= 4x bnb CPU (~0.25 GB/s), dequantise >= bnb CPU (~3.4 GB/s).
Timings on a shared or virtualised CPU are noisy; the JSON records threads and load average.
"""
import argparse
import json
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from adaptkit.nf4 import NF4State, dequantize_nf4, quantize_nf4  # noqa: E402


def timeit(fn, reps: int) -> float:
    """Best wall time of ``reps`` calls after one warm-up (seconds): on a shared CPU other
    processes only ever add time, so the minimum is the least noisy estimate."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def nf4_linear(x: torch.Tensor, packed: torch.Tensor, state: NF4State,
               bias=None, compute_dtype=torch.bfloat16) -> torch.Tensor:
    """QLoRA-style frozen base forward: dequantise to the compute dtype, then a dense matmul."""
    w = dequantize_nf4(packed, state, compute_dtype)  # [out, in]
    return F.linear(x.to(compute_dtype), w, bias)


def load_bnb():
    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes as bnb
        return bnb
    except Exception as e:  # optional oracle
        print(f"bitsandbytes unavailable ({e}); adaptkit columns only")
        return None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, 2048^2 weight")
    ap.add_argument("--size", type=int, default=None, help="weight is size x size (default 4096)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--no-linear", action="store_true", help="skip the Linear forward part")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_nf4.json"))
    args = ap.parse_args(argv)
    size = args.size or (2048 if args.quick else 4096)
    reps = args.reps or (3 if args.quick else 7)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bnb = load_bnb()
    gb = size * size * 4 / 1e9  # GB of fp32 weight
    res = {"env": {"torch": torch.__version__, "bitsandbytes": getattr(bnb, "__version__", None),
                   "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                   "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                   "loadavg_start": os.getloadavg()[0], "size": size, "reps": reps}}

    w = torch.randn(size, size)
    # memory first, before anything else raises the process's peak RSS
    rss0 = maxrss_mb()
    quantize_nf4(w, double_quant=True)
    res["memory"] = {"weight_MB": gb * 1e3, "adaptkit_quantize_peak_extra_MB": maxrss_mb() - rss0}
    if bnb is not None:
        rss1 = maxrss_mb()
        bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        res["memory"]["bnb_quantize_peak_extra_MB_at_least"] = maxrss_mb() - rss1

    dst = torch.empty_like(w)
    t_copy = timeit(lambda: dst.copy_(w), reps)
    t_clone = timeit(lambda: w.clone(), reps)
    res["bandwidth_GBps"] = {"copy_preallocated_rw": 2 * gb / t_copy, "clone_fresh_rw": 2 * gb / t_clone}

    rows = []
    for dq in (False, True):
        packed, st = quantize_nf4(w, double_quant=dq)
        row = {"double_quant": dq,
               "ak_quant": gb / timeit(lambda: quantize_nf4(w, double_quant=dq), reps),
               "ak_dequant_fp32": gb / timeit(lambda: dequantize_nf4(packed, st), reps),
               "ak_dequant_bf16": gb / timeit(lambda: dequantize_nf4(packed, st, torch.bfloat16), reps)}
        if bnb is not None:
            bf = bnb.functional
            pb, sb = bf.quantize_4bit(w, quant_type="nf4", compress_statistics=dq)
            assert torch.equal(pb.reshape(-1), packed), "packed bytes differ from bitsandbytes"
            row["bnb_quant"] = gb / timeit(lambda: bf.quantize_4bit(w, quant_type="nf4",
                                                                    compress_statistics=dq), reps)
            row["bnb_dequant_fp32"] = gb / timeit(lambda: bf.dequantize_4bit(pb, sb), reps)
            row["quant_ratio"] = row["ak_quant"] / row["bnb_quant"]
            row["dequant_ratio"] = row["ak_dequant_fp32"] / row["bnb_dequant_fp32"]
        rows.append(row)
    res["throughput_GBps_of_fp32"] = rows

    if not args.no_linear:
        res["linear_ms"] = bench_linear(w, bnb, reps)
    res["env"]["loadavg_end"] = os.getloadavg()[0]
    report(res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"\nwrote {out}")
    return res


def bench_linear(w: torch.Tensor, bnb, reps: int) -> list:
    packed, st = quantize_nf4(w)  # QLoRA storage: double quantisation
    w16 = w.to(torch.bfloat16)
    pb = sb = None
    if bnb is not None:
        pb, sb = bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    rows = []
    for tokens in (1, 64):
        x = torch.randn(tokens, w.shape[1])
        x16 = x.to(torch.bfloat16)
        ref = nf4_linear(x16, packed, st)
        row = {"tokens": tokens,
               "fp32_linear": 1e3 * timeit(lambda: F.linear(x, w), reps),
               "bf16_linear": 1e3 * timeit(lambda: F.linear(x16, w16), reps),
               "ak_nf4_bf16": 1e3 * timeit(lambda: nf4_linear(x16, packed, st), reps),
               "ak_nf4_fp32": 1e3 * timeit(lambda: nf4_linear(x, packed, st, None, torch.float32), reps)}
        if bnb is not None:
            try:
                out = bnb.matmul_4bit(x16, pb.t(), quant_state=sb)
                row["bnb_matmul_4bit_bf16"] = 1e3 * timeit(lambda: bnb.matmul_4bit(x16, pb.t(), quant_state=sb), reps)
                row["bnb_vs_ak_max_abs_diff"] = float((out.float() - ref.float()).abs().max())
            except Exception as e:  # bnb CPU paths vary by build and ISA
                row["bnb_matmul_4bit_bf16"] = f"failed: {type(e).__name__}: {e}"[:200]
        rows.append(row)
    return rows


def fmt(v) -> str:
    return f"{v:8.2f}" if isinstance(v, float) else f"{str(v):>8s}"


def report(res: dict) -> None:
    e = res["env"]
    print(f"torch {e['torch']}, bitsandbytes {e['bitsandbytes']}, {e['threads']} threads, "
          f"{e['cpu_capability']}, load avg {e['loadavg_start']:.1f} -> {e['loadavg_end']:.1f}, "
          f"weight {e['size']}x{e['size']} fp32")
    bw = res["bandwidth_GBps"]
    print(f"memory bandwidth (copy, read+write): preallocated {bw['copy_preallocated_rw']:.2f} GB/s,"
          f" fresh clone {bw['clone_fresh_rw']:.2f} GB/s")
    m = res["memory"]
    print("quantise peak extra RSS (MB): " + ", ".join(f"{k} {v:.1f}" for k, v in m.items()))
    cols = ["ak_quant", "bnb_quant", "quant_ratio", "ak_dequant_fp32", "bnb_dequant_fp32",
            "dequant_ratio", "ak_dequant_bf16"]
    print("\nGB/s of fp32 weight   " + " ".join(f"{c[:15]:>16s}" for c in cols))
    for r in res["throughput_GBps_of_fp32"]:
        print(f"double_quant={str(r['double_quant']):5s}    " + " ".join(f"{fmt(r.get(c, '-')):>16s}" for c in cols))
    if "linear_ms" in res:
        cols = ["fp32_linear", "bf16_linear", "ak_nf4_bf16", "ak_nf4_fp32", "bnb_matmul_4bit_bf16"]
        print("\nLinear forward (ms)   " + " ".join(f"{c[:18]:>19s}" for c in cols))
        for r in res["linear_ms"]:
            print(f"tokens={r['tokens']:<4d}           " + " ".join(f"{fmt(r.get(c, '-'))[:19]:>19s}" for c in cols))


if __name__ == "__main__":
    main()
