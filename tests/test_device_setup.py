"""The device setup (attnc/device_setup.py, templates/attn_setup.py.j2), run here in Triton's interpreter.

The tile classes it computes are compared with the torch classifiers in test_plan.py (every runtime-input
example and hypothesis-drawn inputs, through ``check_all_planners``). Here: the list kernel against
``build_tile_lists``, the radix sort's kernels, the bucket sorts (16-bit keys; keys in order give the identity
layout), and the generated source.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch

import attnc
from attnc import device_setup
from attnc.layout import build_layout
from attnc.plan import build_tile_lists, layout_transform, pad_sorted, padded_rows
from attnc.validate import check_inputs

try:  # tests/ may or may not be a package
    from tests.tiles import same_lists
except ImportError:  # pragma: no cover
    from tiles import same_lists

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("shape", [(2, 3, 5, 9), (1, 1, 40, 3), (1, 2, 3, 300), (1, 1, 1, 1)])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("sync", [False, True])
def test_tile_lists_kernel_matches_build_tile_lists(shape, transposed, sync):
    """Runs, counts and lists equal the torch builder's; without a synchronization the lists are as wide
    as a row, with one as wide as the longest count."""
    g = torch.Generator().manual_seed(sum(shape))
    status = torch.randint(0, 3, shape, generator=g).to(torch.int8)
    want = build_tile_lists(status.transpose(-1, -2).contiguous() if transposed else status)
    got = device_setup.tile_lists(status, transposed, sync=sync)
    same_lists(want, got)
    n_cols = shape[2] if transposed else shape[3]
    widths = (got.full_idx.shape[-1], got.part_idx.shape[-1])
    assert widths == ((want.full_idx.shape[-1], want.part_idx.shape[-1]) if sync else (n_cols, n_cols))


@pytest.mark.parametrize("transposed", [False, True])
def test_tile_lists_leading_runs_and_empty_lists(transposed):
    """A band of full tiles is each row's leading run, with nothing left to list; a full tile past a gap
    goes to the list; rows without tiles have empty runs and lists."""
    status = torch.zeros(1, 1, 6, 6, dtype=torch.int8)
    for m in range(6):
        status[0, 0, m, max(0, m - 1):m + 1] = 2
    lists = device_setup.tile_lists(status.transpose(-1, -2).contiguous() if transposed else status, transposed)
    assert lists.full_run[0, 0].tolist() == [[0, 1]] + [[m - 1, 2] for m in range(1, 6)]
    assert not lists.full_cnt.any()
    status[0, 0, 5, 0] = 2
    status[0, 0, 5, 2] = 1
    lists = device_setup.tile_lists(status.transpose(-1, -2).contiguous() if transposed else status, transposed)
    assert lists.full_run[0, 0, 5].tolist() == [0, 1] and lists.full_cnt[0, 0, 5] == 2
    assert lists.full_idx[0, 0, 5, :2].tolist() == [4, 5]
    assert lists.part_cnt[0, 0, 5] == 1 and lists.part_idx[0, 0, 5, 0] == 2
    empty = device_setup.tile_lists(torch.zeros(1, 2, 3, 4, dtype=torch.int8), transposed)
    assert not empty.full_run.any() and not empty.full_cnt.any() and not empty.part_cnt.any()


def _hash_layout(qb, kb, device: bool, block=16):
    """The layout of the hash-bucket example: from the device setup, or the torch one."""
    kern = attnc.compile(str(EXAMPLES / "hash_buckets.attn"))
    B, H, N = qb.shape
    inputs = {"qb": qb, "kb": kb}
    sizes = check_inputs(kern.ir, inputs, batch=B, heads=H, n_q=N, n_k=N)
    return build_layout(kern.ir, layout_transform(kern.ir.mask), B, H, H, N, N, block, block, sizes, inputs,
                        torch.device("cpu"), classifier=kern._module("setup") if device else None)


def test_radix_sort_offsets_over_many_chunks():
    """Chunks of 8 rows: 300 rows take 38 chunks, more than the offsets kernel's tile of 32 histograms,
    so its running sums carry across tiles."""
    g = torch.Generator().manual_seed(3)
    keys = torch.randint(0, 5, (1, 2, 300), generator=g, dtype=torch.int32)
    got = device_setup.radix_sort_perm(keys, 8, chunk=8, kernels=True)
    assert torch.equal(got, torch.sort(keys, dim=-1, stable=True).indices)


@pytest.mark.parametrize("span,dtype", [(8, torch.uint8), (100, torch.int8), (1000, torch.int16),
                                        (10 ** 6, torch.int32), (2 ** 40, torch.int64)])
def test_bucket_sorts_take_16_bit_keys_and_agree(span, dtype, monkeypatch):
    """Bucket ids become 16-bit sort keys, clamped to [-1, 65534]: ids in that range sort exactly, ids past
    it share the end keys and stay in position order. Ties keep position order; the permutations and
    tiles equal the torch setup's, whatever the ids' dtype. (Small groups of query blocks per classifier and
    list program, so that the key-block ranges differ between groups.)"""
    monkeypatch.setattr(device_setup, "CLASSIFY_GROUP", 2)
    monkeypatch.setattr(device_setup, "LIST_GROUP", 4)
    g = torch.Generator().manual_seed(span % 1000)
    lo = 0 if dtype == torch.uint8 else -span // 2
    qb = torch.randint(lo, lo + span, (2, 2, 150), generator=g).to(dtype)
    kb = torch.randint(lo, lo + span, (2, 2, 150), generator=g).to(dtype)
    qb[..., :10] = kb[..., :10] = 3          # ties: a stable sort keeps them in position order
    want = _hash_layout(qb, kb, device=False)
    got = _hash_layout(qb, kb, device=True)
    ids = qb.to(torch.int64).clamp(-1, 65534)
    expected = torch.sort(ids, dim=-1, stable=True).indices
    # Each bucket then starts on a block boundary (padding rows hold position 150), when they fit.
    assert torch.equal(got.q_perm, pad_sorted(expected, ids, 16, padded_rows(150, 16)))
    assert torch.equal(want.q_perm, got.q_perm) and torch.equal(want.k_perm, got.k_perm)
    assert torch.equal(want.status, got.status)
    assert not got.q_identity and not got.k_identity
    # Keys sorted by bucket: the classifier evaluated each group of query blocks only over the key blocks
    # whose (clamped) ids overlap the group's, and the forward lists read only those.
    ranges = got.tiles.ranges
    k_ids = torch.where(got.k_perm < 150, torch.gather(kb.to(torch.int64).clamp(-1, 65534), -1,
                                                       got.k_perm.clamp(max=149)), -2).view(2, 2, -1, 16)
    q_ids = torch.where(got.q_perm < 150, torch.gather(ids, -1, got.q_perm.clamp(max=149)), -2).view(2, 2, -1, 16)
    group = device_setup.CLASSIFY_GROUP
    for b in range(2):
        for h in range(2):
            for g0 in range(0, q_ids.shape[2], group):
                qi = q_ids[b, h, g0:g0 + group]
                qi = qi[qi > -2]
                overlap = [j for j in range(k_ids.shape[2]) if len(qi)
                           and ((k_ids[b, h, j] >= qi.min()) & (k_ids[b, h, j] <= qi.max())).any()]
                for m in range(g0, min(g0 + group, q_ids.shape[2])):
                    first, last = ranges[b, h, m].tolist()
                    if not overlap:                                  # blocks of padding only
                        assert first >= last and not got.status[b, h, m].any()
                        continue
                    assert overlap == list(range(overlap[0], overlap[-1] + 1))   # key blocks in id order
                    assert (first, last) == (overlap[0], overlap[-1] + 1)
                    assert not got.status[b, h, m, :first].any() and not got.status[b, h, m, last:].any()
    same_lists(want.lists(False), got.lists(False), "forward lists")


@pytest.mark.parametrize("n", [1, 64, 150])
@pytest.mark.parametrize("bits", [1, 8, 16])
def test_radix_sort_kernels_equal_a_stable_sort(n, bits):
    """The radix passes (histogram, offsets, chunk sort and scatter; chunks of 64 rows here, so 150 rows
    take three) give torch's stable permutation, alone and after a prior permutation, with many ties."""
    g = torch.Generator().manual_seed(n * bits)
    keys = torch.randint(0, 2 ** bits, (2, 3, n), generator=g, dtype=torch.int32)
    keys[0, 0] = 2 ** bits - 1                    # one row of a single key: every row ties
    got = device_setup.radix_sort_perm(keys, bits, kernels=True)
    assert got.dtype == torch.int64
    assert torch.equal(got, torch.sort(keys, dim=-1, stable=True).indices)
    prior = torch.argsort(torch.rand(2, 3, n, generator=g), dim=-1)
    got = device_setup.radix_sort_perm(keys, bits, prior, kernels=True)
    assert torch.equal(got, device_setup.radix_sort_perm(keys, bits, prior, kernels=False))
    assert torch.equal(torch.gather(keys, -1, got), torch.gather(keys, -1, got).sort(dim=-1).values)


