"""Run checkpoints: an orbax `CheckpointManager` holding, per saved step,

    state/   adapter params + optax state + step + rng (StandardSave: sharded arrays, any mesh)
    meta/    JSON: iterator position {"epoch", "index"}, the resolved config and its fingerprint

orbax writes each step into a temporary folder and renames it into place when the save is complete
(commit), so a run killed at any moment, mid-save included, leaves the previous steps valid; on the
next start the half-written folder is ignored (and removed) and `latest_step()` is the last
complete save. Restoring a checkpoint written by a run with a different config (other than paths,
mesh and intervals) is refused with a `CheckpointError` naming the differing fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from lsjax.errors import CheckpointError
from lsjax.train.config import TrainConfig


class RunCheckpoints:
    def __init__(self, directory: str | Path, config: TrainConfig):
        self.directory, self.config = Path(directory).absolute(), config
        options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                               enable_async_checkpointing=False, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict, iterator_state: dict[str, int]) -> None:
        meta = {"step": int(step), "iterator": iterator_state, "config": self.config.to_dict(),
                "fingerprint": self.config.fingerprint()}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, like_state: dict) -> tuple[dict, dict[str, Any]]:
        """(state, meta) of `step`, the arrays placed like `like_state` (same shapes and shardings)."""
        meta = self.read_meta(step)
        if meta.get("fingerprint") != self.config.fingerprint():
            diff = self.config.differences(meta.get("config", {}))
            raise CheckpointError(f"{self.directory}/{step}: checkpoint was written by a run with another config "
                                  f"(differs in {diff or 'unknown fields'}); resume with the same config or "
                                  f"choose another run_dir")
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like_state)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{self.directory}/{step}: state does not match this run ({e})") from None
        return restored["state"], meta

    def close(self) -> None:
        self.manager.close()
