"""Your own data: JSONL formats, answer-only targets, packing with segments, `lsjax eval --files`.

The tiny test tokenizer has one token per character and no merges, so every expected token list
below is written out by hand from the characters.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsjax.errors import ConfigError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny import make_hf_model

    import lsjax
    from lsjax.convert import convert_hf

    folder = tmp_path_factory.mktemp("tiny_datafiles")
    make_hf_model(folder / "hf")
    ckpt = convert_hf(folder / "hf", folder / "ckpt", progress=False)
    model, tok = lsjax.load(ckpt, dtype="float32")
    return ckpt, model, tok


def chars(tok, text: str) -> list[int]:
    """The tiny tokenizer's ids of `text`, one per character (byte-level names for space and newline)."""
    vocab = tok.get_vocab()
    return [vocab[{" ": "\u0120", "\n": "\u010a"}.get(c, c)] for c in text]


def write_jsonl(path: Path, records, gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def qa_records(n: int, max_chars: int | None = None):
    """Questions of the shipped arc_easy data with their gold answers, as prompt/completion pairs
    (the first `n`, of at most `max_chars` characters in all)."""
    from lsjax.data import load_task

    records = [{"id": d.id, "prompt": d.contexts[d.gold].rstrip(),
                "completion": " The answer is" + d.continuations[d.gold] + "."} for d in load_task("arc_easy", "all")]
    fits = [r for r in records if max_chars is None or len(r["prompt"]) + len(r["completion"]) <= max_chars]
    return fits[:n]


# -- 1. formats and targets -------------------------------------------------------------------
def test_targets_are_exactly_the_completion_and_the_assistant_turns(tiny, tmp_path):
    from lsjax.datafiles import Format, encode_example, read_examples

    _, _, tok = tiny
    bos, eos = tok.bos_token_id, tok.eos_token_id
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: 2+2?", "completion": " 4"}])
    fmt, (ex,) = read_examples(pc)
    assert fmt is Format.PROMPT_COMPLETION
    enc = encode_example(tok, ex)
    assert list(enc.tokens) == chars(tok, "Q: 2+2?") + chars(tok, " 4") + [eos]
    assert list(enc.targets) == [False] * 7 + [True] * 3

    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "ok"}]}])
    fmt, (ex,) = read_examples(chat)
    assert fmt is Format.MESSAGES
    enc = encode_example(tok, ex)
    # the tiny template: <s>role: content</s> per turn; the generation prompt is "<s>assistant:"
    want = [(bos, 0), *[(t, 0) for t in chars(tok, "system: be brief")], (eos, 0),
            (bos, 0), *[(t, 0) for t in chars(tok, "user: hi")], (eos, 0),
            (bos, 0), *[(t, 0) for t in chars(tok, "assistant:")], *[(t, 1) for t in chars(tok, " yo")], (eos, 1),
            (bos, 0), *[(t, 0) for t in chars(tok, "user: and?")], (eos, 0),
            (bos, 0), *[(t, 0) for t in chars(tok, "assistant:")], *[(t, 1) for t in chars(tok, " ok")], (eos, 1)]
    assert list(zip(enc.tokens, map(int, enc.targets))) == want

    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "abc", "id": "x"}])
    fmt, (ex,) = read_examples(text)
    enc = encode_example(tok, ex)
    assert fmt is Format.TEXT and ex.id == "x"
    assert list(enc.tokens) == [bos, *chars(tok, "abc"), eos] and list(enc.targets) == [False] + [True] * 4


def test_gzip_files_and_the_heldout_split(tmp_path):
    from lsjax.data import heldout_score
    from lsjax.datafiles import read_examples

    records = qa_records(60)
    path = write_jsonl(tmp_path / "qa.jsonl.gz", records, gz=True)
    (_, train), (_, held), (_, every) = (read_examples(path, s) for s in ("train", "heldout", "all"))
    assert [e.prompt for e in every] == [r["prompt"] for r in records]
    assert {e.id for e in held} == {r["id"] for r in records if heldout_score(path.name, r["id"]) < 0.3}
    assert not {e.id for e in train} & {e.id for e in held} and len(train) + len(held) == 60


# -- 2. rows: truncation and packing -------------------------------------------------------------
def test_long_examples_lose_the_prompt_start_never_the_answer(tiny):
    from lsjax.datafiles import Encoded
    from lsjax.train.batches import fit

    e = Encoded(tuple(range(10)), (False,) * 6 + (True,) * 4)
    assert fit(e, 10) == e
    assert fit(e, 6) == Encoded(tuple(range(4, 10)), (False,) * 2 + (True,) * 4)
    assert fit(e, 5) == Encoded(tuple(range(5, 10)), (False,) + (True,) * 4)
    assert fit(e, 4) is None  # the answer alone, with no token before it: dropped
    chat = Encoded(tuple(range(8)), (False, True, True, False, False, True, True, False))
    assert fit(chat, 4) == Encoded((4, 5, 6, 7), (False, True, True, False))  # the last turn is kept whole


