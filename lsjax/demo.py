"""`make demo`: the whole story on the embedded SmolLM2-135M-Instruct, in a few minutes on a CPU.

Converts the embedded GGUF (once, cached), measures held-out accuracy of the base model, trains a
short LoRA-Switch adapter, measures held-out accuracy again, times decoding against the base and
the baselines, and streams an answer with the trained adapter. Everything lands in one run folder
(`runs/demo/<time>/`). It is the `demo` preset of `lsjax.eval.reproduce` (the full reproduction
is `make reproduce`).
"""

from __future__ import annotations

import sys
from pathlib import Path


def default_checkpoint(cache_dir: Path, progress: bool = True) -> Path:
    """The embedded GGUF converted to an lsjax checkpoint under `cache_dir` (converted once)."""
    from lsjax.assets import default_gguf_path
    from lsjax.convert import convert_gguf

    ckpt = Path(cache_dir) / "smollm2-135m-instruct"
    if not ckpt.exists():
        print(f"converting {default_gguf_path().name} -> {ckpt} (first run only)")
        convert_gguf(default_gguf_path(), ckpt, progress=progress)
    return ckpt


def main(argv: list[str] | None = None) -> int:
    from lsjax.eval.reproduce import main as reproduce

    return reproduce(["--preset", "demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
