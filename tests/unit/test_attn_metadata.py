"""ops/attn_metadata.block_table_tensor: the padded int32 block tables of a step."""

from __future__ import annotations

import random

import pytest
import torch

from services.worker.ops.attn_metadata import block_table_tensor


def test_block_tables_are_left_aligned_and_zero_padded():
    rng = random.Random(3)
    tables = [[rng.randrange(1 << 30) for _ in range(rng.randint(0, 40))] for _ in range(17)]
    width = max(len(t) for t in tables) + 3
    got = block_table_tensor(tables, width)
    want = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    assert got.dtype == torch.int32 and torch.equal(got, want)
    assert block_table_tensor([], 5).shape == (0, 5)


def test_a_table_longer_than_the_width_is_an_error():
    with pytest.raises(ValueError, match="a block table of 4 blocks; at most 3 fit"):
        block_table_tensor([[1, 2], [1, 2, 3, 4]], 3)
