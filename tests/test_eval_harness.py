"""Multiple-choice harness and perplexity: every score against transformers on the same weights."""

import argparse
import json
import math

import numpy as np
import pytest
from tiny import hf_logits, make_hf_model

import lsjax
from lsjax.errors import CheckpointError, ConfigError
from lsjax.eval import harness
from lsjax.eval.harness import (add_eval_parser, bucket_length, evaluate, format_table, load_docs, model_logits_fn,
                                parse_tasks, perplexity, score_docs)
from lsjax.data import MCDoc

DOCS = [
    MCDoc("t", "plain", ("Question: what is 2+2?\nAnswer:",) * 3, (" 4", " five", " twenty-two"), 0),
    MCDoc("t", "winogrande", ("The trophy did not fit in the case because the trophy",
                              "The trophy did not fit in the case because the case"), (" was too big.",) * 2, 1),
    MCDoc("t", "trailing-space", ("Fill in: the sky is ",) * 3, ("blue", "green", "very loud indeed"), 2),
    MCDoc("t", "long", ("A much longer context that runs well past one bucket of sixteen tokens, "
                        "and past thirty-two as well, so that batches of several lengths are built: ",) * 2,
          ("yes", "no"), 1),
    MCDoc("t", "empty-context", ("", ""), ("Hello there", "Good bye"), 0),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch reference, lsjax model, tokenizer) on the same random weights."""
    from lsjax.convert import convert_hf

    root = tmp_path_factory.mktemp("eval_tiny")
    torch_model = make_hf_model(root / "hf", seed=3)
    ckpt = convert_hf(root / "hf", root / "ckpt", progress=False)
    model, tokenizer = lsjax.load(ckpt)
    return torch_model, model, tokenizer, ckpt


def log_softmax64(logits):
    x = np.asarray(logits, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def reference_tokens(tokenizer, context, continuation):
    """lm-eval's `_encode_pair`, written out: (context ids, continuation ids)."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    if not stripped:
        return [tokenizer.bos_token_id], tokenizer.encode(continuation, add_special_tokens=False)
    ctx = tokenizer.encode(stripped, add_special_tokens=False)
    whole = tokenizer.encode(stripped + continuation, add_special_tokens=False)
    return ctx, whole[len(ctx):]


def reference_loglik(torch_model, tokenizer, context, continuation, max_length=None):
    """One choice, unpadded, through transformers; log-softmax in float64 numpy."""
    ctx, cont = reference_tokens(tokenizer, context, continuation)
    seq = ctx + cont
    if max_length is not None:
        seq = seq[-(max_length + 1):]
    logp = log_softmax64(hf_logits(torch_model, np.array(seq[:-1])))
    targets = seq[1:]
    return sum(logp[i, targets[i]] for i in range(len(targets) - len(cont), len(targets))), len(cont)


def check_against_reference(torch_model, tokenizer, docs, scores, max_length=None):
    assert [s.id for s in scores] == [d.id for d in docs]
    for doc, s in zip(docs, scores):
        ref = [reference_loglik(torch_model, tokenizer, *doc.choice(i), max_length) for i in range(doc.num_choices)]
        ref_ll = np.array([r[0] for r in ref])
        np.testing.assert_allclose(s.loglik, ref_ll, rtol=0, atol=1e-4, err_msg=doc.id)
        assert s.num_tokens == tuple(r[1] for r in ref)
        assert s.num_chars == tuple(len(c) for c in doc.continuations)
        assert s.pred == int(np.argmax(ref_ll))
        assert s.pred_norm == int(np.argmax(ref_ll / np.array([len(c) for c in doc.continuations])))
        assert s.acc == float(s.pred == doc.gold) and s.acc_norm == float(s.pred_norm == doc.gold)


def test_scores_match_transformers(tiny):
    torch_model, model, tokenizer, _ = tiny
    shapes = []
    base = model_logits_fn(model)

    def logits_fn(ids, positions, visibility, last):
        shapes.append(ids.shape)
        logits = base(ids, positions, visibility, last)
        assert logits.shape == (ids.shape[0], last, model.config.vocab_size) and last <= ids.shape[1]
        return logits

    scores = score_docs(logits_fn, tokenizer, DOCS, batch_size=3, progress=False)
    check_against_reference(torch_model, tokenizer, DOCS, scores)
    # fixed row count, bucketed lengths, longest first
    assert all(b == 3 for b, _ in shapes) and all(n in (16, 32, 64, 128, 256) for _, n in shapes)
    assert [n for _, n in shapes] == sorted((n for _, n in shapes), reverse=True)
    assert len(set(shapes)) <= 4, shapes
    # the trailing space of the context belongs to the continuation: " blue" is 5 one-char tokens
    assert scores[2].num_tokens == (5, 6, 17)
    # padding and batch composition do not change a score
    one = score_docs(base, tokenizer, DOCS, batch_size=1, max_batch_tokens=None, progress=False)
    for a, b in zip(scores, one):
        np.testing.assert_allclose(a.loglik, b.loglik, atol=2e-5)


