"""`Generator`: batched generation with a KV cache, sampling, stop tokens/strings and streaming.

    gen = Generator(model, tokenizer, adapter=None, strategy="auto")
    out = gen.generate(["What is the capital of France?"], max_new_tokens=32, chat=True)
    for event in gen.stream("Tell me a story", chat=True): print(event.text, end="")

Prompts are left-padded to a power-of-two bucket and the cache capacity is bucketed too, so
repeated calls with the same batch size and bucket never recompile. `generate` runs the whole
decode on device (`lax.while_loop`); `stream` steps from the host to yield tokens as they come.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lsjax.backend_interface import Backend
from lsjax.decode import left_pad
from lsjax.decoder import Decoder
from lsjax.errors import ConfigError
from lsjax.sampling import SamplingConfig, sample
from lsjax.textstream import TextStream, first_stop_string, ids_covering

MIN_BUCKET = 16
CACHE_ROUND = 64


@dataclasses.dataclass
class GenerationResult:
    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]  # "stop" (a stop token), "stop_string", or "length"
    prompt_tokens: list[int]
    # prefill_ms, decode_ms_per_token, total_ms; "compiled": 1.0 when this call compiled (a new bucket
    # or the first call), whose times then include compiling, else 0.0
    timings: dict[str, float]
    # with logprobs=True: each token's log-probability under the model (log-softmax of its logits,
    # before temperature, top-k and top-p), one per token id; else None
    logprobs: list[list[float]] | None = None


@dataclasses.dataclass
class StreamEvent:
    token_id: int
    text: str  # the new text this token completes (may be empty mid-character)
    finish_reason: str | None = None
    logprob: float | None = None  # with logprobs=True, as in `GenerationResult.logprobs`


def bucket(n: int) -> int:
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log p(token) under the model for each row: log-softmax of fp32 logits `[B, V]` at `tokens [B]`."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _loop(step, bundle, first_logits, cache, key, sampling, stop_ids, max_new, pad_id, budget: int,
          logprobs: bool = False):
    """Sample the first token from prefill logits, then decode on device until every row stops.
    With `logprobs` (static) also each token's log-probability (0 after a row stops), else None."""
    batch = first_logits.shape[0]
    key, sub = jax.random.split(key)
    token = sample(first_logits, sub, **sampling)
    tokens = jnp.full((batch, budget), pad_id, jnp.int32).at[:, 0].set(token)
    scores = jnp.zeros((batch, budget), jnp.float32).at[:, 0].set(token_logprobs(first_logits, token)) \
        if logprobs else None
    done = jnp.isin(token, stop_ids)

    def cond(state):
        i, _, _, _, _, _, done = state
        return (i < max_new) & ~jnp.all(done)

    def body(state):
        i, token, cache, key, tokens, scores, done = state
        logits, cache = step(bundle, token, cache)
        key, sub = jax.random.split(key)
        token = jnp.where(done, pad_id, sample(logits, sub, **sampling))
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], i, axis=1)
        if logprobs:
            score = jnp.where(done, 0.0, token_logprobs(logits, token))
            scores = jax.lax.dynamic_update_slice_in_dim(scores, score[:, None], i, axis=1)
        return i + 1, token, cache, key, tokens, scores, done | jnp.isin(token, stop_ids)

    steps, _, _, _, tokens, scores, done = jax.lax.while_loop(
        cond, body, (jnp.int32(1), token, cache, key, tokens, scores, done))
    return tokens, scores, done, steps


def _sample_step(step, bundle, token, cache, key, sampling, logprobs: bool = False):
    logits, cache = step(bundle, token, cache)
    key, sub = jax.random.split(key)
    token = sample(logits, sub, **sampling)
    return token, token_logprobs(logits, token) if logprobs else None, cache, key


@functools.lru_cache(maxsize=None)
def _compiled_loops(step):
    """The jitted decode loop and streaming step around one (cached, jitted) step function, so
    Generators for the same model, adapter config and strategy share their compilations."""
    return (jax.jit(functools.partial(_loop, step), static_argnames=("budget", "logprobs")),
            jax.jit(functools.partial(_sample_step, step), donate_argnums=(2,), static_argnames=("logprobs",)))


