"""The `afford` command: generate, serve, zoo (tokenizer, train, distill), quantize, cost, compress.

Every command that builds an engine (generate, serve) takes the same engine flags, made by
`add_engine_args` from the fields of EngineConfig and SpeculativeConfig, and turns them into those two
configs with `engine_configs`: one block of flags, one route to the engine."""
from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from dataclasses import MISSING, Field, fields

from afford.config import ConfigError, EngineConfig, SpeculativeConfig, number_arg


def _zoo(sub):
    zoo = sub.add_parser("zoo", help="train small models from local text (no model hub needed)")
    zsub = zoo.add_subparsers(dest="zoo_cmd", required=True)
    t = zsub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    t.add_argument("--data", nargs="+", required=True, help="text or .jsonl files")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--val-fraction", type=float, default=0.05, help="tail of each file held out (not seen)")
    t.add_argument("--out", required=True)
    t.add_argument("--overwrite", action="store_true")
    t = zsub.add_parser("teacher-text", help="write a teacher's greedy continuations of prompts as JSON lines "
                                             "(sequence-level distillation data for a draft)")
    t.add_argument("--teacher", required=True)
    t.add_argument("--prompts", required=True, help=".jsonl file")
    t.add_argument("--field", default="question", help="the prompt field of each record")
    t.add_argument("--limit", type=int, help="first N records")
    t.add_argument("--max-tokens", type=int, default=160)
    t.add_argument("--out", required=True)
    c = zsub.add_parser("cot-compress", help="shorten GSM8K solutions' chains of thought (C3oT's compressor, "
                                             "rule-based) and report the compression rate")
    c.add_argument("--data", required=True, help="GSM8K-style .jsonl (question, answer)")
    c.add_argument("--out", required=True, help=".jsonl with question, answer and short_answer")
    pk = zsub.add_parser("passkey", help="write passkey-retrieval documents (a long-range task) as JSON lines")
    pk.add_argument("--filler", required=True, help="a text file the documents are cut from")
    pk.add_argument("--tokenizer", default="default", help="a model or tokenizer folder ('default': the bundled)")
    pk.add_argument("--out", required=True)
    pk.add_argument("--n", type=int, default=1000)
    pk.add_argument("--tokens", default="1000,3000", help="MIN,MAX tokens per document")
    pk.add_argument("--seed", type=int, default=0)
    e = zsub.add_parser("export", help="copy a trained folder without its checkpoint, weights in 16-bit")
    e.add_argument("src")
    e.add_argument("dst")
    e.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    e.add_argument("--overwrite", action="store_true")
    for name in ("train", "distill"):
        p = zsub.add_parser(name, help="train a Llama model from scratch" if name == "train"
                            else "train a draft on a teacher's next-token distributions (KL)")
        p.add_argument("--data", nargs="+", required=True)
        p.add_argument("--out", required=True)
        if name == "train":
            p.add_argument("--tokenizer", required=True, help="folder with tokenizer.json")
            p.add_argument("--preset", help="target | draft | tiny (overrides the shape flags)")
            p.add_argument("--conditioned", action="store_true",
                           help="C3oT: each .jsonl record (question, answer[, short_answer]) twice, under the long "
                                "and the short condition prefix; decode with afford.zoo.cot.prompt(question)")
        else:
            p.add_argument("--teacher", required=True, action="append",
                           help="HF folder of a teacher (repeat for several targets sharing one tokenizer; the first's "
                                "tokenizer is used)")
            p.add_argument("--teacher-mix", default="average", choices=["average", "alternate"],
                           help="several teachers: distil on their averaged distributions, or one teacher per batch")
            p.add_argument("--student-preset", default="draft")
            p.add_argument("--temperature", type=float, default=1.0)
        p.add_argument("--layers", type=int, default=6)
        p.add_argument("--hidden", type=int, default=256)
        p.add_argument("--heads", type=int, default=4)
        p.add_argument("--kv-heads", type=int, default=2)
        p.add_argument("--intermediate", type=int, default=704)
        p.add_argument("--q-rank", type=int, default=0, help="> 0: MFA attention with this query rank (kv-heads 1)")
        p.add_argument("--moe", metavar="E,K", help="a Mixtral-style mixture of E experts, K per token "
                                                     "(--intermediate per expert)")
        p.add_argument("--exits", help="S2D multi-exit model: layer counts after which the shared norm and head "
                                       "also predict, e.g. 1,2,4 (the last = the layer count); the loss averages them")
        p.add_argument("--seq-len", type=int, default=256)
        p.add_argument("--max-positions", type=int, default=1024, help="the model's positions (>= --seq-len)")
        p.add_argument("--rope-theta", type=float, default=10000.0, help="RoPE base (longer contexts: larger)")
        p.add_argument("--sparse-budget", type=int, default=0,
                       help="> 0: sparse fine-tuning -- attention in the block pattern attention='sparse' decodes "
                            "with (this many blocks per query: first, last two, the rest by Quest's bound)")
        p.add_argument("--sparse-block", type=int, default=64, help="the sparse pattern's block size in tokens")
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--lr", type=float, default=2e-3)
        p.add_argument("--minutes", type=float)
        p.add_argument("--steps", type=int)
        p.add_argument("--eval-every", type=int, default=200)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int)
        p.add_argument("--fp32", action="store_true", help="train in fp32 (default: bf16 autocast where bf16 "
                                                             "matmuls are fast: CUDA or an AVX-512 CPU)")
        p.add_argument("--resume", action="store_true")
        p.add_argument("--init", help="start from this HF folder's weights (the same shape; fewer layers of the same "
                                      "width: the model grows, its new layers starting as the identity; more layers: "
                                      "it keeps the first ones, e.g. a draft cut from its target)")
        p.add_argument("--overwrite", action="store_true")


