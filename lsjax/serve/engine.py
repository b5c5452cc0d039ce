"""Continuous batching over decode slots: requests join and leave a running batch token by token.

    engine = Engine.for_model(model, tokenizer, adapter, EngineConfig(slots=8))  # or Engine(decoder, ...)
    engine.start()
    handle = engine.submit(Request(prompt=ids, max_tokens=32))
    for event in handle: print(event.text, end="")

A fixed number of slots share one KV cache `[slots, ..., max_len]` in which every row has its own
length (where its next token is written). Each loop of the engine's thread prefills waiting
requests in fixed-size chunks into a small cache of the same capacity (so one compiled prefill
serves every prompt length; prompts of the same padded length waiting together share the call, 1,
2, 4... rows, since a longer product costs less per token), copies each finished row into a free
slot, and decodes one token for every slot with the strategy's own step: the engine is a driver
of `lsjax.decoder.Decoder`'s prefill / insert / step, as `Generator` is. A finished or cancelled
request frees its slot before the next step. Each request brings its own sampling (temperature,
top-k, top-p, seed), stops, length and logprobs as per-row arrays, so after `warmup()` no mix of
requests compiles anything again. Every token of every row is routed on its own (switch): rows
never constrain each other's experts.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import functools
import queue
import threading
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from lsjax.adapters import open_adapter
from lsjax.decode import KVCache, left_pad, pinned
from lsjax.decoder import Decoder
from lsjax.errors import ConfigError, LsjaxError
from lsjax.sampling import SamplingConfig, sample
from lsjax.serve.lockstep import Lockstep
from lsjax.textstream import TextStream
from lsjax.validate import check, is_int

TOP_LOGPROBS = 5  # the most alternatives a request may ask for (computed for every row of a step that any wants)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """`slots`: rows decoded together; `max_len`: cache columns per row (a request's prompt plus its
    tokens must fit); `prefill_chunk`: prompt tokens per prefill call (prompts are padded to a
    multiple); `prefill_chunks_per_step`: prefill calls between two decode steps (bounds the
    pause a long prompt puts on the running rows); `prefill_rows`: the most prompts one prefill
    call takes (a power of two; calls are compiled for 1, 2, 4... rows up to it); `max_queue`: the
    most requests waiting for a slot (past it `submit` raises `QueueFull`: memory stays bounded)."""

    slots: int = 8
    max_len: int = 512
    prefill_chunk: int = 64
    prefill_chunks_per_step: int = 2
    prefill_rows: int = 4
    max_queue: int = 256

    def __post_init__(self):
        check(is_int(self.slots, 1), "slots", self.slots, "an integer >= 1")
        check(is_int(self.prefill_chunk, 1), "prefill_chunk", self.prefill_chunk, "an integer >= 1")
        check(is_int(self.max_len, 2) and self.max_len % self.prefill_chunk == 0, "max_len", self.max_len,
              f"an integer >= 2 and a multiple of prefill_chunk ({self.prefill_chunk})")
        check(is_int(self.prefill_chunks_per_step, 1), "prefill_chunks_per_step", self.prefill_chunks_per_step,
              "an integer >= 1")
        check(is_int(self.prefill_rows, 1) and self.prefill_rows & (self.prefill_rows - 1) == 0, "prefill_rows",
              self.prefill_rows, "a power of two >= 1")
        check(is_int(self.max_queue, 1), "max_queue", self.max_queue, "an integer >= 1")

    def group_sizes(self) -> tuple[int, ...]:
        """The prefill call sizes (rows) this configuration compiles: powers of two up to
        `prefill_rows` and `slots`."""
        limit = min(self.prefill_rows, self.slots)
        return tuple(1 << i for i in range(limit.bit_length()) if 1 << i <= limit)


class QueueFull(LsjaxError):
    """The engine's waiting queue is at `max_queue`: try again later."""


class UnknownAdapter(ConfigError):
    """A request or an unload names an adapter the engine does not hold."""


class AdapterInUse(LsjaxError):
    """An unload names an adapter that requests (running or waiting) still decode with."""


class ChangeKind(enum.StrEnum):
    LOAD = "load"
    UNLOAD = "unload"


