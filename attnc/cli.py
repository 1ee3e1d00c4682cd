"""The ``attnc`` command line (also ``python -m attnc``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import AttncError, InputError

# The longest sequence `attnc show` draws: it evaluates every (query, key) pair, ~2 bytes each while drawn
# (32768: 39 s and 2.3 GB on a 2-core CPU).
SHOW_LIMIT = 32768

DESCRIPTION = """\
attnc compiles attention patterns, written in a small language, into specialized Triton
FlashAttention kernels (forward and backward) exposed as differentiable torch ops.

A pattern file (.attn) says which query may see which key, for example:

    pattern sliding(window: int = 1024) {
        mask causal and window(window)
    }

Commands:
  check     parse and analyze pattern files; report errors with file:line:column
  compile   print the generated Triton kernel, the optimized IR or the execution plan
  show      draw the mask and its block mask (terminal, and PNG with --png)
  cache     inspect or clear the on-disk kernel cache
  bench     time attnc beside torch SDPA and FlexAttention on a GPU
  autotune  search kernel configurations on this GPU and remember the fastest

Run `attnc COMMAND --help` for a command's options. Docs: docs/language.md.
"""


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise AttncError(f"parameter value {text!r} is not an int, float or bool") from None


def _params(items) -> dict:
    out = {}
    for item in items or ():
        if "=" not in item:
            raise AttncError(f"-p expects NAME=VALUE, got {item!r}")
        name, value = item.split("=", 1)
        out[name.strip()] = _parse_value(value.strip())
    return out


def _add_pattern_args(p):
    p.add_argument("file", help="a pattern file (.attn)")
    p.add_argument("-p", "--param", action="append", metavar="NAME=VALUE",
                   help="set a pattern parameter (repeatable), e.g. -p window=256")
    p.add_argument("--pattern", help="which pattern, when the file defines several")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnc", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("check", help="parse and analyze pattern files",
                       description="Parse and analyze each file and every pattern in it (with default "
                                   "parameters). Prints 'ok' per pattern; errors go to stderr, exit code 1.")
    p.add_argument("files", nargs="+", help="pattern files (.attn)")

    p = sub.add_parser("compile", help="print generated kernel source, IR or plan",
                       description="Compile a pattern and print (or write with -o) the generated Triton "
                                   "source, the optimized IR, or the execution plan.")
    _add_pattern_args(p)
    p.add_argument("--emit", choices=("triton", "triton-bwd", "setup", "ir", "plan"), default="triton",
                   help="what to print: the forward kernel (triton, the default), the backward kernels "
                        "(triton-bwd), the per-call setup kernels of patterns with runtime inputs or layout "
                        "transforms (setup), the optimized IR, or the plan")
    p.add_argument("-n", "--seq", type=int, default=4096, help="sequence length for --emit plan (default 4096)")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")

    p = sub.add_parser("show", help="draw the mask and block mask",
                       description="Draw the pattern's mask and its block mask in the terminal, with density "
                                   "figures; --png also writes a picture.")
    _add_pattern_args(p)
    p.add_argument("-n", "--seq", type=int, default=256,
                   help=f"sequence length (default 256, at most {SHOW_LIMIT}: every pair is drawn)")
    p.add_argument("--block", type=int, default=None, help="tile size (default: the kernel's block size)")
    p.add_argument("--png", metavar="OUT.png", help="also write a PNG picture")
    p.add_argument("--color", action="store_true", help="ANSI colors in the terminal picture")
    p = sub.add_parser("cache", help="inspect or clear the kernel cache",
                       description="The on-disk cache of generated kernel sources ($ATTNC_CACHE_DIR, default "
                                   "~/.cache/attnc).")
    p.add_argument("action", choices=("info", "list", "clear"))

    p = sub.add_parser("bench", help="time attnc beside SDPA and FlexAttention (GPU)",
                       description="On a CUDA GPU: check the kernel against FlexAttention, then time forward and "
                                   "forward+backward beside torch SDPA and FlexAttention in the same run; prints "
                                   "effective TFLOP/s (unmasked entries only) and ratios.")
    _add_pattern_args(p)
    p.add_argument("--seq", type=int, action="append", required=True, help="sequence length (repeatable)")
    p.add_argument("--batch", type=int, default=None, help="batch (default: 32768 // seq)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--vs", default="sdpa,flex", help="contenders, comma separated (default sdpa,flex)")

    p = sub.add_parser("autotune", help="search kernel configurations on this GPU (GPU)",
                       description="On a CUDA GPU: time the forward and backward kernels of a pattern under "
                                   "each candidate configuration (tile sizes, warps, pipeline stages), check "
                                   "the fastest against the default configuration and the reference, and store "
                                   "it in $ATTNC_CACHE_DIR/tuning.json, keyed by GPU, pattern, dtype, head dim "
                                   "and sequence-length bucket (next power of two); later runs use it. "
                                   "ATTNC_TUNING=0 ignores stored results.")
    _add_pattern_args(p)
    p.add_argument("--seq", type=int, action="append", required=True,
                   help="sequence length (repeatable: one tuning per length)")
    p.add_argument("--batch", type=int, default=None, help="batch (default: 32768 // seq)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128, help="head dim (default 128)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--kinds", default="fwd,bwd", help="kernels to tune, comma separated (default fwd,bwd)")
    p.add_argument("--max-configs", type=int, default=None, metavar="K",
                   help="time at most K configurations per kernel (the default configuration first)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _cmd_cache(args) -> int:
    from .launch import cache_dir
    root = cache_dir()
    files = sorted((root / "kernels").glob("*.py")) if (root / "kernels").is_dir() else []
    if args.action == "info":
        size = sum(f.stat().st_size for f in files)
        print(f"cache directory: {root}\nkernel sources: {len(files)} ({size / 1024:.1f} KiB)")
    elif args.action == "list":
        for f in files:
            first = f.read_text().split("\n", 3)
            title = first[1].lstrip("# ") if len(first) > 1 else ""
            print(f"{f.name}  {title}")
    else:
        for f in files:
            f.unlink()
        print(f"removed {len(files)} cached kernel source(s) from {root}")
    return 0


def _cmd_bench(args) -> int:
    import torch
    from . import bench
    from .errors import InputError
    from .runtime import compile as compile_pattern
    if not torch.cuda.is_available():
        raise InputError("attnc bench needs a CUDA GPU (timings on the CPU interpreter mean nothing)")
    kern = compile_pattern(Path(args.file), pattern=args.pattern, **_params(args.param))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    rows = []
    for seq in args.seq:
        batch = args.batch or max(1, 32768 // seq)
        inputs = {n: t.cuda() for n, t in kern.example_inputs(seq, seq, batch, args.heads).items()}
        rows.append(bench.bench_pattern(kern, seq=seq, batch=batch, heads=args.heads, dim=args.dim, dtype=dtype,
                                        inputs=inputs, vs=tuple(args.vs.split(",")),
                                        flex_mask_mod=kern.flex_mask_mod(seq, seq, batch, args.heads, **inputs),
                                        name=kern.name))
    print(bench.format_table(rows))
    return 0


def _cmd_autotune(args) -> int:
    import torch
    from . import tuning
    from .errors import InputError
    from .runtime import compile as compile_pattern
    if not torch.cuda.is_available():
        raise InputError("attnc autotune needs a CUDA GPU (timings on the CPU interpreter mean nothing); "
                         "run it on the machine whose GPU the kernels will use")
    kern = compile_pattern(Path(args.file), pattern=args.pattern, **_params(args.param))
    for seq in args.seq:
        report = tuning.autotune(kern, seq, batch=args.batch, heads=args.heads, dim=args.dim, dtype=args.dtype,
                                 kinds=args.kinds, max_configs=args.max_configs, progress=not args.no_progress)
        print(report)
    return 0


def _cmd_check(args) -> int:
    from .analyze import Program, lower_pattern
    status = 0
    for f in args.files:
        try:
            program = Program(Path(f))
            for pat in program.main.patterns:
                # Parameters without a default get a stand-in of their type, so the body is still checked.
                stand_in = {"int": 1, "float": 1.0, "bool": True}
                needed = {p.name: stand_in.get(p.type or "int", 1) for p in pat.params if p.default is None}
                lower_pattern(program, pat.name, needed)
                note = f" (checked with stand-in values for {', '.join(needed)})" if needed else ""
                print(f"{f}: pattern {pat.name}: ok{note}")
            if not program.main.patterns:
                print(f"{f}: ok (no patterns; {len(program.main.defs)} defs)")
        except AttncError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
    return status


def _write(text: str, output: str | None):
    if output:
        Path(output).write_text(text + ("\n" if not text.endswith("\n") else ""))
    else:
        print(text)


def _cmd_compile(args) -> int:
    from .runtime import compile as compile_pattern
    kern = compile_pattern(Path(args.file), pattern=args.pattern, **_params(args.param))
    if args.emit == "ir":
        _write(kern.ir_text, args.output)
    elif args.emit == "plan":
        _write(kern.explain(args.seq, args.seq), args.output)
    elif args.emit == "triton-bwd":
        _write(kern.backward_source, args.output)
    elif args.emit == "setup":
        _write(kern.setup_source or f"# pattern `{kern.name}` has no per-call setup: its tile plan is closed "
                                    f"form (computed inside the kernels)", args.output)
    else:
        _write(kern.source, args.output)
    return 0


def _cmd_show(args) -> int:
    from . import show
    from .runtime import compile as compile_pattern
    kern = compile_pattern(Path(args.file), pattern=args.pattern, **_params(args.param))
    n = args.seq
    if n > SHOW_LIMIT:
        raise InputError(f"attnc show draws every (query, key) pair, up to --seq {SHOW_LIMIT} (--seq {n} would "
                         f"need ~{n * n * 2.2 / 2**30:.0f} GB and minutes); `attnc compile {args.file} --emit "
                         f"plan --seq {n}` describes any length by its tiles")
    inputs = kern.example_inputs(n, n) if kern.inputs else {}
    mask = kern.mask(n, n, **inputs)[0, 0]
    block_m, block_n = (args.block, args.block) if args.block else kern.block_sizes(n_q=n)
    title = f"{kern.name}({', '.join(f'{k}={v}' for k, v in kern.params.items())})  n={n}"
    print(show.render_terminal(mask, block_m, block_n, title=title, color=args.color))
    if kern.inputs:
        print(f"(runtime inputs drawn at random: {', '.join(kern.inputs)})")
    if args.png:
        show.render_png(mask, block_m, block_n, args.png, title=title)
        print(f"wrote {args.png}")
    return 0


COMMANDS = {"check": _cmd_check, "compile": _cmd_compile, "show": _cmd_show, "cache": _cmd_cache,
            "bench": _cmd_bench, "autotune": _cmd_autotune}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except AttncError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
