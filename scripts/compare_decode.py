"""Decode speed of two source trees side by side: `lsjax bench decode` from each, alternating.

    python scripts/compare_decode.py OLD_TREE NEW_TREE --pairs 5 --json out.json -- --methods base,switch/fused

Each pair runs one bench process per tree, in alternating order (old, new, new, old, ...), so a
machine that drifts during the run drifts for both; each tree is imported from its own folder
(PYTHONPATH), with its own native library built there. Prints, per configuration and batch, the
median ms/token of each tree and new / old; the medians and every sample go to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def bench(tree: Path, args: list[str]) -> list[dict]:
    """One `lsjax bench decode` process importing `tree`; its records."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        env = {**os.environ, "PYTHONPATH": str(tree)}
        subprocess.run([sys.executable, "-m", "lsjax.cli", "bench", "decode", *args, "--json", str(out)],
                       env=env, cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["records"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--json")
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)  # after --: arguments for lsjax bench decode
    args, extra = parser.parse_args(argv[:split]), argv[split + 1:]
    samples: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    for pair in range(args.pairs):
        order = ("old", "new") if pair % 2 == 0 else ("new", "old")
        for which in order:
            for r in bench(getattr(args, which).absolute(), extra):
                key = f"{r['method']}/{r['strategy']} {r['backend']} batch {r['batch']}"
                samples[which].setdefault(key, []).append(r["ms_per_token"])
        print(f"pair {pair + 1}/{args.pairs} done", flush=True)
    rows = {}
    print("| configuration | old ms/token | new ms/token | new / old |\n|---|---:|---:|---:|")
    for key in samples["old"]:
        if key not in samples["new"]:
            continue
        old, new = statistics.median(samples["old"][key]), statistics.median(samples["new"][key])
        rows[key] = {"old_ms": old, "new_ms": new, "new_over_old": new / old}
        print(f"| {key} | {old:.2f} | {new:.2f} | {new / old:.3f} |")
    result = {"old": str(args.old), "new": str(args.new), "pairs": args.pairs, "bench_args": extra,
              "medians": rows, "samples": samples}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
