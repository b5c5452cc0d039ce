"""`lsjax.reproduce` (make reproduce / make demo) end to end on a tiny random model.

The pipeline's numbers must be the numbers of its parts: held-out accuracy equal to a direct
per-choice log-likelihood of the exported adapter, ratios equal to the timed records, averages
equal to the task means; a rerun resumes (nothing retrained, only a missing task re-evaluated).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsjax.autotune import candidates
from lsjax.errors import ConfigError

TASKS = ("arc_easy", "openbookqa")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from tiny import make_hf_model

    from lsjax.convert import convert_hf

    folder = tmp_path_factory.mktemp("tiny_reproduce")
    make_hf_model(folder / "hf")
    return convert_hf(folder / "hf", folder / "ckpt", progress=False)


def _plan(run_dir: Path, **changes):
    from lsjax.reproduce import Plan

    fields = dict(run_dir=str(run_dir), methods=("lora", "switch"), tasks=TASKS, steps=2, batch_size=2, max_length=32,
                  eval_limit=3, loss_docs=4, seeds=(0, 1), latency_methods=("base", "lora/merged", "switch/unmerged"),
                  latency_rounds=1, new_tokens=2, memory=True, sample_prompt="Hi",
                  results_md=str(run_dir.parent / "docs" / "results.md"))
    fields.update(changes)
    return Plan(**fields)


def _direct_accuracy(ckpt: Path, adapter_dir: Path, task: str, limit: int) -> float:
    """acc from summed per-token log-probs of each choice, through `adapted_forward` one choice at a time."""
    import lsjax
    from lsjax.adapters import adapted_forward, open_adapter
    from lsjax.eval.harness import encode_pair, load_docs, prefix_token_id

    model, tok = lsjax.load(ckpt, dtype="float32")
    adapter = open_adapter(adapter_dir, model.config)
    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    # a few compiled forwards: each choice right-padded to a multiple of 64 tokens, which leaves a
    # causal model's logits at the real positions as they are
    forward = jax.jit(lambda ids: adapted_forward(model.config, model.params(), adapter.config, adapter.arrays(),
                                                  ids)[0])
    correct = []
    for doc in load_docs([task], "heldout", limit)[task]:
        scores = []
        for i in range(doc.num_choices):
            ctx, cont = encode_pair(encode, *doc.choice(i), prefix_token_id(tok))
            ids = list(ctx) + list(cont)[:-1]
            logits = forward(jnp.asarray([ids + [0] * (-len(ids) % 64)], jnp.int32))
            logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
            scores.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
        correct.append(int(np.argmax(scores)) == doc.gold)
    return float(np.mean(correct))


def test_pipeline_numbers_and_resume(tiny_ckpt, tmp_path, monkeypatch):
    from lsjax import reproduce as rp

    run_dir = tmp_path / "run"
    results = rp.reproduce(_plan(run_dir), tmp_path / "cache", "test command", ckpt=tiny_ckpt)
    m = results["methods"]
    assert set(m) == {"base", "lora", "switch"}
    for name, row in m.items():
        assert all(row["tasks"][t]["n"] == 3 for t in TASKS)
        # the timed process's adapter bytes: every trained fp32 parameter (none for the base)
        assert row["peak_memory_mib"] > 0
        assert row.get("adapter_mib", 0) == pytest.approx(4 * row.get("adapter_params", 0) / 2**20, abs=0.006), name
    # each seed trained its own adapter; a method's accuracy is the mean of its seeds' direct accuracies
    adapters = {k: run_dir / "train" / "switch" / f"seed{k}" / "adapter" for k in (0, 1)}
    from safetensors.numpy import load_file

    w0, w1 = (load_file(adapters[k] / "adapter_model.safetensors") for k in (0, 1))
    assert w0.keys() == w1.keys() and any(not np.array_equal(w0[k], w1[k]) for k in w0)
    direct = {k: {t: _direct_accuracy(tiny_ckpt, adapters[k], t, 3) for t in TASKS} for k in (0, 1)}
    assert {t: m["switch"]["tasks"][t]["acc"] for t in TASKS} == pytest.approx(
        {t: (direct[0][t] + direct[1][t]) / 2 for t in TASKS})
    assert m["switch"]["seeds"] == pytest.approx({str(k): np.mean(list(direct[k].values())) for k in (0, 1)})
    assert m["switch"]["average"] == pytest.approx(np.mean(list(m["switch"]["seeds"].values())))
    for row in m.values():  # 95% intervals over documents around every accuracy
        lo, hi = row["average_ci"]
        assert lo <= row["average"] <= hi
        assert all(r["acc_ci"][0] <= r["acc"] <= r["acc_ci"][1] for r in row["tasks"].values())
    records = results["latency"]["records"]
    base = min(r["ms_per_token"] for r in records if r["method"] == "base")  # ratios are to the fastest base
    sw = next(r for r in records if r["method"] == "switch")
    assert {(r["method"], r["strategy"]) for r in records} == {("base", "-"), ("lora", "merged"),
                                                               ("switch", "unmerged")}
    # the base on auto's backend and, for reference, on every other backend that can run here
    assert {r["backend"] for r in records if r["method"] == "base"} == {c.backend for c in candidates(None, 1)}
    assert m["switch"]["decode_ratio_to_base"] == pytest.approx(sw["ms_per_token"] / base)
    assert set(m["switch"]["train"]) == {"0", "1"}
    import yaml

    trained = yaml.safe_load((run_dir / "train" / "switch" / "seed1" / "config.yaml").read_text())
    assert trained["data"]["eval_docs"] == 4  # the plan's held-out loss documents per task
    assert m["switch"]["train"]["1"]["steps"] == 2 and m["switch"]["train"]["1"]["examples"] == 4
    assert m["switch"]["adapter_params"] > 8 * m["lora"]["adapter_params"] * 0.99  # 8 experts + a router
    assert results["targets"][0].startswith(("- met", "- MISSED"))
    assert results["sample"]["prompt"] == "Hi"
    for name in ("summary.md", "results.json", "results_accuracy.png", "results_paired_gains.png",
                 "results_decode_ratio.png", "latency.json"):
        assert (run_dir / name).is_file(), name
    md = (tmp_path / "docs" / "results.md").read_text()
    assert "test command" in md and "| switch (LoRA-Switch) |" in md and "figures/results_accuracy.png" in md
    assert json.loads((tmp_path / "docs" / "results.json").read_text())["methods"].keys() == m.keys()

    # resume: nothing is retrained or re-timed; only the missing task file is evaluated again
    (run_dir / "eval" / "switch" / "seed1" / "openbookqa.json").unlink()
    calls = []
    original = rp.evaluate
    monkeypatch.setattr(rp, "evaluate", lambda fn, tok, docs, **kw: calls.append(list(docs)) or original(
        fn, tok, docs, **kw))
    original_train = rp.train
    monkeypatch.setattr(rp, "train", lambda *a, **k: pytest.fail("retrained a finished method"))
    monkeypatch.setattr(rp, "time_decode", lambda *a, **k: pytest.fail("re-timed"))
    again = rp.reproduce(_plan(run_dir), tmp_path / "cache", "test command", ckpt=tiny_ckpt)
    assert calls == [["openbookqa"]]
    assert again["methods"]["switch"]["tasks"] == m["switch"]["tasks"]

    # a training stage stopped after its first checkpoint resumes there; its tokens/s counts only the
    # steps this call ran, over this call's time
    import shutil

    (run_dir / "train" / "switch" / "seed0.json").unlink()
    shutil.rmtree(run_dir / "train" / "switch" / "seed0" / "checkpoints" / "2")
    monkeypatch.setattr(rp, "train", original_train)
    rp.reproduce(_plan(run_dir), tmp_path / "cache", "test command", ckpt=tiny_ckpt)
    resumed = json.loads((run_dir / "train" / "switch" / "seed0.json").read_text())
    assert resumed["resumed"] and resumed["steps"] == 2 and resumed["steps_timed"] == 1
    # (both stored rounded)
    assert resumed["tokens_per_s"] == pytest.approx(1 * 2 * 32 / resumed["seconds"], rel=1e-3, abs=0.01)
    assert rp.train is original_train

    with pytest.raises(ConfigError, match=r"another plan.*steps"):
        rp.reproduce(_plan(run_dir, steps=3), tmp_path / "cache", "x", ckpt=tiny_ckpt)


def test_plan_is_validated_eagerly(tmp_path):
    for changes, message in [({"methods": ("lora", "moe")}, "methods: unknown method 'moe'"),
                             ({"latency_methods": ("base", "nope/merged")},
                              "latency_methods entry 'nope/merged' is unknown"),
                             ({"latency_methods": ("base", "lora/fused")},
                              "latency_methods entry 'lora/fused' is unknown"),
                             ({"tasks": ("arc_easy", "mmlu_pro")}, "'mmlu_pro' is not a known task"),
                             ({"steps": 0}, "steps=0 is invalid"), ({"loss_docs": 0}, "loss_docs=0 is invalid"),
                             ({"eval_limit": -1}, "eval_limit=-1"),
                             ({"lr": 0.0}, "lr=0.0 is invalid"), ({"seeds": ()}, r"seeds=\(\) is invalid"),
                             ({"seeds": (0, 0)}, "distinct"), ({"seeds": (-1,)}, "non-negative")]:
        with pytest.raises(ConfigError, match=message):
            _plan(tmp_path, **changes)


def test_targets_report_met_and_missed_by_how_much():
    from lsjax.reproduce import targets

    def row(avg, ratio=None):
        out = {"average": avg}
        if ratio is not None:
            out["decode_ratio_to_base"] = ratio
        return out

    results = {"methods": {"base": row(0.40), "lora": row(0.45), "layerwise": row(0.47, 1.3),
                           "blockwise": row(0.44, 1.2), "switch": row(0.455, 1.1)}}
    lines = targets(results)
    assert lines == ["- met: switch +5.5 points over the base on the held-out average (target >= +3)",
                     "- met: switch +0.5 points against lora (target >= 0)",
                     "- MISSED: switch -1.5 points against the best routed baseline, layerwise (target >= -1)",
                     "- met: decode ratio to base: layerwise 1.30x, blockwise 1.20x, switch 1.10x "
                     "(target: switch lowest of the routed methods)"]


def test_targets_are_judged_on_the_paired_interval_of_the_documents_both_scored():
    """Per-document scores kept: the gain and its paired interval over the same documents decide
    met / MISSED / not resolved; a method scored on other documents is judged on its point figure."""
    import numpy as np

    from lsjax.reproduce import paired_gains, targets

    rng = np.random.default_rng(0)
    ids = [f"d{i}" for i in range(400)]

    def scored(p_by_task, flip=None):
        tasks = {}
        for t, p in p_by_task.items():
            acc = (rng.random(len(ids)) < p).astype(int)
            tasks[t] = {"acc": float(acc.mean()), "acc_norm": float(acc.mean()), "n": len(ids),
                        "docs": {"id": list(ids), "acc": acc.tolist(), "acc_norm": acc.tolist()}}
        return {"tasks": tasks, "average": {"acc": float(np.mean([r["acc"] for r in tasks.values()]))}}

    base = scored({"a": 0.3, "b": 0.4})
    switch = scored({"a": 0.6, "b": 0.7})  # ~+30 points: met whatever the noise
    lora = json.loads(json.dumps(switch))  # the same scores: a difference of exactly 0, interval [0, 0]
    other_docs = scored({"a": 0.9, "b": 0.9})
    for r in other_docs["tasks"].values():
        r["docs"]["id"] = [i + "x" for i in ids]
    evals = {"base": base, "switch": switch, "lora": lora, "blockwise": other_docs}
    gains = paired_gains(evals)
    assert sorted(gains) == ["base", "lora"]  # blockwise was scored on other documents
    expected = 100 * (np.mean([np.mean(switch["tasks"][t]["docs"]["acc"]) for t in "ab"])
                      - np.mean([np.mean(base["tasks"][t]["docs"]["acc"]) for t in "ab"]))
    assert gains["base"]["points"] == pytest.approx(expected) and gains["base"]["n"] == 800
    lo, hi = gains["base"]["interval"]
    assert lo < expected < hi and 3 < lo and hi - lo < 12
    assert gains["lora"]["interval"] == [0.0, 0.0] and gains["lora"]["points"] == 0.0

    methods = {k: {"average": v["average"]["acc"]} for k, v in evals.items()}
    lines = targets({"methods": methods, "paired": gains})
    assert lines[0].startswith(f"- met: switch {expected:+.1f} points [") and "paired 95% interval over 800" in lines[0]
    assert lines[1].startswith("- met: switch +0.0 points [+0.0, +0.0] against lora (target >= 0;")
    assert lines[2].startswith("- MISSED: switch") and "interval" not in lines[2]  # blockwise: point figure only
    # an interval straddling the target is not resolved at this n
    straddle = {**gains, "base": {"points": 3.5, "interval": [1.0, 6.0], "n": 800}}
    assert targets({"methods": methods, "paired": straddle})[0].startswith(
        "- not resolved at this n: switch +3.5 points [+1.0, +6.0] over the base")


def test_seeds_combine_document_by_document():
    """A method's seeds: each document's score is its mean over seeds, each task's accuracy the mean of
    those, and every seed's own average is kept; seeds scored on other documents are refused."""
    from lsjax.reproduce import combine_seeds

    def run(scores_by_task, ids=("d0", "d1", "d2", "d3")):
        return {"tasks": {t: {"docs": {"id": list(ids), "acc": acc, "acc_norm": [1 - x for x in acc]}}
                          for t, acc in scores_by_task.items()}}

    runs = {0: run({"a": [1, 0, 1, 0], "b": [1, 1, 1, 0]}), 3: run({"a": [1, 1, 0, 0], "b": [0, 0, 0, 0]})}
    out = combine_seeds(runs)
    assert out["tasks"]["a"]["docs"]["acc"] == [1.0, 0.5, 0.5, 0.0]
    assert out["tasks"]["b"]["docs"]["acc"] == [0.5, 0.5, 0.5, 0.0]
    assert out["tasks"]["b"]["docs"]["acc_norm"] == [0.5, 0.5, 0.5, 1.0]
    assert out["tasks"]["a"]["acc"] == 0.5 and out["tasks"]["b"]["acc"] == 0.375 and out["tasks"]["b"]["n"] == 4
    assert out["average"]["acc"] == pytest.approx(0.4375)
    assert out["seeds"] == {"0": pytest.approx(0.625), "3": pytest.approx(0.25)}
    with pytest.raises(ConfigError, match=r"seed 3: task 'a' was scored on other documents"):
        combine_seeds({0: run({"a": [1, 0, 1, 0]}), 3: run({"a": [1, 0, 1, 0]}, ids=("d0", "d1", "d2", "x"))})
