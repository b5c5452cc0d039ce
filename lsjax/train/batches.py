"""Training rows from examples (benchmark documents, text and instruction files), packed or one per
row, and a resumable, deterministic batch iterator.

Every example becomes tokens with a target flag per token (`lsjax.datafiles.encode_example`; a
multiple-choice document is a prompt/completion pair: its gold context and gold continuation). An
example longer than `max_length + 1` tokens loses the start of its prompt, never its last target
span (the completion, the last assistant turn); one whose last span alone does not fit is dropped
and counted. Plain text is cut into windows instead. Rows are `[N, 3, S + 1]` int32: tokens, target
flags and segment ids (1, 2, ... per example, 0 for padding). With packing, short examples share a
row (best fit, longest first) and attend only within their own segment, positions restarting at
each (`lsjax.model.sequence_inputs`). A batch holds

    ids [B, S] int32, segments [B, S] int32, mask [B, S] bool (segments > 0),
    targets [B, S] int32, weights [B, S] float32

with S = max_length, `targets` the next tokens and `weights` 1 where a target is a flagged token of
the same example.

`BatchIterator` shuffles rows with `numpy.random.default_rng([seed, epoch])`, drops the last partial
batch of an epoch, and its whole position is `{"epoch": e, "index": i}`: restore that dict and the
next batch is exactly the one that would have come next.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Sequence

import numpy as np

from lsjax.datafiles import Encoded, Example, Format, encode_examples
from lsjax.errors import ConfigError

TOKENS, TARGETS, SEGMENTS = range(3)


@dataclasses.dataclass(frozen=True)
class Rows:
    """Encoded training rows and what building them cost: examples dropped, share of padding."""

    rows: np.ndarray  # [N, 3, S + 1]
    examples: int
    dropped: int

    @property
    def padding(self) -> float:
        """Share of the rows' input positions that hold no token."""
        return float(np.mean(self.rows[:, SEGMENTS, :-1] == 0)) if len(self.rows) else 0.0

    def summary(self) -> dict[str, Any]:
        return {"examples": self.examples, "dropped": self.dropped, "rows": len(self.rows),
                "padding": round(self.padding, 4)}


def fit(encoded: Encoded, width: int) -> Encoded | None:
    """`encoded` cut from the left to `width` tokens, keeping its last target span whole with a token
    before it; None when that span alone does not fit."""
    cut = len(encoded.tokens) - width
    if cut <= 0:
        return encoded
    if cut > encoded.last_span_start - 1:
        return None
    return Encoded(encoded.tokens[cut:], encoded.targets[cut:])


def windows(encoded: Encoded, width: int) -> list[Encoded]:
    """A text's tokens in windows of `width` that share one boundary token (context only in the
    next), so every token is a target exactly once."""
    out = []
    for start in range(0, max(len(encoded.tokens) - 1, 1), width - 1):
        tokens = encoded.tokens[start:start + width]
        if len(tokens) >= 2:
            out.append(Encoded(tokens, (False,) + encoded.targets[start + 1:start + len(tokens)]))
    return out


def sequences(encoded: Sequence[Encoded], formats: Sequence[Format], max_length: int) -> tuple[list[Encoded], int]:
    """Each example as sequences of at most `max_length + 1` tokens (text: windows), and the number dropped."""
    width, out, dropped = max_length + 1, [], 0
    for e, fmt in zip(encoded, formats):
        if fmt is Format.TEXT:
            out += windows(e, width)
            continue
        kept = fit(e, width)
        if kept is None:
            dropped += 1
        else:
            out.append(kept)
    return out, dropped


def fill_rows(seqs: Sequence[Encoded], groups: Sequence[Sequence[int]], width: int, pad_id: int) -> np.ndarray:
    """Rows of `width` tokens: row r holds `groups[r]`'s sequences one after another as segments 1, 2,
    ...; the rest is padding (`pad_id`, segment 0)."""
    out = np.zeros((len(groups), 3, width), np.int32)
    out[:, TOKENS] = pad_id
    for row, members in zip(out, groups):
        at = 0
        for segment, i in enumerate(members, 1):
            n = len(seqs[i].tokens)
            row[TOKENS, at:at + n] = seqs[i].tokens
            row[TARGETS, at:at + n] = seqs[i].targets
            row[SEGMENTS, at:at + n] = segment
            at += n
    return out


def one_per_row(seqs: Sequence[Encoded], width: int, pad_id: int) -> np.ndarray:
    return fill_rows(seqs, [[i] for i in range(len(seqs))], width, pad_id)


def pack(seqs: Sequence[Encoded], width: int, pad_id: int) -> np.ndarray:
    """Sequences packed into rows of `width` tokens: longest first, each into the fullest row it fits
    (best fit decreasing); a row's examples keep the order they were placed in."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].tokens))
    rows: list[list[int]] = []          # sequence indices per row
    free: list[tuple[int, int]] = []    # (room left, row), sorted
    for i in order:
        n = len(seqs[i].tokens)
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = width, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return fill_rows(seqs, rows, width, pad_id)


def example_sequences(tokenizer, examples: Sequence[Example], max_length: int) -> tuple[list[Encoded], int]:
    """Examples -> sequences that fit a row, and how many examples were dropped."""
    return sequences(encode_examples(tokenizer, examples), [e.format for e in examples], max_length)


def layout(tokenizer, seqs: Sequence[Encoded], max_length: int, packing: bool) -> np.ndarray:
    """Sequences -> rows, packed or one per row (padding: EOS tokens in segment 0)."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token to pad training rows with")
    width, pad = max_length + 1, int(tokenizer.eos_token_id)
    return pack(seqs, width, pad) if packing else one_per_row(seqs, width, pad)


def build_rows(tokenizer, examples: Sequence[Example], max_length: int, packing: bool) -> Rows:
    """Examples -> training rows (see the module docstring)."""
    seqs, dropped = example_sequences(tokenizer, examples, max_length)
    return Rows(layout(tokenizer, seqs, max_length, packing), len(examples), dropped)


def doc_examples(docs: Sequence) -> list[Example]:
    """Multiple-choice documents (`lsjax.data.MCDoc`) as prompt/completion pairs: gold context, gold continuation."""
    return [Example(d.id, Format.PROMPT_COMPLETION, prompt=d.contexts[d.gold], completion=d.continuations[d.gold])
            for d in docs]


def encode_docs(tokenizer, docs: Sequence, max_length: int, packing: bool = False) -> np.ndarray:
    """Multiple-choice documents as training rows (`build_rows` of `doc_examples`)."""
    return build_rows(tokenizer, doc_examples(docs), max_length, packing).rows


def make_batch(rows: np.ndarray) -> dict[str, np.ndarray]:
    """Rows of `build_rows` -> the model batch (see module docstring). Padding rows have zero weight."""
    tokens, flags, segments = rows[:, TOKENS], rows[:, TARGETS], rows[:, SEGMENTS]
    same = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
    return {"ids": tokens[:, :-1].astype(np.int32), "segments": segments[:, :-1].astype(np.int32),
            "mask": segments[:, :-1] > 0, "targets": tokens[:, 1:].astype(np.int32),
            "weights": (flags[:, 1:].astype(bool) & same).astype(np.float32)}


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
