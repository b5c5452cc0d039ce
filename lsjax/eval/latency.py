"""`lsjax bench decode`: decode latency of the base model, plain LoRA and the routed methods.

Batch sizes are taken in turn: every configuration is compiled at that size, then timed in
interleaved rounds (base, lora, ..., base, lora, ...), so machine noise hits all of them alike, and
a run cut short (the JSON is written after every compile and round) keeps whole batch sizes. Each
timed generation follows a short untimed one of the same configuration, so none pays for the state
the previous one left. Each figure is a median over rounds, and every ratio compares figures of the
same run. The memory floor is the weight bytes over a device copy's bandwidth measured in the same
run (bytes read + written per second): a batch-1 decode step must read every weight once, so no
step can beat it.

Every configuration decodes on the same backend (`lsjax.backends`; `--backend auto`: the one
`auto` picks for the base at the first batch size, `lsjax.autotune`), and the base is also timed on
every other backend that can run here; every ratio is to the fastest base of its batch. Before
timing, the run asks `auto` for its pick of each method at each batch size (from the autotune cache,
else measured and written there) and reports them; the summary says whether auto's base pick is the
fastest base this run measured (JSON: `meta.auto`, `meta.auto_base`). On the native CPU backend, the
decoded arrays sit on transparent huge pages where the OS allows (`--huge-pages off` to compare).
Every Generator decodes from the model's own arrays (one copy of the weights for all of them);
the run reports the live device memory against weights + experts + KV cache, and the device's
peak where it keeps one (GPUs).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

import lsjax
from lsjax import autotune
from lsjax.adapters import Adapter, AdapterConfig
from lsjax.assets import default_checkpoint
from lsjax.backend_interface import Backend
from lsjax.backends import native_backend, resolve_backend
from lsjax.checkpoint import as_dtype
from lsjax.config import SHAPES, ModelConfig, named_config
from lsjax.convert import export_hf
from lsjax.decoder import Decoder
from lsjax.errors import ConfigError
from lsjax.extras import Extra, missing_extra, pyplot
from lsjax.generate import CACHE_ROUND, Generator, round_up
from lsjax.jsonfile import write_json
from lsjax.model import Llama
from pallas_kernels.timing import bandwidth

# (method, strategy) pairs timed by default; merged switch is batch-1 only
CONFIGS = [("base", "-"), ("lora", "merged"), ("lora", "unmerged"), ("layerwise", "unmerged"),
           ("blockwise", "unmerged"), ("switch", "unmerged"), ("switch", "fused"), ("switch", "merged")]


@dataclasses.dataclass
class Record:
    method: str
    strategy: str
    batch: int
    dtype: str
    ms_per_token: float | None  # None until the configuration's first timed round
    prefill_ms: float | None
    ratio_to_base: float | None = None  # to the fastest base of the batch
    floor_ms: float | None = None
    rounds: int = 0
    backend: str = "xla"  # lsjax.backends name ("xla", "native", "hybrid", "pallas"); "torch" for transformers' rows
    compile_s: float | None = None  # the first generation's wall time: compiling and one untimed run
    run_s: float = 0.0  # wall time of the timed generations


def expert_dtype(args) -> str:
    """The random adapters' dtype name: `--expert-dtype`, else `--dtype`."""
    return str(jnp.dtype(as_dtype(args.expert_dtype or args.dtype)))


def add_adapter_arguments(parser) -> None:
    """The shape and type of the random adapters a benchmark times (`random_adapter`)."""
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="all-linear")
    parser.add_argument("--expert-dtype", default=None,
                        help="the adapters' dtype (default: --dtype), e.g. bfloat16 experts beside float32 weights")


