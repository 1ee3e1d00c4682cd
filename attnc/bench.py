"""Benchmarks behind ``attnc bench``: time a compiled pattern beside FlexAttention and torch SDPA.

The measuring method follows SPEC section 6 and the anchor script in ``shared/anchors``:
random bf16 inputs, correctness checked before anything is timed, ``triton.testing.do_bench``
medians after warm-up, all contenders in the same process on the same tensors. Effective TFLOP/s
count only the unmasked score entries, so a sparse pattern is credited for the work it needs,
not for the work a dense kernel would do.

The timing parts need a CUDA GPU; ``effective_tflops``, ``format_table``, ``mask_density``,
``dense_mask_from_mod`` and ``masked_attention_reference`` also run on CPU tensors.
"""

from __future__ import annotations

import datetime
import gc
import inspect
import math
import os
import platform
import statistics
import sys
import threading
import time
from typing import Any, Callable, Iterable

import torch

from .errors import AttncError

__all__ = [
    "effective_tflops", "time_ms", "time_stats", "wall_ms", "mask_density", "dense_mask_from_mod",
    "masked_attention_reference", "relative_error", "make_random_inputs", "bench_pattern",
    "format_table", "env_info", "parse_dtype",
]

# Above this many mask elements a dense (b, h, q, k) mask is not built for density or checks.
DENSE_MASK_LIMIT = 1 << 31

# Warm-up of every timing in a benchmark report, ms of back-to-back calls. A card that has been idle (a
# compile, a host-side step) runs a power-hungry kernel at its top clock for half a second or so before its
# power limit pulls the clock down (H200: 1980 -> 1500-1700 MHz at 700 W, benchmarks/NOTES.md item 75), so a
# timing that follows an idle spell would measure a clock that no sustained run sees.
HEAT_MS = 1000

# Untimed calls before do_bench's own: past the calls that compile kernel variants (attnc.flags, autotuning).
WARM_CALLS = 4

# What time_stats(..., clocks=True) adds beside the times (the card's state and the host's share).
CLOCK_KEYS = ("mhz", "watts", "util", "busy", "host", "clock_samples", "clock_error")


# ----------------------------------------------------------------------------------------------
# Arithmetic and timing


def effective_tflops(B: int, H: int, Nq: int, Nk: int, D: int, density: float | None,
                     ms: float | None, fwdbwd: bool = False) -> float | None:
    """Effective TFLOP/s of SPEC 6: ``4*B*H*Nq*Nk*D*density / time``, times 3.5 for fwd+bwd.

    ``H`` is the number of query heads. Returns None when the time or the density is unknown.
    """
    if ms is None or density is None or ms <= 0:
        return None
    flops = 4.0 * B * H * Nq * Nk * D * density
    if fwdbwd:
        flops *= 3.5
    return flops / (ms * 1e-3) / 1e12


def warm_calls(fn, calls: int = WARM_CALLS) -> None:
    """``calls`` untimed calls of ``fn`` before a timing, each waited for.

    do_bench sizes its loops from five calls right after one untimed one. attnc picks kernel variants from the
    third call on (attnc.flags), so the first of those compiled inside that estimate: seconds of an idle GPU,
    a few timed repetitions, and those on a cool card above its power-limited clock (NOTES item 75). Each call
    waits for the device because the flags are read without waiting, once the device has written them: four
    calls the host queued ahead of a slow device (a 32k forward+backward) all still ran the guarded variants,
    and the picked one compiled inside the timing all the same (NOTES item 76)."""
    for _ in range(calls):
        fn()
        torch.cuda.synchronize()


def _do_bench_kwargs(warmup: float, rep: float, grad_to_none, quantiles) -> tuple[Callable, dict, str]:
    """Keyword arguments for whichever ``do_bench`` this Triton has (the signature has moved)."""
    from triton.testing import do_bench
    params = inspect.signature(do_bench).parameters
    kwargs: dict[str, Any] = {"warmup": warmup, "rep": rep}
    if grad_to_none is not None and "grad_to_none" in params:
        kwargs["grad_to_none"] = grad_to_none
    if "quantiles" in params:
        kwargs["quantiles"] = list(quantiles)
        mode = "quantiles"
    elif "percentiles" in params:           # Triton 2.0 spelling
        kwargs["percentiles"] = tuple(quantiles)
        mode = "quantiles"
    elif "return_mode" in params:
        kwargs["return_mode"] = "median"
        mode = "median"
    else:
        mode = "plain"
    return do_bench, kwargs, mode


def time_stats(fn: Callable[[], Any], warmup: float = 50, rep: float = 300,
               grad_to_none: list | None = None, clocks: bool = False) -> dict:
    """Median, 20th and 80th percentile in ms of ``fn`` on the current CUDA device.

    Uses ``triton.testing.do_bench`` (CUDA events, L2 cleared between runs); ``warmup`` and ``rep``
    are milliseconds of running, as there. ``spread`` is ``(p80 - p20) / median``. With ``clocks``,
    also the SM clock, board power and utilization while it ran (:class:`ClockSampler`: ``mhz``, ``watts``,
    ``util``), ``busy`` (the share of the wall time the timed calls took on the device) and ``host`` (calls,
    wall ms per call, garbage-collection ms, the caching allocator's retries and driver calls, kernels Triton
    compiled meanwhile): a timing whose GPU idled between calls is not a sustained one.
    On a machine without CUDA (smoke tests only) it falls back to a wall-clock loop.
    """
    if not torch.cuda.is_available():
        times = []
        for _ in range(3):
            for t in grad_to_none or ():
                t.grad = None
            times.append(wall_ms(fn, reps=1, warmup=0))
        times.sort()
        med = statistics.median(times)
        return {"median": med, "p20": times[0], "p80": times[-1],
                "spread": (times[-1] - times[0]) / med if med > 0 else None}
    do_bench, kwargs, mode = _do_bench_kwargs(warmup, rep, grad_to_none, (0.5, 0.2, 0.8))
    warm_calls(fn)
    gc.collect()        # a full collection (0.4 s after FlexAttention's compiles) would idle the GPU meanwhile
    sampler = ClockSampler() if clocks else None
    if sampler is None:
        res = do_bench(fn, **kwargs)
    else:
        with HostWatch(fn) as host, sampler:
            res = do_bench(host.fn, **kwargs)
    if mode == "quantiles" and isinstance(res, (list, tuple)) and len(res) >= 3:
        med, p20, p80 = (float(x) for x in res[:3])
    else:
        med = float(res[0] if isinstance(res, (list, tuple)) else res)
        p20 = p80 = med
    out = {"median": med, "p20": p20, "p80": p80, "spread": (p80 - p20) / med if med > 0 else None}
    if sampler is not None:
        out.update(sampler.summary())
        out["busy"] = host.busy(med)
        out["host"] = host.summary()
    return out


