"""The host's floor for per-call setup work, on the GPU (NOTES item 24).

    python3 benchmarks/micro_sort.py

Prints the wall time of a synchronization, of torch ops and Triton launches (each followed by a
synchronization), and the device and wall time of ``torch.sort`` by shape, key dtype and stability.
"""

import time

import torch
import triton
from triton.testing import do_bench


@triton.jit
def _noop(x_ptr, n):
    pass


def wall(fn, reps=50):
    """Median wall-clock microseconds of fn() followed by a synchronization."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e6


def main():
    x = torch.zeros(1, device="cuda")
    print(f"empty sync roundtrip      {wall(lambda: None):7.1f} us")
    print(f"1 torch add               {wall(lambda: x.add_(1)):7.1f} us")
    print(f"10 torch adds             {wall(lambda: [x.add_(1) for _ in range(10)]):7.1f} us")
    print(f"1 triton launch           {wall(lambda: _noop[(1,)](x, 1)):7.1f} us")
    print(f"10 triton launches        {wall(lambda: [_noop[(1,)](x, 1) for _ in range(10)]):7.1f} us")
    print(f".tolist() of 4 ints       {wall(lambda: torch.zeros(4, device='cuda', dtype=torch.int64).tolist()):7.1f} us")
    for shape in [(1, 1, 32768), (1, 16, 32768), (4, 16, 8192)]:
        for dt in (torch.int64, torch.int32, torch.int16, torch.uint8):
            v = torch.randint(0, 8, shape, device="cuda").to(dt)
            for stable in (True, False):
                g = do_bench(lambda: torch.sort(v, dim=-1, stable=stable), warmup=10, rep=50) * 1e3
                w = wall(lambda: torch.sort(v, dim=-1, stable=stable))
                print(f"sort {str(shape):<16} {str(dt):<12} stable={stable!s:<5} gpu {g:7.1f} us  wall {w:7.1f} us")
        v = torch.randint(0, 8, shape, device="cuda")
        key = (v * shape[-1] + torch.arange(shape[-1], device="cuda")).to(torch.int32)
        g = do_bench(lambda: torch.sort(key, dim=-1), warmup=10, rep=50) * 1e3
        print(f"sort {str(shape):<16} composite int32 unstable gpu {g:7.1f} us")
        g = do_bench(lambda: torch.argsort(key.view(-1)), warmup=10, rep=50) * 1e3
        print(f"argsort flat composite int32 gpu {g:7.1f} us")


if __name__ == "__main__":
    main()
