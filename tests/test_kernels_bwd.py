"""Backward kernels (dQ, dK/dV) under the interpreter against float64 autograd of the reference."""

import random
import zlib
from unittest import mock

import pytest
import torch

import attnc

try:
    from tests.poison import poisoned_allocations
    from tests.spies import returns_of
    from tests.test_kernels_fwd import low_precision_attention, rounding_slack
except ImportError:                          # tests/ itself on sys.path
    from poison import poisoned_allocations
    from spies import returns_of
    from test_kernels_fwd import low_precision_attention, rounding_slack


CASES = {
    "causal": ("pattern p() { mask causal }", None),
    "window_or_globals": ("pattern p() { mask window(20, 5) or global_tokens(9) }", None),
    "dilated_window": ("pattern p() { mask causal and dilated(3) and window(50) }", None),
    "fully_masked_rows": ("pattern p() { mask q < 0 or k <= q - 40 }", None),
    "documents": ("pattern p() {\n input doc: int[batch, N]\n mask same(doc) and causal\n}", "doc"),
    "alternating_docs": ("pattern p() {\n input doc: int[batch, N]\n mask same(doc) or q < 0\n}", "altdoc"),
    "kept_keys": ("pattern p() {\n input keep: bool[batch, heads, N]\n mask kept(keep) and causal\n}", "keep"),
    "dropped_queries": ("pattern p() {\n input keep: bool[batch, heads, N]\n mask query_kept(keep)\n}", "keep"),
    "alibi": ("pattern p() {\n input s: float[heads]\n mask causal\n score alibi(s[h])\n}", "s"),
    "softcap": ("pattern p() {\n mask causal\n score softcap(score, 2.0)\n}", None),
    "relative_bias": ("pattern p() {\n input rb: float[heads, R]\n mask causal\n"
                      " score score + rb[h, clamp(q - k, -8, 8) + 8]\n}", "rb"),
    "dense_mask": ("pattern p() {\n input m: bool[batch, N, M]\n mask m[b, q, k] and causal\n}", "dense"),
    "prefix_or_causal": ("pattern p() { mask prefix(20) or causal }", None),
    "block_local": ("pattern p() { mask block_local(24) }", None),
    "neighborhood_dilated": ("pattern p() { mask neighborhood(13, dilation = 2) }", None),
    "neighborhood2d": ("pattern p() { mask neighborhood2d(10, 7, 3, 5) }", None),
    # per-head switches: comparisons of a read that is one scalar per tile, joined with tile tests (and heads
    # whose mask is empty: zero output and gradients)
    "head_switch": ("pattern p() {\n input t: float[heads]\n mask (t[h] > 0.0 and window(20, 0)) or "
                    "(t[h] <= 0.0 and causal)\n}", "t"),
    "heads_off": ("pattern p() {\n input t: float[heads]\n mask causal and t[h] > 0.0\n}", "t"),
}
# Random masks mixing tile tests with per-head and per-batch switches read from inputs (scalars per tile).
_SWITCH_ATOMS = ["causal", "q - k < 5", "k <= q", "t[h] > 0.0", "t[h] <= 0.5", "on[h]", "not on[h]", "u[b] == 1",
                 "(q + k) % 3 == 0", "t[h] * 2.0 > q - k", "k == 0", "g[h, k % 4] > 0.0", "h == 1",
                 "t[h] > 0.0 or k == q"]


def _switch_mask(rng, depth=0):
    if depth > 2 or rng.random() < 0.35:
        return rng.choice(_SWITCH_ATOMS)
    op = rng.choice(["and", "or", "and", "not"])
    if op == "not":
        return f"not ({_switch_mask(rng, depth + 1)})"
    return f"({_switch_mask(rng, depth + 1)}) {op} ({_switch_mask(rng, depth + 1)})"


_switch_rng = random.Random(2611)
for _i in range(6):
    CASES[f"random_switches{_i}"] = (
        "pattern p() {\n input t: float[heads]\n input on: bool[heads]\n input u: int[batch]\n"
        f" input g: float[heads, 4]\n mask {_switch_mask(_switch_rng)}\n}}", "switches")
SQUARE_ONLY = {"neighborhood_dilated", "neighborhood2d"}
SHAPES = [(2, 4, 2, 67, 67, 16), (1, 2, 1, 45, 70, 32)]


