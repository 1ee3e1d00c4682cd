"""The torch custom ops (attnc.ops): registration, opcheck, autograd into q, k, v and float score
inputs against float64 autograd of the reference, and torch.compile(fullgraph=True) through them."""

import os
from pathlib import Path

import pytest
import torch

import attnc
from attnc import ops as attnc_ops
from attnc.launch import cache_dir, source_key

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

ALIBI = EXAMPLES / "alibi.attn"
# A relative-bias table read twice per score (FlexAttention refuses that), with reads that fall
# outside the table (they read 0) once |q - k| > 64, and rows with no visible key (q < 6).
REL_BIAS = """pattern rel_bias() {
    input bias: float[heads, 129]
    mask k <= q + 20 and q >= 6
    score score + bias[h, q - k + 64] + 0.5 * bias[h, k - q + 64]
}"""
DOCS = "pattern docs() {\n input doc: int[batch, N]\n input s: float[heads]\n mask same(doc) and causal\n" \
       " score alibi(s[h])\n}"


def _qkv(B, Hq, Hkv, Nq, Nk, D, g):
    return [torch.randn(B, h, n, D, generator=g).requires_grad_() for h, n in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk))]


def _rel_err(got, want):
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-12)).item()


def _check_against_reference(kern, q, k, v, inputs, g):
    """Backward through kern (the custom op) and through float64 kern.reference; compare all grads."""
    out, lse = kern(q, k, v, return_lse=True, **inputs)
    dout = torch.randn(out.shape, generator=g)
    dlse = torch.where(torch.isinf(lse), 0.0, torch.randn(lse.shape, generator=g))
    (out * dout).sum().add((lse * dlse).nan_to_num(0.0, 0.0, 0.0).sum()).backward()
    leaves = {"q": q, "k": k, "v": v, **{n: t for n, t in inputs.items() if t.requires_grad}}
    ref_leaves = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    ref_inputs = {n: ref_leaves.get(n, t.double() if t.is_floating_point() else t) for n, t in inputs.items()}
    ro, rl = kern.reference(ref_leaves["q"], ref_leaves["k"], ref_leaves["v"], return_lse=True, **ref_inputs)
    assert _rel_err(out, ro) < 1e-4
    (ro * dout.double()).sum().add((rl * dlse.double()).nan_to_num(0.0, 0.0, 0.0).sum()).backward()
    for name, leaf in leaves.items():
        assert leaf.grad is not None and not torch.isnan(leaf.grad).any(), f"d{name} missing or NaN"
        err = _rel_err(leaf.grad, ref_leaves[name].grad)
        assert err < 1e-4, f"d{name} relative error {err:.2e}"


def test_op_is_registered_per_kernel_and_callable():
    kern = attnc.compile(ALIBI)
    ops = attnc_ops.ops_for(kern)
    key = source_key(kern.ir, "fwd")
    assert ops.key == key
    assert ops.forward is getattr(torch.ops.attnc, f"fwd_{key}").default
    assert ops.backward is getattr(torch.ops.attnc, f"bwd_{key}").default
    # Another Kernel object of the same pattern shares the registered ops (one registration per key).
    again = attnc.compile(ALIBI)
    assert again is not kern and attnc_ops.ops_for(again) is ops
    g = torch.Generator().manual_seed(0)
    q, k, v = (t.detach() for t in _qkv(1, 2, 1, 33, 40, 16, g))
    slopes = torch.rand(2, generator=g)
    out, lse = ops.forward(q, k, v, [slopes], 0.25)
    assert out.shape == (1, 2, 33, 16) and out.dtype == q.dtype
    assert lse.shape == (1, 2, 33) and lse.dtype == torch.float32
    ref, ref_lse = kern.reference(q.double(), k.double(), v.double(), scale=0.25, return_lse=True,
                                  slopes=slopes.double())
    assert _rel_err(out, ref) < 1e-4 and _rel_err(lse, ref_lse) < 1e-4


def test_opcheck_forward_with_score_input_gradients():
    kern = attnc.compile(ALIBI)
    ops = attnc_ops.ops_for(kern)
    g = torch.Generator().manual_seed(1)
    q, k, v = _qkv(1, 2, 1, 9, 11, 16, g)
    slopes = torch.rand(2, generator=g).requires_grad_()
    torch.library.opcheck(ops.forward, (q, k, v, [slopes], 0.25))


