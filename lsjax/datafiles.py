"""Your own training data: local JSONL files (gzip too) of plain text, prompt/completion pairs or chats.

Each line is one JSON object; its fields say its format, and every line of a file has the same one:

    {"text": "..."}                                   every token a target
    {"prompt": "...", "completion": "..."}            targets: the completion (and EOS) only
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
                                                      the tokenizer's chat template; targets: the
                                                      assistant turns (each with its end-of-turn)

An optional `"id"` names the example; the held-out split is a hash of (file name, id or line
number), as the benchmark tasks are split (`lsjax.data`). `encode_example` turns an example into
tokens and a target flag per token, the one encoding that training and `lsjax eval --files` share.
"""

from __future__ import annotations

import dataclasses
import enum
import gzip
import json
from pathlib import Path
from typing import Sequence

from lsjax.data import DEFAULT_HELDOUT_FRACTION, SPLITS, heldout_score
from lsjax.errors import ConfigError
from lsjax.tokenizer import Encoder, encode_pair, prefix_token_id


class Format(enum.Enum):
    TEXT = "text"
    PROMPT_COMPLETION = "prompt/completion"
    MESSAGES = "messages"


FIELDS = {Format.TEXT: {"text"}, Format.PROMPT_COMPLETION: {"prompt", "completion"}, Format.MESSAGES: {"messages"}}
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Example:
    """One line of a data file: `text` (TEXT), `prompt` + `completion`, or `messages` ((role, content), ...)."""

    id: str
    format: Format
    text: str = ""
    prompt: str = ""
    completion: str = ""
    messages: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Tokens and, per token, whether it is a target (predicted from the tokens before it)."""

    tokens: tuple[int, ...]
    targets: tuple[bool, ...]

    @property
    def spans(self) -> list[tuple[int, int]]:
        """[start, end) of each run of targets (a completion, an assistant turn)."""
        out, start = [], None
        for i, t in enumerate((*self.targets, False)):
            if t and start is None:
                start = i
            elif not t and start is not None:
                out.append((start, i))
                start = None
        return out

    @property
    def last_span_start(self) -> int:
        """Where the last run of targets starts: the part a truncation must keep whole."""
        spans = self.spans
        return spans[-1][0] if spans else 0


def _format_of(record: dict, where: str) -> Format:
    keys = set(record) - {"id"}
    for fmt, fields in FIELDS.items():
        if keys == fields:
            return fmt
    known = " or ".join("{" + ", ".join(f'"{f}"' for f in sorted(v)) + "}" for v in FIELDS.values())
    extra = sorted(keys - set().union(*FIELDS.values()))
    detail = f"unknown field{'s' if len(extra) > 1 else ''} {extra}" if extra else f"fields {sorted(keys)}"
    raise ConfigError(f"{where}: {detail}; expected one of {known} (and optionally \"id\")")


def _string(record: dict, field: str, where: str, allow_empty: bool = True) -> str:
    value = record[field]
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {field!r} is {type(value).__name__}; expected a string")
    if not allow_empty and not value.strip():
        raise ConfigError(f"{where}: {field!r} is empty; expected some text to learn")
    return value


def _messages(record: dict, where: str) -> tuple[tuple[str, str], ...]:
    value = record["messages"]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise ConfigError(f"{where}: messages[{i}] must be an object with exactly 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ConfigError(f"{where}: messages[{i}].role is {m['role']!r}; expected one of {list(ROLES)}")
        if not isinstance(m["content"], str):
            raise ConfigError(f"{where}: messages[{i}].content must be a string")
        out.append((m["role"], m["content"]))
    if not any(role == "assistant" for role, _ in out):
        raise ConfigError(f"{where}: the conversation has no assistant turn: nothing to learn from it")
    if any(role == "assistant" and not content.strip() for role, content in out):
        raise ConfigError(f"{where}: an assistant turn is empty; expected some text to learn")
    return tuple(out)


def _open(path: Path):
    with path.open("rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8") if gzipped else path.open(encoding="utf-8")


def read_examples(path: str | Path, split: str = "all",
                  heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> tuple[Format, list[Example]]:
    """Every example of a JSONL file (plain or gzip) in `split`, and the file's format.

    The whole file is checked, whatever the split: a bad line anywhere is an error naming file and line.
    """
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} is not supported; expected one of {SPLITS}")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: data file not found (expected JSONL: one object per line with \"text\", "
                          "\"prompt\" and \"completion\", or \"messages\")")
    fmt, first_line, examples = None, 0, []
    try:
        with _open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(record, dict):
                    raise ConfigError(f"{where}: a JSON {type(record).__name__}; expected an object per line")
                line_format = _format_of(record, where)
                if fmt is None:
                    fmt, first_line = line_format, number
                elif line_format is not fmt:
                    raise ConfigError(f"{where}: a {line_format.value} example in a file of {fmt.value} examples "
                                      f"(line {first_line}); one format per file")
                doc_id = str(record.get("id", number))
                if fmt is Format.TEXT:
                    example = Example(doc_id, fmt, text=_string(record, "text", where, allow_empty=False))
                elif fmt is Format.PROMPT_COMPLETION:
                    example = Example(doc_id, fmt, prompt=_string(record, "prompt", where),
                                      completion=_string(record, "completion", where, allow_empty=False))
                else:
                    example = Example(doc_id, fmt, messages=_messages(record, where))
                if split == "all" or (heldout_score(path.name, doc_id) < heldout_fraction) == (split == "heldout"):
                    examples.append(example)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise ConfigError(f"{path}: cannot be read as UTF-8 JSONL (plain or gzip): {e}") from None
    if fmt is None:
        raise ConfigError(f"{path}: no examples (the file is empty)")
    if not examples:
        raise ConfigError(f"{path}: empty {split!r} split (heldout_fraction={heldout_fraction})")
    return fmt, examples


# -- tokens and targets -----------------------------------------------------------------------
def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token to end training targets with")
    return int(tokenizer.eos_token_id)


def _render(tokenizer, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                         add_generation_prompt=generation_prompt)


def chat_spans(tokenizer, messages: Sequence[tuple[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation as consecutive (text, is_target) pieces: each assistant turn as the
    template renders it after its generation prompt (end-of-turn included) is a target.

    Needs a template in which a conversation's rendering starts with that of every earlier part (true of
    ChatML and the common templates); one that is not is refused, naming the turn.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("'messages' data needs the tokenizer's chat template, and this tokenizer has none; "
                          "write the examples as \"prompt\"/\"completion\" instead")
    pieces, done = [], ""
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        before, through = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[:i + 1], False)
        if not before.startswith(done) or not through.startswith(before):
            raise ConfigError(f"the chat template does not render turn {i} as a continuation of the turns before "
                              "it, so its tokens cannot be told apart; use \"prompt\"/\"completion\" data")
        pieces += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    whole = _render(tokenizer, messages, False)
    if not whole.startswith(done):
        raise ConfigError("the chat template renders the whole conversation differently from its parts; use "
                          "\"prompt\"/\"completion\" data")
    pieces.append((whole[len(done):], False))
    return [(text, target) for text, target in pieces if text]


def encode_example(tokenizer, example: Example, encode=None) -> Encoded:
    """Tokens and target flags of one example (no truncation: see `lsjax.train.batches`).

    text: BOS (if any), the text, EOS, every token but the first a target. prompt/completion: as a
    multiple-choice answer is scored (`encode_pair`: trailing prompt whitespace joins the completion;
    an empty prompt is one prefix token), then EOS; the completion and EOS are targets. messages: the
    chat template's text, each piece tokenized on its own (`chat_spans`).
    """
    encode = encode or Encoder(tokenizer)
    if example.format is Format.TEXT:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        tokens = [*bos, *encode(example.text), _eos(tokenizer)]
        return Encoded(tuple(tokens), (False,) + (True,) * (len(tokens) - 1))
    if example.format is Format.PROMPT_COMPLETION:
        ctx, cont = encode_pair(encode, example.prompt, example.completion, prefix_token_id(tokenizer))
        answer = (*cont, _eos(tokenizer))
        return Encoded(tuple(ctx) + answer, (False,) * len(ctx) + (True,) * len(answer))
    tokens, targets = [], []
    for text, target in chat_spans(tokenizer, example.messages):
        ids = encode(text)
        tokens += ids
        targets += [target] * len(ids)
    if targets and targets[0]:
        raise ConfigError("the chat template starts with an assistant turn's text: no token comes before the "
                          "first target")
    return Encoded(tuple(tokens), tuple(targets))


def encode_examples(tokenizer, examples: Sequence[Example]) -> list[Encoded]:
    encode = Encoder(tokenizer)
    return [encode_example(tokenizer, e, encode) for e in examples]
