"""Patterns whose tiles read a runtime input per (query, key) element, under several kernel configurations.

    python3 benchmarks/gather_stages.py [--seq 8192] [--patterns dense_mask,...] [--flex] [--out $OUT]

NOTES item 65 found that a score reading ``bias[h, q - k + c]`` (one index over q and k) ran 2.4x faster one
stage deep than pipelined. Two other kinds of read also load a [BLOCK_M, BLOCK_N] tile of an input per score
tile (NOTES item 67, RESULTS runs 100-101):

- ``dense_mask``: a boolean mask given as a tensor, ``m[b, q, k] and causal`` (SDPA's ``attn_mask``), drawn as
  documents of 512-4096 tokens (most tiles full or empty, partial ones on the documents' edges);
- ``dense_mask_random``: the same read with 90% of the entries kept at random (every tile partial);
- ``periodic_bias``: a score ``score + t[h, q % 64, k % 64]`` (indices that cover q and k between them).

Each runs its forward, and its forward+backward (q, k, v gradients), with attnc's default and with the given
configurations (``ATTNC_FWD_CONFIG`` / ``ATTNC_BWD_CONFIG`` values), checked against the default's output
first; with ``--flex``, FlexAttention beside it (same mask and score). B x N = 32k tokens, H = 16, D = 128,
bf16. Median ms of ``do_bench``.
"""
import argparse
import json
import os
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import attnc  # noqa: E402
from attnc.bench import _create_block_mask, _flex, time_ms  # noqa: E402

PATTERNS = {
    "dense_mask": "pattern p() {\n input m: bool[batch, N, N]\n mask m[b, q, k] and causal\n}",
    "dense_mask_random": "pattern p() {\n input m: bool[batch, N, N]\n mask m[b, q, k] and causal\n}",
    "periodic_bias": ("pattern p() {\n input t: float[heads, P, P]\n mask causal\n"
                      " score score + t[h, q % 64, k % 64]\n}"),
}
FWD = "default;64,64,4,1;64,128,4,1,tma;128,128,8,1,tma;64,64,4,2"
BWD = "default;64,64,4,1;64,64,4,1,tma"


def make_inputs(name: str, B: int, H: int, N: int, g: torch.Generator) -> dict:
    if name == "dense_mask":
        lens, total = [], 0
        while total < N:
            lens.append(int(torch.randint(512, 4097, (1,), generator=g)))
            total += lens[-1]
        doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))[:N]
        return {"m": (doc[:, None] == doc[None, :]).expand(B, N, N).contiguous().cuda()}
    if name == "dense_mask_random":
        return {"m": (torch.rand(B, N, N, generator=g) < 0.9).cuda()}
    return {"t": (torch.randn(H, 64, 64, generator=g) * 0.5).cuda()}


def flex_fns(name: str, inputs: dict, B: int, N: int):
    """FlexAttention's mask_mod and score_mod for the pattern."""
    if name.startswith("dense_mask"):
        m = inputs["m"]
        return (lambda b, h, qi, ki: m[b, qi, ki] & (qi >= ki)), None, (B, 1)
    t = inputs["t"]
    return (lambda b, h, qi, ki: qi >= ki), (lambda s, b, h, qi, ki: s + t[h, qi % 64, ki % 64]), None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--fwd", default=FWD, help="forward configurations, ';' separated ('default': attnc's)")
    ap.add_argument("--bwd", default=BWD, help="backward configurations, ';' separated")
    ap.add_argument("--flex", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    N, H, D = args.seq, 16, 128
    B = max(1, 32768 // N)
    rows = []
    for name in args.patterns.split(","):
        g = torch.Generator().manual_seed(0)
        kern = attnc.compile(PATTERNS[name])
        inputs = make_inputs(name, B, H, N, g)
        q, k, v, dout = (torch.randn(B, H, N, D, generator=g).to("cuda", torch.bfloat16) for _ in range(4))
        want = kern(q, k, v, **inputs).float()
        qr, kr, vr = (x.detach().requires_grad_() for x in (q, k, v))

        def fb():
            for x in (qr, kr, vr):
                x.grad = None
            kern(qr, kr, vr, **inputs).backward(dout)

        for kind, texts, env in (("fwd", args.fwd, "ATTNC_FWD_CONFIG"), ("f+b", args.bwd, "ATTNC_BWD_CONFIG")):
            for text in texts.split(";"):
                row = {"pattern": name, "kind": kind, "config": text, "N": N, "B": B}
                try:
                    with mock.patch.dict(os.environ, {} if text == "default" else {env: text}):
                        if kind == "fwd":
                            got = kern(q, k, v, **inputs).float()
                            row["rel_err"] = ((got - want).norm() / want.norm()).item()
                            row["ms"] = time_ms(lambda: kern(q, k, v, **inputs))
                        else:
                            row["ms"] = time_ms(fb)
                except Exception as e:  # noqa: BLE001 -- a configuration that does not launch is a result
                    row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                print(json.dumps(row), flush=True)
                rows.append(row)
        if args.flex:
            mask_mod, score_mod, bh = flex_fns(name, inputs, B, N)
            bm = _create_block_mask(mask_mod, bh, N, N, "cuda")
            flex = _flex()
            with torch.no_grad():
                t_f = time_ms(lambda: flex(q, k, v, score_mod=score_mod, block_mask=bm))

            def flex_fb():
                for x in (qr, kr, vr):
                    x.grad = None
                flex(qr, kr, vr, score_mod=score_mod, block_mask=bm).backward(dout)
            for kind, ms in (("fwd", t_f), ("f+b", time_ms(flex_fb))):
                rows.append({"pattern": name, "kind": kind, "config": "flex", "N": N, "B": B, "ms": ms})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"gather_stages_{N}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"\nB={B} H={H} N={N} D={D} bf16, median ms")
    for r in rows:
        note = r.get("error", "") or (f"err {r['rel_err']:.1e}" if "rel_err" in r else "")
        print(f"{r['pattern']:18s} {r['kind']:4s} {r['config']:18s} {r.get('ms', float('nan')):8.3f}  {note}")


if __name__ == "__main__":
    main()