def cmd_zoo(a) -> int:
    from afford.zoo.data import split_documents
    if a.zoo_cmd == "tokenizer":
        from afford.zoo.tokenizer import train_tokenizer
        tok = train_tokenizer(split_documents(a.data, a.val_fraction).train, a.vocab_size, a.out, a.overwrite)
        print(f"tokenizer with {len(tok)} tokens written to {a.out}")
        return 0
    if a.zoo_cmd == "teacher-text":
        from afford.zoo.data import teacher_text
        n = teacher_text(a.teacher, a.prompts, a.field, a.out, a.limit, a.max_tokens)
        print(f"wrote {n} teacher continuations to {a.out}")
        return 0
    if a.zoo_cmd == "cot-compress":
        from afford.zoo.cot import compress_file
        print(json.dumps(compress_file(a.data, a.out)))
        return 0
    if a.zoo_cmd == "passkey":
        from afford.models.loader import load_tokenizer, resolve_model_path
        from afford.zoo.passkey import make, write
        try:
            lo, hi = (int(x) for x in a.tokens.split(","))
        except ValueError:
            raise ConfigError(f"--tokens takes MIN,MAX, got {a.tokens!r}") from None
        from pathlib import Path
        if not Path(a.filler).is_file():
            raise ConfigError(f"--filler {a.filler!r} is not a file")
        docs = make(Path(a.filler).read_text(encoding="utf-8", errors="replace"),
                    load_tokenizer(resolve_model_path(a.tokenizer)), a.n, lo, hi, a.seed)
        print(f"wrote {len(docs)} passkey documents to {write(a.out, docs)}")
        return 0
    if a.zoo_cmd == "export":
        from afford.zoo.train import export
        export(a.src, a.dst, a.dtype, a.overwrite)
        print(f"exported {a.src} -> {a.dst} ({a.dtype})")
        return 0
    from afford.zoo.train import TrainConfig, preset_shape, train
    shape = dict(layers=a.layers, hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads, intermediate=a.intermediate,
                 q_rank=a.q_rank)
    preset = a.preset if a.zoo_cmd == "train" else a.student_preset
    if preset:
        shape = preset_shape(preset)
    if a.moe:
        try:
            shape["experts"], shape["experts_per_tok"] = (int(v) for v in a.moe.split(","))
        except ValueError:
            raise ConfigError(f"--moe takes E,K (experts, experts per token), e.g. 4,2; got {a.moe!r}") from None
    try:
        exits = tuple(int(e) for e in a.exits.split(",")) if a.exits else ()
    except ValueError:
        raise ConfigError(f"--exits takes layer counts separated by commas, e.g. 1,2,4; got {a.exits!r}") from None
    tc = TrainConfig(out=a.out, data=tuple(a.data), tokenizer=a.tokenizer if a.zoo_cmd == "train" else a.teacher[0],
                     teachers=tuple(a.teacher) if a.zoo_cmd == "distill" else (), exits=exits,
                     teacher_mix=getattr(a, "teacher_mix", "average"),
                     temperature=getattr(a, "temperature", 1.0), seq_len=a.seq_len, batch_size=a.batch_size,
                     max_position_embeddings=a.max_positions, rope_theta=a.rope_theta,
                     lr=a.lr, minutes=a.minutes, steps=a.steps, eval_every=a.eval_every, seed=a.seed,
                     threads=a.threads, bf16=False if a.fp32 else None, init=a.init,
                     conditioned=getattr(a, "conditioned", False), sparse_budget=a.sparse_budget,
                     sparse_block=a.sparse_block, **shape)
    res = train(tc, resume=a.resume, overwrite=a.overwrite)
    print(json.dumps({k: v for k, v in res.items() if k != "history"}))
    return 0


