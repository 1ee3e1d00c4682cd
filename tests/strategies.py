"""Hypothesis strategies for property tests of the attnc language.

A strategy draws a small typed expression tree (``Node``); ``evaluate`` computes its value in plain
Python (ints with Python's floor ``//`` and ``%``), and ``Renderer`` prints it as attnc source in one of
several styles: fully parenthesized, minimally parenthesized with Python's precedence, or a mix, with
optional line breaks and comments inside brackets, ``let`` names and ``def`` functions. The tests
compile the printed source and compare what attnc computes with ``evaluate``.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

from hypothesis import strategies as st

# --------------------------------------------------------------------------------------------------
# Trees


@dataclass(frozen=True, eq=False)
class Node:
    """One expression node. ``kind`` picks the meaning of ``op`` and ``kids``.

    kinds: var (op = name), param (op = name), score, int / float / bool (op = value),
    bin (op in + - * / // %), neg, call (op = function name), cmp (op = tuple of comparison
    operators between consecutive kids: a chain), and / or / not (alias=True prints & | ~).
    """

    kind: str
    ty: str
    op: object = None
    kids: tuple = ()
    alias: bool = False


def var(name: str) -> Node:
    return Node("var", "int", name)


def lit(value) -> Node:
    if isinstance(value, bool):
        return Node("bool", "bool", value)
    if isinstance(value, int):
        return Node("int", "int", value)
    return Node("float", "float", float(value))


def binop(op: str, a: Node, b: Node) -> Node:
    ty = "float" if op == "/" or "float" in (a.ty, b.ty) else "int"
    return Node("bin", ty, op, (a, b))


def call(name: str, *args: Node, ty: str) -> Node:
    return Node("call", ty, name, tuple(args))


def compare(operands, ops) -> Node:
    return Node("cmp", "bool", tuple(ops), tuple(operands))


def contains(node: Node, kinds: set) -> bool:
    if node.kind in kinds:
        return True
    return any(contains(kid, kinds) for kid in node.kids)


def walk(node: Node):
    yield node
    for kid in node.kids:
        yield from walk(kid)


# --------------------------------------------------------------------------------------------------
# Evaluation in Python


class Overflow(Exception):
    """An intermediate value left the range the test trusts (|int| < 2**30, |float| <= FLOAT_LIMIT)."""


INT_LIMIT = 2 ** 30
FLOAT_LIMIT = 40.0


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _check(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) >= INT_LIMIT:
            raise Overflow(value)
        return value
    if not math.isfinite(value) or abs(value) > FLOAT_LIMIT:
        raise Overflow(value)
    return value


def evaluate(node: Node, env: dict):
    """Value of ``node`` at one point. Both branches of where/and/or are evaluated (they are pure)."""
    kind = node.kind
    if kind == "var":
        return env[node.op]
    if kind == "param":
        return env["params"][node.op]
    if kind == "score":
        return env["score"]
    if kind in ("int", "float", "bool"):
        return node.op
    vals = [evaluate(kid, env) for kid in node.kids]
    if kind == "neg":
        return _check(-vals[0])
    if kind == "bin":
        a, b = vals
        op = node.op
        try:
            if op == "+":
                r = a + b
            elif op == "-":
                r = a - b
            elif op == "*":
                r = a * b
            elif op == "/":
                r = a / b
            elif op == "//":
                r = a // b
            else:
                r = a % b
        except (OverflowError, ZeroDivisionError) as exc:
            raise Overflow(str(exc)) from None
        return _check(r)
    if kind == "cmp":
        ok = True
        for op, a, b in zip(node.op, vals, vals[1:]):
            ok = ok and {"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b,
                         ">": a > b, ">=": a >= b}[op]
        return bool(ok)
    if kind == "and":
        return bool(vals[0] and vals[1])
    if kind == "or":
        return bool(vals[0] or vals[1])
    if kind == "not":
        return not vals[0]
    if kind == "call":
        name = node.op
        try:
            if name == "abs":
                r = abs(vals[0])
            elif name == "min":
                r = min(vals)
            elif name == "max":
                r = max(vals)
            elif name == "clamp":
                r = min(max(vals[0], vals[1]), vals[2])
            elif name == "where":
                r = vals[1] if vals[0] else vals[2]
            elif name == "exp":
                r = math.exp(vals[0])
            elif name == "log":
                r = math.log(vals[0])
            elif name == "sqrt":
                r = math.sqrt(vals[0])
            elif name == "tanh":
                r = math.tanh(vals[0])
            elif name == "sigmoid":
                r = _sigmoid(vals[0])
            else:  # pragma: no cover - the strategies only build the names above
                raise AssertionError(name)
        except (OverflowError, ValueError) as exc:
            raise Overflow(str(exc)) from None
        return _check(r)
    raise AssertionError(kind)


# --------------------------------------------------------------------------------------------------
# Strategies


@dataclass
class GenContext:
    """Names the trees may use besides the index variables."""

    int_params: tuple = ()
    bool_params: tuple = ()
    float_params: tuple = ()
    int_vars: tuple = ("q", "k", "q", "k", "q - k", "b", "h", "n_q", "n_k", "batch", "heads")


CMP_OPS = ("==", "!=", "<", "<=", ">", ">=")
FLOAT_LITERALS = (0.5, 1.5, 2.0, 0.25, 3.0, 0.1, 1.0, 0.75)


@st.composite
def int_leaf(draw, ctx: GenContext) -> Node:
    choice = draw(st.integers(0, 9))
    if choice < 5:
        name = draw(st.sampled_from(ctx.int_vars))
        if name == "q - k":  # a common shape in real patterns
            return binop("-", var("q"), var("k"))
        return var(name)
    if choice < 8 or not ctx.int_params:
        return lit(draw(st.integers(-6, 12)))
    return Node("param", "int", draw(st.sampled_from(ctx.int_params)))


@st.composite
def divisor(draw, ctx: GenContext, depth: int) -> Node:
    """A divisor that is never zero: a nonzero literal (either sign) or ``abs(e) + c`` with c >= 1."""
    if depth <= 0 or draw(st.integers(0, 4)) > 0:
        return lit(draw(st.sampled_from((2, 3, -2, 1, 5, -1, 4, -3, 6, -5, -4))))
    inner = draw(int_expr(ctx, depth - 1))
    return binop("+", call("abs", inner, ty="int"), lit(draw(st.integers(1, 3))))


INT_KINDS = ("+", "-", "-", "//", "%", "*", "//", "%", "neg", "+", "abs", "min", "max", "clamp", "where")


@st.composite
def int_expr(draw, ctx: GenContext, depth: int) -> Node:
    if depth <= 0 or draw(st.integers(0, 3)) == 0:
        return draw(int_leaf(ctx))
    kind = draw(st.sampled_from(INT_KINDS))
    sub = int_expr(ctx, depth - 1)
    if kind in ("+", "-"):
        return binop(kind, draw(sub), draw(sub))
    if kind == "*":
        # One factor is a leaf, so magnitudes stay small (no int32/int64 overflow questions).
        a, b = draw(sub), draw(int_leaf(ctx))
        return binop("*", *((a, b) if draw(st.booleans()) else (b, a)))
    if kind in ("//", "%"):
        dividend = draw(sub)
        if draw(st.booleans()):  # often of either sign, where floor and truncation differ
            dividend = binop("-", dividend, draw(int_leaf(ctx)))
        return binop(kind, dividend, draw(divisor(ctx, depth - 1)))
    if kind == "neg":
        return Node("neg", "int", None, (draw(sub),))
    if kind == "abs":
        return call("abs", draw(sub), ty="int")
    if kind in ("min", "max"):
        return call(kind, draw(sub), draw(sub), ty="int")
    if kind == "clamp":
        return call("clamp", draw(sub), draw(sub), draw(sub), ty="int")
    cond = draw(bool_expr(ctx, depth - 1))
    return call("where", cond, draw(sub), draw(sub), ty="int")


@st.composite
def bool_leaf(draw, ctx: GenContext, depth: int) -> Node:
    choice = draw(st.integers(0, 29))  # hypothesis favours small draws: make them comparisons
    if choice == 29:
        return lit(draw(st.booleans()))
    if choice == 28 and ctx.bool_params:
        return Node("param", "bool", draw(st.sampled_from(ctx.bool_params)))
    sub = int_expr(ctx, min(depth, 2))
    return compare([draw(sub), draw(sub)], [draw(st.sampled_from(CMP_OPS))])


@st.composite
def bool_expr(draw, ctx: GenContext, depth: int) -> Node:
    if depth <= 0 or draw(st.integers(0, 3)) == 0:
        return draw(bool_leaf(ctx, depth))
    kind = draw(st.sampled_from(("chain", "and", "and", "or", "or", "not")))
    if kind == "chain":
        n = draw(st.integers(3, 4))
        sub = int_expr(ctx, min(depth - 1, 2))
        operands = [draw(sub) for _ in range(n)]
        ops = [draw(st.sampled_from(CMP_OPS)) for _ in range(n - 1)]
        return compare(operands, ops)
    alias = draw(st.integers(0, 2)) == 0
    sub = bool_expr(ctx, depth - 1)
    if kind == "not":
        return Node("not", "bool", None, (draw(sub),), alias)
    return Node(kind, "bool", None, (draw(sub), draw(sub)), alias)


@st.composite
def float_leaf(draw, ctx: GenContext) -> Node:
    choice = draw(st.integers(0, 9))
    if choice < 4:
        return Node("score", "float")
    if choice < 6:
        value = draw(st.sampled_from(FLOAT_LITERALS))
        return lit(-value if draw(st.booleans()) else value)
    if choice == 6:  # int * float
        scale = lit(draw(st.sampled_from(FLOAT_LITERALS)) * draw(st.sampled_from((1, -1))))
        return binop("*", scale, draw(int_expr(ctx, 1)))
    if choice == 7:  # int / int is float division
        return binop("/", draw(int_expr(ctx, 1)), lit(draw(st.sampled_from((2, 4, -3, 1, 5, -1)))))
    if ctx.float_params:
        return Node("param", "float", draw(st.sampled_from(ctx.float_params)))
    return Node("score", "float")


FLOAT_KINDS = ("+", "+", "-", "*", "*", "/", "neg", "exp", "tanh", "tanh", "sigmoid", "log", "sqrt",
               "abs", "min", "max", "where")


@st.composite
def float_expr(draw, ctx: GenContext, depth: int) -> Node:
    if depth <= 0 or draw(st.integers(0, 3)) == 0:
        return draw(float_leaf(ctx))
    kind = draw(st.sampled_from(FLOAT_KINDS))
    sub = float_expr(ctx, depth - 1)
    if kind in ("+", "-", "*"):
        return binop(kind, draw(sub), draw(sub))
    if kind == "/":
        pick = draw(st.integers(0, 3))
        if pick == 0:
            value = draw(st.sampled_from(FLOAT_LITERALS))
            den = lit(-value if draw(st.booleans()) else value)
        elif pick == 1:
            den = binop("+", lit(1.5), call("tanh", draw(sub), ty="float"))
        elif pick == 2:
            den = binop("+", lit(1.0), call("sigmoid", draw(sub), ty="float"))
        else:
            den = call("exp", draw(sub), ty="float")
        return binop("/", draw(sub), den)
    if kind == "neg":
        return Node("neg", "float", None, (draw(sub),))
    if kind in ("exp", "tanh", "sigmoid", "abs"):
        return call(kind, draw(sub), ty="float")
    if kind == "log":  # only on a positive argument
        return call("log", binop("+", lit(2.0), call("tanh", draw(sub), ty="float")), ty="float")
    if kind == "sqrt":
        return call("sqrt", binop("+", lit(1.0), call("sigmoid", draw(sub), ty="float")), ty="float")
    if kind in ("min", "max"):
        return call(kind, draw(sub), draw(sub), ty="float")
    if draw(st.booleans()):
        cond = draw(bool_expr(ctx, 1))
    else:  # a float comparison, e.g. leaky-relu style where(score > 0, ...)
        cond = compare([draw(float_expr(ctx, 1)), lit(draw(st.sampled_from((0.0, 0.5, -0.5))))],
                       [draw(st.sampled_from(("<", "<=", ">", ">=")))])
    return call("where", cond, draw(sub), draw(sub), ty="float")


# --------------------------------------------------------------------------------------------------
# Rendering to source


PREC = {"or": 1, "and": 2, "not": 3, "cmp": 4, "+": 9, "-": 9, "*": 10, "/": 10, "//": 10, "%": 10,
        "neg": 11}
ATOM = 100

BRACKET_BREAKS = ("\n        ", "  # split here\n            ", " # ) } ; mask q\n  ", "\n\n    ",
                  "  # comment with ( [ {\n        ")
LINE_COMMENTS = ("# a comment", "#", "# mask false  (inside a comment)", "# } pattern x() {")


def fmt_float(value: float) -> str:
    text = repr(abs(value))
    return text if ("." in text or "e" in text) else text + ".0"


class Renderer:
    """Prints trees as attnc source. ``style`` is 'full', 'min' or 'mixed' parenthesization.

    Nodes are bound to ``let`` names or ``def`` functions according to ``marks`` (decided up front
    so the precedence of every node is known before it is printed).
    """

    def __init__(self, rng: random.Random, style: str, roots, *, lets: float = 0.0,
                 defs: float = 0.0, breaks: float = 0.0):
        self.rng, self.style, self.breaks = rng, style, breaks
        self.marks: dict[int, tuple] = {}
        self.emitted: set[int] = set()
        self.pending_lets: list[str] = []
        self.defs: list[str] = []
        self.counter = 0
        for root in roots:
            for node in walk(root):
                if node.kind in ("var", "param", "score", "int", "float", "bool") or id(node) in self.marks:
                    continue
                r = rng.random()
                if r < lets and not contains(node, {"score"}):
                    self.marks[id(node)] = ("let", f"t{self._next()}")
                elif r < lets + defs:
                    if rng.random() < 0.4 and not contains(node, {"param"}):
                        self.marks[id(node)] = ("def0", f"d{self._next()}")
                    elif node.kind in ("bin", "cmp", "call", "and", "or", "not", "neg"):
                        self.marks[id(node)] = ("defn", f"d{self._next()}")

    def _next(self) -> int:
        self.counter += 1
        return self.counter - 1

    # -- whitespace ------------------------------------------------------------------------------
    def sep(self, br: int) -> str:
        if br > 0 and self.breaks and self.rng.random() < self.breaks:
            return self.rng.choice(BRACKET_BREAKS)
        return " "

    def tight(self, br: int) -> str:
        if br > 0 and self.breaks and self.rng.random() < self.breaks:
            return self.rng.choice(BRACKET_BREAKS)
        return ""

    # -- expressions -----------------------------------------------------------------------------
    def bound(self, node: Node, ctx: str):
        mark = self.marks.get(id(node))
        if mark is None or (mark[0] == "let" and ctx != "pattern"):
            return None
        return mark

    def prec(self, node: Node, ctx: str) -> int:
        if self.bound(node, ctx):
            return ATOM
        kind = node.kind
        if kind in ("int", "float"):
            return ATOM if node.op >= 0 else PREC["neg"]
        if kind == "neg":
            return PREC["neg"]
        if kind == "bin":
            return PREC[node.op]
        if kind == "cmp":
            return PREC["cmp"]
        if kind in ("and", "or", "not"):
            return ATOM if node.alias else PREC[kind]
        return ATOM

    def sub(self, node: Node, min_prec: int, br: int, ctx: str) -> str:
        prec = self.prec(node, ctx)
        paren = prec < min_prec
        if prec < ATOM and self.style == "full":
            paren = True
        if self.style == "mixed" and self.rng.random() < (0.3 if prec < ATOM else 0.05):
            paren = True
        if paren:
            return "(" + self.tight(br + 1) + self.expr(node, br + 1, ctx) + self.tight(br + 1) + ")"
        return self.expr(node, br, ctx)

    def expr(self, node: Node, br: int, ctx: str) -> str:
        mark = self.bound(node, ctx)
        if mark is None:
            return self.plain(node, br, ctx)
        how, name = mark[0], mark[1]
        if how == "let":
            if id(node) not in self.emitted:
                self.emitted.add(id(node))
                text = self.plain(node, 0, ctx)
                self.pending_lets.append(f"let {name} = {text}")
            return name
        if how == "def0":
            if id(node) not in self.emitted:
                self.emitted.add(id(node))
                self.defs.append(self.def_text(name, [], self.plain(node, 0, "def")))
            return name if self.rng.random() < 0.5 else name + "()"
        # defn: the node's operator becomes a function of its direct children
        pnames = [f"p{i}" for i in range(len(node.kids))]
        defaults = {}
        last = node.kids[-1]
        if id(node) not in self.emitted:
            self.emitted.add(id(node))
            if last.kind == "int" and last.op >= 0 and self.rng.random() < 0.5:
                defaults[pnames[-1]] = last.op
            self.marks[id(node)] = ("defn", name, defaults)
            shape = Node(node.kind, node.ty, node.op,
                         tuple(Node("var", kid.ty, p) for kid, p in zip(node.kids, pnames)), node.alias)
            self.defs.append(self.def_text(name, pnames, self.plain(shape, 0, "def"), defaults))
        else:
            defaults = self.marks[id(node)][2]
        args = [self.sub(kid, 0, br + 1, ctx) for kid in node.kids]
        if defaults and self.rng.random() < 0.5:
            args = args[:-1]  # rely on the default, which equals the literal
        if self.rng.random() < 0.3:  # all by keyword, in a shuffled order
            pairs = list(zip(pnames, args))
            self.rng.shuffle(pairs)
            parts = [f"{p} = {a}" for p, a in pairs]
        elif len(args) > 1 and self.rng.random() < 0.3:  # positional then one keyword
            parts = args[:-1] + [f"{pnames[len(args) - 1]} = {args[-1]}"]
        else:
            parts = args
        return self.call_text(name, parts, br)

    def call_text(self, name: str, parts, br: int) -> str:
        inner = ("," + " ").join(parts) if not self.breaks else ",".join(
            self.sep(br + 1) + p for p in parts).lstrip(" ")
        return name + "(" + self.tight(br + 1) + inner + self.tight(br + 1) + ")"

    def def_text(self, name: str, params, body: str, defaults=None) -> str:
        defaults = defaults or {}
        plist = ", ".join(f"{p} = {defaults[p]}" if p in defaults else p for p in params)
        form = self.rng.randrange(3)
        if form == 0:
            return f"def {name}({plist}) = {body}"
        if form == 1:
            return f"def {name}({plist}) {{\n    return {body}\n}}"
        return f"def {name}({plist}) {{\n    let r_{name} = {body}\n    return r_{name}\n}}"

    def plain(self, node: Node, br: int, ctx: str) -> str:
        kind = node.kind
        if kind in ("var", "param"):
            return node.op
        if kind == "score":
            return "score"
        if kind == "bool":
            return "true" if node.op else "false"
        if kind == "int":
            return str(node.op) if node.op >= 0 else f"-{-node.op}"
        if kind == "float":
            return fmt_float(node.op) if node.op >= 0 else "-" + fmt_float(node.op)
        if kind == "neg":
            text = self.sub(node.kids[0], PREC["neg"], br, ctx)
            return "-" + (" " if text.startswith("-") else "") + text
        if kind == "bin":
            p = PREC[node.op]
            left = self.sub(node.kids[0], p, br, ctx)
            right = self.sub(node.kids[1], p + 1, br, ctx)
            return left + self.sep(br) + node.op + self.sep(br) + right
        if kind == "cmp":
            parts = [self.sub(node.kids[0], PREC["cmp"] + 1, br, ctx)]
            for op, kid in zip(node.op, node.kids[1:]):
                parts += [self.sep(br), op, self.sep(br), self.sub(kid, PREC["cmp"] + 1, br, ctx)]
            return "".join(parts)
        if kind in ("and", "or"):
            if node.alias:
                # Fully bracketed, so the text means the same whatever precedence & and | have.
                left = self.sub(node.kids[0], ATOM, br + 1, ctx)
                right = self.sub(node.kids[1], ATOM, br + 1, ctx)
                sym = "&" if kind == "and" else "|"
                return "(" + left + self.sep(br + 1) + sym + self.sep(br + 1) + right + ")"
            p = PREC[kind]
            left = self.sub(node.kids[0], p, br, ctx)
            right = self.sub(node.kids[1], p + 1, br, ctx)
            return left + self.sep(br) + kind + self.sep(br) + right
        if kind == "not":
            if node.alias:
                return "(~" + self.sub(node.kids[0], ATOM, br + 1, ctx) + ")"
            return "not " + self.sub(node.kids[0], PREC["not"], br, ctx)
        if kind == "call":
            return self.call_text(node.op, [self.sub(kid, 0, br + 1, ctx) for kid in node.kids], br)
        raise AssertionError(kind)

    def statement(self, node: Node) -> str:
        return self.sub(node, 0, 0, "pattern")

    def take_lets(self) -> list[str]:
        out, self.pending_lets = self.pending_lets, []
        return out


def split_ands(node: Node, rng: random.Random) -> list[Node]:
    """A top-level conjunction may be written as several mask statements (they are ANDed)."""
    if node.kind == "and" and rng.random() < 0.6:
        return split_ands(node.kids[0], rng) + split_ands(node.kids[1], rng)
    return [node]


def assemble(rng: random.Random, style: str, param_decls, statements, *, lets: float, defs: float,
             breaks: float, name: str = "p") -> str:
    """Source text of one file: defs (before or after) and ``pattern name(params) { statements }``.

    ``statements`` is a list of (keyword, tree) with keyword 'mask' or 'score'.
    """
    renderer = Renderer(rng, style, [t for _, t in statements], lets=lets, defs=defs, breaks=breaks)
    lines = []
    for keyword, tree in statements:
        text = renderer.statement(tree)
        lines.extend(renderer.take_lets())
        lines.append(f"{keyword} {text}")
    header = f"pattern {name}({', '.join(param_decls)})"
    layout = rng.randrange(4)
    if layout == 0:
        body = header + " { " + "; ".join(lines) + " }"
    else:
        groups = []  # statements sharing one line, joined by ';'
        for line in lines:
            if layout == 2 and groups and rng.random() < 0.4:
                groups[-1].append(line)
            else:
                groups.append([line])
        out = []
        for group in groups:
            if rng.random() < 0.2:
                out.append(rng.choice(LINE_COMMENTS))
            if rng.random() < 0.1:
                out.append("")
            # A trailing comment only after the last statement of a line (it runs to the end).
            out.append("; ".join(group) + ("  " + rng.choice(LINE_COMMENTS) if rng.random() < 0.2 else ""))
        body = header + " {\n" + "\n".join("    " + x if x else "" for x in out) + "\n}"
    items = list(renderer.defs)
    before = [d for d in items if rng.random() < 0.6]
    after = [d for d in items if d not in before]
    parts = before + [body] + after
    sep = "\n\n" if rng.random() < 0.7 else "\n"
    lead = "# generated by tests/strategies.py\n" if rng.random() < 0.3 else ""
    return lead + sep.join(parts) + "\n"


# --------------------------------------------------------------------------------------------------
# Whole programs


@dataclass
class Program:
    source: str
    kwargs: dict           # compile-time keyword arguments (parameter values)
    masks: list            # bool trees, ANDed
    score: Node | None     # float tree or None
    params: dict = field(default_factory=dict)   # the value every parameter has in the kernel


@st.composite
def param_declarations(draw, n_int: int, n_bool: int, n_float: int):
    """Parameter declarations, the compile kwargs, and the value each parameter ends up with."""
    decls, kwargs, values = [], {}, {}
    specs = ([("w", "int", i) for i in range(n_int)] + [("f", "bool", i) for i in range(n_bool)]
             + [("c", "float", i) for i in range(n_float)])
    for prefix, ty, i in specs:
        name = f"{prefix}{i}"
        if ty == "int":
            value, default = draw(st.integers(-4, 9)), draw(st.integers(0, 9))
            dtext = str(default)
        elif ty == "bool":
            value, default = draw(st.booleans()), draw(st.booleans())
            dtext = "true" if default else "false"
        else:
            value = draw(st.sampled_from((0.5, 2.0, -1.0, 1.5)))
            default = draw(st.sampled_from((0.5, 1.0, 2.5)))
            dtext = fmt_float(default)
        form = draw(st.integers(0, 2))
        if form == 0:  # no default: must be given
            decls.append(f"{name}: {ty}")
            kwargs[name] = values[name] = value
        else:
            decls.append(f"{name}: {ty} = {dtext}" if form == 1 else f"{name} = {dtext}")
            if draw(st.booleans()):
                kwargs[name] = values[name] = value
            else:
                values[name] = default
    return decls, kwargs, values


@st.composite
def mask_programs(draw) -> Program:
    decls, kwargs, values = draw(param_declarations(draw(st.integers(0, 2)), draw(st.integers(0, 1)), 0))
    ctx = GenContext(int_params=tuple(n for n in values if n.startswith("w")),
                     bool_params=tuple(n for n in values if n.startswith("f")))
    masks = draw(st.lists(bool_expr(ctx, 3), min_size=1, max_size=3))
    rng = draw(st.randoms(use_true_random=False))
    style = draw(st.sampled_from(("min", "min", "full", "mixed")))
    trees = [piece for m in masks for piece in split_ands(m, rng)]
    lets = rng.choice((0.0, 0.0, 0.15, 0.3))
    defs = rng.choice((0.0, 0.0, 0.1, 0.25))
    breaks = rng.choice((0.0, 0.0, 0.1, 0.3))
    source = assemble(rng, style, decls, [("mask", t) for t in trees], lets=lets, defs=defs, breaks=breaks)
    if rng.random() < 0.3:
        kwargs = dict(kwargs, pattern="p")
    return Program(source, kwargs, trees, None, values)


VALUE_OFFSET = 20   # the value probe below reads E from the key position k == E + VALUE_OFFSET
VALUE_KEYS = 2 * VALUE_OFFSET + 1


@st.composite
def value_programs(draw) -> Program:
    """``mask k - 20 == E`` for an int expression E free of k: row (b, h, q) of the mask shows E's
    value exactly (one key at E + 20) whenever -20 <= E <= 20, so every integer operation is checked
    value by value, not only through the outcome of a comparison."""
    decls, kwargs, values = draw(param_declarations(draw(st.integers(0, 2)), draw(st.integers(0, 1)), 0))
    ctx = GenContext(int_params=tuple(n for n in values if n.startswith("w")),
                     bool_params=tuple(n for n in values if n.startswith("f")),
                     int_vars=("q", "q", "q", "b", "h", "n_q", "n_k", "batch", "heads"))
    value = draw(int_expr(ctx, 4))
    probe = compare([binop("-", var("k"), lit(VALUE_OFFSET)), value], ["=="])
    rng = draw(st.randoms(use_true_random=False))
    style = draw(st.sampled_from(("min", "min", "full", "mixed")))
    source = assemble(rng, style, decls, [("mask", probe)], lets=rng.choice((0.0, 0.2)),
                      defs=rng.choice((0.0, 0.2)), breaks=rng.choice((0.0, 0.1)))
    return Program(source, kwargs, [probe], None, values)


# A few fixed masks for the score tests; each is (source text, tree).
SCORE_MASKS = (
    None,
    ("k <= q", compare([var("k"), var("q")], ["<="])),
    ("q - 3 <= k", compare([binop("-", var("q"), lit(3)), var("k")], ["<="])),
    ("(q + k) % 3 != 1", compare([binop("%", binop("+", var("q"), var("k")), lit(3)), lit(1)], ["!="])),
)


@st.composite
def score_programs(draw) -> Program:
    decls, kwargs, values = draw(param_declarations(0, 0, draw(st.integers(0, 1))))
    ctx = GenContext(float_params=tuple(values))
    tree = draw(float_expr(ctx, 3))
    mask = draw(st.sampled_from(SCORE_MASKS))
    rng = draw(st.randoms(use_true_random=False))
    style = draw(st.sampled_from(("min", "min", "full", "mixed")))
    statements = [("score", tree)]
    masks = []
    if mask is not None:
        masks = [mask[1]]
        statements.insert(rng.randrange(2), ("mask", mask[1]))
    source = assemble(rng, style, decls, statements, lets=rng.choice((0.0, 0.2)),
                      defs=rng.choice((0.0, 0.2)), breaks=rng.choice((0.0, 0.2)))
    return Program(source, kwargs, masks, tree, values)


# --------------------------------------------------------------------------------------------------
# Mutations of valid sources

SEED_SOURCES = {
    "causal": "pattern causal_only() {\n    mask causal\n}\n",
    "window": (
        "# a sliding window\n"
        "pattern sliding(w: int = 4) {\n"
        "    mask window(w) and causal   # local band\n"
        "}\n"
    ),
    "longformer": (
        "def band(lo, hi) = lo <= q - k and q - k <= hi          # expression function\n"
        "\n"
        "def pick(x, y = 2) {\n"
        "    let d = q - k\n"
        "    return d >= x and d <= y\n"
        "}\n"
        "\n"
        "pattern longformer(window: int = 3, globals: int = 2) {\n"
        "    let g = q < globals or k < globals\n"
        "    mask band(-window, window) or g or pick(0, y = 1)\n"
        "}\n"
    ),
    "inputs": (
        "pattern docs(d: int = 2) {\n"
        "    input doc: int[batch, N]\n"
        "    input keep: bool[batch, heads, n_k]\n"
        "    mask same(doc) and kept(keep); mask causal\n"
        "    mask dilated(d)\n"
        "}\n"
    ),
    "score": (
        "pattern capped(cap: float = 30.0) {\n"
        "    input slopes: float[heads]\n"
        "    mask 0 <= q - k < 8\n"
        "    score softcap(score, cap) + slopes[h] * (k - q)\n"
        "}\n"
    ),
    "misc": (
        "def near(x, n = 1) = abs(x) <= n\n"
        "pattern misc(n: int = 3, flag: bool = true) {\n"
        "    let c = clamp(q - k, -n, n)\n"
        "    mask (0 <= q - k < 5) | (c == where(q % 2 == 0, n, -n)) | near(q - k)\n"
        "    mask (~(q // 2 == k // 2)) or dilated(2) or not flag\n"
        "    score where(score > 0.0, score, 0.5 * score) / (1.0 + sigmoid(score))\n"
        "}\n"
    ),
}

MUTATION_WORDS = ("pattern", "def", "mask", "let", "score", "input", "import", "return", "and", "or",
                  "not", "true", "false", "int", "float", "bool", "where", "clamp", "causal", "window",
                  "q", "k", "b", "h", "n_q", "n_k", "batch", "heads", "{", "}", "(", ")", "[", "]", ",",
                  ";", ":", "=", "==", "<=", "//", "%", "#", "\n", '"x.attn"', "1.5", "0", "-", "~", "&",
                  "|", "p", "x", "y", "abs", "exp", "softcap", "same", ".", "'", "\\\n")
MUTATION_CHARS = "(){}[],;:=<>!+-*/%#&|~\n \t\"'.0123456789abkqxyz_\\λ"
TOKEN_RE = re.compile(r"\w+|\s+|\S")


@st.composite
def mutated_sources(draw) -> tuple[str, str]:
    """(seed name, mutated text): one to three character or token edits of a valid source."""
    seed = draw(st.sampled_from(sorted(SEED_SOURCES)))
    text = SEED_SOURCES[seed]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(("del", "ins", "dup", "swap", "trunc", "word", "tokdel", "tokdup",
                                   "tokswap", "tokrep")))
        n = len(text)
        pos = draw(st.integers(0, max(n, 1))) % (n + 1)
        if op == "del" and n:
            end = min(n, pos + draw(st.integers(1, 3)))
            text = text[:pos] + text[end:]
        elif op == "ins":
            text = text[:pos] + draw(st.sampled_from(MUTATION_CHARS)) + text[pos:]
        elif op == "dup" and n:
            end = min(n, pos + draw(st.integers(1, 12)))
            text = text[:end] + text[pos:end] + text[end:]
        elif op == "swap" and n >= 2:
            i = min(pos, n - 2)
            text = text[:i] + text[i + 1] + text[i] + text[i + 2:]
        elif op == "trunc":
            text = text[:pos]
        elif op == "word":
            word = draw(st.sampled_from(MUTATION_WORDS))
            pad = draw(st.sampled_from(("", " ")))
            text = text[:pos] + pad + word + pad + text[pos:]
        else:
            toks = TOKEN_RE.findall(text)
            idx = [i for i, t in enumerate(toks) if not t.isspace()]
            if not idx:
                continue
            i = idx[draw(st.integers(0, len(idx) - 1))]
            if op == "tokdel":
                del toks[i]
            elif op == "tokdup":
                toks.insert(i, toks[i] + " ")
            elif op == "tokswap":
                j = idx[draw(st.integers(0, len(idx) - 1))]
                toks[i], toks[j] = toks[j], toks[i]
            else:
                other = idx[draw(st.integers(0, len(idx) - 1))]
                toks[i] = draw(st.sampled_from((toks[other], draw(st.sampled_from(MUTATION_WORDS)))))
            text = "".join(toks)
    # Always hand over multi-line text, so it can only be read as source, never as a file path.
    return seed, text + "\n"


PRELUDE_KINDS = ["causal", "window", "prefix", "global_tokens", "block_local", "dilated", "neighborhood"]


def prelude_predicate(pick, integer) -> str:
    """A random static prelude predicate with random parameters, as attnc source.

    ``pick(options)`` chooses one element and ``integer(lo, hi)`` an int in [lo, hi]: ``rng.choice`` and
    ``rng.randint`` of a ``random.Random``, or the same drawn from hypothesis strategies."""
    kind = pick(PRELUDE_KINDS)
    if kind == "causal":
        return "causal"
    if kind == "window":
        return f"window({integer(0, 50)}, {integer(0, 40)})"
    if kind == "prefix":
        return f"prefix({integer(1, 80)})"
    if kind == "global_tokens":
        return f"global_tokens({integer(1, 40)})"
    if kind == "block_local":
        return f"block_local({integer(1, 70)})"
    if kind == "dilated":
        return f"dilated({integer(1, 6)})"
    return f"neighborhood({integer(1, 30)}, dilation = {integer(1, 4)})"
