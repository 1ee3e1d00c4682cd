"""Layout transforms: bucket sort, key/query compaction, residue permutation (forward and backward)."""

import pytest
import torch

import attnc
import attnc.layout
from attnc.plan import layout_transform

try:
    from tests.spies import returns_of
except ImportError:                          # tests/ itself on sys.path
    from spies import returns_of

HASH = "examples/hash_buckets.attn"
KEEP = "examples/dropped_keys.attn"
QKEEP = "examples/dropped_queries.attn"
DILATED = "pattern p(w: int = 30, d: int = 3) { mask causal and window(w) and dilated(d) }"


def _check(kern, B, Hq, Hkv, N, D, inputs, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, N, D, generator=g).requires_grad_() for h in (Hq, Hkv, Hkv))
    out, lse = kern(q, k, v, return_lse=True, **inputs)
    dout = torch.randn(out.shape, generator=g)
    (out * dout).sum().backward()
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = kern.reference(*leaves, return_lse=True, **inputs)
    (ref * dout.double()).sum().backward()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert ((out.double() - ref).norm() / ref.norm().clamp_min(1e-12)) < 1e-4
    for got, leaf in zip((q.grad, k.grad, v.grad), leaves):
        assert not torch.isnan(got).any()
        assert ((got.double() - leaf.grad).norm() / leaf.grad.norm().clamp_min(1e-12)) < 1e-4


def test_transforms_are_detected():
    names = {f: layout_transform(attnc.compile(f).ir.mask).names for f in (HASH, KEEP, QKEEP, DILATED)}
    assert names[HASH] == ("bucket sort",)
    assert names[KEEP] == ("key compaction",)
    assert names[QKEEP] == ("query compaction",)
    assert names[DILATED] == ("residue permutation (mod 3)",)
    assert layout_transform(attnc.compile("examples/causal.attn").ir.mask) is None
    # Only conjuncts of the whole mask may reorder: under `or` the transform would be wrong.
    assert layout_transform(attnc.compile(
        "pattern p() { input keep: bool[batch, heads, N]\n mask kept(keep) or causal }").ir.mask) is None


@pytest.mark.parametrize("case", ["random", "ties_one_bucket", "empty_buckets", "sorted"])
def test_bucket_sort(case):
    B, Hq, Hkv, N = 2, 4, 2, 67
    g = torch.Generator().manual_seed(1)
    qb = torch.randint(0, 8, (B, Hq, N), generator=g)
    kb = torch.randint(0, 8, (B, Hq, N), generator=g)
    if case == "ties_one_bucket":
        qb, kb = torch.zeros_like(qb), torch.zeros_like(kb)
    elif case == "empty_buckets":
        qb, kb = qb * 5, kb * 5 + (kb % 2)           # most bucket ids used by one side only
    elif case == "sorted":
        qb, kb = torch.sort(qb, -1).values, torch.sort(kb, -1).values
    _check(attnc.compile(HASH), B, Hq, Hkv, N, 16, {"qb": qb, "kb": kb}, seed=2)


@pytest.mark.parametrize("case", ["half", "all_dropped_row", "none_dropped"])
def test_key_compaction(case):
    B, Hq, Hkv, N = 2, 4, 1, 67
    keep = torch.rand(B, Hq, N, generator=torch.Generator().manual_seed(3)) < 0.5
    if case == "all_dropped_row":
        keep[1, 2] = False                          # every key of this (b, h) dropped: rows output 0
    elif case == "none_dropped":
        keep[:] = True
    _check(attnc.compile(KEEP), B, Hq, Hkv, N, 32, {"keep": keep}, seed=4)


def test_query_compaction_zero_rows():
    keep = torch.rand(1, 2, 130, generator=torch.Generator().manual_seed(5)) < 0.3
    _check(attnc.compile(QKEEP), 1, 2, 2, 130, 16, {"keep": keep}, seed=6)


