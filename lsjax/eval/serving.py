"""`lsjax bench serve`: continuous batching against static batches, the plain model against switch.

A workload of requests with mixed prompt lengths and a long-tailed spread of output lengths (each
runs to its own length: no stop ids) is served at each concurrency level N of `--clients`: N
clients, starting at staggered times, each taking the workload's next request as soon as its last
one is done. The engine (`lsjax.serve`, N slots) serves them as they come; its throughput counts
the tokens delivered while every client had a request in flight (N concurrent streams), and end to
end (the last requests draining included). The static baseline runs the same requests through
`Generator.generate` in batches of N, each batch until its longest request ends, with every
request available from the start and compilations not timed (both only favour it). Reported per
level and method: output tokens/s, time to first token and inter-token latency (p50 / p99) for
the engine, tokens/s for the static batches, and the ratios; JSON + PNG.

With `--adapters K` (K > 1) each switch or LoRA method also serves the same workload spread over K
adapters of its kind in one table (`lsjax.adapters.table`: every batch mixes them), reported as
"<method> x K" with its throughput over the single adapter's (`x single`); a static batch cannot
mix adapters, so it has no static baseline.
"""

from __future__ import annotations

import dataclasses
import platform
import threading
import time

import jax
import numpy as np

from lsjax.adapters.table import BATCHABLE, AdapterTable, placed
from lsjax.eval.latency import add_adapter_arguments, expert_dtype, load_model, random_adapter
from lsjax.extras import pyplot
from lsjax.generate import Generator
from lsjax.jsonfile import write_json
from lsjax.sharding import tensor_mesh
from lsjax.serve import Engine, EngineConfig, Request


@dataclasses.dataclass
class ServeRecord:
    method: str
    clients: int
    requests: int
    tokens: int
    tokens_per_s: float          # while every client had a request in flight
    end_to_end_tokens_per_s: float  # the whole workload, the last requests draining included
    static_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    step_ms_mean: float
    ratio_to_static: float = float("nan")
    ratio_to_base: float = float("nan")
    ratio_to_single: float = float("nan")  # K adapters in one table over one adapter (same method, clients)
    warmup_s: float = 0.0  # the engine's compile and warm-up before the clients start
    run_s: float = 0.0  # the workload through the engine, then through static batches