def test_packing_fills_rows_and_keeps_every_example_whole(tiny):
    from lsjax.datafiles import Example, Format
    from lsjax.train.batches import SEGMENTS, TARGETS, TOKENS, build_rows

    _, _, tok = tiny
    rng = np.random.default_rng(0)
    examples = [Example(str(i), Format.PROMPT_COMPLETION, prompt="q" * int(rng.integers(1, 12)),
                        completion=" " + "a" * int(rng.integers(1, 8))) for i in range(50)]
    packed, alone = (build_rows(tok, examples, 47, packing=p) for p in (True, False))
    tokens = int((alone.rows[:, SEGMENTS] > 0).sum())
    assert len(alone.rows) == 50 and len(packed.rows) <= -(-tokens // 48) + 1  # within a row of no padding at all
    assert packed.padding < alone.padding / 2
    pieces = []
    for row in packed.rows:
        segs = row[SEGMENTS]
        used = segs > 0
        assert not used[np.argmin(used):].any() if not used.all() else True  # padding only at the end
        ids = list(dict.fromkeys(segs[used]))
        assert ids == list(range(1, len(ids) + 1))
        for s in ids:
            pieces.append((tuple(row[TOKENS][segs == s]), tuple(row[TARGETS][segs == s])))
    expected = [(tuple(r[TOKENS][r[SEGMENTS] > 0]), tuple(r[TARGETS][r[SEGMENTS] > 0])) for r in alone.rows]
    assert sorted(pieces) == sorted(expected)


def test_segment_positions_restart_with_each_example():
    from lsjax.model import segment_positions

    segs = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert segment_positions(segs).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


@pytest.mark.parametrize("method", ["base", "switch"])
def test_a_packed_row_gives_each_example_the_loss_it_has_alone(tiny, method):
    """Per-token cross-entropy of every example packed three to a row equals that of the example in a
    row of its own (the plain padding-mask forward), fp32, base and a switch adapter with trained-like B."""
    from lsjax.adapters import AdapterConfig, adapted_forward, init_params
    from lsjax.datafiles import Example, Format
    from lsjax.model import forward
    from lsjax.train.batches import build_rows, make_batch

    _, model, tok = tiny
    examples = [Example(str(i), Format.PROMPT_COMPLETION, prompt=p, completion=c) for i, (p, c) in
                enumerate([("Which is a fruit?", " an apple"), ("2+2=", " 4"), ("Name a colour:", " blue"),
                           ("Why?", " because it rains a lot"), ("Q", " yes")])]
    base = model.params()
    if method == "base":
        def logits(batch, packed):
            kw = {"segment_ids": batch["segments"]} if packed else {"attention_mask": batch["mask"]}
            return forward(model.config, base, batch["ids"], **kw)
    else:
        cfg = AdapterConfig(method="switch", num_experts=4, top_k=2, rank=4, targets="all-linear")
        params = init_params(model.config, cfg, jax.random.key(0))
        params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params)

        def logits(batch, packed):
            kw = {"segment_ids": batch["segments"]} if packed else {"attention_mask": batch["mask"]}
            return adapted_forward(model.config, base, cfg, params, batch["ids"], **kw)[0]

    def losses_by_example(rows, packed):
        """{an example's tokens: its per-target-token cross-entropies} over every row."""
        batch = make_batch(rows)
        logp = jax.nn.log_softmax(logits(batch, packed), axis=-1)
        ce = -np.take_along_axis(np.asarray(logp), batch["targets"][..., None], axis=-1)[..., 0]
        out = {}
        for r, row in enumerate(rows):
            for seg in set(row[2][row[2] > 0].tolist()):
                key = tuple(row[0][row[2] == seg].tolist())
                scored = (batch["segments"][r] == seg) & (batch["weights"][r] > 0)
                out[key] = ce[r][scored]
        return out

    packed_rows = build_rows(tok, examples, 40, packing=True).rows
    alone_rows = build_rows(tok, examples, 40, packing=False).rows
    assert len(packed_rows) < len(examples) and (packed_rows[:, 2].max(axis=1) >= 2).any()
    packed, alone = losses_by_example(packed_rows, True), losses_by_example(alone_rows, False)
    assert packed.keys() == alone.keys() and len(alone) == len(examples)
    for key, want in alone.items():
        assert len(want) > 0
        np.testing.assert_allclose(packed[key], want, rtol=1e-5, atol=1e-5)