@pytest.mark.parametrize("n", [67, 130, 192])
def test_residue_permutation(n):
    """Outputs, lse and gradients; 192 = 3 x 2 x 32 takes the closed-form residue classes."""
    _check(attnc.compile(DILATED), 1, 2, 1, n, 16, {}, seed=7)


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("case", ["padded", "q_only_buckets", "allowance_too_small", "negative_ids_share_a_key"])
def test_padded_buckets_forward_and_backward(case, tma, monkeypatch):
    """Buckets started on block boundaries (attnc.plan.padded_rows): padding query rows are computed
    without effect and never stored, padding keys are masked, every real row is written once (GQA, a
    length that is no multiple of the tiles, buckets only one side holds: rows without keys). With no
    allowance for the padding the sorted order stays and the same results come out. With tensor
    descriptors (tma) the dK/dV kernel reads lse2 and delta of sorted blocks, padding rows included,
    through them.

    Padded blocks hold one bucket id each, so the setup's flag lets the kernels leave the bucket test out
    of partial tiles (Layout.pure = 1); blocks of two ids (no allowance, or negative ids, which share the
    sort key -1 and so one padded run) clear it, and the kernels test it."""
    monkeypatch.setattr(attnc.plan, "PAD_SLACK", 0.0 if case == "allowance_too_small" else 1.0)
    if tma:
        cfg = attnc.launch.FwdConfig(32, 32, 4, 1, tma=True)
        monkeypatch.setattr(attnc.launch, "_chosen_config", lambda kind, *a: cfg)
    B, Hq, Hkv, N = 1, 4, 2, 101
    g = torch.Generator().manual_seed(12)
    buckets = 6 if case == "allowance_too_small" else 3      # 6 buckets need 6 blocks of 32, 5 fit
    qb = torch.randint(0, buckets, (B, Hq, N), generator=g)
    kb = torch.randint(0, buckets, (B, Hq, N), generator=g)
    if case == "q_only_buckets":
        qb[..., ::7] = 5                              # bucket 5 has queries and no keys
    elif case == "negative_ids_share_a_key":
        qb, kb = qb - 3 * (qb % 2), kb - 3 * (kb % 2)   # ids 0, -2, 2: -2 joins the clamped run of -1
        qb[..., ::5], kb[..., ::4] = -1, -1
    layouts = []
    real_build = attnc.layout.build_layout
    monkeypatch.setattr(attnc.layout, "build_layout", lambda *a, **k: layouts.append(real_build(*a, **k)) or layouts[-1])
    _check(attnc.compile(HASH), B, Hq, Hkv, N, 16, {"qb": qb, "kb": kb}, seed=13)
    assert layouts and all(l.rows_q > N and l.rows_k > N for l in layouts)
    for layout in layouts:
        real = layout.q_perm < N
        padded = (layout.q_perm[..., :N] != torch.sort(qb, dim=-1, stable=True).indices[..., :N]).any()
        assert bool(padded) == (case != "allowance_too_small")
        assert int(real.sum()) == N * Hq * B
        assert int(layout.pure) == (case in ("padded", "q_only_buckets"))


def test_the_bucket_flag_picks_the_partial_tiles_mask(monkeypatch):
    """The kernels read Layout.pure: forced to 1 on blocks holding two bucket ids, the partial tiles lose
    the bucket test and the output goes wrong (so the checks above run the flag's loop, not only one)."""
    g = torch.Generator().manual_seed(21)
    qb, kb = torch.randint(-3, 2, (1, 2, 96), generator=g), torch.randint(-3, 2, (1, 2, 96), generator=g)
    q, k, v = (torch.randn(1, 2, 96, 16, generator=g) for _ in range(3))
    kern = attnc.compile(HASH)
    ref = kern.reference(q, k, v, qb=qb, kb=kb)
    assert torch.allclose(kern(q, k, v, qb=qb, kb=kb), ref, atol=1e-5)
    real_build = attnc.layout.build_layout

    def forced(*a, **k):
        layout = real_build(*a, **k)
        assert int(layout.pure) == 0            # ids -3..-1 share the sort key -1: one run of three ids
        layout.pure.fill_(1)
        return layout

    monkeypatch.setattr(attnc.layout, "build_layout", forced)
    qb, kb = qb.clone(), kb.clone()             # new inputs: planned again
    assert not torch.allclose(kern(q, k, v, qb=qb, kb=kb), ref, atol=1e-3)


