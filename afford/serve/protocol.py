"""OpenAI request schemas (pydantic). Unknown fields are rejected, as OpenAI does, and types are strict:
"8" for max_tokens, "0.5" for temperature or "yes" for stream is a 400, not coerced."""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 16
SEED_MAX = (1 << 63) - 1        # a signed 64-bit seed, as OpenAI's; seed + index (n > 1) must fit too
STRICT = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class _Common(BaseModel):
    model_config = STRICT
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(default=None, ge=-SEED_MAX - 1, le=SEED_MAX - MAX_N)
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    shared_prefix: int = Field(default=0, ge=0)     # afford extension: the n choices share their first m tokens
    provenance: bool = False                        # afford extension: each choice gets an "afford" object with
                                                    # who produced each token (responses.provenance)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, v):
        if v != 0:
            raise ValueError("penalties are not supported by afford (they change the distribution); send 0")
        return v


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported")
        return v


class TextPart(BaseModel):
    """One part of a message's content in the list form ({"type": "text", "text": ...}); text only."""
    model_config = STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[TextPart]]
    name: str | None = None

    @property
    def text(self) -> str:
        """The content as one string: the list form's text parts joined by newlines."""
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
