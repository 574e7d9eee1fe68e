"""The server's state and request handling, after mini-sglang's FrontendManager: one `Frontend` per app
holds the AsyncLLM, its tokenizer and the server's settings, validates requests and runs them; the
routes in app.py are one line each. Response bodies come from the pure builders in responses.py.

A request's way through:  parse (JSON + schema) -> prompt ids -> sampling (context checks) ->
submit (queue checks) -> a whole JSON response (collect) or a stream of server-sent events (events).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from afford.async_engine import AsyncLLM, EngineDead, QueueFull
from afford.config import ConfigError
from afford.core.params import SamplingParams
from afford.serve.metrics import ServerMetrics
from afford.serve.protocol import ChatCompletionRequest, CompletionRequest
from afford.serve.responses import (
    SSE_DONE,
    delta_choice,
    envelope,
    error_body,
    final_choices,
    object_name,
    provenance,
    role_choices,
    sse,
    usage,
)

if TYPE_CHECKING:
    from afford.core.outputs import RequestOutput

DEFAULT_CHAT_TEMPLATE = "{role}: {content}\n"     # then "assistant:" — used when the tokenizer has no template


class HTTPError(Exception):
    """An error the client caused, answered with an OpenAI error body. Filled where the error is found:
    status, the HTTP status code; message, what went wrong and what to do; param, the request field at
    fault (or None); code, OpenAI's machine-readable code (or None); kind, the body's "type"; headers,
    extra response headers (Retry-After on 429) or None."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        self.status, self.message, self.param, self.code, self.kind, self.headers = \
            status, message, param, code, kind, headers


def error_response(e: HTTPError) -> JSONResponse:
    def text(x):                       # a message may quote the client's input, lone surrogates included
        return x.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(x, str) else x
    return JSONResponse(error_body(text(e.message), e.kind, text(e.param), e.code), status_code=e.status,
                        headers=e.headers)


ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


def lone_surrogate(data) -> str | None:
    """The dotted path of the first string in a parsed JSON body (keys included) that holds a lone
    surrogate -- JSON allows the escape, UTF-8 cannot encode it -- or None. Iterative: deep nesting is fine."""
    todo = [(data, "")]
    while todo:
        x, path = todo.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(x, dict):
            todo += [(k, path) for k in x] + [(v, f"{path}.{k}".lstrip(".")) for k, v in x.items()]
        elif isinstance(x, list):
            todo += [(v, f"{path}.{i}".lstrip(".")) for i, v in enumerate(x)]
    return None