def random_adapter(model_config: ModelConfig, method: str, args, seed: int = 0) -> Any:
    """A `method` adapter of `args`' shape (`add_adapter_arguments`) with every tensor random (B
    nonzero: its term is computed and matters), in `args.expert_dtype` (else `args.dtype`); `seed`
    makes another."""
    routed = method != "lora"
    cfg = AdapterConfig(method=method, num_experts=args.experts if routed else 1, top_k=args.top_k if routed else 1,
                        rank=args.rank, targets=args.targets)
    dtype = jnp.dtype(expert_dtype(args))
    adapter = Adapter(model_config, cfg, rngs=nnx.Rngs(seed), dtype=dtype)
    leaves, tree = jax.tree.flatten(adapter.arrays())
    keys = jax.random.split(jax.random.key(1 + seed), len(leaves))
    noisy = [(x + 0.02 * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype) for x, k in zip(leaves, keys)]
    return Adapter.from_arrays(model_config, cfg, jax.tree.unflatten(tree, noisy))


def load_model(args, mesh=None):
    """`(model, tokenizer, source)` of `--shape` (random weights) or `--ckpt` (default: the embedded
    model), split over `mesh` if one is given."""
    if args.shape:
        config = named_config(args.shape)
        if mesh is not None:
            raise ConfigError("--tensor-parallel splits a checkpoint's weights: give --ckpt (or neither), not --shape")
        return Llama(config, rngs=nnx.Rngs(0), dtype=jnp.dtype(args.dtype)), None, f"random {args.shape}"
    ckpt = args.ckpt
    if ckpt is None:
        ckpt = default_checkpoint(Path(args.cache_dir))
    model, tokenizer = lsjax.load(ckpt, dtype=args.dtype, mesh=mesh)
    return model, tokenizer, str(ckpt)


def decode_entries(configs: list[tuple[str, str]], adapters: dict[str, Any],
                   backends: dict[tuple[str, str], Backend], reference: bool = True,
                   dtype: Any = jnp.float32) -> list[tuple]:
    """`time_decode` entries: every `(method, strategy)` with its adapter and its backend in
    `backends`, plus, with `reference`, the base on every other backend that can run here
    (`autotune.candidates`)."""
    entries = [(m, s, adapters.get(m), backends[(m, s)]) for m, s in configs]
    if reference and ("base", "-") in configs:
        mine = backends[("base", "-")].name
        others = [c.backend for c in autotune.candidates(None, 1, dtype) if c.backend != mine]
        entries[1:1] = [("base", "-", None, resolve_backend(name)) for name in others]
    return entries


def auto_backends(model, configs: list[tuple[str, str]], adapters: dict[str, Any], batch: int,
                  huge_pages: bool = True, picks: list[dict[str, Any]] | None = None
                  ) -> dict[tuple[str, str], Backend]:
    """The backend `auto` picks for each `(method, strategy)` at `batch` rows, so each configuration
    runs on its own fastest backend and every ratio is to the fastest base: from `picks`
    (`auto_picks`, whose measurement timed every backend x strategy) where they hold the figures,
    else `lsjax.autotune` with the strategy fixed (the cache, else timed now)."""
    out = {}
    for method, strategy in configs:
        fixed = "base" if method == "base" else strategy
        name = measured_backend(picks or [], method, fixed, batch)
        if name is None:
            asked = "auto" if method == "base" else strategy
            name = autotune.choose(Decoder, model, adapters.get(method), batch, strategy=asked).pick.backend
        out[(method, strategy)] = (native_backend(huge_pages=False) if name == "native" and not huge_pages
                                   else resolve_backend(name))
    return out


def measured_backend(picks: list[dict[str, Any]], method: str, strategy: str, batch: int) -> str | None:
    """The backend whose `strategy` was timed fastest for `method` at `batch` in `picks` (None if not timed)."""
    for pick in picks:
        if (pick["batch"], pick["method"]) == (batch, method):
            timed = {autotune.Candidate.parse(label): ms for label, ms in pick["ms_per_step"].items()}
            mine = {c.backend: ms for c, ms in timed.items() if c.strategy == strategy}
            return min(mine, key=mine.get) if mine else None
    return None


