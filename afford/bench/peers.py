"""The peers `afford bench` runs beside afford when they are installed: Hugging Face transformers'
`generate` (plain, assisted generation with the same draft, prompt lookup) and llama.cpp through
llama-cpp-python on a GGUF file. Each runner takes one prompt and returns (new token ids, seconds)."""
from __future__ import annotations

import time
from collections.abc import Callable

Runner = Callable[[str, int], tuple[list[int], float]]


def transformers_runners(model: str, draft: str | None) -> tuple[dict[str, Runner], dict[str, str]]:
    """{arm name: runner} for transformers, and {arm name: why it was skipped}."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:                                     # pragma: no cover - transformers is a dependency
        return {}, {"hf plain": f"transformers is not importable: {e}"}
    from transformers.utils import logging as hf_logging

    from afford.models.loader import resolve_model_path
    hf_logging.set_verbosity_error()
    tpath = resolve_model_path(model)
    tok = AutoTokenizer.from_pretrained(tpath)
    target = _no_eos(AutoModelForCausalLM.from_pretrained(tpath, dtype=torch.float32).eval())
    arms: dict[str, dict] = {"hf plain": {}, "hf prompt lookup": {"prompt_lookup_num_tokens": 4}}
    skipped = {}
    if draft is not None and draft != "ngram":
        arms["hf assisted"] = {"assistant_model": _no_eos(AutoModelForCausalLM.from_pretrained(
            resolve_model_path(draft, role="draft"), dtype=torch.float32).eval())}
    else:
        skipped["hf assisted"] = "no draft model given (--draft)"

    def runner(kw: dict) -> Runner:
        def run(prompt: str, new_tokens: int) -> tuple[list[int], float]:
            ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
            t = time.perf_counter()
            with torch.inference_mode():
                out = target.generate(**ids, max_new_tokens=new_tokens, do_sample=False, **kw)
            return out[0, ids["input_ids"].shape[1]:].tolist(), time.perf_counter() - t
        return run
    return {name: runner(kw) for name, kw in arms.items()}, skipped


def _no_eos(model):
    """Decode past the end-of-sequence token as afford's ignore_eos does (min_new_tokens would instead mask
    it and change the greedy token where the model picks it)."""
    model.generation_config.eos_token_id = None
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = 0
    return model


def llamacpp_runner(gguf: str | None) -> tuple[dict[str, Runner], dict[str, str]]:
    if gguf is None:
        return {}, {"llama.cpp": "no GGUF file given (--gguf; benchmarks/llamacpp.py converts the bundled model)"}
    try:
        from llama_cpp import Llama
    except ImportError:
        return {}, {"llama.cpp": "llama-cpp-python is not installed (pip install -e '.[bench]')"}
    llm = Llama(model_path=gguf, n_ctx=1024, n_threads=None, verbose=False)

    def run(prompt: str, new_tokens: int) -> tuple[list[int], float]:
        ids = llm.tokenize(prompt.encode(), add_bos=False)
        llm.reset()
        t = time.perf_counter()
        out = []
        for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            out.append(tok)
            if len(out) == new_tokens:
                break
        return out, time.perf_counter() - t
    return {"llama.cpp": run}, {}
