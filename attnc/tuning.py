"""Autotuning: search kernel configurations on this GPU and remember the winners.

``autotune(kern, seq, ...)`` times every configuration of a small search space (tile sizes, warps,
pipeline stages) for the forward and the backward kernels of one pattern with
``triton.testing.do_bench``, after a few untimed calls past those that compile its kernel variants
(``attnc.bench.warm_calls``), checks the fastest against the default configuration (and the plain-torch
reference on a slice), and stores it in ``cache_dir()/tuning.json``. ``lookup`` answers from that file
for ``launch.forward_config`` / ``launch.backward_config``; it is cheap (the parsed file is kept per
process and re-read only when the file changes) and returns None when nothing was tuned.

Entries are keyed by (GPU name, pattern key, dtype, head dim, sequence-length bucket, kernel kind).
The pattern key is ``launch.source_key(kern.ir, "fwd")``: it covers the normalized IR, the attnc
version and a fingerprint of the code generator and templates, so a changed generator never reuses a
configuration measured on other code. The bucket is the next power of two of ``max(n_q, n_k)``; a call
whose bucket was not tuned uses the nearest tuned bucket within a factor of 4, else the defaults.
``ATTNC_TUNING=0`` turns lookups off (the defaults run, as before autotuning).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .errors import InputError
from .launch import FwdConfig, cache_dir, source_key, ws_enabled

TUNING_FORMAT = 1
KINDS = ("fwd", "bwd")
BLOCKS = (32, 64, 128)
WARPS = (4, 8)
STAGES = (1, 2, 3, 4)
ORDERS = (0, 1, 2, 4)           # HEAD_GROUP values timed on the fastest tiles (launch.head_group)
NEAREST_FACTOR = 4              # a tuned bucket serves calls up to this factor away from it
WARMUP_MS = 25                  # do_bench warm-up and measuring time per candidate (milliseconds)
REP_MS = 100
SMEM_MARGIN = 1.0               # fraction of the device's shared-memory limit the estimate may use
MAX_REGS = 256                  # fp32 accumulator values per thread beyond which a tile surely spills

# Tolerances of the winner check: relative error in the Frobenius norm, per dtype.
FWD_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-3}
BWD_TOL = {torch.bfloat16: 5e-2, torch.float16: 2e-2, torch.float32: 5e-3}
REF_FWD_LIMIT = 1 << 31         # largest sliced Hq*Nq*Nk checked against the (chunked) reference
REF_BWD_LIMIT = 1 << 28         # same for the backward (autograd keeps the score chunks)

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
           "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
           "float32": torch.float32, "float": torch.float32}


# ----------------------------------------------------------------------------------------------
# Keys


_paths: dict = {}


def tuning_path() -> Path:
    """Where tuned configurations live: ``$ATTNC_CACHE_DIR/tuning.json`` (``cache_dir()``).

    Memoized on the variables ``cache_dir`` reads, since building the path costs more than a lookup.
    """
    env = (os.environ.get("ATTNC_CACHE_DIR"), os.environ.get("HOME"))
    path = _paths.get(env)
    if path is None:
        path = _paths[env] = cache_dir() / "tuning.json"
    return path


def seq_bucket(seq: int) -> int:
    """The sequence-length bucket of ``seq``: the next power of two (1 for 0 and 1)."""
    seq = int(seq)
    return 1 if seq <= 1 else 1 << (seq - 1).bit_length()


def dtype_name(dtype) -> str:
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def parse_dtype(x) -> torch.dtype:
    """``torch.bfloat16`` from 'bf16', 'fp16', 'fp32' (and their long names) or a dtype."""
    if isinstance(x, torch.dtype):
        return x
    try:
        return _DTYPES[str(x).lower().replace("torch.", "")]
    except KeyError:
        raise InputError(f"unknown dtype {x!r}; use bf16, fp16 or fp32") from None


def head_dim_text(head_dim) -> str:
    """``128`` for D = Dv = 128, ``128x64`` when the value head dim differs."""
    if isinstance(head_dim, (tuple, list)):
        d, dv = (int(x) for x in head_dim)
        return str(d) if d == dv else f"{d}x{dv}"
    return str(int(head_dim))


def pattern_key(kern_or_key) -> str:
    """The tuning key of a pattern: ``source_key(kern.ir, "fwd")``, memoized on the kernel object."""
    if isinstance(kern_or_key, str):
        return kern_or_key
    memo = getattr(kern_or_key, "__dict__", {}).get("_attnc_tuning_key")
    if memo is None:
        memo = source_key(kern_or_key.ir, "fwd")
        try:
            kern_or_key._attnc_tuning_key = memo
        except AttributeError:
            pass
    return memo


@functools.lru_cache(maxsize=16)
def _device_name_of(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device) -> str:
    """The GPU's name as torch reports it (e.g. 'NVIDIA H200'), memoized per device index."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_name_of(index)


