"""Stage 6: render Triton kernels from the Jinja templates in ``templates/``.

Pattern code reaches the templates at named hooks only: the element-wise mask (``mask_lines``), the
score modifier (``score_lines``), the runtime-input arguments, and the closed-form key ranges
(``range_lines``). Each hook is a list of ``name = expression`` lines printed from the IR with the op
table of :mod:`attnc.evaluate`, so the kernel and the reference compute the same function.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import jinja2

from . import ir
from .analyze import PatternIR
from .evaluate import OPS
from .interval import Emitter, IntervalEvaluator, Sym, TritonOps
from .parse import _resource_text
from .plan import (BUCKET_KEY_MAX, RangeProgram, block_ranges, layout_transform, mirrored_reads, padded_sides,
                   range_program, summarized_side, tile_axes)

# How the element-wise code names the index variables and sizes inside a tile.
LEAF_NAMES = {"q": "q_pos", "k": "k_pos", "b": "off_b", "h": "off_h",
              "n_q": "n_q", "n_k": "n_k", "batch": "batch", "heads": "heads"}


@dataclass(frozen=True)
class InputArg:
    """How a runtime input reaches the kernel: a pointer, one stride and one size per dimension."""
    name: str
    dtype: str
    ndim: int

    @property
    def params(self) -> list[str]:
        return ([f"{self.name}_ptr"] + [f"{self.name}_s{i}" for i in range(self.ndim)]
                + [f"{self.name}_d{i}" for i in range(self.ndim)])


def _float_literal(v: float) -> str:
    if v != v:
        return "float('nan')"
    if v in (float("inf"), float("-inf")):
        return f"float('{v}')"
    return repr(float(v))


def _index_ok(a: str, name: str, d: int) -> str:
    """Whether index ``a`` lies inside dimension ``d`` of runtime input ``name``."""
    return f"({a} >= 0) & ({a} < {name}_d{d})"


def _varies_in_tile(node: ir.Node) -> bool:
    """Whether ``node`` takes more than one value in a score tile (it depends on q or k)."""
    return bool(ir.free_vars(node) & {"q", "k"})


def _tile_operand(scalar: str) -> str:
    """A boolean that is one scalar per tile (it reads no q or k), as an operand of `&` / `|` with a tile:
    Triton's interpreter cannot join a compared scalar with a tile until it is compared with 0 once more."""
    return f"({scalar} != 0)"


def _clamped_offset(a: str, name: str, d: int, stride: str) -> str:
    """The offset of scalar index ``a`` clamped into dimension ``d`` of ``name`` (a select with
    :func:`_index_ok` zeroes what an index out of range reads or adds)."""
    return f"tl.minimum(tl.maximum({a}, 0), {name}_d{d} - 1).to(tl.int64) * {stride}"


def _per_pattern(fn):
    """Memoizes ``fn(pir)`` on the PatternIR (in its ``__dict__``, under ``_`` + the function's name): facts
    of a pattern the launchers ask on every call, computed once per pattern."""
    slot = "_" + fn.__name__.lstrip("_")

    @functools.wraps(fn)
    def cached(pir: PatternIR):
        value = pir.__dict__.get(slot)
        if value is None:
            value = pir.__dict__[slot] = fn(pir)
        return value
    return cached


