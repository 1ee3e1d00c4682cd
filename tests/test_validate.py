"""Every mistake a caller can make with a compiled kernel is an ``attnc.InputError`` that says what was wrong.

q, k, v (types, ranks, dtypes, devices, batch / head / length / head-dim agreement, GQA groups), runtime inputs
(missing, unexpected, not tensors, wrong dtype, rank, fixed or bound sizes, device), the softmax scale, the
sizes given to ``plan`` / ``mask`` / ``explain`` / ``example_inputs`` / ``flex_mask_mod``, and the size of a dense
mask. Each case goes through the public API and checks the error's class and the words that locate the mistake;
no internal exception (TypeError, ValueError, AttributeError, an allocator failure) may reach the caller.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import attnc

WINDOW = "pattern sliding(window: int = 8) { mask causal and q - k < window }"
INPUTS = """
pattern with_inputs() {
    input doc: int[batch, N]
    input keep: bool[batch, heads, N]
    input table: float[4, heads]
    mask same(doc) and keep[b, h, k] and table[0, h] > -1.0
}
"""

B, H, N, D = 2, 4, 24, 16


@pytest.fixture(scope="module")
def window():
    return attnc.compile(WINDOW)


@pytest.fixture(scope="module")
def inputs_kernel():
    return attnc.compile(INPUTS)


def qkv(b=B, hq=H, hkv=H, nq=N, nk=N, d=D, dv=D, dtype=torch.float32):
    return (torch.randn(b, hq, nq, d, dtype=dtype), torch.randn(b, hkv, nk, d, dtype=dtype),
            torch.randn(b, hkv, nk, dv, dtype=dtype))


def good_inputs(b=B, h=H, n=N):
    return {"doc": torch.zeros(b, n, dtype=torch.int64), "keep": torch.ones(b, h, n, dtype=torch.bool),
            "table": torch.zeros(4, h)}


def raises(fn, *words):
    with pytest.raises(attnc.InputError) as info:
        fn()
    assert isinstance(info.value, attnc.AttncError)
    text = str(info.value)
    for w in words:
        assert w in text, (w, text)
    return text


# ---- q, k, v ------------------------------------------------------------------------------------------

def _bad_qkv():
    q, k, v = qkv()
    return [
        ("q not a tensor", (q.numpy(), k, v), ("q must be a torch.Tensor", "ndarray")),
        ("v not a tensor", (q, k, v.tolist()), ("v must be a torch.Tensor", "list")),
        ("3-d q", (q[0], k, v), ("q must have 4 dimensions", "(4, 24, 16)")),
        ("int q", (q.long(), k, v), ("torch.int64", "float16, bfloat16, float32")),
        ("mixed dtypes", (q, k.half(), v), ("share a dtype",)),
        ("devices", (q, k.to("meta"), v), ("one device",)),
        ("batch", (q, k[:1], v[:1]), ("batch sizes differ", "q 2, k 1, v 1")),
        ("k/v heads", (q, k, v[:, :2]), ("same number of heads", "4 and 2")),
        ("GQA group", (q, k[:, :3], v[:, :3]), ("multiple of key/value heads", "(4)", "(3)")),
        ("k/v lengths", (q, k, v[:, :, :20]), ("same sequence length", "24 and 20")),
        ("head dims", (q, k[..., :8], v), ("same head dim", "16 and 8")),
    ]


@pytest.mark.parametrize("case", _bad_qkv(), ids=lambda c: c[0])
def test_bad_q_k_v_are_input_errors(window, case):
    _, args, words = case
    raises(lambda: window(*args), *words)
    raises(lambda: window.reference(*args), *words)


def test_head_dim_the_kernels_lack(window):
    q, k, v = qkv(d=24, dv=24)
    raises(lambda: window(q, k, v), "unsupported head dim 24", "16, 32, 64, 128, 256")
    assert window.reference(q, k, v).shape == (B, H, N, 24)        # the reference takes any head dim


# ---- runtime inputs -------------------------------------------------------------------------------------

def _bad_inputs():
    g = good_inputs()
    return [
        ("missing", {k: v for k, v in g.items() if k != "keep"}, ("needs runtime input(s) keep",
                                                                  "keep: bool[batch, heads, N]")),
        ("unexpected", dict(g, bias=torch.zeros(3)), ("unexpected runtime input(s) bias", "doc, keep, table")),
        ("not a tensor", dict(g, doc=[0] * N), ("'doc' must be a torch.Tensor", "list")),
        ("float for int", dict(g, doc=g["doc"].float()), ("'doc' must be an int tensor", "torch.float32")),
        ("int for bool", dict(g, keep=g["keep"].long()), ("'keep' must be a bool tensor", "torch.int64")),
        ("bool for float", dict(g, table=g["table"].bool()), ("'table' must be a float tensor", "torch.bool")),
        ("rank", dict(g, doc=g["doc"][0]), ("'doc' must have 2 dimension(s)", "(24,)")),
        ("fixed size", dict(g, table=torch.zeros(3, H)), ("'table' dimension 0 must be 4", "got 3")),
        ("bound size", dict(g, keep=g["keep"][:, :2]), ("'keep' dimension 1 is 'heads' = 4", "got 2")),
        ("batch size", dict(g, doc=g["doc"][:1]), ("'doc' dimension 0 is 'batch' = 2", "got 1")),
        ("size names agree", dict(g, keep=torch.ones(B, H, N + 1, dtype=torch.bool)), ("'keep' dimension 2",
                                                                                       "'N' = 24", "got 25")),
        ("device", dict(g, keep=g["keep"].to("meta")), ("'keep' is on meta", "q, k, v are on cpu")),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_runtime_inputs_are_input_errors(inputs_kernel, case):
    name, inputs, words = case
    q, k, v = qkv()
    raises(lambda: inputs_kernel(q, k, v, **inputs), *words)
    raises(lambda: inputs_kernel.reference(q, k, v, **inputs), *words)
    if name == "device":        # kern.mask has no q: the inputs must share the first one's device
        raises(lambda: inputs_kernel.mask(N, N, batch=B, heads=H, **inputs), "'keep' is on meta", "input 'doc' is")
    else:
        raises(lambda: inputs_kernel.mask(N, N, batch=B, heads=H, **inputs), *words)


def test_good_runtime_inputs_run(inputs_kernel):
    q, k, v = qkv()
    out = inputs_kernel(q, k, v, **good_inputs())
    ref = inputs_kernel.reference(q, k, v, **good_inputs())
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# ---- scale ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", ["a", float("nan"), float("inf"), -float("inf"), True, torch.tensor([0.5, 1.0]),
                                   [0.5], None.__class__], ids=repr)
def test_bad_scales_are_input_errors(window, scale):
    q, k, v = qkv()
    raises(lambda: window(q, k, v, scale=scale), "scale must be a finite number")
    raises(lambda: window.reference(q, k, v, scale=scale), "scale must be a finite number")


@pytest.mark.parametrize("scale", [0.25, 1, 0.0, -0.5, torch.tensor(0.25), np.float32(0.25)], ids=repr)
def test_numbers_are_scales(window, scale):
    q, k, v = qkv()
    value = float(scale)
    torch.testing.assert_close(window(q, k, v, scale=scale), window.reference(q, k, v, scale=value),
                               rtol=1e-4, atol=1e-4)


# ---- sizes and the dense mask ---------------------------------------------------------------------------

@pytest.mark.parametrize("value", [-1, 40.5, "40", None, True], ids=repr)
def test_bad_sizes_are_input_errors(window, value):
    for call in (lambda: window.plan(value, 8), lambda: window.mask(8, value), lambda: window.explain(value, 8),
                 lambda: window.example_inputs(8, 8, heads=value), lambda: window.flex_mask_mod(8, 8, batch=value),
                 lambda: window.plan(8, 8, batch=value)):
        raises(call, "must be a non-negative int")


def test_numpy_and_torch_ints_are_sizes(window):
    assert window.mask(np.int64(6), torch.tensor(6).item(), heads=np.int32(2)).shape == (1, 2, 6, 6)
    assert window.plan(np.int64(64), 64).tile_fraction > 0


def test_bad_block_sizes_are_input_errors(window):
    for bm in (0, -16, 16.0, "16"):
        raises(lambda: window.plan(64, 64, block_m=bm, block_n=16), "block_m must be a positive int")


def test_a_dense_mask_too_large_to_hold_is_refused_before_allocating(window):
    text = raises(lambda: window.mask(1 << 20, 1 << 20, batch=16), "would hold", "kern.plan")
    assert "1.76e+13" in text
    raises(lambda: window.mask(np.int64(1 << 40), np.int64(1 << 40)), "would hold")   # no int64 overflow


# ---- meta tensors and source bytes ----------------------------------------------------------------------

def test_meta_tensors_give_shapes(window, inputs_kernel):
    q, k, v = (t.to("meta").requires_grad_() for t in qkv(hkv=2, dv=32))
    out, lse = window(q, k, v, return_lse=True)
    assert (out.device.type, out.shape, lse.shape, lse.dtype) == ("meta", (B, H, N, 32), (B, H, N), torch.float32)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape
    meta_inputs = {name: t.to("meta") for name, t in good_inputs().items()}
    assert inputs_kernel(*(t.to("meta") for t in qkv()), **meta_inputs).shape == (B, H, N, D)


def test_source_as_bytes(window):
    assert attnc.compile(WINDOW.encode()).mask(5, 5).equal(window.mask(5, 5))
    with pytest.raises(attnc.PatternError, match="UTF-8"):
        attnc.compile(b"pattern p() { mask causal } \xff")


# ---- any call: it runs or says what was wrong -----------------------------------------------------------

_DTYPES = [torch.float32, torch.float16, torch.float64, torch.int32, torch.bool]
_JUNK = [None, "x", 1.5, -3, [1, 2], float("nan"), np.zeros(3)]


@st.composite
def _tensor_or_junk(draw, shape, dtypes=_DTYPES):
    """A tensor of ``shape`` with some sizes changed, of a drawn dtype, or something that is not a tensor."""
    if draw(st.integers(0, 29)) == 0:
        return draw(st.sampled_from(_JUNK))
    dims = [d if draw(st.integers(0, 24)) else draw(st.integers(0, 5)) for d in shape]
    if draw(st.integers(0, 29)) == 0:
        dims = dims[:-1] if draw(st.booleans()) else dims + [2]
    dtype = draw(st.sampled_from(dtypes)) if draw(st.integers(0, 11)) == 0 else dtypes[0]
    t = torch.zeros(dims, dtype=dtype) if dtype == torch.bool else torch.randn(dims).to(dtype)
    return t


@st.composite
def _call(draw):
    b, hq, n = draw(st.integers(1, 2)), draw(st.sampled_from([2, 4])), draw(st.integers(1, 20))
    q = draw(_tensor_or_junk([b, hq, n, 16]))
    k = draw(_tensor_or_junk([b, draw(st.sampled_from([1, 2, hq])), n, 16]))
    v = draw(_tensor_or_junk(list(k.shape) if isinstance(k, torch.Tensor) else [b, hq, n, 16]))
    inputs = {"doc": draw(_tensor_or_junk([b, n], [torch.int64, torch.float32, torch.bool])),
              "keep": draw(_tensor_or_junk([b, hq, n], [torch.bool, torch.int64])),
              "table": draw(_tensor_or_junk([4, hq], [torch.float32, torch.int64]))}
    if draw(st.integers(0, 19)) == 0:
        inputs.pop(draw(st.sampled_from(sorted(inputs))))
    if draw(st.integers(0, 19)) == 0:
        inputs["extra"] = torch.zeros(3)
    scale = draw(st.sampled_from([None] * 6 + [0.3, 2, float("inf"), "s", torch.tensor(0.5)]))
    return q, k, v, inputs, scale


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(call=_call())
def test_any_call_runs_or_raises_an_input_error(inputs_kernel, call):
    q, k, v, inputs, scale = call
    for fn in (lambda: inputs_kernel(q, k, v, scale=scale, **inputs),
               lambda: inputs_kernel.reference(q, k, v, scale=scale, **inputs)):
        try:
            out = fn()
        except attnc.InputError:
            event("input error")
            continue
        event("ran")
        assert out.shape[:3] == q.shape[:3] and out.shape[3] == v.shape[3]


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(sizes=st.lists(st.sampled_from([0, 1, 7, 33, 7, 33, -1, 2.0, "8", None, np.int64(5), True]), min_size=4,
                      max_size=4), call=_call())
def test_any_plan_or_mask_request_runs_or_raises_an_input_error(inputs_kernel, sizes, call):
    n_q, n_k, batch, heads = sizes
    inputs = call[3]
    for fn in (lambda: inputs_kernel.plan(n_q, n_k, batch=batch, heads=heads, **inputs),
               lambda: inputs_kernel.mask(n_q, n_k, batch=batch, heads=heads, **inputs)):
        try:
            fn()
            event("ran")
        except attnc.InputError:
            event("input error")


@pytest.mark.parametrize("n_q, n_k", [(5, 0), (0, 5), (0, 0)])
def test_empty_queries_or_keys(window, n_q, n_k):
    """No keys: every row sees nothing (output 0, lse -inf, zero gradients); no queries: empty outputs. The kernels
    and the reference agree (hypothesis found the reference failing on zero keys)."""
    for fn in (window, window.reference):
        q, k, v = (t.requires_grad_() for t in qkv(nq=n_q, nk=n_k))
        out, lse = fn(q, k, v, return_lse=True)
        assert out.shape == (B, H, n_q, D) and not out.any() and bool((lse == -float("inf")).all())
        (out.sum() + lse.nan_to_num(0.0, 0.0, 0.0).sum()).backward()
        assert not q.grad.any() and k.grad.shape == k.shape


def test_plans_of_empty_and_of_unlaunchable_lengths(window, inputs_kernel):
    for kern in (window, inputs_kernel, attnc.compile(
            "pattern buckets() {\n input qb: int[batch, heads, N]\n input kb: int[batch, heads, N]\n"
            " mask buckets(qb, kb) and causal\n}")):
        inputs = kern.example_inputs(0, 0, batch=2, heads=2)
        plan = kern.plan(0, 0, batch=2, heads=2, **inputs)         # tile lists of no blocks
        assert sum(plan.tiles.values()) == 0
    raises(lambda: window.plan(1 << 40, 1 << 40), "more than the 65535 a CUDA grid allows")
    raises(lambda: window.plan(64, 1 << 30, block_m=64, block_n=16), "keys make", "blocks of 16")
