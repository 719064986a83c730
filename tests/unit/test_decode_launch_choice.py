"""paged_decode's launch shape, chosen on the host from the batch alone (no GPU needed): warps
a block (`choose_warps`, NANOPD_DECODE_WARPS) and chunks a sequence (`choose_num_splits`)."""

from __future__ import annotations

import pytest
import torch

from services.worker.ops import cuda_ops

DEVICE = torch.device("cuda", 0)  # never touched: the SM count is stubbed


@pytest.fixture(autouse=True)
def h200(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_ops, "_num_sms", lambda index: 132)
    monkeypatch.delenv("NANOPD_DECODE_WARPS", raising=False)


@pytest.mark.parametrize("num_seqs,warps", [(1, 8), (2, 8), (16, 8), (17, 4), (64, 4),
                                             (256, 4)])
def test_eight_warps_up_to_a_pair_per_four_sms(num_seqs: int, warps: int) -> None:
    assert cuda_ops.choose_warps(num_seqs, 2, DEVICE) == warps


def test_the_environment_overrides_and_bad_values_are_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOPD_DECODE_WARPS", "4")
    assert cuda_ops.choose_warps(1, 2, DEVICE) == 4
    monkeypatch.setenv("NANOPD_DECODE_WARPS", "8")
    assert cuda_ops.choose_warps(256, 2, DEVICE) == 8
    monkeypatch.setenv("NANOPD_DECODE_WARPS", "auto")
    assert cuda_ops.choose_warps(256, 2, DEVICE) == 4
    monkeypatch.setenv("NANOPD_DECODE_WARPS", "6")
    with pytest.raises(ValueError, match="must be 4, 8 or auto"):
        cuda_ops.choose_warps(1, 2, DEVICE)


@pytest.mark.parametrize("num_seqs,head_dim,warps,splits", [
    (1, 128, 4, 32), (1, 128, 8, 32),      # the cap
    (8, 128, 8, 8), (8, 128, 4, 8),        # 132 blocks a wave at head_dim 128, either build
    (32, 128, 4, 2), (32, 128, 8, 2),
    (33, 128, 4, 2), (34, 128, 4, 1),      # 132 // 66, 132 // 68
    (64, 128, 4, 1), (128, 128, 4, 1),     # never fewer than 1
    (32, 64, 4, 4), (32, 64, 8, 2),        # head_dim 64: 2 blocks an SM of 4 warps, 1 of 8
    (128, 64, 4, 1), (8, 64, 8, 8),
])
def test_splits_fill_one_wave_of_the_chosen_blocks(num_seqs: int, head_dim: int, warps: int,
                                                   splits: int) -> None:
    assert cuda_ops.choose_num_splits(num_seqs, 2, DEVICE, head_dim, warps) == splits
