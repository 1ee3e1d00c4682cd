"""attnc.fastlaunch: the first launch of an argument signature goes through Triton, later ones call the compiled
kernel directly with every parameter in order; anything the signature cannot vouch for keeps Triton's path.
On CPU a stand-in for Triton's JITFunction records what each path was given; on a GPU the generated kernels run
both ways and must agree bit for bit."""

import os

import pytest
import torch

import attnc
from attnc import fastlaunch


class _Compiled:
    """Stands in for Triton's CompiledKernel: records the direct launches."""

    function, packed_metadata = "function", "metadata"

    def __init__(self):
        self.launches = []

    def run(self, g0, g1, g2, stream, function, metadata, launch_metadata, enter, leave, *args):
        self.launches.append(((g0, g1, g2), stream, function, metadata, launch_metadata, args))


class _Jit:
    """Stands in for a JITFunction of parameters (x, n, scale, BLOCK): records what Triton's path is given."""

    arg_names = ["x", "n", "scale", "BLOCK"]

    def __init__(self):
        self.triton_calls = []
        self.compiled = _Compiled()

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.triton_calls.append((grid, args, kwargs))
            return self.compiled
        return run


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(fastlaunch, "_is_compiled_jit", lambda fn: isinstance(fn, _Jit))
    monkeypatch.setattr(fastlaunch, "_device", lambda: 0)
    monkeypatch.setattr(fastlaunch, "_stream", lambda device: 1234)
    monkeypatch.setattr(fastlaunch, "_hooks", lambda: (None, None))
    monkeypatch.delenv("ATTNC_FAST_LAUNCH", raising=False)


def test_a_signature_met_before_launches_the_compiled_kernel_with_every_parameter(fake_gpu):
    fn, x = _Jit(), torch.zeros(64)
    fastlaunch.launch(fn, (3, 2), x, 64, 0.5, BLOCK=32, num_warps=4)
    assert len(fn.triton_calls) == 1 and fn.compiled.launches == []
    before = fastlaunch.counts["direct"]
    fastlaunch.launch(fn, (3, 2), x, 64, 0.25, BLOCK=32, num_warps=4)        # a float changes no signature
    assert len(fn.triton_calls) == 1
    (grid, stream, function, metadata, launch_metadata, args), = fn.compiled.launches
    assert grid == (3, 2, 1) and stream == 1234 and (function, metadata) == ("function", "metadata")
    assert launch_metadata is None
    assert args[0] is x and args[1:] == (64, 0.25, 32)      # the constexpr keyword in parameter order
    assert fastlaunch.counts["direct"] == before + 1


@pytest.mark.parametrize("change", ["int", "alignment", "dtype", "keyword", "option"])
def test_what_triton_specializes_on_sends_the_launch_back_to_triton(fake_gpu, change):
    fn, x = _Jit(), torch.zeros(64)
    fastlaunch.launch(fn, (1,), x, 64, 0.5, BLOCK=32, num_warps=4)
    args, kwargs = [x, 64, 0.5], dict(BLOCK=32, num_warps=4)
    if change == "int":
        args[1] = 1                     # Triton makes an integer equal to 1 a constant
    elif change == "alignment":
        args[0] = x[1:]                 # 4 bytes past a 16-byte boundary
    elif change == "dtype":
        args[0] = x.double()
    elif change == "keyword":
        kwargs["BLOCK"] = 64
    else:
        kwargs["num_warps"] = 8
    fastlaunch.launch(fn, (1,), *args, **kwargs)
    assert len(fn.triton_calls) == 2 and fn.compiled.launches == []
    fastlaunch.launch(fn, (1,), *args, **kwargs)                    # then this signature is known too
    assert len(fn.triton_calls) == 2 and len(fn.compiled.launches) == 1