def test_a_documents_choices_share_one_row_that_runs_their_context_once(tiny):
    torch_model, model, tokenizer, _ = tiny
    base, fed = model_logits_fn(model), []

    def logits_fn(ids, positions, visibility, last):
        fed.append(int(np.asarray(visibility).diagonal(axis1=1, axis2=2).sum()))  # real tokens in the batch
        return base(ids, positions, visibility, last)

    doc = DOCS[0]
    scores = score_docs(logits_fn, tokenizer, [doc], batch_size=4, progress=False)
    check_against_reference(torch_model, tokenizer, [doc], scores)
    pairs = [reference_tokens(tokenizer, *doc.choice(i)) for i in range(doc.num_choices)]
    assert all(ctx == pairs[0][0] for ctx, _ in pairs)
    # the context's inputs once (its last token starts every choice), then each choice's own
    assert fed == [len(pairs[0][0]) - 1 + sum(len(cont) for _, cont in pairs)]


def test_truncation_keeps_the_last_tokens(tiny):
    torch_model, model, tokenizer, _ = tiny
    docs = [DOCS[3], DOCS[0]]
    scores = score_docs(model_logits_fn(model), tokenizer, docs, batch_size=2, max_length=24, progress=False)
    check_against_reference(torch_model, tokenizer, docs, scores, max_length=24)


def test_evaluate_metrics_and_table(tiny):
    torch_model, model, tokenizer, _ = tiny
    results = evaluate(model_logits_fn(model), tokenizer, {"a": DOCS[:2], "b": DOCS[2:]}, batch_size=4,
                       progress=False)

    def reference_acc(docs) -> dict[str, float]:
        """The share of docs whose gold choice has the highest transformers log-likelihood (acc_norm:
        per character)."""
        right = []
        for doc in docs:
            ll = np.array([reference_loglik(torch_model, tokenizer, *doc.choice(i))[0] for i in range(doc.num_choices)])
            per_char = ll / np.array([len(c) for c in doc.continuations])
            right.append((np.argmax(ll) == doc.gold, np.argmax(per_char) == doc.gold))
        acc, acc_norm = np.mean(right, axis=0)
        return {"acc": float(acc), "acc_norm": float(acc_norm)}

    want = {"a": reference_acc(DOCS[:2]), "b": reference_acc(DOCS[2:])}
    assert results["tasks"]["a"]["n"] == 2 and results["tasks"]["b"]["n"] == 3
    for task in want:
        assert {k: results["tasks"][task][k] for k in ("acc", "acc_norm")} == pytest.approx(want[task]), task
    for k in ("acc", "acc_norm"):  # the average weighs tasks alike, not documents
        assert results["average"][k] == pytest.approx((want["a"][k] + want["b"][k]) / 2)
    assert results["average"]["n"] == 5
    for task, docs in (("a", DOCS[:2]), ("b", DOCS[2:])):  # per-document scores behind each accuracy
        columns = results["tasks"][task]["docs"]
        assert columns["id"] == [d.id for d in docs]
        assert {k: np.mean(columns[k]) for k in ("acc", "acc_norm")} == pytest.approx(want[task]), task
    table = format_table(results, "heldout")
    assert table.splitlines()[0] == "| task | acc | acc_norm | n |" and "| **average** |" in table
    assert "hash" in table
    table = format_table(harness.add_intervals(results, replicates=200, seed=1), "heldout")
    assert table.splitlines()[0] == "| task | acc [95% interval] | acc_norm [95% interval] | n |"
    assert "(200 resamples, seed 1)" in table


