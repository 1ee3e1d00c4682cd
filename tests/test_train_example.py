"""examples/train_gpt.py: the attnc-attention GPT trains exactly like the same GPT on SDPA.

The script runs as a user runs it, in a subprocess: its toy preset on CPU, where it sets
TRITON_INTERPRET=1 itself before importing triton, so ``kern(q, k, v)`` and its backward run the
generated Triton kernels through the interpreter. Ten steps take some 10-20 s on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "train_gpt.py"
STEPS = 10
try:
    import matplotlib  # noqa: F401
    HAVE_MPL = True
except ImportError:      # the `plot` extra is not installed
    HAVE_MPL = False


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_gpt")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)          # the script must set it for --device cpu by itself
    env["ATTNC_CACHE_DIR"] = str(out / "cache")
    png, js = out / "loss.png", out / "curves.json"
    cmd = [sys.executable, str(SCRIPT), "--toy", "--device", "cpu", "--steps", str(STEPS), "--log-every", "1",
           "--json", str(js)]
    if HAVE_MPL:
        cmd += ["--plot", str(png)]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"train_gpt.py failed:\n{proc.stdout}\n{proc.stderr}"
    return proc, png, json.loads(js.read_text())


def test_curves_agree_at_every_step(toy_run):
    _, _, result = toy_run
    a, b = result["loss_attnc"], result["loss_sdpa"]
    assert len(a) == len(b) == STEPS
    for step, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= 1e-3 * abs(y), f"step {step}: attnc {x} vs sdpa {y}"
    assert result["max_abs_diff"] == pytest.approx(max(abs(x - y) for x, y in zip(a, b)))


def test_loss_decreases(toy_run):
    _, _, result = toy_run
    for name in ("loss_attnc", "loss_sdpa"):
        curve = result[name]
        # From ln(vocab) = 3.58 at step 0 the model first learns the character frequencies.
        assert sum(curve[-3:]) / 3 < curve[0] - 0.1, f"{name} did not decrease: {curve}"


def test_ran_the_kernels_and_reported(toy_run):
    proc, _, result = toy_run
    assert "Triton interpreter" in proc.stdout
    assert "TRITON_INTERPRET is not set" not in proc.stderr    # the kernels ran, not the reference
    assert result["settings"]["seq"] == 64 and result["settings"]["dim"] == 32
    assert result["settings"]["heads"] == 2 and result["settings"]["layers"] == 2
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("final loss attnc") and "max |diff| over the curve" in last


@pytest.mark.skipif(not HAVE_MPL, reason="needs matplotlib (the plot extra)")
def test_png_written(toy_run):
    _, png, _ = toy_run
    assert png.is_file() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
