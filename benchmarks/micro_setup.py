"""Tiles of the setup's list and classifier kernels, timed on the GPU (benchmarks/NOTES.md item 32).

    python3 benchmarks/micro_setup.py [--seq 32768] [--patterns hash8_causal]

For each pattern, builds a call's tile classes as the benchmarks do (bench_all's inputs, the default forward
tiles), then times ``attnc.device_setup.tile_lists`` (forward and transposed) and the generated classifier
under each (rows per program, columns per step, warps) of a small grid, replayed as CUDA graphs
(``triton.testing.do_bench_cudagraph``: device time without the host's launch overhead). Prints the fastest
configurations first.
"""
import argparse
import itertools
import sys
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_all  # noqa: E402
from attnc import device_setup  # noqa: E402
from attnc.launch import forward_config, prefers_small_tiles  # noqa: E402
from attnc.plan import layout_transform, setup_shape  # noqa: E402
from attnc.validate import check_inputs  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--patterns", default="hash8_causal")
    ap.add_argument("--tokens", type=int, default=32768)
    args = ap.parse_args()
    n = args.seq
    B, H, D = max(1, args.tokens // n), 16, 128
    for name in args.patterns.split(","):
        spec = bench_all.SPEC_BY_NAME[name]
        res = bench_all.resolve_kernel(spec, spec.params, ROOT / "examples", "cuda")
        kern = res.kern
        inputs = bench_all.fit_inputs(kern, spec, bench_all.anchor_inputs(n, B, H, "cuda"), res.int_dtype)
        cfg = forward_config(D, D, torch.device("cuda"), torch.bfloat16, sparse=prefers_small_tiles(kern, n, n))
        sizes = check_inputs(kern.ir, inputs, batch=B, heads=H, n_q=n, n_k=n)
        module = kern._module("setup")
        transform = layout_transform(kern.ir.mask)

        def status():
            return device_setup.plan_tiles(module, kern.ir, transform, shape=setup_shape(kern.ir, B, H), batch=B,
                                           heads=H, n_q=n, n_k=n, block_m=cfg.block_m, block_n=cfg.block_n,
                                           sizes=sizes, inputs=inputs, device=torch.device("cuda"))[0].status
        st = status()
        print(f"{name} N={n}: status {tuple(st.shape)}, tiles {cfg.block_m}x{cfg.block_n}", flush=True)
        rows = []
        defaults = device_setup.LIST_GROUP, device_setup.LIST_BLOCK_J, device_setup.LIST_WARPS
        for group, block_j, warps in itertools.product((8, 16, 32), (128, 256, 512), (4, 8)):
            device_setup.LIST_GROUP, device_setup.LIST_BLOCK_J, device_setup.LIST_WARPS = group, block_j, warps
            fwd = do_bench_cudagraph(lambda: device_setup.tile_lists(st, False), rep=20)
            bwd = do_bench_cudagraph(lambda: device_setup.tile_lists(st, True), rep=20)
            rows.append((fwd + bwd, f"lists group {group:2d} block_j {block_j:3d} warps {warps}: "
                                    f"{fwd * 1e3:6.1f} us forward, {bwd * 1e3:6.1f} us transposed"))
        device_setup.LIST_GROUP, device_setup.LIST_BLOCK_J, device_setup.LIST_WARPS = defaults
        for t, line in sorted(rows)[:8]:
            print(line, flush=True)
        rows = []
        classify_defaults = device_setup.CLASSIFY_GROUP, device_setup.CLASSIFY_BLOCK_J, device_setup.CLASSIFY_WARPS
        for group, block_j, warps in itertools.product((8, 16, 32), (64, 128, 256), (4, 8)):
            device_setup.CLASSIFY_GROUP, device_setup.CLASSIFY_BLOCK_J = group, block_j
            device_setup.CLASSIFY_WARPS = warps
            ms = do_bench_cudagraph(status, rep=20)
            rows.append((ms, f"setup with classifier group {group:2d} block_j {block_j:3d} warps {warps}: "
                             f"{ms * 1e3:6.1f} us"))
        device_setup.CLASSIFY_GROUP, device_setup.CLASSIFY_BLOCK_J, device_setup.CLASSIFY_WARPS = classify_defaults
        for t, line in sorted(rows)[:8]:
            print(line, flush=True)
        base = do_bench_cudagraph(status, rep=20)
        print(f"setup with the defaults: {base * 1e3:6.1f} us", flush=True)


if __name__ == "__main__":
    main()
