"""The benchmark helpers (attnc/bench.py, benchmarks/bench_all.py) on CPU: arithmetic, masks,
references, the table, and how benchmark patterns map onto the example files. No timing is
asserted; the GPU parts are skipped without CUDA."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from attnc import bench
from attnc.bench import (dense_mask_from_mod, effective_tflops, format_table, mask_density,
                         masked_attention_reference, parse_dtype, relative_error)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _load_bench_all():
    spec = importlib.util.spec_from_file_location("bench_all", ROOT / "benchmarks" / "bench_all.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_all"] = mod          # dataclasses look their module up while being built
    spec.loader.exec_module(mod)
    return mod


ba = _load_bench_all()


# ---- arithmetic ---------------------------------------------------------------------------------

def test_effective_tflops_formula():
    # 4 * B * H * N * N * D * density / seconds / 1e12
    got = effective_tflops(1, 16, 32768, 32768, 128, 0.5, 10.0, fwdbwd=False)
    assert got == pytest.approx(4 * 16 * 32768**2 * 128 * 0.5 / 0.010 / 1e12)
    assert effective_tflops(1, 16, 32768, 32768, 128, 0.5, 10.0, fwdbwd=True) == pytest.approx(3.5 * got)
    want = 4 * 2 * 4 * 100 * 50 * 64 / 1e-3 / 1e12
    assert effective_tflops(2, 4, 100, 50, 64, 1.0, 1.0) == pytest.approx(want)


def test_effective_tflops_reproduces_the_anchor_figures():
    # shared/anchors/h100_n32768_131072.jsonl, causal: density 0.4981, 9.999 ms -> 438.2; 37.479 ms -> 409.2
    assert round(effective_tflops(1, 16, 32768, 32768, 128, 0.4981, 9.999), 1) == 438.2
    assert round(effective_tflops(1, 16, 32768, 32768, 128, 0.4981, 37.479, fwdbwd=True), 1) == 409.2


def test_effective_tflops_unknowns_are_none():
    assert effective_tflops(1, 1, 8, 8, 16, None, 1.0) is None
    assert effective_tflops(1, 1, 8, 8, 16, 0.5, None) is None
    assert effective_tflops(1, 1, 8, 8, 16, 0.5, 0.0) is None


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("float16") is torch.float16
    assert parse_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="bf16"):
        parse_dtype("int8")


def test_relative_error():
    ref = torch.ones(10)
    assert relative_error(ref, ref) == 0.0
    assert relative_error(ref * 1.01, ref) == pytest.approx(0.01)
    assert math.isnan(relative_error(torch.full((10,), float("nan")), ref))


# ---- masks and densities --------------------------------------------------------------------------

def _hash_mod(qb, kb):
    return lambda b, h, q, k: (qb[b, h, q] == kb[b, h, k]) & (q >= k)


def test_mask_density_counts_exactly_in_chunks():
    g = torch.Generator().manual_seed(0)
    B, H, N = 2, 3, 37
    qb, kb = torch.randint(0, 3, (B, H, N), generator=g), torch.randint(0, 3, (B, H, N), generator=g)
    mod = _hash_mod(qb, kb)
    dense = dense_mask_from_mod(mod, B, H, N, N)
    assert dense.shape == (B, H, N, N)
    want = dense.float().mean().item()
    for max_elems in (1, 50, 1000, 1 << 20):     # one row per chunk up to everything at once
        assert mask_density(mod, batch=B, heads=H, n_q=N, n_k=N, device="cpu",
                            max_elems=max_elems) == pytest.approx(want)


def test_mask_density_broadcast_mask_mod():
    # a mask_mod that ignores b and h returns (1, r, Nk); it still counts every head
    causal = lambda b, h, q, k: q >= k  # noqa: E731
    assert mask_density(causal, batch=2, heads=4, n_q=10, n_k=10, device="cpu", max_elems=40) == \
        pytest.approx(55 / 100)
    assert mask_density(causal, batch=1, heads=1, n_q=3, n_k=5, device="cpu") == pytest.approx(6 / 15)


# ---- the reference ----------------------------------------------------------------------------------

def _sdpa_ref(q, k, v, mask):
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                          attn_mask=mask)


@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (4, 1)])
def test_masked_attention_reference_matches_sdpa(hq, hkv):
    g = torch.Generator().manual_seed(1)
    B, Nq, Nk, D = 2, 9, 13, 8
    q = torch.randn(B, hq, Nq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, hkv, Nk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, hkv, Nk, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(B, hq, Nq, Nk, generator=g) < 0.6
    mask[..., 0] = True                                     # no empty rows: SDPA would give NaN
    dout = torch.randn(B, hq, Nq, 5, generator=g, dtype=torch.float64)
    res = masked_attention_reference(q, k, v, mask, dout=dout)
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    want = _sdpa_ref(qr, kr, vr, mask)
    want.backward(dout)
    torch.testing.assert_close(res["out"], want.detach())
    torch.testing.assert_close(res["dq"], qr.grad)
    torch.testing.assert_close(res["dk"], kr.grad)
    torch.testing.assert_close(res["dv"], vr.grad)
    scale = 1 / math.sqrt(D)
    s = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(hq // hkv, 1)) * scale
    torch.testing.assert_close(res["lse"], torch.logsumexp(s.masked_fill(~mask, -math.inf), -1))


def test_masked_attention_reference_empty_rows_are_zero_not_nan():
    B, H, N, D = 1, 2, 6, 4
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(N, N, dtype=torch.bool).tril()[None, None].expand(B, H, N, N).clone()
    mask[:, :, 2] = False                                   # query row 2 sees nothing
    mask[:, :, :, 5] = False
    res = masked_attention_reference(q, k, v, mask, dout=torch.randn(B, H, N, D, dtype=torch.float64))
    for key in ("out", "dq", "dk", "dv"):
        assert torch.isfinite(res[key]).all(), key
    assert (res["out"][:, :, 2] == 0).all()
    assert (res["dq"][:, :, 2] == 0).all()
    assert torch.isinf(res["lse"][:, :, 2]).all() and torch.isfinite(res["lse"][:, :, 3]).all()
    assert (res["dk"][:, :, 5] == 0).all() and (res["dv"][:, :, 5] == 0).all()


def test_masked_attention_reference_low_precision_baseline_runs():
    q, k, v = (torch.randn(1, 2, 8, 16, dtype=torch.bfloat16) for _ in range(3))
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    low = masked_attention_reference(q, k, v, mask, compute_dtype=torch.bfloat16)
    ref = masked_attention_reference(q, k, v, mask)
    assert low["out"].dtype == torch.bfloat16 and ref["out"].dtype == torch.float64
    assert 0 < relative_error(low["out"], ref["out"]) < 3e-2


# ---- the table ----------------------------------------------------------------------------------------

def _row(**kw):
    base = {"pattern": "causal", "N": 32768, "B": 1, "density": 0.4981, "attnc_fwd_tflops": 480.2,
            "flex_fwd_tflops": 438.2, "attnc_vs_flex_fwd": 1.096, "attnc_fwdbwd_tflops": 450.0,
            "flex_fwdbwd_tflops": 409.2, "attnc_vs_flex_fwdbwd": 1.1, "attnc_setup_ms": 0.01,
            "flex_setup_ms": 3.55, "check": "ok"}
    base.update(kw)
    return base


def test_format_table_columns_and_alignment():
    rows = [_row(), _row(pattern="hash8_causal", density=0.0623, attnc_fwd_tflops=None,
                         attnc_vs_flex_fwd=None, check="FAIL out 3.0e-02")]
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["pattern", "N", "B", "density"]
    assert "fwd attnc" in lines[0] and "f+b attnc" in lines[0] and "setup ms a/flex" in lines[0]
    assert set(lines[1]) == {"-"}
    assert "1.10x" in lines[2] and "0.01/3.55" in lines[2] and "480.2" in lines[2]
    assert "-" in lines[3].split() and "FAIL" in lines[3]
    # right-aligned numeric columns: the density column ends at the same offset in every row
    ends = [ln.index(d) + len(d) for ln, d in zip(lines[2:], ("0.4981", "0.0623"))]
    assert ends[0] == ends[1]
    assert "target" not in lines[0] and "cuDNN" not in lines[0]


def test_format_table_optional_columns_and_errors():
    rows = [_row(attnc_vs_cudnn_fwd=0.9, attnc_vs_cudnn_fwdbwd=0.87, target_vs_flex=1.1,
                 vs_own_causal_fwd=1.0, vs_own_causal_fwdbwd=1.0),
            _row(pattern="dilated_w2048_d2", target_vs_flex=2.5, attnc_vs_flex_fwd=3.0,
                 attnc_vs_flex_fwdbwd=2.0),
            {"pattern": "keep50_causal", "N": 8192, "error": "RuntimeError: boom", "target_vs_flex": 2.0}]
    text = format_table(rows)
    assert "x cuDNN f/fb" in text and "0.90/0.87" in text
    assert ">=1.1 MISS" in text.splitlines()[2]          # 1.096 < 1.1 forward
    assert ">=2.5 MISS" in text.splitlines()[3]
    assert text.splitlines()[-1].startswith("keep50_causal  N=8192  ERROR: RuntimeError: boom")
    assert ">=2.5 ok" in format_table([_row(target_vs_flex=2.5, attnc_vs_flex_fwd=2.6,
                                            attnc_vs_flex_fwdbwd=2.5)])


def test_format_table_empty():
    assert format_table([]).splitlines()[0].startswith("pattern")


# ---- bench_all: patterns, example files, inputs ----------------------------------------------------

def test_pattern_headers():
    text = """# pattern fake(x) { in a comment
    def f(a) = a
    pattern one() {
        mask causal
    }
    pattern two(window: int = 3, d,
                cap: float = 1.5) { mask window(window) }
    pattern three { mask true }
    """
    assert ba.pattern_headers(text) == [("one", []), ("two", [("window", True), ("d", False), ("cap", True)]),
                                        ("three", [])]


def test_example_candidates_map_parameter_names(tmp_path):
    (tmp_path / "dilated_window.attn").write_text(
        "pattern a(span: int = 4, step: int = 1) { mask k <= q }\n"
        "pattern b(window: int, other: int) { mask k <= q }\n"      # 'other' has no default: unusable
        "pattern c(dilation: int = 2) { mask k <= q }\n")
    spec = ba.SPEC_BY_NAME["dilated_w2048_d2"]
    cands = ba.example_candidates(spec, spec.params, tmp_path)
    got = [(pn, kw) for _, _, pn, kw in cands]
    assert ("a", {"span": 2048, "step": 2}) in got and ("a", {"span": 2047, "step": 2}) in got
    assert ("c", {"dilation": 2}) in got
    assert all(pn != "b" for pn, _ in got)
    assert ba.example_candidates(spec, spec.params, tmp_path / "missing") == []


def test_anchor_inputs_mirror_the_anchor_script():
    a = ba.anchor_inputs(32768, 1, 16)
    b = ba.anchor_inputs(32768, 1, 16)
    assert all(torch.equal(a[n], b[n]) for n in ("doc", "qb", "kb", "keep"))
    doc = a["doc"]
    assert doc.shape == (32768,) and (doc[1:] >= doc[:-1]).all()
    lens = torch.bincount(doc)
    assert (lens[:-1] >= 512).all() and (lens <= 4096).all()
    assert a["qb"].shape == (1, 16, 32768) and int(a["qb"].max()) == 7
    assert abs(a["keep"].float().mean().item() - 0.5) < 0.01


def test_bench_call_gives_attnc_and_flex_the_same_problem():
    """benchmarks' shared call (sweep_configs, profile_bwd): Flex with its block mask and the kernel's own
    reference with its runtime inputs agree on the pattern's output (CPU, eager Flex, float32)."""
    from torch.nn.attention.flex_attention import flex_attention
    for name in ("document_causal", "hash8_causal"):
        call = ba.bench_call(ba.SPEC_BY_NAME[name], 256, tokens=512, heads=2, dim=16, device="cpu",
                             dtype=torch.float32)
        assert (call.batch, call.heads, call.dim) == (2, 2, 16) and call.q.shape == (2, 2, 256, 16)
        assert all(t.requires_grad for t in (call.q, call.k, call.v)) and not call.dout.requires_grad
        q, k, v = (t.detach() for t in (call.q, call.k, call.v))     # Flex has no CPU backward
        ref = call.kern.reference(q, k, v, **call.inputs)
        flex = flex_attention(q, k, v, block_mask=call.block_mask)
        rows = ref.abs().sum(-1) > 0                # rows with no key: Flex and attnc both give zeros
        assert torch.allclose(flex[rows], ref[rows], atol=1e-4, rtol=1e-4)


