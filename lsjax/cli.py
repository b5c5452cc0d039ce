"""The `lsjax` command line. Each subcommand is a thin shell over the library API."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

import lsjax
from lsjax import autotune
from lsjax.adapters import open_adapter
from lsjax.adapters.config import METHODS
from lsjax.adapters.table import served
from lsjax.sharding import init_distributed, tensor_mesh
from lsjax.assets import default_gguf_path
from lsjax.checkpoint import as_dtype
from lsjax.convert import convert_gguf, convert_hf
from lsjax.decoder import Decoder
from lsjax.config import SHAPES
from lsjax.errors import ConfigError, exit_status
from lsjax.eval.harness import add_eval_parser
from lsjax.eval.latency import add_adapter_arguments, add_bench_parser, load_model, random_adapter
from lsjax.eval.serving import add_serve_bench_parser
from lsjax.generate import Generator
from lsjax.sampling import SamplingConfig
from lsjax.serve import Engine, EngineConfig, Lockstep
from lsjax.train.cli import add_train_parser

EXPERT_DTYPE_HELP = ("the adapters' dtype (default: --dtype): bfloat16 experts beside float32 weights read half the "
                     "bytes per step, their values rounded to bfloat16")


def _convert(args) -> None:
    if args.hf:
        if args.keep_quantized:
            raise ConfigError("--keep-quantized keeps a GGUF file's blocks; a Hugging Face folder holds floats "
                              "(use --quantize int8|int4[:G])", "keep_quantized")
        out = convert_hf(args.hf, args.out, dtype=args.dtype, allow_nonfinite=args.allow_nonfinite,
                         quantize=args.quantize)
    else:
        if args.quantize:
            raise ConfigError("--quantize rounds a Hugging Face folder's floats; a GGUF file's blocks are kept as "
                              "they are with --keep-quantized", "quantize")
        if args.gguf == "default":
            args.gguf = default_gguf_path()
        out = convert_gguf(args.gguf, args.out, dtype=args.dtype or "float32", allow_nonfinite=args.allow_nonfinite,
                           keep_quantized=args.keep_quantized)
    print(f"wrote {out}")
    if args.quantize:
        errors = json.loads((out / "lsjax_config.json").read_text())["source"]["quantization_error"]
        print(f"{args.quantize}: relative RMS error per weight (also in {out / 'lsjax_config.json'}):")
        for name, error in errors.items():
            print(f"  {name:<14} {error:.4f}")


def _generate(args) -> None:
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    experts = as_dtype(args.expert_dtype) if args.expert_dtype else None  # checked before loading
    model, tokenizer = lsjax.load(args.ckpt, dtype=args.dtype)
    adapter = None
    if args.adapter:
        adapter = open_adapter(args.adapter, model.config).astype(experts or model.dtype)
    generator = Generator(model, tokenizer, adapter, strategy=args.strategy, backend=args.backend)
    reason, arrivals, start = None, [], time.perf_counter()
    for event in generator.stream(args.prompt, max_new_tokens=args.max_new_tokens, sampling=sampling,
                                  stop_strings=args.stop, chat=not args.raw):
        print(event.text, end="", flush=True)
        arrivals.append(time.perf_counter())
        reason = event.finish_reason
    # the first token waits for the prefill's compilation and the second for the step's; then one
    # decode step each
    speed = f"first token {arrivals[0] - start:.2f} s (with compiling)"
    if len(arrivals) > 2:
        speed += f", then {(arrivals[-1] - arrivals[1]) / (len(arrivals) - 2) * 1e3:.1f} ms/token"
    huge = generator.prepared.get("huge_page_bytes")
    placed = "" if huge is None else f"; {huge >> 20} MiB on huge pages"
    print(f"\n[{reason}; {len(arrivals)} tokens; {speed}; strategy {generator.strategy}; "
          f"backend {generator.backend.name}{placed}]", file=sys.stderr)


def _serve(args) -> None:
    from lsjax.serve.server import server  # the `serve` extra: imported only by the command that needs it

    api_key = args.api_key or os.environ.get("LSJAX_API_KEY") or None
    if args.max_body_bytes < 1:
        raise ConfigError(f"--max-body-bytes {args.max_body_bytes} is invalid; expected a positive integer")
    config = EngineConfig(slots=args.slots, max_len=args.max_len, max_queue=args.max_queue)  # checked before loading
    experts = as_dtype(args.expert_dtype) if args.expert_dtype else None
    specs = dict(_adapter_spec(text) for text in args.adapter)
    if len(specs) < len(args.adapter):
        raise ConfigError(f"--adapter: two adapters share a name ({', '.join(args.adapter)}); name them NAME=DIR")
    lockstep = None
    if init_distributed(args.coordinator, args.num_processes, args.process_id):
        if args.tensor_parallel != jax.device_count():
            raise ConfigError(f"--tensor-parallel {args.tensor_parallel}: a multi-process server spans every process's "
                              f"devices; expected {jax.device_count()}", "tensor_parallel")
        lockstep = Lockstep()
    mesh = tensor_mesh(args.tensor_parallel)
    model, tokenizer = lsjax.load(args.ckpt, dtype=args.dtype, mesh=mesh)
    experts = experts or model.dtype
    adapters = {name: open_adapter(folder, model.config).astype(experts) for name, folder in specs.items()}
    room = {"adapters": args.max_adapters, "experts": args.max_experts, "rank": args.max_lora_rank}
    adapter = served(model.config, adapters, runtime=args.allow_runtime_adapters, room=room, dtype=experts, mesh=mesh)
    engine = Engine.for_model(model, tokenizer, adapter, config, strategy=args.strategy, backend=args.backend,
                              lockstep=lockstep).start()
    if not engine.leader:  # steps what process 0 sends until it stops
        print(f"process {jax.process_index()} of {jax.process_count()}: following process 0's engine",
              file=sys.stderr, flush=True)
        engine.join()
        _end_if_failed(engine)
        return
    start = time.perf_counter()
    engine.warmup()
    name = args.model_name or Path(args.ckpt).absolute().name
    listed = ", ".join(repr(n) for n in [name, *engine.adapters()])
    over = "" if mesh is None else f" over {args.tensor_parallel} devices"
    if lockstep is not None:
        over += f" of {jax.process_count()} processes"
    print(f"serving {listed} on http://{args.host}:{args.port}/v1{over} ({args.slots} slots of {args.max_len} tokens, "
          f"strategy {engine.decoder.strategy}, backend {engine.decoder.backend.name}, experts "
          f"{np.dtype(experts).name}; compiled in "
          f"{time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
    try:
        server(engine, name, args.host, args.port, api_key=api_key, max_body_bytes=args.max_body_bytes,
               allow_runtime_adapters=args.allow_runtime_adapters).run()
    except KeyboardInterrupt:  # uvicorn hands Ctrl-C back once it has shut down cleanly
        pass
    if lockstep is not None:
        _end_if_failed(engine)
    engine.stop()


def _end_if_failed(engine) -> None:
    """A lockstep engine that failed (another process ended, so a collective failed) ends this process
    at once, with one line: `jax.distributed`'s shutdown would wait on the ended process's heartbeat."""
    if engine.failure is not None:
        print(f"lsjax serve: error: process {jax.process_index()}: the engine of {jax.process_count()} processes "
              f"stopped: {engine.failure} (did another process end? start them all again)", file=sys.stderr,
              flush=True)
        os._exit(2)


def _adapter_spec(text: str) -> tuple[str, str]:
    """`--adapter NAME=DIR` or `--adapter DIR` (named after its folder) -> (name, folder)."""
    name, sep, folder = text.partition("=")
    if not sep:
        return Path(text).absolute().name, text
    if not name or not folder:
        raise ConfigError(f"--adapter {text!r}: expected NAME=DIR or DIR")
    return name, folder


def _tune(args) -> None:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m != "base" and m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"--methods {args.methods!r}: expected base and/or adapter methods ({', '.join(METHODS)})")
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise ConfigError(f"--batch {args.batch!r}: expected comma-separated batch sizes, e.g. 1,8") from None
    model, _, source = load_model(args)
    rows = []
    for method in methods:
        adapter = None if method == "base" else random_adapter(model.config, method, args)
        for batch in batches:
            if args.pin:
                choice = autotune.pin(model.config, model.dtype, None if adapter is None else adapter.config, batch,
                                      args.pin, autotune.experts_dtype(adapter))
            else:
                choice = autotune.choose(Decoder, model, adapter, batch, fresh=True)
                print(f"{method} batch {batch}: {choice.pick.label}", flush=True)
            rows.append((method, batch, choice))
    machine = autotune.machine()
    print(f"\ndecode ms/step: {source} ({machine['platform']} {machine['cpu']}, {machine['cores']} cores, "
          f"{model.dtype}; median of {autotune.ROUNDS} interleaved rounds of {autotune.STEPS} steps)")
    print(autotune.table(rows))
    print(f"cache: {autotune.cache_path()}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lsjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="convert a Hugging Face folder or a GGUF file to an lsjax checkpoint")
    source = convert.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", metavar="DIR", help="folder with config.json, *.safetensors, tokenizer.json")
    source.add_argument("--gguf", metavar="FILE", help="GGUF file, or 'default' for the embedded SmolLM2-135M-Instruct")
    convert.add_argument("--out", required=True, metavar="CKPT", help="checkpoint folder to create (must not exist)")
    convert.add_argument("--dtype", default=None,
                         help="stored dtype: float32, bfloat16, float16 (default: the source's)")
    convert.add_argument("--allow-nonfinite", action="store_true",
                         help="convert weights holding NaN or Inf instead of refusing them")
    convert.add_argument("--quantize", metavar="SPEC", default=None,
                         help="--hf only: store every weight matrix as int8 or int4, per channel or in groups of G "
                              "along its input (int8, int4, int8:G, int4:G); norms stay float")
    convert.add_argument("--keep-quantized", action="store_true",
                         help="--gguf only: keep Q8_0 / Q4_0 / Q4_1 weight blocks as they are (no rounding)")
    convert.set_defaults(run=_convert)

    gen = sub.add_parser("generate", help="stream a completion for one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--ckpt", required=True, help="lsjax checkpoint folder (from `lsjax convert`)")
    gen.add_argument("--adapter", help="adapter folder: lsjax format or a PEFT LoRA")
    gen.add_argument("--strategy", default="auto", help="unmerged, merged, fused or auto")
    gen.add_argument("--backend", default="auto", help="what runs the products: auto, xla, native or pallas")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--raw", action="store_true", help="no chat template: continue the prompt as text")
    gen.add_argument("--dtype", default="float32")
    gen.add_argument("--expert-dtype", help=EXPERT_DTYPE_HELP)
    gen.set_defaults(run=_generate)

    serve = sub.add_parser("serve", help="an OpenAI-compatible server (continuous batching over decode slots)")
    serve.add_argument("--ckpt", required=True, help="lsjax checkpoint folder (from `lsjax convert`)")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                       help="an adapter folder (lsjax format or a PEFT LoRA), served as model NAME (default: the "
                            "folder's name); repeat it to serve several in one batch, beside the base")
    serve.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                       help="split the weights, experts and cache over N devices (lsjax.sharding's rules)")
    serve.add_argument("--coordinator", help="multi-host: coordinator address host:port (or LSJAX_COORDINATOR); "
                                             "every process runs the command, process 0 serves HTTP")
    serve.add_argument("--num-processes", type=int, help="multi-host: process count (or LSJAX_NUM_PROCESSES)")
    serve.add_argument("--process-id", type=int, help="multi-host: this process's id (or LSJAX_PROCESS_ID)")
    serve.add_argument("--allow-runtime-adapters", action="store_true",
                       help="POST /v1/load_lora_adapter and /v1/unload_lora_adapter load and unload adapters")
    serve.add_argument("--max-adapters", type=int, help="adapters the server holds at once (default: those given)")
    serve.add_argument("--max-lora-rank", type=int, help="the largest rank an adapter may have (default: the "
                                                        "largest given, else 16)")
    serve.add_argument("--max-experts", type=int, help="the most experts an adapter may have (default: the largest "
                                                      "given, else 8)")
    serve.add_argument("--slots", type=int, default=16, help="requests decoded together")
    serve.add_argument("--max-len", type=int, default=512, help="cache columns per slot (prompt + output)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (localhost by default)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model-name", help="the model name clients send (default: the checkpoint folder's name)")
    serve.add_argument("--strategy", default="auto", help="unmerged, fused or auto")
    serve.add_argument("--backend", default="auto", help="what runs the products: auto, xla, native or pallas")
    serve.add_argument("--dtype", default="float32")
    serve.add_argument("--expert-dtype", help=EXPERT_DTYPE_HELP + "; adapters loaded at run time too")
    serve.add_argument("--api-key", help="clients must send 'Authorization: Bearer KEY' (default: $LSJAX_API_KEY; "
                                         "none: open)")
    serve.add_argument("--max-queue", type=int, default=EngineConfig.max_queue,
                       help="requests waiting for a slot before new ones get a 503 (default: %(default)s)")
    serve.add_argument("--max-body-bytes", type=int, default=8 << 20,
                       help="larger request bodies get a 413 before they are read further (default: %(default)s)")
    serve.set_defaults(run=_serve)

    tune = sub.add_parser("tune", help="time the candidates `auto` chooses from and cache its picks")
    tune_kinds = tune.add_subparsers(dest="tune", required=True)
    dec = tune_kinds.add_parser(
        "decode", help="time every backend/strategy candidate's decode step, print them and write the autotune cache "
                       "(lsjax.autotune; $LSJAX_AUTOTUNE_CACHE or ~/.cache/lsjax/autotune.json)")
    dec.add_argument("--ckpt", help="lsjax checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    dec.add_argument("--shape", help=f"random weights at a named shape instead: {', '.join(SHAPES)}")
    dec.add_argument("--cache-dir", default=".cache/lsjax", help="where the default checkpoint is converted")
    dec.add_argument("--dtype", default="float32")
    dec.add_argument("--methods", default="base,switch", help="base and/or adapter methods, e.g. base,lora,switch")
    dec.add_argument("--batch", default="1,8", help="batch sizes (the rows a Generator or engine decodes)")
    add_adapter_arguments(dec)
    dec.add_argument("--pin", metavar="BACKEND/STRATEGY",
                     help="write this pick (e.g. native/fused, xla/base) as a pinned entry instead of measuring; "
                          "running without --pin measures again and replaces it")
    dec.set_defaults(run=_tune)

    add_train_parser(sub)
    add_eval_parser(sub)
    add_serve_bench_parser(add_bench_parser(sub))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_status(f"lsjax {args.command}", lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
