"""The OpenAI request bodies the server accepts (pydantic), and how they become engine `Request`s.

Fields OpenAI defines but the engine cannot honour (n > 1, penalties, echo, tools, ...) are
refused by name rather than ignored; fields outside the API are refused too. `top_k` and
`stop_token_ids` are the usual extensions of open servers.
"""

from __future__ import annotations

import secrets
from typing import Any, Literal

from lsjax.extras import Extra, missing_extra

try:
    from pydantic import BaseModel, ConfigDict, Field, field_validator
except ImportError as e:
    raise missing_extra(e, Extra.SERVE, "the HTTP server's request bodies") from None

from lsjax.errors import ConfigError
from lsjax.sampling import SamplingConfig
from lsjax.serve.engine import TOP_LOGPROBS, Request


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty", mode="before")
    @classmethod
    def _number(cls, value):  # strict mode, but JSON's 1 is as good a float as 1.0
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, why) for every option given that the engine does not honour."""
        out = []
        if self.n != 1:
            out.append(("n", "only n=1 is supported; send one request per completion"))
        if self.presence_penalty or self.frequency_penalty:
            out.append(("presence_penalty" if self.presence_penalty else "frequency_penalty",
                        "penalties are not supported; leave them at 0"))
        if self.logit_bias:
            out.append(("logit_bias", "logit_bias is not supported"))
        if self.stream_options and not self.stream:
            out.append(("stream_options", "stream_options needs stream=true"))
        if self.stream_options and set(self.stream_options) - {"include_usage"}:
            out.append(("stream_options", "only include_usage is supported"))
        return out

    def request(self, prompt: list[int], logprobs: int | None, room: int) -> Request:
        """The engine request; `room`: the most tokens this prompt leaves (the default's bound)."""
        for field, why in self.unsupported():
            raise ConfigError(why, field)
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        max_tokens = self.wanted_tokens() or self.default_max_tokens(room)
        seed = self.seed if self.seed is not None else secrets.randbelow(2**31)
        sampling = SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=seed % 2**31)
        stop_ids = None if self.stop_token_ids is None else tuple(self.stop_token_ids)
        return Request(tuple(prompt), max_tokens=max_tokens, sampling=sampling, stop_ids=stop_ids,
                       stop_strings=tuple(stops), logprobs=logprobs)

    def wanted_tokens(self) -> int | None:
        return self.max_tokens

    def default_max_tokens(self, room: int) -> int:
        return max(1, room)


class CompletionBody(_Body):
    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def default_max_tokens(self, room: int) -> int:
        return max(1, min(16, room))  # OpenAI's default for completions

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.echo:
            out.append(("echo", "echo is not supported"))
        if self.best_of not in (None, 1):
            out.append(("best_of", "only best_of=1 is supported"))
        if self.suffix:
            out.append(("suffix", "suffix (insertion) is not supported"))
        return out


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ConfigError("only text content parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(None, gt=0)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.tools or self.tool_choice not in (None, "none"):
            out.append(("tools", "tools are not supported"))
        if self.response_format and self.response_format.get("type") != "text":
            out.append(("response_format", "only response_format type 'text' is supported"))
        if self.top_logprobs and not self.logprobs:
            out.append(("top_logprobs", "top_logprobs needs logprobs=true"))
        return out

    def wanted_tokens(self) -> int | None:
        return self.max_tokens or self.max_completion_tokens

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None
