"""Which kernel variants a benchmark pattern's calls launch, and its forward time in a bare process.

    python3 benchmarks/variant_launches.py document_causal --seq 8192 [--flex]

Runs five forward+backward calls of the pattern's benchmark call (bench_all.bench_call: the same inputs as
bench_all), printing how many attention kernels each launched and, for the first and last, each launch's
variant (guard, program order, descriptors, FULL_RUNS, stages): the first calls run every variant a device
flag could pick, later ones only the picked one (attnc.flags). Then times the forward twice (``--flex``: after
FlexAttention's forward+backward has run in the process). Written for NOTES item 74, where bench_all timed the
documents' forward at 0.80 ms in some processes and 0.88-0.90 ms in others, and this script always at 0.895.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_all  # noqa: E402
from attnc import fastlaunch, launch  # noqa: E402
from attnc.bench import _flex, time_ms  # noqa: E402

FLAGS = ("GUARD", "HEAD_GROUP", "USE_TMA", "HOST_DESC", "FULL_RUNS", "BUCKET_PURE", "num_stages")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pattern", choices=sorted(bench_all.SPEC_BY_NAME))
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--flex", action="store_true", help="run FlexAttention's forward+backward first")
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


if __name__ == "__main__":
    main()
