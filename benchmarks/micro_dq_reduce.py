"""A five-matmul causal backward: dQ summed by bulk reduce-adds (TMA) from the dK/dV kernel (experiment).

    python3 benchmarks/micro_dq_reduce.py [--seq 8192] [--configs "64,64,4,2;64,128,8,2;64,64,4,2,h"] [--out $OUT]

A configuration is BLOCK_M (queries), BLOCK_N (keys), warps, stages; a trailing ``h`` sums dQ in two halves of D.

attnc's backward runs seven matmuls per tile pair: the dQ kernel recomputes S and dP, which the dK/dV kernel
has already computed (benchmarks/NOTES.md item 42). Item 42 summed dQ inside the dK/dV kernel with one fp32
atomic per element and lost 2x. This script measures the other way to sum it, FlashAttention-3's: each tile's
dQ contribution (BLOCK_M x D fp32) goes to an fp32 accumulator by one bulk reduce-add of a tensor descriptor
(``desc.atomic_add``: the TMA unit adds it in L2, the warps issue one instruction). Dense causal only, rows in
order, B x H heads of N rows, D = 128, bf16; a small preprocess kernel writes lse2 and delta first.

Times, in one process (median of ``do_bench``, ms): attnc's backward (``launch_backward``), this kernel with
and without the dQ reduce (``dkdv only``: the cost the reduce adds), the whole five-matmul backward (zeroing
the accumulator, preprocess, kernel, the scale-and-cast of dQ), and FlexAttention's backward (forward+backward
minus forward). Checks dq, dk, dv against attnc's before timing.
"""
import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import attnc  # noqa: E402
from attnc.launch import launch_backward  # noqa: E402

LOG2E = 1.4426950408889634


@triton.jit
def _prep(O, DO, LSE, LSE2, DELTA, n, BLOCK: tl.constexpr, D: tl.constexpr):
    # delta = rowsum(dO * O) and the log2-domain lse, per row of one (batch x head).
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n
    offs = bh.to(tl.int64) * n * D + rows[:, None] * D + tl.arange(0, D)[None, :]
    o = tl.load(O + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * n + rows, tl.sum(o * do, 1), mask=ok)
    lse = tl.load(LSE + bh.to(tl.int64) * n + rows, mask=ok, other=0.0)
    tl.store(LSE2 + bh.to(tl.int64) * n + rows, lse * 1.4426950408889634, mask=ok)


