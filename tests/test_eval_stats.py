"""Bootstrap intervals against binomial coverage and normal-approximation widths; `lsjax eval --compare`."""

import json
import re

import numpy as np
import pytest

from lsjax.errors import ConfigError
from lsjax.eval import stats
from lsjax.eval.stats import average_difference_interval, average_interval, mean_interval, paired_difference_interval


def normal_width(variance_of_mean: float) -> float:
    """Width of the 95% normal-approximation interval of an estimate with this variance."""
    return 2 * 1.959964 * np.sqrt(variance_of_mean)


def test_interval_covers_the_true_accuracy_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    p, n, sims = 0.6, 200, 400
    covered = 0
    for i in range(sims):
        lo, hi = mean_interval(rng.random(n) < p, replicates=400, seed=i)
        covered += lo <= p <= hi
    assert 0.92 <= covered / sims <= 0.98, covered / sims


def test_interval_width_matches_the_normal_approximation():
    x = (np.random.default_rng(1).random(2000) < 0.3).astype(float)
    lo, hi = mean_interval(x, replicates=2000, seed=0)
    assert hi - lo == pytest.approx(normal_width(x.var() / len(x)), rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(x.mean(), abs=0.003)
    assert mean_interval(x, replicates=500, seed=3) == mean_interval(x, replicates=500, seed=3)
    assert mean_interval(x, replicates=500, seed=3) != mean_interval(x, replicates=500, seed=4)
    assert mean_interval(np.ones(50), replicates=100) == (1.0, 1.0)


def test_average_weighs_tasks_alike_and_resamples_each_on_its_own():
    rng = np.random.default_rng(2)
    tasks = [(rng.random(n) < p).astype(float) for n, p in ((40, 0.3), (300, 0.6), (1200, 0.9))]
    lo, hi = average_interval(tasks, replicates=2000, seed=0)
    task_means = [t.mean() for t in tasks]
    pooled = np.concatenate(tasks).mean()  # what weighing documents alike would centre on
    assert (lo + hi) / 2 == pytest.approx(np.mean(task_means), abs=0.01)
    assert not lo <= pooled <= hi
    assert hi - lo == pytest.approx(normal_width(sum(t.var() / len(t) for t in tasks) / len(tasks) ** 2), rel=0.15)


def test_paired_interval_is_narrower_than_unpaired_on_agreeing_runs():
    rng = np.random.default_rng(3)
    n = 500
    a = (rng.random(n) < 0.6).astype(float)
    b = np.where(rng.random(n) < 0.05, 1 - a, a)  # the runs agree on ~95% of the documents
    d = b - a
    lo, hi = paired_difference_interval(a, b, replicates=2000, seed=0)
    assert lo <= d.mean() <= hi
    assert hi - lo == pytest.approx(normal_width(d.var() / n), rel=0.15)
    assert hi - lo < 0.5 * normal_width(a.var() / n + b.var() / n)  # what independent resampling would give
    assert paired_difference_interval(a, a.copy(), replicates=200) == (0.0, 0.0)

    # two tasks: each paired on its own documents, averaged with equal weight
    a2 = (rng.random(80) < 0.5).astype(float)
    b2 = np.where(rng.random(80) < 0.1, 1 - a2, a2)
    lo, hi = average_difference_interval([a, a2], [b, b2], replicates=2000, seed=0)
    d2 = b2 - a2
    assert lo <= (d.mean() + d2.mean()) / 2 <= hi
    assert hi - lo == pytest.approx(normal_width((d.var() / n + d2.var() / 80) / 4), rel=0.15)


def test_resampling_in_chunks_keeps_every_replicate(monkeypatch):
    x = np.arange(10, dtype=float)
    monkeypatch.setattr(stats, "CHUNK_CELLS", 30)  # 3 replicates per chunk
    means = stats.resampled_means(x, 1001, np.random.default_rng(0))
    assert means.shape == (1001,) and means.mean() == pytest.approx(4.5, abs=0.1)
    assert len(np.unique(means)) > 20


def test_bad_settings_and_scores():
    with pytest.raises(ConfigError, match=r"replicates=0 is invalid; expected a positive integer"):
        mean_interval([1, 0], replicates=0)
    with pytest.raises(ConfigError, match=r"seed=-1 is invalid; expected a non-negative integer"):
        mean_interval([1, 0], seed=-1)
    with pytest.raises(ConfigError, match=r"level=1.5 is invalid"):
        mean_interval([1, 0], level=1.5)
    with pytest.raises(ConfigError, match=r"scores of shape \(0,\) are invalid"):
        mean_interval([])
    with pytest.raises(ConfigError, match=r"no tasks to average"):
        average_interval([])
    with pytest.raises(ConfigError, match=r"task 0: 3 scores of run A against 2 of run B"):
        paired_difference_interval([1, 0, 1], [1, 0])


# -- lsjax eval --compare ---------------------------------------------------------------------
def run_file(path, tasks: dict[str, tuple[list[str], list[int], list[int]]]) -> str:
    """A results file as `lsjax eval --json` writes it: task -> (ids, acc, acc_norm) per document."""
    results = {t: {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(norm)), "n": len(ids),
                   "docs": {"id": ids, "acc": acc, "acc_norm": norm}} for t, (ids, acc, norm) in tasks.items()}
    path.write_text(json.dumps({"tasks": results, "average": {}}))
    return str(path)