class ElementwisePrinter:
    """Prints IR nodes as Triton expressions over tiles, one named line per shared subexpression."""

    def __init__(self, prefix: str):
        self.em = Emitter(prefix)
        self.names: dict[ir.Node, str] = {}

    def __call__(self, node: ir.Node) -> str:
        if node in self.names:
            return self.names[node]
        text = self._expr(node)
        if node.op in ("var", "size", "const", "score"):
            self.names[node] = text
            return text
        name = self.em.value(text).text
        self.names[node] = name
        return name

    def _expr(self, node: ir.Node) -> str:
        op = node.op
        if op == "const":
            v = node.value
            if isinstance(v, bool):
                return "True" if v else "False"
            return _float_literal(v) if isinstance(v, float) else str(v)
        if op in ("var", "size"):
            return LEAF_NAMES[node.attr]
        if op == "score":
            return "s"
        args = [self(a) for a in node.args]
        if op == "lin":
            items, c = node.attr
            parts = []
            for (term, coeff), a in zip(items, args):
                parts.append(f"{'+' if coeff > 0 else '-'} {a if abs(coeff) == 1 else f'{abs(coeff)} * {a}'}")
            text = " ".join(parts)
            text = text[2:] if text.startswith("+ ") else "-" + text[2:]
            if c:
                text += f" {'+' if c > 0 else '-'} {abs(c)}"
            return f"({text})"
        if op == "tofloat":
            return f"({args[0]}).to(tl.float32)"
        if op in ("and", "or"):
            if any(_varies_in_tile(a) for a in node.args):
                args = [t if _varies_in_tile(a) or a.op == "const" else _tile_operand(t)
                        for a, t in zip(node.args, args)]
            return "(" + (" & " if op == "and" else " | ").join(args) + ")"
        if op == "read":
            return self._read(node, args)
        if op in ("floordiv", "mod") and node.type == "float":
            # The integer helpers would truncate; floats use floor directly (Python semantics).
            a, b = args
            return f"tl.floor({a} / {b})" if op == "floordiv" else f"({a} - {b} * tl.floor({a} / {b}))"
        return OPS[op].triton.format(*args)

    def _read(self, node: ir.Node, args: list[str]) -> str:
        """A runtime-input read; out-of-range indices read 0 (False), as in the reference.

        Indices over q or k are tiles and become the load's mask; scalar indices (over b, h, sizes) are
        clamped, and their checks narrow the first tile index's range. A read with no tile index checks its
        scalars with a select, since a scalar mask does not broadcast in every Triton.
        """
        name = node.attr
        offsets, tile_checks, scalar_checks = [], [], []
        for i, (index, a) in enumerate(zip(node.args, args)):
            if _varies_in_tile(index):
                tile_checks.append((a, i))
                offsets.append(f"({a}).to(tl.int64) * {name}_s{i}")
            else:
                scalar_checks.append(_index_ok(a, name, i))
                offsets.append(_clamped_offset(a, name, i, f"{name}_s{i}"))
        ptr = f"{name}_ptr + " + " + ".join(offsets)
        if not tile_checks:
            load = f"tl.load({ptr})"
            return self._typed(node, f"tl.where({' & '.join(scalar_checks)}, {load}, 0)" if scalar_checks else load)
        checks = [_index_ok(a, name, i) for a, i in tile_checks]
        if scalar_checks:
            # Scalar indices out of range empty the first tile index's range (a scalar select), so their checks
            # cost nothing per element: a select after the load cost ~100 instructions per 64 x 64 tile and warp
            # on Hopper, and a scalar joined to the load's mask with `&` is widened to int32 by the interpreter.
            a, i = tile_checks[0]
            limit = f"tl.where({' & '.join(scalar_checks)}, {name}_d{i}, 0)"
            checks[0] = f"({a} >= 0) & ({a} < {limit})"
        return self._typed(node, f"tl.load({ptr}, mask={' & '.join(checks)}, other=0)")

    @staticmethod
    def _typed(node: ir.Node, load: str) -> str:
        if node.type == "bool":
            return f"({load} != 0)"
        if node.type == "float":
            return f"({load}).to(tl.float32)"
        return load


