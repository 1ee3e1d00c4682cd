"""Interval reasoning over the IR, written once for several backends.

An integer value is a pair ``(lo, hi)`` (or ``None`` when nothing is known); a boolean is a pair
``(must, may)``: true on the whole region when ``must``, false on the whole region unless ``may``.
The arithmetic uses Python operators plus a few backend functions, so the same code runs on Python ints,
on torch tensors (one interval per tile, vectorized), and on :class:`Sym` values that print Triton
source (the kernels evaluate key ranges in closed form with the very same rules).
"""

from __future__ import annotations

from typing import Callable

import torch

from . import ir


class TorchOps:
    """Backend for Python ints and torch tensors (floor semantics for // and %)."""

    @staticmethod
    def minimum(a, b):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))
        return min(a, b)

    @staticmethod
    def maximum(a, b):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))
        return max(a, b)

    @staticmethod
    def where(c, a, b):
        if isinstance(c, torch.Tensor) or isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return torch.where(torch.as_tensor(c), torch.as_tensor(a), torch.as_tensor(b))
        return a if c else b

    @staticmethod
    def floordiv(a, c: int):
        if isinstance(a, torch.Tensor):
            return torch.div(a, c, rounding_mode="floor")
        return a // c

    @staticmethod
    def mod(a, c: int):
        if isinstance(a, torch.Tensor):
            return torch.remainder(a, c)
        return a % c

    @staticmethod
    def logical_not(a):
        if isinstance(a, torch.Tensor):
            return torch.logical_not(a)
        return not a

    @staticmethod
    def const_bool(v: bool):
        return v


class Sym:
    """A scalar in generated Triton code; operators append statements to an :class:`Emitter`."""

    def __init__(self, em: "Emitter", text: str):
        self.em, self.text = em, text

    def _bin(self, op, other, swap=False):
        if op == "&" and isinstance(other, bool):
            return self if other else False
        if op == "|" and isinstance(other, bool):
            return True if other else self
        if (op in ("+", "-") and isinstance(other, int) and not isinstance(other, bool) and other == 0
                and (op == "+" or not swap)):
            return self
        if op == "*" and isinstance(other, int) and not isinstance(other, bool) and other == 1:
            return self
        o = other.text if isinstance(other, Sym) else repr(other)
        a, b = (o, self.text) if swap else (self.text, o)
        return self.em.value(f"{a} {op} {b}")

    __add__ = lambda s, o: s._bin("+", o)
    __radd__ = lambda s, o: s._bin("+", o, True)
    __sub__ = lambda s, o: s._bin("-", o)
    __rsub__ = lambda s, o: s._bin("-", o, True)
    __mul__ = lambda s, o: s._bin("*", o)
    __rmul__ = lambda s, o: s._bin("*", o, True)
    __le__ = lambda s, o: s._bin("<=", o)
    __ge__ = lambda s, o: s._bin(">=", o)
    __lt__ = lambda s, o: s._bin("<", o)
    __gt__ = lambda s, o: s._bin(">", o)
    __and__ = lambda s, o: s._bin("&", o)
    __rand__ = lambda s, o: s._bin("&", o, True)
    __or__ = lambda s, o: s._bin("|", o)
    __ror__ = lambda s, o: s._bin("|", o, True)

    def __neg__(self):
        return self.em.value(f"-{self.text}")

    def eq(self, o):
        return self._bin("==", o)


def sym_eq(a, b):
    """``a == b`` for ints, tensors and Syms (Sym overrides no __eq__, to stay hashable)."""
    if isinstance(a, Sym):
        return a.eq(b)
    if isinstance(b, Sym):
        return b.eq(a)
    return a == b


class Emitter:
    """Collects ``name = expr`` lines of Triton code; equal expressions share one name."""

    def __init__(self, prefix: str = "r"):
        self.lines: list[str] = []
        self.prefix = prefix
        self._names: dict[str, Sym] = {}

    def value(self, expr: str) -> Sym:
        if expr in self._names:
            return self._names[expr]
        name = f"{self.prefix}{len(self._names)}"
        self.lines.append(f"{name} = {expr}")
        sym = Sym(self, name)
        self._names[expr] = sym
        return sym

    def named(self, name: str, expr) -> Sym:
        text = expr.text if isinstance(expr, Sym) else repr(expr)
        self.lines.append(f"{name} = {text}")
        return Sym(self, name)


class TritonOps:
    """Backend that prints Triton scalar code through an :class:`Emitter`."""

    def __init__(self, em: Emitter):
        self.em = em

    def _t(self, x):
        return x.text if isinstance(x, Sym) else repr(x)

    # Python-level values are folded here, so the printed code only holds what depends on the call.
    def minimum(self, a, b):
        if not isinstance(a, Sym) and not isinstance(b, Sym):
            return min(a, b)
        return self.em.value(f"tl.minimum({self._t(a)}, {self._t(b)})")

    def maximum(self, a, b):
        if not isinstance(a, Sym) and not isinstance(b, Sym):
            return max(a, b)
        return self.em.value(f"tl.maximum({self._t(a)}, {self._t(b)})")

    def where(self, c, a, b):
        if not isinstance(c, Sym):
            return a if c else b
        return self.em.value(f"tl.where({self._t(c)}, {self._t(a)}, {self._t(b)})")

    def floordiv(self, a, c: int):
        return self.em.value(f"_floordiv({self._t(a)}, {self._t(c)})")

    def mod(self, a, c: int):
        return self.em.value(f"_mod({self._t(a)}, {self._t(c)})")

    def logical_not(self, a):
        return self.em.value(f"({self._t(a)} == 0)")

    def const_bool(self, v: bool):
        return v


