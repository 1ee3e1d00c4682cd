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
  result is lent: the caller gets new tensor objects on the graph's memory, no copy.

A lent result stays valid until the shape's next replay. Before it, whatever is still referenced of the last
lent result (the kernel's per-input cache keeps it while its runtime inputs live, e.g. for the backward of
that call) gets private copies (:meth:`_Captured.reclaim`); what nobody holds any more costs nothing. So
back-to-back calls with runtime inputs that are dropped after each call pay the replay alone, and training,
whose backward needs each call's setup later, pays one copy per call (RESULTS run 62).

``ATTNC_SETUP_GRAPHS=0`` turns this off. Calls made while a stream is being captured (a caller's own CUDA
graph) run the setup eagerly, inside the caller's graph.
"""

from __future__ import annotations

import copy
import os
import threading
import weakref
from collections import OrderedDict

import torch

MAX_SHAPES = 4          # graphs kept per kernel (each holds its setup's memory)
_EAGER = "eager"        # this shape's setup synchronizes with the host: never captured
_SEEN = "seen"          # run once eagerly: captured on the next call


class _Captured:
    """One captured setup: the graph, the static inputs it reads, the results it writes, and what of them
    was lent by the last replay."""

    def __init__(self, graph, static: dict, result):
        self.graph, self.static, self.result = graph, static, result
        self.memory = {t.untyped_storage().data_ptr() for t in _tensors(result)}
        self.memory |= {t.untyped_storage().data_ptr() for t in static.values()}
        self.lent: list = []        # weak references: the lent tensors, and the lent objects holding them
        self.stream = None          # the stream of the last replay

    def lend(self):
        """The result as new objects whose tensors alias the graph's (see :func:`share_result`)."""
        tensors: list = []
        shared = share_result(self.result, tensors)
        self.lent = [weakref.ref(t) for t in tensors] + [weakref.ref(o) for o in _objects(shared)]
        return shared

    def reclaim(self) -> int:
        """Before a replay: give every lent tensor still referenced somewhere its own copy, in place
        (``Tensor.set_``, so every holder sees it), and replace tensors made later on the graph's memory
        (views, e.g. a transposed status table) inside lent objects still alive. Returns the copies made."""
        memo: dict = {}
        alive = [obj for obj in (ref() for ref in self.lent) if obj is not None]
        self.lent = []
        for obj in alive:
            if isinstance(obj, torch.Tensor) and obj.untyped_storage().data_ptr() in self.memory:
                obj.set_(_private(obj, memo))
        for obj in alive:
            if not isinstance(obj, torch.Tensor):
                _privatize_fields(obj, self.memory, memo)
        return len(memo)


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
            state.reclaim()
            current = torch.cuda.current_stream(device)
            if state.stream is not None and state.stream != current:
                current.wait_stream(state.stream)        # the last lent result's readers, queued there
            state.stream = current
            for name, t in inputs.items():
                state.static[name].copy_(t)
            state.graph.replay()
            return state.lend()

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


def _view_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _private(t: torch.Tensor, memo: dict) -> torch.Tensor:
    """A copy of ``t``; views of one memory the same way are copied once."""
    key = _view_key(t)
    if key not in memo:
        memo[key] = t.clone()
    return memo[key]


def _result_types() -> tuple:
    from .layout import Layout
    from .plan import PlannedTiles, TileLists
    return Layout, PlannedTiles, TileLists


def share_result(obj, tensors: list, memo: dict | None = None):
    """A copy of a setup result's objects whose tensors are new tensor objects (``detach``) on the same
    memory, appended to ``tensors``. Views of one memory the same way share one new tensor. Lazy state set
    on the copy later (a layout's transposed lists) stays with the copy."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        key = _view_key(obj)
        if key not in memo:
            memo[key] = obj.detach()
            tensors.append(memo[key])
        return memo[key]
    if isinstance(obj, dict):
        return {k: share_result(v, tensors, memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(share_result(v, tensors, memo) for v in obj)
    if isinstance(obj, _result_types()):
        new = copy.copy(obj)
        for name, value in vars(obj).items():
            object.__setattr__(new, name, share_result(value, tensors, memo))
        return new
    return obj


def _parts(obj):
    """The tensors and the Layout / PlannedTiles / TileLists objects of a setup result, depth first."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _parts(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _parts(value)
    elif isinstance(obj, _result_types()):
        yield obj
        for value in vars(obj).values():
            yield from _parts(value)


def _objects(obj) -> list:
    """The result objects of a setup result (to find their fields again before a replay)."""
    return [o for o in _parts(obj) if not isinstance(o, torch.Tensor)]


def _tensors(obj) -> list:
    return [t for t in _parts(obj) if isinstance(t, torch.Tensor)]


def _privatize_fields(obj, memory: set, memo: dict, seen: set | None = None) -> None:
    """Replace, in the fields of a result object and of the result objects, dicts, lists and tuples below
    them, every tensor on the graph's ``memory`` with a copy."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))

    def fix(value):
        if isinstance(value, torch.Tensor):
            return _private(value, memo) if value.untyped_storage().data_ptr() in memory else value
        if isinstance(value, dict):
            fixed = {k: fix(v) for k, v in value.items()}
            return value if all(fixed[k] is v for k, v in value.items()) else fixed
        if isinstance(value, (list, tuple)):
            fixed = [fix(v) for v in value]
            return value if all(a is b for a, b in zip(fixed, value)) else type(value)(fixed)
        if isinstance(value, _result_types()):
            _privatize_fields(value, memory, memo, seen)
        return value
    for name, value in list(vars(obj).items()):
        fixed = fix(value)
        if fixed is not value:
            object.__setattr__(obj, name, fixed)
