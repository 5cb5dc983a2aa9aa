"""KVIndex: prefix overlap per worker and tier, numbered batches, gaps and snapshots."""

from kvgrid import keys
from kvgrid.events import AllCleared, BlockRemoved, BlockStored, EventBatch
from kvgrid.router import wire
from kvgrid.router.index import KVIndex

SCOPE = keys.KVScope("m", "float32")


def chain(tokens_blocks: int, start: int = 0) -> list[bytes]:
    toks = list(range(start, start + 64 * tokens_blocks))
    return keys.block_keys(toks, SCOPE)


def synced(index: KVIndex, *workers: str) -> None:
    for w in workers:
        index.add_worker(w)
        assert index.is_stale(w)  # unknown history until the first snapshot
        assert index.apply_snapshot(w, 0, {}) == "ok"


def stored(w: str, seq: int, ks, tier="G1") -> EventBatch:
    return EventBatch(w, seq, 0.0, [BlockStored(tuple(ks), None, tier, 64 * len(ks))])


def test_overlap_is_leading_prefix_per_worker_and_tier():
    idx = KVIndex()
    synced(idx, "a", "b", "c")
    k = chain(6)
    assert idx.apply_batch(stored("a", 1, k[:4])) == "ok"
    # b holds blocks 0,1 in G1 and 2 in G2 but not 3; block 4 alone cannot count
    assert idx.apply_batch(stored("b", 1, k[:2])) == "ok"
    assert idx.apply_batch(stored("b", 2, [k[2]], "G2")) == "ok"
    assert idx.apply_batch(stored("b", 3, [k[4]])) == "ok"
    ov = idx.overlap(k)
    assert ov["a"].blocks == 4 and ov["a"].by_tier == [4, 0, 0, 0]
    assert ov["b"].blocks == 3 and ov["b"].by_tier == [2, 1, 0, 0]
    assert "c" not in ov
    # a block in the shared tier serves everyone, and extends b's chain past block 2
    assert idx.apply_batch(stored("c", 1, [k[3]], "G4")) == "ok"
    ov = idx.overlap(k)
    assert ov["b"].blocks == 5 and ov["b"].by_tier == [3, 1, 0, 1]
    assert "c" not in ov  # c has no block 0
    # predicted blocks (router's recent decisions) count separately
    ov = idx.overlap(k, predicted={k[0]: 1 << idx.bit("c"), k[1]: 1 << idx.bit("c")})
    assert ov["c"].blocks == 2 and ov["c"].predicted == 2


def test_removed_and_cleared_and_lost_worker():
    idx = KVIndex()
    synced(idx, "a", "b")
    k = chain(3)
    idx.apply_batch(stored("a", 1, k))
    idx.apply_batch(stored("b", 1, k))
    idx.apply_batch(EventBatch("a", 2, 0.0, [BlockRemoved((k[1],), "G1")]))
    assert idx.overlap(k)["a"].blocks == 1
    idx.apply_batch(EventBatch("a", 3, 0.0, [AllCleared()]))
    assert "a" not in idx.overlap(k) and idx.num_blocks("a") == 0
    idx.remove_worker("b")
    assert idx.overlap(k) == {}
    # the freed bit is reused without inheriting b's blocks
    synced(idx, "c")
    assert idx.overlap(k) == {}


def test_gap_marks_stale_and_snapshot_resyncs_with_buffered_batches():
    idx = KVIndex()
    synced(idx, "a")
    k = chain(4)
    assert idx.apply_batch(stored("a", 1, [k[0]])) == "ok"
    assert idx.apply_batch(stored("a", 1, [k[0]])) == "duplicate"
    assert idx.apply_batch(stored("a", 3, [k[2]])) == "gap"  # batch 2 was lost
    assert idx.is_stale("a")
    assert idx.apply_batch(stored("a", 4, [k[3]])) == "buffered"
    # snapshot taken at seq 3: holds blocks 0..2; batch 4 is replayed after it
    assert idx.apply_snapshot("a", 3, {"G1": k[:3]}) == "ok"
    assert not idx.is_stale("a") and idx.seq("a") == 4
    assert idx.overlap(k)["a"].blocks == 4
    # a heartbeat announcing a later seq reveals lost tail batches
    assert idx.note_seq("a", 4) is False
    assert idx.note_seq("a", 6) is True and idx.is_stale("a")


