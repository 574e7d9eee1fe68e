"""Corpora for the zoo: plain text or JSON lines from any path, split into train and held-out tail."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from afford.config import ConfigError


def read_documents(path: str | Path) -> list[str]:
    """Documents of one file. `.jsonl`: one per line, its "text" field or its string fields joined by
    newlines (GSM8K: question, then answer; Spec-Bench: its turns). Anything else: the whole file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data file {str(p)!r} not found; pass text or .jsonl files (see data/README.md)")
    if p.suffix != ".jsonl":
        text = p.read_text(encoding="utf-8", errors="replace")
        return [text] if text.strip() else []
    docs = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}:{n} is not valid JSON: {e}") from e
        docs.append(record_text(rec))
    return [d for d in docs if d.strip()]


def record_text(rec) -> str:
    if isinstance(rec, str):
        return rec
    if "text" in rec:
        return str(rec["text"])
    parts = []
    for v in rec.values():
        if isinstance(v, str):
            parts.append(v)
        elif isinstance(v, list):
            parts.extend(x for x in v if isinstance(x, str))
    return "\n".join(parts)


@dataclass(frozen=True)
class Split:
    train: list[str]
    val: list[str]


def split_documents(paths: list[str | Path], val_fraction: float = 0.05, conditioned: bool = False,
                    seed: int = 0) -> Split:
    """Hold out the tail of every file: the last documents of a .jsonl, the last characters of a text
    (cut at a line break), so validation text is never trained on. conditioned (C3oT, afford/zoo/cot.py):
    each record of a GSM8K-style .jsonl becomes two documents, its long and its short chain under their
    condition prefixes, held out together; the training documents are shuffled."""
    if not 0 <= val_fraction < 1:
        raise ConfigError("val_fraction must be in [0, 1)")
    train, val = [], []
    for path in paths:
        if conditioned and Path(path).suffix == ".jsonl":
            from afford.zoo.cot import conditioned_pairs
            pairs = conditioned_pairs(path)
            n_val = int(round(len(pairs) * val_fraction))
            train.extend(d for pair in pairs[:len(pairs) - n_val] for d in pair)
            val.extend(d for pair in pairs[len(pairs) - n_val:] for d in pair)
            continue
        docs = read_documents(path)
        if not docs:
            raise ConfigError(f"data file {path} is empty: the zoo needs text to train on")
        if len(docs) == 1:
            text = docs[0]
            cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction))) if val_fraction else len(text)
            cut = cut if cut > 0 else int(len(text) * (1 - val_fraction))
            train.append(text[:cut])
            if text[cut:].strip():
                val.append(text[cut:])
        else:
            n_val = int(round(len(docs) * val_fraction))
            train.extend(docs[: len(docs) - n_val])
            val.extend(docs[len(docs) - n_val:])
    if conditioned:
        from afford.zoo.cot import shuffled
        train = shuffled(train, seed)
    return Split(train, val)


def teacher_text(teacher: str, prompts_path: str, field: str, out: str, limit: int | None = None,
                 max_tokens: int = 160) -> int:
    """The teacher's greedy continuation of each record's `field`, written as {field, "answer"} JSON
    lines: text a draft can be distilled on so that it learns the teacher's own outputs."""
    from afford import LLM, SamplingParams
    recs = [json.loads(line) for line in Path(prompts_path).read_text().splitlines() if line.strip()]
    if not recs or field not in recs[0]:
        raise ConfigError(f"{prompts_path} has no records with a {field!r} field")
    prompts = [r[field] for r in recs[:limit]]
    llm = LLM(teacher, max_num_seqs=128)
    outs = llm.generate([p + "\n" for p in prompts], SamplingParams(max_tokens=max_tokens, temperature=0))
    with open(out, "w") as f:
        for p, o in zip(prompts, outs):
            f.write(json.dumps({field: p, "answer": o.text}) + "\n")
    return len(prompts)