def test_tile_fractions_meet_the_issue_bounds():
    g = torch.Generator().manual_seed(0)
    hb = torch.randint(0, 8, (1, 1, 2048), generator=g)
    plan = attnc.compile(HASH).plan(2048, 2048, 1, 1, block_m=128, block_n=64, qb=hb, kb=hb)
    assert plan.transforms == ["bucket sort"] and plan.tile_fraction <= 0.3
    keep = torch.rand(1, 1, 2048, generator=g) < 0.5
    plan = attnc.compile(KEEP).plan(2048, 2048, 1, 1, block_m=128, block_n=64, keep=keep)
    assert plan.tile_fraction <= 0.36
    plan = attnc.compile("pattern p() { mask causal and window(512) and dilated(4) }").plan(
        4096, 4096, block_m=128, block_n=64)
    assert plan.tile_fraction <= 0.07 and "residue permutation (mod 4)" in plan.transforms
    assert "mode: residue" in str(plan)          # classes in closed form (4096 = 4 x 8 x 128)


RESIDUE_CLOSED_FORM = [
    ("pattern p() { mask causal and window(300) and dilated(3) }", 3, (192, 192)),
    ("pattern p() { mask dilated(2) and window(40, 9) }", 2, (256, 256)),
    ("pattern p() { mask dilated(2) and (window(20) or q - k >= 90) }", 2, (128, 256)),
    ("pattern p() { mask causal and dilated(4) }", 4, (384, 256)),
]


