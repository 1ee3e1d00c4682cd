"""Which kernel variants a benchmark pattern's calls launch, and its forward time in a bare process.

    python3 benchmarks/variant_launches.py document_causal --seq 8192 [--flex] [--host]

Runs five forward+backward calls of the pattern's benchmark call (bench_all.bench_call: the same inputs as
bench_all), printing how many attention kernels each launched and, for the first and last, each launch's
variant (guard, program order, descriptors, FULL_RUNS, stages): the first calls run every variant a device
flag could pick, later ones only the picked one (attnc.flags). Then times the forward twice (``--flex``: after
FlexAttention's forward+backward has run in the process). Written for NOTES item 74, where bench_all timed the
documents' forward at 0.80 ms in some processes and 0.88-0.90 ms in others, and this script always at 0.895.
``--host`` then says where a call's time goes (``host_report``): the host's enqueue time per call beside the
device's, the kernels' own times, synchronizations, the SM clock and power while timing, the host's hot spots.
"""
import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_all  # noqa: E402
from profile_bwd import kernel_times  # noqa: E402

from attnc import fastlaunch, launch  # noqa: E402
from attnc.bench import _flex, time_ms, time_stats  # noqa: E402

FLAGS = ("GUARD", "HEAD_GROUP", "USE_TMA", "HOST_DESC", "FULL_RUNS", "BUCKET_PURE", "num_stages")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pattern", choices=sorted(bench_all.SPEC_BY_NAME))
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--flex", action="store_true", help="run FlexAttention's forward+backward first")
    ap.add_argument("--host", action="store_true",
                    help="also the host's time per call against the device's, the kernels' own times (torch "
                         "profiler), synchronizations, SM clocks while timing, and a cProfile of the host path")
    ap.add_argument("--settle", type=float, default=0,
                    help="then idle this many seconds and time the forward (and Flex's, with --flex) in windows of "
                         "0.5 s back to back, with the SM clock: how long a card left idle runs above its "
                         "sustained clock")
    args = ap.parse_args()
    call = bench_all.bench_call(bench_all.SPEC_BY_NAME[args.pattern], args.seq, 32768, 16, 128)
    kern, inputs, q, k, v, dout = call.kern, call.inputs, call.q, call.k, call.v, call.dout
    if args.flex:
        flex = _flex()
        for _ in range(3):
            flex(q, k, v, block_mask=call.block_mask).backward(dout)
        print(f"flex fwd {time_ms(lambda: flex(q, k, v, block_mask=call.block_mask), warmup=100, rep=300):.4f} ms")
    seen, real = [], launch.launch_kernel

    def spy(fn, grid, *a, **kw):
        seen.append((getattr(fn, "__name__", "?"), grid, {x: kw.get(x) for x in FLAGS}))
        return real(fn, grid, *a, **kw)

    launch.launch_kernel = spy
    try:
        for i in range(5):
            seen.clear()
            kern(q, k, v, **inputs).backward(dout)
            torch.cuda.synchronize()
            print(f"call {i}: {len(seen)} launches")
            if i in (0, 4):
                for name, grid, flags in seen:
                    print(f"    {name} {grid} {flags}")
    finally:
        launch.launch_kernel = real
    print("fastlaunch", fastlaunch.counts)
    for _ in range(2):
        print(f"attnc fwd {time_ms(lambda: kern(q, k, v, **inputs), warmup=100, rep=300):.4f} ms")
    if args.settle:
        settle(lambda: kern(q, k, v, **inputs), "attnc fwd", args.settle)
        if args.flex:
            settle(lambda: flex(q, k, v, block_mask=call.block_mask), "flex fwd", args.settle)
    if args.host:
        host_report(lambda: kern(q, k, v, **inputs), "fwd")
        host_report(lambda: kern(q, k, v, **inputs).backward(dout), "fwd+bwd")


def settle(fn, label: str, idle_s: float, windows: int = 12):
    """``fn``'s time in consecutive 0.5 s windows after ``idle_s`` seconds of an idle GPU (no warm-up but
    time_stats' few untimed calls)."""
    torch.cuda.synchronize()
    time.sleep(idle_s)
    t0 = time.perf_counter()
    for i in range(windows):
        st = time_stats(fn, warmup=1, rep=500, clocks=True)
        print(f"[{label}] after {idle_s:.0f} s idle, window {i} (t = {time.perf_counter() - t0:5.2f} s): "
              f"{st['median']:.4f} ms, SM MHz {st.get('mhz')}, W {st.get('watts')}", flush=True)


def host_report(fn, label: str, calls: int = 50):
    """Where one call's time goes: host enqueue time per call against the wall time per call of back-to-back
    calls (equal: the host is what bounds them), the device kernels' own times, whether a call synchronizes,
    the SM clock while do_bench times single calls and back-to-back ones, and the host path's hot spots."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    print(f"[{label}] host {1e3 * (t1 - t0) / calls:.4f} ms/call, back-to-back wall {1e3 * (t2 - t0) / calls:.4f}"
          f" ms/call")
    try:
        torch.cuda.set_sync_debug_mode("error")
        fn()
        print(f"[{label}] no synchronization")
    except RuntimeError as e:
        print(f"[{label}] synchronizes: {str(e)[:200]}")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    times = kernel_times(fn, 10)
    print(f"[{label}] device busy {sum(times.values()) / 1e3:.4f} ms/call in kernels:")
    for key, us in list(times.items())[:12]:
        print(f"    {us:9.1f} us  {key}")
    st = time_stats(fn, warmup=50, rep=300, clocks=True)
    print(f"[{label}] single calls {st['median']:.4f} ms, SM MHz {st.get('mhz')}, W {st.get('watts')}, "
          f"{st.get('clock_samples')} samples, busy {st.get('busy')}, {st.get('host')}")

    def loop():
        for _ in range(20):
            fn()
    st = time_stats(loop, warmup=50, rep=600, clocks=True)
    print(f"[{label}] 20 back to back {st['median'] / 20:.4f} ms/call, SM MHz {st.get('mhz')}, "
          f"W {st.get('watts')}, {st.get('clock_samples')} samples, busy {st.get('busy')}, {st.get('host')}")
    mem = torch.cuda.memory_stats()
    print(f"[{label}] allocator: {mem.get('reserved_bytes.all.current', 0) / 2**30:.2f} GiB reserved, "
          f"{mem.get('allocated_bytes.all.peak', 0) / 2**30:.2f} GiB peak allocated, "
          f"cudaMalloc {mem.get('num_device_alloc')}, cudaFree {mem.get('num_device_free')}, "
          f"retries {mem.get('num_alloc_retries')}")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    print(f"[{label}] host hot spots over {calls} calls (cumulative):")
    pstats.Stats(pr).sort_stats("cumulative").print_stats(22)


if __name__ == "__main__":
    main()
