"""`auto` backend and strategy, chosen by timing the candidates' decode steps on this machine.

Which backend and strategy decode fastest depends on the machine (cores, memory bandwidth, the
XLA build), the model's shape, the adapter and the batch, so no fixed rule holds everywhere. The
first time a `lsjax.decoder.Decoder` is asked for `auto` with a given key, every candidate is timed
here and the result is kept in a JSON cache file, so later Decoders read it and measure nothing.

Candidates: each backend that can run here ("xla" always; "native" when its library is built, the
weights are fp32 and on one device; "pallas" on a GPU) x each strategy the adapter allows at the
batch (no adapter: `base`; `lora`: unmerged, fused, merged; `switch`: unmerged, fused, and merged
at batch 1 only; `layerwise` / `blockwise`: unmerged, fused). The mixed candidates: "native" +
`unmerged` (the native library's base product, XLA's routed term) and "hybrid" + `fused` (XLA's
base product, the native routed term).

Timing: each candidate's Decoder takes untimed steps from an empty state (compiling, warming: only
the step is compiled, as a step's cost does not depend on what the cache holds), then one timed
step. A candidate more than `PRUNE` times slower than the fastest there stops (its figure is that
step) and its Decoder is let go; the others take timed steps in rounds interleaved across them, so
machine noise hits all alike; the figure is the median ms per step.

The cache file (`cache_path()`: `$LSJAX_AUTOTUNE_CACHE`, else `~/.cache/lsjax/autotune.json`) is the
only state: it is read at every choice and rewritten atomically after a measurement; nothing is
kept in memory between calls. An entry is keyed by the machine (`machine()`), the model config,
dtype, adapter (method, experts, top_k, rank, targets), batch rows and what was fixed by the caller
(`asked`), and keeps every candidate's ms/step, the pick and the date. Concurrent writers may drop
each other's new entries (they are measured again), never corrupt the file.

Pinning: an explicit backend or strategy always wins; only the `auto` part is tuned, over the
candidates consistent with it (its own cache entry). To fix what `auto` itself picks on a machine,
`lsjax tune decode --pin BACKEND/STRATEGY` (or `pin`) writes an entry marked `"pinned": true`,
returned as it is; `lsjax tune decode` without `--pin` measures again and replaces it.

Where nothing can be timed (abstract, traced or multi-device arrays) `resolve` keeps the static
rule of `lsjax.backends.resolve_backend` and `lsjax.strategies.resolve_strategy`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from lsjax.backend_interface import Backend
from lsjax.backends import BACKENDS, resolve_backend
from lsjax.config import ModelConfig
from lsjax.errors import ConfigError
from lsjax.jsonfile import read_json_object, write_json
from lsjax.quant import quantization
from lsjax.strategies import Strategy, resolve_strategy

CACHE_ENV = "LSJAX_AUTOTUNE_CACHE"
FORMAT = 1  # the cache file's layout; a file of another format is refused (delete it)
WARM_STEPS = 2  # untimed steps after the prefill: compiling and warming
ROUNDS = 3  # interleaved rounds across the candidates
STEPS = 3  # timed steps per candidate and round (after one untimed step that brings its state back)
PRUNE = 2.0  # a candidate whose first timed step takes this many times the fastest one's is not timed further
# A Generator's smallest prompt bucket and cache round (`lsjax.generate`): the picked candidate's
# prefill compilation serves a Generator's first short prompts too.
CAPACITY = 64  # cache columns of the timed steps (more than WARM_STEPS + 1 + ROUNDS * (STEPS + 1) + 1)
FIX = "delete it (the next auto choice measures again and rewrites it)"


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One (backend name, strategy) pair; written "backend/strategy" in the cache and on the command line."""

    backend: str
    strategy: Strategy

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.strategy.value}"

    @classmethod
    def parse(cls, text: str) -> "Candidate":
        backend, _, strategy = str(text).partition("/")
        names = [b for b in BACKENDS if b != "auto"]
        if backend not in names or strategy not in {s.value for s in Strategy} - {"auto"}:
            raise ConfigError(f"{text!r} is not a candidate; expected BACKEND/STRATEGY with BACKEND one of "
                              f"{', '.join(names)} and STRATEGY one of base, unmerged, fused, merged")
        return cls(backend, Strategy(strategy))