def tile_mask_code(mask: ir.Node, prefix: str, bounded: bool = True) -> list[str]:
    """The body of a ``_mask_tile`` function for ``mask``: lines that set the entries of the tile ``x`` where the
    mask is false, or whose key is past the end (``k_ok`` false), to ``fill``.

    Conjuncts whose truth on a whole tile the interval rules can prove from the tile's position bounds
    (``q_lo``..``q_hi`` x ``k_lo``..``k_hi``: affine, modular and coordinate atoms; not reads) are tested
    element-wise only on the tiles where the proof fails, each behind its own branch; the first also tests
    ``k_ok``, and is taken on the tiles that reach past the end (``k_edge``). A window's diagonal tiles skip
    the window's far edge and its far-edge tiles causality; a dense mask's tiles below the diagonal test the
    mask alone. ``TILE_BOUNDS`` (constexpr) says whether the bounds hold (rows in order, or residue classes in
    closed form); where it is False (rows sorted by a loaded key) every test runs on every partial tile.
    ``bounded=False``: the kernel's rows never have bounds (sorted by a loaded key in every launch), so no
    branch is printed that no launch takes.

    Each test selects into ``x`` itself: a float tile passes through a branch in its registers, where a
    boolean tile would be packed into bytes and out again. Whatever reads an input is selected before the
    branches: Triton 3.6's software pipeliner fails on a load consumed only inside a branch."""
    conjuncts, proofs, proof_lines = tile_proofs(mask, prefix)
    rest = [c for c in conjuncts if c not in proofs]

    def select(nodes: list, indent: str, tag: str, k_ok: bool = False) -> list[str]:
        p = ElementwisePrinter(f"{prefix}{tag}")
        node = ir.and_(*nodes) if nodes else None
        terms = [p(node)] if nodes else []
        terms += ["k_ok"] if k_ok else []
        if len(terms) == 2 and node.op != "const" and not _varies_in_tile(node):
            terms[0] = _tile_operand(terms[0])      # one scalar for the whole tile (a per-head switch)
        return [indent + line for line in p.em.lines] + [f"{indent}x = tl.where({' & '.join(terms)}, x, fill)"]

    if not bounded or not proofs or (len(proofs) == 1 and not rest):
        # A mask that is one provable conjunct is unproven on every partial tile (the tile classifiers and
        # closed-form ranges apply the same rules: where it is proven, the tile is full).
        return select(conjuncts, "", "", k_ok=True)
    lines = ["if TILE_BOUNDS:"]
    if rest:
        lines += select(rest, "    ", "")
    lines += ["    " + line for line in proof_lines]
    for i, (c, must) in enumerate(proofs.items()):
        # The first test also takes k_ok: a branch of its own would be turned into predicated selects, run
        # on every tile (and two masks in one select cost two selects an element anyway).
        lines.append(f"    # {ir.to_text(c)}: tested where the tile's bounds do not prove it"
                     + (" (and keys past the end)" if i == 0 else ""))
        lines.append(f"    if ({must} == 0) | k_edge:" if i == 0 else f"    if {must} == 0:")
        lines += select([c], "        ", f"{i}_", k_ok=i == 0)
    lines.append("else:")
    lines += select(conjuncts, "    ", "", k_ok=True)
    return lines


def _block_leaves(em: Emitter) -> dict:
    """Interval leaves for a block of positions: q in [q_lo, q_hi], k in [k_lo, k_hi], b, h and the sizes exact
    (their kernel names), as the tile classifier and the partial tiles' proofs read them."""
    leaves = {"q": (Sym(em, "q_lo"), Sym(em, "q_hi")), "k": (Sym(em, "k_lo"), Sym(em, "k_hi"))}
    for name in ("b", "h", "n_q", "n_k", "batch", "heads"):
        leaves[name] = (Sym(em, LEAF_NAMES[name]),) * 2
    return leaves


def tile_proofs(mask: ir.Node, prefix: str = "m") -> tuple[list[ir.Node], dict, list[str]]:
    """The conjuncts of ``mask``; for those the tile's position bounds can prove true on a whole tile, the name
    of that proof (a scalar: nonzero when proven); and the scalar lines computing the proofs from ``q_lo``,
    ``q_hi``, ``k_lo``, ``k_hi`` and the call's sizes (``off_b``, ``off_h``, ``n_q``, ...), by the interval
    rules the tile classifiers use (the 'must' bound of each conjunct)."""
    conjuncts = list(mask.args) if mask.op == "and" else [mask]
    em = Emitter(f"{prefix}b")
    leaves = _block_leaves(em)
    ev = IntervalEvaluator(TritonOps(em), leaves)
    proofs = {}
    for c in conjuncts:
        if _varies_in_tile(c) and not ir.uses(c, "read"):
            must = ev(c)[0]
            if isinstance(must, Sym):
                proofs[c] = must.text
    return conjuncts, proofs, _live_lines(em.lines, list(proofs.values()))