def auto_picks(model, adapters: dict[str, Any], batches: list[int]) -> list[dict[str, Any]]:
    """What `auto` picks for the base and each adapter at each batch size (`autotune.choose`: the
    cache, else measured now), printed as they come."""
    picks = []
    for batch in batches:
        for method, adapter in [("base", None), *sorted(adapters.items())]:
            choice = autotune.choose(Decoder, model, adapter, batch)
            picks.append({"batch": batch, "method": method, "pick": choice.pick.label, "source": choice.source,
                          "ms_per_step": choice.ms_per_step})
            print(f"auto at batch {batch}: {method} -> {choice.pick.label} ({choice.source})", flush=True)
    return picks


def auto_base_check(records: list[Record], picks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per batch size: auto's base backend against the fastest base this run measured."""
    out = []
    for pick in (p for p in picks if p["method"] == "base"):
        best = fastest(records, "base", pick["batch"])
        if best is None:
            continue
        auto = autotune.Candidate.parse(pick["pick"]).backend
        mine = next((r for r in records if (r.method, r.backend, r.batch) == ("base", auto, pick["batch"])
                     and r.ms_per_token is not None), None)
        out.append({"batch": pick["batch"], "auto": auto, "auto_ms": None if mine is None else mine.ms_per_token,
                    "fastest": best.backend, "fastest_ms": best.ms_per_token, "auto_is_fastest": auto == best.backend})
    return out


def device_memory() -> dict[str, int]:
    """Live device bytes (every array jax holds) and, where the device keeps them, its in-use and peak bytes."""
    out = {"live_bytes": sum(a.nbytes for a in jax.live_arrays())}
    stats = jax.devices()[0].memory_stats() or {}
    for key in ("bytes_in_use", "peak_bytes_in_use"):
        if key in stats:
            out[key] = int(stats[key])
    return out


def time_decode(model, tokenizer, entries: list[tuple[str, str, Any, Any]], batches: list[int], *, prompt_len: int,
                new_tokens: int, rounds: int, progress: bool = True,
                on_update: Callable[[list[Record], dict[str, Any]], None] | None = None,
                ) -> tuple[list[Record], dict[str, Any]]:
    """Decode ms/token and prefill ms of every `(method, strategy, adapter, backend)` entry at every batch size.

    Batch sizes are taken in turn: all entries compiled at that size, then timed in `rounds`
    interleaved rounds (medians); every ratio compares figures of this run. Returns the records and
    `{"copy_gb_s", "weight_bytes", "floor_ms", "read_gb_s", "read_floor_ms", "failed", "memory"}`
    (floors: weight bytes over the copy / read bandwidth; memory: live and peak device bytes against
    weights + experts + the largest KV cache). A configuration that fails to build or compile is
    named under "failed" (and printed) and the others are still timed. `merged` switch is batch-1
    only and is skipped at larger batches.

    `on_update(records, info)` is called after every configuration compiles and after every round,
    with the records measured so far (`ms_per_token` None until a configuration's first round) and
    what `info` holds by then: a caller that writes them each time keeps every figure of a run that
    is cut short. Each configuration's compile and run seconds are printed as they are measured.
    """

    rng = np.random.default_rng(0)
    dtype = str(jnp.dtype(model.dtype))
    failures, compile_s = [], {}
    info: dict[str, Any] = {"failed": failures}

    def failed(what: str, error: Exception) -> None:
        if what.startswith("base"):  # every ratio needs the base
            raise error
        failures.append(f"{what}: {type(error).__name__}: {str(error)[:300]}")
        print(f"FAILED {failures[-1]}", flush=True)

    def publish() -> list[Record]:
        records = summarize(samples, compile_s, dtype, info.get("floor_ms"))
        if on_update is not None:
            on_update(records, info)
        return records

    samples: dict[tuple, list[tuple[float, float, float]]] = {}
    gens = []
    for method, strategy, adapter, backend in entries:
        try:  # one failing configuration must not cost the others' figures
            gens.append((method, strategy, backend.name, Generator(
                model, tokenizer, adapter, strategy="auto" if adapter is None else strategy, backend=backend)))
        except Exception as e:
            failed(f"{method}/{strategy} ({backend.name})", e)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(model.params()))
    # Batch sizes one after another, each compiled and then timed in its own interleaved rounds: a run
    # cut short keeps whole batch sizes, a ratio compares configurations of one batch size, and a
    # batch-8 step leaves XLA's thread pool spinning on the second core for a while, which would
    # land on whichever batch-1 configuration came next.
    bar = tqdm(total=rounds * len(batches), desc="timing rounds", unit="round", disable=not progress)
    for batch in batches:
        prompts = [rng.integers(3, model.config.vocab_size, prompt_len).tolist() for _ in range(batch)]
        group = []
        for method, strategy, name, gen in gens:
            if gen.decoder.max_rows is not None and batch > gen.decoder.max_rows:  # merged switch: batch 1
                continue
            start = time.perf_counter()
            try:
                gen.generate(prompts, max_new_tokens=new_tokens, stop_token_ids=())  # compile + warm up
            except Exception as e:
                failed(f"{method}/{strategy} ({name}) batch {batch}", e)
                continue
            key = (method, strategy, name, batch)
            group.append((key, gen))
            samples[key], compile_s[key] = [], time.perf_counter() - start
            print(f"compiled {method}/{strategy} ({name}) batch {batch}: {compile_s[key]:.1f} s "
                  "(compile and one generation)", flush=True)
            publish()
        if "copy_gb_s" not in info:  # the device's bandwidth, once, before the first timing: a floor
            probe = bandwidth(repeats=3, samples=3, kinds=("copy", "read"))  # for reference, not a race
            info.update(copy_gb_s=probe["copy_gb_s"], read_gb_s=probe["read_gb_s"], weight_bytes=weight_bytes,
                        floor_ms=weight_bytes / (probe["copy_gb_s"] * 1e9) * 1e3,
                        read_floor_ms=weight_bytes / (probe["read_gb_s"] * 1e9) * 1e3)
        for round_ in range(rounds):
            for key, gen in group:
                # a few untimed tokens first: the previous configuration's state (threads, caches)
                # must not be charged to this one
                gen.generate(prompts, max_new_tokens=min(4, new_tokens), stop_token_ids=())
                start = time.perf_counter()
                timings = gen.generate(prompts, max_new_tokens=new_tokens, stop_token_ids=()).timings
                samples[key].append((timings["decode_ms_per_token"], timings["prefill_ms"],
                                     time.perf_counter() - start))
            records = publish()
            print(f"batch {batch} round {round_ + 1}/{rounds}: " + ", ".join(
                f"{r.method}/{r.strategy} ({r.backend}) {r.ms_per_token:.2f} ms/token, run {r.run_s:.1f} s"
                for r in records if r.batch == batch and r.ms_per_token is not None), flush=True)
            bar.update()
    bar.close()
    memory = device_memory()
    expert_bytes = sum(x.nbytes for a in {id(e[2]): e[2] for e in entries if e[2] is not None}.values()
                       for x in jax.tree.leaves(a.arrays()))
    cache_bytes = max((cache_nbytes(model.config, batch, prompt_len + new_tokens, model.dtype) for batch in batches),
                      default=0)
    memory.update(weight_bytes=weight_bytes, expert_bytes=expert_bytes, cache_bytes=cache_bytes,
                  budget_bytes=weight_bytes + expert_bytes + cache_bytes)
    info["memory"] = memory
    return publish(), info


