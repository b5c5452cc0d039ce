"""Tokenizers are transformers' fast tokenizers, built from the files a checkpoint carries; and how a
(context, continuation) pair becomes tokens, the one convention of scoring and training."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

from lsjax.errors import CheckpointError, LsjaxError


def load_tokenizer(folder: str | Path):
    """A `PreTrainedTokenizerFast` (encode/decode, chat template) from `tokenizer.json` and friends."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder}: missing tokenizer.json")
    return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)


def prefix_token_id(tokenizer) -> int:
    """The token an empty context becomes (lm-eval's prefix token): BOS, else EOS."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise LsjaxError("tokenizer has neither a BOS nor an EOS token to stand for an empty context")


class Encoder:
    """Batch-encodes strings once (no special tokens) and memoises them: choices share contexts."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def add(self, strings: Iterable[str]) -> None:
        new = list(dict.fromkeys(s for s in strings if s not in self.cache))
        if new:
            ids = self.tokenizer(new, add_special_tokens=False)["input_ids"]
            self.cache.update(zip(new, (tuple(int(t) for t in x) for x in ids)))

    def __call__(self, s: str) -> tuple[int, ...]:
        if s not in self.cache:
            self.add([s])
        return self.cache[s]


def split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's `_encode_pair`: trailing whitespace of the context moves to the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


def encode_pair(encode: Callable[[str], Sequence[int]], context: str, continuation: str,
                prefix_id: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(context tokens, continuation tokens) by lm-eval's convention (see module docstring)."""
    context, continuation = split_trailing_space(context, continuation)
    if not context:
        return (prefix_id,), tuple(encode(continuation))
    ctx, whole = tuple(encode(context)), tuple(encode(context + continuation))
    cont = whole[len(ctx):]
    if not cont:  # the boundary merged into the context's last token: score the continuation on its own
        cont = tuple(encode(continuation))
    return ctx, cont