def test_a_packed_example_gets_the_rotary_positions_it_has_alone(tiny):
    """RoPE is relative, so losses cannot show it: each packed example starts again at position 0."""
    from lsjax.model import sequence_inputs

    _, model, _ = tiny
    segs = np.asarray([[1, 1, 1, 2, 2, 2, 2, 0]])
    _, mask, cos, sin, _ = sequence_inputs(model.config, np.zeros_like(segs), segment_ids=segs)
    _, _, cos1, sin1, _ = sequence_inputs(model.config, np.zeros((1, 4), np.int32))  # one example alone
    assert mask.tolist() == [[True] * 7 + [False]]
    np.testing.assert_array_equal(cos[0, 3:7], cos1[0])
    np.testing.assert_array_equal(sin[0, :3], sin1[0, :3])


# -- 3. bad input -------------------------------------------------------------------------------
GOOD = {"prompt": "Q: why?", "completion": " because"}
BAD_FILES = [
    ("not_json", [json.dumps(GOOD), '{"prompt": "a", '], r"not_json\.jsonl:2: not valid JSON"),
    ("unknown_field", [json.dumps({**GOOD, "source": "web"})], r"unknown_field\.jsonl:1: unknown field \['source'\]"),
    ("no_assistant", [json.dumps({"messages": [{"role": "user", "content": "hi"}]})],
     r"no_assistant\.jsonl:1: the conversation has no assistant turn"),
    ("empty_completion", [json.dumps(GOOD), json.dumps({"prompt": "Q", "completion": " "})],
     r"empty_completion\.jsonl:2: 'completion' is empty"),
    ("mixed", [json.dumps(GOOD), json.dumps({"text": "plain"})],
     r"mixed\.jsonl:2: a text example in a file of prompt/completion examples \(line 1\)"),
    ("bad_role", [json.dumps({"messages": [{"role": "robot", "content": "hi"}]})],
     r"bad_role\.jsonl:1: messages\[0\]\.role is 'robot'"),
    ("not_string", [json.dumps({"prompt": "Q", "completion": 4})], r"not_string\.jsonl:1: 'completion' is int"),
    ("empty", [], r"empty\.jsonl: no examples"),
    ("too_long", [json.dumps({"prompt": "Q", "completion": " " + "a" * 80, "id": str(i)}) for i in range(40)],
     r"too_long\.jsonl: none of its \d+ train examples fits data.max_length=32"),
]


@pytest.mark.parametrize("name,lines,message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_data_files_are_refused_naming_file_and_line_and_nothing_is_written(tiny, tmp_path, name, lines,
                                                                               message):
    from lsjax.train.config import load_config
    from lsjax.train.loop import train

    ckpt, _, _ = tiny
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(ConfigError, match=message):
        train(load_config(None, [f"model={ckpt}", "data.tasks=[]", f"data.files=[{path}]", "data.max_length=32",
                                 "batch_size=2", "progress=false", f"run_dir={tmp_path}/run"]))
    assert not (tmp_path / "run").exists()


def test_eval_files_refuses_a_bad_file_before_loading_and_writes_nothing(tiny, tmp_path, capsys):
    from lsjax.cli import main

    ckpt, _, _ = tiny
    bad = tmp_path / "bad.jsonl"
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad.write_text(json.dumps(chat) + "\n" + json.dumps({"messages": []}) + "\n")
    out = tmp_path / "out.json"
    assert main(["eval", "--ckpt", str(ckpt), "--files", str(bad), "--json", str(out)]) != 0
    err = capsys.readouterr().err
    assert "bad.jsonl:2: 'messages' must be a non-empty list" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["eval", "--ckpt", str(ckpt), "--files", str(tmp_path / "nope.jsonl")]) != 0
    assert "nope.jsonl: data file not found" in capsys.readouterr().err


# -- 4. training on an instruction file, and `lsjax eval --files` --------------------------------
def completion_loss(model, tok, records, adapter_dir=None) -> float:
    """Mean cross-entropy per completion token (EOS included) of prompt/completion records, computed
    here from the tokenizer and a plain forward, one record at a time: no lsjax data code involved."""
    from lsjax.adapters import adapted_forward, open_adapter
    from lsjax.model import forward

    adapter = open_adapter(adapter_dir, model.config) if adapter_dir else None
    pairs = [(tok(r["prompt"], add_special_tokens=False)["input_ids"],
              tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]) for r in records]
    width = max(len(p) + len(a) - 1 for p, a in pairs)
    ids = np.zeros((len(pairs), width), np.int32)  # right-padded: a causal model's real positions are unchanged
    for row, (p, a) in zip(ids, pairs):
        row[:len(p) + len(a) - 1] = p + a[:-1]
    mask = np.arange(width)[None] < np.array([[len(p) + len(a) - 1] for p, a in pairs])
    logits = (forward(model.config, model.params(), ids, mask) if adapter is None else
              adapted_forward(model.config, model.params(), adapter.config, adapter.arrays(), ids, mask)[0])
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
    total = -sum(logp[i, len(p) - 1 + j, t] for i, (p, a) in enumerate(pairs) for j, t in enumerate(a))
    return total / sum(len(a) for _, a in pairs)


