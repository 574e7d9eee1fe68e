"""A fact-QA set whose facts no model has trained on: invented kingdoms, each described by one document
(capital, river, founder, export, founding year), and cloze questions about them. Deterministic from a
seed, so `afford bench fidelity` and the tests rebuild the same set; `write` puts it on disk as a GRAD
corpus folder (docs/*.txt) plus questions.jsonl (split "dev" / "test" by kingdom).

The questions are cloze prompts ("... Answer: The capital of Velmora is"), the usual way to ask a small
base model (LAMA-style probes); an answer counts when the generated text up to the first newline starts
with it, once leading spaces are removed."""
from __future__ import annotations

import json
import random
from pathlib import Path

SYLLABLES = ("vel", "mor", "ka", "dran", "sel", "qu", "esh", "tor", "lin", "bra", "vos", "ith", "gal", "run",
             "pe", "zan", "dor", "mi", "fen", "ost", "ra", "nim", "cal", "thu", "wen", "orb", "lu", "sar")
GOODS = ("copper", "salt", "amber", "wool", "glass", "indigo", "timber", "silver", "honey", "marble", "tin",
         "pepper", "linen", "jade", "cider")
TEMPLATES = (
    "{K} is a small kingdom in the far north. Its capital is {C}, a walled city on the banks of the {R} river. "
    "{K} was founded in the year {Y} by {F}. Most of the wealth of {K} comes from {G}, which its merchants "
    "sell across the sea.",
    "Travellers who reach {K} usually arrive at {C}, its capital. The {R} river runs through the whole "
    "kingdom. Old records say that {F} founded {K} in {Y}. Today the main export of {K} is {G}.",
    "The kingdom of {K} lies between two mountain ranges. {F} founded it in {Y} and chose {C} as its capital. "
    "Its largest river is the {R}, and its farms and mines are known for {G}, the chief export of {K}.",
)
QUESTIONS = {
    "capital": ("What is the capital of {K}?", "The capital of {K} is", "C"),
    "river": ("Which river flows through {K}?", "The river of {K} is the", "R"),
    "founder": ("Who founded {K}?", "{K} was founded by", "F"),
    "year": ("In which year was {K} founded?", "{K} was founded in the year", "Y"),
    "export": ("What is the main export of {K}?", "The main export of {K} is", "G"),
}


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def build(n_kingdoms: int = 60, seed: int = 0) -> tuple[list[tuple[str, str]], list[dict]]:
    """(documents as (file name, text), questions as {"id", "split", "kingdom", "prompt", "answer"})."""
    rng = random.Random(seed)
    used: set[str] = set()

    def fresh(parts: int) -> str:
        while True:
            n = _name(rng, parts)
            if n not in used:
                used.add(n)
                return n
    docs, questions = [], []
    for i in range(n_kingdoms):
        facts = {"K": fresh(3), "C": fresh(2), "R": fresh(2), "F": f"{fresh(2)} {fresh(2)}",
                 "Y": str(rng.randint(900, 1899)), "G": rng.choice(GOODS)}
        docs.append((f"{facts['K'].lower()}.txt", rng.choice(TEMPLATES).format(**facts)))
        split = "dev" if i % 3 == 0 else "test"
        for key, (q, lead, ans) in QUESTIONS.items():
            questions.append({"id": f"{facts['K']}-{key}", "split": split, "kingdom": facts["K"],
                              "prompt": f"Question: {q.format(**facts)}\nAnswer: {lead.format(**facts)}",
                              "answer": facts[ans]})
    return docs, questions


def write(folder: str | Path, n_kingdoms: int = 60, seed: int = 0) -> Path:
    """The set on disk: folder/docs/*.txt (a GRAD corpus) and folder/questions.jsonl."""
    folder = Path(folder)
    docs, questions = build(n_kingdoms, seed)
    (folder / "docs").mkdir(parents=True, exist_ok=True)
    for name, text in docs:
        (folder / "docs" / name).write_text(text + "\n")
    (folder / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return folder


def correct(generated: str, answer: str) -> bool:
    return generated.split("\n", 1)[0].lstrip().startswith(answer)
