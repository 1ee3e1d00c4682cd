"""Tile planning (attnc.plan) against brute force on small grids.

The kernel computes a (query block, key block) tile when the plan says it may hold a visible key, and
runs it without any mask code when the plan says it is full. So the plan must be *sound*:

* every tile with at least one visible (q, k) is computed;
* every tile called full has every (q, k) visible (for q < n_q) and is not ragged (it lies entirely
  inside [0, n_k), since the full loop loads keys without bounds checks).

Every planner is checked in the coordinates its kernel walks: the closed-form key-block ranges of
static patterns (``static_block_ranges``, ranges mode), the tile classifier of patterns with runtime
inputs (``TileClassifier``, lists mode; also run on every other pattern, where it must be just as
sound), and the classification of the sorted problem after a layout transform (permuted mode: bucket
sort, key/query compaction, residue permutation), checked against the mask gathered into the sorted
order. For affine patterns (causal, window, prefix) the plan must also be exact: it computes no empty
tile, and finds every full tile.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import attnc
from attnc.codegen import kernel_mode
from attnc.plan import (TileClassifier, build_tile_lists, layout_transform, padded_rows, padded_sides,
                        static_block_ranges, static_plan)
from attnc.validate import check_inputs

try:  # tests/ may or may not be a package
    from tests import strategies as S
    from tests.tiles import same_lists
except ImportError:  # pragma: no cover
    import strategies as S
    from tiles import same_lists

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

SETTINGS = dict(deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

BLOCKS = [(16, 16), (32, 32), (8, 4), (4, 8), (5, 7), (1, 1), (128, 64)]
SIZES = [(1, 1), (17, 17), (67, 67), (130, 130), (17, 67), (67, 17), (1, 130), (130, 1), (64, 64)]


# ----------------------------------------------------------------------------------------------
# Brute force and the two planners as (full, computed) boolean tile grids.


def brute_force_tiles(mask: torch.Tensor, block_m: int, block_n: int):
    """(any, all) per tile of a (..., n_q, n_k) mask, plus the ragged key blocks.

    Positions past n_q / n_k belong to no tile: the mask is padded with False for 'any' and True for
    'all' up to whole blocks, then reduced block by block. An int8 mask may hold -1 for "either" (padding
    query rows of a padded layout, computed without effect): False for 'any', True for 'all'.
    """
    n_q, n_k = mask.shape[-2:]
    nqb, nkb = math.ceil(n_q / block_m), math.ceil(n_k / block_n)
    pad = (0, nkb * block_n - n_k, 0, nqb * block_m - n_q)
    shape = (*mask.shape[:-2], nqb, block_m, nkb, block_n)
    m_any, m_all = (mask == 1).to(torch.int8), (mask != 0).to(torch.int8)
    any_t = torch.nn.functional.pad(m_any, pad, value=0).view(shape).amax(dim=(-3, -1)).bool()
    all_t = torch.nn.functional.pad(m_all, pad, value=1).view(shape).amin(dim=(-3, -1)).bool()
    ragged = torch.zeros(nkb, dtype=torch.bool)
    if n_k % block_n:
        ragged[-1] = True
    return any_t, all_t, ragged


def test_brute_force_tiles_by_slicing():
    """The vectorized brute force agrees with slicing each tile, on ragged grids too."""
    g = torch.Generator().manual_seed(0)
    for n_q, n_k, bm, bn in ((1, 1, 1, 1), (17, 67, 8, 4), (67, 17, 5, 7), (130, 130, 32, 32), (3, 5, 16, 16)):
        mask = torch.rand(2, n_q, n_k, generator=g) < 0.9
        any_t, all_t, ragged = brute_force_tiles(mask, bm, bn)
        for i in range(math.ceil(n_q / bm)):
            for j in range(math.ceil(n_k / bn)):
                tile = mask[:, i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].flatten(1)
                assert torch.equal(any_t[:, i, j], tile.any(1)) and torch.equal(all_t[:, i, j], tile.all(1))
        assert ragged.tolist() == [j == n_k // bn and n_k % bn != 0 for j in range(math.ceil(n_k / bn))]


def ranges_tiles(kern, n_q, n_k, block_m, block_n):
    """(full, computed) tile grids (nqb, nkb) as the ranges-mode kernel walks them."""
    nkb = math.ceil(n_k / block_n)
    j = torch.arange(nkb).view(1, -1)
    computed = torch.zeros(math.ceil(n_q / block_m), nkb, dtype=torch.bool)
    full = torch.zeros_like(computed)
    for lo, hi, flo, fhi in static_block_ranges(kern.ir, n_q, n_k, block_m, block_n):
        computed |= (j >= lo.view(-1, 1)) & (j < hi.view(-1, 1))
        full |= (j >= flo.view(-1, 1)) & (j < fhi.view(-1, 1))
    return full, computed


def classifier_tiles(kern, n_q, n_k, batch, heads, block_m, block_n, inputs):
    """(full, computed) tile grids broadcast to (batch, heads, nqb, nkb), from TileClassifier."""
    sizes = check_inputs(kern.ir, inputs, batch=batch, heads=heads, n_q=n_q, n_k=n_k)
    status = TileClassifier(kern.ir, n_q, n_k, batch, heads, block_m, block_n, sizes, inputs,
                            torch.device("cpu")).classify()
    assert status.dtype == torch.int8
    assert status.shape[-2:] == (math.ceil(n_q / block_m), math.ceil(n_k / block_n))
    assert set(status.unique().tolist()) <= {0, 1, 2}
    status = status.expand(batch, heads, *status.shape[-2:])
    return status == 2, status >= 1, status


def permuted_tiles(kern, n_q, n_k, batch, heads, block_m, block_n, inputs):
    """(full, computed, status, sorted mask) of the permuted-mode plan: the tiles of the problem after the
    layout transform, and the caller's mask gathered into that sorted order. Where buckets are padded to
    whole blocks, padding keys are masked (False) and padding queries are either (-1: computed without
    effect, never stored)."""
    from attnc.layout import build_layout
    sizes = check_inputs(kern.ir, inputs, batch=batch, heads=heads, n_q=n_q, n_k=n_k)
    transform = layout_transform(kern.ir.mask)
    assert transform is not None and transform.names
    layout = build_layout(kern.ir, transform, batch, heads, heads, n_q, n_k, block_m, block_n, sizes, inputs,
                          torch.device("cpu"))
    q_perm, k_perm = layout.q_perm, layout.k_perm
    rows_q, rows_k = layout.rows_q, layout.rows_k
    pad_q, pad_k = padded_sides(transform)
    # Sorted once per batch / head only where the mask depends on b / h.
    assert q_perm.shape[0] in (1, batch) and q_perm.shape[1] in (1, heads)
    assert rows_q == (padded_rows(n_q, block_m) if pad_q else n_q)
    assert k_perm.shape[:2] == q_perm.shape[:2] and rows_k == (padded_rows(n_k, block_n) if pad_k else n_k)
    q_perm, k_perm = q_perm.expand(batch, heads, rows_q), k_perm.expand(batch, heads, rows_k)
    # Permutations of the positions, plus padding rows (position n).
    assert torch.equal(q_perm.sort(-1).values[..., :n_q], torch.arange(n_q).expand(batch, heads, n_q))
    assert torch.equal(k_perm.sort(-1).values[..., :n_k], torch.arange(n_k).expand(batch, heads, n_k))
    assert q_perm.sort(-1).values[..., n_q:].eq(n_q).all() and k_perm.sort(-1).values[..., n_k:].eq(n_k).all()
    mask = kern.mask(n_q, n_k, batch, heads, **inputs).to(torch.int8)
    qi, ki = q_perm.clamp(max=max(n_q - 1, 0)), k_perm.clamp(max=max(n_k - 1, 0))
    sorted_mask = torch.gather(mask, 2, qi.unsqueeze(-1).expand(batch, heads, rows_q, n_k))
    sorted_mask = torch.gather(sorted_mask, 3, ki.unsqueeze(-2).expand(batch, heads, rows_q, rows_k))
    sorted_mask = torch.where((k_perm >= n_k).unsqueeze(-2), 0, sorted_mask)
    sorted_mask = torch.where((q_perm >= n_q).unsqueeze(-1), -1, sorted_mask).to(torch.int8)
    status = layout.status.expand(batch, heads, *layout.status.shape[-2:])
    assert status.shape[-2:] == (math.ceil(rows_q / block_m), math.ceil(rows_k / block_n))
    return status == 2, status >= 1, status, sorted_mask


def kernel_tiles(kern, n_q, n_k, batch, heads, block_m, block_n, inputs):
    """(full, computed, status, mask) in the coordinates the kernel of this pattern's mode walks."""
    mode = kernel_mode(kern.ir)
    if mode == "ranges":
        full, computed = ranges_tiles(kern, n_q, n_k, block_m, block_n)
        shape = (batch, heads, *full.shape)
        full, computed = full.expand(shape), computed.expand(shape)
        status = full.to(torch.int8) + computed.to(torch.int8)
        return full, computed, status, kern.mask(n_q, n_k, batch, heads, **inputs)
    if mode == "lists":
        full, computed, status = classifier_tiles(kern, n_q, n_k, batch, heads, block_m, block_n, inputs)
        return full, computed, status, kern.mask(n_q, n_k, batch, heads, **inputs)
    assert mode == "permuted", mode
    return permuted_tiles(kern, n_q, n_k, batch, heads, block_m, block_n, inputs)


