"""The training loop: `train(config, resume=False)`.

Builds the (data, fsdp, tensor) mesh, loads the base model sharded by `lsjax.sharding` rules,
tokenises the train split of every task (and the first `data.eval_docs` held-out documents), and
runs the jitted `train_step`. Writes into `run_dir`:

    config.yaml      the resolved config
    metrics.jsonl    one JSON object per logged step (loss, aux, lr, grad_norm, tokens, load, ...)
                     and per evaluation ({"step", "eval_loss", ["eval_acc", ...]})
    checkpoints/     orbax CheckpointManager (see lsjax.train.checkpointing)
    adapter/         the trained adapter after the last step (`lsjax.adapters` folder: load it with
                     `open_adapter`, `lsjax generate --adapter`, `lsjax eval --adapter`)

A non-finite loss stops the run with a `TrainingError` before anything from that step is saved,
so the last checkpoint stays the last good one. Multi-host: call `lsjax.sharding.init_distributed` first (the
CLI does) and run the same command on every process; each process builds the same global batch
and contributes the rows its devices hold.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh
from tqdm.auto import tqdm

from lsjax.adapters import adapted_forward
from lsjax.adapters.files import save_adapter_arrays
from lsjax.checkpoint import TOKENIZER_DIR, load_params
from lsjax.data import load_task
from lsjax.datafiles import read_examples
from lsjax.errors import CheckpointError, ConfigError, LsjaxError
from lsjax.eval.harness import evaluate, load_docs
from lsjax.extras import Extra, missing_extra
from lsjax.model import stack_layers
from lsjax.tokenizer import load_tokenizer
from lsjax.train.batches import BatchIterator, Rows, doc_examples, example_sequences, fixed_batches, layout
from lsjax.train.checkpointing import RunCheckpoints
from lsjax.train.config import MeshConfig, TrainConfig, save_config
from lsjax.train.step import global_batch, init_state, jit_train_step, make_eval_step, make_optimizer, make_train_step

AXES = ("data", "fsdp", "tensor")


class TrainingError(LsjaxError):
    """Training cannot go on (e.g. the loss became NaN/Inf)."""


def make_mesh(mesh: MeshConfig, devices: list | None = None) -> Mesh:
    """A `Mesh` over the first data * fsdp * tensor devices, with Auto axis types named (the default
    of `jax.make_mesh` is Explicit, and newer jax moves abstract meshes' default to it too)."""
    devices = jax.devices() if devices is None else devices
    if mesh.size > len(devices):
        raise ConfigError(f"mesh data x fsdp x tensor = {mesh.data} x {mesh.fsdp} x {mesh.tensor} = {mesh.size} "
                          f"devices, but only {len(devices)} are available")
    return Mesh(np.array(devices[:mesh.size]).reshape(mesh.data, mesh.fsdp, mesh.tensor), AXES,
                (AxisType.Auto,) * len(AXES))


def load_examples(tokenizer, config: TrainConfig, split: str, limit: int | None = None) -> Rows:
    """Rows of every task's and file's `split` (the first `limit` examples of each), packed if configured.

    A file none of whose examples fit `data.max_length` is an error naming it.
    """
    data = config.data
    sources = [(t, doc_examples(load_task(t, split, data.heldout_fraction)[:limit])) for t in data.tasks]
    sources += [(f, read_examples(f, split, data.heldout_fraction)[1][:limit]) for f in data.files]
    seqs, examples, dropped = [], 0, 0
    for name, part in sources:
        kept, lost = example_sequences(tokenizer, part, data.max_length)
        if not kept:
            raise ConfigError(f"{name}: none of its {len(part)} {split} examples fits data.max_length="
                              f"{data.max_length} (each needs its last answer and a token before it); raise "
                              "data.max_length or shorten the answers")
        seqs, examples, dropped = seqs + kept, examples + len(part), dropped + lost
    return Rows(layout(tokenizer, seqs, data.max_length, data.packing), examples, dropped)


class Run:
    """Everything a training run holds: mesh, base params, data, state, jitted steps."""

    def __init__(self, config: TrainConfig):

        self.config = config
        self.mesh = make_mesh(config.mesh)
        self.dtype = jnp.float32 if config.dtype == "float32" else jnp.bfloat16
        self.model_config, held = load_params(config.model, self.dtype, self.mesh)
        self.base = stack_layers(held)  # training scans the layers: hold them stacked (one copy)
        del held
        self.tokenizer = load_tokenizer(Path(config.model) / TOKENIZER_DIR)
        self.data = load_examples(self.tokenizer, config, "train")
        self.iterator = BatchIterator(self.data.rows, config.batch_size, config.seed)
        self.heldout = load_examples(self.tokenizer, config, "heldout", config.data.eval_docs).rows \
            if config.data.eval_docs else None
        self.tx, self.schedule = make_optimizer(config.optim, config.steps)
        self.state = init_state(self.model_config, config.adapter, self.tx, config.seed, self.mesh)
        self.step_fn = make_train_step(self.model_config, config.adapter, self.tx, self.schedule,
                                       accumulation=config.optim.accumulation, dtype=self.dtype)
        self.eval_fn = jax.jit(make_eval_step(self.model_config, config.adapter, self.dtype))
        self._jitted = self._logits = None

    def train_step(self, batch: dict) -> dict:

        if self._jitted is None:
            self._jitted = jit_train_step(self.step_fn, self.state, self.base, self.mesh)
        self.state, metrics = self._jitted(self.state, self.base, global_batch(batch, self.mesh))
        return jax.device_get(metrics)

    def eval_loss(self) -> float:

        ce, n = 0.0, 0.0
        for batch in fixed_batches(self.heldout, self.config.batch_size):
            c, t = self.eval_fn(self.state["params"], self.base, global_batch(batch, self.mesh))
            ce, n = ce + float(c), n + float(t)
        return ce / max(n, 1.0)

    def eval_accuracy(self) -> dict[str, Any]:
        """Held-out accuracy through lsjax.eval.harness on the first `data.eval_accuracy_docs` documents."""

        if self._logits is None:
            mc, ac, dtype = self.model_config, self.config.adapter, self.dtype
            self._logits = jax.jit(lambda p, base, ids, positions, visibility, last: adapted_forward(
                mc, base, ac, jax.tree.map(lambda x: x.astype(dtype), p), ids, positions=positions,
                visibility=visibility, last=last)[0], static_argnums=5)
        params, base = jax.device_get(self.state["params"]), self.base
        if jax.process_count() > 1:
            raise ConfigError("data.eval_accuracy_docs needs a single process (use the held-out loss multi-host)")
        docs = load_docs(list(self.config.data.tasks), "heldout", self.config.data.eval_accuracy_docs)
        return evaluate(lambda *inputs: self._logits(params, base, *inputs), self.tokenizer, docs,
                        batch_size=8, max_length=self.config.data.max_length * 2, progress=False)["average"]


def _jsonable(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v)
        out[k] = v.tolist() if v.ndim else (int(v) if v.dtype.kind in "iu" else float(v))
    return out


def _tensorboard(run_dir: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError as e:
        raise missing_extra(e, Extra.TENSORBOARD, "tensorboard=true") from None
    return SummaryWriter(str(run_dir / "tb"))


def save_final_adapter(run: Run, folder: Path) -> Path:
    """The run's adapter params as an adapter folder, written to a staging folder and renamed into place."""



    params = run.state["params"]
    params = (multihost_utils.process_allgather(params, tiled=True) if jax.process_count() > 1
              else jax.device_get(params))
    if jax.process_index() != 0:
        return folder
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    save_adapter_arrays(staging, run.model_config, run.config.adapter, params)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def train(config: TrainConfig, resume: bool = False, *, progress: bool | None = None) -> dict[str, Any]:
    """Train until `config.steps`, then write `run_dir/adapter`; returns the last metrics (and eval numbers)."""


    run_dir = Path(config.run_dir)
    ckpts_dir = run_dir / "checkpoints"
    lead = jax.process_index() == 0
    existing = ckpts_dir.is_dir() and any(p.name.isdigit() for p in ckpts_dir.iterdir())
    if existing and not resume:
        raise CheckpointError(f"{run_dir}: already holds checkpoints; pass --resume to continue that run "
                              f"or choose another run_dir")
    run = Run(config)
    ckpts = RunCheckpoints(ckpts_dir, config)
    start = 0
    if resume and ckpts.latest_step() is not None:
        start = ckpts.latest_step()
        run.state, meta = ckpts.restore(start, run.state)
        run.iterator.restore(meta["iterator"])
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    log = open(run_dir / "metrics.jsonl", "a") if lead else None
    tb = _tensorboard(run_dir) if lead and config.tensorboard else None
    if log and resume:
        log.write(json.dumps({"event": "resume", "step": start}) + "\n")
    if log:  # what the rows hold: examples, those dropped as too long, rows, share of padding
        log.write(json.dumps({"event": "data", "packing": config.data.packing, **run.data.summary()}) + "\n")
    if lead and run.data.dropped:
        print(f"data: {run.data.dropped} of {run.data.examples} training examples dropped: their last answer does "
              f"not fit data.max_length={config.data.max_length}", flush=True)
    show = config.progress if progress is None else progress
    bar = tqdm(total=config.steps, initial=start, disable=not (show and lead), desc="train", dynamic_ncols=True)
    last: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        if start == 0 and run.heldout is not None:  # the starting point (the base model: B is zero at init)
            record = {"step": 0, "eval_loss": run.eval_loss()}
            if log:
                log.write(json.dumps(record) + "\n")
        for step in range(start, config.steps):
            metrics = run.train_step(next(run.iterator))
            loss = float(metrics["loss"])
            if not math.isfinite(loss) or not math.isfinite(float(metrics["grad_norm"])):
                good = ckpts.latest_step()
                raise TrainingError(f"non-finite loss ({loss}) or gradient norm at step {step + 1}; stopped without "
                                    f"saving. Last good checkpoint: "
                                    f"{f'step {good} in {ckpts_dir}' if good is not None else 'none'} "
                                    f"(resume from it with a lower optim.lr or stronger clipping)")
            done = step + 1
            last = {"step": done, **_jsonable(metrics), "seconds": round(time.perf_counter() - t0, 3)}
            if log and (done % config.log_every == 0 or done == config.steps):
                log.write(json.dumps(last) + "\n")
                log.flush()
                if tb:
                    for k, v in last.items():
                        if isinstance(v, float):
                            tb.add_scalar(f"train/{k}", v, done)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{float(metrics['lr']):.2e}")
            bar.update(1)
            if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.steps:
                ckpts.save(done, run.state, run.iterator.state())
            if (config.eval_every and done % config.eval_every == 0) or done == config.steps:
                record = {"step": done}
                if run.heldout is not None:
                    record["eval_loss"] = run.eval_loss()
                if config.data.eval_accuracy_docs:
                    record.update({f"eval_{k}": v for k, v in run.eval_accuracy().items()})
                last.update({k: v for k, v in record.items() if k != "step"})
                if tb:
                    for k, v in record.items():
                        if k != "step" and isinstance(v, (int, float)):
                            tb.add_scalar(f"eval/{k}", v, done)
                if log and len(record) > 1:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
        save_final_adapter(run, run_dir / "adapter")
    finally:
        bar.close()
        if log:
            log.close()
        if tb:
            tb.close()
        ckpts.close()
    return last
