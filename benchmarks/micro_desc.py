"""What a tensor descriptor made inside a kernel costs each program, against one made on the host.

    python3 benchmarks/micro_desc.py

attnc's kernels build their tensor descriptors in the kernel (`tl.make_tensor_descriptor`, one per streamed
tensor and program), so a tile past a head's last row reads zeros. A host descriptor (Triton's
`TensorDescriptor`, a kernel argument) over all heads' rows at once needs no such step. This times a
forward-like kernel with both, at 128 x 128 tiles (8 warps, 3 stages, bf16, D = 128), for a few tiles per
program. The difference, divided by the programs per SM, is the cost per program
(benchmarks/NOTES.md item 36).
"""
import torch
import triton
import triton.language as tl
from triton.testing import do_bench


@triton.jit
def _device_desc(Q, K, O, n, TILES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr):
    bh = tl.program_id(0)
    m = tl.program_id(1)
    base = bh.to(tl.int64) * n * D
    q_desc = tl.make_tensor_descriptor(Q + base, shape=[n, D], strides=[D, 1], block_shape=[BM, D])
    k_desc = tl.make_tensor_descriptor(K + base, shape=[n, D], strides=[D, 1], block_shape=[BN, D])
    q = q_desc.load([m * BM, 0])
    acc = tl.zeros([BM, D], tl.float32)
    for j in range(TILES):
        kt = k_desc.load([j * BN, 0])
        s = tl.dot(q, tl.trans(kt))
        acc += tl.dot(s.to(kt.dtype), kt)
    rows = m * BM + tl.arange(0, BM)
    tl.store(O + base + rows[:, None] * D + tl.arange(0, D)[None, :], acc.to(O.dtype.element_ty))


@triton.jit
def _host_desc(q_desc, k_desc, O, n, TILES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr):
    bh = tl.program_id(0)
    m = tl.program_id(1)
    row0 = bh * n
    q = q_desc.load([row0 + m * BM, 0])
    acc = tl.zeros([BM, D], tl.float32)
    for j in range(TILES):
        kt = k_desc.load([row0 + j * BN, 0])
        s = tl.dot(q, tl.trans(kt))
        acc += tl.dot(s.to(kt.dtype), kt)
    rows = m * BM + tl.arange(0, BM)
    base = bh.to(tl.int64) * n * D
    tl.store(O + base + rows[:, None] * D + tl.arange(0, D)[None, :], acc.to(O.dtype.element_ty))


def main():
    from triton.tools.tensor_descriptor import TensorDescriptor
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    BH, n, D, BM, BN = 64, 8192, 128, 128, 128
    q, k = (torch.randn(BH, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    o = torch.empty_like(q)
    q_desc = TensorDescriptor.from_tensor(q.view(-1, D), [BM, D])
    k_desc = TensorDescriptor.from_tensor(k.view(-1, D), [BN, D])
    grid = (BH, n // BM)
    programs = grid[0] * grid[1]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{programs} programs of 128 x 128 tiles on {sms} SMs")
    for tiles in (1, 4, 16, 32):
        dev = do_bench(lambda: _device_desc[grid](q, k, o, n, tiles, BM, BN, D, num_warps=8, num_stages=3),
                       warmup=25, rep=200)
        host = do_bench(lambda: _host_desc[grid](q_desc, k_desc, o, n, tiles, BM, BN, D, num_warps=8, num_stages=3),
                        warmup=25, rep=200)
        per_program = (dev - host) * 1e3 / (programs / sms)
        print(f"tiles {tiles:3d}: device descriptors {dev * 1e3:8.1f} us, host {host * 1e3:8.1f} us, "
              f"difference {per_program:6.2f} us per program per SM")


if __name__ == "__main__":
    main()