class HostWatch:
    """What the host did while a timing ran (``with HostWatch(fn) as w: do_bench(w.fn)``): the calls of ``fn``
    (through ``w.fn``), the wall time, garbage collections, the caching allocator's retries and driver calls,
    and kernels Triton compiled meanwhile."""

    def __init__(self, fn: Callable[[], Any]):
        self._inner, self.calls = fn, 0
        self.gc_ms, self.full_gcs, self._gc_t0 = 0.0, 0, 0.0
        self.wall_ms = 0.0

    def fn(self):
        self.calls += 1
        return self._inner()

    def _on_gc(self, phase, info):
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            self.gc_ms += (time.perf_counter() - self._gc_t0) * 1e3
            self.full_gcs += info.get("generation") == 2

    def __enter__(self):
        gc.callbacks.append(self._on_gc)
        self._alloc0, self._compiled0 = _alloc_counts(), _triton_cache_entries()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall_ms = (time.perf_counter() - self._t0) * 1e3
        gc.callbacks.remove(self._on_gc)
        self._alloc = {k: v - self._alloc0[k] for k, v in _alloc_counts().items()}
        self._compiled = _triton_cache_entries() - self._compiled0

    def busy(self, median_ms: float) -> float | None:
        """The share of the wall time the device spent in the timed calls (do_bench's L2 clears excluded):
        well under 1 means the GPU idled between calls, so each ran on a cooler, faster-clocked card."""
        return round(self.calls * median_ms / self.wall_ms, 3) if self.wall_ms > 0 else None

    def summary(self) -> dict:
        return {"calls": self.calls, "wall_ms_per_call": round(self.wall_ms / max(self.calls, 1), 4),
                "gc_ms": round(self.gc_ms, 1), "full_gcs": self.full_gcs, **self._alloc,
                "compiles": self._compiled}


def _triton_cache_entries() -> int:
    """How many kernels Triton's on-disk cache holds (one directory each): a kernel compiled while a timing
    ran adds one (a kernel compiled before, in another process, only loads)."""
    path = os.environ.get("TRITON_CACHE_DIR")
    if not path:
        try:
            import triton
            path = triton.knobs.cache.dir
        except Exception:  # noqa: BLE001 - older Triton: its default place
            path = os.path.join(os.path.expanduser("~"), ".triton", "cache")
    try:
        with os.scandir(path) as entries:
            return sum(1 for _ in entries)
    except OSError:
        return 0


_ALLOC_STATS = {"alloc_retries": "num_alloc_retries", "device_allocs": "num_device_alloc",
                "device_frees": "num_device_free"}


def _alloc_counts() -> dict:
    """The CUDA caching allocator's counters: how often it freed its cache and retried a failed allocation
    (``alloc_retries``), and its calls to the driver (``device_allocs``: cudaMalloc, ``device_frees``:
    cudaFree, which synchronizes the device). In steady state a timed call makes none; each costs host time."""
    try:
        stats = torch.cuda.memory_stats()
    except Exception:  # noqa: BLE001 - informative only (no CUDA)
        stats = {}
    return {k: int(stats.get(name, 0)) for k, name in _ALLOC_STATS.items()}


class ClockSampler:
    """Samples the SM clock (MHz) and board power (W) of the current GPU through NVML every ``period`` seconds
    while the ``with`` block runs, in a thread.

    A kernel that drives the card to its power limit runs at a lower clock than the card's maximum, and the
    clock moves with what ran before and with the data; a timing reported beside its clock says which. Without
    NVML (``pynvml``) or a GPU, :meth:`summary` says so instead of numbers.
    """

    def __init__(self, period: float = 0.002):
        self.period, self.samples, self.error = period, [], None
        self._stop, self._thread, self._handle, self._nvml = None, None, None, None

    def __enter__(self):
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml = pynvml
            index = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as e:  # noqa: BLE001 - clocks are informative only
            self.error = f"NVML unavailable: {e!r}"[:120]
            return self
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        nv, h = self._nvml, self._handle
        while True:                 # at least one sample, however short the block
            try:
                self.samples.append((nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
                                     nv.nvmlDeviceGetPowerUsage(h) / 1e3,
                                     nv.nvmlDeviceGetUtilizationRates(h).gpu))
            except Exception as e:  # noqa: BLE001
                self.error = repr(e)[:120]
                return
            if self._stop.wait(self.period):
                return

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        return False

    def summary(self) -> dict:
        """``mhz``, ``watts`` and ``util`` (NVML's percentage of time a kernel ran): median, min and max of the
        samples (or ``clock_error``)."""
        if not self.samples:
            return {"clock_error": self.error or "no samples"}
        mhz, watts, util = (sorted(s[i] for s in self.samples) for i in range(3))
        mid = len(mhz) // 2
        return {"mhz": [mhz[mid], mhz[0], mhz[-1]],
                "watts": [round(watts[mid], 1), round(watts[0], 1), round(watts[-1], 1)],
                "util": [util[mid], util[0], util[-1]], "clock_samples": len(self.samples)}


def time_ms(fn: Callable[[], Any], warmup: float = 50, rep: float = 300,
            grad_to_none: list | None = None) -> float:
    """Median milliseconds of ``fn`` by ``triton.testing.do_bench`` (see :func:`time_stats`)."""
    return time_stats(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none)["median"]


