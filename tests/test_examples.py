"""The example patterns in examples/*.attn against independent formulas.

Every expected mask here is written directly from the text of SPEC section 2.3 in numpy, without
attnc, so a wrong prelude definition, a wrong lowering or a wrong evaluator all show up as a
mismatch. The neighborhood rule in particular is implemented differently from the SPEC formula
(by listing each dilation group and slicing a window out of it) so that the two cross-check.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

import attnc

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Sizes for patterns that make sense for any (n_q, n_k): odd lengths and n_q != n_k both ways.
ANY_SIZES = [(1, 1), (17, 17), (67, 67), (130, 130), (17, 67), (67, 17), (1, 130), (130, 1)]
# Sizes for patterns whose runtime inputs index queries and keys with one size name N.
SQUARE_SIZES = [(1, 1), (17, 17), (67, 67), (130, 130)]
BATCH, HEADS = 2, 3


@functools.lru_cache(maxsize=None)
def _compile_cached(file: str, pattern: str | None, params: tuple) -> attnc.Kernel:
    kwargs = dict(params)
    if pattern is not None:
        kwargs["pattern"] = pattern
    return attnc.compile(str(EXAMPLES / file), **kwargs)


def compile_example(file: str, pattern: str | None = None, **params) -> attnc.Kernel:
    """Compile an example once per (file, pattern, params) for the whole module."""
    return _compile_cached(file, pattern, tuple(sorted(params.items())))


# ----------------------------------------------------------------------------------------------
# Independent formulas. Each returns a bool array broadcastable to (batch, heads, n_q, n_k).
# ----------------------------------------------------------------------------------------------

def positions(n_q: int, n_k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(n_q).reshape(1, 1, n_q, 1), np.arange(n_k).reshape(1, 1, 1, n_k)


def causal(n_q, n_k):
    q, k = positions(n_q, n_k)
    return k <= q + (n_k - n_q)


def window(n_q, n_k, left, right=0):
    q, k = positions(n_q, n_k)
    return (q - left <= k) & (k <= q + right)


def globals_(n_q, n_k, n):
    q, k = positions(n_q, n_k)
    return (q < n) | (k < n)


def same_block(n_q, n_k, size):
    q, k = positions(n_q, n_k)
    return q // size == k // size


def natten_axis(n: int, kernel: int, dilation: int) -> np.ndarray:
    """(n, n) visibility along one axis, NATTEN style, by listing each dilation group.

    Positions with the same residue modulo `dilation` form a group; inside its group a query
    sees the `kernel` consecutive members centred on it, the slice pushed back inside the group
    at both ends; a group shorter than the kernel is seen whole.
    """
    seen = np.zeros((n, n), dtype=bool)
    for residue in range(dilation):
        members = list(range(residue, n, dilation))
        for t, i in enumerate(members):
            if len(members) <= kernel:
                chosen = members
            else:
                start = t - kernel // 2
                start = max(0, min(start, len(members) - kernel))
                chosen = members[start:start + kernel]
            seen[i, chosen] = True
    return seen


def natten_nd(shape: tuple[int, ...], kernels: tuple[int, ...], dilations: tuple[int, ...]):
    """(N, N) visibility for tokens laid out row-major on `shape`, N = prod(shape)."""
    n = math.prod(shape)
    coords = np.stack(np.unravel_index(np.arange(n), shape), axis=1)    # row-major
    seen = np.ones((n, n), dtype=bool)
    for axis, (length, kernel, dilation) in enumerate(zip(shape, kernels, dilations)):
        along = natten_axis(length, kernel, dilation)
        seen &= along[coords[:, axis][:, None], coords[:, axis][None, :]]
    return seen.reshape(1, 1, n, n)


# ----------------------------------------------------------------------------------------------
# Runtime inputs, from a seeded generator.
# ----------------------------------------------------------------------------------------------

def sorted_docs(n, gen, dtype=torch.int64):
    """Contiguous documents of random lengths: doc ids non-decreasing along the sequence."""
    rows = []
    for _ in range(BATCH):
        starts = torch.rand(n, generator=gen) < 0.15      # a new document starts here
        starts[0] = False
        rows.append(torch.cumsum(starts.to(torch.int64), 0))
    return {"doc": torch.stack(rows).to(dtype)}


def shuffled_docs(n, gen, dtype=torch.int64):
    """Document ids in no order (segments interleaved), including negative ids."""
    return {"doc": torch.randint(-2, 3, (BATCH, n), generator=gen).to(dtype)}


def random_buckets(n, gen, n_buckets=4):
    shape = (BATCH, HEADS, n)
    return {"qb": torch.randint(0, n_buckets, shape, generator=gen),
            "kb": torch.randint(0, n_buckets, shape, generator=gen)}


def shared_buckets(n, gen, n_buckets=3):
    """Reformer's shared-QK hashing: a query's and its own key's bucket coincide."""
    b = torch.randint(0, n_buckets, (BATCH, HEADS, n), generator=gen)
    return {"qb": b, "kb": b.clone()}