# ---- the engine flags: one block for every command that builds an engine ----

ENGINE_HELP = {                      # config field -> help text (the default is appended from the field)
    "model": "a Hugging Face model folder, or 'default' (the bundled target)",
    "device": "auto (CUDA where present, else the CPU), cpu, cuda or cuda:N",
    "dtype": "auto (float32 on the CPU, the checkpoint's dtype on CUDA), float32, bfloat16 or float16",
    "max_model_len": "the context, prompt plus generated tokens (default: the model's positions)",
    "block_size": "tokens per KV-cache block",
    "kv_blocks": "KV-cache blocks (default: enough for --max-num-seqs full-length sequences)",
    "max_num_seqs": "sequences batched per step",
    "max_num_batched_tokens": "tokens fed per step: running decodes first, then prompt chunks (default: 512 on a "
                              "CPU, 2048 on a GPU)",
    "decode_token_budget": "tokens a step may feed while sequences decode, bounding their time per token "
                           "(default: 64 on a CPU, --max-num-batched-tokens on a GPU)",
    "sparse_budget": "attention sparse: KV blocks each decode query reads (lossy past it)",
    "sparse_locality": "attention sparse: share of the budget chosen by past attention mass",
    "sparse_fast_blocks": "attention sparse: fast-tier blocks per layer (default: budget x max-num-seqs)",
    "sparse_dense_below": "attention sparse: contexts up to this many tokens attend densely (default: budget x "
                          "block size)",
    "sparse_score": "attention sparse: how a query picks blocks: mean (q . mean-pooled key) or bound (Quest's "
                    "per-channel min/max bound on q . k)",
    "kv_mmap_dir": "keep the KV pool (sparse attention's slow tier) in a memory-mapped file in this folder "
                   "instead of RAM (CPU; the file is removed at once, nothing is left behind)",
    "afd": "attention-FFN disaggregation, e.g. attention=1,ffn=2: the MLPs / MoE experts run on FFN worker "
           "processes over torch.distributed (lossless); attention=N>1 adds data-parallel attention workers",
    "micro_batches": "afd: micro-batches per step, pipelined between the attention and FFN workers",
    "afd_address": "afd: host:port where `afford afd-worker` processes join (default: spawn them here)",
    "enable_chunked_prefill": "split long prompts over several steps, next to running decodes",
    "enable_prefix_caching": "reuse the KV blocks of prompts' cached leading tokens (automatic prefix caching)",
    "seed": "seeds the engine's generator for requests that bring no seed; generate's requests take it as theirs",
    "cost_hardware": "show the modeled USD per 1M tokens on this hardware (see afford cost)",
    "quantization": "weight-only quantization on load (lossy)",
    "attention": "attention backend: auto (cpu_paged on the CPU, paged on CUDA), paged, cpu_paged or sdpa",
    "enforce_eager": "on CUDA, run every forward eagerly: no CUDA graphs for decode, verify and draft steps",
    "async_scheduling": "launch each greedy decode step before the host reads the step before's tokens, so "
                        "stop checks, detokenizing and outputs overlap the GPU (default: on with CUDA graphs)",
    "native": "run CPU fp32 forwards as one C++ call on afford's batch-invariant kernels (a token's logits "
              "the same in any batch or verify; built once per machine, ~1 minute)",
    "quantize_head": "with --quantization: quantize the LM head too (fewer bytes a token, more quality lost)",
    "quant_group": "quantization group size: auto (adaptive per matrix), per-channel, 32, 64, 128 ...",
    "draft": "speculative decoding: a draft model folder, 'default' (the bundled draft) or 'ngram' (prompt "
             "lookup); lossless",
    "num_speculative_tokens": "tokens drafted per step (with --draft; the bound with --speculation goodput)",
    "acceptance": "how sampled requests accept drafts (greedy requests always check the target's argmax)",
    "controller": "how k is chosen each step: fixed, off, or goodput (SmartSpec; --k is then the bound)",
    "ngram_max": "longest n-gram matched in the prompt (--draft ngram)",
    "ngram_min": "shortest n-gram matched in the prompt (--draft ngram)",
    "draft_dtype": "the draft model's dtype: auto (chosen as --dtype auto chooses), float32, bfloat16 or float16",
    "draft_quantization": "weight-only quantization of the draft on load (the output stays lossless)",
    "draft_exit": "a multi-exit (S2D) draft: 'auto' (confidence thresholds calibrated on this target), an exit's "
                  "layer count (always draft there) or thresholds 't1,t2' (one per exit before the last)",
}
ENGINE_FLAGS = {"num_speculative_tokens": ("--k", "--num-speculative-tokens"),   # names other than --field-name
                "controller": ("--speculation",)}
