"""`lsjax train --config FILE [--resume] [key=value ...]`: wired into `lsjax.cli` by `add_train_parser`.

    lsjax train --config lsjax/train/configs/smollm2_switch.yaml model=ckpt/smollm2 steps=200 optim.lr=3e-4
    lsjax train --config ... --resume                      # continue from the last complete checkpoint
    # multi-host: the same command on every process, plus
    lsjax train ... --coordinator host0:1234 --num-processes 2 --process-id 0
    # (or LSJAX_COORDINATOR / LSJAX_NUM_PROCESSES / LSJAX_PROCESS_ID in the environment)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lsjax.errors import exit_status
from lsjax.train.config import load_config
from lsjax.sharding import init_distributed
from lsjax.train.loop import train


def add_train_parser(subparsers) -> Any:
    p = subparsers.add_parser("train", help="train a LoRA / routed-LoRA adapter (optax, sharded, resumable)")
    p.add_argument("--config", metavar="YAML", help="training config (see lsjax/train/configs/); defaults otherwise")
    p.add_argument("--resume", action="store_true", help="continue the run in run_dir from its last checkpoint")
    p.add_argument("--coordinator", help="multi-host: coordinator address host:port (or LSJAX_COORDINATOR)")
    p.add_argument("--num-processes", type=int, help="multi-host: process count (or LSJAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, help="multi-host: this process's id (or LSJAX_PROCESS_ID)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, dotted keys for sections: steps=100 optim.lr=3e-4 mesh.data=4")
    p.set_defaults(run=run_train)
    return p


def run_train(args) -> dict[str, Any]:

    config = load_config(args.config, args.overrides)  # validated before anything starts
    init_distributed(args.coordinator, args.num_processes, args.process_id)
    result = train(config, resume=args.resume, progress=False if args.no_progress else None)
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m lsjax.train.cli ...` (the same as `lsjax train ...`)."""
    parser = argparse.ArgumentParser(prog="lsjax")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    return exit_status("lsjax train", lambda: run_train(args))


if __name__ == "__main__":
    raise SystemExit(main())