@triton.jit
def _tile(dk, dv, k, k_lo, k_hi, v, q_desc, do_desc, dq_desc, dq_row, lse_row, delta_row, start_m, start_n, qk_scale,
          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DQ: tl.constexpr):
    q = q_desc.load([start_m, 0])
    do = do_desc.load([start_m, 0])
    lse2 = lse_row.load([start_m])                              # 1-D descriptors (NOTES item 45)
    delta = delta_row.load([start_m])
    st = tl.dot(k, tl.trans(q)) * qk_scale                      # keys x queries, log2 domain
    pt = tl.math.exp2(st - lse2[None, :])
    if MASKED:
        q_pos = start_m + tl.arange(0, BLOCK_M)
        k_pos = start_n + tl.arange(0, BLOCK_N)
        pt = tl.where(q_pos[None, :] >= k_pos[:, None], pt, 0.0)
    dv += tl.dot(pt.to(do.dtype), do)
    dpt = tl.dot(v, tl.trans(do))
    dst = (pt * (dpt - delta[None, :])).to(q.dtype)
    dk += tl.dot(dst, q)
    if DQ == 1:
        # This tile's share of dQ (queries x D, fp32, unscaled), added in L2 by one bulk reduce.
        dq_desc.atomic_add([start_m, 0], tl.dot(tl.trans(dst), k))
    elif DQ == 3:
        # The same in two halves of D (half the registers for the fp32 part): K's halves loaded separately.
        dq_desc.atomic_add([start_m, 0], tl.dot(tl.trans(dst), k_lo))
        dq_desc.atomic_add([start_m, D // 2], tl.dot(tl.trans(dst), k_hi))
    elif DQ == 2:
        # The same by one atomic add per element (item 42's way; Triton's interpreter has no bulk reduce).
        part = tl.dot(tl.trans(dst), k)
        rows = start_m + tl.arange(0, BLOCK_M)
        tl.atomic_add(dq_row + rows[:, None] * D + tl.arange(0, D)[None, :], part, sem="relaxed")
    return dk, dv


@triton.jit
def _bwd5(Q, K, V, DO, DQA, DK, DV, LSE2, DELTA, sm_scale, n, n_kblocks,
          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DQ: tl.constexpr):
    # One program per (batch x head, key block); a head's programs start together, longest (first) blocks first.
    pid = tl.program_id(0)
    bh = pid // n_kblocks
    pid_n = pid % n_kblocks
    start_n = pid_n * BLOCK_N
    base = bh.to(tl.int64) * n * D
    q_desc = tl.make_tensor_descriptor(Q + base, shape=[n, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    do_desc = tl.make_tensor_descriptor(DO + base, shape=[n, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    dq_desc = tl.make_tensor_descriptor(DQA + base, shape=[n, D], strides=[D, 1],
                                        block_shape=[BLOCK_M, D // 2 if DQ == 3 else D])
    kv_desc_k = tl.make_tensor_descriptor(K + base, shape=[n, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    kv_desc_v = tl.make_tensor_descriptor(V + base, shape=[n, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    k = kv_desc_k.load([start_n, 0])
    v = kv_desc_v.load([start_n, 0])
    if DQ == 3:
        half = tl.make_tensor_descriptor(K + base, shape=[n, D], strides=[D, 1], block_shape=[BLOCK_N, D // 2])
        k_lo = half.load([start_n, 0])
        k_hi = half.load([start_n, D // 2])
    else:
        k_lo = k
        k_hi = k
    lse_row = tl.make_tensor_descriptor(LSE2 + bh.to(tl.int64) * n, shape=[n], strides=[1], block_shape=[BLOCK_M])
    delta_row = tl.make_tensor_descriptor(DELTA + bh.to(tl.int64) * n, shape=[n], strides=[1],
                                          block_shape=[BLOCK_M])
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    # Causal: query blocks overlapping the key block's diagonal are masked, the ones after it full.
    m_full = tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M
    for start_m in range(start_n // BLOCK_M * BLOCK_M, m_full, BLOCK_M):
        dk, dv = _tile(dk, dv, k, k_lo, k_hi, v, q_desc, do_desc, dq_desc, DQA + base, lse_row, delta_row, start_m, start_n,
                       qk_scale, D, BLOCK_M, BLOCK_N, True, DQ)
    for start_m in range(m_full, n, BLOCK_M):
        dk, dv = _tile(dk, dv, k, k_lo, k_hi, v, q_desc, do_desc, dq_desc, DQA + base, lse_row, delta_row, start_m, start_n,
                       qk_scale, D, BLOCK_M, BLOCK_N, False, DQ)
    rows = start_n + tl.arange(0, BLOCK_N)
    offs = base + rows[:, None] * D + tl.arange(0, D)[None, :]
    tl.store(DK + offs, (dk * sm_scale).to(DK.dtype.element_ty))
    tl.store(DV + offs, dv.to(DV.dtype.element_ty))


def _allocator():
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def backward5(q, k, v, out, lse, dout, cfg, dq_reduce=1, state=None):
    """dq, dk, dv of causal attention by the five-matmul kernel. cfg = (BLOCK_M, BLOCK_N, warps, stages);
    dq_reduce: 1 bulk reduce-adds, 3 the same in two halves of D, 2 one atomic per element, 0 none
    (dq is None)."""
    B, H, N, D = q.shape
    bm, bn, warps, stages = cfg
    assert N % bm == 0 and N % bn == 0
    st = state if state is not None else {}
    if "dqa" not in st:
        st["dqa"] = torch.empty(B, H, N, D, device=q.device, dtype=torch.float32)
        st["lse2"] = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
        st["delta"] = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    dqa, lse2, delta = st["dqa"], st["lse2"], st["delta"]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    if dq_reduce:
        dqa.zero_()
    _prep[(B * H, triton.cdiv(N, 64))](out, dout, lse, lse2, delta, N, BLOCK=64, D=D)
    _bwd5[(B * H * (N // bn),)](q, k, v, dout, dqa, dk, dv, lse2, delta, 1 / math.sqrt(D), N, N // bn, D=D,
                                BLOCK_M=bm, BLOCK_N=bn, DQ=dq_reduce, num_warps=warps, num_stages=stages)
    dq = (dqa * (1 / math.sqrt(D))).to(q.dtype) if dq_reduce else None
    return dq, dk, dv


def _ms(fn):
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--configs", default="64,64,4,2;64,64,4,3;64,128,8,2;128,64,8,2;64,128,4,2")
    ap.add_argument("--flex", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    _allocator()
    N, H, D = args.seq, 16, 128
    B = max(1, 32768 // N)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    kern = attnc.compile("pattern p() {\n mask causal\n}")
    scale = 1 / math.sqrt(D)
    out, lse = kern(q, k, v, return_lse=True)
    ref = launch_backward(kern, q, k, v, out, lse, dout, None, scale=scale, sizes={}, inputs={})
    rows, results = [], {"seq": N, "batch": B, "heads": H, "dim": D}
    t_attnc = _ms(lambda: launch_backward(kern, q, k, v, out, lse, dout, None, scale=scale, sizes={}, inputs={}))
    rows.append(("attnc backward (7 matmuls)", t_attnc, ""))
    for text in args.configs.split(";"):
        fields = text.split(",")
        cfg, mode = tuple(int(x) for x in fields[:4]), 3 if fields[4:] == ["h"] else 1
        state = {}
        try:
            dq, dk, dv = backward5(q, k, v, out, lse, dout, cfg, dq_reduce=mode, state=state)
            torch.cuda.synchronize()
        except Exception as e:          # a configuration the device cannot hold
            rows.append((f"5mm {text}", float("nan"), f"{type(e).__name__}: {str(e)[:80]}"))
            continue
        errs = [_rel(a, b) for a, b in zip((dq, dk, dv), ref)]
        t_all = _ms(lambda: backward5(q, k, v, out, lse, dout, cfg, dq_reduce=mode, state=state))
        t_only = _ms(lambda: backward5(q, k, v, out, lse, dout, cfg, dq_reduce=0, state=state))
        rows.append((f"5mm {text}", t_all, "err dq/dk/dv " + " ".join(f"{e:.1e}" for e in errs)))
        rows.append((f"  dkdv only {text}", t_only, ""))
        results[text] = {"ms": t_all, "dkdv_only_ms": t_only, "errors": errs}
    if args.flex:
        from attnc.bench import _create_block_mask, _flex
        flex = _flex()
        bm = _create_block_mask(lambda b, h, qi, ki: qi >= ki, None, N, N, "cuda")
        qr, kr, vr = (x.detach().requires_grad_() for x in (q, k, v))

        def fb():
            o = flex(qr, kr, vr, block_mask=bm)
            o.backward(dout)
        t_fb = _ms(fb)
        with torch.no_grad():
            t_f = _ms(lambda: flex(q, k, v, block_mask=bm))
        rows.append(("flex backward (f+b - f)", t_fb - t_f, f"f+b {t_fb:.3f} f {t_f:.3f}"))
    results["rows"] = rows
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, f"micro_dq_reduce_{N}.json").write_text(json.dumps(results, indent=1))
    print(f"\ncausal backward, B={B} H={H} N={N} D={D} bf16 (ms, median)")
    for name, ms, note in rows:
        print(f"{name:34s} {ms:8.3f}  {note}")


if __name__ == "__main__":
    main()
