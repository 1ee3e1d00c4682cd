"""Stage 2: imports, names, types, inlining and parameter binding -> :class:`PatternIR`.

Every ``def`` is inlined at its call site, so the result is one IR expression for the mask and one for
the score, over the index variables ``b, h, q, k``, the sizes, the pattern's runtime inputs and (in the
score) the incoming ``score``. Type errors, unknown names, arity mistakes, recursion and import cycles
are reported here with the source location of the offending construct.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import networkx as nx

from . import ir
from .errors import PatternError
from .parse import (Binary, BoolLit, Call, Compare, Expr, FloatLit, FuncDef, InputStmt, IntLit, LetStmt,
                    MaskStmt, Module, Name, Param, PatternDef, Pos, Read, ScoreRef, ScoreStmt, Unary,
                    _resource_text, parse)

DTYPES = ("int", "bool", "float")
PARAM_TYPES = ("int", "float", "bool")
BUILTINS = {"abs": 1, "min": 2, "max": 2, "clamp": 3, "where": 3, "exp": 1, "log": 1, "sqrt": 1,
            "tanh": 1, "sigmoid": 1}
RESERVED = set(ir.INDEX_VARS) | set(ir.SIZES) | {"score"} | set(BUILTINS)
MAX_INLINE_DEPTH = 64


@dataclass(frozen=True)
class InputDecl:
    """A runtime tensor input: ``input NAME: DTYPE[DIMS]``."""
    name: str
    dtype: str
    dims: tuple[Union[int, str], ...]
    pos: Pos | None = None


@dataclass(frozen=True)
class SourceNote:
    """Where a statement came from, for comments in generated kernels."""
    path: str | None
    line: int
    text: str


@dataclass
class PatternIR:
    """A pattern after analysis: what every later stage consumes."""
    name: str
    params: dict
    inputs: dict[str, InputDecl]
    mask: ir.Node
    score: ir.Node | None
    mask_notes: list[SourceNote] = field(default_factory=list)
    score_note: SourceNote | None = None
    path: str | None = None

    def key_text(self) -> str:
        """A normalized textual form used as the cache key (equal IR, equal key)."""
        inputs = ";".join(f"{d.name}:{d.dtype}[{','.join(map(str, d.dims))}]" for d in self.inputs.values())
        score = ir.to_text(self.score) if self.score is not None else "score"
        params = ",".join(f"{k}={v!r}" for k, v in self.params.items())
        # The name and parameters only change comments, but each kernel file should name its own pattern.
        return f"pattern {self.name}({params})\nmask {ir.to_text(self.mask)}\nscore {score}\ninputs {inputs}"


@dataclass(frozen=True)
class TensorRef:
    """A runtime input tensor used as a value (an argument of a def such as ``same(doc)``)."""
    decl: InputDecl


# --------------------------------------------------------------------------------------------------
# Loading modules and imports


@functools.lru_cache(maxsize=1)
def prelude_module() -> Module:
    return parse(_resource_text("attnc", "attnc", "prelude.attn"), "<prelude>")


def _looks_like_source(text: str) -> bool:
    return "\n" in text or "{" in text or ";" in text or text.lstrip().startswith(("def ", "pattern "))


class Program:
    """A main module, every module it imports (transitively) and the definitions each one sees."""

    def __init__(self, source_or_path: str | Path):
        self.modules: dict[str, Module] = {}
        self.graph = nx.DiGraph()
        if isinstance(source_or_path, Path) or not _looks_like_source(str(source_or_path)):
            path = Path(source_or_path)
            if not path.is_file():
                raise PatternError(f"no pattern file {str(path)!r} (pass a path to a .attn file or source text)")
            self.main = self._load(path.resolve(), None)
        else:
            self.main = parse(str(source_or_path), None)
            self.modules["<source>"] = self.main
            self._resolve_imports(self.main, "<source>", Path.cwd())
        self._scopes: dict[str, dict[str, tuple[FuncDef, str]]] = {}

    def _key(self, module: Module) -> str:
        return module.path or "<source>"

    def _load(self, path: Path, importer: tuple[Module, Pos] | None) -> Module:
        key = str(path)
        if key in self.modules:
            return self.modules[key]
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else (exc.strerror or str(exc))
            if importer is None:
                raise PatternError(f"cannot read pattern file {str(path)!r}: {reason}") from None
            mod, pos = importer
            raise PatternError(f"cannot read imported file {str(path)!r}: {reason}", pos.path,
                               pos.line, pos.column, mod.source_line(pos.line)) from None
        module = parse(text, key)
        self.modules[key] = module
        self.graph.add_node(key)
        self._resolve_imports(module, key, path.parent)
        return module

    def _resolve_imports(self, module: Module, key: str, base: Path):
        self.graph.add_node(key)
        for imp in module.imports:
            target = (base / imp.path).resolve()
            tkey = str(target)
            if not target.is_file():
                raise PatternError(f"imported file {imp.path!r} not found (looked for {tkey})", imp.pos.path,
                                   imp.pos.line, imp.pos.column, module.source_line(imp.pos.line))
            self.graph.add_edge(key, tkey, pos=imp.pos)
            try:
                cycle = nx.find_cycle(self.graph, key)
            except nx.NetworkXNoCycle:
                cycle = None
            if cycle:
                chain = " -> ".join(Path(u).name for u, _ in cycle) + f" -> {Path(cycle[0][0]).name}"
                raise PatternError(f"import cycle: {chain}", imp.pos.path, imp.pos.line, imp.pos.column,
                                   module.source_line(imp.pos.line))
            self._load(target, (module, imp.pos))

    def scope(self, key: str) -> dict[str, tuple[FuncDef, str]]:
        """Definitions visible in module ``key``: the prelude, then imports, then its own (later wins)."""
        if key in self._scopes:
            return self._scopes[key]
        scope = {d.name: (d, "<prelude>") for d in prelude_module().defs}
        if key == "<prelude>":
            self._scopes[key] = scope
            return scope
        for target in nx.dfs_postorder_nodes(self.graph, key):
            if target == key:
                continue
            for d in self.modules[target].defs:
                scope[d.name] = (d, target)
        own = {}
        module = self.modules[key] if key != "<prelude>" else prelude_module()
        for d in module.defs:
            _check_unique_params(d.params, f"def '{d.name}'", module)
            if d.name in own:
                raise PatternError(f"'{d.name}' is defined twice in this file", d.pos.path, d.pos.line,
                                   d.pos.column, module.source_line(d.pos.line))
            if d.name in RESERVED:
                raise PatternError(f"'{d.name}' is a built-in name and cannot be redefined", d.pos.path,
                                   d.pos.line, d.pos.column, module.source_line(d.pos.line))
            own[d.name] = (d, key)
        scope.update(own)
        self._scopes[key] = scope
        return scope

    def module(self, key: str) -> Module:
        return prelude_module() if key == "<prelude>" else self.modules[key]

    def choose(self, pattern: str | None) -> PatternDef:
        pats = self.main.patterns
        names = [p.name for p in pats]
        for i, p in enumerate(pats):
            if p.name in names[:i]:
                raise PatternError(f"pattern '{p.name}' is defined twice in this file", p.pos.path, p.pos.line,
                                   p.pos.column, self.main.source_line(p.pos.line))
        if pattern is not None:
            for p in pats:
                if p.name == pattern:
                    return p
            raise PatternError(f"no pattern named {pattern!r}; this file has: {', '.join(names) or 'none'}",
                               self.main.path)
        if not pats:
            raise PatternError("no pattern in this source (write `pattern NAME(...) { mask ... }`)",
                               self.main.path)
        if len(pats) > 1:
            raise PatternError(f"this file has several patterns ({', '.join(names)}); choose one with "
                               f"pattern=NAME (--pattern NAME on the command line)", self.main.path)
        return pats[0]


# --------------------------------------------------------------------------------------------------
# Lowering: AST -> IR with type checks


@dataclass
class _Scope:
    module_key: str
    names: dict            # local names: lets, params, def arguments -> ir.Node | TensorRef
    allow_score: bool


class Lowerer:
    """Lowers one pattern's statements to IR, inlining every def call."""

    def __init__(self, program: Program):
        self.program = program
        self.stack: list[str] = []

    # errors --------------------------------------------------------------------------------------
    def error(self, message: str, pos: Pos | None) -> PatternError:
        if pos is None:
            return PatternError(message)
        key = pos.path or "<source>"
        try:
            src = self.program.module(key).source_line(pos.line)
        except KeyError:
            src = None
        return PatternError(message, pos.path, pos.line, pos.column, src)

    # values --------------------------------------------------------------------------------------
    def scalar(self, e: Expr, scope: _Scope, what: str = "a value") -> ir.Node:
        v = self.expr(e, scope)
        if isinstance(v, TensorRef):
            raise self.error(f"'{v.decl.name}' is an input tensor; read an element with "
                             f"{v.decl.name}[{', '.join(map(str, v.decl.dims))}] to use it as {what}", e.pos)
        return v

    def expect(self, e: Expr, scope: _Scope, kinds: tuple[str, ...], what: str) -> ir.Node:
        v = self.scalar(e, scope, what)
        if v.type not in kinds:
            raise self.error(f"{what} must be {' or '.join(kinds)}, but this is {v.type}", e.pos)
        return v

    def expr(self, e: Expr, scope: _Scope):
        method = getattr(self, "_" + type(e).__name__)
        return method(e, scope)

    def _IntLit(self, e, scope):
        if not -(1 << 63) <= e.value < (1 << 63):
            raise self.error("integer literal too large (integers are 64-bit)", e.pos)
        return ir.const(e.value)

    def _FloatLit(self, e, scope):
        return ir.const(e.value)

    def _BoolLit(self, e, scope):
        return ir.const(e.value)

    def _ScoreRef(self, e, scope):
        if not scope.allow_score:
            raise self.error("'score' (the incoming attention score) can only be used in a score "
                             "statement", e.pos)
        return ir.score()

    def _Name(self, e, scope):
        if e.id in scope.names:
            return scope.names[e.id]
        if e.id in ir.INDEX_VARS:
            return ir.var(e.id)
        if e.id in ir.SIZES:
            return ir.size(e.id)
        defs = self.program.scope(scope.module_key)
        if e.id in defs:
            return self._inline(defs[e.id], e.id, (), (), e.pos, scope)
        if e.id in BUILTINS:
            raise self.error(f"'{e.id}' is a function: call it as {e.id}(...)", e.pos)
        candidates = list(scope.names) + list(ir.INDEX_VARS) + list(ir.SIZES) + list(defs)
        hint = difflib.get_close_matches(e.id, candidates, n=1)
        raise self.error(f"unknown name '{e.id}'" + (f"; did you mean '{hint[0]}'?" if hint else ""), e.pos)

    def _Unary(self, e, scope):
        if e.op == "not":
            return ir.not_(self.expect(e.operand, scope, ("bool",), "the operand of 'not'"))
        x = self.expect(e.operand, scope, ("int", "float"), f"the operand of unary '{'-' if e.op == 'neg' else '+'}'")
        return ir.neg(x) if e.op == "neg" else x

    def _Binary(self, e, scope):
        if e.op in ("and", "or"):
            a = self.expect(e.left, scope, ("bool",), f"the left operand of '{e.op}'")
            b = self.expect(e.right, scope, ("bool",), f"the right operand of '{e.op}'")
            return ir.and_(a, b) if e.op == "and" else ir.or_(a, b)
        a = self.expect(e.left, scope, ("int", "float"), f"the left operand of '{e.op}'")
        b = self.expect(e.right, scope, ("int", "float"), f"the right operand of '{e.op}'")
        build = {"+": ir.add, "-": ir.sub, "*": ir.mul, "/": ir.div, "//": ir.floordiv, "%": ir.mod}[e.op]
        try:
            return build(a, b)
        except ir.ConstantDivisionByZero as exc:
            raise self.error(f"{exc} (the divisor is the constant 0)", e.pos) from None

    def _Compare(self, e, scope):
        names = {"==": "eq", "!=": "ne", "<": "lt", "<=": "le", ">": "gt", ">=": "ge"}
        values = [self.scalar(x, scope, "an operand of a comparison") for x in e.operands]
        parts = []
        for op, (x, y), (ex, ey) in zip(e.ops, zip(values, values[1:]), zip(e.operands, e.operands[1:])):
            if (x.type == "bool") != (y.type == "bool"):
                raise self.error(f"cannot compare {x.type} with {y.type} using '{op}'", e.pos)
            if x.type == "bool" and op not in ("==", "!="):
                raise self.error(f"'{op}' needs numbers, but both sides are bool", e.pos)
            parts.append(ir.compare(names[op], x, y))
        return ir.and_(*parts)

    def _Read(self, e, scope):
        target = scope.names.get(e.tensor)
        if not isinstance(target, TensorRef):
            if e.tensor in scope.names or e.tensor in ir.INDEX_VARS or e.tensor in ir.SIZES:
                raise self.error(f"'{e.tensor}' is not an input tensor and cannot be indexed", e.pos)
            raise self.error(f"unknown input tensor '{e.tensor}' (declare it with `input {e.tensor}: "
                             f"int[...]` in the pattern, or pass it to the def as an argument)", e.pos)
        decl = target.decl
        if len(e.indices) != len(decl.dims):
            raise self.error(f"'{decl.name}' has {len(decl.dims)} dimension(s) "
                             f"[{', '.join(map(str, decl.dims))}] but is read with {len(e.indices)} index(es)",
                             e.pos)
        idx = [self.expect(x, scope, ("int",), f"an index of '{decl.name}'") for x in e.indices]
        return ir.read(decl.name, decl.dtype, idx)

    def _Call(self, e, scope):
        defs = self.program.scope(scope.module_key)
        if e.func in BUILTINS and e.func not in defs:
            return self._builtin(e, scope)
        if e.func not in defs:
            candidates = list(defs) + list(BUILTINS)
            hint = difflib.get_close_matches(e.func, candidates, n=1)
            raise self.error(f"unknown function '{e.func}'" + (f"; did you mean '{hint[0]}'?" if hint else ""),
                             e.pos)
        return self._inline(defs[e.func], e.func, e.args, e.kwargs, e.pos, scope)

    def _builtin(self, e, scope):
        arity = BUILTINS[e.func]
        if e.kwargs:
            raise self.error(f"built-in '{e.func}' takes no keyword arguments", e.pos)
        if len(e.args) != arity:
            raise self.error(f"'{e.func}' takes {arity} argument(s), got {len(e.args)}", e.pos)
        if e.func == "where":
            c = self.expect(e.args[0], scope, ("bool",), "the condition of 'where'")
            a, b = (self.scalar(x, scope, "a branch of 'where'") for x in e.args[1:])
            if (a.type == "bool") != (b.type == "bool"):
                raise self.error(f"the branches of 'where' must have the same type, got {a.type} and {b.type}",
                                 e.pos)
            return ir.where(c, a, b)
        args = [self.expect(x, scope, ("int", "float"), f"an argument of '{e.func}'") for x in e.args]
        if e.func == "abs":
            return ir.abs_(args[0])
        if e.func == "min":
            return ir.min_(*args)
        if e.func == "max":
            return ir.max_(*args)
        if e.func == "clamp":
            return ir.clamp(*args)
        return ir.float_func(e.func, args[0])

    def _inline(self, entry, name, args, kwargs, pos, scope):
        fdef, module_key = entry
        frame = f"{module_key}:{name}"
        if frame in self.stack:
            raise self.error(f"'{name}' calls itself (recursion is not allowed: defs are inlined)", pos)
        if len(self.stack) > MAX_INLINE_DEPTH:
            raise self.error("defs are nested too deeply", pos)
        params = fdef.params
        if len(args) > len(params):
            raise self.error(f"'{name}' takes {len(params)} argument(s), got {len(args)}", pos)
        bound: dict = {}
        for p, a in zip(params, args):
            bound[p.name] = self.expr(a, scope)
        for kw, a in kwargs:
            if kw not in {p.name for p in params}:
                raise self.error(f"'{name}' has no parameter '{kw}' (it takes: "
                                 f"{', '.join(p.name for p in params) or 'nothing'})", a.pos)
            if kw in bound:
                raise self.error(f"'{name}' got parameter '{kw}' twice", a.pos)
            bound[kw] = self.expr(a, scope)
        inner = _Scope(module_key, {}, scope.allow_score)
        self.stack.append(frame)
        try:
            for p in params:
                if p.name in bound:
                    inner.names[p.name] = bound[p.name]
                elif p.default is not None:
                    inner.names[p.name] = self.expr(p.default, inner)
                else:
                    raise self.error(f"'{name}' is missing argument '{p.name}'", pos)
            for let in fdef.lets:
                inner.names[let.name] = self.expr(let.expr, inner)
            return self.expr(fdef.body, inner)
        finally:
            self.stack.pop()


