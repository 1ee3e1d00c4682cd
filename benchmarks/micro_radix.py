"""The setup's radix sort alone, on the GPU: rows and warps per program (benchmarks/NOTES.md item 63).

    python3 benchmarks/micro_radix.py [--seq 32768] [--rows 16]

Sorts ``--rows`` rows of ``--seq`` keys the way the benchmarks' layout transforms do (a bucket side: hash ids
+ 1 below 9, padded to 128-row blocks; a keep flag; a residue mod 2; and 12-bit keys, which take the sorting
path and two passes), with ``attnc.device_setup.radix_sort_perm`` under each chunk size (rows per program) and
the scatter's warps (``SORT_WARPS``). Checks each permutation against ``torch.sort`` and prints device
microseconds per sort, replayed as a CUDA graph (no launch overhead), fastest first per kind.
"""
import argparse
import sys
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from attnc import device_setup  # noqa: E402
from attnc.plan import pad_sorted, padded_rows  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--chunks", default="256,512,1024")
    ap.add_argument("--warps", default="2,4,8")
    args = ap.parse_args()
    n, g = args.seq, torch.Generator(device="cuda").manual_seed(0)
    kinds = {"bucket": (9, 16, (128, padded_rows(n, 128))), "keep": (2, 1, None), "residue2": (2, 1, None),
             "12-bit": (4096, 16, None)}
    for kind, (top, bits, pad) in kinds.items():
        keys = torch.randint(0, top, (1, args.rows, n), device="cuda", generator=g, dtype=torch.int32)
        key_max = keys.max().view(1)
        want = torch.sort(keys, dim=-1, stable=True).indices
        if pad is not None:
            want = pad_sorted(want, keys, *pad)
        rows = []
        for chunk in (int(c) for c in args.chunks.split(",")):
            for warps in (int(w) for w in args.warps.split(",")):
                device_setup.SORT_WARPS = warps

                def sort():
                    return device_setup.radix_sort_perm(keys, bits, chunk=chunk, key_max=key_max, pad=pad)
                ok = torch.equal(sort(), want)
                us = do_bench_cudagraph(sort, rep=50) * 1e3
                rows.append((us, f"{kind:8s} chunk {chunk:4d} warps {warps}: {us:7.1f} us"
                                 f"{'' if ok else '  WRONG PERMUTATION'}"))
        for _, line in sorted(rows):
            print(line, flush=True)


if __name__ == "__main__":
    main()
