"""The paper's tables at SmolLM2-135M scale, and `make demo`'s story: one resumable pipeline.

    python -m lsjax.reproduce                   # `make reproduce`: docs/results.{md,json}
    python -m lsjax.reproduce --preset demo     # `make demo`: a short switch run, end to end

Stages, each saved under the run folder as it finishes (a rerun skips what is done and resumes a
training run from its last checkpoint; evaluation is saved model by model, task by task):

    eval/base/<task>.json               held-out accuracy of the base model
    train/<method>/seed<k>/             `lsjax train` run of training seed k (checkpoints, metrics.jsonl, adapter/)
    train/<method>/seed<k>.json         its budget and final numbers
    eval/<method>/seed<k>/<task>.json   held-out accuracy with that trained adapter
    latency.json                 `lsjax bench decode` records (base and every method, same run)
    memory/<model>.json          peak RSS of a fresh process decoding with that model (reproduce only)
    summary.md, results.json     the table, the targets, the settings

Every method trains with the same budget (steps, batch, sequence length, learning rate, data) on
the `train` split of the tasks, once per training seed (the seed draws the adapter's initial weights
and the order of the examples); accuracy is on the disjoint `heldout` split (`lsjax.data`). A
method's accuracy is the mean over its seeds; each document's score is averaged over the seeds too,
so the bootstrap intervals (over documents) compare methods on the same documents. Latency, memory
and the streamed sample use the first seed's adapter.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import flax
import jax
import numpy as np
import optax
from safetensors import safe_open

import lsjax
import lsjax.train
from lsjax.adapters import open_adapter
from lsjax.adapters.files import WEIGHTS_FILE
from lsjax.assets import default_checkpoint
from lsjax.data import TASKS as KNOWN_TASKS
from lsjax.data import load_task
from lsjax.errors import ConfigError, exit_status
from lsjax.eval.harness import (
    DEFAULT_MAX_LENGTH,
    METRICS,
    SPLIT_NOTE,
    add_intervals,
    adapter_logits_fn,
    evaluate,
    load_docs,
    model_logits_fn,
    paired_average,
)
from lsjax.eval.stats import DEFAULT_LEVEL, DEFAULT_REPLICATES
from lsjax.eval.latency import (
    Record,
    auto_backends,
    decode_entries,
    latency_table,
    random_adapter,
    select_configs,
    time_decode,
)
from lsjax.extras import pyplot
from lsjax.generate import Generator
from lsjax.jsonfile import write_json
from lsjax.train.config import load_config
from lsjax.train.loop import train

TASKS = ("arc_easy", "arc_challenge", "openbookqa", "commonsense_qa", "sciq")
METHODS = ("lora", "layerwise", "blockwise", "switch")
ROUTED = ("layerwise", "blockwise", "switch")
PAPER_NAMES = {"lora": "LoRA", "layerwise": "MoLA-style (layer-wise)", "blockwise": "MoRAL/MixLoRA-style (FFN block)",
               "switch": "LoRA-Switch"}
SAMPLE_PROMPT = "Which gas do plants take in from the air to make their food? Answer in one sentence."


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a reproduction run trains, evaluates and times. Validated when built."""

    run_dir: str
    methods: tuple[str, ...] = METHODS            # trained, each with the same budget
    tasks: tuple[str, ...] = TASKS                # train split for training, held-out split for accuracy
    steps: int = 150
    batch_size: int = 8
    max_length: int = 64                          # training sequence length (longer prompts lose their start)
    lr: float = 3e-4
    seeds: tuple[int, ...] = (0, 1)               # training seeds, each method trained once per seed
    eval_limit: int | None = None                 # first N held-out documents per task (None: all)
    loss_docs: int = 32                           # held-out loss before and after training: first N per task
    latency_methods: tuple[str, ...] = ("base", *METHODS)   # "method" (all its strategies) or "method/strategy";
                                                            # methods not trained get random adapters
    latency_batches: tuple[int, ...] = (1,)
    latency_rounds: int = 5
    latency_reference: bool = True                # also the base on every other backend that can run here
    new_tokens: int = 32
    memory: bool = True
    sample_prompt: str | None = None
    results_md: str | None = None                 # also write the report here (and results.json beside it)

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"methods: unknown method {unknown[0]!r}; expected some of {list(METHODS)}")
        select_configs(self.latency_methods, what="latency_methods")
        unknown = [t for t in self.tasks if t not in KNOWN_TASKS]
        if not self.tasks or unknown:
            raise ConfigError(f"tasks: {unknown[0] if unknown else 'none'!r} is not a known task; expected some of "
                              f"{sorted(KNOWN_TASKS)}")
        for field in ("steps", "batch_size", "max_length", "loss_docs", "latency_rounds", "new_tokens"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{field}={value!r} is invalid; expected a positive integer")
        if (not isinstance(self.seeds, tuple) or not self.seeds or len(set(self.seeds)) != len(self.seeds)
                or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in self.seeds)):
            raise ConfigError(f"seeds={self.seeds!r} is invalid; expected a non-empty tuple of distinct non-negative "
                              "integers (training seeds)")
        if self.eval_limit is not None and (not isinstance(self.eval_limit, int) or self.eval_limit < 1):
            raise ConfigError(f"eval_limit={self.eval_limit!r} is invalid; expected a positive integer or None")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr!r} is invalid; expected a positive number")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