def _inputs(kind, B, Hq, n, g):
    if kind == "doc":
        return {"doc": torch.sort(torch.randint(0, 4, (B, n), generator=g), dim=-1).values}
    if kind == "altdoc":                 # two documents alternating every 32 positions
        return {"doc": (torch.arange(n) // 32 % 2).expand(B, n).contiguous()}
    if kind == "keep":
        return {"keep": torch.rand(B, Hq, n, generator=g) < 0.5}
    if kind == "s":
        return {"s": torch.rand(Hq, generator=g)}
    if kind == "t":                      # heads alternate between the two sides of the switch
        return {"t": torch.arange(Hq) % 2 * 2.0 - 1.0}
    if kind == "switches":
        return {"t": torch.randn(Hq, generator=g), "on": torch.rand(Hq, generator=g) < 0.5,
                "u": torch.randint(0, 2, (B,), generator=g), "g": torch.randn(Hq, 4, generator=g)}
    if kind == "rb":
        return {"rb": torch.randn(Hq, 17, generator=g)}
    if kind == "dense":                  # documents as a dense mask, one batch entry holes at random, rows empty
        doc = torch.arange(n) * 3 // n
        m = (doc[:, None] == doc[None, :]).expand(B, n, n).clone()
        m[-1] &= torch.rand(n, n, generator=g) < 0.8
        m[0, n // 2: n // 2 + 5] = False
        return {"m": m}
    return {}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}H{s[1]}/{s[2]}N{s[3]}x{s[4]}D{s[5]}")
@pytest.mark.parametrize("name", list(CASES))
def test_gradients_match_float64(name, shape):
    check_gradients(name, shape)


GPU_SHAPES = SHAPES + [(2, 4, 1, 333, 333, 64), (1, 2, 2, 200, 461, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"B{s[0]}H{s[1]}/{s[2]}N{s[3]}x{s[4]}D{s[5]}")
@pytest.mark.parametrize("name", list(CASES))
def test_gradients_compiled_on_the_gpu(name, shape):
    """The same gradient checks, compiled for the GPU (TRITON_INTERPRET=0) with its own backward tiles, in
    float32 (ieee dots) against float64 autograd, plus lengths spanning several of the GPU's blocks."""
    check_gradients(name, shape, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 333, 333, 128), (1, 2, 1, 200, 461, 64),
                                   (1, 2, 2, 150, 150, 256)],
                         ids=lambda s: f"B{s[0]}H{s[1]}/{s[2]}N{s[3]}x{s[4]}D{s[5]}")
@pytest.mark.parametrize("name", list(CASES))
def test_low_precision_gradients_on_the_gpu(name, shape, dtype):
    """bf16 / fp16 on the GPU's default backward tiles (D 64, 128, 256), FlashAttention's rule for gradients:
    the kernel's max error against float64 at most twice that of plain torch attention (autograd) in the same
    dtype, plus a few rounding steps; for q, k, v and every float input the score reads."""
    src, kind, (B, Hq, Hkv, Nq, Nk, D), seed = _case_problem(name, shape)
    kern = attnc.compile(src)
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(B, h, n, D, generator=g) for h, n in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk))]
    inputs = _inputs(kind, B, Hq, max(Nq, Nk), g)
    floats = [n for n, t in inputs.items() if t.is_floating_point()]
    dout = torch.randn(B, Hq, Nq, D, generator=g)
    dlse = torch.randn(B, Hq, Nq, generator=g)

    def grads(fn, dt, device):
        leaves = [x.to(device, dt).requires_grad_() for x in qkv]
        # float inputs stay float32 (as a caller's ALiBi slopes would), float64 for the reference
        ins = {n: (t.to(device, torch.float64 if dt == torch.float64 else torch.float32).requires_grad_()
                   if n in floats else t.to(device)) for n, t in inputs.items()}
        out, lse = fn(leaves, ins)
        live = ~torch.isinf(lse)
        loss = (out.double() * dout.to(device, torch.float64)).sum() + (lse.double() * dlse.to(device).double())[
            live].sum()
        loss.backward()
        for label, x in zip(["q", "k", "v"] + floats, leaves + [ins[n] for n in floats]):
            yield label, (torch.zeros(x.shape, dtype=torch.float64) if x.grad is None else x.grad.double().cpu())

    def run_kernel(leaves, ins):
        with poisoned_allocations():
            return kern(*leaves, return_lse=True, **ins)

    def run_reference(leaves, ins):
        return kern.reference(*leaves, return_lse=True, **ins)

    def run_plain(leaves, ins):
        return low_precision_attention(kern, *leaves, D ** -0.5, ins)

    want = dict(grads(run_reference, torch.float64, "cpu"))
    got = dict(grads(run_kernel, dtype, "cuda"))
    plain = dict(grads(run_plain, dtype, "cuda"))
    for label, ref in want.items():
        assert torch.isfinite(got[label]).all(), f"d{label} not finite"
        kern_err = float((got[label] - ref).abs().max())
        base_err = float((plain[label] - ref).abs().max())
        slack = rounding_slack(ref, dtype)
        assert kern_err <= 2 * base_err + slack, (
            f"d{label}: kernel max error {kern_err:.3g} > 2 x plain {dtype} error {base_err:.3g} + {slack:.3g}")