@pytest.mark.parametrize("name, shape", [
    ("causal_gqa", (2, 4, 2, 45, 70, 16)),
    ("documents", (2, 2, 1, 67, 67, 32)),
])
def test_qkv_gradients_through_op(name, shape):
    B, Hq, Hkv, Nq, Nk, D = shape
    g = torch.Generator().manual_seed(2)
    if name == "causal_gqa":
        kern, inputs = attnc.compile("pattern p() { mask causal }"), {}
    else:
        kern = attnc.compile(EXAMPLES / "documents.attn")
        inputs = {"doc": torch.sort(torch.randint(0, 4, (B, max(Nq, Nk)), generator=g), dim=-1).values}
    _check_against_reference(kern, *_qkv(*shape, g), inputs, g)


@pytest.mark.parametrize("shape", [(2, 4, 2, 45, 70, 16), (1, 2, 1, 67, 67, 32)],
                         ids=lambda s: f"B{s[0]}H{s[1]}/{s[2]}N{s[3]}x{s[4]}D{s[5]}")
def test_alibi_slope_gradients(shape):
    B, Hq, Hkv, Nq, Nk, D = shape
    g = torch.Generator().manual_seed(3)
    kern = attnc.compile(ALIBI)
    slopes = (torch.rand(Hq, generator=g) * 0.5).requires_grad_()
    _check_against_reference(kern, *_qkv(*shape, g), {"slopes": slopes}, g)


def test_relative_bias_read_twice_gradients():
    g = torch.Generator().manual_seed(4)
    kern = attnc.compile(REL_BIAS)
    bias = torch.randn(3, 129, generator=g).requires_grad_()
    _check_against_reference(kern, *_qkv(2, 3, 1, 50, 70, 16, g), {"bias": bias}, g)


# Float inputs read per head (the dQ kernel sums each tile's gradient), per query row (summed over keys), per
# key row (over queries; one read used twice: d/dx x*x) and per (q, k) pair through an index expression (one
# atomic add per element).
AXES = """pattern axes() {
    input hs: float[heads]
    input qs: float[batch, heads, N]
    input ks: float[batch, N]
    input pair: float[heads, 7, 5]
    mask causal or k < 3
    score score * hs[h] + qs[b, h, q] - ks[b, k] * ks[b, k] + pair[h, q % 7, k % 5]
}"""
# A layout transform (queries and keys sorted by bucket) with a relative bias and a per-key input.
HASH_BIAS = """pattern hash_bias() {
    input qb: int[batch, heads, N]
    input kb: int[batch, heads, N]
    input rel: float[heads, R]
    input kw: float[batch, heads, N]
    mask buckets(qb, kb) and causal
    score score + rel[h, q - k + 10] + kw[b, h, k]
}"""


def _axes_inputs(B, H, N, g):
    return {"hs": (torch.rand(H, generator=g) + 0.5).requires_grad_(),
            "qs": torch.randn(B, H, N, generator=g).requires_grad_(),
            "ks": (torch.randn(B, N, generator=g) * 0.5).requires_grad_(),
            "pair": torch.randn(H, 7, 5, generator=g).requires_grad_()}


@pytest.mark.parametrize("shape", [(2, 4, 2, 45, 70, 16), (1, 2, 1, 67, 33, 32)],
                         ids=lambda s: f"B{s[0]}H{s[1]}/{s[2]}N{s[3]}x{s[4]}D{s[5]}")
def test_input_gradients_by_each_reduction(shape):
    """The dQ kernel's four reductions in one backward (per tile: hs, per row: qs, per key: ks, per element:
    pair): each input's gradient against float64 autograd of the reference, with GQA, odd lengths, more keys
    than queries and fewer (rows that see no key outside k < 3 get nothing)."""
    pir = attnc.compile(AXES).ir
    assert attnc.codegen.grad_inputs(pir) == ["hs", "qs", "ks", "pair"]
    reads = attnc.codegen._grad_context(pir)         # ks[b, k] * ks[b, k] is one read, used twice
    assert [[r["axes"] for r in gi["reads"]] for gi in reads] == [[""], ["q"], ["k"], ["qk"]]
    B, Hq, Hkv, Nq, Nk, D = shape
    g = torch.Generator().manual_seed(8)
    kern = attnc.compile(AXES)
    inputs = _axes_inputs(B, Hq, max(Nq, Nk), g)
    _check_against_reference(kern, *_qkv(*shape, g), inputs, g)