def _fake_kern(decls):
    return SimpleNamespace(inputs={n: SimpleNamespace(name=n, dtype=dt, dims=dims)
                                   for n, (dt, dims) in decls.items()})


def test_fit_inputs_by_name_rank_and_dtype():
    canon = ba.anchor_inputs(50, 2, 3, doc_len=(5, 20))
    spec = ba.SPEC_BY_NAME["document_causal"]
    got = ba.fit_inputs(_fake_kern({"segment_ids": ("int", ("batch", "N"))}), spec, canon)
    assert got["segment_ids"].shape == (2, 50) and got["segment_ids"].dtype == torch.int64
    assert torch.equal(got["segment_ids"][1], canon["doc"])
    got = ba.fit_inputs(_fake_kern({"whatever": ("int", ("N",))}), spec, canon, torch.int32)
    assert got["whatever"].shape == (50,) and got["whatever"].dtype == torch.int32
    hspec = ba.SPEC_BY_NAME["hash8_causal"]
    got = ba.fit_inputs(_fake_kern({"q_buckets": ("int", ("batch", "heads", "N")),
                                    "kb": ("int", ("batch", "heads", "N"))}), hspec, canon)
    assert torch.equal(got["q_buckets"], canon["qb"]) and torch.equal(got["kb"], canon["kb"])
    with pytest.raises(LookupError):
        ba.fit_inputs(_fake_kern({"qb": ("int", ("batch", "heads", "N"))}), hspec, canon)
    kspec = ba.SPEC_BY_NAME["keep50_causal"]
    got = ba.fit_inputs(_fake_kern({"keep": ("bool", ("batch", "heads", "N"))}), kspec, canon)
    assert got["keep"].dtype == torch.bool