@dataclasses.dataclass(frozen=True)
class Choice:
    """What `auto` picked and why: `source` is "measured" (now), "cached", "pinned" (a pinned cache
    entry) or "only" (a single candidate: nothing timed or written); `ms_per_step` holds every
    candidate's median ms/step by label (empty where nothing was timed)."""

    pick: Candidate
    ms_per_step: dict[str, float]
    source: str
    date: str | None = None


def cache_path() -> Path:
    """The cache file: `$LSJAX_AUTOTUNE_CACHE`, else `~/.cache/lsjax/autotune.json`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lsjax" / "autotune.json")


def candidates(adapter_config: Any | None, rows: int, dtype: Any = jnp.float32, *, sharded: bool = False,
               backend: Backend | str | None = None, strategy: str = "auto", per_row: bool = False,
               quantized: bool = False) -> list[Candidate]:
    """Every (backend, strategy) that can decode `rows` rows here, restricted to the fixed part:
    a backend named or given (an object: its name) and a strategy other than "auto". `per_row`:
    an adapter table's rows; `quantized`: the base weights are (`strategies_at`)."""
    if backend is None or backend == "auto":
        from lsjax.native import unavailable_reason

        names = ["xla"]
        if unavailable_reason() is None and jnp.dtype(dtype) == jnp.float32 and not sharded:
            names += ["native", "hybrid"]
        if jax.default_backend() == "gpu":
            names.append("pallas")
    else:
        names = [backend if isinstance(backend, str) else backend.name]
    allowed = strategies_at(adapter_config, rows, mergeable=not (per_row or quantized))
    if strategy != "auto":
        fixed = resolve_strategy(strategy, adapter_config)
        allowed = [s for s in allowed if s == fixed]
    # hybrid differs from XLA only in `fused` (its routed term): its other strategies are XLA's
    return [Candidate(name, s) for name in names for s in allowed if name != "hybrid" or s == Strategy.FUSED]


def strategies_at(adapter_config: Any | None, rows: int, mergeable: bool = True) -> list[Strategy]:
    """The strategies an adapter allows at `rows` rows (`merged` switch merges one route per step: one
    row; `merged` only where adapter terms may be written into the weights, `mergeable`: not for an
    adapter table, whose rows each narrow the route, nor into quantized weights)."""
    if adapter_config is None:
        return [Strategy.BASE]
    allowed = [Strategy.UNMERGED, Strategy.FUSED]
    method = adapter_config.method
    if mergeable and (method == "lora" or (method == "switch" and rows == 1)):
        allowed.append(Strategy.MERGED)
    return allowed


def measurable(*trees: Any) -> bool:
    """Whether the arrays can be timed here: concrete (not abstract or traced) and each on one device."""
    return all(isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and len(x.sharding.device_set) == 1
               for tree in trees for x in jax.tree.leaves(tree))