def test_input_gradients_through_a_layout_transform():
    """Queries and keys sorted by hash bucket (padding rows included): a relative bias and a per-key input get
    their gradients at the caller's positions."""
    g = torch.Generator().manual_seed(9)
    kern = attnc.compile(HASH_BIAS)
    B, H, N = 2, 2, 70
    inputs = {"qb": torch.randint(0, 3, (B, H, N), generator=g), "kb": torch.randint(0, 3, (B, H, N), generator=g),
              "rel": (torch.randn(H, 150, generator=g) * 0.5).requires_grad_(),
              "kw": torch.randn(B, H, N, generator=g).requires_grad_()}
    assert kern.plan(N, N, B, H, **{n: t.detach() for n, t in inputs.items()}).transforms
    _check_against_reference(kern, *_qkv(B, H, H, N, N, 16, g), inputs, g)


def test_input_gradients_of_broadcast_inputs():
    """An input expanded from one value (stride 0) gets a gradient per element of its expanded shape, so
    autograd's expand sums them into the one value."""
    g = torch.Generator().manual_seed(10)
    kern = attnc.compile(ALIBI)
    q, k, v = _qkv(1, 3, 1, 29, 29, 16, g)
    base = torch.tensor([0.3]).requires_grad_()
    (kern(q, k, v, slopes=base.expand(3)) ** 2).sum().backward()
    ref = base.detach().double().requires_grad_()
    (kern.reference(q.double(), k.double(), v.double(), slopes=ref.expand(3)) ** 2).sum().backward()
    assert _rel_err(base.grad, ref.grad) < 1e-4