@dataclasses.dataclass
class _Change:
    """A run-time adapter load or unload that a lockstep engine's loop makes on every process between
    the same two steps. `source`: the folder every process opens (a load); `adapter`: process 0's
    copy, opened when the request came."""

    kind: ChangeKind
    name: str
    source: str | None = None
    adapter: object = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    slot: int | None = None
    error: BaseException | None = None

    def to_dict(self) -> dict:
        return {"kind": str(self.kind), "name": self.name, "source": self.source}

    def stopped(self) -> ConfigError:
        return ConfigError(f"adapter {self.name!r} was not {self.kind}ed: the engine stopped")


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation. `stop_ids` None: the model's end-of-sequence ids. `logprobs` None: none;
    n: each token's log-probability and its n likeliest alternatives (n <= TOP_LOGPROBS).
    `prompt_logprobs` n: the same for the prompt's own tokens (scoring; the first has none), which
    also allows `max_tokens` 0 (the prompt scored, nothing generated). `adapter`: with an
    `lsjax.adapters.table.AdapterTable`, the name of the adapter this request decodes with (None:
    the base model); an engine of one adapter takes None only."""

    prompt: tuple[int, ...]
    max_tokens: int = 16
    sampling: SamplingConfig = SamplingConfig()
    stop_ids: tuple[int, ...] | None = None
    stop_strings: tuple[str, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    adapter: str | None = None

    def __post_init__(self):
        check(len(self.prompt) > 0 and all(is_int(t, 0) for t in self.prompt), "prompt", self.prompt,
              "a non-empty list of token ids")
        check(is_int(self.max_tokens, 0 if self.prompt_logprobs is not None else 1), "max_tokens", self.max_tokens,
              "an integer >= 1 (0 only when scoring the prompt)")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            check(n is None or (is_int(n, 0) and n <= TOP_LOGPROBS), name, n, f"an integer in [0, {TOP_LOGPROBS}]")
        check(isinstance(self.sampling, SamplingConfig), "sampling", self.sampling, "a SamplingConfig")
        check(self.stop_ids is None or all(is_int(t, 0) for t in self.stop_ids), "stop", self.stop_ids,
              "token ids (integers >= 0)")
        check(all(isinstance(s, str) for s in self.stop_strings), "stop", self.stop_strings, "strings")

    def to_dict(self) -> dict:
        """JSON-able fields (what a lockstep engine's leader sends the other processes)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Request":
        def ids(x):
            return None if x is None else tuple(x)

        return cls(tuple(d["prompt"]), d["max_tokens"], SamplingConfig(**d["sampling"]), ids(d["stop_ids"]),
                   tuple(d["stop_strings"]), d["logprobs"], d["prompt_logprobs"], d["adapter"])


@dataclasses.dataclass
class Event:
    """One token of a request, and the text it makes visible. The last event has a `finish_reason`:
    "stop" (a stop id or string), "length" (max_tokens), or "cancelled"."""

    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None
    prompt_tokens: int


class Handle:
    """A submitted request: iterate it for its events (blocking), `cancel()` it, or wait for `result()`.
    With a `listener`, the engine's thread calls it with each event instead (e.g. to hand the
    events to an event loop); `times` holds when each token arrived (`time.perf_counter`).
    `prompt_scores` (with `prompt_logprobs`): per prompt token, None for the first, else its
    (log-probability, [(alternative id, log-probability), ...]); set before the first event."""

    def __init__(self, request: Request, listener: Callable[[Event], None] | None):
        self.request = request
        self.slot: int | None = None  # its adapter's slot in the engine's table (None: no table)
        self.id: int | None = None  # numbered by the loop as it takes the request in (the same on every process)
        self.dropped = False  # the loop has taken its cancellation in (set only by the loop, between steps)
        self.on_done: Callable[["Handle"], None] | None = None
        self.prompt_scores: list[tuple[float, list[tuple[int, float]]] | None] | None = None
        self.submitted = time.perf_counter()
        self.times: list[float] = []
        self.events: list[Event] = []
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._listener = listener or self._queue.put

    def cancel(self) -> None:
        """Stop generating; the loop takes it in before its next step and frees the slot."""
        self.cancelled.set()

    def deliver(self, event: Event) -> None:
        self.times.append(time.perf_counter())
        self.events.append(event)
        if event.finish_reason:
            self.done.set()
            if self.on_done is not None:
                self.on_done(self)
        self._listener(event)

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self._queue.get()
            yield event
            if event.finish_reason:
                return

    def result(self, timeout: float | None = None) -> Completion:
        if not self.done.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        tokens = [e for e in self.events if e.token_id is not None]
        return Completion("".join(e.text for e in self.events), [e.token_id for e in tokens],
                          self.events[-1].finish_reason,
                          None if self.request.logprobs is None else [e.logprob for e in tokens],
                          len(self.request.prompt))


@dataclasses.dataclass
class _Prefill:
    """Prompts being prefilled together: their handles (None once cancelled), left-padded ids and
    mask [rows, width], their cache, the columns done, and the last chunk's outputs."""

    handles: list[Handle | None]
    ids: np.ndarray
    mask: np.ndarray
    cache: KVCache
    done: int = 0
    outputs: tuple | None = None
    scores: list | None = None  # prompts scored: per column, the next token's logprob and alternatives


@dataclasses.dataclass
class _Row:
    """A slot's request: tokens left, its text so far, its stop ids."""

    handle: Handle
    left: int
    text: TextStream
    stops: frozenset[int]
    count: int = 0


def _row_settings(handles: list[Handle | None]) -> tuple[np.ndarray, ...]:
    """Each row's seed, temperature, top-k, top-p and whether it wants logprobs (an empty row: greedy,
    none)."""
    sampling = [h.request.sampling if h is not None else SamplingConfig() for h in handles]
    return (np.array([s.seed for s in sampling], np.int32), np.array([s.temperature for s in sampling], np.float32),
            np.array([s.top_k for s in sampling], np.int32), np.array([s.top_p for s in sampling], np.float32),
            np.array([h is not None and h.request.logprobs is not None for h in handles]))


# -- pure device functions ---------------------------------------------------------------------------------

def sample_rows(logits, seeds, counters, temperature, top_k, top_p):
    """Each row's next token with its own settings; its key depends only on its seed and token index,
    so a request samples the same tokens whatever else shares the batch."""
    def one(logits, seed, counter, temperature, top_k, top_p):
        key = jax.random.fold_in(jax.random.key(seed), counter)
        return sample(logits[None], key, temperature, top_k, top_p)[0]

    def greedy(logits, *_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    logits = logits.astype(jnp.float32)
    return jax.lax.cond(jnp.any(temperature > 0), jax.vmap(one), greedy,
                        logits, seeds, counters, temperature, top_k, top_p)


def token_scores(logits, tokens):
    """Log-probability of `tokens` `[...]` under `logits` `[..., V]`, and the TOP_LOGPROBS likeliest
    alternatives (ids, log-probabilities `[..., TOP_LOGPROBS]`)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top_logp, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
    return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0], top_ids, top_logp


def scored(logits, tokens, wanted):
    """Each row's token log-probability and its TOP_LOGPROBS likeliest alternatives; zeros when no
    row is `wanted` (a log-softmax and top-k over the vocabulary skipped)."""
    def skip(logits, tokens):
        rows = tokens.shape[0]
        return (jnp.zeros((rows,), jnp.float32), jnp.zeros((rows, TOP_LOGPROBS), jnp.int32),
                jnp.zeros((rows, TOP_LOGPROBS), jnp.float32))

    return jax.lax.cond(jnp.any(wanted), token_scores, skip, logits, tokens)


def decode_rows(step, bundle, tokens, cache, seeds, counters, temperature, top_k, top_p, wanted):
    """One decode step for every slot: next tokens, their logprobs and alternatives, the cache."""
    logits, cache = step(bundle, tokens, cache)
    nxt = sample_rows(logits, seeds, counters, temperature, top_k, top_p)
    return (nxt, *scored(logits, nxt, wanted)), cache


def prefill_chunk(prefill, bundle, ids, mask, cache, seeds, temperature, top_k, top_p, wanted):
    """One chunk of each prompt of a group into its cache; each row's token sampled from the chunk's
    last logits (used after the last chunk: a request's first token)."""
    logits, cache = prefill(bundle, ids, mask, cache)
    first = sample_rows(logits, seeds, jnp.zeros_like(seeds), temperature, top_k, top_p)
    return (first, *scored(logits, first, wanted)), cache


def prefill_chunk_scored(prefill, bundle, ids, mask, cache, seeds, temperature, top_k, top_p, wanted, targets):
    """`prefill_chunk`, and at every column the log-probability of `targets` (the prompt's next
    token) with the TOP_LOGPROBS likeliest alternatives: the prompt scored on the prefill's own path."""
    logits, cache = prefill(bundle, ids, mask, cache, every=True)
    last = logits[:, -1]
    first = sample_rows(last, seeds, jnp.zeros_like(seeds), temperature, top_k, top_p)
    return (first, *scored(last, first, wanted)), token_scores(logits, targets), cache


def placed(fn, mesh):
    """`fn` (one of the above) with its state kept where the cache lives over `mesh` and its other
    outputs replicated, which every process of a multi-host engine reads whole (`mesh` None: `fn`)."""
    if mesh is None:
        return fn
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def run(*args):
        *outputs, cache = fn(*args)
        return (*jax.lax.with_sharding_constraint(outputs, whole), pinned(cache, mesh))

    return run


@functools.lru_cache(maxsize=None)
def engine_functions(prefill, step, mesh=None):
    """Jitted engine functions around a strategy's (cached) prefill and step: engines for the same
    model, adapter config, strategy and mesh share their compilations."""
    return {"decode": jax.jit(placed(functools.partial(decode_rows, step), mesh), donate_argnums=(2,)),
            "prefill": jax.jit(placed(functools.partial(prefill_chunk, prefill), mesh), donate_argnums=(3,)),
            "prefill_scored": jax.jit(placed(functools.partial(prefill_chunk_scored, prefill), mesh),
                                      donate_argnums=(3,))}


def _prompt_scores(request: Request, logp, top_ids, top_logp) -> list:
    """A left-padded row's column scores -> per prompt token: None, then (logprob, alternatives)."""
    n, k = len(request.prompt), request.prompt_logprobs
    start = logp.shape[0] - n  # the first prompt token's column; column c scores the token at c + 1
    return [None] + [(float(logp[c]), [(int(i), float(p)) for i, p in zip(top_ids[c][:k], top_logp[c][:k])])
                     for c in range(start, start + n - 1)]


# -- the engine --------------------------------------------------------------------------------------------

class Engine:
    """Serves requests from a `Decoder` (model, adapter, strategy, backend; see the module doc);
    `tokenizer` (None: no text, token ids only) detokenizes and finds stop strings.

    With a `lockstep.Lockstep`, the engine is one of several processes stepping one batch over one
    mesh: requests are submitted at process 0, and every process runs `start()` (the others wait
    on `join()` until process 0 stops)."""

    @classmethod
    def for_model(cls, model, tokenizer=None, adapter=None, config: EngineConfig = EngineConfig(), *,
                  strategy: str = "auto", backend=None, lockstep: Lockstep | None = None) -> "Engine":
        """An engine over a new `Decoder` whose `auto` choice is tuned for `config.slots` rows: every
        decode step runs all the slots."""
        return cls(Decoder(model, adapter, strategy=strategy, backend=backend, rows=config.slots), tokenizer, config,
                   lockstep)

    def __init__(self, decoder: Decoder, tokenizer=None, config: EngineConfig = EngineConfig(),
                 lockstep: Lockstep | None = None):
        self.decoder, self.tokenizer, self.config, self.lockstep = decoder, tokenizer, config, lockstep
        decoder.check_rows(config.slots, "slots", "slots")
        self.fns = engine_functions(decoder.prefill_fn, decoder.step_fn, decoder.mesh)
        model_config = decoder.config
        self.default_stops = tuple(model_config.eos_token_ids)
        self.pad = model_config.pad_token_id if model_config.pad_token_id is not None else 0
        self.cache = decoder.empty_cache(config.slots, config.max_len, row_lengths=True)  # each row its own length
        self.rows: list[_Row | None] = [None] * config.slots
        self.tokens = np.zeros(config.slots, np.int32)
        self.inbox: list[Handle] = []  # submitted, not yet taken in by the loop
        self.changes: list[_Change] = []  # adapter loads and unloads for a lockstep loop to make
        self.waiting: collections.deque[Handle] = collections.deque()
        self.taken = 0  # requests the loop has taken in (numbers them)
        self.prefilling: _Prefill | None = None
        self.wake = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.failure: BaseException | None = None
        self.stats = collections.Counter()
        self.users = collections.Counter()  # requests not finished, per adapter slot
        self.step_seconds = collections.deque(maxlen=1000)

    # -- API -------------------------------------------------------------------------------------------
    def padded(self, prompt_tokens: int) -> int:
        """Cache columns a prompt takes: whole prefill chunks."""
        return -(-prompt_tokens // self.config.prefill_chunk) * self.config.prefill_chunk

    def room(self, prompt_tokens: int) -> int:
        """The most tokens a request with this prompt may generate (its first comes from the prefill)."""
        return self.config.max_len - self.padded(prompt_tokens) + 1

    def check(self, request: Request) -> None:
        """Refuse what can never run here (before it is queued; its adapter is resolved by `submit`, under
        the lock an unload takes)."""
        padded = self.padded(len(request.prompt))
        if request.max_tokens > self.room(len(request.prompt)):
            field = "prompt" if padded >= self.config.max_len else "max_tokens"
            raise ConfigError(f"prompt of {len(request.prompt)} tokens (padded to {padded}) + max_tokens="
                              f"{request.max_tokens} is past the context of {self.config.max_len} tokens; shorten the "
                              "prompt or lower max_tokens", field)
        vocab = self.decoder.config.vocab_size
        if max(request.prompt) >= vocab:
            raise ConfigError(f"prompt holds token id {max(request.prompt)}; the vocabulary has {vocab}", "prompt")

    def _slot(self, name: str | None) -> int | None:
        """The table slot of adapter `name` (None: the base row's); refuses a name it does not hold."""
        table = self.decoder.table
        if table is None:
            if name is not None:
                raise UnknownAdapter(f"adapter {name!r} is not served here: this engine decodes one adapter for "
                                     "every request", "model")
            return None
        if name is not None and name not in table.names:
            raise UnknownAdapter(f"adapter {name!r} is not loaded; loaded: {', '.join(sorted(table.names)) or 'none'}",
                                 "model")
        return table.slot(name)

    # -- adapters at run time (an AdapterTable's engine) -------------------------------------------------
    def adapters(self) -> dict[str, object]:
        """The adapters served, by name, with their configs (none without a table)."""
        table = self.decoder.table
        return {} if table is None else dict(table.configs)

    def load_adapter(self, name: str, adapter, source: str | None = None) -> int:
        """Put `adapter` into a free slot of the table, between two steps: rows in flight are not
        touched and nothing compiles (the table's shapes are fixed). Returns the slot. A lockstep
        engine (running) loads it on every process between the same two steps, each opening
        `source`, the folder `adapter` came from, which every process must read at that path."""
        table = self._table()
        if self.lockstep is not None:
            if source is None:
                raise ConfigError(f"adapter {name!r}: a lockstep engine's processes each open the adapter's folder; "
                                  "pass source")
            table.check_load(name, adapter)
            return self._change(_Change(ChangeKind.LOAD, name, str(source), adapter))
        with self.wake:
            slot = table.load(name, adapter)
            self.decoder.refresh()
        return slot

    def unload_adapter(self, name: str) -> int:
        """Free adapter `name`'s slot; refused while a request (running, prefilling or waiting) uses it."""
        table = self._table()
        if self.lockstep is not None:
            self._slot(name)
            return self._change(_Change(ChangeKind.UNLOAD, name))
        with self.wake:
            slot = self._checked_unload(name)
            table.unload(name)
            self.decoder.refresh()
        return slot

    def _checked_unload(self, name: str) -> int:
        slot = self._slot(name)
        if self.users[slot]:
            raise AdapterInUse(f"adapter {name!r} is in use by {self.users[slot]} request(s); unload it when they "
                               "finish")
        return slot

    def _change(self, change: _Change) -> int:
        """Queue a lockstep engine's load or unload for its loop and wait until every process made it."""
        if not self.leader:
            raise ConfigError("this process follows a lockstep engine: adapters are loaded at process 0")
        thread = self.thread
        if thread is None or self.failure is not None:
            raise ConfigError("a lockstep engine changes its adapters from its running loop; start it first")
        with self.wake:
            self.changes.append(change)
            self.wake.notify()
        while not change.done.wait(1.0):
            if not thread.is_alive():  # stopped before taking it in
                raise change.stopped()
        if change.error is not None:
            raise change.error
        return change.slot

    def _make(self, changes: list[_Change]) -> None:
        """Make the changes process 0 shared, here (at process 0 they were checked when shared)."""
        table = self.decoder.table
        for change in changes:
            try:
                if change.kind == ChangeKind.LOAD:
                    adapter = change.adapter if self.leader else open_adapter(change.source, self.decoder.config)
                    change.slot = table.load(change.name, adapter)
                else:
                    change.slot = table.unload(change.name)
                self.decoder.refresh()
            except BaseException as e:  # a process that cannot follow stops the engine (its loop re-raises)
                change.error = e
                raise
            finally:
                change.done.set()

    def _table(self):
        if self.decoder.table is None:
            raise ConfigError("this engine decodes one adapter for every request: adapters are loaded at run time "
                              "only into an engine over an AdapterTable")
        return self.decoder.table

    def _done(self, handle: Handle) -> None:
        with self.wake:
            self.users[handle.slot] -= 1

    @property
    def leader(self) -> bool:
        """Whether requests are submitted here: always, except at the other processes of a lockstep engine."""
        return self.lockstep is None or self.lockstep.leader

    def submit(self, request: Request, listener: Callable[[Event], None] | None = None) -> Handle:
        if self.failure is not None:
            raise RuntimeError("the engine stopped after an internal error") from self.failure
        if not self.leader:
            raise ConfigError("this process follows a lockstep engine: requests are submitted at process 0")
        self.check(request)
        handle = Handle(request, listener)
        with self.wake:  # the slot is read, and counted as used, under the lock an unload takes
            waiting = len(self.waiting) + len(self.inbox)
            if waiting >= self.config.max_queue:
                raise QueueFull(f"{waiting} requests are waiting for a slot (max_queue); try again later")
            handle.slot, handle.on_done = self._slot(request.adapter), self._done
            self.users[handle.slot] += 1
            self.inbox.append(handle)
            self.stats["requests"] += 1
            self.wake.notify()
        return handle

    def generate(self, request: Request) -> Completion:
        """Submit and wait (the engine must be running)."""
        return self.submit(request).result()

    def start(self) -> "Engine":
        if self.thread is None:
            self.stopping = False
            self.thread = threading.Thread(target=self._run, name="lsjax-engine", daemon=True)
            self.thread.start()
        return self

    def stop(self) -> None:
        """Finish every request (queued or running) as cancelled and end the thread (at process 0 of a
        lockstep engine: every process's)."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.join()

    def join(self) -> None:
        """Wait for the loop to end (at the other processes of a lockstep engine: until process 0 stops)."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def warmup(self) -> None:
        """Compile everything a mix of requests needs (prefill chunks of every group size, insertion,
        the step, sampled and greedy) by serving small requests: for each group size, that many at
        once. At the other processes of a lockstep engine, nothing: process 0's warm-up reaches them."""
        if not self.leader:
            return
        sampled = SamplingConfig(temperature=1.0, top_k=5, top_p=0.9)
        prompt = (self.pad,)
        for size in self.config.group_sizes():
            for scoring in (None, 0):  # plain prefill and the one that scores prompts
                with self.wake:  # queued together, so they are prefilled together
                    handles = [self.submit(Request(prompt, max_tokens=3, stop_ids=(), prompt_logprobs=scoring,
                                                   sampling=sampled if i % 2 else SamplingConfig()))
                               for i in range(size)]
                for handle in handles:
                    handle.result()

    def compile_count(self) -> int:
        return sum(f._cache_size() for f in self.fns.values())

    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    def metrics(self) -> dict[str, float]:
        steps = list(self.step_seconds)
        return {"requests_total": self.stats["requests"], "tokens_total": self.stats["tokens"],
                "steps_total": self.stats["steps"], "active_slots": self.active(), "slots": self.config.slots,
                "queue_depth": len(self.waiting) + len(self.inbox) + (0 if self.prefilling is None else
                                                    sum(h is not None for h in self.prefilling.handles)),
                "step_seconds_mean": float(np.mean(steps)) if steps else 0.0,
                "step_seconds_p99": float(np.percentile(steps, 99)) if steps else 0.0}

    # -- the loop --------------------------------------------------------------------------------------
    def _run(self) -> None:
        stopped = False
        try:
            while not (stopped := self._intake()):
                self._drop_cancelled()
                self._admit()
                if self.active():
                    self._decode()
        except BaseException as e:  # an internal error: every request ends, submit refuses from now on
            self.failure = e
            raise
        finally:
            if self.lockstep is not None and self.lockstep.leader and not stopped:
                with contextlib.suppress(Exception):  # (fails where another process already ended)
                    self.lockstep.share({"stop": True})  # the other processes end too
            self._finish_all()

    def _intake(self) -> bool:
        """Take in, between two steps, the requests submitted and cancelled since the last (in lockstep,
        process 0's, on every process); True once the engine is stopping."""
        if self.leader:
            with self.wake:
                while not (self.stopping or self.inbox or self.changes or self.waiting or self.prefilling or
                           self.active()):
                    if not self.wake.wait(None if self.lockstep is None else self.lockstep.heartbeat):
                        break  # a lockstep leader's idle heartbeat
                arrived, self.inbox = self.inbox, []
                # one change per step, checked against the table as the ones before it left it
                change = self.changes.pop(0) if self.changes else None
                changes = [change] if change is not None and self._still_valid(change) else []
                stopping = self.stopping
        else:
            news = self.lockstep.share(None)
            arrived, stopping = [self._follow(item) for item in news.get("arrived", ())], news.get("stop", False)
            changes = [_Change(ChangeKind(c["kind"]), c["name"], c["source"]) for c in news.get("changes", ())]
        for handle in arrived:
            handle.id, self.taken = self.taken, self.taken + 1
        open_ = {h.id: h for h in self._open() + arrived}
        if self.leader:
            cancelled = [i for i, h in open_.items() if h.cancelled.is_set() and not h.dropped]
            if self.lockstep is not None:
                news = {"arrived": [{"request": h.request.to_dict(), "slot": h.slot} for h in arrived],
                        "cancelled": cancelled, "stop": stopping, "changes": [c.to_dict() for c in changes]}
                try:
                    self.lockstep.share(news if arrived or cancelled or stopping or changes else None)
                except BaseException:  # (another process ended) what arrived is finished with the rest
                    with self.wake:
                        self.inbox[:0] = arrived
                    raise
        else:
            cancelled = news.get("cancelled", ())
        for i in cancelled:
            open_[i].dropped = True
        if changes:
            self._make(changes)
        with self.wake:
            self.waiting.extend(arrived)
        return stopping

    def _still_valid(self, change: _Change) -> bool:
        """At process 0, under the lock: whether a queued change can still be made now (else it ends
        with the reason, and no process makes it)."""
        try:
            if change.kind == ChangeKind.LOAD:
                self.decoder.table.check_load(change.name, change.adapter)
            else:
                self._checked_unload(change.name)
            return True
        except LsjaxError as e:
            change.error = e
            change.done.set()
            return False

    def _follow(self, item: dict) -> Handle:
        """A request process 0 took in, as this process's own (its events go nowhere)."""
        handle = Handle(Request.from_dict(item["request"]), lambda event: None)
        handle.slot, handle.on_done = item["slot"], self._done
        self.users[handle.slot] += 1
        return handle

    def _open(self) -> list[Handle]:
        """Requests taken in and not finished: running, prefilling, waiting."""
        handles = [r.handle for r in self.rows if r is not None] + list(self.waiting)
        return handles + ([h for h in self.prefilling.handles if h is not None] if self.prefilling else [])

    def _finish_all(self) -> None:
        with self.wake:
            pending = self._open() + self.inbox
            self.rows = [None] * self.config.slots
            self.waiting.clear()
            self.inbox = []
            self.prefilling = None
            changes, self.changes = self.changes, []
        for handle in pending:
            handle.deliver(Event(None, "", finish_reason="cancelled"))
        for change in changes:
            change.error = change.stopped()
            change.done.set()

    def _drop_cancelled(self) -> None:
        for slot, row in enumerate(self.rows):
            if row is not None and row.handle.dropped:
                self._free(slot, Event(None, "", finish_reason="cancelled"))
        with self.wake:
            cancelled = [h for h in self.waiting if h.dropped]
            for h in cancelled:
                self.waiting.remove(h)
        for h in cancelled:
            h.deliver(Event(None, "", finish_reason="cancelled"))
        if self.prefilling is not None:
            handles = self.prefilling.handles
            for i, h in enumerate(handles):
                if h is not None and h.dropped:
                    handles[i] = None
                    h.deliver(Event(None, "", finish_reason="cancelled"))
            if all(h is None for h in handles):
                self.prefilling = None

    def _free(self, slot: int, event: Event) -> None:
        handle = self.rows[slot].handle
        self.rows[slot] = None
        handle.deliver(event)

    def _admit(self) -> None:
        chunk = self.config.prefill_chunk
        for _ in range(self.config.prefill_chunks_per_step):
            if self.prefilling is None and not self._start_group():
                return
            group = self.prefilling
            if group.done < group.ids.shape[1]:
                at = slice(group.done, group.done + chunk)
                args = (self.decoder.bundle, group.ids[:, at], group.mask[:, at], group.cache,
                        *_row_settings(group.handles))
                if group.scores is None:
                    group.outputs, group.cache = self.fns["prefill"](*args)
                else:  # each column's target: the prompt's next token (the last column's is not scored)
                    targets = np.concatenate([group.ids[:, 1:], group.ids[:, -1:]], axis=1)[:, at]
                    group.outputs, scores, group.cache = self.fns["prefill_scored"](*args, targets)
                    group.scores.append(scores)
                group.done += chunk
            if group.done >= group.ids.shape[1]:
                self._insert()

    def _start_group(self) -> bool:
        """Take the first waiting request and those behind it with the same padded prompt length, as
        many as a compiled group size, free slots and `prefill_rows` allow."""
        free = self.rows.count(None)
        with self.wake:
            if not free or not self.waiting:
                return False
            first = self.waiting[0].request
            width, scoring = self.padded(len(first.prompt)), first.prompt_logprobs is not None
            fits = [h for h in self.waiting if self.padded(len(h.request.prompt)) == width
                    and (h.request.prompt_logprobs is not None) == scoring]
            size = max(s for s in self.config.group_sizes() if s <= min(free, len(fits)))
            handles = fits[:size]
            for h in handles:
                self.waiting.remove(h)
        ids, mask = left_pad([h.request.prompt for h in handles], self.pad, width)
        self.stats["grouped"] += size > 1
        cache = self.decoder.empty_cache(size, self.config.max_len)
        if self.decoder.table is not None:  # each row decodes with its own adapter (an insert carries it along)
            cache = self.decoder.with_adapters(cache, [h.slot for h in handles])
        self.prefilling = _Prefill(handles, ids, mask, cache, scores=[] if scoring else None)
        return True

    def _insert(self) -> None:
        group, self.prefilling = self.prefilling, None
        outputs = [np.asarray(x) for x in group.outputs]
        scores = None if group.scores is None else [np.concatenate([np.asarray(c[i]) for c in group.scores], axis=1)
                                                     for i in range(3)]
        for index, handle in enumerate(group.handles):
            if handle is None:  # cancelled while prefilling
                continue
            request = handle.request
            if scores is not None:
                handle.prompt_scores = _prompt_scores(request, *(x[index] for x in scores))
                if request.max_tokens == 0:  # scored, nothing to generate: no slot taken
                    handle.deliver(Event(None, "", finish_reason="length"))
                    continue
            slot = self.rows.index(None)
            self.cache = self.decoder.insert(self.cache, group.cache, jnp.int32(slot), jnp.int32(index))
            self.stats["inserted"] += 1
            stops = frozenset(self.default_stops if request.stop_ids is None else request.stop_ids)
            self.rows[slot] = _Row(handle, request.max_tokens, TextStream(self.tokenizer, request.stop_strings), stops)
            self._emit(slot, *(x[index] for x in outputs))

    def _decode(self) -> None:
        seeds, temperature, top_k, top_p, wanted = _row_settings([r and r.handle for r in self.rows])
        counters = np.array([r.count if r is not None else 0 for r in self.rows], np.int32)
        start = time.perf_counter()
        outputs, self.cache = self.fns["decode"](self.decoder.bundle, self.tokens, self.cache, seeds, counters,
                                                 temperature, top_k, top_p, wanted)
        tokens, logprobs, top_ids, top_logp = jax.device_get(outputs)
        self.step_seconds.append(time.perf_counter() - start)
        self.stats["steps"] += 1
        for slot, row in enumerate(self.rows):
            if row is not None:
                self._emit(slot, tokens[slot], logprobs[slot], top_ids[slot], top_logp[slot])

    def _emit(self, slot: int, token, logprob, top_ids, top_logp) -> None:
        """Hand a slot's new token to its request; free the slot when the request is done."""
        row = self.rows[slot]
        token = int(token)
        row.count += 1
        row.left -= 1
        self.tokens[slot] = token
        self.stats["tokens"] += 1
        reason = "stop" if token in row.stops else ("length" if row.left == 0 else None)
        text, stopped = row.text.push(token, last=reason is not None)
        if stopped:
            reason = "stop"
        if reason:
            self.rows[slot] = None
        n = row.handle.request.logprobs
        row.handle.deliver(Event(token, text, None if n is None else float(logprob),
                                 None if not n else [(int(i), float(p)) for i, p in zip(top_ids[:n], top_logp[:n])],
                                 reason))