def resolve(decoder: type, model, adapter, rows: int, backend: Backend | str | None, strategy: str
            ) -> tuple[Backend, Strategy, Choice | None]:
    """The backend and strategy a `decoder` (the `lsjax.decoder.Decoder` class) of `model`
    (+ `adapter`) at `rows` rows runs, and the `Choice` behind them when something was `auto`
    (None when both were fixed, or where nothing can be timed: then the static rule decides).
    A fixed part that cannot run is refused first."""
    check_rows(rows)
    adapter_config = None if adapter is None else adapter.config
    fixed_backend = backend is not None and backend != "auto"
    fixed_strategy = strategy != "auto" or adapter_config is None
    if fixed_backend:
        resolve_backend(backend, model.dtype)  # refuses an unknown name, or "native" where it cannot run
    arrays = (model.params(), None if adapter is None else adapter.arrays())
    quantized = quantization(arrays[0])
    if strategy != "auto":
        resolve_strategy(strategy, adapter_config)  # refuses an unknown strategy, or one the adapter cannot run
        if quantized and strategy == "merged":
            raise ConfigError(f"strategy 'merged' writes adapter terms into the weights, and this model's weights are "
                              f"quantized ({quantized}); use 'unmerged', 'fused' or 'auto'", "strategy")
    if (fixed_backend and fixed_strategy) or not measurable(*arrays):
        sharded = any(len(x.sharding.device_set) > 1 for x in jax.tree.leaves(arrays) if isinstance(x, jax.Array))
        chosen = resolve_backend(backend, model.dtype, sharded)
        return chosen, resolve_strategy(strategy, adapter_config, chosen, mergeable=not quantized), None
    choice = choose(decoder, model, adapter, rows, backend=backend, strategy=strategy)
    chosen = backend if fixed_backend and not isinstance(backend, str) else resolve_backend(choice.pick.backend)
    return chosen, choice.pick.strategy, choice


def choose(decoder: type, model, adapter=None, rows: int = 1, *, backend: Backend | str | None = None,
           strategy: str = "auto", fresh: bool = False) -> Choice:
    """The fastest candidate for `model` (+ `adapter`) at `rows` rows: from the cache file, else
    timed now with `decoder` (the `lsjax.decoder.Decoder` class, passed in since that module imports
    this one) and written there. `fresh`: measure even where the cache holds an entry (a pinned one
    too) and replace it."""
    check_rows(rows)
    adapter_config = None if adapter is None else adapter.config
    per_row = adapter is not None and adapter.per_row
    quantized = quantization(model.params())
    options = candidates(adapter_config, rows, model.dtype, backend=backend, strategy=strategy, per_row=per_row,
                         quantized=quantized is not None)
    if not options:
        raise ConfigError(f"strategy {strategy!r} with a {adapter_config.method} adapter cannot decode {rows} rows "
                          "(merged switch routes one sequence per step); use 'fused' or 'unmerged'")
    if len(options) == 1:
        return Choice(options[0], {}, "only")
    key = cache_key(model.config, model.dtype, adapter_config, rows, backend, strategy, per_row, quantized,
                    experts_dtype(adapter))
    path = cache_path()
    entry = None if fresh else next((e for e in read_cache(path) if e["key"] == key), None)
    if entry is not None:
        pick = Candidate.parse(entry["pick"])
        if pick not in options:
            raise ConfigError(f"{path}: an entry picks {pick.label}, which is not a candidate here "
                              f"({', '.join(c.label for c in options)}); fix its pick or {FIX}")
        return Choice(pick, entry["ms_per_step"], "pinned" if entry["pinned"] else "cached", entry["date"])
    ms = measure(decoder, model, adapter, rows, options, backend=None if isinstance(backend, str) else backend)
    pick = min(options, key=lambda c: ms[c.label])
    date = time.strftime("%Y-%m-%d")
    store(path, {"key": key, "ms_per_step": ms, "pick": pick.label, "pinned": False, "date": date})
    return Choice(pick, ms, "measured", date)