def test_verify_kernel_with_a_fake_kernel():
    spec = ba.SPEC_BY_NAME["sliding_window_1024"].with_params(window=5)

    def kern_for(width):
        def mask(n_q, n_k, batch=1, heads=1, **inputs):
            q = torch.arange(n_q)[:, None]
            k = torch.arange(n_k)[None, :]
            return ((k <= q) & (q - k <= width)).expand(batch, heads, n_q, n_k)
        return SimpleNamespace(inputs={}, mask=mask)

    assert ba.verify_kernel(kern_for(4), spec, spec.params, "cpu", n=40)[0]
    ok, why = ba.verify_kernel(kern_for(5), spec, spec.params, "cpu", n=40)
    assert not ok and "differs" in why


def test_check_cases_cover_dims_dtypes_lengths_and_gqa():
    cases = ba.check_cases([64, 128, 256], ["fp16", "bf16"], [1000, 4097], 16, 4, full=False)
    assert {(c.d, c.dtype) for c in cases} == {(d, t) for d in (64, 128, 256) for t in ("fp16", "bf16")}
    assert {c.nq for c in cases} == {1000, 4097}
    assert {(c.hq, c.hkv) for c in cases} == {(16, 16), (16, 4)}
    assert any(c.layout == "bnhd" for c in cases)
    assert any(c.nq != c.nk for c in cases)
    full = ba.check_cases([64, 128, 256], ["fp16", "bf16"], [1000, 4097], 16, 4, full=True)
    assert len([c for c in full if c.nq == c.nk]) == 24


