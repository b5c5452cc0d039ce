"""Training examples from multiple-choice documents, and a resumable, deterministic batch iterator.

Plain-text JSONL documents (`encode_texts`) become rows of the same form with every token a target.
A multiple-choice example is prompt = the document's gold context, target = its gold continuation + EOS, tokenised
as lsjax.eval.harness does (trailing context whitespace moves to the continuation). The loss is on
the target tokens only. Sequences are right-padded (or left-truncated) to `max_length` + 1 tokens;
a batch holds

    ids [B, S] int32, mask [B, S] bool (attention), targets [B, S] int32, weights [B, S] float32

with S = max_length, `targets` the next tokens and `weights` 1 where a target is an answer token.

`BatchIterator` shuffles with `numpy.random.default_rng([seed, epoch])`, drops the last partial
batch of an epoch, and its whole position is `{"epoch": e, "index": i}`: restore that dict and the
next batch is exactly the one that would have come next.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from lsjax.errors import ConfigError
from lsjax.eval.harness import encode_pair, prefix_token_id


def encode_docs(tokenizer, docs: Sequence, max_length: int) -> np.ndarray:
    """`[N, max_length + 1]` int32 tokens and `[N, max_length + 1]` answer flags, stacked as `[N, 2, S+1]`."""

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token to end training targets with")
    prefix, cache = prefix_token_id(tokenizer), {}

    def encode(s: str):
        if s not in cache:
            cache[s] = tuple(int(t) for t in tokenizer(s, add_special_tokens=False)["input_ids"])
        return cache[s]

    width = max_length + 1
    out = np.zeros((len(docs), 2, width), np.int32)
    out[:, 0, :] = eos  # pad id (masked out anyway)
    for n, doc in enumerate(docs):
        ctx, cont = encode_pair(encode, *doc.choice(doc.gold), prefix)
        answer = list(cont) + [eos]
        tokens = (list(ctx) + answer)[-width:]  # keep the answer; cut the prompt's start if too long
        flags = ([0] * len(ctx) + [1] * len(answer))[-width:]
        out[n, 0, :len(tokens)] = tokens
        out[n, 1, :len(tokens)] = flags
    return out


def encode_texts(tokenizer, docs: Sequence, max_length: int) -> np.ndarray:
    """Plain-text documents (`TextDoc`) as rows like `encode_docs`'s, with the loss on every token.

    Each document (BOS if the tokenizer has one, its tokens, EOS) is cut into windows of
    `max_length + 1` tokens that do not overlap; a window's first token is context only.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token to end training documents with")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    width, rows = max_length + 1, []
    for doc in docs:
        tokens = bos + list(tokenizer(doc.text, add_special_tokens=False)["input_ids"]) + [eos]
        for start in range(0, max(len(tokens) - 1, 1), max_length):
            window = tokens[start:start + width]
            if len(window) < 2:
                continue
            row = np.zeros((2, width), np.int32)
            row[0, :] = eos
            row[0, :len(window)] = window
            row[1, 1:len(window)] = 1
            rows.append(row)
    return np.stack(rows) if rows else np.zeros((0, 2, width), np.int32)


def make_batch(examples: np.ndarray) -> dict[str, np.ndarray]:
    """Rows of `encode_docs` -> the model batch (see module docstring). Padding rows are all zero weight."""
    tokens, flags = examples[:, 0], examples[:, 1]
    valid = np.zeros(tokens.shape, bool)
    valid[:, 0] = True  # padding rows attend to one token, so no row is fully masked (no NaN)
    nonpad = np.where(flags.any(axis=1))[0]
    last = tokens.shape[1] - 1 - np.argmax(flags[:, ::-1], axis=1)  # index of each row's EOS
    for i in nonpad:
        valid[i, :last[i] + 1] = True
    ids, targets = tokens[:, :-1], tokens[:, 1:]
    weights = (flags[:, 1:] * valid[:, 1:]).astype(np.float32)
    return {"ids": ids.astype(np.int32), "mask": valid[:, :-1], "targets": targets.astype(np.int32),
            "weights": weights}


class BatchIterator:
    """Endless shuffled batches of `batch_size` rows; `state()` / `restore(state)` for checkpoints."""

    def __init__(self, examples: np.ndarray, batch_size: int, seed: int):
        if len(examples) < batch_size:
            raise ConfigError(f"the training split has {len(examples)} examples, fewer than batch_size={batch_size}")
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def state(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "index": int(self.index)}

    def restore(self, state: dict[str, Any]) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= len(self.examples):
            raise ConfigError(f"iterator state {state} does not fit {len(self.examples)} examples")
        self.epoch, self.index = epoch, index
        self._order = self._permutation(epoch)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index + self.batch_size > len(self.examples):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        rows = self._order[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        return make_batch(self.examples[rows])


def fixed_batches(examples: np.ndarray, batch_size: int):
    """The examples in order, in batches of `batch_size` (the last padded with zero-weight rows): eval."""
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        if len(chunk) < batch_size:
            pad = np.zeros((batch_size - len(chunk), *chunk.shape[1:]), chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        yield make_batch(chunk)