def _sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def wall_ms(fn: Callable[[], Any], reps: int = 10, warmup: int = 2) -> float:
    """Median wall-clock ms of ``fn`` including host work, synchronizing the GPU around each call.

    Used for setup steps (planning, FlexAttention's ``create_block_mask``): their cost is host
    time plus small kernels, which device events alone would not see when the GPU idles.
    """
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def uncached_setup(kern, q, k, v, inputs: dict) -> None:
    """The setup a forward call pays for runtime inputs it has not seen (tile lists, sorts, layout),
    without the attention kernel: the per-call cache is dropped first. Static patterns have none."""
    from .launch import call_forward_config, forward_launches
    from .validate import check_inputs
    B, H, Nq = q.shape[:3]
    sizes = check_inputs(kern.ir, inputs, batch=B, heads=H, n_q=Nq, n_k=k.shape[2])
    cfg = call_forward_config(kern, q, k, v)
    kern.__dict__.pop("_setup_cache", None)
    forward_launches(kern, q, k, v, sizes=sizes, inputs=inputs, config=cfg)


# ----------------------------------------------------------------------------------------------
# Masks, densities, references


def mask_density(mask_mod: Callable, *, batch: int, heads: int, n_q: int, n_k: int,
                 device: str | torch.device = "cuda", max_elems: int = 1 << 28) -> float:
    """Exact fraction of visible (b, h, q, k) entries of a FlexAttention-style ``mask_mod``.

    The mask is evaluated in chunks of query rows, all heads at once, one batch element at a time,
    so memory stays under ``max_elems`` booleans while every entry is counted (no sampling). The
    mask_mod is called with ``b`` a 0-dim tensor, ``h`` of shape (H,1,1), ``q`` (1,r,1) and
    ``k`` (1,1,Nk); a result that broadcasts to (H, r, Nk) is counted with its multiplicity.
    """
    dev = torch.device(device)
    hv = torch.arange(heads, device=dev).view(heads, 1, 1)
    kv = torch.arange(n_k, device=dev).view(1, 1, n_k)
    rows = max(1, max_elems // max(1, heads * n_k))
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for b in range(batch):
        bt = torch.tensor(b, device=dev)
        for r0 in range(0, n_q, rows):
            r1 = min(n_q, r0 + rows)
            qv = torch.arange(r0, r1, device=dev).view(1, r1 - r0, 1)
            m = torch.as_tensor(mask_mod(bt, hv, qv, kv), device=dev)
            full = (heads, r1 - r0, n_k)
            if tuple(torch.broadcast_shapes(m.shape, full)) != full:
                raise ValueError(f"mask_mod result of shape {tuple(m.shape)} does not broadcast to {full}")
            mult = math.prod(full) // max(1, m.numel())
            total += m.sum(dtype=torch.int64).to(torch.float64) * mult
    return float(total) / (batch * heads * n_q * n_k)


def dense_mask_from_mod(mask_mod: Callable, batch: int, heads: int, n_q: int, n_k: int,
                        device: str | torch.device = "cpu") -> torch.Tensor:
    """The dense bool mask (batch, heads, n_q, n_k) of a ``mask_mod``; only for small sizes."""
    dev = torch.device(device)
    hv = torch.arange(heads, device=dev).view(heads, 1, 1)
    qv = torch.arange(n_q, device=dev).view(1, n_q, 1)
    kv = torch.arange(n_k, device=dev).view(1, 1, n_k)
    per_b = []
    for b in range(batch):
        m = torch.as_tensor(mask_mod(torch.tensor(b, device=dev), hv, qv, kv), device=dev)
        per_b.append(torch.broadcast_to(m.to(torch.bool), (heads, n_q, n_k)))
    return torch.stack(per_b)


def _pick(t: torch.Tensor, i: int) -> torch.Tensor:
    """``t[i]`` along the first dim, or ``t[0]`` when that dim is broadcast (size 1)."""
    return t[i] if t.shape[0] > 1 else t[0]


def masked_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                               *, scale: float | None = None, dout: torch.Tensor | None = None,
                               compute_dtype: torch.dtype = torch.float64) -> dict:
    """Plain attention with an explicit boolean mask, one (batch, kv-head) slice at a time.

    q (B, Hq, Nq, D); k, v (B, Hkv, Nk, D/Dv) with Hq a multiple of Hkv (GQA: query head h uses
    kv head h // (Hq // Hkv)); mask broadcastable to (B, Hq, Nq, Nk). Rows without a visible key
    output 0 and have lse -inf, and their gradients are 0. Computed in ``compute_dtype``: float64
    for the reference, or the inputs' own low precision for the "plain PyTorch" error baseline
    (matmuls in that dtype, softmax as torch does it for that dtype). Returns a dict with ``out``,
    ``lse`` and, when ``dout`` is given, ``dq``, ``dk``, ``dv`` (all in ``compute_dtype``).
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} not a multiple of kv heads {Hkv}")
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    mask = mask.to(q.device) if mask.device != q.device else mask
    cd = compute_dtype
    out = torch.empty(B, Hq, Nq, Dv, dtype=cd, device=q.device)
    lse = torch.empty(B, Hq, Nq, dtype=torch.float64 if cd == torch.float64 else torch.float32,
                      device=q.device)
    want_grads = dout is not None
    if want_grads:
        dq = torch.zeros(B, Hq, Nq, D, dtype=cd, device=q.device)
        dk = torch.zeros(B, Hkv, Nk, D, dtype=cd, device=q.device)
        dv = torch.zeros(B, Hkv, Nk, Dv, dtype=cd, device=q.device)
    for b in range(B):
        mb = _pick(mask, b)
        for j in range(Hkv):
            h0, h1 = j * group, (j + 1) * group
            qs = q[b, h0:h1].detach().to(cd).requires_grad_(want_grads)
            ks = k[b, j].detach().to(cd).requires_grad_(want_grads)
            vs = v[b, j].detach().to(cd).requires_grad_(want_grads)
            m = mb[h0:h1] if mb.shape[0] > 1 else mb
            m = torch.broadcast_to(m, (group, Nq, Nk))
            with torch.enable_grad():
                s = torch.matmul(qs, ks.transpose(0, 1)) * scale
                s = s.masked_fill(~m, float("-inf"))
                has_key = m.any(dim=-1, keepdim=True)
                # A row with no visible key: softmax over zeros (finite), then multiplied by 0.
                s = s.masked_fill(~has_key, 0.0)
                p = torch.softmax(s, dim=-1) * has_key
                o = torch.matmul(p, vs)
            out[b, h0:h1] = o.detach()
            row_lse = torch.logsumexp(s.detach().to(lse.dtype), dim=-1)
            lse[b, h0:h1] = row_lse.masked_fill(~has_key.squeeze(-1), float("-inf"))
            if want_grads:
                gq, gk, gv = torch.autograd.grad(o, (qs, ks, vs), dout[b, h0:h1].to(cd))
                dq[b, h0:h1] = gq
                dk[b, j] = gk
                dv[b, j] = gv
    res = {"out": out, "lse": lse}
    if want_grads:
        res.update(dq=dq, dk=dk, dv=dv)
    return res


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``||a - ref|| / ||ref||`` (Frobenius, in float64); NaN anywhere gives NaN, not a pass."""
    a64, r64 = a.detach().to(torch.float64), ref.detach().to(torch.float64)
    den = torch.linalg.vector_norm(r64)
    num = torch.linalg.vector_norm(a64 - r64)
    if not bool(torch.isfinite(num)):
        return float("nan")
    return float(num / den) if float(den) > 0 else float(num)