def test_perplexity_matches_direct_computation(tiny):
    torch_model, model, tokenizer, _ = tiny
    texts = ["The quick brown fox jumps over the lazy dog.", "Short one.",
             "A third text, long enough that a small max_length splits it into several windows."]
    fn = model_logits_fn(model)
    seqs = [[tokenizer.bos_token_id] + tokenizer.encode(t, add_special_tokens=False) for t in texts]

    # one window per text: plain next-token log-likelihood of the whole sequence
    total, count = 0.0, 0
    for seq in seqs:
        logp = log_softmax64(hf_logits(torch_model, np.array(seq[:-1])))
        total += sum(logp[i, seq[i + 1]] for i in range(len(seq) - 1))
        count += len(seq) - 1
    stats = perplexity(fn, tokenizer, texts, max_length=128, batch_size=2, return_stats=True)
    assert stats["tokens"] == count
    assert stats["ppl"] == pytest.approx(math.exp(-total / count), rel=1e-5)
    assert perplexity(fn, tokenizer, texts, max_length=128) == pytest.approx(stats["ppl"], rel=1e-6)

    # windows of 16: every token still scored once, each window sees only its own inputs
    total16 = 0.0
    for seq in seqs:
        for start in range(0, len(seq) - 1, 16):
            window = seq[start:start + 17]
            logp = log_softmax64(hf_logits(torch_model, np.array(window[:-1])))
            total16 += sum(logp[i, window[i + 1]] for i in range(len(window) - 1))
    stats16 = perplexity(fn, tokenizer, texts, max_length=16, batch_size=4, return_stats=True)
    assert stats16["tokens"] == count
    assert stats16["nll"] == pytest.approx(-total16, rel=1e-5)
    assert stats16["ppl"] > stats["ppl"] * 0.5  # sanity: same order of magnitude


def test_buckets():
    assert [bucket_length(n, 2048) for n in (1, 16, 17, 100, 256, 257, 570, 1500)] == [16, 16, 32, 128, 256, 512,
                                                                                          768, 1536]
    assert bucket_length(70, 80) == 80 and bucket_length(2000, 2048) == 2048


def parse(argv):
    parser = argparse.ArgumentParser(prog="lsjax")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval", *argv])


def test_bad_input(tiny, tmp_path, monkeypatch):
    _, model, tokenizer, ckpt = tiny
    with pytest.raises(ConfigError, match=r"unknown task 'mmlu_pro'; expected one of"):
        parse_tasks("arc_easy,mmlu_pro")
    with pytest.raises(ConfigError, match=r"no tasks given"):
        parse_tasks(" , ")
    with pytest.raises(ConfigError, match=r"limit=0 is invalid"):
        load_docs("arc_easy", "heldout", 0)
    with pytest.raises(ConfigError, match=r"task 'x' has no documents to evaluate \(empty split\)"):
        evaluate(model_logits_fn(model), tokenizer, {"x": []})
    args = parse(["--ckpt", str(ckpt), "--tasks", "nope"])
    with pytest.raises(ConfigError, match=r"unknown task 'nope'"):
        args.run(args)
    args = parse(["--ckpt", str(ckpt), "--tasks", "sciq", "--limit", "0"])
    with pytest.raises(ConfigError, match=r"limit=0 is invalid; expected a positive integer"):
        args.run(args)
    args = parse(["--ckpt", str(tmp_path / "missing"), "--tasks", "sciq"])
    with pytest.raises(CheckpointError, match=r"missing: checkpoint not found"):
        args.run(args)
    monkeypatch.setattr("lsjax.eval.harness.load_task", lambda task, split: [])
    args = parse(["--ckpt", str(ckpt), "--tasks", "sciq"])
    with pytest.raises(ConfigError, match=r"task 'sciq' has an empty 'heldout' split"):
        args.run(args)
    with pytest.raises(SystemExit):  # argparse refuses an unknown split itself
        parse(["--ckpt", str(ckpt), "--split", "test"])


def test_adapter_hook(tiny, tmp_path, monkeypatch, capsys):
    _, model, tokenizer, ckpt = tiny
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    seen = []

    def adapter_logits(path, base):
        seen.append(path)
        return model_logits_fn(base)

    args = parse(["--ckpt", str(ckpt), "--adapter", str(adapter_dir), "--tasks", "arc_easy", "--limit", "2",
                  "--no-progress", "--json", str(tmp_path / "r.json")])
    results = harness.run_eval(args, adapter_logits=adapter_logits)
    assert seen == [str(adapter_dir)] and results["config"]["adapter"] == str(adapter_dir)
    assert results["tasks"]["arc_easy"]["n"] == 2
    assert "| arc_easy |" in capsys.readouterr().out