ENGINE_CHOICES = {"quantization": ("int8", "int4"), "draft_quantization": ("int8", "int4"),
                  "controller": ("fixed", "off", "goodput"), "sparse_score": ("mean", "bound")}
REQUIRED_DEFAULTS = {"model": "default", "draft": None}   # fields without a default: --draft absent = no speculation
# The one place a command departs from a field's default: the server adapts k by goodput (SmartSpec), as
# README.md documents ("the server's default with a draft"), and reports the planner's modeled cost on an H100
# (the playground, /metrics); generate keeps SpeculativeConfig's "fixed" and no cost model.
COMMAND_DEFAULTS = {"serve": {"controller": "goodput", "cost_hardware": "h100"}}


def _flag_type(cls: type, f: Field) -> type:
    """The field's type without its `| None`: int for `int | None`."""
    hint = typing.get_type_hints(cls)[f.name]
    args = [t for t in typing.get_args(hint) if t is not type(None)]
    return args[0] if args else hint


def add_engine_args(parser: argparse.ArgumentParser, command: str) -> None:
    """One flag per field of EngineConfig and SpeculativeConfig, dest = the field name. A flag left out
    stays None and `engine_configs` gives the field its own default (shown in --help), except where
    COMMAND_DEFAULTS names one for this command."""
    overrides = COMMAND_DEFAULTS.get(command, {})
    for cls, title in ((EngineConfig, "engine"), (SpeculativeConfig, "speculative decoding (with --draft)")):
        group = parser.add_argument_group(title)
        for f in fields(cls):
            shown = overrides.get(f.name, f.default if f.default is not MISSING else REQUIRED_DEFAULTS.get(f.name))
            text = ENGINE_HELP.get(f.name, f.name.replace("_", " "))
            if shown is not None and "(default" not in text:
                text += f" (default: {shown})"
            names = ENGINE_FLAGS.get(f.name, ("--" + f.name.replace("_", "-"),))
            kw = dict(dest=f.name, help=text, choices=ENGINE_CHOICES.get(f.name),
                      default=overrides.get(f.name, REQUIRED_DEFAULTS.get(f.name)))
            if f.name in ENGINE_FLAGS and f.name not in ENGINE_CHOICES:
                kw["metavar"] = names[0].lstrip("-").upper()           # --k K, not --k NUM_SPECULATIVE_TOKENS
            kind = _flag_type(cls, f)
            if kind is bool:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["type"] = kind
            group.add_argument(*names, **kw)