def test_input_gradients_kernel_or_deterministic_recompute(monkeypatch):
    """By default the dQ kernel adds the inputs' gradients (per tile for ALiBi slopes, per element for a
    relative bias), and with q, k, v frozen only the dQ kernel runs; under torch.use_deterministic_algorithms
    the torch recompute (deterministic) does, here over several row chunks. All agree with float64 autograd
    of the reference."""
    g = torch.Generator().manual_seed(11)
    calls = []
    real_launch, real_recompute = attnc_ops.launch_backward, attnc_ops.score_input_grads
    monkeypatch.setattr(attnc_ops, "launch_backward",
                        lambda *a, **kw: calls.append(("kernel", kw.get("dq_only"))) or real_launch(*a, **kw))
    monkeypatch.setattr(attnc_ops, "score_input_grads",
                        lambda *a, **kw: calls.append(("recompute", tuple(kw["wanted"]))) or real_recompute(*a, **kw))
    monkeypatch.setattr(attnc_ops, "CHUNK_ELEMENTS", 2 * 3 * 70 * 7)
    was = torch.are_deterministic_algorithms_enabled()
    for source, name, shape in ((ALIBI, "slopes", (3,)), (REL_BIAS, "bias", (3, 129))):
        kern = attnc.compile(source)
        q, k, v = (t.detach() for t in _qkv(2, 3, 1, 50, 70, 16, g))
        x = torch.rand(shape, generator=g) * 0.5
        ref = x.double().requires_grad_()
        kern.reference(q.double(), k.double(), v.double(), **{name: ref}).square().sum().backward()
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            try:
                assert attnc_ops.kernel_input_grads() is not deterministic
                calls.clear()
                leaf = x.clone().requires_grad_()
                kern(q, k, v, **{name: leaf}).square().sum().backward()
            finally:
                torch.use_deterministic_algorithms(was)
            assert calls == ([("recompute", (name,))] if deterministic else [("kernel", True)])
            assert _rel_err(leaf.grad, ref.grad) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_input_gradients_on_gpu(dtype):
    """On a GPU (compiled kernels, real atomics): the inputs' gradients by each of the dQ kernel's reductions
    (AXES) and through a layout transform, against float64 autograd of the reference on the same (rounded)
    q, k, v."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("run with TRITON_INTERPRET=0 so the compiled kernels run")
    g = torch.Generator().manual_seed(12)
    B, H, N, D = 2, 4, 1000, 64
    cases = [(attnc.compile(AXES), _axes_inputs(B, H, N, g)),
             (attnc.compile(HASH_BIAS), {"qb": torch.randint(0, 4, (B, H, N), generator=g),
                                         "kb": torch.randint(0, 4, (B, H, N), generator=g),
                                         "rel": torch.randn(H, 1010, generator=g) * 0.5,
                                         "kw": torch.randn(B, H, N, generator=g)})]
    for kern, inputs in cases:
        qkv = [torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(3)]
        floats = [n for n, t in inputs.items() if t.is_floating_point()]
        leaves = {n: inputs[n].detach().cuda().requires_grad_() for n in floats}
        ins = {n: leaves.get(n, t.cuda() if not t.is_floating_point() else None) for n, t in inputs.items()}
        # A loss of the output and of the lse: a per-row input (qs) shifts a row's scores and so changes only
        # the lse (its gradient through the output alone is 0, and a relative error of 0 is meaningless).
        dout, w = torch.randn(B, H, N, D, generator=g).to(dtype), torch.randn(B, H, N, generator=g)
        out, lse = kern(*(t.cuda() for t in qkv), return_lse=True, **ins)
        ((out.float() * dout.cuda().float()).sum() + (lse.nan_to_num(0.0, 0.0, 0.0) * w.cuda()).sum()).backward()
        ref = {n: inputs[n].detach().double().requires_grad_() for n in floats}
        ref_ins = {n: ref.get(n, t) for n, t in inputs.items()}
        ro, rl = kern.reference(*(t.double() for t in qkv), return_lse=True, **ref_ins)
        ((ro * dout.double()).sum() + (rl.nan_to_num(0.0, 0.0, 0.0) * w.double()).sum()).backward()
        for n in floats:
            err = _rel_err(leaves[n].grad.cpu(), ref[n].grad)
            assert err < (2e-2 if dtype == torch.bfloat16 else 5e-3), f"{kern.ir.name} d{n}: {err:.2e}"


def test_float_inputs_read_only_by_the_mask_get_zero_gradients(monkeypatch):
    """A float input the mask reads (a threshold) but the score does not has a zero gradient, without the
    recompute; the score's input beside it still gets its own, in both modes."""
    g = torch.Generator().manual_seed(13)
    kern = attnc.compile("""pattern thresh() {
    input w: float[batch, N]
    input s: float[heads]
    mask causal and w[b, k] > 0.0
    score alibi(s[h])
}""")
    q, k, v = (t.detach() for t in _qkv(1, 2, 2, 33, 33, 16, g))
    real = attnc_ops.score_input_grads

    def recompute(*a, **kw):
        assert kw["wanted"] == ["s"], kw["wanted"]          # never asked for w's (zero) gradient
        return real(*a, **kw)
    monkeypatch.setattr(attnc_ops, "score_input_grads", recompute)
    w, s = torch.randn(1, 33, generator=g), torch.rand(2, generator=g)
    sd = s.double().requires_grad_()
    kern.reference(q.double(), k.double(), v.double(), w=w, s=sd).square().sum().backward()
    was = torch.are_deterministic_algorithms_enabled()
    for deterministic in (False, True):
        wl, sl = w.clone().requires_grad_(), s.clone().requires_grad_()
        torch.use_deterministic_algorithms(deterministic)
        try:
            kern(q, k, v, w=wl, s=sl).square().sum().backward()
        finally:
            torch.use_deterministic_algorithms(was)
        assert torch.equal(wl.grad, torch.zeros_like(w))
        assert _rel_err(sl.grad, sd.grad) < 1e-4


