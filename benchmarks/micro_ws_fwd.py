"""Does Triton's Hopper warp specialization help a causal attention forward? A minimal kernel, A/B.

    python3 benchmarks/micro_ws_fwd.py --offline                      # compile for sm_90 here, no GPU
    python3 benchmarks/micro_ws_fwd.py --seqs 8192,32768 --out $OUT/ws  # on the GPU: check, then time

Triton's Hopper pipeline (3.6) runs its own warp-specialization pass (``add_hopper_warpspec``) on loops marked
``tl.range(..., warp_specialize=True)``, but only in kernels of **4 warps** with no ``if`` that has an ``else``:
it then makes one producer warpgroup (the TMA loads) and two consumer warpgroups that split the tile's rows
(data partitioning), 12 warps in all, synchronized by mbarriers instead of the CTA-wide barriers every
iteration that keep a plain 8-warp kernel's two warpgroups in lockstep (NOTES item 78). NOTES item 34 had
tried the switch on attnc's 8-warp forward, where the pass never ran.

This script times one causal forward, written out by hand (128-row query blocks, 128-key tiles, tensor
descriptors), in the variants ``--variants`` names (``VARIANTS``): ``plain8`` (8 warps, no specialization, the
diagonal tile after the loop: attnc's default shape), ``*_maskall`` (the diagonal as the loop's last iteration,
the causal mask applied to every tile), ``ws4_bias`` (4 warps, specialized, the diagonal's mask an additive tile
made once and added where the tile index matches), ``*_host`` (K and V descriptors made on the host),
``ws4_nodiag`` (no diagonal tile: wrong output, a bound), beside SDPA (cuDNN) and attnc's causal forward in the
same process; every output is compared with SDPA's. ``--offline`` compiles each variant for sm_90 and reports
whether the specialization happened (the TTGIR holds ``ttg.warp_specialize``), threads per program, registers
and the loops' SASS counts. NOTES item 79, RESULTS runs 140-141.
"""
import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

VARIANTS = {          # name: (num_warps, num_stages, warp_specialize, diagonal tile, lse store[, host descriptors])
    "plain8": (8, 3, False, True, True),
    "plain4": (4, 3, False, True, True),
    "ws4": (4, 2, True, True, True),
    "ws4s3": (4, 3, True, True, True),
    "ws4_nodiag": (4, 2, True, False, True),
    "ws4_diagloop": (4, 2, True, 2, True),
    "ws4_maskall": (4, 2, True, 3, True),
    "ws4_diagfirst": (4, 2, True, 4, True),
    "ws4_bias": (4, 2, True, 5, True),
    "ws4_bias_host": (4, 2, True, 5, True, True),
    "plain8_host": (8, 3, False, 1, True, True),
    "ws4s3_maskall": (4, 3, True, 3, True),
    "plain8_maskall": (8, 3, False, 3, True),
    "ws4_bare": (4, 2, True, False, False),
}


