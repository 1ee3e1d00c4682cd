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


def test_relative_bias_read_twice_gradients(monkeypatch):
    g = torch.Generator().manual_seed(4)
    kern = attnc.compile(REL_BIAS)
    # Small chunks, so the recompute accumulates over several row chunks.
    monkeypatch.setattr(attnc_ops, "CHUNK_ELEMENTS", 2 * 3 * 70 * 7)
    bias = torch.randn(3, 129, generator=g).requires_grad_()
    _check_against_reference(kern, *_qkv(2, 3, 1, 50, 70, 16, g), {"bias": bias}, g)


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