def workload(count: int, vocab: int, max_prompt: int, max_output: int, seed: int = 0) -> list[Request]:
    """`count` requests: prompts of 4..max_prompt random ids, outputs of 4..max_output tokens, most
    short and a few long (exponential, mean max_output / 4)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        prompt = tuple(int(t) for t in rng.integers(100, vocab, size=int(rng.integers(4, max_prompt + 1))))
        length = int(min(max_output, 4 + rng.exponential(max_output / 4)))
        out.append(Request(prompt, max_tokens=length, stop_ids=()))
    return out


def run_engine(engine: Engine, requests: list[Request], clients: int, stagger_s: float):
    """`clients` clients take the next request of the workload as soon as their last one is done.
    Returns every handle and the steady window `(start, end)`: from the moment every client has a
    request in flight to the moment the last request is taken (all clients busy throughout)."""
    pending = list(reversed(requests))
    handles: list = []
    lock = threading.Lock()
    started: list[float] = []
    emptied: list[float] = []

    def client(index: int):
        time.sleep(index * stagger_s)
        first = True
        while True:
            with lock:
                if not pending:
                    return
                handle = engine.submit(pending.pop())
                handles.append(handle)
                if first:
                    started.append(time.perf_counter())
                if not pending:
                    emptied.append(time.perf_counter())
            first = False
            handle.result()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return handles, (max(started), emptied[0])


def run_static(generator: Generator, requests: list[Request], batch: int) -> float:
    """Seconds for the requests in batches of `batch`, each until its longest request ends; a batch
    whose shapes were new is run again and its second (compiled) time counts."""
    seconds = 0.0
    for i in range(0, len(requests), batch):
        rows = requests[i:i + batch]
        prompts, longest = [list(r.prompt) for r in rows], max(r.max_tokens for r in rows)
        for _ in range(2):
            start = time.perf_counter()
            result = generator.generate(prompts, max_new_tokens=longest, stop_token_ids=[])
            if not result.timings["compiled"]:
                break
        seconds += time.perf_counter() - start
    return seconds


def tokens_between(handles, start: float, end: float) -> int:
    return sum(start <= t <= end for h in handles for t in h.times)


def measure(method: str, generator: Generator, clients: int, args, vocab: int,
            adapters: tuple[str, ...] = ()) -> ServeRecord:
    """One method at one level; with `adapters` (a table's names) the requests take them in turn."""
    requests = workload(clients * args.per_client, vocab, args.max_prompt, args.max_output, seed=clients)
    if adapters:
        requests = [dataclasses.replace(r, adapter=adapters[i % len(adapters)]) for i, r in enumerate(requests)]
    config = EngineConfig(slots=clients, max_len=args.max_len, prefill_chunk=args.prefill_chunk,
                          prefill_rows=args.prefill_rows)
    engine = Engine(generator.decoder, generator.tokenizer, config)
    engine.start()
    begin = time.perf_counter()
    engine.warmup()
    warmup_s = time.perf_counter() - begin
    begin = time.perf_counter()
    handles, (start, end) = run_engine(engine, requests, clients, args.stagger_ms / 1e3)
    seconds = time.perf_counter() - begin
    steps = engine.metrics()["step_seconds_mean"]
    engine.stop()
    tokens = sum(len(h.times) for h in handles)
    in_window = tokens_between(handles, start, end)
    # a workload too short to keep every client busy for a while is measured end to end
    steady = in_window / (end - start) if in_window >= clients else tokens / seconds
    ttft = [(h.times[0] - h.submitted) * 1e3 for h in handles]
    itl = [d * 1e3 for h in handles for d in np.diff(h.times)]
    static = float("nan") if adapters else sum(r.max_tokens for r in requests) / run_static(generator, requests,
                                                                                             clients)
    return ServeRecord(method, clients, len(handles), tokens, steady, tokens / seconds, static,
                       *np.percentile(ttft, [50, 99]).tolist(), *np.percentile(itl, [50, 99]).tolist(), steps * 1e3,
                       ratio_to_static=steady / static, warmup_s=warmup_s, run_s=time.perf_counter() - begin)


def set_ratios_to_base(records: list[ServeRecord]) -> None:
    """Each record's steady throughput over the base's with as many clients, and a table's over its
    method's single adapter (left nan without one)."""
    for r in records:
        base = next((b for b in records if b.method == "base" and b.clients == r.clients), None)
        if base is not None:
            r.ratio_to_base = r.tokens_per_s / base.tokens_per_s
        single = next((b for b in records if b.method == r.method.split(" x ")[0] and b.clients == r.clients), None)
        if " x " in r.method and single is not None:
            r.ratio_to_single = r.tokens_per_s / single.tokens_per_s


def run(args) -> list[ServeRecord]:
    mesh = tensor_mesh(args.tensor_parallel)
    model, tokenizer, source = load_model(args, mesh)
    levels = [int(c) for c in args.clients.split(",")]
    meta = {"source": source, "platform": jax.default_backend(), "device": str(jax.devices()[0]),
            "backend": {}, "dtype": args.dtype, "expert_dtype": expert_dtype(args), "jax": jax.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "per_client": args.per_client, "max_prompt": args.max_prompt, "max_output": args.max_output,
            "max_len": args.max_len, "stagger_ms": args.stagger_ms, "date": time.strftime("%Y-%m-%d"),
            "tensor_parallel": args.tensor_parallel}
    records: list[ServeRecord] = []

    def save(complete: bool) -> None:
        if args.json:  # after every record: a run cut short keeps what it measured
            write_json(args.json, {"meta": {**meta, "complete": complete},
                                   "records": [dataclasses.asdict(r) for r in records]})

    runs = []  # (label, what decodes, the adapters requests spread over)
    for method in args.methods.split(","):
        adapter = None if method == "base" else random_adapter(model.config, method, args)
        runs.append((method, adapter if adapter is None or mesh is None else placed(adapter, mesh), ()))
        if args.adapters > 1 and method in BATCHABLE:
            named = {f"{method}{k}": random_adapter(model.config, method, args, seed=k) for k in range(args.adapters)}
            runs.append((f"{method} x {args.adapters}", AdapterTable.of(model.config, named, dtype=expert_dtype(args),
                                                                        mesh=mesh), tuple(named)))
    for label, adapter, names in runs:
        for clients in levels:
            # auto: tuned for this level's slots (the engine steps `clients` rows), as `lsjax serve` tunes
            # for its --slots: a pick made for another row count can be far from the fastest at this one
            generator = Generator(model, tokenizer, adapter, strategy="auto", backend=args.backend, rows=clients)
            meta["backend"][f"{label} @ {clients}"] = f"{generator.backend.name}/{generator.strategy}"
            records.append(measure(label, generator, clients, args, model.config.vocab_size, names))
            set_ratios_to_base(records)
            save(complete=False)
            r = records[-1]
            print(table([r]).splitlines()[-1] + f" (warm-up {r.warmup_s:.1f} s, run {r.run_s:.1f} s)", flush=True)
    save(complete=True)
    print(table(records, meta))
    if args.plot:
        plot(records, args.plot)
    return records


def _backends(backend: dict[str, str] | str) -> str:
    """Each method's backend/strategy (a saved run before auto was timed names one backend)."""
    return backend if isinstance(backend, str) else ", ".join(f"{m} {b}" for m, b in backend.items())


def table(records: list[ServeRecord], meta: dict | None = None) -> str:
    head = "" if meta is None else (
        f"serving: {meta['source']} ({meta['platform']}, {meta['dtype']}, "
        f"experts {meta.get('expert_dtype', meta['dtype'])}, "
        f"backend {_backends(meta['backend'])}); "
        f"{meta['per_client']} requests per client in the workload, prompts 4-{meta['max_prompt']} tokens, outputs 4-"
        f"{meta['max_output']} (long-tailed), clients {meta['stagger_ms']} ms apart\n\n")
    lines = ["| method | clients | tokens/s | x base | x single | end to end | static tokens/s | x static | "
             "TTFT p50/p99 ms | ITL p50/p99 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r.method} | {r.clients} | {r.tokens_per_s:.1f} | {r.ratio_to_base:.2f} | "
                     f"{r.ratio_to_single:.2f} | "
                     f"{r.end_to_end_tokens_per_s:.1f} | "
                     f"{r.static_tokens_per_s:.1f} | {r.ratio_to_static:.2f} | "
                     f"{r.ttft_p50_ms:.0f} / {r.ttft_p99_ms:.0f} | "
                     f"{r.itl_p50_ms:.0f} / {r.itl_p99_ms:.0f} |")
    return head + "\n".join(lines)


def plot(records: list[ServeRecord], path: str) -> None:
    plt = pyplot("a serving plot (--plot)")

    levels = sorted({r.clients for r in records})
    methods = list(dict.fromkeys(r.method for r in records))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / (2 * len(methods))
    for m, method in enumerate(methods):
        rows = {r.clients: r for r in records if r.method == method}
        x = np.arange(len(levels))
        left.bar(x + (2 * m) * width, [rows[c].tokens_per_s for c in levels], width, label=f"{method} engine")
        left.bar(x + (2 * m + 1) * width, [rows[c].static_tokens_per_s for c in levels], width,
                 label=f"{method} static", alpha=0.5)
        right.plot(levels, [rows[c].itl_p50_ms for c in levels], marker="o", label=f"{method} ITL p50")
        right.plot(levels, [rows[c].ttft_p50_ms for c in levels], marker="s", linestyle="--",
                   label=f"{method} TTFT p50")
    left.set_xticks(np.arange(len(levels)) + 0.4 - width / 2, [str(c) for c in levels])
    left.set_xlabel("concurrent clients")
    left.set_ylabel("output tokens/s")
    left.legend(fontsize=7)
    right.set_xlabel("concurrent clients")
    right.set_ylabel("ms")
    right.set_xscale("log", base=2)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_serve_bench_parser(kinds) -> None:
    serve = kinds.add_parser("serve", help="continuous batching vs static batches, base vs switch")
    serve.add_argument("--ckpt", help="lsjax checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    serve.add_argument("--shape", help="random weights at a named shape instead (e.g. llama2-7b)")
    serve.add_argument("--cache-dir", default=".cache/lsjax")
    serve.add_argument("--dtype", default="float32")
    serve.add_argument("--backend", choices=("auto", "xla", "native", "hybrid", "pallas"), default="auto")
    serve.add_argument("--methods", default="base,switch")
    serve.add_argument("--clients", default="1,8,32")
    serve.add_argument("--per-client", type=int, default=3, help="requests in the workload per client")
    serve.add_argument("--max-prompt", type=int, default=32)
    serve.add_argument("--max-output", type=int, default=200)
    serve.add_argument("--max-len", type=int, default=256)
    serve.add_argument("--prefill-chunk", type=int, default=16)
    serve.add_argument("--prefill-rows", type=int, default=4, help="the most prompts prefilled in one call")
    serve.add_argument("--stagger-ms", type=float, default=50.0, help="delay between two clients' first requests")
    serve.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                       help="the weights, experts and cache split over N devices (as lsjax serve --tensor-parallel)")
    serve.add_argument("--adapters", type=int, default=1,
                       help="K > 1: each switch / lora method also serves the workload over K adapters in one batch")
    add_adapter_arguments(serve)
    serve.add_argument("--json", help="write records here")
    serve.add_argument("--plot", help="write a PNG here")
    serve.set_defaults(run=run)