@pytest.mark.parametrize("name", ["causal", "prefix_or_causal", "window_or_globals", "documents", "kept_keys",
                                  "dilated_window"])
def test_dkdv_kernel_with_its_own_tiles(name):
    """The dQ and dK/dV kernels may use different tiles (e.g. 128 queries x 64 keys for dQ, 64 x 128
    for dK/dV): closed-form ranges, tile lists and sorted layouts are then built per kernel."""
    from unittest import mock

    from attnc import launch
    cfg = launch.FwdConfig(16, 32, 4, 1, dkdv=launch.FwdConfig(32, 16, 4, 1))
    asked = []

    def chosen(kind, *args):
        asked.append(kind)
        return cfg if kind == "bwd" else launch.FwdConfig(32, 32, 4, 1)

    with mock.patch.object(launch, "_chosen_config", chosen):
        check_gradients(name, SHAPES[0])
    assert "bwd" in asked


@pytest.mark.parametrize("copies", [True, False], ids=["sorted-copies", "gathers"])
@pytest.mark.parametrize("name", ["causal", "prefix_or_causal", "documents", "kept_keys", "dropped_queries",
                                  "fully_masked_rows", "alibi"])
def test_tma_backward_variant(name, copies):
    """Tensor-descriptor loads in both backward kernels. Rows a layout transform moved (kept keys: the
    forward and dQ kernels' keys; dropped queries: the dK/dV kernel's queries) are copied into sorted
    order for them, or, with ATTNC_SORTED_KV=0, gathered through their positions without descriptors;
    the rows it did not move are read in order either way."""
    from unittest import mock

    from attnc import launch
    from attnc.layout import Layout
    cfg = launch.FwdConfig(16, 32, 4, 1, tma=True, dkdv=launch.FwdConfig(32, 16, 4, 1, tma=True))
    with mock.patch.object(launch, "_chosen_config", lambda kind, *a: cfg if kind == "bwd" else
                           launch.FwdConfig(32, 32, 4, 1, tma=True)), returns_of(launch, "_tma_usable") as used, \
            returns_of(Layout, "sorted_keys") as key_copies, returns_of(Layout, "sorted_queries") as query_copies, \
            mock.patch.dict("os.environ", {"ATTNC_SORTED_KV": "1" if copies else "0"}):
        check_gradients(name, SHAPES[0])
    moved = {"kept_keys": [False, False, True], "dropped_queries": [True, True, False]}.get(name)
    # List kernels run twice in the backward, with and without FULL_RUNS, each guarded by a device flag.
    if name == "documents":
        # Documents are sorted by id, so both layouts run too (guarded by the device's "nothing moved"
        # flag): the plain list kernels read in order, the permuted ones gather or read copies.
        # Order: forward plain, forward permuted, then dQ and dK/dV plain (twice), permuted (twice).
        assert used == [True, copies] + [True, True] * 2 + [copies, copies] * 2
        assert len(key_copies) == len(query_copies) * 2 == (4 if copies else 0)
        return
    if moved is not None:           # kept keys, dropped queries: permuted list kernels
        want = [True, True, True] if copies else moved
        assert used == want[:1] + want[1:] * 2
    else:
        assert used == [True, True, True]                                           # fwd, dQ, dK/dV
    assert len(key_copies) == (4 if copies and name == "kept_keys" else 0)          # K, V in fwd and dQ
    assert len(query_copies) == (2 if copies and name == "dropped_queries" else 0)  # Q, dO in dK/dV


@pytest.mark.parametrize("group, tail", [(1, 0), (3, 0), (16, 0), (1, 100), (3, 7), (2, 1000)])
@pytest.mark.parametrize("name", ["causal", "documents", "kept_keys", "dilated_window"])
def test_programs_started_by_head_groups(name, group, tail):
    """HEAD_GROUP reorders the programs of all three kernels (groups of heads, all blocks of a group before
    the next): every (batch x head, block) is still computed once, also where the last group has fewer heads
    (groups of 3 over 2 x 4 query heads in the forward and dQ kernels, over 2 x 2 key/value heads in dK/dV)
    and where one group holds every head (16). TAIL_PROGRAMS makes the last heads one group of at least that
    many programs: 100 of 3 blocks is every head, 7 of 3 blocks three heads (so groups of 3 before them leave
    a partial one), 1000 more than the grid. Closed form, tile lists, a sorted layout, residue classes."""
    with mock.patch.dict("os.environ", {"ATTNC_HEAD_GROUP": str(group), "ATTNC_TAIL_PROGRAMS": str(tail)}):
        check_gradients(name, SHAPES[0])