def check_all_planners(kern, n_q, n_k, batch, heads, block_m, block_n, inputs, what=""):
    """The kernel's planner and the plain tile classifier are both sound; returns the kernel's status."""
    mode = kernel_mode(kern.ir)
    what = f"{what} {mode} {n_q}x{n_k} blocks {block_m}x{block_n}"
    full, computed, status, mask = kernel_tiles(kern, n_q, n_k, batch, heads, block_m, block_n, inputs)
    any_t, all_t, ragged = brute_force_tiles(mask, block_m, block_n)
    assert_sound(full, computed, any_t, all_t, ragged, what)
    if mode != "lists":
        cfull, ccomp, _ = classifier_tiles(kern, n_q, n_k, batch, heads, block_m, block_n, inputs)
        if mode == "permuted":
            any_t, all_t, ragged = brute_force_tiles(kern.mask(n_q, n_k, batch, heads, **inputs), block_m, block_n)
        assert_sound(cfull, ccomp, any_t, all_t, ragged, f"classifier on {what}")
    if kern.ir.inputs and mode != "ranges" and min(block_m, block_n) >= 5:    # (interpreter time)
        check_device_setup(kern, n_q, n_k, batch, heads, block_m, block_n, inputs, what)
    return status


def check_device_setup(kern, n_q, n_k, batch, heads, block_m, block_n, inputs, what=""):
    """The device setup (generated Triton classifier, here in the interpreter) plans exactly what the
    torch classifier plans: sorts, identity flags, tile classes and both orientations of tile lists."""
    from attnc.layout import build_layout
    sizes = check_inputs(kern.ir, inputs, batch=batch, heads=heads, n_q=n_q, n_k=n_k)
    module = kern._module("setup")
    cpu = torch.device("cpu")
    if kernel_mode(kern.ir) == "permuted":
        transform = layout_transform(kern.ir.mask)
        args = (kern.ir, transform, batch, heads, heads, n_q, n_k, block_m, block_n, sizes, inputs, cpu)
        want, got = build_layout(*args), build_layout(*args, classifier=module)
        for x, y in ((want.q_perm, got.q_perm), (want.k_perm, got.k_perm)):
            assert torch.equal(x.expand_as(y), y), f"device sort on {what}"
        # The device setup reads nothing on the host: a sorted side counts as moved (identity only where
        # nothing sorts it), and "nothing moved" is a device flag where rows may come in order.
        assert (got.q_identity, got.k_identity) == (not transform.query_keys, not transform.key_keys), what
        assert want.q_identity >= got.q_identity and want.k_identity >= got.k_identity, what
        assert want.expand_kv == got.expand_kv, what
        if got.in_place is not None:
            assert bool(got.in_place.item()) == want.identity, what
        if not got.identity:
            assert torch.equal(want.qpos, got.qpos) and torch.equal(want.kpos, got.kpos), what
        want, got = want.tiles, got.tiles
    else:
        want = kern._classify(n_q, n_k, batch, heads, block_m, block_n, sizes, inputs, cpu, None)
        got = kern._classify(n_q, n_k, batch, heads, block_m, block_n, sizes, inputs, cpu, module)
    assert torch.equal(want.status, got.status), f"device classifier on {what}"
    for transposed in (False, True):
        same_lists(want.lists(transposed), got.lists(transposed), f"device lists ({transposed}) on {what}")


def assert_sound(full, computed, any_t, all_t, ragged, what: str):
    missed = any_t & ~computed
    assert not missed.any(), f"{what}: tiles with visible keys not computed at {missed.nonzero()[:5].tolist()}"
    wrong_full = full & ~all_t
    assert not wrong_full.any(), f"{what}: tiles called full that are not at {wrong_full.nonzero()[:5].tolist()}"
    ragged_full = full & ragged
    assert not ragged_full.any(), f"{what}: ragged key block called full at {ragged_full.nonzero()[:5].tolist()}"
    assert not (full & ~computed).any(), f"{what}: a full tile outside the computed range"


def assert_exact(full, computed, any_t, all_t, ragged, what: str, check_full: bool = True):
    wasted = computed & ~any_t
    assert not wasted.any(), f"{what}: empty tiles computed at {wasted.nonzero()[:5].tolist()}"
    if not check_full:
        return
    missed_full = all_t & ~ragged & ~full
    assert not missed_full.any(), f"{what}: full tiles run masked at {missed_full.nonzero()[:5].tolist()}"


def static_inputs(kern) -> dict:
    """Float inputs read only by the score (alibi's slopes) do not change the plan; any value will do."""
    return {name: torch.rand(*[1 if isinstance(d, str) else d for d in decl.dims])
            for name, decl in kern.inputs.items()}


