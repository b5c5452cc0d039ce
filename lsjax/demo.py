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
    from lsjax.decode import greedy_generate

    start = time.perf_counter()
    ckpt = default_checkpoint(args.cache_dir)
    model, tokenizer = lsjax.load(ckpt, dtype="float32")
    print(f"loaded {ckpt} in {time.perf_counter() - start:.1f}s")
    messages = [{"role": "user", "content": args.prompt}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt_ids = list(getattr(prompt_ids, "input_ids", prompt_ids))
    out, timing = greedy_generate(model.config, model.params(), [prompt_ids], args.max_new_tokens,
                                  stop_ids=model.config.eos_token_ids)
    answer = tokenizer.decode(out[0], skip_special_tokens=True).strip()
    print(f"\nuser: {args.prompt}\nassistant: {answer}\n")
    print(f"prompt {len(prompt_ids)} tokens, prefill {timing['prefill_ms']:.0f} ms (with compilation), "
          f"decode {timing['decode_ms_per_token']:.1f} ms/token over {len(out[0])} tokens (fp32, CPU greedy)")


if __name__ == "__main__":
    main()
