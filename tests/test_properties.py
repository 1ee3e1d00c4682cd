"""Property tests of the language: random expressions, random source mutations, and error reports.

1. Random well-typed expression trees, printed as source in several styles, compile to a kernel whose
   ``mask`` equals direct evaluation of the tree in Python ints (Python's floor ``//`` and ``%``); int
   expressions are also read back value by value (``mask k - 20 == E``); random ``score`` trees give the
   same attention as a float64 softmax computed here.
2. Random edits of valid sources either compile or raise an ``attnc.AttncError`` that says where.
3. Each kind of user error raises the documented class, with a location and a useful word.
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import attnc

try:  # tests/ may or may not be a package
    from tests import strategies as S
except ImportError:  # pragma: no cover
    import strategies as S

BATCH, HEADS = 2, 2
SETTINGS = dict(deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])
# Sizes (n_q, n_k, batch, heads) at which a pattern attnc calls provably empty is checked to be empty.
EMPTY_CHECK_SIZES = ((1, 1, 1, 1), (2, 7, 2, 2), (7, 2, 3, 1), (5, 5, 1, 3), (12, 12, 2, 2),
                     (12, 3, 3, 3), (3, 12, 4, 2), (17, 17, 1, 1))
EMPTY_WORDS = r"everywhere|everything|empty|nothing|no query|no key"


# --------------------------------------------------------------------------------------------------
# helpers


def expected_mask(masks, params, n_q, n_k, batch=BATCH, heads=HEADS) -> torch.Tensor:
    """The ANDed masks evaluated point by point in Python; raises S.Overflow for huge values."""
    out = torch.zeros(batch, heads, n_q, n_k, dtype=torch.bool)
    env = {"n_q": n_q, "n_k": n_k, "batch": batch, "heads": heads, "params": params}
    for b in range(batch):
        for h in range(heads):
            for i in range(n_q):
                for j in range(n_k):
                    env.update(b=b, h=h, q=i, k=j)
                    vals = [S.evaluate(m, env) for m in masks]
                    assert all(isinstance(v, bool) for v in vals)
                    out[b, h, i, j] = all(vals)
    return out


def describe_difference(src, got, want) -> str:
    diff = (got != want).nonzero().tolist()
    b, h, i, j = diff[0]
    return (f"mask differs at {len(diff)} points, first (b={b}, h={h}, q={i}, k={j}): "
            f"attnc says {bool(got[b, h, i, j])}, Python says {bool(want[b, h, i, j])}\n"
            f"--- source ---\n{src}")


PRELUDE = os.path.join(os.path.dirname(attnc.__file__), "prelude.attn")


def source_text_of(err, src: str) -> str | None:
    """The text the error's location refers to: the file it names, the prelude, or the source we
    compiled (path None or '<source>'); None when the path names something else."""
    path = getattr(err, "path", None)
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    if path == "<prelude>" and os.path.isfile(PRELUDE):
        with open(PRELUDE, encoding="utf-8") as f:
            return f.read()
    if path is None or path == "<source>":
        return src
    return None


def check_location(err, src: str, *, required: bool) -> None:
    """line/column present (when required), inside the text, and shown as 'line:column'."""
    line, column = getattr(err, "line", None), getattr(err, "column", None)
    if line is None:
        assert not required, f"{type(err).__name__} without a line: {err}"
        return
    assert column is not None, f"line set but no column: {err!r}"
    assert f"{line}:{column}" in str(err), f"message lacks '{line}:{column}': {err}"
    text = source_text_of(err, src)
    if text is None:
        return
    lines = text.split("\n")
    assert 1 <= line <= len(lines), f"line {line} outside 1..{len(lines)}: {err}\n--- source ---\n{src}"
    assert 1 <= column <= len(lines[line - 1]) + 1, (
        f"column {column} outside line {line} ({lines[line - 1]!r}): {err}\n--- source ---\n{src}")
    assert f"{line}:{column}" in str(err), f"message lacks '{line}:{column}': {err}"


# --------------------------------------------------------------------------------------------------
# 1. random expressions -> source -> mask / reference


def compile_valid(prog, n_q, n_k):
    """Compile a generated (valid) program. Returns None when attnc rejects it as masking everything,
    after checking that it indeed masks everything at several sizes."""
    try:
        kern = attnc.compile(prog.source, **prog.kwargs)
    except attnc.PatternError as err:
        event("rejected as provably empty")
        # The only semantic error a well-typed program may get: "masks everything", which must be true.
        assert re.search(EMPTY_WORDS, str(err), re.IGNORECASE), (
            f"valid source rejected: {err}\n--- source ---\n{prog.source}")
        for nq, nk, nb, nh in EMPTY_CHECK_SIZES + ((n_q, n_k, BATCH, HEADS),):
            try:
                empty = not expected_mask(prog.masks, prog.params, nq, nk, nb, nh).any()
            except S.Overflow:
                continue
            assert empty, (f"attnc rejected a pattern that is not empty at n_q={nq}, n_k={nk}, "
                           f"batch={nb}, heads={nh}: {err}\n--- source ---\n{prog.source}")
        return None
    except attnc.PatternSyntaxError as err:
        raise AssertionError(f"valid source rejected: {err}\n--- source ---\n{prog.source}") from err
    event("compiled")
    return kern


@settings(max_examples=150, **SETTINGS)
@given(prog=S.mask_programs(), n_q=st.integers(1, 12), n_k=st.integers(1, 12))
def test_random_mask_matches_python(prog, n_q, n_k):
    try:
        want = expected_mask(prog.masks, prog.params, n_q, n_k)
    except S.Overflow:
        assume(False)
    kern = compile_valid(prog, n_q, n_k)
    if kern is None:
        return
    got = kern.mask(n_q, n_k, batch=BATCH, heads=HEADS)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.bool
    assert tuple(got.shape) == (BATCH, HEADS, n_q, n_k)
    if not torch.equal(got.cpu(), want):
        raise AssertionError(describe_difference(prog.source, got.cpu(), want))
    # Sizes are runtime values: the same kernel answers for other sizes too.
    try:
        want = expected_mask(prog.masks, prog.params, n_k, n_q, batch=1, heads=3)
    except S.Overflow:
        return
    got = kern.mask(n_k, n_q, batch=1, heads=3)
    if not torch.equal(got.cpu(), want):
        raise AssertionError(describe_difference(prog.source, got.cpu(), want))


@settings(max_examples=100, **SETTINGS)
@given(prog=S.value_programs(), n_q=st.integers(1, 12))
def test_random_int_expression_values(prog, n_q):
    n_k = S.VALUE_KEYS
    try:
        want = expected_mask(prog.masks, prog.params, n_q, n_k)
    except S.Overflow:
        assume(False)
    event("value in the probed range" if want.any() else "value outside the probed range")
    kern = compile_valid(prog, n_q, n_k)
    if kern is None:
        return
    got = kern.mask(n_q, n_k, batch=BATCH, heads=HEADS)
    if not torch.equal(got.cpu(), want):
        raise AssertionError(describe_difference(prog.source, got.cpu(), want))


def reference_attention(prog, q, k, v, params):
    """float64 attention with the program's masks and score tree, computed element by element."""
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * (1.0 / math.sqrt(D))
    table = torch.full((B, H, n_q, n_k), -math.inf, dtype=torch.float64)
    env = {"n_q": n_q, "n_k": n_k, "batch": B, "heads": H, "params": params}
    for b in range(B):
        for h in range(H):
            for i in range(n_q):
                for j in range(n_k):
                    env.update(b=b, h=h, q=i, k=j, score=float(scores[b, h, i, j]))
                    value = S.evaluate(prog.score, env)  # raises S.Overflow when out of range
                    if all(S.evaluate(m, env) for m in prog.masks):
                        table[b, h, i, j] = value
    lse = torch.logsumexp(table, dim=-1)
    empty = torch.isinf(lse)
    probs = torch.exp(table - torch.where(empty, 0.0, lse)[..., None])
    probs = torch.where(empty[..., None], 0.0, probs)
    return probs @ v, lse


