"""Pure builders of OpenAI response bodies from the engine's RequestOutputs, shared by the streamed and
the whole (non-streamed) paths. Nothing here touches the engine or the network; `decode` turns one
token id into its text (the server passes `lambda t: tokenizer.decode([t])`).

A logprob entry, as the engine reports it per generated token:
    {"token": int, "logprob": float, "top": {token_id: logprob, ...}}   # "top" absent when 0 were asked
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from afford.core.outputs import RequestOutput

Decode = Callable[[int], str]

SSE_DONE = "data: [DONE]\n\n"


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """The OpenAI error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def object_name(chat: bool, stream: bool) -> str:
    """The "object" field: chat.completion(.chunk) for chat, text_completion (streamed too) for completions."""
    if chat:
        return "chat.completion.chunk" if stream else "chat.completion"
    return "text_completion"


def completion_logprobs(entries: list[dict], decode: Decode) -> dict:
    """/v1/completions `logprobs`: parallel lists, one item per token."""
    return {"tokens": [decode(e["token"]) for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{decode(t): lp for t, lp in e.get("top", {}).items()} for e in entries],
            "text_offset": []}


def chat_logprobs(entries: list[dict], decode: Decode) -> dict:
    """/v1/chat/completions `logprobs`: {"content": [one object per token, with its top alternatives]}."""
    return {"content": [{"token": decode(e["token"]), "logprob": e["logprob"], "bytes": None,
                         "top_logprobs": [{"token": decode(t), "logprob": lp, "bytes": None}
                                          for t, lp in e.get("top", {}).items()]} for e in entries]}


def format_logprobs(entries: list[dict] | None, chat: bool, decode: Decode) -> dict | None:
    """The `logprobs` of one choice, or None where none were asked for (entries is None)."""
    if entries is None:
        return None
    return chat_logprobs(entries, decode) if chat else completion_logprobs(entries, decode)


def choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None, *, chat: bool,
           stream: bool) -> dict:
    """One entry of "choices". text is the whole text (stream=False) or the new piece (stream=True):
    chat puts it in "message" (whole) or "delta" (piece; {} when the piece is empty), completions in "text"."""
    c: dict = {"index": index}
    if chat and stream:
        c["delta"] = {"content": text} if text else {}
    elif chat:
        c["message"] = {"role": "assistant", "content": text}
    else:
        c["text"] = text
    c["logprobs"] = logprobs
    c["finish_reason"] = finish_reason
    return c


def final_choices(outs: Sequence[RequestOutput], chat: bool, decode: Decode) -> list[dict]:
    """The choices of a whole response, from each choice's finished RequestOutput (in index order)."""
    return [choice(o.index, o.text, format_logprobs(o.logprobs, chat, decode), o.finish_reason, chat=chat,
                   stream=False) for o in outs]


def delta_choice(out: RequestOutput, new_logprobs: list[dict] | None, chat: bool, decode: Decode) -> dict:
    """The one choice of a streamed chunk: the piece `out` added, with the logprob entries new since the
    last chunk of this choice (None or [] gives "logprobs": null)."""
    return choice(out.index, out.delta, format_logprobs(new_logprobs or None, chat, decode),
                  out.finish_reason if out.finished else None, chat=chat, stream=True)


def provenance(out: RequestOutput, start: int, usd_per_1m: float | None) -> tuple[dict, int]:
    """The afford extension of a choice (asked for with "provenance": true): its tokens from `start` on as
    [text, source] pairs -- the text each token added (a multi-byte character goes with the token that
    completes it), source "target", "draft" (a draft token the target accepted), "small" or "large"
    (under a cascade) -- with the request's drafted and accepted counts so far and the planner's modeled
    USD per 1M tokens (None without --cost-hardware). Like the text deltas, a token whose text is still held
    back (it could start a stop string) waits; once the request finished, text past a stop string is cut.
    Returns the object and the index of the first token it did not include."""
    at = sum(len(p) for p in out.pieces[:start])
    pairs, i = [], start
    while i < len(out.sources):
        piece = out.pieces[i]
        if at + len(piece) > out.shown:
            if not out.finished:
                break
            piece = piece[:max(out.shown - at, 0)]
        pairs.append([piece, out.sources[i]])
        at += len(out.pieces[i])
        i += 1
    return {"tokens": pairs,
            "drafted": out.metrics.get("drafted", 0), "accepted": out.metrics.get("accepted", 0),
            "usd_per_1m": usd_per_1m}, i


def role_choices(n: int) -> list[dict]:
    """A streamed chat response's first chunk: the assistant role for each of the n choices."""
    return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            for i in range(n)]


def usage(outs: Sequence[RequestOutput]) -> dict:
    """Token counts of a request: its prompt once, the completions of all its choices."""
    p = outs[0].metrics["prompt_tokens"]
    c = sum(o.metrics["generated_tokens"] for o in outs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def envelope(rid: str, obj: str, created: int, model: str, choices: list[dict], **extra) -> dict:
    """The body around the choices, the same for a whole response and for each streamed chunk."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices, **extra}


def sse(data: dict) -> str:
    """One server-sent event."""
    return "data: " + json.dumps(data) + "\n\n"
