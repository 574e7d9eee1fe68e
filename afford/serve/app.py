"""The OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions (streaming, n, stop, seed,
logprobs, usage), /v1/models, /health, /metrics, and a playground page at / (playground.html). Every error a client can cause is an OpenAI-style
JSON body with a 4xx status; nothing a request does can stop the engine thread.

The routes are thin: each calls one method of the app's `Frontend` (frontend.py), which holds the
state and does the work; the bodies are built by the pure functions in responses.py."""
from __future__ import annotations

import threading
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from afford.async_engine import AsyncLLM
from afford.serve.frontend import DEFAULT_CHAT_TEMPLATE, Frontend, HTTPError, error_response

__all__ = ["create_app", "DrainingServer", "Frontend", "HTTPError", "error_response", "DEFAULT_CHAT_TEMPLATE"]


class DrainingServer(uvicorn.Server):
    """uvicorn, whose first SIGINT / SIGTERM also starts draining the engine: in-flight requests may finish
    for `timeout` seconds, then the rest are aborted, so every open stream ends with an error chunk and
    [DONE] and its connection closes -- uvicorn's own graceful wait (a backstop) then ends at once."""

    def __init__(self, config: uvicorn.Config, llm: AsyncLLM, timeout: float):
        super().__init__(config)
        self.llm, self.timeout, self.draining = llm, timeout, False

    def handle_exit(self, sig, frame) -> None:
        if not self.draining:
            self.draining = True
            threading.Thread(target=self.llm.shutdown, args=(self.timeout,), daemon=True).start()
        super().handle_exit(sig, frame)


class Guard:
    """What every HTTP request passes, as a plain ASGI middleware (Starlette's BaseHTTPMiddleware would hide
    a client's disconnect from the endpoint): the API key and the declared body size, then the request
    counted by endpoint and final status."""

    def __init__(self, app, frontend: Frontend):
        self.app, self.fe = app, frontend

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_seen(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            try:
                self.fe.check_headers(Request(scope))
            except HTTPError as e:
                return await error_response(e)(scope, receive, send_seen)
            await self.app(scope, receive, send_seen)
        finally:
            self.fe.count(scope["path"], status)


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

    @app.exception_handler(StarletteHTTPException)
    async def routing_error(request: Request, e: StarletteHTTPException):     # 404, 405: the same error shape
        what = {404: f"no route {request.url.path}: the endpoints are /v1/completions, /v1/chat/completions, "
                     f"/v1/models, /health, /metrics and / (the playground)",
                405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(HTTPError(e.status_code, what, code={404: "not_found", 405: "method_not_allowed"}
                                        .get(e.status_code), headers=e.headers))

    app.add_middleware(Guard, frontend=fe)

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

    @app.get("/")
    async def playground():
        return fe.playground()

    return app