def test_head_group_setting():
    """One head at a time by default, every head's first block first for plain tile-list kernels (documents);
    ATTNC_HEAD_GROUP overrides both; anything but a whole number >= 0 is refused by name."""
    from attnc import launch
    with mock.patch.dict("os.environ", {"ATTNC_HEAD_GROUP": "4"}):
        assert launch.head_group() == launch.head_group(plain_lists=True) == 4
    with mock.patch.dict("os.environ", {"ATTNC_HEAD_GROUP": ""}):
        assert (launch.head_group(), launch.head_group(plain_lists=True)) == (1, 0)
    for bad in ("-1", "two"):
        with mock.patch.dict("os.environ", {"ATTNC_HEAD_GROUP": bad}), pytest.raises(ValueError, match="ATTNC_HEAD"):
            launch.head_group()
        with mock.patch.dict("os.environ", {"ATTNC_TAIL_PROGRAMS": bad}), pytest.raises(ValueError, match="ATTNC_TAIL"):
            launch.tail_programs(torch.device("cpu"))
    with mock.patch.dict("os.environ", {"ATTNC_TAIL_PROGRAMS": "264"}):
        assert launch.tail_programs(torch.device("cpu")) == 264
    with mock.patch.dict("os.environ", {"ATTNC_TAIL_PROGRAMS": ""}):
        assert launch.tail_programs(torch.device("cpu")) == 0
        with mock.patch.object(launch, "_multiprocessors", lambda device: 132):
            assert launch.tail_programs(torch.device("cuda")) == 264      # two per SM on a GPU


@pytest.mark.parametrize("name, want", [("causal", {1}), ("kept_keys", {1}), ("alternating_docs", {0}),
                                        ("documents", {0, 1})])
def test_kernels_launched_with_their_head_group(name, want):
    """Every launch of the three kernels passes HEAD_GROUP: 1 (launch.HEAD_GROUP), 0 for the plain tile-list
    kernels: alternating documents run only those; documents in sorted order run the plain and the permuted
    kernels side by side on a first call, each guarded by the setup's "nothing moved" flag."""
    from attnc import launch
    seen = []
    real = launch.launch_kernel

    def spy(fn, grid, *args, **kwargs):
        seen.append((fn.__name__ if hasattr(fn, "__name__") else fn.fn.__name__, kwargs["HEAD_GROUP"]))
        return real(fn, grid, *args, **kwargs)

    with mock.patch.dict("os.environ", {"ATTNC_HEAD_GROUP": ""}), mock.patch.object(launch, "launch_kernel", spy):
        check_gradients(name, SHAPES[0])
    names = {n for n, _ in seen}
    assert {"attnc_fwd", "attnc_bwd_dq", "attnc_bwd_dkdv"} <= names
    groups = {g for n, g in seen if n.startswith("attnc_")}
    assert groups == want


@pytest.mark.parametrize("scale", [-0.5, 0.0])
def test_gradients_with_nonpositive_scale(scale):
    """A positive scale is folded into one factor per score in the backward (and after the row maximum
    in the forward); a negative or zero one must give the reference gradients too."""
    kern = attnc.compile(CASES["prefix_or_causal"][0])
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 45, 16, generator=g).requires_grad_() for _ in range(3))
    out = kern(q, k, v, scale=scale)
    dout = torch.randn(out.shape, generator=g)
    (out * dout).sum().backward()
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = kern.reference(*leaves, scale=scale)
    assert (out.double() - ref).abs().max() < 1e-5
    (ref * dout.double()).sum().backward()
    for x, leaf in zip((q, k, v), leaves):
        assert (x.grad.double() - leaf.grad).norm() <= 1e-4 * leaf.grad.norm().clamp_min(1e-6)