@pytest.mark.parametrize("top", [1, 200, 255, 256, 40000])
def test_radix_passes_over_zero_digits_skip(top):
    """With the keys' maximum on the device, a pass whose digits are all 0 copies the order it got instead
    of sorting: 16-bit keys below 256 take one pass. The permutation is a stable sort's either way, and a
    maximum too large only costs the pass."""
    g = torch.Generator().manual_seed(top)
    keys = torch.randint(0, top, (2, 2, 150), generator=g, dtype=torch.int32)
    want = torch.sort(keys, dim=-1, stable=True).indices
    for bound in (keys.max(), torch.tensor(65535)):
        key_max = bound.to(torch.int32).view(1)
        got = device_setup.radix_sort_perm(keys, 16, kernels=True, key_max=key_max)
        assert torch.equal(got, want)
        prior = torch.argsort(torch.rand(2, 2, 150, generator=g), dim=-1)
        got = device_setup.radix_sort_perm(keys, 16, prior, kernels=True, key_max=key_max)
        assert torch.equal(got, device_setup.radix_sort_perm(keys, 16, prior, kernels=False))


def test_sort_key_kernels_fold_in_the_maximum():
    """The device setup's sort-key kernels leave each key's maximum for the radix passes (hash buckets: ids
    + 1, so buckets 0..4 give 5; the initial 1 never exceeds a real maximum of interest)."""
    calls = []
    real = device_setup.radix_sort_perm

    def spy(keys, bits, perm=None, **kw):
        calls.append((int(keys.max()), int(kw["key_max"])))
        assert kw.get("pad") == (16, padded_rows(90, 16))    # hash buckets are padded by the sort itself
        return real(keys, bits, perm, **kw)

    qb = torch.randint(0, 5, (1, 2, 90), generator=torch.Generator().manual_seed(1))
    with mock.patch.object(device_setup, "radix_sort_perm", spy):
        _hash_layout(qb, qb.flip(-1).contiguous(), device=True)
    assert calls == [(5, 5), (5, 5)]