def test_add_relative_figures():
    rows = [_row(), _row(pattern="prefix_lm_2048", attnc_fwd_tflops=240.1, attnc_fwdbwd_tflops=450.0),
            _row(pattern="causal", N=8192, attnc_fwd_tflops=None)]
    ba.add_relative_figures(rows)
    assert rows[1]["vs_own_causal_fwd"] == pytest.approx(0.5, abs=1e-3)
    assert rows[1]["vs_own_causal_fwdbwd"] == 1.0
    assert "vs_own_causal_fwd" not in rows[2]


def test_make_random_inputs_from_declarations():
    kern = _fake_kern({"doc": ("int", ("batch", "N")), "keep": ("bool", ("batch", "heads", "N")),
                       "slopes": ("float", ("heads",)), "fixed": ("int", (7,))})
    got = bench.make_random_inputs(kern, seq=33, batch=2, heads=3, device="cpu")
    assert got["doc"].shape == (2, 33) and got["doc"].dtype == torch.int64 and int(got["doc"].max()) < 8
    assert got["keep"].shape == (2, 3, 33) and got["keep"].dtype == torch.bool
    assert got["slopes"].shape == (3,) and got["slopes"].is_floating_point()
    assert got["fixed"].shape == (7,)


# ---- with the real compiler ------------------------------------------------------------------------

