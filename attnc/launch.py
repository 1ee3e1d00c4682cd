"""Loading generated kernels (through the on-disk cache) and launching them."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch

from .analyze import PatternIR
from .errors import InputError
from .fastlaunch import launch as launch_kernel
from .flags import known

KERNEL_FORMAT = 2    # bump when the generated code's calling convention changes


def cache_dir() -> Path:
    return Path(os.environ.get("ATTNC_CACHE_DIR", Path.home() / ".cache" / "attnc"))


@functools.lru_cache(maxsize=1)
def generator_fingerprint() -> str:
    """A hash of the templates and code generator, so a changed generator never reuses old sources."""
    from .parse import _resource_text
    h = hashlib.sha256()
    for name in ("attn_common.py.j2", "attn_fwd.py.j2", "attn_bwd.py.j2"):
        try:
            h.update(_resource_text("attnc.templates", "templates", name).encode())
        except (FileNotFoundError, OSError):
            pass
    for mod in ("codegen.py", "interval.py", "plan.py", "evaluate.py"):
        h.update((Path(__file__).parent / mod).read_bytes())
    return h.hexdigest()[:16]


def source_key(pir: PatternIR, kind: str) -> str:
    from . import __version__
    text = (f"{kind}\n{pir.key_text()}\nversion {__version__}\nformat {KERNEL_FORMAT}\n"
            f"generator {generator_fingerprint()}")
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _checksum(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


def _atomic_write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".py")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)          # atomic on POSIX: readers see the old file or the new one
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def cached_source(pir: PatternIR, kind: str, render) -> tuple[str, Path]:
    """The kernel source for ``pir`` from the cache, rendering (and storing) it when absent or corrupt.

    Each file starts with a line holding the checksum of the rest; a file that does not match is
    regenerated, never trusted.
    """
    key = source_key(pir, kind)
    path = cache_dir() / "kernels" / f"{kind}_{key}.py"
    try:
        text = path.read_text()
        header, body = text.split("\n", 1)
        if header == f"# attnc-checksum: {_checksum(body)}":
            return body, path
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    body = render(pir)
    _atomic_write(path, f"# attnc-checksum: {_checksum(body)}\n{body}")
    return body, path


_modules: dict[str, object] = {}
_lock = threading.Lock()


def load_module(path: Path):
    """Import a generated kernel file (Triton's JIT needs the source in a real file)."""
    key = str(path)
    with _lock:
        if key not in _modules:
            name = f"attnc_generated_{path.stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            _modules[key] = module
        return _modules[key]


@dataclass(frozen=True)
class FwdConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False        # K/V (forward, dQ) or Q/dO (dK/dV) tiles through tensor descriptors (Hopper)
    dkdv: "FwdConfig | None" = None   # backward: the dK/dV kernel's own tiles (else the same as dQ's)
    head_group: int | None = None     # HEAD_GROUP of the launches (an autotune result); None: head_group()'s rule
    ws: bool = False         # forward: one warp-specialized loop (Hopper, ATTNC_WS=1), where ws_eligible allows it

    @property
    def dkdv_config(self) -> "FwdConfig":
        return self.dkdv or self


def _env_config(name: str) -> FwdConfig | None:
    """``ATTNC_FWD_CONFIG`` / ``ATTNC_BWD_CONFIG`` (sweeps), see :func:`parse_config`."""
    text = os.environ.get(name)
    return parse_config(text, name) if text else None


def parse_config(text: str, name: str = "a configuration") -> FwdConfig:
    """"block_m,block_n,num_warps,num_stages[,tma]"; for the backward, "dQ tiles/dK-dV tiles" gives the
    two kernels their own configurations. ``name`` says where the text came from, for the error."""
    if "/" in text:
        first, _, second = text.partition("/")
        a, b = (_parse_one(name, t, text) for t in (first, second))
        return FwdConfig(a.block_m, a.block_n, a.num_warps, a.num_stages, a.tma, b)
    return _parse_one(name, text, text)


def _parse_one(name: str, text: str, whole: str) -> FwdConfig:
    fields = [f.strip() for f in text.split(",")]
    flags = fields[4:]
    try:
        if len(fields) < 4 or flags not in ([], ["tma"], ["tma", "ws"]):
            raise ValueError
        bm, bn, warps, stages = (int(x) for x in fields[:4])
    except ValueError:
        raise InputError(f"{name} must be 'block_m,block_n,num_warps,num_stages' with an optional ',tma' or "
                         f"',tma,ws' (and for the backward an optional '/' and the dK/dV kernel's tiles), got "
                         f"{whole!r}") from None
    return FwdConfig(bm, bn, warps, stages, "tma" in flags, ws="ws" in flags)


def _ensure_allocator(device_type: str) -> None:
    """Descriptors built inside a kernel need a little global scratch memory. Triton keeps its allocator
    in a context variable, so each thread (autograd runs the backward in its own) needs one: set torch's
    allocator where none is set, and leave a caller's own allocator alone."""
    try:
        from triton.runtime import _allocation
        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):      # another Triton layout: always set ours
        pass
    import triton
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device_type))


@functools.lru_cache(maxsize=None)
def _major(device: torch.device) -> int:
    """The CUDA device's compute capability major, looked up once per device: torch asks the driver for all
    its properties on every call (~17 us), and a forward+backward asked up to ten times (RESULTS run 72)."""
    return torch.cuda.get_device_capability(device)[0]


