"""The OpenAI-compatible HTTP server over an `Engine` (FastAPI on uvicorn).

    lsjax serve --ckpt CKPT [--adapter NAME=DIR ...] [--slots 16] [--host 127.0.0.1] [--port 8000]

Routes: `/v1/completions` and `/v1/chat/completions` (server-sent events with `stream: true`),
`/v1/models`, `/health`, `/metrics` (Prometheus text); with `allow_runtime_adapters`,
`/v1/load_lora_adapter` and `/v1/unload_lora_adapter`. A request's `model` is the base model's
name or an adapter's (an engine over an `AdapterTable` mixes them in one batch). Every bad request is a 4xx with an
OpenAI-style error body whose `param` names the field; a client that goes away frees its slot;
stopping the server ends the requests in flight as `cancelled`. With an API key every route but
`/health` wants `Authorization: Bearer KEY` (else 401); a body past `max_body_bytes` is a 413 before
it is parsed, and a full waiting queue a 503 with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import secrets
import threading
import time
import uuid
from typing import AsyncIterator

from lsjax.extras import Extra, missing_extra

try:
    import uvicorn
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException
except ImportError as e:
    raise missing_extra(e, Extra.SERVE, "the HTTP server (lsjax serve)") from None

from lsjax.adapters import AdapterError, open_adapter
from lsjax.errors import ConfigError
from lsjax.serve.engine import AdapterInUse, Engine, Event, QueueFull, UnknownAdapter
from lsjax.serve.protocol import ChatBody, CompletionBody, LoadAdapterBody, UnloadAdapterBody, check_text

POLL_SECONDS = 0.25  # how often a waiting non-streamed request checks that its client is still there
MAX_BODY_BYTES = 8 << 20
OPEN_PATHS = ("/health",)  # answered without the API key (load balancers' probes)


def error(status: int, message: str, param: str | None, kind: str = "invalid_request_error", code: str | None = None,
          headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                        headers=headers)


def _param(location: tuple) -> str | None:
    """The request field a validation error is about (`messages.0.role` style), without the body prefix."""
    parts = [str(p) for p in location if p != "body" and not str(p).startswith(("function-", "json-or"))]
    # a union's failure names each member type tried (`str`, `list[int]`): they are not fields
    parts = [p for p in parts if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool", "dict")]
    return ".".join(parts) or None


class Guard:
    """ASGI middleware in front of the app: the API key, then the body's size (read to the limit and
    handed on, so a huge body is refused before anything parses it)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            if not secrets.compare_digest(headers.get(b"authorization", b""), f"Bearer {self.api_key}".encode()):
                return await error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                                   code="invalid_api_key")(scope, receive, send)
        too_big = error(413, f"the request body is larger than {self.max_body_bytes} bytes", None)
        if int(headers.get(b"content-length", b"0") or 0) > self.max_body_bytes:
            return await too_big(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await too_big(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def create_app(engine: Engine, model_name: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, allow_runtime_adapters: bool = False) -> FastAPI:
    """The app over `engine`: `model_name` is the base model's name (the engine's one adapter's, on an
    engine without a table); adapters go by their names in the engine's table."""
    app = FastAPI(title="lsjax", docs_url=None, redoc_url=None)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    tokenizer = engine.tokenizer
    # no text longer than this can fit the context: refused before tokenizing it
    longest_piece = max(len(t) for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    max_chars = engine.config.max_len * longest_piece

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return error(400, f"the body is not valid JSON: {first.get('msg')}", None)
        param = _param(tuple(first.get("loc", ())))
        if first.get("type") == "model_attributes_type":
            return error(400, "the body must be a JSON object", None)
        what = "unknown field" if first.get("type") == "extra_forbidden" else first.get("msg", "invalid value")
        return error(400, f"{param}: {what}", param)

    @app.exception_handler(ConfigError)
    async def _refused(_, exc: ConfigError):
        if isinstance(exc, UnknownAdapter):
            return error(404, str(exc), exc.field, "not_found", "model_not_found")
        return error(400, str(exc), exc.field)

    @app.exception_handler(AdapterError)
    async def _bad_adapter(_, exc: AdapterError):
        return error(400, str(exc), "lora_path")

    @app.exception_handler(AdapterInUse)
    async def _in_use(_, exc: AdapterInUse):
        return error(409, str(exc), "lora_name", code="adapter_in_use")

    @app.exception_handler(QueueFull)
    async def _busy(_, exc: QueueFull):
        return error(503, str(exc), None, "server_error", headers={"Retry-After": "1"})

    @app.exception_handler(HTTPException)
    async def _http(_, exc: HTTPException):
        kind = {404: "not_found", 503: "server_error"}.get(exc.status_code, "invalid_request_error")
        return error(exc.status_code, str(exc.detail), None, kind)

    def adapter_of(name: str) -> str | None:
        """The adapter a request's `model` names (None: the base, or an engine's one adapter)."""
        if name == model_name:
            return None
        if name not in engine.adapters():
            served = ", ".join(repr(n) for n in [model_name, *sorted(engine.adapters())])
            raise UnknownAdapter(f"model {name!r} is not served here; this server serves {served}", "model")
        return name

    def encode_prompt(prompt: str | list[int], field: str) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)  # an empty prompt or negative ids are refused by `Request`, naming the prompt
        check_text(prompt, field)
        if len(prompt) > max_chars:
            raise ConfigError(f"{field}: {len(prompt)} characters cannot fit in the context of "
                              f"{engine.config.max_len} tokens", field)
        return tokenizer.encode(prompt, add_special_tokens=False)

    def submit(body, adapter: str | None, prompt: list[int], logprobs: int | None, listener):
        request = dataclasses.replace(body.request(prompt, logprobs, engine.room(len(prompt))), adapter=adapter)
        if engine.failure is not None or engine.thread is None:
            raise HTTPException(503, "the engine is not running")
        return engine.submit(request, listener)

    @app.get("/health")
    async def health():
        if engine.failure is not None or engine.thread is None:
            return error(503, "the engine is not running", None, "server_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        base = {"id": model_name, "object": "model", "created": 0, "owned_by": "lsjax", "root": model_name,
                "parent": None}
        adapters = [{**base, "id": name, "parent": model_name, "method": str(config.method)}
                    for name, config in sorted(engine.adapters().items())]
        return {"object": "list", "data": [base, *adapters]}

    def runtime_adapters() -> None:
        if not allow_runtime_adapters:
            raise HTTPException(404, "loading adapters at run time is off; start the server with "
                                     "--allow-runtime-adapters")

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterBody):
        runtime_adapters()
        if body.lora_name == model_name:
            raise ConfigError(f"lora_name {body.lora_name!r} is the base model's name; choose another", "lora_name")
        adapter = await asyncio.to_thread(open_adapter, body.lora_path, engine.decoder.config)
        await asyncio.to_thread(engine.load_adapter, body.lora_name, adapter, body.lora_path)
        return PlainTextResponse(f"Success: adapter {body.lora_name!r} loaded.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterBody):
        runtime_adapters()
        if body.lora_name not in engine.adapters():
            raise UnknownAdapter(f"adapter {body.lora_name!r} is not loaded; loaded: "
                                 f"{', '.join(sorted(engine.adapters())) or 'none'}", "lora_name")
        await asyncio.to_thread(engine.unload_adapter, body.lora_name)
        return PlainTextResponse(f"Success: adapter {body.lora_name!r} unloaded.")

    @app.get("/metrics")
    async def metrics():
        m = engine.metrics()
        lines = []
        for name, kind, doc, value in (
                ("lsjax_requests_total", "counter", "Requests accepted.", m["requests_total"]),
                ("lsjax_generated_tokens_total", "counter", "Tokens generated.", m["tokens_total"]),
                ("lsjax_decode_steps_total", "counter", "Decode steps run.", m["steps_total"]),
                ("lsjax_active_slots", "gauge", "Slots decoding a request.", m["active_slots"]),
                ("lsjax_slots", "gauge", "Decode slots.", m["slots"]),
                ("lsjax_queue_depth", "gauge", "Requests waiting for a slot.", m["queue_depth"]),
                ("lsjax_step_seconds_mean", "gauge", "Mean decode step time (recent steps).", m["step_seconds_mean"]),
                ("lsjax_step_seconds_p99", "gauge", "99th percentile decode step time (recent steps).",
                 m["step_seconds_p99"])):
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HttpRequest):
        adapter = adapter_of(body.model)  # an unknown model refused before any prompt is tokenized
        forms = body.prompts()
        if len(forms) > engine.config.max_queue:
            raise ConfigError(f"prompt: {len(forms)} prompts, more than the {engine.config.max_queue} requests the "
                              "server queues; send fewer at once", "prompt")
        prompts = [encode_prompt(p, "prompt" if len(forms) == 1 else f"prompt.{i}") for i, p in enumerate(forms)]
        return await respond(http, body, adapter, prompts, body.logprobs, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HttpRequest):
        adapter = adapter_of(body.model)
        messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(body.messages)]
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("this model's tokenizer has no chat template; use /v1/completions", "messages")
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompt = list(getattr(ids, "input_ids", ids))
        return await respond(http, body, adapter, [prompt], body.logprobs_count(), chat=True)

    async def respond(http: HttpRequest, body, adapter: str | None, prompts: list[list[int]], logprobs: int | None,
                      chat: bool):
        """One choice per prompt (by index), whole or streamed (chunks carry their choice's index)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        handles = []
        try:
            for i, prompt in enumerate(prompts):
                handles.append(submit(body, adapter, prompt, logprobs,
                                      lambda e, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, e))))
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        made = [Made(body.model, chat, len(p), tokenizer, index=i) for i, p in enumerate(prompts)]
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream(handles, events, made, usage), media_type="text/event-stream")
        collected: list[list[Event]] = [[] for _ in prompts]
        try:
            while sum(bool(c and c[-1].finish_reason) for c in collected) < len(prompts):
                try:
                    i, event = await asyncio.wait_for(events.get(), POLL_SECONDS)
                    collected[i].append(event)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return None
        finally:
            for h in handles:
                h.cancel()  # frees the slots if the client went away (no-op once finished)
        echo = getattr(body, "echo", False)
        whole = [m.whole(c, echo=(list(h.request.prompt), h.prompt_scores) if echo else None)
                 for m, c, h in zip(made, collected, handles)]
        return {**whole[0], "choices": [c for w in whole for c in w["choices"]], "usage": total_usage(made)}

    async def stream(handles, events: asyncio.Queue, made: list["Made"], usage: bool) -> AsyncIterator[str]:
        try:
            first, left = set(range(len(handles))), len(handles)
            while left:
                i, event = await events.get()
                chunk = made[i].chunk(event, i in first)
                first.discard(i)
                yield "data: " + json.dumps({**chunk, "id": made[0].id}) + "\n\n"
                left -= bool(event.finish_reason)
            if usage:
                yield "data: " + json.dumps({**made[0].usage_chunk(), "usage": total_usage(made)}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for h in handles:
                h.cancel()  # the client disconnected mid-stream: free the slots at once

    return app


def total_usage(made: list["Made"]) -> dict:
    prompt, completion = sum(m.prompt_tokens for m in made), sum(m.tokens for m in made)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Made:
    """The response objects of one choice, whole or as stream chunks, in OpenAI's shapes."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int, tokenizer, index: int = 0):
        self.model, self.chat, self.prompt_tokens, self.tokenizer = model, chat, prompt_tokens, tokenizer
        self.index = index
        self.chars = 0  # text streamed so far: where the next chunk's text starts
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.tokens = 0

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def usage(self) -> dict:
        return total_usage([self])

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _logprobs(self, events: list[Event], start: int = 0) -> dict | None:
        scored = [e for e in events if e.token_id is not None and e.logprob is not None]
        if not scored:
            return None
        if self.chat:
            def entry(token_id, logprob):
                piece = self._piece(token_id)
                return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}
            return {"content": [{**entry(e.token_id, e.logprob),
                                 "top_logprobs": [entry(i, p) for i, p in (e.top_logprobs or [])]} for e in scored]}
        return self._legacy([(e.token_id, e.logprob, e.top_logprobs) for e in scored], start)

    def _legacy(self, scored: list[tuple[int, float | None, list | None]], start: int = 0) -> dict:
        """OpenAI's legacy completions logprobs: pieces, their logprobs, alternatives, and each piece's
        character offset in the returned text (from `start`)."""
        pieces = [self._piece(t) for t, _, _ in scored]
        offsets = list(itertools.accumulate((len(p) for p in pieces[:-1]), initial=start))[:len(pieces)]
        return {"tokens": pieces, "token_logprobs": [lp for _, lp, _ in scored],
                "top_logprobs": [None if top is None else {self._piece(i): p for i, p in top} for _, _, top in scored],
                "text_offset": offsets}

    def whole(self, events: list[Event], echo: tuple[list[int], list | None] | None = None) -> dict:
        """The response; `echo`: (prompt ids, their scores or None), the prompt put before the text."""
        self.tokens = sum(e.token_id is not None for e in events)
        text = "".join(e.text for e in events)
        logprobs = self._logprobs(events)
        if echo is not None:
            prompt, scores = echo
            text = self.tokenizer.decode(prompt) + text
            if scores is not None:
                rows = [(t, None, None) if s is None else (t, s[0], s[1]) for t, s in zip(prompt, scores)]
                rows += [(e.token_id, e.logprob, e.top_logprobs) for e in events if e.token_id is not None]
                logprobs = self._legacy(rows)
        choice = {"index": self.index, "finish_reason": events[-1].finish_reason, "logprobs": logprobs}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
            return {**self._head("chat.completion"), "choices": [choice], "usage": self.usage()}
        choice["text"] = text
        return {**self._head("text_completion"), "choices": [choice], "usage": self.usage()}

    def chunk(self, event: Event, first: bool) -> dict:
        self.tokens += event.token_id is not None
        choice = {"index": self.index, "finish_reason": event.finish_reason,
                  "logprobs": self._logprobs([event], self.chars)}
        self.chars += len(event.text)
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": event.text} if first else {"content": event.text}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice["text"] = event.text
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": self.usage()}


class Server(uvicorn.Server):
    """uvicorn's server that, when told to stop, first ends the engine's requests (as `cancelled`),
    so open streams close cleanly instead of holding the shutdown. A lockstep engine that failed (a
    process of its group died: the next collective fails) shuts the server down too: it can never
    step again, and an exit lets whatever runs the group start it anew."""

    def __init__(self, engine: Engine, config: uvicorn.Config):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame):
        threading.Thread(target=self.engine.stop, daemon=True).start()
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.engine.lockstep is not None and self.engine.failure is not None:
            self.should_exit = True
        return await super().on_tick(counter)


def server(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000, *,
           api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES, allow_runtime_adapters: bool = False
           ) -> Server:
    """A uvicorn server for the engine (started: `engine.start()`); `.run()` blocks, or drive it from a thread."""
    config = uvicorn.Config(create_app(engine, model_name, api_key, max_body_bytes, allow_runtime_adapters),
                            host=host, port=port,
                            log_level="warning", timeout_graceful_shutdown=5)
    return Server(engine, config)
