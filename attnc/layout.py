"""Layout transforms at run time: sort rows so dynamic sparsity becomes dense tiles, and undo it.

A :class:`Layout` holds, per (batch, query head), the permutation of queries and of keys chosen by
:func:`attnc.plan.layout_transform` (hash bucket, kept-first, residue class, then position), the
original positions the kernels use to evaluate the mask, and the tile lists of the sorted problem.
The kernels read and write rows through those positions, so q, k, v, outputs and gradients stay in
the caller's order and no data is copied (except K/V per query head when keys are sorted per head
under GQA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import LayoutTransform, PermutedTileClassifier, PlannedTiles, TileLists, sort_positions


@dataclass
class Layout:
    transform: LayoutTransform
    q_perm: torch.Tensor          # int64 (B, Hq, Nq): sorted index -> original query position
    k_perm: torch.Tensor          # int64 (B, Hq, Nk): per query head
    qpos: torch.Tensor            # int32 contiguous copies for the kernels
    kpos: torch.Tensor
    expand_kv: bool               # keys sorted per query head: K, V are expanded to the query heads
    q_identity: bool              # queries were not moved (only keys sorted, e.g. key compaction)
    k_identity: bool              # keys were not moved (e.g. query compaction)
    tiles: PlannedTiles           # tile classes (B', H', nqb, nkb) of the sorted problem and their lists

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
                 block_m: int, block_n: int, sizes: dict, inputs: dict, device) -> Layout:
    """Sort, find the original positions, classify the tiles of the sorted problem (all on device)."""
    from . import ir
    # Sort and classify once per batch / head only where the mask depends on b / h.
    used = ir.free_vars(pir.mask)
    Bp, Hp = (B if "b" in used else 1), (Hq if "h" in used else 1)
    env = {name: value for name, value in sizes.items()}
    env.update(inputs)
    env["b"] = torch.arange(Bp, device=device).view(Bp, 1, 1)
    env["h"] = torch.arange(Hp, device=device).view(1, Hp, 1)
    q_perm = sort_positions(transform.query_keys, env, n_q, (Bp, Hp), device)
    k_perm = sort_positions(transform.key_keys, env, n_k, (Bp, Hp), device)
    modulus = next((k.modulus for k in transform.query_keys if k.kind == "residue"), 0)
    status = PermutedTileClassifier(pir, q_perm, k_perm, n_q, n_k, B, Hq, block_m, block_n, sizes, inputs,
                                    modulus=modulus).classify()
    q_identity = bool(torch.equal(q_perm, torch.arange(n_q, device=device).expand_as(q_perm)))
    k_identity = bool(torch.equal(k_perm, torch.arange(n_k, device=device).expand_as(k_perm)))
    expand = Hp > 1 and Hq != Hkv
    if expand:
        # Keys sorted per query head: under GQA, each query head needs its own K/V rows unless the
        # heads of a group happen to share one order.
        group = Hq // Hkv
        view = k_perm.view(Bp, Hkv, group, n_k)
        expand = not torch.equal(view, view[:, :, :1].expand_as(view))
    # The kernels index positions per (batch, query head).
    qpos = q_perm.to(torch.int32).expand(B, Hq, n_q).contiguous()
    kpos = k_perm.to(torch.int32).expand(B, Hq, n_k).contiguous()
    return Layout(transform, q_perm, k_perm, qpos, kpos, expand, q_identity, k_identity, PlannedTiles(status))