@settings(max_examples=60, **SETTINGS)
@given(prog=S.score_programs(), n_q=st.integers(1, 12), n_k=st.integers(1, 12),
       seed=st.integers(0, 2 ** 16))
def test_random_score_matches_float64_softmax(prog, n_q, n_k, seed):
    gen = torch.Generator().manual_seed(seed)
    D = 16
    q = torch.randn(BATCH, HEADS, n_q, D, generator=gen, dtype=torch.float64)
    k = torch.randn(BATCH, HEADS, n_k, D, generator=gen, dtype=torch.float64)
    v = torch.randn(BATCH, HEADS, n_k, D, generator=gen, dtype=torch.float64)
    try:
        want, want_lse = reference_attention(prog, q, k, v, prog.params)
    except S.Overflow:
        assume(False)
    try:
        kern = attnc.compile(prog.source, **prog.kwargs)
    except attnc.AttncError as err:
        raise AssertionError(f"valid score pattern rejected: {err}\n--- source ---\n{prog.source}") from err
    out, lse = kern.reference(q, k, v, return_lse=True)
    assert tuple(out.shape) == (BATCH, HEADS, n_q, D)
    assert tuple(lse.shape) == (BATCH, HEADS, n_q)
    context = f"\n--- source ---\n{prog.source}"
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5, msg=lambda m: m + context)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse)), "empty rows differ" + context
    finite = ~torch.isinf(want_lse)
    torch.testing.assert_close(lse.double()[finite], want_lse[finite], rtol=1e-5, atol=1e-4,
                               msg=lambda m: m + context)