def _live_lines(lines: list[str], wanted: list[str]) -> list[str]:
    """The ``name = expr`` lines that the names in ``wanted`` depend on (the interval rules also print the
    bounds nobody reads)."""
    live, out = set(wanted), []
    for line in reversed(lines):
        name, _, expr = line.partition(" = ")
        if name in live:
            out.append(line)
            live |= set(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", expr))
    return out[::-1]


@_per_pattern
def grad_inputs(pir: PatternIR) -> list[str]:
    """The float runtime inputs the score reads, in declaration order: the dQ kernel adds their gradients
    into float32 tensors with atomic adds (``_input_grads_tile`` in the backward template; see
    :func:`_grad_context` for how each read is reduced first). Inputs read only by the mask have none."""
    score = [] if pir.score is None else [pir.score]
    read = {n.attr for n in ir.postorder(score) if n.op == "read" and n.type == "float"}
    return [name for name, d in pir.inputs.items() if d.dtype == "float" and name in read]


@_per_pattern
def tile_gathers(pir: PatternIR) -> str:
    """Whether a tile of scores gathers a tile of a runtime input: ``"score"`` when the score reads an input at
    indices that run over both q and k, in one index (a relative bias ``bias[h, q - k + c]``) or between them
    (``t[h, q % 64, k % 64]``); else ``"mask"`` when the mask does (a dense mask ``m[b, q, k]``: partial tiles
    only); else ``""``. Such scores ran their backward 1.3-2.5x faster one stage deep than pipelined, and their
    forward 2.4x faster (relative bias) or as fast (RESULTS runs 94 and 100); dense masks' forward ran 10-19%
    faster two stages deep than three (run 101). The default tables take these (``launch.forward_table``,
    ``launch.backward_config``)."""
    def gathers(roots):
        return any(n.op == "read" and ir.free_vars(n) >= {"q", "k"} for n in ir.postorder(roots))
    if pir.score is not None and gathers([pir.score]):
        return "score"
    return "mask" if gathers([pir.mask]) else ""


# What the tile's d(loss)/d(read) is summed over, by the axes a read's index runs over (_grad_context).
_SUMMED_OVER = {"": "the tile", "q": "keys", "k": "queries", "qk": "nothing (one add per element)"}


@_per_pattern
def _grad_context(pir: PatternIR) -> list[dict]:
    """Per float input of :func:`grad_inputs`, per read of it in the score: the printed derivative of the
    score by that read (``ir.derivative``: the read is the variable), the axes its index runs over (``""``,
    ``"q"``, ``"k"`` or ``"qk"``: the tile's d(loss)/d(read) is summed over the others before the atomic
    add), and where the sum goes (an offset into the input's float32 gradient, with the gradient's own
    strides). Scalar indices are clamped and their check zeroes the sum; tile indices are checked by the
    add's mask."""
    out = []
    for i, name in enumerate(grad_inputs(pir)):
        reads = [n for n in ir.postorder([pir.score]) if n.op == "read" and n.attr == name]
        entries = []
        for j, node in enumerate(reads):
            printer = ElementwisePrinter(f"g{i}r{j}_")
            value = printer(ir.derivative(pir.score, node))
            offsets, scalar_checks, tile_checks, axes = [], [], [], set()
            for d, index in enumerate(node.args):
                a = printer(index)
                over = ir.free_vars(index) & {"q", "k"}
                axes |= over
                if over:
                    tile_checks.append(_index_ok(a, name, d))
                    offsets.append(f"({a}).to(tl.int64) * {name}_gs{d}")
                else:
                    scalar_checks.append(_index_ok(a, name, d))
                    offsets.append(_clamped_offset(a, name, d, f"{name}_gs{d}"))
            axes = "".join(x for x in "qk" if x in axes)
            entries.append(dict(text=ir.to_text(node), lines=printer.em.lines, value=value, axes=axes,
                                summed_over=_SUMMED_OVER[axes], offset=" + ".join(offsets) or "0",
                                scalar_ok=" & ".join(scalar_checks), tile_ok=" & ".join(tile_checks)))
        out.append(dict(name=name, ndim=len(pir.inputs[name].dims), reads=entries))
    return out


def _range_code(program: RangeProgram) -> tuple[list[str], int]:
    """Scalar Triton code computing, per disjunct i, key-block ranges lo_i, hi_i, flo_i, fhi_i."""
    em = Emitter("r")
    ops = TritonOps(em)
    leaves = {"q": (Sym(em, "q_first"), Sym(em, "q_last")), "n_q": (Sym(em, "n_q"), Sym(em, "n_q")),
              "n_k": (Sym(em, "n_k"), Sym(em, "n_k"))}
    ev = IntervalEvaluator(ops, leaves)
    ranges = block_ranges(program, ops, ev, Sym(em, "n_k"), Sym(em, "BLOCK_N"))
    for i, (lo, hi, flo, fhi) in enumerate(ranges):
        em.named(f"lo{i}", lo)
        em.named(f"hi{i}", hi)
        em.named(f"flo{i}", flo)
        em.named(f"fhi{i}", fhi)
    return em.lines, len(ranges)


@dataclass(frozen=True)
class SetupRead:
    """A runtime-input read the tile classifier knows per block: its min / max over each block's rows (or,
    for side 'qk', over each tile)."""
    index: int
    node: ir.Node
    side: str                 # 'q' or 'k': the one position its indices use; 'qk': a dense mask (plan.tile_axes)
    text: str


@dataclass(frozen=True)
class ClassifierCode:
    """The tile classifier's hook: interval code over block summaries, and what it reads."""
    lines: list
    status_expr: str          # may + must as int32 (2 full, 1 partial, 0 empty)
    reads: tuple              # SetupRead, in kernel-argument order
    modulus: int              # residue classes of a residue permutation (0: none)
    # (query read, key read) indices into reads when keys are sorted by a bucket id first and the mask
    # requires the two ids equal (x[.., q] == y[.., k]): a query block meets only the key blocks whose ids
    # overlap its own, found by counting (see bucket_pair); None otherwise.
    bucket: tuple | None = None


@_per_pattern
def classifier_code(pir: PatternIR) -> ClassifierCode:
    """Triton code evaluating the mask to (must, may) over a query block x BLOCK_J key blocks, with the
    interval rules of :class:`attnc.interval.IntervalEvaluator` (the ones the torch classifiers use).

    Leaves are block summaries: ``q_lo``/``q_hi`` (scalars) and ``k_lo``/``k_hi`` (vectors) are the
    smallest and largest original positions of the block, ``rd<i>_lo``/``rd<i>_hi`` the same for each
    runtime-input read indexed by one position (or per tile, for a dense mask ``m[b, q, k]``),
    ``qres_*``/``kres_*`` for position % modulus."""
    transform = layout_transform(pir.mask)
    modulus = next((key.modulus for key in transform.query_keys if key.kind == "residue"), 0) if transform else 0
    em = Emitter("c")
    ops = TritonOps(em)
    leaves = _block_leaves(em)
    reads: list[SetupRead] = []

    def read(node: ir.Node, idx):
        side = summarized_side(node)
        if side is None:
            # A dense mask read m[b, q, k]: known per tile, on rows in order (a layout transform would need
            # its summary over the sorted rows of each tile; there it stays unknown: every tile partial).
            if transform is not None or tile_axes(node) is None:
                return None
            side = "qk"
        r = next((r for r in reads if r.node == node), None)
        if r is None:
            r = SetupRead(len(reads), node, side, ir.to_text(node))
            reads.append(r)
        lo, hi = Sym(em, f"rd{r.index}_lo"), Sym(em, f"rd{r.index}_hi")
        return (lo > 0, hi > 0) if node.type == "bool" else (lo, hi)

    residues = ({side: (modulus, Sym(em, f"{side}res_lo"), Sym(em, f"{side}res_hi")) for side in "qk"}
                if modulus else {})
    must, may = IntervalEvaluator(ops, leaves, read, residues)(pir.mask)

    def as_int(x) -> str:
        return str(int(x)) if isinstance(x, bool) else f"{x.text}.to(tl.int32)"

    return ClassifierCode(list(em.lines), f"{as_int(may)} + {as_int(must)}", tuple(reads), modulus,
                          bucket_pair(pir, reads))


def bucket_conjunct(pir: PatternIR) -> ir.Node | None:
    """The conjunct x[.., q] == y[.., k] the layout's bucket sort comes from (``LayoutTransform.bucket_atom``)
    when keys are sorted by y first and it has coefficients 1 and -1 and no constant, so that the two ids are
    equal, not merely related; None otherwise."""
    transform = layout_transform(pir.mask)
    if transform is None or transform.bucket_atom is None or transform.key_keys[0].kind != "bucket":
        return None
    q_node = next(key.node for key in transform.query_keys if key.kind == "bucket")
    k_node = transform.key_keys[0].node
    terms, const = ir.linear(transform.bucket_atom.args[0])
    if const == 0 and terms[q_node] == -terms[k_node] and abs(terms[q_node]) == 1:
        return transform.bucket_atom
    return None


def bucket_pair(pir: PatternIR, reads: list) -> tuple | None:
    """(query read, key read) indices of ``reads`` for the :func:`bucket_conjunct` x[.., q] == y[.., k]. Key
    blocks are then in order of their (clamped) ids, so the blocks whose ids overlap a query block's are one
    range, and every tile outside it is empty."""
    atom = bucket_conjunct(pir)
    if atom is None:
        return None
    transform = layout_transform(pir.mask)
    k_node = transform.key_keys[0].node
    q_node = next(key.node for key in transform.query_keys if key.kind == "bucket")
    qi = next((r.index for r in reads if r.node == q_node and r.side == "q"), None)
    ki = next((r.index for r in reads if r.node == k_node and r.side == "k"), None)
    return (qi, ki) if qi is not None and ki is not None else None


def pure_bucket_mask(pir: PatternIR) -> ir.Node | None:
    """The mask without its :func:`bucket_conjunct`, for tiles of a sorted layout in which every block holds
    rows of one bucket id only (a device flag, attnc.layout.Layout.pure, says so per call): on every tile
    the classifier lists, the two blocks' ids are then equal, so the conjunct is true on the whole tile
    and the partial tiles (the causal diagonal inside a bucket) need only the rest. None when the mask has
    no such conjunct, or when the sort does not pad buckets to whole blocks (documents: their blocks hold
    several ids as a rule, so the flag would not be set)."""
    atom = bucket_conjunct(pir)
    if atom is None or classifier_code(pir).bucket is None or not all(padded_sides(layout_transform(pir.mask))):
        return None      # (the flag is cleared by the summaries of the ids classifier_code reads)
    rest = [a for a in (pir.mask.args if pir.mask.op == "and" else (pir.mask,)) if a is not atom]
    return ir.and_(*rest)


def mirrored_summaries(code: ClassifierCode) -> bool:
    """Whether a block of queries and a block of keys holding the same positions have the same summary:
    each side reads the same tensors, in the same order, at its own position (documents: ``doc[b, q]``
    and ``doc[b, k]``)."""
    return mirrored_reads([r.node for r in code.reads if r.side == "q"], [r.node for r in code.reads if r.side == "k"])


def summary_slots(code: ClassifierCode, side: str) -> list[str]:
    """What the summary of a block of ``side`` rows holds, in order: positions, residues, reads."""
    return ["position"] + (["residue"] if code.modulus else []) + [r.text for r in code.reads if r.side == side]


def _side_context(pir: PatternIR, code: ClassifierCode, side: str) -> dict:
    """The per-side setup kernels' code: block summaries (positions, residues, reads) and sort keys."""
    pos = LEAF_NAMES[side]
    printer = ElementwisePrinter(f"{side}s")
    values = [pos] + ([f"_mod({pos}, {code.modulus})"] if code.modulus else [])
    values += [printer(r.node) for r in code.reads if r.side == side]
    transform = layout_transform(pir.mask)
    keys = []
    for key in (transform.query_keys if side == "q" else transform.key_keys) if transform else ():
        # The radix sort takes keys of at most 16 bits (attnc.device_setup.key_bits); bucket ids are
        # clamped as in attnc.plan.sort_positions (ids past the range share a key: slower, still exact).
        if key.kind == "residue":
            keys.append(dict(text=f"position % {key.modulus}", lines=[],
                             value=f"tl.minimum(_mod({pos}, {key.modulus}), {BUCKET_KEY_MAX})"))
            continue
        kp = ElementwisePrinter(f"{side}k")
        var = kp(key.node)
        if key.kind == "keep":
            value = f"({var} == 0)"                                      # kept rows first
        else:
            value = f"_clamped_id({var}) + 1"
        keys.append(dict(text=ir.to_text(key.node) + (" (0: kept)" if key.kind == "keep" else " (clamped to 16 bits)"),
                         lines=kp.em.lines, value=value))
    pure_value = None
    if pure_bucket_mask(pir) is not None:
        # The summary value of the bucket id this side is sorted by: a block whose smallest and largest id
        # differ clears the flag that lets the kernels leave the bucket test out (pure_bucket_mask).
        read = code.reads[code.bucket[0 if side == "q" else 1]]
        pure_value = values.index(printer(read.node))
    return dict(name=side, slots=summary_slots(code, side), lines=printer.em.lines, summary_values=values,
                sort_keys=keys, pure_value=pure_value)


def render_setup(pir: PatternIR) -> str:
    """The Triton source of the pattern's setup kernels: sort keys and block summaries per side, and the
    tile classifier (runtime-input and layout-transform plans)."""
    code = classifier_code(pir)
    context = template_context(pir)
    context.update(classify_lines=code.lines, status_expr=code.status_expr, setup_reads=code.reads,
                   modulus=code.modulus, bucket=code.bucket, bucket_key_max=BUCKET_KEY_MAX,
                   sides=[_side_context(pir, code, side) for side in "qk"])
    return _environment().get_template("attn_setup.py.j2").render(**context)


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FunctionLoader(lambda name: _resource_text("attnc.templates",
                                                                                          "templates", name)),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    return env


@_per_pattern
def kernel_mode(pir: PatternIR) -> str:
    """How a pattern runs: 'permuted' when a layout transform applies (sorted rows, tile lists and
    original positions), 'lists' when the mask reads runtime inputs (tiles classified on the device),
    else 'ranges' (closed-form key ranges)."""
    from .plan import layout_transform
    if layout_transform(pir.mask) is not None:
        return "permuted"
    return "lists" if ir.uses(pir.mask, "read") else "ranges"


def template_context(pir: PatternIR, mode: str | None = None) -> dict:
    """What the templates need to know about a pattern: the hooks' code and the plan's shape."""
    mode = mode or kernel_mode(pir)
    permuted = mode in ("permuted", "residue")
    residue_ranges = mode == "residue"
    tile_mask = range_mask = pir.mask
    if residue_ranges:
        # Residue classes in closed form: every tile pairs rows of one class, so the residue test holds and
        # the tiles leave it out; the key ranges are those of the class-local mask (one problem of n / d rows
        # per class; attnc.plan.residue_local_mask); partial tiles still test the rest of the mask on the
        # rows' original positions.
        from .plan import residue_local_mask, without_residue
        modulus, range_mask = residue_local_mask(pir.mask)
        tile_mask = without_residue(pir.mask, modulus)
        mode = "ranges"
    # Partial tiles know their position bounds unless rows are sorted by a loaded key (residue classes are
    # computed: the permuted kernels then have bounds, TILE_BOUNDS in the templates).
    transform = layout_transform(pir.mask) if permuted else None
    bounded = transform is None or all(key.kind == "residue" for key in transform.query_keys + transform.key_keys)
    mask_lines = tile_mask_code(tile_mask, "m", bounded)
    pure_mask = pure_bucket_mask(pir) if mode == "permuted" else None
    # A mask of the bucket conjunct alone leaves nothing to test.
    pure_lines = (tile_mask_code(pure_mask, "pm", bounded) if pure_mask is not None and pure_mask.op != "const"
                  else [])
    score_lines, score_var, dscore_lines, dscore_var = [], "s", [], "1.0"
    if pir.score is not None:
        score_printer = ElementwisePrinter("sc")
        score_var = score_printer(pir.score)
        score_lines = score_printer.em.lines
        dscore_printer = ElementwisePrinter("ds")
        dscore_var = dscore_printer(ir.derivative(pir.score, ir.score()))
        dscore_lines = dscore_printer.em.lines
    range_lines, n_parts = _range_code(range_program(range_mask)) if mode == "ranges" else ([], 0)
    t_range_lines, t_n_parts = (_range_code(range_program(ir.swap_query_key(range_mask))) if mode == "ranges"
                                else ([], 0))
    inputs = [InputArg(d.name, d.dtype, len(d.dims)) for d in pir.inputs.values()]
    grads = _grad_context(pir)
    return dict(
        pattern=pir.name,
        params=", ".join(f"{k}={v!r}" for k, v in pir.params.items()) or "none",
        mask_notes=pir.mask_notes,
        score_note=pir.score_note,
        mask_text=ir.to_text(pir.mask),
        score_text=ir.to_text(pir.score) if pir.score is not None else None,
        mask_lines=mask_lines,
        bucket_pure=pure_mask is not None,     # partial tiles also come without the bucket conjunct
        pure_mask_text=ir.to_text(pure_mask) if pure_mask is not None else "",
        pure_mask_lines=pure_lines,
        score_lines=score_lines,
        score_var=score_var,
        dscore_lines=dscore_lines,
        dscore_var=dscore_var,
        has_score=pir.score is not None,
        mode=mode,
        lists=mode in ("lists", "permuted"),
        permuted=permuted,
        residue_ranges=residue_ranges,      # permuted rows in residue classes, closed-form ranges per class
        range_mask_text=ir.to_text(range_mask),
        range_lines=range_lines,
        n_parts=n_parts,
        range_targets=", ".join(f"lo{i}, hi{i}, flo{i}, fhi{i}" for i in range(n_parts)),
        t_range_lines=t_range_lines,
        t_n_parts=t_n_parts,
        t_range_targets=", ".join(f"lo{i}, hi{i}, flo{i}, fhi{i}" for i in range(t_n_parts)),
        pieces=_masked_pieces(n_parts),
        t_pieces=_masked_pieces(t_n_parts),
        input_params=[p for a in inputs for p in a.params],
        inputs=inputs,
        grad_inputs=grads,
        # The dQ kernel's parameters for them: the gradient's pointer and strides, and whether it is wanted.
        grad_params=[p for gi in grads for p in [f"{gi['name']}_g_ptr"]
                     + [f"{gi['name']}_gs{d}" for d in range(gi["ndim"])]],
        grad_flags=[f"{gi['name']}_want" for gi in grads],
    )


def _masked_pieces(parts: int) -> dict:
    """Names for the masked-loop pieces of a multi-disjunct range plan (``_masked_pieces`` in the
    templates): the tuple it returns, the loop's trip count, and the tile index at loop position ``i``
    (a chain of selects over the pieces' cumulative ends; no branch)."""
    if parts < 2:
        return {}
    names = [(f"ls{i}", f"le{i}", f"rs{i}", f"re{i}") for i in range(parts)]
    flat = [piece for ls, le, rs, re in names for piece in ((ls, le), (rs, re))]
    # Position i of the loop in piece k is tile start_k + i - end_(k-1).
    terms = []
    for k, (start, end) in enumerate(flat):
        offset = "i" if k == 0 else f"i - {flat[k - 1][1]}"
        terms.append((end, f"{start} + {offset}"))
    expr = terms[-1][1]
    for end, value in reversed(terms[:-1]):
        expr = f"tl.where(i < {end}, {value}, {expr})"
    return dict(targets=", ".join(x for quad in names for x in quad), total=flat[-1][1], index=expr)


def render_forward(pir: PatternIR, mode: str | None = None) -> str:
    """The Triton source of the forward kernel (and its helpers) for this pattern.

    ``mode`` overrides the plan mode: a permuted pattern whose permutation turns out to be the
    identity at run time (documents already contiguous) runs its 'lists' variant, without the
    indirection through original positions."""
    return _environment().get_template("attn_fwd.py.j2").render(**template_context(pir, mode))


def render_backward(pir: PatternIR, mode: str | None = None) -> str:
    """The Triton source of the backward kernels (dQ, and dK/dV) for this pattern."""
    return _environment().get_template("attn_bwd.py.j2").render(**template_context(pir, mode))
