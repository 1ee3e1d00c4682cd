"""Layout transforms at run time: sort rows so dynamic sparsity becomes dense tiles, and undo it.

A :class:`Layout` holds, per (batch, query head), the permutation of queries and of keys chosen by
:func:`attnc.plan.layout_transform` (hash bucket, kept-first, residue class, then position), the
original positions the kernels use to evaluate the mask, and the tile lists of the sorted problem.
Outputs and gradients are scattered back to the caller's order. When a permutation turns out to be
the identity (documents already contiguous, nothing dropped) no data is copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import LayoutTransform, PermutedTileClassifier, TileLists, build_tile_lists, sort_positions


@dataclass
class Layout:
    transform: LayoutTransform
    q_perm: torch.Tensor          # int64 (B, Hq, Nq): sorted index -> original query position
    k_perm: torch.Tensor          # int64 (B, Hq, Nk): per query head
    qpos: torch.Tensor            # int32 contiguous copies for the kernels
    kpos: torch.Tensor
    q_identity: bool
    k_identity: bool
    expand_kv: bool               # keys sorted per query head: K, V are expanded to the query heads
    status: torch.Tensor          # int8 (B, Hq, nqb, nkb) tile classes of the sorted problem
    _lists: dict

    def lists(self, transposed: bool) -> TileLists:
        if transposed not in self._lists:
            status = self.status.transpose(-1, -2).contiguous() if transposed else self.status
            self._lists[transposed] = build_tile_lists(status)
        return self._lists[transposed]

    # ---- moving data in and out of the sorted order ----------------------------------------------
    def sort_q(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Hq, Nq[, D]) in the caller's order -> sorted order."""
        if self.q_identity:
            return x
        idx = self.q_perm if x.dim() == 3 else self.q_perm.unsqueeze(-1).expand(*self.q_perm.shape, x.shape[-1])
        return torch.gather(x, 2, idx)

    def unsort_q(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_identity:
            return x
        idx = self.q_perm if x.dim() == 3 else self.q_perm.unsqueeze(-1).expand(*self.q_perm.shape, x.shape[-1])
        return torch.empty_like(x).scatter_(2, idx, x)

    def kv_heads(self, heads_q: int, heads_kv: int) -> int:
        return heads_q if self.expand_kv else heads_kv

    def _k_index(self, x: torch.Tensor) -> torch.Tensor:
        perm = self.k_perm if self.expand_kv else self.k_perm[:, :: self.k_perm.shape[1] // x.shape[1]]
        return perm.unsqueeze(-1).expand(*perm.shape, x.shape[-1])

    def sort_kv(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, Nk, D) -> sorted (B, Hq or Hkv, Nk, D)."""
        if self.expand_kv and x.shape[1] != self.k_perm.shape[1]:
            x = x.repeat_interleave(self.k_perm.shape[1] // x.shape[1], dim=1)
        if self.k_identity:
            return x
        return torch.gather(x, 2, self._k_index(x))

    def unsort_kv(self, x: torch.Tensor, heads_kv: int) -> torch.Tensor:
        """Gradients in sorted order -> caller's order, summed over a GQA group when expanded."""
        if not self.k_identity:
            x = torch.empty_like(x).scatter_(2, self._k_index(x), x)
        if self.expand_kv and x.shape[1] != heads_kv:
            B, H, N, D = x.shape
            x = x.view(B, heads_kv, H // heads_kv, N, D).sum(2)
        return x


def build_layout(pir, transform: LayoutTransform, B: int, Hq: int, Hkv: int, n_q: int, n_k: int,
                 block_m: int, block_n: int, sizes: dict, inputs: dict, device) -> Layout:
    """Sort, find the original positions, classify the tiles of the sorted problem (all on device)."""
    env = {name: value for name, value in sizes.items()}
    env.update(inputs)
    env["b"] = torch.arange(B, device=device).view(B, 1, 1)
    env["h"] = torch.arange(Hq, device=device).view(1, Hq, 1)
    q_perm = sort_positions(transform.query_keys, env, n_q, (B, Hq), device)
    k_perm = sort_positions(transform.key_keys, env, n_k, (B, Hq), device)
    ar_q = torch.arange(n_q, device=device)
    ar_k = torch.arange(n_k, device=device)
    modulus = next((k.modulus for k in transform.query_keys if k.kind == "residue"), 0)
    status = PermutedTileClassifier(pir, q_perm, k_perm, n_q, n_k, B, Hq, block_m, block_n, sizes, inputs,
                                    modulus=modulus).classify()
    expand = transform.per_head_keys and Hq != Hkv
    if not expand and Hq != Hkv:
        # Keys sorted the same way for every head of a group (their key does not read h).
        group = Hq // Hkv
        same = torch.equal(k_perm.view(B, Hkv, group, n_k), k_perm[:, ::group].unsqueeze(2).expand(B, Hkv, group, n_k))
        expand = not same
    return Layout(transform, q_perm, k_perm, q_perm.to(torch.int32).contiguous(),
                  k_perm.to(torch.int32).contiguous(), bool(torch.equal(q_perm, ar_q.expand_as(q_perm))),
                  bool(torch.equal(k_perm, ar_k.expand_as(k_perm))), expand, status, {})