def single_prompt(prompt):
    """A completion request's prompt as one string or one list of ids: a batch of one is unwrapped,
    a batch of several refused."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise HTTPError(400, "send one prompt per request (a list of several is not supported)", param="prompt")
        return prompt[0]
    return prompt


@dataclass(frozen=True, eq=False)
class Frontend:
    """One server's state, built by `Frontend.create` from create_app's arguments:
    llm, the AsyncLLM whose thread runs the engine; tokenizer, llm.engine.tokenizer (prompts, chat
    template, logprob tokens); metrics, a fresh ServerMetrics(llm) (this app's Prometheus registry);
    model_name, the id /v1/models lists and every response carries (--served-model-name, else --model);
    api_key, the bearer token /v1/* require, or None for none (--api-key); max_body_bytes, the largest
    request body accepted, larger is 413 (--max-body-bytes); max_model_len, llm.engine.max_model_len,
    the context a prompt plus max_tokens must fit; vocab_size, llm.engine.model_config.vocab_size, the
    bound on prompt token ids."""
    llm: AsyncLLM
    tokenizer: Any
    metrics: ServerMetrics
    model_name: str
    api_key: str | None
    max_body_bytes: int
    max_model_len: int
    vocab_size: int

    @classmethod
    def create(cls, llm: AsyncLLM, model_name: str, api_key: str | None, max_body_bytes: int) -> "Frontend":
        eng = llm.engine
        return cls(llm=llm, tokenizer=eng.tokenizer, metrics=ServerMetrics(llm), model_name=model_name,
                   api_key=api_key, max_body_bytes=max_body_bytes, max_model_len=eng.max_model_len,
                   vocab_size=eng.model_config.vocab_size)

    # ---- what every request passes (the app's middleware) ----
    def check_headers(self, request: Request) -> None:
        """The API key on /v1/*, and a declared body size within max_body_bytes."""
        if self.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {self.api_key}":
                raise HTTPError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                code="invalid_api_key", kind="authentication_error")
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body_bytes:
            raise HTTPError(413, f"request body over {self.max_body_bytes} bytes", code="request_too_large")

    def count(self, path: str, status: int) -> None:
        """afford_requests_total by endpoint and status, for /v1/* except /v1/models; any path that is not
        an endpoint counts as "other" (a label per junk path would grow /metrics without bound)."""
        if path.startswith("/v1/") and path != "/v1/models":
            self.metrics.requests.labels(path if path in ENDPOINTS else "other", str(status)).inc()

    # ---- the endpoints ----
    async def completions(self, request: Request) -> Response:
        req = await self.parse(request, CompletionRequest)
        ids = self.encode_prompt(single_prompt(req.prompt))
        return await self.respond(ids, self.sampling(req, len(ids), req.max_tokens, req.logprobs), False, req,
                                  request)

    async def chat_completions(self, request: Request) -> Response:
        req = await self.parse(request, ChatCompletionRequest)
        ids = self.encode_prompt(self.chat_text(req))
        lp = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling(req, len(ids), req.max_completion_tokens or req.max_tokens, lp)
        return await self.respond(ids, params, True, req, request)

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "afford", "max_model_len": self.max_model_len}]}

    def health(self) -> JSONResponse:
        broken = self.llm.engine.broken
        ok = self.llm.thread.is_alive() and broken is None
        body = {"status": "ok" if ok else "dead", **({"reason": str(broken)} if broken is not None else {})}
        return JSONResponse(body, status_code=200 if ok else 503)

    def prometheus(self) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    def playground(self) -> Response:
        """The playground page: plain HTML + JS, no external assets, fed by /v1/completions streaming with
        "provenance": true."""
        from importlib.resources import files
        return Response(files("afford.serve").joinpath("playground.html").read_text(encoding="utf-8"),
                        media_type="text/html; charset=utf-8")

    # ---- a request into prompt ids and SamplingParams ----
    async def parse(self, request: Request, schema: type[BaseModel]) -> Any:
        body = await request.body()
        if len(body) > self.max_body_bytes:
            raise HTTPError(413, f"request body over {self.max_body_bytes} bytes", code="request_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"the body is not valid JSON: {e}", code="invalid_json")
        except RecursionError:
            raise HTTPError(400, "the body nests too deeply to be a request", code="invalid_json")
        bad = lone_surrogate(data)
        if bad is not None:
            raise HTTPError(400, f"{bad or 'the body'}: a lone UTF-16 surrogate (e.g. \\ud800) is not text; send "
                            f"valid Unicode", param=bad or None, code="invalid_value")
        try:
            req = schema.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(x) for x in err["loc"]) or None
            raise HTTPError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param,
                            code="invalid_value")
        if req.model is not None and req.model != self.model_name:
            raise HTTPError(404, f"the model {req.model!r} does not exist; this server serves {self.model_name!r}",
                            param="model", code="model_not_found")
        return req

    def chat_text(self, req: ChatCompletionRequest) -> str:
        """The messages through the tokenizer's chat template, or DEFAULT_CHAT_TEMPLATE where it has none."""
        msgs = [{"role": m.role, "content": m.text} for m in req.messages]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return "".join(DEFAULT_CHAT_TEMPLATE.format(**m) for m in msgs) + "assistant:"

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise HTTPError(400, "the prompt is empty", param="prompt")
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in ids):
            raise HTTPError(400, "prompt token ids must lie in the vocabulary", param="prompt")
        return ids

    def sampling(self, req, prompt_len: int, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """SamplingParams for the request; the prompt and max_tokens must fit the context (no truncation)."""
        room = self.max_model_len - prompt_len
        if room <= 0:
            raise HTTPError(400, f"the prompt has {prompt_len} tokens; this server's context is {self.max_model_len}",
                            param="prompt", code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise HTTPError(400, f"max_tokens={max_tokens} plus the {prompt_len}-token prompt exceeds the context of "
                            f"{self.max_model_len} tokens; ask for at most {room}", param="max_tokens",
                            code="context_length_exceeded")
        try:
            return SamplingParams(max_tokens=max_tokens or room, temperature=req.temperature, top_p=req.top_p,
                                  n=req.n, stop=req.stop, seed=req.seed, logprobs=logprobs,
                                  shared_prefix=req.shared_prefix, provenance=req.provenance)
        except ConfigError as e:
            raise HTTPError(400, str(e))

    # ---- running a request ----
    def decode(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def usd_per_1m(self, out: RequestOutput) -> float | None:
        """The planner's modeled USD per 1M tokens of this model at the request's context (--cost-hardware)."""
        return self.llm.engine.modeled_usd_per_1m(len(out.prompt_token_ids) + len(out.token_ids))

    def submit(self, ids: list[int], params: SamplingParams, rid: str):
        """Admit the request to the engine thread; a full queue is 429, a dead engine 503."""
        try:
            return self.llm.submit(ids, params, rid)
        except QueueFull as e:
            raise HTTPError(429, str(e), code="queue_full", kind="rate_limit_error", headers={"Retry-After": "1"})
        except EngineDead as e:
            raise HTTPError(503, str(e), code="unavailable", kind="server_error")

    async def respond(self, ids: list[int], params: SamplingParams, chat: bool, req, request: Request) -> Response:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        stream = self.submit(ids, params, rid)
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self.events(stream, rid, created, params.n, chat, include_usage),
                                     media_type="text/event-stream")
        outs = await self.collect(stream, params.n, rid, request)
        choices = final_choices(outs, chat, self.decode)
        if params.provenance:
            for c, o in zip(choices, outs):
                c["afford"] = provenance(o, 0, self.usd_per_1m(o))[0]
        return JSONResponse(envelope(rid, object_name(chat, stream=False), created, self.model_name, choices,
                                     usage=usage(outs)))

    async def collect(self, stream, n: int, rid: str, request: Request) -> list[RequestOutput]:
        """Wait for all n choices to finish; their final outputs in index order. A client that goes away
        meanwhile has its request aborted (its blocks and queue slot are free by the next step)."""
        finals: dict[int, RequestOutput] = {}
        watch = asyncio.create_task(self.abort_when_gone(request, rid))
        try:
            async for out in self.llm.outputs(stream, n, rid):
                if out.finished:
                    finals[out.index] = out
                    self.metrics.observe_finished(out.metrics)
        except ConfigError as e:
            raise HTTPError(400, str(e))
        except EngineDead as e:
            if watch.done():               # we aborted it: the client left (nginx's 499, for the metrics)
                raise HTTPError(499, "the client closed the connection; the request was aborted",
                                code="client_closed_request")
            raise HTTPError(503, str(e), kind="server_error")
        except Exception as e:             # this request failed; the engine goes on
            raise HTTPError(500, f"generation failed: {e}", kind="server_error")
        finally:
            watch.cancel()
        return [finals[i] for i in sorted(finals)]

    async def abort_when_gone(self, request: Request, rid: str, every: float = 0.2) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(every)
        self.llm.abort(rid)

    async def events(self, stream, rid: str, created: int, n: int, chat: bool, include_usage: bool):
        """The server-sent events of a streamed response: (chat) the role chunk, one chunk per output
        with its new text and logprobs, (include_usage) a usage chunk, then [DONE] — also after an error."""
        head = partial(envelope, rid, object_name(chat, stream=True), created, self.model_name)
        if chat:
            yield sse(head(role_choices(n)))
        finals: list[RequestOutput] = []
        seen: dict[int, int] = {}          # choice index -> logprob entries already sent
        sent: dict[int, int] = {}          # choice index -> tokens whose provenance was sent
        try:
            async for out in self.llm.outputs(stream, n, rid):
                new_lp = None
                if out.logprobs is not None:
                    new_lp = out.logprobs[seen.get(out.index, 0):]
                    seen[out.index] = len(out.logprobs)
                c = delta_choice(out, new_lp, chat, self.decode)
                if out.sources is not None:
                    c["afford"], sent[out.index] = provenance(out, sent.get(out.index, 0), self.usd_per_1m(out))
                if out.finished:
                    finals.append(out)
                    self.metrics.observe_finished(out.metrics)
                yield sse(head([c]))
            if include_usage:
                yield sse(head([], usage=usage(finals)))
        except Exception as e:             # whatever failed this request: the stream still ends properly
            yield sse(error_body(str(e), "server_error"))
        yield SSE_DONE
