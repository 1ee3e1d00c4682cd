"""Gradients of float score inputs on the GPU: the dQ kernel's atomic adds against the torch recompute.

    python3 benchmarks/input_grads.py [--seq 8192] [--out $OUT]
    python3 benchmarks/input_grads.py --fwd-configs "128,64,8,3,tma;..." --bwd-configs "64,32,4,2,tma/64,64,4,2;..."

Patterns: ALiBi with learnable slopes (``slopes[h]``: the dQ kernel adds one sum per tile) and a learnable
relative-bias table (``bias[h, q - k + N]``: one atomic add per score element). B = 32k tokens / N, H = 16,
D = 128, bf16. For each, checks the kernel's input gradient against the deterministic recompute's
(``torch.use_deterministic_algorithms``), then times a forward, and a forward+backward (wall ms, median of ``--reps``
synchronized calls after warm-up calls) with the kernel path, with the recompute, and with the input frozen
(q, k, v gradients only); with ``--flex``, FlexAttention (compiled) with the same mask and score, with and
without the input's gradient.

``--fwd-configs`` / ``--bwd-configs``: configurations (``attnc.launch.parse_config``) to run the relative
bias's forward or backward kernels with (the backward adding the bias's gradient), each timed alone, or why it
did not launch (a configuration that needs more shared memory than the device has).
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


# The same score modifiers for FlexAttention (x: the learnable input, captured).
FLEX_SCORE = {
    "alibi_slopes": lambda x, n: (lambda s, b, h, qi, ki: s + x[h] * (ki - qi)),
    "relative_bias": lambda x, n: (lambda s, b, h, qi, ki: s + x[h, qi - ki + n]),
}


def flex_ms(name: str, x, q, k, v, dout, reps: int) -> dict:
    """FlexAttention (compiled) with the same causal mask and score: forward wall ms, and forward+backward
    with the input's gradient and with the input frozen; an error text where Flex refuses."""
    from attnc.bench import _create_block_mask, _flex   # Flex as bench_all runs it (compiled once)
    n = q.shape[2]
    flex = _flex()
    block_mask = _create_block_mask(lambda b, h, qi, ki: qi >= ki, None, n, n, "cuda")
    out = {}
    with torch.no_grad():
        score_mod = FLEX_SCORE[name](x.detach(), n)
        out["flex_fwd_ms"] = timed(lambda: flex(q, k, v, score_mod=score_mod, block_mask=block_mask), reps)
    for label, t in (("flex_ms", x), ("flex_frozen_ms", x.detach())):
        score_mod = FLEX_SCORE[name](t, n)

        def step():
            for a in (q, k, v, x):
                a.grad = None
            flex(q, k, v, score_mod=score_mod, block_mask=block_mask).backward(dout)
        try:
            out[label] = timed(step, reps)
        except Exception as e:  # noqa: BLE001 -- Flex refusing a captured input's gradient is a result here
            out[label + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def timed(fn, reps: int) -> float:
    """Median wall-clock ms of fn() followed by a synchronization (after warm-up calls)."""
    return wall(fn, reps) / 1e3


def configs(kind: str, texts: list[str], N: int, B: int, H: int, D: int, reps: int) -> list[dict]:
    """The relative bias's forward kernel, or its backward kernels (dq, dk, dv and the bias's gradient), with
    each configuration: wall ms (and the gradient's relative error against the recompute's); or why it did
    not launch."""
    from attnc.launch import launch_backward, launch_forward, parse_config
    from attnc.ops import _call_sizes
    source, make = PATTERNS["relative_bias"]
    kern = attnc.compile(source)
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v, dout = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    named = {"bias": make(H, N).cuda()}
    out, lse = kern(q, k, v, return_lse=True, **named)
    sizes = _call_sizes(kern, q, k, v, named)
    x = named["bias"].clone().requires_grad_()
    torch.use_deterministic_algorithms(True)
    try:
        kern(q, k, v, bias=x).backward(dout)
    finally:
        torch.use_deterministic_algorithms(False)
    want = x.grad
    rows = []
    for text in texts:
        grad = torch.zeros_like(named["bias"])

        def step():
            if kind == "fwd":
                launch_forward(kern, q, k, v, scale=D ** -0.5, sizes=sizes, inputs=named, config=parse_config(text))
                return
            grad.zero_()
            launch_backward(kern, q, k, v, out, lse, dout, None, scale=D ** -0.5, sizes=sizes, inputs=named,
                            config=parse_config(text), input_grads={"bias": grad})
        row = dict(kind=kind, config=text, N=N, B=B, H=H, D=D)
        try:
            step()
            torch.cuda.synchronize()
            if kind == "bwd":
                row["rel_err_vs_recompute"] = ((grad - want).norm() / want.norm()).item()
            row["ms"] = timed(step, reps)
        except Exception as e:  # noqa: BLE001 -- a configuration that does not launch is a result here
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    if kind == "bwd":
        frozen = dict(kind=kind, config="frozen bias (default tiles)", N=N, B=B, H=H, D=D)
        frozen["ms"] = timed(lambda: launch_backward(kern, q, k, v, out, lse, dout, None, scale=D ** -0.5,
                                                     sizes=sizes, inputs=named), reps)
        rows.append(frozen)
        print(json.dumps(frozen), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--flex", action="store_true", help="also time FlexAttention with the same score")
    ap.add_argument("--fwd-configs", default="")
    ap.add_argument("--bwd-configs", default="")
    args = ap.parse_args()
    N = args.seq
    B, H, D = max(1, 32768 // N), 16, 128
    if args.fwd_configs or args.bwd_configs:
        rows = [r for kind in ("fwd", "bwd") if getattr(args, f"{kind}_configs")
                for r in configs(kind, getattr(args, f"{kind}_configs").split(";"), N, B, H, D, args.reps)]
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with open(Path(args.out) / "input_grads_configs.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        for r in rows:
            print(f"{r['kind']:<4}{r['config']:<36}{r.get('ms', float('nan')):>9.3f} ms  {r.get('error', '')[:70]}")
        return
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
        with torch.no_grad():
            row["fwd_ms"] = timed(lambda: kern(q, k, v, **{input_name: x}), args.reps)
        if args.flex:
            row.update(flex_ms(name, x, q, k, v, dout, args.reps))
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "input_grads.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{'pattern':<15}{'N':>7}{'kernel ms':>11}{'recompute ms':>14}{'frozen ms':>11}{'rel err':>10}"
          f"{'flex ms':>9}{'flex frozen':>13}")
    for r in rows:
        print(f"{r['pattern']:<15}{r['N']:>7}{r['kernel_ms']:>11.2f}{r['recompute_ms']:>14.1f}{r['frozen_ms']:>11.2f}"
              f"{r['rel_err_vs_recompute']:>10.1e}{r.get('flex_ms', float('nan')):>9.2f}"
              f"{r.get('flex_frozen_ms', float('nan')):>13.2f}")


if __name__ == "__main__":
    main()