def test_default_adapter_loader(tiny, tmp_path):
    """`--adapter` loads the saved adapter: its logits are the adapted forward's, not the base's."""
    import jax
    from flax import nnx

    from lsjax.adapters import Adapter, AdapterConfig, adapted_forward, save_adapter

    _, model, _, _ = tiny
    cfg = AdapterConfig(method="switch", num_experts=4, top_k=2, rank=4, targets="all-linear")
    arrays = jax.tree.map(lambda x: x + 0.1, Adapter(model.config, cfg, rngs=nnx.Rngs(0)).arrays())
    save_adapter(tmp_path / "adapter", Adapter.from_arrays(model.config, cfg, arrays))
    logits_fn = harness.adapter_logits_fn(tmp_path / "adapter", model)
    ids = np.array([[5, 6, 7, 8], [0, 9, 10, 11]], np.int32)
    mask = np.array([[1, 1, 1, 1], [0, 1, 1, 1]], np.int32)
    positions = np.array([[0, 1, 2, 3], [0, 0, 1, 2]], np.int32)
    visibility = np.tri(4, dtype=bool)[None] & mask[:, None, :].astype(bool)  # causal, padding unseen
    want = np.asarray(adapted_forward(model.config, model.params(), cfg, arrays, ids, mask)[0])
    got = np.asarray(logits_fn(ids, positions, visibility, 4))
    assert np.abs(got[0] - want[0]).max() <= 1e-5 and np.abs(got[1, 1:] - want[1, 1:]).max() <= 1e-5  # real tokens
    assert np.abs(got - np.asarray(model(ids, mask))).max() > 1e-3
    np.testing.assert_allclose(np.asarray(logits_fn(ids, positions, visibility, 2)), want[:, -2:], atol=1e-5)


def test_encode_pair_on_the_real_tokenizer(smollm2_ckpt):
    from lsjax.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_ckpt / "tokenizer")
    encode = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    ctx, cont = harness.encode_pair(encode, "The sky is ", "blue", harness.prefix_token_id(tok))
    assert tok.decode(ctx) == "The sky is" and tok.decode(cont) == " blue"
    ctx, cont = harness.encode_pair(encode, "Question: Which is a metal?\nAnswer:", " iron", -1)
    assert tok.decode(cont) == " iron" and ctx == tuple(encode("Question: Which is a metal?\nAnswer:"))


def test_cli_on_smollm2(smollm2_ckpt, tmp_path, capsys):
    out = tmp_path / "results.json"
    args = parse(["--ckpt", str(smollm2_ckpt), "--tasks", "arc_easy", "--split", "heldout", "--limit", "8",
                  "--no-progress", "--json", str(out)])
    args.run(args)
    data = json.loads(out.read_text())
    r = data["tasks"]["arc_easy"]
    assert r["n"] == 8 and 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1
    assert data["average"]["acc"] == r["acc"] and data["average"]["n"] == 8
    assert data["config"]["ckpt"] == str(smollm2_ckpt) and data["config"]["split"] == "heldout"
    assert data["config"]["limit"] == 8 and data["config"]["dtype"] == "float32"
    # per-document scores, in document order, that the accuracies are the means of
    docs = r["docs"]
    assert docs["id"] == [d.id for d in load_docs("arc_easy", "heldout", 8)["arc_easy"]]
    cells = []
    for m in ("acc", "acc_norm"):
        assert len(docs[m]) == 8 and set(docs[m]) <= {0, 1} and np.mean(docs[m]) == pytest.approx(r[m])
        lo, hi = r[f"{m}_ci"]
        assert 0 <= lo <= r[m] <= hi <= 1 and (lo, hi) != (0, 1)
        assert data["average"][f"{m}_ci"] == [lo, hi]  # one task: the average is that task
        cells.append(f"{100 * r[m]:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]")
    assert data["bootstrap"] == {"replicates": 2000, "seed": 0, "level": 0.95}
    printed = capsys.readouterr().out
    assert "| task | acc [95% interval] | acc_norm [95% interval] | n |" in printed
    assert f"| arc_easy | {cells[0]} | {cells[1]} | 8 |" in printed
    assert "percentile bootstrap over documents (2000 resamples, seed 0)" in printed

    # the run against itself: no difference, and no spread
    args = parse(["--compare", str(out), str(out)])
    comparison = args.run(args)
    assert comparison["average"] == {"n": 8, "acc": 0.0, "acc_ci": [0.0, 0.0], "acc_norm": 0.0,
                                     "acc_norm_ci": [0.0, 0.0]}