@pytest.mark.parametrize("source,d,lengths", RESIDUE_CLOSED_FORM)
def test_residue_local_mask_is_the_mask_inside_each_class(source, d, lengths):
    """attnc.plan.residue_local_mask: on class c, rows j_q, j_k (positions c + d j) the class-local mask at
    (j_q, j_k) with lengths n / d equals the pattern's mask at the positions, for every class."""
    from attnc.evaluate import evaluate
    from attnc.plan import residue_local_mask
    kern = attnc.compile(source)
    got_d, local = residue_local_mask(kern.ir.mask)
    n_q, n_k = lengths
    full = kern.mask(n_q, n_k)[0, 0]
    jq, jk = torch.arange(n_q // d)[:, None], torch.arange(n_k // d)[None, :]
    inside = evaluate([local], {"q": jq, "k": jk, "n_q": n_q // d, "n_k": n_k // d, "b": 0, "h": 0})[0]
    inside = torch.as_tensor(inside).expand(n_q // d, n_k // d)
    assert got_d == d
    for c in range(d):
        assert torch.equal(full[c::d, c::d], inside), c
    # Pairs of different classes are never visible (the residue atom).
    cls = torch.arange(n_q)[:, None] % d != torch.arange(n_k)[None, :] % d
    assert not full[cls].any()


@pytest.mark.parametrize("source,d,lengths", RESIDUE_CLOSED_FORM)
def test_residue_plan_counts_the_classified_tiles(source, d, lengths, monkeypatch):
    """The closed-form plan of residue classes (kern.plan mode 'residue') computes the same tiles as the
    tile classification of the sorted problem (the path taken with ATTNC_RESIDUE_RANGES=0)."""
    kern = attnc.compile(source)
    closed = kern.plan(*lengths, 2, 2, block_m=32, block_n=32)
    monkeypatch.setenv("ATTNC_RESIDUE_RANGES", "0")
    listed = kern.plan(*lengths, 2, 2, block_m=32, block_n=32)
    assert (closed.mode, listed.mode) == ("residue", "permuted")
    assert closed.tiles == listed.tiles and closed.transforms == listed.transforms
    assert "setup: none" in str(closed)


def test_dilated_neighborhood_uses_residue_classes():
    kern = attnc.compile("pattern p() { mask neighborhood(7, dilation = 4) }")
    assert layout_transform(kern.ir.mask).names == ("residue permutation (mod 4)",)
    _check(kern, 1, 2, 1, 130, 16, {}, seed=8)
    # After the permutation each query block meets one or two key blocks of its class.
    assert kern.plan(8192, 8192, block_m=64, block_n=64).tile_fraction < 0.03


@pytest.mark.parametrize("source,inputs", [
    ("pattern p() { mask causal and window(300) and dilated(3) }", {}),
    ("pattern p() { mask neighborhood(41, dilation = 4) }", {}),
    (None, "hash"),
    (None, "keep"),
    ("pattern p() {\n input keep: bool[batch, heads, N]\n mask query_kept(keep) and window(200)\n}", "keep"),
])
def test_coarse_to_fine_classification_equals_classifying_every_tile(source, inputs, monkeypatch):
    """Large permuted problems are classified coarse tiles first, then blocks of partial coarse tiles
    only; the result must equal the direct classification block by block (ragged edges included)."""
    from attnc.plan import PermutedTileClassifier
    n, B, H = 1003, 2, 2
    g = torch.Generator().manual_seed(11)
    if inputs == "hash":
        kern = attnc.compile(HASH)
        qb = torch.randint(0, 5, (B, H, n), generator=g)
        args = dict(qb=qb, kb=torch.randint(0, 5, (B, H, n), generator=g))
    elif inputs == "keep":
        kern = attnc.compile(source or KEEP)
        args = dict(keep=torch.rand(B, H, n, generator=g) < 0.4)
    else:
        kern = attnc.compile(source)
        args = {}
    direct = kern.plan(n, n, B, H, block_m=16, block_n=8, **args)
    monkeypatch.setattr(PermutedTileClassifier, "HIERARCHY_MIN_TILES", 0)
    monkeypatch.setattr(PermutedTileClassifier, "COARSE", 4)
    calls = []
    real = PermutedTileClassifier._classify_coarse_to_fine
    monkeypatch.setattr(PermutedTileClassifier, "_classify_coarse_to_fine",
                        lambda self: calls.append(1) or real(self))
    layered = kern.plan(n, n, B, H, block_m=16, block_n=8, **args)
    assert calls, "the coarse-to-fine path did not run"
    assert layered.tiles == direct.tiles
    assert 0 < direct.tiles["partial"] and 0 < direct.tiles["empty"]



def test_which_rows_the_kernels_compute_or_read_in_order():
    """The launcher's view of a layout: residue classes of block-aligned length are computed (no loaded
    positions), other lengths and other transforms are gathered; compaction leaves the other side's
    rows in order (tensor descriptors stay possible there)."""
    kern = attnc.compile(DILATED)
    aligned = kern._layout(1, 2, 2, 192, 288, 32, 32, {}, {}, torch.device("cpu"))
    assert aligned.residue_classes(192, 288, 32, 32) == 3
    assert aligned.residue_classes(192, 288, 32, 64) == 0           # 288 keys: not a multiple of 3 x 64
    odd = kern._layout(1, 2, 2, 100, 100, 32, 32, {}, {}, torch.device("cpu"))
    assert odd.residue_classes(100, 100, 32, 32) == 0
    # Sorted row c * (N / d) + j is position c + d * j, as the kernels compute it.
    n, d = 192, 3
    want = torch.tensor([c + d * j for c in range(d) for j in range(n // d)])
    assert torch.equal(aligned.q_perm.reshape(-1), want)
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(1, 2, 128, generator=g) < 0.5
    for path, q_moved, k_moved in ((KEEP, False, True), (QKEEP, True, False)):
        lay = attnc.compile(path)._layout(1, 2, 2, 128, 128, 32, 32, {}, {"keep": keep}, torch.device("cpu"))
        assert (lay.q_identity, lay.k_identity) == (not q_moved, not k_moved)
        assert lay.residue_classes(128, 128, 32, 32) == 0
    buckets = attnc.compile(HASH)
    ids = torch.randint(0, 8, (1, 2, 128), generator=g)
    inputs = {"qb": ids, "kb": ids}
    lay = buckets._layout(1, 2, 2, 128, 128, 32, 32, {}, inputs, torch.device("cpu"))
    assert lay.residue_classes(128, 128, 32, 32) == 0 and not lay.q_identity


@pytest.mark.gpu
@pytest.mark.parametrize("source,kind", [(HASH, "buckets"), ("examples/documents.attn", "documents"),
                                         (KEEP, "keep")])
def test_setup_graphs_replay_per_call_inputs(source, kind, monkeypatch):
    """On a GPU the setup of a known call shape is a CUDA graph (attnc.setup_graphs): the second call of a
    shape captures it, later ones replay it with their own inputs. Outputs and gradients equal the eager
    setup's, also for a call whose backward runs after later calls have replayed the same graph, and for
    forward-only calls whose inputs are dropped at once (lent results, never copied)."""
    import os
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("run with TRITON_INTERPRET=0 so the compiled kernels run")
    from attnc.setup_graphs import _Captured
    kern = attnc.compile(source)
    B, H, N, D = 2, 4, 1000, 64
    g = torch.Generator().manual_seed(21)

    def inputs():
        if kind == "buckets":
            return {n: torch.randint(0, 6, (B, H, N), generator=g).cuda() for n in ("qb", "kb")}
        if kind == "documents":
            return {"doc": torch.sort(torch.randint(0, 5, (B, N), generator=g), dim=-1).values.cuda()}
        return {"keep": (torch.rand(B, H, N, generator=g) < 0.5).cuda()}

    calls = [inputs() for _ in range(4)]
    qkv = [torch.randn(B, H, N, D, generator=g).cuda().bfloat16() for _ in range(3)]
    dout = torch.randn(B, H, N, D, generator=g).cuda().bfloat16()

    def run(ins):
        leaves = [t.clone().requires_grad_() for t in qkv]
        return leaves, kern(*leaves, **ins)

    # Graphed: call 1 eager, call 2 captures, 3 and 4 replay; call 2's backward runs last.
    runs = [run(ins) for ins in calls]
    graphs = kern.__dict__["_setup_graphs"]._shapes
    assert any(isinstance(state, _Captured) for state in graphs.values())
    for leaves, out in [runs[0], runs[2], runs[3], runs[1]]:
        out.backward(dout)
    # Forward only, each call's inputs dropped at once: the replays lend their results and copy nothing.
    served = []
    with torch.no_grad():
        for _ in range(3):
            ins = inputs()
            served.append((kern(*qkv, **ins), {n: t.cpu() for n, t in ins.items()}))
            del ins
    monkeypatch.setenv("ATTNC_SETUP_GRAPHS", "0")
    kern.__dict__.pop("_setup_cache", None)
    with torch.no_grad():
        for out, ins in served:
            assert torch.equal(out, kern(*qkv, **{n: t.cuda() for n, t in ins.items()}))
    for (leaves, out), ins in zip(runs, calls):
        ref_leaves, ref_out = run(ins)
        ref_out.backward(dout)
        assert torch.equal(out, ref_out)
        for got, want in zip(leaves, ref_leaves):
            assert torch.equal(got.grad, want.grad)


def test_setup_result_is_lent_and_reclaimed_only_while_held():
    """attnc.setup_graphs: a graphed setup's result is lent (new tensor objects on the graph's memory, no copy);
    before the next replay, what is still referenced of it gets private copies in place (equal values, its own
    memory, views of one memory the same way copied once), including tensors made later on that memory inside
    lent objects (a transposed table); what nobody holds costs nothing."""
    from attnc.plan import layout_transform
    import dataclasses

    from attnc.setup_graphs import _Captured
    from attnc.validate import check_inputs
    kern = attnc.compile(HASH)
    g = torch.Generator().manual_seed(30)
    inputs = {n: torch.randint(0, 4, (1, 2, 96), generator=g) for n in ("qb", "kb")}
    sizes = check_inputs(kern.ir, inputs, batch=1, heads=2, n_q=96, n_k=96)
    layout = attnc.layout.build_layout(kern.ir, layout_transform(kern.ir.mask), 1, 2, 2, 96, 96, 32, 32, sizes,
                                       inputs, torch.device("cpu"))
    layout.lists(False)
    layout.__dict__["alias"] = layout.q_perm.view(-1)         # a second view of one tensor's memory
    state = _Captured(None, {n: t.clone() for n, t in inputs.items()}, layout)
    lent = state.lend()
    assert type(lent) is type(layout) and lent is not layout and lent.tiles is not layout.tiles
    assert lent.q_perm is not layout.q_perm and lent.q_perm.data_ptr() == layout.q_perm.data_ptr()
    assert lent.lists(False).status is lent.tiles.status          # one view, one lent tensor
    perm = lent.q_perm                                          # a bare tensor held
    lent.tiles._lists[True] = dataclasses.replace(lent.lists(False), status=lent.status.transpose(-1, -2))
    transposed = lent.lists(True)                               # made later, a view of the graph's memory
    want_perm, want_full = layout.q_perm.clone(), layout.lists(False).full_idx.clone()
    assert state.reclaim() > 0
    layout.q_perm.fill_(-1)                                     # the next replay overwrites the graph's memory
    layout.lists(False).full_idx.fill_(-1)
    layout.status.fill_(-1)
    assert torch.equal(perm, want_perm) and perm is lent.q_perm and perm.data_ptr() != layout.q_perm.data_ptr()
    assert torch.equal(lent.lists(False).full_idx, want_full)
    assert (transposed.status >= 0).all() and lent.lists(True) is transposed
    assert lent.__dict__["alias"].data_ptr() != lent.q_perm.data_ptr()   # another view: its own copy
    del lent, perm, transposed
    state.lend()                                                # dropped at once: nothing to copy
    assert state.reclaim() == 0


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU: replay() recomputes what was captured into the captured
    result's own tensors, as a real graph writes its results into the same memory each time."""

    def capture_begin(self, capture_error_mode="global"):
        self.mode = capture_error_mode

    def capture_end(self):
        pass

    def replay(self):
        self.write(self.rerun(), self.result)

    @classmethod
    def write(cls, src, dst):
        if isinstance(src, torch.Tensor):
            dst.copy_(src)
        elif isinstance(src, dict):
            for key in src:
                cls.write(src[key], dst[key])
        elif isinstance(src, (list, tuple)):
            for a, b in zip(src, dst):
                cls.write(a, b)
        elif hasattr(src, "__dict__"):
            for key, value in vars(src).items():
                cls.write(value, vars(dst)[key])


def test_setup_graphs_capture_on_the_second_call_and_replay_later(monkeypatch):
    """The state machine of attnc.setup_graphs on CPU with a stand-in graph: a shape's first call runs its
    setup eagerly, the second captures it (reading static copies of the inputs), and every call from the
    second on copies its inputs in, replays and lends its result; results held across later replays stay
    equal to an eager setup of their own inputs. A shape whose setup synchronized with the host stays eager; at most MAX_SHAPES are kept."""
    import contextlib

    from attnc import setup_graphs
    from attnc.plan import layout_transform
    from attnc.validate import check_inputs

    class Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(setup_graphs, "enabled", lambda device: True)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    kern = attnc.compile(HASH)
    g = torch.Generator().manual_seed(31)
    calls = [{n: torch.randint(0, 4, (1, 2, 96), generator=g) for n in ("qb", "kb")} for _ in range(4)]
    sizes = check_inputs(kern.ir, calls[0], batch=1, heads=2, n_q=96, n_k=96)
    built_from = []

    def build(ins):
        built_from.append(ins)
        return attnc.layout.build_layout(kern.ir, layout_transform(kern.ir.mask), 1, 2, 2, 96, 96, 32, 32, sizes,
                                         ins, torch.device("cpu"))

    def materialize(layout):          # (the torch path's lists are as wide as the data needs: not here)
        return layout

    real_captured = setup_graphs._Captured

    def captured(graph, static, result):          # give the stand-in graph what it replays
        graph.rerun, graph.result = (lambda: materialize(build(static))), result
        return real_captured(graph, static, result)
    monkeypatch.setattr(setup_graphs, "_Captured", captured)

    graphs = setup_graphs.SetupGraphs()
    results = [graphs.run(("shape",), ins, build, materialize) for ins in calls]
    (state,) = graphs._shapes.values()
    assert isinstance(state, real_captured) and state.graph.mode == "thread_local"
    assert built_from[0] is calls[0]
    assert all(b is state.static for b in built_from[1:])          # the capture and replays read static copies
    for ins, got in zip(calls, results):
        want = materialize(build(ins))
        assert torch.equal(got.q_perm, want.q_perm) and torch.equal(got.k_perm, want.k_perm)
        assert torch.equal(got.status, want.status)
    # Every held result but the last was copied before a replay; the last still lends the graph's memory.
    assert all(got.q_perm.data_ptr() != state.result.q_perm.data_ptr() for got in results[:-1])
    assert results[-1].q_perm.data_ptr() == state.result.q_perm.data_ptr()
    # A shape whose first setup synchronized with the host is never captured.
    from attnc import device_setup

    def syncing_build(ins):
        device_setup.HOST_SYNCS += 1
        return build(ins)
    for ins in calls[:3]:
        graphs.run(("synced",), ins, syncing_build, materialize)
    synced = [v for k, v in graphs._shapes.items() if k[0] == "synced"]
    assert synced == [setup_graphs._EAGER]
    for i in range(setup_graphs.MAX_SHAPES + 2):
        graphs.run(("other", i), calls[0], build, materialize)
    assert len(graphs._shapes) == setup_graphs.MAX_SHAPES


def test_flags_are_known_from_the_call_after_the_first_sight(monkeypatch):
    """attnc.flags.known: None on the first two sights (at the second, the copy to the host is started), the
    value from then on; None always when resolving is off (the tests that force a flag's value)."""
    from attnc import flags
    flag = torch.tensor([1], dtype=torch.int32)
    assert flags.known(None) is None
    assert flags.known(flag) is None and flags.known(flag) is None
    assert flags.known(flag) == 1 and flags.known(flag) == 1
    other = torch.tensor([0], dtype=torch.int32)
    monkeypatch.setattr(flags, "RESOLVE", False)
    assert flags.known(other) is None and flags.known(other) is None and flags.known(flag) is None


def test_hash_buckets_launch_one_pure_variant_once_the_flag_is_known(monkeypatch):
    """The bucket flag (Layout.pure) resolved on the host: the third call on a cached setup launches the
    permuted forward once, with the bucket test left out where every block holds one id; same output."""
    from attnc import launch
    monkeypatch.setattr(attnc.plan, "PAD_SLACK", 1.0)
    g = torch.Generator().manual_seed(22)
    qb = torch.randint(0, 3, (1, 2, 128), generator=g)
    q, k, v = (torch.randn(1, 2, 128, 16, generator=g) for _ in range(3))
    kern = attnc.compile(HASH)
    outs = []
    with returns_of(launch, "forward_launches") as planned:
        for _ in range(3):
            outs.append(kern(q, k, v, qb=qb, kb=qb))
    layout = planned[0][0]
    assert int(layout.pure) == 1
    assert [[variant.pure for variant in launches] for _, launches in planned] == [[0, 1], [0, 1], [1]]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert torch.allclose(outs[2], kern.reference(q, k, v, qb=qb, kb=qb), atol=1e-5)