# --------------------------------------------------------------------------------------------------
# Patterns


def _check_unique_params(params, owner: str, module: Module):
    seen = set()
    for p in params:
        if p.name in seen:
            raise PatternError(f"{owner} has two parameters named '{p.name}'", p.pos.path, p.pos.line,
                               p.pos.column, module.source_line(p.pos.line))
        seen.add(p.name)


def _bind_params(lowerer: Lowerer, pat: PatternDef, given: dict) -> dict:
    _check_unique_params(pat.params, f"pattern '{pat.name}'", lowerer.program.main)
    names = [p.name for p in pat.params]
    unknown = [n for n in given if n not in names]
    if unknown:
        raise lowerer.error(f"pattern '{pat.name}' has no parameter {', '.join(map(repr, unknown))} "
                            f"(its parameters: {', '.join(names) or 'none'})", pat.pos)
    values = {}
    for p in pat.params:
        if p.name in RESERVED:
            raise lowerer.error(f"'{p.name}' is a built-in name and cannot be a parameter", p.pos)
        if p.type is not None and p.type not in PARAM_TYPES:
            raise lowerer.error(f"unknown parameter type '{p.type}' (use int, float or bool)", p.pos)
        if p.name in given:
            value = given[p.name]
        elif p.default is not None:
            earlier = {n: ir.const(v) for n, v in values.items()}      # defaults may use earlier parameters
            node = lowerer.scalar(p.default, _Scope("<source>" if pat.pos.path is None else pat.pos.path,
                                                    earlier, False), "a default value")
            if not node.is_const:
                raise lowerer.error(f"the default of parameter '{p.name}' must be a constant", p.default.pos)
            value = node.value
        else:
            raise lowerer.error(f"pattern '{pat.name}' needs a value for parameter '{p.name}'"
                                f"{' (' + p.type + ')' if p.type else ''}", p.pos)
        values[p.name] = _check_param_value(lowerer, pat, p, value)
    return values


