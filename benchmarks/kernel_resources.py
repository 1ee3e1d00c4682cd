"""Registers and spills of attnc's generated kernels for a Hopper GPU, without a GPU.

    python3 benchmarks/kernel_resources.py examples/causal.attn fwd,128,128,8,3,tma bwd,64,64,4,2,tma
    python3 benchmarks/kernel_resources.py hash8_causal fwd,64,64,4,3,tma --seq 8192 --loops

PATTERN is an .attn file, a source, or a benchmark pattern of ``bench_all.py`` (its runtime inputs drawn as
the anchors draw them; a file's inputs are random, see ``attnc.bench.make_random_inputs``). Each configuration
is ``kind,`` and a configuration as ``ATTNC_FWD_CONFIG`` / ``ATTNC_BWD_CONFIG`` take it
(``attnc.launch.parse_config``: ``block_m,block_n,num_warps,num_stages`` with an optional ``,tma``; kind
``fwd`` or ``bwd``, whose configuration may give the dK/dV kernel its own after a ``/``).

The kernels are compiled exactly as a call would launch them: attnc's launch code runs on CPU tensors of
the benchmark's shape (``--seq``, ``--batch``, ``--heads``, ``--dim``), with Triton's launch intercepted,
and every launch is specialized as Triton's JIT specializes it (integer arguments equal to 1 become
constants, arguments and pointers divisible by 16 carry that fact, so unit strides vectorize and pointer
loads pipeline). Row-offset widths, residue classes, layout variants and tensor-descriptor choices are the
ones that call takes. The target is sm_90 (``triton.compile`` with a ``GPUTarget`` and the ptxas that ships with
Triton); ``cuobjdump --dump-resource-usage`` reports registers per thread (REG) and bytes of stack per thread
(STACK: spilled registers and local arrays), and Triton's shared-memory allocation per program (SMEM, bytes;
the H100/H200 limit is 232448). The Triton version here may differ from the GPU machine's (record both;
``pip install triton==<the GPU's version>`` into a side directory and put it first on PYTHONPATH to compile
with the GPU's own).

``--loops`` also disassembles each kernel (``cuobjdump --dump-sass``) and prints, for every loop (a branch
back to an earlier address) that no smaller loop overlaps, its SASS instructions per warp and iteration and the counts of the kinds
that matter for attention: matrix (HGMMA), exp2 (MUFU.EX2), float arithmetic, selects, conversions, async
copies (LDGSTS), bulk tensor copies (UTMALDG) and spill accesses (LDL/STL): the tile loops, masked and
full. benchmarks/NOTES.md items 45 and 48 read the kernels this way.

``--dump DIR`` writes each kernel's TTGIR, PTX and SASS to DIR (``<kind>_<configuration>_<launch>_<kernel>.*``):
a loop with branches in it is counted above on every path at once, so item 68 walked its paths in the SASS.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

KERNELS = ("attnc_fwd", "attnc_bwd_dq", "attnc_bwd_dkdv")


def captured_launches(run_call) -> list[tuple]:
    """``(JIT function, positional args, keyword args)`` of each attention kernel launch ``run_call()`` makes,
    none of them run (Triton's ``JITFunction.run`` is intercepted for attnc's kernels, and attnc.fastlaunch is
    told to leave every launch to it)."""
    from triton.runtime.jit import JITFunction
    calls = []
    original = JITFunction.run
    os.environ["ATTNC_FAST_LAUNCH"] = "0"
    # The launches are made on CPU tensors, where launch.tail_programs gives 0; the H200 (132 SMs) launches 264.
    os.environ.setdefault("ATTNC_TAIL_PROGRAMS", "264")

    def run(self, *args, grid, warmup, **kwargs):
        if self.__name__ not in KERNELS:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        calls.append((self, args, kwargs))
        return None

    JITFunction.run = run
    try:
        run_call()
    finally:
        JITFunction.run = original
    return calls


def specialization(fn, args: tuple, kwargs: dict, dtype: str):
    """(signature, constexprs, attrs, options) of one launch, as Triton's JIT derives them; float16 tensors
    (the CPU stand-ins) are typed ``dtype``."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = fn.signature.bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for i, (param, (name, value)) in enumerate(zip(fn.params, bound.arguments.items())):
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        ty, attr = native_specialize_impl(BaseBackend, value, False, True, True)[:2]
        if ty == "constexpr":
            signature[name], constexprs[name] = "constexpr", value
            continue
        signature[name] = ty.replace("fp16", dtype)
        if attr:
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    return signature, constexprs, attrs, options


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