PRESETS = {
    # every held-out document, 4 methods x 2 seeds x 150 steps of 8 x 64 tokens: hours on a 2-core CPU
    "reproduce": dict(run_dir="runs/reproduce", results_md="docs/results.md"),
    # a few minutes: one short switch run on the three shortest tasks, switch against the base
    "demo": dict(run_dir="runs/demo", methods=("switch",), tasks=("arc_easy", "openbookqa", "commonsense_qa"),
                 seeds=(0,), steps=16, lr=1e-3, eval_limit=32, loss_docs=8,
                 latency_methods=("base", "switch/fused"),
                 latency_reference=False, latency_rounds=3, new_tokens=16, memory=False, sample_prompt=SAMPLE_PROMPT),
}


# -- small helpers ------------------------------------------------------------------------------
def _read_json(path: Path) -> Any | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _stage(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def _check_plan(run_dir: Path, plan: Plan) -> None:
    """A run folder belongs to one plan: resuming it with another is refused, naming the fields."""
    saved = _read_json(run_dir / "plan.json")
    if saved is None:
        write_json(run_dir / "plan.json", plan.to_dict())
        return
    differ = sorted(k for k, v in plan.to_dict().items() if saved.get(k) != v and k != "results_md")
    if differ:
        raise ConfigError(f"{run_dir}: holds a run with another plan (differs in {differ}); use another "
                          f"--run-dir or remove that folder")


# -- stages -------------------------------------------------------------------------------------
def train_config(plan: Plan, method: str, seed: int, ckpt: Path, run_dir: Path):
    """The method's `lsjax/train/configs/smollm2_<method>.yaml` with the plan's shared budget and `seed`."""

    configs = Path(lsjax.train.__file__).resolve().parent / "configs"
    warmup = max(1, min(20, plan.steps // 10))
    return load_config(configs / f"smollm2_{method}.yaml", [
        f"model={ckpt}", f"run_dir={run_dir / 'train' / method / f'seed{seed}'}", f"seed={seed}", f"steps={plan.steps}",
        f"batch_size={plan.batch_size}", f"data.max_length={plan.max_length}", f"optim.lr={plan.lr}",
        f"optim.warmup_steps={warmup}", f"data.tasks=[{','.join(plan.tasks)}]", f"data.eval_docs={plan.loss_docs}",
        "data.packing=false",  # the budget counts examples: one per row
        f"eval_every={plan.steps}", f"checkpoint_every={max(1, plan.steps // 4)}", "log_every=10"])


def run_training(plan: Plan, method: str, seed: int, ckpt: Path, run_dir: Path, train_docs: int) -> dict[str, Any]:

    path = run_dir / "train" / method / f"seed{seed}.json"
    done = _read_json(path)
    if done is not None:
        print(f"{method} seed {seed}: trained already ({done['steps']} steps, {done['seconds']:.0f} s)")
        return done
    config = train_config(plan, method, seed, ckpt, run_dir)
    folder = Path(config.run_dir)
    resume = (folder / "checkpoints").is_dir()
    start = time.perf_counter()
    last = train(config, resume=resume)
    seconds = time.perf_counter() - start
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    timed = steps_this_call(lines, config.steps, resume)
    first_eval = next((x["eval_loss"] for x in lines if x.get("step") == 0 and "eval_loss" in x), None)
    summary = {"method": method, "seed": seed, "steps": config.steps, "batch_size": config.batch_size,
               "max_length": config.data.max_length, "lr": config.optim.lr,
               "examples": config.steps * config.batch_size,
               "train_docs": train_docs, "seconds": round(seconds, 3),
               "resumed": resume, "final_loss": last.get("loss"), "heldout_loss_start": first_eval,
               "heldout_loss_end": last.get("eval_loss"),
               "steps_timed": timed,
               "tokens_per_s": round(timed * config.batch_size * config.data.max_length / seconds, 2),
               "adapter": str(folder / "adapter"), "adapter_params": _adapter_params(folder / "adapter")}
    write_json(path, summary)
    return summary


def steps_this_call(metrics: list[dict], steps: int, resumed: bool) -> int:
    """Steps a `train` call ran: all of them, or, resumed, those after its resume point (the last
    `resume` event in metrics.jsonl), so tokens/s divides this call's tokens by this call's time."""
    start = next((x["step"] for x in reversed(metrics) if x.get("event") == "resume"), 0) if resumed else 0
    return steps - start


def _adapter_params(folder: Path) -> int:


    with safe_open(str(folder / WEIGHTS_FILE), framework="numpy") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _split_sizes(tasks) -> dict[str, dict[str, int]]:

    return {t: {"train": len(load_task(t, "train")), "heldout": len(load_task(t, "heldout"))} for t in tasks}


def evaluate_stage(plan: Plan, name: str, model, tokenizer, adapter_dir: Path | None, run_dir: Path) -> dict[str, Any]:
    """Held-out accuracy of `name` (base, or a trained method's seed as "method/seed<k>"), task by
    task, each saved when done."""

    results, logits_fn = {}, None
    for task in plan.tasks:
        path = run_dir / "eval" / name / f"{task}.json"
        saved = _read_json(path)
        if saved is None:
            if logits_fn is None:
                logits_fn = model_logits_fn(model) if adapter_dir is None else adapter_logits_fn(adapter_dir, model)
            docs = load_docs([task], "heldout", plan.eval_limit)
            max_length = min(model.config.max_position_embeddings, DEFAULT_MAX_LENGTH)
            saved = evaluate(logits_fn, tokenizer, docs, max_length=max_length)["tasks"][task]
            write_json(path, saved)
        results[task] = saved
    average = {k: sum(r[k] for r in results.values()) / len(results) for k in ("acc", "acc_norm")}
    print(f"{name}: " + ", ".join(f"{t} {100 * r['acc']:.1f}" for t, r in results.items())
          + f" | average {100 * average['acc']:.1f}")
    return {"tasks": results, "average": average}


def combine_seeds(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One method's evaluations over its training seeds as one: each task's accuracy is the mean over
    seeds and each document's score its mean over seeds (so a paired bootstrap over documents sees the
    seeds' noise averaged in); `seeds` keeps every seed's own average over tasks."""
    first = next(iter(runs.values()))["tasks"]
    tasks = {}
    for t, r in first.items():
        ids = r["docs"]["id"]
        for k, run in runs.items():
            if run["tasks"][t]["docs"]["id"] != ids:
                raise ConfigError(f"seed {k}: task {t!r} was scored on other documents than seed "
                                  f"{next(iter(runs))}; evaluate every seed on the same documents")
        columns = {m: np.mean([run["tasks"][t]["docs"][m] for run in runs.values()], axis=0) for m in METRICS}
        tasks[t] = {**{m: float(columns[m].mean()) for m in METRICS}, "n": len(ids),
                    "docs": {"id": ids, **{m: columns[m].tolist() for m in METRICS}}}
    average = {m: float(np.mean([r[m] for r in tasks.values()])) for m in METRICS}
    return {"tasks": tasks, "average": average,
            "seeds": {str(k): float(np.mean([np.mean(r["docs"]["acc"]) for r in run["tasks"].values()]))
                      for k, run in runs.items()}}


def run_latency(plan: Plan, model, tokenizer, adapters: dict[str, Path], run_dir: Path,
                source: str) -> dict[str, Any]:
    """Every (method, strategy) of `lsjax bench decode` for the plan's methods, timed in one run."""


    path = run_dir / "latency.json"
    saved = _read_json(path)
    if saved is not None:
        print("latency: measured already")
        return saved
    random_args = SimpleNamespace(experts=8, top_k=2, rank=16, targets="all-linear", dtype="float32",
                                  expert_dtype=None)
    wanted = select_configs(plan.latency_methods)
    loaded = {}
    for method in {m for m, _ in wanted if m != "base"}:
        loaded[method] = (open_adapter(adapters[method], model.config) if method in adapters
                          else random_adapter(model.config, method, random_args))
    backends = auto_backends(model, wanted, loaded, min(plan.latency_batches))
    entries = decode_entries(wanted, loaded, backends, plan.latency_reference, model.dtype)
    start = time.perf_counter()
    records, memory = time_decode(model, tokenizer, entries, list(plan.latency_batches), prompt_len=32,
                                  new_tokens=plan.new_tokens, rounds=plan.latency_rounds)
    if memory["failed"]:
        raise ConfigError("latency stage: " + "; ".join(memory["failed"]))
    meta = {"source": source, "backend": jax.default_backend(),
            "jax": jax.__version__, **memory, "prompt_len": 32, "new_tokens": plan.new_tokens,
            "rounds": plan.latency_rounds, "trained": sorted(adapters),
            "random": sorted(m for m in loaded if m not in adapters),
            "seconds": round(time.perf_counter() - start, 1)}
    saved = {"meta": meta, "records": [dataclasses.asdict(r) for r in records]}
    write_json(path, saved)
    return saved


def run_memory(name: str, ckpt: Path, adapter_dir: Path | None, strategy: str, new_tokens: int,
               run_dir: Path) -> dict[str, Any]:
    """Peak resident memory of a fresh process that loads the model (and adapter) and decodes."""
    path = run_dir / "memory" / f"{name}.json"
    saved = _read_json(path)
    if saved is None:
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "lsjax.reproduce", "--measure-memory", str(ckpt), "--strategy", strategy,
               "--new-tokens", str(new_tokens)] + (["--adapter", str(adapter_dir)] if adapter_dir else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        if out.returncode != 0:
            raise ConfigError(f"memory measurement of {name} failed:\n{out.stderr[-2000:]}")
        saved = {**json.loads(out.stdout.strip().splitlines()[-1]), "seconds": round(time.perf_counter() - start, 1)}
        write_json(path, saved)
    return saved


def measure_memory(ckpt: str, adapter: str | None, strategy: str, new_tokens: int) -> dict[str, Any]:
    """Runs in its own process (see `run_memory`): load, decode batch 1, report peak RSS and weight bytes."""


    model, tokenizer = lsjax.load(ckpt, dtype="float32")
    weights = sum(x.nbytes for x in jax.tree.leaves(model.params()))
    extra = None if adapter is None else open_adapter(adapter, model.config)
    adapter_bytes = 0 if extra is None else sum(x.nbytes for x in jax.tree.leaves(extra.arrays()))
    gen = Generator(model, tokenizer, extra, strategy=strategy if extra is not None else "auto")
    gen.generate(["Hello"], max_new_tokens=new_tokens, stop_token_ids=())
    return {"peak_rss_mib": round(peak_rss_bytes() / 2**20, 1), "weights_mib": round(weights / 2**20, 1),
            "adapter_mib": round(adapter_bytes / 2**20, 2), "strategy": gen.strategy}


def peak_rss_bytes() -> int:
    """This process's peak resident memory. /proc's VmHWM starts afresh at exec; `ru_maxrss` would
    carry over the parent's peak into a child process on Linux."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def stream_sample(model, tokenizer, adapter_dir: Path, prompt: str, max_new_tokens: int = 64,
                  fastest: dict | None = None) -> str:
    """Streams an answer; `fastest`: the latency stage's quickest batch-1 record of the method, whose
    backend and strategy are then used as measured (else `auto` chooses)."""
    how = {} if fastest is None else {"backend": fastest["backend"], "strategy": fastest["strategy"]}
    generator = Generator(model, tokenizer, open_adapter(adapter_dir, model.config), **how)
    print(f"user: {prompt}\nassistant ({generator.strategy} switch adapter): ", end="", flush=True)
    text = ""
    for event in generator.stream(prompt, max_new_tokens=max_new_tokens, chat=True):
        print(event.text, end="", flush=True)
        text += event.text
    print()
    return text


# -- the report ---------------------------------------------------------------------------------
def best_latency(latency: dict, method: str) -> dict | None:
    """The fastest batch-1 record of `method` (its best strategy)."""
    rows = [r for r in latency["records"] if r["method"] == method and r["batch"] == 1]
    return min(rows, key=lambda r: r["ms_per_token"]) if rows else None


def paired_gains(evals: dict[str, dict], of: str = "switch") -> dict[str, dict[str, Any]]:
    """`of` minus each other method in held-out accuracy points on the average over tasks, with its
    paired 95% bootstrap interval over the documents both scored (`lsjax.eval.stats`); methods whose
    saved scores lack per-document columns (an older run) or differ in documents are left out."""
    if of not in evals:
        return {}
    mine = evals[of]["tasks"]
    out = {}
    for name, ev in evals.items():
        theirs = ev["tasks"]
        if name == of or set(theirs) != set(mine):
            continue
        if not all("docs" in theirs[t] and "docs" in mine[t] and theirs[t]["docs"]["id"] == mine[t]["docs"]["id"]
                   for t in mine):
            continue
        points, (lo, hi) = paired_average({t: theirs[t]["docs"] for t in mine}, {t: mine[t]["docs"] for t in mine},
                                          "acc")
        out[name] = {"points": 100 * points, "interval": [100 * lo, 100 * hi],
                     "n": sum(len(mine[t]["docs"]["id"]) for t in mine)}
    return out


def targets(results: dict[str, Any]) -> list[str]:
    """The reproduction's targets, each judged by how much (points are accuracy percentage points):
    on its paired 95% interval where the run kept per-document scores (met when all of it clears the
    target, missed when none does, else not resolved at this n), else on the point estimate."""
    m = results["methods"]
    if "switch" not in m or "base" not in m:
        return []
    avg = {k: 100 * v["average"] for k, v in m.items() if v.get("average") is not None}
    paired = results.get("paired", {})
    lines = []

    def check(ok: bool, text: str) -> None:
        lines.append(f"- {'met' if ok else 'MISSED'}: {text}")

    def judge(other: str, target: float, text: str) -> None:
        d, goal = avg["switch"] - avg[other], f"{target:+g}" if target else "0"
        if other not in paired:
            check(d >= target, f"switch {d:+.1f} points {text} (target >= {goal})")
            return
        g = paired[other]
        lo, hi = g["interval"]
        verdict = "met" if lo >= target else "MISSED" if hi < target else "not resolved at this n"
        lines.append(f"- {verdict}: switch {g['points']:+.1f} points [{lo:+.1f}, {hi:+.1f}] {text} "
                     f"(target >= {goal}; paired 95% interval over {g['n']} documents)")

    judge("base", 3, "over the base on the held-out average")
    if "lora" in avg:
        judge("lora", 0, "against lora")
    routed = {k: avg[k] for k in ("layerwise", "blockwise") if k in avg}
    if routed:
        best = max(routed, key=routed.get)
        judge(best, -1, f"against the best routed baseline, {best}")
    ratios = {k: v["decode_ratio_to_base"] for k, v in m.items() if k in ROUTED and v.get("decode_ratio_to_base")}
    if "switch" in ratios and len(ratios) > 1:
        lowest = min(ratios, key=ratios.get)
        check(lowest == "switch", "decode ratio to base: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
              + " (target: switch lowest of the routed methods)")
    return lines


def collect(plan: Plan, evals: dict, trains: dict, latency: dict | None, memory: dict, splits: dict,
            seconds: float) -> dict[str, Any]:
    """What results.json holds: per method its accuracy with 95% intervals over documents (and each
    seed's average), its decode cost and training; the paired gains of switch; the targets."""
    methods = {}
    for name, ev in evals.items():
        ev = add_intervals({"tasks": {t: dict(r) for t, r in ev["tasks"].items()}, "average": dict(ev["average"])})
        keys = ("acc", "acc_ci", "acc_norm", "acc_norm_ci", "n")
        row = {"tasks": {t: {k: r[k] for k in keys} for t, r in ev["tasks"].items()},
               "average": ev["average"]["acc"], "average_ci": ev["average"]["acc_ci"],
               "average_norm": ev["average"]["acc_norm"], "average_norm_ci": ev["average"]["acc_norm_ci"]}
        if "seeds" in evals[name]:
            row["seeds"] = evals[name]["seeds"]
        best = best_latency(latency, name) if latency else None
        if best:
            row.update(decode_ms_per_token=best["ms_per_token"], decode_ratio_to_base=best["ratio_to_base"],
                       decode_strategy=best["strategy"], decode_backend=best["backend"])
        if name in memory:
            row.update(peak_memory_mib=memory[name]["peak_rss_mib"], adapter_mib=memory[name]["adapter_mib"])
        if name in trains:
            row["train"] = {str(seed): {k: t[k] for k in ("steps", "examples", "batch_size", "max_length", "lr",
                                                          "seconds", "tokens_per_s", "final_loss",
                                                          "heldout_loss_start", "heldout_loss_end")}
                            for seed, t in trains[name].items()}
            row["adapter_params"] = next(iter(trains[name].values()))["adapter_params"]
        methods[name] = row
    results = {"meta": {"date": time.strftime("%Y-%m-%d"), "machine": machine_name(),
                        "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
                        "optax": optax.__version__, "backend": jax.default_backend(),
                        "stage_seconds": round(_stage_seconds(evals, trains, latency, memory), 1),
                        "this_process_seconds": round(seconds, 1),
                        "bootstrap": {"replicates": DEFAULT_REPLICATES, "seed": 0, "level": DEFAULT_LEVEL}},
               "plan": plan.to_dict(), "splits": splits, "methods": methods, "paired": paired_gains(evals),
               "latency": latency}
    results["targets"] = targets(results)
    return results


def machine_name() -> str:
    """The CPU's model name (where Linux says it) and core count: two VMs of one name can still differ."""
    name = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")), None)
        if model:
            name = f"{model} ({platform.machine()})"
    return f"{name}, {os.cpu_count()} cores"


def _stage_seconds(evals: dict, trains: dict, latency: dict | None, memory: dict) -> float:
    """Compute time of every stage as each measured itself (a resumed run counts each stage once)."""
    total = sum(r.get("seconds", 0.0) for ev in evals.values() for r in ev["tasks"].values())
    total += sum(t["seconds"] for per_seed in trains.values() for t in per_seed.values())
    total += (latency or {}).get("meta", {}).get("seconds", 0.0)
    return total + sum(m.get("seconds", 0.0) for m in memory.values())


def _pct(value: float, interval: list[float] | None = None, sign: str = "") -> str:
    text = f"{100 * value:{sign}.1f}"
    return text if interval is None else text + f" [{100 * interval[0]:{sign}.1f}, {100 * interval[1]:{sign}.1f}]"


def _label(name: str) -> str:
    return "base" if name == "base" else f"{name} ({PAPER_NAMES[name]})"


def report_markdown(results: dict[str, Any], command: str, figures: dict[str, str]) -> str:

    plan, meta, m = results["plan"], results["meta"], results["methods"]
    tasks, seeds = plan["tasks"], plan["seeds"]
    boot = meta["bootstrap"]
    n_total = sum(r["n"] for r in next(iter(m.values()))["tasks"].values())
    seed_head = f"seed {' / '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"
    acc = [f"| method | {' | '.join(tasks)} | **average** | {seed_head} |", "|---|" + "---:|" * (len(tasks) + 2)]
    for name, row in m.items():
        cells = " | ".join(_pct(row["tasks"][t]["acc"], row["tasks"][t]["acc_ci"]) for t in tasks)
        per_seed = " / ".join(f"{100 * row['seeds'][str(k)]:.1f}" for k in seeds) if "seeds" in row else "-"
        acc.append(f"| {_label(name)} | {cells} | **{_pct(row['average'], row['average_ci'])}** | {per_seed} |")
    gains = ["| switch minus | points [95% interval] | documents |", "|---|---:|---:|"]
    for other, g in results.get("paired", {}).items():
        gains.append(f"| {other} | {g['points']:+.1f} [{g['interval'][0]:+.1f}, {g['interval'][1]:+.1f}] | {g['n']} |")
    cost = ["| method | ms/token (strategy, backend) | x base | peak MiB | adapter params |",
            "|---|---:|---:|---:|---:|"]
    for name, row in m.items():
        ms = (f"{row['decode_ms_per_token']:.1f} ({row['decode_strategy']}, {row.get('decode_backend', '-')})"
              if "decode_ms_per_token" in row else "-")
        ratio = f"{row['decode_ratio_to_base']:.2f}" if "decode_ratio_to_base" in row else "-"
        mem = f"{row['peak_memory_mib']:.0f}" if "peak_memory_mib" in row else "-"
        params = f"{row['adapter_params'] / 1e6:.2f} M" if "adapter_params" in row else "-"
        cost.append(f"| {_label(name)} | {ms} | {ratio} | {mem} | {params} |")
    split_rows = ["| task | train docs | held-out docs | evaluated |", "|---|---:|---:|---:|"]
    for t in tasks:
        n = m["base"]["tasks"][t]["n"] if "base" in m else "-"
        split_rows.append(f"| {t} | {results['splits'][t]['train']} | {results['splits'][t]['heldout']} | {n} |")
    trains = [f"| {k} | {seed} | {t['steps']} x {t['batch_size']} | {t['seconds']:.0f} | {t['tokens_per_s']:.0f} | "
              f"{t['heldout_loss_start']:.3f} -> {t['heldout_loss_end']:.3f} |"
              for k, v in m.items() if "train" in v for seed, t in v["train"].items()]
    out = [f"Command: `{command}`", "",
           f"Measured {meta['date']} on {meta['machine']} ({meta['backend']}), Python {meta['python']}, "
           f"jax {meta['jax']}, flax {meta['flax']}, optax {meta['optax']}; all stages together "
           f"{meta['stage_seconds'] / 60:.0f} min (each stage's own time; a resumed run counts each stage once).", "",
           f"Held-out accuracy (log-likelihood multiple choice, acc, %) on {n_total} documents, each trained method "
           f"the mean over {len(seeds)} training seed{'s' if len(seeds) > 1 else ''}; "
           f"[{boot['level']:.0%} interval]: percentile bootstrap over documents ({boot['replicates']} resamples, "
           "seed 0; each document's score averaged over the seeds; the average resamples each task on its own, "
           "weighing tasks alike). The last column is each seed's own average.", "", *acc, "",
           "Switch against each method on the same documents: paired bootstrap of the difference in the average.", "",
           *gains, "",
           "Targets (judged on the paired interval: met when all of it clears the target, MISSED when none of it "
           "does, else not resolved at this n):", *(results["targets"] or ["- (need base and switch)"]), "",
           "Decode cost: batch-1 greedy decode, fp32, median of interleaved rounds, the best strategy and backend per "
           "method (first seed's adapter); ratio to the fastest base of the same run. Peak MiB: resident memory of "
           "a fresh process that loads the model and adapter and decodes.", "", *cost, "",
           f"Training budget, the same for every trained method and seed: {plan['steps']} steps x batch "
           f"{plan['batch_size']} x {plan['max_length']} tokens (longer prompts lose their start), AdamW lr "
           f"{plan['lr']}, warmup then cosine, adapters on all seven projections (rank 16, alpha 32; routed: 8 "
           f"experts, top-2), trained on the train split of {', '.join(tasks)} (mixed, shuffled). The seed draws "
           "the adapter's initial weights and the order of the examples. Held-out loss: over the first "
           f"{plan['loss_docs']} held-out documents of each task.", "",
           "| method | seed | steps x batch | seconds | tokens/s | held-out loss (start -> end) |",
           "|---|---:|---:|---:|---:|---|", *trains, "", f"Splits: {SPLIT_NOTE}.", "", *split_rows, ""]
    if results.get("latency"):
        records = [Record(**r) for r in results["latency"]["records"]]
        out += ["Decode latency, every strategy:", "", latency_table(records, results["latency"]["meta"]), ""]
        untrained = results["latency"]["meta"].get("random") or []
        if untrained:
            out += [f"Timed with random adapters of the same shapes (not trained in this run): {', '.join(untrained)}.",
                    ""]
    out += ["How the methods differ at decode time: `switch` routes once per token and adds its k experts in "
            "every adapted projection (all seven here); `layerwise` also runs a router in each of them; `blockwise` "
            "adds experts only in the three FFN projections and carries one plain LoRA on attention. The paper's "
            "merged path (one fused merge of the chosen experts into the weights per token) rewrites every adapted "
            "weight each token (`switch` `merged`, where this run timed it).", ""]
    out += ["For scale, the paper (Llama2-7B, fp16 GPU, batch 1) reports decode time over the backbone of "
            "+954% for MoLA, +254% for PESC, +258% for MoRAL and +29% for LoRA-Switch, and held-out accuracy "
            "gains of 30-40 points over the base from 7B-scale training; this run is a 135M model "
            "with a CPU-sized budget, so compare its ordering, not its magnitudes.", ""]
    for title, path in figures.items():
        out.append(f"![{title}]({path})")
    return "\n".join(out) + "\n"


def _error_bars(values: list[float], intervals: list[list[float]]) -> np.ndarray:
    """matplotlib's yerr: each value's distances down and up to its interval's ends."""
    return np.abs(np.array([[v - lo, hi - v] for v, (lo, hi) in zip(values, intervals)]).T)


def plot_results(results: dict[str, Any], folder: Path, prefix: str) -> dict[str, str]:
    """Accuracy per task with its 95% interval, switch's paired gains with theirs, and decode ratios."""
    plt = pyplot("the results figures")

    folder.mkdir(parents=True, exist_ok=True)
    m, tasks = results["methods"], results["plan"]["tasks"]
    names, paths = list(m), {}

    def save(fig, ax, title: str, ylabel: str, zero: float | None = None) -> None:
        if zero is not None:
            ax.axhline(zero, color="tab:gray", linestyle="--")
        ax.set_ylabel(ylabel)
        fig.tight_layout()
        paths[title] = f"{prefix}_{title.replace(' ', '_')}.png"
        fig.savefig(folder / paths[title], dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [100 * m[name]["tasks"][t]["acc"] for t in tasks] + [100 * m[name]["average"]]
        intervals = [[100 * x for x in m[name]["tasks"][t]["acc_ci"]] for t in tasks]
        intervals.append([100 * x for x in m[name]["average_ci"]])
        ax.bar(np.arange(len(tasks) + 1) + i * width, values, width, label=name,
               yerr=_error_bars(values, intervals), capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_xticks(np.arange(len(tasks) + 1) + 0.4 - width / 2, [*tasks, "average"], fontsize=8)
    ax.legend(fontsize=8)
    save(fig, ax, "accuracy", "held-out accuracy (%), 95% interval")
    paired = results.get("paired", {})
    if paired:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        points = [g["points"] for g in paired.values()]
        ax.errorbar(list(paired), points, yerr=_error_bars(points, [g["interval"] for g in paired.values()]),
                    fmt="o", capsize=4)
        save(fig, ax, "paired gains", "switch minus method (points), paired 95%", zero=0.0)
    rows = [(n, m[n]["decode_ratio_to_base"]) for n in names if "decode_ratio_to_base" in m[n]]
    if rows:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([n for n, _ in rows], [r for _, r in rows], color="tab:blue")
        save(fig, ax, "decode ratio", "decode ms/token / base (batch 1)", zero=1.0)
    return paths


# -- driver -------------------------------------------------------------------------------------
def reproduce(plan: Plan, cache_dir: Path, command: str, ckpt: Path | None = None) -> dict[str, Any]:
    """Run (or resume) every stage of `plan`; returns what `results.json` holds.

    `ckpt`: any lsjax checkpoint of a Llama-family model instead of the embedded SmolLM2.
    """

    start = time.perf_counter()
    run_dir = Path(plan.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_plan(run_dir, plan)
    n_stages = 4 + bool(plan.memory) + bool(plan.sample_prompt)
    step = iter(range(1, n_stages + 1))
    _stage(f"{next(step)}/{n_stages} model: {ckpt or 'SmolLM2-135M-Instruct (embedded)'}")
    ckpt = Path(ckpt) if ckpt is not None else default_checkpoint(cache_dir)
    model, tokenizer = lsjax.load(ckpt, dtype="float32")
    splits = _split_sizes(plan.tasks)
    print("tasks (train / held-out docs): " + ", ".join(f"{t} {s['train']}/{s['heldout']}" for t, s in splits.items()))

    _stage(f"{next(step)}/{n_stages} held-out accuracy of the base model")
    evals = {"base": evaluate_stage(plan, "base", model, tokenizer, None, run_dir)}

    _stage(f"{next(step)}/{n_stages} train {', '.join(plan.methods)} ({plan.steps} steps x {plan.batch_size} each, "
           f"seed{'s' if len(plan.seeds) > 1 else ''} {', '.join(map(str, plan.seeds))}), then held-out accuracy")
    trains, adapters = {}, {}
    for method in plan.methods:
        trains[method], runs = {}, {}
        for seed in plan.seeds:
            done = run_training(plan, method, seed, ckpt, run_dir, sum(s["train"] for s in splits.values()))
            trains[method][seed] = done
            runs[seed] = evaluate_stage(plan, f"{method}/seed{seed}", model, tokenizer, Path(done["adapter"]), run_dir)
        adapters[method] = Path(trains[method][plan.seeds[0]]["adapter"])
        evals[method] = combine_seeds(runs)
        if len(runs) > 1:
            print(f"{method}: mean over seeds {100 * evals[method]['average']['acc']:.1f}")

    _stage(f"{next(step)}/{n_stages} decode latency (batch {', '.join(map(str, plan.latency_batches))})")
    latency = run_latency(plan, model, tokenizer, adapters, run_dir, source=ckpt.name)

    memory = {}
    if plan.memory:
        _stage(f"{next(step)}/{n_stages} peak memory while decoding")
        for name in ("base", *plan.methods):
            best = best_latency(latency, name)
            strategy = best["strategy"] if best and best["strategy"] != "-" else "auto"
            memory[name] = run_memory(name, ckpt, adapters.get(name), strategy, plan.new_tokens, run_dir)
            print(f"{name}: peak {memory[name]['peak_rss_mib']:.0f} MiB ({strategy})")

    sample = None
    if plan.sample_prompt and "switch" in adapters:
        _stage(f"{next(step)}/{n_stages} a streamed answer with the trained switch adapter")
        sample = stream_sample(model, tokenizer, adapters["switch"], plan.sample_prompt,
                               fastest=best_latency(latency, "switch"))

    results = collect(plan, evals, trains, latency, memory, splits, time.perf_counter() - start)
    if sample is not None:
        results["sample"] = {"prompt": plan.sample_prompt, "answer": sample}
    figures = plot_results(results, run_dir, "results")
    text = report_markdown(results, command, figures)
    write_json(run_dir / "results.json", results)
    (run_dir / "summary.md").write_text(text)
    if plan.results_md:
        md = Path(plan.results_md)
        docs_figures = plot_results(results, md.parent / "figures", md.stem)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text("# Reproduction: LoRA-Switch against its baselines on SmolLM2-135M-Instruct\n\n"
                      + report_markdown(results, command, {k: f"figures/{v}" for k, v in docs_figures.items()}))
        write_json(md.with_suffix(".json"), results)
    _stage("summary")
    print(text)
    print(f"artefacts: {run_dir}/ (summary.md, results.json, plots, train/, eval/, latency.json)")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lsjax.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="reproduce")
    parser.add_argument("--run-dir", help="run folder (default: the preset's; a rerun resumes it)")
    parser.add_argument("--steps", type=int, help="training steps per method")
    parser.add_argument("--seeds", help="comma-separated training seeds (each method trained once per seed)")
    parser.add_argument("--eval-limit", type=int, help="held-out documents per task (0: all)")
    parser.add_argument("--methods", help="comma-separated methods to train")
    parser.add_argument("--results-md", help="also write the report here (default: the preset's; 'none': skip)")
    parser.add_argument("--ckpt", type=Path, help="an lsjax checkpoint instead of the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("LSJAX_CACHE", ".cache/lsjax")))
    parser.add_argument("--measure-memory", metavar="CKPT", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--new-tokens", type=int, default=32, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_memory:
        print(json.dumps(measure_memory(args.measure_memory, args.adapter, args.strategy, args.new_tokens)))
        return 0
    # compiled programs are kept between runs (a second demo compiles nothing it compiled before)
    jax.config.update("jax_compilation_cache_dir", str(args.cache_dir.absolute() / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    fields = dict(PRESETS[args.preset])
    if args.run_dir:
        fields["run_dir"] = args.run_dir
    elif args.preset == "demo":  # every demo tells the whole story: a fresh folder per run
        fields["run_dir"] = f"{fields['run_dir']}/{time.strftime('%Y%m%d-%H%M%S')}"
    if args.steps is not None:
        fields["steps"] = args.steps
    if args.eval_limit is not None:
        fields["eval_limit"] = args.eval_limit or None
    if args.seeds:
        try:
            fields["seeds"] = tuple(int(k) for k in args.seeds.split(","))
        except ValueError:
            parser.error(f"--seeds {args.seeds!r}: expected comma-separated non-negative integers, e.g. 0,1")
    if args.methods:
        fields["methods"] = tuple(m.strip() for m in args.methods.split(","))
    if args.results_md:
        fields["results_md"] = None if args.results_md == "none" else args.results_md
    command = "python -m lsjax.reproduce " + " ".join(sys.argv[1:] if argv is None else argv)
    return exit_status("reproduce", lambda: reproduce(Plan(**fields), args.cache_dir, command.strip(), ckpt=args.ckpt))


if __name__ == "__main__":
    raise SystemExit(main())
