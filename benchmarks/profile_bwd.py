"""Where a forward+backward spends its device time: attnc's kernels against FlexAttention's, per kernel.

    python3 benchmarks/profile_bwd.py --patterns causal,document_causal --seqs 8192,32768 --out $OUT

For each pattern and length (B = 32k tokens / N, H = 16, D = 128, bf16, the benchmark's inputs), both
implementations run ``--iters`` forward+backward calls under the torch profiler (after a warm-up), and the
device time of every kernel is summed per kernel name and divided by the iterations. A table per row shows
the kernels that take at least 1% of the call; ``OUT/profile_bwd.jsonl`` holds them all.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from bench_all import SPEC_BY_NAME, bench_call  # noqa: E402

from attnc.bench import _flex  # noqa: E402


def kernel_times(fn, iters: int) -> dict[str, float]:
    """Device microseconds per call of each kernel ``fn`` launches (profiler, ``iters`` calls)."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            totals[ev.name[:60]] += ev.device_time / iters
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def profile_one(name: str, n: int, args) -> dict:
    call = bench_call(SPEC_BY_NAME[name], n, args.tokens, args.heads, args.dim)
    q, k, v, dout = call.q, call.k, call.v, call.dout
    flex = _flex()
    row = dict(pattern=name, N=n, B=call.batch, H=call.heads, D=call.dim)
    for impl, fn in (("attnc", lambda: call.kern(q, k, v, **call.inputs).backward(dout)),
                     ("flex", lambda: flex(q, k, v, block_mask=call.block_mask).backward(dout))):
        times = kernel_times(fn, args.iters)
        row[impl] = times
        row[impl + "_total_us"] = sum(times.values())
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patterns", default="causal,document_causal")
    ap.add_argument("--seqs", default="8192,32768")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default="./profile_out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for n in (int(s) for s in args.seqs.split(",")):
        for name in args.patterns.split(","):
            row = profile_one(name, n, args)
            with open(out / "profile_bwd.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"== {name} N={n}: attnc {row['attnc_total_us']:.0f} us, flex {row['flex_total_us']:.0f} us "
                  "per forward+backward (device time)")
            for impl in ("attnc", "flex"):
                total = row[impl + "_total_us"]
                for kname, us in row[impl].items():
                    if us >= 0.01 * total:
                        print(f"   {impl:5s} {us:9.1f} us {us / total:6.1%}  {kname}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
