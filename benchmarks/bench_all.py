"""The SPEC section 6 benchmark: every pattern beside FlexAttention and SDPA, in one GPU run.

    python3 benchmarks/bench_all.py --seqs 8192,32768          # the performance contract
    python3 benchmarks/bench_all.py --quick                    # smoke test: seq 2048, 2 patterns
    python3 benchmarks/bench_all.py --check                    # correctness only, many shapes

Each pattern is compiled from its file in examples/ (parameters mapped onto the file's own
parameter and input names) and its mask is first compared with the FlexAttention mask_mod that
defines the benchmark (the same definitions as shared/anchors/bench_anchors.py). If no pattern
of the example file matches, an inline source in the attnc language is used; the row's ``source``
says which. Results: ``bench.jsonl`` (one row per pattern and length, as they finish) and
``bench_summary.json`` in ``--out``; the short table is printed last. See benchmarks/README.md.

Imports only torch, the standard library and attnc (triton through attnc.bench).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))      # after PYTHONPATH / site-packages: an installed attnc wins

from attnc.bench import (HEAT_MS, bench_pattern, dense_mask_from_mod, env_info, format_table,  # noqa: E402
                         masked_attention_reference, parse_dtype, _backward_unavailable, _create_block_mask)
from attnc.errors import InputError  # noqa: E402


# ----------------------------------------------------------------------------------------------
# The benchmark patterns (SPEC 6), as FlexAttention mask_mods and as attnc sources


def anchor_inputs(N: int, B: int, H: int, device="cpu", doc_len=(512, 4096), n_buckets: int = 8,
                  keep_prob: float = 0.5, seed: int = 0) -> dict:
    """The runtime tensors of the benchmark patterns, drawn as the anchor script draws them.

    One CPU generator seeded ``seed`` draws, in this order: document lengths uniform in
    ``doc_len`` (inclusive, the last one cut to fit N), bucket ids of queries and of keys
    (B, H, N) in ``[0, n_buckets)``, and the kept-key flags (B, H, N) with probability
    ``keep_prob``. With the defaults the tensors, hence the densities, equal the anchors'.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    lens, total = [], 0
    while total < N:
        n = int(torch.randint(doc_len[0], doc_len[1] + 1, (1,), generator=g))
        n = min(n, N - total)
        lens.append(n)
        total += n
    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    qb = torch.randint(0, n_buckets, (B, H, N), generator=g)
    kb = torch.randint(0, n_buckets, (B, H, N), generator=g)
    keep = torch.rand(B, H, N, generator=g) < keep_prob
    return {"doc": doc.to(device), "qb": qb.to(device), "kb": kb.to(device), "keep": keep.to(device),
            "_B": B, "_H": H, "_N": N}


@dataclasses.dataclass(frozen=True)
class BenchPattern:
    """One benchmark pattern: its FlexAttention definition and where its attnc source comes from."""
    name: str
    example: str                                  # file under examples/
    params: dict                                  # semantic parameter values at benchmark scale
    mask: Callable                                # (canonical inputs, params) -> mask_mod(b, h, q, k)
    inline: str                                   # fallback source (attnc language)
    inputs: tuple = ()                            # canonical runtime inputs the pattern reads
    aliases: dict = dataclasses.field(default_factory=dict)   # semantic name -> accepted file names
    variants: Callable = lambda p: [p]            # parameter sets to try with the example file
    flex_per_bh: bool = False                     # create_block_mask over (B, H), as the anchors do
    target: float = 1.1                           # SPEC 6: minimum speed-up over FlexAttention
    dense_causal: bool = False                    # also time SDPA dense causal (cuDNN, flash)

    def with_params(self, **params) -> "BenchPattern":
        return dataclasses.replace(self, params={**self.params, **params})


WINDOW_NAMES = ("window", "w", "size", "width", "left", "span", "length")
DILATION_NAMES = ("dilation", "d", "step", "stride", "dil")
PREFIX_NAMES = ("prefix", "n", "prefix_len", "prefix_length", "n_prefix", "length", "size")


def _window_variants(p):
    # "q - k < W" (the anchors) is "q - k <= W - 1": a file whose parameter is inclusive matches W - 1.
    return [p, {**p, "window": p["window"] - 1}]


