"""The ``attnc`` command line: ``python -m attnc`` in a subprocess, and ``attnc.cli.main`` in-process."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import attnc
from attnc.cli import main

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.attn"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(*args, cwd=None, timeout=120, extra_env=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(extra_env or {}))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, "-m", "attnc", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd or REPO, timeout=timeout)


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------------
# help


def test_help_explains_the_commands():
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    for command in ("check", "compile", "show"):
        assert command in r.stdout
    assert "pattern" in r.stdout.lower()


def test_no_arguments_prints_help():
    r = run_cli()
    assert r.returncode == 0
    assert "check" in r.stdout and "compile" in r.stdout


@pytest.mark.parametrize("command,words", [
    ("check", ["files"]),
    ("compile", ["--emit", "--pattern", "-p", "-o"]),
    ("show", ["-n", "--png", "--pattern", "-p"]),
])
def test_command_help(capsys, command, words):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for word in words:
        assert word in out


def test_unknown_command_fails():
    r = run_cli("frobnicate")
    assert r.returncode != 0
    assert "frobnicate" in r.stderr


# ----------------------------------------------------------------------------------------------
# check


def test_check_every_example_subprocess():
    r = run_cli("check", *EXAMPLE_FILES)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    for path in EXAMPLE_FILES:
        assert str(path) in r.stdout
    # multi.attn holds 8 patterns: each one is reported.
    assert r.stdout.count("multi.attn: pattern") == 8
    assert r.stdout.count(": ok") == len(EXAMPLE_FILES) - 1 + 8


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])
def test_check_each_example(capsys, path):
    code, out, err = cli(capsys, "check", path)
    assert code == 0, err
    assert "ok" in out and err == ""


def test_check_file_with_only_defs(capsys, tmp_path):
    f = tmp_path / "lib.attn"
    f.write_text("def near(w) = abs(q - k) <= w\n")
    code, out, err = cli(capsys, "check", f)
    assert code == 0, err
    assert "ok" in out


SYNTAX_ERROR = "pattern broken() {\n    mask causal\n    mask q +* k\n}\n"


def test_check_syntax_error_subprocess(tmp_path):
    bad = tmp_path / "broken.attn"
    bad.write_text(SYNTAX_ERROR)
    r = run_cli("check", bad)
    assert r.returncode == 1
    assert f"{bad}:3:13" in r.stderr, r.stderr
    assert "mask q +* k" in r.stderr            # the offending line
    assert "^" in r.stderr                      # and a caret under the column
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("source,line,column,word", [
    ("pattern p() {\n    mask q <= kk\n}\n", 2, 15, "kk"),                            # unknown name
    ("pattern p() {\n    mask q + k\n}\n", 2, 10, "bool"),                             # type mismatch
    ("pattern p(w: int = 3) {\n    mask window(w, 1, 2, 3)\n}\n", 2, 10, "argument"),    # arity
    ("pattern p() {\n    mask causal\n", 2, 16, "expected"),                           # unclosed brace
])
def test_check_reports_file_line_column(capsys, tmp_path, source, line, column, word):
    bad = tmp_path / "bad.attn"
    bad.write_text(source)
    code, out, err = cli(capsys, "check", bad)
    assert code == 1
    assert f"{bad}:{line}:" in err, err
    # The column given is where the mistake is (a little latitude: start of the token or of the call).
    import re
    m = re.search(rf"{re.escape(str(bad))}:{line}:(\d+)", err)
    assert m and abs(int(m.group(1)) - column) <= 6, err
    assert word.lower() in err.lower(), err
    assert "Traceback" not in err


def test_check_continues_after_an_error(capsys, tmp_path):
    bad = tmp_path / "bad.attn"
    bad.write_text(SYNTAX_ERROR)
    code, out, err = cli(capsys, "check", bad, EXAMPLES / "causal.attn")
    assert code == 1
    assert "causal_lm: ok" in out
    assert "bad.attn:3:" in err


def test_check_missing_file(capsys, tmp_path):
    code, out, err = cli(capsys, "check", tmp_path / "nope.attn")
    assert code == 1
    assert "nope.attn" in err


# ----------------------------------------------------------------------------------------------
# compile


def test_compile_emit_triton_subprocess():
    r = run_cli("compile", EXAMPLES / "sliding_window.attn", "-p", "window=77")
    assert r.returncode == 0, r.stderr
    assert "@triton.jit" in r.stdout
    assert "sliding_window" in r.stdout and "window=77" in r.stdout
    compile(r.stdout, "generated", "exec")


def test_compile_emit_triton_equals_kernel_source(capsys):
    code, out, err = cli(capsys, "compile", EXAMPLES / "prefix_lm.attn", "--emit", "triton", "-p", "prefix_len=64")
    assert code == 0, err
    kern = attnc.compile(str(EXAMPLES / "prefix_lm.attn"), prefix_len=64)
    assert out.rstrip("\n") == kern.source.rstrip("\n")


def test_compile_emit_backward_and_setup(capsys):
    import attnc
    code, out, err = cli(capsys, "compile", EXAMPLES / "documents.attn", "--emit", "triton-bwd")
    assert code == 0 and out.strip() == attnc.compile(str(EXAMPLES / "documents.attn")).backward_source.strip()
    code, out, err = cli(capsys, "compile", EXAMPLES / "documents.attn", "--emit", "setup")
    assert code == 0 and "def attnc_classify(" in out and "doc[b, q]" in out
    assert out.strip() == attnc.compile(str(EXAMPLES / "documents.attn")).setup_source.strip()
    code, out, err = cli(capsys, "compile", EXAMPLES / "causal.attn", "--emit", "setup")
    assert code == 0 and "no per-call setup" in out
    assert attnc.compile(str(EXAMPLES / "causal.attn")).setup_source is None


def test_compile_emit_ir(capsys):
    code, out, err = cli(capsys, "compile", EXAMPLES / "dilated_window.attn", "--emit", "ir",
                         "-p", "window=300", "-p", "dilation=3")
    assert code == 0, err
    kern = attnc.compile(str(EXAMPLES / "dilated_window.attn"), window=300, dilation=3)
    assert out.rstrip("\n") == kern.ir_text.rstrip("\n")
    assert "dilated_window" in out
    assert "300" in out and "3" in out
    assert "@triton.jit" not in out


def test_compile_emit_plan(capsys):
    code, out, err = cli(capsys, "compile", EXAMPLES / "causal.attn", "--emit", "plan")
    assert code == 0, err
    assert "causal_lm" in out and "mode" in out and "tiles" in out


def test_compile_emit_plan_with_seq_and_runtime_inputs(capsys):
    code, out, err = cli(capsys, "compile", EXAMPLES / "documents.attn", "--emit", "plan", "-n", "1000")
    assert code == 0, err
    assert "n_q=1000" in out and "lists" in out
    assert "doc" in out                          # says the inputs were drawn at random


def test_param_values_of_each_type(capsys):
    code, out, err = cli(capsys, "compile", EXAMPLES / "multi.attn", "--pattern", "dilated_neighborhood",
                         "--emit", "ir", "-p", "kernel=3", "-p", "bias=0.25")
    assert code == 0, err
    code, out_t, err = cli(capsys, "compile", EXAMPLES / "multi.attn", "--pattern", "maybe_causal",
                           "-p", "is_causal=false")
    assert code == 0, err
    assert "is_causal=False" in out_t
    code, out_t, err = cli(capsys, "compile", EXAMPLES / "softcap.attn", "-p", "cap=12.5")
    assert code == 0, err
    assert "cap=12.5" in out_t


def test_compile_output_file(capsys, tmp_path):
    target = tmp_path / "kernel.py"
    code, out, err = cli(capsys, "compile", EXAMPLES / "causal.attn", "-o", target)
    assert code == 0, err
    text = target.read_text()
    assert "@triton.jit" in text and "causal_lm" in text
    assert "@triton.jit" not in out
    ir_target = tmp_path / "out.ir"
    code, out, err = cli(capsys, "compile", EXAMPLES / "causal.attn", "--emit", "ir", "-o", ir_target)
    assert code == 0
    assert ir_target.read_text().strip() == attnc.compile(str(EXAMPLES / "causal.attn")).ir_text.strip()


def test_compile_multi_needs_pattern(capsys):
    code, out, err = cli(capsys, "compile", EXAMPLES / "multi.attn")
    assert code == 1
    assert "pattern" in err.lower()
    assert "Traceback" not in err


@pytest.mark.parametrize("pattern", ["strided", "fixed", "longformer_causal", "chunk_lookback", "circular",
                                     "maybe_causal", "dilated_neighborhood", "self_bonus"])
def test_compile_multi_with_pattern(capsys, pattern):
    code, out, err = cli(capsys, "compile", EXAMPLES / "multi.attn", "--pattern", pattern, "--emit", "ir")
    assert code == 0, err
    assert pattern in out


def test_compile_multi_with_pattern_subprocess():
    r = run_cli("compile", EXAMPLES / "multi.attn", "--pattern", "strided", "-p", "stride=32")
    assert r.returncode == 0, r.stderr
    assert "strided" in r.stdout and "stride=32" in r.stdout and "@triton.jit" in r.stdout


@pytest.mark.parametrize("args,word", [
    (["-p", "window"], "NAME=VALUE"),                    # no '='
    (["-p", "nosuch=3"], "nosuch"),                      # unknown parameter
    (["-p", "window=2.5"], "window"),                    # float for an int parameter
    (["--pattern", "nosuch"], "nosuch"),                 # unknown pattern
])
def test_compile_bad_arguments(capsys, args, word):
    code, out, err = cli(capsys, "compile", EXAMPLES / "sliding_window.attn", *args)
    assert code == 1, (out, err)
    assert word in err
    assert "Traceback" not in err


def test_compile_bad_param_value_subprocess():
    r = run_cli("compile", EXAMPLES / "sliding_window.attn", "-p", "window=abc")
    assert r.returncode != 0
    assert "abc" in r.stderr
    assert "Traceback" not in r.stderr


def test_compile_missing_required_param(capsys, tmp_path):
    f = tmp_path / "needs.attn"
    f.write_text("pattern needs(w: int) {\n    mask window(w)\n}\n")
    code, out, err = cli(capsys, "compile", f)
    assert code == 1
    assert "w" in err
    code, out, err = cli(capsys, "compile", f, "-p", "w=4", "--emit", "ir")
    assert code == 0, err


# ----------------------------------------------------------------------------------------------
# show


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, checking the signature and the chunk's CRC."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16:16 + length]
    (crc,) = struct.unpack(">I", data[16 + length:20 + length])
    assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
    assert data.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", body[:8])


def test_show_prints_a_picture(capsys):
    code, out, err = cli(capsys, "show", EXAMPLES / "sliding_window.attn", "-n", "64", "-p", "window=10")
    assert code == 0, err
    lines = out.splitlines()
    assert "sliding_window" in out and "64" in out
    # At least 64 rows of picture, the diagonal band visible as different characters per row.
    picture = [l for l in lines if len(l.strip()) >= 32]
    assert len(picture) >= 32
    assert len(set(picture[:40])) > 10


def test_show_png(capsys, tmp_path):
    target = tmp_path / "mask.png"
    code, out, err = cli(capsys, "show", EXAMPLES / "causal.attn", "-n", "64", "--png", target)
    assert code == 0, err
    assert target.exists()
    w, h = png_size(target)
    assert w > 0 and h > 0
    assert str(target) in out


def test_show_png_subprocess(tmp_path):
    target = tmp_path / "docs.png"
    r = run_cli("show", EXAMPLES / "documents.attn", "-n", "64", "--png", target)
    assert r.returncode == 0, r.stderr
    assert "doc" in r.stdout                   # runtime inputs were drawn at random, and it says so
    png_size(target)


def test_show_multi_pattern_with_block(capsys):
    code, out, err = cli(capsys, "show", EXAMPLES / "multi.attn", "--pattern", "chunk_lookback", "-n", "64",
                         "--block", "16", "-p", "chunk=8")
    assert code == 0, err
    assert "chunk_lookback" in out


def test_show_bad_file(capsys, tmp_path):
    bad = tmp_path / "bad.attn"
    bad.write_text(SYNTAX_ERROR)
    code, out, err = cli(capsys, "show", bad, "-n", "16")
    assert code == 1
    assert f"{bad}:3:" in err


@pytest.mark.parametrize("seq, words", [(40000, ["up to --seq 32768", "--emit plan --seq 40000"]),
                                        (-4, ["non-negative"])])
def test_show_sizes_it_cannot_draw(capsys, seq, words):
    code, out, err = cli(capsys, "show", EXAMPLES / "causal.attn", "--seq", str(seq))
    assert code == 1 and err.startswith("error: ")
    for w in words:
        assert w in err


# ----------------------------------------------------------------------------------------------
# cache (SPEC section 4: `attnc cache info|list|clear`)


def test_cache_commands(capsys, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(cache))
    attnc.compile(str(EXAMPLES / "causal.attn")).source
    attnc.compile(str(EXAMPLES / "sliding_window.attn"), window=9).source
    code, out, err = cli(capsys, "cache", "info")
    assert code == 0, err
    assert str(cache) in out and "2" in out
    code, out, err = cli(capsys, "cache", "list")
    assert code == 0, err
    assert "causal_lm" in out and "sliding_window" in out
    assert out.count("fwd_") == 2
    code, out, err = cli(capsys, "cache", "clear")
    assert code == 0, err
    assert not list(cache.rglob("*.py"))
    code, out, err = cli(capsys, "cache", "list")
    assert code == 0 and "fwd_" not in out
    # A cleared cache fills again on the next compile.
    attnc.compile(str(EXAMPLES / "causal.attn")).source
    assert len(list(cache.rglob("fwd_*.py"))) == 1


def test_cache_info_subprocess(tmp_path):
    cache = tmp_path / "cache"
    r = run_cli("compile", EXAMPLES / "causal.attn", extra_env={"ATTNC_CACHE_DIR": str(cache)})
    assert r.returncode == 0, r.stderr
    r = run_cli("cache", "info", extra_env={"ATTNC_CACHE_DIR": str(cache)})
    assert r.returncode == 0, r.stderr
    assert str(cache) in r.stdout