def test_input_gradients_alone_and_mixed_with_int_inputs():
    g = torch.Generator().manual_seed(5)
    kern = attnc.compile(DOCS)
    B, H, N = 2, 2, 40
    q, k, v = (t.detach() for t in _qkv(B, H, H, N, N, 16, g))
    doc = torch.sort(torch.randint(0, 3, (B, N), generator=g), dim=-1).values
    s = torch.rand(H, generator=g).requires_grad_()
    kern(q, k, v, doc=doc, s=s).square().sum().backward()
    sd = s.detach().double().requires_grad_()
    kern.reference(q.double(), k.double(), v.double(), doc=doc, s=sd).square().sum().backward()
    assert _rel_err(s.grad, sd.grad) < 1e-4
    with torch.no_grad():
        out = kern(q, k, v, doc=doc, s=s)
    assert out.grad_fn is None


def test_eager_calls_match_the_operators_without_reading_unused_grads(monkeypatch):
    """Eager calls run the launchers under an autograd.Function, the operators' work without the dispatcher:
    the same outputs and gradients, bit for bit, as the operator path; and where the lse is unused, the
    backward gets no dlse at all (the operators' autograd hands it a tensor of zeros)."""
    g = torch.Generator().manual_seed(6)
    kern = attnc.compile(ALIBI)
    q, k, v = _qkv(1, 2, 1, 37, 41, 16, g)
    slopes = (torch.rand(2, generator=g) * 0.5).requires_grad_()
    dout = torch.randn(1, 2, 37, 16, generator=g)
    leaves = (q, k, v, slopes)
    dlse_seen = []
    real = attnc_ops.launch_backward

    def spy(*args, **kwargs):
        dlse_seen.append(args[7])
        return real(*args, **kwargs)

    monkeypatch.setattr(attnc_ops, "launch_backward", spy)
    results = []
    for eager in (True, False):
        monkeypatch.setattr(attnc_ops, "_eager", lambda *a, eager=eager: eager)
        for t in leaves:
            t.grad = None
        out = kern(q, k, v, slopes=slopes)
        assert (type(out.grad_fn).__name__ == "_EagerAttentionBackward") == eager
        (out * dout).sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves])
    assert dlse_seen[0] is None and dlse_seen[1] is not None and not dlse_seen[1].any()
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_eager_call_with_only_the_lse_used():
    """A loss of the lse alone: the eager backward gets no dO and runs with zeros there."""
    g = torch.Generator().manual_seed(7)
    kern = attnc.compile(REL_BIAS)
    q, k, v = _qkv(1, 3, 1, 30, 30, 16, g)
    bias = torch.randn(3, 129, generator=g).requires_grad_()
    _, lse = kern(q, k, v, return_lse=True, bias=bias)
    weight = torch.randn(lse.shape, generator=g)
    (lse.nan_to_num(0.0, 0.0, 0.0) * weight).sum().backward()
    ref = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    _, rl = kern.reference(*ref[:3], return_lse=True, bias=ref[3])
    (rl.nan_to_num(0.0, 0.0, 0.0) * weight.double()).sum().backward()
    assert ref[2].grad is None and not v.grad.any()      # the lse does not depend on v
    for got, want in zip((q, k, bias), (ref[0], ref[1], ref[3])):
        assert _rel_err(got.grad, want.grad) < 1e-4