@pytest.mark.parametrize("expr", ["q % 0 == 0", "q // 0 == k", "q % (3 - 3) == 0", "k // (2 * 0) < q"])
def test_constant_division_by_zero_is_a_pattern_error(expr):
    src = f"pattern p() {{\n    mask {expr}\n}}\n"
    with pytest.raises(attnc.PatternError) as info:
        attnc.compile(src)
    msg = str(info.value).lower()
    assert "zero" in msg or "division" in msg or "modulo" in msg, msg
    assert info.value.line == 2
    check_location(info.value, src, required=True)


def test_constant_float_division_by_zero_is_a_pattern_error():
    src = "pattern p() {\n    score score / 0.0\n}\n"
    with pytest.raises(attnc.PatternError) as info:
        attnc.compile(src)
    assert "zero" in str(info.value).lower() or "division" in str(info.value).lower()
    check_location(info.value, src, required=True)


@pytest.mark.parametrize("text, fn", [
    ("-7 % 3 == q - k", lambda q, k: (-7 % 3) == q - k),          # unary minus binds tighter than %
    ("-q // 2 == -k", lambda q, k: (-q // 2) == -k),
    ("q % -3 == -(k % 3)", lambda q, k: q % -3 == -(k % 3)),        # % has the sign of the divisor
    ("not q < k and k > 1", lambda q, k: (not q < k) and k > 1),
    ("q < k or k < 2 and q > 3", lambda q, k: q < k or (k < 2 and q > 3)),
    ("1 <= q - k < 3", lambda q, k: 1 <= q - k < 3),
    ("q == k == 2", lambda q, k: q == k == 2),
    ("q - k - 1 < 2 * k - q", lambda q, k: q - k - 1 < 2 * k - q),
    ("(q < k) | (q == k) & (k > 2)", lambda q, k: (q < k) or ((q == k) and (k > 2))),
    ("~(q < k) & ~(k < 1)", lambda q, k: (not q < k) and (not k < 1)),
    ("clamp(q - k, -1, 2) == min(max(q - k, -1), 2) and where(q > k, q, k) == max(q, k)",
     lambda q, k: True),
])
def test_precedence_examples(text, fn):
    """Fixed spot checks of Python's precedence (the random test covers the general case)."""
    src = f"pattern p() {{ mask {text} }}"
    n = 9
    want = torch.tensor([[fn(i, j) for j in range(n)] for i in range(n)])
    if not want.any():
        pytest.skip("empty")
    got = attnc.compile(src).mask(n, n)[0, 0]
    assert torch.equal(got, want), f"{text}\n{got.int()}\n{want.int()}"


# --------------------------------------------------------------------------------------------------
# 2. random mutations of valid sources


def test_seed_sources_compile():
    for name, src in S.SEED_SOURCES.items():
        kern = attnc.compile(src)
        assert kern is not None, name


@settings(max_examples=100, **SETTINGS)
@given(mutant=S.mutated_sources())
def test_mutated_sources_raise_only_attnc_errors(mutant):
    _seed, src = mutant
    try:
        kern = attnc.compile(src)
    except attnc.PatternSyntaxError as err:
        event("PatternSyntaxError")
        check_location(err, src, required=True)
        return
    except attnc.AttncError as err:
        event(type(err).__name__ + (" with location" if err.line is not None else " without location"))
        check_location(err, src, required=False)
        return
    event("compiled")
    # It still compiles: its mask (when it needs no runtime inputs) is computable or an AttncError.
    if not getattr(kern, "inputs", None):
        try:
            mask = kern.mask(3, 4, batch=1, heads=2)
        except attnc.AttncError:
            return
        assert mask.dtype == torch.bool and tuple(mask.shape) == (1, 2, 3, 4)


# --------------------------------------------------------------------------------------------------
# 3. error reports


def expect_error(cls, src, words, *, line=None, located=True, **kwargs):
    """Compile ``src`` expecting ``cls``; check a word of the message and, if ``located``, the place."""
    with pytest.raises(attnc.AttncError) as info:
        attnc.compile(src, **kwargs)
    err = info.value
    assert isinstance(err, cls), f"expected {cls.__name__}, got {type(err).__name__}: {err}"
    msg = str(err)
    assert any(re.search(w, msg, re.IGNORECASE) for w in words), f"none of {words} in: {msg}"
    if located:
        check_location(err, src, required=True)
        if line is not None:
            assert err.line == line, f"line {err.line}, expected {line}: {msg}"
    else:
        check_location(err, src, required=False)
    return err


def test_syntax_error_shows_place_and_expectation():
    src = "pattern p() {\n    mask q < \n}\n"
    err = expect_error(attnc.PatternSyntaxError, src, [r"expect"])
    assert err.line in (2, 3)
    assert "^" in str(err), str(err)


def test_syntax_error_bad_token():
    src = "pattern p() {\n    mask q <> k\n}\n"
    err = expect_error(attnc.PatternSyntaxError, src, [r"expect", r"unexpected"], line=2)
    assert "mask q <> k" in str(err)
    assert 9 <= err.column <= 14


def test_unknown_name():
    src = "pattern p() {\n    mask q < foo + 1\n}\n"
    err = expect_error(attnc.PatternError, src, [r"\bfoo\b"], line=2)
    assert err.column <= 14


def test_unknown_function():
    src = "pattern p() {\n    mask frob(q) < k\n}\n"
    expect_error(attnc.PatternError, src, [r"\bfrob\b"], line=2)


def test_let_used_before_definition():
    src = "pattern p() {\n    mask q < t\n    let t = k\n}\n"
    expect_error(attnc.PatternError, src, [r"\bt\b"], line=2)


@pytest.mark.parametrize("expr", ["abs(q, k) < 3", "clamp(q, 1) < k", "window(1, 2, 3)",
                                  "where(q < k, 1) == 1"])
def test_wrong_arity_builtin_and_prelude(expr):
    src = f"pattern p() {{\n    mask {expr}\n}}\n"
    expect_error(attnc.PatternError, src, [r"argument", r"arity", r"expect", r"takes", r"given"], line=2)


@pytest.mark.parametrize("call", ["f(q)", "f(q, k, 1)", "f(q, z = 1)", "f(q, x = k)"])
def test_wrong_arity_def(call):
    src = f"def f(x, y) = x < y\n\npattern p() {{\n    mask {call}\n}}\n"
    expect_error(attnc.PatternError, src, [r"argument", r"arity", r"expect", r"takes", r"given",
                                           r"\bz\b", r"missing", r"twice"], line=4)


@pytest.mark.parametrize("stmt, words", [
    ("mask q + k", [r"bool", r"type"]),
    ("score q < k", [r"float", r"type", r"bool"]),
    ("mask (q < k) + 1 > 0", [r"bool", r"type", r"int"]),
    ("mask where(q < k, 1, true)", [r"bool", r"type", r"int"]),
    ("mask score > 0", [r"score"]),
])
def test_type_mismatch(stmt, words):
    src = f"pattern p() {{\n    {stmt}\n}}\n"
    expect_error(attnc.PatternError, src, words, line=2)


def test_two_score_statements():
    src = "pattern p() {\n    score score * 2.0\n    score score + 1.0\n}\n"
    expect_error(attnc.PatternError, src, [r"score"])


def test_missing_parameter():
    src = "pattern p(w: int) {\n    mask q - k < w\n}\n"
    expect_error(attnc.PatternError, src, [r"\bw\b"], located=False)


def test_missing_parameter_then_given():
    src = "pattern p(w: int) {\n    mask 0 <= q - k < w\n}\n"
    got = attnc.compile(src, w=2).mask(5, 5)[0, 0]
    want = torch.tensor([[0 <= i - j < 2 for j in range(5)] for i in range(5)])
    assert torch.equal(got, want)


def test_unknown_parameter():
    src = "pattern p(w: int = 2) {\n    mask q - k < w\n}\n"
    expect_error(attnc.PatternError, src, [r"\bbogus\b"], located=False, bogus=3)


@pytest.mark.parametrize("decl, value, words", [
    ("w: int = 2", 1.5, [r"\bint\b", r"\bw\b"]),
    ("w: int = 2", "3", [r"\bint\b", r"\bw\b"]),
    ("w: bool = true", 3, [r"\bbool\b", r"\bw\b"]),
    ("w: float = 1.0", "x", [r"\bfloat\b", r"\bw\b"]),
])
def test_wrong_parameter_type(decl, value, words):
    use = "mask w" if "bool" in decl else ("score score * w" if "float" in decl else "mask q - k < w")
    src = f"pattern p({decl}) {{\n    {use}\n}}\n"
    expect_error(attnc.PatternError, src, words, located=False, w=value)


@pytest.mark.parametrize("defs", [
    "def f(x) = f(x - 1) or x < 0",
    "def f(x) = g(x) and x > 0\ndef g(y) = f(y + 1)",
    "def f(x) {\n    let y = f(x)\n    return y\n}",
    "def f = f",
])
def test_recursion_is_an_error(defs):
    src = f"{defs}\n\npattern p() {{\n    mask f(q - k)\n}}\n"
    if defs == "def f = f":
        src = "def f() = f\n\npattern p() {\n    mask f and q >= k\n}\n"
    expect_error(attnc.PatternError, src, [r"recurs", r"cycle"])


def test_several_patterns_without_choosing():
    src = "pattern a() {\n    mask causal\n}\n\npattern b() {\n    mask q == k\n}\n"
    expect_error(attnc.PatternError, src, [r"pattern"], located=False)
    got = attnc.compile(src, pattern="b").mask(4, 4)[0, 0]
    assert torch.equal(got, torch.eye(4, dtype=torch.bool))
    expect_error(attnc.PatternError, src, [r"\bzz\b"], located=False, pattern="zz")


@pytest.mark.parametrize("read, words", [
    ("x[b] == x[b, k]", [r"ind", r"dimension", r"\bx\b"]),
    ("x[b, q, k] == 0", [r"ind", r"dimension", r"\bx\b"]),
    ("x[b, q] == x", [r"\bx\b", r"tensor", r"ind"]),
])
def test_tensor_read_wrong_number_of_indices(read, words):
    src = f"pattern p() {{\n    input x: int[batch, N]\n    mask {read}\n}}\n"
    expect_error(attnc.PatternError, src, words, line=3)


def test_import_cycle(tmp_path):
    (tmp_path / "a.attn").write_text('import "b.attn"\n\npattern pa() {\n    mask fb(q, k)\n}\n')
    (tmp_path / "b.attn").write_text('import "a.attn"\n\ndef fb(x, y) = x >= y\n')
    with pytest.raises(attnc.PatternError) as info:
        attnc.compile(str(tmp_path / "a.attn"))
    err = info.value
    msg = str(err).lower()
    assert "cycle" in msg or "circular" in msg, msg
    assert err.line is not None, f"no location for the import: {err}"
    check_location(err, "", required=True)
    assert "a.attn" in msg or "b.attn" in msg


def test_import_self(tmp_path):
    (tmp_path / "s.attn").write_text('import "s.attn"\npattern ps() {\n    mask causal\n}\n')
    with pytest.raises(attnc.PatternError) as info:
        attnc.compile(str(tmp_path / "s.attn"))
    assert "cycle" in str(info.value).lower() or "circular" in str(info.value).lower()


def test_import_missing_file(tmp_path):
    (tmp_path / "m.attn").write_text('import "nothere.attn"\npattern pm() {\n    mask causal\n}\n')
    with pytest.raises(attnc.PatternError) as info:
        attnc.compile(str(tmp_path / "m.attn"))
    assert "nothere.attn" in str(info.value)
    assert info.value.line == 1


def test_diamond_import_is_not_a_cycle(tmp_path):
    (tmp_path / "base.attn").write_text("def lower(x, y) = y <= x\n")
    (tmp_path / "left.attn").write_text('import "base.attn"\ndef l2(x, y) = lower(x, y)\n')
    (tmp_path / "right.attn").write_text('import "base.attn"\ndef r2(x, y) = lower(x, y) and x - y < 3\n')
    (tmp_path / "top.attn").write_text(
        'import "left.attn"\nimport "right.attn"\n\npattern top() {\n    mask l2(q, k) and r2(q, k)\n}\n')
    got = attnc.compile(str(tmp_path / "top.attn")).mask(6, 6)[0, 0]
    want = torch.tensor([[0 <= i - j < 3 for j in range(6)] for i in range(6)])
    assert torch.equal(got, want)


@pytest.mark.parametrize("body, line", [
    ("    mask false", 2),
    ("    mask k <= q\n    mask false", None),
    ("    mask true and false", 2),
    ("    mask not true", 2),
])
def test_mask_everything_is_an_error(body, line):
    src = f"pattern p() {{\n{body}\n}}\n"
    err = expect_error(attnc.PatternError, src, [r"mask", r"empty", r"everything", r"nothing", r"no key"],
                       located=False)
    if line is not None:
        assert err.line == line, str(err)
        check_location(err, src, required=True)


@pytest.mark.parametrize("expr", [
    "q - k < 99999999999999999999999",             # beyond int64
    "2 * 99999999999999999999 > q or k <= q",
    "q * 4611686018427387904 * 4 > k or k <= q",    # overflows int64 when evaluated
    "exp(1000.0) > 1.0 or k <= q",                  # constant folding must not leak math errors
    "log(0.0) < 1.0 or k <= q",
    "log(-1.0) < 1.0 or k <= q",
    "sqrt(-4.0) > 0.0 or k <= q",
    "q // (k - q) == 0 or k <= q",                  # a divisor that is zero at some points
    "q % (k - q + 1) == 0 or k <= q",
])
def test_user_mistakes_never_leak_internal_exceptions(expr):
    """Compiling and evaluating either works or raises an AttncError (SPEC 2.4), nothing else."""
    src = f"pattern p() {{\n    mask {expr}\n}}\n"
    try:
        kern = attnc.compile(src)
        mask = kern.mask(4, 4)
    except attnc.AttncError as err:
        check_location(err, src, required=False)
    else:
        assert mask.dtype == torch.bool and tuple(mask.shape) == (1, 1, 4, 4)


def test_huge_parameter_value_is_an_attnc_error():
    src = "pattern p(w: int = 2) {\n    mask q - k < w\n}\n"
    try:
        attnc.compile(src, w=10 ** 30).mask(3, 3)
    except attnc.AttncError:
        pass


def test_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "bad.attn"
    bad.write_bytes(b"pattern p() {\n    mask k <= q \xff\n}\n")
    with pytest.raises(attnc.AttncError):
        attnc.compile(str(bad))
    top = tmp_path / "top.attn"
    top.write_text('import "bad.attn"\npattern t() {\n    mask k <= q\n}\n')
    with pytest.raises(attnc.AttncError):
        attnc.compile(str(top))


@pytest.mark.parametrize("src, name", [
    ("pattern p(w: int = 1, w: int = 2) {\n    mask q - k < w\n}\n", "w"),
    ("def f(x, x) = x\n\npattern p() {\n    mask f(k, 1) <= q\n}\n", "x"),
    ("pattern p() {\n    mask k <= q\n}\n\npattern p() {\n    mask k >= q\n}\n", "p"),
])
def test_duplicate_names_are_errors(src, name):
    """A name declared twice in one list (like Python's 'duplicate argument'), or two patterns of one
    name in a file (as two defs of one name already are), is a pattern error, not a silent pick."""
    kwargs = {"pattern": "p"} if src.count("pattern p") == 2 else {}
    err = expect_error(attnc.PatternError, src, [rf"\b{name}\b"], located=False, **kwargs)
    assert err.line is not None, str(err)


def test_missing_file_path_is_an_attnc_error():
    with pytest.raises(attnc.AttncError):
        attnc.compile("no/such/dir/pattern_file.attn")


def test_bad_input_dtype_declaration():
    src = "pattern p() {\n    input x: string[n_k]\n    mask x[k]\n}\n"
    with pytest.raises(attnc.AttncError) as info:
        attnc.compile(src)
    assert info.value.line == 2, str(info.value)


# --------------------------------------------------------------------------------------------------
# Residue classes in closed form (attnc.plan.residue_local_mask)


@st.composite
def _residue_masks(draw):
    """A random and/or of atoms over q - k (linear, with n_q / n_k terms, or modular), sometimes with an
    atom that tells residue classes apart (``k <= c``, ``q % 3 == r``), and ``dilated(d)`` on top."""
    from attnc import ir
    q, k = ir.var("q"), ir.var("k")
    diff = ir.sub(q, k)

    def atom(class_free: bool):
        kind = draw(st.sampled_from(["linear", "linear", "sizes", "modular"] if class_free else ["key", "query"]))
        if kind == "key":
            return ir.compare("le", k, ir.const(draw(st.integers(0, 30))))
        if kind == "query":
            m = draw(st.integers(2, 4))
            return ir.compare("eq", ir.mod(q, ir.const(m)), ir.const(draw(st.integers(0, m - 1))))
        lhs = ir.mul(ir.const(draw(st.integers(-3, 3).filter(bool))), diff)
        if kind == "sizes":
            lhs = ir.add(lhs, ir.mul(ir.const(draw(st.integers(-1, 1))), ir.size(draw(st.sampled_from(["n_q", "n_k"])))))
        if kind == "modular":
            m = draw(st.integers(2, 5))
            return ir.compare(draw(st.sampled_from(["eq", "ne"])), ir.mod(lhs, ir.const(m)),
                              ir.const(draw(st.integers(0, m - 1))))
        return ir.compare(draw(st.sampled_from(["le", "lt", "eq", "ne"])), lhs, ir.const(draw(st.integers(-30, 30))))

    class_free = draw(st.booleans())
    atoms = [atom(True) for _ in range(draw(st.integers(1, 3)))]
    if not class_free:
        atoms.append(atom(False))
    body = atoms[0]
    for a in atoms[1:]:
        body = (ir.and_ if draw(st.booleans()) else ir.or_)(body, a)
    d = draw(st.integers(2, 4))
    dilated = ir.compare("eq", ir.mod(diff, ir.const(d)), ir.const(0))
    return ir.and_(body, dilated), d, class_free


@settings(max_examples=300, **SETTINGS)
@given(case=_residue_masks(), m_q=st.integers(1, 6), m_k=st.integers(1, 6))
def test_residue_local_mask_matches_the_mask_on_every_class(case, m_q, m_k):
    """Whenever residue_local_mask answers, its class-local mask at (j_q, j_k) over lengths n / d is the mask
    at positions (c + d j_q, c + d j_k) for every class c; and it answers for every mask through q - k."""
    from attnc.evaluate import evaluate
    from attnc.plan import residue_local_mask
    mask, d, class_free = case
    assume(not mask.is_const)              # atoms that fold to true / false: no pattern left
    got = residue_local_mask(mask)
    if class_free:
        assert got is not None
    if got is None:
        return
    # The first residue conjunct sets d (the body may hold another, e.g. (q - k) % 2 == 0).
    assert got[0] == d or got[0] in (2, 3, 4, 5)
    d = got[0]
    n_q, n_k = d * m_q, d * m_k
    full = evaluate([mask], {"q": torch.arange(n_q)[:, None], "k": torch.arange(n_k)[None, :], "n_q": n_q,
                             "n_k": n_k, "b": 0, "h": 0})[0]
    local = evaluate([got[1]], {"q": torch.arange(m_q)[:, None], "k": torch.arange(m_k)[None, :], "n_q": m_q,
                                "n_k": m_k, "b": 0, "h": 0})[0]
    full = torch.as_tensor(full).expand(n_q, n_k)
    local = torch.as_tensor(local).expand(m_q, m_k)
    for c in range(d):
        assert torch.equal(full[c::d, c::d], local), (c, str(mask))