def random_keep(n, gen, p=0.5):
    keep = torch.rand(BATCH, HEADS, n, generator=gen) < p
    keep[0, 0, :] = False          # one (b, h) with nothing kept: every row fully masked
    keep[-1, -1, :] = True         # and one with everything kept
    return {"keep": keep}


def alibi_slopes(heads):
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)])


# ----------------------------------------------------------------------------------------------
# The cases: (file, pattern, params) -> expected mask.
# ----------------------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    file: str
    expected: Callable            # (n_q, n_k, params, inputs as numpy) -> bool array
    params: dict = field(default_factory=dict)
    pattern: str | None = None
    sizes: list = field(default_factory=lambda: ANY_SIZES)
    inputs: Callable | None = None     # (n, generator) -> dict of tensors


def doc_mask(n_q, n_k, p, x):
    doc = x["doc"]
    return (doc[:, None, :n_q, None] == doc[:, None, None, :n_k]) & causal(n_q, n_k)


def bucket_mask(n_q, n_k, p, x):
    return (x["qb"][:, :, :n_q, None] == x["kb"][:, :, None, :n_k]) & causal(n_q, n_k)


def dilated_window_mask(n_q, n_k, p, x):
    q, k = positions(n_q, n_k)
    return causal(n_q, n_k) & window(n_q, n_k, p["window"]) & ((q - k) % p["dilation"] == 0)


def strided_mask(n_q, n_k, p, x):
    q, k = positions(n_q, n_k)
    s = p["stride"]
    return causal(n_q, n_k) & ((q - k < s) | ((q - k) % s == 0))


