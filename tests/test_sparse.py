"""Block-sparse decode attention (attention="sparse") and its two-tier KV store (kv/offload.py)."""
from __future__ import annotations

import pytest
import torch

from afford import LLM, SamplingParams
from afford.attention import get_backend
from afford.config import ConfigError
from afford.kv.offload import FastTier
from tests.test_fastpath import BS, KV, D, H, Truth


def test_full_budget_equals_dense_attention_through_both_tiers():
    """Forced onto the sparse path (dense_below=0) with a budget covering every block: every query equals
    dense attention, across block boundaries, after truncate and after fork."""
    backend, t, g = get_backend("sparse", budget=64, dense_below=0), Truth(), torch.Generator().manual_seed(0)

    def check(*args):
        out, ref = t.step(backend, *args, g)
        assert (out - ref).abs().max() <= 1e-5, args

    check([0, 1, 2], [0, 0, 0], [9, 14, 3])
    for _ in range(7):
        check([0, 1, 2], [len(t.k[s]) for s in (0, 1, 2)], [1, 1, 1])
    assert backend.tier.misses > 0 and backend.tier.hits > 0
    t.truncate(0, 10)                                   # rolled back: the rewritten block must not be served stale
    check([0], [10], [1])
    for _ in range(3):
        check([0], [len(t.k[0])], [1])
    t.fork(1, 3)
    check([1, 3], [len(t.k[1]), len(t.k[3])], [1, 1])
    check([3, 1], [len(t.k[3]), len(t.k[1])], [1, 1])
    t.pool.check()


def test_a_small_budget_reads_fewer_bytes_and_the_locality_share_reuses_blocks():
    reads = {}
    for locality in (0.0, 0.5):
        backend, t, g = get_backend("sparse", budget=6, locality=locality, dense_below=0), Truth(128), \
            torch.Generator().manual_seed(1)
        t.step(backend, [0], [0], [160], g)             # 40 blocks of 4
        before = backend.read_bytes
        for _ in range(40):
            t.step(backend, [0], [len(t.k[0])], [1], g)
        steps_bytes = backend.read_bytes - before
        per_token = 2 * KV * D * 4
        # each step reads at most 6 blocks (the one being written may be partial) plus the compressed keys
        assert steps_bytes <= 40 * (6 * BS + -(-(len(t.k[0])) // BS)) * per_token
        assert backend.dense_bytes > 2 * backend.read_bytes      # blocks of 4: the compressed keys are 1/4 of it
        reads[locality] = backend.tier.hit_rate
    assert reads[0.5] >= reads[0.0]


def test_fast_tier_counts_only_new_blocks_and_round_trips_bytes():
    g = torch.Generator().manual_seed(2)
    k_pool, v_pool = torch.randn(10 * BS, KV, D, generator=g), torch.randn(10 * BS, KV, D, generator=g)
    tier = FastTier(3, 1, BS, KV, D, torch.float32, torch.device("cpu"))
    block = tier.block_bytes
    for want, hits, misses in (([1, 2], 0, 2), ([2, 1], 2, 2), ([2, 5], 3, 3), ([7, 8, 2], 4, 5), ([1], 4, 6)):
        slots = tier.fetch(0, want, k_pool, v_pool)
        assert (tier.hits, tier.misses) == (hits, misses), want
        assert tier.bytes_moved == misses * block
        for b, s in zip(want, slots.tolist()):          # the fast copy is the slow tier's bytes, exactly
            assert torch.equal(tier.k[0, s], k_pool[b * BS:(b + 1) * BS])
            assert torch.equal(tier.v[0, s], v_pool[b * BS:(b + 1) * BS])
    assert tier.size == 3 and tier.hit_rate == 4 / 10
    tier.invalidate([1])
    tier.fetch(0, [1], k_pool, v_pool)
    assert tier.misses == 7
    with pytest.raises(ValueError):
        tier.fetch(0, [1, 2, 3, 4], k_pool, v_pool)


def test_engine_with_sparse_attention(llama_dir):
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    prompt = "The king said to the lords of the court that they would ride at dawn " * 6
    dense = LLM(str(llama_dir), attention="cpu_paged", block_size=16).generate(prompt, sp)[0]
    full = LLM(str(llama_dir), attention="sparse", block_size=16, sparse_budget=64, sparse_dense_below=0)
    out = full.generate(prompt, sp)[0]
    assert out.token_ids == dense.token_ids
    assert max(abs(a["logprob"] - b["logprob"]) for a, b in zip(out.logprobs, dense.logprobs)) < 1e-4
    small = LLM(str(llama_dir), attention="sparse", block_size=16, sparse_budget=4)
    small.generate(prompt, sp)
    st = small.stats.sparse
    assert st["read_bytes"] < st["dense_bytes"] / 2 and st["moved_bytes"] > 0
    assert "sparse attention: K/V read" in small.stats.line()
    small.engine.pool.check()
    with pytest.raises(ConfigError, match="sparse_budget"):
        LLM(str(llama_dir), attention="sparse", sparse_budget=2)


def test_the_slow_tier_on_a_memory_mapped_file_round_trips_and_leaves_nothing(tmp_path):
    """kv_mmap_dir: the K/V pool (the slow tier) is one memory-mapped file, zeros at first, each layer's K and
    V a separate contiguous view that keeps exactly the bytes written; the file is unlinked at once."""
    from afford.core.runner import kv_pool_tensors
    pools = kv_pool_tensors(3, 40, KV, D, torch.float32, torch.device("cpu"), str(tmp_path / "kv"))
    assert list((tmp_path / "kv").iterdir()) == []
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(40, KV, D, generator=g), torch.randn(40, KV, D, generator=g)) for _ in range(3)]
    for (k, v), (dk, dv) in zip(pools, data):
        assert k.is_contiguous() and v.is_contiguous() and not k.any() and not v.any()
        k.copy_(dk)
        v.copy_(dv)
    for (k, v), (dk, dv) in zip(pools, data):
        assert torch.equal(k, dk) and torch.equal(v, dv)
    with pytest.raises(ConfigError, match="kv_mmap_dir"):
        kv_pool_tensors(1, 4, KV, D, torch.float32, torch.device("cpu"), "/proc/afford-kv")