def _tma_usable(cfg: FwdConfig, gathered: bool, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Tensor descriptors need rows addressed in order or in residue classes (not ``gathered`` through
    loaded positions), a unit last stride, and 16-byte aligned base and strides; anything else falls
    back to pointer loads."""
    if not cfg.tma or gathered or not (_descriptor_ok(k) and _descriptor_ok(v)):
        return False
    return _tma_available(cfg, k.device)


def _descriptor_ok(t: torch.Tensor) -> bool:
    """Whether tensor descriptors can address ``t``'s rows: a unit last stride, 16-byte aligned base and strides."""
    es = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and not any((s * es) % 16 for s in t.stride()[:-1])


def _tma_available(cfg: FwdConfig, device: torch.device) -> bool:
    """Whether a kernel of configuration ``cfg`` may make tensor descriptors on ``device``: the configuration
    takes them and the GPU has them (Hopper or later; the interpreter emulates them). Sets Triton's
    allocator for the descriptors' scratch."""
    if not cfg.tma or (device.type == "cuda" and _major(device) < 9):
        return False
    _ensure_allocator(device.type)
    return True


def host_rows(t: torch.Tensor, heads: int, rows: int, block: int, residue: int = 0):
    """A tensor descriptor over every head's rows of ``t`` ([B, heads, rows, D]), made on the host, for a
    kernel that reads blocks of ``block`` rows of one head at a time (in residue classes of ``residue`` rows
    where > 0), or None where the kernel must make its own, one per program (``tl.make_tensor_descriptor``).

    A descriptor made in the kernel writes 128 bytes to global memory and fences them before its first copy,
    in every program (NOTES item 73 measures what that costs); one made here is a kernel argument. It spans
    all heads, so a tile running past a head's last row would read the next head's rows instead of zeros: it
    is made only where no tile does (a head's rows, or each residue class's, a whole number of blocks), and
    only where the (batch, head) rows form one strided matrix (heads and batches at whole multiples of a
    head's rows; an expanded K/V with stride 0 across heads does not). ``ATTNC_HOST_DESC=0`` never makes one."""
    geometry = _host_geometry(t, heads, rows, block, residue)
    if geometry is None:
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor(t, *geometry, [block, t.shape[3]])


def _host_geometry(t: torch.Tensor, heads: int, rows: int, block: int, residue: int) -> tuple | None:
    """(shape, strides) of :func:`host_rows`' descriptor, or None where it makes none."""
    if os.environ.get("ATTNC_HOST_DESC", "1") == "0" or t.dim() != 4:
        return None
    B, H, N, D = t.shape
    sb, sh, sn, sd = t.stride()
    per = N // residue if residue > 0 else N
    if H != heads or N != rows or N == 0 or per % block or (residue > 0 and N % residue) or sd != 1:
        return None
    if (H > 1 and sh != N * sn) or (B > 1 and sb != H * N * sn):
        return None
    if t.data_ptr() % 16 or (sn * t.element_size()) % 16:
        return None
    if residue > 0:
        # Class c's rows of every head: one matrix of rows R * stride apart whose columns start at c * stride.
        return [B * H * per, (residue - 1) * sn + D], [residue * sn, 1]
    return [B * H * N, D], [sn, 1]


def host_row_pair(use_tma: bool, a: torch.Tensor, b: torch.Tensor, heads: int, rows: int, block: int,
                  residue: int = 0) -> tuple:
    """:func:`host_rows` of two tensors read tile by tile together (K and V, Q and dO) by a kernel that loads
    them through descriptors (``use_tma``, from :func:`_tma_usable`): both, or neither."""
    if not use_tma:
        return None, None
    da = host_rows(a, heads, rows, block, residue)
    db = host_rows(b, heads, rows, block, residue) if da is not None else None
    return (da, db) if db is not None else (None, None)


def _copies_enabled(device: torch.device) -> bool:
    """Rows moved by a layout transform may be copied into sorted order for tensor-descriptor loads
    (Hopper or the interpreter), unless ATTNC_SORTED_KV=0."""
    if os.environ.get("ATTNC_SORTED_KV", "1") == "0":
        return False
    return device.type != "cuda" or _major(device) >= 9


SORTED_COPY_MIN_KEYS = 8192    # keys (kept or not) from which kept keys are copied (RESULTS runs 11, 38, 79-80)


def _sorted_copies(cfg: FwdConfig, k: torch.Tensor, v: torch.Tensor, layout, side: str) -> bool:
    """Whether to copy the rows of ``k``, ``v`` that a layout transform moved into sorted order, for
    tensor-descriptor tiles that need not wait for the positions: K and V (``side`` 'k', streamed by the
    forward and dQ kernels) or Q and dO ('q', streamed by the dK/dV kernel). The copy (Layout.sorted_keys)
    reads only the key blocks some tile reads, so for compacted keys about half the rows; it pays when the
    kernels stream many full tiles. The host does not read the lists, so the rule is on what it knows:
    compacted keys, at least SORTED_COPY_MIN_KEYS of them. Measured: 32k (runs 11d-11f, 38: forward and dQ)
    and 8k (run 79: the forward kernel 18% faster on copies; runs 11 and 38 had lost at 8k with a
    torch.gather of every row, 2.5x the copy's time). Not hash buckets (run 11e: many partial tiles at bucket
    edges, whose positions are loaded anyway; run 83, with this copy: 8% slower forward at 8k).
    Never Q and dO. ATTNC_SORTED_KV=1 copies whenever descriptors can be used, 0 never."""
    if not cfg.tma or not _copies_enabled(k.device) or k.shape[-1] % 8 or v.shape[-1] % 8:
        return False
    if os.environ.get("ATTNC_SORTED_KV") == "1":
        return True
    keys = layout.transform.key_keys
    return (side == "k" and bool(keys) and all(key.kind == "keep" for key in keys)
            and k.shape[2] >= SORTED_COPY_MIN_KEYS)


def head_group(plain_lists: bool = False, chosen: int | None = None) -> int:
    """HEAD_GROUP of the attention kernels, the order their programs start in (`_program_coords` in the
    templates): 0 starts every head's first block before any head's second; G > 0 starts all blocks of G
    heads before the next G heads'. Programs of one head read the same K and V (forward, dQ) or Q and dO
    (dK/dV) rows, so started together they find them in L2. H200, B=4 x 16 heads at 8k (NOTES item 60):
    G = 1 ran causal, prefix-LM, window, hash buckets and kept keys 2-15% faster than 0, forward and f+b, and
    causal at 32k 3-4%; documents' plain list kernels (``plain_lists``) ran 2-7% slower, so they keep 0.
    ``chosen`` (a configuration's ``head_group``, from `attnc autotune`) replaces that rule, and
    ATTNC_HEAD_GROUP overrides everything."""
    value = _env_count("ATTNC_HEAD_GROUP", "heads")
    if value is not None:
        return value
    if chosen is not None:
        return chosen
    return LIST_HEAD_GROUP if plain_lists else HEAD_GROUP


def tail_programs(device: torch.device) -> int:
    """TAIL_PROGRAMS of the attention kernels (see `_program_coords`): the last heads start as one group of at
    least this many programs, so that their longest blocks do not start in the last wave. Two per SM on a
    GPU: of 0, 264, 528 and 1056 on the H200's 132 SMs, 264 ran causal and prefix-LM at 8k 1-4% faster than 0
    (forward and f+b), the window within the spread, causal at 32k the same (NOTES item 61). 0 elsewhere.
    ATTNC_TAIL_PROGRAMS overrides the default."""
    value = _env_count("ATTNC_TAIL_PROGRAMS", "programs")
    if value is not None:
        return value
    return 2 * _multiprocessors(device) if device.type == "cuda" else 0


def _env_count(name: str, unit: str) -> int | None:
    """The whole number >= 0 that environment variable ``name`` holds, None when unset or empty."""
    text = os.environ.get(name, "")
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{name} must be a whole number of {unit} >= 0, not {text!r}")
    return value


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


HEAD_GROUP = 1          # one head's blocks at a time
LIST_HEAD_GROUP = 0     # plain tile-list kernels (documents): every head's first block first


def wide_rows(*tensors: torch.Tensor) -> bool:
    """Whether a row offset inside one (batch, head) can reach 2^31 elements in any of these tensors: then
    the kernels index rows in 64 bits, else in 32 (the batch and head offsets are always 64-bit)."""
    return any((t.shape[-2] - 1) * abs(t.stride(-2)) + (t.shape[-1] - 1) * abs(t.stride(-1)) >= 2**31 - 1
               for t in tensors if t.numel())


def _residue(layout, n_q: int, n_k: int, cfg: FwdConfig) -> int:
    """The residue-class modulus the permuted kernels may compute rows from (Layout.residue_classes)."""
    return 0 if layout is None else layout.residue_classes(n_q, n_k, cfg.block_m, cfg.block_n)


def _gathered(layout, residue: int, side: str) -> bool:
    """Whether the kernels read the rows of ``side`` ('q' or 'k') through loaded positions: a layout
    transform moved them, and not into block-aligned residue classes. Then no tensor descriptors."""
    if layout is None or residue:
        return False
    return not (layout.q_identity if side == "q" else layout.k_identity)


def _chosen_config(kind: str, head_dim: int, head_dim_v: int, device: torch.device, dtype: torch.dtype,
                   key, seq) -> FwdConfig | None:
    """A configuration chosen before the default table: the environment override, the interpreter's
    small tiles, or an `attnc autotune` result; None when the table decides."""
    override = _env_config(f"ATTNC_{kind.upper()}_CONFIG")
    if override is not None and device.type == "cuda":
        return override
    if device.type != "cuda":
        return FwdConfig(32, 32, 4, 1)
    if key is not None:
        from .tuning import lookup
        return lookup(kind, key, device, dtype, (head_dim, head_dim_v), seq)
    return None


def forward_config(head_dim: int, head_dim_v: int, device: torch.device, dtype: torch.dtype,
                   sparse: bool = False, key=None, seq: int | None = None, gathers: str = "",
                   host_rows=False) -> FwdConfig:
    """Default tiles: a table per GPU family (measured on an H200, benchmarks/NOTES.md), small tiles
    under the interpreter. ``sparse`` (tile lists, or a narrow band such as a sliding window: few key
    tiles per query block) prefers smaller tiles: fewer partial tiles, more programs. ``gathers``: the
    score (``"score"``) or the mask (``"mask"``) reads an input tile per score tile
    (:func:`attnc.codegen.tile_gathers`). ``host_rows`` (a bool, or a function giving it, asked only where
    the table needs it): a narrow call's K and V rows stream in order (or in residue classes) in whole
    blocks, through descriptors made on the host (:func:`host_rows`).
    With ``key`` (a Kernel or its pattern key) and ``seq`` (max(Nq, Nk)), an `attnc autotune` result for
    this GPU, dtype, head dim and sequence bucket wins over the table (attnc/tuning.py)."""
    chosen = _chosen_config("fwd", head_dim, head_dim_v, device, dtype, key, seq)
    if chosen is not None:
        return chosen
    return forward_table(head_dim, head_dim_v, dtype, _major(device), sparse, gathers, host_rows)


def call_forward_config(kern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> FwdConfig:
    """:func:`forward_config` for a call of ``kern`` on ``q``, ``k``, ``v``: its tuned result for these lengths,
    or the table's tiles for the pattern's band width and gathers."""
    from .codegen import tile_gathers
    n_q, n_k = q.shape[2], k.shape[2]
    sparse = prefers_small_tiles(kern, n_q, n_k)
    return forward_config(q.shape[3], v.shape[3], q.device, q.dtype, sparse=sparse, key=kern, seq=max(n_q, n_k),
                          gathers=tile_gathers(kern.ir), host_rows=lambda: _streams_host_rows(kern, k, v, n_q))


_NARROW = FwdConfig(64, 64, 4, 3)      # the narrow forward's tiles (forward_table)


def _streams_host_rows(kern, k: torch.Tensor, v: torch.Tensor, n_q: int) -> bool:
    """Whether a narrow forward of ``kern`` streams K and V in order (a closed-form plan) or in residue classes
    in closed form, in whole blocks of :data:`_NARROW`'s rows, so that host descriptors can serve it."""
    from .codegen import kernel_mode
    mode = kernel_mode(kern.ir)
    if mode == "ranges":
        residue = 0
    elif mode != "permuted" or not (residue := residue_ranges(kern, n_q, k.shape[2], _NARROW)):
        return False
    return all(_host_geometry(t, k.shape[1], k.shape[2], _NARROW.block_n, residue) is not None for t in (k, v))


def forward_table(head_dim: int, head_dim_v: int, dtype: torch.dtype, major: int, sparse: bool,
                  gathers: str = "", host_rows=False) -> FwdConfig:
    """The default forward tiles for a GPU of compute capability ``major`` (no device needed)."""
    d = max(head_dim, head_dim_v)
    if dtype == torch.float32:
        return FwdConfig(64, 32, 4, 2) if d > 64 else FwdConfig(64, 64, 4, 2)
    if gathers == "score":
        # A score gathering an input tile per score tile (a relative bias): pipelined, the kernel needs more
        # shared memory (361 KB at 128 x 128 w8 s3) and ran 2.4x slower than one stage deep (relative bias at
        # 8k on the H200, RESULTS.md runs 94-96: 64 x 128 w4 s1 5.5 ms, 128 x 64 w8 s3 13.7 ms).
        if major >= 9 and d <= 128:
            return FwdConfig(64, 64 if sparse else 128, 4, 1, tma=True)
        c = forward_table(head_dim, head_dim_v, dtype, major, sparse)
        return FwdConfig(c.block_m, c.block_n, c.num_warps, 1, c.tma)
    if major >= 9:
        # Hopper (H200 sweeps, benchmarks/RESULTS.md runs 6 and 43): tensor-descriptor loads for wide tiles.
        # Narrow bands and tile lists (64 x 64) load K and V by pointers: since rows are 32-bit offsets (run
        # 10d) that is 3-8% faster than descriptors made in the kernel for the window, documents and the
        # dilated window (run 43). Where the host can make them (host_rows: closed-form bands and residue
        # classes in whole blocks), descriptors beat pointers again: 1-4% (runs 111-112; not tile lists).
        if sparse and d <= 128:
            # A dense mask (m[b, q, k]) gathers a byte tile in every partial tile: two stages ran 10-19%
            # faster than three (RESULTS run 101).
            return FwdConfig(64, 64, 4, 2 if gathers == "mask" else 3,
                             tma=bool(host_rows() if callable(host_rows) else host_rows))
        if d <= 64:
            return FwdConfig(128, 64, 4, 3)          # measured in session 1; TMA untested at D=64
        if d <= 128:
            # The warp-specialized loop (FwdConfig.ws, ATTNC_WS=1) ran 7-10% faster here but wrote wrong rows
            # at 4k tokens and more with Triton 3.6 (NOTES item 79): not the default.
            return FwdConfig(128, 128, 8, 3, tma=True)
        return FwdConfig(128, 64, 8, 2, tma=True)    # D=256 (H200, RESULTS.md run 10: TMA 4% faster)
    if d <= 64:
        return FwdConfig(128, 64, 4, 3)
    if d <= 128:
        return FwdConfig(128, 32, 4, 2)
    return FwdConfig(64, 32, 4, 1)


def ws_enabled() -> bool:
    """Whether warp-specialized forwards may run on a GPU: ``ATTNC_WS=1`` (experimental; NOTES item 79: with
    Triton 3.6 on the H200 the specialized kernel wrote wrong rows from 4k tokens on) and a Triton that has
    the Hopper pass. The interpreter runs the same loop unspecialized whatever this says."""
    return os.environ.get("ATTNC_WS") == "1" and triton_has_hopper_ws()


@functools.lru_cache(maxsize=None)
def triton_has_hopper_ws() -> bool:
    """Whether this Triton warp-specializes loops on Hopper (``tl.range(..., warp_specialize=True)`` and the
    Hopper pass behind it, 3.6 on the lent GPU; NOTES item 79)."""
    import inspect

    import triton
    import triton.language as tl
    try:
        major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (3, 6) and "warp_specialize" in inspect.signature(tl.range.__init__).parameters


def ws_fallback(cfg: FwdConfig) -> FwdConfig:
    """The tiles a warp-specialized configuration runs with where the plan or the call cannot take it: the
    same blocks on 8 warps, 3 stages (the Hopper default before NOTES item 79)."""
    return replace(cfg, num_warps=8, num_stages=3, ws=False)


def ws_eligible(kern, n_q: int, n_k: int, cfg: FwdConfig, device: torch.device) -> bool:
    """Whether the forward of ``kern`` at these lengths can run ``cfg``'s warp-specialized loop: a closed-form
    plan (no lists, no layout) where every query block has at most one partial tile, 128-row query blocks
    (two consumer warpgroups of 64 rows), and on a GPU a Hopper one with a Triton that specializes (the
    interpreter runs the same loop unspecialized); on a GPU only with :func:`ws_enabled`. The plan is counted on
    the host, once per shape."""
    from .codegen import kernel_mode
    if not cfg.ws or cfg.block_m != 128:
        return False
    if device.type == "cuda" and (_major(device) != 9 or not ws_enabled()):
        return False
    cache = kern.__dict__.setdefault("_ws_eligible", {})
    key = (n_q, n_k, cfg.block_m, cfg.block_n)
    if key not in cache:
        cache[key] = kernel_mode(kern.ir) == "ranges" and max_partial_tiles(kern.ir, n_q, n_k, cfg.block_m,
                                                                            cfg.block_n) <= 1
    return cache[key]


def max_partial_tiles(pir, n_q: int, n_k: int, block_m: int, block_n: int) -> int:
    """The most tiles a query block's closed-form loop bounds (the kernels' ``_loop_bounds``: the hull of the
    disjuncts' ranges and the largest full range in it) leave to mask, over every query block."""
    from .plan import static_block_ranges
    ranges = static_block_ranges(pir, n_q, n_k, block_m, block_n)
    lo, hi, flo, fhi = ranges[0]
    if len(ranges) > 1:
        active = hi > lo
        lo, hi = torch.where(active, lo, torch.iinfo(torch.int64).max), torch.where(active, hi, -1)
        for lo_i, hi_i, flo_i, fhi_i in ranges[1:]:
            active = hi_i > lo_i
            lo = torch.where(active, torch.minimum(lo, lo_i), lo)
            hi = torch.where(active, torch.maximum(hi, hi_i), hi)
            bigger = (fhi_i - flo_i) > (fhi - flo)
            flo, fhi = torch.where(bigger, flo_i, flo), torch.where(bigger, fhi_i, fhi)
        nothing = hi <= lo
        lo, hi = torch.where(nothing, 0, lo), torch.where(nothing, 0, hi)
    flo = torch.minimum(torch.maximum(flo, lo), hi)
    fhi = torch.minimum(torch.maximum(fhi, flo), hi)
    full = torch.clamp(fhi - flo, min=0)
    return int(((hi - lo) - full).max()) if len(lo) else 0


NARROW_KEYS = 2048


def prefers_small_tiles(kern, n_q: int, n_k: int) -> bool:
    """Whether a call runs on small tiles: tile lists and layout transforms always; closed-form plans
    when the band is narrow (on average fewer than NARROW_KEYS keys per query block, counted on
    128 x 128 tiles), where large tiles would mostly be partial. Cached per (n_q, n_k)."""
    from .codegen import kernel_mode
    if "_narrow_ir" not in kern.__dict__:         # the pattern whose static plan decides, once per kernel
        mode = kernel_mode(kern.ir)
        kern.__dict__["_narrow_ir"] = (kern.ir if mode == "ranges" else
                                       _compacted_remainder(kern.ir) if mode == "permuted" else None)
    pir = kern.__dict__["_narrow_ir"]
    if pir is None:
        return True
    cache = kern.__dict__.setdefault("_narrow", {})
    if (n_q, n_k) not in cache:
        from .plan import static_plan
        if len(cache) > 64:
            cache.clear()
        plan = static_plan(pir, n_q, n_k, 1, 1, 128, 128)
        n_qblocks = max(1, math.ceil(n_q / 128))
        visited = (plan.tiles["full"] + plan.tiles["partial"]) / n_qblocks
        cache[(n_q, n_k)] = visited * 128 < NARROW_KEYS
    return cache[(n_q, n_k)]


def _compacted_remainder(pir: PatternIR) -> PatternIR | None:
    """A pattern whose only layout transform is compaction (kept keys / queries, e.g. ``kept(keep) and
    causal``): the pattern without the kept-flag conjuncts, when what is left reads no runtime input.
    The kept rows are dense after compaction, so their tiles follow that static remainder (causal: wide
    tiles; 128 x 128 measured 8% faster than 64 x 64 for 50% kept keys at 32k, RESULTS.md run 10).
    None for every other permuted pattern (buckets, residue classes: small tiles)."""
    import dataclasses

    from . import ir
    from .plan import layout_transform
    transform = layout_transform(pir.mask)
    if transform is None or any(key.kind != "keep" for key in transform.query_keys + transform.key_keys):
        return None
    conjuncts = list(pir.mask.args) if pir.mask.op == "and" else [pir.mask]
    rest = [c for c in conjuncts if ir.atom_kind(c) != "tensor-bool"]
    mask = ir.and_(*rest)
    if ir.uses(mask, "read"):
        return None
    return dataclasses.replace(pir, mask=mask)


MAX_GRID_Y = 65535          # CUDA's limit on a grid's second dimension (the blocks of one sequence)


def check_grid(blocks: int, block: int, n: int, what: str, device: torch.device) -> None:
    """An InputError, not a failed launch, when one sequence needs more blocks than a CUDA grid holds."""
    if device.type == "cuda" and blocks > MAX_GRID_Y:
        raise InputError(f"{n} {what} make {blocks} blocks of {block}, more than the {MAX_GRID_Y} a CUDA grid "
                         f"allows along one sequence (at most {MAX_GRID_Y * block} {what} with these tiles); "
                         f"split the sequence or use larger tiles (ATTNC_FWD_CONFIG / ATTNC_BWD_CONFIG)")


def input_launch_args(pir: PatternIR, inputs: dict) -> list:
    """Pointer, strides and sizes of each runtime input, in declaration order (bools as uint8)."""
    args = []
    for name, decl in pir.inputs.items():
        t = inputs[name]
        if t.dtype == torch.bool:
            t = t.view(torch.uint8)
        args.append(t)
        args.extend(t.stride(i) for i in range(t.dim()))
        args.extend(t.shape[i] for i in range(t.dim()))
    return args


def list_args(lists, guard: torch.Tensor | None = None) -> list:
    """Kernel arguments of a TileLists: run, index and count tensors, their batch/head extents, widths,
    and the guard flag of a variant launched beside another (see :func:`variants`)."""
    return [lists.full_run, lists.full_idx, lists.full_cnt, lists.part_idx, lists.part_cnt, lists.full_idx.shape[0],
            lists.full_idx.shape[1], lists.full_idx.shape[-1], lists.part_idx.shape[-1],
            guard if guard is not None else lists.full_cnt]


def padded(layout, n_q: int, n_k: int) -> bool:
    """Whether a layout's sorted order holds padding rows (buckets padded to whole blocks): the permuted
    kernels then tell real rows by position, not by sorted index (a constexpr, PADDED)."""
    return layout is not None and (layout.rows_q != n_q or layout.rows_k != n_k)


def position_args(layout) -> list:
    """Kernel arguments of a permuted launch: the original positions of the sorted rows per (batch, query
    head), how many sorted rows each side has (more than Nq, Nk where buckets are padded), and the flag
    "every block holds one bucket id" (``Layout.pure``; read only when the launch passes
    BUCKET_PURE >= 0, see :func:`pure_variants`)."""
    pure = layout.pure if layout.pure is not None else layout.qpos
    return [layout.qpos, layout.kpos, layout.rows_q, layout.rows_k, pure]


def pure_variants(layout) -> tuple:
    """BUCKET_PURE of the permuted kernels launched on ``layout``: (-1,), the bucket test in every partial
    tile; or, for a pattern with a bucket conjunct whose setup made the flag ``Layout.pure``, (0, 1): the
    kernel is launched with the test (0) and without it (1), each running only where the flag holds its
    value (the other launch's programs return at once); or only the one the flag picks, once the host
    knows its value (attnc.flags)."""
    if layout is None or layout.pure is None:
        return (-1,)
    value = known(layout.pure)
    return (value,) if value in (0, 1) else (0, 1)


def residue_ranges(kern, n_q: int, n_k: int, *configs: FwdConfig) -> int:
    """d when a call of this pattern runs its residue classes in closed form (the permuted kernels with
    class-local key ranges, ``attnc.plan.residue_local_mask``): the pattern allows it, and every class
    is a whole number of blocks of each configuration's tiles. 0: the layout and tile lists path.
    ``ATTNC_RESIDUE_RANGES=0`` turns it off (A/B runs)."""
    if os.environ.get("ATTNC_RESIDUE_RANGES", "1") == "0":
        return 0
    from .plan import residue_local_mask
    local = residue_local_mask(kern.ir.mask)
    if local is None:
        return 0
    d = local[0]
    aligned = all(n_q % (d * c.block_m) == 0 and n_k % (d * c.block_n) == 0
                  for cfg in configs for c in (cfg, cfg.dkdv_config))
    return d if aligned else 0


_POSITIONS: dict = {}


def _computed_positions(device: torch.device, n_q: int, n_k: int) -> list:
    """Position arguments of a permuted kernel whose rows are computed (residue classes in closed form):
    the position tables are never read, so a one-element placeholder stands in for both."""
    if device not in _POSITIONS:
        _POSITIONS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return [_POSITIONS[device], _POSITIONS[device], n_q, n_k, _POSITIONS[device]]


def variants(layout, resolve: bool = True) -> list[tuple[bool, int]]:
    """The kernels a permuted-mode call launches, as (permuted, guard): the permuted kernel alone (guard
    -1); or, when the device setup could not tell the host whether any row moved (``layout.in_place``),
    both the plain list kernel and the permuted one, each returning at once unless the flag holds its
    guard value (1: nothing moved; 0: rows moved). The skipped variant costs a launch of empty programs,
    so once the host knows the flag (attnc.flags; ``resolve``), only the one it picks runs, unguarded."""
    if layout.identity:
        return [(False, -1)]
    if layout.in_place is not None:
        moved = known(layout.in_place) if resolve else None
        if moved in (0, 1):
            return [(moved == 0, -1)]
        return [(False, 1), (True, 0)]
    return [(True, -1)]


class _ForwardLaunch(NamedTuple):
    """One variant of the forward kernel to launch."""
    module: object              # the generated forward module
    extra: list                 # list and position arguments
    k: torch.Tensor             # K, V as the kernel reads them (expanded per query head, or sorted copies)
    v: torch.Tensor
    heads_kv: int
    guard: int                  # -1: unguarded; else the flag value this variant runs on
    residue: int                # residue classes of the streamed key rows (0: none)
    gathered: bool              # keys read through loaded positions (no tensor descriptors)
    pure: int                   # BUCKET_PURE (see pure_variants)
    plain_lists: bool           # the plain tile-list kernel (see head_group)
    rows_k: int                 # key rows per head as the kernel walks them (more than Nk where padded)


def forward_launches(kern, q, k, v, *, sizes: dict, inputs: dict, config: FwdConfig):
    """The forward's per-call setup: tile lists (runtime-input patterns) or the layout transform, cached
    per shape and input tensors by the kernel. Returns (layout, launches): a _ForwardLaunch per kernel
    variant to run."""
    from .codegen import kernel_mode
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    mode = kernel_mode(kern.ir)
    if mode == "ranges":
        return None, [_ForwardLaunch(kern._forward_module(), [], k, v, Hkv, -1, 0, False, -1, False, Nk)]
    if mode == "lists":
        lists = kern._tile_lists(Nq, Nk, B, Hq, config.block_m, config.block_n, sizes, inputs, q.device)
        return None, [_ForwardLaunch(kern._forward_module(), list_args(lists), k, v, Hkv, -1, 0, False, -1, True, Nk)]
    residue = residue_ranges(kern, Nq, Nk, config)
    if residue:
        # Residue classes in closed form: no setup, no lists, rows computed from the sorted index.
        return None, [_ForwardLaunch(kern._forward_module("residue"), _computed_positions(q.device, Nq, Nk), k, v,
                                     Hkv, -1, residue, False, -1, False, Nk)]
    layout = kern._layout(B, Hq, Hkv, Nq, Nk, config.block_m, config.block_n, sizes, inputs, q.device)
    lists = layout.lists(False)
    launches = []
    for permuted, guard in variants(layout):
        if not permuted:
            # Nothing moved (e.g. documents already contiguous): the plain list kernel, same tile lists.
            launches.append(_ForwardLaunch(kern._forward_module("lists"), list_args(lists, layout.in_place), k, v,
                                           Hkv, guard, 0, False, -1, True, Nk))
            continue
        kx, vx = layout.expand_kv_heads(k), layout.expand_kv_heads(v)
        residue = _residue(layout, Nq, Nk, config)
        gathered = _gathered(layout, residue, "k")
        if gathered and _sorted_copies(config, kx, vx, layout, "k"):
            # Keys moved by a sort or compaction: copy K and V in sorted order once, so every tile is a
            # tensor-descriptor load that does not wait for the positions (they only feed the mask).
            kx, vx = layout.sorted_keys(kx, config.block_n), layout.sorted_keys(vx, config.block_n)
            gathered = False
        for pure in pure_variants(layout):
            launches.append(_ForwardLaunch(kern._forward_module(), list_args(lists, layout.in_place)
                                           + position_args(layout), kx, vx, layout.kv_heads(Hq, Hkv), guard, residue,
                                           gathered, pure, False, layout.rows_k))
    return layout, launches


# Configurations a device could not hold, per (kernel, kind, head dims, dtype, device, configuration asked
# for): the smaller one that launched (within_resources).
_FITTED: dict[tuple, tuple] = {}


def _smaller(cfg: FwdConfig) -> FwdConfig | None:
    """The next configuration to try when ``cfg``'s kernel needs more shared memory (or registers) than the
    device has: the key block halved (down to 32), then one pipeline stage fewer (down to 1), then the
    query block halved (down to 32); both backward kernels shrink together. None when nothing is left."""
    def one(c: FwdConfig) -> FwdConfig | None:
        if c.block_n > 32:
            return FwdConfig(c.block_m, c.block_n // 2, c.num_warps, c.num_stages, c.tma)
        if c.num_stages > 1:
            return FwdConfig(c.block_m, c.block_n, c.num_warps, c.num_stages - 1, c.tma)
        if c.block_m > 32:
            return FwdConfig(c.block_m // 2, c.block_n, min(c.num_warps, 4), c.num_stages, c.tma)
        return None
    plain = FwdConfig(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.tma)
    first, second = one(plain), cfg.dkdv and one(cfg.dkdv)
    if first is None and second is None:
        return None
    first = first or plain
    return FwdConfig(first.block_m, first.block_n, first.num_warps, first.num_stages, first.tma,
                     cfg.dkdv and (second or cfg.dkdv), cfg.head_group)


def within_resources(kind: str, kern, q: torch.Tensor, v: torch.Tensor, cfg: FwdConfig, run, reset=None,
                     shrink: bool = True):
    """``run(cfg, shrunk)`` with ``cfg`` or, where the device cannot hold its kernel (Triton's
    OutOfResources, raised at a kernel's first launch, before it runs), with the next smaller configurations
    (:func:`_smaller`) until one launches (a score that gathers a tile of an input, pipelined deep, asked
    for 361 KB on an H200; a tuned configuration may come from a bigger GPU). What launched is remembered,
    so later calls go to it directly, and a warning names both once. ``reset()`` runs before each retry
    (undoing what a launch that stopped half-way added). ``shrink=False`` (a configuration the caller
    named: autotune, sweeps) runs ``cfg`` or raises."""
    if q.device.type != "cuda" or not shrink:
        return run(cfg, False)
    from triton.runtime.errors import OutOfResources

    def key():                  # built only where something did not fit: calls that fit pay nothing
        return (id(kern.ir), kind, q.shape[-1], v.shape[-1], q.dtype, q.device, cfg)
    fitted = _FITTED.get(key()) if _FITTED else None
    if fitted is not None:
        return run(fitted[1], True)
    tried, error = cfg, None
    while True:
        try:
            result = run(tried, tried is not cfg)
        except OutOfResources as e:
            error, tried = e, _smaller(tried)
            if tried is None:
                raise
            if reset is not None:
                reset()
            continue
        if error is not None:
            import warnings
            from .tuning import config_text
            _FITTED[key()] = (kern.ir, tried)     # the IR kept alive, so that its id is not reused
            warnings.warn(f"attnc: pattern '{kern.ir.name}': the {kind} kernel with {config_text(cfg)} needs "
                          f"{error.required} bytes of {error.name}, more than this GPU has ({error.limit}); "
                          f"using {config_text(tried)} (`attnc autotune` picks the fastest that fits)",
                          stacklevel=4)
        return result


def launch_forward(kern, q, k, v, *, scale: float, sizes: dict, inputs: dict, config: FwdConfig | None = None,
                   out: torch.Tensor | None = None):
    """Run the forward kernel; returns (out, lse, plan_state)."""
    if q.device.type != "cuda" and q.dtype == torch.bfloat16:
        # Triton's interpreter multiplies bf16 tiles as raw 16-bit integers: run it in float32.
        out32, lse, state = launch_forward(kern, q.float(), k.float(), v.float(), scale=scale, sizes=sizes,
                                           inputs=inputs, config=config)
        return out32.to(torch.bfloat16), lse, state
    cfg = config or call_forward_config(kern, q, k, v)
    return within_resources("forward", kern, q, v, cfg,
                            lambda c, _: _launch_forward(kern, q, k, v, scale, sizes, inputs, c, out),
                            shrink=config is None)


def _launch_forward(kern, q, k, v, scale: float, sizes: dict, inputs: dict, cfg: FwdConfig,
                    out: torch.Tensor | None):
    pir = kern.ir
    B, Hq, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    if out is None:
        out = torch.empty(B, Hq, Nq, Dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, Nq, device=q.device, dtype=torch.float32)
    if Nq == 0 or B * Hq == 0:
        return out, lse, None
    check_grid(math.ceil(Nq / cfg.block_m), cfg.block_m, Nq, "queries", q.device)
    qk_scale = scale * 1.4426950408889634
    ws = ws_eligible(kern, Nq, Nk, cfg, q.device)
    layout, launches = forward_launches(kern, q, k, v, sizes=sizes, inputs=inputs, config=cfg)
    # Query blocks of the sorted order: more than Nq / block_m where buckets are padded to whole blocks.
    grid = (B * Hq, math.ceil((layout.rows_q if layout is not None else Nq) / cfg.block_m))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    tail = tail_programs(q.device)
    for module, extra, kx, vx, heads_kv, guard, residue, gathered, pure, plain_lists, rows_k in launches:
        use_tma = _tma_usable(cfg, gathered, kx, vx)
        kd, vd = host_row_pair(use_tma, kx, vx, heads_kv, rows_k, cfg.block_n, residue)
        # The warp-specialized loop reads Q, K and V and writes O through descriptors on a GPU.
        specialized = ws and (q.device.type != "cuda" or (use_tma and _descriptor_ok(q) and _descriptor_ok(out)))
        run_cfg = cfg if specialized or not cfg.ws else ws_fallback(cfg)
        launch_kernel(module.attnc_fwd, grid,
            q, kx, vx, out, lse, kd, vd,
            *q.stride(), *kx.stride(), *vx.stride(), *out.stride(),
            B, Hq, heads_kv, Nq, Nk, scale, qk_scale,
            *extra,
            *input_launch_args(pir, inputs),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=D, HEAD_DIM_V=Dv,
            REVERSE=True, USE_TMA=use_tma, HOST_DESC=kd is not None, WIDE_ROWS=wide_rows(kx, vx), RESIDUE=residue,
            PADDED=padded(layout, Nq, Nk), POS_SCALE=scale > 0,
            GUARD=guard, DOT_PRECISION=precision, BUCKET_PURE=pure,
            HEAD_GROUP=head_group(plain_lists, cfg.head_group), TAIL_PROGRAMS=tail, WS=specialized,
            num_warps=run_cfg.num_warps, num_stages=run_cfg.num_stages,
        )
    return out, lse, layout


def _guard_flag(fwd_lists, bwd_lists, in_place: torch.Tensor | None) -> torch.Tensor:
    """The backward kernels' guard flag, int32 [1] on the device: bit 1 set when a row of either lists has
    full tiles past its leading run, bit 0 the layout's "nothing moved" (``in_place``, if any). Made once per
    pair of lists and kept with the (cached) transposed ones, so later calls neither remake it nor meet a new
    flag the host has not seen (attnc.flags)."""
    made = bwd_lists.__dict__.setdefault("_guard_flags", [])
    for lists, moved, flag in made:
        if lists is fwd_lists and moved is in_place:
            return flag
    flag = (torch.maximum(fwd_lists.rest_max, bwd_lists.rest_max) > 0).to(torch.int32) * 2
    if in_place is not None:
        flag = flag + in_place
    made.append((fwd_lists, in_place, flag))
    return flag


class _BackwardLaunch(NamedTuple):
    """One variant of the two backward kernels: what they read and write, and how they are specialized."""
    module: object              # the generated backward module (plain list or permuted kernels)
    fwd_extra: list             # the dQ kernel's list and position arguments
    bwd_extra: list             # the dK/dV kernel's (transposed lists)
    config: FwdConfig
    k: torch.Tensor             # K, V as the kernels read them (expanded per query head when needed)
    v: torch.Tensor
    q: torch.Tensor
    dout: torch.Tensor
    heads_kv: int
    guard: int                  # -1: unguarded; else the flag value this variant runs on
    residue: int                # residue classes of the dQ / dK-dV kernel's streamed rows (0: none)
    residue2: int
    copy_k: bool                # K, V (Q, dO) read from copies in sorted order
    copy_q: bool
    gathered_k: bool            # K, V (Q, dO) read through loaded positions (no tensor descriptors)
    gathered_q: bool
    dk: torch.Tensor            # where dK, dV go (expanded per query head when K, V are)
    dv: torch.Tensor
    full_runs: bool = False
    sorted_rows: bool = False   # both kernels walk one order of the query rows (the identity for kernels that
                                # read rows in order): lse2 and delta are kept in it, a block's values contiguous
    pure: tuple = ((-1,), (-1,))  # BUCKET_PURE launches of the dQ and of the dK/dV kernel (see pure_variants)
    plain_lists: bool = False   # the plain tile-list kernels (see head_group)
    rows: tuple = (0, 0)        # rows per head the permuted kernels walk: the dQ kernel's keys, the dK/dV
                                # kernel's queries (0: Nk, Nq, as the plain kernels do)


def _backward_variants(launches, flag: torch.Tensor | None):
    """Each backward launch of ``launches`` (guard -1: the only one; >= 0: its "nothing moved" bit) as the
    variants to run: list kernels go twice, FULL_RUNS (every row's full tiles are its run: counted, not
    loaded) and not, each guarded by bit 1 of the guard ``flag``. Once the host knows the flag's value
    (attnc.flags), only the variant it picks runs, unguarded."""
    value = known(flag)
    for launch in launches:
        if launch.guard < 0:
            yield launch
            continue
        for runs in (True, False):
            guard = launch.guard + (0 if runs else 2)
            if value is None:
                yield launch._replace(guard=guard, full_runs=runs)
            elif value == guard:
                yield launch._replace(guard=-1, full_runs=runs)


def backward_config(head_dim: int, head_dim_v: int, device: torch.device, dtype: torch.dtype,
                    key=None, seq: int | None = None, gathered: tuple[bool, bool] = (False, False),
                    gathers: str = "") -> FwdConfig:
    """Default tiles of the backward kernels (an `attnc autotune` result first, as in forward_config).
    On Hopper: 64 x 64 tiles, 4 warps, 2 stages, tensor-descriptor loads (the best or within 3% of the
    best of the H200 sweeps for causal, window, documents and prefix-LM, benchmarks/RESULTS.md run 8).
    ``gathered`` = (keys, queries) read through loaded positions by a layout transform: the dQ kernel
    streams keys, the dK/dV kernel queries, and a kernel streaming gathered rows pipelines 3 deep.
    ``gathers == "score"``: the score reads an input tile per score tile (see forward_table): one stage. (A
    dense mask's backward keeps the defaults: they ran fastest, RESULTS run 101.)"""
    chosen = _chosen_config("bwd", head_dim, head_dim_v, device, dtype, key, seq)
    if chosen is not None:
        return chosen
    d = max(head_dim, head_dim_v)
    if dtype == torch.float32:
        return FwdConfig(32, 32, 4, 1)
    major = _major(device)
    if gathers == "score" and d <= 128:
        # Both kernels one stage deep, pointer loads: 18.1 ms for a relative bias's backward at 8k with the
        # bias's gradient, against 45.8 ms two stages deep with descriptors (H200, RESULTS.md run 94).
        return FwdConfig(64, 64, 4, 1)
    if d > 128:
        # D=256 on Hopper: 64x64 with 8 warps measured 1.83x faster than 32x32 (autotune, H200), and
        # tensor descriptors another 7% (RESULTS.md run 10).
        return FwdConfig(64, 64, 8, 2, tma=True) if major >= 9 else FwdConfig(32, 32, 4, 1)
    if major >= 9 and any(gathered):
        # Pointer gathers pipeline better 3 deep (hash buckets f+b 5.79x -> 6.15x of Flex at 32k), while
        # descriptor loads keep 2 stages (3 made the dilated window's backward 1.5x slower; run 10).
        dq, dkdv = (FwdConfig(64, 64, 4, 3 if g else 2, tma=True) for g in gathered)
        return FwdConfig(dq.block_m, dq.block_n, dq.num_warps, dq.num_stages, dq.tma, None if dkdv == dq else dkdv)
    return FwdConfig(64, 64, 4, 2, tma=major >= 9)


def launch_backward(kern, q, k, v, out, lse, dout, dlse, *, scale: float, sizes: dict, inputs: dict,
                    config: FwdConfig | None = None, input_grads: dict | None = None, dq_only: bool = False):
    """dq, dk, dv from the two backward kernels (no atomics on them).

    ``input_grads``: float32 tensors shaped like some of the float runtime inputs the score reads, by name
    (:func:`attnc.codegen.grad_inputs`); the dQ kernel adds those inputs' gradients into them (atomic adds).
    ``dq_only``: launch only the dQ kernel (dk and dv are then returned unwritten)."""
    if q.device.type != "cuda" and q.dtype == torch.bfloat16:
        grads = launch_backward(kern, q.float(), k.float(), v.float(), out.float(), lse, dout.float(), dlse,
                                scale=scale, sizes=sizes, inputs=inputs, config=config, input_grads=input_grads,
                                dq_only=dq_only)
        return tuple(g.to(torch.bfloat16) for g in grads)
    from .codegen import tile_gathers
    D, Dv = q.shape[3], v.shape[3]
    cfg = config or backward_config(D, Dv, q.device, q.dtype, key=kern, seq=max(q.shape[2], k.shape[2]),
                                    gathers=tile_gathers(kern.ir))

    def zero_sums():            # a launch that stopped half-way may have added some already
        for t in (input_grads or {}).values():
            t.zero_()
    return within_resources(
        "backward", kern, q, v, cfg,
        lambda c, shrunk: _launch_backward(kern, q, k, v, out, lse, dout, dlse, scale, sizes, inputs, c,
                                           config is None and not shrunk, input_grads, dq_only),
        reset=zero_sums, shrink=config is None)


def _launch_backward(kern, q, k, v, out, lse, dout, dlse, scale: float, sizes: dict, inputs: dict, cfg: FwdConfig,
                     chosen: bool, input_grads: dict | None, dq_only: bool):
    """launch_backward with configuration ``cfg``; ``chosen``: cfg is the default table's, and permuted
    launches that gather rows may take deeper pipelines (backward_config's ``gathered``)."""
    from .codegen import grad_inputs, kernel_mode, tile_gathers
    pir = kern.ir
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    module = kern._backward_module()
    if Nq == 0 or Nk == 0 or B * Hq == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    # Every row of dq and every key row of dk, dv is stored by the kernels (zeros where nothing is seen).
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dout = dout.contiguous() if dout.stride(-1) != 1 else dout
    lse = lse.contiguous()
    dlse = dlse.float().contiguous() if dlse is not None else None
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    cfg2 = cfg.dkdv_config                  # the dK/dV kernel's tiles (BLOCK_M queries x BLOCK_N keys)
    check_grid(math.ceil(Nq / cfg.block_m), cfg.block_m, Nq, "queries", q.device)
    check_grid(math.ceil(Nk / cfg2.block_n), cfg2.block_n, Nk, "keys", q.device)
    rows_q, rows_k, rows_q2 = Nq, Nk, Nq      # sorted rows: dQ kernel's queries, dK/dV kernel's keys and queries
    mode = kernel_mode(pir)
    input_args = input_launch_args(pir, inputs)
    grad_args, grad_flags = [], {}
    for name in grad_inputs(pir):
        # An input whose gradient is not wanted passes itself in its gradient's place (never written).
        target = (input_grads or {}).get(name)
        grad_flags[f"{name}_want"] = target is not None
        target = inputs[name] if target is None else target
        grad_args += [target, *target.stride()]
    common = dict(HEAD_DIM=D, HEAD_DIM_V=Dv, DOT_PRECISION=precision)
    layout = layout2 = guard_flag = None
    if mode != "permuted":
        fwd_extra = bwd_extra = []
        if mode == "lists":
            fwd_lists = kern._tile_lists(Nq, Nk, B, Hq, cfg.block_m, cfg.block_n, sizes, inputs, q.device)
            bwd_lists = kern._tile_lists(Nq, Nk, B, Hq, cfg2.block_m, cfg2.block_n, sizes, inputs, q.device,
                                         transposed=True)
            guard_flag = _guard_flag(fwd_lists, bwd_lists, None)
            fwd_extra, bwd_extra = list_args(fwd_lists, guard_flag), list_args(bwd_lists, guard_flag)
        launches = [_BackwardLaunch(module, fwd_extra, bwd_extra, cfg, k, v, q, dout, Hkv,
                                    0 if mode == "lists" else -1, 0, 0, False, False, False, False, dk, dv,
                                    sorted_rows=True, plain_lists=mode == "lists")]
    elif d := residue_ranges(kern, Nq, Nk, cfg, cfg2):
        # Residue classes in closed form (as in the forward): both kernels walk class-local ranges.
        positions = _computed_positions(q.device, Nq, Nk)
        launches = [_BackwardLaunch(kern._backward_module("residue"), positions, positions, cfg, k, v, q, dout, Hkv,
                                    -1, d, d, False, False, False, False, dk, dv, sorted_rows=True, rows=(Nk, Nq))]
    else:
        layout = kern._layout(B, Hq, Hkv, Nq, Nk, cfg.block_m, cfg.block_n, sizes, inputs, q.device)
        layout2 = (layout if cfg2.block_m == cfg.block_m and cfg2.block_n == cfg.block_n else
                   kern._layout(B, Hq, Hkv, Nq, Nk, cfg2.block_m, cfg2.block_n, sizes, inputs, q.device))
        fwd_lists, bwd_lists = layout.lists(False), layout2.lists(True)
        rows_q, rows_k, rows_q2 = layout.rows_q, layout2.rows_k, layout2.rows_q
        guard_flag = _guard_flag(fwd_lists, bwd_lists, layout.in_place)
        fwd_extra, bwd_extra = list_args(fwd_lists, guard_flag), list_args(bwd_lists, guard_flag)
        launches = []
        for permuted, guard in variants(layout, resolve=False):
            guard = max(guard, 0)           # the "nothing moved" bit; _backward_variants adds the runs bit
            if not permuted:
                launches.append(_BackwardLaunch(kern._backward_module("lists"), fwd_extra, bwd_extra, cfg, k, v, q,
                                                dout, Hkv, guard, 0, 0, False, False, False, False, dk, dv,
                                                sorted_rows=True, plain_lists=True))
                continue
            residue, residue2 = _residue(layout, Nq, Nk, cfg), _residue(layout, Nq, Nk, cfg2)
            kx, vx = layout.expand_kv_heads(k), layout.expand_kv_heads(v)
            # Moved rows are read from sorted copies (see _sorted_copies) or gathered through positions.
            copy_k = _gathered(layout, residue, "k") and _sorted_copies(cfg, kx, vx, layout, "k")
            copy_q = _gathered(layout, residue2, "q") and _sorted_copies(cfg2, q, dout, layout, "q")
            gathered_k = _gathered(layout, residue, "k") and not copy_k
            gathered_q = _gathered(layout, residue2, "q") and not copy_q
            pcfg = cfg
            if chosen:              # the same tiles; deeper pipelines where rows are gathered
                pcfg = backward_config(D, Dv, q.device, q.dtype, key=kern, seq=max(Nq, Nk),
                                       gathered=(gathered_k, gathered_q), gathers=tile_gathers(pir))
            dkx, dvx = (dk, dv) if kx is k else (torch.empty_like(kx), torch.empty_like(vx))
            launches.append(_BackwardLaunch(
                module, fwd_extra + position_args(layout), bwd_extra + position_args(layout2), pcfg,
                kx, vx, q, dout, layout.kv_heads(Hq, Hkv), guard, residue, residue2, copy_k, copy_q, gathered_k,
                gathered_q, dkx, dvx, sorted_rows=layout2 is layout,
                pure=(pure_variants(layout), pure_variants(layout2)), rows=(layout.rows_k, layout2.rows_q)))
    nqb, nkb = math.ceil(rows_q / cfg.block_m), math.ceil(rows_k / cfg2.block_n)
    # Written by the dQ kernel, read by the dK/dV kernel: log2-domain lse and rowsum(dO * O) - dlse, per row
    # in the order both kernels walk (sorted_rows), else at its position. Rows of a multiple of 16 bytes, so
    # that the dK/dV kernel can read them through tensor descriptors.
    lse_stride = -(-max(Nq, rows_q, rows_q2) // 4) * 4
    lse2 = torch.empty(B, Hq, lse_stride, device=q.device, dtype=torch.float32)
    delta = torch.empty(B, Hq, lse_stride, device=q.device, dtype=torch.float32)
    copies = {}
    tail = tail_programs(q.device)
    for variant in _backward_variants(launches, guard_flag):
        c1, c2 = variant.config, variant.config.dkdv_config
        group = head_group(variant.plain_lists, c1.head_group)
        # The dQ kernel streams K, V tiles; the dK/dV kernel Q, dO tiles. Rows a transform moved are read
        # through positions, or from copies in sorted order with tensor descriptors (as in the forward);
        # the copies are made once per launch (its FULL_RUNS variants share them).
        if variant.copy_k and "k" not in copies:
            copies["k"] = layout.sorted_keys(variant.k, cfg.block_n), layout.sorted_keys(variant.v, cfg.block_n)
        k_tiles, v_tiles = copies["k"] if variant.copy_k else (variant.k, variant.v)
        tma_k = _tma_usable(c1, variant.gathered_k, k_tiles, v_tiles)
        kd, vd = host_row_pair(tma_k, k_tiles, v_tiles, variant.heads_kv, variant.rows[0] or Nk, c1.block_n,
                               variant.residue)
        for pure in variant.pure[0]:
            launch_kernel(variant.module.attnc_bwd_dq, (B * Hq, nqb),
                variant.q, k_tiles, v_tiles, variant.dout, dq, out, lse, lse if dlse is None else dlse, lse2, delta,
                kd, vd,
                *variant.q.stride(), *k_tiles.stride(), *v_tiles.stride(), *variant.dout.stride(), *dq.stride(),
                *out.stride(),
                B, Hq, variant.heads_kv, Nq, Nk, scale, lse_stride, *variant.fwd_extra, *input_args, *grad_args,
                BLOCK_M=c1.block_m, BLOCK_N=c1.block_n, num_warps=c1.num_warps, num_stages=c1.num_stages,
                HAS_DLSE=dlse is not None, USE_TMA=tma_k, HOST_DESC=kd is not None,
                WIDE_ROWS=wide_rows(k_tiles, v_tiles), RESIDUE=variant.residue, PADDED=padded(layout, Nq, Nk),
                GUARD=variant.guard,
                FULL_RUNS=variant.full_runs, SORTED_ROWS=variant.sorted_rows, BUCKET_PURE=pure,
                HEAD_GROUP=group, TAIL_PROGRAMS=tail, **grad_flags, **common)
        if dq_only:
            continue
        if variant.copy_q and "q" not in copies:
            copies["q"] = layout.sorted_queries(variant.q), layout.sorted_queries(variant.dout)
        q_tiles, do_tiles = copies["q"] if variant.copy_q else (variant.q, variant.dout)
        tma_q = _tma_usable(c2, variant.gathered_q, q_tiles, do_tiles)
        row_tma = variant.sorted_rows and _tma_available(c2, q.device)
        qd, dod = host_row_pair(tma_q, q_tiles, do_tiles, Hq, variant.rows[1] or Nq, c2.block_m, variant.residue2)
        lsed = deltad = None
        if qd is not None and row_tma:
            # The walked rows are whole blocks (host_rows), so no block of lse2 / delta runs into the next head's.
            from triton.tools.tensor_descriptor import TensorDescriptor
            lsed, deltad = (TensorDescriptor(t, [t.numel()], [1], [c2.block_m]) for t in (lse2, delta))
        for pure in variant.pure[1]:
            launch_kernel(variant.module.attnc_bwd_dkdv, (B * variant.heads_kv, nkb),
                q_tiles, variant.k, variant.v, do_tiles, variant.dk, variant.dv, lse2, delta, qd, dod, lsed, deltad,
                *q_tiles.stride(), *variant.k.stride(), *variant.v.stride(), *do_tiles.stride(), *variant.dk.stride(),
                *variant.dv.stride(),
                B, Hq, variant.heads_kv, Nq, Nk, scale, lse_stride, math.ceil(rows_q2 / c2.block_m), *variant.bwd_extra,
                *input_args,
                BLOCK_M=c2.block_m, BLOCK_N=c2.block_n, num_warps=c2.num_warps, num_stages=c2.num_stages,
                USE_TMA=tma_q, HOST_DESC=qd is not None, ROW_TMA=row_tma,
                SORTED_ROWS=variant.sorted_rows, WIDE_ROWS=wide_rows(q_tiles, do_tiles),
                RESIDUE=variant.residue2, PADDED=padded(layout2, Nq, Nk), GUARD=variant.guard,
                FULL_RUNS=variant.full_runs, BUCKET_PURE=pure, HEAD_GROUP=group, TAIL_PROGRAMS=tail, **common)
        dk, dv = variant.dk, variant.dv
    if layout is not None:
        dk, dv = layout.reduce_kv_heads(dk, Hkv), layout.reduce_kv_heads(dv, Hkv)
    return dq, dk, dv


def attention(kern, q, k, v, *, scale, return_lse, inputs):
    """The kernel path of ``kern(q, k, v)``: validation, then ``attnc.ops.attention_op``, which carries autograd
    (into q, k, v and float score inputs): the kernel's torch custom op where ``torch.compile`` or another
    tracer is at work, the same launchers under an autograd.Function in eager mode."""
    from .ops import attention_op
    from .validate import check_inputs, check_qkv, check_scale
    shapes = check_qkv(q, k, v, kernel_dims=True)
    sizes = check_inputs(kern.ir, inputs, batch=shapes.batch, heads=shapes.heads_q, n_q=shapes.n_q,
                         n_k=shapes.n_k, device=q.device)
    scale = check_scale(scale, shapes.head_dim)
    out, lse = attention_op(kern, q, k, v, [inputs[n] for n in kern.ir.inputs], scale, sizes)
    return (out, lse) if return_lse else out
