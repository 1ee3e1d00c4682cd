# Shared environment setup for run.sh and .ci/run. Source it, then call:
#
#     attnc_setup_env EXTRAS        # e.g. "plot" or "test,plot"
#
# It makes (or reuses) the virtual environment .venv at the repository root, puts it first on PATH,
# and installs attnc into it in editable mode. The order matters:
#
#   1. torch first, and only when no torch is importable. The venv is created with
#      --system-site-packages, so a torch that is already installed (for example a CUDA build on a
#      GPU machine) stays visible and is kept. Without a GPU the CPU build (torch==X+cpu) is
#      installed, from a local wheel when pip's configuration offers one, else from PyTorch's CPU
#      index: a CPU machine never downloads a CUDA torch.
#   2. triton, pinned on machines without a GPU (with a GPU, torch brings the triton it was built with).
#   3. attnc itself (pip install -e .[EXTRAS]); its "torch>=2.4" is then already satisfied.
#
# A stamp file in .venv remembers a finished setup, so a second run installs nothing.
#
# Knobs (environment variables):
#   PYTHON                    interpreter used to create the venv (default: python3)
#   ATTNC_TORCH_VERSION       torch version to install when none is present (default 2.13.0)
#   ATTNC_TRITON_VERSION      triton pinned on machines without a GPU (default 3.9.0)
#   ATTNC_TORCH_CPU_INDEX     where CPU torch wheels come from when no local wheel exists
#                             (default https://download.pytorch.org/whl/cpu)
#   ATTNC_VENV_ISOLATED=1     create .venv without --system-site-packages

ATTNC_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ATTNC_VENV="$ATTNC_ROOT/.venv"
ATTNC_TORCH_VERSION="${ATTNC_TORCH_VERSION:-2.13.0}"
ATTNC_TRITON_VERSION="${ATTNC_TRITON_VERSION:-3.9.0}"
ATTNC_TORCH_CPU_INDEX="${ATTNC_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

_attnc_say() { echo "[setup] $*" >&2; }

_attnc_has_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

# A fingerprint of everything that decides what gets installed: a change re-runs the installs.
_attnc_fingerprint() {
    local extras="$1"
    "$ATTNC_VENV/bin/python" - "$ATTNC_ROOT" "$extras" "$ATTNC_TORCH_VERSION" "$ATTNC_TRITON_VERSION" <<'PY'
import hashlib, sys
root, *rest = sys.argv[1:]
h = hashlib.sha256("\n".join(rest + [sys.version]).encode())
for name in ("pyproject.toml", "scripts/setup_env.sh"):
    with open(f"{root}/{name}", "rb") as f:
        h.update(f.read())
print(h.hexdigest())
PY
}

# True when attnc (editable, from this checkout), torch and triton import in the venv. Runs from "/"
# in isolated mode, so the checkout's own attnc/ directory cannot stand in for the installed one.
_attnc_ready() {
    [ -x "$ATTNC_VENV/bin/attnc" ] || return 1
    local where
    where="$(cd / && "$ATTNC_VENV/bin/python" -I -c \
        'import os, attnc, torch, triton; print(os.path.dirname(os.path.dirname(os.path.realpath(attnc.__file__))))' \
        2>/dev/null)" || return 1
    [ "$where" = "$(cd "$ATTNC_ROOT" && pwd -P)" ]
}

_attnc_pip() {
    "$ATTNC_VENV/bin/python" -m pip --disable-pip-version-check --no-input -q "$@"
}

_attnc_install_torch() {
    if (cd / && "$ATTNC_VENV/bin/python" -I -c 'import torch' >/dev/null 2>&1); then
        _attnc_say "torch $(cd / && "$ATTNC_VENV/bin/python" -I -c 'import torch; print(torch.__version__)') is already installed; keeping it"
        return 0
    fi
    if _attnc_has_gpu; then
        _attnc_say "installing torch==$ATTNC_TORCH_VERSION (a GPU is present: the default CUDA build)"
        _attnc_pip install "torch==$ATTNC_TORCH_VERSION"
    elif [ "$(uname -s)" != "Linux" ]; then
        _attnc_say "installing torch==$ATTNC_TORCH_VERSION (CPU)"
        _attnc_pip install "torch==$ATTNC_TORCH_VERSION"
    else
        # The +cpu local version exists only as CPU wheels, so this pin can never fetch a CUDA build.
        local spec="torch==$ATTNC_TORCH_VERSION+cpu"
        _attnc_say "installing $spec (no GPU: the CPU build)"
        if ! _attnc_pip install "$spec" 2>/dev/null; then
            _attnc_say "no local $spec wheel; trying $ATTNC_TORCH_CPU_INDEX"
            _attnc_pip install "$spec" --index-url "$ATTNC_TORCH_CPU_INDEX" --extra-index-url https://pypi.org/simple
        fi
    fi
}

attnc_setup_env() {
    local extras="${1:-}"
    local python="${PYTHON:-python3}"
    if ! "$ATTNC_VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || {
            _attnc_say "attnc needs Python 3.10 or newer; '$python' is $("$python" -V 2>&1). Set PYTHON=..."
            return 1
        }
        local flags="--system-site-packages"
        [ "${ATTNC_VENV_ISOLATED:-0}" = "1" ] && flags=""
        _attnc_say "creating $ATTNC_VENV ($python -m venv $flags)"
        rm -rf "$ATTNC_VENV"
        "$python" -m venv $flags "$ATTNC_VENV" || {
            _attnc_say "could not create the venv (on Debian/Ubuntu: apt-get install python3-venv)"
            return 1
        }
    fi
    export VIRTUAL_ENV="$ATTNC_VENV"
    export PATH="$ATTNC_VENV/bin:$PATH"

    local stamp="$ATTNC_VENV/.attnc-setup" want
    want="$(_attnc_fingerprint "$extras")"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && _attnc_ready; then
        return 0
    fi

    _attnc_install_torch
    local pins=()
    if ! _attnc_has_gpu; then
        pins+=("triton==$ATTNC_TRITON_VERSION")
    fi
    local target="$ATTNC_ROOT"
    [ -n "$extras" ] && target="$ATTNC_ROOT[$extras]"
    _attnc_say "installing attnc (editable${extras:+, extras: $extras})${pins[*]:+ with ${pins[*]}}"
    _attnc_pip install ${pins[@]+"${pins[@]}"} -e "$target"
    _attnc_ready || { _attnc_say "attnc is still not importable from $ATTNC_VENV"; return 1; }
    echo "$want" > "$stamp"
    _attnc_say "ready: $(cd / && python -I -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}")')"
}