def fixed_mask(n_q, n_k, p, x):
    q, k = positions(n_q, n_k)
    s, c = p["stride"], p["c"]
    return causal(n_q, n_k) & ((q // s == k // s) | (k % s >= s - c))


def chunk_mask(n_q, n_k, p, x):
    q, k = positions(n_q, n_k)
    back = q // p["chunk"] - k // p["chunk"]
    return (back >= 0) & (back <= p["lookback"])


def circular_mask(n_q, n_k, p, x):
    q, k = positions(n_q, n_k)
    d = (k - q) % n_k
    return (d <= p["radius"]) | (d >= n_k - p["radius"])


def self_bonus_mask(n_q, n_k, p, x):
    q, k = positions(n_q, n_k)
    return (k <= q) & (k >= np.maximum(q - p["window"], 0))


def everything(n_q, n_k, p, x):
    return np.ones((1, 1, n_q, n_k), dtype=bool)


def natten1d_mask(n_q, n_k, p, x):
    return natten_nd((n_q,), (p["kernel"],), (p["dilation"],))


def natten2d_mask(n_q, n_k, p, x):
    return natten_nd((p["height"], p["width"]), (p["kh"], p["kw"]), (p["dh"], p["dw"]))


def natten3d_mask(n_q, n_k, p, x):
    return natten_nd((p["depth"], p["height"], p["width"]), (p["kd"], p["kh"], p["kw"]),
                     (p["dd"], p["dh"], p["dw"]))


def grid_sizes(*dims):
    n = math.prod(dims)
    return [(n, n)]


NATTEN1D_SIZES = SQUARE_SIZES


def natten2d_case(h, w, kh, kw, dh=1, dw=1):
    p = dict(height=h, width=w, kh=kh, kw=kw, dh=dh, dw=dw)
    return Case(f"natten2d-{h}x{w}-k{kh}x{kw}-d{dh}x{dw}", "neighborhood2d.attn", natten2d_mask,
                p, sizes=grid_sizes(h, w))


def natten3d_case(d, h, w, kd, kh, kw, dd=1, dh=1, dw=1):
    p = dict(depth=d, height=h, width=w, kd=kd, kh=kh, kw=kw, dd=dd, dh=dh, dw=dw)
    return Case(f"natten3d-{d}x{h}x{w}-k{kd}x{kh}x{kw}-d{dd}x{dh}x{dw}", "neighborhood3d.attn",
                natten3d_mask, p, sizes=grid_sizes(d, h, w))


CASES = [
    Case("causal", "causal.attn", lambda nq, nk, p, x: causal(nq, nk)),
    Case("sliding_window-w5", "sliding_window.attn",
         lambda nq, nk, p, x: causal(nq, nk) & window(nq, nk, p["window"]), dict(window=5)),
    Case("sliding_window-w0", "sliding_window.attn",
         lambda nq, nk, p, x: causal(nq, nk) & window(nq, nk, p["window"]), dict(window=0)),
    Case("dilated_window-w9-d3", "dilated_window.attn", dilated_window_mask,
         dict(window=9, dilation=3)),
    Case("dilated_window-w6-d2", "dilated_window.attn", dilated_window_mask,
         dict(window=6, dilation=2)),
    Case("longformer-w3-g2", "longformer.attn",
         lambda nq, nk, p, x: window(nq, nk, p["window"], p["window"])
         | globals_(nq, nk, p["globals"]), dict(window=3, globals=2)),
    Case("bigbird-b8-w2-g3", "bigbird.attn",
         lambda nq, nk, p, x: globals_(nq, nk, p["globals"])
         | window(nq, nk, p["window"], p["window"]) | same_block(nq, nk, p["block"]),
         dict(block=8, window=2, globals=3)),
    Case("prefix_lm-p10", "prefix_lm.attn",
         lambda nq, nk, p, x: (positions(nq, nk)[1] < p["prefix_len"]) | causal(nq, nk),
         dict(prefix_len=10)),
    Case("block_local-b7", "block_local.attn",
         lambda nq, nk, p, x: same_block(nq, nk, p["block"]), dict(block=7)),
    Case("block_local-b1", "block_local.attn",
         lambda nq, nk, p, x: same_block(nq, nk, p["block"]), dict(block=1)),
    Case("global_tokens-g5", "global_tokens.attn",
         lambda nq, nk, p, x: globals_(nq, nk, p["n_global"]), dict(n_global=5)),
    Case("documents-sorted", "documents.attn", doc_mask, sizes=SQUARE_SIZES, inputs=sorted_docs),
    Case("documents-shuffled", "documents.attn", doc_mask, sizes=SQUARE_SIZES,
         inputs=shuffled_docs),
    Case("documents-int32", "documents.attn", doc_mask, sizes=SQUARE_SIZES,
         inputs=lambda n, gen: sorted_docs(n, gen, torch.int32)),
    Case("hash_buckets-random", "hash_buckets.attn", bucket_mask, sizes=SQUARE_SIZES,
         inputs=random_buckets),
    Case("hash_buckets-shared", "hash_buckets.attn", bucket_mask, sizes=SQUARE_SIZES,
         inputs=shared_buckets),
    Case("dropped_keys", "dropped_keys.attn",
         lambda nq, nk, p, x: x["keep"][:, :, None, :nk] & causal(nq, nk),
         sizes=SQUARE_SIZES, inputs=random_keep),
    Case("dropped_queries", "dropped_queries.attn",
         lambda nq, nk, p, x: np.broadcast_to(x["keep"][:, :, :nq, None], (BATCH, HEADS, nq, nk)),
         sizes=SQUARE_SIZES, inputs=random_keep),
    # 1-D neighborhoods: interior, dilation groups of unequal length, groups shorter than the
    # kernel (kernel 7 with dilation 4 at n = 17), and an even kernel (the SPEC formula allows it).
    Case("natten1d-k5-d1", "neighborhood1d.attn", natten1d_mask, dict(kernel=5, dilation=1),
         sizes=NATTEN1D_SIZES),
    Case("natten1d-k3-d2", "neighborhood1d.attn", natten1d_mask, dict(kernel=3, dilation=2),
         sizes=NATTEN1D_SIZES),
    Case("natten1d-k5-d3", "neighborhood1d.attn", natten1d_mask, dict(kernel=5, dilation=3),
         sizes=NATTEN1D_SIZES),
    Case("natten1d-k7-d4", "neighborhood1d.attn", natten1d_mask, dict(kernel=7, dilation=4),
         sizes=NATTEN1D_SIZES),
    Case("natten1d-k4-d1", "neighborhood1d.attn", natten1d_mask, dict(kernel=4, dilation=1),
         sizes=NATTEN1D_SIZES),
    natten2d_case(5, 7, 3, 5),
    natten2d_case(8, 9, 3, 3, 2, 3),
    natten2d_case(4, 11, 5, 3, 1, 2),       # height 4 < kernel 5: whole columns visible
    natten2d_case(6, 6, 7, 7),              # kernel larger than the image: everything
    natten2d_case(1, 13, 3, 5),
    natten3d_case(3, 4, 5, 3, 3, 3),
    natten3d_case(4, 5, 6, 3, 3, 5, 2, 1, 2),
    natten3d_case(2, 3, 4, 3, 3, 3),        # depth 2 < kernel 3
    Case("alibi", "alibi.attn", lambda nq, nk, p, x: causal(nq, nk),
         inputs=lambda n, gen: {"slopes": alibi_slopes(HEADS)}),
    Case("softcap-c2", "softcap.attn", everything, dict(cap=2.0)),
    Case("relative_bias-m4", "relative_bias.attn", lambda nq, nk, p, x: causal(nq, nk), dict(max_distance=4),
         inputs=lambda n, gen: {"bias": torch.randn(HEADS, 9, generator=gen)}),
    # multi.attn, one pattern at a time.
    Case("multi-strided-s4", "multi.attn", strided_mask, dict(stride=4), pattern="strided"),
    Case("multi-fixed-s8-c2", "multi.attn", fixed_mask, dict(stride=8, c=2), pattern="fixed"),
    Case("multi-longformer_causal-w4-g3", "multi.attn",
         lambda nq, nk, p, x: causal(nq, nk) & (window(nq, nk, p["window"], p["window"])
                                                | globals_(nq, nk, p["globals"])),
         dict(window=4, globals=3), pattern="longformer_causal"),
    Case("multi-chunk_lookback-c5-l1", "multi.attn", chunk_mask, dict(chunk=5, lookback=1),
         pattern="chunk_lookback"),
    Case("multi-chunk_lookback-c3-l0", "multi.attn", chunk_mask, dict(chunk=3, lookback=0),
         pattern="chunk_lookback"),
    Case("multi-circular-r3", "multi.attn", circular_mask, dict(radius=3), pattern="circular"),
    Case("multi-maybe_causal-true", "multi.attn", lambda nq, nk, p, x: causal(nq, nk),
         dict(is_causal=True), pattern="maybe_causal"),
    Case("multi-maybe_causal-false", "multi.attn", everything, dict(is_causal=False),
         pattern="maybe_causal"),
    Case("multi-dilated_neighborhood-k3-d2", "multi.attn", natten1d_mask,
         dict(kernel=3, dilation=2), pattern="dilated_neighborhood", sizes=NATTEN1D_SIZES),
    Case("multi-self_bonus-w6", "multi.attn", self_bonus_mask, dict(window=6),
         pattern="self_bonus"),
]

MASK_PARAMS = [pytest.param(case, size, id=f"{case.id}-{size[0]}x{size[1]}")
               for case in CASES for size in case.sizes]


def make_inputs(case: Case, n: int, seed: int) -> dict:
    if case.inputs is None:
        return {}
    gen = torch.Generator().manual_seed(seed)
    return case.inputs(n, gen)


@pytest.mark.parametrize("case,size", MASK_PARAMS)
def test_mask_matches_formula(case: Case, size):
    n_q, n_k = size
    kern = compile_example(case.file, case.pattern, **case.params)
    params = dict(kern.params)
    assert {name: params[name] for name in case.params} == case.params
    inputs = make_inputs(case, n_k, seed=1000 * n_q + n_k)
    got = kern.mask(n_q, n_k, batch=BATCH, heads=HEADS, **inputs)
    assert got.dtype == torch.bool
    assert tuple(got.shape) == (BATCH, HEADS, n_q, n_k)
    expected = case.expected(n_q, n_k, params, {name: t.numpy() for name, t in inputs.items()})
    expected = np.broadcast_to(expected, (BATCH, HEADS, n_q, n_k))
    got = got.cpu().numpy()
    if not np.array_equal(got, expected):
        b, h, i, j = np.argwhere(got != expected)[0]
        pytest.fail(f"{int((got != expected).sum())} entries differ; first at b={b} h={h} "
                    f"q={i} k={j}: expected {expected[b, h, i, j]}, got {got[b, h, i, j]}")


def test_mask_default_batch_heads():
    got = compile_example("causal.attn").mask(5, 7)
    assert tuple(got.shape) == (1, 1, 5, 7)
    assert np.array_equal(got.numpy(), causal(5, 7))


# ----------------------------------------------------------------------------------------------
# Every file compiles with its defaults; declared parameters and inputs are as documented.
# ----------------------------------------------------------------------------------------------

DEFAULTS = {
    "causal.attn": ("causal_lm", {}),
    "sliding_window.attn": ("sliding_window", {"window": 1024}),
    "dilated_window.attn": ("dilated_window", {"window": 2048, "dilation": 2}),
    "longformer.attn": ("longformer", {"window": 256, "globals": 16}),
    "bigbird.attn": ("bigbird", {"block": 64, "window": 192, "globals": 64}),
    "prefix_lm.attn": ("prefix_lm", {"prefix_len": 2048}),
    "documents.attn": ("document_causal", {}),
    "hash_buckets.attn": ("hash_sparse", {}),
    "dropped_keys.attn": ("dropped_keys", {}),
    "dropped_queries.attn": ("dropped_queries", {}),
    "block_local.attn": ("block_diagonal", {"block": 128}),
    "global_tokens.attn": ("global_attention", {"n_global": 64}),
    "neighborhood1d.attn": ("natten1d", {"kernel": 7, "dilation": 1}),
    "neighborhood2d.attn": ("natten2d", {"height": 16, "width": 16, "kh": 5, "kw": 5,
                                         "dh": 1, "dw": 1}),
    "neighborhood3d.attn": ("natten3d", {"depth": 4, "height": 8, "width": 8, "kd": 3, "kh": 3,
                                         "kw": 3, "dd": 1, "dh": 1, "dw": 1}),
    "alibi.attn": ("alibi_causal", {}),
    "softcap.attn": ("softcapped", {"cap": 30.0}),
    "relative_bias.attn": ("relative_bias", {"max_distance": 128}),
}

MULTI_PATTERNS = {
    "strided": {"stride": 128},
    "fixed": {"stride": 128, "c": 8},
    "longformer_causal": {"window": 256, "globals": 4},
    "chunk_lookback": {"chunk": 64, "lookback": 1},
    "circular": {"radius": 8},
    "maybe_causal": {"is_causal": True},
    "dilated_neighborhood": {"kernel": 5, "dilation": 2, "bias": 0.5},
    "self_bonus": {"window": 32, "bonus": 1.0},
}

INPUT_DECLS = {
    "documents.attn": {"doc": ("int", ("batch", "N"))},
    "hash_buckets.attn": {"qb": ("int", ("batch", "heads", "N")),
                          "kb": ("int", ("batch", "heads", "N"))},
    "dropped_keys.attn": {"keep": ("bool", ("batch", "heads", "N"))},
    "dropped_queries.attn": {"keep": ("bool", ("batch", "heads", "N"))},
    "alibi.attn": {"slopes": ("float", ("heads",))},
    "relative_bias.attn": {"bias": ("float", ("heads", "R"))},
}


def test_every_example_file_is_covered():
    files = {p.name for p in EXAMPLES.glob("*.attn")}
    assert files == set(DEFAULTS) | {"multi.attn"}, "add new example files to DEFAULTS and CASES"
    assert {case.file for case in CASES} == files


@pytest.mark.parametrize("file", sorted(DEFAULTS))
def test_compiles_with_defaults(file):
    name, defaults = DEFAULTS[file]
    kern = attnc.compile(str(EXAMPLES / file))
    assert kern.name == name
    assert dict(kern.params) == defaults
    declared = {n: (d.dtype, tuple(d.dims)) for n, d in kern.inputs.items()}
    assert declared == INPUT_DECLS.get(file, {})


@pytest.mark.parametrize("file", sorted(DEFAULTS))
def test_renders_kernel_source(file):
    kern = compile_example(file)
    assert "@triton.jit" in kern.source


@pytest.mark.parametrize("pattern", sorted(MULTI_PATTERNS))
def test_multi_pattern_compiles_with_defaults(pattern):
    kern = attnc.compile(str(EXAMPLES / "multi.attn"), pattern=pattern)
    assert kern.name == pattern
    assert dict(kern.params) == MULTI_PATTERNS[pattern]
    assert dict(kern.inputs) == {}


def test_multi_needs_a_pattern_choice():
    with pytest.raises(attnc.PatternError):
        attnc.compile(str(EXAMPLES / "multi.attn"))


def test_example_compiles_from_source_text():
    src = (EXAMPLES / "block_local.attn").read_text()
    kern = attnc.compile(src, block=3)
    assert np.array_equal(kern.mask(7, 7).numpy(), same_block(7, 7, 3))


# ----------------------------------------------------------------------------------------------
# kern.reference against a float64 softmax built from the independent masks.
# ----------------------------------------------------------------------------------------------

def softmax_reference(q, k, v, allowed, scale, score_mod=None):
    """float64 attention; rows with no visible key give output 0 and lse -inf."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = scale * torch.einsum("bhqd,bhkd->bhqk", q, k)
    if score_mod is not None:
        s = score_mod(s)
    allowed = torch.from_numpy(np.array(allowed, dtype=bool)).expand_as(s)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.where(allowed, torch.exp(s - lse.unsqueeze(-1)), torch.zeros((), dtype=s.dtype))
    return p @ v, lse


def distance(n_q, n_k):
    q, k = positions(n_q, n_k)
    return torch.as_tensor(k - q, dtype=torch.float64)


@dataclass
class RefCase:
    id: str
    case: Case                        # the mask side, from CASES
    n_q: int
    n_k: int
    heads_q: int = HEADS
    heads_kv: int = HEADS
    head_dim: int = 32
    value_dim: int = 32
    score_mod: Callable | None = None  # (scores, params, inputs) -> scores
    scale: float | None = None
    fully_masked_rows: bool = False    # the case must contain rows with no visible key


def case_by_id(case_id: str) -> Case:
    return next(c for c in CASES if c.id == case_id)


def alibi_mod(s, p, x):
    slopes = x["slopes"].double().view(1, -1, 1, 1)
    return s + slopes * distance(s.shape[-2], s.shape[-1])


def relative_bias_mod(s, p, x):
    m = p["max_distance"]
    d = ((-distance(s.shape[-2], s.shape[-1])).clamp(-m, m) + m).long()[0, 0]    # clamp(q - k, -m, m) + m
    return s + x["bias"].double()[:, d]                                       # [heads, n_q, n_k]


def softcap_mod(s, p, x):
    return p["cap"] * torch.tanh(s / p["cap"])


def self_bonus_mod(s, p, x):
    d = -distance(s.shape[-2], s.shape[-1])                  # q - k
    return torch.where(d == 0, s + p["bonus"], s - torch.log(1.0 + d.abs()))


REF_CASES = [
    RefCase("dropped_keys-67", case_by_id("dropped_keys"), 67, 67, fully_masked_rows=True),
    RefCase("dropped_queries-17-dv16", case_by_id("dropped_queries"), 17, 17, value_dim=16,
            fully_masked_rows=True),
    RefCase("documents-shuffled-130", case_by_id("documents-shuffled"), 130, 130, scale=0.3),
    RefCase("alibi-gqa-17x67", case_by_id("alibi"), 17, 67, heads_q=4, heads_kv=2,
            score_mod=alibi_mod),
    RefCase("alibi-67x17", case_by_id("alibi"), 67, 17, heads_q=4, heads_kv=1,
            score_mod=alibi_mod),
    RefCase("softcap-c2-67", case_by_id("softcap-c2"), 67, 67, score_mod=softcap_mod),
    RefCase("relative_bias-gqa-17x67", case_by_id("relative_bias-m4"), 17, 67, heads_kv=1,
            score_mod=relative_bias_mod),
    RefCase("multi-self_bonus-17x67", case_by_id("multi-self_bonus-w6"), 17, 67,
            score_mod=self_bonus_mod),
]


@pytest.mark.parametrize("rc", [pytest.param(rc, id=rc.id) for rc in REF_CASES])
def test_reference_matches_float64_softmax(rc: RefCase):
    case = rc.case
    kern = compile_example(case.file, case.pattern, **case.params)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(BATCH, rc.heads_q, rc.n_q, rc.head_dim, generator=gen)
    k = torch.randn(BATCH, rc.heads_kv, rc.n_k, rc.head_dim, generator=gen)
    v = torch.randn(BATCH, rc.heads_kv, rc.n_k, rc.value_dim, generator=gen)
    q = 2.0 * q                     # sharper softmax, so that score changes matter
    inputs = {}
    if case.inputs is not None:
        inputs = case.inputs(rc.n_k, gen)
        if "slopes" in inputs:
            inputs = {"slopes": alibi_slopes(rc.heads_q)}
    np_inputs = {name: t.numpy() for name, t in inputs.items()}
    params = dict(kern.params)
    allowed = np.broadcast_to(case.expected(rc.n_q, rc.n_k, params, np_inputs),
                              (BATCH, rc.heads_q, rc.n_q, rc.n_k))
    scale = rc.scale if rc.scale is not None else 1.0 / math.sqrt(rc.head_dim)
    mod = None if rc.score_mod is None else (lambda s: rc.score_mod(s, params, inputs))
    want_out, want_lse = softmax_reference(q, k, v, allowed, scale, mod)

    out, lse = kern.reference(q, k, v, scale=rc.scale, return_lse=True, **inputs)
    assert tuple(out.shape) == (BATCH, rc.heads_q, rc.n_q, rc.value_dim)
    assert out.dtype == q.dtype
    assert tuple(lse.shape) == (BATCH, rc.heads_q, rc.n_q)
    assert lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.double(), want_out, rtol=1e-4, atol=1e-5)

    dead = torch.isinf(want_lse)
    if rc.fully_masked_rows:
        assert dead.any()
    assert torch.equal(torch.isinf(lse) & (lse < 0), dead)
    torch.testing.assert_close(lse.double()[~dead], want_lse[~dead], rtol=1e-5, atol=1e-5)
    if dead.any():
        assert (out[dead] == 0).all()

    # Without return_lse, the same output alone.
    alone = kern.reference(q, k, v, scale=rc.scale, **inputs)
    torch.testing.assert_close(alone, out, rtol=0, atol=0)
