"""Stage 7: the user-facing compiled kernel — compile(), cache, launch, torch op and autograd."""

from __future__ import annotations

import functools
import math
import os
import warnings
from pathlib import Path

import torch

from . import ir
from .analyze import PatternIR, Program, lower_pattern
from .errors import InputError
from .reference import dense_mask, reference_attention
from .validate import check_inputs, check_qkv


def _source_key(source_or_path) -> tuple:
    """In-process memo key: source text, or a file path with its modification time."""
    text = str(source_or_path)
    if isinstance(source_or_path, Path) or ("\n" not in text and "{" not in text and Path(text).is_file()):
        p = Path(text).resolve()
        return ("path", str(p), p.stat().st_mtime_ns)
    return ("text", text, 0)


@functools.lru_cache(maxsize=256)
def _lower_cached(key: tuple, pattern, params: tuple) -> PatternIR:
    kind, text, _ = key
    program = Program(Path(text) if kind == "path" else text)
    return lower_pattern(program, pattern, dict(params))


def compile(source_or_path, pattern: str | None = None, **params) -> "Kernel":
    """Compile a pattern (a ``.attn`` path or source text) with its parameters bound.

    ``pattern`` chooses one when the file defines several. Raises :class:`attnc.PatternSyntaxError` or
    :class:`attnc.PatternError` for mistakes in the source or parameters.
    """
    pir = _lower_cached(_source_key(source_or_path), pattern, tuple(sorted(params.items())))
    return Kernel(pir)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_warned_cpu = False


class Kernel:
    """A compiled attention pattern: callable like attention, plus its mask, reference, plan and source."""

    def __init__(self, pir: PatternIR):
        self.ir = pir
        self.name = pir.name
        self.params = dict(pir.params)
        self.inputs = dict(pir.inputs)

    def __repr__(self):
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"<attnc.Kernel {self.name}({params})>"

    # ---- semantics -------------------------------------------------------------------------------
    @property
    def ir_text(self) -> str:
        """The optimized IR as a person reads it (``attnc compile --emit ir``)."""
        from .irprint import format_pattern_ir
        return format_pattern_ir(self.ir)

    def mask(self, n_q: int, n_k: int, batch: int = 1, heads: int = 1, **inputs) -> torch.Tensor:
        """The mask as a dense bool tensor (batch, heads, n_q, n_k): the pattern's exact semantics."""
        for name, value in (("n_q", n_q), ("n_k", n_k), ("batch", batch), ("heads", heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InputError(f"{name} must be a non-negative int, got {value!r}")
        device = next((t.device for t in inputs.values() if isinstance(t, torch.Tensor)), None)
        sizes = check_inputs(self.ir, inputs, batch=batch, heads=heads, n_q=n_q, n_k=n_k)
        return dense_mask(self.ir, n_q, n_k, batch, heads, sizes, inputs, device)

    def reference(self, q, k, v, scale: float | None = None, return_lse: bool = False, **inputs):
        """Plain-torch attention with this pattern (float32 math; float64 for float64 inputs)."""
        shapes = check_qkv(q, k, v)
        sizes = check_inputs(self.ir, inputs, batch=shapes.batch, heads=shapes.heads_q, n_q=shapes.n_q,
                             n_k=shapes.n_k, device=q.device)
        scale = 1.0 / math.sqrt(shapes.head_dim) if scale is None else float(scale)
        return reference_attention(self.ir, q, k, v, scale=scale, sizes=sizes, inputs=inputs,
                                   return_lse=return_lse)

    def __call__(self, q, k, v, scale: float | None = None, return_lse: bool = False, **inputs):
        """Attention with this pattern: Triton kernels on CUDA (or under TRITON_INTERPRET=1)."""
        global _warned_cpu
        if q.device.type != "cuda" and not _interpreting():
            if not _warned_cpu:
                warnings.warn("attnc: CPU tensors without TRITON_INTERPRET=1 run the plain-torch reference "
                              "(slow); use CUDA tensors for the Triton kernels", stacklevel=2)
                _warned_cpu = True
            return self.reference(q, k, v, scale=scale, return_lse=return_lse, **inputs)
        from .launch import attention
        return attention(self, q, k, v, scale=scale, return_lse=return_lse, inputs=inputs)
