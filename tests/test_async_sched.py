"""Async scheduling (Engine._continue_async): greedy decode steps launched one step ahead of the host
give the synchronous loop's tokens, texts and finish reasons -- with stops on tokens and strings the
step in flight cannot know, arrivals and aborts between steps, a pool too small for everyone, sampled
requests beside greedy ones -- and leave no KV block behind. On the CPU the forward runs synchronously,
so these tests check the bookkeeping; tests/test_gpu.py checks it on a card, where the overlap pays."""
import pytest
import torch

from afford import LLM, SamplingParams


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 500, (int(k),), generator=g).tolist() for k in torch.randint(3, 30, (n,), generator=g)]


def _run(llm, prompts, params):
    return [(o.token_ids, o.text, o.finish_reason) for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("native", [True, False])
def test_async_gives_the_synchronous_outputs(llama_dir, native):
    ps = _prompts(7)
    sync = LLM(llama_dir, native=native, async_scheduling=False)
    plain = [SamplingParams(max_tokens=m, temperature=0) for m in (5, 30, 17, 1, 24, 9, 12)]
    ref = [o.token_ids for o in sync.generate(ps, plain)]
    # stops the step in flight cannot foresee: a token of one sequence's output, a piece of another's text
    stop_tok = ref[1][6]
    text = sync.generate([ps[4]], plain[4])[0].text
    stop_str = text[len(text) // 2:len(text) // 2 + 3]
    params = [SamplingParams(max_tokens=m, temperature=0, stop_token_ids=[stop_tok]) for m in (5, 30, 17, 1)] + \
             [SamplingParams(max_tokens=24, temperature=0, stop=[stop_str]),
              SamplingParams(max_tokens=9, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0, n=2)]
    asy = LLM(llama_dir, native=native, async_scheduling=True)
    free = asy.engine.pool.num_free
    out = _run(asy, ps, params)
    assert out == _run(sync, ps, params)
    assert any(r == "stop" for _, _, r in out)
    assert asy.engine.steps_ahead >= 10 and sync.engine.steps_ahead == 0 and asy.engine._inflight is None
    assert asy.engine.pool.num_free == free                  # every block back, the discarded rows' too


def test_async_runs_ahead_and_takes_tokens_one_step_late(llama_dir):
    """The engine loop itself: a step returns the tokens of the step launched before it while the next one
    is already queued (on the CPU: already computed)."""
    llm = LLM(llama_dir, async_scheduling=True)
    eng = llm.engine
    eng.add_request(_prompts(1)[0], SamplingParams(max_tokens=6, temperature=0))
    eng.step()                                               # the prefill: synchronous, one token
    outs = eng.step()                                        # launches decode 1 and 2, returns decode 1's token
    assert len(outs) == 1 and len(outs[0].token_ids) == 2 and eng._inflight is not None
    while eng.has_unfinished():
        eng.step()
    assert eng._inflight is None and not eng.seqs


def test_async_with_arrivals_aborts_and_a_small_pool(llama_dir):
    """Requests arriving and leaving between steps, and a pool that forces preemption: every request that
    ran to its end has the synchronous tokens (the native forward is batch-invariant); the aborted one
    has a prefix of them; no block is lost."""
    ps = _prompts(6, seed=3)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    ref = [o.token_ids for o in LLM(llama_dir).generate(ps, params)]
    for asy in (True, False):
        llm = LLM(llama_dir, async_scheduling=asy, kv_blocks=24, block_size=4, max_num_seqs=4, max_model_len=80)
        eng = llm.engine
        free = eng.pool.num_free
        seqs, done, step = {}, {}, 0
        while step == 0 or eng.has_unfinished():
            if step in (0, 3, 7, 8, 20, 21):                 # arrivals between steps
                i = len(seqs)
                seqs[f"r{i}"] = eng.add_request(ps[i], params, request_id=f"r{i}")
            if step == 12:
                eng.abort("r1")
            for o in eng.step():
                if o.finished:
                    done[o.request_id] = o.token_ids
            step += 1
        for i in range(6):
            got = done.get(f"r{i}", seqs[f"r{i}"].output_ids)
            assert got == ref[i] if i != 1 else got == ref[1][:len(got)], (asy, i)
        assert eng.stats.preemptions > 0 and eng.pool.num_free == free and (eng.steps_ahead > 10) == asy


def test_sampled_requests_run_synchronously_beside_greedy_ones(llama_dir):
    """A step runs ahead only when every sequence in it is greedy without logprobs: while the sampled
    request (or the one asking for logprobs) runs, steps are synchronous; after it ends they run ahead."""
    ps = _prompts(4, seed=5)
    params = [SamplingParams(max_tokens=25, temperature=0), SamplingParams(max_tokens=5, temperature=0.8, seed=7),
              SamplingParams(max_tokens=8, temperature=0, logprobs=2, ignore_eos=True),
              SamplingParams(max_tokens=25, temperature=0, ignore_eos=True)]
    asy = LLM(llama_dir, async_scheduling=True)
    out = _run(asy, ps, params)
    assert out == _run(LLM(llama_dir), ps, params)
    assert 0 < asy.engine.steps_ahead < 25 - 8


def test_shared_prefix_choices_fork_under_async_scheduling(llama_dir):
    """n > 1 with shared_prefix: the parent decodes its shared tokens synchronously (its choices fork after
    them), then every choice runs ahead; the synchronous loop's outputs."""
    ps = _prompts(2, seed=8)
    params = SamplingParams(max_tokens=12, temperature=0, n=3, shared_prefix=4, ignore_eos=True)
    asy = LLM(llama_dir, async_scheduling=True)
    got = [[c.token_ids for c in o.outputs] if hasattr(o, "outputs") else o.token_ids for o in asy.generate(ps, params)]
    want = [[c.token_ids for c in o.outputs] if hasattr(o, "outputs") else o.token_ids
            for o in LLM(llama_dir).generate(ps, params)]
    assert got == want and asy.engine.steps_ahead > 0 and not asy.engine.has_unfinished()


def test_a_forward_that_fails_in_flight_fails_its_requests_and_the_server_loop_goes_on(llama_dir):
    """AsyncLLM (what `afford serve` runs) with async scheduling: a forward that raises while a step is in
    flight fails the requests of that batch with the error, the step in flight is dropped, the next
    request decodes the synchronous loop's tokens, and every KV block comes back."""
    import asyncio

    from afford.async_engine import AsyncLLM
    from afford.config import EngineConfig
    from afford.engine import Engine
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    want = LLM(llama_dir, dtype="float32").generate([[5, 6, 7, 8]], params)[0].token_ids
    llm = AsyncLLM(lambda: Engine(EngineConfig(model=str(llama_dir), dtype="float32", async_scheduling=True)))
    eng = llm.engine
    free, runner, calls = eng.pool.num_free, eng.runner, []
    forward = runner.forward

    def flaky(seq_ids, *a, ids_dev=None, **k):
        calls.append(ids_dev is not None)
        if ids_dev is not None and len(seq_ids) == 2 and not failed:   # a step launched ahead with both requests
            failed.append(seq_ids)
            raise RuntimeError("injected forward failure")
        return forward(seq_ids, *a, ids_dev=ids_dev, **k)
    failed = []
    runner.forward = flaky
    try:
        async def run(rid, prompt):
            try:
                return [o async for o in llm.generate(prompt, params, rid)][-1]
            except RuntimeError as e:
                return e
        async def both():
            return await asyncio.gather(run("a", [9, 10, 11]), run("b", [12, 13, 14, 15]))
        first = asyncio.run(both())
        assert all(isinstance(r, RuntimeError) and "injected" in str(r) for r in first), first
        out = asyncio.run(run("c", [5, 6, 7, 8]))
        assert not isinstance(out, Exception) and out.token_ids == want
        assert failed and llm.step_errors == 1 and eng._inflight is None and eng.pool.num_free == free
        assert calls.count(True) > 5                           # the last request ran ahead too
    finally:
        llm.shutdown()
