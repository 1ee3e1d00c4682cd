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

``--sync-check`` lists, at ``--seq``, every operation of a forward and of a forward+backward that makes the host
wait for the GPU (torch's sync debug mode), and times the forward three ways: do_bench (an L2 flush before each
call), calls queued back to back between two events (no flush), and the profiler's device time of its kernels.

``--breakdown`` splits the host time of a forward+backward at the tiny length, one head and one sequence (the
GPU's work far below the host's, so calls back to back measure the host as do_bench drives it; no Flex):
through ``kern(...).backward`` (eager calls run ``attnc.ops._EagerAttention``; before RESULTS run 75 they went
through the custom operators), under a plain ``torch.autograd.Function`` around the launchers, the autograd
engine alone (a Function without kernels), each custom operator beside its launcher called directly
(``launch_forward``, ``launch_backward``), the direct calls with kernel launches stubbed out (what is left is
attnc's own Python and the torch operations it issues), the time spent inside the launches
(``attnc.fastlaunch.launch``) and, of that, inside Triton's ``JITFunction.run`` (before RESULTS run 79 every
launch went through it; now only a signature's first, or all with ``ATTNC_FAST_LAUNCH=0``). A cProfile of the
direct calls (no custom operator, so no frames on the autograd thread or behind Dynamo's disable wrapper) goes
to ``OUT/host_direct_*.txt``.

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


def sync_check(fn, calls: int = 3) -> list[str]:
    """The distinct messages of torch's sync debug mode over ``calls`` calls of ``fn`` (after warm calls): every
    operation in them that makes the host wait for the GPU."""
    import warnings
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(calls):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sorted({str(w.message).splitlines()[0][:200] for w in caught})


def back_to_back_ms(fn, calls: int = 30) -> float:
    """Milliseconds per call between events around ``calls`` calls queued back to back (no L2 flush between
    them, unlike do_bench): a host gap inside a call shows here, the flush's cold L2 does not."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def steady_ms(fn, calls: int = 300, repeats: int = 3) -> float:
    """Host milliseconds per call, back to back as do_bench calls them, on a problem so small that the GPU's
    work never fills the launch queue: the least of ``repeats`` means over ``calls`` calls."""
    return min(host_ms(fn, calls) for _ in range(repeats))


def breakdown(name: str, n: int, out: Path) -> dict:
    """Host milliseconds per forward+backward at length ``n`` (one head, one sequence), split as the module
    docstring says."""
    import math

    import triton.runtime.jit as jit

    from attnc.launch import launch_backward, launch_forward
    from attnc.ops import _call_sizes, ops_for
    c = bench_call(SPEC_BY_NAME[name], n, n, 1, 128)
    q, k, v, dout = (t.detach() for t in (c.q, c.k, c.v, c.dout))
    scale = 1.0 / math.sqrt(q.shape[-1])
    sizes = _call_sizes(c.kern, q, k, v, c.inputs)
    ops = ops_for(c.kern)
    values = [c.inputs[name] for name in c.kern.ir.inputs]
    out0, lse0, _ = launch_forward(c.kern, q, k, v, scale=scale, sizes=sizes, inputs=c.inputs)

    def forward():
        return launch_forward(c.kern, q, k, v, scale=scale, sizes=sizes, inputs=c.inputs)

    def backward(o=out0, lse=lse0, do=dout, qkv=(q, k, v)):
        return launch_backward(c.kern, *qkv, o, lse, do, None, scale=scale, sizes=sizes, inputs=c.inputs)

    class Direct(torch.autograd.Function):
        """The launchers under a plain autograd.Function (no custom operator)."""
        @staticmethod
        def forward(ctx, q, k, v):
            o, lse, _ = launch_forward(c.kern, q, k, v, scale=scale, sizes=sizes, inputs=c.inputs)
            ctx.save_for_backward(q, k, v, o, lse)
            return o

        @staticmethod
        def backward(ctx, do):
            q, k, v, o, lse = ctx.saved_tensors
            return backward(o, lse, do, (q, k, v))

    class Empty(torch.autograd.Function):
        """The autograd engine's own cost: no kernels, empty allocations."""
        @staticmethod
        def forward(ctx, q, k, v):
            return torch.empty_like(q)

        @staticmethod
        def backward(ctx, do):
            return torch.empty_like(do), torch.empty_like(do), torch.empty_like(do)

    def fresh(fn):
        def call():
            c.q.grad = c.k.grad = c.v.grad = None
            fn()
        return call

    def direct_fb():
        o, lse, _ = forward()
        backward(o, lse)

    row = {"pattern": name, "N": n,
           "kern_fb_ms": steady_ms(lambda: c.kern(c.q, c.k, c.v, **c.inputs).backward(c.dout)),
           "kern_fb_fresh_grads_ms": steady_ms(fresh(lambda: c.kern(c.q, c.k, c.v, **c.inputs).backward(c.dout))),
           "function_fb_ms": steady_ms(fresh(lambda: Direct.apply(c.q, c.k, c.v).backward(c.dout))),
           "engine_only_fb_ms": steady_ms(fresh(lambda: Empty.apply(c.q, c.k, c.v).backward(c.dout))),
           "kern_fwd_ms": steady_ms(lambda: c.kern(q, k, v, **c.inputs)),
           "op_fwd_ms": steady_ms(lambda: ops.forward(q, k, v, values, scale)),
           "direct_fwd_ms": steady_ms(forward),
           "op_bwd_ms": steady_ms(lambda: ops.backward(q, k, v, out0, lse0, dout, None, values, scale)),
           "direct_bwd_ms": steady_ms(backward),
           "direct_fb_ms": steady_ms(direct_fb)}
    # Time inside the launches (attnc.fastlaunch.launch: Triton's path or the direct one) and inside Triton's
    # JITFunction.run (the launches Triton's path still makes), then the direct calls with launches stubbed.
    import attnc.device_setup as setup_module
    import attnc.launch as launch_module
    from attnc import fastlaunch
    original_launch, original_run = fastlaunch.launch, jit.JITFunction.run
    spent = {"launch": [0.0, 0], "triton": [0.0, 0]}

    def timing(fn, slot):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[slot][0] += time.perf_counter() - t0
                spent[slot][1] += 1
        return timed

    def install(launch, run):
        launch_module.launch_kernel = setup_module.launch_kernel = launch
        jit.JITFunction.run = run

    try:
        install(timing(original_launch, "launch"), timing(original_run, "triton"))
        for _ in range(50):
            direct_fb()
        row["launch_ms"], row["launches"] = spent["launch"][0] * 1e3 / 50, spent["launch"][1] / 50
        row["triton_run_ms"], row["triton_launches"] = spent["triton"][0] * 1e3 / 50, spent["triton"][1] / 50
        install(lambda *args, **kwargs: None, original_run)
        row["direct_fb_no_launch_ms"] = steady_ms(direct_fb)
    finally:
        install(original_launch, original_run)
    # The direct launches against Triton's path in this process, alternating (host speed drifts between runs).
    import os
    prior = os.environ.get("ATTNC_FAST_LAUNCH")
    try:
        for i, mode in enumerate(("1", "0", "1", "0")):
            os.environ["ATTNC_FAST_LAUNCH"] = mode
            row[f"direct_fb_{'fast' if mode == '1' else 'triton'}{i // 2 + 1}_ms"] = steady_ms(direct_fb)
    finally:
        os.environ.pop("ATTNC_FAST_LAUNCH")
        if prior is not None:
            os.environ["ATTNC_FAST_LAUNCH"] = prior
    write_cprofile(direct_fb, 100, out / f"host_direct_{name}.txt", "tottime", 45)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patterns", default="causal,hash8_causal,keep50_causal")
    ap.add_argument("--small", type=int, default=256, help="the tiny length (host-bound calls)")
    ap.add_argument("--seq", type=int, default=8192, help="the benchmark length (do_bench beside device time)")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--out", default="./host_out")
    ap.add_argument("--issue", action="store_true",
                    help="only the host issue time of a forward+backward at --seq beside its GPU time")
    ap.add_argument("--breakdown", action="store_true",
                    help="only the split of a forward+backward's host time at the tiny length (see above)")
    ap.add_argument("--sync-check", action="store_true",
                    help="only, at --seq: the host synchronizations of a forward and a forward+backward (torch's sync "
                         "debug mode), and the forward timed by do_bench, back to back, and by the profiler")
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
    if args.sync_check:
        for name in args.patterns.split(","):
            c = bench_call(SPEC_BY_NAME[name], args.seq, 32768, 16, 128)

            def fwd():
                return c.kern(c.q, c.k, c.v, **c.inputs)

            row = {"pattern": name, "N": args.seq,
                   "syncs_fwd": sync_check(fwd),
                   "syncs_fwdbwd": sync_check(lambda: c.kern(c.q, c.k, c.v, **c.inputs).backward(c.dout))}
            with torch.no_grad():
                row.update(bench_fwd_ms=do_bench(fwd, warmup=100, rep=300), back_to_back_fwd_ms=back_to_back_ms(fwd),
                           device_fwd_ms=device_ms(fwd))
            with open(out / "host_overhead.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name} N={args.seq}: forward do_bench {row['bench_fwd_ms']:.4f} ms, back to back "
                  f"{row['back_to_back_fwd_ms']:.4f}, device {row['device_fwd_ms']:.4f}; host syncs: forward "
                  f"{row['syncs_fwd'] or 'none'}, forward+backward {row['syncs_fwdbwd'] or 'none'}")
        return
    if args.breakdown:
        for name in args.patterns.split(","):
            row = breakdown(name, args.small, out)
            with open(out / "host_overhead.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name}: host issue of a f+b {row['kern_fb_ms']:.3f} ms through kern(), {row['direct_fb_ms']:.3f} "
                  f"calling the launchers, {row['direct_fb_no_launch_ms']:.3f} without launches; inside launches "
                  f"{row['launch_ms']:.3f} ms ({row['launches']:.1f}), of which in Triton's JITFunction.run "
                  f"{row['triton_run_ms']:.3f} ms ({row['triton_launches']:.1f})")
            print("   " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith("_ms")))
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
