"""Comparing tile lists built two ways (torch and device setup) in the plan and setup tests."""

import torch


def same_lists(want, got, what: str = ""):
    """Two TileLists agree: counts, the runs flag, list widths, and the valid entries of each list (int32;
    entries past a row's count are unused and may differ)."""
    assert torch.equal(want.full_cnt, got.full_cnt) and torch.equal(want.part_cnt, got.part_cnt), what
    assert want.full_runs == got.full_runs, what
    for a, b, cnt in ((want.full_idx, got.full_idx, want.full_cnt), (want.part_idx, got.part_idx, want.part_cnt)):
        assert a.shape == b.shape and b.dtype == torch.int32, what
        valid = torch.arange(a.shape[-1]) < cnt.unsqueeze(-1)
        assert torch.equal(a[valid], b[valid]), what
