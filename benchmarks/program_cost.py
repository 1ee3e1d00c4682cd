"""What a program costs besides its tiles: causal bands of several widths on the same tiles, fitted.

    python3 benchmarks/program_cost.py --seq 8192 --windows 256,512,1024,2048,4096 --out $OUT/pc

Every pattern is ``k <= q and q - k < W`` (and plain causal), or the same band in whole blocks
(``k // B <= q // B and q // B - k // B < W // B``: full tiles only), at one length, batch x length = 32k tokens, 16
heads, D 128, bf16, all on the same forward tiles (``--fwd``, default 64 x 64 w4 s3, attnc's tiles for narrow
bands) and the default backward. So every run has the same programs, one per (batch x head, query block),
and differs in how many full and partial tiles they compute (attnc's plan). A least-squares
fit of the measured times to ``programs x a + full tiles x b + partial tiles x c`` gives the time per full and
per partial tile and the fixed time per program (``a``, all in microseconds of the whole GPU, then in tiles:
a / b). NOTES.md item 72 estimated a ~3.5-4 tile fixed cost from two points; this measures it.
Rows go to OUT/program_cost.jsonl, the fit is printed last.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import attnc  # noqa: E402
from attnc.bench import effective_tflops, env_info, mask_density, time_ms  # noqa: E402

SOURCE = "pattern band(window: int) {\n    mask k <= q and q - k < window\n}\n"
CAUSAL = "pattern causal_only() {\n    mask k <= q\n}\n"
BLOCKS = "pattern band_blocks(nb: int) {{\n    mask k // {b} <= q // {b} and q // {b} - k // {b} < nb\n}}\n"


def counts(kern, n: int, block: int, device="cuda") -> tuple[int, int, float]:
    """(full tiles, partial tiles, density) of one (batch, head) of ``kern`` at length n: the tiles from attnc's
    plan on block x block tiles, the density counted exactly on the pattern's own mask."""
    tiles = kern.plan(n_q=n, n_k=n, block_m=block, block_n=block).tiles
    density = mask_density(kern.flex_mask_mod(n, n), batch=1, heads=1, n_q=n, n_k=n, device=device)
    return tiles["full"], tiles["partial"], density


def fit(rows: list[dict], key: str) -> dict:
    """Least squares of rows[key] (ms) on (programs, full tiles, partial tiles); microseconds per unit."""
    a = torch.tensor([[r["programs"], r["full"], r["partial"]] for r in rows], dtype=torch.float64)
    y = torch.tensor([r[key] * 1e3 for r in rows], dtype=torch.float64)
    sol = torch.linalg.lstsq(a, y).solution
    resid = (a @ sol - y).abs().max().item()
    per_prog, per_full, per_part = sol.tolist()
    return dict(us_per_program=per_prog, us_per_full_tile=per_full, us_per_partial_tile=per_part,
                program_in_tiles=per_prog / per_full, partial_in_tiles=per_part / per_full, max_residual_us=resid)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--windows", default="256,512,1024,2048,4096")
    ap.add_argument("--fwd", default="64,64,4,3", help="forward tiles of every run (ATTNC_FWD_CONFIG)")
    ap.add_argument("--rep", type=float, default=300)
    ap.add_argument("--out", default=os.environ.get("OUT") or "./program_cost_out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "program_cost_env.json").write_text(json.dumps(env_info(sys.argv), default=str, indent=1))
    os.environ["ATTNC_FWD_CONFIG"] = args.fwd
    block = int(args.fwd.split(",")[0])
    n, h, d = args.seq, args.heads, args.dim
    b = max(1, args.tokens // n)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    dout = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    windows = [int(x) for x in args.windows.split(",")]
    cases = [(f"window {w}", attnc.compile(SOURCE, window=w)) for w in windows]
    cases += [(f"blocks {w}", attnc.compile(BLOCKS.format(b=block), nb=w // block)) for w in windows if n % block == 0]
    cases.append(("causal", attnc.compile(CAUSAL)))
    rows = []
    for name, kern in cases:
        full, part, density = counts(kern, n, block)
        kern(q, k, v).backward(dout)                   # compile outside the timing
        fwd = time_ms(lambda: kern(q, k, v), rep=args.rep)
        fb = time_ms(lambda: kern(q, k, v).backward(dout), rep=args.rep, grad_to_none=[q, k, v])
        row = dict(pattern=name, N=n, B=b, H=h, D=d, programs=b * h * ((n + block - 1) // block),
                   full=b * h * full, partial=b * h * part, density=density, fwd_ms=fwd, fwdbwd_ms=fb, bwd_ms=fb - fwd,
                   fwd_tflops=effective_tflops(b, h, n, n, d, density, fwd),
                   fwdbwd_tflops=effective_tflops(b, h, n, n, d, density, fb, fwdbwd=True))
        rows.append(row)
        with open(out / "program_cost.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name:12s}  tiles {full:6d} full {part:5d} partial per head  fwd {fwd:.3f} ms "
              f"({row['fwd_tflops']:.1f})  f+b {fb:.3f} ms ({row['fwdbwd_tflops']:.1f})", flush=True)
    for key in ("fwd_ms", "bwd_ms"):
        f = fit(rows, key)
        with open(out / "program_cost.jsonl", "a") as fh:
            fh.write(json.dumps(dict(fit=key, **f)) + "\n")
        print(f"{key}: {f['us_per_program']:.4f} us per program ({f['program_in_tiles']:.2f} full tiles), "
              f"{f['us_per_full_tile']:.5f} us per full tile, {f['us_per_partial_tile']:.5f} per partial tile "
              f"({f['partial_in_tiles']:.2f} full tiles); largest residual {f['max_residual_us']:.1f} us")


if __name__ == "__main__":
    main()