@pytest.mark.parametrize("lengths", [(67, 67), (45, 70)])
def test_row_descriptors_leave_padding_rows_without_weight(lengths):
    """With tensor descriptors the dK/dV kernel reads lse2 and delta of in-order query rows in blocks; rows
    past n_q read 0 there. Tile lists count a ragged last query block as full when its real rows see
    the whole key block, so those rows must still get P = 0: a score of +100 would make P overflow to inf
    for them (and inf * 0 = NaN in dK, dV) if their lse2 were not +inf."""
    from unittest import mock

    from attnc import launch
    src = "pattern p() {\n input doc: int[batch, N]\n mask same(doc)\n score score + 100.0\n}"
    kern = attnc.compile(src)
    cfg = launch.FwdConfig(32, 32, 4, 1, tma=True)
    B, H, (Nq, Nk), D = 1, 2, lengths, 16
    with mock.patch.object(launch, "_chosen_config", lambda kind, *a: cfg), \
            returns_of(launch, "_tma_usable") as used:
        _check_kernel_gradients(kern, (B, H, H, Nq, Nk, D), "doc", seed=Nq)
    assert any(used)


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("name,shape", [("dilated_window", (1, 4, 2, 192, 288, 16)),
                                        ("neighborhood_dilated", (2, 2, 2, 128, 128, 32))])
def test_residue_classes_computed_not_gathered(name, shape, tma):
    """Dilation with block-aligned residue classes (each length a multiple of dilation x block): the
    permuted list kernels compute positions from the sorted index and, with tensor descriptors, read each
    class's rows through one strided descriptor. Forward and both backward kernels take that path (the
    dilated window only with its closed form turned off: see test_residue_classes_in_closed_form)."""
    from unittest import mock

    from attnc import launch
    cfg = launch.FwdConfig(32, 32, 4, 1, tma=tma)
    with mock.patch.object(launch, "_chosen_config", lambda kind, *a: cfg), \
            mock.patch.dict("os.environ", {"ATTNC_RESIDUE_RANGES": "0"}), \
            returns_of(launch, "_residue") as residues, returns_of(launch, "_tma_usable") as usable:
        check_gradients(name, shape)
    assert len(residues) >= 3 and all(r > 1 for r in residues)          # forward, dQ, dK/dV (at least)
    assert usable == [tma] * 5          # forward; dQ and dK/dV with FULL_RUNS and without (guarded)


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("source,shape", [
    ("pattern p() { mask causal and dilated(3) and window(50) }", (1, 4, 2, 192, 288, 16)),   # GQA, Nq != Nk
    ("pattern p() { mask dilated(2) and window(40, 9) }", (2, 2, 2, 128, 128, 32)),            # two-sided
    ("pattern p() { mask dilated(2) and (window(20) or q - k >= 90) }", (1, 2, 1, 128, 128, 16)),  # two disjuncts
    ("pattern p() { mask causal and dilated(2) and window(200) }", (1, 2, 2, 192, 128, 16)),   # rows without keys
])
def test_residue_classes_in_closed_form(source, shape, tma):
    """Dilation of a mask that depends on q and k only through q - k (attnc.plan.residue_local_mask): with
    block-aligned classes every kernel walks class-local closed-form ranges; no layout, no tile lists,
    no setup. Against float64 autograd, with and without tensor descriptors."""
    from unittest import mock

    from attnc import launch, layout
    cfg = launch.FwdConfig(32, 32, 4, 1, tma=tma)
    kern = attnc.compile(source)
    with mock.patch.object(launch, "_chosen_config", lambda kind, *a: cfg), \
            returns_of(launch, "residue_ranges") as used, returns_of(layout, "build_layout") as layouts:
        _check_kernel_gradients(kern, shape, None)
    assert used and all(d > 1 for d in used) and not layouts


def test_residue_closed_form_only_where_it_applies():
    """Unaligned lengths, masks that depend on the class (a prefix) and other transforms keep the layout."""
    from attnc.launch import FwdConfig, residue_ranges
    cfg = FwdConfig(32, 32, 4, 1)
    window = attnc.compile("pattern p() { mask causal and dilated(3) and window(50) }")
    assert residue_ranges(window, 192, 192, cfg) == 3
    assert residue_ranges(window, 190, 192, cfg) == 0                        # 190 queries: not 3 x 32 blocks
    assert residue_ranges(window, 192, 192, FwdConfig(128, 32, 4, 1)) == 0   # classes of 64 rows, blocks of 128
    for refused in ("pattern p() { mask dilated(3) and (causal or k < 7) }",
                    "pattern p() { mask neighborhood(13, dilation = 2) }",
                    "pattern p() {\n input keep: bool[batch, heads, N]\n mask kept(keep) and dilated(2)\n}"):
        assert residue_ranges(attnc.compile(refused), 192, 192, cfg) == 0, refused


