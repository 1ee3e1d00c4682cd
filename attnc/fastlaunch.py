"""Launching a generated kernel with less host time than ``kernel[grid](...)``.

Every ``kernel[grid](*args)`` makes Triton's ``JITFunction.run`` derive the specialization of each argument
again (the forward takes ~67: pointers, strides, sizes, tile lists), build its cache key as a string and
launch-time metadata, all before the launch proper: 35-50 us of host time per launch on the lent H200
(RESULTS run 74), and a forward + backward launches three to ten kernels. Where the GPU's work is short (small
problems, hash buckets at 8k) the host, not the GPU, then bounds the call.

:func:`launch` asks Triton once per argument signature: the first launch of a signature goes through
``kernel[grid]``, which compiles or loads the kernel and returns Triton's ``CompiledKernel``; later launches of
the same signature call that compiled kernel's launcher directly, as ``CompiledKernel[grid]`` does. The
signature is what Triton specializes on, or finer:

- integers by value (Triton specializes on 1, on divisibility by 16 and on the 32/64-bit range);
- tensors by dtype and by whether the data pointer is 16-byte aligned;
- floats by type only (Triton never specializes a float's value), bools and None by value;
- host tensor descriptors by their base's dtype and alignment and by their shape, strides and block shape;
- the keyword arguments (constexprs, ``num_warps``, ``num_stages``) by value; and the current device.

Triton's path is kept where the direct call could differ from it: under the interpreter, when launch hooks
are installed (a profiler such as Proton), for arguments of any other type, for kernels whose parameters are
not all passed (defaults), or when ``ATTNC_FAST_LAUNCH=0``. The direct call uses Triton's internal API
(``CompiledKernel.run``, the same on Triton 3.6 and 3.9); if a Triton version lacks it, a launch falls back to
``kernel[grid]`` for good.
"""

from __future__ import annotations

import os

import torch

_TRITON = object()          # the entry of a signature that always goes through kernel[grid]
_FLOAT, _NONE = object(), object()
MAX_SIGNATURES = 256        # per kernel; beyond, the table is cleared (shapes that change on every call)

# Launches made directly, and signatures handed to Triton first (for the tests).
counts = {"direct": 0, "signatures": 0}


def enabled() -> bool:
    return os.environ.get("ATTNC_FAST_LAUNCH", "1") != "0"


def _is_compiled_jit(fn) -> bool:
    """A JITFunction that compiles for a GPU (under TRITON_INTERPRET=1, triton.jit makes another class)."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return False
    return isinstance(fn, JITFunction)


def signature(args) -> tuple | None:
    """The launch-relevant view of the positional arguments, hashable; None for an argument of another type."""
    sig = []
    append = sig.append
    for a in args:
        t = type(a)
        if t is int:
            append(a)
        elif t is float:
            append(_FLOAT)
        elif t is bool:
            append((bool, a))
        elif a is None:
            append(_NONE)
        elif isinstance(a, torch.Tensor):
            append((a.dtype, a.data_ptr() & 15 == 0))
        elif t.__name__ == "TensorDescriptor":
            # A host tensor descriptor (Triton's, which its launcher turns into a CUtensorMap on every launch):
            # its base's dtype and alignment, and all of its geometry by value.
            append((t, a.base.dtype, a.base.data_ptr() & 15 == 0, tuple(a.shape), tuple(a.strides),
                    tuple(a.block_shape), a.padding, getattr(a, "round_f32_to_tf32", False)))
        else:
            return None
    return tuple(sig)


def _entry(fn, kernel, n_args: int, kwargs: dict):
    """What a later launch of this signature needs: the compiled kernel, and the keyword parameters' values
    in the kernel's parameter order (Triton's launcher takes every parameter, constexprs included)."""
    names = getattr(fn, "arg_names", None)
    if kernel is None or names is None or not hasattr(kernel, "run"):
        return _TRITON
    if hasattr(kernel, "result"):             # Triton's asynchronous compile mode hands back a future
        kernel = kernel.result()
    rest = names[n_args:]
    if len(rest) + n_args != len(names) or any(name not in kwargs for name in rest):
        return _TRITON                        # a parameter left to its default: keep Triton's binder
    return kernel, tuple(kwargs[name] for name in rest)


def launch(fn, grid: tuple, *args, **kwargs) -> None:
    """``fn[grid](*args, **kwargs)``, launched directly once Triton has met the same argument signature."""
    if not (enabled() and _is_compiled_jit(fn)):
        fn[grid](*args, **kwargs)
        return
    enter, leave = _hooks()
    if _hooked(enter) or _hooked(leave):
        fn[grid](*args, **kwargs)             # hooks want Triton's launch metadata
        return
    device = _device()
    sig = signature(args)
    key = None if sig is None else (device, sig, tuple(kwargs.items()))
    table = fn.__dict__.setdefault("_attnc_launches", {})
    try:
        entry = table.get(key) if key is not None else _TRITON
    except TypeError:                         # an unhashable keyword value: Triton's path
        entry = _TRITON
    if entry is None:
        counts["signatures"] += 1
        kernel = fn[grid](*args, **kwargs)
        if len(table) >= MAX_SIGNATURES:
            table.clear()
        table[key] = _entry(fn, kernel, len(args), kwargs)
        return
    if entry is _TRITON:
        fn[grid](*args, **kwargs)
        return
    kernel, tail = entry
    try:
        kernel.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, _stream(device),
                   kernel.function, kernel.packed_metadata, None, enter, leave, *args, *tail)
    except (TypeError, AttributeError):
        # Another Triton's launcher convention (the arguments are parsed before anything is launched):
        # Triton's own path for this signature from now on.
        table[key] = _TRITON
        fn[grid](*args, **kwargs)
        return
    counts["direct"] += 1


_triton = {}        # triton.knobs and triton.runtime.driver, imported on the first launch


def _hooks() -> tuple:
    knobs = _triton.get("knobs")
    if knobs is None:
        from triton import knobs
        _triton["knobs"] = knobs
    return knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook


def _hooked(hook) -> bool:
    """Whether a launch hook is installed: Triton 3.6 and 3.9 keep them in a HookChain (empty: none)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _driver():
    driver = _triton.get("driver")
    if driver is None:
        from triton.runtime import driver
        _triton["driver"] = driver
    return driver.active


def _device() -> int:
    """The device Triton launches on (its current device, as ``kernel[grid]`` uses)."""
    return _driver().get_current_device()


def _stream(device: int):
    return _driver().get_current_stream(device)