def entry_key(gpu: str, pattern: str, dtype, head_dim, bucket: int, kind: str) -> str:
    return "|".join((gpu, pattern, dtype_name(dtype), head_dim_text(head_dim), str(int(bucket)), kind))


def config_text(cfg: FwdConfig) -> str:
    text = f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}" + (" tma" if cfg.tma else "") \
        + (" ws" if cfg.ws else "")
    if cfg.dkdv is not None:
        text += f" / dK,dV {config_text(cfg.dkdv)}"
    if cfg.head_group is not None:
        text += f" order {cfg.head_group}"
    return text


def config_obj(cfg: FwdConfig) -> dict:
    """A configuration as JSON (what tuning.json stores)."""
    obj = {"block_m": cfg.block_m, "block_n": cfg.block_n, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if cfg.tma:
        obj["tma"] = True
    if cfg.ws:
        obj["ws"] = True
    if cfg.dkdv is not None:
        obj["dkdv"] = config_obj(cfg.dkdv)
    if cfg.head_group is not None:
        obj["head_group"] = cfg.head_group
    return obj


# ----------------------------------------------------------------------------------------------
# The file: tolerant reads, atomic writes, a per-process cache


def _config_from(obj) -> FwdConfig | None:
    try:
        values = [obj[name] for name in ("block_m", "block_n", "num_warps", "num_stages")]
    except (KeyError, TypeError):
        return None
    if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in values):
        return None
    tma, ws = obj.get("tma", False), obj.get("ws", False)
    if not isinstance(tma, bool) or not isinstance(ws, bool):
        return None
    dkdv = None
    if obj.get("dkdv") is not None:
        dkdv = _config_from(obj["dkdv"])
        if dkdv is None or dkdv.dkdv is not None or dkdv.head_group is not None:
            return None
    group = obj.get("head_group")
    if group is not None and (not isinstance(group, int) or isinstance(group, bool) or group < 0):
        return None
    return FwdConfig(*values, tma=tma, dkdv=dkdv, head_group=group, ws=ws)


def _valid_entry(entry) -> bool:
    if not isinstance(entry, dict) or _config_from(entry.get("config")) is None:
        return False
    fields = ("gpu", "pattern_key", "dtype", "head_dim", "kind")
    return (all(isinstance(entry.get(f), str) for f in fields) and isinstance(entry.get("seq_bucket"), int)
            and not isinstance(entry.get("seq_bucket"), bool))


def load_entries(path: Path | None = None) -> dict[str, dict]:
    """The entries of the tuning file by key; a missing, unreadable or corrupt file reads as empty."""
    path = tuning_path() if path is None else Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        return {}
    return {k: e for k, e in entries.items() if isinstance(k, str) and _valid_entry(e)}


def _atomic_write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tuning-", suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)          # readers see the old file or the new one, never a half
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _file_lock(path: Path):
    """An advisory lock around read-modify-write of the tuning file (several autotunes at once)."""
    try:
        import fcntl
    except ImportError:                 # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def save_entries(new: dict[str, dict], path: Path | None = None) -> Path:
    """Merge ``new`` (key -> entry) into the tuning file atomically; returns its path."""
    path = tuning_path() if path is None else Path(path)
    with _file_lock(path):
        entries = load_entries(path)
        entries.update(new)
        _atomic_write_json(path, {"format": TUNING_FORMAT, "entries": entries})
    invalidate()
    return path


