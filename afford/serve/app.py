"""The OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions (streaming, n, stop, seed,
logprobs, usage), /v1/models, /health, /metrics. Every error a client can cause is an OpenAI-style
JSON body with a 4xx status; nothing a request does can stop the engine thread."""
from __future__ import annotations

import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from afford.async_engine import AsyncLLM, EngineDead, QueueFull
from afford.config import ConfigError
from afford.core.params import SamplingParams
from afford.serve.metrics import ServerMetrics
from afford.serve.protocol import ChatCompletionRequest, CompletionRequest

DEFAULT_CHAT_TEMPLATE = "{role}: {content}\n"     # then "assistant:" — used when the tokenizer has no template


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        self.status, self.message, self.param, self.code, self.kind, self.headers = \
            status, message, param, code, kind, headers


def error_response(e: HTTPError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


def create_app(llm: AsyncLLM, model_name: str = "afford", api_key: str | None = None,
               max_body_bytes: int = 1 << 20, shutdown_timeout: float = 10.0) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app):
        yield
        llm.shutdown(timeout=shutdown_timeout)      # uvicorn has stopped accepting; finish or abort in-flight

    app = FastAPI(title="afford", version="0.1.0", lifespan=lifespan)
    eng = llm.engine
    tok = eng.tokenizer
    metrics = ServerMetrics(llm)
    app.state.llm, app.state.metrics = llm, metrics

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        try:
            if api_key and path.startswith("/v1/"):
                if request.headers.get("authorization", "") != f"Bearer {api_key}":
                    raise HTTPError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                    code="invalid_api_key", kind="authentication_error")
            size = request.headers.get("content-length")
            if size is not None and size.isdigit() and int(size) > max_body_bytes:
                raise HTTPError(413, f"request body over {max_body_bytes} bytes", code="request_too_large")
            response = await call_next(request)
        except HTTPError as e:
            response = error_response(e)
        if path.startswith("/v1/") and path != "/v1/models":
            metrics.requests.labels(path, str(response.status_code)).inc()
        return response

    async def parse(request: Request, schema):
        body = await request.body()
        if len(body) > max_body_bytes:
            raise HTTPError(413, f"request body over {max_body_bytes} bytes", code="request_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"the body is not valid JSON: {e}", code="invalid_json")
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(x) for x in err["loc"]) or None
            raise HTTPError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param,
                            code="invalid_value")

    def sampling(req, prompt_len: int, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        room = eng.max_model_len - prompt_len
        if room <= 0:
            raise HTTPError(400, f"the prompt has {prompt_len} tokens; this server's context is {eng.max_model_len}",
                            param="prompt", code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise HTTPError(400, f"max_tokens={max_tokens} plus the {prompt_len}-token prompt exceeds the context of "
                            f"{eng.max_model_len} tokens; ask for at most {room}", param="max_tokens",
                            code="context_length_exceeded")
        try:
            return SamplingParams(max_tokens=max_tokens or room, temperature=req.temperature, top_p=req.top_p,
                                  n=req.n, stop=req.stop, seed=req.seed, logprobs=logprobs)
        except ConfigError as e:
            raise HTTPError(400, str(e))

    def usage(outs) -> dict:
        p = outs[0].metrics["prompt_tokens"]
        c = sum(o.metrics["generated_tokens"] for o in outs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def token_str(t: int) -> str:
        return tok.decode([t])

    def completion_logprobs(entries: list[dict]) -> dict:
        return {"tokens": [token_str(e["token"]) for e in entries],
                "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{token_str(t): lp for t, lp in e.get("top", {}).items()} for e in entries],
                "text_offset": []}

    def chat_logprobs(entries: list[dict]) -> dict:
        return {"content": [{"token": token_str(e["token"]), "logprob": e["logprob"], "bytes": None,
                             "top_logprobs": [{"token": token_str(t), "logprob": lp, "bytes": None}
                                              for t, lp in e.get("top", {}).items()]} for e in entries]}

    async def run(prompt_ids, params, chat: bool, req):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        try:
            stream = llm.submit(prompt_ids, params, rid)
        except QueueFull as e:
            raise HTTPError(429, str(e), code="queue_full", kind="rate_limit_error", headers={"Retry-After": "1"})
        except EngineDead as e:
            raise HTTPError(503, str(e), code="unavailable", kind="server_error")
        created = int(time.time())
        if req.stream:
            return StreamingResponse(sse(stream, rid, created, params, chat, req), media_type="text/event-stream")
        finals: dict[int, object] = {}
        try:
            async for out in llm.outputs(stream, params.n, rid):
                if out.finished:
                    finals[out.index] = out
                    metrics.observe_finished(out.metrics)
        except ConfigError as e:
            raise HTTPError(400, str(e))
        except EngineDead as e:
            raise HTTPError(503, str(e), kind="server_error")
        except Exception as e:             # this request failed; the engine goes on
            raise HTTPError(500, f"generation failed: {e}", kind="server_error")
        outs = [finals[i] for i in sorted(finals)]
        if chat:
            choices = [{"index": o.index, "message": {"role": "assistant", "content": o.text},
                        "logprobs": chat_logprobs(o.logprobs) if o.logprobs is not None else None,
                        "finish_reason": o.finish_reason} for o in outs]
            obj = "chat.completion"
        else:
            choices = [{"index": o.index, "text": o.text, "finish_reason": o.finish_reason,
                        "logprobs": completion_logprobs(o.logprobs) if o.logprobs is not None else None}
                       for o in outs]
            obj = "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": model_name,
                             "choices": choices, "usage": usage(outs)})

    async def sse(stream, rid, created, params, chat, req):
        obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        finals = []

        def chunk(choices, **extra):
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model_name,
                                          "choices": choices, **extra}) + "\n\n"
        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(params.n)])
        try:
            seen = {}
            async for out in llm.outputs(stream, params.n, rid):
                new_lp = None
                if out.logprobs is not None:
                    new_lp = out.logprobs[seen.get(out.index, 0):]
                    seen[out.index] = len(out.logprobs)
                if chat:
                    c = {"index": out.index, "delta": {"content": out.delta} if out.delta else {},
                         "logprobs": chat_logprobs(new_lp) if new_lp else None,
                         "finish_reason": out.finish_reason if out.finished else None}
                else:
                    c = {"index": out.index, "text": out.delta,
                         "logprobs": completion_logprobs(new_lp) if new_lp else None,
                         "finish_reason": out.finish_reason if out.finished else None}
                if out.finished:
                    finals.append(out)
                    metrics.observe_finished(out.metrics)
                yield chunk([c])
            if include_usage:
                yield chunk([], usage=usage(finals))
        except (ConfigError, EngineDead, RuntimeError) as e:
            yield "data: " + json.dumps({"error": {"message": str(e), "type": "server_error", "param": None,
                                                   "code": None}}) + "\n\n"
        yield "data: [DONE]\n\n"

    def encode_prompt(prompt) -> list[int]:
        ids = tok(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise HTTPError(400, "the prompt is empty", param="prompt")
        if any(not isinstance(t, int) or not 0 <= t < eng.model_config.vocab_size for t in ids):
            raise HTTPError(400, "prompt token ids must lie in the vocabulary", param="prompt")
        return ids

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            req = await parse(request, CompletionRequest)
            prompt = req.prompt
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
                if len(prompt) != 1:
                    raise HTTPError(400, "send one prompt per request (a list of several is not supported)",
                                    param="prompt")
                prompt = prompt[0]
            ids = encode_prompt(prompt)
            params = sampling(req, len(ids), req.max_tokens, req.logprobs)
            return await run(ids, params, False, req)
        except HTTPError as e:
            return error_response(e)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            req = await parse(request, ChatCompletionRequest)
            msgs = [{"role": m.role, "content": m.content} for m in req.messages]
            if getattr(tok, "chat_template", None):
                text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            else:
                text = "".join(DEFAULT_CHAT_TEMPLATE.format(**m) for m in msgs) + "assistant:"
            ids = encode_prompt(text)
            lp = (req.top_logprobs or 0) if req.logprobs else None
            params = sampling(req, len(ids), req.max_completion_tokens or req.max_tokens, lp)
            return await run(ids, params, True, req)
        except HTTPError as e:
            return error_response(e)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "afford",
                                            "max_model_len": eng.max_model_len}]}

    @app.get("/health")
    async def health():
        ok = llm.thread.is_alive()
        return JSONResponse({"status": "ok" if ok else "dead"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prom():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
