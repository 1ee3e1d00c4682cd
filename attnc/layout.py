"""Layout transforms at run time: sort rows so dynamic sparsity becomes dense tiles, and undo it.

A :class:`Layout` holds, per (batch, query head), the permutation of queries and of keys chosen by
:func:`attnc.plan.layout_transform` (hash bucket, kept-first, residue class, then position), the
original positions the kernels use to evaluate the mask, and the tile lists of the sorted problem.
The kernels read and write rows through those positions, so q, k, v, outputs and gradients stay in
the caller's order and no data is copied (except K/V per query head when keys are sorted per head
under GQA).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .plan import (LayoutTransform, PermutedTileClassifier, PlannedTiles, TileLists, fill_padding, pad_sorted,
                   padded_rows, padded_sides, padded_status, real_rows_per_block, setup_shape, sort_key_values,
                   sort_positions)


@dataclass
class Layout:
    transform: LayoutTransform
    q_perm: torch.Tensor          # int64 (B', H', Nq'): sorted index -> original query position
    k_perm: torch.Tensor          # int64 (B', H', Nk'); B', H' are 1 where the mask ignores b, h
    # Nq' = Nq and Nk' = Nk unless a side's buckets are padded to whole blocks (attnc.plan.padded_rows):
    # then its padding rows hold position Nq (Nk), and the kernels run over Nq' (Nk') sorted rows.
    batch: int
    heads: int                    # query heads
    expand_kv: bool               # keys sorted per head under GQA: K, V are expanded to the query heads
    q_identity: bool              # queries were not moved (only keys sorted, e.g. key compaction)
    k_identity: bool              # keys were not moved (e.g. query compaction)
    tiles: PlannedTiles           # tile classes (B', H', nqb, nkb) of the sorted problem and their lists
    q_pos32: torch.Tensor | None = None     # int32 copies of the perms, when the setup made them
    k_pos32: torch.Tensor | None = None
    # Device setup of a transform whose rows may already be in order (bucket keys: documents one after
    # another): int32 [1], 1 when no row of either side moved. The host never reads it; the kernels'
    # two variants are launched, each guarded by it (attnc.launch). None: identity is known on the host.
    in_place: torch.Tensor | None = None
    # Patterns whose mask has a bucket conjunct (attnc.codegen.pure_bucket_mask): int32 [1] on the device, 1
    # when every sorted block holds one bucket id, so the permuted kernels may leave the bucket test out of
    # partial tiles (they read the flag; the host never does). None: the kernels always test it.
    pure: torch.Tensor | None = None

    # The kernels index positions per (batch, query head), as int32: made on first use (a layout whose
    # positions stayed in place runs the plain list kernels and never needs them).
    @functools.cached_property
    def qpos(self) -> torch.Tensor:
        pos = self.q_pos32 if self.q_pos32 is not None else self.q_perm.to(torch.int32)
        return pos.expand(self.batch, self.heads, pos.shape[-1]).contiguous()

    @functools.cached_property
    def kpos(self) -> torch.Tensor:
        pos = self.k_pos32 if self.k_pos32 is not None else self.k_perm.to(torch.int32)
        return pos.expand(self.batch, self.heads, pos.shape[-1]).contiguous()

    @property
    def rows_q(self) -> int:
        """Query rows in sorted order (more than Nq when padded): the kernels' query blocks."""
        return self.q_perm.shape[-1]

    @property
    def rows_k(self) -> int:
        return self.k_perm.shape[-1]

    @property
    def identity(self) -> bool:
        """Both permutations are the identity: the plain list kernels apply."""
        return self.q_identity and self.k_identity

    @property
    def status(self) -> torch.Tensor:
        return self.tiles.status

    def lists(self, transposed: bool) -> TileLists:
        return self.tiles.lists(transposed)

    def residue_classes(self, n_q: int, n_k: int, block_m: int, block_n: int) -> int:
        """d when queries and keys are only sorted into residue classes mod d, each class of n / d rows
        and a whole number of blocks: sorted row c * (n / d) + j is then position c + d * j, so the
        kernels compute positions instead of loading them and read a class's rows through one strided
        tensor descriptor (dilation costs nothing). 0 otherwise (positions are gathered)."""
        keys = self.transform.query_keys + self.transform.key_keys
        if self.identity or not keys or any(key.kind != "residue" for key in keys):
            return 0
        d = keys[0].modulus
        return 0 if n_q % (d * block_m) or n_k % (d * block_n) else d

    def sorted_keys(self, x: torch.Tensor, block_n: int | None = None) -> torch.Tensor:
        """K or V (B, H, Nk, D), H its heads as the kernels read them, copied into the keys' sorted order
        (padding rows get a copy of the last row: the kernels mask them by position). With ``block_n``, the
        key-block size of this layout's tiles, only blocks that some tile reads are copied (kept keys: about
        half the rows); the rest of the copy is never read."""
        from .device_setup import copy_rows
        perm = self.k_perm
        group = perm.shape[1] // x.shape[1] if perm.shape[1] not in (1, x.shape[1]) else 1
        perm = perm[:, ::group]                 # heads of a GQA group share one order
        return copy_rows(x, perm, _needed_key_blocks(self, block_n, group), block_n or 1)

    def sorted_queries(self, x: torch.Tensor) -> torch.Tensor:
        """Q or dO (B, Hq, Nq, D) copied into the queries' sorted order (padding rows as in sorted_keys)."""
        from .device_setup import copy_rows
        return copy_rows(x, self.q_perm)

    # ---- the kernels address rows through qpos / kpos, so data stays in the caller's order --------
    def kv_heads(self, heads_q: int, heads_kv: int) -> int:
        return heads_q if self.expand_kv else heads_kv

    def expand_kv_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Keys sorted per query head under GQA: give each query head its own K/V rows."""
        if self.expand_kv and x.shape[1] != self.k_perm.shape[1]:
            return x.repeat_interleave(self.k_perm.shape[1] // x.shape[1], dim=1)
        return x

    def reduce_kv_heads(self, x: torch.Tensor, heads_kv: int) -> torch.Tensor:
        """Gradients of expanded K/V summed back over each GQA group."""
        if self.expand_kv and x.shape[1] != heads_kv:
            B, H, N, D = x.shape
            return x.view(B, heads_kv, H // heads_kv, N, D).sum(2)
        return x


def build_layout(pir, transform: LayoutTransform, B: int, Hq: int, Hkv: int, n_q: int, n_k: int,
                 block_m: int, block_n: int, sizes: dict, inputs: dict, device, classifier=None) -> Layout:
    """Sort, find the original positions, classify the tiles of the sorted problem (all on device).

    ``classifier``: the pattern's generated tile classifier module (see :mod:`attnc.device_setup`),
    which also builds the forward lists, with one host synchronization for everything; None runs the
    torch classifier (CPU, and the tests' oracle)."""
    Bp, Hp = setup_shape(pir, B, Hq)
    if classifier is not None:
        from .device_setup import plan_tiles
        from .codegen import pure_bucket_mask
        tiles, q_perm, k_perm, q_pos, k_pos, moved, pure = plan_tiles(
            classifier, pir, transform, shape=(Bp, Hp), batch=B, heads=Hq, n_q=n_q, n_k=n_k, block_m=block_m,
            block_n=block_n, sizes=sizes, inputs=inputs, device=device)
        # Nothing is read on the host: a sorted side counts as moved, keys sorted per head under GQA are
        # expanded per query head, and the lists are as wide as a row (attnc.device_setup.tile_lists).
        q_sorted, k_sorted = q_perm is not None, k_perm is not None
        q_perm = q_perm if q_sorted else _arange(n_q, Bp, Hp, device)
        k_perm = k_perm if k_sorted else _arange(n_k, Bp, Hp, device)
        expand = Hp > 1 and Hq != Hkv and transform.per_head_keys
        may_be_in_order = ((q_sorted or k_sorted) and not any(padded_sides(transform))
                           and all(key.kind == "bucket" for key in transform.query_keys + transform.key_keys))
        in_place = moved if may_be_in_order and not expand else None
        return Layout(transform, q_perm, k_perm, B, Hq, expand, not q_sorted, not k_sorted, tiles, q_pos, k_pos,
                      in_place, pure if pure_bucket_mask(pir) is not None else None)
    env = {name: value for name, value in sizes.items()}
    env.update(inputs)
    env["b"] = torch.arange(Bp, device=device).view(Bp, 1, 1)
    env["h"] = torch.arange(Hp, device=device).view(1, Hp, 1)
    perms, counts = [], []
    for keys, n, block, pad in zip((transform.query_keys, transform.key_keys), (n_q, n_k), (block_m, block_n),
                                   padded_sides(transform)):
        perm = sort_positions(keys, env, n, (Bp, Hp), device)
        if pad:      # buckets started on block boundaries (attnc.plan.padded_rows)
            values = sort_key_values(keys[0], env, _arange(n, Bp, Hp, device), (Bp, Hp))
            perm = pad_sorted(perm, values, block, padded_rows(n, block))
        perms.append(perm)
        counts.append(real_rows_per_block(perm, n, block) if pad else None)
    q_perm, k_perm = perms
    modulus = next((k.modulus for k in transform.query_keys if k.kind == "residue"), 0)
    status = PermutedTileClassifier(pir, fill_padding(q_perm, n_q), fill_padding(k_perm, n_k), q_perm.shape[-1],
                                    k_perm.shape[-1], B, Hq, block_m, block_n, sizes, inputs,
                                    modulus=modulus).classify()
    if any(c is not None for c in counts):
        status = padded_status(status, *counts, block_n)
    identity = [bool(torch.equal(p, _arange(p.shape[-1], Bp, Hp, device))) for p in (q_perm, k_perm)]
    expand = any(bool(c) for c in _expand_check(k_perm, Bp, Hp, Hq, Hkv))
    return Layout(transform, q_perm, k_perm, B, Hq, expand, identity[0], identity[1], PlannedTiles(status))


def _needed_key_blocks(layout, block_n: int | None, group: int) -> torch.Tensor | None:
    """int8 (B', H' / group, key blocks of ``block_n`` rows): 1 where some query block of ``layout``'s tiles
    reads the key block (``status != 0``), folded over GQA groups of ``group`` query heads; None when
    ``block_n`` is not the layout's key-block size (or not a whole number of copy programs): copy every row.
    Made once per layout, block size and group (K and V, forward and dQ kernel, share it)."""
    from .device_setup import COPY_ROWS
    status = layout.status
    if not block_n or block_n % COPY_ROWS or status.shape[-1] != -(-layout.rows_k // block_n):
        return None
    made = layout.__dict__.setdefault("_needed_key_blocks", {})
    if (block_n, group) not in made:
        need = status.ne(0).any(dim=2)          # (B', H', key blocks): read by some query block
        if group > 1:
            need = need.view(need.shape[0], need.shape[1] // group, group, need.shape[-1]).any(dim=2)
        made[block_n, group] = need.to(torch.int8)
    return made[block_n, group]


def _arange(n: int, Bp: int, Hp: int, device) -> torch.Tensor:
    return torch.arange(n, device=device).expand(Bp, Hp, n)


def _expand_check(k_perm: torch.Tensor, Bp: int, Hp: int, Hq: int, Hkv: int) -> list:
    """Keys sorted per query head under GQA: [whether the heads of some group differ in key order] (then
    each query head needs its own K / V rows); [] when keys are shared by construction."""
    if Hp == 1 or Hq == Hkv:
        return []
    view = k_perm.view(Bp, Hkv, Hq // Hkv, k_perm.shape[-1])
    return [~(view == view[:, :, :1]).all()]
