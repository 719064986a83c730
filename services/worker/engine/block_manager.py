"""Paged KV blocks: reference counts, copy-on-write fork, prefix cache, reservations.

A block holds the KV of `block_size` consecutive token positions of one or more
sequences. A full block is identified by a chained content hash
(hash of the previous block's hash and this block's token ids), so a later
request with the same prefix can reuse it. Free blocks that still hold cached
content sit in an LRU and are evicted (their hash forgotten) only when no
never-cached free block is left.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from services.worker.engine.sequence import Sequence


class NoFreeBlocksError(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))  # hold no cached content
        self.cached_free: OrderedDict[int, None] = OrderedDict()  # LRU: oldest first
        self.hash_to_block: dict[int, int] = {}
        self.pending_copies: list[tuple[int, int]] = []  # copy-on-write (src, dst) for the runner
        self.num_query_tokens = 0
        self.num_hit_tokens = 0

    # ---- counters
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids) + len(self.cached_free)

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation
    def _take(self) -> int:
        if self.free_ids:
            b = self.free_ids.popleft()
        elif self.cached_free:
            b, _ = self.cached_free.popitem(last=False)
            self._forget(b)
        else:
            raise NoFreeBlocksError("no free KV blocks")
        assert self.ref_counts[b] == 0
        self.ref_counts[b] = 1
        return b

    def _forget(self, b: int) -> None:
        h = self.block_hash[b]
        if h is not None and self.hash_to_block.get(h) == b:
            del self.hash_to_block[h]
        self.block_hash[b] = None
        self.block_tokens[b] = None

    def _release(self, b: int) -> None:
        self.ref_counts[b] -= 1
        assert self.ref_counts[b] >= 0, f"block {b} released more often than taken"
        if self.ref_counts[b] > 0:
            return
        h = self.block_hash[b]
        if self.enable_prefix_caching and h is not None and self.hash_to_block.get(h) == b:
            self.cached_free[b] = None
        else:
            self._forget(b)
            self.free_ids.append(b)

    def acquire_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks matching the start of a fresh sequence; returns tokens hit.

        At least the last token is always left to compute: its logits are needed.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return 0
        bs, parent = self.block_size, None
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = hash((parent, tokens))
            b = self.hash_to_block.get(h)
            if b is None or self.block_tokens[b] != tokens:
                break
            if self.ref_counts[b] == 0:
                del self.cached_free[b]
            self.ref_counts[b] += 1
            seq.block_table.append(b)
            parent = h
        hit = len(seq.block_table) * bs
        seq.num_computed_tokens = seq.num_cached_tokens = hit
        seq.committed_blocks, seq.committed_hash = len(seq.block_table), parent
        return hit

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count an admitted sequence's lookup (a lookup that is retried counts once)."""
        self.num_query_tokens += num_tokens
        self.num_hit_tokens += num_hit_tokens

    def ensure_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for KV of positions [num_computed, num_computed + num_new_tokens).

        Copies a shared partial block first (copy-on-write). Returns False, allocating
        nothing, when not enough blocks are free.
        """
        start = seq.num_computed_tokens
        need = self.blocks_needed(start + num_new_tokens) - len(seq.block_table)
        bi = start // self.block_size
        cow = bi < len(seq.block_table) and self.ref_counts[seq.block_table[bi]] > 1
        if max(need, 0) + cow > self.num_free_blocks:
            return False
        if cow:
            src = seq.block_table[bi]
            dst = self._take()
            self.pending_copies.append((src, dst))
            self._release(src)
            # a new list, never an entry changed in place: the runner's BlockTableStage knows
            # an unchanged table by its identity and length
            seq.block_table = seq.block_table[:bi] + [dst] + seq.block_table[bi + 1 :]
        for _ in range(need):
            seq.block_table.append(self._take())
        return True

    def reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for a sequence whose first `num_tokens` KV positions arrive from a peer."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        return self.ensure_slots(seq, num_tokens)

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's newly full blocks in the prefix cache.

        Starts from the blocks it committed before (a full block never changes while the
        sequence holds it): a decode step costs O(1), not O(context). From the start again
        if the table was changed under it (its last committed block lost that hash)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        start, parent = seq.committed_blocks, seq.committed_hash
        if start > num_full or (start and self.block_hash[seq.block_table[start - 1]] != parent):
            start, parent = 0, None
        for i in range(start, num_full):
            b = seq.block_table[i]
            h = self.block_hash[b]
            if h is None:
                tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                h = hash((parent, tokens))
                self.block_hash[b] = h
                self.block_tokens[b] = tokens
                self.hash_to_block.setdefault(h, b)
            parent = h
        seq.committed_blocks, seq.committed_hash = num_full, parent

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent; writes into a shared block copy it."""
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens
        child.committed_blocks = parent.committed_blocks
        child.committed_hash = parent.committed_hash
        for b in child.block_table:
            self.ref_counts[b] += 1

    def free(self, seq: Sequence) -> None:
        """Give back every block of the sequence (finished, aborted or preempted)."""
        for b in reversed(seq.block_table):  # tail first, so the LRU evicts tails before heads
            self._release(b)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.committed_blocks, seq.committed_hash = 0, None

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def check_invariants(self) -> None:
        """Every block is either referenced or free, exactly once (used by tests)."""
        free = set(self.free_ids) | set(self.cached_free)
        assert len(free) == len(self.free_ids) + len(self.cached_free), "block freed twice"
        for b in range(self.num_blocks):
            assert self.ref_counts[b] >= 0
            assert (self.ref_counts[b] == 0) == (b in free), f"block {b} ref/free mismatch"
