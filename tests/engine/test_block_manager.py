"""BlockManager: references, LRU reuse of cached blocks, eviction hook, KV events."""

from kvgrid import keys
from kvgrid.engine.block_manager import BlockManager
from kvgrid.engine.sampling_params import SamplingParams
from kvgrid.engine.sequence import Sequence
from kvgrid.events import BlockRemoved, BlockStored

BS = 4
SCOPE = keys.KVScope("test-model", "float32").digest


def make_seq(tokens, rid="r"):
    return Sequence(rid, tokens, SamplingParams(max_tokens=4), SCOPE, BS, 4)


def fill(bm, seq):
    assert bm.ensure_slots(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit_full_blocks(seq, seq.block_keys(seq.num_tokens // BS))


def test_shared_prefix_is_reference_counted_and_revived_after_free():
    bm = BlockManager(8, BS)
    a = make_seq(list(range(10)), "a")
    fill(bm, a)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    b = make_seq(list(range(8)) + [99, 98], "b")
    hits = bm.match_prefix(b.block_keys(2))
    assert hits == a.block_table[:2]
    bm.take_cached(b, hits)
    assert bm.blocks[hits[0]].ref_count == 2
    bm.free_seq(a)
    bm.free_seq(b)
    assert bm.num_free_blocks == 8
    # freed but still cached: a new request with the prefix finds the same blocks
    c = make_seq(list(range(8)) + [5], "c")
    assert bm.match_prefix(c.block_keys(2)) == hits
    assert bm.num_revived(hits) == 2


def test_lru_evicts_unkeyed_then_oldest_and_reports_eviction():
    bm = BlockManager(4, BS)
    a = make_seq(list(range(9)), "a")  # 2 full blocks + 1 partial
    fill(bm, a)
    full = a.block_table[:2]
    partial = a.block_table[2]
    bm.free_seq(a)
    bm.drain_events()
    d = make_seq([7] * 5, "d")
    taken = bm.allocate(d, 2)
    # the partial (unkeyed) block and the never-used one go first; cached ones survive
    assert partial in taken and not set(full) & set(taken)
    assert bm.take_evictions() == []
    e = make_seq([8] * 5, "e")
    taken = bm.allocate(e, 2)
    # the tail block of the prefix is evicted before its parent: free order was reversed
    assert taken[0] == full[1]
    evicted = bm.take_evictions()
    assert [ev.block_id for ev in evicted] == [full[1], full[0]]
    events = bm.drain_events()
    assert all(isinstance(ev, BlockRemoved) and ev.tier == "G1" for ev in events)
    assert not bm.match_prefix(a.block_keys(1))


def test_block_stored_events_chain_parents():
    bm = BlockManager(8, BS)
    a = make_seq(list(range(12)), "a")
    fill(bm, a)
    (ev,) = bm.drain_events()
    assert isinstance(ev, BlockStored)
    assert ev.keys == tuple(a.block_keys(3)) and ev.parent_key is None and ev.token_count == 12
    # a continuation reports only its new block, with the right parent
    b = make_seq(list(range(16)), "b")
    bm.take_cached(b, bm.match_prefix(b.block_keys(3)))
    fill(bm, b)
    (ev,) = bm.drain_events()
    assert ev.keys == (b.block_keys(4)[3],) and ev.parent_key == a.block_keys(3)[2]


def test_tenants_do_not_share_blocks():
    bm = BlockManager(8, BS)
    scope = keys.KVScope("test-model", "float32")
    t1 = scope.with_tenant(keys.tenant_scope(b"secret", "alice")).digest
    t2 = scope.with_tenant(keys.tenant_scope(b"secret", "bob")).digest
    a = Sequence("a", list(range(8)), SamplingParams(), t1, BS, 4)
    fill(bm, a)
    same = Sequence("a2", list(range(8)) + [1], SamplingParams(), t1, BS, 4)
    other = Sequence("b", list(range(8)) + [1], SamplingParams(), t2, BS, 4)
    assert len(bm.match_prefix(same.block_keys(2))) == 2
    assert bm.match_prefix(other.block_keys(2)) == []
