"""Property-based fuzzing of the HTTP API with hypothesis: generated JSON bodies (random types, unicode with
lone surrogates and control characters, deep nesting, huge and tiny numbers, NaN, extra fields, the real
fields with wrong or extreme values) and raw bytes, against a real uvicorn server on loopback. Every
answer is below 500, every error has the OpenAI shape, and after each example the server still answers
a normal request. Bounded: a fixed example budget, a tiny model, max_tokens capped by the context."""
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server import Server, wait_idle

FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
          "stream_options", "stop", "seed", "logprobs", "top_logprobs", "model", "echo", "user",
          "presence_penalty", "frequency_penalty"]

texts = st.one_of(st.text(max_size=40), st.sampled_from(["\ud800", "a\udfffb", "\x00\x01\x1b[0m", "\u202e", "\U0001f600" * 30,
                                                      "<|endoftext|>", " " * 64]))
numbers = st.one_of(st.integers(-(2 ** 80), 2 ** 80), st.integers(-3, 300),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, 2, 0.5, 1e-300, 1e300]))
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(texts, inner, max_size=4)), max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system", "assistant"]), texts),
                                           "content": st.one_of(texts, values)}), max_size=3)
bodies = st.dictionaries(st.one_of(st.sampled_from(FIELDS), texts),
                         st.one_of(values, texts, messages), max_size=6)


def deep(n: int) -> str:
    return '{"prompt": ' + "[" * n + "]" * n + "}"


@pytest.fixture(scope="module")
def fuzz_server(llama_dir):
    s = Server(llama_dir)
    yield s
    s.stop()


def check(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err


def alive(c: httpx.Client) -> None:
    ok = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "temperature": 0})
    assert ok.status_code == 200, ok.text


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=st.one_of(bodies, st.binary(max_size=64), st.sampled_from([deep(50), deep(5000), "null", "[]", "1",
                                                                       '"\\ud800"', '{"prompt": NaN}'])),
       chat=st.booleans())
def test_fuzzed_bodies_never_5xx(fuzz_server, body, chat):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if isinstance(body, dict):                  # bound the time a valid request may generate for
        for k in ("max_tokens", "max_completion_tokens"):
            if type(body.get(k)) is int and body[k] > 64:
                body[k] = 64
        if chat and "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = 16
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    with httpx.Client(base_url=fuzz_server.url, timeout=60) as c:
        if isinstance(body, dict) and body.get("stream") is True:
            with c.stream("POST", path, content=content, headers={"content-type": "application/json"}) as r:
                r.read()
                check(r)
        else:
            check(c.post(path, content=content, headers={"content-type": "application/json"}))
        alive(c)


def test_after_fuzzing_nothing_leaks(fuzz_server):
    assert wait_idle(fuzz_server)
    eng = fuzz_server.llm.engine
    eng.pool.check()
    assert fuzz_server.llm.step_errors == 0
    metrics = httpx.get(fuzz_server.url + "/metrics").text
    assert len(metrics) < 40_000                # bounded: no series per junk value
