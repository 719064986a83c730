"""Block manager: reference counts, copy-on-write, prefix cache, no leaks (property tests)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from services.worker.engine.block_manager import BlockManager
from services.worker.engine.sampling_params import SamplingParams
from services.worker.engine.sequence import Sequence


def make_seq(tokens: list[int], i: int = 0) -> Sequence:
    return Sequence(rid=f"r{i}", index=0, token_ids=list(tokens),
                    num_prompt_tokens=len(tokens), params=SamplingParams(), arrival=i)


def compute(bm: BlockManager, seq: Sequence, n: int) -> bool:
    if not bm.ensure_slots(seq, n):
        return False
    seq.num_computed_tokens += n
    bm.commit(seq)
    return True


def test_prefix_hit_reuses_full_blocks_and_leaves_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(list(range(10)))
    assert bm.acquire_prefix(a) == 0
    assert compute(bm, a, 10)
    b = make_seq(list(range(10)) + [99], 1)
    assert bm.acquire_prefix(b) == 8  # two full blocks shared
    assert b.block_table[:2] == a.block_table[:2]
    assert all(bm.ref_counts[x] == 2 for x in a.block_table[:2])
    c = make_seq(list(range(8)), 2)  # whole prompt cached: the last block is recomputed
    assert bm.acquire_prefix(c) == 4
    for s in (a, b, c):
        bm.free(s)
    bm.check_invariants()
    assert bm.num_free_blocks == 16


def test_cached_free_blocks_survive_until_evicted():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(list(range(9)))
    compute(bm, a, 9)
    bm.free(a)
    assert len(bm.cached_free) == 2 and bm.num_free_blocks == 4
    b = make_seq(list(range(9)), 1)
    assert bm.acquire_prefix(b) == 8
    bm.free(b)
    c = make_seq([7] * 16, 2)  # needs all four blocks: evicts the cached ones
    assert compute(bm, c, 16)
    assert not bm.hash_to_block or all(bm.ref_counts[b] for b in bm.hash_to_block.values())
    bm.free(c)
    d = make_seq(list(range(9)), 3)
    assert bm.acquire_prefix(d) == 0
    bm.check_invariants()


def test_fork_copy_on_write_copies_shared_partial_block_once():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = make_seq(list(range(6)))
    compute(bm, parent, 6)
    child = make_seq(list(range(6)), 1)
    bm.fork(parent, child)
    assert bm.ref_counts[parent.block_table[1]] == 2
    parent.token_ids.append(1)
    child.token_ids.append(2)
    assert compute(bm, parent, 1)
    assert bm.take_copies() == [(child.block_table[1], parent.block_table[1])]
    assert compute(bm, child, 1)
    assert bm.take_copies() == []  # the child now owns the original alone
    assert parent.block_table[0] == child.block_table[0]
    assert parent.block_table[1] != child.block_table[1]
    bm.free(parent)
    bm.free(child)
    bm.check_invariants()
    assert bm.num_free_blocks == 8


def test_ensure_slots_allocates_nothing_when_short():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = make_seq(list(range(12)))
    assert not bm.ensure_slots(a, 12)
    assert a.block_table == [] and bm.num_free_blocks == 2
    assert bm.reserve(a, 8) and len(a.block_table) == 2


def assert_hashes_chain(bm: BlockManager, s: Sequence) -> None:
    """The blocks a sequence committed carry the chained hashes of its own tokens (commit
    continues from where it stopped: it must give what a commit from scratch gives)."""
    assert s.committed_blocks <= min(s.num_computed_tokens // 4, len(s.block_table))
    parent = None
    for i in range(s.committed_blocks):
        parent = hash((parent, tuple(s.token_ids[i * 4 : (i + 1) * 4])))
        assert bm.block_hash[s.block_table[i]] == parent
    assert s.committed_hash == parent


ops = st.lists(
    st.tuples(st.sampled_from(["new", "compute", "fork", "free"]),
              st.integers(0, 7), st.integers(1, 20), st.integers(0, 3)),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, caching=st.booleans())
def test_random_operations_keep_counts_sane_and_leak_nothing(ops, caching):
    bm = BlockManager(num_blocks=12, block_size=4, enable_prefix_caching=caching)
    live: list[Sequence] = []
    for k, (op, pick, n, prefix) in enumerate(ops):
        if op == "new":  # prompts drawn from 4 prefixes so that caching gets hits
            s = make_seq([prefix] * 6 + [k] * n, k)
            bm.acquire_prefix(s)
            if compute(bm, s, s.num_uncomputed_tokens):
                live.append(s)
            else:
                bm.free(s)
        elif live and op == "compute":
            s = live[pick % len(live)]
            s.token_ids.append(n)
            compute(bm, s, s.num_uncomputed_tokens)
        elif live and op == "fork":
            parent = live[pick % len(live)]
            child = make_seq(parent.token_ids, k)
            bm.fork(parent, child)
            live.append(child)
        elif live and op == "free":
            bm.free(live.pop(pick % len(live)))
        bm.check_invariants()
        assert all(r >= 0 for r in bm.ref_counts)
        for s in live:  # a block table always covers the computed tokens
            assert len(s.block_table) * 4 >= s.num_computed_tokens
            if caching:
                assert_hashes_chain(bm, s)
    for s in live:
        bm.free(s)
    bm.check_invariants()
    assert bm.num_free_blocks == 12
    assert all(r == 0 for r in bm.ref_counts)
