"""ops/attn_metadata.BlockTableStage: a step's padded int32 block tables, rebuilt from the
last step's without converting the tables that did not change."""

from __future__ import annotations

import random

import pytest
import torch

from services.worker.ops.attn_metadata import BlockTableStage


def padded(tables: list[list[int]], width: int) -> torch.Tensor:
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)


def test_every_step_gives_the_padded_tables_whatever_changed():
    """Over random steps (tables grown by append, replaced by new lists as copy-on-write
    does, rows reordered, dropped and added, the width changing) each result equals the
    padded tables built from scratch, and results never alias the stage or each other."""
    rng = random.Random(3)
    stage = BlockTableStage()
    tables = [[rng.randrange(1 << 30) for _ in range(rng.randint(0, 40))] for _ in range(12)]
    previous = None
    for _ in range(200):
        for t in rng.sample(tables, 3):
            t.append(rng.randrange(1 << 30))  # in place: longer
        i = rng.randrange(len(tables))
        if tables[i]:  # copy-on-write: a new list with one entry changed
            j = rng.randrange(len(tables[i]))
            tables[i] = tables[i][:j] + [rng.randrange(1 << 30)] + tables[i][j + 1 :]
        if rng.random() < 0.2:
            rng.shuffle(tables)
        if rng.random() < 0.1:
            tables.pop(rng.randrange(len(tables)))
        if rng.random() < 0.1 or not tables:
            tables.append([])  # a fresh sequence
        width = max(len(t) for t in tables) + rng.randint(0, 3)
        got = stage.tensor(tables, width)
        assert got.dtype == torch.int32 and torch.equal(got, padded(tables, width))
        if previous is not None:
            assert got.data_ptr() != previous.data_ptr()
        previous = got
    assert stage.tensor([], 5).shape == (0, 5)


def test_a_table_longer_than_the_width_is_an_error():
    with pytest.raises(ValueError, match="a block table of 4 blocks; at most 3 fit"):
        BlockTableStage().tensor([[1, 2], [1, 2, 3, 4]], 3)