@pytest.mark.parametrize("name,shape,env,made", [
    # A closed-form plan, GQA, Nq != Nk: forward and dQ K/V, dK/dV Q/dO (with lse2 and delta) all from the host.
    ("causal", (2, 4, 2, 64, 96, 16), {}, [True] * 6),
    # Residue classes (closed form): each class's rows through one strided host descriptor over all heads.
    ("dilated_window", (1, 4, 2, 192, 288, 16), {}, [True] * 6),
    # Residue classes in the permuted list kernels (both guarded FULL_RUNS variants).
    ("dilated_window", (1, 4, 2, 192, 288, 16), {"ATTNC_RESIDUE_RANGES": "0"}, [True] * 10),
    # Kept keys: K, V from copies in sorted order, whose rows per head are the layout's (padded) rows_k.
    ("kept_keys", (2, 2, 2, 64, 64, 16), {"ATTNC_SORTED_KV": "1"}, [True] * 10),
    # Tile lists (documents): the plain list kernels and the permuted ones beside them.
    ("documents", (2, 4, 2, 64, 64, 16), {"ATTNC_SORTED_KV": "1"}, [True] * 20),
    # 67 rows: the last block would run into the next head's rows, so each program makes its own.
    ("causal", (2, 4, 2, 67, 67, 16), {}, [None] * 3),
    ("causal", (2, 4, 2, 64, 96, 16), {"ATTNC_HOST_DESC": "0"}, [None] * 3),
])
def test_host_tensor_descriptors(name, shape, env, made):
    """Tensor descriptors made on the host over every head's rows (launch.host_rows, a kernel argument in
    place of one descriptor per program) give the reference's outputs and gradients wherever they are
    taken: closed-form plans, residue classes, sorted copies, tile lists, GQA; rows that are not a whole
    number of blocks, or ATTNC_HOST_DESC=0, keep the descriptors each program makes. Poisoned allocations:
    a tile that read past a head's rows would take the next head's (or NaN) rows into its sums."""
    from unittest import mock

    from attnc import launch
    cfg = launch.FwdConfig(32, 32, 4, 1, tma=True)
    with mock.patch.object(launch, "_chosen_config", lambda kind, *a: cfg), mock.patch.dict("os.environ", env), \
            returns_of(launch, "host_rows") as descs:
        check_gradients(name, shape)
    if made[0] is None:
        assert descs == made
        return
    # host_rows per pair of tensors: K, V (forward, dQ), Q, dO (dK/dV). List kernels run the backward twice
    # (FULL_RUNS or not); documents launch the plain and the permuted list kernels.
    assert [d is not None for d in descs] == made


def test_host_rows_geometry():
    """What host_rows makes: one matrix of every (batch, head)'s rows, or of each residue class's rows (R
    rows apart, the class in the column offset); None where a head's rows are not a whole number of blocks
    (or classes), where heads are not a head's rows apart (a (B, N, H, D) memory order, an expanded K/V),
    for a head count or row count other than the kernel's, and for unaligned rows."""
    from attnc.launch import host_row_pair, host_rows
    t = torch.empty(2, 3, 128, 16)
    d = host_rows(t, 3, 128, 64)
    assert (list(d.shape), list(d.strides), list(d.block_shape)) == ([768, 16], [16, 1], [64, 16])
    d = host_rows(t, 3, 128, 32, residue=2)
    assert (list(d.shape), list(d.strides), list(d.block_shape)) == ([384, 32], [32, 1], [32, 16])
    assert host_rows(t, 3, 128, 64, residue=4) is None                   # classes of 32 rows, blocks of 64
    assert host_rows(t, 3, 128, 48) is None
    assert host_rows(t.transpose(1, 2).contiguous().transpose(1, 2), 3, 128, 64) is None
    assert host_rows(t[:, :1].expand(2, 3, 128, 16), 3, 128, 64) is None
    assert host_rows(t, 1, 128, 64) is None and host_rows(t, 3, 192, 64) is None
    assert host_rows(torch.empty(2, 3, 128, 5)[..., :4], 3, 128, 64) is None       # rows of 10 bytes
    assert host_rows(t[:1, :1], 1, 128, 64) is not None                  # one head: any strides around it
    assert host_row_pair(True, t, t.transpose(1, 2).contiguous().transpose(1, 2), 3, 128, 64) == (None, None)
    assert host_row_pair(False, t, t, 3, 128, 64) == (None, None)        # a kernel that loads by pointers


def test_row_offsets_are_32_bit_unless_a_head_passes_2_31_elements():
    """The hot loops multiply rows by strides in 32 bits (measured 6-11% faster with pointer loads)
    unless some row offset inside one (batch, head) can reach 2^31 elements."""
    from attnc.launch import wide_rows
    small = torch.empty(2, 16, 32768, 128, device="meta")
    assert not wide_rows(small, small)
    bnhd = torch.empty(1, 70000, 256, 128, device="meta").transpose(1, 2)     # (B, N, H, D) memory order
    assert wide_rows(small, bnhd) and not wide_rows(bnhd[:, :, :60000])


