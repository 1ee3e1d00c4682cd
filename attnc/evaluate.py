"""The one op table: how each IR op is computed in torch (reference semantics) and in Triton (kernels).

``evaluate`` runs an IR DAG on broadcastable torch tensors; it is what ``kern.mask`` and
``kern.reference`` use, and what the kernels are tested against. The Triton column is used by
:mod:`attnc.codegen` to print the same ops into kernel source, so the two can not drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from . import ir


def _t(x, like=None):
    if isinstance(x, torch.Tensor):
        return x
    device = like.device if isinstance(like, torch.Tensor) else None
    return torch.as_tensor(x, device=device)


def _any_tensor(*xs):
    return next((x for x in xs if isinstance(x, torch.Tensor)), None)


def _binary(py: Callable, th: Callable):
    def fn(a, b):
        t = _any_tensor(a, b)
        if t is None:
            return py(a, b)
        return th(_t(a, t), _t(b, t))
    return fn


def _unary(py: Callable, th: Callable):
    def fn(a):
        return th(a) if isinstance(a, torch.Tensor) else py(a)
    return fn


def _floordiv_t(a, b):
    if a.is_floating_point() or b.is_floating_point():
        return torch.floor(a / b)
    # A divisor that is zero at some positions: x // 0 = 0 (the kernels' helpers do the same).
    zero = b == 0
    q = torch.div(a, torch.where(zero, torch.ones_like(b), b), rounding_mode="floor")
    return torch.where(zero, torch.zeros_like(q), q)


def _remainder_t(a, b):
    if a.is_floating_point() or b.is_floating_point():
        return torch.remainder(a, b)
    zero = b == 0                     # x % 0 = x, so that x == (x // 0) * 0 + x % 0 still holds
    r = torch.remainder(a, torch.where(zero, torch.ones_like(b), b))
    return torch.where(zero, a.expand_as(r) if a.dim() else a + torch.zeros_like(r), r)


def _py_floordiv(a, b):
    if b == 0:
        return 0 if isinstance(a, int) and isinstance(b, int) else (math.nan if a == 0 else math.copysign(math.inf, a) * math.copysign(1, b))
    return a // b


def _py_mod(a, b):
    if b == 0:
        return a if isinstance(a, int) and isinstance(b, int) else math.nan
    return a % b


def _safe_math(fn, on_overflow=math.inf):
    """Python math with IEEE results instead of exceptions (log(0) = -inf, sqrt(-1) = nan, ...)."""
    def wrapped(x):
        try:
            return fn(x)
        except OverflowError:
            return on_overflow
        except ValueError:
            return -math.inf if fn is math.log and x == 0 else math.nan
    return wrapped


def _where(c, a, b):
    t = _any_tensor(c, a, b)
    if t is None:
        return a if c else b
    return torch.where(_t(c, t), _t(a, t), _t(b, t))


def _sigmoid_py(x):
    return 1.0 / (1.0 + math.exp(-x)) if x > -700 else 0.0


@dataclass(frozen=True)
class Op:
    """An IR op: ``torch`` computes it on tensors or Python scalars; ``triton`` formats kernel code."""
    torch: Callable
    triton: str


OPS: dict[str, Op] = {
    "add": Op(_binary(lambda a, b: a + b, torch.add), "({0} + {1})"),
    "sub": Op(_binary(lambda a, b: a - b, torch.sub), "({0} - {1})"),
    "mul": Op(_binary(lambda a, b: a * b, torch.mul), "({0} * {1})"),
    "div": Op(_binary(lambda a, b: a / b if b else math.copysign(math.inf, a) if a else math.nan,
                      torch.true_divide), "({0} / {1})"),
    # Python's floor semantics: Triton's // and % truncate toward zero, hence the helpers.
    "floordiv": Op(_binary(_py_floordiv, _floordiv_t), "_floordiv({0}, {1})"),
    "mod": Op(_binary(_py_mod, _remainder_t), "_mod({0}, {1})"),
    "neg": Op(_unary(lambda a: -a, torch.neg), "(-{0})"),
    "abs": Op(_unary(abs, torch.abs), "tl.abs({0})"),
    "min": Op(_binary(min, torch.minimum), "tl.minimum({0}, {1})"),
    "max": Op(_binary(max, torch.maximum), "tl.maximum({0}, {1})"),
    "exp": Op(_unary(_safe_math(math.exp), torch.exp), "tl.exp({0})"),
    "log": Op(_unary(_safe_math(math.log), torch.log), "tl.log({0})"),
    "sqrt": Op(_unary(_safe_math(math.sqrt), torch.sqrt), "tl.sqrt({0})"),
    "tanh": Op(_unary(math.tanh, torch.tanh), "_tanh({0})"),
    "sigmoid": Op(_unary(_sigmoid_py, torch.sigmoid), "tl.sigmoid({0})"),
    "eq": Op(_binary(lambda a, b: a == b, torch.eq), "({0} == {1})"),
    "ne": Op(_binary(lambda a, b: a != b, torch.ne), "({0} != {1})"),
    "lt": Op(_binary(lambda a, b: a < b, torch.lt), "({0} < {1})"),
    "le": Op(_binary(lambda a, b: a <= b, torch.le), "({0} <= {1})"),
    "not": Op(_unary(lambda a: not a, torch.logical_not), "({0} == 0)"),
    "where": Op(_where, "tl.where({0}, {1}, {2})"),
}


def _and(*xs):
    out = xs[0]
    for x in xs[1:]:
        t = _any_tensor(out, x)
        out = (out and x) if t is None else torch.logical_and(_t(out, t), _t(x, t))
    return out


def _or(*xs):
    out = xs[0]
    for x in xs[1:]:
        t = _any_tensor(out, x)
        out = (out or x) if t is None else torch.logical_or(_t(out, t), _t(x, t))
    return out


def read_tensor(x: torch.Tensor, indices: list, dtype: str):
    """``x[indices]`` with broadcasting index tensors; out-of-range indices read 0 (False)."""
    t = _any_tensor(*indices)
    idx = [_t(i, t if t is not None else x).long() for i in indices]
    idx = [i.to(x.device) for i in idx]
    valid = None
    clamped = []
    for i, n in zip(idx, x.shape):
        ok = (i >= 0) & (i < n)
        valid = ok if valid is None else valid & ok
        clamped.append(i.clamp(0, max(n - 1, 0)))
    if x.numel() == 0:
        value = torch.zeros(torch.broadcast_shapes(*(i.shape for i in clamped)), dtype=x.dtype, device=x.device)
    else:
        value = x[tuple(clamped)]
    zero = torch.zeros((), dtype=value.dtype, device=value.device)
    return torch.where(valid, value, zero)


def evaluate(roots: list[ir.Node], env: dict) -> list:
    """Evaluate IR nodes. ``env`` maps 'b','h','q','k' and sizes to tensors/ints, 'score' to a tensor,
    input names to tensors, and '__float__' to the float dtype used for int->float conversions."""
    values: dict[ir.Node, object] = {}
    float_dtype = env.get("__float__", torch.float32)
    for node in ir.postorder(roots):
        op = node.op
        args = [values[a] for a in node.args]
        if op == "const":
            v = node.value
        elif op in ("var", "size"):
            v = env[node.attr]
        elif op == "score":
            v = env["score"]
        elif op == "read":
            v = read_tensor(env[node.attr], args, node.type)
            if node.type == "float":
                v = v.to(float_dtype)
        elif op == "lin":
            items, c = node.attr
            v = c
            for (term, coeff), a in zip(items, args):
                v = v + coeff * a
        elif op == "tofloat":
            v = args[0].to(float_dtype) if isinstance(args[0], torch.Tensor) else float(args[0])
        elif op == "and":
            v = _and(*args)
        elif op == "or":
            v = _or(*args)
        else:
            v = OPS[op].torch(*args)
        values[node] = v
    return [values[r] for r in roots]