def _kernel_and_inputs(pattern: str, params: dict, *, seq: int, batch: int, heads: int):
    """The kernel of PATTERN and its runtime inputs on the CPU (a benchmark pattern's as the anchors draw them)."""
    import bench_all
    from attnc.bench import make_random_inputs
    spec = bench_all.SPEC_BY_NAME.get(pattern)
    if spec is not None:
        res = bench_all.resolve_kernel(spec, spec.params, ROOT / "examples", "cpu", verify_n=256)
        canon = bench_all.anchor_inputs(seq, batch, heads, "cpu")
        return res.kern, bench_all.fit_inputs(res.kern, spec, canon, res.int_dtype)
    import attnc
    kern = attnc.compile(pattern, **params)
    return kern, make_random_inputs(kern, seq=seq, batch=batch, heads=heads, device="cpu")


def launches_of(kern, inputs: dict, kind: str, cfg, *, seq: int, batch: int, heads: int, dim: int) -> list[tuple]:
    """The captured launches of one forward (``kind`` 'fwd') or backward call with configuration ``cfg``."""
    import torch
    from attnc.launch import launch_backward, launch_forward
    from attnc.ops import _call_sizes
    q, k, v = (torch.zeros(batch, heads, seq, dim, dtype=torch.float16) for _ in range(3))
    sizes = _call_sizes(kern, q, k, v, inputs)
    scale = dim ** -0.5
    if kind == "fwd":
        return captured_launches(lambda: launch_forward(kern, q, k, v, scale=scale, sizes=sizes, inputs=inputs,
                                                        config=cfg))
    out, dout = torch.zeros_like(q), torch.zeros_like(q)
    lse = torch.zeros(batch, heads, seq)
    return captured_launches(lambda: launch_backward(kern, q, k, v, out, lse, dout, None, scale=scale, sizes=sizes,
                                                     inputs=inputs, config=cfg))


def _variant_label(calls: list, index: int) -> str:
    """The name of a captured launch, with the constexprs that tell it from other launches of its kernel."""
    fn, _, kwargs = calls[index]
    others = [kw for f, _, kw in calls if f is fn and kw is not kwargs]
    differing = [f"{k}={kwargs[k]}" for k in sorted(kwargs) if any(kw.get(k) != kwargs[k] for kw in others)]
    return fn.__name__ + (f"[{','.join(differing)}]" if differing else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pattern", help="an .attn file, a source, or a bench_all.py pattern name (e.g. hash8_causal)")
    ap.add_argument("configs", nargs="+", help="kind,block_m,block_n,warps,stages[,tma][/dK-dV tiles]")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=None, help="default: 32768 tokens in all (the benchmark's)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("-p", "--param", action="append", default=[], help="NAME=VALUE pattern parameter")
    ap.add_argument("--loops", action="store_true", help="SASS instructions per loop iteration, by kind")
    ap.add_argument("--dump", default=None, help="directory to write each kernel's TTGIR, PTX and SASS to")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from attnc.launch import parse_config
    batch = args.batch or max(1, 32768 // args.seq)
    params = dict(p.split("=", 1) for p in args.param)
    kern, inputs = _kernel_and_inputs(args.pattern, {k: int(v) if v.lstrip("-").isdigit() else v
                                                     for k, v in params.items()},
                                      seq=args.seq, batch=batch, heads=args.heads)
    target = GPUTarget("cuda", args.arch, 32)
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.dtype}, B={batch} H={args.heads} N={args.seq} "
          f"D={args.dim}: {kern!r}")
    for spec in args.configs:
        kind, _, text = spec.partition(",")
        cfg = parse_config(text, spec)
        calls = launches_of(kern, inputs, kind, cfg, seq=args.seq, batch=batch, heads=args.heads, dim=args.dim)
        for i, (fn, fargs, fkwargs) in enumerate(calls):
            name = _variant_label(calls, i)
            try:
                signature, constexprs, attrs, options = specialization(fn, fargs, fkwargs, args.dtype)
                compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                          target=target, options=options)
                smem = getattr(compiled.metadata, "shared", None)
                print(f"{spec:22s} {name:16s} {resource_usage(compiled)} SMEM:{smem}", flush=True)
                if args.loops:
                    print_loops(compiled, fn.__name__)
                if args.dump:
                    stem = Path(args.dump) / f"{kind}_{text.replace(',', '_').replace('/', '-')}_{i}_{fn.__name__}"
                    stem.parent.mkdir(parents=True, exist_ok=True)
                    stem.with_suffix(".ttgir").write_text(compiled.asm["ttgir"])
                    stem.with_suffix(".ptx").write_text(compiled.asm["ptx"])
                    stem.with_suffix(".sass").write_text(cuobjdump(compiled, "--dump-sass"))
            except Exception as exc:  # noqa: BLE001 - report and go on with the next launch
                print(f"{spec:22s} {name:16s} failed: {type(exc).__name__}: {str(exc)[:160]}", flush=True)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)     # kernels must be JIT functions, not interpreted ones
    main()
