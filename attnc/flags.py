"""The host's view of the flags a device setup leaves behind, learned without waiting for the device.

A setup on the GPU decides some things the launcher would like to know: whether a sort moved any row
(``Layout.in_place``), whether every sorted block holds one bucket id (``Layout.pure``), whether some row
lists full tiles past its leading run (the backward's guard flag). Reading them at once would synchronize
the host with the device on every new input, so the launcher instead runs every variant a flag could pick,
each returning at once unless the flag holds its value (the ``guard`` macro of the templates).

A setup is cached per input tensors (``Kernel._input_cached``), and many calls reuse one: every backward
reuses its forward's, and a benchmark or a model that keeps its masks reuses them on every step. So the
second time the launcher meets a flag, :func:`known` queues a copy of it into pinned host memory and an
event behind it; from then on, once the event has completed (a query, never a wait), it answers the value,
and the launcher runs only the variant that value picks, unguarded. The skipped variants were empty
launches of as many programs as the real one. A flag met once only (a forward on new inputs, as in the
benchmark's setup-in-the-loop measure) costs nothing but the mark.

Under CUDA graph capture nothing is resolved: a captured call must stay correct when the graph is replayed
on other inputs, so it keeps every variant and its device-side choice.

Under the interpreter (CPU tensors) the value is read on the second sight and answered from the third on, as
on a GPU whose copy completed in between, so the tests run both paths.
"""

from __future__ import annotations

import torch

# False: never resolve, always launch the device-guarded variants (tests that force a flag's value).
RESOLVE = True

_ATTR = "_attnc_host_view"
_SEEN = object()    # met once: the copy starts at the next sight


def known(flag: torch.Tensor | None) -> int | None:
    """The value of the int32 [1] device ``flag`` if the host has it without waiting, else None (and, on the
    second sight, its copy to the host is queued, so that a later call knows it)."""
    if flag is None or not RESOLVE:
        return None
    if flag.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    view = getattr(flag, _ATTR, None)
    if view is None:
        setattr(flag, _ATTR, _SEEN)
        return None
    if view is _SEEN:
        if flag.device.type == "cuda":
            host = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            setattr(flag, _ATTR, [host, done])
        else:
            setattr(flag, _ATTR, [int(flag.item()), None])
        return None
    value, done = view
    if done is not None:
        if not done.query():
            return None
        view[:] = [int(value.item()), None]     # pinned host memory, written by the completed copy
        return view[0]
    return value
