"""The one place that checks call-time tensors: q, k, v shapes and dtypes, and runtime inputs."""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

import torch

from .analyze import InputDecl, PatternIR
from .errors import InputError

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@dataclass(frozen=True)
class Shapes:
    """The sizes of one call."""
    batch: int
    heads_q: int
    heads_kv: int
    n_q: int
    n_k: int
    head_dim: int
    head_dim_v: int


def check_qkv(q, k, v, *, kernel_dims: bool = False) -> Shapes:
    """Validate q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv); raise InputError."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise InputError(f"{name} must have 4 dimensions (batch, heads, seq, head_dim), got shape "
                             f"{tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise InputError(f"{name} has dtype {t.dtype}; attnc supports float16, bfloat16, float32 and float64 "
                             "(float64 is meant for checks, not speed)")
    if not (q.dtype == k.dtype == v.dtype):
        raise InputError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise InputError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, Dk = k.shape
    Bv, Hv, Nv, Dv = v.shape
    if Bk != B or Bv != B:
        raise InputError(f"batch sizes differ: q {B}, k {Bk}, v {Bv}")
    if Hv != Hkv:
        raise InputError(f"k and v must have the same number of heads, got {Hkv} and {Hv}")
    if Hkv == 0 or Hq % Hkv:
        raise InputError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv}) for GQA/MQA")
    if Nv != Nk:
        raise InputError(f"k and v must have the same sequence length, got {Nk} and {Nv}")
    if Dk != D:
        raise InputError(f"q and k must have the same head dim, got {D} and {Dk}")
    if kernel_dims:
        for name, d in (("head dim", D), ("value head dim", Dv)):
            if d not in SUPPORTED_HEAD_DIMS:
                raise InputError(f"unsupported {name} {d}; kernels support {SUPPORTED_HEAD_DIMS}")
    return Shapes(B, Hq, Hkv, Nq, Nk, D, Dv)


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale of a call: ``1 / sqrt(head_dim)`` when None, else ``scale`` as a finite float."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, (torch.SymInt, torch.SymFloat)):
        return float(scale)         # traced by torch.compile: as before, a value the graph guards on
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and scale.device.type != "meta":
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise InputError(f"scale must be a finite number (or None for 1/sqrt(head_dim)), got {scale!r}")
    return float(scale)


def check_sizes(positive: bool = False, **sizes) -> list[int]:
    """Sizes given by name (``n_q=...``): each a non-negative (``positive``: positive) int, numpy and torch
    ints too; returned as Python ints, in order, so that products of them cannot overflow."""
    out = []
    for name, value in sizes.items():
        try:
            n = None if isinstance(value, bool) else operator.index(value)
        except TypeError:
            n = None
        if n is None or n < int(positive):
            raise InputError(f"{name} must be a {'positive' if positive else 'non-negative'} int, got {value!r}")
        out.append(n)
    return out


def check_inputs(pir: PatternIR, inputs: dict, *, batch: int, heads: int, n_q: int, n_k: int,
                 device: torch.device | None = None, device_of: str = "q, k, v") -> dict[str, int]:
    """Check runtime inputs against their declarations; return the sizes bound by name. With ``device``, each
    input must be on it (``device_of`` names what is there, for the message)."""
    missing = [n for n in pir.inputs if n not in inputs]
    if missing:
        raise InputError(f"pattern '{pir.name}' needs runtime input(s) {', '.join(missing)} "
                         f"({'; '.join(_describe(pir.inputs[n]) for n in missing)})")
    unexpected = [n for n in inputs if n not in pir.inputs]
    if unexpected:
        declared = ", ".join(pir.inputs) or "none"
        raise InputError(f"unexpected runtime input(s) {', '.join(unexpected)} for pattern '{pir.name}' "
                         f"(it declares: {declared})")
    bound = {"batch": batch, "heads": heads, "n_q": n_q, "n_k": n_k}
    for name, decl in pir.inputs.items():
        t = inputs[name]
        if not isinstance(t, torch.Tensor):
            raise InputError(f"input '{name}' must be a torch.Tensor ({_describe(decl)}), got {type(t).__name__}")
        ok = {"int": t.dtype in _INT_DTYPES, "bool": t.dtype == torch.bool,
              "float": t.is_floating_point()}[decl.dtype]
        if not ok:
            article = "an" if decl.dtype == "int" else "a"
            raise InputError(f"input '{name}' must be {article} {decl.dtype} tensor ({_describe(decl)}), "
                             f"got {t.dtype}")
        if t.dim() != len(decl.dims):
            raise InputError(f"input '{name}' must have {len(decl.dims)} dimension(s) ({_describe(decl)}), "
                             f"got shape {tuple(t.shape)}")
        for axis, (dim, n) in enumerate(zip(decl.dims, t.shape)):
            if isinstance(dim, int):
                if n != dim:
                    raise InputError(f"input '{name}' dimension {axis} must be {dim}, got {n} "
                                     f"(shape {tuple(t.shape)})")
            elif dim in bound:
                if n != bound[dim]:
                    raise InputError(f"input '{name}' dimension {axis} is '{dim}' = {bound[dim]}, got {n} "
                                     f"(shape {tuple(t.shape)})")
            else:
                bound[dim] = n
        if device is not None and t.device != device:
            raise InputError(f"input '{name}' is on {t.device} but {device_of} {'are' if ',' in device_of else 'is'} "
                             f"on {device}")
    return bound


def _describe(decl: InputDecl) -> str:
    return f"{decl.name}: {decl.dtype}[{', '.join(map(str, decl.dims))}]"