SMALL = {"causal": {}, "sliding_window_1024": {"window": 16},
         "dilated_w2048_d2": {"window": 24, "dilation": 3},
         "document_causal": {}, "prefix_lm_2048": {"prefix": 20}, "hash8_causal": {}, "keep50_causal": {}}


@pytest.mark.parametrize("name", list(SMALL))
def test_inline_sources_compile_and_match_their_definitions(name):
    spec = ba.SPEC_BY_NAME[name].with_params(**SMALL[name])
    res = ba.resolve_kernel(spec, spec.params, ROOT / "no-such-dir", "cpu", verify_n=72, log=lambda s: None)
    assert res.source == "inline"


@pytest.mark.parametrize("name", list(SMALL))
def test_example_files_reproduce_the_benchmark_patterns(name):
    """The examples used by the benchmark are the anchor patterns (window bounds included)."""
    if not (EXAMPLES / ba.SPEC_BY_NAME[name].example).is_file():
        pytest.skip("example file not written yet")
    spec = ba.SPEC_BY_NAME[name].with_params(**SMALL[name])
    res = ba.resolve_kernel(spec, spec.params, EXAMPLES, "cpu", verify_n=72, log=lambda s: None)
    assert res.source.startswith("examples/"), res.rejected


def test_bench_pattern_cpu_smoke():
    """The whole bench_pattern path on CPU (attnc's reference path and eager FlexAttention)."""
    spec = ba.SPEC_BY_NAME["keep50_causal"]
    res = ba.resolve_kernel(spec, spec.params, ROOT / "no-such-dir", "cpu", verify_n=40, log=lambda s: None)
    N, B, H = 64, 1, 2
    canon = ba.anchor_inputs(N, B, H)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = bench.bench_pattern(res.kern, seq=N, batch=B, heads=H, dim=16, dtype="fp32",
                                  inputs=ba.fit_inputs(res.kern, spec, canon),
                                  flex_mask_mod=spec.mask(canon, spec.params), flex_mask_bh=(B, H),
                                  device="cpu", warmup=1, rep=1)
    assert row["check"] == "ok", row
    assert row["density"] == pytest.approx(dense_mask_from_mod(spec.mask(canon, spec.params), B, H, N, N)
                                           .float().mean().item(), abs=1e-6)
    assert row["attnc_fwd_ms"] > 0 and row["attnc_fwdbwd_ms"] > 0 and row["flex_fwd_ms"] > 0
    assert row["attnc_vs_flex_fwd"] > 0 and row["sdpa_note"].startswith("skipped")
    json.dumps(row)                                       # the JSONL line must serialize


def test_bench_pattern_records_an_attnc_failure_and_still_times_flex():
    class Broken:
        name, inputs = "broken", {}

        def __call__(self, q, k, v, **kw):
            raise RuntimeError("no kernel today")

    causal = lambda b, h, q, k: q >= k  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = bench.bench_pattern(Broken(), seq=32, batch=1, heads=1, dim=16, dtype="fp32",
                                  flex_mask_mod=causal, device="cpu", warmup=1, rep=1, vs="flex")
    assert row["attnc_error"].startswith("RuntimeError: no kernel today")
    assert row["check"].startswith("attnc ERROR")
    assert row["attnc_fwd_ms"] is None and row["attnc_fwdbwd_ms"] is None
    assert row["flex_fwd_ms"] > 0 and "plan_error" in row
    assert "attnc ERROR" in format_table([row])


