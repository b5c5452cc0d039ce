"""`make demo`: the whole story on the embedded SmolLM2-135M-Instruct, in a few minutes on a CPU.

Converts the embedded GGUF (once, cached), measures held-out accuracy of the base model, trains a
short LoRA-Switch adapter, measures held-out accuracy again, times decoding against the base and
the baselines, and streams an answer with the trained adapter. Everything lands in one run folder
(`runs/demo/<time>/`). It is the `demo` preset of `lsjax.reproduce` (the full reproduction
is `make reproduce`).
"""

from __future__ import annotations

import sys

from lsjax.reproduce import main as reproduce


def main(argv: list[str] | None = None) -> int:
    return reproduce(["--preset", "demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