def engine_configs(a: argparse.Namespace) -> tuple[EngineConfig, SpeculativeConfig | None]:
    """The engine flags as the engine's two frozen configs, for every command that builds an engine: a flag
    left out (None) takes its field's default; speculative decoding is on when --draft is given."""
    def given(cls) -> dict:
        return {f.name: getattr(a, f.name) for f in fields(cls) if getattr(a, f.name, None) is not None}
    speculative = SpeculativeConfig(**given(SpeculativeConfig)) if a.draft is not None else None
    return EngineConfig(**given(EngineConfig)), speculative


def add_lossy_args(parser: argparse.ArgumentParser) -> None:
    """The opt-in lossy levers (afford/levers/): flags for LLM's keyword arguments of the same names."""
    g = parser.add_argument_group("lossy levers (each changes the output; off by default)")
    g.add_argument("--cascade", choices=("entropy",), help="EAD: this model is the small one, --large takes over "
                   "while the rolling mean entropy is >= --tau")
    g.add_argument("--large", metavar="PATH", help="the large model of --cascade, the guide of --rerank "
                   "('default': the bundled target)")
    g.add_argument("--tau", type=number_arg(float, 0), default=2.5, help="EAD threshold in bits (default: 2.5)")
    g.add_argument("--window", type=number_arg(int, 1), default=5, help="EAD entropy window (default: 5)")
    g.add_argument("--dwell", type=number_arg(int, 1), default=10, help="EAD minimum tokens between switches "
                   "(default: 10)")
    g.add_argument("--rerank", choices=("guided",), help="AMBEDKAR-style steering: the guide (--large) re-ranks "
                   "this model's top tokens by divergence under --swap word rewrites of the prompt")
    g.add_argument("--swap", action="append", metavar="A=B", help="a word pair the counterfactual prompt swaps "
                   "(repeatable)")
    g.add_argument("--alpha", type=number_arg(float, 0), default=1.0, help="re-ranking weight (default: 1.0)")
    g.add_argument("--rerank-top-k", type=number_arg(int, 1, 31), default=5, help="candidates re-ranked (default: 5)")
    g.add_argument("--grad-corpus", metavar="DIR", help="GRAD: fuse a token graph of the documents (.txt/.md) "
                   "BM25 retrieves from DIR for each prompt")
    g.add_argument("--grad-weight", type=number_arg(float, 0), default=16.0, help="GRAD weight (default: 16)")
    g.add_argument("--grad-top-docs", type=number_arg(int, 1), default=1, help="documents retrieved (default: 1)")


def lossy_from_args(a: argparse.Namespace):
    from afford.llm import lossy_config
    swaps = None
    if a.swap:
        bad = [x for x in a.swap if x.count("=") != 1 or not all(x.split("="))]
        if bad:
            raise ConfigError(f"--swap takes WORD=WORD, got {bad[0]!r}")
        swaps = dict(x.split("=") for x in a.swap)
    return lossy_config(a.cascade, a.large, a.tau, a.window, a.dwell, a.rerank, a.alpha, a.rerank_top_k, swaps,
                        a.grad_corpus, a.grad_weight, a.grad_top_docs)


