"""The block pool: allocation, truncation, fork with shared blocks, copy-on-write, and invariants."""
import pytest

from afford.kv.paged import BlockPool, OutOfBlocks


def test_allocate_append_truncate_free():
    pool = BlockPool(8, 4)
    assert pool.prepare_write(1, 6) == []
    assert len(pool.tables[1]) == 2 and pool.num_free == 6
    pool.prepare_write(1, 9)                       # grows into a third block
    assert len(pool.tables[1]) == 3
    pool.truncate(1, 5)                            # rollback frees the third block
    assert len(pool.tables[1]) == 2 and pool.lens[1] == 5
    assert pool.slots(1, 3, 6) == [pool.tables[1][0] * 4 + 3, pool.tables[1][1] * 4, pool.tables[1][1] * 4 + 1]
    pool.check()
    pool.free(1)
    pool.check()
    assert pool.num_free == 8


def test_fork_shares_blocks_and_copies_on_write():
    pool = BlockPool(8, 4)
    pool.prepare_write(1, 6)                       # blocks [a, b], b half full
    pool.fork(1, 2)
    assert pool.tables[2] == pool.tables[1] and pool.num_used == 2
    copies = pool.prepare_write(2, 7)              # writing into shared b copies it
    assert len(copies) == 1 and copies[0][0] == pool.tables[1][1] and copies[0][1] == pool.tables[2][1]
    assert pool.tables[2][0] == pool.tables[1][0]  # the full prefix block stays shared
    assert pool.prepare_write(1, 7) == []          # b now has one owner: no copy
    pool.check()
    pool.free(1)
    pool.free(2)
    pool.check()
    assert pool.num_free == 8


def test_out_of_blocks_is_refused_not_corrupting():
    pool = BlockPool(2, 4)
    pool.prepare_write(1, 8)
    assert not pool.can_grow(2, 1)
    with pytest.raises(OutOfBlocks):
        pool.prepare_write(2, 1)
    pool.check()