def test_sparse_attention_over_a_memory_mapped_slow_tier_equals_it_in_ram(llama_dir, tmp_path):
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompt = "The king said to the lords of the court that they would ride at dawn " * 6
    kw = dict(attention="sparse", block_size=16, sparse_budget=4)
    ram = LLM(str(llama_dir), **kw).generate(prompt, sp)[0]
    mapped = LLM(str(llama_dir), kv_mmap_dir=str(tmp_path), **kw)
    assert mapped.generate(prompt, sp)[0].token_ids == ram.token_ids
    assert mapped.stats.sparse["moved_bytes"] > 0 and list(tmp_path.iterdir()) == []


def test_the_bound_score_finds_a_block_that_one_key_matches():
    """score="bound" (Quest): a block holding one key along the query (and three against it) is picked by the
    per-channel min / max bound, while its mean-pooled key points away; with a budget covering every block
    both scores equal dense attention."""
    g = torch.Generator().manual_seed(4)
    for score in ("mean", "bound"):
        backend, t = get_backend("sparse", budget=64, dense_below=0, score=score), Truth()
        t.step(backend, [0, 1], [0, 0], [30, 17], g)
        for _ in range(5):
            out, ref = t.step(backend, [0, 1], [len(t.k[0]), len(t.k[1])], [1, 1], g)
            assert (out - ref).abs().max() <= 1e-5, score
    picked = {}
    for score in ("mean", "bound"):
        backend, t = get_backend("sparse", budget=4, locality=0.0, dense_below=0, score=score), Truth(128)
        t.step(backend, [0], [0], [64], torch.Generator().manual_seed(5))            # 16 full blocks of 4
        table, qv = t.pool.tables[0], torch.randn(D, generator=g)
        keys = torch.randn(16, BS, KV, D, generator=g) * 0.5
        keys[9] = -3.0 * qv / qv.norm()
        keys[9, 2] = 8.0 * qv / qv.norm()
        phys = torch.tensor(table)
        if score == "bound":
            assert backend.kmean is None
            backend.kmin[0, phys], backend.kmax[0, phys] = keys.amin(1), keys.amax(1)
        else:
            assert backend.kmin is None
            backend.kmean[0, phys] = keys.mean(1)
        picked[score] = backend.select(0, table, 64, qv.expand(H, D), torch.arange(H) // (H // KV))
    assert 9 in picked["bound"] and 9 not in picked["mean"]
    with pytest.raises(ValueError, match="sparse_score"):
        get_backend("sparse", score="max")


def test_sparse_fine_tuning_trains_in_the_pattern_the_backend_decodes_with():
    """sparse_train_mask (afford zoo train --sparse-budget): causal, every query keeps the first block and the
    last two, at most `budget` blocks; with a budget covering every block it is the causal mask; and for a
    query at the end of a context it picks the blocks the sparse backend's decode query picks (bound score,
    no locality share)."""
    from afford.models.transformer import sparse_train_mask
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(1, 50, H, D, generator=g), torch.randn(1, 50, KV, D, generator=g)
    assert torch.equal(sparse_train_mask(q, k, 100, BS)[0, 0], torch.ones(50, 50, dtype=torch.bool).tril())
    m = sparse_train_mask(q, k, 6, BS)[0, 0]
    for t in range(50):
        blocks = {s // BS for s in range(t + 1) if m[t, s]}
        assert not m[t, t + 1:].any() and m[t, t] and len(blocks) <= 6 and {0, t // BS, max(t // BS - 1, 0)} <= blocks
    backend, t = get_backend("sparse", budget=6, locality=0.0, dense_below=0, score="bound"), Truth(128)
    t.step(backend, [0], [0], [60], g)                     # 15 full blocks of 4, out of order in the pool
    keys = t.k[0]                                          # (60, KV, D)
    qv = torch.randn(H, D, generator=g)
    picked = backend.select(0, t.pool.tables[0], 61, qv, torch.arange(H) // (H // KV))
    kk = torch.cat([keys, torch.randn(1, KV, D, generator=g)])[None]      # the query's own key at position 60
    qq = torch.cat([torch.randn(60, H, D, generator=g), qv[None]])[None]
    row = sparse_train_mask(qq, kk, 6, BS)[0, 0, 60]
    assert sorted({s // BS for s in range(61) if row[s]}) == picked