def summarize(samples: dict[tuple, list[tuple[float, float, float]]], compile_s: dict[tuple, float], dtype: str,
              floor_ms: float | None) -> list[Record]:
    """Records from each configuration's `(ms/token, prefill ms, run s)` samples (medians; the run
    seconds summed), with every ratio to the fastest base of its batch."""
    records = []
    for (method, strategy, name, batch), values in samples.items():
        measured = bool(values)
        records.append(Record(method, strategy, batch, dtype,
                              statistics.median(v[0] for v in values) if measured else None,
                              statistics.median(v[1] for v in values) if measured else None,
                              rounds=len(values), floor_ms=floor_ms if method == "base" else None, backend=name,
                              compile_s=compile_s[(method, strategy, name, batch)],
                              run_s=sum(v[2] for v in values)))
    for r in records:
        base = fastest(records, "base", r.batch)
        if base is not None and r.ms_per_token is not None:
            r.ratio_to_base = r.ms_per_token / base.ms_per_token
    return records


def cache_nbytes(config: ModelConfig, batch: int, tokens: int, dtype: Any) -> int:
    """Bytes of the KV cache a Generator allocates for `tokens` (its capacity rounding included)."""

    capacity = round_up(tokens, CACHE_ROUND)
    return 2 * config.num_layers * batch * config.num_kv_heads * capacity * config.head_dim * jnp.dtype(dtype).itemsize


