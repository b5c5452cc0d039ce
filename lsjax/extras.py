"""Optional parts and the pip extras that bring their packages.

The core (model, adapters, decoding, training, kernels, benchmarks) needs jax, flax, optax,
orbax-checkpoint, transformers, safetensors, tokenizers, numpy, pyyaml and tqdm alone. Each optional
part imports its own packages where it is used, through `missing_extra`, so an environment without
them (a GPU image, a slim container) still runs the rest, and one that reaches for a missing part
gets an error naming the extra to install.
"""

from __future__ import annotations

import enum

from lsjax.errors import LsjaxError


class Extra(str, enum.Enum):
    """The pip extras of lsjax (`pip install 'lsjax[serve]'`) and what each one is for."""

    SERVE = "serve"  # the OpenAI-compatible HTTP server: fastapi, uvicorn, pydantic
    GGUF = "gguf"  # reading GGUF files (the embedded SmolLM2): gguf
    PEFT = "peft"  # transformers + PEFT reference timings: peft, torch
    PLOTS = "plots"  # PNG figures of benchmarks and results: matplotlib
    TENSORBOARD = "tensorboard"  # training logs for TensorBoard: tensorboardX


class MissingExtraError(LsjaxError, ImportError):
    """An optional part was asked for and its package is not installed."""


def missing_extra(error: ImportError, extra: Extra, what: str) -> MissingExtraError:
    """The error to raise (`from None`) when importing `what`'s packages failed with `error`."""
    package = error.name or str(error)
    return MissingExtraError(f"{what} needs the optional package {package!r}, which is not installed: "
                             f"pip install 'lsjax[{extra.value}]'")


def pyplot(what: str):
    """matplotlib's pyplot on the file-only Agg backend, for `what` (the `plots` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise missing_extra(e, Extra.PLOTS, what) from None
    return plt