def test_bench_all_main_cpu_smoke(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = ba.main(["--device", "cpu", "--seqs", "48", "--tokens", "48", "--heads", "1", "--dim", "16",
                      "--dtype", "fp32", "--patterns", "causal,prefix_lm_2048", "--verify-n", "64",
                      "--warmup", "1", "--rep", "1", "--out", str(tmp_path)])
    assert rc == 0
    summary = json.loads((tmp_path / "bench_summary.json").read_text())
    assert [r["pattern"] for r in summary["rows"]] == ["causal", "prefix_lm_2048"]
    assert len((tmp_path / "bench.jsonl").read_text().splitlines()) == 2


class _FakeNvml:
    """Stands in for pynvml: a card at 1650 MHz drawing 690.5 W, a kernel running 100% of the time."""
    NVML_CLOCK_SM = 0

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetClockInfo(self, handle, clock):
        return 1650

    def nvmlDeviceGetPowerUsage(self, handle):
        return 690500                      # mW

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=100)


def test_clock_sampler_reports_median_min_and_max(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml())
    with bench.ClockSampler(period=0.001) as sampler:
        deadline = time.perf_counter() + 1.0
        while len(sampler.samples) < 3 and time.perf_counter() < deadline:
            time.sleep(0.001)
    summary = sampler.summary()
    assert summary["mhz"] == [1650, 1650, 1650] and summary["watts"] == [690.5, 690.5, 690.5]
    assert summary["util"] == [100, 100, 100] and summary["clock_samples"] >= 3
    sampler.samples = [(1500, 700.0, 100), (1980, 120.0, 0), (1650, 690.0, 100)]
    assert sampler.summary()["mhz"] == [1650, 1500, 1980]
    assert sampler.summary()["watts"] == [690.0, 120.0, 700.0]


def test_clock_sampler_without_nvml_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)        # import fails
    with bench.ClockSampler() as sampler:
        pass
    assert sampler.summary() == {"clock_error": sampler.error} and "NVML unavailable" in sampler.error


def test_time_stats_warms_up_before_do_bench_and_reports_the_card(monkeypatch, tmp_path):
    """Untimed calls, each waited for, come before do_bench's own (a variant picked from the third call on, once
    the device has written its flag, compiles there, not in do_bench's estimate); with clocks, the sampler's figures, the busy share and the host's time per call."""
    log = []

    def fake_do_bench(fn, warmup, rep, quantiles=None, grad_to_none=None):
        log.append("do_bench")
        for _ in range(10):
            fn()
        return [0.5, 0.4, 0.6]
    monkeypatch.setattr(bench, "_do_bench_kwargs",
                        lambda warmup, rep, grads, q: (fake_do_bench, {"warmup": warmup, "rep": rep,
                                                                        "quantiles": list(q)}, "quantiles"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: log.append("sync"))
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml())
    # the allocator's counters before and after the timing: 3 cudaMallocs, 2 cudaFrees, 1 retry in between
    stats = iter([{"num_device_alloc": 5, "num_device_free": 1},
                  {"num_device_alloc": 8, "num_device_free": 3, "num_alloc_retries": 1}])
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda *a: next(stats))
    cache = tmp_path / "triton"
    cache.mkdir()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    st = bench.time_stats(lambda: (log.append("call"), (cache / f"k{len(log)}").mkdir()), clocks=True)
    assert log[:2 * bench.WARM_CALLS + 1] == ["call", "sync"] * bench.WARM_CALLS + ["do_bench"]
    assert (st["median"], st["p20"], st["p80"]) == (0.5, 0.4, 0.6)
    assert st["mhz"][0] == 1650 and st["host"]["calls"] == 10 and st["busy"] > 0
    assert (st["host"]["alloc_retries"], st["host"]["device_allocs"], st["host"]["device_frees"]) == (1, 3, 2)
    assert st["host"]["compiles"] == 10       # a new Triton cache entry per timed call (none in the warm calls)
    assert "mhz" not in bench.time_stats(lambda: None)