@pytest.mark.parametrize("name", ["causal", "documents", "kept_keys", "dilated_window"])
def test_wide_row_offsets_variant(name):
    """The 64-bit row-offset variant (taken for huge heads) computes the same gradients."""
    from unittest import mock

    from attnc import launch
    with mock.patch.object(launch, "wide_rows", lambda *tensors: True):
        check_gradients(name, SHAPES[0])


@pytest.mark.parametrize("name,shape,runs", [
    ("documents", (2, 4, 2, 128, 128, 16), True),
    ("alternating_docs", (1, 2, 2, 128, 128, 16), False),
])
def test_full_lists_read_as_runs_or_entry_by_entry(name, shape, runs):
    """When each full list is one run of consecutive blocks (documents), the kernels count through the run
    and list nothing else; otherwise (blocks of two documents alternating) they also read the blocks past
    the run entry by entry. Both give the reference."""
    from unittest import mock

    from attnc import device_setup, launch
    with mock.patch.object(launch, "_chosen_config", lambda kind, *a: launch.FwdConfig(32, 32, 4, 1)), \
            returns_of(device_setup, "tile_lists") as built:
        check_gradients(name, shape)
    assert built and all(bool(lists.full_cnt.any()) != runs for lists in built)


def _case_problem(name, shape):
    """A case's source, its kind of runtime inputs, its shape (square where the pattern needs it) and a seed
    that is the same in every process."""
    src, kind = CASES[name]
    B, Hq, Hkv, Nq, Nk, D = shape
    if name in SQUARE_ONLY:
        Nk = Nq
    return src, kind, (B, Hq, Hkv, Nq, Nk, D), zlib.crc32(repr((name, shape)).encode())


def check_gradients(name, shape, device=None):
    src, kind, shape, seed = _case_problem(name, shape)
    _check_kernel_gradients(attnc.compile(src), shape, kind, seed, device=device)


def _check_kernel_gradients(kern, shape, kind, seed=0, device=None):
    """Outputs' gradients (and lse's) of ``kern`` at ``shape`` = (B, Hq, Hkv, Nq, Nk, D), into q, k, v and
    the float runtime inputs, against float64 autograd of the reference, runtime inputs of ``kind`` (see
    _inputs). With ``device`` the kernels run on copies there (differentiable moves: the gradients come
    back to the CPU leaves)."""
    B, Hq, Hkv, Nq, Nk, D = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=g).requires_grad_()
    k = torch.randn(B, Hkv, Nk, D, generator=g).requires_grad_()
    v = torch.randn(B, Hkv, Nk, D, generator=g).requires_grad_()
    inputs = {n: (t.requires_grad_() if t.is_floating_point() else t)
              for n, t in _inputs(kind, B, Hq, max(Nq, Nk), g).items()}
    there = (lambda t: t) if device is None else (lambda t: t.to(device))
    with poisoned_allocations():
        out, lse = kern(there(q), there(k), there(v), return_lse=True, **{n: there(t) for n, t in inputs.items()})
    if device is not None:
        assert out.device.type == torch.device(device).type
        out, lse = out.cpu(), lse.cpu()
    dout = torch.randn(out.shape, generator=g)
    dlse = torch.where(torch.isinf(lse), 0.0, torch.randn(lse.shape, generator=g))
    loss = (out * dout).sum().add((lse * dlse).nan_to_num(0.0, 0.0, 0.0).sum())
    with poisoned_allocations():
        loss.backward()
    floats = [n for n, t in inputs.items() if t.is_floating_point()]      # score inputs: theirs too
    grads = [x.grad for x in (q, k, v)] + [inputs[n].grad for n in floats]
    ref_leaves = [x.detach().double().requires_grad_() for x in [q, k, v] + [inputs[n] for n in floats]]
    ref_inputs = {**inputs, **dict(zip(floats, ref_leaves[3:]))}
    ro, rl = kern.reference(*ref_leaves[:3], return_lse=True, **ref_inputs)
    (ro * dout.double()).sum().add((rl * dlse.double()).nan_to_num(0.0, 0.0, 0.0).sum()).backward()
    for got, leaf, label in zip(grads, ref_leaves, ["q", "k", "v"] + floats):
        assert not torch.isnan(got).any(), f"NaN in d{label}"
        if leaf.grad is None:       # a float input the mask alone reads: no path to the loss, zero gradient
            assert not got.any(), f"d{label} should be zero"
            continue
        err = (got.double() - leaf.grad).norm() / leaf.grad.norm().clamp_min(1e-12)
        assert err < 1e-4, f"d{label} relative error {err:.2e}"


