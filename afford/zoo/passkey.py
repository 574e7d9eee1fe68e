"""A synthetic long-range task for training and measuring long-context models (issue #17): a pass key
planted at a random depth of filler text, asked for at the end -- the passkey retrieval test of Mohtashami
& Jaggi (2023), as NOSA and InfLLM-V2 report it.

    afford zoo passkey --filler data/tinyshakespeare/input.txt --out runs/passkey.jsonl --n 2000 --tokens 1000,3000

writes JSON lines {"text", "prompt", "key"}: `text` (filler, the key sentence, more filler, the question and
its answer) is a training document for `afford zoo train --data`; `prompt` stops before the answer, for
`accuracy`, which counts the greedy completions that start with the key."""
from __future__ import annotations

import json
import random
from pathlib import Path

from afford.config import ConfigError

KEY = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"


def make(filler: str, tokenizer, n: int, min_tokens: int, max_tokens: int, seed: int = 0) -> list[dict]:
    """n documents of about min_tokens..max_tokens tokens (the filler is cut at line breaks)."""
    if not 0 < min_tokens <= max_tokens:
        raise ConfigError(f"passkey lengths need 0 < min <= max, got {min_tokens}, {max_tokens}")
    lines = [x for x in filler.splitlines() if x.strip()]
    if not lines:
        raise ConfigError("the filler text is empty")
    per_line = max(1, len(tokenizer("\n".join(lines[:200]), add_special_tokens=False)["input_ids"]) //
                   min(len(lines), 200))
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        want = rng.randint(min_tokens, max_tokens) // per_line          # lines of filler for this document
        start = rng.randrange(max(len(lines) - want, 1))
        body = lines[start:start + want]
        key = str(rng.randint(10000, 99999))
        body.insert(rng.randint(0, len(body)), KEY.format(key=key))
        prompt = "\n".join(body) + QUESTION
        docs.append({"text": f"{prompt} {key}.", "prompt": prompt, "key": key})
    return docs


def write(out: str | Path, docs: list[dict]) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return out


def accuracy(llm, docs: list[dict]) -> float:
    """Share of documents whose greedy completion of the prompt starts with the key."""
    from afford import SamplingParams
    outs = llm.generate([d["prompt"] for d in docs], SamplingParams(max_tokens=4, temperature=0))
    return sum(o.text.strip().startswith(d["key"]) for o, d in zip(outs, docs)) / len(docs)