def _generate(sub):
    g = sub.add_parser("generate", help="generate text from a prompt and print the stats line")
    g.add_argument("prompt", nargs="+", help="one or more prompts (several run as one batch)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    add_engine_args(g, "generate")
    add_lossy_args(g)


def cmd_generate(a) -> int:
    from afford import LLM, SamplingParams
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                            seed=a.seed, stop=a.stop)          # a.seed is None unless --seed was given
    llm = LLM.from_config(*engine_configs(a), lossy_from_args(a))
    eng = llm.engine
    if a.stream:
        if len(a.prompt) > 1:
            raise ConfigError("--stream takes one prompt")
        eng.add_request(a.prompt[0], params)
        print(a.prompt[0], end="", flush=True)
        while eng.has_unfinished():
            for out in eng.step():
                print(out.delta, end="", flush=True)
        print()
    else:
        for prompt, out in zip(a.prompt, llm.generate(a.prompt, params)):
            print(prompt + out.text)
            print(f"  [{out.finish_reason}] {out.metrics['generated_tokens']} tokens")
    print(f"stats: {llm.stats.line()}", file=sys.stderr)
    if llm.stats.drafted:
        print(acceptance_histogram(llm.stats), file=sys.stderr)
    return 0


def acceptance_histogram(stats) -> str:
    """gpt-fast style: how often each draft position was accepted when it was drafted."""
    lines = ["acceptance by draft position:"]
    for i, (acc, dr) in enumerate(zip(stats.accepted_per_position, stats.drafted_per_position)):
        rate = acc / dr if dr else 0.0
        lines.append(f"  pos {i + 1}: {rate:6.1%} of {dr:5d} {'#' * int(40 * rate)}")
    return "\n".join(lines)


def _serve(sub):
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=number_arg(int, 1, 65535), default=8000)
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    s.add_argument("--max-queue", type=number_arg(int, 1), default=256, help="requests in flight before 429")
    s.add_argument("--served-model-name", help="the model id clients see (default: --model)")
    s.add_argument("--max-body-bytes", type=number_arg(int, 1), default=1 << 20)
    s.add_argument("--shutdown-timeout", type=number_arg(float, 0), default=10.0,
                   help="seconds in-flight requests may finish")
    s.add_argument("--threads", type=number_arg(int, 1),
                   help="torch threads of the engine (default: torch's own count). Fewer leave cores to the "
                        "HTTP front end, as vLLM's CPU backend reserves one; on a 2-core machine that was slower "
                        "(benchmarks/serve_overhead.py)")
    add_engine_args(s, "serve")
    add_lossy_args(s)


def cmd_serve(a) -> int:
    import torch
    import uvicorn

    from afford.async_engine import AsyncLLM
    from afford.serve.app import DrainingServer, create_app
    if a.threads:
        torch.set_num_threads(a.threads)
    llm = AsyncLLM.from_config(*engine_configs(a), max_queue=a.max_queue, lossy=lossy_from_args(a))
    app = create_app(llm, a.served_model_name or a.model, a.api_key, a.max_body_bytes, a.shutdown_timeout)
    config = uvicorn.Config(app, host=a.host, port=a.port, log_level="info",
                            timeout_graceful_shutdown=int(a.shutdown_timeout) + 1)   # a backstop only
    try:
        DrainingServer(config, llm, a.shutdown_timeout).run()
    except KeyboardInterrupt:                     # uvicorn re-raises the SIGINT it has drained for: done
        pass
    except OSError as e:                          # e.g. the port is taken or the host cannot be bound
        raise ConfigError(f"cannot serve on {a.host}:{a.port}: {e.strerror or e}") from None
    # drained: every request finished or was aborted and every stream has ended. Skip the interpreter's
    # teardown of torch, transformers and the rest (~1.1 s on a 2-core machine), which would otherwise
    # push a SIGTERM's exit past --shutdown-timeout + 2 s
    import logging
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _quantize(sub):
    q = sub.add_parser("quantize", help="write a weight-only int8/int4 checkpoint (FineQuant-style, lossy)")
    q.add_argument("--model", required=True)
    q.add_argument("--bits", type=int, required=True, choices=[4, 8], help="8 or 4")
    q.add_argument("--group", default="auto", type=_group,
                   help="auto (adaptive per matrix) | per-channel | 32 | 64 | 128 ...")
    q.add_argument("--tau", type=number_arg(float, 0), default=0.15,
                   help="auto: halve the group while that cuts the error by > tau")
    q.add_argument("--head", action="store_true", help="quantize the LM head too (a tied head gets its own "
                   "low-bit copy; the embedding lookup keeps the full table)")
    q.add_argument("--out", required=True, help="a new folder (an existing one is refused, not overwritten)")