@pytest.mark.parametrize("flag,writes", [(None, True), (0, True), (5, False)])
def test_backward_variants_run_only_on_their_flag_value(flag, writes, monkeypatch):
    """The backward of documents launches four variants of each kernel (plain or permuted rows, FULL_RUNS or
    not), each returning at once unless the device flag (bit 0: nothing moved; bit 1: some row lists full tiles
    past its run) holds its value. The setup's own flag (None) and a forced "rows moved" (0) give the reference
    gradients; a value no variant holds leaves the poisoned dQ, dK, dV unwritten. (The host never learns the
    flag here: attnc.flags.RESOLVE is off.)"""
    from attnc import flags, launch
    monkeypatch.setattr(flags, "RESOLVE", False)
    from attnc.validate import check_inputs
    kern = attnc.compile(CASES["documents"][0])
    B, H, N, D = 2, 2, 96, 16
    g = torch.Generator().manual_seed(8)
    q, k, v, dout = (torch.randn(B, H, N, D, generator=g) for _ in range(4))
    inputs = _inputs("doc", B, H, N, g)
    sizes = check_inputs(kern.ir, inputs, batch=B, heads=H, n_q=N, n_k=N)
    cfg = launch.FwdConfig(32, 32, 4, 1)
    out, lse, layout = launch.launch_forward(kern, q, k, v, scale=D ** -0.5, sizes=sizes, inputs=inputs, config=cfg)
    assert layout.in_place.tolist() == [1]
    if flag is not None:
        layout.in_place.fill_(flag)
    with poisoned_allocations():
        grads = launch.launch_backward(kern, q, k, v, out, lse, dout, None, scale=D ** -0.5, sizes=sizes,
                                       inputs=inputs, config=cfg)
    if not writes:
        assert all(torch.isnan(x).all() for x in grads)
        return
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    (kern.reference(*leaves, **inputs) * dout.double()).sum().backward()
    for got, leaf in zip(grads, leaves):
        assert (got.double() - leaf.grad).norm() / leaf.grad.norm() < 1e-4


@pytest.mark.parametrize("case", ["documents", "alternating_docs"])
def test_a_known_guard_flag_launches_one_variant_per_kernel(case):
    """The backward's guard flag is made once per cached setup; from its third use on, the host knows it
    (attnc.flags) and launches one variant of each kernel instead of four (documents: plain or permuted rows,
    FULL_RUNS or not) or two (tile lists: FULL_RUNS or not), unguarded; same gradients."""
    from attnc import launch
    from attnc.validate import check_inputs
    source, kind = CASES[case]
    kern = attnc.compile(source)
    B, H, N, D = 2, 2, 96, 16
    g = torch.Generator().manual_seed(9)
    q, k, v, dout = (torch.randn(B, H, N, D, generator=g) for _ in range(4))
    inputs = _inputs(kind, B, H, N, g) if kind else {}
    sizes = check_inputs(kern.ir, inputs, batch=B, heads=H, n_q=N, n_k=N)
    cfg = launch.FwdConfig(32, 32, 4, 1)
    out, lse, _ = launch.launch_forward(kern, q, k, v, scale=D ** -0.5, sizes=sizes, inputs=inputs, config=cfg)
    grads, runs = [], []
    real = launch._backward_variants
    for _ in range(3):
        with mock.patch.object(launch, "_backward_variants", lambda *a: runs.append(list(real(*a))) or runs[-1]):
            grads.append(launch.launch_backward(kern, q, k, v, out, lse, dout, None, scale=D ** -0.5, sizes=sizes,
                                                inputs=inputs, config=cfg))
    for guarded in runs[:2]:
        assert len(guarded) == (4 if case == "documents" else 2) and all(r.guard >= 0 for r in guarded)
    assert len(runs[2]) == 1 and runs[2][0].guard == -1
    for later in grads[1:]:
        for a, b in zip(grads[0], later):
            assert torch.equal(a, b)


def test_lists_past_the_memory_bound_take_one_synchronization():
    """Lists as wide as a row would pass UNSYNCED_LIST_BYTES (here 0): the setup then reads the widths on
    the host and the lists are as wide as their longest count; the gradients are the same."""
    from unittest import mock

    from attnc import device_setup
    with mock.patch.object(device_setup, "UNSYNCED_LIST_BYTES", 0), \
            returns_of(device_setup, "tile_lists") as built:
        check_gradients("alternating_docs", (1, 2, 2, 128, 128, 16))
    assert built
    for lists in built:
        assert lists.full_idx.shape[-1] == max(int(lists.full_cnt.max()), 1)
        assert lists.part_idx.shape[-1] == max(int(lists.part_cnt.max()), 1)