def test_tracers_get_the_operators(monkeypatch):
    """The eager path is for plain tensors in plain eager mode: FakeTensors, torch.func transforms, Dynamo's
    tracing and dispatch modes get the custom operators."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    q, k, v = (torch.randn(1, 1, 8, 16) for _ in range(3))
    assert attnc_ops._eager(q, k, v, [])
    assert not attnc_ops._eager(q, k, v, [torch.nn.Parameter(torch.ones(1))])   # a subclass among the inputs
    with FakeTensorMode() as mode:
        fq = mode.from_tensor(q)
        assert not attnc_ops._eager(fq, fq, fq, [])
    seen = []
    torch.func.grad(lambda x: seen.append(attnc_ops._eager(x, k, v, [])) or x.sum())(q)
    assert seen == [False]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not attnc_ops._eager(q, k, v, [])


def test_torch_compile_fullgraph_dynamic_lengths():
    from torch._dynamo.testing import CompileCounterWithBackend
    kern = attnc.compile(ALIBI)

    def step(q, k, v, slopes):
        out, lse = kern(q, k, v, return_lse=True, slopes=slopes)
        return out.square().sum() + lse.sum()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter, dynamic=True)
    kernels = cache_dir() / "kernels"
    files = None
    for n in (37, 70):
        g = torch.Generator().manual_seed(n)
        q, k, v = _qkv(1, 2, 2, n, n, 16, g)
        slopes = torch.rand(2, generator=g).requires_grad_()
        eager = [t.detach().clone().requires_grad_() for t in (q, k, v, slopes)]
        loss = compiled(q, k, v, slopes)
        loss.backward()
        want = step(*eager)
        want.backward()
        assert torch.allclose(loss, want, rtol=1e-5)
        for t, e in zip((q, k, v, slopes), eager):
            assert torch.allclose(t.grad, e.grad, rtol=1e-5, atol=1e-6)
        if files is None:
            files = sorted(p.name for p in kernels.iterdir())
    assert counter.frame_count == 1, "a new sequence length recompiled the graph"
    assert sorted(p.name for p in kernels.iterdir()) == files, "a new sequence length regenerated kernels"


@pytest.mark.gpu
def test_torch_compile_inductor_on_gpu():
    """On a GPU: torch.compile with the inductor backend, fullgraph and dynamic lengths, through the
    compiled Triton kernels (not the interpreter): one graph for two lengths, same numbers as eager."""
    from torch._dynamo.testing import CompileCounterWithBackend
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("run with TRITON_INTERPRET=0 so the compiled kernels run")
    kern = attnc.compile(ALIBI)

    def step(q, k, v, slopes):
        out, lse = kern(q, k, v, return_lse=True, slopes=slopes)
        return out.float().square().sum() + lse.sum()

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, fullgraph=True, backend=counter, dynamic=True)
    for n in (1000, 2049):
        g = torch.Generator(device="cuda").manual_seed(n)
        q, k, v = (torch.randn(2, 4, n, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                   for _ in range(3))
        slopes = torch.rand(4, device="cuda", generator=g).requires_grad_()
        eager = [t.detach().clone().requires_grad_() for t in (q, k, v, slopes)]
        loss = compiled(q, k, v, slopes)
        loss.backward()
        want = step(*eager)
        want.backward()
        torch.testing.assert_close(loss, want, rtol=1e-3, atol=1e-2)
        for t, e in zip((q, k, v, slopes), eager):
            torch.testing.assert_close(t.grad, e.grad, rtol=2e-2, atol=2e-2)
    assert counter.frame_count == 1, "a new sequence length recompiled the graph"


def test_kernels_survive_copies_and_pickles(tmp_path):
    """Models are deep-copied (EMA, evaluation copies) and saved whole: a model holding a kernel shares
    the kernel in copies, and a pickled kernel carries its analyzed pattern (so a file changed or gone
    since, or a file that imports another, does not matter), with the same outputs."""
    import copy
    import pickle
    path = tmp_path / "p.attn"
    path.write_text("pattern p(w: int = 5) { mask causal and window(w) }")
    kern = attnc.compile(path, w=7)
    model = torch.nn.Module()
    model.kern = kern
    assert copy.deepcopy(model).kern is kern and copy.copy(kern) is kern
    path.write_text("pattern p(w: int = 5) { mask causal }")            # edited after compiling
    again = pickle.loads(pickle.dumps(kern))
    assert again is not kern and again.params == {"w": 7} and again.ir.key_text() == kern.ir.key_text()
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    assert torch.equal(again.reference(q, k, v), kern.reference(q, k, v))
    buf = tmp_path / "model.pt"
    torch.save(model, buf)
    assert torch.load(buf, weights_only=False).kern.ir.key_text() == kern.ir.key_text()
    multi = attnc.compile("examples/multi.attn", pattern="strided", stride=8)
    assert pickle.loads(pickle.dumps(multi)).ir.key_text() == multi.ir.key_text()
    loaded = pickle.loads(pickle.dumps(kern))
    assert loaded.ir.mask is kern.ir.mask                   # hash-consed IR nodes stay one node per process
    assert torch.equal(loaded(q, k, v), kern(q, k, v))