@triton.jit
def _causal_fwd(Q, K, V, O, LSE, KD, VD, n, qk_scale,
                BLOCK: tl.constexpr, D: tl.constexpr, WS: tl.constexpr, DIAG: tl.constexpr,
                STORE_LSE: tl.constexpr, HOST: tl.constexpr):
    # One program per (query block, batch x head), the longest (last) query blocks first. Rows of every
    # (batch, head) are contiguous: the tensors are [B * H * n, D].
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    row0 = tl.program_id(1) * n
    q_desc = tl.make_tensor_descriptor(Q, shape=[row0 + n, D], strides=[D, 1], block_shape=[BLOCK, D])
    if HOST:        # made on the host over every head's rows
        k_desc = KD
        v_desc = VD
    else:
        k_desc = tl.make_tensor_descriptor(K, shape=[row0 + n, D], strides=[D, 1], block_shape=[BLOCK, D])
        v_desc = tl.make_tensor_descriptor(V, shape=[row0 + n, D], strides=[D, 1], block_shape=[BLOCK, D])
    o_desc = tl.make_tensor_descriptor(O, shape=[row0 + n, D], strides=[D, 1], block_shape=[BLOCK, D])
    start_m = pid_m * BLOCK
    q = q_desc.load([row0 + start_m, 0])
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, D], tl.float32)
    if DIAG == 4:       # the diagonal tile first, before the specialized loop
        m_i, l_i, acc = _diagonal(q, k_desc, v_desc, row0, start_m, qk_scale, m_i, l_i, acc, BLOCK)
    # Full tiles: every key block before the diagonal one.
    # DIAG 3: the diagonal tile is the loop's last iteration, and every iteration applies the causal mask.
    # DIAG 5: the same, the mask a bias tile made once (0 or -1e30) times a flag that is 1 on the diagonal.
    rows = tl.arange(0, BLOCK)
    diag_bias = tl.where(rows[None, :] <= rows[:, None], 0.0, -1.0e30)
    for start_n in tl.range(0, start_m + (BLOCK if DIAG >= 3 else 0), BLOCK, warp_specialize=WS):
        k = k_desc.load([row0 + start_n, 0])
        s = tl.dot(q, k.T)
        if DIAG == 3:
            s = tl.where(start_n + rows[None, :] <= start_m + rows[:, None], s, float("-inf"))
        if DIAG == 5:
            s = s + diag_bias * (start_n == start_m).to(tl.float32)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = v_desc.load([row0 + start_n, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    # The diagonal tile, masked.
    if DIAG == 1:
        m_i, l_i, acc = _diagonal(q, k_desc, v_desc, row0, start_m, qk_scale, m_i, l_i, acc, BLOCK)
    if DIAG == 2:       # as a loop of one iteration, specialized too
        for start_n in tl.range(start_m, start_m + BLOCK, BLOCK, warp_specialize=WS):
            m_i, l_i, acc = _diagonal(q, k_desc, v_desc, row0, start_n, qk_scale, m_i, l_i, acc, BLOCK)
    o_desc.store([row0 + start_m, 0], (acc / l_i[:, None]).to(q.dtype))
    if STORE_LSE:
        rows = tl.arange(0, BLOCK)
        tl.store(LSE + row0 + start_m + rows, m_i + tl.math.log2(l_i))


@triton.jit
def _diagonal(q, k_desc, v_desc, row0, start_m, qk_scale, m_i, l_i, acc, BLOCK: tl.constexpr):
    k = k_desc.load([row0 + start_m, 0])
    s = tl.dot(q, k.T)
    rows = tl.arange(0, BLOCK)
    s = tl.where(rows[:, None] >= rows[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = v_desc.load([row0 + start_m, 0])
    acc = tl.dot(p.to(v.dtype), v, acc)
    return m_new, l_i, acc


def launch(q, k, v, variant: str, run=True):
    """Causal attention of q, k, v [B, H, n, D] (n a multiple of 128) with ``variant``'s kernel; with run False
    the kernel's arguments (args, kwargs) instead."""
    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor
    warps, stages, ws, diag, lse_store, *host = VARIANTS[variant]
    host = bool(host and host[0])
    B, H, n, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty(B * H * n, device=q.device, dtype=torch.float32)
    kd = vd = None
    if host:
        kd, vd = (TensorDescriptor(t, [B * H * n, D], [D, 1], [128, D]) for t in (k, v))
    args = (q, k, v, o, lse, kd, vd, n, 1.4426950408889634 / math.sqrt(D))
    kwargs = dict(BLOCK=128, D=D, WS=ws, DIAG=int(diag), STORE_LSE=lse_store, HOST=host, num_warps=warps,
                  num_stages=stages)
    if not run:
        return args, kwargs
    _causal_fwd[(n // 128, B * H)](*args, **kwargs)
    return o


def offline(args):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kernel_resources import cuobjdump, print_loops, resource_usage
    target = GPUTarget("cuda", 90, 32)
    print(f"triton {triton.__version__}, sm_90, bf16, D {args.dim}")
    import torch
    from kernel_resources import specialization
    q, k, v = (torch.empty(1, 1, 1024, args.dim, dtype=torch.float16) for _ in range(3))
    for name in args.variants.split(","):
        fargs, fkwargs = launch(q, k, v, name, run=False)
        signature, constexprs, attrs, options = specialization(_causal_fwd, fargs, fkwargs, "bf16")
        try:
            compiled = triton.compile(ASTSource(fn=_causal_fwd, signature=signature, constexprs=constexprs,
                                                attrs=attrs), target=target, options=options)
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"{name}: failed: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        ttgir = compiled.asm["ttgir"]
        specialized = "ttg.warp_specialize" in ttgir
        threads = compiled.metadata.num_warps * 32
        print(f"{name}: specialized={specialized} num_warps(metadata)={compiled.metadata.num_warps} "
              f"threads={threads} {resource_usage(compiled)} SMEM:{compiled.metadata.shared}")
        print_loops(compiled, name)
        if args.dump:
            Path(args.dump).mkdir(parents=True, exist_ok=True)
            Path(args.dump, f"{name}.ttgir").write_text(ttgir)
            Path(args.dump, f"{name}.sass").write_text(cuobjdump(compiled, "--dump-sass"))


def on_gpu(args):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import attnc
    from attnc.bench import effective_tflops, env_info, time_ms
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    env = env_info()
    print(json.dumps(env))
    causal = attnc.compile("pattern causal() {\n    mask k <= q\n}\n")
    rows = []
    for n in (int(x) for x in args.seqs.split(",")):
        B, H, D = max(1, args.tokens // n), args.heads, args.dim
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        fns = {"attnc": lambda: causal(q, k, v)}
        for name in args.variants.split(","):
            fns[name] = (lambda name=name: launch(q, k, v, name))
        errors = {}
        for name, fn in list(fns.items()):
            try:
                errors[name] = (fn().float() - ref.float()).abs().max().item()
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"n={n} {name}: failed: {type(exc).__name__}: {str(exc)[:300]}")
                fns.pop(name)
                continue
            # the *_nodiag / *_bare variants skip the diagonal tile: wrong output, timed as a bound
            print(f"n={n} {name}: max |err| vs SDPA {errors[name]:.3g}")

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        fns["cudnn"] = cudnn
        for rnd in range(args.repeat):
            for name, fn in fns.items():
                for _ in range(3):
                    fn()
                ms = time_ms(fn, warmup=200, rep=args.rep)
                tf = effective_tflops(B, H, n, n, D, 0.5 + 0.5 / n, ms)
                row = dict(n=n, name=name, round=rnd, ms=ms, tflops=tf, err=errors.get(name, 0.0))
                rows.append(row)
                print(json.dumps(row), flush=True)
        if out:
            (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print("\n| n | kernel | ms (rounds) | TFLOP/s | max err |")
    print("|---|---|---|---|---|")
    for n in sorted({r["n"] for r in rows}):
        for name in dict.fromkeys(r["name"] for r in rows if r["n"] == n):
            rs = [r for r in rows if r["n"] == n and r["name"] == name]
            times = " / ".join(f"{r['ms']:.3f}" for r in rs)
            print(f"| {n} | {name} | {times} | {max(r['tflops'] for r in rs):.1f} | {rs[0]['err']:.3g} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--offline", action="store_true", help="compile for sm_90 without a GPU and report")
    ap.add_argument("--variants", default="plain8,plain8_host,ws4_maskall,ws4_bias,ws4_bias_host,ws4_nodiag")
    ap.add_argument("--seqs", default="8192,32768")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--rep", type=int, default=300)
    ap.add_argument("--dump", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.offline:
        offline(args)
    else:
        on_gpu(args)


if __name__ == "__main__":
    main()
