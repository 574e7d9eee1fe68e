"""The engine end to end on tiny random checkpoints: greedy equals transformers, batching and preemption
do not change outputs, seeded sampling is reproducible, bad input gets a clear error."""
import pytest
import torch
from conftest import make_hf_model

from afford import LLM, ConfigError, SamplingParams

GREEDY = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 512, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_greedy_equals_transformers_generate(arch, tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM
    path = make_hf_model(tmp_path, tokenizer_dir, arch, seed=3)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32")
    for p in prompts(3, seed=5):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                          pad_token_id=1)[0, len(p):].tolist()
        out = llm.generate(p, GREEDY)[0]
        assert out.token_ids == ref
        assert out.finish_reason == "length" and len(out.token_ids) == 64
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks


def test_batch_of_8_equals_one_at_a_time(llama_dir):
    llm = LLM(str(llama_dir), dtype="float32")
    ps = prompts(8, seed=11)
    batched = llm.generate(ps, GREEDY)
    assert llm.engine.stats.last.num_seqs == 8          # the decode steps really ran all 8 together
    alone = [llm.generate(p, GREEDY)[0] for p in ps]
    for b, a in zip(batched, alone):
        assert b.token_ids == a.token_ids
    llm.engine.pool.check()
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks


def test_preemption_under_a_tiny_pool_keeps_greedy_outputs(llama_dir):
    ps = prompts(8, seed=12)
    ref = LLM(str(llama_dir), dtype="float32").generate(ps, GREEDY)
    small = LLM(str(llama_dir), dtype="float32", max_model_len=128, kv_blocks=12, block_size=16)
    outs = small.generate(ps, GREEDY)
    assert small.stats.preemptions > 0
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    small.engine.pool.check()
    assert small.engine.pool.num_free == small.engine.pool.num_blocks


def test_seeded_sampling_is_reproducible_and_batch_independent(llama_dir):
    llm = LLM(str(llama_dir), dtype="float32")
    sp = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    p = prompts(1, seed=2)[0]
    a = llm.generate(p, sp)[0].token_ids
    b = llm.generate([p] + prompts(3, seed=9), [sp] + [SamplingParams(max_tokens=10, temperature=1.0)] * 3)[0].token_ids
    assert a == b
    c = llm.generate(p, SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, top_k=50, seed=99,
                                       ignore_eos=True))[0].token_ids
    assert c != a


def test_prompt_logprobs_match_transformers(llama_dir):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    p = prompts(1, seed=4)[0]
    out = LLM(str(llama_dir), dtype="float32").generate(
        p, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=True, logprobs=3))[0]
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([p])).logits[0].float(), -1)
    ref = lp[:-1].gather(1, torch.tensor(p[1:]).unsqueeze(1)).squeeze(1)
    assert len(out.prompt_logprobs) == len(p) - 1
    assert torch.allclose(torch.tensor(out.prompt_logprobs), ref, atol=1e-4)
    first = out.logprobs[0]
    assert first["token"] == out.token_ids[0] and abs(first["logprob"] - float(lp[-1].max())) < 1e-4
    assert len(first["top"]) == 3


def test_stop_strings_and_stop_tokens(llama_dir):
    llm = LLM(str(llama_dir), dtype="float32")
    p = prompts(1, seed=6)[0]
    full = llm.generate(p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    stop = full.text[10:13]
    assert stop.strip()
    cut = llm.generate(p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]
    tok = llm.generate(p, SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[full.token_ids[5]]))[0]
    assert tok.finish_reason == "stop" and tok.token_ids == full.token_ids[:full.token_ids.index(full.token_ids[5]) + 1]


def test_bad_input_gets_clear_errors(llama_dir):
    llm = LLM(str(llama_dir), dtype="float32", max_model_len=64)
    with pytest.raises(ConfigError, match="max_model_len"):
        llm.generate(list(range(2, 100)), GREEDY)
    with pytest.raises(ConfigError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ConfigError, match="empty"):
        llm.generate("", GREEDY)
    with pytest.raises(ConfigError, match="max_model_len"):
        LLM(str(llama_dir), max_model_len=10_000)
    # the engine is still usable after every refusal
    assert llm.generate([5, 6, 7], SamplingParams(max_tokens=3, temperature=0))[0].token_ids
    out = llm.generate([5, 6, 7], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 64 - 3   # stops at the context, says so


def test_n_choices_share_prompt_blocks(llama_dir):
    llm = LLM(str(llama_dir), dtype="float32")
    eng = llm.engine
    prompt = prompts(1, seed=8)[0] * 3
    eng.add_request(prompt, SamplingParams(max_tokens=6, temperature=1.0, n=4, seed=1), "g")
    eng.step()                                                  # prefill + fork
    shared = -(-len(prompt) // eng.pool.block_size)
    assert len(eng.scheduler.running) == 4 and eng.pool.num_used == shared   # 4 choices, one copy of the prompt
    while eng.has_unfinished():
        eng.step()
    eng.pool.check()
    assert eng.pool.num_free == eng.pool.num_blocks
    out = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=1.0, n=4, seed=1))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3] and len({tuple(o.token_ids) for o in out.outputs}) > 1


def test_streamed_deltas_never_show_text_a_stop_string_cuts(llama_dir):
    llm = LLM(str(llama_dir), dtype="float32")
    eng = llm.engine
    p = prompts(1, seed=6)[0]
    full = llm.generate(p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0].text
    for stop in (full[10:13], full[20:22]):
        eng.add_request(p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop]), "s")
        streamed, final = "", None
        while eng.has_unfinished():
            for out in eng.step():
                streamed += out.delta
                final = out
        assert final.finish_reason == "stop" and streamed == final.text == full[:full.find(stop)]