STAT_INTERVAL = 1.0             # seconds between checks of the file's modification stamp

_state_lock = threading.Lock()
_state: dict = {"path": None, "stamp": None, "index": {}, "checked": -math.inf}


def invalidate() -> None:
    """Forget the parsed tuning file (the next lookup reads it again)."""
    with _state_lock:
        _state.update(path=None, stamp=None, index={}, checked=-math.inf)


def _index() -> dict:
    """(gpu, pattern, dtype, head dim, kind) -> {bucket: FwdConfig}, re-read when the file changes.

    The file's stamp (mtime, size, inode) is checked at most every STAT_INTERVAL seconds: a stat is
    a system call, and under some sandboxes a slow one, while this runs on every kernel launch.
    """
    path = tuning_path()
    now = time.monotonic()
    if _state["path"] == path and now - _state["checked"] < STAT_INTERVAL:
        return _state["index"]
    try:
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        stamp = None
    if _state["path"] == path and _state["stamp"] == stamp:
        _state["checked"] = now
        return _state["index"]
    index: dict = {}
    if stamp is not None:
        for e in load_entries(path).values():
            group = index.setdefault((e["gpu"], e["pattern_key"], e["dtype"], e["head_dim"], e["kind"]), {})
            group[e["seq_bucket"]] = _config_from(e["config"])
    with _state_lock:
        _state.update(path=path, stamp=stamp, index=index, checked=now)
    return index


def _disabled() -> bool:
    return os.environ.get("ATTNC_TUNING", "1").strip().lower() in ("0", "off", "false", "no")


def lookup(kind: str, kern_or_key, device, dtype, head_dim, seq: int | None = None) -> FwdConfig | None:
    """The tuned configuration for this call, or None (use the defaults).

    ``kern_or_key`` is a Kernel or its pattern key; ``head_dim`` an int or ``(D, Dv)``; ``seq`` the
    longer of the two sequence lengths (None: the largest tuned bucket).
    """
    if _disabled():
        return None
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if device.type != "cuda":
        return None
    index = _index()
    if not index:
        return None
    group = index.get((device_name(device), pattern_key(kern_or_key), dtype_name(dtype),
                       head_dim_text(head_dim), kind))
    if not group:
        return None
    if seq is None:
        return group[max(group)]
    bucket = seq_bucket(seq)
    if bucket in group:
        return group[bucket]
    # The nearest tuned bucket (ties: the larger), within NEAREST_FACTOR.
    best = min(group, key=lambda b: (abs(math.log2(b) - math.log2(bucket)), -b))
    if max(best, bucket) <= NEAREST_FACTOR * min(best, bucket):
        return group[best]
    return None


# ----------------------------------------------------------------------------------------------
# The search space


def smem_estimate(kind: str, cfg: FwdConfig, head_dim: int, head_dim_v: int | None = None,
                  dtype=torch.bfloat16) -> int:
    """Bytes of shared memory a configuration is expected to need (an upper estimate).

    Forward: the resident Q tile and ``num_stages`` buffers of the K and V tiles the loop streams;
    on an H200 with Triton 3.6 this is exactly what the compiler allocates for BLOCK_M >= 64 and an
    upper bound for BLOCK_M = 32 (every configuration it admitted compiled, every one it refused
    failed). Backward: the larger of the dQ kernel (resident Q and dO, ``num_stages`` buffers of the
    streamed K and V) and the dK/dV kernel (resident K and V, buffers of the streamed Q and dO, and of
    the float32 log-sum-exp and delta rows) plus a float32 score tile of scratch; at D = 256 on the
    H200 this bounded every allocation from above and admitted only configurations that compiled.
    """
    d = int(head_dim)
    dv = d if head_dim_v is None else int(head_dim_v)
    e = torch.empty((), dtype=parse_dtype(dtype)).element_size()
    bm, bn, buffers = cfg.block_m, cfg.block_n, max(1, cfg.num_stages)
    if kind == "fwd":
        return e * (bm * d + buffers * bn * (d + dv))
    dq = e * (bm + buffers * bn) * (d + dv) + 4 * bm * bn   # + a float32 score tile changing layout
    c2 = cfg.dkdv_config                    # the dK/dV kernel may have its own tiles
    bm, bn, buffers = c2.block_m, c2.block_n, max(1, c2.num_stages)
    dkdv = e * (bn + buffers * bm) * (d + dv) + 8 * buffers * bm + 4 * bm * bn
    return max(dq, dkdv)


