"""Autotuning without a GPU: the search space, the tuning file, lookups and the CLI's refusal.

The timing itself needs CUDA (``attnc autotune`` on a GPU); everything around it is tested here with
a fake GPU name standing in for ``torch.cuda.get_device_name``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnc
from attnc import tuning
from attnc.cli import main
from attnc.launch import FwdConfig, backward_config, forward_config, source_key

REPO = Path(__file__).resolve().parent.parent
CAUSAL = REPO / "examples" / "causal.attn"
H200_SMEM = 232448
CUDA = torch.device("cuda")
FAKE_GPU = "Fake GPU 80GB"


@pytest.fixture
def tune_dir(tmp_path, monkeypatch) -> Path:
    """A fresh cache directory, a fake GPU name, and no throttling of the file's stamp checks."""
    d = tmp_path / "cache"
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(d))
    monkeypatch.delenv("ATTNC_TUNING", raising=False)
    monkeypatch.delenv("ATTNC_FWD_CONFIG", raising=False)
    monkeypatch.delenv("ATTNC_BWD_CONFIG", raising=False)
    monkeypatch.setattr(tuning, "device_name", lambda device: FAKE_GPU)
    monkeypatch.setattr(tuning, "STAT_INTERVAL", 0.0)
    tuning.invalidate()
    yield d
    tuning.invalidate()


@pytest.fixture
def kern():
    return attnc.compile(CAUSAL)