def _check_param_value(lowerer, pat, p: Param, value):
    typ = p.type
    if isinstance(value, bool):
        kind = "bool"
    elif isinstance(value, int):
        kind = "int"
    elif isinstance(value, float):
        kind = "float"
    else:
        raise lowerer.error(f"parameter '{p.name}' of pattern '{pat.name}' must be a number or bool, got "
                            f"{type(value).__name__}", p.pos)
    if kind == "int" and not -(1 << 63) <= value < (1 << 63):
        raise lowerer.error(f"parameter '{p.name}' = {value} does not fit in 64 bits", p.pos)
    if typ is None or typ == kind:
        return value
    if typ == "float" and kind == "int":
        return float(value)
    raise lowerer.error(f"parameter '{p.name}' of pattern '{pat.name}' is {typ}, got {kind} {value!r}", p.pos)


def lower_pattern(program: Program, pattern: str | None = None, params: dict | None = None) -> PatternIR:
    """Analyze and lower the chosen pattern of ``program`` with ``params`` bound."""
    pat = program.choose(pattern)
    lowerer = Lowerer(program)
    key = program._key(program.main)
    values = _bind_params(lowerer, pat, dict(params or {}))
    names = {n: ir.const(v) for n, v in values.items()}
    scope = _Scope(key, names, False)
    inputs: dict[str, InputDecl] = {}
    masks, score, mask_notes, score_note = [], None, [], None
    module = program.main

    def note(stmt):
        return SourceNote(stmt.pos.path, stmt.pos.line, (module.source_line(stmt.pos.line) or "").strip())

    for stmt in pat.stmts:
        if isinstance(stmt, InputStmt):
            if stmt.name in RESERVED or stmt.name in names:
                raise lowerer.error(f"input '{stmt.name}' clashes with an existing name", stmt.pos)
            if stmt.dtype not in DTYPES:
                raise lowerer.error(f"unknown input dtype '{stmt.dtype}' (use int, bool or float)", stmt.pos)
            decl = InputDecl(stmt.name, stmt.dtype, stmt.dims, stmt.pos)
            inputs[stmt.name] = decl
            names[stmt.name] = TensorRef(decl)
        elif isinstance(stmt, LetStmt):
            if stmt.name in RESERVED:
                raise lowerer.error(f"'{stmt.name}' is a built-in name and cannot be redefined", stmt.pos)
            names[stmt.name] = lowerer.expr(stmt.expr, _Scope(key, names, True))
        elif isinstance(stmt, MaskStmt):
            m = lowerer.expect(stmt.expr, scope, ("bool",), "a mask")
            masks.append(m)
            mask_notes.append(note(stmt))
        elif isinstance(stmt, ScoreStmt):
            if score is not None:
                raise lowerer.error("a pattern has at most one score statement", stmt.pos)
            s = lowerer.expect(stmt.expr, _Scope(key, names, True), ("int", "float"), "a score")
            score = ir.to_float(s)
            score_note = note(stmt)
    mask = ir.and_(*masks)
    for node in ir.postorder([mask] + ([score] if score is not None else [])):
        ints = [node.value] if node.op == "const" and node.type == "int" else (
            [c for _, c in node.attr[0]] + [node.attr[1]] if node.op == "lin" else [])
        if any(not -(1 << 62) <= v < (1 << 62) for v in ints):
            raise lowerer.error("an integer in this pattern grows beyond 62 bits after folding; kernels and "
                                "the reference compute with 64-bit integers", pat.pos)
    if ir.uses(mask, "score"):
        raise lowerer.error("a mask cannot depend on the score", pat.pos)
    if mask is ir.FALSE:
        first = next((s for s in pat.stmts if isinstance(s, MaskStmt)), None)
        raise lowerer.error("this mask is false everywhere: no query can see any key",
                            first.pos if first else pat.pos)
    if score is not None and score is ir.score():
        score = None
    return PatternIR(pat.name, values, inputs, mask, score, mask_notes, score_note, program.main.path)