def fastest(records: list[Record], method: str, batch: int) -> Record | None:
    """The quickest record of `method` at `batch` (the base every ratio is to; switch's best strategy)."""
    return min((r for r in records if r.method == method and r.batch == batch and r.ms_per_token is not None),
               key=lambda r: r.ms_per_token, default=None)


def select_configs(entries: str | tuple[str, ...] | list[str], what: str = "--methods") -> list[tuple[str, str]]:
    """(method, strategy) pairs from methods (every strategy of each) or `method/strategy` entries,
    comma-separated or a sequence; an unknown entry is refused by name."""
    if isinstance(entries, str):
        entries = entries.split(",")
    known = [f"{m}/{s}" for m, s in CONFIGS if m != "base"]
    picked = []
    for entry in (e.strip() for e in entries if e.strip()):
        method, _, strategy = entry.partition("/")
        match = [(m, s) for m, s in CONFIGS if m == method and strategy in ("", s)]
        if not match:
            raise ConfigError(f"{what} entry {entry!r} is unknown; expected a method "
                              f"({', '.join(dict.fromkeys(m for m, _ in CONFIGS))}) or one of {', '.join(known)}")
        picked += match
    if not picked:
        raise ConfigError(f"{what} {','.join(entries)!r} selects nothing")
    return [c for c in CONFIGS if c in picked]  # the table's order, each once


def run(args) -> list[Record]:
    configs = select_configs(args.methods)
    model, tokenizer, source = load_model(args)
    batches = [int(b) for b in args.batch.split(",")]
    adapters = {m: random_adapter(model.config, m, args) for m in {m for m, _ in configs if m != "base"}}
    picks = auto_picks(model, adapters, batches)
    if args.backend == "auto":
        backends = auto_backends(model, configs, adapters, batches[0], args.huge_pages == "on", picks)
    else:
        backend = resolve_backend(args.backend, model.dtype)
        if backend.name == "native" and args.huge_pages == "off":
            backend = native_backend(huge_pages=False)
        backends = dict.fromkeys(configs, backend)
    entries = decode_entries(configs, adapters, backends, dtype=model.dtype)
    meta = {"source": source, "backend": jax.default_backend(), "device": str(jax.devices()[0]),
            "jax": jax.__version__, "backend_name": args.backend, "huge_pages": args.huge_pages == "on",
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "experts": args.experts, "expert_dtype": expert_dtype(args),
            "top_k": args.top_k, "rank": args.rank, "targets": args.targets,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rounds": args.rounds,
            "date": time.strftime("%Y-%m-%d"), "auto": picks,
            "backends": {f"{m}/{s}": b.name for (m, s), b in backends.items()}}

    def save(records: list[Record], info: dict[str, Any], complete: bool = False) -> None:
        if args.json:  # every update: a run cut short keeps what it measured
            write_json(args.json, {"meta": {**meta, **info, "complete": complete},
                                   "records": [dataclasses.asdict(r) for r in records]})

    records, info = time_decode(model, tokenizer, entries, batches, prompt_len=args.prompt_len,
                                new_tokens=args.new_tokens, rounds=args.rounds, on_update=save)
    del entries, adapters
    if args.with_transformers:
        records += transformers_records(model, args, batches, args.prompt_len)
    meta.update(info, complete=True, auto_base=auto_base_check(records, picks))
    save(records, info, complete=True)
    print(latency_table(records, meta))
    if args.plot:
        plot(records, meta, args.plot)
    return records