def test_mirrored_keys_sort_once():
    """Documents: queries and keys are sorted by the same read at their own position, so with as many
    queries as keys one sort orders both sides, and with square blocks one summary serves both; hash
    buckets read two tensors and sort (and summarize) twice."""
    calls, summaries = [], []
    real, real_summarize = device_setup.radix_sort_perm, device_setup.summarize_side

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    def summarize_spy(*a, **k):
        summaries.append(a[2])
        return real_summarize(*a, **k)

    ids = (torch.arange(130) // 17).flip(-1).expand(1, 2, 130).contiguous()
    with mock.patch.object(device_setup, "radix_sort_perm", spy), \
            mock.patch.object(device_setup, "summarize_side", summarize_spy):
        docs = attnc.compile(str(EXAMPLES / "documents.attn"))
        doc = ids[:, 0]
        sizes = check_inputs(docs.ir, {"doc": doc}, batch=1, heads=2, n_q=130, n_k=130)
        args = (docs.ir, layout_transform(docs.ir.mask), 1, 2, 2, 130, 130, 16, 16, sizes, {"doc": doc},
                torch.device("cpu"))
        got = build_layout(*args, classifier=docs._module("setup"))
        assert len(calls) == 1 and summaries == ["q"]
        want = build_layout(*args)
        assert torch.equal(want.q_perm, got.q_perm) and torch.equal(want.k_perm, got.k_perm)
        assert torch.equal(want.status, got.status)
        _hash_layout(ids, ids, device=True)
        assert len(calls) == 3 and summaries == ["q", "q", "k"]


def test_keys_in_order_give_the_identity_layout(monkeypatch):
    """Documents one after another: the stable sort leaves every position in place and the summaries see
    it. The host does not read that (no synchronization): the layout carries it as a device flag, which
    picks the plain list kernels among the two variants launched. One side out of order clears it.
    (Bucket keys on two tensors, without padding: padded buckets are never in place.)"""
    monkeypatch.setenv("ATTNC_PAD_BUCKETS", "0")
    ids = (torch.arange(130) // 17).expand(1, 2, 130).contiguous()
    got = _hash_layout(ids, ids, device=True)
    assert not got.identity and got.in_place.tolist() == [1]
    assert torch.equal(got.q_perm, torch.arange(130).expand(1, 2, 130))
    shuffled = ids.flip(-1).contiguous()
    want, got = _hash_layout(ids, shuffled, device=False), _hash_layout(ids, shuffled, device=True)
    assert want.q_identity and not want.k_identity and want.in_place is None
    assert got.in_place.tolist() == [0]
    assert torch.equal(want.k_perm, got.k_perm) and torch.equal(want.status, got.status)


def test_setup_source_is_generated_readable_and_cached():
    kern = attnc.compile(str(EXAMPLES / "documents.attn"))
    module = kern._module("setup")
    source = Path(module.__file__).read_text()
    for name in ("def attnc_classify(", "def attnc_summarize_q(", "def attnc_summarize_k(",
                 "def attnc_sort_key_q0(", "def attnc_sort_key_k0("):
        assert name in source
    assert "tile classifier for pattern `document_causal`" in source
    assert "doc[b, q]" in source and "must: true on every element" in source
    assert kern._module("setup") is module


@pytest.mark.parametrize("n", [96, 97])
def test_residue_classes_of_equal_size_are_a_transpose(n):
    """Dilation by 3: when 3 divides n the classes come from a transpose (no sort), else from a stable
    sort; both equal the torch setup's order."""
    kern = attnc.compile("pattern p() { mask causal and dilated(3) and window(40, 0) }")
    sizes = check_inputs(kern.ir, {}, batch=1, heads=2, n_q=n, n_k=n)
    args = (kern.ir, layout_transform(kern.ir.mask), 1, 2, 2, n, n, 16, 16, sizes, {}, torch.device("cpu"))
    want = build_layout(*args)
    if n % 3 == 0:
        with mock.patch.object(torch, "sort", side_effect=AssertionError("equal classes were sorted")):
            got = build_layout(*args, classifier=kern._module("setup"))
    else:
        got = build_layout(*args, classifier=kern._module("setup"))
    assert torch.equal(want.q_perm, got.q_perm) and torch.equal(want.k_perm, got.k_perm)
    assert torch.equal(want.status, got.status)


@pytest.mark.parametrize("n_q,n_k", [(40, 0), (0, 40)])
def test_empty_sides_launch_nothing(n_q, n_k):
    """No queries or no keys: the device setup returns empty plans without launching a grid of zero
    programs (which CUDA rejects), and the call returns zeros."""
    kern = attnc.compile(str(EXAMPLES / "hash_buckets.attn"))
    n = max(n_q, n_k)
    g = torch.Generator().manual_seed(1)
    inputs = {"qb": torch.randint(0, 3, (1, 2, n), generator=g), "kb": torch.randint(0, 3, (1, 2, n), generator=g)}
    sizes = check_inputs(kern.ir, inputs, batch=1, heads=2, n_q=n_q, n_k=n_k)
    layout = build_layout(kern.ir, layout_transform(kern.ir.mask), 1, 2, 2, n_q, n_k, 16, 16, sizes, inputs,
                          torch.device("cpu"), classifier=kern._module("setup"))
    lists = layout.lists(False)
    assert layout.status.numel() == 0 and not lists.full_cnt.any() and not lists.part_cnt.any()
    assert not layout.lists(True).full_cnt.any()
    empty = device_setup.tile_lists(torch.zeros(1, 2, 0, 3, dtype=torch.int8))
    assert empty.full_cnt.shape == (1, 2, 0) and empty.full_run.shape == (1, 2, 0, 2)
    q, k, v = torch.randn(1, 2, n_q, 16), torch.randn(1, 2, n_k, 16), torch.randn(1, 2, n_k, 16)
    out = kern(q, k, v, **inputs)
    assert out.shape == (1, 2, n_q, 16) and not out.abs().sum()


def _padded_by_hand(perm, keys, block, rows):
    """pad_sorted for one row of perm, written as a loop: each run of equal keys starts on a block."""
    n = len(perm)
    runs = []
    for i, p in enumerate(perm):
        if i == 0 or keys[p] != keys[perm[i - 1]]:
            runs.append([])
        runs[-1].append(p)
    out = []
    for run in runs:
        out += run + [n] * (-len(run) % block)
    if len(out) > rows:                  # too many blocks: sorted order, padding after it
        out = list(perm)
    return out + [n] * (rows - len(out))


@pytest.mark.parametrize("n,buckets,chunk", [(1, 1, 8), (37, 1, 8), (150, 3, 16), (150, 40, 8), (300, 5, 32),
                                            (150, 256, 16), (150, 5000, 32)])
def test_padding_starts_every_bucket_on_a_block(n, buckets, chunk):
    """Buckets padded to whole blocks: the torch version against a loop, and the device's padded radix sort
    (its one pass's offsets; chunks of 8-32 rows, so buckets span chunks) against the torch version. With 40
    buckets in 150 rows the padding does not fit and the sorted order stays; keys of 256 or more take a
    second pass and are not padded (the sorted order, padding after it), on both."""
    g = torch.Generator().manual_seed(n + buckets)
    keys = torch.randint(0, buckets, (2, 3, n), generator=g, dtype=torch.int32)
    keys[1, 2] = 7                                   # one bucket for the whole row
    perm = torch.sort(keys, dim=-1, stable=True).indices
    block = 16
    rows = padded_rows(n, block)
    want = pad_sorted(perm, keys, block, rows)
    for b in range(2):
        for h in range(3):
            by_hand = _padded_by_hand(perm[b, h].tolist(), keys[b, h].tolist(), block, rows)
            if keys.max() >= 256:
                by_hand = perm[b, h].tolist() + [n] * (rows - n)
            assert want[b, h].tolist() == by_hand
    key_max = keys.max().to(torch.int32).view(1)
    for kernels in (True, False):
        got = device_setup.radix_sort_perm(keys, 16, kernels=kernels, key_max=key_max, pad=(block, rows), chunk=chunk)
        assert torch.equal(got, want)


def test_padded_layouts_agree_and_pad_where_they_fit(monkeypatch):
    """Hash buckets with few, long buckets: each side's buckets start on block boundaries (block 16), the
    device setup equals the torch one (positions, tile classes), and padding rows end blocks. With no
    allowance for padding the sorted order stays as it was (padding only after it)."""
    g = torch.Generator().manual_seed(11)
    qb = torch.randint(0, 3, (2, 2, 150), generator=g)
    kb = torch.randint(0, 3, (2, 2, 150), generator=g)
    want, got = _hash_layout(qb, kb, device=False), _hash_layout(qb, kb, device=True)
    assert got.rows_q == got.rows_k == padded_rows(150, 16)
    assert torch.equal(want.q_perm, got.q_perm) and torch.equal(want.k_perm, got.k_perm)
    assert torch.equal(want.status, got.status)
    assert torch.equal(got.qpos[0, 0].long(), got.q_perm[0, 0])
    for b in range(2):
        for h in range(2):
            perm = got.k_perm[b, h]
            real = perm[perm < 150]
            assert sorted(real.tolist()) == list(range(150))
            ids = kb[b, h, real]
            starts = torch.nonzero(perm < 150).squeeze(1)
            first = [int(starts[0])] + [int(starts[i]) for i in range(1, len(starts)) if ids[i] != ids[i - 1]]
            assert all(f % 16 == 0 for f in first)
    # Key blocks holding padding are never full.
    k_cnt = (got.k_perm < 150).view(2, 2, -1, 16).sum(-1)
    assert not ((got.status == 2) & (k_cnt < 16)[..., None, :]).any()
    monkeypatch.setattr(attnc.plan, "PAD_SLACK", 0.0)
    qb[0, 0] = torch.randint(0, 20, (150,), generator=g)    # 20 buckets need 20 blocks
    tight = _hash_layout(qb, kb, device=True)
    assert tight.rows_q == 176                        # one block of allowance
    order = torch.sort(qb, dim=-1, stable=True).indices
    kept = (tight.q_perm[..., :150] == order).all(-1)
    assert kept.tolist() == [[True, False], [False, False]]     # where padding does not fit, the order stays
    assert torch.equal(tight.q_perm, pad_sorted(order, qb, 16, 176))
    assert torch.equal(tight.status, _hash_layout(qb, kb, device=False).status)


# ---- sorted copies of K / V (device_setup.copy_rows, Layout.sorted_keys) -------------------------------

@pytest.mark.parametrize("dtype,D,broadcast", [(torch.float32, 16, False), (torch.bfloat16, 24, True)])
def test_copy_rows_copies_the_needed_blocks_in_sorted_order(dtype, D, broadcast):
    """Rows of needed blocks equal a gather through the permutation (padding positions past the end copy the
    last row); rows of other blocks are not written (NaN under the interpreter). A permutation shared by all
    (batch, head) broadcasts; x may be a strided view."""
    g = torch.Generator().manual_seed(2)
    B, H, N, block = 2, 3, 150, 32
    x = torch.randn(B, N, H, D + 8, generator=g).to(dtype).transpose(1, 2)[..., :D]     # strided rows
    shape = (1, 1) if broadcast else (B, H)
    rows = 160                                           # 10 padding rows, position N
    perm = torch.stack([torch.cat([torch.randperm(N, generator=g), torch.full((rows - N,), N)])
                        for _ in range(shape[0] * shape[1])]).view(*shape, rows)
    need = torch.rand(*shape, rows // block, generator=g) < 0.6
    out = device_setup.copy_rows(x, perm, need.to(torch.int8), block)
    want = torch.gather(x, 2, perm.clamp(max=N - 1).expand(B, H, rows)[..., None].expand(B, H, rows, D))
    read = need.repeat_interleave(block, dim=-1).expand(B, H, rows)
    assert torch.equal(out[read], want[read])
    assert out[~read].isnan().all()
    assert torch.equal(device_setup.copy_rows(x, perm), want)          # no flags: every row


def test_sorted_keys_copies_blocks_some_tile_reads():
    """Layout.sorted_keys reads the tile classes: a key block no query block reads is not copied. Under GQA
    with keys shared by a group (the permutation has query heads, K has fewer), a block is copied when some
    query head of the group reads it."""
    from types import SimpleNamespace

    from attnc.layout import Layout
    g = torch.Generator().manual_seed(4)
    B, Hq, Hkv, N, block = 1, 4, 2, 128, 32
    k = torch.randn(B, Hkv, N, 8, generator=g)
    perm = torch.randperm(N, generator=g).expand(B, Hq, N).contiguous()
    status = torch.zeros(B, Hq, 3, N // block, dtype=torch.int8)
    status[0, 1, 2, 0] = 2          # query head 1 (kv head 0) reads key block 0 (a partial tile)
    status[0, 3, 0, 3] = 1          # query head 3 (kv head 1) reads key block 3 (a full tile)
    layout = SimpleNamespace(k_perm=perm, status=status, rows_k=N)
    out = Layout.sorted_keys(layout, k, block)
    want = torch.gather(k, 2, perm[:, ::2, :, None].expand(B, Hkv, N, 8))
    assert torch.equal(out[0, 0, :block], want[0, 0, :block]) and out[0, 0, block:].isnan().all()
    assert torch.equal(out[0, 1, 3 * block:], want[0, 1, 3 * block:]) and out[0, 1, :3 * block].isnan().all()
    assert torch.equal(Layout.sorted_keys(layout, k), want)             # no block size: every row


def test_radix_chunk_setting(monkeypatch):
    """ATTNC_RADIX_CHUNK (an experiment switch for the GPU's radix passes): a power of two from 16 to 4096,
    anything else refused by name; unset leaves the size to the rule."""
    monkeypatch.delenv("ATTNC_RADIX_CHUNK", raising=False)
    assert device_setup._chunk_setting() is None
    monkeypatch.setenv("ATTNC_RADIX_CHUNK", "512")
    assert device_setup._chunk_setting() == 512
    for bad in ("8", "8192", "300", "-512", "big"):
        monkeypatch.setenv("ATTNC_RADIX_CHUNK", bad)
        with pytest.raises(ValueError, match="ATTNC_RADIX_CHUNK"):
            device_setup._chunk_setting()
