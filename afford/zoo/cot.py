"""C3oT on GSM8K (../shared/reference/decoding-methods.md §6): a compressor that shortens a solution's
chain of thought while keeping its core information, and the conditioned training data -- every
example twice, under the paper's long and short condition prefixes -- that teaches one model both, so
that it answers briefly when decoded with the short prefix.

The paper compresses with GPT-4; here the compressor is a rule set for GSM8K's format, whose solutions
carry their arithmetic as calculator annotations (`48/2 = <<48/2=24>>24 clips`): a line keeps its
equations (and the word after each result, usually its unit); a line without one, or one whose other
numbers an equation would lose, keeps its words minus fillers. Every number of the solution survives
(tests/test_cot.py) and the `#### answer` line is kept as is.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from afford.config import ConfigError

LONG = "Answer and provide a detailed thought process:"           # C3oT's two condition prefixes
SHORT = "Answer and provide as brief a thought process as possible:"

ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
_NUMBER = re.compile(r"\d+(?:\.\d+)?|\.\d+")
_FILLER = frozenset("""a an the is are was were be been of to and so that this these those it its he she they we
you his her their our then there thus therefore which who will would can could has have had does did do per
for with by as at on in from into each every also now since because just total altogether""".split())


def numbers(text: str) -> list[str]:
    """The numbers of a text by value: commas in thousands and trailing decimal zeros removed ("1,200" ->
    "1200", "2.50" -> "2.5")."""
    return [("0" + x if x[0] == "." else x).rstrip("0").rstrip(".") if "." in x else x
            for x in _NUMBER.findall(text.replace(",", ""))]


def _drop_fillers(line: str) -> str:
    words = [w for w in line.split() if w.lower().strip(".,;:!?") not in _FILLER]
    return " ".join(words)


def _compress_line(line: str) -> str:
    eqs = list(ANNOTATION.finditer(line))
    if not eqs:
        return _drop_fillers(line)
    parts = []
    for m in eqs:
        expr, result = m.group(1).strip(), m.group(2).strip()
        after = line[m.end():]
        unit = re.match(r"\s*" + re.escape(result) + r"\s+([A-Za-z]+)", after)   # the word after the shown result
        parts.append(f"{expr}={result}" + (f" {unit.group(1)}" if unit and unit.group(1).lower() not in _FILLER else ""))
    short = ", ".join(parts)
    visible = ANNOTATION.sub("", line)
    if set(numbers(visible)) - set(numbers(short)):          # a number outside the equations: keep the words
        return _drop_fillers(visible)
    return short


def compress_solution(answer: str) -> str:
    """A GSM8K solution with a shorter chain of thought: the same numbers and the same `#### x` line."""
    out = []
    for line in answer.splitlines():
        if not line.strip():
            continue
        out.append(line.strip() if line.startswith("####") else _compress_line(line))
    return "\n".join(x for x in out if x)


def word_count(text: str) -> int:
    return len(ANNOTATION.sub(r"\1=\2", text).split())


def compress_file(src: str | Path, out: str | Path, question: str = "question", answer: str = "answer") -> dict:
    """Write {question, answer, short_answer} JSON lines for the records of a GSM8K-style .jsonl file;
    returns counts and the compression rate (the share of the chains' words removed, C3oT's measure)."""
    recs = _records(src, question, answer)
    long_w = short_w = 0
    with open(out, "w") as f:
        for r in recs:
            short = compress_solution(r[answer])
            long_w += word_count(r[answer])
            short_w += word_count(short)
            f.write(json.dumps({question: r[question], answer: r[answer], "short_answer": short}) + "\n")
    return {"records": len(recs), "words_long": long_w, "words_short": short_w,
            "compression_rate": round(1 - short_w / max(long_w, 1), 4)}


def _records(src, question: str, answer: str) -> list[dict]:
    p = Path(src)
    if not p.is_file() or p.suffix != ".jsonl":
        raise ConfigError(f"{src!r} is not a .jsonl file: C3oT needs records with {question!r} and {answer!r} fields")
    recs = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not recs or any(question not in r or answer not in r for r in recs):
        raise ConfigError(f"every record of {src} needs a {question!r} and an {answer!r} field (GSM8K's format)")
    return recs


def prompt(question: str, short: bool = True) -> str:
    """The text a conditioned model is decoded from (C3oT decodes with the short condition)."""
    return f"{SHORT if short else LONG}\n{question}\n"


def conditioned_pairs(src: str | Path) -> list[tuple[str, str]]:
    """Per record of a GSM8K-style file, its long and its short training document (the short chain from
    the record's "short_answer" field, or compressed here)."""
    return [(prompt(r["question"], short=False) + r["answer"],
             prompt(r["question"]) + r.get("short_answer", compress_solution(r["answer"])))
            for r in _records(src, "question", "answer")]


def shuffled(docs: list[str], seed: int) -> list[str]:
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    return docs