SPECS: list[BenchPattern] = [
    BenchPattern(
        "causal", "causal.attn", {},
        mask=lambda c, p: (lambda b, h, q, k: q >= k),
        inline="pattern causal() {\n    mask k <= q\n}\n",
        dense_causal=True),
    BenchPattern(
        "sliding_window_1024", "sliding_window.attn", {"window": 1024},
        mask=lambda c, p: (lambda b, h, q, k: (q >= k) & (q - k < p["window"])),
        inline="pattern sliding_window(window: int) {\n    mask k <= q and q - k < window\n}\n",
        aliases={"window": WINDOW_NAMES}, variants=_window_variants),
    BenchPattern(
        "dilated_w2048_d2", "dilated_window.attn", {"window": 2048, "dilation": 2},
        mask=lambda c, p: (lambda b, h, q, k: (q >= k) & (q - k < p["window"])
                           & ((q - k) % p["dilation"] == 0)),
        inline=("pattern dilated_window(window: int, dilation: int) {\n"
                "    mask k <= q and q - k < window and (q - k) % dilation == 0\n}\n"),
        aliases={"window": WINDOW_NAMES, "dilation": DILATION_NAMES}, variants=_window_variants,
        target=2.5),
    BenchPattern(
        "document_causal", "documents.attn", {},
        mask=lambda c, p: (lambda b, h, q, k: (c["doc"][q] == c["doc"][k]) & (q >= k)),
        inline=("pattern document_causal() {\n    input doc: int[batch, n]\n"
                "    mask doc[b, q] == doc[b, k] and k <= q\n}\n"),
        inputs=("doc",),
        aliases={"doc": ("doc", "docs", "document", "documents", "doc_id", "doc_ids", "document_ids",
                         "seg", "segment", "segments", "segment_ids", "ids")}),
    BenchPattern(
        "prefix_lm_2048", "prefix_lm.attn", {"prefix": 2048},
        mask=lambda c, p: (lambda b, h, q, k: (k < p["prefix"]) | (q >= k)),
        inline="pattern prefix_lm(prefix: int) {\n    mask k < prefix or k <= q\n}\n",
        aliases={"prefix": PREFIX_NAMES}),
    BenchPattern(
        "hash8_causal", "hash_buckets.attn", {},
        mask=lambda c, p: (lambda b, h, q, k: (c["qb"][b, h, q] == c["kb"][b, h, k]) & (q >= k)),
        inline=("pattern hash_causal() {\n    input qb: int[batch, heads, n]\n"
                "    input kb: int[batch, heads, n]\n"
                "    mask qb[b, h, q] == kb[b, h, k] and k <= q\n}\n"),
        inputs=("qb", "kb"),
        aliases={"qb": ("qb", "q_buckets", "qbuckets", "query_buckets", "q_bucket", "qbucket", "bq"),
                 "kb": ("kb", "k_buckets", "kbuckets", "key_buckets", "k_bucket", "kbucket", "bk")},
        flex_per_bh=True, target=5.0),
    BenchPattern(
        "keep50_causal", "dropped_keys.attn", {},
        mask=lambda c, p: (lambda b, h, q, k: c["keep"][b, h, k] & (q >= k)),
        inline=("pattern keep_causal() {\n    input keep: bool[batch, heads, n]\n"
                "    mask keep[b, h, k] and k <= q\n}\n"),
        inputs=("keep",),
        aliases={"keep": ("keep", "kept", "keep_k", "keys_kept", "key_keep", "keep_keys", "kept_keys")},
        flex_per_bh=True, target=2.0),
]
SPEC_BY_NAME = {s.name: s for s in SPECS}
QUICK_PATTERNS = ("causal", "document_causal")


# ----------------------------------------------------------------------------------------------
# From example files to kernels


_COMMENT = re.compile(r"#[^\n]*")
_PATTERN_HEAD = re.compile(r"\bpattern\s+([A-Za-z_]\w*)\s*(?:\(([^)]*)\))?\s*\{")
_PARAM = re.compile(r"\s*([A-Za-z_]\w*)\s*(?::\s*\w+)?\s*(=\s*\S.*)?$", re.S)