def transformers_records(model, args, batches, prompt_len) -> list[Record]:
    """transformers' own greedy `generate` on the same weights, with and without an unmerged PEFT LoRA."""
    try:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise missing_extra(e, Extra.PEFT, "--with-transformers") from None

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(tmp, model.config, jax.tree.map(np.asarray, model.params()))
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = None
    for label, build in (("base", lambda: hf), ("peft-lora", None)):
        if build is None:
            peft_model = get_peft_model(hf, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets,
                                                       init_lora_weights=False)).eval()
        net = hf if label == "base" else peft_model
        for batch in batches:
            ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len))
            times = []
            with torch.no_grad():
                for n in (1, args.new_tokens):  # warm up both
                    net.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
                for _ in range(args.rounds):
                    t1 = _timed(lambda: net.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False))
                    tn = _timed(lambda: net.generate(ids, max_new_tokens=args.new_tokens,
                                                     min_new_tokens=args.new_tokens, do_sample=False))
                    times.append(((tn - t1) / (args.new_tokens - 1), t1))
            out.append(Record(f"transformers-{label}", "torch", batch, "float32",
                              statistics.median(t[0] for t in times), statistics.median(t[1] for t in times),
                              rounds=len(times), backend="torch"))
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _figure(value: float | None, digits: int) -> str:
    """A table cell: blank where nothing was measured."""
    return "" if value is None else f"{value:.{digits}f}"


def latency_table(records: list[Record], meta: dict) -> str:
    """Markdown: the run's settings, one row per record, and the headline ratios."""
    experts = meta.get("expert_dtype", records[0].dtype)
    typed = records[0].dtype + ("" if experts == records[0].dtype else f", experts {experts}")
    lines = [f"decode latency: {meta['source']} ({meta['backend']}, {typed}, prompt {meta['prompt_len']}, "
             f"{meta['new_tokens']} new tokens, median of {meta['rounds']} interleaved rounds"
             + (f", huge pages {'on' if meta['huge_pages'] else 'off'})" if "huge_pages" in meta else ")"),
             f"copy bandwidth {meta['copy_gb_s']:.1f} GB/s; weights {meta['weight_bytes'] / 1e6:.0f} MB; "
             f"memory floor {meta['floor_ms']:.1f} ms/token; read-only bandwidth {meta['read_gb_s']:.1f} GB/s, "
             f"read floor {meta['read_floor_ms']:.1f} ms/token", "",
             "| method | strategy | backend | batch | ms/token | x base | prefill ms | compile s |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r.method} | {r.strategy} | {r.backend} | {r.batch} | {_figure(r.ms_per_token, 1)} "
                     f"| {_figure(r.ratio_to_base, 2)} | {_figure(r.prefill_ms, 0)} | {_figure(r.compile_s, 1)} |")
    for failure in meta.get("failed", ()):
        lines.append(f"| FAILED: {failure} | | | | | | | |")
    base1, switch1 = fastest(records, "base", 1), fastest(records, "switch", 1)
    if base1:
        lines.append(f"\nbase ({base1.backend}) batch 1 / memory floor: {base1.ms_per_token / meta['floor_ms']:.2f}x"
                     f" (/ read floor: {base1.ms_per_token / meta['read_floor_ms']:.2f}x)")
    if base1 and switch1:
        lines.append(f"switch, best strategy ({switch1.strategy}, {switch1.backend}) / base, batch 1: "
                     f"{switch1.ms_per_token / base1.ms_per_token:.2f}x")
    for label, ours in (("base", base1), ("peft-lora", switch1)):
        hf = fastest(records, f"transformers-{label}", 1)
        if hf and ours:
            lines.append(f"transformers {label} / lsjax {ours.method} ({ours.strategy}, {ours.backend}), batch 1: "
                         f"{hf.ms_per_token / ours.ms_per_token:.2f}x")
    picks = {(p["batch"], p["method"]): p["pick"] for p in meta.get("auto", ())}
    for batch in sorted({b for b, _ in picks}):
        lines.append(f"auto at batch {batch}: " + ", ".join(f"{m} {p}" for (b, m), p in picks.items() if b == batch))
    for check in meta.get("auto_base", ()):
        verdict = "the fastest base measured" if check["auto_is_fastest"] else (
            f"NOT the fastest base measured ({check['fastest']}: {check['fastest_ms']:.2f} ms/token)")
        mine = "" if check["auto_ms"] is None else f" ({check['auto_ms']:.2f} ms/token)"
        lines.append(f"auto's base pick at batch {check['batch']}: {check['auto']}{mine}, {verdict}")
    return "\n".join(lines)