def test_bench_all_records_clocks_unless_told_not_to():
    args = ba.parse_args([])
    assert args.clocks and args.warmup == bench.HEAT_MS
    off = ba.parse_args(["--no-clocks"])
    assert not off.clocks and "--no-clocks" in ba._child_command(off, 8192, "causal", Path("rows.jsonl"))
    assert "--no-clocks" not in ba._child_command(args, 8192, "causal", Path("rows.jsonl"))


# ---- GPU ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_time_ms_on_gpu():
    x = torch.randn(1 << 20, device="cuda")
    t = bench.time_ms(lambda: x * 2, warmup=5, rep=20)
    assert isinstance(t, float) and t > 0
    st = bench.time_stats(lambda: x * 2, warmup=5, rep=20)
    assert st["p20"] <= st["median"] <= st["p80"]
    st = bench.time_stats(lambda: x * 2, warmup=5, rep=20, clocks=True)
    assert st["host"]["calls"] > 0 and st["host"]["compiles"] == 0 and st["host"]["device_frees"] == 0
    assert 0 < st["busy"] and ("mhz" in st or "clock_error" in st)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_pattern_on_gpu_small():
    spec = ba.SPEC_BY_NAME["causal"]
    res = ba.resolve_kernel(spec, spec.params, EXAMPLES, "cuda", verify_n=256, log=lambda s: None)
    row = bench.bench_pattern(res.kern, seq=512, batch=2, heads=4, dim=64, dtype="bf16",
                              flex_mask_mod=spec.mask({}, {}), sdpa_causal=True, warmup=5, rep=20)
    assert row["check"] == "ok", row
    assert row["attnc_fwd_tflops"] > 0 and row["flex_fwd_tflops"] > 0
    assert row.get("cudnn_fwd_ms") or row.get("flash_fwd_ms")


# ---- plot_tflops.py -------------------------------------------------------------------------------------

def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_tflops_reads_runs_and_draws(tmp_path):
    pytest.importorskip("matplotlib")
    plot = _load_script("plot_tflops")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    row = dict(pattern="causal", N=8192, check="ok", density=0.5, attnc_fwd_tflops=450.0, flex_fwd_tflops=410.0,
               attnc_fwdbwd_tflops=380.0, flex_fwdbwd_tflops=390.0, cudnn_fwd_tflops=580.0)
    a.write_text("\n".join(json.dumps(r) for r in (
        row, dict(row, N=32768, attnc_fwd_tflops=500.0),
        dict(row, pattern="hash8_causal", check="FAIL out 1e-1"),
        dict(row, pattern="document_causal", check="skipped"))) + "\n")
    b.write_text(json.dumps(dict(row, N=32768, attnc_fwd_tflops=510.0)) + "\n\n")
    rows = plot.load_rows([a, b])
    # failed checks are not drawn; rows timed without a check (--no-check) are
    assert set(rows) == {("causal", 8192), ("causal", 32768), ("document_causal", 8192)}
    assert rows[("causal", 32768)]["attnc_fwd_tflops"] == 510.0        # the later file wins
    out = tmp_path / "fig.png"
    plot.plot(rows, out, title="test")
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"


# ---- kernel_resources.py --------------------------------------------------------------------------------

