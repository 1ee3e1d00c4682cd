"""Plan setup on the device in a few launches: tile classification and tile lists.

Patterns with runtime inputs or a layout transform need, per call, the class of every (query block,
key block) tile and the lists the kernels walk. The torch classifiers of :mod:`attnc.plan` compute
them with dozens of small launches and several host synchronizations; here the work is:

1. per side, the generated sort-key kernel and a stable radix sort (:func:`radix_sort_perm`; layout
   transforms), then the generated block summaries (min / max of original positions, residues and each read);
2. the pattern's generated classifier (``templates/attn_setup.py.j2``): one launch writes the status
   of every tile;
3. :func:`tile_lists`: one launch writes each row's leading run of full tiles, its other full tiles and
   its partial tiles, into lists as wide as a row.

Nothing reads data on the host (no synchronization), so the whole setup is queued behind the previous
call's kernels and the host runs ahead. What the host cannot know is passed on as device data: list
lengths, and whether a sort moved any row (:attr:`attnc.layout.Layout.in_place`). Lists too large to
allocate as wide as a row take one synchronization for their widths. The torch classifiers stay the
CPU path (``kern.plan`` on CPU tensors) and the tests' oracle.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .fastlaunch import launch as launch_kernel
from .plan import PlannedTiles, TileLists, mirrored_keys, pad_sorted, padded_rows, padded_sides


@triton.jit
def _tile_lists_kernel(status_ptr, s_bh, s_row, s_col, n_rows, n_cols, run_ptr,
                       full_cnt_ptr, part_cnt_ptr, stats_ptr, full_idx_ptr, part_idx_ptr, full_width, part_width,
                       range_ptr, GROUP: tl.constexpr, BLOCK_J: tl.constexpr, FILL: tl.constexpr,
                       RANGED: tl.constexpr):
    # One program per (batch, head, GROUP rows): a row is a query block (a key block for the transposed
    # lists of the dK/dV kernel). A row's full tiles are a leading run (its first full column and how many
    # consecutive full columns follow) and the rest. FILL=False only folds the longest rest and partial
    # counts into stats[0:2] (the widths); FILL=True writes the run, the counts and the lists (columns in
    # order), and folds the longest rest into stats[2]. RANGED: each row's tiles outside the columns
    # range[row] = [first, last) are empty (the classifier found them, attnc_classify's K_SEARCH), and the
    # program reads only the union of its rows' ranges.
    bh = tl.program_id(0)
    r = tl.program_id(1) * GROUP + tl.arange(0, GROUP)
    r_ok = r < n_rows
    base = status_ptr + bh.to(tl.int64) * s_bh + r[:, None].to(tl.int64) * s_row
    out = bh.to(tl.int64) * n_rows + r
    n_full = tl.zeros([GROUP], dtype=tl.int32)       # full tiles so far
    n_run = tl.zeros([GROUP], dtype=tl.int32)        # of them in the leading run
    n_part = tl.zeros([GROUP], dtype=tl.int32)
    first = tl.zeros([GROUP], dtype=tl.int32) + n_cols
    start, stop = 0, n_cols
    if RANGED:
        lo = tl.load(range_ptr + out * 2, mask=r_ok, other=n_cols)
        hi = tl.load(range_ptr + out * 2 + 1, mask=r_ok, other=0)
        live = lo < hi
        start = tl.min(tl.where(live, lo, n_cols)) // BLOCK_J * BLOCK_J
        stop = tl.max(tl.where(live, hi, 0))
    for j0 in range(start, stop, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)[None, :]
        st = tl.load(base + j.to(tl.int64) * s_col, mask=r_ok[:, None] & (j < n_cols), other=0)
        is_full = (st == 2).to(tl.int32)
        is_part = (st == 1).to(tl.int32)
        first = tl.minimum(first, tl.min(tl.where(is_full != 0, j, n_cols), 1))
        # In the run: full, and every column from the first full one up to here is full.
        in_run = (is_full != 0) & (n_full[:, None] + tl.cumsum(is_full, 1) == j - first[:, None] + 1)
        is_rest = is_full - in_run.to(tl.int32)
        if FILL:
            at = n_full[:, None] - n_run[:, None] + tl.cumsum(is_rest, 1) - 1
            tl.store(full_idx_ptr + out[:, None] * full_width + at, j + 0 * at, mask=is_rest != 0)
            at = n_part[:, None] + tl.cumsum(is_part, 1) - 1
            tl.store(part_idx_ptr + out[:, None] * part_width + at, j + 0 * at, mask=is_part != 0)
        n_full += tl.sum(is_full, 1)
        n_run += tl.sum(in_run.to(tl.int32), 1)
        n_part += tl.sum(is_part, 1)
    if FILL:
        tl.store(run_ptr + out * 2, tl.where(n_run > 0, first, 0), mask=r_ok)
        tl.store(run_ptr + out * 2 + 1, n_run, mask=r_ok)
        tl.store(full_cnt_ptr + out, n_full - n_run, mask=r_ok)
        tl.store(part_cnt_ptr + out, n_part, mask=r_ok)
        tl.atomic_max(stats_ptr + 2, tl.max(tl.where(r_ok, n_full - n_run, 0), 0))   # for the kernels' variant
    else:
        tl.atomic_max(stats_ptr + 0, tl.max(n_full - n_run, 0))
        tl.atomic_max(stats_ptr + 1, tl.max(n_part, 0))


def _block_j(n: int, cap: int = 1024) -> int:
    return min(cap, max(16, triton.next_power_of_2(max(n, 1))))


UNSYNCED_LIST_BYTES = 64 << 20     # lists as wide as a row up to this size: no host synchronization
# Tiles of the list and classifier kernels: rows (query blocks, or key blocks for transposed lists) per
# program and columns per step. benchmarks/micro_setup.py times the alternatives on the GPU (RESULTS run 25,
# hash buckets at 32k: forward lists 28 -> 22 us with 128 columns a step).
LIST_GROUP, LIST_BLOCK_J, LIST_WARPS = 16, 128, 4
CLASSIFY_GROUP, CLASSIFY_BLOCK_J, CLASSIFY_WARPS = 16, 128, 4


HOST_SYNCS = 0       # host synchronizations made by setups so far (a shape that needs one is never graphed)


def tile_lists(status: torch.Tensor, transposed: bool = False, sync: bool | None = None,
               ranges: torch.Tensor | None = None) -> TileLists:
    """The tile lists of ``status`` (B', H', nqb, nkb), per query block, or per key block when
    ``transposed``; equal to :func:`attnc.plan.build_tile_lists` up to list widths. ``ranges`` (int32
    (B', H', nqb, 2), not transposed): each query block's key blocks [first, last) outside which its
    tiles are empty; only those columns are read.

    Without a host synchronization (``sync`` False, the default while a list as wide as a row of tiles
    takes at most UNSYNCED_LIST_BYTES) the lists are that wide, and the call's setup is queued behind the
    previous call's kernels. With one (``sync`` True, or larger lists) they are as wide as the longest
    count."""
    # The transposed lists read the table's columns: a transposed copy first, so that every list kernel
    # reads rows of contiguous bytes (reading columns in place, byte-strided, took 80-101 us for hash buckets
    # at 32k where the forward lists take 22 us; RESULTS run 25).
    lists_status = status.transpose(-1, -2) if transposed else status
    status = lists_status.contiguous()
    Bp, Hp, n_rows, n_cols = status.shape
    s_row, s_col = n_cols, 1
    device = status.device
    if sync is None:
        sync = Bp * Hp * n_rows * max(n_cols, 1) * 4 > UNSYNCED_LIST_BYTES
    ranged = ranges is not None and not transposed
    full_run = torch.empty(Bp, Hp, n_rows, 2, dtype=torch.int32, device=device)
    full_cnt = torch.empty(Bp, Hp, n_rows, dtype=torch.int32, device=device)
    part_cnt = torch.empty_like(full_cnt)
    group, block_j = LIST_GROUP, _block_j(n_cols, LIST_BLOCK_J)
    grid = (Bp * Hp, triton.cdiv(n_rows, group))
    width_full = width_part = max(n_cols, 1)
    stats = torch.zeros(3, dtype=torch.int32, device=device)     # widths; the longest rest (set by FILL)
    if sync:
        if status.numel():
            launch_kernel(_tile_lists_kernel, grid, status, n_rows * n_cols, s_row, s_col, n_rows, n_cols,
                          full_run, full_cnt, part_cnt, stats, full_cnt, part_cnt, 1, 1, ranges if ranged else stats,
                          GROUP=group, BLOCK_J=block_j, FILL=False, RANGED=ranged, num_warps=LIST_WARPS)
        global HOST_SYNCS
        HOST_SYNCS += 1
        width_full, width_part = (max(w, 1) for w in stats[:2].tolist())       # the host synchronization
    full_idx = torch.empty(Bp, Hp, n_rows, width_full, dtype=torch.int32, device=device)
    part_idx = torch.empty(Bp, Hp, n_rows, width_part, dtype=torch.int32, device=device)
    if status.numel():
        launch_kernel(_tile_lists_kernel, grid, status, n_rows * n_cols, s_row, s_col, n_rows, n_cols, full_run,
                      full_cnt, part_cnt, stats, full_idx, part_idx, width_full, width_part,
                      ranges if ranged else stats, GROUP=group, BLOCK_J=block_j, FILL=True, RANGED=ranged,
                      num_warps=LIST_WARPS)
    else:                   # no tiles (no rows, or no columns: every count is 0)
        full_run.zero_()
        full_cnt.zero_()
        part_cnt.zero_()
    return TileLists(full_run, full_idx, full_cnt, part_idx, part_cnt, lists_status, stats[2:])


COPY_ROWS = 32       # rows per program of the sorted-copy kernel


@triton.jit
def _copy_rows_kernel(x_ptr, out_ptr, perm_ptr, need_ptr, heads, n_src, rows, block,
                      s_xb, s_xh, s_xn, s_ob, s_oh, s_on, s_pb, s_ph, s_nb, s_nh,
                      ROWS: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr, NEED: tl.constexpr):
    # One program per (batch x head, ROWS sorted rows): out[b, h, i] = x[b, h, perm[b, h, i]]. NEED: only
    # rows of key blocks (``block`` rows each) that some tile of the plan reads; the other rows are left as
    # they are (never read).
    bh = tl.program_id(0)
    b = bh // heads
    h = bh % heads
    i = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    if NEED:
        if tl.load(need_ptr + b.to(tl.int64) * s_nb + h * s_nh + tl.program_id(1) * ROWS // block) == 0:
            return
    ok = i < rows
    src = tl.load(perm_ptr + b.to(tl.int64) * s_pb + h * s_ph + i, mask=ok, other=0)
    src = tl.minimum(src, n_src - 1)            # padding rows (position n) copy the last row
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    tile = tl.load(x_ptr + b.to(tl.int64) * s_xb + h.to(tl.int64) * s_xh + src[:, None].to(tl.int64) * s_xn
                   + d[None, :], mask=ok[:, None] & d_ok[None, :])
    tl.store(out_ptr + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + i[:, None].to(tl.int64) * s_on + d[None, :],
             tile, mask=ok[:, None] & d_ok[None, :])


def copy_rows(x: torch.Tensor, perm: torch.Tensor, need: torch.Tensor | None = None, block: int = 1) -> torch.Tensor:
    """x (B, H, N, D), last dimension contiguous, with each (b, h)'s rows in the order ``perm`` (B or 1,
    H or 1, rows): a (B, H, rows, D) copy, one pass over the rows read. ``need`` (B or 1, H or 1,
    ceil(rows / block)), if given, says which blocks of ``block`` sorted rows are read later; the rows of
    the others are not copied and hold whatever the new tensor held (NaN under the interpreter, so that a
    test reading one fails). ``block`` must be a multiple of COPY_ROWS when ``need`` is given."""
    B, H, n_src, D = x.shape
    rows = perm.shape[-1]
    if need is not None:
        assert block % COPY_ROWS == 0, block
    if x.device.type == "cuda":
        out = torch.empty(B, H, rows, D, dtype=x.dtype, device=x.device)
    else:
        out = torch.full((B, H, rows, D), float("nan"), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    perm = perm.expand(B, H, rows)
    need_v = need.expand(B, H, need.shape[-1]) if need is not None else perm
    grid = (B * H, triton.cdiv(rows, COPY_ROWS))
    launch_kernel(_copy_rows_kernel, grid, x, out, perm, need_v, H, n_src, rows, max(block, 1),
                  x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
                  perm.stride(0), perm.stride(1), need_v.stride(0), need_v.stride(1),
                  ROWS=COPY_ROWS, BLOCK_D=triton.next_power_of_2(D), D=D, NEED=need is not None, num_warps=4)
    return out


ROWS = 1024          # rows per program of the sort-key kernels
CHUNK = 512          # rows per program of a radix pass (the GPU's: 512 sorted 16 x 32k bucket keys in 28 us,
                     # 1024 in 34, NOTES item 63; Triton's interpreter sorts 64 at a time,
CHUNK_INTERPRETED = 64   # its tl.sort of 512 rows takes seconds)
SORT_WARPS = 4       # warps per program of the radix scatter
RADIX = 256          # one byte of the key per pass
MIN_PROGRAMS = 256   # programs per radix pass below which the chunks shrink


@triton.jit
def _radix_pass_needed(max_ptr, shift, HAS_MAX: tl.constexpr):
    # A pass past the first sorts nothing when every key is below 2**shift (all its digits are 0): with
    # the keys' maximum on the device (the sort-key kernels fold it in), its kernels skip their work.
    if HAS_MAX:
        return (shift == 0) | ((tl.load(max_ptr) >> shift) != 0)
    else:
        return True


@triton.jit
def _radix_histogram_kernel(keys_ptr, perm_ptr, hist_ptr, max_ptr, n, n_chunks, shift,
                            CHUNK: tl.constexpr, RADIX: tl.constexpr, PERMUTED: tl.constexpr,
                            HAS_MAX: tl.constexpr):
    # One program per (batch, head, CHUNK rows in the current order): how many of them hold each digit.
    if not _radix_pass_needed(max_ptr, shift, HAS_MAX):
        return
    bh = tl.program_id(0)
    c = tl.program_id(1)
    rows = c * CHUNK + tl.arange(0, CHUNK)
    ok = rows < n
    base = bh.to(tl.int64) * n
    src = tl.load(perm_ptr + base + rows, mask=ok, other=0) if PERMUTED else rows
    digit = (tl.load(keys_ptr + base + src, mask=ok, other=0) >> shift) & (RADIX - 1)
    hist = tl.histogram(tl.where(ok, digit, 0), RADIX)
    # Rows past the end were counted as digit 0: take them back.
    bins = tl.arange(0, RADIX)
    hist -= tl.where(bins == 0, CHUNK - tl.sum(ok.to(tl.int32), 0), 0)
    tl.store(hist_ptr + (bh.to(tl.int64) * n_chunks + c) * RADIX + bins, hist)


@triton.jit
def _radix_offsets_kernel(hist_ptr, base_ptr, max_ptr, n_chunks, shift, block, rows, RADIX: tl.constexpr,
                          CHUNKS: tl.constexpr, HAS_MAX: tl.constexpr, PAD: tl.constexpr):
    # One program per (batch, head): where each chunk's first row of each digit goes, minus the number
    # of that chunk's rows with a smaller digit (the scatter adds a row's place in its sorted chunk).
    # CHUNKS chunks' histograms at a time, as a (CHUNKS, RADIX) tile. PAD: when this pass is the last one
    # (every key below RADIX, so a digit is a key), each digit's rows start on a multiple of `block`, if the
    # padded runs fit in `rows` (bucket padding, attnc.plan.pad_sorted).
    if not _radix_pass_needed(max_ptr, shift, HAS_MAX):
        return
    bh = tl.program_id(0)
    bins = tl.arange(0, RADIX)[None, :]
    chunks = tl.arange(0, CHUNKS)[:, None]
    row = hist_ptr + bh.to(tl.int64) * n_chunks * RADIX
    total = tl.zeros([RADIX], dtype=tl.int32)
    for c0 in range(0, n_chunks, CHUNKS):
        ok = c0 + chunks < n_chunks
        total += tl.sum(tl.load(row + (c0 + chunks) * RADIX + bins, mask=ok, other=0), 0)
    before = tl.cumsum(total, 0) - total          # rows of smaller digits, all chunks
    if PAD:
        padded = (total + block - 1) // block * block
        if (tl.load(max_ptr) < RADIX) & (tl.sum(padded, 0) <= rows):
            before = tl.cumsum(padded, 0) - padded
    for c0 in range(0, n_chunks, CHUNKS):
        ok = c0 + chunks < n_chunks
        h = tl.load(row + (c0 + chunks) * RADIX + bins, mask=ok, other=0)
        earlier = tl.cumsum(h, 0) - h             # rows of the same digit in earlier chunks of this tile
        smaller_here = tl.cumsum(h, 1) - h        # each chunk's rows of smaller digits
        tl.store(base_ptr + bh.to(tl.int64) * n_chunks * RADIX + (c0 + chunks) * RADIX + bins,
                 before[None, :] + earlier - smaller_here, mask=ok)
        before += tl.sum(h, 0)


@triton.jit
def _radix_scatter_kernel(keys_ptr, perm_ptr, base_ptr, out_ptr, tmp_ptr, max_ptr, n, n_chunks, shift, out_stride,
                          CHUNK: tl.constexpr, RADIX: tl.constexpr, PERMUTED: tl.constexpr, HAS_MAX: tl.constexpr,
                          PAD: tl.constexpr):
    # One program per (batch, head, chunk): sort the chunk by (digit, row) in registers, so rows of one
    # digit keep their order (the pass is stable), and write each row's original position to its place
    # (rows of out_stride). A pass that sorts nothing copies the order it got, except in a padded sort
    # (PAD 1: its first pass, PAD 2: its second), which writes its result in place: the first pass writes
    # out when it is the last (every key below RADIX; its offsets are then padded), else tmp (n per row),
    # which the second pass reads.
    bh = tl.program_id(0)
    c = tl.program_id(1)
    local = tl.arange(0, CHUNK)
    rows = c * CHUNK + local
    ok = rows < n
    base = bh.to(tl.int64) * n
    out = out_ptr + bh.to(tl.int64) * out_stride
    if not _radix_pass_needed(max_ptr, shift, HAS_MAX):
        if PAD == 0:
            src = tl.load(perm_ptr + base + rows, mask=ok, other=0) if PERMUTED else rows
            tl.store(out + rows, src.to(tl.int64), mask=ok)
        return
    src = tl.load(perm_ptr + base + rows, mask=ok, other=0) if PERMUTED else rows
    digit = (tl.load(keys_ptr + base + src, mask=ok, other=0) >> shift) & (RADIX - 1)
    ordered = tl.sort(tl.where(ok, digit, RADIX) * CHUNK + local)    # rows past the end sort last
    d = ordered // CHUNK
    live = d < RADIX
    dest = tl.load(base_ptr + (bh.to(tl.int64) * n_chunks + c) * RADIX + d, mask=live, other=0) + local
    moved = c * CHUNK + ordered % CHUNK
    if PERMUTED:
        moved = tl.load(perm_ptr + base + moved, mask=live, other=0)
    if PAD == 1:
        key_max = tl.load(max_ptr) + tl.zeros_like(d)
        tl.store(out + dest, moved.to(tl.int64), mask=live & (key_max < RADIX))
        tl.store(tmp_ptr + base + dest, moved.to(tl.int64), mask=live & (key_max >= RADIX))
    else:
        tl.store(out + dest, moved.to(tl.int64), mask=live)


def radix_sort_perm(keys: torch.Tensor, bits: int, perm: torch.Tensor | None = None,
                    chunk: int | None = None, kernels: bool | None = None,
                    key_max: torch.Tensor | None = None, pad: tuple[int, int] | None = None):
    """The stable permutation (int64, keys' shape) that orders the last dimension of ``keys`` (int32,
    values in [0, 2**bits)), applied after ``perm`` (rows already in that order; keys stay in original
    order). Least significant digit first, a byte per pass, three launches per pass and no host
    synchronization: a histogram per chunk of rows, the offsets per (row of keys, digit, chunk), and a
    scatter that sorts each chunk in registers. Faster than ``torch.sort`` on (B', H') rows of up to a
    few hundred thousand keys, whose segmented sort runs a pass per key byte with more launches.

    ``kernels``: run the Triton passes (default: on CUDA). Off the GPU, Triton's interpreter takes
    ~0.1 s per chunk to sort in registers, so CPU tensors take ``torch.sort`` (the same permutation);
    the tests run the kernels there on purpose (``kernels=True``).

    ``key_max`` (int32 [1] on the device, at least the largest key): passes past the first whose digits
    are all 0 skip their work (a bucket sort of ids below 256 costs one pass, not two).

    ``pad`` = (block, rows), with ``key_max`` and at most 16 bits (a bucket side, attnc.plan.padded_sides):
    the permutation is (..., rows), padding rows holding n, and when every key is below 256 each run of
    equal keys starts on a multiple of ``block`` (:func:`attnc.plan.pad_sorted`, done by the one pass's
    offsets); larger keys take the second pass and stay in sorted order, the padding after them."""
    if pad is not None and (key_max is None or bits > 16):
        raise ValueError("padding needs the keys' maximum and at most two passes")
    if not (keys.is_cuda if kernels is None else kernels):
        if perm is None:
            order = torch.sort(keys, dim=-1, stable=True).indices
        else:
            order = torch.gather(perm, -1, torch.sort(torch.gather(keys, -1, perm), dim=-1, stable=True).indices)
        if pad is not None:
            block, rows = pad
            order = pad_sorted(order, keys, block, rows, pad_runs=int(key_max.max()) < RADIX)
        return order
    n = keys.shape[-1]
    rows_bh = keys.numel() // max(n, 1)
    block, rows = pad or (1, n)
    if n == 0 or rows_bh == 0:
        return torch.full(keys.shape[:-1] + (rows,), n, dtype=torch.int64, device=keys.device)
    keys = keys.contiguous()
    if chunk is None and keys.is_cuda:
        # Chunks of CHUNK rows, or smaller when that leaves the GPU with few programs (one row of keys,
        # e.g. documents shared by every head): smaller sorts, more of them. ATTNC_RADIX_CHUNK sets the
        # size for experiments (a setup captured as a CUDA graph keeps the size it was captured with).
        chunk = _chunk_setting() or next((c for c in (CHUNK, CHUNK // 2)
                                          if rows_bh * triton.cdiv(n, c) >= MIN_PROGRAMS), CHUNK // 2)
    chunk = chunk or CHUNK_INTERPRETED
    n_chunks = triton.cdiv(n, chunk)
    hist = torch.empty(rows_bh, n_chunks, RADIX, dtype=torch.int32, device=keys.device)
    base = torch.empty_like(hist)
    grid = (rows_bh, n_chunks)
    top = key_max if key_max is not None else hist
    if pad is not None:
        # The first pass writes the result when it is the last, else tmp, which the second pass reads.
        result = torch.full(keys.shape[:-1] + (rows,), n, dtype=torch.int64, device=keys.device)
        tmp = torch.empty(keys.shape, dtype=torch.int64, device=keys.device)
    for shift in range(0, bits, 8):
        pad_pass = 0 if pad is None else 1 if shift == 0 else 2        # the scatter kernel's PAD
        out = result if pad is not None else torch.empty(keys.shape, dtype=torch.int64, device=keys.device)
        src = perm if perm is not None else out
        launch_kernel(_radix_histogram_kernel, grid, keys, src, hist, top, n, n_chunks, shift, CHUNK=chunk,
                      RADIX=RADIX, PERMUTED=perm is not None, HAS_MAX=key_max is not None)
        launch_kernel(_radix_offsets_kernel, (rows_bh,), hist, base, top, n_chunks, shift, block, rows, RADIX=RADIX,
                      CHUNKS=min(32, triton.next_power_of_2(n_chunks)),
                      HAS_MAX=key_max is not None, PAD=pad_pass == 1)
        launch_kernel(_radix_scatter_kernel, grid, keys, src, base, out, tmp if pad_pass == 1 else out, top, n,
                      n_chunks, shift, out.shape[-1], CHUNK=chunk, RADIX=RADIX, PERMUTED=perm is not None,
                      HAS_MAX=key_max is not None, PAD=pad_pass, num_warps=SORT_WARPS)
        perm = tmp if pad is not None else out
    return result if pad is not None else perm


def _chunk_setting() -> int | None:
    """ATTNC_RADIX_CHUNK: rows per radix-pass program, a power of two from 16 to 4096 (None: unset)."""
    text = os.environ.get("ATTNC_RADIX_CHUNK", "")
    if not text:
        return None
    value = int(text) if text.isdigit() else 0
    if not 16 <= value <= 4096 or value & (value - 1):
        raise ValueError(f"ATTNC_RADIX_CHUNK must be a power of two from 16 to 4096, not {text!r}")
    return value


def key_bits(key) -> int:
    """Bits of a sort key as the sort-key kernels write it: a keep flag one, a residue mod d
    ceil(log2 d), a bucket 16 (ids clamped to [-1, 65534], then + 1; see :func:`attnc.plan.sort_positions`)."""
    if key.kind == "keep":
        return 1
    if key.kind == "residue":
        return max(1, min(16, (key.modulus - 1).bit_length()))
    return 16


def _sort_keys(module, side: str, keys: tuple, *, shape: tuple, dims: tuple, input_args: list, device,
               key_max: torch.Tensor, pad_block: int = 0):
    """The permutation (B', H', n) int64 that orders one side's rows by ``keys`` (stable, least
    significant key first), or None when nothing sorts this side. ``pad_block``: the side has one bucket
    key, whose runs start on multiples of it (``pad`` of :func:`radix_sort_perm`; the permutation is then
    (B', H', padded_rows(n, pad_block))). ``key_max``: int32, one element per key, initially at most 1;
    the sort-key kernels fold each key's maximum into it, so radix passes over zero digits skip their work.
    Nothing here reads the data on the host, so the whole setup up to the tile lists is queued without a
    synchronization."""
    Bp, Hp, n = shape + dims[:1]
    if keys and n == 0:
        return torch.empty(Bp, Hp, padded_rows(n, pad_block) if pad_block else 0, dtype=torch.int64, device=device)
    if len(keys) == 1 and keys[0].kind == "residue" and n % keys[0].modulus == 0:
        # Residue classes of equal size: class c holds c, c + d, c + 2d, ... (a transpose, no sort).
        d = keys[0].modulus
        perm = torch.arange(n, device=device).view(n // d, d).t().reshape(1, 1, n)
        return perm.expand(Bp, Hp, n).contiguous()
    grid = (Bp * Hp, triton.cdiv(n, ROWS))
    perm = None
    for i in reversed(range(len(keys))):
        values = torch.empty(Bp, Hp, n, dtype=torch.int32, device=device)
        launch_kernel(getattr(module, f"attnc_sort_key_{side}{i}"), grid, values, key_max[i:i + 1], *dims,
                      *input_args, BLOCK=ROWS)
        pad = (pad_block, padded_rows(n, pad_block)) if pad_block else None     # one bucket key
        perm = radix_sort_perm(values, key_bits(keys[i]), perm, key_max=key_max[i:i + 1], pad=pad)
    return perm


def summarize_side(module, code, side: str, perm, *, shape: tuple, dims: tuple, block: int, input_args: list,
                   flag: torch.Tensor, pure: torch.Tensor, padded: bool = False):
    """Summarize one side's blocks for the classifier: (pos32, summary, count). summary (2 * slots, B', H',
    blocks) int64 holds the min / max per block of :func:`attnc.codegen.summary_slots`; pos32 is perm's int32
    copy (None when the rows are in order). ``flag`` (int32, one element) is cleared when a position moved;
    ``pure`` (the same) when a block holds two bucket ids (patterns with attnc.codegen.pure_bucket_mask).
    ``padded``: perm holds padding rows (position n), left out of the summaries; count (B', H', blocks)
    int32 is then each block's number of real rows (else None)."""
    Bp, Hp, n = shape + dims[:1]
    rows = perm.shape[-1] if perm is not None else n
    n_blocks = triton.cdiv(rows, block)
    slots = 1 + (1 if code.modulus else 0) + sum(1 for r in code.reads if r.side == side)
    count = torch.empty(Bp, Hp, n_blocks, dtype=torch.int32, device=flag.device) if padded else None
    if (perm is None and slots == 1) or n_blocks == 0 or Bp * Hp == 0:
        # Rows in order and nothing read (the classifier computes the positions from block indices), or
        # no rows: nothing to summarize.
        pos32 = torch.empty(Bp, Hp, rows, dtype=torch.int32, device=flag.device) if perm is not None else None
        return pos32, torch.empty(2 * slots, 1, 1, 1, dtype=torch.int64, device=flag.device), count
    summary = torch.empty(2 * slots, Bp, Hp, n_blocks, dtype=torch.int64, device=flag.device)
    pos32 = torch.empty(Bp, Hp, rows, dtype=torch.int32, device=flag.device) if perm is not None else None
    block_p = triton.next_power_of_2(block)
    group = max(1, 1024 // block_p)
    launch_kernel(getattr(module, f"attnc_summarize_{side}"), (Bp * Hp, triton.cdiv(n_blocks, group)),
        summary, perm if perm is not None else summary, pos32 if pos32 is not None else summary, flag, pure,
        count if padded else flag, rows, n, Hp, n_blocks, *dims[2:], *input_args, BLOCK=block, BLOCK_P=block_p,
        GROUP=group, PERMUTED=perm is not None, PADDED=padded)
    return pos32, summary, count


def classify(module, code, *, shape: tuple, n_q: int, n_k: int, block_m: int, block_n: int, sizes: dict,
             q_summary: torch.Tensor, k_summary: torch.Tensor, q_sorted: bool, k_sorted: bool,
             rows: tuple | None = None, counts: tuple = (None, None), tiles: dict | None = None) -> tuple:
    """(status, ranges): int8 tile classes (B', H', nqb, nkb) from the pattern's generated classifier
    ``module`` (its :class:`attnc.codegen.ClassifierCode` is ``code``) over the block summaries of
    :func:`summarize_side`; and, when keys are sorted by a bucket id the mask equates with the queries'
    (``code.bucket``), int32 (B', H', nqb, 2): each query block's key blocks [first, last) outside which
    every tile is empty (the classifier evaluates only those), else None.
    ``rows``: (query, key) rows in sorted order when a side is padded (default n_q, n_k); ``counts``: the
    padded sides' real rows per block; ``tiles``: the dense-mask reads' (side 'qk') per-tile min / max by read
    index (:func:`tile_summaries`)."""
    Bp, Hp = shape
    rows_q, rows_k = rows or (n_q, n_k)
    nqb, nkb = triton.cdiv(rows_q, block_m), triton.cdiv(rows_k, block_n)
    status = torch.empty(Bp, Hp, nqb, nkb, dtype=torch.int8, device=q_summary.device)
    search = code.bucket is not None and k_sorted
    ranges = torch.empty(Bp, Hp, nqb, 2, dtype=torch.int32, device=q_summary.device) if search else None
    if status.numel() == 0:
        if ranges is not None:
            ranges.zero_()
        return status, ranges
    args = [q_summary[0], q_summary[1], k_summary[0], k_summary[1]]
    if code.modulus:
        args += [q_summary[2], q_summary[3], k_summary[2], k_summary[3]]
    slot = {"q": 2 if code.modulus else 1, "k": 2 if code.modulus else 1}
    for r in code.reads:
        if r.side == "qk":
            args += list(tiles[r.index])
            continue
        summary = q_summary if r.side == "q" else k_summary
        args += [summary[2 * slot[r.side]], summary[2 * slot[r.side] + 1]]
        slot[r.side] += 1
    q_count, k_count = counts
    group = CLASSIFY_GROUP
    launch_kernel(module.attnc_classify, (Bp * Hp, triton.cdiv(nqb, group)),
        status, *args, q_count if q_count is not None else status, k_count if k_count is not None else status,
        ranges if search else status, n_q, n_k, sizes["batch"], sizes["heads"], Hp, nqb, nkb, BLOCK_M=block_m,
        BLOCK_N=block_n, GROUP_M=group, BLOCK_J=_block_j(nkb, CLASSIFY_BLOCK_J), Q_SORTED=q_sorted, K_SORTED=k_sorted,
        Q_PADDED=q_count is not None, K_PADDED=k_count is not None, K_SEARCH=search, num_warps=CLASSIFY_WARPS)
    return status, ranges


def tile_summaries(code, *, shape: tuple, n_q: int, n_k: int, block_m: int, block_n: int, sizes: dict,
                   inputs: dict, device) -> dict:
    """Per dense-mask read of the classifier (side 'qk', e.g. ``m[b, q, k]``): its min / max over every tile,
    int64 (B', H', nqb, nkb) contiguous, by read index. Torch reductions of the input on its device, without
    a copy of it or a host synchronization (so a setup graph can hold them)."""
    from .evaluate import evaluate
    from .plan import tile_axes, tile_read_summary
    reads = [r for r in code.reads if r.side == "qk"]
    if not reads:
        return {}
    Bp, Hp = shape
    nqb, nkb = triton.cdiv(n_q, block_m), triton.cdiv(n_k, block_n)
    env = {**sizes, **inputs, "b": torch.arange(Bp, device=device).view(Bp, 1, 1, 1),
           "h": torch.arange(Hp, device=device).view(1, Hp, 1, 1)}
    cache, out = {}, {}
    for r in reads:
        axes = tile_axes(r.node)
        values = [0 if i in axes else evaluate([a], env)[0] for i, a in enumerate(r.node.args)]
        lo, hi = tile_read_summary(inputs[r.node.attr], r.node, values, block_m, n_q, block_n, n_k, cache)
        out[r.index] = tuple(x.expand(Bp, Hp, nqb, nkb).contiguous() for x in (lo, hi))
    return out


def plan_tiles(module, pir, transform, *, shape: tuple, batch: int, heads: int, n_q: int, n_k: int, block_m: int,
               block_n: int, sizes: dict, inputs: dict, device):
    """The whole device setup of a call up to the tile classes: sorts (``transform``, None for list-mode
    patterns), bucket padding (attnc.plan.padded_sides), block summaries, classification. Returns (tiles,
    q_perm, k_perm, q_pos32, k_pos32, in_place, pure): tiles a PlannedTiles on the device (the classes and each
    query block's key-block range, see :func:`classify`); perms None where a side is not sorted; in_place
    (int32 [1]) 1 while no position of either side moved (not set for padded sides); pure (int32 [1]) 1 while
    every block holds one bucket id (meaningful for patterns with attnc.codegen.pure_bucket_mask only)."""
    from .codegen import classifier_code, mirrored_summaries
    from .launch import input_launch_args
    code = classifier_code(pir)
    sizes = {**sizes, "batch": batch, "heads": heads, "n_q": n_q, "n_k": n_k}
    input_args = input_launch_args(pir, inputs)
    keys = {"q": transform.query_keys if transform else (), "k": transform.key_keys if transform else ()}
    # One allocation: the "in place" flag (cleared by either side's summaries when a position moved), the
    # "one bucket id per block" flag (cleared by them when a block holds two), then each sort key's maximum
    # (folded in by the sort-key kernels; starting at 1 is harmless).
    state = torch.ones(2 + len(keys["q"]) + len(keys["k"]), dtype=torch.int32, device=device)
    in_place, pure = state[:1], state[1:2]
    key_max = {"q": state[2:2 + len(keys["q"])], "k": state[2 + len(keys["q"]):]}
    n = {"q": n_q, "k": n_k}
    pad = dict(zip("qk", padded_sides(transform)))
    block = {"q": block_m, "k": block_n}
    dims = {side: (n[side], shape[1], n_q, n_k, batch, heads) for side in "qk"}
    # Keys already in order (documents one after another) are sorted like any others: the stable sort
    # gives the identity, which the summaries flag on the device (Layout.in_place picks the plain kernels).
    perm = {side: None for side in "qk"}
    mirrored = n_q == n_k and transform is not None and mirrored_keys(transform)
    for side in "qk":
        if side == "k" and mirrored:
            perm["k"] = perm["q"]        # the same keys on both sides (documents): one sort orders both
            continue
        perm[side] = _sort_keys(module, side, keys[side], shape=shape, dims=dims[side], input_args=input_args,
                                device=device, key_max=key_max[side], pad_block=block[side] if pad[side] else 0)
    q_pos, q_summary, q_count = summarize_side(module, code, "q", perm["q"], shape=shape, dims=dims["q"],
                                               block=block_m, input_args=input_args, flag=in_place,
                                               pure=pure, padded=pad["q"])
    if mirrored and block_m == block_n and not pad["k"] and mirrored_summaries(code):
        # The same order, blocks and reads on both sides (documents): the key blocks' summaries are the
        # query blocks'.
        k_pos, k_summary, k_count = q_pos, q_summary, q_count
    else:
        k_pos, k_summary, k_count = summarize_side(module, code, "k", perm["k"], shape=shape, dims=dims["k"],
                                                   block=block_n, input_args=input_args, flag=in_place,
                                                   pure=pure, padded=pad["k"])
    q_perm, k_perm = perm["q"], perm["k"]
    rows = tuple(p.shape[-1] if p is not None else n[side] for side, p in zip("qk", (q_perm, k_perm)))
    tiles = tile_summaries(code, shape=shape, n_q=n_q, n_k=n_k, block_m=block_m, block_n=block_n, sizes=sizes,
                           inputs=inputs, device=device)
    status, ranges = classify(module, code, shape=shape, n_q=n_q, n_k=n_k, block_m=block_m, block_n=block_n,
                              sizes=sizes, q_summary=q_summary, k_summary=k_summary, q_sorted=q_perm is not None,
                              k_sorted=k_perm is not None, rows=rows, counts=(q_count, k_count), tiles=tiles)
    return PlannedTiles(status, on_device=True, ranges=ranges), q_perm, k_perm, q_pos, k_pos, in_place, pure