def entry(pattern: str, cfg: FwdConfig, *, kind="fwd", gpu=FAKE_GPU, dtype="bf16", head_dim="128",
          bucket=4096) -> tuple[str, dict]:
    key = tuning.entry_key(gpu, pattern, dtype, head_dim, bucket, kind)
    return key, {"gpu": gpu, "pattern_key": pattern, "dtype": dtype, "head_dim": head_dim, "seq_bucket": bucket,
                 "kind": kind, "config": {"block_m": cfg.block_m, "block_n": cfg.block_n,
                                          "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}}


def save(*entries):
    tuning.save_entries(dict(entries))


# ----------------------------------------------------------------------------------------------
# The search space


def test_search_space_axes_and_order():
    space = tuning.search_space("fwd", 64, dtype=torch.bfloat16, smem=H200_SMEM)
    assert len(space) == len(set(space)) > 20
    for c in space:
        assert c.block_m in tuning.BLOCKS and c.block_n in tuning.BLOCKS
        assert c.num_warps in tuning.WARPS and c.num_stages in tuning.STAGES
        assert not (c.num_warps == 8 and c.block_m * c.block_n < 64 * 64)     # idle warps
    assert FwdConfig(64, 32, 8, 2) in tuning.search_space("bwd", 256, smem=H200_SMEM)   # unless D = 256
    areas = [c.block_m * c.block_n for c in space]
    assert areas == sorted(areas, reverse=True)                               # large tiles first


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dim", [16, 32, 64, 128, 256])
def test_every_candidate_fits_the_shared_memory_budget(kind, dtype, dim):
    space = tuning.search_space(kind, dim, dtype=dtype, smem=H200_SMEM)
    assert space, "some configuration must always remain"
    assert FwdConfig(32, 32, 4, 1) in space                                   # the smallest one always fits
    for c in space:
        assert tuning.smem_estimate(kind, c, dim, dim, dtype) <= H200_SMEM
        assert tuning.register_estimate(kind, c, dim, dim) <= tuning.MAX_REGS


def test_head_dim_256_keeps_only_small_configs():
    big = set(tuning.search_space("fwd", 64, dtype=torch.bfloat16, smem=H200_SMEM))
    small = set(tuning.search_space("fwd", 256, dtype=torch.bfloat16, smem=H200_SMEM))
    shape = lambda space: {(c.block_m, c.block_n, c.num_stages) for c in space}  # noqa: E731
    assert shape(small) < shape(big)
    # Configurations the H200 (Triton 3.6) refused for D = 256 ("out of resource: shared memory").
    refused = [FwdConfig(128, 64, 8, 3), FwdConfig(128, 64, 8, 4), FwdConfig(128, 128, 8, 2),
               FwdConfig(64, 128, 8, 2), FwdConfig(64, 64, 8, 4), FwdConfig(32, 128, 8, 3)]
    for c in refused:
        assert c not in small, c
    refused_bwd = [FwdConfig(128, 128, 8, 1), FwdConfig(128, 64, 8, 2), FwdConfig(64, 64, 8, 3),
                   FwdConfig(64, 128, 8, 2), FwdConfig(128, 32, 8, 4), FwdConfig(32, 128, 8, 3)]
    for c in refused_bwd:
        assert c not in tuning.search_space("bwd", 256, dtype=torch.bfloat16, smem=H200_SMEM), c
    assert all(c.num_stages <= 2 for c in small if c.block_m * c.block_n >= 128 * 64)
    bwd = tuning.search_space("bwd", 256, dtype=torch.bfloat16, smem=H200_SMEM)
    assert all(c.block_m * c.block_n <= 128 * 64 for c in bwd)
    assert all(c.num_stages == 1 for c in bwd if c.block_m * c.block_n >= 128 * 64)
    # fp32 doubles every tile: fewer configurations than bf16 at the same head dim.
    assert len(tuning.search_space("fwd", 128, dtype=torch.float32, smem=H200_SMEM)) < \
        len(tuning.search_space("fwd", 128, dtype=torch.bfloat16, smem=H200_SMEM))


def test_smaller_gpu_smaller_space():
    h200 = tuning.search_space("fwd", 128, smem=H200_SMEM)
    small = tuning.search_space("fwd", 128, smem=101376)
    assert set(small) < set(h200)


def test_smem_estimate_matches_what_the_h200_allocated():
    # Measured with Triton 3.6 on an H200 (metadata.shared of the compiled forward kernel, bf16, D = 128).
    measured = {FwdConfig(128, 64, 8, 2): 98304, FwdConfig(128, 64, 8, 3): 131072,
                FwdConfig(128, 128, 8, 3): 229376, FwdConfig(64, 64, 4, 4): 147456}
    for cfg, shared in measured.items():
        assert tuning.smem_estimate("fwd", cfg, 128, 128, torch.bfloat16) >= shared
    # Backward, D = 256: the larger of the dQ and dK/dV kernels' allocations.
    measured = {FwdConfig(32, 32, 4, 1): 69632, FwdConfig(64, 64, 8, 2): 197120, FwdConfig(128, 32, 8, 1): 167936,
                FwdConfig(128, 64, 8, 1): 197632, FwdConfig(64, 32, 4, 2): 131072}
    for cfg, shared in measured.items():
        assert tuning.smem_estimate("bwd", cfg, 256, 256, torch.bfloat16) >= shared


def test_search_space_rejects_unknown_kind():
    with pytest.raises(attnc.AttncError, match="kind"):
        tuning.search_space("sideways", 128, smem=H200_SMEM)


# ----------------------------------------------------------------------------------------------
# Keys


@pytest.mark.parametrize("seq,bucket", [(0, 1), (1, 1), (2, 2), (3, 4), (1000, 1024), (1024, 1024),
                                        (1025, 2048), (32768, 32768), (40000, 65536)])
def test_seq_bucket(seq, bucket):
    assert tuning.seq_bucket(seq) == bucket


def test_key_parts(kern):
    assert tuning.pattern_key(kern) == source_key(kern.ir, "fwd")
    assert tuning.pattern_key("abc") == "abc"
    assert tuning.dtype_name(torch.bfloat16) == "bf16" and tuning.dtype_name("fp16") == "fp16"
    assert tuning.head_dim_text(128) == "128" and tuning.head_dim_text((128, 128)) == "128"
    assert tuning.head_dim_text((128, 64)) == "128x64"
    assert tuning.entry_key("G", "p", torch.float32, 64, 2048, "bwd") == "G|p|fp32|64|2048|bwd"
    with pytest.raises(attnc.AttncError, match="dtype"):
        tuning.parse_dtype("int8")


# ----------------------------------------------------------------------------------------------
# The file


def test_round_trip(tune_dir, kern):
    pk = tuning.pattern_key(kern)
    cfg = FwdConfig(128, 32, 8, 4)
    save(entry(pk, cfg), entry(pk, FwdConfig(64, 64, 4, 2), kind="bwd"))
    path = tune_dir / "tuning.json"
    assert path.is_file()
    data = json.loads(path.read_text())
    assert data["format"] == tuning.TUNING_FORMAT and len(data["entries"]) == 2
    assert tuning.load_entries() == data["entries"]
    assert tuning.lookup("fwd", kern, CUDA, torch.bfloat16, 128, 4096) == cfg
    assert tuning.lookup("bwd", pk, CUDA, torch.bfloat16, (128, 128), 4096) == FwdConfig(64, 64, 4, 2)
    # A second save merges; the same key is replaced.
    save(entry(pk, FwdConfig(64, 32, 4, 3)), entry(pk, cfg, bucket=8192))
    assert len(tuning.load_entries()) == 3
    assert tuning.lookup("fwd", kern, CUDA, torch.bfloat16, 128, 4096) == FwdConfig(64, 32, 4, 3)
    assert tuning.lookup("fwd", kern, CUDA, torch.bfloat16, 128, 8192) == cfg
    assert not [p for p in tune_dir.iterdir() if p.name.endswith(".tmp")]      # no temp file left


def test_file_written_by_another_process_is_reloaded(tune_dir):
    save(entry("p", FwdConfig(64, 64, 4, 2)))
    assert tuning.lookup("fwd", "p", CUDA, torch.bfloat16, 128, 4096) == FwdConfig(64, 64, 4, 2)
    # Rewrite the file behind the module's back (as another process would).
    key, e = entry("p", FwdConfig(128, 64, 8, 3))
    (tune_dir / "tuning.json").write_text(json.dumps({"format": 1, "entries": {key: e}, "padding": "x" * 10}))
    assert tuning.lookup("fwd", "p", CUDA, torch.bfloat16, 128, 4096) == FwdConfig(128, 64, 8, 3)
    (tune_dir / "tuning.json").unlink()
    assert tuning.lookup("fwd", "p", CUDA, torch.bfloat16, 128, 4096) is None


def test_lookups_check_the_file_at_most_every_interval(tune_dir, monkeypatch):
    save(entry("p", FwdConfig(64, 64, 4, 2)))
    assert tuning.lookup("fwd", "p", CUDA, torch.bfloat16, 128, 4096) is not None
    monkeypatch.setattr(tuning, "STAT_INTERVAL", 3600.0)
    calls = []
    real_stat = os.stat
    monkeypatch.setattr(tuning.os, "stat", lambda p, *a, **k: calls.append(p) or real_stat(p, *a, **k))
    for _ in range(100):
        tuning.lookup("fwd", "p", CUDA, torch.bfloat16, 128, 4096)
    assert calls == []


@pytest.mark.parametrize("text", ["", "{", "not json at all", "[1, 2, 3]", '{"entries": [1, 2]}', "\x00\xff\xfe",
                                  '{"entries": {"k": {"gpu": 1}}}'])
def test_corrupt_file_reads_as_empty(tune_dir, text):
    tune_dir.mkdir(parents=True, exist_ok=True)
    (tune_dir / "tuning.json").write_bytes(text.encode("latin-1"))
    assert tuning.load_entries() == {}
    assert tuning.lookup("fwd", "p", CUDA, torch.bfloat16, 128, 4096) is None
    # Saving over a corrupt file replaces it with a valid one.
    save(entry("p", FwdConfig(64, 64, 4, 2)))
    assert tuning.lookup("fwd", "p", CUDA, torch.bfloat16, 128, 4096) == FwdConfig(64, 64, 4, 2)
    json.loads((tune_dir / "tuning.json").read_text())


def test_malformed_entries_are_skipped(tune_dir):
    good_key, good = entry("p", FwdConfig(64, 64, 4, 2))
    bad_cfg = dict(entry("q", FwdConfig(64, 64, 4, 2))[1], config={"block_m": "64", "block_n": 64})
    bad_bucket = dict(entry("r", FwdConfig(64, 64, 4, 2))[1], seq_bucket="4096")
    zero = dict(entry("s", FwdConfig(64, 64, 4, 2))[1])
    zero["config"] = dict(zero["config"], num_warps=0)
    tune_dir.mkdir(parents=True)
    (tune_dir / "tuning.json").write_text(json.dumps(
        {"format": 1, "entries": {good_key: good, "q": bad_cfg, "r": bad_bucket, "s": zero, "t": "text"}}))
    assert list(tuning.load_entries()) == [good_key]
    assert tuning.lookup("fwd", "p", CUDA, torch.bfloat16, 128, 4096) == FwdConfig(64, 64, 4, 2)
    for pattern in "qrst":
        assert tuning.lookup("fwd", pattern, CUDA, torch.bfloat16, 128, 4096) is None


# ----------------------------------------------------------------------------------------------
# Lookups


def test_nothing_tuned_gives_none(tune_dir, kern):
    assert not (tune_dir / "tuning.json").exists()
    for kind in ("fwd", "bwd"):
        assert tuning.lookup(kind, kern, CUDA, torch.bfloat16, 128, 4096) is None
        assert tuning.lookup(kind, kern, CUDA, torch.bfloat16, 128, None) is None


def test_lookup_matches_every_part_of_the_key(tune_dir, kern):
    pk = tuning.pattern_key(kern)
    cfg = FwdConfig(128, 32, 8, 4)
    save(entry(pk, cfg))
    assert tuning.lookup("fwd", kern, CUDA, torch.bfloat16, 128, 4096) == cfg
    assert tuning.lookup("bwd", kern, CUDA, torch.bfloat16, 128, 4096) is None                 # kind
    assert tuning.lookup("fwd", kern, CUDA, torch.float16, 128, 4096) is None                  # dtype
    assert tuning.lookup("fwd", kern, CUDA, torch.bfloat16, 64, 4096) is None                  # head dim
    assert tuning.lookup("fwd", kern, CUDA, torch.bfloat16, (128, 64), 4096) is None           # Dv
    assert tuning.lookup("fwd", "another-pattern", CUDA, torch.bfloat16, 128, 4096) is None    # pattern
    other = attnc.compile("pattern w() { mask causal and window(64) }")
    assert tuning.lookup("fwd", other, CUDA, torch.bfloat16, 128, 4096) is None
    assert tuning.lookup("fwd", kern, torch.device("cpu"), torch.bfloat16, 128, 4096) is None  # device


def test_lookup_other_gpu_gives_none(tune_dir, monkeypatch):
    save(entry("p", FwdConfig(64, 64, 4, 2)))
    monkeypatch.setattr(tuning, "device_name", lambda device: "Another GPU")
    assert tuning.lookup("fwd", "p", CUDA, torch.bfloat16, 128, 4096) is None


def test_lookup_buckets(tune_dir):
    save(entry("p", FwdConfig(64, 64, 4, 2), bucket=4096), entry("p", FwdConfig(128, 64, 8, 3), bucket=32768))
    look = lambda seq: tuning.lookup("fwd", "p", CUDA, torch.bfloat16, 128, seq)  # noqa: E731
    for seq in (2049, 3000, 4096):
        assert look(seq) == FwdConfig(64, 64, 4, 2)                  # bucket 4096
    for seq in (16385, 20000, 32768):
        assert look(seq) == FwdConfig(128, 64, 8, 3)                 # bucket 32768
    assert look(4097) == FwdConfig(64, 64, 4, 2)                     # bucket 8192: nearest is 4096
    assert look(1000) == FwdConfig(64, 64, 4, 2)                     # bucket 1024: 4x from 4096
    assert look(100000) == FwdConfig(128, 64, 8, 3)                  # bucket 131072: 4x from 32768
    assert look(16384) == FwdConfig(128, 64, 8, 3)                   # equally far: the larger bucket
    assert look(500) is None                                         # bucket 512: 8x from 4096
    assert look(300000) is None                                      # 16x from 32768
    assert look(None) == FwdConfig(128, 64, 8, 3)                    # no length: the largest bucket


def test_tuning_can_be_switched_off(tune_dir, monkeypatch):
    save(entry("p", FwdConfig(64, 64, 4, 2)))
    monkeypatch.setenv("ATTNC_TUNING", "0")
    assert tuning.lookup("fwd", "p", CUDA, torch.bfloat16, 128, 4096) is None


# ----------------------------------------------------------------------------------------------
# The launcher's configuration functions


def test_backward_defaults_pipeline_gathered_rows_deeper(tune_dir, kern, monkeypatch):
    """On Hopper the kernel that streams rows gathered through a layout transform's positions (dQ: keys,
    dK/dV: queries) gets 3 stages; descriptor-fed kernels keep 2; tiles never change (the layout is
    built for them); a tuned entry wins regardless."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(attnc.launch, "_major", lambda device: 9)       # (the launcher caches the lookup)
    plain = backward_config(128, 128, CUDA, torch.bfloat16)
    assert plain == FwdConfig(64, 64, 4, 2, tma=True)
    both = backward_config(128, 128, CUDA, torch.bfloat16, gathered=(True, True))
    assert both == FwdConfig(64, 64, 4, 3, tma=True)
    keys = backward_config(128, 128, CUDA, torch.bfloat16, gathered=(True, False))
    assert keys.num_stages == 3 and keys.dkdv_config == FwdConfig(64, 64, 4, 2, tma=True)
    for cfg in (both, keys):
        assert (cfg.block_m, cfg.block_n) == (cfg.dkdv_config.block_m, cfg.dkdv_config.block_n) == (64, 64)
    tuned = FwdConfig(128, 32, 8, 1)
    save(entry(tuning.pattern_key(kern), tuned, kind="bwd"))
    assert backward_config(128, 128, CUDA, torch.bfloat16, key=kern, seq=4096, gathered=(True, True)) == tuned


def test_forward_and_backward_config_honour_tuned_entries(tune_dir, kern, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(attnc.launch, "_major", lambda device: 9)       # (the launcher caches the lookup)
    default_fwd = forward_config(128, 128, CUDA, torch.bfloat16)
    default_bwd = backward_config(128, 128, CUDA, torch.bfloat16)
    assert forward_config(128, 128, CUDA, torch.bfloat16, key=kern, seq=4096) == default_fwd
    tuned_fwd, tuned_bwd = FwdConfig(32, 128, 4, 3), FwdConfig(128, 32, 8, 1)
    assert tuned_fwd != default_fwd and tuned_bwd != default_bwd
    pk = tuning.pattern_key(kern)
    save(entry(pk, tuned_fwd), entry(pk, tuned_bwd, kind="bwd"))
    assert forward_config(128, 128, CUDA, torch.bfloat16, key=kern, seq=4096) == tuned_fwd
    assert forward_config(128, 128, CUDA, torch.bfloat16, sparse=True, key=pk, seq=3000) == tuned_fwd
    assert backward_config(128, 128, CUDA, torch.bfloat16, key=kern, seq=4096) == tuned_bwd
    # Without a key, for other shapes, on the CPU, or switched off: the defaults.
    assert forward_config(128, 128, CUDA, torch.bfloat16) == default_fwd
    assert forward_config(128, 128, CUDA, torch.bfloat16, key=kern, seq=128) == default_fwd
    assert forward_config(64, 64, CUDA, torch.bfloat16, key=kern, seq=4096) != tuned_fwd
    assert forward_config(128, 128, torch.device("cpu"), torch.bfloat16, key=kern, seq=4096) == FwdConfig(32, 32, 4, 1)
    monkeypatch.setenv("ATTNC_TUNING", "off")
    assert backward_config(128, 128, CUDA, torch.bfloat16, key=kern, seq=4096) == default_bwd
    monkeypatch.delenv("ATTNC_TUNING")
    # An explicit sweep override still wins over tuned results.
    monkeypatch.setenv("ATTNC_FWD_CONFIG", "64,32,4,1")
    assert forward_config(128, 128, CUDA, torch.bfloat16, key=kern, seq=4096) == FwdConfig(64, 32, 4, 1)


def test_scores_that_gather_input_tiles_run_one_stage_deep(monkeypatch):
    """A score reading an input at indices over q and k (a relative bias; a table indexed by q and by k)
    gathers a tile per score tile; the default tables run both directions one stage deep for it; a per-head
    or per-row read does not count. A mask's read at (q, k) (a dense mask: partial tiles only) takes two
    stages in the forward (run 101: one stage was slower, three too)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(attnc.launch, "_major", lambda device: 9)
    rel = attnc.compile("pattern r() {\n input t: float[heads, R]\n mask causal\n score score + t[h, q - k + 9]\n}")
    per_row = attnc.compile("pattern w() {\n input t: float[heads, N]\n mask causal\n score score + t[h, q]\n}")
    between = attnc.compile("pattern p() {\n input t: float[heads, P, P]\n mask causal\n"
                            " score score + t[h, q % 64, k % 64]\n}")
    mask_only = attnc.compile("pattern m() {\n input m: bool[batch, N, N]\n mask m[b, q, k] and causal\n}")
    tile_gathers = attnc.codegen.tile_gathers
    assert tile_gathers(rel.ir) == tile_gathers(between.ir) == "score"
    assert tile_gathers(per_row.ir) == "" and tile_gathers(mask_only.ir) == "mask"
    assert forward_config(128, 128, CUDA, torch.bfloat16, gathers="score") == FwdConfig(64, 128, 4, 1, tma=True)
    assert forward_config(128, 128, CUDA, torch.bfloat16, sparse=True, gathers="score").num_stages == 1
    assert backward_config(128, 128, CUDA, torch.bfloat16, gathers="score") == FwdConfig(64, 64, 4, 1)
    assert backward_config(128, 128, CUDA, torch.bfloat16, gathered=(True, True), gathers="score").num_stages == 1
    assert attnc.launch.forward_table(128, 128, torch.bfloat16, 8, False, gathers="score").num_stages == 1
    assert rel.block_sizes(128, device="cuda", n_q=4096) == (64, 128)
    # A dense mask: two stages in the forward, the backward's defaults.
    assert forward_config(128, 128, CUDA, torch.bfloat16, sparse=True, gathers="mask") == FwdConfig(64, 64, 4, 2)
    assert backward_config(128, 128, CUDA, torch.bfloat16, gathers="mask") == backward_config(128, 128, CUDA,
                                                                                            torch.bfloat16)


def test_configs_too_big_for_the_device_shrink_until_one_launches(monkeypatch):
    """Where Triton finds a kernel too big for the device (OutOfResources at its first launch), the launcher
    tries smaller configurations (key block, then stages, then query block), undoing partial work before
    each retry; it warns once and goes straight to what launched on later calls; with nothing left to
    shrink, the error stands."""
    from triton.runtime.errors import OutOfResources
    kern = attnc.compile("pattern c() {\n mask causal\n}")
    q = type("Q", (), {"device": CUDA, "shape": (1, 1, 1, 64), "dtype": torch.bfloat16})()
    tried, resets = [], []

    def run(cfg, shrunk):
        tried.append((cfg, shrunk))
        if cfg.block_n > 32 or cfg.num_stages > 2:
            raise OutOfResources(300000, 232448, "shared memory")
        return "ran"

    monkeypatch.setattr(attnc.launch, "_FITTED", {})
    start = FwdConfig(128, 128, 8, 3, tma=True)
    with pytest.warns(UserWarning, match=r"128x128 w8 s3 tma needs 300000 bytes of shared memory.*128x32 w8 s2"):
        assert attnc.launch.within_resources("forward", kern, q, q, start, run, reset=lambda: resets.append(1)) == "ran"
    assert [c for c, _ in tried] == [start, FwdConfig(128, 64, 8, 3, True), FwdConfig(128, 32, 8, 3, True),
                                     FwdConfig(128, 32, 8, 2, True)]
    assert [s for _, s in tried] == [False, True, True, True] and len(resets) == 3
    tried.clear()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert attnc.launch.within_resources("forward", kern, q, q, start, run) == "ran"
    assert tried == [(FwdConfig(128, 32, 8, 2, True), True)]
    never = lambda cfg, shrunk: (_ for _ in ()).throw(OutOfResources(1, 0, "shared memory"))  # noqa: E731
    with pytest.raises(OutOfResources):
        attnc.launch.within_resources("backward", kern, q, q, FwdConfig(32, 32, 4, 1), never)
    # A configuration the caller named (autotune, sweeps) is run as named or fails.
    tried.clear()
    with pytest.raises(OutOfResources):
        attnc.launch.within_resources("forward", kern, q, q, FwdConfig(64, 64, 4, 1), run, shrink=False)
    assert tried == [(FwdConfig(64, 64, 4, 1), False)]
    # Both backward kernels shrink together.
    both = attnc.launch._smaller(FwdConfig(64, 64, 4, 2, True, FwdConfig(128, 64, 8, 2)))
    assert both == FwdConfig(64, 32, 4, 2, True, FwdConfig(128, 32, 8, 2))


def test_launch_forward_passes_the_kernel_and_length(tune_dir, kern, monkeypatch):
    """The launcher asks forward_config with key=kern and seq=max(Nq, Nk) (interpreted kernel on the CPU)."""
    import attnc.launch as launch
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs the Triton interpreter on the CPU")
    seen = []
    real = launch.forward_config

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(launch, "forward_config", spy)
    q = torch.randn(1, 1, 40, 16)
    k = torch.randn(1, 1, 24, 16)
    out = kern(q, k, k)
    assert out.shape == (1, 1, 40, 16)
    # The torch op may run an equal Kernel registered earlier: the pattern key is what counts.
    assert seen and seen[-1].get("seq") == 40
    assert tuning.pattern_key(seen[-1]["key"]) == tuning.pattern_key(kern)


# ----------------------------------------------------------------------------------------------
# Progress, reports, refusals without CUDA


def test_plain_progress_bar(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)          # as if tqdm were not installed
    bar = tuning._Progress(40, "fwd", True)
    for _ in range(12):
        bar.step("128x64 w8 s3 2.51 ms")
    bar.close()
    err = capsys.readouterr().err
    assert "[######..............] 12/40 fwd 128x64 w8 s3 2.51 ms" in err
    quiet = tuning._Progress(3, "bwd", False)
    quiet.step("x")
    quiet.close()
    assert capsys.readouterr().err == ""


def test_report_text():
    r = tuning.KindResult(kind="fwd", default=FwdConfig(128, 64, 8, 3), best=FwdConfig(128, 128, 8, 2),
                          best_ms=1.0, default_ms=1.5, checked="default config",
                          timings=[(FwdConfig(128, 64, 8, 3), 1.5, ""), (FwdConfig(128, 128, 8, 2), 1.0, ""),
                                   (FwdConfig(128, 128, 8, 4), None, "OutOfResources")],
                          notes=["128x128 w8 s4 skipped (OutOfResources: shared memory)"])
    rep = tuning.TuneReport(pattern="<attnc.Kernel causal_lm()>", seq=8192, batch=4, heads=16, dim=128,
                            dtype="bf16", gpu=FAKE_GPU, results={"fwd": r}, path=Path("/x/tuning.json"))
    text = str(rep)
    assert "2/3 configs ran" in text and "best 128x128 w8 s2 1.000 ms" in text and "1.50x" in text
    assert "skipped" in text and "saved to /x/tuning.json" in text
    assert rep["fwd"].speedup == pytest.approx(1.5)


def test_uses_size_and_slicing():
    plain = attnc.compile(CAUSAL)
    assert not tuning._uses_size(plain.ir, "batch")
    sized = attnc.compile("pattern p() { mask k < n_k - heads }")
    assert tuning._uses_size(sized.ir, "heads") and not tuning._uses_size(sized.ir, "batch")
    q = torch.randn(2, 3, 8, 16)
    assert tuning._slice_problem(sized, q, q, q, {}) is None
    docs = attnc.compile("pattern d() { input doc: int[batch, N]\n mask same(doc) and causal }")
    qs, ks, vs, inputs = tuning._slice_problem(docs, q, q, q, {"doc": torch.zeros(2, 8, dtype=torch.long)})
    assert qs.shape == (1, 1, 8, 16) and inputs["doc"].shape == (1, 8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_autotune_without_cuda_raises(kern):
    with pytest.raises(attnc.InputError, match="CUDA"):
        tuning.autotune(kern, 1024)
    with pytest.raises(attnc.InputError, match="CUDA"):
        kern.autotune(1024)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_autotune_without_cuda_exits_1(capsys):
    code = main(["autotune", str(CAUSAL), "--seq", "1024"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "error:" in err and "CUDA" in err and "autotune" in err
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_autotune_without_cuda_subprocess(tmp_path):
    env = dict(os.environ, ATTNC_CACHE_DIR=str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    r = subprocess.run([sys.executable, "-m", "attnc", "autotune", str(CAUSAL), "--seq", "2048", "--kinds", "fwd"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert r.returncode == 1
    assert "CUDA" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "tuning.json").exists()


def test_cli_autotune_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["autotune", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for word in ("--seq", "--batch", "--heads", "--dim", "--dtype", "--kinds", "--max-configs", "-p", "--pattern",
                 "tuning.json"):
        assert word in out
    top = subprocess.run([sys.executable, "-m", "attnc", "--help"], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert "autotune" in top.stdout


def test_hopper_search_space_has_tma_and_split_backward_variants():
    fwd = tuning.search_space("fwd", 128, smem=H200_SMEM, hopper=True)
    assert FwdConfig(128, 128, 8, 3, tma=True) in fwd and FwdConfig(128, 128, 8, 3) in fwd
    bwd = tuning.search_space("bwd", 128, smem=H200_SMEM, hopper=True)
    split = FwdConfig(128, 64, 8, 2, dkdv=FwdConfig(64, 128, 8, 2))
    assert split in bwd and FwdConfig(64, 64, 4, 2, tma=True) in bwd
    assert FwdConfig(128, 64, 8, 2, tma=True, dkdv=FwdConfig(64, 128, 8, 2, tma=True)) in bwd
    assert all(c.tma is False and c.dkdv is None for c in tuning.search_space("fwd", 128, smem=H200_SMEM,
                                                                               hopper=False))


def test_tma_and_split_configs_round_trip_through_json():
    for cfg in (FwdConfig(128, 128, 8, 3, tma=True), FwdConfig(128, 64, 8, 3, dkdv=FwdConfig(64, 128, 8, 3)),
                FwdConfig(64, 64, 4, 2), FwdConfig(128, 128, 4, 2, tma=True, ws=True)):
        obj = tuning.config_obj(cfg)
        assert tuning._config_from(json.loads(json.dumps(obj))) == cfg
    assert "tma" in tuning.config_text(FwdConfig(128, 128, 8, 3, tma=True))
    assert tuning.config_text(FwdConfig(128, 128, 4, 2, tma=True, ws=True)).endswith("tma ws")
    assert tuning._config_from({"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2, "ws": 1}) is None
    assert "dK,dV 64x128" in tuning.config_text(FwdConfig(128, 64, 8, 3, dkdv=FwdConfig(64, 128, 8, 3)))
    assert tuning._config_from({"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2, "tma": "yes"}) is None
    nested = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2,
              "dkdv": {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2, "dkdv": {}}}
    assert tuning._config_from(nested) is None


def test_hopper_forward_table_loads_narrow_tiles_by_pointers():
    """The Hopper forward defaults (RESULTS runs 6, 10 and 43): wide plans on 128 x 128 tiles with tensor
    descriptors; narrow bands, lists and permuted plans on 64 x 64 tiles with pointer loads (3-8% faster
    there since rows are 32-bit offsets); D = 256 on 128 x 64 with descriptors."""
    from attnc.launch import forward_table
    assert forward_table(128, 128, torch.bfloat16, 9, sparse=False) == FwdConfig(128, 128, 8, 3, tma=True)
    assert forward_table(128, 128, torch.bfloat16, 9, sparse=True) == FwdConfig(64, 64, 4, 3)
    assert forward_table(64, 64, torch.float16, 9, sparse=True) == FwdConfig(64, 64, 4, 3)
    assert forward_table(256, 256, torch.bfloat16, 9, sparse=True) == FwdConfig(128, 64, 8, 2, tma=True)
    # Narrow K/V rows the host's descriptors can serve (whole blocks, in order or residue classes): descriptors.
    assert forward_table(128, 128, torch.bfloat16, 9, sparse=True, host_rows=True) == FwdConfig(64, 64, 4, 3, tma=True)
    # Given as a function, it is asked only where the narrow tiles are chosen.
    assert forward_table(128, 128, torch.bfloat16, 9, sparse=False, host_rows=lambda: 1 / 0).block_m == 128
    assert forward_table(128, 128, torch.bfloat16, 9, sparse=True, host_rows=lambda: True).tma


@pytest.mark.parametrize("source,n,layout,want", [
    ("pattern p() { mask causal and window(1024) }", 8192, None, True),
    ("pattern p() { mask causal and window(1024) }", 8191, None, False),            # a ragged last block
    ("pattern p() { mask causal and window(1024) }", 8192, "transposed", False),    # (B, N, H, D) memory
    ("pattern p() { mask causal and window(2047) and dilated(2) }", 8192, None, True),   # residue classes
    ("pattern p() { mask causal and window(2047) and dilated(2) }", 8000, None, False),  # classes not blocks
    ("pattern p() {\n input doc: int[batch, N]\n mask same(doc) and causal\n}", 8192, None, False),  # lists
])
def test_narrow_forward_streams_host_rows(source, n, layout, want):
    """Which narrow forwards take host descriptors by default: closed-form plans (bands, residue classes in
    closed form) whose K and V rows are whole 64-row blocks in one strided matrix; tile lists never."""
    from attnc.launch import _streams_host_rows
    kern = attnc.compile(source)
    k = torch.empty(2, 4, n, 128, device="meta", dtype=torch.bfloat16)
    if layout == "transposed":
        k = torch.empty(2, n, 4, 128, device="meta", dtype=torch.bfloat16).transpose(1, 2)
    assert _streams_host_rows(kern, k, k, n) is want


def test_program_order_round_trips_and_is_validated():
    """A tuned program order (``head_group``) is stored with its tiles and shown in the report; a value that is
    not a whole number >= 0, or one on the dK/dV sub-configuration, makes the entry unreadable."""
    cfg = FwdConfig(64, 64, 4, 2, tma=True, head_group=2)
    assert tuning._config_from(json.loads(json.dumps(tuning.config_obj(cfg)))) == cfg
    assert tuning.config_text(cfg).endswith("order 2")
    assert "head_group" not in tuning.config_obj(FwdConfig(64, 64, 4, 2))
    base = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2}
    for bad in (-1, True, "2", 1.5):
        assert tuning._config_from(dict(base, head_group=bad)) is None
    assert tuning._config_from(dict(base, dkdv=dict(base, head_group=1))) is None
    assert tuning._config_from(dict(base, head_group=0)) == FwdConfig(64, 64, 4, 2, head_group=0)


def test_program_orders_are_timed_on_the_fastest_tiles():
    """After the tile search, autotune times the fastest configuration once per program order (ORDERS)."""
    result = tuning.KindResult(kind="fwd", default=FwdConfig(64, 64, 4, 2))
    assert tuning._order_candidates(result) == []
    result.timings = [(FwdConfig(64, 64, 4, 2), 2.0, ""), (FwdConfig(128, 128, 8, 3, tma=True), 1.5, ""),
                      (FwdConfig(128, 64, 8, 3), None, "out of resources")]
    orders = tuning._order_candidates(result)
    assert orders == [FwdConfig(128, 128, 8, 3, tma=True, head_group=g) for g in tuning.ORDERS]
    assert {0, 1} <= set(tuning.ORDERS)          # the two orders the defaults use


def test_launches_take_a_configuration_s_program_order(kern):
    """A configuration's head_group is the HEAD_GROUP of every launch it makes (forward, dQ, dK/dV), in place of
    the default rule; ATTNC_HEAD_GROUP still overrides it."""
    from unittest import mock

    from attnc import launch
    seen = []
    real = launch.launch_kernel

    def spy(fn, grid, *args, **kwargs):
        seen.append(kwargs["HEAD_GROUP"])
        return real(fn, grid, *args, **kwargs)

    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, 3, 40, 16, generator=g) for _ in range(4))
    sizes = {}
    for env, want in (("", 3), ("2", 2)):
        seen.clear()
        cfg = FwdConfig(32, 32, 4, 1, head_group=3)
        with mock.patch.dict(os.environ, {"ATTNC_HEAD_GROUP": env}), mock.patch.object(launch, "launch_kernel", spy):
            out, lse, _ = launch.launch_forward(kern, q, k, v, scale=0.25, sizes=sizes, inputs={}, config=cfg)
            launch.launch_backward(kern, q, k, v, out, lse, dout, None, scale=0.25, sizes=sizes, inputs={},
                                   config=cfg)
        assert seen == [want] * 3
    want = kern.reference(q, k, v, scale=0.25)
    assert (out - want).abs().max() < 1e-4


def test_candidates_are_timed_after_waited_warm_calls(monkeypatch):
    """Each candidate runs its variant-compiling calls (attnc.flags picks from the third on) before do_bench, each
    waited for; a candidate that fails is reported and skipped, not fatal."""
    log = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: log.append("sync"))
    monkeypatch.setattr(tuning, "_bench_ms", lambda fn: (log.append("bench"), fn(), 1.5)[-1])

    def run(cfg):
        if cfg.block_m == 32:
            raise RuntimeError("out of resources: shared memory")
        log.append(("run", cfg.block_m))
    good, bad = FwdConfig(64, 64, 4, 2), FwdConfig(32, 32, 4, 1)
    result = tuning.KindResult("fwd", default=good)
    tuning._time_candidates(run, [good, bad], tuning._Progress(2, "fwd", False), "fwd", result)
    from attnc.bench import WARM_CALLS
    assert log[:2 * WARM_CALLS + 2] == [("run", 64), "sync"] * WARM_CALLS + ["bench", ("run", 64)]
    assert result.timings[0] == (good, 1.5, "")
    assert result.timings[1][1] is None and "shared memory" in result.timings[1][2]