def pin(model_config: ModelConfig, dtype: Any, adapter_config: Any | None, rows: int, pick: Candidate | str,
        expert_dtype: Any = None) -> Choice:
    """Fix what `auto` picks for this key on this machine: a cache entry marked pinned (keeping the
    entry's measurements, if any). The pick must be a candidate here. `expert_dtype`: the adapter's,
    where it is not `dtype`."""
    check_rows(rows)
    pick = Candidate.parse(pick) if isinstance(pick, str) else pick
    options = candidates(adapter_config, rows, dtype)
    if pick not in options:
        raise ConfigError(f"cannot pin {pick.label}: the candidates here are {', '.join(c.label for c in options)}")
    key = cache_key(model_config, dtype, adapter_config, rows, None, "auto", expert_dtype=expert_dtype)
    path = cache_path()
    old = next((e for e in read_cache(path) if e["key"] == key), {"ms_per_step": {}})
    date = time.strftime("%Y-%m-%d")
    store(path, {"key": key, "ms_per_step": old["ms_per_step"], "pick": pick.label, "pinned": True, "date": date})
    return Choice(pick, old["ms_per_step"], "pinned", date)


def measure(decoder: type, model, adapter, rows: int, options: list[Candidate], backend: Backend | None = None
            ) -> dict[str, float]:
    """Median ms per decode step of each candidate's `decoder` at `rows` rows, timed in interleaved
    rounds. `backend`: an object to build every candidate with (a caller's own), else each
    candidate's name."""
    vocab = model.config.vocab_size
    tokens = (jnp.arange(rows, dtype=jnp.int32) * 11 + 5) % vocab
    runs = []
    for c in options:
        strategy = "auto" if c.strategy == Strategy.BASE else c.strategy.value  # without an adapter: the base
        built = decoder(model, adapter, strategy=strategy, backend=backend or c.backend, rows=rows)
        cache = built.empty_cache(rows, CAPACITY)
        for _ in range(WARM_STEPS):
            logits, cache = built.step(tokens, cache)
        logits.block_until_ready()
        runs.append([built, cache])
    samples: dict[str, list[float]] = {c.label: [] for c in options}

    def timed(c: Candidate, run: list, steps: int) -> None:
        built, cache = run
        logits, cache = built.step(tokens, cache)  # untimed: the last candidate's state out of the caches
        logits.block_until_ready()
        for _ in range(steps):
            start = time.perf_counter()
            logits, cache = built.step(tokens, cache)
            logits.block_until_ready()
            samples[c.label].append((time.perf_counter() - start) * 1e3)
        run[1] = cache

    for c, run in zip(options, runs):  # one step each: a candidate far behind the best stops here
        timed(c, run, 1)
    best = min(values[0] for values in samples.values())
    contenders = []
    for c, run in zip(options, runs):
        if samples[c.label][0] <= PRUNE * best:
            contenders.append((c, run))
        else:
            run.clear()  # its Decoder (a merged strategy's own weights) is let go now
    for _ in range(ROUNDS):
        for c, run in contenders:
            timed(c, run, STEPS)
    return {label: statistics.median(values) for label, values in samples.items()}


def check_rows(rows: int) -> None:
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise ConfigError(f"rows={rows!r} is invalid; expected an integer >= 1 (the batch decoded)", "rows")


# -- the cache file ---------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    """What a measurement depends on besides the model: the device, the CPU, jax and the native library.
    A CPU's name alone does not tell machines apart (a VM's "AMD EPYC" may or may not have
    AVX-512), so its flags go into the key too; and the native library's bytes, so that a rebuilt
    kernel is timed again."""
    import jaxlib

    from lsjax import native

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = os.cpu_count()
    library = _digest(native.LIBRARY.read_bytes()) if native.available() else None
    return {"platform": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "cpu": _cpu_info("model name"), "cpu_flags": _digest(_cpu_info("flags").encode()), "cores": affinity,
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "native": library}


def _cpu_info(field: str) -> str:
    """A field of /proc/cpuinfo's first CPU ("model name", "flags"); where there is none, the
    platform's processor name for the model and nothing for the flags."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return (platform.processor() or platform.machine()) if field == "model name" else ""


