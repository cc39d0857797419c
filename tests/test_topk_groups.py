"""The one-launch top-k group selection against torch.topk."""

from __future__ import annotations

import pytest
import torch
from polarc.plugins.topk_groups import topk_groups, topk_groups_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("b", "hkv", "k"), [(1, 3, 1), (5, 3, 2), (4, 8, 4), (3, 8, 8),
                                             (2, 32, 16), (6, 12, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch_topk(b: int, hkv: int, k: int, dtype: torch.dtype) -> None:
    # distinct values in every dtype, so the order is fully defined
    scores = torch.stack([torch.randperm(hkv) for _ in range(b)]).to(dtype) - hkv / 2
    scores = scores.to(DEVICE)
    out = torch.full((b, k), -7, dtype=torch.int32, device=DEVICE)  # poisoned
    got = topk_groups(scores, k, out=out)
    assert got is out
    assert torch.equal(got.cpu(), topk_groups_reference(scores, k).cpu())


def test_ties_go_to_the_lower_group() -> None:
    scores = torch.tensor([[1.0, 2.0, 2.0, 0.5], [3.0, 3.0, 3.0, 3.0]], device=DEVICE)
    assert topk_groups(scores, 2).cpu().tolist() == [[1, 2], [0, 1]]


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="1 <= k <= Hkv=4"):
        topk_groups(torch.zeros(2, 4, device=DEVICE), 5)
    with pytest.raises(ValueError, match="float tensor"):
        topk_groups(torch.zeros(2, 4, dtype=torch.int32, device=DEVICE), 1)