def pattern_headers(text: str) -> list[tuple[str, list[tuple[str, bool]]]]:
    """``[(pattern name, [(parameter, has_default), ...]), ...]`` of a pattern file (a light scan)."""
    text = _COMMENT.sub("", text)
    found = []
    for m in _PATTERN_HEAD.finditer(text):
        params = []
        for part in (m.group(2) or "").split(","):
            if not part.strip():
                continue
            pm = _PARAM.match(part)
            if pm:
                params.append((pm.group(1), pm.group(2) is not None))
        found.append((m.group(1), params))
    return found


def _semantic_name(file_name: str, aliases: dict, semantic: dict) -> str | None:
    low = file_name.lower()
    for sem in semantic:
        if low == sem or low in aliases.get(sem, ()):
            return sem
    return None


def example_candidates(spec: BenchPattern, params: dict, examples_dir: Path) -> list[tuple]:
    """``(label, path, pattern name, keyword params)`` for each way to compile the example file."""
    path = examples_dir / spec.example
    if not path.is_file():
        return []
    seen, cands = set(), []
    for pname, pparams in pattern_headers(path.read_text()):
        for variant in spec.variants(params):
            kwargs, usable = {}, True
            for decl, has_default in pparams:
                sem = _semantic_name(decl, spec.aliases, variant)
                if sem is not None:
                    kwargs[decl] = variant[sem]
                elif not has_default:
                    usable = False
                    break
            key = (pname, tuple(sorted(kwargs.items())))
            if usable and key not in seen:
                seen.add(key)
                args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
                cands.append((f"examples/{spec.example}:{pname}({args})", path, pname, kwargs))
    return cands


def _fit_rank(t: torch.Tensor, ndim: int, B: int, H: int, name: str) -> torch.Tensor:
    """A canonical tensor (doc (N,), others (B, H, N)) in the rank a declaration asks for."""
    if t.dim() == ndim:
        return t
    if t.dim() == 1 and ndim == 2:
        return t[None, :].expand(B, t.shape[0])
    if t.dim() == 1 and ndim == 3:
        return t[None, None, :].expand(B, H, t.shape[0])
    raise LookupError(f"input {name!r}: cannot shape a {t.dim()}-d benchmark tensor into {ndim} dims")


def fit_inputs(kern, spec: BenchPattern, canon: dict, int_dtype=torch.int64) -> dict:
    """The kernel's runtime inputs, by its own names and ranks, from the canonical tensors."""
    decls = getattr(kern, "inputs", None)
    if decls is None:                                # no declarations to read: canonical names
        decls = {n: None for n in spec.inputs}
    res, used = {}, set()
    for name, decl in decls.items():
        canon_name = _semantic_name(name, spec.aliases, {n: None for n in spec.inputs})
        if canon_name is None and len(decls) == 1 and len(spec.inputs) == 1:
            canon_name = spec.inputs[0]
        if canon_name is None:
            raise LookupError(f"kernel input {name!r} matches none of {spec.inputs}")
        t = canon[canon_name]
        dims = getattr(decl, "dims", None)
        t = _fit_rank(t, len(dims) if dims else t.dim(), canon["_B"], canon["_H"], name)
        kind = str(getattr(decl, "dtype", "") or "").lower()      # 'int', 'bool', 'float' (or an enum)
        if "bool" in kind or (not kind and t.dtype == torch.bool):
            t = t.to(torch.bool)
        elif "int" in kind or not kind:
            t = t.to(int_dtype)
        else:
            t = t.float()
        res[name] = t.contiguous()
        used.add(canon_name)
    missing = set(spec.inputs) - used
    if missing:
        raise LookupError(f"kernel declares no input for {sorted(missing)}")
    return res


def verify_kernel(kern, spec: BenchPattern, params: dict, device, n: int = 2560,
                  int_dtype=torch.int64) -> tuple[bool, str]:
    """Does ``kern.mask`` equal the benchmark's mask_mod on an n x n grid (batch 2, heads 2)?"""
    canon = anchor_inputs(n, 2, 2, device, doc_len=(50, 700), seed=1)
    inputs = fit_inputs(kern, spec, canon, int_dtype)
    got = kern.mask(n, n, batch=2, heads=2, **inputs)
    want = dense_mask_from_mod(spec.mask(canon, params), 2, 2, n, n, device)
    got = torch.broadcast_to(torch.as_tensor(got).to(want.device).bool(), want.shape)
    bad = int((got != want).sum())
    if bad:
        return False, f"mask differs from the benchmark definition at {bad} of {want.numel()} entries (n={n})"
    return True, "mask matches"


