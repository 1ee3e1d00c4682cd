"""Gradients of float score inputs on the GPU: the dQ kernel's atomic adds against the torch recompute.

    python3 benchmarks/input_grads.py [--seq 8192] [--out $OUT]

Patterns: ALiBi with learnable slopes (``slopes[h]``: the dQ kernel adds one sum per tile) and a learnable
relative-bias table (``bias[h, q - k + N]``: read at q and k positions, so both paths are the recompute). B = 32k tokens / N, H = 16, D = 128, bf16. For each, checks
the kernel's input gradient against the deterministic recompute's (``torch.use_deterministic_algorithms``),
then times a forward+backward (wall ms, median of ``--reps`` synchronized calls after warm-up calls) with the
kernel path, with the recompute, and with the input frozen (q, k, v gradients only).
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import attnc  # noqa: E402
from micro_sort import wall  # noqa: E402

PATTERNS = {
    "alibi_slopes": ("pattern p() {\n input slopes: float[heads]\n mask causal\n score alibi(slopes[h])\n}",
                     lambda H, N: torch.rand(H) * 0.1),
    "relative_bias": ("pattern p() {\n input bias: float[heads, R]\n mask causal\n"
                      " score score + bias[h, q - k + n_q]\n}", lambda H, N: torch.randn(H, 2 * N) * 0.1),
}


def timed(fn, reps: int) -> float:
    """Median wall-clock ms of fn() followed by a synchronization (after warm-up calls)."""
    return wall(fn, reps) / 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    N = args.seq
    B, H, D = max(1, 32768 // N), 16, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    dout = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
    rows = []
    for name in args.patterns.split(","):
        source, make = PATTERNS[name]
        kern = attnc.compile(source)
        (input_name,) = kern.ir.inputs
        x = make(H, N).cuda().requires_grad_()

        def step(frozen=False):
            for t in (q, k, v, x):
                t.grad = None
            kern(q, k, v, **{input_name: x.detach() if frozen else x}).backward(dout)
            return x.grad

        got = step().clone()
        torch.use_deterministic_algorithms(True)
        try:
            want = step().clone()
            recompute_ms = timed(step, max(1, args.reps // 2))
        finally:
            torch.use_deterministic_algorithms(False)
        err = ((got - want).norm() / want.norm()).item()
        row = dict(pattern=name, N=N, B=B, H=H, D=D, rel_err_vs_recompute=err,
                   kernel_ms=timed(step, args.reps), recompute_ms=recompute_ms,
                   frozen_ms=timed(lambda: step(frozen=True), args.reps))
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "input_grads.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{'pattern':<15}{'N':>7}{'kernel ms':>11}{'recompute ms':>14}{'frozen ms':>11}{'rel err':>10}")
    for r in rows:
        print(f"{r['pattern']:<15}{r['N']:>7}{r['kernel_ms']:>11.2f}{r['recompute_ms']:>14.1f}{r['frozen_ms']:>11.2f}"
              f"{r['rel_err_vs_recompute']:>10.1e}")


if __name__ == "__main__":
    main()
