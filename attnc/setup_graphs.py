"""The per-call setup (sorts, tile classes, tile lists) replayed as a CUDA graph per call shape.

A layout transform's setup is 10-30 small Triton launches. Their device time is 40-160 us at 32k tokens,
but launching them from Python takes 20-60 us each: on a slow host, back-to-back calls whose runtime inputs
change every time are bound by those launches (RESULTS runs 23-34). The launches depend only on the call's
shapes, never on the inputs' values (the setup never synchronizes with the host; section 5.2.1 of
docs/design.md), so after a shape has been seen once, its setup is captured into a CUDA graph:

* first call of a shape: the setup runs eagerly (Triton compiles its kernels); if it had to synchronize with
  the host (lists too large to be as wide as a row), the shape stays eager;
* second call: the setup is captured, reading its inputs from static copies;
* every call from then on: the inputs are copied into the static copies, the graph is replayed, and the
  results are cloned, so that a call's layout stays valid for its backward while later calls replay the
  same graph.

``ATTNC_SETUP_GRAPHS=0`` turns this off. Calls made while a stream is being captured (a caller's own CUDA
graph) run the setup eagerly, inside the caller's graph.
"""

from __future__ import annotations

import copy
import os
import threading
from collections import OrderedDict

import torch

MAX_SHAPES = 4          # graphs kept per kernel (each holds its setup's memory)
_EAGER = "eager"        # this shape's setup synchronizes with the host: never captured
_SEEN = "seen"          # run once eagerly: captured on the next call


class _Captured:
    """One captured setup: the graph, the static inputs it reads, and the results it writes."""

    def __init__(self, graph, static: dict, result):
        self.graph, self.static, self.result = graph, static, result


def enabled(device: torch.device) -> bool:
    return (device.type == "cuda" and os.environ.get("ATTNC_SETUP_GRAPHS", "1") != "0"
            and not torch.cuda.is_current_stream_capturing())


class SetupGraphs:
    """Per kernel: the setup of each call shape, eager, seen or captured (see the module docstring)."""

    def __init__(self):
        self._shapes: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def run(self, key: tuple, inputs: dict, build, materialize):
        """``materialize(build(inputs))`` for these inputs, through this shape's graph where there is one.

        ``build(inputs)`` makes the setup's result; ``materialize(result)`` makes the parts of it that are
        otherwise made on first use by the forward (its tile lists), so the graph holds them too."""
        device = next(iter(inputs.values())).device if inputs else None
        if device is None or not enabled(device):
            return materialize(build(inputs))
        from . import device_setup
        key = key + tuple((n, t.dtype, tuple(t.shape), t.stride()) for n, t in inputs.items())
        with self._lock:
            state = self._shapes.get(key)
            if state is None:
                syncs = device_setup.HOST_SYNCS
                result = materialize(build(inputs))
                self._remember(key, _SEEN if device_setup.HOST_SYNCS == syncs else _EAGER)
                return result
            if state == _EAGER:
                return materialize(build(inputs))
            if state == _SEEN:
                state = self._capture(device, inputs, build, materialize)
                self._remember(key, state)
            self._shapes.move_to_end(key)
            for name, t in inputs.items():
                state.static[name].copy_(t)
            state.graph.replay()
            return clone_result(state.result)

    def _remember(self, key, state):
        self._shapes[key] = state
        while len(self._shapes) > MAX_SHAPES:
            self._shapes.popitem(last=False)

    @staticmethod
    def _capture(device, inputs: dict, build, materialize) -> _Captured:
        static = {name: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
                  for name, t in inputs.items()}
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            # thread_local: another thread's CUDA work during the capture is not an error.
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                result = materialize(build(static))
            finally:
                graph.capture_end()
        current.wait_stream(stream)
        return _Captured(graph, static, result)


def clone_result(obj, memo: dict | None = None):
    """A copy of a setup result whose tensors are clones: the graph's own tensors are overwritten by its next
    replay. Tensors that view the same memory the same way (a layout's positions and the int32 table they
    were made from) are cloned once."""
    from .layout import Layout
    from .plan import PlannedTiles, TileLists
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape), obj.stride(), obj.dtype)
        if key not in memo:
            memo[key] = obj.clone()
        return memo[key]
    if isinstance(obj, dict):
        return {k: clone_result(v, memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_result(v, memo) for v in obj)
    if isinstance(obj, (Layout, PlannedTiles, TileLists)):
        new = copy.copy(obj)
        for name, value in vars(obj).items():
            object.__setattr__(new, name, clone_result(value, memo))
        return new
    return obj
