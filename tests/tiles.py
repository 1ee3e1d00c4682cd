"""Comparing tile lists built two ways (torch and device setup) in the plan and setup tests."""

import torch


def same_lists(want, got, what: str = ""):
    """Two TileLists agree: leading runs, counts, and the valid entries of each list (int32; entries past a
    row's count are unused and may differ). ``got``'s lists may be wider (device lists built without a host
    synchronization are as wide as a row)."""
    assert torch.equal(want.full_run, got.full_run), what
    assert torch.equal(want.full_cnt, got.full_cnt) and torch.equal(want.part_cnt, got.part_cnt), what
    for a, b, cnt in ((want.full_idx, got.full_idx, want.full_cnt), (want.part_idx, got.part_idx, want.part_cnt)):
        assert a.shape[:-1] == b.shape[:-1] and a.shape[-1] <= b.shape[-1] and b.dtype == torch.int32, what
        b = b[..., :a.shape[-1]]
        valid = torch.arange(a.shape[-1]) < cnt.unsqueeze(-1)
        assert torch.equal(a[valid], b[valid]), what
