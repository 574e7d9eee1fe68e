"""Automatic prefix caching and chunked prefill: exact (the same greedy tokens as without them, fp32), the
pool's bookkeeping (reference counts, LRU eviction, copy-on-write of cached blocks, all free after a
reset), and decodes that keep advancing while a long prompt is prefilled."""
import pytest
import torch

from afford import LLM, SamplingParams
from afford.kv.paged import BlockPool

GREEDY = SamplingParams(max_tokens=24, temperature=0)


def token_prompts(n, lo, hi, seed=0, prefix=()):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(2, 512, (int(k),), generator=g).tolist()
            for k in torch.randint(lo, hi, (n,), generator=g)]


# ---- the pool ----

def test_match_takes_the_longest_cached_chain_and_only_exact_tokens():
    pool = BlockPool(16, 4, prefix_caching=True)
    toks = list(range(10, 24))                     # 14 tokens: 3 full blocks + 2
    assert pool.match_prefix(1, toks) == 0
    pool.prepare_write(1, 14)
    pool.register(1, toks, 14)
    assert pool.num_cached == 3
    # same first 2 blocks, different third: 8 tokens reused
    other = toks[:8] + [99] * 6
    assert pool.match_prefix(2, other) == 8
    assert pool.tables[2] == pool.tables[1][:2]
    # the same tokens of block 2 after a different block 1 do not match (the key includes the parent)
    assert pool.match_prefix(3, [5, 5, 5, 5] + toks[4:]) == 0
    # at most all but the last token: a 12-token prompt (3 full blocks) reuses 2, its last block is computed
    assert pool.match_prefix(4, toks[:12]) == 8
    pool.check()
    for s in (1, 2, 3, 4):
        pool.free(s)
    pool.check()
    assert pool.num_used == 0 and pool.num_cached == 3     # freed but still cached (evictable)
    pool.reset_prefix_cache()
    pool.check()
    assert len(pool.free_blocks) == 16 and pool.num_cached == 0


def test_eviction_is_least_recently_freed_and_only_when_no_empty_block_is_left():
    pool = BlockPool(4, 2, prefix_caching=True)
    for sid, base in ((1, 10), (2, 20)):
        toks = [base, base + 1, base + 2]
        pool.prepare_write(sid, 3)
        pool.register(sid, toks, 3)                # one full block each
        pool.free(sid)                             # 1's block freed first
    assert pool.num_cached == 2 and pool.num_free == 4
    pool.prepare_write(3, 4)                       # takes the 2 empty blocks: nothing evicted
    assert pool.num_cached == 2
    pool.prepare_write(4, 2)                       # needs one more: evicts 1's block (freed first)
    assert pool.match_prefix(5, [10, 11, 12]) == 0
    assert pool.match_prefix(6, [20, 21, 22]) == 2
    pool.check()


def test_a_cached_block_is_copied_before_it_is_written():
    pool = BlockPool(8, 4, prefix_caching=True)
    toks = list(range(8))
    pool.prepare_write(1, 8)
    pool.register(1, toks, 8)
    cached = pool.tables[1][1]
    pool.truncate(1, 6)                            # roll back into a registered block (not done by the engine)
    copies = pool.prepare_write(1, 8)              # rewriting it must not change what the cache serves
    assert copies == [(cached, pool.tables[1][1])] and pool.tables[1][1] != cached
    assert pool.match_prefix(2, toks + [9]) == 8 and pool.tables[2][1] == cached
    pool.check()


def test_fork_shares_registered_blocks():
    pool = BlockPool(8, 4, prefix_caching=True)
    toks = list(range(6))
    pool.prepare_write(1, 6)
    pool.register(1, toks, 6)
    pool.fork(1, 2)
    pool.register(2, toks, 6)                      # nothing new: the full block is already registered
    assert pool.num_cached == 1 and pool.ref[pool.tables[1][0]] == 2
    pool.prepare_write(2, 7)                       # the shared partial block is copied, as before
    pool.check()


# ---- the engine: exact, counted, all free ----

def greedy(llm, prompts):
    return [o.token_ids for o in llm.generate(prompts, GREEDY)]


def test_prefix_caching_is_exact_and_reuses_shared_prompts(random_pair):
    shared = token_prompts(4, 20, 60, seed=1, prefix=token_prompts(1, 48, 49, seed=9)[0])   # 48-token prefix
    unshared = token_prompts(4, 10, 70, seed=2)
    off = LLM(str(random_pair[0]), enable_prefix_caching=False)
    on = LLM(str(random_pair[0]))
    ref = greedy(off, shared + unshared)
    assert [greedy(on, [p])[0] for p in shared + unshared] == ref       # one at a time: later ones hit
    assert greedy(on, shared + unshared) == ref                         # again, batched: all hit
    pool = on.engine.pool
    assert pool.hit_tokens >= 3 * 48 and off.engine.pool.hit_tokens == 0
    assert "prefix cache" in on.engine.stats.line()
    assert pool.num_used == 0
    pool.check()
    pool.reset_prefix_cache()
    assert len(pool.free_blocks) == pool.num_blocks