def check_static(kern, n_q, n_k, block_m, block_n, exact=False, exact_full=True):
    inputs = static_inputs(kern)
    check_all_planners(kern, n_q, n_k, 1, 1, block_m, block_n, inputs)
    if kernel_mode(kern.ir) != "ranges":
        return
    mask = kern.mask(n_q, n_k, **inputs)[0, 0]
    any_t, all_t, ragged = brute_force_tiles(mask, block_m, block_n)
    full, computed = ranges_tiles(kern, n_q, n_k, block_m, block_n)
    if exact and mask.any():
        # (A band narrower than zero, e.g. window(5) and causal at n_q = n_k + 50, is empty on every row
        # yet its per-block hull is not: interval reasoning over a block can not see that, so an
        # entirely empty mask is exempt from exactness.)
        assert_exact(full, computed, any_t, all_t, ragged, f"ranges {n_q}x{n_k} blocks {block_m}x{block_n}",
                     check_full=exact_full)
    # static_plan counts what the ranges give.
    plan = static_plan(kern.ir, n_q, n_k, 1, 1, block_m, block_n)
    assert plan.tiles["full"] == int(full.sum())
    assert plan.tiles["partial"] == int((computed & ~full).sum())
    assert plan.tiles["empty"] == int((~computed).sum())


# ----------------------------------------------------------------------------------------------
# Every example pattern.

EXAMPLE_PATTERNS = [
    ("causal.attn", None, {}),
    ("sliding_window.attn", None, dict(window=5)),
    ("sliding_window.attn", None, dict(window=45)),
    ("dilated_window.attn", None, dict(window=9, dilation=3)),
    ("longformer.attn", None, dict(window=20, globals=7)),
    ("bigbird.attn", None, dict(block=16, window=6, globals=9)),
    ("prefix_lm.attn", None, dict(prefix_len=40)),
    ("block_local.attn", None, dict(block=7)),
    ("block_local.attn", None, dict(block=32)),
    ("global_tokens.attn", None, dict(n_global=20)),
    ("neighborhood1d.attn", None, dict(kernel=9, dilation=2)),
    ("neighborhood1d.attn", None, dict(kernel=33)),
    ("neighborhood2d.attn", None, dict(height=8, width=8, kh=3, kw=5)),
    ("neighborhood3d.attn", None, dict(depth=2, height=4, width=8, kd=1, kh=3, kw=3, dw=2)),
    ("alibi.attn", None, {}),
    ("softcap.attn", None, {}),
    ("multi.attn", "strided", dict(stride=8)),
    ("multi.attn", "fixed", dict(stride=16, c=3)),
    ("multi.attn", "longformer_causal", dict(window=12, globals=3)),
    ("multi.attn", "chunk_lookback", dict(chunk=16, lookback=1)),
    ("multi.attn", "circular", dict(radius=8)),
    ("multi.attn", "maybe_causal", dict(is_causal=False)),
    ("multi.attn", "dilated_neighborhood", {}),
    ("multi.attn", "self_bonus", dict(window=20)),
]
AFFINE = {("causal.attn", None), ("sliding_window.attn", None), ("prefix_lm.attn", None)}


def compile_example(file, pattern, params):
    kw = dict(params)
    if pattern:
        kw["pattern"] = pattern
    return attnc.compile(str(EXAMPLES / file), **kw)


@pytest.mark.parametrize("file,pattern,params", EXAMPLE_PATTERNS,
                         ids=[f"{f[:-5]}-{p or ''}-{'-'.join(f'{k}{v}' for k, v in ps.items())}"
                              for f, p, ps in EXAMPLE_PATTERNS])
def test_static_example_plans_are_sound(file, pattern, params):
    kern = compile_example(file, pattern, params)
    assert kernel_mode(kern.ir) in ("ranges", "permuted")
    exact = (file, pattern) in AFFINE
    for n_q, n_k in SIZES:
        for block_m, block_n in BLOCKS:
            check_static(kern, n_q, n_k, block_m, block_n, exact=exact)


# Runtime-input examples: the tile classifier with random inputs.


def _docs(B, H, N, g, sort):
    ids = torch.randint(0, 4, (B, N), generator=g)
    return {"doc": torch.sort(ids, dim=-1).values if sort else ids}


