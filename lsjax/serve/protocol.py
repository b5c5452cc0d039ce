"""The OpenAI request bodies the server accepts (pydantic), and how they become engine `Request`s.

Fields OpenAI defines but the engine cannot honour (n > 1, penalties, tools, ...) are refused by
name rather than ignored; fields outside the API are refused too. `top_k` and `stop_token_ids` are
the usual extensions of open servers. Completions take a prompt in each of the API's four forms
(a string, strings, token ids, lists of token ids), one choice per prompt, and `echo` with
`logprobs` scores the prompt's own tokens (with `max_tokens` 0: scoring only, as evaluation
harnesses ask).
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
        self.refuse_unsupported()
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        max_tokens = self.wanted_tokens() or self.default_max_tokens(room)
        seed = self.seed if self.seed is not None else secrets.randbelow(2**31)
        sampling = SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=seed % 2**31)
        stop_ids = None if self.stop_token_ids is None else tuple(self.stop_token_ids)
        return Request(tuple(prompt), max_tokens=max_tokens, sampling=sampling, stop_ids=stop_ids,
                       stop_strings=tuple(stops), logprobs=logprobs, prompt_logprobs=self.prompt_logprobs())

    def refuse_unsupported(self) -> None:
        for field, why in self.unsupported():
            raise ConfigError(why, field)
        for i, stop in enumerate([self.stop] if isinstance(self.stop, str) else self.stop or []):
            check_text(stop, "stop" if isinstance(self.stop, str) else f"stop.{i}")

    def prompt_logprobs(self) -> int | None:
        return None

    def wanted_tokens(self) -> int | None:
        return self.max_tokens

    def default_max_tokens(self, room: int) -> int:
        return max(1, room)


def check_text(text: str, field: str) -> None:
    """Refuse text that is not valid Unicode (JSON lets a lone surrogate through; tokenizers choke on it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"{field}: not valid Unicode text (a lone surrogate at character {e.start})", field) from None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def default_max_tokens(self, room: int) -> int:
        return max(1, min(16, room))  # OpenAI's default for completions

    def request(self, prompt: list[int], logprobs: int | None, room: int) -> Request:
        if self.max_tokens == 0:
            self.refuse_unsupported()
            return Request(tuple(prompt), max_tokens=0, prompt_logprobs=self.prompt_logprobs(), stop_ids=())
        return super().request(prompt, logprobs, room)

    def prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None

    def prompts(self) -> list[str | list[int]]:
        """The prompt's four forms as one list: strings or token-id lists, one choice each."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        if not self.prompt:
            raise ConfigError("prompt: an empty list; expected a string, strings, token ids or lists of token ids",
                              "prompt")
        return list(self.prompt)

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.echo and self.stream:
            out.append(("echo", "echo with stream=true is not supported; ask for the whole response"))
        if self.max_tokens == 0 and not (self.echo and self.logprobs is not None):
            out.append(("max_tokens", "max_tokens=0 generates nothing: it is for scoring a prompt, with echo=true "
                                      "and logprobs"))
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

    def text(self, index: int = 0) -> str:
        if isinstance(self.content, str):
            check_text(self.content, f"messages.{index}.content")
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ConfigError("only text content parts are supported", "messages")
            parts.append(part["text"])
        text = "".join(parts)
        check_text(text, f"messages.{index}.content")
        return text


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


class UnloadAdapterBody(BaseModel):
    """`/v1/unload_lora_adapter`: the adapter's name."""

    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str = Field(min_length=1)


class LoadAdapterBody(UnloadAdapterBody):
    """`/v1/load_lora_adapter`: a name for the adapter and its folder (lsjax's format or a PEFT LoRA)."""

    lora_path: str = Field(min_length=1)
