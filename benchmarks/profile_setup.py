"""Per-call setup of the runtime-input and layout-transform patterns, against their forward, on the GPU.

    python3 benchmarks/profile_setup.py --seqs 8192,32768 --out $OUT

For each pattern and length (B = 32k tokens / N, H = 16, D = 128, bf16, the benchmark's inputs):
- ``fwd_ms``: the cached forward (attention kernel only, as bench_all times it);
- ``setup_ms``: median wall time of the uncached setup (``attnc.bench.uncached_setup``: what a call with
  runtime inputs it has not seen pays before the kernel), GPU synchronized around each;
- ``frac``: setup / forward (SPEC section 6: at most 0.05 at 32k);
- ``gpu_us`` / ``gpu_frac``: device time of one uncached setup (kernels and copies, profiler), and over the forward;
- ``kernels`` / ``syncs``: device launches and host-device copies or synchronizations in it (profiler).
``--profile`` also writes the profiler's op table per row into ``$OUT/setup_profile_<pattern>_<N>.txt``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from bench_all import SPEC_BY_NAME, anchor_inputs, fit_inputs, resolve_kernel  # noqa: E402

from attnc.bench import uncached_setup, wall_ms  # noqa: E402

PATTERNS = "document_causal,hash8_causal,keep50_causal,dilated_w2048_d2"


def _count(fn) -> tuple[int, int, float, str]:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    # Device time: the kernels and copies themselves (an op's own "self device time" would count a
    # torch.sort's kernels a second time).
    gpu_us = sum(e.time_range.elapsed_us() for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    syncs = sum(1 for e in events if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                 "cudaMemcpyAsync") and e.device_type != torch.autograd.DeviceType.CUDA)
    try:
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=40)
    except (AttributeError, KeyError, ValueError):
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40)
    return kernels, syncs, gpu_us, table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", default="8192,32768")
    ap.add_argument("--patterns", default=PATTERNS)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--cprofile", action="store_true", help="also write a Python profile of 20 setups per row")
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    from triton.testing import do_bench
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.patterns.split(","):
        spec = SPEC_BY_NAME[name]
        res = resolve_kernel(spec, spec.params, ROOT / "examples", "cuda")
        kern = res.kern
        for N in (int(s) for s in args.seqs.split(",")):
            B, H, D = max(1, args.tokens // N), args.heads, args.dim
            inputs = fit_inputs(kern, spec, anchor_inputs(N, B, H, "cuda"), res.int_dtype)
            q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            kern(q, k, v, **inputs)
            fwd_ms = do_bench(lambda: kern(q, k, v, **inputs), warmup=25, rep=100)
            setup_ms = wall_ms(lambda: uncached_setup(kern, q, k, v, inputs), reps=20, warmup=3)
            kernels, syncs, gpu_us, table = _count(lambda: uncached_setup(kern, q, k, v, inputs))
            if args.profile:
                (out / f"setup_profile_{name}_{N}.txt").write_text(table)
            if args.cprofile:
                import cProfile
                import io
                import pstats
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(20):
                    uncached_setup(kern, q, k, v, inputs)
                torch.cuda.synchronize()
                prof.disable()
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(45)
                (out / f"setup_cprofile_{name}_{N}.txt").write_text(text.getvalue())
            row = dict(pattern=name, N=N, B=B, H=H, D=D, fwd_ms=round(fwd_ms, 4), setup_ms=round(setup_ms, 4),
                       frac=round(setup_ms / fwd_ms, 4), gpu_us=round(gpu_us, 1),
                       gpu_frac=round(gpu_us / 1e3 / fwd_ms, 4), kernels=kernels, syncs=syncs)
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / "setup.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"\n{'pattern':<20} {'N':>6} {'fwd ms':>8} {'setup ms':>9} {'setup/fwd':>9} {'gpu us':>8} {'gpu/fwd':>8} "
          f"{'kernels':>8} {'syncs':>6}")
    for r in rows:
        print(f"{r['pattern']:<20} {r['N']:>6} {r['fwd_ms']:>8.3f} {r['setup_ms']:>9.3f} {r['frac']:>9.3f} "
              f"{r['gpu_us']:>8.1f} {r['gpu_frac']:>8.3f} {r['kernels']:>8} {r['syncs']:>6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