def test_training_on_an_instruction_file_lowers_the_heldout_answer_loss(tiny, tmp_path):
    """A switch adapter trained on questions with their gold answers (the answers alone are targets)
    predicts held-out answers better; `lsjax eval --files` and the training log give the same held-out
    figure as a plain per-record computation."""
    from lsjax.cli import main
    from lsjax.datafiles import read_examples
    from lsjax.train.config import load_config
    from lsjax.train.loop import train

    ckpt, model, tok = tiny
    path = write_jsonl(tmp_path / "qa.jsonl", qa_records(240, max_chars=140))
    held = [{"prompt": e.prompt, "completion": e.completion} for e in read_examples(path, "heldout")[1][:16]]
    before = completion_loss(model, tok, held)
    train(load_config(None, [f"model={ckpt}", "data.tasks=[]", f"data.files=[{path}]", "data.max_length=143",
                             "data.eval_docs=16", "batch_size=4", "steps=60", "optim.lr=0.01", "optim.warmup_steps=0",
                             "adapter.method=switch", "adapter.rank=4", "adapter.num_experts=4", "eval_every=60",
                             "progress=false", f"run_dir={tmp_path}/run"]))
    after = completion_loss(model, tok, held, tmp_path / "run" / "adapter")
    # nats per answer token: 0.63 with these settings; trained on the prompts instead (the mask inverted), 0.42
    assert after < before - 0.52, (before, after)

    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [x["eval_loss"] for x in log if "eval_loss" in x]
    assert logged[0] == pytest.approx(before, rel=1e-4) and logged[-1] == pytest.approx(after, rel=1e-4)
    assert main(["eval", "--ckpt", str(ckpt), "--adapter", str(tmp_path / "run" / "adapter"), "--files", str(path),
                 "--limit", "16", "--json", str(tmp_path / "eval.json"), "--no-progress"]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())["files"][str(path)]
    assert result["documents"] == 16 and result["format"] == "prompt/completion"
    assert result["loss"] == pytest.approx(after, rel=1e-4) and np.log(result["ppl"]) == pytest.approx(result["loss"])


def test_target_requests_score_each_target_once_after_at_most_max_length_tokens():
    from lsjax.datafiles import Encoded
    from lsjax.eval.files import target_requests

    e = Encoded(tuple(range(10)), tuple(bool(c) for c in (0, 1, 1, 0, 0, 1, 1, 1, 1, 0)))
    got = [(r.tokens, r.n_score) for r in target_requests(e, 3)]
    assert got == [((0, 1, 2), 2), ((4, 5, 6, 7), 3), ((5, 6, 7, 8), 1)]


def test_eval_files_on_chats_equals_the_training_loss_of_the_same_examples(tiny, tmp_path, capsys):
    """Two paths to one figure: training's packed held-out rows (one forward per row, every assistant
    turn weighted) and `lsjax eval --files` (a request per assistant turn), on multi-turn chats."""
    from lsjax.cli import main
    from lsjax.train.config import load_config
    from lsjax.train.loop import train

    ckpt, _, _ = tiny
    rng = np.random.default_rng(0)
    words = ["sun", "rain", "cold", "tea", "map", "road", "blue", "left"]

    def say(n):
        return " ".join(rng.choice(words, n))

    chats = [{"id": f"c{i}", "messages": [{"role": "system", "content": say(2)}, {"role": "user", "content": say(3)},
                                          {"role": "assistant", "content": say(4)}, {"role": "user", "content": say(2)},
                                          {"role": "assistant", "content": say(3)}]} for i in range(40)]
    path = write_jsonl(tmp_path / "chats.jsonl", chats)
    train(load_config(None, [f"model={ckpt}", "data.tasks=[]", f"data.files=[{path}]", "data.max_length=255",
                             "data.eval_docs=1000", "batch_size=2", "steps=1", "adapter.method=lora",
                             "adapter.num_experts=1", "adapter.rank=4", "progress=false", f"run_dir={tmp_path}/run"]))
    start = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    assert start["step"] == 0
    assert main(["eval", "--ckpt", str(ckpt), "--files", str(path), "--json", str(tmp_path / "e.json"),
                 "--no-progress"]) == 0
    assert "| messages |" in capsys.readouterr().out
    result = json.loads((tmp_path / "e.json").read_text())["files"][str(path)]
    assert result["loss"] == pytest.approx(start["eval_loss"], rel=1e-5)
    assert 5 <= result["documents"] < 40 and result["format"] == "messages"