def _group(text: str) -> str:
    if text in ("auto", "per-channel") or (text.isdigit() and int(text) > 0):
        return text
    raise argparse.ArgumentTypeError(f"must be auto, per-channel or a positive group size, got {text!r}")


def cmd_quantize(a) -> int:
    from collections import Counter
    from pathlib import Path

    import torch

    from afford.models.loader import load_model, resolve_model_path
    from afford.models.quant import quantize_model, save_quantized
    out = Path(a.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {a.out} already exists; give a new folder (nothing is overwritten)")
    path = resolve_model_path(a.model)
    with torch.no_grad():
        model = load_model(path, device="cpu", dtype="float32")
        groups = quantize_model(model, a.bits, a.group, a.tau, head=a.head)
    tok_files = [f for f in Path(path).iterdir() if f.name.startswith(("tokenizer", "special_tokens"))]
    save_quantized(model, a.out, tok_files)
    print(f"int{a.bits} checkpoint written to {a.out}; group sizes chosen: {dict(Counter(groups.values()))}")
    return 0


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are ONE line (what is wrong, where to look), exit status 2 -- not the
    whole usage block; the subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="afford", description="cheaper LLM decoding, with the cost in view")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _generate(sub)
    _serve(sub)
    _zoo(sub)
    _quantize(sub)
    w = sub.add_parser("afd-worker", help="an attention or FFN worker of an AFD deployment (start one per --rank "
                                          "on any host; rank 0 runs with --afd ... --afd-address HOST:PORT)")
    from afford.afd.worker import add_args
    add_args(w)
    from afford.cost.cli import add_parser as _cost
    _cost(sub)
    from afford.compress.cli import add_parsers as _compress
    _compress(sub)
    from afford.bench.cli import add_parser as _bench
    _bench(sub)
    return parser


def torchrun_afd(a) -> int | None:
    """`torchrun --nproc-per-node N+M -m afford serve|generate --afd attention=N,ffn=M ...`: rank 0 runs the
    command (the engine, and attention worker 0) at torchrun's MASTER_ADDR:MASTER_PORT, ranks 1..N-1 run the
    other attention workers and N..N+M-1 the FFN workers (their exit status returned); None when this is not
    such a launch."""
    from afford.afd.protocol import AFDSpec, torchrun_env
    run = torchrun_env() if a.cmd in ("generate", "serve") and getattr(a, "afd", None) else None
    if run is None:
        return None
    rank, world, address = run
    spec = AFDSpec.parse(a.afd)
    if world != spec.world_size:
        raise ConfigError(f"torchrun started {world} processes but --afd {a.afd} needs {spec.world_size}"
                          f" (the attention + the FFN workers): set --nproc-per-node to match")
    if rank == 0:
        a.afd_address = address
        return None
    import argparse

    from afford.afd.worker import run as run_worker
    from afford.models.loader import resolve_model_path
    return run_worker(argparse.Namespace(model=str(resolve_model_path(a.model)), address=address, rank=rank,
                                         world_size=world, device=a.device or "auto", dtype=a.dtype or "auto",
                                         threads=max(1, (os.cpu_count() or 2) // world), timeout=120.0,
                                         attention=spec.attention))


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if (status := torchrun_afd(a)) is not None:
            return status
        if a.cmd == "cost":
            from afford.cost.cli import run
            return run(a)
        if a.cmd == "bench":
            from afford.bench.cli import main as bench_main
            return bench_main(a)
        if a.cmd == "afd-worker":
            from afford.afd.worker import run
            return run(a)
        if a.cmd in ("compress", "decompress"):
            from afford.compress.cli import run
            return run(a)
        return {"generate": cmd_generate, "serve": cmd_serve, "zoo": cmd_zoo, "quantize": cmd_quantize}[a.cmd](a)
    except ConfigError as e:
        print(f"afford: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