INPUT_PATTERNS = [
    ("documents-sorted", "documents.attn", lambda B, H, N, g: _docs(B, H, N, g, True)),
    ("documents-unsorted", "documents.attn", lambda B, H, N, g: _docs(B, H, N, g, False)),
    ("documents-long-runs", "documents.attn",
     lambda B, H, N, g: {"doc": (torch.arange(N) // 40).expand(B, N).contiguous()}),
    ("hash_buckets", "hash_buckets.attn",
     lambda B, H, N, g: {"qb": torch.randint(0, 3, (B, H, N), generator=g),
                         "kb": torch.randint(0, 3, (B, H, N), generator=g)}),
    ("dropped_keys", "dropped_keys.attn", lambda B, H, N, g: {"keep": torch.rand(B, H, N, generator=g) < 0.7}),
    ("dropped_keys-runs", "dropped_keys.attn",
     lambda B, H, N, g: {"keep": ((torch.arange(N) // 24) % 2 == 0).expand(B, H, N).contiguous()}),
    ("dropped_queries", "dropped_queries.attn",
     lambda B, H, N, g: {"keep": torch.rand(B, H, N, generator=g) < 0.8}),
    ("alibi", "alibi.attn", lambda B, H, N, g: {"slopes": torch.rand(H, generator=g)}),
]


@pytest.mark.parametrize("name,file,make", INPUT_PATTERNS, ids=[p[0] for p in INPUT_PATTERNS])
def test_input_example_plans_are_sound(name, file, make):
    kern = attnc.compile(str(EXAMPLES / file))
    B, H = 2, 3
    for n in (1, 17, 67, 130):
        inputs = make(B, H, n, torch.Generator().manual_seed(n))
        for block_m, block_n in BLOCKS:
            check_all_planners(kern, n, n, B, H, block_m, block_n, inputs, name)


# ----------------------------------------------------------------------------------------------
# Random patterns built from prelude pieces.


@st.composite
def prelude_pieces(draw):
    return S.prelude_predicate(lambda options: draw(st.sampled_from(options)),
                               lambda lo, hi: draw(st.integers(lo, hi)))


@st.composite
def combined_masks(draw):
    """A prelude piece, or two combined masks under and/or (sometimes negated)."""
    text = draw(prelude_pieces())
    for _ in range(draw(st.integers(0, 3))):
        other = draw(prelude_pieces())
        if draw(st.integers(0, 5)) == 0:
            other = f"not {other}"
        text = f"({text}) {draw(st.sampled_from(['and', 'or']))} ({other})"
    return text


@settings(max_examples=300, **SETTINGS)
@given(mask=combined_masks(), n_q=st.integers(1, 90), n_k=st.integers(1, 90),
       blocks=st.sampled_from(BLOCKS[:-1]), extra_mask=st.booleans())
def test_random_prelude_patterns_are_sound(mask, n_q, n_k, blocks, extra_mask):
    src = f"pattern random_mask() {{\n    mask {mask}\n"
    if extra_mask:
        src += "    mask k <= q + 30\n"
    src += "}\n"
    try:
        kern = attnc.compile(src)
    except attnc.PatternError:          # provably empty combinations are rejected, which is fine
        assume(False)
    event(f"mode {kernel_mode(kern.ir)}")
    check_static(kern, n_q, n_k, *blocks)


AFFINE_PIECES = st.sampled_from(["causal", "window({a}, {b})", "prefix({c})"])


@settings(max_examples=150, **SETTINGS)
@given(pieces=st.lists(AFFINE_PIECES, min_size=1, max_size=2), joiner=st.sampled_from(["and", "or"]),
       a=st.integers(0, 50), b=st.integers(0, 20), c=st.integers(1, 80),
       n_q=st.integers(1, 100), n_k=st.integers(1, 100), blocks=st.sampled_from(BLOCKS[:-1]))
def test_random_affine_patterns_are_exact(pieces, joiner, a, b, c, n_q, n_k, blocks):
    """Causal, window and prefix, alone or two of them combined: no empty tile computed; and for a
    conjunction (one interval of keys per query) no full tile run masked. (A tile can be full only
    through the union of two disjuncts, e.g. window(13, 3) or causal at 77 x 69 with 4 x 8 tiles; the
    per-disjunct full ranges then leave it partial, which costs time but not correctness.)"""
    text = f" {joiner} ".join(f"({p.format(a=a, b=b, c=c)})" for p in pieces)
    try:
        kern = attnc.compile(f"pattern affine() {{\n    mask {text}\n}}\n")
    except attnc.PatternError:
        assume(False)
    # A disjunction is planned as a union of per-disjunct ranges: sound, but only conjunctions are exact.
    check_static(kern, n_q, n_k, *blocks, exact=(joiner == "and" or len(pieces) == 1))


@st.composite
def doc_inputs(draw, batch, n):
    rows = []
    for _ in range(batch):
        ids = draw(st.lists(st.integers(-1, 3), min_size=n, max_size=n))
        if draw(st.booleans()):
            ids = sorted(ids)
        rows.append(ids)
    return torch.tensor(rows, dtype=torch.int64)


@settings(max_examples=100, **SETTINGS)
@given(data=st.data(), n=st.integers(1, 70), batch=st.integers(1, 2), heads=st.integers(1, 3),
       blocks=st.sampled_from(BLOCKS[:-1]), extra=st.sampled_from(["", " and causal", " or prefix(5)",
                                                                   " and window(10, 3)"]))
def test_random_input_patterns_are_sound(data, n, batch, heads, blocks, extra):
    """Runtime-input patterns with hypothesis-drawn inputs: documents and kept keys, combined with
    static pieces."""
    src = ("pattern mixed() {\n    input doc: int[batch, N]\n    input keep: bool[batch, heads, N]\n"
           f"    mask (same(doc) and kept(keep)){extra}\n}}\n")
    kern = attnc.compile(src)
    doc = data.draw(doc_inputs(batch, n))
    density = data.draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    keep = torch.rand(batch, heads, n, generator=torch.Generator().manual_seed(n)) < density
    inputs = {"doc": doc, "keep": keep}
    check_all_planners(kern, n, n, batch, heads, *blocks, inputs, "mixed")


def _dense_docs(lengths: list[int], n: int) -> torch.Tensor:
    """A (n, n) boolean mask of documents of these lengths (the last cut or extended to n): SDPA's attn_mask
    for packed sequences, materialized."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    doc = torch.cat([doc, doc.new_full((max(0, n - doc.numel()),), len(lengths))])[:n]
    return doc[:, None] == doc[None, :]


DENSE_MASKS = [
    # (source of the mask line, declared dims, how to make the tensor (batch, heads, n_q, n_k, generator))
    ("m[b, q, k]", "batch, N, N", lambda B, H, nq, nk, g: _dense_docs([7, 30, 2, 50], nq).expand(B, nq, nq).clone()),
    ("m[b, q, k] and causal", "batch, N, N",
     lambda B, H, nq, nk, g: torch.stack([_dense_docs([11, 40], nq), torch.rand(nq, nq, generator=g) < 0.9][:B])),
    ("m[h, k, q] or q == k", "heads, N, M",
     lambda B, H, nq, nk, g: torch.rand(H, nk, nq, generator=g) < 0.3),
    ("m[0, q, k] and not m[1, q, k]", "P, N, M", lambda B, H, nq, nk, g: torch.rand(2, nq, nk, generator=g) < 0.7),
    ("m[b, q, k] > 1", "batch, N, M", lambda B, H, nq, nk, g: torch.randint(0, 3, (B, nq, nk), generator=g)),
    # q and k axes longer and shorter than the call's lengths: reads past the tensor are 0 (False).
    ("m[b, q, k] or k == 0", "batch, A, C", lambda B, H, nq, nk, g: torch.rand(B, nq + 5, max(1, nk - 9),
                                                                              generator=g) < 0.95),
    ("m[b + 1, q, k]", "P, N, M", lambda B, H, nq, nk, g: torch.ones(B, nq, nk, dtype=torch.bool)),
]


@pytest.mark.parametrize("mask,dims,make", DENSE_MASKS, ids=[m[0] for m in DENSE_MASKS])
@pytest.mark.parametrize("n_q,n_k,blocks", [(67, 67, (16, 16)), (67, 41, (8, 4)), (130, 130, (32, 32)),
                                            (17, 67, (5, 7))])
def test_dense_mask_inputs_are_classified_per_tile(mask, dims, make, n_q, n_k, blocks):
    """A mask given as a tensor read at (q, k) (``m[b, q, k]``, SDPA's attn_mask) is known per tile: its
    min / max over each tile's block of the tensor. The plan is sound, the generated classifier agrees with
    the torch one, and a mask that is the tensor alone is classified exactly (no empty tile computed, every
    full tile found): before, every tile of such a mask ran partial (run 100: 5x slower than Flex on
    materialized documents)."""
    batch, heads = 2, 2
    kern = attnc.compile(f"pattern dense() {{\n    input m: {'int' if '>' in mask else 'bool'}[{dims}]\n"
                         f"    mask {mask}\n}}\n")
    assert kernel_mode(kern.ir) == "lists"
    g = torch.Generator().manual_seed(n_q * 1000 + n_k)
    inputs = {"m": make(batch, heads, n_q, n_k, g)}
    check_all_planners(kern, n_q, n_k, batch, heads, *blocks, inputs, mask)
    if mask == "m[b, q, k]":
        full, computed, status = classifier_tiles(kern, n_q, n_k, batch, heads, *blocks, inputs)
        any_t, all_t, ragged = brute_force_tiles(kern.mask(n_q, n_k, batch, heads, **inputs), *blocks)
        assert_exact(full, computed, any_t, all_t, ragged, mask)


def test_reads_past_a_short_input_plan_as_zeros():
    """An input shorter than the call along the position it is read at (a named size bound by the tensor)
    reads 0 past its end, in the kernels and the reference; the block summaries do the same (they used to
    stop at the tensor's end, and the torch classifier failed on the mismatched block counts)."""
    kern = attnc.compile("pattern d() {\n    input doc: int[batch, M]\n    mask doc[b, q] == doc[b, k] or k == 0\n}\n")
    inputs = {"doc": torch.tensor([[1] * 30 + [2] * 20, [0] * 10 + [3] * 40])}
    check_all_planners(kern, 67, 67, 2, 1, 16, 16, inputs, "short doc")


def test_dense_documents_plan_like_document_ids():
    """Documents given as a materialized (n, n) mask plan the tiles that the same documents given as ids
    do: tile_fraction equal, at the kernels' 64 x 64 tiles."""
    n, lengths = 1000, [130, 400, 64, 300, 106]
    dense = attnc.compile("pattern d() {\n    input m: bool[batch, N, N]\n    mask m[b, q, k] and causal\n}\n")
    ids = attnc.compile("pattern i() {\n    input doc: int[batch, N]\n    mask same(doc) and causal\n}\n")
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    got = dense.plan(n, n, 1, 1, 64, 64, m=_dense_docs(lengths, n)[None])
    want = ids.plan(n, n, 1, 1, 64, 64, doc=doc)
    assert got.tiles == want.tiles and got.tile_fraction == pytest.approx(want.tile_fraction)
    assert got.tile_fraction < 0.35


# ----------------------------------------------------------------------------------------------
# Tile lists and list-mode plans.


def test_build_tile_lists_lists_exactly_the_classified_tiles():
    g = torch.Generator().manual_seed(0)
    status = torch.randint(0, 3, (2, 3, 5, 9), generator=g).to(torch.int8)
    status[0, 0, 0] = 0          # a row with nothing to compute
    status[1, 2, 4] = 2          # a row of only full tiles
    lists = build_tile_lists(status)
    assert lists.full_run.dtype == torch.int32 and lists.full_run.shape == status.shape[:-1] + (2,)
    for idx, cnt, value in ((lists.full_idx, lists.full_cnt, 2), (lists.part_idx, lists.part_cnt, 1)):
        assert idx.dtype == torch.int32 and cnt.dtype == torch.int32
        assert idx.shape[:-1] == status.shape[:-1] and cnt.shape == status.shape[:-1]
        for b in range(2):
            for h in range(3):
                for m in range(5):
                    want = (status[b, h, m] == value).nonzero().flatten().tolist()
                    n = int(cnt[b, h, m])
                    listed = idx[b, h, m, :n].tolist()
                    if value == 2:      # full tiles: the leading run of consecutive blocks, then the list
                        first, length = lists.full_run[b, h, m].tolist()
                        assert want[:length] == list(range(first, first + length))
                        assert length == 0 or first + length not in want
                        listed = list(range(first, first + length)) + listed
                    assert listed == want


def test_build_tile_lists_all_empty():
    lists = build_tile_lists(torch.zeros(1, 1, 3, 4, dtype=torch.int8))
    assert lists.full_cnt.sum() == 0 and lists.part_cnt.sum() == 0
    assert lists.full_idx.shape[-1] >= 1 and lists.part_idx.shape[-1] >= 1


TABLE_SOURCE = "pattern table() {\n    input allow: bool[8, 8]\n    mask allow[q % 8, k % 8]\n}\n"


@pytest.mark.parametrize("src,make,transform", [
    (str(EXAMPLES / "documents.attn"), lambda B, H, N, g: _docs(B, H, N, g, True), "bucket sort"),
    (str(EXAMPLES / "documents.attn"), lambda B, H, N, g: _docs(B, H, N, g, False), "bucket sort"),
    (str(EXAMPLES / "dropped_keys.attn"), lambda B, H, N, g: {"keep": torch.rand(B, H, N, generator=g) < 0.5},
     "key compaction"),
    (str(EXAMPLES / "dropped_queries.attn"), lambda B, H, N, g: {"keep": torch.rand(B, H, N, generator=g) < 0.5},
     "query compaction"),
    (str(EXAMPLES / "hash_buckets.attn"), lambda B, H, N, g: {"qb": torch.randint(0, 4, (B, H, N), generator=g),
                                                             "kb": torch.randint(0, 4, (B, H, N), generator=g)},
     "bucket sort"),
    (TABLE_SOURCE, lambda B, H, N, g: {"allow": torch.rand(8, 8, generator=g) < 0.5}, None),
], ids=["documents-sorted", "documents-unsorted", "dropped_keys", "dropped_queries", "hash_buckets", "table"])
def test_runtime_input_plans(src, make, transform):
    """kern.plan of runtime-input patterns: counts are the classified tiles of the kernel's own plan."""
    kern = attnc.compile(src)
    mode = kernel_mode(kern.ir)
    assert mode == ("lists" if transform is None else "permuted")
    B, H, N = 2, 3, 300
    inputs = make(B, H, N, torch.Generator().manual_seed(1))
    plan = kern.plan(N, N, batch=B, heads=H, block_m=32, block_n=16, **inputs)
    assert plan.block_m == 32 and plan.block_n == 16
    assert plan.mode == mode
    nqb, nkb = math.ceil(N / 32), math.ceil(N / 16)
    assert sum(plan.tiles.values()) == B * H * nqb * nkb
    status = check_all_planners(kern, N, N, B, H, 32, 16, inputs, "plan")
    # (Empty tiles are counted on the problem as posed: a padded sorted order has more, never computed.)
    computed = int((status != 0).sum())
    assert plan.tiles == {"full": int((status == 2).sum()), "partial": int((status == 1).sum()),
                          "empty": B * H * nqb * nkb - computed}
    assert plan.tile_fraction == pytest.approx((plan.tiles["full"] + plan.tiles["partial"])
                                               / (B * H * nqb * nkb))
    assert isinstance(plan.transforms, list)
    if transform:
        assert transform in plan.transforms
    text = str(plan)
    assert mode in text and "tiles" in text and kern.name in text
    assert str(plan.tiles["partial"]) in text
    if transform:
        assert transform in text


def test_layout_transforms_make_sparse_work_dense():
    """Sorting by bucket and compacting kept keys must compute fewer tiles than the caller's order."""
    B, H, N = 1, 2, 512
    g = torch.Generator().manual_seed(3)
    buckets = torch.randint(0, 8, (B, H, N), generator=g)
    kern = attnc.compile(str(EXAMPLES / "hash_buckets.attn"))
    plan = kern.plan(N, N, B, H, block_m=32, block_n=32, qb=buckets, kb=buckets)
    _, computed, _ = classifier_tiles(kern, N, N, B, H, 32, 32, {"qb": buckets, "kb": buckets})
    assert plan.tiles["full"] + plan.tiles["partial"] < 0.5 * int(computed.sum())
    keep = torch.rand(B, H, N, generator=g) < 0.25
    kern = attnc.compile(str(EXAMPLES / "dropped_keys.attn"))
    plan = kern.plan(N, N, B, H, block_m=32, block_n=32, keep=keep)
    _, computed, _ = classifier_tiles(kern, N, N, B, H, 32, 32, {"keep": keep})
    assert plan.tiles["full"] + plan.tiles["partial"] < 0.5 * int(computed.sum())


def test_plan_sees_every_batch_entry():
    """Documents differ per batch entry: the plan of batch 1 must not reuse batch 0's tiles."""
    kern = attnc.compile(str(EXAMPLES / "documents.attn"))
    doc = torch.stack([torch.zeros(64, dtype=torch.int64), torch.arange(64) // 8])
    check_all_planners(kern, 64, 64, 2, 1, 16, 16, {"doc": doc}, "per-batch documents")
    full, _, _ = classifier_tiles(kern, 64, 64, 2, 1, 16, 16, {"doc": doc})
    assert full[0].sum() > full[1].sum()


def test_explain_draws_inputs_for_runtime_patterns():
    kern = attnc.compile(str(EXAMPLES / "dropped_keys.attn"))
    text = kern.explain(512, 512)
    assert kernel_mode(kern.ir) in text and "keep" in text


# ----------------------------------------------------------------------------------------------
# Static plans at scale: closed form, no Nq x Nk work.


HUGE_PLAN_SCRIPT = """
import json, math, sys
import attnc
file, params = sys.argv[1], json.loads(sys.argv[2])
plan = attnc.compile(file, **params).plan(2 ** 20, 2 ** 20, batch=2, heads=3)
print(json.dumps({"mode": plan.mode, "tiles": plan.tiles, "block_m": plan.block_m, "block_n": plan.block_n,
                  "fraction": plan.tile_fraction}))
"""


def _limit_memory():
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


@pytest.mark.parametrize("file,params", [
    ("causal.attn", {}),
    ("sliding_window.attn", dict(window=1024)),
    ("prefix_lm.attn", dict(prefix_len=4096)),
    ("longformer.attn", dict(window=256, globals=16)),
    ("bigbird.attn", {}),
    ("neighborhood1d.attn", dict(kernel=7, dilation=4)),
    # Residue-permuted static patterns classify the tiles of the permuted problem once (not per batch
    # and head) in bounded chunks: memory stays small, time is O((N/Bm)*(N/Bn)) (~10 s at 2**20).
    ("dilated_window.attn", dict(window=2048, dilation=2)),
])
def test_huge_static_plan_counts_are_consistent(file, params):
    """kern.plan(2**20, 2**20) of a static pattern, in a process limited to 3 GB of address space."""
    import json
    import subprocess
    import sys
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLES.parent)] + [p for p in [env.get("PYTHONPATH")] if p])
    r = subprocess.run([sys.executable, "-c", HUGE_PLAN_SCRIPT, str(EXAMPLES / file), json.dumps(params)],
                       capture_output=True, text=True, env=env, timeout=120, preexec_fn=_limit_memory)
    assert r.returncode == 0, r.stderr[-2000:]
    plan = json.loads(r.stdout.strip().splitlines()[-1])
    n = 2 ** 20
    nqb, nkb = math.ceil(n / plan["block_m"]), math.ceil(n / plan["block_n"])
    assert all(v >= 0 for v in plan["tiles"].values())
    assert sum(plan["tiles"].values()) == 2 * 3 * nqb * nkb
    assert 0.0 < plan["fraction"] <= 1.0


def test_huge_causal_plan_is_exact():
    kern = attnc.compile(str(EXAMPLES / "causal.attn"))
    n = 2 ** 20
    plan = kern.plan(n, n, block_m=128, block_n=64)
    nqb = n // 128
    # Query block m covers keys [0, 128 m + 127]: 2 m full key blocks and 2 partial (the diagonal).
    assert plan.tiles["full"] == 2 * (nqb * (nqb - 1) // 2)
    assert plan.tiles["partial"] == 2 * nqb
    assert sum(plan.tiles.values()) == nqb * (n // 64)


def band_tile_counts(n, block_m, block_n, left):
    """Exact (full, computed) tile counts of ``k in [q - left, q]`` on an n x n grid, from the definition:
    the bounds grow with q, so a query block's union of keys is [q0 - left, q1] and its intersection
    [q1 - left, q0] (clipped to [0, n))."""
    q0 = torch.arange(0, n, block_m, dtype=torch.int64)
    q1 = torch.clamp(q0 + block_m, max=n) - 1
    lo = torch.clamp(q0 - left, min=0)
    computed = q1 // block_n - lo // block_n + 1
    flo = torch.clamp(q1 - left, min=0)
    first_full = (flo + block_n - 1) // block_n
    last_full = torch.minimum((q0 + 1) // block_n, torch.tensor(n // block_n)) - 1
    full = torch.clamp(last_full - first_full + 1, min=0)
    return int(full.sum()), int(computed.sum())


@pytest.mark.parametrize("left", [0, 100, 1024, 5000])
def test_huge_window_plan_is_exact(left):
    kern = attnc.compile(str(EXAMPLES / "sliding_window.attn"), window=left)
    n = 2 ** 20
    plan = kern.plan(n, n, block_m=128, block_n=64)
    full, computed = band_tile_counts(n, 128, 64, left)
    assert plan.tiles["full"] == full
    assert plan.tiles["full"] + plan.tiles["partial"] == computed
    # The same formula agrees with brute force on a small grid.
    full_s, computed_s = ranges_tiles(kern, 1000, 1000, 128, 64)
    assert (int(full_s.sum()), int(computed_s.sum())) == band_tile_counts(1000, 128, 64, left)


def test_causal_tile_fraction_at_4096():
    kern = attnc.compile(str(EXAMPLES / "causal.attn"))
    plan = kern.plan(4096, 4096, block_m=128, block_n=64)
    assert plan.tile_fraction == pytest.approx(1056 / 2048)
    assert 0.5 < plan.tile_fraction < 0.52
    assert plan.tiles == {"full": 992, "partial": 64, "empty": 992}
    # Batch and heads multiply the counts, not the fraction.
    plan4 = kern.plan(4096, 4096, batch=2, heads=2, block_m=128, block_n=64)
    assert plan4.tile_fraction == pytest.approx(plan.tile_fraction)
    assert plan4.tiles == {k: 4 * v for k, v in plan.tiles.items()}


def test_default_blocks_and_str():
    kern = attnc.compile(str(EXAMPLES / "sliding_window.attn"), window=256)
    plan = kern.plan(4096, 4096)
    assert (plan.block_m, plan.block_n) == kern.block_sizes(n_q=4096) == (64, 64)     # a narrow band
    text = str(plan)
    assert "mode: ranges" in text
    assert "tiles" in text and "sliding_window" in text
    for count in plan.tiles.values():
        assert str(count) in text
    assert f"{100 * plan.tile_fraction:.1f}%" in text
    assert isinstance(plan.transforms, list)


def test_narrow_bands_prefer_small_tiles():
    """Closed-form plans whose query blocks see few keys run on small tiles (NARROW_KEYS); dense
    ones on large tiles; tile lists and layout transforms always on small ones."""
    from attnc.launch import prefers_small_tiles
    window = attnc.compile(str(EXAMPLES / "sliding_window.attn"), window=1024)
    causal = attnc.compile(str(EXAMPLES / "causal.attn"))
    docs = attnc.compile(str(EXAMPLES / "documents.attn"))
    assert prefers_small_tiles(window, 32768, 32768) and prefers_small_tiles(window, 8192, 8192)
    assert not prefers_small_tiles(causal, 8192, 8192) and not prefers_small_tiles(causal, 32768, 32768)
    assert prefers_small_tiles(causal, 1024, 1024)            # 8 query blocks: small tiles, more programs
    assert prefers_small_tiles(docs, 8192, 8192)
    assert causal.block_sizes(n_q=32768) == (128, 128) and window.block_sizes(n_q=32768) == (64, 64)


def test_compaction_follows_the_static_remainder():
    """After key or query compaction the kept rows are dense: tiles follow what is left of the mask
    without the kept flags (causal: wide; a narrow window: small). Buckets and residue classes, and a
    remainder that still reads inputs, stay on small tiles."""
    from attnc.launch import prefers_small_tiles
    keep = "pattern p() {{\n input keep: bool[batch, heads, N]\n mask {}\n}}"
    assert not prefers_small_tiles(attnc.compile(keep.format("kept(keep) and causal")), 32768, 32768)
    assert not prefers_small_tiles(attnc.compile(keep.format("query_kept(keep)")), 8192, 8192)
    assert prefers_small_tiles(attnc.compile(keep.format("kept(keep) and causal and window(512)")), 32768, 32768)
    assert prefers_small_tiles(attnc.compile(keep.format("kept(keep) and causal")), 1024, 1024)
    mixed = "pattern p() {\n input keep: bool[batch, heads, N]\n input doc: int[batch, N]\n mask kept(keep) and same(doc)\n}"
    assert prefers_small_tiles(attnc.compile(mixed), 32768, 32768)
    for name in ("hash_buckets.attn", "dilated_window.attn"):
        assert prefers_small_tiles(attnc.compile(str(EXAMPLES / name)), 32768, 32768)



def test_plan_with_nq_ne_nk():
    kern = attnc.compile(str(EXAMPLES / "causal.attn"))
    # Decoding: 1 query against 4096 keys sees every key.
    plan = kern.plan(1, 4096, block_m=128, block_n=64)
    assert plan.tiles["empty"] == 0 and plan.tiles["partial"] + plan.tiles["full"] == 64
    # More queries than keys: the first queries see nothing.
    plan = kern.plan(4096, 64, block_m=128, block_n=64)
    assert plan.tiles["empty"] == 31 and plan.tiles["partial"] == 1 and plan.tiles["full"] == 0


def test_plan_rejects_bad_inputs():
    kern = attnc.compile(str(EXAMPLES / "documents.attn"))
    with pytest.raises(attnc.InputError):
        kern.plan(64, 64)                                         # missing doc
    with pytest.raises(attnc.InputError):
        kern.plan(64, 64, doc=torch.zeros(1, 64, dtype=torch.bool))   # wrong dtype


def test_loop_hull_ignores_disjuncts_without_visible_blocks():
    """The kernels' loop hull over several disjuncts: a disjunct that sees nothing from a block must not
    widen it. For `prefix(20) or causal`, the query blocks of a key block past the prefix start at its
    diagonal, not at query block 0 (the dK/dV kernel used to walk all of them)."""
    import triton
    import triton.language as tl

    kern = attnc.compile("pattern p() { mask prefix(20) or causal }")
    module = kern._backward_module()

    @triton.jit
    def probe(OUT, n_q, n_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FN: tl.constexpr):
        pid = tl.program_id(0)
        lo, flo, fhi, hi = FN(pid, n_k, n_q, BLOCK_N, BLOCK_M)        # as attnc_bwd_dkdv calls it
        tl.store(OUT + pid * 4 + 0, lo)
        tl.store(OUT + pid * 4 + 1, flo)
        tl.store(OUT + pid * 4 + 2, fhi)
        tl.store(OUT + pid * 4 + 3, hi)

    n, bm, bn = 200, 16, 16
    nkb = -(-n // bn)
    out = torch.zeros(nkb, 4, dtype=torch.int32)
    probe[(nkb,)](out, n, n, bm, bn, module._loop_bounds_t)
    mask = kern.mask(n, n)[0, 0]
    for j in range(nkb):
        lo, flo, fhi, hi = out[j].tolist()
        visible = mask[:, j * bn:(j + 1) * bn].any(-1)
        blocks = sorted({int(i) // bm for i in torch.nonzero(visible).flatten()})
        assert (lo, hi) == (blocks[0], blocks[-1] + 1), (j, out[j].tolist(), blocks)
        assert lo <= flo <= fhi <= hi


def check_masked_pieces(kern, n_q: int, n_k: int, bm: int, bn: int, transposed: bool, exact: bool = True):
    """Run the kernels' `_loop_bounds` and `_masked_pieces` (or their transposed twins) for every block
    through the interpreter and check that full loop plus pieces visit each tile holding a visible pair
    exactly once, only tiles of the loop hull, and, with ``exact``, no tile without a visible pair (the
    closed-form ranges are exact for these patterns; in general interval reasoning may keep a few empty
    boundary tiles, as the ranges always did). The full loop's tiles must be entirely visible."""
    import triton
    import triton.language as tl

    from attnc.codegen import template_context
    parts = template_context(kern.ir)["t_n_parts" if transposed else "n_parts"]
    assert parts > 1
    module = kern._backward_module()

    @triton.jit
    def probe(OUT, n_a, n_b, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BOUNDS: tl.constexpr,
              PIECES: tl.constexpr, WIDTH: tl.constexpr):
        pid = tl.program_id(0)
        lo, flo, fhi, hi = BOUNDS(pid, n_a, n_b, BLOCK_A, BLOCK_B)
        pieces = PIECES(pid, flo, fhi, n_a, n_b, BLOCK_A, BLOCK_B)
        tl.store(OUT + pid * (WIDTH + 4) + 0, flo)
        tl.store(OUT + pid * (WIDTH + 4) + 1, fhi)
        tl.store(OUT + pid * (WIDTH + 4) + 2, lo)
        tl.store(OUT + pid * (WIDTH + 4) + 3, hi)
        for k in tl.static_range(WIDTH):
            tl.store(OUT + pid * (WIDTH + 4) + 4 + k, pieces[k])

    suffix = "_t" if transposed else ""
    ba, bb = (bn, bm) if transposed else (bm, bn)       # the walked blocks (programs) and the looped ones
    na, nb = (n_k, n_q) if transposed else (n_q, n_k)
    nblocks = -(-na // ba)
    out = torch.zeros(nblocks, 4 * parts + 4, dtype=torch.int32)
    probe[(nblocks,)](out, na, nb, ba, bb, getattr(module, "_loop_bounds" + suffix),
                      getattr(module, "_masked_pieces" + suffix), 4 * parts)
    visible = kern.mask(n_q, n_k)[0, 0]
    if transposed:
        visible = visible.T
    for a in range(nblocks):
        row = out[a].tolist()
        flo, fhi, lo, hi, pieces = row[0], row[1], row[2], row[3], row[4:]
        visited, done = list(range(flo, fhi)), 0
        for start, end in zip(pieces[0::2], pieces[1::2]):        # (start, cumulative end) pairs
            visited += range(start, start + end - done)
            done = end
        rows = visible[a * ba:(a + 1) * ba]
        seen = {int(c) // bb for c in torch.nonzero(rows.any(0)).flatten()}
        assert len(visited) == len(set(visited)), (a, row)
        assert seen <= set(visited), (a, row, sorted(seen))
        assert all(rows[:, j * bb:(j + 1) * bb].all() for j in range(flo, fhi)), (a, row)
        assert all(lo <= j < hi for j in visited), (a, row)
        if exact:
            assert set(visited) == seen, (a, row, sorted(seen))


@pytest.mark.parametrize("mask", ["prefix(20) or causal", "window(20, 5) or global_tokens(9)",
                                  "block_local(24) or global_tokens(5) or k <= q - 150"])
@pytest.mark.parametrize("transposed", [False, True], ids=["keys", "queries"])
def test_masked_pieces_cover_each_needed_tile_once(mask, transposed):
    """Multi-disjunct range plans walk their masked tiles as disjoint pieces without a per-tile branch:
    together with the full loop they visit every tile that holds a visible pair exactly once, and no
    tile of the hull's empty gaps (e.g. between global tokens and a window)."""
    kern = attnc.compile(f"pattern p() {{ mask {mask} }}")
    check_masked_pieces(kern, 200, 200, 16, 24, transposed)


@settings(max_examples=60, **SETTINGS)
@given(pieces=st.lists(prelude_pieces(), min_size=2, max_size=3), n_q=st.integers(1, 160),
       n_k=st.integers(1, 160), blocks=st.sampled_from(BLOCKS[:-1]), transposed=st.booleans())
def test_random_disjunctions_walk_their_needed_tiles_once(pieces, n_q, n_k, blocks, transposed):
    """The same over random disjunctions of prelude pieces, lengths and tiles."""
    try:
        kern = attnc.compile("pattern p() { mask " + " or ".join(f"({p})" for p in pieces) + " }")
    except attnc.PatternError:
        assume(False)
    from attnc.codegen import template_context
    ctx = template_context(kern.ir)
    assume(kernel_mode(kern.ir) == "ranges" and ctx["t_n_parts" if transposed else "n_parts"] > 1)
    check_masked_pieces(kern, n_q, n_k, *blocks, transposed, exact=False)


# ----------------------------------------------------------------------------------------------
# Conjuncts proven on a whole tile (codegen.tile_proofs): partial tiles test only what the bounds leave open.


def run_mask_tile(kern, q0: int, k0: int, n_q: int, n_k: int, b: int, h: int, *, bounds: bool, edge: bool,
                  block: int = 16) -> torch.Tensor:
    """The generated ``_mask_tile`` of ``kern`` (through the interpreter) on the tile of positions
    q0 .. q0 + block - 1 x k0 .. k0 + block - 1 of a call of n_q x n_k (batch 2, heads 3): 1 where it keeps an
    entry of a tile of ones, 0 where it fills."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(OUT, q0, k0, b, h, n_q, n_k, batch, heads, MASK: tl.constexpr, BLOCK: tl.constexpr,
              TILE_BOUNDS: tl.constexpr, EDGE: tl.constexpr):
        rows = tl.arange(0, BLOCK)
        q_pos = (q0 + rows)[:, None]
        k_pos = (k0 + rows)[None, :]
        x = tl.full((BLOCK, BLOCK), 1.0, tl.float32)
        x = MASK(x, 0.0, k_pos < n_k, EDGE, q_pos, k_pos, b, h, n_q, n_k, batch, heads,
                 q0, q0 + BLOCK - 1, k0, k0 + BLOCK - 1, TILE_BOUNDS)
        tl.store(OUT + rows[:, None] * BLOCK + rows[None, :], x)

    out = torch.full((block, block), -1.0)
    probe[(1,)](out, q0, k0, b, h, n_q, n_k, 2, 3, MASK=kern._forward_module()._mask_tile, BLOCK=block,
                TILE_BOUNDS=bounds, EDGE=edge)
    return out


def check_mask_tile(kern, n_q: int, n_k: int, q0: int, k0: int, b: int, h: int, edge: bool, block: int = 16):
    """The tile's kept entries equal the pattern's mask (and, with ``edge``, keys before n_k), with the tile's
    bounds (proofs taken) and without them, on the positions inside the call."""
    want = kern.mask(n_q, n_k, batch=2, heads=3)[b, h]
    rows = [q for q in range(q0, q0 + block) if q < n_q]
    cols = [k for k in range(k0, k0 + block) if k < n_k or edge]
    for bounds in (True, False):
        got = run_mask_tile(kern, q0, k0, n_q, n_k, b, h, bounds=bounds, edge=edge, block=block)
        for q in rows:
            for k in cols:
                expect = k < n_k and bool(want[q, k])
                assert bool(got[q - q0, k - k0]) == expect, (kern.ir.name, bounds, edge, q, k, got, want)


@pytest.mark.parametrize("source", [
    "mask causal and q - k < 40",                         # two proofs: the window's far edge, causality
    "mask q - k >= 0 and k // 8 != q // 8 + 1",           # a coordinate atom
    "mask causal and (q - k) % 3 == 0",                   # a modular atom
    "mask k >= q",
])
def test_mask_tile_proofs_keep_what_the_mask_keeps(source):
    """Partial tiles test a conjunct only where the tile's bounds do not prove it: every kind of tile (on the
    diagonal, on a window's edge, inside both, reaching past the keys' end) keeps exactly the mask."""
    kern = attnc.compile(f"pattern p() {{ {source} }}")
    for q0, k0 in [(0, 0), (32, 0), (48, 16), (32, 32), (64, 16), (80, 48), (16, 48)]:
        check_mask_tile(kern, 90, 70, q0, k0, 1, 2, edge=k0 + 16 > 70)


def test_mask_tile_proofs_are_branches_on_the_bounds():
    """A window's partial tiles test each of its two conjuncts behind a branch on the tile's bounds; a dense
    mask's read stays outside every branch (Triton 3.6's pipeliner fails on a load used only inside one) and
    causality is branched on; a mask with nothing to prove, or only one conjunct, has no branch."""
    from attnc.codegen import tile_mask_code, tile_proofs
    window = attnc.compile("pattern p() { mask causal and q - k < 40 }").ir.mask
    conjuncts, proofs, lines = tile_proofs(window)
    assert len(conjuncts) == 2 and len(proofs) == 2 and lines
    code = tile_mask_code(window, "m")
    assert code[0] == "if TILE_BOUNDS:" and sum(line.lstrip().startswith("if ") for line in code) == 3
    dense = attnc.compile("pattern p() { input m: bool[batch, N, N]\n mask m[b, q, k] and causal }").ir.mask
    code = tile_mask_code(dense, "m")
    load = next(i for i, line in enumerate(code) if "tl.load" in line)
    branch = next(i for i, line in enumerate(code) if line.lstrip().startswith("if ") and "TILE_BOUNDS" not in line)
    assert load < branch and not code[load].startswith("    " * 2)
    docs = attnc.compile("pattern p() { input doc: int[batch, N]\n mask doc[b, q] == doc[b, k] }").ir.mask
    assert tile_proofs(docs)[1] == {} and not any("TILE_BOUNDS" in line for line in tile_mask_code(docs, "m"))
    # One provable conjunct alone is unproven on every partial tile (where it is proven the tile is full).
    causal = attnc.compile("pattern p() { mask causal }").ir.mask
    assert len(tile_proofs(causal)[1]) == 1 and not any("if " in line for line in tile_mask_code(causal, "m"))


@settings(max_examples=40, **SETTINGS)
@given(prog=S.mask_programs(), n_q=st.integers(1, 40), n_k=st.integers(1, 40), data=st.data())
def test_random_mask_tile_proofs_are_sound(prog, n_q, n_k, data):
    """Over random masks, lengths and tiles: the generated partial-tile code (its proofs from the tile's bounds
    and the tests they leave) keeps exactly the mask."""
    try:
        kern = attnc.compile(prog.source, **prog.kwargs)
    except attnc.PatternError:
        assume(False)       # provably empty: test_properties checks that
    q0 = data.draw(st.integers(0, n_q - 1), "q0")
    k0 = data.draw(st.integers(0, n_k - 1), "k0")
    b, h = data.draw(st.integers(0, 1), "b"), data.draw(st.integers(0, 2), "h")
    check_mask_tile(kern, n_q, n_k, q0, k0, b, h, edge=data.draw(st.booleans(), "edge"))
