#!/usr/bin/env bash
# A tour of attnc on one pattern file, from a fresh clone:
#
#     bash run.sh examples/sliding_window.attn [--pattern NAME] [-p NAME=VALUE ...]
#
# Sets up .venv (see scripts/setup_env.sh; nothing is installed again on later runs), then checks the
# pattern, prints its IR and plan, draws its mask into mask.png, and runs the generated kernel on random
# tensors against the plain-torch reference: on a CUDA GPU when there is one, else on the CPU through
# Triton's interpreter (TRITON_INTERPRET=1) at a small size.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: bash run.sh FILE.attn [--pattern NAME] [-p NAME=VALUE ...]" >&2
    exit 2
fi
FILE="$1"
shift
OPTS=("$@")            # passed to `attnc compile` / `attnc show` and to the kernel run below

source "$(dirname "${BASH_SOURCE[0]}")/scripts/setup_env.sh"
attnc_setup_env plot

# Print a command, then run it.
show_and_run() {
    printf '\n=== %s\n' "$*"
    "$@"
}

show_and_run attnc check "$FILE"
show_and_run attnc compile "$FILE" ${OPTS[@]+"${OPTS[@]}"} --emit ir
show_and_run attnc compile "$FILE" ${OPTS[@]+"${OPTS[@]}"} --emit plan
show_and_run attnc show "$FILE" ${OPTS[@]+"${OPTS[@]}"} -n 256 --png mask.png

printf '\n=== %s\n' "the generated kernel on random tensors, against kern.reference"
python - "$FILE" ${OPTS[@]+"${OPTS[@]}"} <<'PY'
import argparse
import os
import sys

import torch

parser = argparse.ArgumentParser()
parser.add_argument("file")
parser.add_argument("--pattern")
parser.add_argument("-p", "--param", action="append", default=[])
args = parser.parse_args()


def value(text):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    sys.exit(f"parameter value {text!r} is not an int, float or bool")


params = {name.strip(): value(v.strip()) for name, v in (p.split("=", 1) for p in args.param)}

if torch.cuda.is_available():
    device, dtype, B, H, N, D = "cuda", torch.bfloat16, 2, 4, 1024, 64
else:
    # No GPU: the same Triton kernels, run by Triton's interpreter (slow, hence the small size).
    os.environ["TRITON_INTERPRET"] = "1"
    device, dtype, B, H, N, D = "cpu", torch.float32, 1, 2, 128, 32

import attnc  # noqa: E402  (after TRITON_INTERPRET is decided)

kern = attnc.compile(args.file, pattern=args.pattern, **params)
torch.manual_seed(0)
q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(3))
inputs = {name: t.to(device) for name, t in kern.example_inputs(N, N, B, H).items()}
out = kern(q, k, v, **inputs)
ref = kern.reference(q, k, v, **inputs)
err = (out.float() - ref.float()).abs().max().item()
where = "CUDA" if device == "cuda" else "CPU, TRITON_INTERPRET=1"
print(f"{kern!r} on {where}: B={B} H={H} N={N} D={D} {str(dtype).replace('torch.', '')}"
      + (f", runtime inputs drawn at random: {', '.join(inputs)}" if inputs else ""))
note = "  (bf16 output: about 1e-2 is one rounding step)" if dtype == torch.bfloat16 else ""
print(f"max |kernel - reference| = {err:.3g}{note}")
PY