def _dims_of(decl) -> tuple | None:
    dims = getattr(decl, "dims", None)
    return tuple(dims) if dims is not None else None


def make_random_inputs(kern, *, seq: int, batch: int, heads: int, device: str | torch.device = "cuda",
                       n_buckets: int = 8, keep_prob: float = 0.5, seed: int = 0,
                       n_q: int | None = None, n_k: int | None = None) -> dict:
    """Random runtime inputs for ``kern`` from its declarations (``kern.inputs``).

    ``int`` inputs are drawn uniformly in ``[0, n_buckets)`` (hash-bucket-like), ``bool`` inputs are
    True with probability ``keep_prob``, ``float`` inputs are standard normal. Size names resolve as
    ``batch``, ``heads``, ``n_q``, ``n_k``; any other name binds to ``seq``. For ``attnc bench`` on
    patterns whose inputs have a meaning (document ids, ...) the caller should pass real inputs.
    """
    decls = getattr(kern, "inputs", None) or {}
    n_q = seq if n_q is None else n_q
    n_k = seq if n_k is None else n_k
    sizes = {"batch": batch, "heads": heads, "n_q": n_q, "n_k": n_k}
    gen = torch.Generator(device="cpu").manual_seed(seed)
    res = {}
    for name, decl in decls.items():
        dims = _dims_of(decl) or ()
        shape = tuple(d if isinstance(d, int) else sizes.get(d, seq) for d in dims)
        kind = str(getattr(decl, "dtype", "float"))
        if kind == "int":
            t = torch.randint(0, n_buckets, shape, generator=gen)
        elif kind == "bool":
            t = torch.rand(shape, generator=gen) < keep_prob
        else:
            t = torch.randn(shape, generator=gen)
        res[name] = t.to(device)
    return res