@pytest.mark.parametrize("change", [None, "shape", "strides", "block", "dtype", "alignment"])
def test_host_tensor_descriptors_are_keyed_by_their_geometry(fake_gpu, change):
    """A host tensor descriptor (launch.host_rows) goes directly to the compiled kernel, whose launcher encodes
    it, once its base's dtype and alignment and its shape, strides and block shape have been met; any change
    to them goes back to Triton first."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    fn, x = _Jit(), torch.zeros(4, 64)
    first = TensorDescriptor(x, [4, 64], [64, 1], [2, 64])
    fastlaunch.launch(fn, (1,), first, 8, 0.5, BLOCK=32)
    base, shape, strides, block = x, [4, 64], [64, 1], [2, 64]
    if change == "shape":
        shape = [2, 64]
    elif change == "strides":
        base, strides = torch.zeros(4, 128), [128, 1]
    elif change == "block":
        block = [4, 64]
    elif change == "dtype":
        base = x.double()
    elif change == "alignment":
        base = torch.zeros(4 * 64 + 1)[1:].view(4, 64)      # 4 bytes past a 16-byte boundary
    second = TensorDescriptor.__new__(TensorDescriptor)     # no alignment check (the kernel is a stand-in)
    second.__dict__.update(base=base, shape=shape, strides=strides, block_shape=block, padding="zero",
                           round_f32_to_tf32=False)
    fastlaunch.launch(fn, (1,), second, 8, 0.5, BLOCK=32)
    assert len(fn.triton_calls) == (1 if change is None else 2)
    if change is None:
        (_, _, _, _, _, args), = fn.compiled.launches
        assert args[0] is second                # the launcher turns it into a CUtensorMap


def test_bools_and_ints_do_not_share_a_signature(fake_gpu):
    # True == 1 in Python, but Triton types a bool as i1 and makes an integer 1 a constant.
    fn, x = _Jit(), torch.zeros(4)
    fastlaunch.launch(fn, (1,), x, 1, 0.5, BLOCK=32)
    fastlaunch.launch(fn, (1,), x, True, 0.5, BLOCK=32)
    assert len(fn.triton_calls) == 2 and fn.compiled.launches == []


@pytest.mark.parametrize("case", ["disabled", "hooks", "odd_type", "unhashable_keyword", "default_parameter",
                                  "old_launcher"])
def test_what_the_direct_call_cannot_vouch_for_keeps_triton_s_path(fake_gpu, monkeypatch, case):
    fn, x = _Jit(), torch.zeros(4)
    args, kwargs = [x, 8, 0.5], dict(BLOCK=32)
    if case == "disabled":
        monkeypatch.setenv("ATTNC_FAST_LAUNCH", "0")
    elif case == "hooks":
        class Chain:
            calls = [print]
        monkeypatch.setattr(fastlaunch, "_hooks", lambda: (Chain(), None))
    elif case == "odd_type":
        args[1] = (8,)
    elif case == "unhashable_keyword":
        kwargs["BLOCK"] = [32]
    elif case == "default_parameter":
        kwargs = {}                     # BLOCK left to a default: Triton's binder would fill it in
    else:
        def old_run(*a):
            raise TypeError("launcher takes other arguments")
        fn.compiled.run = old_run
    for _ in range(3):
        fastlaunch.launch(fn, (1,), *args, **kwargs)
    assert len(fn.triton_calls) == 3
    assert fn.compiled.launches == []


def test_the_table_of_signatures_is_bounded(fake_gpu, monkeypatch):
    monkeypatch.setattr(fastlaunch, "MAX_SIGNATURES", 4)
    fn, x = _Jit(), torch.zeros(4)
    for n in range(10):
        fastlaunch.launch(fn, (1,), x, 16 * n + 2, 0.5, BLOCK=32)
    assert 1 <= len(fn._attnc_launches) <= 4


def test_the_interpreter_keeps_triton_s_path():
    """Under TRITON_INTERPRET=1 triton.jit makes no JITFunction, so every launch is Triton's (the rest of the
    suite runs this way)."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the interpreter is off")
    kern = attnc.compile("examples/causal.attn")
    before = dict(fastlaunch.counts)
    q, k, v = (torch.randn(1, 1, 40, 16) for _ in range(3))
    kern(q, k, v)
    assert fastlaunch.counts == before


@pytest.mark.gpu
@pytest.mark.parametrize("source", ["examples/causal.attn", "examples/hash_buckets.attn", "examples/dropped_keys.attn"])
def test_direct_launches_match_triton_s_on_the_gpu(source, monkeypatch):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or not torch.cuda.is_available():
        pytest.skip("run with TRITON_INTERPRET=0 on a GPU")
    kern = attnc.compile(source)
    B, H, N, D = 2, 4, 777, 64
    g = torch.Generator().manual_seed(3)
    inputs = {}
    for name in kern.ir.inputs:
        if name == "keep":
            inputs[name] = (torch.rand(B, H, N, generator=g) < 0.5).cuda()
        else:
            inputs[name] = torch.randint(0, 6, (B, H, N), generator=g).cuda()
    q, k, v = (torch.randn(B, H, N, D, generator=g).cuda().bfloat16().requires_grad_() for _ in range(3))
    dout = torch.randn(B, H, N, D, generator=g).cuda().bfloat16()

    def run():
        out = kern(q, k, v, **inputs)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        return [out, *grads]

    monkeypatch.setenv("ATTNC_FAST_LAUNCH", "0")
    slow = run()
    monkeypatch.setenv("ATTNC_FAST_LAUNCH", "1")
    before = fastlaunch.counts["direct"]
    fast = [run() for _ in range(3)][-1]           # the first meets new signatures, later ones launch directly
    torch.cuda.synchronize()
    assert fastlaunch.counts["direct"] > before
    for a, b in zip(slow, fast):
        assert torch.equal(a, b)
