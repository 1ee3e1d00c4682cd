"""NaN-poisoned allocations for kernel tests: an output element a kernel forgets to write shows up."""

import math
from contextlib import contextmanager
from unittest import mock

import torch

real_empty, real_empty_like = torch.empty, torch.empty_like


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill floats with NaN and integers with a garbage value (-12345, or -99 / 199 for 8-bit types)."""
    if t.is_floating_point():
        t.fill_(math.nan)
    elif t.dtype != torch.bool and t.numel():
        t.fill_({torch.int8: -99, torch.uint8: 199}.get(t.dtype, -12345))
    return t


@contextmanager
def poisoned_allocations():
    """torch.empty / torch.empty_like hand out poisoned memory inside the block."""
    with mock.patch.object(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k))), \
            mock.patch.object(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k))):
        yield
