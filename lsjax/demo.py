"""`make demo`: the embedded SmolLM2-135M-Instruct, converted once, answering a chat prompt.

Later issues grow this into the whole story (training a switch adapter, accuracy, latency).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

PROMPT = "What is the capital of France? Answer in one sentence."


def default_checkpoint(cache_dir: Path, progress: bool = True) -> Path:
    """The embedded GGUF converted to an lsjax checkpoint under `cache_dir` (converted once)."""
    from lsjax.assets import default_gguf_path
    from lsjax.convert import convert_gguf

    ckpt = cache_dir / "smollm2-135m-instruct"
    if not ckpt.exists():
        print(f"converting {default_gguf_path().name} -> {ckpt} (first run only)")
        convert_gguf(default_gguf_path(), ckpt, progress=progress)
    return ckpt


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("LSJAX_CACHE", ".cache/lsjax")))
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)

    import lsjax
    from lsjax.generate import Generator

    start = time.perf_counter()
    ckpt = default_checkpoint(args.cache_dir)
    model, tokenizer = lsjax.load(ckpt, dtype="float32")
    print(f"loaded {ckpt} in {time.perf_counter() - start:.1f}s")
    generator = Generator(model, tokenizer)
    result = generator.generate([args.prompt], max_new_tokens=args.max_new_tokens, chat=True)  # compiles
    print(f"\nuser: {args.prompt}\nassistant: ", end="", flush=True)
    for event in generator.stream(args.prompt, max_new_tokens=args.max_new_tokens, chat=True):
        print(event.text, end="", flush=True)
    print("\n")
    t = result.timings
    print(f"prompt {result.prompt_tokens[0]} tokens, {len(result.token_ids[0])} new ({result.finish_reasons[0]}); "
          f"first call (with compilation): prefill {t['prefill_ms']:.0f} ms, total {t['total_ms']:.0f} ms")
    again = generator.generate([args.prompt], max_new_tokens=args.max_new_tokens, chat=True).timings
    print(f"compiled: prefill {again['prefill_ms']:.0f} ms, decode {again['decode_ms_per_token']:.1f} ms/token "
          f"(fp32, greedy, {jax_backend()})")


def jax_backend() -> str:
    import jax

    return jax.default_backend().upper()


if __name__ == "__main__":
    main()
