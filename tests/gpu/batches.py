"""Random decode steps for the GPU tests that call ModelRunner.run directly."""

from __future__ import annotations

import random


def random_decode_batch(rng: random.Random, n: int, num_blocks: int, max_context: int,
                        block_size: int = 16) -> list[tuple[list[int], int, int, list[int]]]:
    """runner.run's batch of n sequences decoding one token each (an id below 500) at a
    context of 1 to max_context tokens, their block tables disjoint and scattered over
    num_blocks blocks."""
    free = rng.sample(range(num_blocks), num_blocks)
    batch = []
    for _ in range(n):
        ctx = rng.randint(1, max_context)
        table = [free.pop() for _ in range(-(-ctx // block_size))]
        batch.append(([rng.randrange(500)], ctx - 1, ctx, table))
    return batch
