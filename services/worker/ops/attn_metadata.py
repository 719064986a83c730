"""Attention metadata: built once per step by the runner, read by every layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class AttnMetadata:
    """Where each scheduled sequence's new tokens sit, and where their KV goes.

    Tokens of the step are packed: sequence i owns rows
    `[cu_seqlens_q[i], cu_seqlens_q[i + 1])` of the step's query tensor, at positions
    `[context_lens[i] - q_len_i, context_lens[i])` of its own sequence.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: flat KV slot of each new token
    context_lens: torch.Tensor  # [num_seqs] int32: tokens with KV after this step
    block_tables: torch.Tensor  # [num_seqs, max_num_blocks] int32, padded with 0
    cu_seqlens_q: list[int]  # host copy: query row offsets, len num_seqs + 1
    context_lens_host: list[int]
    num_decode_seqs: int  # the first num_decode_seqs sequences have q_len == 1
    cu_seqlens_q_dev: torch.Tensor | None = None  # int32 device copy (GPU paths)
    max_q: int = 1
    # per-step values that attention routes derive once and every layer reuses
    derived: dict[str, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens_host)

    @property
    def is_decode_only(self) -> bool:
        return self.num_decode_seqs == self.num_seqs



class BlockTableStage:
    """A step's padded int32 block tables `[num_seqs, width]`, built on the host from the
    last step's.

    A sequence keeps its block-table list from step to step and the list only grows (append):
    the block manager gives a sequence a new list whenever it changes an entry (copy-on-write)
    or frees its blocks. So a row whose table is the same list object, of the same length, as
    the last step's row at that index already holds the right entries and is not converted
    again: a decode step converts only the tables that grew a block. Rows are left-aligned
    and padded with 0; a table longer than `width` is a ValueError.
    """

    def __init__(self, pin: bool = False):
        self.pin = pin  # pinned results, for non-blocking copies to a GPU
        self._rows = np.zeros((0, 0), dtype=np.int32)
        self._keys: list[tuple[list[int], int]] = []  # (table, its length) of each row

    def tensor(self, tables: list[list[int]], width: int) -> torch.Tensor:
        """The tables as a new host tensor (never aliasing the stage's own rows)."""
        n = len(tables)
        if n > self._rows.shape[0] or width > self._rows.shape[1]:  # grow; forget the rows
            shape = (max(n, 2 * self._rows.shape[0]), max(width, 2 * self._rows.shape[1]))
            self._rows = np.zeros(shape, dtype=np.int32)
            self._keys = []
        rows, keys = self._rows, self._keys
        for i, table in enumerate(tables):
            size = len(table)
            if size > width:
                raise ValueError(f"a block table of {size} blocks; at most {width} fit")
            if i < len(keys) and keys[i][0] is table and keys[i][1] == size:
                continue
            rows[i, :size] = table
            rows[i, size:] = 0
            if i < len(keys):
                keys[i] = (table, size)
            else:
                keys.append((table, size))
        out = torch.empty(n, width, dtype=torch.int32, pin_memory=self.pin)
        out.numpy()[:] = rows[:n, :width]
        return out
