"""Compile the native CPU matvec library next to this file: `python -m lsjax.native.build`.

`make setup` (and so `make demo` / `make test`) runs this. It needs a C++20 compiler (`CXX`,
default g++) and jax's FFI headers (`jax.ffi.include_dir()`). The default build is portable: on
x86-64 Linux the hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and the best one the
CPU has is picked when the library loads. `--march native` (or `LSJAX_NATIVE_MARCH=native`) builds
for one CPU instead. Without the library lsjax runs the same decode through XLA
(`lsjax.native.available()` says why). The library is written to a temporary name and moved in
place, so a failed build never leaves a broken one behind.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax

from lsjax.native import LIBRARY, SOURCE

NO_COMPILER = "no C++ compiler"
MARCH_ENV = "LSJAX_NATIVE_MARCH"


def target(march: str | None = None) -> str | None:
    """The -march of a build: `march`, else $LSJAX_NATIVE_MARCH, else None (the portable build)."""
    return march or os.environ.get(MARCH_ENV) or None


def command(output: Path, compiler: str | None = None, march: str | None = None) -> list[str]:
    """The compiler command; `march` (default: $LSJAX_NATIVE_MARCH, else none) builds for one target."""
    compiler = compiler or os.environ.get("CXX", "g++")
    march = target(march)
    flags = ["-O3", "-std=c++20", "-shared", "-fPIC", "-pthread"]
    if march:
        flags += [f"-march={march}", "-DLSJAX_SINGLE_TARGET"]
    if platform.machine() in ("x86_64", "AMD64"):
        # AVX-512 code (the x86-64-v4 clone, or -march on such a CPU) in 512-bit vectors: gcc keeps
        # 256-bit ones otherwise; no effect on code for narrower targets
        flags.append("-mprefer-vector-width=512")
    return [compiler, *flags, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(output)]


def build(output: Path = LIBRARY, compiler: str | None = None, quiet: bool = False, march: str | None = None) -> Path:
    """Compile `matvec.cc` into `output`; raises `RuntimeError` with the compiler's message on failure."""
    cmd = command(output, compiler, march)
    if shutil.which(cmd[0]) is None:
        raise RuntimeError(f"{NO_COMPILER} {cmd[0]!r} on PATH (set CXX); lsjax decodes through XLA without it")
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        partial = Path(tmp) / output.name
        cmd[-1] = str(partial)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building {output.name} failed:\n{' '.join(cmd)}\n{done.stderr.strip()}")
        os.replace(partial, output)
    if not quiet:
        print(f"built {output} ({f'-march={target(march)}' if target(march) else 'portable'})")
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=LIBRARY)
    parser.add_argument("--march", default=None,
                        help=f"build for this -march (e.g. native) instead of the portable build; default ${MARCH_ENV}")
    parser.add_argument("--optional", action="store_true",
                        help="with no C++ compiler, say so and exit 0 (lsjax then decodes through XLA); "
                             "a compiler that fails is still an error")
    args = parser.parse_args(argv)
    try:
        build(args.output, march=args.march)
    except RuntimeError as e:
        print(f"lsjax.native: {e}", file=sys.stderr)
        return 0 if args.optional and NO_COMPILER in str(e) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
