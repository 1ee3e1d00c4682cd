"""How much host time a call costs before and around its kernels: attnc against FlexAttention.

    python3 benchmarks/host_overhead.py --patterns causal,hash8_causal,keep50_causal --out $OUT

``do_bench`` times a call from an event recorded before it to one after it. When the host needs longer to
reach the first kernel launch than the GPU needs for what is queued before it (the benchmark's L2 flush), the
GPU waits and the wait is timed. This script measures, per pattern, at a tiny length (the GPU's work
negligible, so a call's time is its host time):

- the host time of a forward and of a forward+backward call (mean over back-to-back calls, then synchronized);
- the same for Flex's compiled call;
- a cProfile of the attnc forward calls (top functions by cumulative time, in ``OUT/host_profile_*.txt``).

``--issue`` measures instead, at ``--seq``, how long the host takes to issue one forward+backward call while the
GPU is kept busy (``torch.cuda._sleep`` queued before it, so the host never waits), beside the GPU time of the
same call (events around it, its launches all queued before the GPU reaches them). Issue time above GPU time
means the call is bound by the host.

At the benchmark's length it also prints the forward's do_bench median beside its kernels' device time from the
profiler: the difference is what the host adds to the measured forward.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from bench_all import SPEC_BY_NAME, bench_call  # noqa: E402
from profile_bwd import kernel_times  # noqa: E402

from attnc.bench import _flex  # noqa: E402


def host_ms(fn, calls: int) -> float:
    """Mean wall milliseconds per call of ``calls`` back-to-back calls (the GPU's work being negligible)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / calls


def device_ms(fn, iters: int = 10) -> float:
    """Device milliseconds per call of the kernels ``fn`` launches (profiler; see profile_bwd.py)."""
    return sum(kernel_times(fn, iters).values()) / 1e3


def write_cprofile(fn, calls: int, path: Path, sort: str, lines: int) -> None:
    """A cProfile of ``calls`` calls of ``fn`` (then synchronized), its top ``lines`` functions by ``sort``."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats(sort).print_stats(lines)
    path.write_text(text.getvalue())


def issue_and_gpu_ms(fn, reps: int = 30) -> tuple[float, float]:
    """Median host milliseconds to issue ``fn`` behind ~25 ms of queued GPU sleep, and the median GPU
    milliseconds between events around it."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    issue, gpu = [], []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(50_000_000)
        start.record()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        end.record()
        torch.cuda.synchronize()
        issue.append((t1 - t0) * 1e3)
        gpu.append(start.elapsed_time(end))
    return sorted(issue)[reps // 2], sorted(gpu)[reps // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patterns", default="causal,hash8_causal,keep50_causal")
    ap.add_argument("--small", type=int, default=256, help="the tiny length (host-bound calls)")
    ap.add_argument("--seq", type=int, default=8192, help="the benchmark length (do_bench beside device time)")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--out", default="./host_out")
    ap.add_argument("--issue", action="store_true",
                    help="only the host issue time of a forward+backward at --seq beside its GPU time")
    ap.add_argument("--profile-only", action="store_true",
                    help="only the cProfiles (forward and forward+backward) at the tiny length, no Flex")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from triton.testing import do_bench
    if args.issue:
        for name in args.patterns.split(","):
            c = bench_call(SPEC_BY_NAME[name], args.seq, 32768, 16, 128)
            issue, gpu = issue_and_gpu_ms(lambda: c.kern(c.q, c.k, c.v, **c.inputs).backward(c.dout))
            print(f"{name}: host issue per f+b {issue:.3f} ms, GPU f+b (queued ahead) {gpu:.3f} ms")
        return
    rows = []
    for name in args.patterns.split(","):
        spec = SPEC_BY_NAME[name]
        row = {"pattern": name}
        for n, tokens in ((args.small, 4 * args.small), (args.seq, 32768)):
            c = bench_call(spec, n, tokens, 16, 128)
            flex = _flex()

            def fwd():
                return c.kern(c.q, c.k, c.v, **c.inputs)

            def fwdbwd():
                c.kern(c.q, c.k, c.v, **c.inputs).backward(c.dout)

            def flex_fwd():
                return flex(c.q, c.k, c.v, block_mask=c.block_mask)

            def flex_fwdbwd():
                flex(c.q, c.k, c.v, block_mask=c.block_mask).backward(c.dout)

            if args.profile_only:
                for what, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
                    host_ms(fn, 20)
                    write_cprofile(fn, args.calls, out / f"host_profile_{name}_{what}.txt", "tottime", 40)
                    row[f"host_{what}_profiled_ms"] = host_ms(fn, args.calls)
                break
            if n == args.small:
                row.update(host_fwd_ms=host_ms(fwd, args.calls), host_fwdbwd_ms=host_ms(fwdbwd, args.calls),
                           flex_host_fwd_ms=host_ms(flex_fwd, args.calls),
                           flex_host_fwdbwd_ms=host_ms(flex_fwdbwd, args.calls))
                write_cprofile(fwd, args.calls, out / f"host_profile_{name}.txt", "cumulative", 45)
            else:
                with torch.no_grad():
                    row.update(bench_fwd_ms=do_bench(fwd, warmup=100, rep=300), device_fwd_ms=device_ms(fwd),
                               flex_bench_fwd_ms=do_bench(flex_fwd, warmup=100, rep=300),
                               flex_device_fwd_ms=device_ms(flex_fwd))
        rows.append(row)
        with open(out / "host_overhead.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    if args.profile_only:
        print(json.dumps(rows))
        return
    print(f"{'pattern':16} {'host fwd':>9} {'host f+b':>9} {'flex fwd':>9} {'flex f+b':>9}   "
          f"{'bench fwd':>9} {'device':>8} {'flex bench':>10} {'flex dev':>8}  (ms)")
    for r in rows:
        print(f"{r['pattern']:16} {r['host_fwd_ms']:9.3f} {r['host_fwdbwd_ms']:9.3f} {r['flex_host_fwd_ms']:9.3f} "
              f"{r['flex_host_fwdbwd_ms']:9.3f}   {r['bench_fwd_ms']:9.4f} {r['device_fwd_ms']:8.4f} "
              f"{r['flex_bench_fwd_ms']:10.4f} {r['flex_device_fwd_ms']:8.4f}")


if __name__ == "__main__":
    main()