def register_estimate(kind: str, cfg: FwdConfig, head_dim: int, head_dim_v: int | None = None) -> int:
    """fp32 values per thread held by the accumulators and score tiles (a lower bound on registers)."""
    d = int(head_dim)
    dv = d if head_dim_v is None else int(head_dim_v)
    bm, bn = cfg.block_m, cfg.block_n
    if kind == "fwd":
        return (bm * dv + bm * bn) // (32 * cfg.num_warps)
    c2 = cfg.dkdv_config
    return max((bm * d + 2 * bm * bn) // (32 * cfg.num_warps),
               (c2.block_n * (d + dv) + 2 * c2.block_m * c2.block_n) // (32 * c2.num_warps))


_SMEM_BY_CAPABILITY = {(9, 0): 232448, (8, 0): 166912, (8, 7): 166912, (10, 0): 232448}


def smem_limit(device=None) -> int:
    """The opt-in shared memory per block of the GPU (bytes)."""
    device = torch.device("cuda") if device is None else torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    value = getattr(props, "shared_memory_per_block_optin", None)
    if value:
        return int(value)
    try:
        from triton.runtime import driver
        return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:               # noqa: BLE001 - any failure falls back to the table
        return _SMEM_BY_CAPABILITY.get((props.major, props.minor), 101376)


def search_space(kind: str, head_dim: int, head_dim_v: int | None = None, dtype=torch.bfloat16,
                 smem: int | None = None, device=None, hopper: bool | None = None) -> list[FwdConfig]:
    """Candidate configurations for one kernel kind, filtered by shared memory and register estimates.

    ``smem`` is the shared-memory budget in bytes (default: the current GPU's limit). Eight warps on a
    tile smaller than 64 x 64 are left out below head dim 256 (idle warps; at 256 they relieve register
    pressure instead), as are tiles whose accumulators surely spill.
    On Hopper (or with ``hopper=True``) every candidate comes with and without tensor-descriptor loads,
    and the backward ones also as pairs whose dK/dV kernel takes the transposed tile (e.g. dQ on
    128 queries x 64 keys, dK/dV on 64 x 128).
    Ordered from large tiles and deep pipelines to small ones.
    """
    if kind not in KINDS:
        raise InputError(f"unknown kernel kind {kind!r}; use one of {', '.join(KINDS)}")
    budget = int((smem if smem is not None else smem_limit(device)) * SMEM_MARGIN)
    if hopper is None:
        hopper = torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 9
    out = []
    for bm in BLOCKS:
        for bn in BLOCKS:
            for warps in WARPS:
                if warps == 8 and bm * bn < 64 * 64 and max(head_dim, head_dim_v or head_dim) < 256:
                    continue
                for stages in STAGES:
                    base = FwdConfig(bm, bn, warps, stages)
                    variants = [base]
                    if hopper:
                        variants.append(FwdConfig(bm, bn, warps, stages, tma=True))
                    if hopper and kind == "fwd" and bm == 128 and warps == 4 and stages == 2 and ws_enabled():
                        # One warp-specialized loop (12 warps: a producer and two consumers), where the plan takes it
                        # (experimental, ATTNC_WS=1: launch.ws_enabled).
                        variants.append(FwdConfig(bm, bn, warps, stages, tma=True, ws=True))
                    if hopper and kind == "bwd" and bm != bn:
                        for tma in (False, True):
                            variants.append(FwdConfig(bm, bn, warps, stages, tma,
                                                      dkdv=FwdConfig(bn, bm, warps, stages, tma)))
                    for cfg in variants:
                        if smem_estimate(kind, cfg, head_dim, head_dim_v, dtype) > budget:
                            continue
                        if not cfg.ws and register_estimate(kind, cfg, head_dim, head_dim_v) > MAX_REGS:
                            continue
                        out.append(cfg)
    out.sort(key=lambda c: (-c.block_m * c.block_n, -c.block_m, -c.num_stages, c.num_warps, not c.tma,
                            c.dkdv is None))
    return out


# ----------------------------------------------------------------------------------------------
# Progress


class _Progress:
    """tqdm when it is installed, else a one-line bar on stderr: ``[#####.....] 12/40 fwd ...``."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.done, self.desc, self.enabled = total, 0, desc, enabled
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=True, dynamic_ncols=True)
            except ImportError:
                self.bar = None
        self.tty = enabled and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()

    def step(self, text: str):
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
            return
        width = 20
        filled = width * self.done // max(1, self.total)
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {self.desc} {text}"
        if self.tty:
            sys.stderr.write("\r\x1b[K" + line)
            if self.done == self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.tty and self.done != self.total:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ----------------------------------------------------------------------------------------------
# Measuring


@dataclass
class KindResult:
    """The outcome of tuning one kernel kind: the winner, the default, every timing and the notes."""
    kind: str
    default: FwdConfig
    best: FwdConfig | None = None
    best_ms: float | None = None
    default_ms: float | None = None
    timings: list = field(default_factory=list)     # (FwdConfig, ms or None, note)
    notes: list = field(default_factory=list)
    checked: str = ""
    key: str = ""

    @property
    def speedup(self) -> float | None:
        if self.best_ms and self.default_ms:
            return self.default_ms / self.best_ms
        return None


@dataclass
class TuneReport:
    """What :func:`autotune` found, per kernel kind, and where it was stored."""
    pattern: str
    seq: int
    batch: int
    heads: int
    dim: int
    dtype: str
    gpu: str
    results: dict = field(default_factory=dict)
    path: Path | None = None

    def __getitem__(self, kind: str) -> KindResult:
        return self.results[kind]

    def __str__(self) -> str:
        lines = [f"{self.pattern} on {self.gpu}: seq {self.seq} (bucket {seq_bucket(self.seq)}), batch "
                 f"{self.batch}, heads {self.heads}, dim {self.dim}, {self.dtype}"]
        for kind, r in self.results.items():
            timed = sum(1 for _, ms, _ in r.timings if ms is not None)
            head = f"  {kind}: {timed}/{len(r.timings)} configs ran"
            if r.best is None:
                lines.append(f"{head}; no configuration kept (defaults stay in use)")
            else:
                default = (f"{r.default_ms:.3f} ms" if r.default_ms is not None else "failed")
                speed = f", {r.speedup:.2f}x" if r.speedup else ""
                lines.append(f"{head}; best {config_text(r.best)} {r.best_ms:.3f} ms "
                             f"(default {config_text(r.default)} {default}{speed}); checked {r.checked}")
            lines.extend(f"    note: {n}" for n in r.notes)
        if self.path is not None:
            lines.append(f"saved to {self.path}")
        return "\n".join(lines)


def _bench_ms(fn) -> float:
    """Median milliseconds of ``fn`` by ``triton.testing.do_bench`` (whatever its signature)."""
    from triton.testing import do_bench
    params = inspect.signature(do_bench).parameters
    if "return_mode" in params:
        return float(do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median"))
    if "quantiles" in params:
        res = do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, quantiles=[0.5])
        return float(res[0] if isinstance(res, (list, tuple)) else res)
    res = do_bench(fn, warmup=WARMUP_MS, rep=REP_MS)
    return float(res[0] if isinstance(res, (list, tuple)) else res)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}".rstrip(": ")


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error in the Frobenius norm; inf for non-finite values."""
    x, ref = x.double(), ref.double()
    if not bool(torch.isfinite(x).all()):
        return math.inf
    denom = float(ref.norm())
    diff = float((x - ref).norm())
    if denom == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / denom


def _uses_size(pir, name: str) -> bool:
    seen, stack = set(), [n for n in (pir.mask, pir.score) if n is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op == "size" and node.attr == name:
            return True
        stack.extend(a for a in node.args if hasattr(a, "op"))
    return False


def _slice_problem(kern, q, k, v, inputs):
    """Batch element 0 and head 0 of the problem (where the pattern allows), for the reference check.

    Returns (q, k, v, inputs, (batch_slice, head_slice)) or None when the pattern reads the batch or
    head count (a slice would change its meaning) or the heads are grouped (GQA).
    """
    pir = kern.ir
    if _uses_size(pir, "batch") or _uses_size(pir, "heads") or q.shape[1] != k.shape[1]:
        return None
    sliced = {}
    for name, t in inputs.items():
        dims = pir.inputs[name].dims
        for axis, dim in enumerate(dims):
            if dim in ("batch", "heads"):
                t = t.narrow(axis, 0, 1)
        sliced[name] = t
    return q[:1, :1], k[:1, :1], v[:1, :1], sliced


def _time_candidates(run, candidates, progress: _Progress, kind: str, result: KindResult):
    from .bench import warm_calls
    for cfg in candidates:
        try:
            # Past the calls that compile this configuration's kernel variants (a new tile size makes new tile
            # lists, whose flags pick a variant from the third call on: attnc.flags), so none compiles inside
            # do_bench's estimate and shortens the timing (NOTES items 75-76).
            warm_calls(lambda cfg=cfg: run(cfg))
            ms = _bench_ms(lambda cfg=cfg: run(cfg))
            result.timings.append((cfg, ms, ""))
            progress.step(f"{config_text(cfg)} {ms:.2f} ms")
        except Exception as exc:    # noqa: BLE001 - a configuration that cannot compile/launch is skipped
            note = _short(exc)
            result.timings.append((cfg, None, note))
            result.notes.append(f"{config_text(cfg)} skipped ({note})")
            progress.step(f"{config_text(cfg)} skipped")
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()


def _order_candidates(result: KindResult) -> list:
    """The fastest configuration timed so far, once per program order of ORDERS (the order does not change
    what a kernel computes, only which programs share L2; see launch.head_group)."""
    timed = [(ms, i, cfg) for i, (cfg, ms, _) in enumerate(result.timings) if ms is not None]
    if not timed:
        return []
    best = min(timed)[2]
    return [replace(best, head_group=group) for group in ORDERS]


def _ordered(candidates: list, default: FwdConfig, max_configs: int | None) -> list:
    out = [default] + [c for c in candidates if c != default]
    if max_configs is not None:
        out = out[:max(1, int(max_configs))]
    return out


def autotune(kern, seq: int, batch: int | None = None, heads: int = 16, dim: int = 128, dtype=torch.bfloat16,
             kinds=("fwd", "bwd"), inputs: dict | None = None, max_configs: int | None = None,
             progress: bool = True, save: bool = True) -> TuneReport:
    """Search kernel configurations for ``kern`` on the current CUDA GPU and store the winners.

    Times each candidate of :func:`search_space` (the default configuration first) with
    ``triton.testing.do_bench`` (median) on random q, k, v of shape (batch, heads, seq, dim) and the
    given runtime ``inputs`` (default: ``kern.example_inputs``). The forward kernel is timed alone; the
    backward kernels are timed alone on the forward's saved output. The fastest configuration that
    agrees with the default configuration (and with ``kern.reference`` on batch 0 / head 0 when the
    problem is small enough) is written to ``cache_dir()/tuning.json`` unless ``save`` is false.
    The fastest tiles are also timed in each program order of ORDERS (``head_group``: how many heads'
    programs start together, launch.head_group); the order does not change the result.
    Candidates that fail to compile or launch are skipped with a note in the report.
    """
    from .codegen import tile_gathers
    from .launch import backward_config, forward_config, launch_backward, launch_forward, prefers_small_tiles
    from .validate import check_inputs, check_qkv

    if not torch.cuda.is_available():
        raise InputError("autotuning needs a CUDA GPU (timings through the CPU interpreter mean nothing)")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise InputError("autotuning times compiled kernels; unset TRITON_INTERPRET")
    if isinstance(kinds, str):
        kinds = tuple(x.strip() for x in kinds.split(",") if x.strip())
    kinds = tuple(kinds)
    bad = [x for x in kinds if x not in KINDS]
    if bad or not kinds:
        raise InputError(f"unknown kernel kind(s) {', '.join(bad) or '(none)'}; use fwd, bwd or fwd,bwd")
    for name, value in (("seq", seq), ("heads", heads), ("dim", dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"{name} must be a positive int, got {value!r}")
    if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        raise InputError(f"batch must be a positive int, got {batch!r}")
    if max_configs is not None and max_configs < 1:
        raise InputError(f"max_configs must be at least 1, got {max_configs!r}")
    dtype = parse_dtype(dtype)
    batch = batch or max(1, 32768 // seq)
    device = torch.device("cuda", torch.cuda.current_device())

    if inputs is None:
        inputs = kern.example_inputs(seq, seq, batch, heads)
    inputs = {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in inputs.items()}
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, dim, device=device, dtype=dtype, generator=g) for _ in range(3))
    dout = torch.randn(batch, heads, seq, dim, device=device, dtype=dtype, generator=g)
    check_qkv(q, k, v, kernel_dims=True)
    sizes = check_inputs(kern.ir, inputs, batch=batch, heads=heads, n_q=seq, n_k=seq, device=device)
    scale = 1.0 / math.sqrt(dim)
    gpu = device_name(device)
    pkey = pattern_key(kern)
    report = TuneReport(pattern=repr(kern), seq=seq, batch=batch, heads=heads, dim=dim, dtype=dtype_name(dtype),
                        gpu=gpu)
    sliced = _slice_problem(kern, q, k, v, inputs)

    def fwd(cfg):
        return launch_forward(kern, q, k, v, scale=scale, sizes=sizes, inputs=inputs, config=cfg)

    new_entries = {}
    small = prefers_small_tiles(kern, seq, seq)
    gathers = tile_gathers(kern.ir)
    fwd_default = forward_config(dim, dim, device, dtype, sparse=small, gathers=gathers)
    for kind in kinds:
        default = fwd_default if kind == "fwd" else backward_config(dim, dim, device, dtype, gathers=gathers)
        result = KindResult(kind=kind, default=default)
        report.results[kind] = result
        candidates = _ordered(search_space(kind, dim, dim, dtype, device=device), default, max_configs)
        if kind == "fwd":
            def run(cfg):
                return fwd(cfg)[0]
        else:
            # The backward runs on a saved forward result: the forward winner's, else the default's.
            saved = None
            for cfg in dict.fromkeys(c for c in (getattr(report.results.get("fwd"), "best", None), fwd_default) if c):
                try:
                    saved = fwd(cfg)[:2]
                    torch.cuda.synchronize()
                    break
                except Exception as exc:    # noqa: BLE001
                    result.notes.append(f"forward {config_text(cfg)} for the backward failed ({_short(exc)})")
            if saved is None:
                result.notes.append("no forward configuration ran; the backward was not tuned")
                continue

            def run(cfg, out=saved[0], lse=saved[1]):
                return launch_backward(kern, q, k, v, out, lse, dout, None, scale=scale, sizes=sizes,
                                       inputs=inputs, config=cfg)
        bar = _Progress(len(candidates) + len(ORDERS), kind, progress)
        try:
            _time_candidates(run, candidates, bar, kind, result)
            _time_candidates(run, _order_candidates(result), bar, kind, result)
        finally:
            bar.close()
        default_ms = [ms for cfg, ms, _ in result.timings if cfg == default]
        result.default_ms = default_ms[0] if default_ms else None
        _pick_winner(kern, kind, result, run, q, k, v, dout, inputs, sliced, scale, dtype)
        if result.best is not None:
            key = entry_key(gpu, pkey, dtype, dim, seq_bucket(seq), kind)
            result.key = key
            new_entries[key] = _entry(kern, gpu, pkey, dtype, dim, seq, batch, heads, kind, result)
        torch.cuda.empty_cache()
    if save and new_entries:
        report.path = save_entries(new_entries)
    return report


def _pick_winner(kern, kind, result: KindResult, run, q, k, v, dout, inputs, sliced, scale, dtype):
    """The fastest timed configuration whose output agrees with the default's and the reference."""
    timed = sorted(((ms, i, cfg) for i, (cfg, ms, _) in enumerate(result.timings) if ms is not None))
    if not timed:
        result.notes.append("no configuration ran; the defaults stay in use")
        return
    tol = (FWD_TOL if kind == "fwd" else BWD_TOL).get(dtype, 5e-2)
    baseline = None
    if result.default_ms is not None:
        baseline = _as_tuple(run(result.default))
    reference = _reference(kern, kind, q, k, v, dout, inputs, sliced, scale)
    for ms, _, cfg in timed[:3]:
        got = _as_tuple(run(cfg))
        checks = []
        failed = None
        if baseline is not None and cfg != result.default:
            err = max(_rel_err(a, b) for a, b in zip(got, baseline))
            checks.append("default config")
            if not err <= tol:
                failed = f"differs from the default configuration (relative error {err:.3g})"
        if failed is None and reference is not None:
            err = max(_rel_err(a[:1, :1], b) for a, b in zip(got, reference))
            checks.append("reference (batch 0, head 0)")
            if not err <= tol:
                failed = f"differs from kern.reference (relative error {err:.3g})"
        if failed is not None:
            result.notes.append(f"{config_text(cfg)} rejected: {failed}")
            continue
        result.best, result.best_ms = cfg, ms
        result.checked = " and ".join(checks) if checks else "nothing (it is the default and no reference fits)"
        return
    result.notes.append("the fastest configurations failed the check; the defaults stay in use")


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _reference(kern, kind, q, k, v, dout, inputs, sliced, scale):
    """The reference forward output (or dq, dk, dv) of batch 0 / head 0, or None when too large."""
    if sliced is None:
        return None
    qs, ks, vs, inp = sliced
    work = qs.shape[2] * ks.shape[2]
    if work > (REF_FWD_LIMIT if kind == "fwd" else REF_BWD_LIMIT):
        return None
    if kind == "fwd":
        with torch.no_grad():
            return (kern.reference(qs.float(), ks.float(), vs.float(), scale=scale, **inp),)
    leaves = [t.detach().float().requires_grad_() for t in (qs, ks, vs)]
    with torch.enable_grad():
        out = kern.reference(*leaves, scale=scale, **inp)
        out.backward(dout[:1, :1].float())
    return tuple(t.grad for t in leaves)


def _entry(kern, gpu, pkey, dtype, dim, seq, batch, heads, kind, result: KindResult) -> dict:
    import triton

    from . import __version__
    cfg, default = result.best, result.default
    return {
        "gpu": gpu, "pattern_key": pkey, "pattern": kern.name,
        "params": {str(k): (v if isinstance(v, (int, float, bool, str)) else str(v)) for k, v in kern.params.items()},
        "dtype": dtype_name(dtype), "head_dim": head_dim_text(dim), "seq_bucket": seq_bucket(seq), "kind": kind,
        "config": config_obj(cfg),
        "ms": result.best_ms, "default_ms": result.default_ms,
        "default_config": config_obj(default),
        "measured": {"seq": seq, "batch": batch, "heads": heads},
        "configs_timed": sum(1 for _, ms, _ in result.timings if ms is not None),
        "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "attnc": __version__,
        "torch": torch.__version__, "triton": triton.__version__,
    }
