"""The on-disk cache of generated kernel sources (attnc.launch): keys, integrity, concurrency, content.

Each test gets its own ``$ATTNC_CACHE_DIR`` so files from other tests never interfere.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import re
import sys
import time
from pathlib import Path

import pytest

import attnc
from attnc import launch
from attnc.codegen import render_forward

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
REPO = EXAMPLES.parent


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(d))
    return d


def kernel_files(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "kernels").glob("*.py") if not p.name.startswith(".tmp"))


def checksum_ok(path: Path) -> bool:
    header, body = path.read_text().split("\n", 1)
    return header == f"# attnc-checksum: {hashlib.sha256(body.encode()).hexdigest()}"


class CountingRender:
    """render_forward that counts its calls, to see whether the cache rendered or reused."""

    def __init__(self):
        self.calls = 0

    def __call__(self, pir):
        self.calls += 1
        return render_forward(pir)


def test_cache_dir_honours_the_environment(cache):
    assert launch.cache_dir() == cache


def test_same_pattern_same_file(cache):
    kern = attnc.compile(str(EXAMPLES / "sliding_window.attn"), window=64)
    src = kern.source
    files = kernel_files(cache)
    assert len(files) == 1
    assert files[0].name.startswith("fwd_")
    assert checksum_ok(files[0])
    assert files[0].read_text().split("\n", 1)[1] == src
    # Compiling again (a new Kernel, even from source text) hits the same file, without rendering.
    again = attnc.compile((EXAMPLES / "sliding_window.attn").read_text(), window=64)
    render = CountingRender()
    body, path = launch.cached_source(again.ir, "fwd", render)
    assert render.calls == 0
    assert path == files[0]
    assert body == src
    assert kernel_files(cache) == files


def test_different_params_different_key(cache):
    a = attnc.compile(str(EXAMPLES / "sliding_window.attn"), window=64)
    b = attnc.compile(str(EXAMPLES / "sliding_window.attn"), window=65)
    c = attnc.compile(str(EXAMPLES / "sliding_window.attn"), window=64)
    assert launch.source_key(a.ir, "fwd") != launch.source_key(b.ir, "fwd")
    assert launch.source_key(a.ir, "fwd") == launch.source_key(c.ir, "fwd")
    assert launch.source_key(a.ir, "fwd") != launch.source_key(a.ir, "bwd")
    a.source, b.source
    assert len(kernel_files(cache)) == 2
    assert "window=64" in a.source and "window=65" in b.source


def test_float_and_bool_params_are_part_of_the_key(cache):
    k1 = attnc.compile(str(EXAMPLES / "softcap.attn"), cap=30.0)
    k2 = attnc.compile(str(EXAMPLES / "softcap.attn"), cap=20.0)
    m1 = attnc.compile(str(EXAMPLES / "multi.attn"), pattern="maybe_causal", is_causal=True)
    m2 = attnc.compile(str(EXAMPLES / "multi.attn"), pattern="maybe_causal", is_causal=False)
    keys = {launch.source_key(k.ir, "fwd") for k in (k1, k2, m1, m2)}
    assert len(keys) == 4


def test_different_patterns_different_files(cache):
    names = ["causal.attn", "prefix_lm.attn", "documents.attn", "alibi.attn"]
    for name in names:
        attnc.compile(str(EXAMPLES / name)).source
    assert len(kernel_files(cache)) == len(names)


@pytest.mark.parametrize("damage", ["flip-byte", "truncate", "empty", "bad-header", "garbage"])
def test_corrupt_entry_is_regenerated(cache, damage):
    kern = attnc.compile(str(EXAMPLES / "prefix_lm.attn"), prefix_len=100)
    good = kern.source
    (path,) = kernel_files(cache)
    original = path.read_bytes()
    if damage == "flip-byte":
        data = bytearray(original)
        i = original.index(b"@triton.jit") + 3          # inside the body, past the checksum line
        data[i] = ord("X") if data[i] != ord("X") else ord("Y")
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(original[: len(original) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "bad-header":
        path.write_bytes(b"# attnc-checksum: 0000\n" + original.split(b"\n", 1)[1])
    else:
        path.write_bytes(bytes(range(256)) * 4)
    render = CountingRender()
    body, again = launch.cached_source(kern.ir, "fwd", render)
    assert render.calls == 1, "a damaged entry must be rendered again, never trusted"
    assert again == path
    assert body == good
    assert path.read_bytes() == original
    assert checksum_ok(path)
    # And now it is a hit again.
    render2 = CountingRender()
    launch.cached_source(kern.ir, "fwd", render2)
    assert render2.calls == 0


def test_corrupt_entry_is_regenerated_through_the_kernel_api(cache):
    kern = attnc.compile(str(EXAMPLES / "causal.attn"))
    good = kern.source
    (path,) = kernel_files(cache)
    path.write_text(path.read_text().replace("@triton.jit", "@triton.jot", 1))
    fresh = attnc.compile(str(EXAMPLES / "causal.attn"))
    assert fresh.source == good
    assert checksum_ok(path)


def test_no_temporary_files_left(cache):
    for w in (8, 16, 32):
        attnc.compile(str(EXAMPLES / "sliding_window.attn"), window=w).source
    leftovers = [p.name for p in (cache / "kernels").iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []


def test_cache_is_created_on_demand(tmp_path, monkeypatch):
    deep = tmp_path / "a" / "b" / "c"
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(deep))
    attnc.compile(str(EXAMPLES / "causal.attn")).source
    assert kernel_files(deep)


# ----------------------------------------------------------------------------------------------
# Several processes compiling into one cache at once.

CONCURRENT_JOBS = [
    ("causal.attn", None, {}),
    ("sliding_window.attn", None, {"window": 128}),
    ("documents.attn", None, {}),
    ("multi.attn", "self_bonus", {"window": 16}),
    ("neighborhood2d.attn", None, {"height": 8, "width": 8, "kh": 3, "kw": 3}),
]


def _compile_worker(args):
    """Runs in a fresh (spawned) process: compile every job once the start time comes."""
    cache_dir, start_at, worker = args
    os.environ["ATTNC_CACHE_DIR"] = cache_dir
    if REPO.as_posix() not in sys.path:
        sys.path.insert(0, REPO.as_posix())
    import attnc as attnc_mod
    from attnc import launch as launch_mod
    from attnc.codegen import render_forward as render

    while time.time() < start_at:
        time.sleep(0.005)
    results = []
    jobs = CONCURRENT_JOBS if worker % 2 == 0 else CONCURRENT_JOBS[::-1]
    for rounds in range(3):
        for file, pattern, params in jobs:
            kw = dict(params)
            if pattern:
                kw["pattern"] = pattern
            kern = attnc_mod.compile(str(EXAMPLES / file), **kw)
            body, path = launch_mod.cached_source(kern.ir, "fwd", render)
            results.append((file, pattern, str(path), hashlib.sha256(body.encode()).hexdigest(),
                            kern.source == body))
    return results


def test_concurrent_compiles_from_several_processes(cache):
    cache.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    n_procs = 4
    with ctx.Pool(n_procs) as pool:
        # Start together, after every interpreter has imported torch (a generous margin).
        start_at = time.time() + 8.0
        results = pool.map(_compile_worker, [(str(cache), start_at, i) for i in range(n_procs)])
    assert len(results) == n_procs
    by_job: dict = {}
    for worker_results in results:
        assert len(worker_results) == 3 * len(CONCURRENT_JOBS)
        for file, pattern, path, digest, same_as_source in worker_results:
            assert same_as_source
            by_job.setdefault((file, pattern), set()).add((path, digest))
    for job, seen in by_job.items():
        assert len(seen) == 1, f"{job}: workers disagree: {seen}"
    files = kernel_files(cache)
    assert len(files) == len(CONCURRENT_JOBS)
    assert all(checksum_ok(p) for p in files)
    assert not [p for p in (cache / "kernels").iterdir() if p.name.startswith(".tmp")]
    # The files are what this process renders too.
    for file, pattern, params in CONCURRENT_JOBS:
        kw = dict(params, **({"pattern": pattern} if pattern else {}))
        kern = attnc.compile(str(EXAMPLES / file), **kw)
        (path, digest), = by_job[(file, pattern)]
        assert hashlib.sha256(render_forward(kern.ir).encode()).hexdigest() == digest


# ----------------------------------------------------------------------------------------------
# What the generated source says about itself.


def test_source_documents_the_pattern(cache):
    path = EXAMPLES / "sliding_window.attn"
    kern = attnc.compile(str(path), window=77)
    src = kern.source
    assert "sliding_window" in src
    assert "window=77" in src
    assert "@triton.jit" in src
    # A comment names the file and line of the mask statement, with its text.
    lines = path.read_text().splitlines()
    line_no = next(i + 1 for i, line in enumerate(lines) if line.strip().startswith("mask "))
    assert re.search(rf"#.*{re.escape(path.name)}:{line_no}\b", src), src[:800]
    assert any(l.lstrip().startswith("#") and lines[line_no - 1].strip() in l for l in src.splitlines())
    compile(src, "generated", "exec")         # valid Python


def test_source_names_every_mask_line_and_the_score(cache):
    src_text = ("pattern two_masks(w: int = 9) {\n"
                "    let d = q - k\n"
                "    mask d >= 0\n"
                "    mask d <= w\n"
                "    score score - 0.1 * d\n"
                "}\n")
    kern = attnc.compile(src_text)
    src = kern.source
    assert "two_masks" in src and "@triton.jit" in src
    comments = [l for l in src.splitlines() if l.lstrip().startswith("#")]
    assert any(":3" in l and "mask d >= 0" in l for l in comments), "\n".join(comments[:20])
    assert any(":4" in l and "mask d <= w" in l for l in comments)
    assert any(":5" in l and "score score - 0.1 * d" in l for l in comments)


def test_source_of_imported_definitions(cache):
    kern = attnc.compile(str(EXAMPLES / "multi.attn"), pattern="longformer_causal")
    src = kern.source
    assert "longformer_causal" in src and "@triton.jit" in src
    assert "multi.attn:" in src
