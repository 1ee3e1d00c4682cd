"""Stage 3: the expression IR.

Nodes are immutable and hash-consed: building the same expression twice gives the same object, so a
pattern is a DAG with shared subexpressions, equality is identity, and passes can memoize on nodes.
The smart constructors below fold constants and canonicalize as they build:

* integer comparisons become ``L <= c``, ``L == c`` or ``L != c`` where ``L`` is a linear combination of
  terms with coprime integer coefficients (``q - w <= k`` and ``k >= q - w`` are the same node);
* ``and``/``or`` are flattened, deduplicated and sorted; ``not`` is pushed down to the atoms (negation
  normal form), so the planner sees a monotone formula over atoms;
* arithmetic with constants is folded (``x + 0``, ``x * 1``, ``2 * 3``...).

An *atom* is a boolean leaf of that formula. :func:`atom_kind` names the classes later stages reason
about: affine constraints on q, k and q - k; modular constraints; coordinate constraints (``//``, ``%`` of
positions); equalities of tensor reads; boolean tensor reads; everything else is opaque.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

INDEX_VARS = ("b", "h", "q", "k")
SIZES = ("batch", "heads", "n_q", "n_k")
TYPES = ("int", "float", "bool")

ARITH_OPS = ("add", "sub", "mul", "div", "floordiv", "mod", "neg", "abs", "min", "max")
FLOAT_FUNCS = ("exp", "log", "sqrt", "tanh", "sigmoid")
COMPARE_OPS = ("eq", "ne", "lt", "le")
BOOL_OPS = ("and", "or", "not")


class ConstantDivisionByZero(ArithmeticError):
    """Raised by the constructors when a constant divisor is zero; analysis turns it into a PatternError."""


class Node:
    """One IR node. Build nodes only through the constructors of this module."""

    __slots__ = ("op", "args", "attr", "type", "_text", "__weakref__")
    _table: dict = {}

    def __new__(cls, op: str, args: tuple = (), attr=None, type: str = "int"):
        key = (op, args, attr, type)
        node = cls._table.get(key)
        if node is None:
            node = object.__new__(cls)
            node.op, node.args, node.attr, node.type = op, args, attr, type
            node._text = None
            cls._table[key] = node
        return node

    def __repr__(self):
        return f"Node({to_text(self)})"

    def __reduce__(self):
        # Pickles and copies go through the constructor, so a loaded node is the process's one node with
        # these fields (hash-consing survives them).
        return (Node, (self.op, self.args, self.attr, self.type))

    # Identity is equality (hash-consing); keep the default object hash and eq.

    @property
    def is_const(self) -> bool:
        return self.op == "const"

    @property
    def value(self):
        assert self.op == "const"
        return self.attr[0]


# --------------------------------------------------------------------------------------------------
# Leaves


def const(value) -> Node:
    if isinstance(value, bool):
        return Node("const", (), (value, "bool"), "bool")
    if isinstance(value, int):
        return Node("const", (), (int(value), "int"), "int")
    value = float(value)
    return Node("const", (), (value, "float"), "float")


TRUE, FALSE = const(True), const(False)


def var(name: str) -> Node:
    assert name in INDEX_VARS
    return Node("var", (), name, "int")


def size(name: str) -> Node:
    assert name in SIZES
    return Node("size", (), name, "int")


def score() -> Node:
    return Node("score", (), None, "float")


def read(tensor: str, dtype: str, indices: Iterable[Node]) -> Node:
    """A read of runtime input ``tensor`` (declared dtype ``dtype``) at the given index nodes."""
    return Node("read", tuple(indices), tensor, dtype)


# --------------------------------------------------------------------------------------------------
# Arithmetic


def _num_type(*nodes: Node) -> str:
    return "float" if any(n.type == "float" for n in nodes) else "int"


def to_float(x: Node) -> Node:
    if x.type == "float":
        return x
    if x.is_const:
        return const(float(x.value))
    return Node("tofloat", (x,), None, "float")


def _fold(op: str, args: tuple[Node, ...], typ: str, fn: Callable):
    if all(a.is_const for a in args):
        value = fn(*(a.value for a in args))
        return const(float(value) if typ == "float" else value)
    return None


def add(a: Node, b: Node) -> Node:
    typ = _num_type(a, b)
    if typ == "int":
        return linear_node(*_lin_add(linear(a), linear(b), 1))
    folded = _fold("add", (a, b), typ, lambda x, y: x + y)
    if folded is not None:
        return folded
    if b.is_const and b.value == 0:
        return to_float(a)
    if a.is_const and a.value == 0:
        return to_float(b)
    return Node("add", (a, b), None, typ)


def sub(a: Node, b: Node) -> Node:
    typ = _num_type(a, b)
    if typ == "int":
        return linear_node(*_lin_add(linear(a), linear(b), -1))
    folded = _fold("sub", (a, b), typ, lambda x, y: x - y)
    if folded is not None:
        return folded
    if b.is_const and b.value == 0:
        return to_float(a)
    return Node("sub", (a, b), None, typ)


def neg(a: Node) -> Node:
    if a.type == "int":
        terms, c = linear(a)
        return linear_node({t: -v for t, v in terms.items()}, -c)
    if a.is_const:
        return const(-a.value)
    if a.op == "neg":
        return a.args[0]
    return Node("neg", (a,), None, a.type)


def mul(a: Node, b: Node) -> Node:
    typ = _num_type(a, b)
    if typ == "int" and (a.is_const or b.is_const):
        c, other = (a, b) if a.is_const else (b, a)
        terms, k = linear(other)
        return linear_node({t: v * c.value for t, v in terms.items()}, k * c.value)
    folded = _fold("mul", (a, b), typ, lambda x, y: x * y)
    if folded is not None:
        return folded
    for x, y in ((a, b), (b, a)):
        if x.is_const and x.value == 1:
            return to_float(y) if typ == "float" else y
    if typ == "int":
        a, b = sorted((a, b), key=sort_key)
    return Node("mul", (a, b), None, typ)


def div(a: Node, b: Node) -> Node:
    """True (float) division."""
    if b.is_const and b.value == 0:
        raise ConstantDivisionByZero("division by zero")
    a, b = to_float(a), to_float(b)
    folded = _fold("div", (a, b), "float", lambda x, y: x / y)
    if folded is not None:
        return folded
    if b.is_const and b.value == 1:
        return a
    return Node("div", (a, b), None, "float")


def floordiv(a: Node, b: Node) -> Node:
    if b.is_const and b.value == 0:
        raise ConstantDivisionByZero("integer division by zero")
    typ = _num_type(a, b)
    folded = _fold("floordiv", (a, b), typ, lambda x, y: x // y)
    if folded is not None:
        return folded
    if b.is_const and b.value == 1 and typ == "int":
        return a
    return Node("floordiv", (a, b), None, typ)


def mod(a: Node, b: Node) -> Node:
    if b.is_const and b.value == 0:
        raise ConstantDivisionByZero("modulo by zero")
    typ = _num_type(a, b)
    folded = _fold("mod", (a, b), typ, lambda x, y: x % y)
    if folded is not None:
        return folded
    if b.is_const and b.value in (1, -1) and typ == "int":
        return const(0)
    return Node("mod", (a, b), None, typ)


def abs_(a: Node) -> Node:
    if a.is_const:
        return const(abs(a.value))
    if a.op == "abs":
        return a
    return Node("abs", (a,), None, a.type)


def min_(a: Node, b: Node) -> Node:
    return _minmax("min", a, b, min)


def max_(a: Node, b: Node) -> Node:
    return _minmax("max", a, b, max)


def _minmax(op, a, b, fn):
    typ = _num_type(a, b)
    if typ == "float":
        a, b = to_float(a), to_float(b)
    folded = _fold(op, (a, b), typ, fn)
    if folded is not None:
        return folded
    if a is b:
        return a
    a, b = sorted((a, b), key=sort_key)
    return Node(op, (a, b), None, typ)


def clamp(x: Node, lo: Node, hi: Node) -> Node:
    return min_(max_(x, lo), hi)


def float_func(name: str, a: Node) -> Node:
    assert name in FLOAT_FUNCS
    a = to_float(a)
    if a.is_const:
        fns = {"exp": math.exp, "log": math.log, "sqrt": math.sqrt, "tanh": math.tanh,
               "sigmoid": lambda x: 1.0 / (1.0 + math.exp(-x))}
        try:
            return const(fns[name](a.value))
        except (ValueError, OverflowError):
            pass  # leave it to run time (inf / nan semantics as torch and Triton give them)
    return Node(name, (a,), None, "float")


def where(c: Node, a: Node, b: Node) -> Node:
    if a.type != b.type:
        a, b = to_float(a), to_float(b)
    if c.is_const:
        return a if c.value else b
    if a is b:
        return a
    if a.type == "bool":
        return or_(and_(c, a), and_(not_(c), b))
    return Node("where", (c, a, b), None, a.type)


# --------------------------------------------------------------------------------------------------
# Linear forms of integer expressions


def linear(node: Node) -> tuple[dict, int]:
    """``node`` (int) as ``sum(coeff * term) + const``; non-linear subterms are opaque terms."""
    if node.is_const:
        return {}, node.value
    if node.op == "lin":
        return dict(node.attr[0]), node.attr[1]
    return {node: 1}, 0


def _lin_add(x, y, sign):
    terms = dict(x[0])
    for t, v in y[0].items():
        terms[t] = terms.get(t, 0) + sign * v
    return {t: v for t, v in terms.items() if v}, x[1] + sign * y[1]


_VAR_ORDER = {n: i for i, n in enumerate(("q", "k", "b", "h", "n_q", "n_k", "batch", "heads"))}


def sort_key(node: Node):
    if node.op in ("var", "size"):
        return (0, _VAR_ORDER[node.attr], "")
    # Terms over q come before terms over k, so `x[b, q] - x[b, k]` reads in the natural order.
    rank = min((_VAR_ORDER[v] for v in free_vars(node)), default=9)
    return (1, rank, to_text(node))


def linear_node(terms: dict, c: int) -> Node:
    """The canonical node for ``sum(coeff * term) + c``: a constant, a bare term, or a ``lin`` node."""
    terms = {t: v for t, v in terms.items() if v}
    if not terms:
        return const(c)
    if c == 0 and len(terms) == 1:
        (t, v), = terms.items()
        if v == 1:
            return t
    items = tuple(sorted(terms.items(), key=lambda tv: sort_key(tv[0])))
    return Node("lin", tuple(t for t, _ in items), (items, c), "int")


# --------------------------------------------------------------------------------------------------
# Comparisons


def compare(op: str, a: Node, b: Node) -> Node:
    """``a op b`` for op in eq ne lt le gt ge; integer comparisons are put in canonical linear form."""
    if op in ("gt", "ge"):
        return compare({"gt": "lt", "ge": "le"}[op], b, a)
    if a.type == "bool" or b.type == "bool":
        # Equality of booleans: x == y  <=>  (x and y) or (not x and not y).
        eq = or_(and_(a, b), and_(not_(a), not_(b)))
        return eq if op == "eq" else not_(eq)
    if a.type == "int" and b.type == "int":
        terms, c = _lin_add(linear(a), linear(b), -1)     # a - b = L + c
        return _int_compare(op, terms, c)
    a, b = to_float(a), to_float(b)
    if a.is_const and b.is_const:
        return const({"eq": a.value == b.value, "ne": a.value != b.value,
                      "lt": a.value < b.value, "le": a.value <= b.value}[op])
    if op in ("eq", "ne"):
        a, b = sorted((a, b), key=sort_key)
    return Node(op, (a, b), None, "bool")


def _int_compare(op: str, terms: dict, c: int) -> Node:
    """``L + c op 0`` in canonical form ``L' op' c'`` with coprime coefficients."""
    if not terms:
        return const({"eq": c == 0, "ne": c != 0, "lt": c < 0, "le": c <= 0}[op])
    if op == "lt":                              # L + c < 0  <=>  L + c + 1 <= 0 (integers)
        op, c = "le", c + 1
    g = 0
    for v in terms.values():
        g = math.gcd(g, abs(v))
    rhs = -c
    if op == "le":                              # L <= rhs  <=>  L/g <= floor(rhs/g)
        terms = {t: v // g for t, v in terms.items()}
        rhs = rhs // g
    else:
        if rhs % g:
            return const(op == "ne")
        terms = {t: v // g for t, v in terms.items()}
        rhs //= g
        first = min(terms, key=sort_key)
        if terms[first] < 0:                    # eq/ne: make the leading coefficient positive
            terms = {t: -v for t, v in terms.items()}
            rhs = -rhs
    return Node(op, (linear_node(terms, 0), const(rhs)), None, "bool")


# --------------------------------------------------------------------------------------------------
# Booleans (kept in negation normal form)


def _flatten(op: str, args: Iterable[Node]) -> list[Node]:
    out = []
    for a in args:
        if a.op == op:
            out.extend(a.args)
        else:
            out.append(a)
    return out


def and_(*args: Node) -> Node:
    return _junction("and", args)


def or_(*args: Node) -> Node:
    return _junction("or", args)


def _junction(op: str, args) -> Node:
    unit, zero = (TRUE, FALSE) if op == "and" else (FALSE, TRUE)
    items = []
    for a in _flatten(op, args):
        assert a.type == "bool", a
        if a is zero:
            return zero
        if a is unit or a in items:
            continue
        items.append(a)
    if not items:
        return unit
    if len(items) == 1:
        return items[0]
    items.sort(key=sort_key)
    return Node(op, tuple(items), None, "bool")


def not_(a: Node) -> Node:
    assert a.type == "bool", a
    if a.is_const:
        return const(not a.value)
    if a.op == "not":
        return a.args[0]
    if a.op == "and":
        return or_(*(not_(x) for x in a.args))
    if a.op == "or":
        return and_(*(not_(x) for x in a.args))
    if a.op in ("eq", "ne") and a.args[0].type != "float":
        return Node("ne" if a.op == "eq" else "eq", a.args, None, "bool")
    if a.op == "le" and a.args[0].type == "int":  # not (L <= c)  <=>  -L <= -c - 1
        terms, _ = linear(a.args[0])
        return _int_compare("le", {t: -v for t, v in terms.items()}, a.args[1].value + 1)
    # Floats: keep an explicit not (NaN makes 'not (x < y)' differ from 'x >= y').
    return Node("not", (a,), None, "bool")


# --------------------------------------------------------------------------------------------------
# Traversal, printing, atoms


def postorder(roots: Iterable[Node]) -> list[Node]:
    """Every node reachable from ``roots``, children before parents, each once."""
    seen, order = set(), []
    stack = [(r, False) for r in roots]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        stack.extend((c, False) for c in reversed(node.args))
    return order


_INFIX = {"add": ("+", 4), "sub": ("-", 4), "mul": ("*", 5), "div": ("/", 5), "floordiv": ("//", 5),
          "mod": ("%", 5), "eq": ("==", 2), "ne": ("!=", 2), "lt": ("<", 2), "le": ("<=", 2)}


def to_text(node: Node, names: dict | None = None) -> str:
    """The expression in the pattern language's own syntax (what ``--emit ir`` prints)."""
    if names is None and node._text is not None:
        return node._text
    text, _ = _fmt(node, names or {})
    if names is None:
        node._text = text
    return text


def _fmt(node: Node, names: dict) -> tuple[str, int]:
    """(text, precedence); higher binds tighter."""
    if node in names:
        return names[node], 9
    op = node.op
    if op == "const":
        v = node.value
        if isinstance(v, bool):
            return ("true" if v else "false"), 9
        if isinstance(v, float):
            return (repr(v) if math.isfinite(v) else f"({v})"), 9 if v >= 0 else 6
        return str(v), 9 if v >= 0 else 6
    if op in ("var", "size"):
        return node.attr, 9
    if op == "score":
        return "score", 9
    if op == "read":
        return f"{node.attr}[{', '.join(_fmt(a, names)[0] for a in node.args)}]", 9
    if op == "lin":
        items, c = node.attr
        parts = []
        # Positive terms first: `k - q <= 0` reads better than `-q + k <= 0`.
        for term, coeff in sorted(items, key=lambda tc: tc[1] < 0):
            t, p = _fmt(term, names)
            if p < 5 or (abs(coeff) != 1 and p < 6) or (not parts and coeff < 0 and p < 6):
                t = f"({t})"
            body = t if abs(coeff) == 1 else f"{abs(coeff)} * {t}"
            if not parts:
                parts.append(body if coeff > 0 else f"-{body}")
            else:
                parts.append(("+ " if coeff > 0 else "- ") + body)
        if c:
            parts.append(("+ " if c > 0 else "- ") + str(abs(c)))
        return " ".join(parts), 4
    if op in _INFIX:
        sym, prec = _INFIX[op]
        left, lp = _fmt(node.args[0], names)
        right, rp = _fmt(node.args[1], names)
        if lp < prec or (prec == 2 and lp == 2):
            left = f"({left})"
        if rp <= prec:
            right = f"({right})"
        return f"{left} {sym} {right}", prec
    if op in ("and", "or"):
        prec = 1 if op == "and" else 0
        parts = []
        for a in node.args:
            t, p = _fmt(a, names)
            parts.append(f"({t})" if p <= prec else t)
        return f" {op} ".join(parts), prec
    if op == "not":
        t, p = _fmt(node.args[0], names)
        return f"not {t if p >= 2 else '(' + t + ')'}", 1.5
    if op == "neg":
        t, p = _fmt(node.args[0], names)
        return f"-{t if p >= 6 else '(' + t + ')'}", 6
    if op == "tofloat":
        return f"float({_fmt(node.args[0], names)[0]})", 9
    return f"{op}({', '.join(_fmt(a, names)[0] for a in node.args)})", 9


def uses(node: Node, op: str, attr=None) -> bool:
    return any(n.op == op and (attr is None or n.attr == attr) for n in postorder([node]))


def free_vars(node: Node) -> set[str]:
    return {n.attr for n in postorder([node]) if n.op == "var"}


def atoms(formula: Node) -> list[Node]:
    """The leaves of an and/or formula, in first-seen order (in NNF a ``not`` wraps an atom)."""
    out, stack = [], [formula]
    while stack:
        n = stack.pop()
        if n.op in ("and", "or"):
            stack.extend(reversed(n.args))
        elif not n.is_const and n not in out:
            out.append(n)
    return out


def atom_kind(atom: Node) -> str:
    """Classify an atom: 'affine', 'modular', 'coordinate', 'tensor-eq', 'tensor-bool' or 'opaque'."""
    target = atom.args[0] if atom.op == "not" else atom
    if target.op == "read":
        return "tensor-bool"
    if target.op in ("eq", "ne", "le", "lt") and target.args[0].type == "int":
        lhs = target.args[0]
        terms = linear(lhs)[0]
        if all(t.op in ("var", "size") for t in terms):
            return "affine"
        reads = [t for t in terms if t.op == "read"]
        if reads and target.op in ("eq", "ne") and len(terms) == 2 and sorted(terms.values()) == [-1, 1]:
            return "tensor-eq"
        if any(t.op == "read" for t in postorder([lhs])):
            return "opaque"
        if any(t.op == "mod" for t in terms) and len(terms) == 1:
            inner = next(iter(terms))
            if all(x.op in ("var", "size") for x in linear(inner.args[0])[0]) and inner.args[1].is_const:
                return "modular"
        if any(n.op in ("floordiv", "mod", "min", "max") for n in postorder([lhs])):
            return "coordinate"
    if target.op in ("eq", "ne") and all(a.op == "read" for a in target.args):
        return "tensor-eq"
    return "opaque"


def affine_detail(atom: Node) -> str:
    """For an affine atom, which positions it constrains: 'q - k', 'q', 'k' or 'q, k'."""
    terms = linear(atom.args[0])[0]
    cq = sum(v for t, v in terms.items() if t.op == "var" and t.attr == "q")
    ck = sum(v for t, v in terms.items() if t.op == "var" and t.attr == "k")
    if cq and ck:
        return "q - k" if cq == -ck else "q, k"
    return "q" if cq else ("k" if ck else "sizes")


# --------------------------------------------------------------------------------------------------
# Symbolic differentiation (for score modifiers in the backward kernels)


def derivative(node: Node, wrt: Node) -> Node:
    """d node / d wrt for a float expression, simplified by the constructors (memoized per call)."""
    memo: dict = {}

    def d(n: Node) -> Node:
        if n in memo:
            return memo[n]
        r = _derivative_step(n, wrt, d)
        memo[n] = r
        return r

    return d(node)


def _derivative_step(n: Node, wrt: Node, d) -> Node:
    zero, one = const(0.0), const(1.0)
    if n is wrt:
        return one
    if n.type != "float" or n.op in ("const", "read", "tofloat", "var", "size", "score"):
        return zero                                      # (the score and reads are leaves: wrt is one of them)
    a = n.args
    if n.op == "add":
        return add(d(a[0]), d(a[1]))
    if n.op == "sub":
        return sub(d(a[0]), d(a[1]))
    if n.op == "neg":
        return neg(d(a[0]))
    if n.op == "mul":
        return add(_mulf(d(a[0]), a[1]), _mulf(a[0], d(a[1])))
    if n.op == "div":                                    # (u/v)' = u'/v - u v' / v^2
        return sub(div(d(a[0]), a[1]), div(_mulf(a[0], d(a[1])), _mulf(a[1], a[1])))
    if n.op == "exp":
        return _mulf(n, d(a[0]))
    if n.op == "log":
        return div(d(a[0]), a[0])
    if n.op == "sqrt":
        return div(d(a[0]), _mulf(const(2.0), n))
    if n.op == "tanh":
        return _mulf(sub(one, _mulf(n, n)), d(a[0]))
    if n.op == "sigmoid":
        return _mulf(_mulf(n, sub(one, n)), d(a[0]))
    if n.op == "abs":
        return where(compare("lt", a[0], const(0.0)), neg(d(a[0])), d(a[0]))
    if n.op in ("min", "max"):
        first = compare("le", a[0], a[1]) if n.op == "min" else compare("le", a[1], a[0])
        return where(first, d(a[0]), d(a[1]))
    if n.op == "where":
        return where(a[0], d(a[1]), d(a[2]))
    if n.op in ("floordiv", "mod"):
        return zero if n.op == "floordiv" else d(a[0])
    raise NotImplementedError(f"no derivative for {n.op}")


def _mulf(x: Node, y: Node) -> Node:
    """Float product that drops multiplications by 0 and 1."""
    for u, v in ((x, y), (y, x)):
        if u.is_const and u.value == 0:
            return const(0.0)
        if u.is_const and u.value == 1:
            return to_float(v)
    return mul(x, y)


def substitute(node: Node, leaves: dict) -> Node:
    """``node`` with each leaf (a ``var`` or ``size`` node) that is a key of ``leaves`` replaced by its value,
    rebuilt through the constructors, so linear forms and integer comparisons come out canonical again."""
    memo: dict = {}
    for n in postorder([node]):
        args = tuple(memo[a] for a in n.args)
        if n in leaves:
            out = leaves[n]
        elif n.op == "lin":
            items, c = n.attr
            out = const(c)
            for t, coeff in items:
                out = add(out, mul(const(coeff), memo[t]))
        elif n.op in ("le", "eq", "ne", "lt"):
            out = compare(n.op, args[0], args[1])
        elif n.op == "and":
            out = and_(*args)
        elif n.op == "or":
            out = or_(*args)
        elif n.op == "not":
            out = not_(args[0])
        else:
            out = Node(n.op, args, n.attr, n.type)
        memo[n] = out
    return memo[node]


def swap_query_key(node: Node) -> Node:
    """The same expression with the roles of queries and keys exchanged (q <-> k, n_q <-> n_k).

    Used to plan the backward's key-block programs with the forward's machinery: the query blocks a
    key block needs are the 'key ranges' of the swapped mask.
    """
    return substitute(node, {var("q"): var("k"), var("k"): var("q"), size("n_q"): size("n_k"),
                             size("n_k"): size("n_q")})
