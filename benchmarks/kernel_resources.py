"""Registers and spills of attnc's generated kernels for a Hopper GPU, without a GPU.

    python3 benchmarks/kernel_resources.py examples/causal.attn fwd,128,128,8,3,tma bwd,64,64,4,2,tma

Each configuration is ``kind,block_m,block_n,num_warps,num_stages,tma|no`` (kind ``fwd`` or ``bwd``;
``bwd`` compiles both backward kernels with the same tiles). The kernels are compiled by this
machine's Triton for an sm_90 target (``triton.compile`` with a ``GPUTarget``, using the ptxas that
ships with Triton), and ``cuobjdump --dump-resource-usage`` reports registers per thread (REG) and
bytes of stack per thread (STACK: spilled registers and local arrays), and Triton's shared-memory
allocation per program (SMEM, bytes; the H100/H200 limit is 232448). Needs no CUDA device, so it
can guide experiments before the GPU time is spent; the Triton version here may differ from the GPU
machine's (record both; `pip install triton==<the GPU's version>` into a side directory and put it first
on PYTHONPATH to compile with the GPU's own).

``--loops`` also disassembles each kernel (``cuobjdump --dump-sass``) and prints, for every loop (a branch
back to an earlier address) that no smaller loop overlaps, its SASS instructions per warp and iteration and the counts of the kinds
that matter for attention: matrix (HGMMA), exp2 (MUFU.EX2), float arithmetic, selects, conversions, async
copies (LDGSTS), bulk tensor copies (UTMALDG) and spill accesses (LDL/STL): the tile loops, masked and
full. benchmarks/NOTES.md item 45 read the dK/dV kernel's row-vector loads this way.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FLOAT_ROWS = ("LSE", "LSE2", "DELTA", "DLSE")
INT_LISTS = ("QPOS", "KPOS", "FULL_RUN", "FULL_IDX", "FULL_CNT", "PART_IDX", "PART_CNT", "GUARD_PTR")


def signature(fn, constexprs: dict, dtype: str) -> dict:
    """Argument types of a generated kernel, from attnc's naming conventions."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in FLOAT_ROWS:
            sig[name] = "*fp32"
        elif name in INT_LISTS:
            sig[name] = "*i32"
        elif name.endswith("_ptr"):                 # a runtime input (int64 ids assumed)
            sig[name] = "*i64"
        elif name.isupper():                        # Q, K, V, O, DO, DQ, ...
            sig[name] = f"*{dtype}"
        elif name in ("sm_scale", "qk_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def cuobjdump(compiled, flag: str) -> str:
    """The output of Triton's own cuobjdump with ``flag`` on a compiled kernel's cubin."""
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)


def resource_usage(compiled) -> str:
    out = cuobjdump(compiled, "--dump-resource-usage")
    fields = next((line.split() for line in out.splitlines() if "REG:" in line), [])
    return " ".join(x for x in fields if x.startswith(("REG", "STACK"))) or out.strip()[-200:]


LOOP_KINDS = ("HGMMA", "MUFU.EX2", "FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "F2FP", "LDGSTS", "UTMALDG", "LDS",
              "LDL", "STL")


def sass_loops(sass: str) -> list[tuple[int, int, dict]]:
    """(first address, last address, {kind: count, "all": instructions}) of each loop of a SASS listing:
    the instructions from a backward branch's target to the branch."""
    import re
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)([^;]*);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2), m.group(3)))
    loops = []
    for i, (addr, op, rest) in enumerate(ins):
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target is None or int(target.group(1), 16) >= addr:
            continue
        lo = int(target.group(1), 16)
        body = [o for a, o, _ in ins[:i + 1] if a >= lo]
        counts = {"all": len(body)}
        for kind in LOOP_KINDS:
            counts[kind] = sum(1 for o in body if o == kind or o.startswith(kind + "."))
        loops.append((lo, addr, counts))
    return sorted(loops, key=lambda x: x[2]["all"])


def print_loops(compiled, label: str):
    loops = [x for x in sass_loops(cuobjdump(compiled, "--dump-sass")) if x[2]["all"] >= 8]      # not the spin loops of barrier waits
    for lo, hi, counts in loops:
        if any(lo2 <= hi and lo <= hi2 and c2["all"] < counts["all"] for lo2, hi2, c2 in loops):
            continue                        # innermost loops only (no smaller loop overlaps): the tile loops
        kinds = " ".join(f"{k}={counts[k]}" for k in LOOP_KINDS if counts[k])
        print(f"    {label} loop {lo:#x}-{hi:#x}: {counts['all']} instructions; {kinds}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pattern", help="an .attn file or source")
    ap.add_argument("configs", nargs="+", help="kind,block_m,block_n,warps,stages,tma|no")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--wide-rows", action="store_true", help="64-bit row offsets (as for tensors past 2^31 elements)")
    ap.add_argument("--residue", type=int, default=0, help="permuted kernels: rows from residue classes mod this")
    ap.add_argument("-p", "--param", action="append", default=[], help="NAME=VALUE pattern parameter")
    ap.add_argument("--loops", action="store_true", help="SASS instructions per loop iteration, by kind")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import attnc
    params = dict(p.split("=", 1) for p in args.param)
    kern = attnc.compile(args.pattern, **{k: int(v) if v.lstrip("-").isdigit() else v for k, v in params.items()})
    target = GPUTarget("cuda", args.arch, 32)
    print(f"triton {triton.__version__}, sm_{args.arch}, head dim {args.dim}, {args.dtype}: {kern!r}")
    for spec in args.configs:
        kind, bm, bn, warps, stages, tma = spec.split(",")
        if kind == "fwd":
            module, kernels = kern._forward_module(), [("attnc_fwd", {"REVERSE": True, "POS_SCALE": True})]
        else:
            # As launched with one layout for both kernels (always for rows in order): lse2 and delta kept in
            # the kernels' row order, read by descriptors where the configuration takes them.
            module, kernels = kern._backward_module(), [("attnc_bwd_dq", {"HAS_DLSE": False, "FULL_RUNS": False, "SORTED_ROWS": True}),
                                                 ("attnc_bwd_dkdv", {"FULL_RUNS": False, "ROW_TMA": tma == "tma",
                                                                     "SORTED_ROWS": True})]
        for name, extra in kernels:
            fn = getattr(module, name)
            consts = dict(BLOCK_M=int(bm), BLOCK_N=int(bn), HEAD_DIM=args.dim, HEAD_DIM_V=args.dim,
                          DOT_PRECISION="tf32", USE_TMA=tma == "tma", WIDE_ROWS=args.wide_rows,
                          RESIDUE=args.residue, PADDED=False, GUARD=-1, **extra)
            try:
                compiled = triton.compile(ASTSource(fn=fn, signature=signature(fn, consts, args.dtype),
                                                    constexprs=consts),
                                          target=target, options={"num_warps": int(warps), "num_stages": int(stages)})
                smem = getattr(compiled.metadata, "shared", None)
                print(f"{spec:22s} {name:16s} {resource_usage(compiled)} SMEM:{smem}", flush=True)
                if args.loops:
                    print_loops(compiled, name)
            except Exception as exc:  # noqa: BLE001 - report and go on with the next configuration
                print(f"{spec:22s} {name:16s} failed: {type(exc).__name__}: {str(exc)[:160]}", flush=True)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)     # kernels must be JIT functions, not interpreted ones
    main()
