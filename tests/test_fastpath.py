"""The decode fast path: every attention backend equals dense reference attention on ragged prefill,
decode and verify batches (after truncate and after fork too); a forward leaves the block pool as it
found it; greedy output in the DEFAULT configuration is the same alone, in a batch of 8 of mixed
lengths and under draft / ngram / goodput speculation."""
import json

import pytest
import torch
from conftest import ROOT

from afford import LLM, SamplingParams
from afford.attention import BACKENDS, ForwardBatch, get_backend
from afford.core.runner import ModelRunner
from afford.kv.paged import BlockPool
from afford.models.loader import load_for_inference

H, KV, D, BS = 4, 2, 16, 4


class Truth:
    """The pool under test plus, per sequence, every K/V it should hold, for a dense reference."""

    def __init__(self, num_blocks=64):
        self.pool = BlockPool(num_blocks, BS)
        # hand out blocks out of order so some tables are not consecutive (the gather path)
        order = list(self.pool.free_blocks)
        self.pool.free_blocks.clear()
        self.pool.free_blocks.extend(order[:8] + order[8:][::-1])
        n_slots = num_blocks * BS
        self.kv = [(torch.zeros(n_slots, KV, D), torch.zeros(n_slots, KV, D))]
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def step(self, backend, seq_ids, starts, lens, g):
        """Feed lens[i] random tokens at starts[i] of seq_ids[i]; returns (backend output, reference)."""
        for s, st, n in zip(seq_ids, starts, lens):
            for src, dst in self.pool.prepare_write(s, st + n):          # copy-on-write, as the runner does
                for kp, vp in self.kv:
                    kp[dst * BS:(dst + 1) * BS] = kp[src * BS:(src + 1) * BS]
                    vp[dst * BS:(dst + 1) * BS] = vp[src * BS:(src + 1) * BS]
        N = sum(lens)
        q, k, v = torch.randn(N, H, D, generator=g), torch.randn(N, KV, D, generator=g), torch.randn(N, KV, D, generator=g)
        pos = torch.cat([torch.arange(st, st + n) for st, n in zip(starts, lens)])
        slots = torch.tensor([x for s, st, n in zip(seq_ids, starts, lens) for x in self.pool.slots(s, st, st + n)])
        tables = [self.pool.tables[s] for s in seq_ids]
        phase = "decode" if all(n == 1 for n in lens) else ("prefill" if not any(starts) else "verify")
        batch = ForwardBatch(phase, seq_ids, starts, lens, tables, BS, slots, pos)
        meta = backend.prepare_metadata(batch, self.kv)
        out = backend.forward(q, k, v, 0, meta)                                # (N, H, D)
        ref, at = [], 0
        for s, st, n in zip(seq_ids, starts, lens):
            kk = torch.cat([self.k.get(s, torch.zeros(0, KV, D))[:st], k[at:at + n]])
            vv = torch.cat([self.v.get(s, torch.zeros(0, KV, D))[:st], v[at:at + n]])
            self.k[s], self.v[s] = kk, vv
            for r in range(n):                                                 # query at position st + r
                p = st + r
                kr = kk[:p + 1].repeat_interleave(H // KV, 1)                  # (p+1, H, D)
                vr = vv[:p + 1].repeat_interleave(H // KV, 1)
                w = torch.softmax(torch.einsum("hd,lhd->hl", q[at + r], kr) / D ** 0.5, -1)
                ref.append(torch.einsum("hl,lhd->hd", w, vr))
            at += n
        return out, torch.stack(ref)

    def fork(self, src, dst):
        self.pool.fork(src, dst)
        self.k[dst], self.v[dst] = self.k[src].clone(), self.v[src].clone()

    def truncate(self, s, n):
        self.pool.truncate(s, n)
        self.k[s], self.v[s] = self.k[s][:n], self.v[s][:n]


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_backend_equals_dense_attention(name):
    backend, t, g = get_backend(name), Truth(), torch.Generator().manual_seed(0)

    def check(*args):
        out, ref = t.step(backend, *args, g)
        assert (out - ref).abs().max() <= 1e-5, args

    check([0, 1, 2], [0, 0, 0], [5, 9, 1])                  # prefill, ragged
    for _ in range(6):                                     # decode, crossing block boundaries
        check([0, 1, 2], [len(t.k[s]) for s in (0, 1, 2)], [1, 1, 1])
    check([0, 1, 2], [len(t.k[s]) for s in (0, 1, 2)], [4, 1, 3])   # verify: 1 + k each, ragged k
    t.truncate(0, 9)                                       # rejected drafts rolled back
    t.truncate(2, 6)
    check([0, 2], [9, 6], [3, 2])
    t.fork(1, 3)                                           # n > 1: shares blocks, copy-on-write
    check([1, 3], [len(t.k[1]), len(t.k[3])], [1, 2])
    check([3, 1, 0], [len(t.k[s]) for s in (3, 1, 0)], [1, 1, 1])
    for _ in range(3):                                     # a larger decode batch (cpu_paged batches it)
        check([0, 1, 2, 3], [len(t.k[s]) for s in (0, 1, 2, 3)], [1, 1, 1, 1])
    t.pool.check()


def snapshot(pool):
    return ({k: list(v) for k, v in pool.tables.items()}, list(pool.ref), list(pool.free_blocks), dict(pool.lens))


def test_forward_reads_the_pool_and_never_changes_it(random_pair):
    model = load_for_inference(random_pair[0], "cpu", "float32")
    pool = BlockPool(32, 4)
    runner = ModelRunner(model, pool)
    with pytest.raises(RuntimeError, match="no KV blocks"):
        runner.forward([7], [0], [[3, 4, 5]])
    pool.prepare_write(0, 12)
    pool.prepare_write(1, 7)
    before = snapshot(pool)
    runner.forward([0, 1], [0, 0], [list(range(2, 12)), list(range(2, 7))])          # prefill
    runner.forward([0, 1], [10, 5], [[5], [6]])                                        # decode
    runner.forward([0, 1], [11, 6], [[5], [6]], [[0], [0]])                             # decode at the block edge
    assert snapshot(pool) == before


def gsm8k_prompts(n):
    rows = [json.loads(line) for line in open(ROOT / "data" / "gsm8k" / "test.jsonl")][:n]
    # mixed lengths: whole questions and their first sentences
    return [r["question"] if i % 2 else r["question"].split(".")[0] + "." for i, r in enumerate(rows)]


GREEDY = SamplingParams(max_tokens=40, temperature=0)


@pytest.mark.parametrize("which", ["bundled", "random"])
def test_default_configuration_is_batch_and_speculation_invariant(which, random_pair):
    if which == "bundled":
        target, draft, ps = "default", "default", gsm8k_prompts(8)
    else:
        target, draft = str(random_pair[0]), str(random_pair[1])
        g = torch.Generator().manual_seed(5)
        ps = [torch.randint(2, 512, (int(n),), generator=g).tolist() for n in torch.randint(3, 40, (8,), generator=g)]
    plain = LLM(target)                                                  # the default configuration
    assert next(plain.engine.model.parameters()).dtype == torch.float32  # dtype "auto" on the CPU
    alone = [plain.generate([p], GREEDY)[0].token_ids for p in ps]
    assert [o.token_ids for o in plain.generate(ps, GREEDY)] == alone    # batch of 8, mixed lengths
    for kw in (dict(draft=draft), dict(draft="ngram"), dict(draft=draft, speculation="goodput")):
        llm = LLM(target, num_speculative_tokens=4, **kw)
        assert [o.token_ids for o in llm.generate(ps, GREEDY)] == alone, kw
        assert [llm.generate([p], GREEDY)[0].token_ids for p in ps[:2]] == alone[:2], kw


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_padding_slots_are_not_written(name):
    """A token whose slot is -1 (a graph bucket's padding row) attends like any other but its K/V is
    never stored; the real tokens' K/V land at their slots."""
    backend, pool = get_backend(name), BlockPool(8, BS)
    kv = [(torch.zeros(8 * BS, KV, D), torch.zeros(8 * BS, KV, D))]
    for s in (0, 1):
        pool.prepare_write(s, 1)
    slots = torch.tensor([pool.slots(0, 0, 1)[0], -1])                 # sequence 1's token is padding
    batch = ForwardBatch("decode", [0, 1], [0, 0], [1, 1], [pool.tables[0], pool.tables[1]], BS, slots,
                         torch.tensor([0, 0]), padded=True)
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, H, D, generator=g), torch.randn(2, KV, D, generator=g), torch.randn(2, KV, D, generator=g)
    out = backend.forward(q, k, v, 0, backend.prepare_metadata(batch, kv))
    assert out.shape == (2, H, D)
    assert torch.equal(kv[0][0][slots[0]], k[0]) and torch.equal(kv[0][1][slots[0]], v[0])
    assert int((kv[0][0].abs().sum((1, 2)) > 0).sum()) == 1                # nothing else was written