UNKNOWN_BOOL = (False, True)


class IntervalEvaluator:
    """Evaluates IR nodes to intervals. ``leaves`` maps var/size names to intervals; ``read`` gives a
    read node's interval (or None) from its index intervals."""

    def __init__(self, ops, leaves: dict, read: Callable | None = None, residues: dict | None = None):
        self.ops, self.leaves, self.read = ops, leaves, read
        # residues: var -> (modulus, lo, hi) of position % modulus over the region (layout transforms)
        self.residues = residues or {}
        self.memo: dict = {}

    def __call__(self, node: ir.Node):
        if node in self.memo:
            return self.memo[node]
        value = self._eval(node)
        self.memo[node] = value
        return value

    def _eval(self, node: ir.Node):
        op, o = node.op, self.ops
        if node.type == "float":
            return None
        if op == "const":
            v = node.value
            return (v, v) if node.type == "bool" else (v, v)
        if op in ("var", "size"):
            return self.leaves.get(node.attr)
        if op == "read":
            if self.read is None:
                return UNKNOWN_BOOL if node.type == "bool" else None
            value = self.read(node, [self(a) for a in node.args])
            if value is None and node.type == "bool":
                return UNKNOWN_BOOL
            return value
        if node.type == "bool":
            return self._bool(node)
        args = [self(a) for a in node.args] if op != "lin" else None
        if op == "lin":
            items, c = node.attr
            lo = hi = c
            for term, coeff in items:
                t = self(term)
                if t is None:
                    return None
                a, b = (t[0] * coeff, t[1] * coeff) if coeff > 0 else (t[1] * coeff, t[0] * coeff)
                lo, hi = lo + a, hi + b
            return lo, hi
        if any(a is None for a in args if True) and op != "where":
            return None
        if op == "neg":
            return -args[0][1], -args[0][0]
        if op in ("add", "sub"):
            (a0, a1), (b0, b1) = args
            return (a0 + b0, a1 + b1) if op == "add" else (a0 - b1, a1 - b0)
        if op in ("min", "max"):
            f = o.minimum if op == "min" else o.maximum
            return f(args[0][0], args[1][0]), f(args[0][1], args[1][1])
        if op in ("floordiv", "mod"):
            divisor = node.args[1]
            if not divisor.is_const or divisor.value <= 0:
                return None
            c = divisor.value
            lo, hi = args[0]
            if op == "floordiv":
                return o.floordiv(lo, c), o.floordiv(hi, c)
            same = sym_eq(o.floordiv(lo, c), o.floordiv(hi, c))
            lo_r, hi_r = o.where(same, o.mod(lo, c), 0), o.where(same, o.mod(hi, c), c - 1)
            exact = self._residue(node.args[0], c)
            if exact is not None:
                known, value = exact
                lo_r, hi_r = o.where(known, value, lo_r), o.where(known, value, hi_r)
            return lo_r, hi_r
        if op == "abs":
            lo, hi = args[0]
            return (o.maximum(o.maximum(lo, -hi), 0), o.maximum(-lo, hi))
        if op == "where":
            cond = self(node.args[0])
            a, b = args[1], args[2]
            if a is None or b is None:
                return None
            must, may = cond
            lo = o.where(must, a[0], o.where(may, o.minimum(a[0], b[0]), b[0]))
            hi = o.where(must, a[1], o.where(may, o.maximum(a[1], b[1]), b[1]))
            return lo, hi
        return None   # mul of two unknowns and anything else: no bound

    def _residue(self, arg: ir.Node, c: int):
        """(known, value) of ``arg % c`` when arg is linear in positions whose residues mod c are
        constant over the region (after a residue permutation), else None."""
        terms, const = ir.linear(arg)
        if not terms or not all(t.op == "var" and t.attr in self.residues and self.residues[t.attr][0] == c
                                for t in terms):
            return None
        o = self.ops
        known, value = True, const
        for t, coeff in terms.items():
            _, rlo, rhi = self.residues[t.attr]
            known = known & sym_eq(rlo, rhi)
            value = value + coeff * rlo
        return known, o.mod(value, c)

    def _bool(self, node: ir.Node):
        op, o = node.op, self.ops
        if op in ("and", "or"):
            vals = [self(a) for a in node.args]
            must, may = vals[0]
            for m2, y2 in vals[1:]:
                if op == "and":
                    must, may = must & m2, may & y2
                else:
                    must, may = must | m2, may | y2
            return must, may
        if op == "not":
            inner = self(node.args[0])
            return o.logical_not(inner[1]), o.logical_not(inner[0])
        if op in ("le", "eq", "ne", "lt") and node.args[0].type == "int":
            lhs, rhs = self(node.args[0]), self(node.args[1])
            if lhs is None or rhs is None:
                return UNKNOWN_BOOL
            (a0, a1), (b0, b1) = lhs, rhs
            if op == "le":
                return a1 <= b0, a0 <= b1
            if op == "lt":
                return a1 < b0, a0 < b1
            must_eq = sym_eq(a0, a1) & sym_eq(b0, b1) & sym_eq(a0, b0)
            may_eq = (a0 <= b1) & (b0 <= a1)
            if op == "eq":
                return must_eq, may_eq
            return o.logical_not(may_eq), o.logical_not(must_eq)
        if op == "where":
            c, a, b = (self(x) for x in node.args)
            return ((c[0] & a[0]) | (o.logical_not(c[1]) & b[0]) | (a[0] & b[0]),
                    (c[1] & a[1]) | (o.logical_not(c[0]) & b[1]))
        return UNKNOWN_BOOL
