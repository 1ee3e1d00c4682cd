"""Speedup of attnc's layout transforms over dense causal FlashAttention vs sequence length.

Reproduces the qualitative result of Pagliardini et al. 2023 (hash-sparse and QK-dropping attention get
faster than dense causal attention as sequences grow): for several hash-bucket counts and key drop
rates, forward time of dense causal SDPA (flash backend) divided by attnc's forward time, bf16, D=64,
H=8, batch x seq = 32k tokens. Each attnc output is checked against SDPA with the explicit mask first
(at the smallest length). Writes sparsity_speedup.json and sparsity_speedup.png to --out.

    python3 benchmarks/sparsity_figure.py --seqs 2048,4096,8192,16384,32768 --out $OUT
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import attnc  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="2048,4096,8192,16384,32768")
    ap.add_argument("--buckets", default="4,8,16")
    ap.add_argument("--drops", default="0.25,0.5,0.75")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    dev = "cuda"
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    hash_k = attnc.compile(os.path.join(ROOT, "examples/hash_buckets.attn"))
    drop_k = attnc.compile(os.path.join(ROOT, "examples/dropped_keys.attn"))
    results = {"seqs": [], "series": {}}
    seqs = [int(s) for s in args.seqs.split(",")]
    for n in seqs:
        b, h, d = max(1, args.tokens // n), args.heads, args.dim
        g = torch.Generator(device=dev).manual_seed(n)
        q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            dense = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True), warmup=25, rep=100, return_mode="median")
        results["seqs"].append(n)
        configs = [(f"hash {nb} buckets", hash_k, lambda nb=nb: {
            "qb": torch.randint(0, nb, (b, h, n), device=dev, generator=g),
            "kb": None}) for nb in map(int, args.buckets.split(","))]
        configs += [(f"{int(round(p * 100))}% keys dropped", drop_k, lambda p=p: {
            "keep": torch.rand(b, h, n, device=dev, generator=g) >= p}) for p in map(float, args.drops.split(","))]
        for name, kern, make in configs:
            inputs = make()
            if "kb" in inputs:
                inputs["kb"] = inputs["qb"]          # same hash for queries and keys (shared-QK style)
            out = kern(q, k, v, **inputs)
            if n == seqs[0]:
                mask = kern.mask(n, n, b, h, **inputs)
                ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                                       attn_mask=mask)
                ref = torch.where(mask.any(-1, keepdim=True), ref, torch.zeros_like(ref))
                err = ((out.float() - ref).norm() / ref.norm()).item()
                assert err < 2e-2, f"{name}: relative error {err}"
            ms = triton.testing.do_bench(lambda: kern(q, k, v, **inputs), warmup=25, rep=100, return_mode="median")
            results["series"].setdefault(name, []).append(dense / ms)
            print(f"n={n:6d} {name:22s} dense causal {dense:7.3f} ms  attnc {ms:7.3f} ms  speedup {dense / ms:5.2f}x",
                  flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sparsity_speedup.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(args.out, "sparsity_speedup.png"))


def plot(results: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, ys in results["series"].items():
        ax.plot(results["seqs"], ys, marker="o", linestyle="-" if name.startswith("hash") else "--", label=name)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("speedup over dense causal FlashAttention (fwd)")
    ax.set_title("attnc layout transforms: hash-bucket sort and key compaction (bf16, H200)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--plot-json":
        plot(json.load(open(sys.argv[2])), sys.argv[3])
    else:
        main()