EASY = [f"e{i}" for i in range(40)]
SCIQ = [f"s{i}" for i in range(10)]
RUN_A = {"arc_easy": (EASY, [1] * 20 + [0] * 20, [1, 0] * 20), "sciq": (SCIQ, [1] * 10, [1] * 5 + [0] * 5)}
# B: 8 more arc_easy documents right, the same acc_norm; one sciq document wrong, one more right by acc_norm
RUN_B = {"arc_easy": (EASY, [1] * 28 + [0] * 12, [1, 0] * 20), "sciq": (SCIQ, [1] * 9 + [0], [1] * 6 + [0] * 4)}
CELL = r"([+-]\d+\.\d) \[([+-]\d+\.\d), ([+-]\d+\.\d)\]"


def table_row(out: str, name: str) -> list[tuple[float, float, float]]:
    """(difference, low, high) of acc and acc_norm in the printed row of `name`."""
    line = next(line for line in out.splitlines() if line.startswith(f"| {name} |"))
    return [tuple(float(v) for v in cell) for cell in re.findall(CELL, line)]


def test_compare_prints_paired_differences(tmp_path, capsys):
    from lsjax.cli import main

    a, b = run_file(tmp_path / "a.json", RUN_A), run_file(tmp_path / "b.json", RUN_B)
    out_json = tmp_path / "diff.json"
    assert main(["eval", "--compare", a, b, "--bootstrap", "1000", "--seed", "1", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    (acc, lo, hi), norm = table_row(out, "arc_easy")
    assert acc == 20.0 and norm == (0.0, 0.0, 0.0)  # identical acc_norm documents: no spread at all
    # B is right wherever A is: every resample's difference is >= 0; the normal approximation gives 20 +- 12.4
    assert 5 < lo < 20 < hi < 35
    (acc, lo, hi), (norm, nlo, nhi) = table_row(out, "sciq")
    assert acc == -10.0 and norm == 10.0 and lo <= -10 <= hi <= 0 and 0 <= nlo <= 10 <= nhi
    (acc, lo, hi), (norm, nlo, nhi) = table_row(out, "**average**")
    assert acc == 5.0 and norm == 5.0 and lo < 5 < hi and nlo < 5 < nhi
    assert "| **average** |" in out and out.rstrip().endswith("the average resamples each task on its own.")
    assert f"A: {a}; B: {b}" in out and "(1000 resamples, seed 1)" in out
    saved = json.loads(out_json.read_text())
    assert saved["tasks"]["arc_easy"]["acc"] == pytest.approx(0.2) and saved["average"]["n"] == 50
    assert saved["bootstrap"] == {"replicates": 1000, "seed": 1, "level": 0.95}


def refused(argv: list[str], capsys) -> str:
    from lsjax.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lsjax eval: error: ") and "Traceback" not in err
    return err


def test_compare_refuses_runs_on_other_documents(tmp_path, capsys):
    a = run_file(tmp_path / "a.json", RUN_A)
    other = {**RUN_B, "sciq": (SCIQ[:3] + ["x3"] + SCIQ[4:], *RUN_B["sciq"][1:])}
    b = run_file(tmp_path / "b.json", other)
    err = refused(["eval", "--compare", a, b], capsys)
    assert f"{b}: task 'sciq' was scored on other documents than in {a}" in err
    assert "position 3 holds 'x3' against 's3'" in err

    fewer = {**RUN_B, "arc_easy": tuple(column[:30] for column in RUN_B["arc_easy"])}
    b = run_file(tmp_path / "fewer.json", fewer)
    err = refused(["eval", "--compare", a, b], capsys)
    assert "task 'arc_easy' was scored on other documents" in err and "30 documents against 40" in err

    b = run_file(tmp_path / "one_task.json", {"sciq": RUN_B["sciq"]})
    err = refused(["eval", "--compare", a, b], capsys)
    assert f"{b}: tasks ['sciq'] differ from {a}'s ['arc_easy', 'sciq']" in err


def test_compare_refuses_files_without_per_document_scores(tmp_path, capsys):
    a = run_file(tmp_path / "a.json", RUN_A)
    old = json.loads((tmp_path / "a.json").read_text())
    for r in old["tasks"].values():
        del r["docs"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    err = refused(["eval", "--compare", str(tmp_path / "old.json"), a], capsys)
    assert f"{tmp_path / 'old.json'}: task 'arc_easy' has no per-document scores" in err and "older" in err

    bad = json.loads((tmp_path / "a.json").read_text())
    bad["tasks"]["sciq"]["docs"]["acc"][2] = 0.5
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    err = refused(["eval", "--compare", a, str(tmp_path / "bad.json")], capsys)
    assert "task 'sciq': 'docs.acc' must be a list of 0/1 scores, one per document id (10)" in err

    assert "missing nope.json" in refused(["eval", "--compare", a, str(tmp_path / "nope.json")], capsys)


def test_eval_needs_a_checkpoint_or_two_files(tmp_path, capsys):
    a = run_file(tmp_path / "a.json", RUN_A)
    assert "give --ckpt CKPT to score a model, or --compare A.json B.json" in refused(["eval"], capsys)
    assert "leave out --ckpt" in refused(["eval", "--ckpt", str(tmp_path), "--compare", a, a], capsys)
    assert "bootstrap=0 is invalid" in refused(["eval", "--compare", a, a, "--bootstrap", "0"], capsys)
    assert "--seed -1 is invalid" in refused(["eval", "--compare", a, a, "--seed", "-1"], capsys)