def test_wire_roundtrip():
    k = chain(2)
    b = EventBatch(
        "w1",
        7,
        1.5,
        [BlockStored(tuple(k), None, "G1", 128), BlockRemoved((k[0],), "G2"), AllCleared(None)],
    )
    back, epoch = wire.decode_batch(wire.encode_batch(b, "e1"))
    assert back == b and epoch == "e1"
    snap = wire.decode_snapshot(wire.encode_snapshot("w1", "e1", 7, {"G1": k}))
    assert snap["tiers"]["G1"] == k and snap["seq"] == 7
    import pytest

    with pytest.raises(wire.WireError):
        wire.decode_batch(b"\x93garbage")


def test_block_keys_fast_path_equals_chained_block_key():
    """The router hashes prompts with keys.block_keys (one encode, sliced); it must give
    exactly the chain of keys.block_key, including continued chains."""
    import random

    rng = random.Random(7)
    scope = SCOPE.with_tenant(b"t")
    for _ in range(50):
        bs = rng.choice([1, 4, 16, 64])
        toks = [rng.randrange(2**32) for _ in range(rng.randint(0, 400))]
        ref, parent = [], None
        for b in range(len(toks) // bs):
            parent = keys.block_key(parent, scope.digest, toks[b * bs : (b + 1) * bs])
            ref.append(parent)
        assert keys.block_keys(toks, scope, bs) == ref
        if len(ref) > 1:
            s = rng.randrange(1, len(ref))
            assert keys.block_keys(toks, scope, bs, parent=ref[s - 1], start_block=s) == ref[s:]


def test_sample_owners_picks_distinct_holders_without_listing_them():
    import random

    idx = KVIndex()
    names = [f"w{i}" for i in range(300)]
    mask = 0
    for n in names:
        idx.add_worker(n)
        mask |= 1 << idx.bit(n)
    rng = random.Random(0)
    got = idx.sample_owners(mask, 8, rng)
    assert len(got) == len(set(got)) == 8 and set(got) <= set(names)
    few = (1 << idx.bit("w3")) | (1 << idx.bit("w7"))
    assert sorted(idx.sample_owners(few, 8, rng)) == ["w3", "w7"]
    # picks spread over the holders (not always the lowest bits)
    seen = {w for _ in range(50) for w in idx.sample_owners(mask, 8, rng)}
    assert len(seen) > 150


def test_sample_owners_draws_what_randrange_draws():
    """sample_owners spells rng.randrange out: same picks, same generator state after, so
    the simulator's preselection (and every later decision) is unchanged."""
    import random

    def reference(idx, mask, k, rng):  # the probing loop with rng.randrange, as it was
        owner, width, picked = idx._bit_owner, mask.bit_length(), set()
        for _ in range(64 * k):
            b = rng.randrange(width)
            if mask >> b & 1 and b in owner:
                picked.add(b)
                if len(picked) == k:
                    return [owner[b] for b in picked]
        return None

    idx = KVIndex()
    for i in range(1000):
        idx.add_worker(f"w{i}")
    for seed, width, step in ((0, 1000, 7), (1, 513, 3), (2, 64, 1), (3, 1000, 29)):
        mask = sum(1 << b for b in range(0, width, step))
        a, b = random.Random(seed), random.Random(seed)
        for _ in range(20):
            assert idx.sample_owners(mask, 8, a) == reference(idx, mask, 8, b)
        assert a.getstate() == b.getstate()


def test_overlap_of_no_keys_is_empty_and_misses_are_absent():
    idx = KVIndex()
    synced(idx, "a", "b")
    k = chain(3)
    assert idx.apply_batch(stored("a", 1, k[1:])) == "ok"  # not the first block: no match
    assert idx.overlap([]) == {} and idx.overlap([], within_mask=1) == {}
    assert idx.overlap(k) == {}
    assert idx.apply_batch(stored("b", 1, k[:2])) == "ok"
    assert {w: o.blocks for w, o in idx.overlap(k).items()} == {"b": 2}
    a, b = 1 << idx.bit("a"), 1 << idx.bit("b")
    assert list(idx.held_masks_deepest_first(k)) == [a, a | b, b]  # deepest first
    assert list(idx.held_masks_deepest_first(k[:1], {k[0]: 4})) == [4 | b]