class Generator:
    """Generation from a loaded model (+ optional adapter) with a chosen decode strategy: a driver of
    `lsjax.decoder.Decoder` (its `decoder`), with prompts, sampling, stops and streaming on top.

    `strategy`: unmerged | fused | merged | auto (`lsjax.strategies`). `backend`: what runs the
    products (`lsjax.backends`: "xla", "native", "hybrid", "pallas", a backend object, e.g.
    `lsjax.backends.native_backend(huge_pages=False)`, or "auto"). `auto` (either) is the
    candidate timed fastest on this machine at `rows` rows, the batch this Generator will mostly
    run (`lsjax.autotune`: measured once, then read from its cache file). The Generator decodes
    from the model's and the adapter's own arrays: building one copies no weights (only the
    `merged` strategies hold weights of their own). `prepared` says what the backend did to place
    them (e.g. `{"huge_page_bytes": ...}` on the native CPU backend).
    """

    def __init__(self, model, tokenizer, adapter=None, *, strategy: str = "auto", backend: Backend | str | None = None,
                 max_cache_len: int | None = None, rows: int = 1):
        self._attach(Decoder(model, adapter, strategy=strategy, backend=backend, rows=rows), tokenizer, max_cache_len)

    @classmethod
    def of(cls, decoder: Decoder, tokenizer, max_cache_len: int | None = None) -> "Generator":
        """A Generator driving an existing `Decoder` (e.g. a serving engine's: the same arrays and
        compilations)."""
        generator = cls.__new__(cls)
        generator._attach(decoder, tokenizer, max_cache_len)
        return generator

    def _attach(self, decoder: Decoder, tokenizer, max_cache_len: int | None) -> None:
        self.decoder, self.tokenizer = decoder, tokenizer
        self.max_cache_len = max_cache_len or decoder.config.max_position_embeddings
        self._loop, self._sample_step = _compiled_loops(decoder.step_fn)

    # the decoder's, named here as a Generator's users know them
    config = property(lambda self: self.decoder.config)
    adapter_config = property(lambda self: self.decoder.adapter_config)
    backend = property(lambda self: self.decoder.backend)
    strategy = property(lambda self: self.decoder.strategy)
    bundle = property(lambda self: self.decoder.bundle)
    prepared = property(lambda self: self.decoder.prepared)
    _prefill = property(lambda self: self.decoder.prefill_fn)
    _step = property(lambda self: self.decoder.step_fn)

    # -- inputs ---------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str | Sequence[int]], chat: bool) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ConfigError("prompts must be a non-empty list of strings or token id lists (got an empty batch)"
                              if not isinstance(prompts, (str, bytes))
                              else "prompts must be a list; wrap one prompt in [ ]")
        if chat:
            self._need_tokenizer("chat=True (the tokenizer's chat template)")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if not p:
                    raise ConfigError(f"prompt {i} is empty; expected at least one token")
                self._need_tokenizer(f"prompt {i} is text, which")
                if chat:
                    ids = self.tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                             add_generation_prompt=True, tokenize=True)
                    ids = list(getattr(ids, "input_ids", ids))
                else:
                    ids = self.tokenizer.encode(p, add_special_tokens=False)
            elif chat:
                raise ConfigError(f"chat=True applies the chat template to text prompts, but prompt {i} is token ids; "
                                  "pass the text, or chat=False for ids that are already templated")
            else:
                ids = [int(t) for t in p]
            if not ids:
                raise ConfigError(f"prompt {i} is empty; expected at least one token")
            out.append(ids)
        return out

    def _need_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise ConfigError(f"{what} needs a tokenizer, and this Generator has none; "
                              "pass one, or prompts as token ids")

    def _setup(self, prompts, chat, max_new_tokens, sampling, stop_token_ids, stop_strings=()):
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens!r} is invalid; expected an integer >= 1")
        if isinstance(stop_strings, str):
            raise ConfigError(f"stop_strings={stop_strings!r} must be a list of strings; wrap one in [ ]")
        if any(stop_strings):
            self._need_tokenizer("stop_strings")
        sampling = sampling or SamplingConfig()
        ids = self.encode(prompts, chat)
        batch = len(ids)
        self.decoder.check_rows(batch, "a batch")
        longest = max(map(len, ids))
        width = bucket(longest)
        capacity = round_up(width + max_new_tokens, CACHE_ROUND)
        if width + max_new_tokens > self.max_cache_len:
            raise ConfigError(f"prompt of {longest} tokens (bucket {width}) + max_new_tokens={max_new_tokens} "
                              f"exceeds the cache length {self.max_cache_len}; shorten the prompt or max_new_tokens")
        capacity = min(capacity, round_up(self.max_cache_len, CACHE_ROUND))
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        tokens, mask = left_pad(ids, pad, width)
        stops = tuple(self.config.eos_token_ids) if stop_token_ids is None else tuple(stop_token_ids)
        cache = self.decoder.empty_cache(batch, capacity)
        return ids, tokens, mask, cache, sampling, stops, pad, capacity - width

    # -- generation ------------------------------------------------------------------------------
    def generate(self, prompts, *, max_new_tokens: int = 64, sampling: SamplingConfig | None = None,
                 stop_token_ids: Sequence[int] | None = None, stop_strings: Sequence[str] = (),
                 chat: bool = False, logprobs: bool = False) -> GenerationResult:
        """Generate for a batch of prompts (strings or token ids) on device; texts, ids, reasons, timings,
        and with `logprobs` each token's log-probability under the model."""
        ids, tokens, mask, cache, sampling, stops, pad, budget = self._setup(
            prompts, chat, max_new_tokens, sampling, stop_token_ids, stop_strings)
        compiled_before = self.compile_count()
        start = time.perf_counter()
        logits, cache = self._prefill(self.bundle, tokens, mask, cache)
        logits.block_until_ready()
        prefill_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        out, scores, done, steps = self._loop(
            self.bundle, logits, cache, jax.random.key(sampling.seed), sampling.arrays(),
            jnp.asarray(stops or (-1,), jnp.int32), jnp.int32(max_new_tokens), jnp.int32(pad), budget=budget,
            logprobs=bool(logprobs))
        out, done, steps = np.asarray(out), np.asarray(done), int(steps)
        scores = None if scores is None else np.asarray(scores)
        decode_ms = (time.perf_counter() - start) * 1e3
        result = GenerationResult([], [], [], [len(p) for p in ids],
                                  {"prefill_ms": prefill_ms, "decode_ms_per_token": decode_ms / max(steps - 1, 1),
                                   "total_ms": prefill_ms + decode_ms,
                                   "compiled": float(self.compile_count() > compiled_before)},
                                  [] if logprobs else None)
        for row in range(len(ids)):
            row_ids = out[row, :steps].tolist()
            reason = "length"
            stop_at = next((i for i, t in enumerate(row_ids) if t in stops), None)
            if stop_at is not None:
                row_ids, reason = row_ids[: stop_at + 1], "stop"
            text = self.tokenizer.decode(row_ids, skip_special_tokens=True) if self.tokenizer else ""
            cut = first_stop_string(text, stop_strings)
            if cut is not None:
                text, reason = text[:cut], "stop_string"
                row_ids = ids_covering(self.tokenizer, row_ids, text)
            result.texts.append(text)
            result.token_ids.append(row_ids)
            result.finish_reasons.append(reason)
            if scores is not None:
                result.logprobs.append(scores[row, :len(row_ids)].tolist())
        return result

    def stream(self, prompt: str | Sequence[int], *, max_new_tokens: int = 256, sampling: SamplingConfig | None = None,
               stop_token_ids: Sequence[int] | None = None, stop_strings: Sequence[str] = (),
               chat: bool = False, logprobs: bool = False) -> Iterator[StreamEvent]:
        """Yield each new token and the text it completes, as it is decoded (one prompt).

        The texts joined equal `generate`'s text for the same call: text that may be the start of a
        stop string is held back until it is known not to be one, so no part of a stop string is
        ever shown. Without a tokenizer every text is empty."""
        _, tokens, mask, cache, sampling, stops, _, _ = self._setup(
            [prompt], chat, max_new_tokens, sampling, stop_token_ids, stop_strings)
        logits, cache = self._prefill(self.bundle, tokens, mask, cache)
        key, sub = jax.random.split(jax.random.key(sampling.seed))
        token = sample(logits, sub, **sampling.arrays())
        score = token_logprobs(logits, token) if logprobs else None
        # committed to the device, as the step's own outputs are: otherwise the second step call sees
        # another input placement and compiles the step again
        key = jax.device_put(key, next(iter(logits.devices())))
        text = TextStream(self.tokenizer, stop_strings)
        arrays = sampling.arrays()
        for i in range(max_new_tokens):
            tid = int(token[0])
            reason = "stop" if tid in stops else ("length" if i == max_new_tokens - 1 else None)
            new, stopped = text.push(tid, last=reason is not None)
            reason = "stop_string" if stopped else reason
            yield StreamEvent(tid, new, reason, None if score is None else float(score[0]))
            if reason:
                return
            token, score, cache, key = self._sample_step(self.bundle, token, cache, key, arrays,
                                                         logprobs=bool(logprobs))

    def compile_count(self) -> int:
        """Compiled executables behind this generator (for checking that calls do not recompile)."""
        return self.decoder.compile_count() + sum(f._cache_size() for f in (self._loop, self._sample_step))

