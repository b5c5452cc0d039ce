"""Held-out loss and perplexity on your own data files, on the target tokens only.

The examples are encoded exactly as training encodes them (`lsjax.datafiles.encode_example`): for
instruction data the targets are the completions or the assistant turns, for plain text every token
after the first. Each run of targets becomes scoring requests whose context is everything before
it (at most `max_length` tokens), so a causal model gives every target token the log-probability it
has in the whole example, and long runs are cut into windows of `max_length`.
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import numpy as np

from lsjax.datafiles import Encoded, Example, encode_examples
from lsjax.eval.harness import DEFAULT_BATCH_SIZE, LogitsFn, ScoreRequest, score_requests


def target_requests(encoded: Encoded, max_length: int) -> list[ScoreRequest]:
    """Requests that score every target token of `encoded` once, each after up to `max_length` tokens."""
    requests = []
    for a, b in encoded.spans:
        for start in range(a, b, max_length):
            end = min(start + max_length, b)
            window = encoded.tokens[max(0, end - max_length - 1):end]
            requests.append(ScoreRequest(tuple(window), end - start))
    return requests


def file_loss(logits_fn: LogitsFn, tokenizer, examples: Sequence[Example], *, max_length: int = 2048,
              batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False, desc: str | None = None) -> dict[str, Any]:
    """`{"format", "documents", "tokens", "loss" (nats per target token), "ppl", "seconds"}` of one
    file's examples (`lsjax.datafiles.read_examples`)."""
    start = time.perf_counter()
    requests = [r for e in encode_examples(tokenizer, examples) for r in target_requests(e, max_length)]
    loglik, _ = score_requests(logits_fn, requests, batch_size=batch_size, max_length=max_length,
                               progress=progress, desc=desc)
    tokens = int(sum(r.n_score for r in requests))
    loss = -float(np.sum(loglik)) / tokens
    return {"format": examples[0].format.value, "documents": len(examples), "tokens": tokens, "loss": loss,
            "ppl": math.exp(loss), "seconds": round(time.perf_counter() - start, 3)}


def format_files(results: dict[str, dict[str, Any]], split: str) -> str:
    lines = ["| file | format | documents | target tokens | loss | perplexity |", "|---|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['format']} | {r['documents']} | {r['tokens']} | {r['loss']:.4f} | "
                     f"{r['ppl']:.3f} |")
    lines += ["", f"split: {split}, by a hash of (file name, id or line number). Loss: nats per target token "
              "(completions, assistant turns; every token of plain text), as training weighs it."]
    return "\n".join(lines)