def test_prefix_caching_exact_under_preemption_and_eviction(random_pair):
    ps = token_prompts(6, 30, 60, seed=3, prefix=list(range(100, 132)))
    ref = greedy(LLM(str(random_pair[0]), enable_prefix_caching=False), ps)
    small = LLM(str(random_pair[0]), kv_blocks=24, block_size=8, max_model_len=128)   # too few for 6 at once
    assert greedy(small, ps) == ref
    assert greedy(small, list(reversed(ps))) == list(reversed(ref))
    eng = small.engine
    assert eng.stats.preemptions > 0 and eng.pool.hit_tokens > 0
    assert eng.pool.num_used == 0
    eng.pool.check()


@pytest.mark.parametrize("spec", [dict(draft="d"), dict(draft="ngram")])
def test_prefix_caching_with_speculation_and_n(random_pair, spec):
    target, draft = map(str, random_pair)
    if spec["draft"] == "d":
        spec = dict(draft=draft)
    ps = token_prompts(4, 20, 40, seed=4, prefix=list(range(200, 240)))
    ref = greedy(LLM(target, enable_prefix_caching=False), ps)
    llm = LLM(target, num_speculative_tokens=3, **spec)
    assert [greedy(llm, [p])[0] for p in ps] == ref
    eng = llm.engine
    assert eng.stats.drafted > 0 and eng.pool.hit_tokens >= 3 * 32
    if spec["draft"] != "ngram":
        assert eng.speculator.proposer.pool.hit_tokens >= 3 * 32        # the draft's cache too
        eng.speculator.proposer.pool.check()
    # n > 1 shares the prompt: every choice equals the greedy reference
    outs = llm.generate([ps[0]], SamplingParams(max_tokens=24, temperature=0, n=3))[0]
    assert [c.token_ids for c in outs.outputs] == [ref[0]] * 3
    assert eng.pool.num_used == 0
    eng.pool.check()


# ---- chunked prefill ----

def test_chunked_prefill_equals_one_shot(random_pair):
    target, draft = map(str, random_pair)
    ps = token_prompts(5, 60, 200, seed=6)                             # longer than the 32-token budget
    ref = greedy(LLM(target, enable_chunked_prefill=False, enable_prefix_caching=False), ps)
    for kw in (dict(), dict(draft=draft), dict(draft="ngram")):
        llm = LLM(target, max_num_batched_tokens=32, enable_prefix_caching=False, **kw)
        assert greedy(llm, ps) == ref, kw
        assert llm.engine.stats.max_step_tokens <= 32                  # prompts took several steps each
        assert llm.engine.stats.prompt_tokens == sum(map(len, ps))
        assert llm.engine.pool.num_used == 0


def test_decodes_advance_while_a_long_prompt_is_prefilled(random_pair):
    llm = LLM(str(random_pair[0]), max_num_batched_tokens=16, enable_prefix_caching=False)
    eng = llm.engine
    short = eng.add_request(token_prompts(1, 5, 6, seed=7)[0], SamplingParams(max_tokens=64, temperature=0,
                                                                             ignore_eos=True))
    eng.step()                                                           # its prefill
    assert short.num_output == 1
    long = eng.add_request(token_prompts(1, 120, 121, seed=8)[0], SamplingParams(max_tokens=4, temperature=0))
    kinds = []
    while long.num_output == 0:
        before = short.num_output
        eng.step()
        kinds.append(eng.stats.last.kind)
        assert short.num_output == before + 1                           # one token every step
    assert len(kinds) >= 120 // 15 and set(kinds) == {"mixed"}
    # the same long prompt alone, without chunking, gives the same tokens
    while eng.has_unfinished():
        eng.step()
    alone = LLM(str(random_pair[0]), enable_chunked_prefill=False, enable_prefix_caching=False)
    assert long.output_ids == greedy(alone, [long.prompt_ids])[0][:len(long.output_ids)]


def test_prompt_logprobs_with_chunking_and_caching(random_pair):
    p = token_prompts(1, 70, 71, seed=10)[0]
    sp = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=1)
    ref = LLM(str(random_pair[0]), enable_chunked_prefill=False, enable_prefix_caching=False).generate([p], sp)[0]
    llm = LLM(str(random_pair[0]), max_num_batched_tokens=16)
    for _ in range(2):                                                  # the second time its blocks are cached
        out = llm.generate([p], sp)[0]
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        assert out.prompt_logprobs == pytest.approx(ref.prompt_logprobs, abs=1e-4)
        assert len(out.prompt_logprobs) == len(p) - 1


# ---- shared-prefix sampling (HoneyBee-style) and self-consistency ----

