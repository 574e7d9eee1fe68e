"""The OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions (streaming, n, stop, seed,
logprobs, usage), /v1/models, /health, /metrics. Every error a client can cause is an OpenAI-style
JSON body with a 4xx status; nothing a request does can stop the engine thread.

The routes are thin: each calls one method of the app's `Frontend` (frontend.py), which holds the
state and does the work; the bodies are built by the pure functions in responses.py."""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from afford.async_engine import AsyncLLM
from afford.serve.frontend import DEFAULT_CHAT_TEMPLATE, Frontend, HTTPError, error_response

__all__ = ["create_app", "Frontend", "HTTPError", "error_response", "DEFAULT_CHAT_TEMPLATE"]


def create_app(llm: AsyncLLM, model_name: str = "afford", api_key: str | None = None,
               max_body_bytes: int = 1 << 20, shutdown_timeout: float = 10.0) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app):
        yield
        llm.shutdown(timeout=shutdown_timeout)      # uvicorn has stopped accepting; finish or abort in-flight

    app = FastAPI(title="afford", version="0.1.0", lifespan=lifespan)
    fe = Frontend.create(llm, model_name, api_key, max_body_bytes)
    app.state.llm, app.state.metrics, app.state.frontend = llm, fe.metrics, fe

    @app.exception_handler(HTTPError)
    async def http_error(_request: Request, e: HTTPError):
        return error_response(e)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        try:
            fe.check_headers(request)
            response = await call_next(request)
        except HTTPError as e:
            response = error_response(e)
        fe.count(request.url.path, response.status_code)
        return response

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await fe.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await fe.chat_completions(request)

    @app.get("/v1/models")
    async def models():
        return fe.models()

    @app.get("/health")
    async def health():
        return fe.health()

    @app.get("/metrics")
    async def prom():
        return fe.prometheus()

    return app
