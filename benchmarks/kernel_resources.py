"""Registers and spills of attnc's generated kernels for a Hopper GPU, without a GPU.

    python3 benchmarks/kernel_resources.py examples/causal.attn fwd,128,128,8,3,tma bwd,64,64,4,2,tma

Each configuration is ``kind,block_m,block_n,num_warps,num_stages,tma|no`` (kind ``fwd`` or ``bwd``;
``bwd`` compiles both backward kernels with the same tiles). The kernels are compiled by this
machine's Triton for an sm_90 target (``triton.compile`` with a ``GPUTarget``, using the ptxas that
ships with Triton), and ``cuobjdump --dump-resource-usage`` reports registers per thread (REG) and
bytes of stack per thread (STACK: spilled registers and local arrays), and Triton's shared-memory
allocation per program (SMEM, bytes; the H100/H200 limit is 232448). Needs no CUDA device, so it
can guide experiments before the GPU time is spent; the Triton version here may differ from the GPU
machine's (record both).
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


def resource_usage(compiled) -> str:
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    fields = next((line.split() for line in out.splitlines() if "REG:" in line), [])
    return " ".join(x for x in fields if x.startswith(("REG", "STACK"))) or out.strip()[-200:]


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
            module, kernels = kern._backward_module(), [("attnc_bwd_dq", {"HAS_DLSE": False, "FULL_RUNS": False, "SORTED_ROWS": False}),
                                                 ("attnc_bwd_dkdv", {"FULL_RUNS": False, "ROW_TMA": tma == "tma",
                                                                     "SORTED_ROWS": False})]
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
            except Exception as exc:  # noqa: BLE001 - report and go on with the next configuration
                print(f"{spec:22s} {name:16s} failed: {type(exc).__name__}: {str(exc)[:160]}", flush=True)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)     # kernels must be JIT functions, not interpreted ones
    main()