def test_shared_prefix_sampling_decodes_the_prefix_once(random_pair):
    target, draft = map(str, random_pair)
    p = token_prompts(1, 10, 11, seed=12)[0]
    naive = SamplingParams(max_tokens=30, temperature=1.0, seed=5, n=4, ignore_eos=True)
    shared = SamplingParams(max_tokens=30, temperature=1.0, seed=5, n=4, ignore_eos=True, shared_prefix=10)
    for kw in (dict(), dict(draft=draft, num_speculative_tokens=3)):
        a, b = LLM(target, **kw), LLM(target, **kw)
        outs_a = a.generate([p], naive)[0].outputs
        outs_b = b.generate([p], shared)[0].outputs
        assert all(len(o.token_ids) == 30 for o in outs_a + outs_b)
        assert len({tuple(o.token_ids[:10]) for o in outs_b}) == 1            # one shared prefix
        assert len({tuple(o.token_ids[10:]) for o in outs_b}) > 1             # then they part
        assert len({tuple(o.token_ids[:10]) for o in outs_a}) > 1             # naive: independent from token 1
        # the prefix was decoded once: ~10 + 4 x 20 sequence-steps of decoding instead of 4 x 30
        assert b.stats.decode_rows < a.stats.decode_rows - 20
        for llm in (a, b):
            assert llm.engine.pool.num_used == 0
            llm.engine.pool.check()


def test_shared_prefix_that_ends_early_ends_every_choice_the_same(random_pair):
    llm = LLM(str(random_pair[0]))
    p = token_prompts(1, 10, 11, seed=13)[0]
    outs = llm.generate([p], SamplingParams(max_tokens=5, temperature=1.0, seed=1, n=3, shared_prefix=8))[0].outputs
    assert len({tuple(o.token_ids) for o in outs}) == 1 and all(o.finish_reason for o in outs)
    assert llm.engine.pool.num_used == 0


def test_vote_helpers():
    from afford import vote
    assert vote.numeric_answer("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert vote.numeric_answer("she has 12 apples, then 15.0") == "15"
    assert vote.numeric_answer("no number") is None
    assert vote.majority(["3", None, "4", "4", "3"]) == ("3", 2)
    assert vote.majority([None, None]) == (None, 0)


def test_speculation_registers_accepted_drafts_under_their_own_tokens(random_pair):
    """Blocks filled by accepted drafts are cached under the tokens they hold: a later prompt made of a
    speculated output reuses them."""
    target = str(random_pair[0])
    llm = LLM(target, draft=target, num_speculative_tokens=4, block_size=8)   # its own draft: all accepted
    p = token_prompts(1, 6, 7, seed=14)[0]
    out = llm.generate([p], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    assert llm.stats.accepted > 0
    again = p + out.token_ids                                           # 46 tokens: 5 full blocks
    hit = llm.engine.pool.hit_tokens
    assert greedy(llm, [again])[0] == greedy(LLM(target, enable_prefix_caching=False), [again])[0]
    assert llm.engine.pool.hit_tokens - hit >= 32                      # the speculated blocks were reused
    llm.engine.pool.check()


def test_abort_after_the_first_choice_finished_stops_the_others(random_pair):
    llm = LLM(str(random_pair[0]))
    eng = llm.engine
    first = eng.add_request([5, 6, 7], SamplingParams(max_tokens=100, temperature=1.0, n=3, ignore_eos=True),
                            request_id="g")
    eng.step()
    first.finish("stop")                    # as if choice 0 hit a stop string: it leaves, the others run on
    eng._release(first)                     # gives back its blocks and leaves eng.seqs
    assert "g" not in eng.seqs
    assert len(eng.scheduler.running) == 2
    eng.abort("g")
    assert not eng.has_unfinished() and eng.pool.num_used == 0


def test_a_prompt_sent_again_keeps_its_blocks_consecutive():
    """It matches its cached blocks but recomputes the last one: the blocks it grows into are the cached
    ones right behind (evicted for it), not the free list's head, so attention reads the context in place."""
    pool = BlockPool(32, 4, prefix_caching=True)
    toks = list(range(100, 112))                   # 3 full blocks
    pool.prepare_write(1, 14)
    pool.register(1, toks + [7, 8], 14)
    pool.free(1)                                   # blocks 0-2 cached, 3 (partial) back to the free list
    pool.prepare_write(9, 3)                       # someone else takes block 3
    assert pool.match_prefix(2, toks) == 8         # all but the last block: its last token is computed
    pool.prepare_write(2, 16)
    assert pool.tables[2] == [0, 1, 2, 4]
    pool.check()


def test_decoding_steps_hold_prompt_chunks_to_the_decode_budget(llama_dir):
    """With sequences decoding a step feeds at most decode_token_budget tokens (never under half of it for
    the prompts); with none, a prompt takes the whole max_num_batched_tokens."""
    from afford import LLM, SamplingParams
    llm = LLM(str(llama_dir), max_num_batched_tokens=256, decode_token_budget=48, enable_prefix_caching=False)
    eng = llm.engine
    long_prompt = list(range(2, 402))
    eng.add_request(long_prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    eng.step()
    assert eng.stats.last.tokens_in == 256                      # nobody decoding: the whole budget
    while eng.has_unfinished():
        eng.step()
    for i in range(3):
        eng.add_request([5 + i, 6, 7], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    eng.step()                                                  # the three short prompts
    eng.add_request(long_prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    fed = []
    while eng.has_unfinished():
        eng.step()
        fed.append(eng.stats.last.tokens_in)
    assert max(fed[:5]) == 48 and fed[0] == 48                  # 3 decodes + 45 prompt tokens per step
    eng.pool.check()