def experts_dtype(adapter) -> Any:
    """The dtype of an adapter's (or adapter table's) experts; None without one."""
    return None if adapter is None else jax.tree.leaves(adapter.arrays()["experts"])[0].dtype


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def cache_key(model_config: ModelConfig, dtype: Any, adapter_config: Any | None, rows: int,
              backend: Backend | str | None, strategy: str, per_row: bool = False,
              quantized: str | None = None, expert_dtype: Any = None) -> dict[str, Any]:
    """An entry's key, in the form JSON gives back (so a read key compares equal). `expert_dtype`:
    the adapter's experts' type where it differs from the weights' (it changes the bytes a step reads)."""
    adapter = None if adapter_config is None else {
        "method": str(adapter_config.method), "experts": adapter_config.num_experts, "top_k": adapter_config.top_k,
        "rank": adapter_config.rank, "targets": list(adapter_config.targets)}
    if adapter is not None and expert_dtype is not None and jnp.dtype(expert_dtype) != jnp.dtype(dtype):
        adapter["dtype"] = str(jnp.dtype(expert_dtype))
    if per_row:
        adapter["table"] = True
    asked = {"backend": "auto" if backend is None else backend if isinstance(backend, str) else backend.name,
             "strategy": str(strategy) if adapter_config is not None else "base"}
    key = {"machine": machine(), "model": dataclasses.asdict(model_config), "dtype": str(jnp.dtype(dtype)),
           "adapter": adapter, "rows": rows, "asked": asked}
    if quantized:
        key["quantized"] = quantized
    return json.loads(json.dumps(key))


ENTRY_FIELDS = {"key": dict, "ms_per_step": dict, "pick": str, "pinned": bool, "date": str}


def read_cache(path: Path) -> list[dict[str, Any]]:
    """The cache file's entries (none when it does not exist); a file that is not one is a
    `ConfigError` naming it, what is wrong and what to do."""
    if not path.exists():
        return []
    try:
        data = read_json_object(path, ConfigError, "an lsjax autotune cache")
    except ConfigError as e:
        raise ConfigError(f"autotune cache {e}; {FIX}") from None

    def bad(what: str) -> ConfigError:
        return ConfigError(f"autotune cache {path}: {what}; {FIX}")

    if data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
        raise bad(f'expected {{"format": {FORMAT}, "entries": [...]}}, got keys {sorted(data)} '
                  f"(format {data.get('format')!r})")
    for i, entry in enumerate(data["entries"]):
        if not isinstance(entry, dict) or set(entry) != set(ENTRY_FIELDS):
            raise bad(f"entry {i} is not an object with exactly the fields {', '.join(ENTRY_FIELDS)}")
        wrong = [name for name, kind in ENTRY_FIELDS.items() if not isinstance(entry[name], kind)]
        if wrong:
            raise bad(f"entry {i}: {', '.join(wrong)} of the wrong type")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in entry["ms_per_step"].values()):
            raise bad(f"entry {i}: ms_per_step holds a value that is not a number")
        try:
            Candidate.parse(entry["pick"])
        except ConfigError as e:
            raise bad(f"entry {i}: pick {e}") from None
    return data["entries"]


def store(path: Path, entry: dict[str, Any]) -> None:
    """`entry` into the cache file, replacing the one of its key (the file read again just before)."""
    entries = [e for e in read_cache(path) if e["key"] != entry["key"]]
    write_json(path, {"format": FORMAT, "entries": [*entries, entry]})


def table(rows: list[tuple[str, int, Choice]]) -> str:
    """Markdown: each (method, batch)'s candidates with their ms/step, the pick marked."""
    lines = ["| method | batch | candidate | ms/step | |", "|---|---:|---|---:|---|"]
    for method, batch, choice in rows:
        labels = list(choice.ms_per_step) or [choice.pick.label]
        for label in sorted(labels, key=lambda x: choice.ms_per_step.get(x, 0.0)):
            ms = choice.ms_per_step.get(label)
            mark = f"auto ({choice.source})" if label == choice.pick.label else ""
            lines.append(f"| {method} | {batch} | {label} | {'' if ms is None else f'{ms:.2f}'} | {mark} |")
    return "\n".join(lines)
