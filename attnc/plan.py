"""Stage 4: tile planning without materializing the Nq x Nk mask.

Two kinds of plan:

* **ranges** (patterns without runtime inputs): the mask is put in disjunctive normal form; in each
  disjunct, atoms that bound the key position (``k >= F(q)``, ``k <= G(q)``, also through ``k // c``)
  are solved for ``k``. For a query block ``[q0, q1]`` interval reasoning over ``F`` and ``G`` gives the
  key blocks that may be needed (the *hull*) and those certainly full. These formulas are evaluated
  for a whole plan at once in torch (``kern.plan``) and printed into the kernel as scalar Triton code,
  so the kernel needs no block table at all.
* **lists** (patterns reading runtime inputs): each (query block, key block) tile is classified by the
  same interval rules, with tensor reads summarized per block (min/max of ids, any/all of keep flags),
  and compact per-query-block lists of full and partial key blocks are built on the device: O(N) for
  the summaries plus O(N/Bm * N/Bn) for the classification.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from dataclasses import dataclass, field

import torch

from . import ir
from .analyze import PatternIR
from .evaluate import read_tensor
from .interval import IntervalEvaluator, TorchOps

MAX_DISJUNCTS = 8


# --------------------------------------------------------------------------------------------------
# Disjunctive normal form and key bounds


def disjuncts(formula: ir.Node, limit: int = MAX_DISJUNCTS) -> list[list[ir.Node]] | None:
    """The formula as a list of conjunctions of atoms, or None when that would exceed ``limit``."""
    if formula.op == "or":
        out = []
        for a in formula.args:
            sub = disjuncts(a, limit)
            if sub is None:
                return None
            out.extend(sub)
            if len(out) > limit:
                return None
        return out
    if formula.op == "and":
        out = [[]]
        for a in formula.args:
            sub = disjuncts(a, limit)
            if sub is None:
                return None
            out = [x + y for x in out for y in sub]
            if len(out) > limit:
                return None
        return out
    if formula is ir.TRUE:
        return [[]]
    return [[formula]]


@dataclass
class KeyBounds:
    """One disjunct solved for k: k >= max(lower), k <= min(upper); ``rest`` are atoms not solved."""
    lower: list[ir.Node] = field(default_factory=list)
    upper: list[ir.Node] = field(default_factory=list)
    query_atoms: list[ir.Node] = field(default_factory=list)   # atoms without k (may vary with q)
    rest: list[ir.Node] = field(default_factory=list)          # atoms with k that are not bounds


def _k_free(node: ir.Node) -> bool:
    return "k" not in ir.free_vars(node) and not ir.uses(node, "read") and not ir.uses(node, "score")


def solve_for_k(atom: ir.Node):
    """``('lower'|'upper'|'both', F)`` when the atom is ``k >= F``, ``k <= F`` or ``k == F`` with F free
    of k (also through ``k // c`` for a positive constant c); else None."""
    if atom.op not in ("le", "eq") or atom.args[0].type != "int":
        return None
    terms, _ = ir.linear(atom.args[0])
    rhs = atom.args[1].value
    k = ir.var("k")
    kterms = [t for t in terms if not _k_free(t)]
    if len(kterms) != 1:
        return None
    term = kterms[0]
    coeff = terms[term]
    if abs(coeff) != 1:
        return None
    rest = ir.linear_node({t: v for t, v in terms.items() if t is not term}, 0)
    if ir.uses(rest, "read"):
        return None
    # coeff * X + rest <= rhs   =>   X <= rhs - rest (coeff 1)   or   X >= rest - rhs (coeff -1)
    bound = ir.sub(ir.const(rhs), rest) if coeff == 1 else ir.sub(rest, ir.const(rhs))
    direction = "both" if atom.op == "eq" else ("upper" if coeff == 1 else "lower")
    if term is k:
        return direction, bound, None
    if term.op == "floordiv" and term.args[0] is k and term.args[1].is_const and term.args[1].value > 0:
        return direction, bound, term.args[1].value
    return None


def key_bounds(conj: list[ir.Node]) -> KeyBounds:
    kb = KeyBounds()
    for atom in conj:
        if _k_free(atom):
            kb.query_atoms.append(atom)
            continue
        solved = solve_for_k(atom)
        if solved is None:
            kb.rest.append(atom)
            continue
        direction, bound, div = solved
        # k // c <= G  <=>  k <= c*G + c - 1 ;  k // c >= F  <=>  k >= c*F
        if direction in ("upper", "both"):
            kb.upper.append(bound if div is None else ir.add(ir.mul(ir.const(div), bound), ir.const(div - 1)))
        if direction in ("lower", "both"):
            kb.lower.append(bound if div is None else ir.mul(ir.const(div), bound))
    return kb


@dataclass
class RangeProgram:
    """The symbolic key-range rules of a static pattern: one :class:`KeyBounds` per disjunct."""
    parts: list[KeyBounds]
    exact_dnf: bool


def range_program(mask: ir.Node) -> RangeProgram:
    dnf = disjuncts(mask)
    if dnf is None:
        # Too many disjuncts: one part with every atom unsolved (the whole key range, masked).
        return RangeProgram([KeyBounds(rest=[mask])], False)
    return RangeProgram([key_bounds(c) for c in dnf], True)


def evaluate_part(part: KeyBounds, ev: IntervalEvaluator, ops, n_k):
    """Element ranges for one disjunct: (active, hull_lo, hull_hi, full_ok, full_lo, full_hi), inclusive.

    ``ev`` evaluates intervals over the query block; the hull holds every key the disjunct may accept,
    the full range only keys accepted by every query of the block.
    """
    active, full_ok = True, True
    for atom in part.query_atoms:
        must, may = ev(atom)
        active = active & may
        full_ok = full_ok & must
    if part.rest:
        full_ok = False
    lo, hi = 0, n_k - 1
    flo, fhi = 0, n_k - 1
    for f in part.lower:
        iv = ev(f)
        if iv is None:
            full_ok = False
            continue
        lo = ops.maximum(lo, iv[0])
        flo = ops.maximum(flo, iv[1])
    for g in part.upper:
        iv = ev(g)
        if iv is None:
            full_ok = False
            continue
        hi = ops.minimum(hi, iv[1])
        fhi = ops.minimum(fhi, iv[0])
    return active, lo, hi, full_ok, flo, fhi


def block_ranges(program: RangeProgram, ops, ev, n_k, block_n):
    """Per disjunct, key-block ranges ``[lo, hi)`` (may be needed) and ``[flo, fhi)`` (full).

    Full blocks stop before the last, ragged key block so the full loop never needs bounds checks.
    """
    out = []
    full_end = ops.floordiv(n_k, block_n)          # blocks entirely inside [0, n_k)
    for part in program.parts:
        active, lo, hi, full_ok, flo, fhi = evaluate_part(part, ev, ops, n_k)
        blo = ops.floordiv(ops.maximum(lo, 0), block_n)
        bhi = ops.floordiv(hi, block_n) + 1
        bhi = ops.where(active & (hi >= lo) & (hi >= 0), ops.minimum(bhi, ops.floordiv(n_k + block_n - 1, block_n)), blo)
        # full blocks: first block starting at or after flo, up to the last block ending at or before fhi
        bflo = ops.floordiv(flo + block_n - 1, block_n)
        bfhi = ops.minimum(ops.floordiv(fhi + 1, block_n), full_end)
        ok = active & full_ok & (bfhi > bflo)
        bflo = ops.where(ok, ops.maximum(bflo, blo), 0)
        bfhi = ops.where(ok, ops.minimum(bfhi, bhi), 0)
        out.append((blo, bhi, bflo, bfhi))
    return out


# --------------------------------------------------------------------------------------------------
# Plans for users


@dataclass
class Plan:
    """How a call with these sizes runs: tile counts, the fraction computed, the transforms applied."""
    pattern: str
    n_q: int
    n_k: int
    batch: int
    heads: int
    block_m: int
    block_n: int
    mode: str                      # 'ranges' (closed form), 'lists' (device tile lists), 'permuted', 'residue'
    tiles: dict
    transforms: list = field(default_factory=list)
    setup: str = ""
    disjuncts: int = 1

    @property
    def tile_fraction(self) -> float:
        total = self.tiles["full"] + self.tiles["partial"] + self.tiles["empty"]
        return (self.tiles["full"] + self.tiles["partial"]) / total if total else 0.0

    def __str__(self) -> str:
        t = self.tiles
        total = t["full"] + t["partial"] + t["empty"]
        lines = [
            f"plan for pattern {self.pattern}: n_q={self.n_q} n_k={self.n_k} batch={self.batch} heads={self.heads}",
            f"  tiles: {self.block_m} x {self.block_n} (query block x key block), "
            f"{math.ceil(self.n_q / self.block_m)} x {math.ceil(self.n_k / self.block_n)} per (batch, head)",
            f"  mode: {self.mode} — " + {
                "ranges": "key-block ranges computed in the kernel in closed form, no block table",
                "lists": "per-query-block lists of full and partial key blocks built on the device",
                "permuted": "queries and keys sorted by the layout transforms below, then tile lists of the "
                            "sorted problem; kernels read and write rows at their original positions",
                "residue": "rows in residue classes (position mod d, computed in the kernels, never loaded), "
                           "closed-form key-block ranges inside each class, no block table"}[self.mode],
            f"  computed tiles: {t['full'] + t['partial']} of {total} ({100 * self.tile_fraction:.1f}%): "
            f"{t['full']} full (no mask code), {t['partial']} partial (mask evaluated), {t['empty']} skipped",
            f"  layout transforms: {', '.join(self.transforms) if self.transforms else 'none'}",
        ]
        if self.setup:
            lines.append(f"  setup: {self.setup}")
        return "\n".join(lines)


def _union_length(los: list[torch.Tensor], his: list[torch.Tensor]) -> torch.Tensor:
    """Per row, the size of the union of half-open intervals [lo_i, hi_i) (vectorized over rows)."""
    lo = torch.stack(los, dim=1)
    hi = torch.stack(his, dim=1)
    hi = torch.maximum(hi, lo)
    order = torch.argsort(lo, dim=1)
    lo = torch.gather(lo, 1, order)
    hi = torch.gather(hi, 1, order)
    total = torch.zeros(lo.shape[0], dtype=torch.int64)
    reach = torch.full((lo.shape[0],), -(1 << 62), dtype=torch.int64)
    for i in range(lo.shape[1]):
        start = torch.maximum(lo[:, i], reach)
        total += torch.clamp(hi[:, i] - start, min=0)
        reach = torch.maximum(reach, hi[:, i])
    return total


def static_block_ranges(pir: PatternIR, n_q: int, n_k: int, block_m: int, block_n: int,
                        program: RangeProgram | None = None):
    """Evaluate the closed-form ranges for every query block at once (torch, O(N / block_m))."""
    program = program or range_program(pir.mask)
    nqb = math.ceil(n_q / block_m)
    m = torch.arange(nqb, dtype=torch.int64)
    q0 = m * block_m
    q1 = torch.clamp(q0 + block_m, max=n_q) - 1
    leaves = {"q": (q0, q1), "n_q": (n_q, n_q), "n_k": (n_k, n_k)}
    ev = IntervalEvaluator(TorchOps, leaves)
    ranges = block_ranges(program, TorchOps, ev, n_k, block_n)
    as_t = lambda x: torch.as_tensor(x, dtype=torch.int64).expand(nqb).clone()
    return [tuple(as_t(v) for v in r) for r in ranges]


def static_plan(pir: PatternIR, n_q: int, n_k: int, batch: int, heads: int, block_m: int,
                block_n: int) -> Plan:
    ranges = static_block_ranges(pir, n_q, n_k, block_m, block_n)
    computed = _union_length([r[0] for r in ranges], [r[1] for r in ranges])
    full = _union_length([r[2] for r in ranges], [r[3] for r in ranges])
    nkb = math.ceil(n_k / block_n)
    per_bh = batch * heads
    nqb = math.ceil(n_q / block_m)
    tiles = {"full": int(full.sum()) * per_bh, "partial": int((computed - full).sum()) * per_bh,
             "empty": (nqb * nkb - int(computed.sum())) * per_bh}
    return Plan(pir.name, n_q, n_k, batch, heads, block_m, block_n, "ranges", tiles,
                disjuncts=len(ranges))


def residue_plan(pir: PatternIR, n_q: int, n_k: int, batch: int, heads: int, block_m: int, block_n: int) -> Plan:
    """The plan of a call whose residue classes run in closed form (``residue_local_mask``; each class a
    whole number of blocks): d copies of the class-local static plan on the diagonal of the class grid;
    tiles pairing two classes are empty."""
    import dataclasses
    d, mask = residue_local_mask(pir.mask)
    local = static_plan(dataclasses.replace(pir, mask=mask), n_q // d, n_k // d, batch, heads, block_m, block_n)
    full, partial = local.tiles["full"] * d, local.tiles["partial"] * d
    total = math.ceil(n_q / block_m) * math.ceil(n_k / block_n) * batch * heads
    tiles = {"full": full, "partial": partial, "empty": total - full - partial}
    return Plan(pir.name, n_q, n_k, batch, heads, block_m, block_n, "residue", tiles,
                list(layout_transform(pir.mask).names), setup="none (positions computed from the sorted index)",
                disjuncts=local.disjuncts)


# --------------------------------------------------------------------------------------------------
# Tile lists for patterns with runtime inputs


def _block_summary(x: torch.Tensor, axis: int, block: int, n: int):
    """(min, max) as int64 of ``x`` over blocks of ``block`` positions [0, n) along ``axis``
    (:func:`_blocks_along`: a ragged last block reduces what it holds; positions past x's size read 0)."""
    return tuple(_blocks_along(x, axis, block, n, reduce).to(torch.int64) for reduce in (torch.amin, torch.amax))


def tile_axes(node: ir.Node) -> tuple[int, int] | None:
    """(q axis, k axis) of a read that indexes one dimension by exactly ``q``, one by exactly ``k`` and the
    others by expressions without q and k (a dense mask ``m[b, q, k]``), of an int or bool input: its min /
    max over a tile is a block reduction of the tensor (:func:`tile_read_summary`), so tile classifiers know
    it per (query block, key block). None for any other read."""
    if node.op != "read" or node.type not in ("int", "bool"):
        return None
    at = {v: [i for i, a in enumerate(node.args) if a.op == "var" and a.attr == v] for v in ("q", "k")}
    if len(at["q"]) != 1 or len(at["k"]) != 1:
        return None
    if any(ir.free_vars(a) & {"q", "k"} for i, a in enumerate(node.args) if i not in (at["q"][0], at["k"][0])):
        return None
    return at["q"][0], at["k"][0]


def _blocks_along(x: torch.Tensor, axis: int, block: int, n: int, reduce) -> torch.Tensor:
    """``reduce`` (torch.amin or torch.amax) over blocks of ``block`` positions of [0, n) along ``axis``
    (ceil(n / block) blocks, in x's dtype); positions at or past x's size read 0, as in the kernels."""
    x = x.movedim(axis, -1)
    have = min(x.shape[-1], n)
    full = have // block
    parts = []
    if full:
        parts.append(reduce(x[..., :full * block].unflatten(-1, (full, block)), dim=-1))
    if have > full * block:
        part = reduce(x[..., full * block:have], dim=-1, keepdim=True)
        if have < min(n, (full + 1) * block):         # the block runs past the tensor: those positions read 0
            part = reduce(torch.stack([part, torch.zeros_like(part)]), dim=0)
        parts.append(part)
    rest = -(-n // block) - sum(p.shape[-1] for p in parts)
    if rest or not parts:
        parts.append(torch.zeros(*x.shape[:-1], rest, dtype=x.dtype, device=x.device))
    return torch.cat(parts, -1).movedim(-1, axis)


def tile_read_summary(x: torch.Tensor, node: ir.Node, index_values: list, block_m: int, n_q: int, block_n: int,
                      n_k: int, cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) as int64 of a :func:`tile_axes` read over every (query block, key block) tile, shaped
    (B', H', nqb, nkb) (1 where no index value varies) by broadcasting ``index_values``: one per index of the
    read, the values of the indices other than q and k as ints or tensors shaped like (B', H', 1, 1) (``b`` as
    (B', 1, 1, 1)); ignored at q's and k's. The tensor is reduced over key blocks first, in its own dtype, so
    no copy of it is made; an out-of-range index reads 0 as in the kernels. ``cache``: the reductions, kept by
    (input name, axes)."""
    qa, ka = tile_axes(node)
    key = (node.attr, qa, ka)
    cache = {} if cache is None else cache
    if key not in cache:
        cache[key] = tuple(_blocks_along(_blocks_along(x, ka, block_n, n_k, reduce), qa, block_m, n_q, reduce)
                           .to(torch.int64) for reduce in (torch.amin, torch.amax))
    lo_t, hi_t = cache[key]
    nqb, nkb = lo_t.shape[qa], lo_t.shape[ka]
    index = list(index_values)
    index[qa] = torch.arange(nqb, device=lo_t.device).view(1, 1, nqb, 1)
    index[ka] = torch.arange(nkb, device=lo_t.device).view(1, 1, 1, nkb)
    return read_tensor(lo_t, index, "int"), read_tensor(hi_t, index, "int")


class TileClassifier:
    """Classifies every (query block, key block) tile of a call, vectorized on the inputs' device."""

    def __init__(self, pir: PatternIR, n_q: int, n_k: int, batch: int, heads: int, block_m: int,
                 block_n: int, sizes: dict, inputs: dict, device):
        self.pir, self.inputs = pir, inputs
        self.block_m, self.block_n = block_m, block_n
        self.nqb, self.nkb = math.ceil(n_q / block_m), math.ceil(n_k / block_n)
        self.per_head = "h" in ir.free_vars(pir.mask)
        self.per_batch = "b" in ir.free_vars(pir.mask)
        self.batch, self.heads = batch, heads
        self.n_q, self.n_k = n_q, n_k
        self.device = device
        m = torch.arange(self.nqb, device=device, dtype=torch.int64)
        j = torch.arange(self.nkb, device=device, dtype=torch.int64)
        shape_q, shape_k = (1, 1, self.nqb, 1), (1, 1, 1, self.nkb)
        q0 = (m * block_m).view(shape_q)
        k0 = (j * block_n).view(shape_k)
        leaves = {name: (v, v) for name, v in sizes.items()}
        leaves["q"] = (q0, torch.clamp(q0 + block_m, max=n_q) - 1)
        leaves["k"] = (k0, torch.clamp(k0 + block_n, max=n_k) - 1)
        hb = heads if self.per_head else 1
        bb = batch if self.per_batch else 1
        b = torch.arange(bb, device=device).view(bb, 1, 1, 1)
        h = torch.arange(hb, device=device).view(1, hb, 1, 1)
        leaves["b"], leaves["h"] = (b, b), (h, h)
        self.leaves = leaves
        self._summaries: dict = {}

    def _read(self, node: ir.Node, idx):
        """Interval of a tensor read: exact indices read the value; an index that is exactly ``q`` or
        ``k`` uses the per-block min/max along that axis; anything else is unknown."""
        x = self.inputs[node.attr]
        if tile_axes(node) is not None and all(i is not None for i in idx):
            # A dense mask (m[b, q, k]): its min / max per tile.
            lo, hi = tile_read_summary(x, node, [ilo for ilo, _ in idx], self.block_m, self.n_q, self.block_n,
                                       self.n_k, self._summaries)
            return (lo > 0, hi > 0) if node.type == "bool" else (lo, hi)
        block_axes = [(axis, a.attr) for axis, a in enumerate(node.args) if a.op == "var" and a.attr in ("q", "k")]
        if len(block_axes) > 1 or any(i is None for i in idx):
            return None
        exact = [a for a in node.args if not (a.op == "var" and a.attr in ("q", "k"))]
        if any(ir.free_vars(a) & {"q", "k"} for a in exact):
            return None
        if not block_axes:
            return None
        axis, which = block_axes[0]
        key = (node.attr, axis, which)
        if key not in self._summaries:
            block, n = (self.block_m, self.n_q) if which == "q" else (self.block_n, self.n_k)
            self._summaries[key] = _block_summary(x, axis, block, n)
        lo_t, hi_t = self._summaries[key]
        # Index the summaries with the exact indices and the block index along `axis`.
        blocks = torch.arange(lo_t.shape[axis], device=lo_t.device)
        view = [1, 1, 1, 1]
        view[2 if which == "q" else 3] = -1
        index = []
        for a, (ilo, _) in zip(range(len(node.args)), idx):
            if a == axis:
                index.append(blocks.view(view))
            else:
                index.append(torch.as_tensor(ilo, device=lo_t.device).clamp(0, x.shape[a] - 1))
        lo = lo_t[tuple(index)]
        hi = hi_t[tuple(index)]
        if node.type == "bool":
            return lo > 0, hi > 0
        return lo, hi

    def classify(self) -> torch.Tensor:
        """int8 tensor (B', H', nqb, nkb): 0 empty, 1 partial, 2 full (B', H' are 1 when unused)."""
        ev = IntervalEvaluator(TorchOps, self.leaves, self._read)
        shape = (self.batch if self.per_batch else 1, self.heads if self.per_head else 1, self.nqb, self.nkb)
        return tile_status(*ev(self.pir.mask), shape, self.device, self.n_k, self.block_n)


def tile_status(must, may, shape, device, n_k: int, block_n: int) -> torch.Tensor:
    """int8 tile classes from interval results: 0 empty, 1 partial, 2 full.

    A ragged last key block is never 'full': the full loop runs without bounds checks."""
    must = torch.as_tensor(must, device=device).expand(shape)
    may = torch.as_tensor(may, device=device).expand(shape)
    status = may.to(torch.int8) + must.to(torch.int8)
    if n_k % block_n:
        status[..., -1] = torch.clamp(status[..., -1], max=1)
    return status


@dataclass
class TileLists:
    """Per (batch, head, query block): the key blocks to compute, full ones and partial ones.

    The full tiles of a row are read as a run and a rest: ``full_run`` holds the first full block and how
    many consecutive full blocks follow from it (the kernels count them without loading an index), and
    ``full_idx`` / ``full_cnt`` list the full blocks after that run (none for contiguous documents, sorted
    buckets, kept keys or residue classes). List widths are at least the longest row's count; lists built
    on the device without a host synchronization are as wide as a row has blocks."""
    full_run: torch.Tensor     # int32 (B', H', nqb, 2): first block of the leading run of full tiles, length
    full_idx: torch.Tensor     # int32 (B', H', nqb, width): the other full blocks, in order
    full_cnt: torch.Tensor     # int32 (B', H', nqb)
    part_idx: torch.Tensor
    part_cnt: torch.Tensor
    status: torch.Tensor
    rest_max: torch.Tensor     # int32 [1]: the longest full list past a run (0: every row is its run)


def leading_runs(full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a boolean (..., n): per row, int32 (..., 2) holding the first True index (0 when none) and the
    length of the run of consecutive Trues from it; and the mask of the Trues in that run."""
    n = full.shape[-1]
    ar = torch.arange(n, device=full.device)
    first = torch.where(full, ar, n).amin(-1, keepdim=True) if n else ar.new_zeros(full.shape[:-1] + (1,))
    in_run = full & (full.cumsum(-1) == ar - first + 1)
    length = in_run.sum(-1, keepdim=True)
    run = torch.cat([torch.where(length > 0, first, 0), length], -1).to(torch.int32).contiguous()
    return run, in_run


def _compact(sel: torch.Tensor):
    """Indices of True entries along the last axis, left-packed (at least one column), and their counts."""
    cnt = sel.sum(-1, dtype=torch.int32)
    width = max(int(cnt.max()) if cnt.numel() else 0, 1)
    n = sel.shape[-1]
    keys = torch.where(sel, torch.arange(n, device=sel.device), n + torch.arange(n, device=sel.device))
    order = torch.argsort(keys, dim=-1)[..., :width].to(torch.int32)
    return order.contiguous(), cnt.contiguous()


def build_tile_lists(status: torch.Tensor) -> TileLists:
    full = status == 2
    full_run, in_run = leading_runs(full)
    full_idx, full_cnt = _compact(full & ~in_run)
    part_idx, part_cnt = _compact(status == 1)
    rest_max = full_cnt.amax().view(1) if full_cnt.numel() else full_cnt.new_zeros(1)
    return TileLists(full_run, full_idx, full_cnt, part_idx, part_cnt, status, rest_max)


class PlannedTiles:
    """The tile classes of one call and their lists, each built on first use: per query block for the
    forward and dQ kernels, per key block (transposed) for the dK/dV kernel."""

    def __init__(self, status: torch.Tensor, on_device: bool = False, ranges: torch.Tensor | None = None):
        self.status = status
        self.on_device = on_device          # build lists with the Triton kernels of attnc.device_setup
        self.ranges = ranges                # each query block's possibly non-empty key blocks (device classifier)
        self._lists: dict[bool, TileLists] = {}

    def lists(self, transposed: bool = False) -> TileLists:
        if transposed not in self._lists:
            if self.on_device:
                from .device_setup import tile_lists
                self._lists[transposed] = tile_lists(self.status, transposed, ranges=self.ranges)
            else:
                status = self.status.transpose(-1, -2).contiguous() if transposed else self.status
                self._lists[transposed] = build_tile_lists(status)
        return self._lists[transposed]


def list_plan(pir: PatternIR, status: torch.Tensor, n_q, n_k, batch, heads, block_m, block_n) -> Plan:
    reps = (batch // status.shape[0]) * (heads // status.shape[1])
    computed = full = 0
    flat = status.flatten(0, -2)                           # (rows of blocks, key blocks), also when empty
    for start in range(0, flat.shape[0], 1024):           # bounded temporaries for huge plans
        part = flat[start:start + 1024]
        computed += int(torch.count_nonzero(part))
        full += int(torch.count_nonzero(part == 2))
    # Tiles of the problem as posed (a padded sorted order has more blocks, the extra ones never computed
    # in full: at most the padded blocks themselves).
    total = status.shape[0] * status.shape[1] * math.ceil(n_q / block_m) * math.ceil(n_k / block_n)
    tiles = {"full": full * reps, "partial": (computed - full) * reps, "empty": max(total - computed, 0) * reps}
    setup = (f"tile classification on {tuple(status.shape)} blocks"
             f"{' shared across heads' if status.shape[1] == 1 else ''}"
             f"{' and batch' if status.shape[0] == 1 else ''}")
    return Plan(pir.name, n_q, n_k, batch, heads, block_m, block_n, "lists", tiles, setup=setup)


# --------------------------------------------------------------------------------------------------
# Layout transforms: sort queries and keys so that dynamic sparsity becomes dense tiles


@dataclass(frozen=True)
class SortKey:
    """One key queries or keys are sorted by: a read (bucket id, keep flag) or a residue class."""
    kind: str                 # 'bucket' | 'keep' | 'residue'
    node: ir.Node | None      # the read giving the key (bucket, keep); None for residue
    modulus: int = 0          # residue classes: position % modulus


@dataclass(frozen=True)
class LayoutTransform:
    """Sort keys for queries and for keys (most significant first) and the names the plan reports."""
    query_keys: tuple
    key_keys: tuple
    names: tuple
    bucket_atom: ir.Node | None = None      # the conjunct x[.., q] == y[.., k] the bucket keys come from

    @property
    def per_head_keys(self) -> bool:
        return any(k.node is not None and "h" in ir.free_vars(k.node) for k in self.key_keys)


def mirrored_reads(q_reads, k_reads) -> bool:
    """Whether two lists of reads are the same reads, in the same order, each at its own side's position
    (``doc[b, q]`` and ``doc[b, k]``)."""
    as_text = lambda reads, side: [ir.to_text(node, {ir.var(side): "@"}) for node in reads]
    return as_text(q_reads, "q") == as_text(k_reads, "k")


def mirrored_keys(transform: LayoutTransform) -> bool:
    """Whether queries and keys are sorted by the same keys, each read at its own position (documents:
    ``doc[b, q]`` and ``doc[b, k]``): with as many queries as keys, one sort then orders both sides."""
    pairs = list(zip(transform.query_keys, transform.key_keys))
    if len(transform.query_keys) != len(transform.key_keys) or any(
            a.kind != b.kind or a.modulus != b.modulus or (a.node is None) != (b.node is None) for a, b in pairs):
        return False
    return mirrored_reads([a.node for a, _ in pairs if a.node is not None],
                          [b.node for _, b in pairs if b.node is not None])


def _position_var(node: ir.Node) -> str | None:
    """'q' or 'k' when a read's indices use exactly one of them (and otherwise only b, h, sizes)."""
    used = ir.free_vars(node) & {"q", "k"}
    return next(iter(used)) if len(used) == 1 else None


def setup_shape(pir: PatternIR, batch: int, heads: int) -> tuple[int, int]:
    """(B', H'): setup (sorts, summaries, tile classes) runs per batch entry / head only where the mask
    depends on b / h, else once for all."""
    used = pir.__dict__.get("_mask_vars")
    if used is None:
        used = pir.__dict__["_mask_vars"] = frozenset(ir.free_vars(pir.mask))
    return (batch if "b" in used else 1), (heads if "h" in used else 1)


def summarized_side(node: ir.Node) -> str | None:
    """'q' or 'k' when a read can be summarized per block of that side (its indices use that position
    and otherwise only b and h): the classifiers then know its min / max over each block."""
    side = _position_var(node)
    if side is None or ir.free_vars(node) - {"b", "h", side}:
        return None
    return side


def residue_modulus(atom: ir.Node) -> int:
    """d when the atom says that q and k are in the same residue class mod d > 1: ``(q - k) % d == 0``
    (dilation) or ``q % d == k % d`` (NATTEN's dilation groups, 1-D neighborhoods); else 0."""
    if atom.op != "eq" or not atom.args[1].is_const or atom.args[1].value != 0:
        return 0
    kind = ir.atom_kind(atom)
    if kind == "coordinate":
        terms = ir.linear(atom.args[0])[0]
        mods = {t.args[0].attr: (t.args[1].value, c) for t, c in terms.items()
                if t.op == "mod" and t.args[0].op == "var" and t.args[1].is_const}
        if (len(terms) == 2 and set(mods) == {"q", "k"} and mods["q"][0] == mods["k"][0] > 1
                and mods["q"][1] == -mods["k"][1]):
            return mods["q"][0]
    elif kind == "modular":
        mod = atom.args[0]
        terms = ir.linear(mod.args[0])[0]
        q, k = ir.var("q"), ir.var("k")
        if set(terms) == {q, k} and terms[q] == -terms[k] and abs(terms[q]) == 1 and mod.args[1].value > 1:
            return mod.args[1].value
    return 0


@functools.lru_cache(maxsize=256)
def layout_transform(mask: ir.Node) -> LayoutTransform | None:
    """The layout transforms that the mask's top-level conjuncts allow, or None.

    * ``x[.., q] == y[.., k]`` (hash buckets, documents): sort queries by x and keys by y;
    * ``keep[.., k]`` / ``keep[.., q]`` (dropped keys / queries): kept ones first (compaction);
    * ``(q - k) % d == 0`` or ``q % d == k % d`` (dilation, dilated neighborhoods): sort both by
      residue class ``position % d``.
    Within each class the original order is kept (stable sorts), so positions stay increasing.
    Only conjuncts of the whole mask qualify: a transform is applied when every visible pair agrees.
    """
    conjuncts = list(mask.args) if mask.op == "and" else [mask]
    qk, kk, names = [], [], []
    residue = bucket_atom = None
    for atom in conjuncts:
        kind = ir.atom_kind(atom)
        if kind == "tensor-eq" and atom.op == "eq" and atom.args[1].value == 0:
            terms = ir.linear(atom.args[0])[0]
            reads = list(terms)
            if len(reads) == 2 and all(t.op == "read" for t in reads):
                sides = {_position_var(t): t for t in reads}
                if set(sides) == {"q", "k"} and not any(k.kind == "bucket" for k in qk):
                    qk.append(SortKey("bucket", sides["q"]))
                    kk.append(SortKey("bucket", sides["k"]))
                    names.append("bucket sort")
                    bucket_atom = atom
        elif kind == "tensor-bool" and atom.op == "read":
            side = _position_var(atom)
            if side == "k" and not any(k.kind == "keep" for k in kk):
                kk.append(SortKey("keep", atom))
                names.append("key compaction")
            elif side == "q" and not any(k.kind == "keep" for k in qk):
                qk.append(SortKey("keep", atom))
                names.append("query compaction")
        elif residue is None and (modulus := residue_modulus(atom)):
            residue = modulus
    if residue is not None:
        qk.append(SortKey("residue", None, residue))
        kk.append(SortKey("residue", None, residue))
        names.append(f"residue permutation (mod {residue})")
    if not names:
        return None
    return LayoutTransform(tuple(qk), tuple(kk), tuple(names), bucket_atom)


@functools.lru_cache(maxsize=256)
def residue_local_mask(mask: ir.Node) -> tuple[int, ir.Node] | None:
    """(d, local mask) when the residue permutation alone makes the pattern closed-form in sorted order.

    The pattern must read no runtime input and its only layout transform must be the residue permutation
    mod d. Inside class c, sorted row j of a side holds position c + d * j; the mask on the class's rows
    is the mask with q -> d*q + c, k -> d*k + c, n_q -> d*n_q, n_k -> d*n_k (lengths that d divides),
    the residue atom dropped (it holds inside a class). When that substitution gives the same mask for
    every c (the mask depends on q and k only through q - k, as causal, windows and dilation do), it is
    returned: each class is then one problem of n_q / d queries and n_k / d keys with closed-form key
    ranges, and the kernels need neither a setup nor tile lists. None otherwise (tile lists then)."""
    transform = layout_transform(mask)
    if transform is None or ir.uses(mask, "read"):
        return None
    keys = transform.query_keys + transform.key_keys
    if not keys or any(key.kind != "residue" for key in keys):
        return None
    d = keys[0].modulus
    rest = without_residue(mask, d)
    local = [_scale_positions(rest, d, c) for c in range(d)]
    if len({ir.to_text(m) for m in local}) != 1:
        return None
    return d, local[0]


def without_residue(mask: ir.Node, d: int) -> ir.Node:
    """The mask less its top-level residue conjuncts mod d: the same mask on pairs of one residue class,
    which is all the closed-form residue kernels ever pair (their partial tiles skip the modulo)."""
    conjuncts = list(mask.args) if mask.op == "and" else [mask]
    return ir.and_(*(c for c in conjuncts if residue_modulus(c) != d))


def _scale_positions(node: ir.Node, d: int, c: int) -> ir.Node:
    """``node`` with q -> d*q + c, k -> d*k + c, n_q -> d*n_q, n_k -> d*n_k, rebuilt through the IR's
    constructors so linear forms and comparisons come out canonical (coefficients divided by their gcd)."""
    leaves = {ir.var(v): ir.add(ir.mul(ir.const(d), ir.var(v)), ir.const(c)) for v in ("q", "k")}
    leaves.update({ir.size(n): ir.mul(ir.const(d), ir.size(n)) for n in ("n_q", "n_k")})
    return ir.substitute(node, leaves)


BUCKET_KEY_MAX = 65535     # sort keys have 16 bits: bucket ids are clamped to [-1, 65534], then + 1


def sort_positions(keys: tuple, env: dict, n: int, shape: tuple, device) -> torch.Tensor:
    """The permutation (shape + (n,)) that orders positions by ``keys`` (most significant first),
    stably, so equal keys keep position order. ``env`` evaluates the key reads.

    Keys are 16-bit, as the device's radix sort takes them: bucket ids are clamped to [-1, 65534]
    (ids past the range share the last key: their rows stay in position order, which costs tiles but
    never correctness, since the mask is still evaluated on the original values)."""
    perm = torch.arange(n, device=device).expand(*shape, n).clone()
    for key in reversed(keys):                      # least significant first; each sort is stable
        values = sort_key_values(key, env, perm, shape)
        order = torch.sort(values, dim=-1, stable=True).indices
        perm = torch.gather(perm, -1, order)
    return perm


def sort_key_values(key: SortKey, env: dict, pos: torch.Tensor, shape: tuple) -> torch.Tensor:
    """int64 (shape + (n,)): the 16-bit sort key of each row of ``pos`` (positions), as the device's
    sort-key kernels compute it."""
    if key.kind == "residue":
        return (pos % key.modulus).clamp(max=BUCKET_KEY_MAX)
    from .evaluate import evaluate
    local = dict(env)
    local[_position_var(key.node)] = pos.view(*shape, pos.shape[-1])
    values = torch.as_tensor(evaluate([key.node], local)[0], device=pos.device).expand(*shape, pos.shape[-1])
    if key.kind == "keep":
        return (~values.bool()).to(torch.int64)     # kept first
    return values.to(torch.int64).clamp(-1, BUCKET_KEY_MAX - 1) + 1


# Buckets padded to whole blocks. Sorting by bucket makes a bucket's rows contiguous, but its edges
# fall anywhere inside a block: a key block straddling an edge is partial for every query block of both
# buckets, and a query block straddling one is partial against all their key blocks (at 8k tokens and 8
# buckets, ~3/4 of the partial tiles; benchmarks/NOTES.md item 26). Each bucket is therefore started on a
# block boundary, the rows in between holding no position (their position reads as n, one past the last
# row): queries there are computed without effect and never stored, keys there are masked.
# The host does not know the bucket sizes (no synchronization), so the sorted order gets a fixed
# allowance of PAD_SLACK x n extra rows; when the buckets need more, the side stays unpadded (its rows
# then sit first, the allowance past them holding padding). The device pads in the offsets of its radix
# sort's one pass, so keys of PAD_KEYS or more (bucket ids past 254, which take a second pass) stay
# unpadded too.
PAD_SLACK = 0.25
PAD_KEYS = 256


def padded_rows(n: int, block: int) -> int:
    """Rows of a padded side in sorted order: n plus the allowance, in whole blocks."""
    return math.ceil((n + max(block, math.ceil(n * PAD_SLACK))) / block) * block if n else 0


def padded_sides(transform: LayoutTransform | None) -> tuple[bool, bool]:
    """(queries, keys): which sides of a layout transform are padded. A side sorted by one bucket key and
    nothing else (hash buckets); not a transform whose two sides share their keys (documents), whose rows
    may well be in order already (then the plain kernels run, see attnc.layout.Layout.in_place).
    ATTNC_PAD_BUCKETS=0 turns padding off (comparisons)."""
    if transform is None or mirrored_keys(transform) or os.environ.get("ATTNC_PAD_BUCKETS", "1") == "0":
        return False, False
    one_bucket = lambda keys: len(keys) == 1 and keys[0].kind == "bucket"
    return one_bucket(transform.query_keys), one_bucket(transform.key_keys)


def pad_sorted(perm: torch.Tensor, keys: torch.Tensor, block: int, rows: int,
               pad_runs: bool | None = None) -> torch.Tensor:
    """``perm`` (..., n) (sorted row -> position, sorted by ``keys`` (..., n), given in position order)
    with each run of equal keys started on a multiple of ``block``: (..., rows), padding rows holding n.
    A row of perm whose padded runs need more than ``rows`` keeps its order (padding after it); so does
    every row when ``pad_runs`` is False (default: whether every key is below PAD_KEYS).
    The torch version (CPU plans, and the tests' oracle of the ``pad`` of attnc.device_setup.radix_sort_perm)."""
    n = perm.shape[-1]
    out = torch.full(perm.shape[:-1] + (rows,), n, dtype=perm.dtype, device=perm.device)
    if n == 0:
        return out
    if pad_runs is None:
        pad_runs = bool(keys.max() < PAD_KEYS)
    if not pad_runs:
        out[..., :n] = perm
        return out
    sk = torch.gather(keys.expand(perm.shape).to(torch.int64), -1, perm)
    i = torch.arange(n, device=perm.device).expand(perm.shape)
    start = torch.ones_like(sk, dtype=torch.bool)
    start[..., 1:] = sk[..., 1:] != sk[..., :-1]
    end = torch.ones_like(start)
    end[..., :-1] = start[..., 1:]
    first = torch.cummax(torch.where(start, i, 0), -1).values          # the first row of each row's run
    blocks_at_end = torch.where(end, (i - first + block) // block, 0)    # ceil(run length / block) at its end
    before = torch.cumsum(blocks_at_end, -1) - blocks_at_end             # blocks of the runs before a row's
    dest = before * block + (i - first)
    fits = (blocks_at_end.sum(-1, keepdim=True) * block) <= rows
    dest = torch.where(fits, dest, i)
    return out.scatter_(-1, dest, perm)


def fill_padding(perm: torch.Tensor, n: int) -> torch.Tensor:
    """A padded order with each padding row given the position of the last real row before it (the
    block's own: padding only ends blocks), so that block summaries are those of the real rows."""
    i = torch.arange(perm.shape[-1], device=perm.device).expand(perm.shape)
    last = torch.cummax(torch.where(perm < n, i, 0), -1).values
    return torch.gather(perm, -1, last).clamp(max=max(n - 1, 0))


def real_rows_per_block(perm: torch.Tensor, n: int, block: int) -> torch.Tensor:
    """int32 (..., blocks): how many rows of each block of a padded order hold a position."""
    return (perm < n).unflatten(-1, (-1, block)).sum(-1, dtype=torch.int32)


def padded_status(status: torch.Tensor, q_count: torch.Tensor | None, k_count: torch.Tensor | None,
                  block_n: int) -> torch.Tensor:
    """Tile classes of a padded problem from those of its real rows (the classifier ran on orders whose
    padding rows repeat a real position, see :func:`fill_padding`): a key block holding padding is at
    most partial, a block of either side without real rows empty. Counts (B', H', blocks)."""
    if k_count is not None:
        status = torch.where(k_count[..., None, :] < block_n, status.clamp(max=1), status)
        status = torch.where(k_count[..., None, :] == 0, 0, status)
    if q_count is not None:
        status = torch.where(q_count[..., :, None] == 0, 0, status)
    return status.to(torch.int8).contiguous()


class PermutedTileClassifier:
    """Tile classification after a layout transform: the leaves q and k are the min/max of the
    original positions held by each block of the sorted order, reads indexed by one position are
    evaluated at those positions and summarized per block, and residue classes are known exactly.

    ``q_perm`` / ``k_perm`` have shape (B', H', N) with B', H' in {1, batch/heads}: a pattern whose mask
    depends on neither b nor h is classified once. The work runs in chunks of query blocks, so memory
    stays bounded (O(chunk x N/Bn)) even for a million tokens.

    Large problems are classified coarse to fine: first tiles of ``COARSE`` x ``COARSE`` blocks, then
    only the blocks inside coarse tiles that are partial. Interval evaluation is inclusion-monotone
    (a smaller box gives a narrower result), so an empty or full coarse tile has only empty or full
    blocks and the result equals classifying every block, in time proportional to the partial area."""

    CHUNK_TILES = 1 << 22
    COARSE = 16
    HIERARCHY_MIN_TILES = 1 << 20       # below this, every block is classified directly

    def __init__(self, pir, q_perm, k_perm, n_q, n_k, batch, heads, block_m, block_n, sizes, inputs,
                 modulus: int = 0):
        self.pir, self.inputs = pir, inputs
        self.block_m, self.block_n = block_m, block_n
        self.nqb, self.nkb = math.ceil(n_q / block_m), math.ceil(n_k / block_n)
        self.batch, self.heads, self.n_q, self.n_k = q_perm.shape[0], q_perm.shape[1], n_q, n_k
        device = q_perm.device
        self.device = device
        self.q_perm, self.k_perm = q_perm, k_perm
        self.sizes = sizes
        self.qsum = _block_summary(q_perm, -1, block_m, n_q)
        self.ksum = _block_summary(k_perm, -1, block_n, n_k)
        self.modulus = modulus
        if modulus:
            self.qres = _block_summary(q_perm % modulus, -1, block_m, n_q)
            self.kres = _block_summary(k_perm % modulus, -1, block_n, n_k)
        self._summaries = {}
        self._fine = None               # set on a coarse copy: the classifier whose summaries it merges
        self._direct_rows(slice(0, self.nqb))

    def _coarsened(self, S: int) -> "PermutedTileClassifier":
        """The same problem on tiles of S x S blocks; summaries are merged from this classifier's,
        so no read is evaluated again."""
        coarse = copy.copy(self)
        coarse.block_m, coarse.block_n = self.block_m * S, self.block_n * S
        coarse.nqb, coarse.nkb = math.ceil(self.nqb / S), math.ceil(self.nkb / S)
        coarse.qsum, coarse.ksum = self._merged(self.qsum, "q", S), self._merged(self.ksum, "k", S)
        if self.modulus:
            coarse.qres, coarse.kres = self._merged(self.qres, "q", S), self._merged(self.kres, "k", S)
        coarse._summaries, coarse._fine = {}, self
        coarse._direct_rows(slice(0, coarse.nqb))
        return coarse

    def _merged(self, summary, side: str, S: int):
        """Per-block (min, max) of this classifier merged over groups of S blocks."""
        n = self.nqb if side == "q" else self.nkb
        return _block_summary(summary[0], -1, S, n)[0], _block_summary(summary[1], -1, S, n)[1]

    # ---- where the evaluation happens: a rectangle of rows x all key blocks, or gathered tiles --------
    def _direct_rows(self, rows: slice):
        """Evaluate query blocks ``rows`` against every key block: shape (B', H', rows, nkb)."""
        self._q_side = lambda x: x[..., rows, None]
        self._k_side = lambda x: x.unsqueeze(-2)
        self._b = torch.arange(self.batch, device=self.device).view(-1, 1, 1, 1)
        self._h = torch.arange(self.heads, device=self.device).view(1, -1, 1, 1)

    def _gathered(self, bi, hi, rows, cols):
        """Evaluate gathered tiles: ``bi``, ``hi`` (T, 1, 1), ``rows`` (T, S, 1), ``cols`` (T, 1, S)."""
        self._q_side = lambda x: x[bi, hi, rows]
        self._k_side = lambda x: x[bi, hi, cols]
        self._b, self._h = bi, hi

    def _leaves(self):
        leaves = {name: (v, v) for name, v in self.sizes.items()}
        leaves["q"] = (self._q_side(self.qsum[0]), self._q_side(self.qsum[1]))
        leaves["k"] = (self._k_side(self.ksum[0]), self._k_side(self.ksum[1]))
        leaves["b"], leaves["h"] = (self._b, self._b), (self._h, self._h)
        residues = {}
        if self.modulus:
            residues = {"q": (self.modulus, self._q_side(self.qres[0]), self._q_side(self.qres[1])),
                        "k": (self.modulus, self._k_side(self.kres[0]), self._k_side(self.kres[1]))}
        return leaves, residues

    def _read(self, node, idx):
        side = summarized_side(node)
        if side is None:
            return None
        lo, hi = self._summary(node, side)
        pick = self._q_side if side == "q" else self._k_side
        lo, hi = pick(lo), pick(hi)
        if node.type == "bool":
            return lo > 0, hi > 0
        return lo, hi

    def _summary(self, node, side: str):
        """Per-block (min, max) of a read indexed by one position ``side``, over the sorted order."""
        if node not in self._summaries:
            if self._fine is not None:
                self._summaries[node] = self._fine._merged(self._fine._summary(node, side), side, self.COARSE)
            else:
                from .evaluate import evaluate
                perm, block, n = ((self.q_perm, self.block_m, self.n_q) if side == "q"
                                  else (self.k_perm, self.block_n, self.n_k))
                env = dict(self.sizes)
                env.update(self.inputs)
                env["b"] = torch.arange(self.batch, device=self.device).view(-1, 1, 1)
                env["h"] = torch.arange(self.heads, device=self.device).view(1, -1, 1)
                env[side] = perm
                values = torch.as_tensor(evaluate([node], env)[0], device=self.device)
                values = values.expand(self.batch, self.heads, perm.shape[-1])
                self._summaries[node] = _block_summary(values, -1, block, n)
        return self._summaries[node]

    def _evaluate(self):
        leaves, residues = self._leaves()
        return IntervalEvaluator(TorchOps, leaves, self._read, residues=residues)(self.pir.mask)

    # ---- classification ------------------------------------------------------------------------------
    def classify(self) -> torch.Tensor:
        S = self.COARSE
        if self.nqb * self.nkb < self.HIERARCHY_MIN_TILES or min(self.nqb, self.nkb) < 4 * S:
            return self._classify_all()
        return self._classify_coarse_to_fine()

    def _classify_all(self) -> torch.Tensor:
        status = torch.zeros(self.batch, self.heads, self.nqb, self.nkb, dtype=torch.int8, device=self.device)
        step = max(1, self.CHUNK_TILES // max(1, self.batch * self.heads * self.nkb))
        for m0 in range(0, self.nqb, step):
            rows = slice(m0, min(self.nqb, m0 + step))
            self._direct_rows(rows)
            shape = (self.batch, self.heads, rows.stop - m0, self.nkb)
            status[:, :, rows] = tile_status(*self._evaluate(), shape, self.device, self.n_k, self.block_n)
        return status

    def _classify_coarse_to_fine(self) -> torch.Tensor:
        S = self.COARSE
        cstatus = self._coarsened(S)._classify_all()
        # Full coarse tiles are full block by block; empty ones empty.
        status = ((cstatus == 2).to(torch.int8) * 2).repeat_interleave(S, dim=-2).repeat_interleave(S, dim=-1)
        status = status[..., :self.nqb, :self.nkb].contiguous()
        partial = (cstatus == 1).nonzero()                      # (T, 4): b', h', coarse row, coarse column
        offs = torch.arange(S, device=self.device)
        step = max(1, self.CHUNK_TILES // (S * S))
        for t0 in range(0, partial.shape[0], step):
            part = partial[t0:t0 + step]
            bi, hi = part[:, 0].view(-1, 1, 1), part[:, 1].view(-1, 1, 1)
            rows = part[:, 2].view(-1, 1, 1) * S + offs.view(1, S, 1)
            cols = part[:, 3].view(-1, 1, 1) * S + offs.view(1, 1, S)
            ok = (rows < self.nqb) & (cols < self.nkb)
            rows_c, cols_c = rows.clamp(max=self.nqb - 1), cols.clamp(max=self.nkb - 1)
            self._gathered(bi, hi, rows_c, cols_c)
            must, may = self._evaluate()
            shape = (part.shape[0], S, S)
            fine = (torch.as_tensor(may, device=self.device).expand(shape).to(torch.int8)
                    + torch.as_tensor(must, device=self.device).expand(shape).to(torch.int8))
            sel = ok.expand(shape)
            status[bi.expand(shape)[sel], hi.expand(shape)[sel], rows_c.expand(shape)[sel],
                   cols_c.expand(shape)[sel]] = fine[sel]
        if self.n_k % self.block_n:
            status[..., -1].clamp_(max=1)                      # a ragged last key block is never full
        self._direct_rows(slice(0, self.nqb))
        return status