@dataclasses.dataclass
class Resolved:
    kern: object
    source: str
    compile_s: float
    compile_warm_ms: float | None
    int_dtype: torch.dtype
    rejected: list


def resolve_kernel(spec: BenchPattern, params: dict, examples_dir: Path, device, verify_n: int = 2560,
                   log=print) -> Resolved:
    """Compile the pattern from its example file if one of its patterns matches, else inline."""
    import attnc
    cands = [(label, (lambda path=path, pn=pn, kw=kw: attnc.compile(str(path), pattern=pn, **kw)),
              (str(path), pn, kw))
             for label, path, pn, kw in example_candidates(spec, params, examples_dir)]
    cands.append(("inline", lambda: attnc.compile(spec.inline, **params), (spec.inline, None, params)))
    rejected = []
    for label, make, (src, pn, kw) in cands:
        try:
            t0 = time.perf_counter()
            kern = make()
            compile_s = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - try the next source
            rejected.append(f"{label}: compile failed: {e!r}"[:300])
            continue
        for int_dtype in ((torch.int64, torch.int32) if spec.inputs else (torch.int64,)):
            try:
                ok, why = verify_kernel(kern, spec, params, device, verify_n, int_dtype)
            except InputError as e:
                ok, why = False, f"input error: {e}"
                if int_dtype == torch.int64 and spec.inputs:
                    continue                           # maybe the kernel wants int32 ids
            except Exception as e:  # noqa: BLE001
                ok, why = False, f"verification failed: {e!r}"
            break
        if not ok:
            rejected.append(f"{label}: {why}"[:300])
            continue
        warm = None
        try:
            t0 = time.perf_counter()
            attnc.compile(src, **({"pattern": pn} if pn else {}), **kw)
            warm = (time.perf_counter() - t0) * 1e3
        except Exception:  # noqa: BLE001 - informative only
            pass
        for r in rejected:
            log(f"  [{spec.name}] not used: {r}")
        return Resolved(kern, label, compile_s, warm, int_dtype, rejected)
    raise RuntimeError(f"no attnc source reproduces {spec.name}: " + " | ".join(rejected))


@dataclasses.dataclass
class BenchCall:
    """One benchmark call of a pattern at one length, for the scripts that time it beside Flex."""
    kern: object
    inputs: dict                 # the kernel's runtime inputs
    mask_mod: Callable           # Flex's mask_mod for the same inputs
    block_mask: object           # Flex's block mask
    q: torch.Tensor              # q, k, v require grad
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    batch: int
    heads: int
    dim: int


def bench_call(spec: BenchPattern, n: int, tokens: int, heads: int, dim: int, device="cuda",
               dtype=torch.bfloat16) -> BenchCall:
    """The benchmark's call of ``spec`` at length ``n`` (batch = tokens // n): the kernel from its example
    file, the anchors' runtime inputs, seeded random q, k, v and dO, and Flex's mask and block mask."""
    b = max(1, tokens // n)
    res = resolve_kernel(spec, spec.params, ROOT / "examples", device)
    canon = anchor_inputs(n, b, heads, device)
    inputs = fit_inputs(res.kern, spec, canon, res.int_dtype)
    mask_mod = spec.mask(canon, spec.params)
    block_mask = _create_block_mask(mask_mod, (b, heads) if spec.flex_per_bh else None, n, n, device)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, heads, n, dim, device=device, dtype=dtype, generator=g).requires_grad_()
               for _ in range(3))
    dout = torch.randn(b, heads, n, dim, device=device, dtype=dtype, generator=g)
    return BenchCall(res.kern, inputs, mask_mod, block_mask, q, k, v, dout, b, heads, dim)


# ----------------------------------------------------------------------------------------------
# Benchmark mode


def _emit(row: dict, paths: list[Path]):
    line = json.dumps(row, default=str)
    for p in paths:
        with open(p, "a") as f:
            f.write(line + "\n")


def add_relative_figures(rows: list[dict]) -> None:
    """Each pattern's attnc throughput over attnc's own dense causal at the same length (SPEC 6)."""
    causal = {r["N"]: r for r in rows if r.get("pattern") == "causal" and not r.get("error")}
    for r in rows:
        c = causal.get(r.get("N"))
        if c is None or r.get("error"):
            continue
        for mode in ("fwd", "fwdbwd"):
            a, base = r.get(f"attnc_{mode}_tflops"), c.get(f"attnc_{mode}_tflops")
            if a is not None and base:
                r[f"vs_own_causal_{mode}"] = round(a / base, 3)