def plot(records: list[Record], meta: dict, path: str) -> None:
    plt = pyplot("a decode latency plot (--plot)")

    batches = sorted({r.batch for r in records})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        rows = [r for r in records if r.batch == batch]
        labels = [f"{r.method}\n{r.strategy}" for r in rows]
        ax.bar(range(len(rows)), [r.ms_per_token for r in rows], color="tab:blue")
        if batch == 1:
            ax.axhline(meta["floor_ms"], color="tab:red", linestyle="--", label="memory floor")
            ax.legend()
        ax.set_xticks(range(len(rows)), labels, rotation=60, fontsize=7)
        ax.set_ylabel("decode ms/token")
        ax.set_title(f"batch {batch} ({meta['backend']}, {records[0].dtype})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_bench_parser(subparsers):
    """The `bench` command and `bench decode`; returns the subparsers other benchmarks join."""
    bench = subparsers.add_parser("bench", help="benchmarks")
    kinds = bench.add_subparsers(dest="bench", required=True)
    dec = kinds.add_parser("decode", help="decode latency of base, lora and routed methods")
    dec.add_argument("--ckpt", help="lsjax checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    dec.add_argument("--shape", help=f"random weights at a named shape instead: {', '.join(SHAPES)}")
    dec.add_argument("--cache-dir", default=".cache/lsjax")
    dec.add_argument("--dtype", default="float32")
    dec.add_argument("--methods", default="base,lora,layerwise,blockwise,switch",
                     help="methods (all their strategies) or method/strategy pairs, e.g. base,switch/unmerged")
    dec.add_argument("--batch", default="1,8")
    add_adapter_arguments(dec)
    dec.add_argument("--prompt-len", type=int, default=32)
    dec.add_argument("--new-tokens", type=int, default=32)
    dec.add_argument("--rounds", type=int, default=5)
    dec.add_argument("--backend", choices=("auto", "xla", "native", "hybrid", "pallas"), default="auto",
                     help="what runs the products (lsjax.backends): auto = each configuration on the backend auto "
                          "picks for it at the first batch size (timed on this machine, lsjax.autotune)")
    dec.add_argument("--huge-pages", choices=("on", "off"), default="on",
                     help="native backend: back the decoded arrays with transparent huge pages (default on)")
    dec.add_argument("--with-transformers", action="store_true", help="also time transformers (+ unmerged PEFT LoRA)")
    dec.add_argument("--json", help="write records here")
    dec.add_argument("--plot", help="write a PNG bar chart here")
    dec.set_defaults(run=run)
    return kinds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lsjax.eval.latency")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
