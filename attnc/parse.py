"""Stage 1: pattern source text -> AST.

The grammar lives in ``grammar/attn.lark``; this module turns Lark's parse tree into small frozen
dataclasses that carry their source position, so every later stage can blame a line and column.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Union

import lark
from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from .errors import AttncError, PatternSyntaxError


# --------------------------------------------------------------------------------------------------
# AST


@dataclass(frozen=True)
class Pos:
    """A source location: file path (or None for text), 1-based line and column."""
    path: str | None
    line: int
    column: int


@dataclass(frozen=True)
class IntLit:
    value: int
    pos: Pos


@dataclass(frozen=True)
class FloatLit:
    value: float
    pos: Pos


@dataclass(frozen=True)
class BoolLit:
    value: bool
    pos: Pos


@dataclass(frozen=True)
class Name:
    id: str
    pos: Pos


@dataclass(frozen=True)
class ScoreRef:
    """The incoming score inside a ``score`` statement."""
    pos: Pos


@dataclass(frozen=True)
class Unary:
    op: str            # 'neg' | 'pos' | 'not'
    operand: "Expr"
    pos: Pos


@dataclass(frozen=True)
class Binary:
    op: str            # '+', '-', '*', '/', '//', '%', 'and', 'or'
    left: "Expr"
    right: "Expr"
    pos: Pos


@dataclass(frozen=True)
class Compare:
    """A comparison chain ``a < b <= c`` (Python semantics: ``a < b and b <= c``)."""
    ops: tuple[str, ...]
    operands: tuple["Expr", ...]
    pos: Pos


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple["Expr", ...]
    kwargs: tuple[tuple[str, "Expr"], ...]
    pos: Pos


@dataclass(frozen=True)
class Read:
    """A tensor read ``name[i, j, ...]``."""
    tensor: str
    indices: tuple["Expr", ...]
    pos: Pos


Expr = Union[IntLit, FloatLit, BoolLit, Name, ScoreRef, Unary, Binary, Compare, Call, Read]


@dataclass(frozen=True)
class Param:
    name: str
    type: str | None
    default: Expr | None
    pos: Pos


@dataclass(frozen=True)
class InputStmt:
    name: str
    dtype: str
    dims: tuple[Union[int, str], ...]
    pos: Pos


@dataclass(frozen=True)
class LetStmt:
    name: str
    expr: Expr
    pos: Pos


@dataclass(frozen=True)
class MaskStmt:
    expr: Expr
    pos: Pos


@dataclass(frozen=True)
class ScoreStmt:
    expr: Expr
    pos: Pos


Stmt = Union[InputStmt, LetStmt, MaskStmt, ScoreStmt]


@dataclass(frozen=True)
class ImportItem:
    path: str
    pos: Pos


@dataclass(frozen=True)
class FuncDef:
    """``def f(a, b = 1) = expr`` or ``def f(a) { let ...; return expr }``."""
    name: str
    params: tuple[Param, ...]
    lets: tuple[LetStmt, ...]
    body: Expr
    pos: Pos


@dataclass(frozen=True)
class PatternDef:
    name: str
    params: tuple[Param, ...]
    stmts: tuple[Stmt, ...]
    pos: Pos


@dataclass(frozen=True)
class Module:
    """One parsed pattern file (or source text)."""
    path: str | None
    source: str = field(repr=False)
    imports: tuple[ImportItem, ...]
    defs: tuple[FuncDef, ...]
    patterns: tuple[PatternDef, ...]

    def source_line(self, line: int) -> str | None:
        lines = self.source.splitlines()
        return lines[line - 1] if 1 <= line <= len(lines) else None


# --------------------------------------------------------------------------------------------------
# Lark plumbing


def _resource_text(package: str, local_dir: str, name: str) -> str:
    """Read a shipped data file: from the source tree when run from a checkout, else the package."""
    local = Path(__file__).resolve().parent.parent / local_dir / name
    if local.is_file():
        return local.read_text()
    try:
        return resources.files(package).joinpath(name).read_text()
    except ModuleNotFoundError:
        raise FileNotFoundError(f"attnc data file {local_dir}/{name} is missing") from None


def grammar_text() -> str:
    return _resource_text("attnc.grammar", "grammar", "attn.lark")


class BracketNewlines:
    """Post-lexer: drops newline tokens inside ``(...)`` and ``[...]`` so expressions may continue."""

    always_accept = ("_NL",)

    def process(self, stream):
        depth = 0
        for tok in stream:
            if tok.type in ("LPAR", "LSQB"):
                depth += 1
            elif tok.type in ("RPAR", "RSQB"):
                depth = max(depth - 1, 0)
            elif tok.type == "_NL" and depth > 0:
                continue
            yield tok


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(grammar_text(), parser="lalr", lexer="contextual", postlex=BracketNewlines(),
                propagate_positions=True, maybe_placeholders=True)


# Readable names for the grammar's terminals in "expected ..." messages.
_TERMINAL_TEXT = {
    "NAME": "a name", "INT": "an integer", "FLOAT": "a number", "STRING": 'a "file" string',
    "_NL": "end of line", "$END": "end of file", "SEMICOLON": "';'",
    "EQ": "'=='", "NE": "'!='", "LE": "'<='", "GE": "'>='", "LT": "'<'", "GT": "'>'", "PLUS": "'+'",
    "MINUS": "'-'", "STAR": "'*'", "SLASH": "'/'", "DSLASH": "'//'", "PERCENT": "'%'",
}


def _describe_terminal(name: str) -> str:
    if name in _TERMINAL_TEXT:
        return _TERMINAL_TEXT[name]
    for term in _parser().terminals:
        if term.name == name:
            pattern = term.pattern
            if isinstance(pattern, lark.lexer.PatternStr):
                return repr(pattern.value)
    return name.lower()


_EXPR_START = {"NAME", "INT", "FLOAT"}
_OPERATORS = {"EQ", "NE", "LE", "GE", "LT", "GT", "PLUS", "MINUS", "STAR", "SLASH", "DSLASH",
              "PERCENT", "AND", "OR", "VBAR", "AMPERSAND"}


def _expected_text(expected) -> str:
    """Say what the parser wanted in words: 'an expression', 'an operator', then the punctuation."""
    expected = set(expected)
    words = []
    if _EXPR_START <= expected:
        words.append("an expression")
        expected = {t for t in expected if t not in _EXPR_START and t not in
                    ("MINUS", "PLUS", "TILDE", "NOT", "TRUE", "FALSE", "SCORE", "LPAR")}
    if len(expected & _OPERATORS) >= 3:
        words.append("an operator")
        expected -= _OPERATORS
    words += sorted({_describe_terminal(t) for t in expected})
    return "expected " + ", ".join(words) if words else ""


def _syntax_error(exc: UnexpectedInput, text: str, path: str | None) -> PatternSyntaxError:
    lines = text.splitlines()
    line = getattr(exc, "line", None)
    column = getattr(exc, "column", None)
    if isinstance(exc, UnexpectedEOF) or line in (None, -1):
        line = max(len(lines), 1)
        column = len(lines[-1]) + 1 if lines else 1
    if isinstance(exc, UnexpectedCharacters):
        what = f"unexpected character {text[exc.pos_in_stream]!r}" if exc.pos_in_stream < len(text) \
            else "unexpected end of file"
        expected = _expected_text(exc.allowed or ())
    elif isinstance(exc, UnexpectedToken):
        tok = exc.token
        if tok.type == "$END":
            what = "unexpected end of file"
        elif tok.type == "_NL":
            what = "unexpected end of line"
        else:
            what = f"unexpected {str(tok)!r}"
        expected = _expected_text(exc.accepts or exc.expected or ())
    else:
        what = "unexpected end of file"
        expected = _expected_text(getattr(exc, "expected", ()) or ())
    message = what + (f"; {expected}" if expected else "")
    src = lines[line - 1] if 1 <= line <= len(lines) else None
    return PatternSyntaxError(message, path, line, column, src)


def _pos(meta_or_token, path) -> Pos:
    return Pos(path, getattr(meta_or_token, "line", 1) or 1, getattr(meta_or_token, "column", 1) or 1)


_BIN_TOKENS = {"PLUS": "+", "MINUS": "-", "STAR": "*", "SLASH": "/", "DSLASH": "//", "PERCENT": "%"}


@v_args(meta=True)
class _ToAst(Transformer):
    """Lark tree -> AST dataclasses, each carrying its position."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def _p(self, meta):
        return _pos(meta, self.path)

    # literals and names
    def int_lit(self, meta, ch):
        return IntLit(int(ch[0]), self._p(meta))

    def float_lit(self, meta, ch):
        return FloatLit(float(ch[0]), self._p(meta))

    def true_lit(self, meta, ch):
        return BoolLit(True, self._p(meta))

    def false_lit(self, meta, ch):
        return BoolLit(False, self._p(meta))

    def score_ref(self, meta, ch):
        return ScoreRef(self._p(meta))

    def name(self, meta, ch):
        return Name(str(ch[0]), self._p(meta))

    # operators
    def or_op(self, meta, ch):
        return Binary("or", ch[0], ch[1], self._p(meta))

    def and_op(self, meta, ch):
        return Binary("and", ch[0], ch[1], self._p(meta))

    def not_op(self, meta, ch):
        return Unary("not", ch[-1], self._p(meta))

    def neg(self, meta, ch):
        return Unary("neg", ch[-1], self._p(meta))

    def pos(self, meta, ch):
        return Unary("pos", ch[-1], self._p(meta))

    def binary(self, meta, ch):
        left, op, right = ch
        return Binary(_BIN_TOKENS[op.type], left, right, _pos(op, self.path))

    def compare(self, meta, ch):
        operands = tuple(ch[0::2])
        ops = tuple(str(t) for t in ch[1::2])
        return Compare(ops, operands, _pos(ch[1], self.path))

    def call(self, meta, ch):
        func, rest = ch[0], [c for c in ch[1:] if c is not None]
        args, kwargs = [], []
        for a in rest:
            if isinstance(a, tuple) and len(a) == 2 and isinstance(a[0], str):
                kwargs.append(a)
            else:
                if kwargs:
                    raise _LocatedSyntax("positional argument after keyword argument", a.pos)
                args.append(a)
        return Call(str(func), tuple(args), tuple(kwargs), _pos(func, self.path))

    def kwarg(self, meta, ch):
        return (str(ch[0]), ch[1])

    def read(self, meta, ch):
        return Read(str(ch[0]), tuple(c for c in ch[1:] if c is not None), _pos(ch[0], self.path))

    # statements and items
    def params(self, meta, ch):
        return tuple(c for c in ch if c is not None)

    def param(self, meta, ch):
        name, typ, default = ch
        return Param(str(name), str(typ) if typ is not None else None, default, _pos(name, self.path))

    def dim_int(self, meta, ch):
        return int(ch[0])

    def dim_name(self, meta, ch):
        return str(ch[0])

    def input_stmt(self, meta, ch):
        return InputStmt(str(ch[0]), str(ch[1]), tuple(c for c in ch[2:] if c is not None), self._p(meta))

    def let_stmt(self, meta, ch):
        return LetStmt(str(ch[0]), ch[1], self._p(meta))

    def mask_stmt(self, meta, ch):
        return MaskStmt(ch[0], self._p(meta))

    def score_stmt(self, meta, ch):
        return ScoreStmt(ch[0], self._p(meta))

    def return_stmt(self, meta, ch):
        return ch[0]

    def import_item(self, meta, ch):
        return ImportItem(str(ch[0])[1:-1], self._p(meta))

    def def_expr(self, meta, ch):
        name, params, body = ch
        return FuncDef(str(name), params or (), (), body, _pos(name, self.path))

    def def_block(self, meta, ch):
        name, params, *rest = ch
        return FuncDef(str(name), params or (), tuple(rest[:-1]), rest[-1], _pos(name, self.path))

    def pattern(self, meta, ch):
        name, params, *stmts = ch
        return PatternDef(str(name), params or (), tuple(s for s in stmts if s is not None),
                          _pos(name, self.path))

    def start(self, meta, ch):
        return list(ch)


class _LocatedSyntax(Exception):
    def __init__(self, message, pos):
        super().__init__(message)
        self.message, self.pos = message, pos


def parse(text: str, path: str | None = None) -> Module:
    """Parse pattern source text into a :class:`Module`; raises :class:`PatternSyntaxError`."""
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as exc:
        raise _syntax_error(exc, text, path) from None
    except lark.exceptions.LarkError as exc:  # pragma: no cover - defensive: any other Lark failure
        raise PatternSyntaxError(f"could not parse: {exc}", path, 1, 1) from None
    try:
        items = _ToAst(path).transform(tree)
    except VisitError as exc:
        orig = exc.orig_exc
        if isinstance(orig, _LocatedSyntax):
            lines = text.splitlines()
            src = lines[orig.pos.line - 1] if 1 <= orig.pos.line <= len(lines) else None
            raise PatternSyntaxError(orig.message, path, orig.pos.line, orig.pos.column, src) from None
        if isinstance(orig, AttncError):
            raise orig from None
        raise
    imports = tuple(i for i in items if isinstance(i, ImportItem))
    defs = tuple(i for i in items if isinstance(i, FuncDef))
    patterns = tuple(i for i in items if isinstance(i, PatternDef))
    return Module(path, text, imports, defs, patterns)
