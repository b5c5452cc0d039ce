"""`lsjax bench serve`: continuous batching against static batches, the plain model against switch.

N clients (each level of `--clients`) send requests one after another, starting at staggered
times, with mixed prompt lengths and a long-tailed spread of output lengths (each request runs to
its own length: no stop ids). The engine (`lsjax.serve`, N slots) serves them as they come; the
static baseline runs the same requests through `Generator.generate` in batches of N in order, each
batch until its longest request ends, with every request available from the start (which only
favours it). Reported per level and method: output tokens/s, time to first token and inter-token
latency (p50 / p99) for the engine, tokens/s for the static batches, and the ratios; JSON + PNG.
"""

from __future__ import annotations

import dataclasses
import platform
import threading
import time

import jax
import numpy as np

from lsjax.backends import resolve_backend
from lsjax.eval.latency import load_model, random_adapter
from lsjax.generate import Generator
from lsjax.jsonfile import write_json
from lsjax.serve import Engine, EngineConfig, Request


@dataclasses.dataclass
class ServeRecord:
    method: str
    clients: int
    requests: int
    tokens: int
    tokens_per_s: float
    static_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    step_ms_mean: float
    ratio_to_static: float = float("nan")
    ratio_to_base: float = float("nan")


def workload(clients: int, per_client: int, vocab: int, max_prompt: int, max_output: int, seed: int = 0):
    """`per_client` requests for each client: prompts of 4..max_prompt random ids, outputs of 4..max_output
    tokens, most short and a few long (exponential, mean max_output / 4)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(clients * per_client):
        prompt = tuple(int(t) for t in rng.integers(100, vocab, size=int(rng.integers(4, max_prompt + 1))))
        length = int(min(max_output, 4 + rng.exponential(max_output / 4)))
        out.append(Request(prompt, max_tokens=length, stop_ids=()))
    return [out[c::clients] for c in range(clients)]


def run_engine(engine: Engine, per_client: list[list[Request]], stagger_s: float) -> tuple[float, list]:
    """Each client submits its requests one after another; seconds from the first submission to the
    last token, and every handle."""
    handles: list = []
    lock = threading.Lock()

    def client(index: int, requests: list[Request]):
        time.sleep(index * stagger_s)
        for request in requests:
            handle = engine.submit(request)
            with lock:
                handles.append(handle)
            handle.result()

    threads = [threading.Thread(target=client, args=(i, r)) for i, r in enumerate(per_client)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, handles


def run_static(generator: Generator, per_client: list[list[Request]], batch: int) -> float:
    """Seconds for the same requests in batches of `batch`, each until its longest request ends."""
    ordered = [r for group in zip(*per_client) for r in group]  # the order the clients' requests come in
    start = time.perf_counter()
    for i in range(0, len(ordered), batch):
        rows = ordered[i:i + batch]
        generator.generate([list(r.prompt) for r in rows], max_new_tokens=max(r.max_tokens for r in rows),
                           stop_token_ids=[])
    return time.perf_counter() - start


def measure(method: str, generator: Generator, clients: int, args, vocab: int) -> ServeRecord:
    per_client = workload(clients, args.per_client, vocab, args.max_prompt, args.max_output, seed=clients)
    engine = Engine(generator, EngineConfig(slots=clients, max_len=args.max_len, prefill_chunk=args.prefill_chunk))
    engine.start()
    engine.warmup()
    seconds, handles = run_engine(engine, per_client, args.stagger_ms / 1e3)
    steps = engine.metrics()["step_seconds_mean"]
    engine.stop()
    tokens = sum(len(h.times) for h in handles)
    ttft = [(h.times[0] - h.submitted) * 1e3 for h in handles]
    itl = [d * 1e3 for h in handles for d in np.diff(h.times)]
    run_static(generator, [c[:1] for c in per_client], clients)  # compiles its buckets
    static = run_static(generator, per_client, clients)
    wanted = sum(r.max_tokens for c in per_client for r in c)
    return ServeRecord(method, clients, len(handles), tokens, tokens / seconds, wanted / static,
                       *np.percentile(ttft, [50, 99]).tolist(), *np.percentile(itl, [50, 99]).tolist(), steps * 1e3,
                       ratio_to_static=(tokens / seconds) / (wanted / static))


def run(args) -> list[ServeRecord]:
    model, tokenizer, source = load_model(args)
    backend = resolve_backend(args.backend, model.dtype)
    records = []
    for method in args.methods.split(","):
        adapter = None if method == "base" else random_adapter(model.config, method, args)
        generator = Generator(model, tokenizer, adapter, strategy="auto", backend=backend)
        for clients in (int(c) for c in args.clients.split(",")):
            records.append(measure(method, generator, clients, args, model.config.vocab_size))
            print(table([records[-1]]).splitlines()[-1], flush=True)
    for r in records:
        base = next((b for b in records if b.method == "base" and b.clients == r.clients), None)
        if base is not None:
            r.ratio_to_base = r.tokens_per_s / base.tokens_per_s
    meta = {"source": source, "platform": jax.default_backend(), "device": str(jax.devices()[0]),
            "backend": backend.name, "dtype": args.dtype, "jax": jax.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "per_client": args.per_client, "max_prompt": args.max_prompt, "max_output": args.max_output,
            "max_len": args.max_len, "stagger_ms": args.stagger_ms, "date": time.strftime("%Y-%m-%d")}
    print(table(records, meta))
    if args.json:
        write_json(args.json, {"meta": meta, "records": [dataclasses.asdict(r) for r in records]})
    if args.plot:
        plot(records, args.plot)
    return records


def table(records: list[ServeRecord], meta: dict | None = None) -> str:
    head = "" if meta is None else (
        f"serving: {meta['source']} ({meta['platform']}, {meta['dtype']}, backend {meta['backend']}); "
        f"{meta['per_client']} requests per client, prompts 4-{meta['max_prompt']} tokens, outputs 4-"
        f"{meta['max_output']} (long-tailed), clients {meta['stagger_ms']} ms apart\n\n")
    lines = ["| method | clients | tokens/s | x base | static tokens/s | x static | TTFT p50/p99 ms | ITL p50/p99 ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r.method} | {r.clients} | {r.tokens_per_s:.1f} | {r.ratio_to_base:.2f} | "
                     f"{r.static_tokens_per_s:.1f} | {r.ratio_to_static:.2f} | {r.ttft_p50_ms:.0f} / {r.ttft_p99_ms:.0f} | "
                     f"{r.itl_p50_ms:.0f} / {r.itl_p99_ms:.0f} |")
    return head + "\n".join(lines)


def plot(records: list[ServeRecord], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        right.plot(levels, [rows[c].ttft_p50_ms for c in levels], marker="s", linestyle="--", label=f"{method} TTFT p50")
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
    serve.add_argument("--backend", choices=("auto", "xla", "native", "pallas"), default="auto")
    serve.add_argument("--methods", default="base,switch")
    serve.add_argument("--clients", default="1,8,32")
    serve.add_argument("--per-client", type=int, default=3, help="requests each client sends, one after another")
    serve.add_argument("--max-prompt", type=int, default=96)
    serve.add_argument("--max-output", type=int, default=128)
    serve.add_argument("--max-len", type=int, default=256)
    serve.add_argument("--prefill-chunk", type=int, default=64)
    serve.add_argument("--stagger-ms", type=float, default=50.0, help="delay between two clients' first requests")
    serve.add_argument("--experts", type=int, default=8)
    serve.add_argument("--top-k", type=int, default=2)
    serve.add_argument("--rank", type=int, default=16)
    serve.add_argument("--targets", default="all-linear")
    serve.add_argument("--json", help="write records here")
    serve.add_argument("--plot", help="write a PNG here")
    serve.set_defaults(run=run)