def bench_one(spec: BenchPattern, N: int, args, resolved_cache: dict) -> dict:
    B, H, D = max(1, args.tokens // N), args.heads, args.dim
    row = {"pattern": spec.name, "N": N, "B": B, "H": H, "D": D}
    try:
        if spec.name not in resolved_cache:
            resolved_cache[spec.name] = resolve_kernel(spec, spec.params, Path(args.examples), args.device,
                                                       verify_n=args.verify_n)
        res = resolved_cache[spec.name]
        canon = anchor_inputs(N, B, H, args.device)
        inputs = fit_inputs(res.kern, spec, canon, res.int_dtype)
        row = bench_pattern(
            res.kern, seq=N, batch=B, heads=H, dim=D, dtype=parse_dtype(args.dtype), inputs=inputs,
            vs=args.vs, flex_mask_mod=spec.mask(canon, spec.params), check=not args.no_check,
            name=spec.name, flex_mask_bh=(B, H) if spec.flex_per_bh else None,
            sdpa_causal=spec.dense_causal, warmup=args.warmup, rep=args.rep, device=args.device,
            log=lambda s: print("  " + s, flush=True), clocks=args.clocks)
        warm = None if res.compile_warm_ms is None else round(res.compile_warm_ms, 2)
        row.update(source=res.source, attnc_compile_s=round(res.compile_s, 4), attnc_compile_warm_ms=warm,
                   target_vs_flex=spec.target)
    except Exception as e:  # noqa: BLE001 - one pattern's failure must not stop the run
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {e}"[:500]
        row["target_vs_flex"] = spec.target
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


def _child_command(args, N: int, name: str, rows_path: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--seqs", str(N), "--patterns", name,
           "--out", args.out, "--tokens", str(args.tokens), "--heads", str(args.heads),
           "--dim", str(args.dim), "--dtype", args.dtype, "--warmup", str(args.warmup),
           "--rep", str(args.rep), "--vs", args.vs, "--examples", args.examples,
           "--device", args.device, "--verify-n", str(args.verify_n), "--_child", str(rows_path)]
    if not args.clocks:
        cmd.append("--no-clocks")
    if args.no_check:
        cmd.append("--no-check")
    return cmd


def run_bench(args, seqs: list[int], specs: list[BenchPattern]) -> list[dict]:
    out = Path(args.out)
    jsonl = out / "bench.jsonl"
    rows: list[dict] = []
    if args.isolate:
        for N in seqs:
            for spec in specs:
                rows_path = out / f".rows_{spec.name}_{N}.jsonl"
                rows_path.unlink(missing_ok=True)
                print(f"== {spec.name} N={N} (subprocess)", flush=True)
                try:
                    rc = subprocess.run(_child_command(args, N, spec.name, rows_path),
                                        timeout=args.child_timeout).returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
                got = ([json.loads(x) for x in rows_path.read_text().splitlines()]
                       if rows_path.exists() else [])
                if not got:
                    got = [{"pattern": spec.name, "N": N, "error": f"subprocess ended ({rc}) without a row",
                            "target_vs_flex": spec.target}]
                    _emit(got[0], [jsonl])
                rows += got
        return rows
    resolved: dict = {}
    for N in seqs:
        for spec in specs:
            print(f"== {spec.name} N={N} B={max(1, args.tokens // N)}", flush=True)
            row = bench_one(spec, N, args, resolved)
            if row.get("source"):
                print(f"  source: {row['source']}", flush=True)
            _emit(row, [jsonl] + ([Path(args._child)] if args._child else []))
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Check mode: correctness against a float64 reference on many shapes


@dataclasses.dataclass(frozen=True)
class CheckCase:
    d: int
    dtype: str
    nq: int
    nk: int
    hq: int
    hkv: int
    layout: str = "bhnd"          # "bnhd": q, k, v are transposed views (non-contiguous)

    @property
    def label(self) -> str:
        lay = " bnhd" if self.layout != "bhnd" else ""
        return f"D{self.d} {self.dtype} {self.nq}x{self.nk} H{self.hq}/{self.hkv}{lay}"


def check_cases(dims, dtypes, lengths, hq: int, hkv: int, full: bool) -> list[CheckCase]:
    """Shapes for --check. By default a covering subset (each head dim in each dtype, lengths and
    GQA alternating, one non-contiguous case, two Nq != Nk cases); with ``full`` every product."""
    gqa = [(hq, hq), (hq, hkv)] if hkv != hq else [(hq, hq)]
    cases = []
    if full:
        for d, dt, n, (a, b) in itertools.product(dims, dtypes, lengths, gqa):
            cases.append(CheckCase(d, dt, n, n, a, b))
    else:
        for i, (d, dt) in enumerate(itertools.product(dims, dtypes)):
            a, b = gqa[(i // 2) % len(gqa)]
            cases.append(CheckCase(d, dt, lengths[i % len(lengths)], lengths[i % len(lengths)], a, b,
                                   "bnhd" if i == 1 else "bhnd"))
    if len(lengths) > 1:
        lo, hi = min(lengths), max(lengths)
        mid_d = dims[len(dims) // 2]
        cases.append(CheckCase(mid_d, dtypes[-1], lo, hi, *gqa[-1]))
        cases.append(CheckCase(dims[0], dtypes[0], hi, lo, *gqa[0]))
    return cases


def _max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    d = (a.detach().to(torch.float64) - ref.detach().to(torch.float64)).abs()
    if d.numel() == 0:
        return 0.0
    m = float(d.max())
    return m if math.isfinite(m) and bool(torch.isfinite(d).all()) else float("inf")


def _lse_errors(lse: torch.Tensor, ref: torch.Tensor) -> tuple[float, int]:
    """Max error over rows with keys, and the count of rows where -inf-ness disagrees."""
    lse, ref = lse.detach().to(torch.float64), ref.detach().to(torch.float64)
    ref_inf, got_inf = torch.isinf(ref), torch.isinf(lse)
    mismatch = int((ref_inf != got_inf).sum())
    fin = ~ref_inf & ~got_inf
    return (_max_err(lse[fin], ref[fin]) if bool(fin.any()) else 0.0), mismatch


def check_one(kern, spec: BenchPattern, case: CheckCase, device, int_dtype, seed: int,
              slack: float = 1e-4, factor: float = 2.0) -> dict:
    """One case: attnc vs the float64 reference, judged by the error of plain PyTorch in the same
    low precision (FlashAttention's rule): pass when ``err <= factor * torch_err + slack``."""
    dt = parse_dtype(case.dtype)
    B, Hq, Hkv, Nq, Nk, D = 2, case.hq, case.hkv, case.nq, case.nk, case.d
    rec = {"pattern": spec.name, "case": case.label, **dataclasses.asdict(case)}
    canon = anchor_inputs(max(Nq, Nk), B, Hq, device, doc_len=(16, 400), seed=seed)
    inputs = fit_inputs(kern, spec, canon, int_dtype)
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(h, n):
        if case.layout == "bnhd":
            t = torch.randn(B, n, h, D, device=device, dtype=dt, generator=g).transpose(1, 2)
        else:
            t = torch.randn(B, h, n, D, device=device, dtype=dt, generator=g)
        return t.detach().requires_grad_(True)

    q, k, v = rnd(Hq, Nq), rnd(Hkv, Nk), rnd(Hkv, Nk)
    dout = torch.randn(B, Hq, Nq, D, device=device, dtype=dt, generator=g)
    mask = torch.broadcast_to(torch.as_tensor(kern.mask(Nq, Nk, batch=B, heads=Hq, **inputs))
                              .to(device).bool(), (B, Hq, Nq, Nk))
    rec["density"] = round(float(mask.float().mean()), 5)
    rec["empty_rows"] = int((~mask.any(-1)).sum())
    if Nq == Nk:
        want = dense_mask_from_mod(spec.mask(canon, spec.params), B, Hq, Nq, Nk, device)
        rec["mask_mismatch"] = int((want != mask).sum())
    ref = masked_attention_reference(q, k, v, mask, dout=dout, compute_dtype=torch.float64)
    base = masked_attention_reference(q, k, v, mask, dout=dout, compute_dtype=dt)
    problems = []
    if rec.get("mask_mismatch"):
        problems.append(f"mask {rec['mask_mismatch']} entries")

    def judge(key, got, want_ref, base_val):
        err, berr = _max_err(got, want_ref), _max_err(base_val, want_ref)
        rec[f"{key}_err"], rec[f"{key}_torch_err"] = err, berr
        if not err <= factor * berr + slack:
            problems.append(f"{key} {err:.1e}>{factor:g}x{berr:.1e}")

    with torch.no_grad():
        try:
            out, lse = kern(q, k, v, return_lse=True, **inputs)
        except (TypeError, NotImplementedError) as e:
            rec["lse"] = f"unavailable: {e!r}"[:200]
            out, lse = kern(q, k, v, **inputs), None
    rec["out_shape_ok"] = tuple(out.shape) == (B, Hq, Nq, D) and out.dtype == dt
    if not rec["out_shape_ok"]:
        problems.append(f"out shape/dtype {tuple(out.shape)} {out.dtype}")
    judge("out", out, ref["out"], base["out"])
    if lse is not None:
        lerr, mism = _lse_errors(lse, ref["lse"])
        blerr, _ = _lse_errors(base["lse"], ref["lse"])
        rec.update(lse_err=lerr, lse_torch_err=blerr, lse_inf_mismatch=mism)
        if mism or not lerr <= factor * blerr + slack:
            problems.append(f"lse {lerr:.1e} (inf mismatch {mism})")
    try:
        o = kern(q, k, v, **inputs)
        if not o.requires_grad:
            raise NotImplementedError("output has no grad_fn")
        o.backward(dout)
        for key, t in (("dq", q), ("dk", k), ("dv", v)):
            if t.grad is None:
                problems.append(f"{key} missing")
            else:
                judge(key, t.grad, ref[key], base[key])
    except Exception as e:  # noqa: BLE001
        if _backward_unavailable(e):
            rec["bwd"] = "unavailable"
        else:
            rec["bwd_error"] = repr(e)[:300]
            problems.append("backward raised")
    rec["status"] = "ok" if not problems else "FAIL " + "; ".join(problems)
    return rec


def _fmt_check(rec: dict) -> str:
    def pair(key):
        if f"{key}_err" not in rec:
            return f"{key} -"
        return f"{key} {rec[f'{key}_err']:.1e}/{rec[f'{key}_torch_err']:.1e}"
    parts = [pair(x) for x in ("out", "lse", "dq", "dk", "dv")]
    if rec.get("bwd") == "unavailable":
        parts.append("bwd n/a")
    return f"{rec['pattern']:<20} {rec['case']:<32} " + " ".join(parts) + f"  {rec['status']}"


def run_check(args, specs: list[BenchPattern]) -> list[dict]:
    out = Path(args.out)
    cases = check_cases([int(x) for x in args.check_dims.split(",")], args.check_dtypes.split(","),
                        [int(x) for x in args.check_lengths.split(",")], args.check_heads,
                        args.check_kv_heads, args.check_full)
    recs = []
    print("errors: attnc max abs error / plain torch (same low precision) max abs error, "
          "both against float64", flush=True)
    for spec in specs:
        try:
            res = resolve_kernel(spec, spec.params, Path(args.examples), args.device, verify_n=args.verify_n)
            print(f"== {spec.name}: {res.source}", flush=True)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rec = {"pattern": spec.name, "case": "-", "status": f"FAIL no kernel: {e}"[:300]}
            recs.append(rec)
            _emit(rec, [out / "check.jsonl"])
            continue
        for i, case in enumerate(cases):
            if spec.inputs and case.nq != case.nk:
                continue        # runtime inputs are declared over one length
            try:
                rec = check_one(res.kern, spec, case, args.device, res.int_dtype, seed=1000 + i)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                rec = {"pattern": spec.name, "case": case.label,
                       "status": f"FAIL {type(e).__name__}: {e}"[:300]}
            rec["source"] = res.source
            recs.append(rec)
            _emit(rec, [out / "check.jsonl"])
            line = (_fmt_check(rec) if "out_err" in rec
                    else f"{spec.name:<20} {case.label:<32} {rec['status']}")
            print(line, flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return recs


def check_summary(recs: list[dict]) -> str:
    """Per pattern: cases passed, worst error ratio to plain torch, failing cases."""
    lines = [f"{'pattern':<20} {'passed':>7}  {'worst attnc/torch err':>21}  failures"]
    by = {}
    for r in recs:
        by.setdefault(r["pattern"], []).append(r)
    for name, rs in by.items():
        ok = sum(r.get("status") == "ok" for r in rs)
        ratios = [r[f"{k}_err"] / max(r[f"{k}_torch_err"], 1e-12)
                  for r in rs for k in ("out", "lse", "dq", "dk", "dv") if f"{k}_err" in r]
        worst = f"{max(ratios):.2f}" if ratios else "-"
        fails = "; ".join(f"{r['case']}: {r['status'][5:]}" for r in rs if r.get("status") != "ok")
        lines.append(f"{name:<20} {ok:>3}/{len(rs):<3}  {worst:>21}  {fails[:150]}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", default="8192,32768", help="sequence lengths, comma separated")
    ap.add_argument("--patterns", default="all", help="comma separated names: " + ",".join(SPEC_BY_NAME))
    ap.add_argument("--out", default=os.environ.get("OUT") or "./bench_out", help="output directory")
    ap.add_argument("--tokens", type=int, default=32768, help="batch = tokens // seq")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--vs", default="sdpa,flex")
    ap.add_argument("--warmup", type=float, default=HEAT_MS,
                    help="do_bench warm-up, ms: long enough for the GPU's clock to settle at its power limit "
                         "(attnc.bench.HEAT_MS)")
    ap.add_argument("--rep", type=float, default=500, help="do_bench repetition time, ms")
    ap.add_argument("--examples", default=str(ROOT / "examples"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--verify-n", type=int, default=2560, help="grid size of the mask comparison")
    ap.add_argument("--no-check", action="store_true", help="skip the output check before timing")
    ap.add_argument("--no-clocks", dest="clocks", action="store_false",
                    help="do not record the SM clock and board power (NVML) of every timing (*_mhz, *_watts)")
    ap.add_argument("--quick", action="store_true", help="smoke test: seq 2048, " + ",".join(QUICK_PATTERNS))
    ap.add_argument("--isolate", action="store_true", help="each pattern and length in a subprocess")
    ap.add_argument("--child-timeout", type=float, default=540)
    ap.add_argument("--check", action="store_true", help="correctness only (no timing)")
    ap.add_argument("--check-dims", default="64,128,256")
    ap.add_argument("--check-dtypes", default="fp16,bf16")
    ap.add_argument("--check-lengths", default="1000,4097")
    ap.add_argument("--check-heads", type=int, default=16)
    ap.add_argument("--check-kv-heads", type=int, default=4)
    ap.add_argument("--check-full", action="store_true", help="every product of the check shapes")
    ap.add_argument("--_child", default="", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    names = list(SPEC_BY_NAME) if args.patterns == "all" else [p.strip() for p in args.patterns.split(",")]
    if args.quick and args.patterns == "all":
        names = list(QUICK_PATTERNS)
    unknown = [n for n in names if n not in SPEC_BY_NAME]
    if unknown:
        print(f"unknown patterns {unknown}; known: {list(SPEC_BY_NAME)}", file=sys.stderr)
        return 2
    specs = [SPEC_BY_NAME[n] for n in names]
    seqs = [2048] if args.quick else [int(s) for s in args.seqs.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.check and not args.device.startswith("cuda"):
        print("warning: timing off a CUDA device is a smoke test of this script, not a benchmark",
              file=sys.stderr)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: the benchmark needs a GPU (--device cpu runs a smoke test)",
              file=sys.stderr)
        return 2
    env = env_info()
    if not args._child:
        print(json.dumps(env), flush=True)

    if args.check:
        recs = run_check(args, specs)
        summary = {"env": env, "cases": recs}
        (out / "check_summary.json").write_text(json.dumps(summary, indent=1, default=str))
        print()
        print(check_summary(recs))
        return 0 if all(r.get("status") == "ok" for r in recs) else 1

    rows = run_bench(args, seqs, specs)
    if args._child:
        return 0
    add_relative_figures(rows)
    (out / "bench_summary.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1, default=str))
    print()
    print(f"{env.get('device')}  torch {env.get('torch')}  triton {env.get('triton')}  "
          f"{args.dtype} D={args.dim} H={args.heads} tokens={args.tokens}  details: {out / 'bench.jsonl'}")
    print("TFLOP/s effective (unmasked entries only); x = attnc speed-up over FlexAttention")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