def parse_dtype(x) -> torch.dtype:
    """``torch.bfloat16`` from 'bf16', 'bfloat16', 'fp16', 'half', 'fp32', ... or a dtype."""
    if isinstance(x, torch.dtype):
        return x
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
             "float32": torch.float32, "float": torch.float32}
    try:
        return table[str(x).lower().replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {x!r}; use one of bf16, fp16, fp32") from None


def env_info(argv: list | None = None) -> dict:
    """Device, versions, date and command line, for the head of a benchmark log."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__,
        "argv": list(sys.argv if argv is None else argv),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - only informative
        info["triton"] = None
    try:
        import attnc
        info["attnc"] = getattr(attnc, "__version__", None)
    except Exception:  # noqa: BLE001
        info["attnc"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    else:
        info["device"] = "cpu"
    return info


# ----------------------------------------------------------------------------------------------
# FlexAttention and SDPA contenders

_FLEX_COMPILED = None


def _flex(device="cuda"):
    """FlexAttention compiled once per process, as its users run it (``dynamic=False``).

    On a CPU device (smoke tests) the eager function, as the anchor script's --cpu-smoke does.
    """
    global _FLEX_COMPILED
    if torch.device(device).type != "cuda":
        from torch.nn.attention.flex_attention import flex_attention
        return flex_attention
    if _FLEX_COMPILED is None:
        from torch._dynamo import config as dynamo_config
        from torch.nn.attention.flex_attention import flex_attention
        # Every mask_mod closure is a new guard; the default limit would fall back to eager.
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, knob):
                if getattr(dynamo_config, knob) < 1000:
                    setattr(dynamo_config, knob, 1000)
                break
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


def _create_block_mask(mask_mod, bh, n_q: int, n_k: int, device):
    from torch.nn.attention.flex_attention import create_block_mask
    B_, H_ = bh if bh is not None else (None, None)
    if "_compile" in inspect.signature(create_block_mask).parameters and torch.device(device).type == "cuda":
        return create_block_mask(mask_mod, B_, H_, n_q, n_k, device=device, _compile=True)
    return create_block_mask(mask_mod, B_, H_, n_q, n_k, device=device)


def _sdpa_backends() -> list[tuple[str, Any]]:
    from torch.nn.attention import SDPBackend
    return [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]


# ----------------------------------------------------------------------------------------------
# The benchmark of one pattern


def _backward_unavailable(exc: BaseException) -> bool:
    """True for 'backward is not implemented' (as opposed to a backward that crashed)."""
    if isinstance(exc, NotImplementedError):
        return True
    if isinstance(exc, AttncError):
        msg = str(exc).lower()
        return any(w in msg for w in ("backward", "not implemented", "not supported", "unsupported",
                                      "gradient"))
    return False


def _grads(*ts):
    return [None if t.grad is None else t.grad.detach().clone() for t in ts]


def _clear_grads(*ts):
    for t in ts:
        t.grad = None


def _slice_batch(kern, inputs: dict, batch: int) -> dict:
    """Runtime inputs restricted to batch element 0 (inputs with a leading batch dimension)."""
    decls = getattr(kern, "inputs", None) or {}
    res = {}
    for name, t in inputs.items():
        dims = _dims_of(decls.get(name)) if name in decls else None
        has_batch = (dims[0] == "batch") if dims else (t.dim() >= 1 and t.shape[0] == batch and batch > 1)
        res[name] = t[:1] if has_batch else t
    return res


def _plain(x):
    """A JSON-friendly form of a plan attribute (dict, named tuple, dataclass or anything else)."""
    import dataclasses
    if x is None or isinstance(x, (int, float, str, bool)):
        return x
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if hasattr(x, "_asdict"):
        return _plain(x._asdict())
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _plain(dataclasses.asdict(x))
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return str(x)


def _bool_mean(m: torch.Tensor) -> float:
    """Fraction of True entries, counted in int64 (no float copy of a large mask)."""
    return float(m.sum(dtype=torch.int64)) / max(1, m.numel())


def _looks_dense_causal(kern, inputs: dict, seq: int, limit: int = 4096) -> bool:
    """Is the pattern plain causal at this length? (Then SDPA's is_causal is a fair contender.)

    Decided on the mask of batch 0, head 0 at ``min(seq, limit)``: a pattern with runtime inputs
    is never taken as causal, and one that differs from causal only beyond ``limit`` (a causal
    window wider than 4096) would be misjudged; pass ``sdpa_causal`` explicitly to be sure.
    """
    if inputs or getattr(kern, "inputs", None):
        return False
    n = min(seq, limit)
    try:
        m = torch.as_tensor(kern.mask(n, n, batch=1, heads=1)).reshape(n, n).bool().cpu()
    except Exception:  # noqa: BLE001 - then it is not compared with SDPA
        return False
    return bool(torch.equal(m, torch.ones(n, n, dtype=torch.bool).tril()))


def _round(x, nd=3):
    return None if x is None else round(float(x), nd)


def _ratio(slow_ms, fast_ms):
    """Speed-up of the second over the first (times: >1 means the second is faster)."""
    if slow_ms is None or fast_ms is None or fast_ms <= 0:
        return None
    return round(slow_ms / fast_ms, 3)


def bench_pattern(kern, *, seq: int, batch: int, heads: int, dim: int, dtype=torch.bfloat16,
                  inputs: dict | None = None, vs: Iterable[str] | str = ("sdpa", "flex"),
                  flex_mask_mod: Callable | None = None, check: bool = True, name: str | None = None,
                  flex_mask_bh: tuple[int, int] | None = None, sdpa_causal: bool | None = None,
                  density: float | None = None, warmup: float = HEAT_MS, rep: float = 300,
                  rtol: float = 1e-2, grad_rtol: float = 3e-2, seed: int = 0,
                  device: str = "cuda", log: Callable[[str], Any] | None = None, clocks: bool = False) -> dict:
    """Check, then time one compiled pattern beside FlexAttention and SDPA; a dict of numbers.

    q, k, v are random (batch, heads, seq, dim) tensors in ``dtype`` with ``requires_grad``;
    ``inputs`` are the pattern's runtime tensors. Order of work:

    1. plan (``kern.plan``): tile fraction, tiles, transforms, setup wall time;
    2. density: ``density`` if given, else ``plan.density`` if the plan has one, else an exact
       chunked count of ``flex_mask_mod`` on the GPU, else ``kern.mask`` when the dense mask has
       at most 2**31 entries, else unknown (TFLOP/s then None; times are still reported);
    3. attnc first call (Triton JIT), backward via ``out.backward(dout)``; a backward that is not
       implemented (NotImplementedError, or an AttncError saying so) gives None fwd+bwd figures;
    4. correctness (``check``): against FlexAttention's output and gradients when a mask_mod is
       given (relative error ``rtol`` for outputs, ``grad_rtol`` for gradients), else against an
       explicit-mask float32 reference from ``kern.mask`` for small sizes, else ``kern.reference``
       on batch element 0; a failure is recorded in ``check`` and timing goes on;
    5. timing (``time_stats``) of attnc, FlexAttention (``create_block_mask`` timed separately,
       wall clock) and, when the pattern is dense causal (``sdpa_causal``; by default when its
       mask equals causal, see ``_looks_dense_causal``), SDPA's cuDNN and flash backends with
       ``is_causal=True``. SDPA with an explicit boolean mask is not a fair contender (it cannot
       skip work) and is skipped.

    Ratios ``attnc_vs_X_*`` are speed-ups of attnc over X (X time / attnc time; > 1: attnc faster).
    """
    say = log or (lambda s: None)
    if isinstance(vs, str):
        vs = [s.strip() for s in vs.split(",") if s.strip()]
    vs = {s.lower() for s in vs}
    dtype = parse_dtype(dtype)
    inputs = dict(inputs or {})
    pname = name or getattr(kern, "name", None) or "pattern"
    if sdpa_causal is None:
        sdpa_causal = _looks_dense_causal(kern, inputs, seq)
    if flex_mask_mod is None:
        maker = getattr(kern, "flex_mask_mod", None)   # optional hook: kern.flex_mask_mod(**inputs)
        if callable(maker):
            try:
                flex_mask_mod = maker(**inputs)
            except Exception as e:  # noqa: BLE001 - the hook is optional
                say(f"[{pname}] kern.flex_mask_mod unavailable: {e!r}")
    row: dict[str, Any] = {"pattern": pname, "N": seq, "B": batch, "H": heads, "D": dim,
                           "dtype": str(dtype).replace("torch.", "")}
    B, H, N, D = batch, heads, seq, dim

    # 1. plan
    plan = None
    try:
        plan = kern.plan(N, N, batch=B, heads=H, **inputs)
        row["tile_fraction"] = _round(getattr(plan, "tile_fraction", None), 5)
        tiles = getattr(plan, "tiles", None)
        row["tiles"] = _plain(tiles)
        row["block_m"] = getattr(plan, "block_m", None)
        row["block_n"] = getattr(plan, "block_n", None)
        row["transforms"] = [str(t) for t in (getattr(plan, "transforms", None) or [])]
        row["attnc_plan_ms"] = _round(wall_ms(lambda: kern.plan(N, N, batch=B, heads=H, **inputs)), 4)
    except Exception as e:  # noqa: BLE001 - planning figures are informative
        row["plan_error"] = repr(e)[:300]

    # 2. density
    dens, src = density, ("given" if density is not None else None)
    if dens is None and plan is not None and isinstance(getattr(plan, "density", None), (int, float)):
        dens, src = float(plan.density), "plan"
    if dens is None and flex_mask_mod is not None:
        try:
            dens = mask_density(flex_mask_mod, batch=B, heads=H, n_q=N, n_k=N, device=device)
            src = "mask_mod"
        except Exception as e:  # noqa: BLE001 - e.g. a mask_mod that does not broadcast over heads
            row["density_error"] = repr(e)[:200]
    if dens is None:
        try:
            if inputs and B * H * N * N <= DENSE_MASK_LIMIT:
                dens, src = _bool_mean(kern.mask(N, N, batch=B, heads=H, **inputs)), "kern.mask"
            elif not inputs and H * N * N <= DENSE_MASK_LIMIT:
                # no runtime inputs: batch elements are alike, heads may differ
                dens, src = _bool_mean(kern.mask(N, N, batch=1, heads=H)), "kern.mask(b=0)"
        except Exception as e:  # noqa: BLE001
            row["density_error"] = repr(e)[:200]
    row["density"] = _round(dens, 6)
    row["density_source"] = src

    # 3. inputs and attnc first calls
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, generator=gen).requires_grad_(True)
               for _ in range(3))
    dout = torch.randn(B, H, N, D, device=device, dtype=dtype, generator=gen)
    qkv = [q, k, v]
    on_cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    peak = torch.cuda.max_memory_allocated if on_cuda else (lambda: 0)
    sync()
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    mem0 = peak()
    attnc_ok, bwd_ok, attnc_g, attnc_out = True, False, None, None
    try:
        t0 = time.perf_counter()
        out = kern(q, k, v, **inputs)
        sync()
        row["attnc_first_fwd_s"] = _round(time.perf_counter() - t0, 2)
        row["attnc_fwd_extra_mem_mb"] = _round((peak() - mem0) / 2**20, 1)
        attnc_out = out.detach()
    except Exception as e:  # noqa: BLE001 - FlexAttention and SDPA figures are still worth having
        attnc_ok = False
        row["attnc_error"] = f"{type(e).__name__}: {e}"[:400]
        say(f"[{pname} N={N}] attnc failed: {row['attnc_error']}")
    if attnc_ok:
        try:
            if not out.requires_grad:
                raise NotImplementedError("the output has no grad_fn (no autograd registered)")
            t0 = time.perf_counter()
            out.backward(dout)
            sync()
            row["attnc_first_bwd_s"] = _round(time.perf_counter() - t0, 2)
            row["attnc_fwdbwd_extra_mem_mb"] = _round((peak() - mem0) / 2**20, 1)
            attnc_g = _grads(*qkv)
            bwd_ok = True
        except Exception as e:  # noqa: BLE001
            key = "attnc_bwd_unavailable" if _backward_unavailable(e) else "attnc_bwd_error"
            row[key] = repr(e)[:300]
            say(f"[{pname} N={N}] backward: {row[key]}")
        del out
        say(f"[{pname} N={N}] attnc compiled and ran (density {row['density']}, source {src})")
        try:
            row["attnc_setup_ms"] = _round(wall_ms(lambda: uncached_setup(kern, q, k, v, inputs)), 4)
        except Exception as e:  # noqa: BLE001 - informative only
            row["setup_error"] = repr(e)[:300]
    _clear_grads(*qkv)

    # 4. FlexAttention: block mask, first calls, reference for the check. On CPU (smoke tests)
    # FlexAttention has no backward, so its forward gets detached tensors there.
    flex_out = bm = flex_g = None
    flex_bwd_ok = False
    fq, fk, fv = (q, k, v) if on_cuda else (q.detach(), k.detach(), v.detach())
    if flex_mask_mod is not None and ("flex" in vs or check):
        try:
            flex = _flex(device)
            t0 = time.perf_counter()
            bm = _create_block_mask(flex_mask_mod, flex_mask_bh, N, N, device)
            sync()
            row["flex_block_mask_first_s"] = _round(time.perf_counter() - t0, 2)
            try:
                row["flex_block_density"] = _round(1 - float(bm.sparsity()) / 100, 5)
            except Exception:  # noqa: BLE001 - informative only
                pass
            t0 = time.perf_counter()
            fo = flex(fq, fk, fv, block_mask=bm)
            sync()
            row["flex_first_fwd_s"] = _round(time.perf_counter() - t0, 2)
            flex_out = fo.detach()
        except Exception as e:  # noqa: BLE001 - attnc's figures still count
            row["flex_error"] = repr(e)[:300]
            say(f"[{pname} N={N}] FlexAttention failed: {row['flex_error']}")
            bm = None
        if flex_out is not None and fo.requires_grad:
            try:
                t0 = time.perf_counter()
                fo.backward(dout)
                sync()
                row["flex_first_bwd_s"] = _round(time.perf_counter() - t0, 2)
                flex_g = _grads(*qkv)
                flex_bwd_ok = True
            except Exception as e:  # noqa: BLE001
                row["flex_bwd_error"] = repr(e)[:300]
                say(f"[{pname} N={N}] FlexAttention backward failed: {row['flex_bwd_error']}")
        fo = None
        _clear_grads(*qkv)

    # 4b. correctness
    status = "skipped"
    if not attnc_ok:
        status = "attnc ERROR: " + row["attnc_error"][:60]
    elif check:
        problems = []
        if not bool(torch.isfinite(attnc_out).all()):
            problems.append("non-finite output")
        if flex_out is not None:
            err = relative_error(attnc_out, flex_out)
            row["check_out_rel_err"] = _round(err, 6)
            row["check_reference"] = "flex"
            if not err <= rtol:
                problems.append(f"out {err:.2e}")
            if bwd_ok and attnc_g is not None and flex_g is not None:
                for gname, ga, gf in zip(("dq", "dk", "dv"), attnc_g, flex_g):
                    if ga is None or gf is None:
                        problems.append(f"{gname} missing")
                        continue
                    gerr = relative_error(ga, gf)
                    row[f"check_{gname}_rel_err"] = _round(gerr, 6)
                    if not gerr <= grad_rtol:
                        problems.append(f"{gname} {gerr:.2e}")
        else:
            try:
                err, how = _check_without_mask_mod(kern, q, k, v, inputs, attnc_out, B, H, N)
                row["check_out_rel_err"] = _round(err, 6)
                row["check_reference"] = how
                if not err <= rtol:
                    problems.append(f"out {err:.2e}")
            except Exception as e:  # noqa: BLE001
                problems.append(f"reference failed: {e!r}"[:200])
        status = "ok" if not problems else "FAIL " + "; ".join(problems)
        say(f"[{pname} N={N}] check: {status}")
    row["check"] = status
    del attnc_out, flex_out

    # 5. timing
    def timed(key: str, fn, rep_ms: float = rep, per_call: int = 1, grads: list | None = None) -> dict:
        """``time_stats`` of ``fn``; with ``clocks``, its SM clock and power go into ``row`` beside it."""
        st = time_stats(fn, warmup=warmup, rep=rep_ms, grad_to_none=grads, clocks=clocks)
        for name in CLOCK_KEYS:
            if name in st:
                row[f"{key}_{name}"] = st[name]
        return {**st, "median": st["median"] / per_call}

    row["attnc_fwd_ms"] = row["attnc_fwdbwd_ms"] = None
    try:
        if attnc_ok:
            st = timed("attnc_fwd", lambda: kern(q, k, v, **inputs))
            row["attnc_fwd_ms"], row["attnc_fwd_spread"] = _round(st["median"], 4), _round(st["spread"], 3)
            from .codegen import kernel_mode
            if on_cuda and kernel_mode(kern.ir) != "ranges":
                # The forward with its setup inside the timed call: the per-input cache dropped each time,
                # as for runtime inputs that change on every call.
                def uncached_fwd():
                    kern.__dict__.pop("_setup_cache", None)
                    kern(q, k, v, **inputs)
                st = timed("attnc_fwd_with_setup", uncached_fwd)
                row["attnc_fwd_with_setup_ms"] = _round(st["median"], 4)
                # The same, steadier: 20 calls back to back inside one timed region (the host may run ahead
                # of the device between calls, as in a model's layers), per call.
                # Against the cached forward timed the same way (L2 is cleared once per 20 calls in both).
                def uncached_loop():
                    for _ in range(20):
                        uncached_fwd()

                def cached_loop():
                    for _ in range(20):
                        kern(q, k, v, **inputs)
                st = timed("attnc_fwd_with_setup_loop", uncached_loop, rep * 4, per_call=20)
                row["attnc_fwd_with_setup_loop_ms"] = _round(st["median"], 4)
                st = timed("attnc_fwd_loop", cached_loop, rep * 4, per_call=20)
                row["attnc_fwd_loop_ms"] = _round(st["median"], 4)
        if bwd_ok:
            def attnc_fb():
                kern(q, k, v, **inputs).backward(dout)
            st = timed("attnc_fwdbwd", attnc_fb, grads=qkv)
            row["attnc_fwdbwd_ms"] = _round(st["median"], 4)
            row["attnc_fwdbwd_spread"] = _round(st["spread"], 3)
    except Exception as e:  # noqa: BLE001
        row["attnc_timing_error"] = repr(e)[:300]
        say(f"[{pname} N={N}] attnc timing failed: {row['attnc_timing_error']}")
    say(f"[{pname} N={N}] attnc timed: fwd {row['attnc_fwd_ms']} ms, fwd+bwd {row['attnc_fwdbwd_ms']} ms")

    if "flex" in vs:
        if bm is None:
            row.setdefault("flex_note", "FlexAttention not run (no mask_mod, or it failed)")
        else:
            flex = _flex(device)
            row["flex_setup_ms"] = _round(
                wall_ms(lambda: _create_block_mask(flex_mask_mod, flex_mask_bh, N, N, device)), 4)
            row["flex_fwd_ms"] = _round(timed("flex_fwd", lambda: flex(fq, fk, fv, block_mask=bm))["median"], 4)

            def flex_fb():
                flex(q, k, v, block_mask=bm).backward(dout)
            row["flex_fwdbwd_ms"] = (_round(timed("flex_fwdbwd", flex_fb, grads=qkv)["median"], 4)
                                     if flex_bwd_ok else None)
            say(f"[{pname} N={N}] flex timed: fwd {row['flex_fwd_ms']} ms, "
                f"fwd+bwd {row['flex_fwdbwd_ms']} ms")

    if "sdpa" in vs:
        if not sdpa_causal:
            row["sdpa_note"] = "skipped: SDPA is compared on dense causal only"
        else:
            import torch.nn.functional as F
            from torch.nn.attention import sdpa_kernel
            for label, backend in _sdpa_backends():
                try:
                    with sdpa_kernel([backend]):
                        st = timed(f"{label}_fwd", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
                        row[f"{label}_fwd_ms"] = _round(st["median"], 4)

                        def sdpa_fb():
                            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dout)
                        row[f"{label}_fwdbwd_ms"] = _round(timed(f"{label}_fwdbwd", sdpa_fb, grads=qkv)["median"], 4)
                except Exception as e:  # noqa: BLE001 - a backend may be missing on this GPU
                    row[f"{label}_error"] = repr(e)[:200]
            say(f"[{pname} N={N}] sdpa timed")

    # derived figures
    for who in ("attnc", "flex", "cudnn", "flash"):
        for mode in ("fwd", "fwdbwd"):
            ms = row.get(f"{who}_{mode}_ms")
            if ms is not None:
                row[f"{who}_{mode}_tflops"] = _round(
                    effective_tflops(B, H, N, N, D, dens, ms, fwdbwd=(mode == "fwdbwd")), 1)
    for who in ("flex", "cudnn", "flash"):
        for mode in ("fwd", "fwdbwd"):
            r = _ratio(row.get(f"{who}_{mode}_ms"), row.get(f"attnc_{mode}_ms"))
            if r is not None:
                row[f"attnc_vs_{who}_{mode}"] = r
    if row.get("attnc_setup_ms") is not None and row.get("attnc_fwd_ms"):
        row["attnc_setup_frac"] = _round(row["attnc_setup_ms"] / row["attnc_fwd_ms"], 4)
    if row.get("attnc_fwd_with_setup_ms") and row.get("attnc_fwd_ms"):
        # What the setup adds to a timed forward when it is not cached (SPEC section 6: <= 5% at 32k).
        row["attnc_setup_in_call_frac"] = _round(row["attnc_fwd_with_setup_ms"] / row["attnc_fwd_ms"] - 1, 4)
    if row.get("attnc_fwd_with_setup_loop_ms") and row.get("attnc_fwd_loop_ms"):
        row["attnc_setup_in_loop_frac"] = _round(row["attnc_fwd_with_setup_loop_ms"] / row["attnc_fwd_loop_ms"] - 1,
                                                 4)
    return row


def _check_without_mask_mod(kern, q, k, v, inputs, attnc_out, B, H, N) -> tuple[float, str]:
    """Relative error of ``attnc_out`` without a FlexAttention mask_mod to compare against."""
    if B * H * N * N <= (1 << 28):
        mask = kern.mask(N, N, batch=B, heads=H, **inputs)
        ref = masked_attention_reference(q, k, v, mask, compute_dtype=torch.float32)["out"]
        return relative_error(attnc_out, ref), "kern.mask + float32 attention"
    sliced = _slice_batch(kern, inputs, B)
    ref = kern.reference(q[:1].detach(), k[:1].detach(), v[:1].detach(), **sliced)
    return relative_error(attnc_out[:1], ref), "kern.reference on batch element 0"


# ----------------------------------------------------------------------------------------------
# The table


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _ratio_cell(r) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _pair(a, b, fmt=".2f") -> str:
    if a is None and b is None:
        return "-"
    return f"{_f(a, fmt)}/{_f(b, fmt)}"


def format_table(rows: list[dict]) -> str:
    """A short aligned table of :func:`bench_pattern` rows.

    Columns: pattern, N, density; forward effective TFLOP/s of attnc and FlexAttention and
    attnc's speed-up; the same for forward+backward; setup ms (attnc plan / create_block_mask);
    then, when some row has them, the speed-up over cuDNN (fwd/fwd+bwd), the SPEC target over
    FlexAttention with a verdict, attnc's throughput relative to its own dense causal, and the check.
    """
    cols: list[tuple[str, Callable[[dict], str], str]] = [
        ("pattern", lambda r: str(r.get("pattern")), "<"),
        ("N", lambda r: str(r.get("N")), ">"),
        ("B", lambda r: str(r.get("B")), ">"),
        ("density", lambda r: _f(r.get("density"), ".4f"), ">"),
        ("fwd attnc", lambda r: _f(r.get("attnc_fwd_tflops"), ".1f"), ">"),
        ("flex", lambda r: _f(r.get("flex_fwd_tflops"), ".1f"), ">"),
        ("x", lambda r: _ratio_cell(r.get("attnc_vs_flex_fwd")), ">"),
        ("f+b attnc", lambda r: _f(r.get("attnc_fwdbwd_tflops"), ".1f"), ">"),
        ("flex", lambda r: _f(r.get("flex_fwdbwd_tflops"), ".1f"), ">"),
        ("x", lambda r: _ratio_cell(r.get("attnc_vs_flex_fwdbwd")), ">"),
        ("setup ms a/flex", lambda r: _pair(r.get("attnc_setup_ms"), r.get("flex_setup_ms")), ">"),
    ]
    if any(r.get("attnc_vs_cudnn_fwd") is not None for r in rows):
        cols.append(("x cuDNN f/fb", lambda r: _pair(r.get("attnc_vs_cudnn_fwd"),
                                                      r.get("attnc_vs_cudnn_fwdbwd")), ">"))
    if any(r.get("target_vs_flex") is not None for r in rows):
        cols.append(("target", _target_cell, "<"))
    if any(r.get("vs_own_causal_fwd") is not None for r in rows):
        cols.append(("/causal f/fb", lambda r: _pair(r.get("vs_own_causal_fwd"),
                                                      r.get("vs_own_causal_fwdbwd")), ">"))
    cols.append(("check", lambda r: str(r.get("check", "-"))[:40], "<"))

    body, errors = [], []
    for r in rows:
        if r.get("error"):
            errors.append(r)
            continue
        body.append([fn(r) for _, fn, _ in cols])
    widths = [max([len(h)] + [len(line[i]) for line in body]) for i, (h, _, _) in enumerate(cols)]
    fmt_line = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if al == "<" else c.rjust(w) for c, w, (_, _, al) in zip(cells, widths, cols)).rstrip()
    lines = [fmt_line([h for h, _, _ in cols])]
    lines.append("-" * len(lines[0]))
    lines += [fmt_line(cells) for cells in body]
    for r in errors:
        lines.append(f"{r.get('pattern')}  N={r.get('N')}  ERROR: {str(r.get('error'))[:120]}")
    return "\n".join(lines)


def _target_cell(r: dict) -> str:
    need = r.get("target_vs_flex")
    if need is None:
        return "-"
    got = [r.get("attnc_vs_flex_fwd"), r.get("attnc_vs_flex_fwdbwd")]
    if any(g is None for g in got):
        return f">={need:g} ?"
    return f">={need:g} {'ok' if min(got) >= need else 'MISS'}"