def test_kernel_resources_compiles_for_hopper_without_a_gpu(tmp_path):
    """Cross-compiles a generated kernel for sm_90 with Triton's own ptxas and reports REG / STACK (in a
    subprocess: the script needs real JIT functions, this session interprets them)."""
    import os
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["ATTNC_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), str(EXAMPLES / "causal.attn"),
                          "fwd,64,64,4,2", "--dim", "64", "--loops"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    if "failed:" in run.stdout:
        pytest.skip(f"this Triton cannot cross-compile for sm_90 here: {run.stdout.strip().splitlines()[-1]}")
    line = [x for x in run.stdout.splitlines() if "attnc_fwd" in x][0]
    regs = int(line.split("REG:")[1].split()[0])
    assert 0 < regs <= 255 and "STACK:" in line
    # --loops: the causal forward has two tile loops (masked, full), each with its matmuls and exp2s.
    loops = [x for x in run.stdout.splitlines() if "attnc_fwd loop" in x]
    assert len(loops) == 2 and all("HGMMA=" in x and "MUFU.EX2=" in x for x in loops), run.stdout
    # Compiled as launched: the unit strides are constants and the other strides carry divisibility by 16,
    # so the pointer loads of K and V vectorize and pipeline as asynchronous copies (LDGSTS). Without the JIT's
    # specialization they were plain loads through registers, with spills (NOTES.md item 48).
    assert all("LDGSTS=" in x and "LDL=" not in x for x in loops), run.stdout


def test_sass_loops_counts_instructions_between_a_backward_branch_and_its_target():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from kernel_resources import sass_loops
    sass = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;                    /* 0x0 */",
        "        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;   /* 0x0 */",
        "        /*0020*/                   MUFU.EX2 R3, R3 ;                          /* 0x0 */",
        "        /*0030*/               @P0 LDL R5, [R1+0x8] ;                         /* 0x0 */",
        "        /*0040*/               @P1 BRA 0x10 ;                                 /* 0x0 */",
        "        /*0050*/                   BRA 0x60 ;                                 /* 0x0 */",
        "        /*0060*/                   EXIT ;                                     /* 0x0 */",
    ])
    (lo, hi, counts), = sass_loops(sass)
    assert (lo, hi) == (0x10, 0x40)
    assert counts["all"] == 4 and counts["HGMMA"] == 1 and counts["MUFU.EX2"] == 1 and counts["LDL"] == 1


def _load_program_cost():
    spec = importlib.util.spec_from_file_location("program_cost", ROOT / "benchmarks" / "program_cost.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _dense_tile_counts(dense: torch.Tensor, block: int) -> tuple[int, int]:
    """(full, partial) block x block tiles of a dense (n, n) mask: full where every pair is visible, partial
    where some are (a ragged last block holds only the pairs that exist)."""
    full = part = 0
    n = dense.shape[0]
    for i in range(0, n, block):
        for j in range(0, n, block):
            t = dense[i:i + block, j:j + block]
            full += bool(t.all())
            part += bool(t.any()) and not bool(t.all())
    return full, part


@pytest.mark.parametrize("n, window", [(256, 64), (256, 100), (300, 64), (300, None), (192, 1000)])
def test_program_cost_counts_the_tiles_and_density_of_the_band(n, window):
    import attnc
    pc = _load_program_cost()
    kern = attnc.compile(pc.SOURCE, window=window) if window else attnc.compile(pc.CAUSAL)
    full, part, density = pc.counts(kern, n, 32, device="cpu")
    w = window or n
    dense = torch.tensor([[0 <= q - k < w for k in range(n)] for q in range(n)])
    assert (full, part) == _dense_tile_counts(dense, 32)
    assert density == pytest.approx(dense.float().mean().item())


@pytest.mark.parametrize("n, nb", [(256, 1), (256, 3), (320, 4)])
def test_program_cost_block_bands_are_full_tiles_only(n, nb):
    import attnc
    pc = _load_program_cost()
    kern = attnc.compile(pc.BLOCKS.format(b=32), nb=nb)
    full, part, density = pc.counts(kern, n, 32, device="cpu")
    dense = torch.tensor([[0 <= q // 32 - k // 32 < nb for k in range(n)] for q in range(n)])
    assert (full, part) == _dense_tile_counts(dense, 32) and part == 0
    assert density == pytest.approx(dense.float().mean().item())


def test_program_cost_fit_recovers_known_costs():
    pc = _load_program_cost()
    a, b, c = 0.05, 0.004, 0.006                    # us per program, full tile, partial tile
    rows = [dict(programs=p, full=f, partial=q, t_ms=(p * a + f * b + q * c) / 1e3)
            for p, f, q in [(100, 400, 20), (100, 900, 50), (100, 2000, 10), (200, 500, 300), (150, 300, 0)]]
    got = pc.fit(rows, "t_ms")
    assert got["us_per_program"] == pytest.approx(a)
    assert got["us_per_full_tile"] == pytest.approx(b)
    assert got["us_per_partial_tile"] == pytest.approx(c)
    assert got["program_in_tiles"] == pytest.approx(a / b)
